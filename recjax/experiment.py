"""One run from a config: data -> split -> batches -> model -> fit -> metrics on the test split.

This is what `recjax train` calls, and what experiment scripts call to get the standard pipeline
with a few keys changed. Everything it writes goes under one output folder:
`config.json`, `log.jsonl`, `metrics.json`, `checkpoints/`, `curves.png`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from recjax import losses, models, tasks
from recjax.data import preprocess, samplers, splits
from recjax.data.datasets import LoadedDataset, load_dataset, resolve_data_dir
from recjax.data.interactions import Interactions
from recjax.errors import ConfigError, DataError
from recjax.eval import protocols, ranking
from recjax.optim import create_optimizer
from recjax.train import Checkpointer, create_train_state, fit, make_train_step
from recjax.train.mesh import batch_sharding, check_divisible, data_mesh


@dataclasses.dataclass
class Experiment:
  """Everything a run needs, built once from a config (host data, model, eval targets)."""
  config: dict[str, Any]
  split: splits.Split
  protocol: protocols.Protocol
  model: Any
  kind: str
  eval_sets: dict[str, dict[str, np.ndarray]]   # phase -> inputs / positives / exclude
  score_fn: Callable = None        # (params, inputs) -> [U, N]; one per run so evaluation compiles once
  item_score_fn: Callable = None   # (params, inputs, items [U, C]) -> [U, C], for sampled ranking
  mesh: Any = None                 # data-parallel mesh of the run (None: one device)

  def __post_init__(self):
    self.mesh = train_mesh(self.config)
    self.score_fn = tasks.score_fn(self.model)
    self.item_score_fn = ranking.gather_scorer(self.score_fn)

  @property
  def valid_metric(self) -> str:
    return self.config["valid_metric"] or self.protocol.valid_metric


def preprocess_interactions(inter: Interactions, options: dict[str, Any]) -> Interactions:
  """Dedup, rating threshold and k-core as configured; ids renumbered when anything was dropped."""
  out = inter
  if options["dedup"]:
    out = preprocess.deduplicate(out)
  if options["min_rating"] is not None:
    out = preprocess.filter_rating(out, options["min_rating"])
  if options["user_core"] or options["item_core"]:
    out = preprocess.k_core(out, min_user=options["user_core"], min_item=options["item_core"])
  if len(out) != len(inter):
    out = preprocess.remap_ids(out)
    preprocess.check_nonempty(out, "preprocessing")
  return out


def make_split(loaded: LoadedDataset, protocol: protocols.Protocol, config: dict[str, Any]) -> splits.Split:
  """The protocol's split of the (preprocessed) data."""
  if protocol.split == "given":
    if loaded.given is None:
      raise ConfigError(f"protocol {protocol.name!r} needs a pre-split dataset; {config['dataset']!r} has none")
    return splits.given(*loaded.given)
  inter = preprocess_interactions(loaded.interactions, config["preprocess"])
  if protocol.split == "leave_one_out":
    return splits.leave_one_out(inter)
  if protocol.split == "random_ratio":
    return splits.random_ratio(inter, protocol.ratios, seed=config["seed"])
  if protocol.split == "temporal_ratio":
    return splits.temporal_ratio(inter, protocol.ratios)
  if protocol.split == "global_temporal":
    return splits.global_temporal(inter, protocol.ratios)
  raise ConfigError(f"protocol {protocol.name!r}: unknown split {protocol.split!r}")


def build_eval_set(split: splits.Split, phase: str, protocol: protocols.Protocol) -> dict[str, np.ndarray]:
  """Inputs, positives and masked items of one phase, computed once per run."""
  users, positives, exclude, history = protocols.eval_targets(split, phase, protocol.mask_history)
  if len(users) == 0:
    raise DataError(split.train.name or "dataset", f"no user has a {phase} interaction; cannot evaluate")
  inputs = samplers.eval_inputs(history, users, protocol.max_len)
  return {"inputs": inputs, "positives": positives, "exclude": exclude}


def build(config: dict[str, Any]) -> Experiment:
  """Data, split, model and evaluation targets for `config` (no training)."""
  if config["negative_distribution"] not in samplers.DISTRIBUTIONS:
    raise ConfigError(f"negative_distribution: expected one of {samplers.DISTRIBUTIONS}, "
                      f"got {config['negative_distribution']!r}")
  protocol = protocols.get_protocol(config["protocol"])
  loaded = load_dataset(config["dataset"], resolve_data_dir(config["data_dir"]))
  split = make_split(loaded, protocol, config)
  splits.check_split(split)
  hparams = {k: v for k, v in config["model"].items() if k != "name"}
  name = config["model"]["name"]
  kind = models.model_kind(name)
  if kind == "sequential":
    hparams.setdefault("max_len", protocol.max_len)
  model = models.create_model(name, num_users=split.train.num_users, num_items=split.train.num_items, **hparams)
  eval_sets = {phase: build_eval_set(split, phase, protocol) for phase in ("valid", "test")}
  return Experiment(config, split, protocol, model, kind, eval_sets)


def make_sampler(exp: Experiment):
  """The batch maker that the config's `training` scheme names."""
  c = exp.config
  if c["training"] == "pairs":
    return samplers.PairSampler(exp.split.train, c["batch_size"], c["num_negatives"], seed=c["seed"],
                                distribution=c["negative_distribution"])
  if c["training"] in ("sequence", "prefix"):
    return samplers.SequenceSampler(exp.split.train, exp.protocol.max_len, c["batch_size"], c["num_negatives"],
                                    seed=c["seed"], mode=c["training"], stride=c["window_stride"],
                                    distribution=c["negative_distribution"],
                                    negatives_for="items" if tasks.objective(exp.model) == "masked_item" else "targets")
  raise ConfigError(f"training: unknown scheme {c['training']!r}; known: pairs, sequence, prefix")


def init_params(exp: Experiment, rng: jax.Array):
  """Model parameters: counted for Pop, initialised by the model otherwise."""
  if exp.kind == "popularity":
    return models.pop_params(np.bincount(exp.split.train.item, minlength=exp.split.train.num_items))
  return models.init_params(exp.model, rng)


def make_loss_fn(exp: Experiment):
  """The config's loss bound to the model, with the options it needs: `l2_weight` (pairwise losses),
  `log_q` (sampled softmax: log of the negative distribution), `beta` (gBCE, from `gbce_t`)."""
  c, name, options = exp.config, exp.config["loss"], {}
  if c["l2_weight"]:
    options["l2_weight"] = c["l2_weight"]
  if name == "sampled_softmax":
    q = samplers.negative_probs(exp.split.train, c["negative_distribution"])
    options["log_q"] = np.log(np.maximum(q, np.finfo(np.float32).tiny)).astype(np.float32)
  if name == "gbce":
    try:
      options["beta"] = losses.gbce_beta(c["num_negatives"], exp.split.train.num_items - 1, c["gbce_t"])
    except ValueError as e:
      raise ConfigError(f"loss 'gbce' (num_negatives, gbce_t): {e}") from e
  return tasks.create_loss_fn(exp.kind, name, model=exp.model, **options)


def make_evaluator(exp: Experiment, phase: str) -> Callable[[Any], dict[str, float]]:
  """params -> metrics of `phase` under the protocol (full ranking, plus sampled when it asks)."""
  data, protocol = exp.eval_sets[phase], exp.protocol
  options = dict(ks=protocol.ks, metrics=protocol.metrics, budget_bytes=exp.config["eval_budget_mb"] << 20)
  num_items = exp.split.train.num_items
  sharding = batch_sharding(exp.mesh) if exp.mesh else None

  def run(params) -> dict[str, float]:
    out = ranking.evaluate_full(exp.score_fn, params, data["inputs"], data["positives"], data["exclude"],
                                num_items=num_items, sharding=sharding, **options)
    if protocol.sampled:
      out.update(ranking.evaluate_sampled(
          exp.item_score_fn, params, data["inputs"], data["positives"][:, 0], data["exclude"],
          num_negatives=protocol.sampled, distribution=protocol.sampled_distribution,
          item_counts=np.bincount(exp.split.train.item, minlength=num_items), seed=exp.config["seed"], **options))
    return out

  return run


def train_mesh(config: dict[str, Any]):
  """The data-parallel mesh of a run, or None for one device."""
  count = config["devices"] or jax.device_count()
  if count == 1:
    return None
  mesh = data_mesh(count)
  check_divisible(config["batch_size"], mesh)
  return mesh


def device_batches(exp: Experiment, sampler) -> Callable[[int], Any]:
  """epoch -> the sampler's batches on device, split over the run's mesh, prefetched."""
  sharding = batch_sharding(exp.mesh) if exp.mesh else None
  return lambda epoch: samplers.prefetch_to_device(sampler.epoch(epoch), sharding=sharding)


def make_optimizer(config: dict[str, Any]):
  return create_optimizer(config["optimizer"], config["learning_rate"], weight_decay=config["weight_decay"])


def restore_best_params(exp: Experiment, run_dir: str | os.PathLike):
  """Best parameters of a run folder (Pop has none: counted again from the split)."""
  rng = jax.random.PRNGKey(exp.config["seed"])
  params = init_params(exp, rng)
  if exp.kind == "popularity" or exp.config["epochs"] == 0:
    return params
  template = create_train_state(params, make_optimizer(exp.config), rng)
  with Checkpointer(Path(run_dir) / "checkpoints") as checkpoints:
    restored = checkpoints.restore_best(template)
  if restored is None:
    raise DataError(Path(run_dir) / "checkpoints", "no best checkpoint: the run has not finished an evaluation")
  return restored[0].params


def write_json(path: Path, obj: Any) -> None:
  """Atomic JSON write: a reader (or a kill) never sees half a file."""
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
  os.replace(tmp, path)


def _json_default(obj):
  if isinstance(obj, (np.integer, np.floating)):
    return obj.item()
  if isinstance(obj, (tuple, np.ndarray)):
    return list(obj)
  raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def train(config: dict[str, Any], out_dir: str | os.PathLike | None = None, *, resume: bool = False,
          log: Callable[[str], None] = print) -> dict[str, Any]:
  """Train and test one config; returns (and writes to `out_dir/metrics.json`) the results dict."""
  exp = build(config)
  out = Path(out_dir) if out_dir else None
  if out:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
  rng = jax.random.PRNGKey(config["seed"])
  params = init_params(exp, rng)
  valid_eval, test_eval = make_evaluator(exp, "valid"), make_evaluator(exp, "test")

  if exp.kind == "popularity" or config["epochs"] == 0:
    start = time.perf_counter()
    best_params, best_valid, epochs_run, train_s, eval_s = params, valid_eval(params), 0, [], []
    eval_s.append(time.perf_counter() - start)
  else:
    sampler = make_sampler(exp)
    optimizer = make_optimizer(config)
    state = create_train_state(params, optimizer, jax.random.fold_in(rng, 1))
    step = make_train_step(make_loss_fn(exp), optimizer, mesh=exp.mesh)
    result = fit(state, step, device_batches(exp, sampler), valid_eval, steps_per_epoch=sampler.num_batches,
                 epochs=config["epochs"], eval_every=config["eval_every"], valid_metric=exp.valid_metric,
                 patience=config["patience"], out_dir=out, resume=resume, keep=config["keep_checkpoints"], log=log)
    best_params, best_valid, epochs_run = result.best_params, result.best_valid, result.epochs_run
    train_s, eval_s = result.train_epoch_s, result.eval_s

  start = time.perf_counter()
  test = test_eval(best_params)
  test_s = time.perf_counter() - start
  metrics = {
      "valid": best_valid, "test": test, "epochs_run": epochs_run,
      "train_epoch_s": statistics.median(train_s) if train_s else 0.0,
      "eval_s": statistics.median(eval_s) if eval_s else 0.0, "test_s": test_s,
      "protocol": exp.protocol.name, "valid_metric": exp.valid_metric,
  }
  if out:
    write_json(out / "metrics.json", metrics)
  return metrics
