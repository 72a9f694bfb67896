"""One run from a config: data -> split -> batches -> model -> fit -> metrics on the test split.

This is what `recjax train` calls, and what experiment scripts call to get the standard pipeline
with a few keys changed. Everything it writes goes under one output folder:
`config.json`, `log.jsonl`, `metrics.json`, `checkpoints/`, `curves.png`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from recjax import losses, models, tasks
from recjax.config import BASE, MODEL_DEFAULTS, apply_overrides, default_config, dotted, flatten
from recjax.data import domains, labeled, preprocess, samplers, splits
from recjax.data.datasets import LoadedDataset, load_dataset, resolve_data_dir
from recjax.data.features import build_feature_tables
from recjax.data.interactions import Interactions
from recjax.errors import ConfigError, DataError, TrainingError
from recjax.eval import classification, protocols, ranking
from recjax.models.multidomain import param_group
from recjax.nn.graph import normalized_adjacency
from recjax.optim import create_optimizer, no_decay_on_biases_and_norms, warmup_linear_decay
from recjax.train import Checkpointer, adapt, create_train_state, distributed, fit, make_train_step
from recjax.train.logging import json_line, write_atomic
from recjax.train.mesh import (
  batch_sharding,
  check_divisible,
  create_sharded,
  make_mesh,
  on_mesh,
  pad_tables,
  put_global,
  unsplit_tables,
)


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
  mesh: Any = None                 # [data, model] mesh of the run (None: one device)
  eval_params: Callable = None     # params -> what score_fn reads: the params, or a graph model's propagated tables
  labeled_data: labeled.LabeledData | None = None   # labelled rows (pointwise training / labelled evaluation)
  logits_fn: Callable = None       # jitted (params, rows) -> [C] of kind "ctr" models, one per run
  domains: tuple[str, ...] | None = None   # domain names (id k = domains[k]) when the config sets domain.rule
  constants: dict = None           # the model's constants (models.model_constants), on the run's devices
  full_split: splits.Split | None = None   # the split before `domain.only` kept one domain's rows (None: `split`)

  def __post_init__(self):
    self.mesh = train_mesh(self.config)
    constants = models.model_constants(self.model)
    self.constants = on_mesh(constants, self.mesh) if self.mesh else jax.device_put(constants)
    self.score_fn, self.item_score_fn = tasks.score_fn(self.model), tasks.item_score_fn(self.model)
    self.eval_params = _identity
    if tasks.has_ranking_tables(self.model):   # propagate once per evaluation pass; user chunks only gather
      self.eval_params = jax.jit(tasks.ranking_tables_fn(self.model))
      self.score_fn, self.item_score_fn = tasks.tables_score, tasks.tables_item_score
    if self.kind == "ctr":
      self.logits_fn = jax.jit(tasks.logits_fn(self.model))

  def with_constants(self, params) -> dict:
    """`params` with the model's constants beside them, as the model's `apply` (and every jitted
    function of the run, which then takes the constants as arguments) reads them."""
    return {**params, **self.constants} if self.constants else params

  @property
  def max_len(self) -> int:
    """History length fed to the model (sampler and evaluation): a sequential model's `max_len` (RecBole's
    MAX_ITEM_LIST_LENGTH, 50, by default), else the protocol's."""
    return history_length(self.model, self.protocol)

  @property
  def valid_metric(self) -> str:
    return self.config["valid_metric"] or self.protocol.valid_metric

  @property
  def higher_is_better(self) -> bool:
    return protocols.higher_is_better(self.valid_metric)


def _identity(params):
  return params


def history_length(model, protocol: protocols.Protocol) -> int:
  return getattr(model, "max_len", protocol.max_len)


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
  rule, column = config["domain"]["rule"], config["domain"]["column"]
  with_domains = (lambda inter: domains.assign_domains(inter, rule, column)) if rule else (lambda inter: inter)
  if protocol.split == "given":
    if loaded.given is None:
      raise ConfigError(f"protocol {protocol.name!r} needs a pre-split dataset; {config['dataset']!r} has none")
    return splits.given(*map(with_domains, loaded.given))
  inter = with_domains(preprocess_interactions(loaded.interactions, config["preprocess"]))
  if not protocol.cold_items:
    return split_interactions(inter, protocol, config["seed"])
  warm, cold = splits.hold_out_items(inter, protocol.cold_items, seed=config["seed"])
  split = split_interactions(warm, protocol, config["seed"])   # the rest is split as usual
  return dataclasses.replace(split, name=f"{split.name}+cold", cold=cold)


def split_interactions(inter: Interactions, protocol: protocols.Protocol, seed: int) -> splits.Split:
  """`inter` split by the protocol's splitter."""
  if protocol.split == "leave_one_out":
    return splits.leave_one_out(inter)
  if protocol.split == "leave_last_out":
    return splits.leave_last_out(inter)
  if protocol.split == "random_ratio":
    return splits.random_ratio(inter, protocol.ratios, seed=seed)
  if protocol.split == "temporal_ratio":
    return splits.temporal_ratio(inter, protocol.ratios)
  if protocol.split == "global_temporal":
    return splits.global_temporal(inter, protocol.ratios)
  if protocol.split == "random_rows":
    return labeled.random_rows(inter, protocol.ratios, seed=seed)
  if protocol.split == "domain_rows":
    return domains.split_by_domain(inter, protocol.ratios, seed=seed)
  raise ConfigError(f"protocol {protocol.name!r}: unknown split {protocol.split!r}")


def build_eval_set(split: splits.Split, phase: str, protocol: protocols.Protocol,
                   max_len: int) -> dict[str, np.ndarray]:
  """Inputs, positives and masked items of one phase ("valid", "test", or "cold": the held-out items of
  a cold-start split), computed once per run; histories cut to the latest `max_len` items. A sampled
  protocol also gets "interacted": each user's history items as CSR, never drawn as negatives, whether
  or not full ranking masks them (the BERT4Rec and SASRec authors' code, RecBole's sampled evaluation)."""
  if phase == "cold":
    users, positives, exclude, history = protocols.cold_targets(split)
  else:
    users, positives, exclude, history = protocols.eval_targets(split, phase, protocol.mask_history)
  if len(users) == 0:
    raise DataError(split.train.name or "dataset", f"no user has a {phase} interaction; cannot evaluate")
  inputs = samplers.eval_inputs(history, users, max_len)
  data = {"inputs": inputs, "positives": positives, "exclude": exclude}
  if protocol.sampled:
    data["interacted"] = protocols.item_sets(history, users)
  return data


def domain_eval_sets(split: splits.Split, names: tuple[str, ...], protocol: protocols.Protocol,
                     max_len: int) -> dict[str, dict]:
  """`{"valid/NAME": ..., "test/NAME": ...}`: evaluation targets of each domain's rows of the phase."""
  sets = {}
  for phase in ("valid", "test"):
    part = getattr(split, phase)
    for name in names:
      rows = domains.in_domain(part, name)
      if rows.any():
        only_domain = dataclasses.replace(split, **{phase: part.subset(rows)})
        sets[f"{phase}/{name}"] = build_eval_set(only_domain, phase, protocol, max_len)
  return sets


LR_DECAYS = ("constant", "linear")   # `lr_decay`: see `learning_rate`


def _check_choice(config: dict[str, Any], key: str, choices: tuple[str, ...]) -> None:
  if config[key] not in choices:
    raise ConfigError(f"{key}: expected one of {choices}, got {config[key]!r}")


def build(config: dict[str, Any]) -> Experiment:
  """Data, split, model and evaluation targets for `config` (no training)."""
  _check_choice(config, "negative_distribution", samplers.DISTRIBUTIONS)   # checked before any data is read
  _check_choice(config, "pair_sampling", samplers.PAIR_SAMPLING)
  _check_choice(config, "lr_decay", LR_DECAYS)
  compute_dtype(config)
  protocol = protocols.get_protocol(config["protocol"])
  name = config["model"]["name"]
  multi_task = models.is_multidomain(name)   # logits per domain and task; no ranking
  if multi_task and (protocol.task == "ranking" or config["training"] != "labeled"):
    labelled = sorted(p.name for p in protocols.PRESETS.values() if p.task == "labeled")
    raise ConfigError(f"model {name!r} predicts labels per domain and task and does not score items: it needs "
                      f"a labelled protocol ({labelled}) and training='labeled', not protocol {protocol.name!r} "
                      f"with training={config['training']!r}")
  if len(config["label_columns"] or ()) > 1 and not multi_task:
    raise ConfigError(f"label_columns {list(config['label_columns'])}: several tasks need a multi-task model "
                      f"({sorted(filter(models.is_multidomain, models.MODELS))}); "
                      f"{name!r} predicts one label")
  if config["ks"] is not None and protocol.task != "ranking":
    raise ConfigError(f"ks {list(config['ks'])}: protocol {protocol.name!r} has no ranking to cut off")
  chosen = {key: tuple(config[key]) for key in ("metrics", "ks") if config[key] is not None}
  if config["valid_metric"]:   # the protocol checks that it computes it (a per-task or per-domain key: its metric)
    chosen["valid_metric"] = protocols.metric_parts(config["valid_metric"])[0]
  protocol = dataclasses.replace(protocol, **chosen) if chosen else protocol
  if protocol.split == "given":   # filtering would change the split the protocol compares on
    preprocessing = preprocess_options(config)
    if preprocessing:
      raise ConfigError(f"protocol {protocol.name!r} evaluates the dataset's given split as it is: "
                        f"preprocess.{', preprocess.'.join(preprocessing)} cannot apply to it")
  loaded = load_dataset(config["dataset"], resolve_data_dir(config["data_dir"]))
  split = make_split(loaded, protocol, config)
  parts = [getattr(split, part) for part in splits.PARTS]
  names = tuple(sorted(set().union(*map(domains.domain_names, parts)))) if config["domain"]["rule"] else None
  full_split = split
  all_train = split.train   # feature vocabularies: every domain's, so one-domain and all-domain models share shapes
  if config["domain"]["only"] is not None:
    split = domains.only_domain(split, config["domain"]["only"]) if names else _need_domains("domain.only")
  splits.check_split(split)
  kept = (config["domain"]["only"],) if config["domain"]["only"] is not None else names   # the domains evaluated
  _check_metric_scope(config["valid_metric"], kept, config["label_columns"])
  hparams = {k: v for k, v in config["model"].items() if k != "name"}
  kind = models.model_kind(name)
  if multi_task:   # heads per domain and task, from the data
    hparams.update(num_domains=len(names) if names else _need_domains(f"model {name!r}"),
                   num_tasks=len(config["label_columns"] or ()) or 1)
  if getattr(models.MODELS[name], "needs_features", False):   # feature fields of the training split
    hparams["features"] = build_feature_tables(all_train)
  if getattr(models.MODELS[name], "needs_graph", False):   # the normalised graph of the training split, built once
    hparams["graph"] = normalized_adjacency(split.train)
  if config["text"]["model"]:
    if not models.reads_text(name):
      raise ConfigError(f"text.model is set, but model {name!r} does not read item text (models that do: "
                        f"{sorted(n for n in models.MODELS if models.reads_text(n))})")
    hparams["item_text"] = build_item_text(config["text"], split)
  model = models.create_model(name, num_users=split.train.num_users, num_items=split.train.num_items, **hparams)
  data = build_labeled(config, protocol, split, kind, names)
  if protocol.task == "ranking":
    if len(split.valid) == 0 and protocol.split not in ("given", "leave_last_out"):   # those have none by design
      raise DataError(config["dataset"], f"protocol {protocol.name!r} (split {protocol.split!r}) left no valid "
                      "rows (too few interactions per user?): the model would be selected on test")
    phases = ("test",) if len(split.valid) == 0 else ("valid", "test")
    max_len = history_length(model, protocol)
    eval_sets = {phase: build_eval_set(split, phase, protocol, max_len) for phase in phases}
    # A split without a valid part (LightGCN's Gowalla; `leave_last_out`): test stands in for valid. Model
    # selection is then on test, as the LightGCN and NGCF authors' code does (their published figures are
    # chosen so), unless the protocol evaluates once (`bert4rec-code`, as the BERT4Rec authors' code).
    eval_sets.setdefault("valid", eval_sets["test"])
    if split.cold is not None:
      eval_sets["cold"] = build_eval_set(split, "cold", protocol, max_len)
    if names:   # each domain's rows of the phase (the other parts, hence the masked history, unchanged)
      eval_sets.update(domain_eval_sets(split, names, protocol, max_len))
  else:
    eval_sets = {phase: {"user": rows.user, "item": rows.item, "target": rows.target}
                 for phase, rows in (("valid", data.valid), ("test", data.test))}
  return Experiment(config, split, protocol, model, kind, eval_sets, labeled_data=data, domains=names,
                    full_split=full_split)


def preprocess_options(config: dict[str, Any]) -> list[str]:
  """The `preprocess` keys `config` sets away from their defaults (none: the data is used as read)."""
  return sorted(key for key, value in config["preprocess"].items() if value != BASE["preprocess"][key])


def _check_metric_scope(valid_metric: str | None, domains: tuple[str, ...] | None, tasks) -> None:
  """The domain and task a `valid_metric` of the form `metric[:task][/domain]` names are the run's."""
  _, task, domain = protocols.metric_parts(valid_metric or "")
  if domain and domain not in (domains or ()):
    raise ConfigError(f"valid_metric {valid_metric!r}: this run has no domain {domain!r} "
                      f"(domains: {list(domains) if domains else 'none; set domain.rule'})")
  if task and task not in (tasks or ()):
    raise ConfigError(f"valid_metric {valid_metric!r}: this run has no task {task!r} "
                      f"(tasks, the label_columns: {list(tasks) if tasks else 'none'})")


def _need_domains(what: str):
  raise ConfigError(f"{what} needs domains: set domain.rule (e.g. --set domain.rule='item_genre_group'; "
                    f"rules: {list(domains.RULES)})")


def build_item_text(options: dict[str, Any], split: splits.Split):
  """The items' text vectors (cached, `recjax.data.text`) as the table a text-aware tower reads; the ID
  embedding is used for items with training interactions only."""
  from recjax.data.text import item_text_vectors
  from recjax.nn.text import item_text_table, load_text_encoder

  if options["finetune_layers"] < 0 or options["batch_size"] < 1:
    raise ConfigError(f"text.finetune_layers must be >= 0 and text.batch_size >= 1, got {options['finetune_layers']} "
                      f"and {options['batch_size']}")
  # Fine-tuning needs the weights anyway; frozen vectors from the cache do not.
  encoder = load_text_encoder(options["model"]) if options["finetune_layers"] else None
  texts = item_text_vectors(split.train, options["model"], options["fields"], options["cache_dir"],
                            options["batch_size"], encoder=encoder)
  trained = np.bincount(split.train.item, minlength=split.train.num_items) > 0
  return item_text_table(texts.vectors, trained, use_id=options["use_id"], encoder=encoder, texts=texts.texts,
                         finetune_layers=options["finetune_layers"], batch_size=options["batch_size"])


def build_labeled(config: dict[str, Any], protocol: protocols.Protocol, split: splits.Split,
                  kind: str, domain_names: tuple[str, ...] | None = None) -> labeled.LabeledData | None:
  """Labelled rows when the protocol evaluates them or the model trains on them (`training`
  "labeled"), else None. The task is the protocol's ("labeled" | "rating"); a ranking protocol
  with labelled training uses CTR labels. Checks that model kind, protocol and loss agree."""
  pointwise = config["training"] == "labeled"
  if config.get("rating_normalization") is not None and protocol.task != "rating":   # else silently unused
    raise ConfigError(f"rating_normalization applies to rating regression (--protocol rating), not to protocol "
                      f"{protocol.name!r}")
  if protocol.task == "ranking" and not pointwise:
    return None
  if kind != "ctr":
    what = f"protocol {protocol.name!r} evaluates labelled rows" if protocol.task != "ranking" else \
        "training 'labeled' trains on labelled rows"
    raise ConfigError(f"{what}: that needs a kind 'ctr' model (with logits), and "
                      f"{config['model']['name']!r} is {kind!r}")
  task = "labeled" if protocol.task == "ranking" else protocol.task
  if task == "rating" and not pointwise:   # RMSE of ranking scores would mean nothing
    raise ConfigError(f"protocol {protocol.name!r} evaluates predicted ratings, which only rating regression "
                      f"learns: --set training='labeled' (loss 'mse'), not training={config['training']!r}")
  if pointwise and config["loss"] != {"labeled": "bce", "rating": "mse"}[task]:
    fix = "--set loss='mse'" if task == "rating" else "--set loss='bce' (rating regression: --protocol rating)"
    raise ConfigError(f"loss {config['loss']!r} does not fit task {task!r} of protocol {protocol.name!r}: {fix}")
  return labeled.labeled_data(split, task, threshold=config["label_threshold"],
                              normalization=config["rating_normalization"], label_columns=config["label_columns"],
                              domains=domain_names)


def make_sampler(exp: Experiment):
  """The batch maker that the config's `training` scheme names."""
  c = exp.config
  if c["training"] == "pairs":
    return samplers.PairSampler(exp.split.train, c["batch_size"], c["num_negatives"], seed=c["seed"],
                                distribution=c["negative_distribution"], exclude_items=exp.split.cold_items,
                                sampling=c["pair_sampling"])
  if c["training"] in ("sequence", "prefix"):
    if c["window_stride"] is not None and c["window_stride"] > exp.max_len:
      raise ConfigError(f"window_stride must be in [1, max_len={exp.max_len}], got {c['window_stride']}")
    return samplers.SequenceSampler(exp.split.train, exp.max_len, c["batch_size"], c["num_negatives"],
                                    seed=c["seed"], mode=c["training"], stride=c["window_stride"],
                                    distribution=c["negative_distribution"], exclude_items=exp.split.cold_items,
                                    negatives_for="items" if tasks.objective(exp.model) == "masked_item" else "targets")
  if c["training"] == "labeled":
    rows = exp.labeled_data
    return samplers.LabeledSampler(rows.train.user, rows.train.item, rows.train_targets(), c["batch_size"],
                                   seed=c["seed"], domain=rows.train.domain)
  raise ConfigError(f"training: unknown scheme {c['training']!r}; known: pairs, sequence, prefix, labeled")


def init_params(exp: Experiment, rng: jax.Array):
  """Model parameters: counted for Pop, initialised by the model otherwise."""
  if exp.kind == "popularity":
    try:
      return models.pop_params(np.bincount(exp.split.train.item, minlength=exp.split.train.num_items),
                               exp.model.unseen_order, seed=exp.model.unseen_seed)
    except ValueError as e:
      raise ConfigError(f"model.unseen_order: {e}") from e
  params = models.init_params(exp.model, rng, exp.constants)
  return pad_tables(params, exp.mesh, shard_min_bytes(exp.config)) if exp.mesh else params


def initial_params(exp: Experiment, rng: jax.Array):
  """The parameters training starts from: `init_params`, then NeuMF's pretrained towers (`pretrain.*`) and a
  finished run's parameters (`finetune.from_run`) copied in when the config names them."""
  return finetune_init(exp, pretrained_init(exp, init_params(exp, rng)))


def shard_min_bytes(config: dict[str, Any]) -> int:
  return int(config["shard_tables_mb"] * (1 << 20))


def init_state(exp: Experiment, optimizer, rng: jax.Array):
  """The training state at step 0 and its sharding (None on one device). On a mesh the state is created
  in place: embedding tables of at least `shard_tables_mb` row-sharded over `model` (Adam's moments
  alike), the rest replicated, so a table too big for one device is never whole on one."""
  key = jax.random.fold_in(rng, 1)
  if any(pretrain_runs(exp.config).values()) or exp.config["finetune"]["from_run"]:   # restored on the host, placed
    params = initial_params(exp, rng)
    make = lambda: create_train_state(params, optimizer, key)  # noqa: E731
  else:
    make = lambda: create_train_state(init_params(exp, rng), optimizer, key)  # noqa: E731
  if exp.mesh is None:
    return make(), None
  unsplit = unsplit_tables(jax.eval_shape(make).params, exp.mesh, shard_min_bytes(exp.config))
  if unsplit:
    raise ConfigError(f"model_parallel={exp.config['model_parallel']}: {', '.join(unsplit)} reach shard_tables_mb="
                      f"{exp.config['shard_tables_mb']}, but recjax row-shards only id embedding tables, not feature "
                      "tables: they would be whole on every device. Train data-parallel (model_parallel=1), or set "
                      "shard_tables_mb above them")
  return create_sharded(make, exp.mesh, shard_min_bytes(exp.config))


def make_loss_fn(exp: Experiment):
  """The config's loss bound to the model, with the options it needs: `l2_weight` (pairwise losses),
  `log_q` (sampled softmax: log of the negative distribution), `beta` (gBCE, from `gbce_t`)."""
  c, name, options = exp.config, exp.config["loss"], {}
  if c["l2_weight"]:
    options["l2_weight"] = c["l2_weight"]
  if name == "ce" and exp.split.cold_items is not None:   # held-out items are no training candidates
    options["item_mask"] = ~np.isin(np.arange(exp.split.train.num_items), exp.split.cold_items)
  if name == "sampled_softmax":
    q = samplers.negative_probs(exp.split.train, c["negative_distribution"], exp.split.cold_items)
    options["log_q"] = np.log(np.maximum(q, np.finfo(np.float32).tiny)).astype(np.float32)
  if name == "gbce":
    try:
      held_out = 0 if exp.split.cold_items is None else len(exp.split.cold_items)   # never drawn as negatives
      drawable = exp.split.train.num_items - 1 - held_out
      options["beta"] = losses.gbce_beta(c["num_negatives"], drawable, c["gbce_t"])
    except ValueError as e:
      raise ConfigError(f"loss 'gbce' (num_negatives, gbce_t): {e}") from e
  # kind "ctr" models trained on pairs (score_items) take the pairwise losses of general models
  kind = "general" if exp.kind == "ctr" and c["training"] == "pairs" else exp.kind
  return tasks.create_loss_fn(kind, name, model=exp.model, **options)


def labeled_chunk(exp: Experiment) -> int:
  """Rows scored per device call in labelled evaluation: what `eval_budget_mb` holds at the model's
  `score_bytes_per_pair` (4 KiB if it does not say), at most the larger phase rounded up to a power of
  two (so tiny data compiles a tiny program, once for both phases); `score_rows` rounds it up to a
  multiple of the devices."""
  budget = exp.config["eval_budget_mb"] << 20
  rows = max(len(exp.labeled_data.valid), len(exp.labeled_data.test))
  return min(max(1, budget // getattr(exp.model, "score_bytes_per_pair", 4096)), 1 << max(rows - 1, 0).bit_length())


def make_labeled_evaluator(exp: Experiment, phase: str) -> Callable[[Any], dict[str, float]]:
  """params -> the protocol's metrics over the labelled rows of `phase`: logits on device in chunks,
  metrics on the host; for rating regression, outputs mapped back to the rating scale first."""
  data, protocol = exp.labeled_data, exp.protocol
  rows = getattr(data, phase)
  chunk, sharding = labeled_chunk(exp), batch_sharding(exp.mesh) if exp.mesh else None

  def run(params) -> dict[str, float]:
    outputs = classification.score_rows(exp.logits_fn, exp.with_constants(params), rows.inputs(), chunk,
                                        sharding)   # [n] or [n, T]
    if protocol.task == "rating":
      outputs = data.scale.denormalize(outputs, rows.user)
    return classification.labeled_report(protocol.metrics, outputs, rows.target, rows.user, task=protocol.task,
                                         tasks=data.tasks, domain=rows.domain, domains=data.domains)

  return run


def sampling_counts(split: splits.Split) -> np.ndarray:
  """int64 `[N]`: each item's interactions in train, valid and test together, the popularity that a
  sampled protocol draws negatives by (BERT4Rec's code counts the whole sequences, RecBole all parts)."""
  items = np.concatenate([split.train.item, split.valid.item, split.test.item])
  return np.bincount(items, minlength=split.train.num_items)


def make_evaluator(exp: Experiment, phase: str) -> Callable[[Any], dict[str, float]]:
  """params -> metrics of `phase` under the protocol (full ranking, plus sampled when it asks; or
  labelled rows, see `make_labeled_evaluator`)."""
  if exp.protocol.task != "ranking":
    return make_labeled_evaluator(exp, phase)
  protocol = exp.protocol
  num_items = exp.split.train.num_items
  sharding = batch_sharding(exp.mesh) if exp.mesh else None
  pair_bytes = None if tasks.is_factorized(exp.model) else exp.model.score_bytes_per_pair   # chunk sizes
  budget_mb = exp.config["eval_budget_mb"]
  if pair_bytes and jax.default_backend() == "cpu":   # a pair-wise scorer's chunk that stays in cache runs faster
    budget_mb = min(budget_mb, exp.config["eval_cpu_cache_mb"])
  options = dict(ks=protocol.ks, metrics=protocol.metrics, budget_bytes=budget_mb << 20)

  # With domains: the same metrics over each domain's interactions of the phase (keys "name@k/domain").
  per_domain = {key.split("/", 1)[1]: sets for key, sets in exp.eval_sets.items() if key.startswith(f"{phase}/")}

  negatives = {}   # sampled protocol: each evaluation set's negatives, fixed by the seed, drawn once per run
  if protocol.sampled:   # it ranks `positives[:, 0]` against the negatives
    for name, data in [(phase, exp.eval_sets[phase]), *per_domain.items()]:
      if data["positives"].shape[1] > 1 and (data["positives"][:, 1] > 0).any():
        raise ConfigError(f"protocol {protocol.name!r}: the sampled protocol ranks one held-out item per user, but "
                          f"{name!r} holds out several for some users (split {protocol.split!r}); use a leave-one-out "
                          "split or sampled=None")
      try:   # drawn now: a shortfall stops the run before it trains
        negatives[name] = ranking.draw_negatives(
            data["positives"][:, 0], data["interacted"], num_items, protocol.sampled, protocol.sampled_distribution,
            sampling_counts(exp.split), exp.config["seed"])
      except ValueError as e:   # a user with fewer items outside their history than negatives to draw
        raise DataError(exp.config["dataset"], f"protocol {protocol.name!r} ranks each {name!r} item against "
                        f"{protocol.sampled} sampled negatives, but the data has too few items for that ({e})") from e

  def evaluate(params, name: str, data) -> dict[str, float]:
    out = ranking.evaluate_full(exp.score_fn, params, data["inputs"], data["positives"], data["exclude"],
                                num_items=num_items, sharding=sharding, bytes_per_pair=pair_bytes or 0, **options)
    if protocol.sampled:
      out.update(ranking.evaluate_sampled(exp.item_score_fn, params, data["inputs"], data["positives"][:, 0],
                                          data["interacted"], num_items=num_items, bytes_per_pair=pair_bytes,
                                          negatives=negatives[name], **options))
    return out

  def run(params) -> dict[str, float]:
    params = exp.eval_params(exp.with_constants(params))
    out = evaluate(params, phase, exp.eval_sets[phase])
    for domain, data in per_domain.items():
      out.update({f"{key}/{domain}": value for key, value in evaluate(params, domain, data).items()})
    return out

  return run


def default_device_count(config: dict[str, Any]) -> int:
  """Training devices when `devices` is None: all of them, but `cpu_devices` on a one-process CPU host
  without `model_parallel` (recjax.cli makes one host device per core), and one when fine-tuning text
  layers (each step re-encodes every item: data parallelism would repeat that on each device)."""
  if config["text"]["finetune_layers"]:
    return 1
  wanted = config["cpu_devices"]   # None or >= 1 (recjax.config)
  if jax.default_backend() == "cpu" and jax.process_count() == 1 and config["model_parallel"] == 1:
    return min(wanted or jax.device_count(), jax.device_count())
  return jax.device_count()


def train_mesh(config: dict[str, Any]):
  """The `[data, model]` mesh of a run (`devices`, by default `default_device_count`, `model_parallel` of
  them on `model`), or None for one device."""
  if config["grad_accum"] < 1 or config["batch_size"] % config["grad_accum"]:
    raise ConfigError(f"grad_accum={config['grad_accum']} must divide batch_size={config['batch_size']}")
  count = config["devices"] or default_device_count(config)
  if jax.process_count() > 1 and count != jax.device_count():   # each process must hold its part of the mesh
    why = " (text.finetune_layers > 0 trains on one device)" if config["text"]["finetune_layers"] else ""
    raise ConfigError(f"devices={count}{why}: a multi-host run trains on every process's devices, "
                      f"{jax.device_count()} here; leave devices unset")
  if count == 1 and config["model_parallel"] == 1:
    return None
  try:
    mesh = make_mesh(count, config["model_parallel"])
    check_divisible(config["batch_size"] // config["grad_accum"], mesh)
  except ValueError as e:
    raise ConfigError(f"devices / model_parallel / batch_size / grad_accum: {e}") from e
  return mesh


def fitting_layout(config: dict[str, Any], what: str) -> dict[str, Any]:
  """A saved run's `config` with `devices` this process can build the run's mesh on, to restore its checkpoint:
  the run's own when it can, else `model_parallel` devices (its row-sharded tables are padded for that count
  alone; data parallelism changes no shape). ConfigError naming `what` when fewer devices are visible."""
  try:
    train_mesh(config)
    return config
  except ConfigError:
    parallel, visible = config["model_parallel"], jax.device_count()
    if parallel > visible:
      raise ConfigError(f"{what}: the run's tables are row-sharded over model_parallel={parallel} devices and stored "
                        f"padded for them; {visible} are visible (on CPU, XLA_FLAGS=--xla_force_host_platform_"
                        f"device_count={parallel} set before the process starts gives that many)") from None
    return {**config, "devices": parallel if jax.process_count() == 1 else None}


def device_batches(exp: Experiment, sampler) -> Callable[[int], Any]:
  """epoch -> the sampler's batches on device, split over the run's mesh, prefetched."""
  if exp.mesh is None:
    return lambda epoch: samplers.prefetch_to_device(sampler.epoch(epoch))
  put = functools.partial(put_global, sharding=batch_sharding(exp.mesh))   # each process: its devices' rows
  return lambda epoch: samplers.prefetch_to_device(sampler.epoch(epoch), put=put)


def make_step(exp: Experiment, optimizer, state_sharding=None):
  """The run's jitted train step: its loss, mesh, state sharding (from `init_state`), compute dtype
  and gradient accumulation."""
  return make_train_step(make_loss_fn(exp), optimizer, mesh=exp.mesh, state_sharding=state_sharding,
                         compute_dtype=compute_dtype(exp.config), accum_steps=exp.config["grad_accum"],
                         constants=exp.constants)


def check_trainable(exp: Experiment, sampler, rng: jax.Array) -> None:
  """Traces the loss on `sampler`'s first batch, abstractly (`jax.eval_shape`: nothing is computed or
  compiled), so that a loss, training scheme or model option the model cannot train with is a ConfigError
  before a run folder is written, not a failure at the first step."""
  c = exp.config
  try:
    batch = next(iter(sampler.epoch(0)))
    params = jax.eval_shape(lambda: init_params(exp, rng))
    jax.eval_shape(make_loss_fn(exp), exp.with_constants(params), batch, rng)
  except (ValueError, TypeError, NotImplementedError) as e:   # raised while tracing the model and its loss
    raise ConfigError(f"model {c['model']['name']!r} cannot train with training={c['training']!r}, "
                      f"loss={c['loss']!r} and its model options: {type(e).__name__}: {e}") from e


def training_setup(exp: Experiment, rng: jax.Array, sampler=None):
  """What a training loop needs: `(sampler, state, step)`, the run's batch sampler (`make_sampler`'s, unless
  given), its initial train state on the run's devices and its jitted step, the optimizer's schedule sized to
  the sampler's epochs."""
  sampler = make_sampler(exp) if sampler is None else sampler
  optimizer = run_optimizer(exp, rng, sampler.num_batches)
  state, state_sharding = init_state(exp, optimizer, rng)
  return sampler, state, make_step(exp, optimizer, state_sharding)


def compute_dtype(config: dict[str, Any]):
  """The step's forward/backward dtype (`compute_dtype`: "float32" or "bfloat16"; master weights stay float32)."""
  dtypes = {"float32": None, "bfloat16": jnp.bfloat16}
  if config["compute_dtype"] not in dtypes:
    raise ConfigError(f"compute_dtype: expected one of {sorted(dtypes)}, got {config['compute_dtype']!r}")
  return dtypes[config["compute_dtype"]]


def learning_rate(config: dict[str, Any], steps_per_epoch: int):
  """The config's learning rate: a float, or with `lr_warmup_steps` / `lr_decay="linear"` a schedule over
  the run's `epochs * steps_per_epoch` optimizer steps (`recjax.optim.warmup_linear_decay`)."""
  decay, warmup = config["lr_decay"], config["lr_warmup_steps"]   # decay checked by `build`
  if decay == "constant" and not warmup:
    return config["learning_rate"]
  total = max(1, config["epochs"] * steps_per_epoch) if decay == "linear" else None
  if max(warmup, total or 0) >= 2**31:   # the step counter is an int32
    raise ConfigError(f"lr_warmup_steps ({warmup}) and the decay's epochs * steps ({total}) must be below 2^31")
  return warmup_linear_decay(config["learning_rate"], warmup, total)


def make_optimizer(config: dict[str, Any], steps_per_epoch: int = 1):
  """The config's optimizer; `steps_per_epoch` sizes a decaying schedule (it changes no state shape, so a
  template for restoring may leave it at 1)."""
  mask = None if config["decay_biases_and_norms"] else no_decay_on_biases_and_norms
  return create_optimizer(config["optimizer"], learning_rate(config, steps_per_epoch),
                          weight_decay=config["weight_decay"], b1=config["adam_b1"], b2=config["adam_b2"],
                          eps=config["adam_eps"], decay_mask=mask, clip_norm=config["grad_clip_norm"])


def run_optimizer(exp: Experiment, rng: jax.Array, steps_per_epoch: int = 1):
  """The config's optimizer, restricted to `finetune.trainable` of the model's parameters (`recjax.train.adapt`)."""
  optimizer = make_optimizer(exp.config, steps_per_epoch)
  trainable = exp.config["finetune"]["trainable"]
  if trainable == "all":
    return optimizer
  variables = jax.eval_shape(lambda: init_params(exp, rng))
  return adapt.partial_optimizer(optimizer, variables, trainable, param_group)


def finetune_init(exp: Experiment, params):
  """`params` with every parameter of the run in `finetune.from_run` (its best checkpoint) copied in; the
  run must be of the same model on the same data and split (parameters it lacks, e.g. adapters, stay new)."""
  source = exp.config["finetune"]["from_run"]
  if not source:
    return params
  config = saved_config(source)
  if config is None:
    raise ConfigError(f"finetune.from_run: no recjax run at {source} (no config.json)")
  full, source_only = exp.full_split or exp.split, dotted(config, "domain.only")
  _check_source_run(exp, config, source, "finetune.from_run",
                    ("model.name", *_SAME_DATA_KEYS, "domain.rule", "domain.column", "label_columns"),
                    full if source_only is None else domains.only_domain(full, source_only),   # as the source had it
                    "fine-tuning continues a run of the same model on the same data")
  config = fitting_layout({**config, "data_dir": exp.config["data_dir"], "domain": {**config["domain"], "only": None},
                           "finetune": {**config["finetune"], "from_run": None}},   # its optimizer state's layout
                          f"finetune.from_run: {source}")
  # Same data and split, so this run's model with the source's hyperparameters (e.g. without adapters) has
  # the source's parameter shapes: no second load of the data.
  hparams = models.hashable_hparams({k: v for k, v in config["model"].items() if k != "name"})
  source_exp = dataclasses.replace(exp, config=config, model=exp.model.clone(**hparams))
  pretrained = restore_best_params(source_exp, source)
  return adapt.merge_pretrained(params, pretrained, f"finetune.from_run: {source}")


def restore_best_params(exp: Experiment, run_dir: str | os.PathLike):
  """Best parameters of a run folder (Pop has none: counted again from the split)."""
  rng = jax.random.PRNGKey(exp.config["seed"])
  folder, restored = Path(run_dir) / "checkpoints", None
  if exp.kind == "popularity" or (exp.config["epochs"] == 0 and not folder.exists()):   # nothing trained
    return initial_params(exp, rng)   # what `train` evaluated
  params = init_params(exp, rng)
  template = create_train_state(params, run_optimizer(exp, rng), rng)
  if (folder / "best").is_dir():   # read-only opens create nothing
    with Checkpointer(folder, read_only=True) as checkpoints:   # ValueError: stored shapes differ
      restored = checkpoints.restore_best(template)
  if restored is None:
    raise DataError(folder / "best", "no best checkpoint: the run has not finished an evaluation")
  return restored[0].params


def read_json(path: Path) -> Any:
  """A run folder's JSON file; ConfigError naming it when it does not parse."""
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}: not valid JSON ({e})") from e


def saved_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
  """The `config.json` of a run folder, or None when there is none. Its keys and values pass the checks of
  `apply_overrides` (ConfigError naming the file otherwise); keys added to recjax after the run was saved
  take their defaults (which keep the earlier behaviour)."""
  path = Path(run_dir) / "config.json"
  if not path.is_file():
    return None
  saved = read_json(path)
  name = dotted(saved, "model.name")
  if not isinstance(saved, dict) or name not in MODEL_DEFAULTS:
    raise ConfigError(f"{path}: not a recjax run config (it needs a model.name of a known model, got {name!r})")
  saved = {**saved, "model": {k: v for k, v in saved["model"].items() if k != "name"}}
  return apply_overrides(default_config(name), saved, source=str(path))   # each key and value checked


# Keys a pretraining run must share with the run it initialises (same data, same split).
_SAME_DATA_KEYS = ("dataset", "protocol", "preprocess", "seed")
# ... and its rows: a fine-tuned run may train on one domain of its source's, a pretraining run may not.
_SAME_ROWS_KEYS = (*_SAME_DATA_KEYS, "domain.rule", "domain.column", "domain.only")


def _as_list(value):
  return list(value) if isinstance(value, (list, tuple)) else value


def _check_source_run(exp: Experiment, config: dict[str, Any], run_dir, what: str, keys: tuple[str, ...],
                      split: splits.Split, why: str) -> None:
  """ConfigError naming `what` when the saved run in `run_dir` (its `config`) differs from `exp` in one of
  `keys`, or recorded another split than `split`, or the same under other ids (`check_split`), or never
  trained (`epochs=0`: its "best" parameters would be the random initial ones)."""
  if config.get("epochs") == 0:
    raise ConfigError(f"{what}: {run_dir} was never trained (epochs=0)")
  for key in keys:
    ours, theirs = dotted(exp.config, key), dotted(config, key)
    if _as_list(ours) != _as_list(theirs):
      raise ConfigError(f"{what}: {run_dir} has {key}={theirs!r}, this run {ours!r} ({why})")
  try:
    check_split(split, run_dir, reads_features(exp))
  except ConfigError as e:
    raise ConfigError(f"{what}: {e}") from None


def restore_pretrained(exp: Experiment, run_dir: str | os.PathLike, name: str, sizes: dict[str, str],
                       what: str) -> dict:
  """Best params of the finished `name` run in `run_dir`, checked to share the data and split of `exp`
  and its sizes (`sizes`: the run's hyperparameter -> `exp`'s); a mismatch is a ConfigError naming
  `what` and the run."""
  config = saved_config(run_dir)
  if config is None:
    raise ConfigError(f"{what}: no recjax run at {run_dir} (no config.json)")
  got = config.get("model", {}).get("name")
  if got != name:
    raise ConfigError(f"{what}: {run_dir} is a {got!r} run, expected {name!r}")
  _check_source_run(exp, config, run_dir, what, _SAME_ROWS_KEYS, exp.split, "pretraining needs the same data and split")
  for key, ours in sizes.items():
    if _as_list(config["model"].get(key)) != _as_list(exp.config["model"][ours]):
      raise ConfigError(f"{what}: {run_dir} has model.{key}={config['model'].get(key)!r}, this run model.{ours}="
                        f"{exp.config['model'][ours]!r} (sizes must match)")
  config = fitting_layout(config, f"{what}: {run_dir}")
  hparams = {k: v for k, v in config["model"].items() if k != "name"}
  model = models.create_model(name, num_users=exp.split.train.num_users, num_items=exp.split.train.num_items,
                              **hparams)
  try:
    return restore_best_params(dataclasses.replace(exp, config=config, model=model, kind=model.kind), run_dir)
  except ValueError as e:   # stored shapes differ from this data's table sizes
    raise ConfigError(f"{what}: the checkpoint in {run_dir} does not fit this run's data ({e})") from e


def pretrain_runs(config: dict[str, Any]) -> dict[str, str | None]:
  """`{"gmf_run": ..., "mlp_run": ...}`: the run folders NeuMF starts from (None: not pretrained)."""
  options = config.get("pretrain") or {}
  return {key: options.get(key) for key in ("gmf_run", "mlp_run")}


def pretrained_init(exp: Experiment, params):
  """`params`, or NeuMF's initialised from the GMF and NCF-MLP runs named by `pretrain.gmf_run` and
  `pretrain.mlp_run` with GMF share `pretrain.alpha` (He et al. 2017, Sec. 3.4.1; see
  `recjax.models.neumf_from_pretrained`)."""
  runs = pretrain_runs(exp.config)
  if not any(runs.values()):
    return params
  if exp.config["model"]["name"] != "neumf" or not all(runs.values()):
    raise ConfigError(f"pretrain: NeuMF pretraining needs both pretrain.gmf_run and pretrain.mlp_run; got {runs} "
                      f"for model {exp.config['model']['name']!r}")
  gmf = restore_pretrained(exp, runs["gmf_run"], "gmf", {"dim": "mf_dim"}, "pretrain.gmf_run")
  mlp = restore_pretrained(exp, runs["mlp_run"], "ncf_mlp", {"dim": "mlp_dim", "hidden": "hidden"}, "pretrain.mlp_run")
  # into this run's tables: a source trained on another device layout has other padding rows
  return adapt.merge_pretrained(params, models.neumf_from_pretrained(gmf, mlp, exp.config["pretrain"]["alpha"]),
                                f"pretrain: {runs['gmf_run']} and {runs['mlp_run']}")


def write_json(path: Path, obj: Any) -> None:
  """Atomic JSON write (a reader, or a kill, never sees half a file), by the first process only."""
  if jax.process_index() != 0:   # a multi-host run writes its files once
    return
  write_atomic(path, json_line(obj, indent=2, sort_keys=True) + "\n")


def remove_file(path: Path) -> None:
  """Removes a run file if it is there, by the first process only: the one that writes them (`write_json`)."""
  if jax.process_index() == 0:
    path.unlink(missing_ok=True)


# What a resumed run may change: `epochs` (the total: train longer) and `data_dir` (the data moved).
RESUMABLE_KEYS = ("epochs", "data_dir")


# What a run writes into its folder: a new run refuses a folder holding any of them.
RUN_FILES = ("config.json", "split.json", "log.jsonl", "metrics.json", "checkpoints", "curves.png")


def check_run_folder(config: dict[str, Any], out: Path, resume: bool, keys=None) -> dict[str, Any] | None:
  """Refuses, before anything is written, what would mix two runs in `out` (ConfigError): a new run where one
  already is (any of RUN_FILES: another run's, or a file of that name it would overwrite), or a resumed one
  whose config differs from the saved run's in one of `keys` (dotted; default: every key) other than
  RESUMABLE_KEYS, or with fewer `epochs` than its checkpoints have completed, or checkpoints without the
  config.json that says whose they are. Returns the saved config when resuming, None where nothing was saved
  (the run then starts afresh)."""
  if not resume:
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found:
      raise ConfigError(f"{out} already holds a run ({', '.join(found)}); resume it (--resume) or choose another "
                        "output folder")
    return None
  saved = saved_config(out)
  if saved is None:
    if _saved_epochs(out, "latest") or _saved_epochs(out, "best"):
      raise ConfigError(f"resume: {out} holds checkpoints but no config.json, so nothing says which run they "
                        "belong to; restore its config.json or choose another output folder")
    return None
  given, kept = (json.loads(json_line(c)) for c in (config, saved))   # as config.json holds them: tuples as lists
  if keys is None:
    keys = sorted({key for c in (given, kept) for key, _ in flatten(c)})
  differ = [f"{key} ({dotted(kept, key)!r} saved, {dotted(given, key)!r} given)" for key in keys
            if key not in RESUMABLE_KEYS and dotted(given, key) != dotted(kept, key)]
  if differ:
    raise ConfigError(f"resume: the run saved in {out / 'config.json'} had another config: {'; '.join(differ)}. "
                      f"Only {' and '.join(RESUMABLE_KEYS)} may change when a run resumes.")
  done = completed_epochs(out)
  if (keys is None or "epochs" in keys) and config["epochs"] < done:   # epochs given (else the saved run's)
    raise ConfigError(f"resume: the run in {out} has completed {done} epochs; epochs (the total, counting them) "
                      f"must be at least {done}, got {config['epochs']}")
  return saved


def _saved_epochs(out: Path, kind: str) -> list[int]:
  """The epochs of a run folder's finished `kind` ("latest" or "best") checkpoints, read from their folder names:
  orbax writes a step under a temporary name and renames it when complete. No JAX call: a multi-host run checks
  this before `jax.distributed.initialize`."""
  return sorted(int(step.name) for step in (out / "checkpoints" / kind).glob("*") if step.name.isdigit())


def completed_epochs(out: Path) -> int:
  """Epochs a run folder's newest finished checkpoint has completed (0 without one)."""
  epochs = _saved_epochs(out, "latest")
  return epochs[-1] + 1 if epochs else 0


SPLIT_RECORD = "split.json"   # in a run folder: fingerprints of the split, its ids (and side features) and sizes


def split_record(split: splits.Split, features: bool = False) -> dict[str, Any]:
  """What `OUT/split.json` holds: the split's fingerprint (`splits.fingerprint`), the fingerprint of its dense
  ids (`splits.ids_fingerprint`), its parts' rows and, for a model that reads side features (`features`),
  theirs (`splits.features_fingerprint`)."""
  record = {"fingerprint": splits.fingerprint(split), "ids": splits.ids_fingerprint(split),
            "rows": {name: len(getattr(split, name)) for name in splits.PARTS}}
  return {**record, "features": splits.features_fingerprint(split)} if features else record


def reads_features(exp: Experiment) -> bool:
  """Whether the run's model reads the users' or items' side features (feature fields, or item text)."""
  return getattr(models.MODELS[exp.config["model"]["name"]], "needs_features", False) or bool(
      exp.config["text"]["model"])


def check_split(split: splits.Split, run_dir: str | os.PathLike, features: bool = False) -> dict[str, Any]:
  """`split`'s record; ConfigError when the run in `run_dir` recorded another split (the data under the
  run changed, e.g. a `--data-dir` pointing at other files) or the same split under other dense ids (the
  same rows in another order: the checkpoint's table rows would mean other users and items) or, with
  `features`, other side features. Runs saved before the record (or its "ids" or "features" entry) existed
  pass."""
  record, path = split_record(split, features), Path(run_dir) / SPLIT_RECORD
  if not path.is_file():
    return record
  saved = read_json(path)
  if not isinstance(saved, dict) or saved.get("fingerprint") != record["fingerprint"]:
    rows = saved.get("rows") if isinstance(saved, dict) else None
    raise ConfigError(f"{path}: the run was trained on another split (rows {rows}) than the data gives now "
                      f"(rows {record['rows']}): the data under it, or a setting in its config.json that shapes the "
                      "split (seed, protocol, preprocess, domain), changed; point --data-dir at the run's data")
  if saved.get("ids", record["ids"]) != record["ids"]:
    raise ConfigError(f"{path}: the data gives the run's split but numbers its users or items otherwise (its rows "
                      "are in another order?): the checkpoint's embeddings would score the wrong ids; point "
                      "--data-dir at the run's data as it was")
  if saved.get("features", record.get("features")) != record.get("features"):
    raise ConfigError(f"{path}: the users' or items' side features differ from those the run was trained on (a "
                      "`.user` or `.item` file changed?), and its model reads them; point --data-dir at the run's "
                      "data as it was")
  return record


def train(config: dict[str, Any], out_dir: str | os.PathLike | None = None, *, resume: bool = False,
          log: Callable[[str], None] = print) -> dict[str, Any]:
  """Train and test one config; returns (and writes to `out_dir/metrics.json`) the results dict.
  `check_run_folder` guards `out_dir` first."""
  out = Path(out_dir) if out_dir else None
  if out and check_run_folder(config, out, resume) is None:
    resume = False   # nothing saved to resume: a fresh run, whose config is written before it trains
  exp = build(config)
  rng = jax.random.PRNGKey(config["seed"])
  # Every setting checked and every source run read before the run folder is written, with zero epochs too.
  sampler = None if exp.kind == "popularity" else make_sampler(exp)
  if sampler is not None:
    check_trainable(exp, sampler, rng)
    sampler, state, step = training_setup(exp, rng, sampler)
  trains = sampler is not None and config["epochs"] > 0
  if not trains:   # tested as initialised (Pop: as counted)
    params = initial_params(exp, rng) if sampler is None else state.params
  evaluators = {phase: make_evaluator(exp, phase) for phase in ("valid", "test", "cold") if phase in exp.eval_sets}
  save_config = None
  if out:
    features = reads_features(exp)
    record = check_split(exp.split, out, features) if resume else split_record(exp.split, features)

    def save_config(*_):   # the run's config and split record
      write_json(out / "config.json", config)
      write_json(out / SPLIT_RECORD, record)
      remove_file(out / "metrics.json")   # a resumed finished run's results no longer describe it

    distributed.sync_processes("recjax: run folder checked")   # by every process, before the first writes into it
    out.mkdir(parents=True, exist_ok=True)
    if not resume:   # a resumed run's are rewritten once its checkpoint has restored (after an epoch)
      save_config()

  if not trains:
    start = time.perf_counter()
    best_params, best_valid, epochs_run, train_s, eval_s = params, evaluators["valid"](params), 0, [], []
    eval_s.append(time.perf_counter() - start)
  else:
    result = fit(state, step, device_batches(exp, sampler), evaluators["valid"], steps_per_epoch=sampler.num_batches,
                 epochs=config["epochs"], eval_every=config["eval_every"], final_only=exp.protocol.evaluate_once,
                 valid_metric=exp.valid_metric, higher_is_better=exp.higher_is_better, patience=config["patience"],
                 out_dir=out, resume=resume, keep=config["keep_checkpoints"],
                 on_epoch=save_config if resume else None, log=log)
    best_params, best_valid, epochs_run = result.best_params, result.best_valid, result.epochs_run
    train_s, eval_s = result.train_epoch_s, result.eval_s
    if best_params is None:
      raise TrainingError(f"no evaluation gave a finite {exp.valid_metric} (the model diverged?): no epoch to "
                          f"test; see {out / 'log.jsonl' if out else 'the log'}")

  start = time.perf_counter()
  test = evaluators["test"](best_params)
  test_s = time.perf_counter() - start
  cold = {"cold": evaluators["cold"](best_params)} if "cold" in evaluators else {}
  metrics = {
      "valid": best_valid, "test": test, **cold, "epochs_run": epochs_run,
      "train_epoch_s": statistics.median(train_s) if train_s else 0.0,
      "eval_s": statistics.median(eval_s) if eval_s else 0.0, "test_s": test_s,
      "protocol": exp.protocol.name, "valid_metric": exp.valid_metric,
  }
  if exp.domains:   # rows of each domain in each part
    sizes = {phase: domains.domain_sizes(getattr(exp.split, phase), exp.domains) for phase in splits.PARTS}
    metrics["domain_sizes"] = {name: {phase: sizes[phase][name] for phase in sizes} for name in exp.domains}
  if out:
    save_config()
    write_json(out / "metrics.json", metrics)
  return metrics
