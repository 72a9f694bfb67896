"""What every experiment script shares: flags, one recjax run, and a table of ours beside theirs.

A script names a model, a dataset, config overrides and the reference figures it compares with;
`main` trains (through `recjax.experiment.train`, exactly what `recjax train` runs) and prints

  metric      reference   recjax   ratio

Flags: `--data-dir` (or env RECJAX_DATA), `--epochs`, `--out`, `--set key=value ...` (any config key),
`--resume` (continue an interrupted run in `--out`; `--epochs` is the total, counting earlier epochs). As with
`recjax train`, a second run into a folder that holds one, or a resume with other settings, is refused (a script
that runs several checks every run's folder before the first trains), and bad input (`recjax.errors.RecjaxError`,
an unwritable path) prints as one line `SCRIPT: error: ...` and exits with status 2: each script's entry point
runs under `exit_on_error`.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

from recjax.config import merged
from recjax.errors import exit_on_error  # noqa: F401 (scripts call it)
from recjax.launch import relaunch_with_fast_malloc, use_all_cpu_cores  # noqa: F401 (scripts call both)


def first_paragraph(doc: str) -> str:
  """The first paragraph of a docstring, its lines joined: a script's `--help` description (its first line
  alone can stop mid-sentence)."""
  return " ".join(re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0].split())


def parser(doc: str) -> argparse.ArgumentParser:
  """The shared flags, described by the first paragraph of `doc` (the script's docstring)."""
  p = argparse.ArgumentParser(description=first_paragraph(doc))
  p.add_argument("--data-dir", default=None, help="folder holding the datasets (default: env RECJAX_DATA)")
  p.add_argument("--epochs", type=int, default=None, help="override the script's epoch budget")
  p.add_argument("--out", default=None, help="run folder (default: a folder under runs/experiments/ named for the run)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config override")
  p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
  return p


class Job(NamedTuple):
  """One run of a script: `model` on `dataset` with `overrides` (then the command line's), into `out`."""
  model: str
  dataset: str
  overrides: Mapping[str, Any]
  out: Path


def folder(args: argparse.Namespace, default: str, sub: str | None = None) -> Path:
  """A run's folder: `--out` (its subfolder `sub` when the script runs several), else runs/experiments/`default`."""
  if args.out:
    return Path(args.out) / sub if sub else Path(args.out)
  return Path("runs/experiments") / default


def run_all(jobs: Sequence[Job], args: argparse.Namespace) -> Iterator[dict[str, Any]]:
  """Checks every job's config and run folder at once (so a bad key, or a later folder that already holds a
  run, is refused before the first job trains), then yields each job's metrics.json dict, plus `wall_s` (the
  whole run's seconds: data, compile, training, evaluation), as it finishes training."""
  use_all_cpu_cores()
  from recjax.config import apply_overrides, build_config
  from recjax.experiment import check_run_folder

  resume = getattr(args, "resume", False)
  configs = []
  for job in jobs:
    config = apply_overrides(build_config(job.model, dataset=job.dataset), dict(job.overrides),
                             source="the script's settings")
    config = apply_overrides(config, list(args.set))
    if args.data_dir:
      config["data_dir"] = args.data_dir
    if args.epochs is not None:
      config = apply_overrides(config, {"epochs": args.epochs}, source="--epochs")
    check_run_folder(config, job.out, resume)
    configs.append(config)
  return (_train(config, job.out, resume) for job, config in zip(jobs, configs))


def _train(config: dict[str, Any], out: Path, resume: bool) -> dict[str, Any]:
  from recjax.experiment import train, write_json

  start = time.perf_counter()
  metrics = train(config, out, resume=resume)
  metrics["wall_s"] = time.perf_counter() - start
  write_json(out / "metrics.json", metrics)
  return metrics


def run(model: str, dataset: str, overrides: Mapping[str, Any], args: argparse.Namespace,
        out_name: str) -> dict[str, Any]:
  """`run_all` of one job, into `--out` or runs/experiments/`out_name`."""
  return next(run_all([Job(model, dataset, overrides, folder(args, out_name))], args))


def table(title: str, reference_name: str, reference: Mapping[str, float], ours: Mapping[str, float]) -> str:
  """Rows `metric  reference  recjax  ratio` for every reference metric (ratio = recjax / reference)."""
  lines = [title, f"{'metric':<18}{reference_name:>14}{'recjax':>10}{'ratio':>8}"]
  for key, ref in reference.items():
    value = ours.get(key)
    shown = "n/a" if value is None else f"{value:.4f}"
    ratio = "" if value is None or not ref else f"{value / ref:.3f}"
    lines.append(f"{key:<18}{ref:>14.4f}{shown:>10}{ratio:>8}")
  return "\n".join(lines)


def summary(metrics: Mapping[str, Any]) -> str:
  """The full-ranking test metrics (when the run also sampled) and the run's cost."""
  full = {k: v for k, v in metrics["test"].items() if not k.startswith("sampled_")}
  lines = []
  if len(full) < len(metrics["test"]):
    lines.append("full ranking (test): " + " ".join(f"{k} {v:.4f}" for k, v in sorted(full.items())))
  lines.append(f"epochs {metrics['epochs_run']}, median epoch {metrics['train_epoch_s']:.1f} s, "
               f"wall {metrics['wall_s']:.0f} s")
  return "\n".join(lines)


def report(title: str, reference_name: str, reference: Mapping[str, float], metrics: Mapping[str, Any]) -> str:
  """`table` of the test metrics beside the reference, then `summary`."""
  return table(title, reference_name, reference, metrics["test"]) + "\n" + summary(metrics)


def reproduce(doc: str, model: str, dataset: str, config: Mapping[str, Any], paper: Mapping[str, float],
              title: str, variants: Mapping[str, Mapping[str, Any]] | None = None) -> None:
  """The whole `main` of a script that reproduces one published row: flags (described by the first
  paragraph of `doc`), one run of `model` on `dataset` with `config`, the row printed beside `paper`.
  Each of `variants` (name -> overrides on top of `config`) is a flag `--name` of its own."""
  p = parser(doc)
  for name in variants or {}:
    p.add_argument(f"--{name}", action="store_true", help=f"the {name} variant: {dict(variants[name])}")
  args = p.parse_args()
  out_name = f"{dataset}_{model}"
  for name, overrides in (variants or {}).items():
    if getattr(args, name.replace("-", "_")):
      config, out_name, title = merged(config, overrides), f"{out_name}_{name}", f"{title}, {name}"
  print(report(title, "paper", paper, run(model, dataset, config, args, out_name)))

