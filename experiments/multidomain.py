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
test rows of a domain are the same. Printed: the test metric of each domain (mean over seeds, and
each seed), the domain sizes, and by how much the best multi-scenario model beats both baselines on
each domain.

    python experiments/multidomain.py                                     # synthetic-multidomain, 3 seeds
    python experiments/multidomain.py --dataset ml-100k --data-dir ../shared/data --rule item_genre_group
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import use_all_cpu_cores  # noqa: E402

MULTI = ("shared_bottom", "mmoe", "ple", "star")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dataset", default="synthetic-multidomain")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--rule", default=None, help="domain.rule (default: the dataset's)")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--epochs", type=int, default=None, help="epoch budget of every run (default: the model's)")
  p.add_argument("--metric", default="auc", help="the test metric of the table (first task's with several tasks)")
  p.add_argument("--rows", nargs="+", default=["all", "per-domain", *MULTI, "all+adapters", "mmoe+finetune"])
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
  p.add_argument("--out", default="runs/experiments/multidomain")
  p.add_argument("--json", default=None, help="write the per-seed results here")
  return p


def _config(model: str, args, seed: int, **extra):
  from recjax.config import apply_overrides, build_config

  config = build_config(model, dataset=args.dataset)
  config = apply_overrides(config, list(args.set))
  config["seed"] = seed
  if args.data_dir:
    config["data_dir"] = args.data_dir
  if args.rule:
    config["domain"] = {**config["domain"], "rule": args.rule}
  if args.epochs is not None:
    config["epochs"] = args.epochs
  for key, value in extra.items():
    section, _, name = key.partition("__")
    if name:
      config[section] = {**config[section], name: value}
    else:
      config[section] = value
  return config


def _run(config, out: Path) -> dict:
  from recjax.experiment import train

  return train(config, out, log=lambda line: None)


def _domain_value(metrics: dict, metric: str, domain: str) -> float:
  test = metrics["test"]
  key = f"{metric}/{domain}"
  if key in test:
    return test[key]
  return test[next(k for k in sorted(test) if k.startswith(f"{metric}:") and k.endswith(f"/{domain}"))]


def run_seed(args, seed: int) -> tuple[dict[str, dict[str, float]], dict]:
  """{row: {domain: test metric}} for one seed, and the domain sizes."""
  out = Path(args.out) / f"seed{seed}"
  table: dict[str, dict[str, float]] = {}
  results = {}
  for row in args.rows:
    if row in ("all", *MULTI):
      model = "domain_mlp" if row == "all" else row
      results[row] = _run(_config(model, args, seed), out / row)
  names = sorted(next(iter(results.values()))["domain_sizes"]) if results else None
  if names is None:
    results["all"] = _run(_config("domain_mlp", args, seed), out / "all")
    names = sorted(results["all"]["domain_sizes"])
  sizes = results[next(iter(results))]["domain_sizes"]
  for row, metrics in results.items():
    table[row] = {d: _domain_value(metrics, args.metric, d) for d in names}
  per_domain_rows = {
      "per-domain": lambda d: _config("domain_mlp", args, seed, domain__only=d),
      "all+adapters": lambda d: _config("domain_mlp", args, seed, domain__only=d, finetune__from_run=str(out / "all"),
                                        finetune__trainable="adapters", model__adapter_dim=8),
      "mmoe+finetune": lambda d: _config("mmoe", args, seed, domain__only=d, finetune__from_run=str(out / "mmoe"),
                                         finetune__trainable="domain"),
  }
  for row, make in per_domain_rows.items():
    if row in args.rows:
      table[row] = {d: _domain_value(_run(make(d), out / f"{row}-{d}"), args.metric, d) for d in names}
  return table, sizes


def main() -> None:
  args = _parser().parse_args()
  use_all_cpu_cores()
  per_seed, sizes = {}, None
  for seed in args.seeds:
    per_seed[seed], sizes = run_seed(args, seed)
    print(f"seed {seed}: " + json.dumps(per_seed[seed]), flush=True)
  rows, names = list(per_seed[args.seeds[0]]), sorted(sizes)
  print(f"\n{args.dataset}, test {args.metric} per domain, mean over seeds {args.seeds}")
  print(f"{'row':<16}" + "".join(f"{d:>12}" for d in names))
  print(f"{'rows (test)':<16}" + "".join(f"{sizes[d]['test']:>12}" for d in names))
  mean = {r: {d: statistics.mean(per_seed[s][r][d] for s in args.seeds) for d in names} for r in rows}
  for r in rows:
    print(f"{r:<16}" + "".join(f"{mean[r][d]:>12.4f}" for d in names))
  baselines = [r for r in ("all", "per-domain") if r in rows]
  for model in [r for r in rows if r not in baselines]:
    margins = {d: min(per_seed[s][model][d] - max(per_seed[s][b][d] for b in baselines) for s in args.seeds)
               for d in names}
    print(f"{model} minus the better baseline, worst seed: " + ", ".join(f"{d} {m:+.4f}" for d, m in margins.items()))
  if args.json:
    Path(args.json).write_text(json.dumps({"per_seed": per_seed, "sizes": sizes}, indent=2))


if __name__ == "__main__":
  main()
