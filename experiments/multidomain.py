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
    python experiments/multidomain.py --resume                            # continue an interrupted one
    python experiments/multidomain.py --dataset ml-100k --data-dir ../shared/data --rule item_genre_group
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MULTI = ("shared_bottom", "mmoe", "ple", "star")


def _parser():
  """The shared flags (`common.parser`: --data-dir, --epochs, --out, --set) and this script's."""
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--dataset", default="synthetic-multidomain")
  p.add_argument("--rule", default=None, help="domain.rule (default: the dataset's)")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--metric", default="auc", help="the test metric of the table (first task's with several tasks)")
  p.add_argument("--rows", nargs="+", default=["all", "per-domain", *MULTI, "all+adapters", "mmoe+finetune"])
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


def _domain_value(metrics: dict, metric: str, domain: str) -> float:
  """The test `metric` of `domain` (with several tasks: the first task's)."""
  test = metrics["test"]
  if f"{metric}/{domain}" in test:
    return test[f"{metric}/{domain}"]
  return test[next(k for k in sorted(test) if k.startswith(f"{metric}:") and k.endswith(f"/{domain}"))]


def run_seed(args, seed: int) -> tuple[dict[str, dict[str, float]], dict]:
  """{row: {domain: test metric}} for one seed, and the domain sizes."""
  from recjax.experiment import train

  out = Path(args.out or "runs/experiments/multidomain") / f"seed{seed}"

  def run(model: str, name: str, overrides: dict | None = None) -> dict:
    return train(_config(model, args, seed, overrides), out / name, resume=args.resume, log=lambda line: None)

  # The all-domain runs: those asked for, "all" always (it gives the domain sizes; all+adapters starts
  # from it), "mmoe" when mmoe+finetune starts from it.
  wanted = {*args.rows, "all", *(["mmoe"] if "mmoe+finetune" in args.rows else [])}
  results = {row: run("domain_mlp" if row == "all" else row, row) for row in ("all", *MULTI) if row in wanted}
  sizes = results["all"]["domain_sizes"]
  names = sorted(sizes)
  table = {row: {d: _domain_value(m, args.metric, d) for d in names} for row, m in results.items() if row in args.rows}
  per_domain_rows = {   # row -> (model, overrides) of its run on one domain
      "per-domain": ("domain_mlp", {}),
      "all+adapters": ("domain_mlp", {"finetune.from_run": str(out / "all"), "finetune.trainable": "adapters",
                                      "model.adapter_dim": 8}),
      "mmoe+finetune": ("mmoe", {"finetune.from_run": str(out / "mmoe"), "finetune.trainable": "domain"}),
  }
  for row, (model, overrides) in per_domain_rows.items():
    if row in args.rows:
      table[row] = {d: _domain_value(run(model, f"{row}-{d}", {**overrides, "domain.only": d}), args.metric, d)
                    for d in names}
  return table, sizes


def main() -> None:
  args = _parser().parse_args()
  common.use_all_cpu_cores()
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
