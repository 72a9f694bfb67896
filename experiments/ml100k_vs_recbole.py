"""GRU4Rec, Caser, BERT4Rec or SASRec on ml-100k beside RecBole 1.2.1's figure for the same model.

The RecBole-sequential preset on both sides: leave-one-out in time order, max length 50, full
ranking, valid MRR@10 for model selection, early stopping after 10 evaluations without gain.
Each model keeps RecBole's default hyperparameters (recjax's defaults are RecBole's) and full
softmax CE; recjax trains on whole sequences (a loss at every position) unless `--set
training=prefix` asks for RecBole's prefix rows. The RecBole figures are runs of
`../shared/peers/recbole/run.py MODEL ml-100k --set train_neg_sample_args=None` on the 2-core CPU
machine (the epoch cap each was run with is in REFERENCE).

    python experiments/ml100k_vs_recbole.py gru4rec --data-dir ../shared/data
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# RecBole 1.2.1 on ml-100k, test metrics at its best valid MRR@10, with the epochs it ran.
REFERENCE = {
    "sasrec": ({"ndcg@10": 0.0613, "hit@10": 0.1294, "mrr@10": 0.0409}, "15 epochs, 175 s/epoch"),
    "gru4rec": ({"ndcg@10": 0.0503, "hit@10": 0.1071, "mrr@10": 0.0331}, "15 epochs, 59 s/epoch"),
    "bert4rec": ({"ndcg@10": 0.0192, "hit@10": 0.0424, "mrr@10": 0.0123}, "1 epoch, 183 s/epoch"),
    "caser": ({"ndcg@10": 0.0213, "hit@10": 0.0488, "mrr@10": 0.0131}, "1 epoch, 488 s/epoch"),
}


def main() -> None:
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("model", choices=sorted(REFERENCE))
  args = p.parse_args()
  reference, note = REFERENCE[args.model]
  metrics = common.run(args.model, "ml-100k", {}, args, f"ml100k_{args.model}")
  print(common.report(f"{args.model}, ml-100k, full ranking (test)", f"RecBole ({note})", reference, metrics))


if __name__ == "__main__":
  main()
