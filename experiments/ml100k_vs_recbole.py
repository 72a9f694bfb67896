"""Any recjax model with a RecBole 1.2.1 counterpart on ml-100k, beside RecBole's figure.

Each side uses RecBole's preset for the model's family and RecBole's default hyperparameters
(recjax's defaults are RecBole's):
- sequential (SASRec, GRU4Rec, BERT4Rec, Caser): leave-one-out in time order, max length 50, full
  ranking, valid MRR@10, full softmax CE; recjax trains on whole sequences (a loss at every
  position) unless `--set training=prefix` asks for RecBole's prefix rows;
- general (BPR, LightGCN, NGCF, NeuMF): each user's interactions split 80/10/10 at random, full
  ranking with training items masked, valid MRR@10, one uniform negative per positive;
- context-aware (DeepFM, DCN-v2): label = rating >= 4, all rows split 80/10/10 at random, AUC and
  LogLoss on the labelled rows, valid AUC, RecBole's ml-100k field set.
All stop when more than 10 evaluations in a row bring no gain (RecBole's `stopping_step` 10). The
RecBole figures are runs of `../shared/peers/recbole/run.py MODEL ml-100k` (sequential ones with
`--set train_neg_sample_args=None`) on the 2-core CPU machine, recorded in
`../shared/peers/recbole/results/ml-100k.jsonl` (general models: on RecBole's own random split, so the
printed note gives the NDCG@10 on recjax's exported split too; BERT4Rec's and Caser's one-epoch runs in
`timing.jsonl` there; DeepFM's and DCN-v2's side-by-side runs in `benchmarks/RESULTS.md`, third
session). recjax's defaults are RecBole's hyperparameters; where a model departs from RecBole's code
(Caser's regulariser and output layer, LightGCN's squared L2) its docstring says so.

    python experiments/ml100k_vs_recbole.py gru4rec --data-dir ../shared/data
    python experiments/ml100k_vs_recbole.py issue4 --data-dir ../shared/data    # LightGCN ... DCN-v2 in turn
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from recjax.data.features import RECBOLE_ML100K_FIELDS  # noqa: E402

# RecBole 1.2.1 on ml-100k: test metrics at its best validation epoch, and how it ran.
REFERENCE = {
    "sasrec": ({"ndcg@10": 0.0613, "hit@10": 0.1294, "mrr@10": 0.0409}, "15 epochs, 175 s/epoch"),
    "gru4rec": ({"ndcg@10": 0.0503, "hit@10": 0.1071, "mrr@10": 0.0331}, "15 epochs, 59 s/epoch"),
    "bert4rec": ({"ndcg@10": 0.0192, "hit@10": 0.0424, "mrr@10": 0.0123}, "1 epoch, 183 s/epoch"),
    "caser": ({"ndcg@10": 0.0213, "hit@10": 0.0488, "mrr@10": 0.0131}, "1 epoch, 488 s/epoch"),
    "bpr": ({"ndcg@10": 0.2928, "recall@10": 0.2466, "mrr@10": 0.4895, "hit@10": 0.7815},
            "its own split, 62 epochs, 4.0 s/epoch; NDCG@10 0.2796 on recjax's exported split"),
    "lightgcn": ({"ndcg@10": 0.2116, "recall@10": 0.1853, "mrr@10": 0.3760, "hit@10": 0.6819},
                 "its own split, 26 epochs, 9.5 s/epoch"),
    "ngcf": ({"ndcg@10": 0.3049, "recall@10": 0.2564, "mrr@10": 0.5041, "hit@10": 0.8006},
             "its own split, 106 epochs, 2.9 s/epoch; NDCG@10 0.2817 on recjax's exported split"),
    "neumf": ({"ndcg@10": 0.2708, "recall@10": 0.2332, "mrr@10": 0.4525, "hit@10": 0.7688},
              "its own split, 43 epochs, 1.2 s/epoch; NDCG@10 0.2726 on recjax's exported split"),
    "deepfm": ({"auc": 0.7861, "logloss": 0.5718}, "55 epochs, 19 s/epoch under load"),
    "dcnv2": ({"auc": 0.7784, "logloss": 0.5683}, "18 epochs, 22 s/epoch under load"),
}
# The models of the graph / MLP / feature-interaction issue, run in turn by the name "issue4".
ISSUE4 = ("lightgcn", "ngcf", "neumf", "deepfm", "dcnv2")
# RecBole's context-aware ml-100k preset reads only these fields.
OVERRIDES = {name: {"model": {"fields": RECBOLE_ML100K_FIELDS}} for name in ("deepfm", "dcnv2")}


def main() -> None:
  p = common.parser(__doc__)
  p.add_argument("model", choices=sorted(REFERENCE) + ["issue4"])
  args = p.parse_args()
  models = ISSUE4 if args.model == "issue4" else (args.model,)
  jobs = [common.Job(model, "ml-100k", OVERRIDES.get(model, {}),
                     common.folder(args, f"ml100k_{model}", model if args.model == "issue4" else None))
          for model in models]
  for model, metrics in zip(models, common.run_all(jobs, args)):
    reference, note = REFERENCE[model]
    print(common.report(f"{model}, ml-100k (test)", f"RecBole ({note})", reference, metrics), flush=True)


if __name__ == "__main__":
  common.relaunch_with_fast_malloc()
  common.exit_on_error(main)
