"""SASRec trained with each next-item loss, ranked over all items (Klenitskiy & Vasilev 2023; Petrov &
Macdonald 2023): the loss, not the architecture, is what made SASRec look weaker than BERT4Rec.

Same model, data, protocol (RecBole-sequential preset on ml-100k: leave-one-out, full ranking) and
budget for every row; only the loss changes:
  ce               full softmax over all items
  sampled_softmax  softmax over the target + 64 popularity-sampled negatives, log-Q corrected
  gbce             gSASRec's generalised BCE, 64 uniform negatives, t = 0.75
  bce              the SASRec paper's BCE with 1 uniform negative per position

    python experiments/sasrec_losses.py --data-dir ../shared/data [--epochs N] [--dataset beauty]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LOSSES = {
    "ce": {"loss": "ce"},
    "sampled_softmax": {"loss": "sampled_softmax", "num_negatives": 64, "negative_distribution": "popularity"},
    "gbce": {"loss": "gbce", "num_negatives": 64, "gbce_t": 0.75},
    "bce": {"loss": "bce", "num_negatives": 1},
}


def main() -> None:
  p = common.parser(__doc__)
  p.add_argument("--dataset", default="ml-100k")
  p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
  args = p.parse_args()
  jobs = [common.Job("sasrec", args.dataset, LOSSES[name],
                     common.folder(args, f"sasrec_losses/{args.dataset}/{name}", name)) for name in args.losses]
  rows = list(zip(args.losses, common.run_all(jobs, args)))
  print(f"SASRec on {args.dataset}, full ranking (test)")
  print(f"{'loss':<17}{'ndcg@10':>9}{'hit@10':>9}{'mrr@10':>9}{'epochs':>8}{'s/epoch':>9}")
  for name, m in rows:
    t = m["test"]
    print(f"{name:<17}{t['ndcg@10']:>9.4f}{t['hit@10']:>9.4f}{t['mrr@10']:>9.4f}{m['epochs_run']:>8}"
          f"{m['train_epoch_s']:>9.1f}")


if __name__ == "__main__":
  common.relaunch_with_fast_malloc()
  common.exit_on_error(main)
