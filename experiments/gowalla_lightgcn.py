"""LightGCN on Gowalla, the LightGCN paper's split: the paper's LightGCN row (He et al., SIGIR 2020).

Protocol `lightgcn`: the authors' `train.txt` / `test.txt` (29,858 users, 40,981 items, 810,128
training pairs), every item ranked with the user's training items masked, Recall@20 and NDCG@20.
The split has no validation part, so the model is selected on test Recall@20, evaluated every 10
epochs and stopped at the fifth evaluation in a row without gain, 50 epochs (`patience: 4`, as recjax and
RecBole count; the paper follows NGCF, whose code stops so on test Recall@20; LightGCN's code evaluates
test every 10 epochs). Hyperparameters: the paper's and its
code's (3 layers, d = 64, Adam 1e-3, batch 2048, L2 1e-4 on the ego embeddings of the batch, BPR
with one uniform negative, up to 1000 epochs). As in the authors' PyTorch code, each of an epoch's
810,128 training pairs draws a user uniformly, then one of the user's items (`pair_sampling=users`;
RecBole and recjax's default draw each training pair once), and the tables start N(0, 0.1^2)
(recjax's LightGCN default is RecBole's xavier-uniform). On one H100 (2026-11-24, with `patience: 5`) it
stopped after epoch 509 at Recall@20 0.1796 / NDCG@20 0.1536 (best at 449; 459 s wall; `benchmarks/RESULTS.md`). On the
2-core CPU an epoch takes about a minute: run it in parts with `--epochs N --resume`.

    python experiments/gowalla_lightgcn.py --data-dir ../shared/data [--epochs N] [--resume]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# LightGCN paper, Gowalla, 3 layers, as the project's issue states it (sources and other quotes: PUBLISHED.md, §6).
PAPER = {"recall@20": 0.1830, "ndcg@20": 0.1554}

CONFIG = {
    "protocol": "lightgcn", "loss": "bpr", "num_negatives": 1, "pair_sampling": "users", "l2_weight": 1e-4,
    "learning_rate": 1e-3,
    "batch_size": 2048, "epochs": 1000, "eval_every": 10, "patience": 4, "valid_metric": "recall@20",
    "model": {"dim": 64, "num_layers": 3, "embedding_init": "normal", "embedding_std": 0.1},
}


if __name__ == "__main__":
  common.relaunch_with_fast_malloc()
  common.exit_on_error(common.reproduce, __doc__, "lightgcn", "gowalla", CONFIG, PAPER,
                       "LightGCN, Gowalla, full ranking (test)")
