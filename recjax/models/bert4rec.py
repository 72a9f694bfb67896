"""BERT4Rec: bidirectional self-attention trained by Cloze (Sun et al., CIKM 2019).

A bidirectional Transformer encodes the user's items with some replaced by a [mask] token (id
`num_items`, one row past the real items); the state at a masked position predicts the item hidden
there:

  x_t = E[s_t] + P_t                       (item + learned position embedding; [mask] has its own row)
  x   = Drop(LN(x))
  x   = Block_b(x, padding mask)           for b = 1..num_blocks   (the blocks SASRec uses, no causal mask)
  h_t = LN(act(W x_t + c))                 (output head; act = `activation`, GELU by default)
  score(t, i) = <h_t, E_i> + b_i           (tied item table, a bias per item)

To score through a plain dot product, `user_repr` / `sequence_repr` return `[h, 1]` and
`item_repr` returns `[E_i, b_i]` (width dim + 1), so the evaluation and every next-item loss are
the ones SASRec uses. At test time the [mask] token is appended after the history (the oldest item
drops out of the L-item window when the history fills it; RecBole drops it always) and its state ranks the
items (Sec. 3.6 of the paper). The head's activation follows `activation`, as in the authors' code
(RecBole's head is GELU whatever `hidden_act`).

Training masks on device (`recjax.tasks.masked_item_loss_fn`): each real item of the L-item window
is masked with probability `mask_ratio`, and with probability `last_ratio` a row masks only its
newest item instead (the paper's extra samples that mimic the test input; RecBole's `ft_ratio`, which it
applies to whole batches, so half its steps train on newest items alone; here a last-only row is one target
beside the other rows' several, about a tenth of the batch's loss at p = 0.2). Each row's newest `max_scored`
hidden items are scored: by default enough for almost every row (mean + 3 sd of the masked count, 19 of 50 at
p = 0.2); RecBole scores int(p L) = 10, so `max_scored=10` does exactly its work, about half the output layer's.
Sequences are left-padded (latest at L-1) and positions are counted from the right, as in `recjax.models.sasrec`.

Defaults are RecBole 1.2.1's BERT4Rec (`hidden_size=64, inner_size=256, n_layers=2, n_heads=2,
hidden_dropout_prob=0.2, attn_dropout_prob=0.2, hidden_act="gelu", layer_norm_eps=1e-12,
initializer_range=0.02, mask_ratio=0.2, ft_ratio=0.5`), except `max_scored` (above); the paper's
Beauty setting is mask_ratio 0.6, dim 64, 2 blocks, 2 heads, max_len 50.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
from jax.nn import initializers

from recjax.nn.attention import ACTIVATIONS, TransformerBlock, TransformerStack, add_positions, padding_mask
from recjax.nn.dropout import Dropout
from recjax.nn.embedding import embedding_table


class BERT4Rec(nn.Module):
  """Bidirectional Transformer over (partly masked) item sequences; tied output with item biases.

  Methods: `sequence_repr(seq [B, L]) -> [B, L, d+1]` (ids may include `mask_id`),
  `user_repr(batch) -> [B, d+1]` (history + appended [mask]), `item_repr() -> [N, d+1]`.
  """

  num_items: int
  max_len: int = 50
  dim: int = 64
  num_blocks: int = 2
  num_heads: int = 2
  ffn_dim: int = 256
  dropout: float = 0.2
  attn_dropout: float = 0.2
  activation: str = "gelu"
  layer_norm_eps: float = 1e-12
  init_std: float = 0.02
  mask_ratio: float = 0.2
  last_ratio: float = 0.5
  max_scored: int = 0   # masked positions scored per row; 0: nearly all (`tasks.max_masked`); RecBole: int(p L)
  kind: ClassVar[str] = "sequential"
  objective: ClassVar[str] = "masked_item"

  @property
  def mask_id(self) -> int:
    """The [mask] token's id: the row after the last real item."""
    return self.num_items

  def setup(self):
    if not 0.0 < self.mask_ratio <= 1.0 or not 0.0 <= self.last_ratio <= 1.0:
      raise ValueError(f"BERT4Rec: mask_ratio must be in (0, 1] and last_ratio in [0, 1], "
                       f"got {self.mask_ratio}, {self.last_ratio}")
    if self.max_scored < 0:
      raise ValueError(f"BERT4Rec: max_scored must be >= 0 (0: nearly every masked position), got {self.max_scored}")
    self.item_embedding = embedding_table(self.num_items + 1, self.dim, init="normal", std=self.init_std)
    self.position_embedding = self.param(
      "position_embedding", initializers.normal(self.init_std), (self.max_len, self.dim), jnp.float32
    )
    self.input_norm = nn.LayerNorm(epsilon=self.layer_norm_eps)
    self.input_dropout = Dropout(self.dropout)
    block = TransformerBlock(
      num_heads=self.num_heads, dim=self.dim, ffn_dim=self.ffn_dim, dropout=self.dropout,
      attn_dropout=self.attn_dropout, activation=self.activation, layer_norm_eps=self.layer_norm_eps,
      init_std=self.init_std,
    )
    self.encoder = TransformerStack(block, self.num_blocks)
    self.head = nn.Dense(self.dim, kernel_init=initializers.normal(self.init_std))
    self.head_norm = nn.LayerNorm(epsilon=self.layer_norm_eps)
    self.output_bias = self.param("output_bias", initializers.zeros, (self.num_items,), jnp.float32)

  def _encode(self, seq: jnp.ndarray, train: bool, last_only: bool) -> jnp.ndarray:
    """`seq [B, L]` -> `[B, L, d+1]`, or `[B, 1, d+1]` (position L-1) when `last_only`."""
    x = add_positions(self.item_embedding(seq), self.position_embedding)  # [B, L, d]
    x = self.input_dropout(self.input_norm(x), deterministic=not train)
    mask = padding_mask(seq)  # [B, 1, 1, L]
    x = self.encoder(x, mask, train=train, last_only=last_only)
    h = self.head_norm(ACTIVATIONS[self.activation](self.head(x)))  # [B, L', d]
    return jnp.concatenate([h, jnp.ones(h.shape[:-1] + (1,), h.dtype)], axis=-1)

  def sequence_repr(self, seq: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """`seq [B, L]` (left-padded; may hold `mask_id`) -> `[B, L, d+1]`, the last column 1."""
    return self._encode(seq, train, last_only=False)

  def user_repr(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """`batch["seq"] [B, L]` history -> `[B, d+1]`: the state of a [mask] appended after it."""
    seq = batch["seq"]
    masked = jnp.concatenate([seq[:, 1:], jnp.full_like(seq[:, :1], self.mask_id)], axis=1)  # [B, L]
    return self._encode(masked, train, last_only=True)[:, 0]

  def item_repr(self) -> jnp.ndarray:
    """`[N, d+1]`: the real items' rows of the table (not [mask]) and their output biases."""
    table = self.item_embedding.embedding[: self.num_items]
    return jnp.concatenate([table, self.output_bias[:, None]], axis=1)

  def __call__(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """Scores `[B, N]` of the next item; `model.init(rng, batch)` creates every parameter."""
    return self.user_repr(batch, train=train) @ self.item_repr().T
