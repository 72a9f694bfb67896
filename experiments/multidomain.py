"""Multi-scenario models against one model for all and one model per domain, per domain, over seeds.

Rows (each a recjax run, `recjax.experiment.train`):
- `all`: `domain_mlp` trained on every domain (one model for all; the domain id is an input);
- `per-domain`: `domain_mlp` trained on one domain's rows only (`domain.only`), once per domain;
- `shared_bottom`, `mmoe`, `ple`, `star`: one multi-scenario model for all domains;
- `all+adapters`: the `all` run fine-tuned on each domain with the shared part frozen and per-domain
  adapters trained (`finetune.trainable=adapters`, `model.adapter_dim`);
- `mmoe+finetune`: the `mmoe` run fine-tuned on each domain with its shared experts frozen
  (`finetune.trainable=domain`).
Every run of a seed shares its split (split within each domain, `protocol multidomain`), so each row's
test rows of a domain are the same. Printed for each of `--metrics`: the test figure of each domain and
overall (mean over seeds; overall only for the rows that are one model over all domains), the domain
sizes, and by how much each model beats the better baseline on each domain in its worst seed.

    python experiments/multidomain.py                                     # synthetic-multidomain, 3 seeds
    python experiments/multidomain.py --resume                            # continue an interrupted one
    python experiments/multidomain.py --report --metrics auc gauc logloss  # tables of finished runs
    python experiments/multidomain.py --dataset ml-100k --data-dir ../shared/data --rule item_genre_group
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from recjax.errors import ConfigError  # noqa: E402
from recjax.eval.protocols import higher_is_better  # noqa: E402

MULTI = ("shared_bottom", "mmoe", "ple", "star")


def _parser():
  """The shared flags (`common.parser`: --data-dir, --epochs, --out, --set) and this script's."""
  p = common.parser(__doc__)
  p.add_argument("--dataset", default="synthetic-multidomain")
  p.add_argument("--rule", default=None, help="domain.rule (default: the dataset's)")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--metrics", nargs="+", default=["auc"],
                 help="the test metrics of the tables (the first task's with several tasks)")
  p.add_argument("--report", action="store_true", help="read the finished runs' metrics.json, train nothing")
  rows = ["all", "per-domain", *MULTI, "all+adapters", "mmoe+finetune"]
  p.add_argument("--rows", nargs="+", default=rows, choices=rows)
  p.add_argument("--json", default=None, help="write the per-seed results here")
  return p


def _config(model: str, args, seed: int, overrides: dict | None = None) -> dict:
  """The model's config on the dataset, then the command line's overrides, the seed and `overrides`
  (dotted keys, e.g. {"domain.only": "d2"})."""
  from recjax.config import apply_overrides, build_config

  config = apply_overrides(build_config(model, dataset=args.dataset), list(args.set))
  flags = {"seed": seed, "data_dir": args.data_dir, "domain.rule": args.rule, "epochs": args.epochs}
  return apply_overrides(config, {**{k: v for k, v in flags.items() if v is not None}, **(overrides or {})},
                         source="experiments/multidomain.py")


OVERALL = "overall"


def _root(args) -> Path:
  """The folder of every seed's runs."""
  return Path(args.out or "runs/experiments/multidomain")


def _seed_dir(args, seed: int) -> Path:
  """The folder of one seed's runs (one sub-folder per run)."""
  return _root(args) / f"seed{seed}"


def _all_domain_runs(rows) -> list[str]:
  """The all-domain runs `rows` need, in order: those asked for, "all" always (it gives the domain sizes;
  all+adapters starts from it), "mmoe" when mmoe+finetune starts from it."""
  wanted = {*rows, "all", *(["mmoe"] if "mmoe+finetune" in rows else [])}
  return [row for row in ("all", *MULTI) if row in wanted]


def _per_domain_rows(out: Path) -> dict[str, tuple[str, dict]]:
  """The rows of one run per domain: row -> (model, overrides) of its run on one domain (the sources of the
  fine-tuned ones are this seed's runs in `out`)."""
  return {
      "per-domain": ("domain_mlp", {}),
      "all+adapters": ("domain_mlp", {"finetune.from_run": str(out / "all"), "finetune.trainable": "adapters",
                                      "model.adapter_dim": 8}),
      "mmoe+finetune": ("mmoe", {"finetune.from_run": str(out / "mmoe"), "finetune.trainable": "domain"}),
  }


def _known_runs(args, seed: int) -> dict[str, tuple[str, dict]]:
  """One seed's runs that `args` asks for, known before training: name -> (model, overrides). A seed's
  per-domain runs are named by its domains, so they are known only once its `all` run has finished."""
  out = _seed_dir(args, seed)
  runs = {row: ("domain_mlp" if row == "all" else row, {}) for row in _all_domain_runs(args.rows)}
  if (out / "all" / "metrics.json").exists():
    domains = sorted(json.loads((out / "all" / "metrics.json").read_text())["domain_sizes"])
    runs |= {f"{row}-{d}": (model, {**overrides, "domain.only": d})
             for row, (model, overrides) in _per_domain_rows(out).items() if row in args.rows for d in domains}
  return runs


def unfinished_runs(args) -> list[str]:
  """The known runs (`_known_runs`) `--report` reads that have no metrics.json (never trained, or not
  finished), as `seedS/NAME`."""
  return [f"seed{seed}/{name}" for seed in args.seeds for name in _known_runs(args, seed)
          if not (_seed_dir(args, seed) / name / "metrics.json").exists()]


def check_folders(args) -> None:
  """Refuses (ConfigError), before anything trains, a known run's folder that holds another run (or, with
  --resume, a run of other settings): a later seed's clash is not found only after the earlier seeds trained."""
  from recjax.experiment import check_run_folder

  for seed in args.seeds:
    for name, (model, overrides) in _known_runs(args, seed).items():
      check_run_folder(_config(model, args, seed, overrides), _seed_dir(args, seed) / name, args.resume)


def check_report(args, shown: int = 3) -> None:
  """Refuses (ConfigError) a `--report` before every run it reads has finished, naming the first `shown`."""
  missing = unfinished_runs(args)
  if missing:
    more = f" and {len(missing) - shown} more" if len(missing) > shown else ""
    raise ConfigError(f"--report: {len(missing)} run(s) under {_root(args)} not finished (no "
                      f"metrics.json): {', '.join(missing[:shown])}{more}; train them first: the same command without "
                      "--report (with --resume to keep the runs already there)")


def _domain_value(test: dict, metric: str, domain: str) -> float:
  """The test `metric` of `domain` (`OVERALL`: over all domains); with several tasks, the first task's
  (`auc:click/d0`, the first of `label_columns`: the metrics list the tasks in that order), never their mean."""
  suffix = "" if domain == OVERALL else f"/{domain}"
  by_task = [k for k in test if k.startswith(f"{metric}:") and k.endswith(suffix) and k.count("/") == bool(suffix)]
  return test[by_task[0]] if by_task else test[f"{metric}{suffix}"]


def run_seed(args, seed: int) -> tuple[dict[str, dict[str, dict[str, float]]], dict]:
  """{row: {metric: {domain or OVERALL: test figure}}} for one seed, and the domain sizes. OVERALL is
  there only for the rows that are one model over all domains."""
  from recjax.experiment import train

  out = _seed_dir(args, seed)

  def run(model: str, name: str, overrides: dict | None = None) -> dict:
    if args.report:
      return json.loads((out / name / "metrics.json").read_text())
    return train(_config(model, args, seed, overrides), out / name, resume=args.resume, log=lambda line: None)

  results = {row: run("domain_mlp" if row == "all" else row, row) for row in _all_domain_runs(args.rows)}
  sizes = results["all"]["domain_sizes"]
  names = sorted(sizes)
  table = {row: {k: {d: _domain_value(m["test"], k, d) for d in (*names, OVERALL)} for k in args.metrics}
           for row, m in results.items() if row in args.rows}
  for row, (model, overrides) in _per_domain_rows(out).items():
    if row in args.rows:
      tests = {d: run(model, f"{row}-{d}", {**overrides, "domain.only": d})["test"] for d in names}
      table[row] = {k: {d: _domain_value(tests[d], k, d) for d in names} for k in args.metrics}
  return table, sizes


def print_table(per_seed: dict, sizes: dict, metric: str, title: str) -> None:
  """Mean over seeds of each row's `metric` per domain and overall, then each model's margin over the
  better baseline per domain in its worst seed (positive: better, whatever the metric's direction)."""
  seeds, names = list(per_seed), sorted(sizes)
  rows = list(per_seed[seeds[0]])
  print(f"\n{title}, test {metric} per domain, mean over seeds {seeds}")
  print(f"{'row':<16}" + "".join(f"{d:>12}" for d in (*names, OVERALL)))
  print(f"{'rows (test)':<16}" + "".join(f"{sizes[d]['test']:>12}" for d in names)
        + f"{sum(sizes[d]['test'] for d in names):>12}")
  for r in rows:
    cells = [statistics.mean(per_seed[s][r][metric][d] for s in seeds) if d in per_seed[seeds[0]][r][metric]
             else None for d in (*names, OVERALL)]
    print(f"{r:<16}" + "".join(f"{'-':>12}" if c is None else f"{c:>12.4f}" for c in cells))
  sign = 1 if higher_is_better(metric) else -1
  baselines = [r for r in ("all", "per-domain") if r in rows]
  if not baselines:   # no baseline row asked for: nothing to measure margins against
    return
  for model in [r for r in rows if r not in baselines]:
    margins = {d: min(sign * per_seed[s][model][metric][d] - max(sign * per_seed[s][b][metric][d] for b in baselines)
                      for s in seeds) for d in names}
    print(f"{model} better than the better baseline by, worst seed: "
          + ", ".join(f"{d} {m:+.4f}" for d, m in margins.items()))


def main() -> None:
  args = _parser().parse_args()
  if args.report:
    check_report(args)
  else:
    check_folders(args)
  common.use_all_cpu_cores()
  per_seed, sizes = {}, None
  for seed in args.seeds:
    per_seed[seed], sizes = run_seed(args, seed)
    print(f"seed {seed}: " + json.dumps(per_seed[seed]), flush=True)
  for metric in args.metrics:
    print_table(per_seed, sizes, metric, args.dataset)
  if args.json:
    Path(args.json).write_text(json.dumps({"per_seed": per_seed, "sizes": sizes}, indent=2))


if __name__ == "__main__":
  common.relaunch_with_fast_malloc()
  common.exit_on_error(main)
