"""GRU4Rec: session-based recommendation with recurrent networks (Hidasi et al., ICLR 2016).

RecBole 1.2.1's form (which cites Tan et al., DLRS 2016, for training on every prefix): a GRU reads
the embedded item sequence, a linear layer maps its state back to the embedding width, and the
next item is scored by a dot product with the (shared) item table:

  x_t = Drop(E[s_t])                                 (E: [N, d], dropout on the embeddings only)
  h_t = GRU_K(x_1..x_t)                              (K stacked layers of width H, h_0 = 0)
  u_t = W h_t + b                                    (W: [d, H])
  score(t, i) = <u_t, E_i>

Defaults are RecBole's (`embedding_size=64, hidden_size=128, num_layers=1, dropout_prob=0.3`,
`MAX_ITEM_LIST_LENGTH=50`); `cell="lstm"` swaps the GRU for an LSTM. Initialisation as RecBole's
`_init_weights`: E ~ xavier_normal (N(0, 2 / (N + d)), padding row included), GRU weights
xavier_uniform on PyTorch's stacked gate matrices (`recjax.nn.recurrent.stacked_xavier_uniform`),
and the linear layer PyTorch's `nn.Linear` default, W and b ~ U(-1/sqrt(H), 1/sqrt(H)).

Differences from RecBole 1.2.1:
  - sequences are left-padded (the latest item at index L-1) and the recurrent carry is held
    through padding (`recjax.nn.recurrent`), so padding never reaches a real position; RecBole
    right-pads and gathers the state at `item_seq_len - 1`. The two give the same state.
  - RecBole's GRU has `bias=False`; flax's `GRUCell` has biases b_ir, b_iz, b_in, b_hn. They start
    at 0, so the initial model is RecBole's, but they are trained.
  - RecBole xavier-initialises only the first layer's weights (`weight_*_l0`; deeper layers keep
    PyTorch's U(-1/sqrt(H), 1/sqrt(H))); here every layer gets the xavier init.
  - the padding row E_0 gets no gradient: padded steps are discarded and `losses.softmax_ce_rows`
    leaves item 0 out of the softmax. RecBole's `padding_idx=0` stops the input gradient, but its
    CE loss keeps item 0 among the classes, so there E_0 is trained as an output row.
The paper's GRU4Rec (session-parallel mini-batches, one-hot or embedded inputs, BPR / TOP1 losses
with in-batch negatives, a feed-forward output layer instead of a tied table) is not reproduced.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from recjax.nn.dropout import Dropout
from recjax.nn.embedding import embedding_table
from recjax.nn.init import fan_in_uniform
from recjax.nn.recurrent import RecurrentEncoder


class GRU4Rec(nn.Module):
  """Recurrent sequence encoder with a tied item embedding for scoring.

  Methods: `sequence_repr(seq [B, L]) -> [B, L, d]` (the state after every position; causal by
  construction), `user_repr(batch) -> [B, d]` (the state after index L-1 of `batch["seq"]`),
  `item_repr() -> [N, d]`, `__call__(batch) -> [B, N]`.

  Attributes:
    num_items: N, table rows including the padding row 0.
    max_len: the history length L the data pipeline feeds (no parameter depends on it; longer
      sequences are accepted).
    dim: d, the embedding width (RecBole's `embedding_size`).
    hidden_size: H, the recurrent state width.
    num_layers: stacked recurrent layers.
    dropout: dropout rate on the input embeddings (RecBole's `dropout_prob`).
    cell: "gru" (GRU4Rec) or "lstm".
  """

  num_items: int
  max_len: int = 50
  dim: int = 64
  hidden_size: int = 128
  num_layers: int = 1
  dropout: float = 0.3
  cell: str = "gru"
  kind: ClassVar[str] = "sequential"

  def setup(self):
    self.item_embedding = embedding_table(self.num_items, self.dim, init="xavier_normal")
    self.input_dropout = Dropout(self.dropout)
    self.encoder = RecurrentEncoder(cell=self.cell, hidden_size=self.hidden_size, num_layers=self.num_layers)
    linear_init = fan_in_uniform(self.hidden_size)
    self.dense = nn.Dense(self.dim, kernel_init=linear_init, bias_init=linear_init)

  def _states(self, seq: jnp.ndarray, train: bool) -> jnp.ndarray:
    """`seq [B, L]` -> the top recurrent layer's states `[B, L, H]`."""
    x = self.item_embedding(seq)  # [B, L, d]
    x = self.input_dropout(x, deterministic=not train)
    return self.encoder(x, seq != 0)  # [B, L, H]

  def sequence_repr(self, seq: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """`seq [B, L]` int (left-padded) -> the state at every position `[B, L, d]`."""
    return self.dense(self._states(seq, train))  # [B, L, d]

  def user_repr(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """`batch["seq"] [B, L]` -> the state at the last position `[B, d]`."""
    return self.dense(self._states(batch["seq"], train)[:, -1])  # [B, d]

  def item_repr(self) -> jnp.ndarray:
    """The item table `[N, d]` shared by the input and the output (row 0 = padding)."""
    return self.item_embedding.embedding

  def __call__(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """Scores `[B, N]` of the next item; `model.init(rng, batch)` creates every parameter."""
    return self.item_embedding.attend(self.user_repr(batch, train=train))
