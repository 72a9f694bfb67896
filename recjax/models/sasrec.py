"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018).

A causal Transformer encodes the user's item sequence; the state at position t predicts the item
at t + 1 by a dot product with the (shared) item embedding table:

  x_t = E[s_t] + P_t                        (item + learned position embedding)
  x   = Drop(LN(x))                         (post-norm, RecBole 1.2.1)  |  Drop(x)  (pre-norm)
  x   = Block_b(x, causal & key-padding mask)  for b = 1..num_blocks
  x   = LN(x)                               (pre-norm only)
  score(t, i) = <x_t, E_i>

Sequences are left-padded with 0 and the latest item sits at index L-1, so positions are counted
from the right: the last column always gets `P[max_len - 1]` (as in the authors' code, which also
left-pads; RecBole right-pads, so there the *first* item gets P[0]), and a sequence padded to a
shorter L gives the same outputs (padding keys are masked).

Defaults are RecBole 1.2.1's SASRec (`hidden_size=64, inner_size=256, n_layers=2, n_heads=2,
hidden_dropout_prob=0.5, attn_dropout_prob=0.5, hidden_act="gelu", layer_norm_eps=1e-12,
initializer_range=0.02, MAX_ITEM_LIST_LENGTH=50`). `pre_norm=True` gives the paper's ordering,
g(x) = x + Dropout(g(LayerNorm(x))) for attention and feed-forward and a final LayerNorm (Sec.
III-C). The authors' TensorFlow code and its PyTorch port differ in details; these are switches here:
`embed_scale=True` multiplies the item embedding by sqrt(d) (both); `norm_queries_only=True` (with
`pre_norm`) normalises only the attention queries, keys and values reading the raw input, and lets
each residual add the normalised input (both; see `TransformerBlock`); `weight_init="xavier_normal"`
draws every table and weight matrix from N(0, 2 / (fan_in + fan_out)) (the PyTorch port; the TF code
draws Glorot-uniform). Not reproduced: their attention has no output projection and drops out only its
weights, and their feed-forward drops out after the inner ReLU too. Both also zero padded positions
between blocks, which changes nothing here: padding keys are masked and padded positions have loss
weight 0.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from recjax.nn.attention import TransformerBlock, TransformerStack, add_positions, causal_padding_mask
from recjax.nn.dropout import Dropout
from recjax.nn.embedding import embedding_init, embedding_table
from recjax.nn.text import ItemTextTable, TextItemTower


class SASRec(nn.Module):
  """Causal self-attention sequence encoder with a tied item embedding for scoring.

  Methods: `sequence_repr(seq [B, L]) -> [B, L, d]`, `user_repr(batch) -> [B, d]` (the state at
  index L-1 of `batch["seq"]`, computed without the other positions' last-block outputs),
  `item_repr() -> [N, d]`.
  """

  num_items: int
  max_len: int = 50
  dim: int = 64
  num_blocks: int = 2
  num_heads: int = 2
  ffn_dim: int = 256
  dropout: float = 0.5
  attn_dropout: float = 0.5
  activation: str = "gelu"
  layer_norm_eps: float = 1e-12
  pre_norm: bool = False
  norm_queries_only: bool = False
  embed_scale: bool = False
  weight_init: str = "normal"       # "normal" N(0, init_std^2) | "xavier_normal" (tables and weight matrices)
  init_std: float = 0.02
  item_text: ItemTextTable | None = None   # text-aware items (config `text.model`): recjax.nn.text.TextItemTower
  kind: ClassVar[str] = "sequential"

  def setup(self):
    if self.item_text is None:
      self.item_embedding = embedding_table(self.num_items, self.dim, init=self.weight_init, std=self.init_std)
    else:
      self.item_tower = TextItemTower(self.num_items, self.dim, self.item_text, use_id=self.item_text.use_id,
                                      std=self.init_std)
    self.position_embedding = self.param(
      "position_embedding", embedding_init(self.weight_init, std=self.init_std), (self.max_len, self.dim), jnp.float32
    )
    # Post-norm normalises the input embedding; pre-norm normalises the last block's output.
    self.norm = nn.LayerNorm(epsilon=self.layer_norm_eps)
    self.input_dropout = Dropout(self.dropout)
    block = TransformerBlock(
      num_heads=self.num_heads, dim=self.dim, ffn_dim=self.ffn_dim, dropout=self.dropout,
      attn_dropout=self.attn_dropout, activation=self.activation, layer_norm_eps=self.layer_norm_eps,
      pre_norm=self.pre_norm, norm_queries_only=self.norm_queries_only, init_std=self.init_std,
      weight_init=self.weight_init,
    )
    self.encoder = TransformerStack(block, self.num_blocks)

  def _encode(self, seq: jnp.ndarray, train: bool, last_only: bool) -> jnp.ndarray:
    """`seq [B, L]` -> `[B, L, d]`, or `[B, 1, d]` (position L-1) when `last_only`."""
    items = self.item_embedding(seq) if self.item_text is None else jnp.take(self.item_tower(), seq, axis=0)
    if self.embed_scale:
      items = items * self.dim**0.5
    x = add_positions(items, self.position_embedding)  # [B, L, d]
    if not self.pre_norm:
      x = self.norm(x)
    x = self.input_dropout(x, deterministic=not train)
    mask = causal_padding_mask(seq)  # [B, 1, L, L]
    x = self.encoder(x, mask, train=train, last_only=last_only)
    if self.pre_norm:
      x = self.norm(x)
    return x

  def sequence_repr(self, seq: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """`seq [B, L]` int (left-padded) -> the state at every position `[B, L, d]`."""
    return self._encode(seq, train, last_only=False)

  def user_repr(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """`batch["seq"] [B, L]` -> the state at the last position `[B, d]`."""
    return self._encode(batch["seq"], train, last_only=True)[:, 0]

  def item_repr(self) -> jnp.ndarray:
    """The item table `[N, d]` shared by the input and the output (row 0 = padding)."""
    return self.item_embedding.embedding if self.item_text is None else self.item_tower()

  def __call__(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """Scores `[B, N]` of the next item; `model.init(rng, batch)` creates every parameter."""
    return self.user_repr(batch, train=train) @ self.item_repr().T
