"""Caser: convolutional sequence embedding (Tang & Wang, "Personalized Top-N Sequential
Recommendation via Convolutional Sequence Embedding", WSDM 2018).

The last L = max_len items of user u (left-padded with id 0, latest at index L-1) are embedded into
an image X [L, d] whose padded rows are zero, X_t = E[s_t] * [s_t != 0]. Two kinds of filters:

  horizontal, height h = 1..L, n_h filters each (F_hk [h, d]):
    c_hkt = sum_{j<h} <X_{t+j}, F_hk[j]> + b_hk            for t = 0..L-h
    o_hk  = max_t ReLU(c_hkt) = ReLU(max_t c_hkt)          o = [o_hk]  [L * n_h]   (order h, k)
  vertical, n_v filters of size L x 1 (V [L, n_v]):
    o'_vc = sum_t V_tv X_tc + b'_v                          o' = [o'_vc]  [n_v * d] (order v, c)

  z = ReLU(W_1 Drop([o'; o]) + b_1)                        [d]
  "paper":   y_i = <[z; P_u], W'_i> + b'_i                 W' [N, 2d], b' [N]
  "recbole": y_i = <ReLU(W_2 [z; P_u] + b_2), E_i>          W_2 [2d -> d], E the input table

For "paper" the bias rides along the dot product: `user_repr` is [z; P_u; 1] `[B, 2d+1]` and
`item_repr()` is [W', b'] `[N, 2d+1]`, so every dot-product scorer and loss sees y_i exactly.

Computing the horizontal layer. RecBole runs L convolutions (sum_h n_h d h (L-h+1) multiply-adds
per sequence, ~11M at L=50, d=64, n_h=8) and backpropagates through all of them. Here:

  1. Every window term is a table lookup. <X_p, F_hk[j]> depends only on the item at p, so
     T = X_rows F, with X_rows the (padding-zeroed) item table [N, d] and F all filter rows
     [d, R], R = n_h L (L+1) / 2 (packed by (h, j, k), `horizontal_offsets`), gives
     c_hkt = sum_{j<h} T[s_{t+j}, (h, j, k)] + b_hk: one matmul of N rows instead of B L, then h
     gathered adds per window (no factor d). When the batch holds fewer positions than the
     catalogue has items (B L < N), the rows are the batch's own embedded positions instead
     (T [B L, R], index = position) -- the same code, but T then takes B L R floats (4 GB at
     B = 2048, L = 50, n_h = 8): large catalogues want smaller batches or shorter L.
  2. Max-pooling passes gradient to one window per (b, h, k): the argmax t*. The backward pass is
     a custom VJP that scatter-adds the pooled gradient into the h table entries of that window
     (B n_h L (L+1) / 2 scalars) instead of differentiating every window. Ties (e.g. windows
     that lie wholly in the padding, whose sums are all 0) go to the first maximum; any choice
     is a valid subgradient and, for all-padding windows, contributes nothing.

Values are exact (sums of the same products in another order); `tests/test_caser.py` checks both
row choices, values and gradients, against per-height convolutions. On a 2-core CPU a training
step (B = 2048, L = 50, d = 64, n_h = 8, 1683 items, full softmax) takes ~1 s against ~26 s for
per-height `lax.conv` and ~10 s for RecBole's PyTorch.

Differences. From the paper: the training pairs are prefixes (one next item per row, T = 1 in
the paper's terms; the authors' sliding windows with several targets are not reproduced). From
RecBole 1.2.1: padded positions embed to zero (RecBole's padding row is overwritten by its
normal init and then frozen by padding_idx, so its padded positions feed a fixed random vector to
the convolutions); sequences are left-padded, so the latest item always sits in the last row
(RecBole right-pads: its vertical filters see the latest item at a row that moves with the
history length); no regulariser inside the model (RecBole adds reg_weight = 1e-4 times the
unsquared L2 norms of the embeddings and kernels to its loss; a trainer may add weight decay);
`output` defaults to the paper's output layer, "recbole" gives RecBole's. Initialisation follows
RecBole: embeddings N(0, (1/d)^2), dense kernels xavier-normal with zero bias, convolutions
PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernel and bias (fan_in = h d
horizontal, L vertical); the paper output W' ~ N(0, (1/(2d))^2) and b' = 0 as the authors' code.
"""
from __future__ import annotations

import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.nn import initializers

from recjax.nn.dropout import Dropout
from recjax.nn.embedding import embedding_table
from recjax.nn.init import fan_in_uniform, xavier_normal

OUTPUTS = ("paper", "recbole")


def horizontal_offsets(max_len: int, num_filters: int) -> np.ndarray:
  """Column where height h's block (h, j, k) starts in the packed filter matrix `[d, R]`, for h = 1..L+1."""
  heights = np.arange(max_len + 1)
  return num_filters * heights * (heights + 1) // 2


def unpack_horizontal(kernel: jnp.ndarray, max_len: int) -> list[jnp.ndarray]:
  """The packed filters `[d, R]` as a list over h = 1..L of conv kernels `[h, d, n_h]`."""
  dim, width = kernel.shape
  num_filters = 2 * width // (max_len * (max_len + 1))
  off = horizontal_offsets(max_len, num_filters)
  return [
    kernel[:, off[h - 1] : off[h]].reshape(dim, h, num_filters).transpose(1, 0, 2) for h in range(1, max_len + 1)
  ]


def _blocks(table: jnp.ndarray, max_len: int, num_filters: int) -> list[jnp.ndarray]:
  """`table [M, R]` -> per height h the `[M, h, n_h]` slice (rows of the lookups F_hk[j])."""
  off = horizontal_offsets(max_len, num_filters)
  return [table[:, off[h - 1] : off[h]].reshape(-1, h, num_filters) for h in range(1, max_len + 1)]


def _window_sums(block: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
  """c[b, t, k] = sum_{j<h} block[index[b, t+j], j, k] for every window t = 0..L-h: `[B, L-h+1, n_h]`.

  h gathers of `[M, n_h]` rows summed elementwise: XLA fuses them into one loop, with no
  `[B, L, h, n_h]` intermediate.
  """
  height = block.shape[1]
  windows = index.shape[1] - height + 1
  return sum(jnp.take(block[:, j], index[:, j : j + windows], axis=0, mode="clip") for j in range(height))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def window_max(table: jnp.ndarray, index: jnp.ndarray, num_filters: int) -> jnp.ndarray:
  """Max over windows of every height of summed table lookups.

  Args:
    table: `[M, R]` lookups, R = n_h L (L+1) / 2, columns packed by (h, j, k) (see `horizontal_offsets`).
    index: `[B, L]` int rows of `table`, one per position.
    num_filters: n_h.

  Returns:
    `[B, L, n_h]`: m[b, h-1, k] = max_{t <= L-h} sum_{j<h} table[index[b, t+j], (h, j, k)].
  """
  return _window_max_fwd(table, index, num_filters)[0]


def _ordered(x: jnp.ndarray) -> jnp.ndarray:
  """Floats -> same-width ints with the same order (negatives get their magnitude bits flipped)."""
  i = lax.bitcast_convert_type(x, jnp.dtype(f"int{8 * x.dtype.itemsize}"))
  return jnp.where(i < 0, i ^ jnp.iinfo(i.dtype).max, i)


def _unordered(i: jnp.ndarray, dtype) -> jnp.ndarray:
  """Inverse of `_ordered`."""
  return lax.bitcast_convert_type(jnp.where(i < 0, i ^ jnp.iinfo(i.dtype).max, i), dtype)


def _window_max_fwd(table, index, num_filters):
  maxima, argmax = [], []
  for block in _blocks(table, index.shape[1], num_filters):
    # Max and first argmax over windows of integer keys. With float sums, XLA CPU hands the adds
    # and the max to one YNNPACK fusion and materialises every gather apart (several times slower);
    # integer keys keep each height's gathered sums one loop fusion, then two plain reductions.
    key = _ordered(_window_sums(block, index))  # [B, windows, n_h]
    m = jnp.max(key, axis=1)  # [B, n_h]
    t = lax.broadcasted_iota(jnp.int32, key.shape, 1)
    argmax.append(jnp.min(jnp.where(key == m[:, None], t, key.shape[1]), axis=1))  # first maximum
    maxima.append(_unordered(m, table.dtype))
  return jnp.stack(maxima, axis=1), (index, jnp.stack(argmax, axis=1), table.shape[0])


def _window_max_bwd(num_filters, residuals, grad):
  index, argmax, num_rows = residuals  # [B, L], [B, L, n_h]
  grads = []
  for h in range(1, index.shape[1] + 1):
    rows = jnp.take_along_axis(
      index[:, None, :], argmax[:, h - 1, :, None] + np.arange(h), axis=2, mode="clip"
    )  # [B, n_h, h]: the table row at each position of the winning window
    flat = (rows * h + np.arange(h)) * num_filters + np.arange(num_filters)[:, None]  # (row, j, k)
    updates = jnp.broadcast_to(grad[:, h - 1, :, None], rows.shape)
    block = jax.ops.segment_sum(updates.reshape(-1), flat.reshape(-1), num_rows * h * num_filters)
    grads.append(block.reshape(num_rows, h * num_filters))
  return jnp.concatenate(grads, axis=1), None


window_max.defvjp(_window_max_fwd, _window_max_bwd)


class Caser(nn.Module):
  """Horizontal and vertical convolutions over the last `max_len` items, plus a user embedding.

  Methods: `user_repr(batch) -> [B, D]` (reads `batch["seq"] [B, L']`, L' <= max_len, left-padded
  with 0, and `batch["user"] [B]`), `item_repr() -> [N, D]` (row 0 = padding) and scores
  `__call__(batch) -> [B, N]`, with D = 2d + 1 for `output="paper"` and d for "recbole".
  Caser encodes one history into one state, so there is no per-position `sequence_repr`: train
  it on prefix rows (training="prefix").
  """

  num_users: int
  num_items: int
  max_len: int = 50
  dim: int = 64
  num_horizontal: int = 8
  num_vertical: int = 4
  dropout: float = 0.4
  output: str = "paper"
  kind: ClassVar[str] = "sequential"

  def setup(self):
    if self.output not in OUTPUTS:
      raise ValueError(f"unknown Caser output {self.output!r}; expected one of {OUTPUTS}")
    if not (self.num_horizontal or self.num_vertical):
      raise ValueError("Caser needs horizontal or vertical filters (num_horizontal = num_vertical = 0)")
    d, length, n_h, n_v = self.dim, self.max_len, self.num_horizontal, self.num_vertical
    self.user_embedding = embedding_table(self.num_users, d, init="normal", std=1.0 / d)
    self.item_embedding = embedding_table(self.num_items, d, init="normal", std=1.0 / d)
    if n_h:
      heights = np.arange(1, length + 1)
      column_fan_in = np.repeat(heights, heights * n_h) * d  # [R]: h d for every column of height h
      self.horizontal_kernel = self.param(
        "horizontal_kernel", fan_in_uniform(column_fan_in), (d, n_h * length * (length + 1) // 2), jnp.float32
      )
      self.horizontal_bias = self.param(
        "horizontal_bias", fan_in_uniform(heights[:, None] * d), (length, n_h), jnp.float32
      )
    if n_v:
      self.vertical_kernel = self.param("vertical_kernel", fan_in_uniform(length), (length, n_v), jnp.float32)
      self.vertical_bias = self.param("vertical_bias", fan_in_uniform(length), (n_v,), jnp.float32)
    dense = functools.partial(nn.Dense, kernel_init=xavier_normal, bias_init=initializers.zeros)
    self.conv_dropout = Dropout(self.dropout)
    self.hidden = dense(d)
    if self.output == "paper":
      self.output_embedding = embedding_table(self.num_items, 2 * d, init="normal", std=1.0 / (2 * d))
      self.output_bias = self.param("output_bias", initializers.zeros, (self.num_items,), jnp.float32)
    else:
      self.output_dense = dense(d)

  def _pad(self, seq: jnp.ndarray) -> jnp.ndarray:
    """`[B, L']` -> `[B, max_len]`, zeros on the left."""
    length = seq.shape[-1]
    if length > self.max_len:
      raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}")
    return jnp.pad(seq, ((0, 0), (self.max_len - length, 0)))

  def horizontal_features(self, x: jnp.ndarray, seq: jnp.ndarray) -> jnp.ndarray:
    """Max-pooled horizontal convolutions `[B, L n_h]` (order h, k) of the masked image `x [B, L, d]`.

    `seq [B, L]` gives the item ids; the lookup rows are the item table, or `x`'s positions when
    the batch has fewer positions than there are items (see the module docstring).
    """
    batch, length, d = x.shape
    if batch * length < self.num_items:  # rows = the batch's positions
      rows, index = x.reshape(batch * length, d), jnp.arange(batch * length).reshape(batch, length)
    else:  # rows = the item table, padding row zeroed
      items = self.item_embedding.embedding
      rows, index = items * (jnp.arange(self.num_items) != 0)[:, None].astype(items.dtype), seq
    table = rows @ self.horizontal_kernel  # [M, R]
    pooled = window_max(table, index, self.num_horizontal)  # [B, L, n_h]
    return jax.nn.relu(pooled + self.horizontal_bias).reshape(batch, length * self.num_horizontal)

  def user_repr(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """`batch["seq"] [B, L']`, `batch["user"] [B]` -> `[B, 2d+1]` ("paper", [z; P_u; 1]) or `[B, d]`."""
    seq = self._pad(batch["seq"])  # [B, L]
    mask = (seq != 0)[..., None]
    x = jnp.where(mask, self.item_embedding(seq), 0.0)  # [B, L, d], padding rows zero
    features = []
    if self.num_vertical:
      vertical = jnp.einsum("btc,tv->bvc", x, self.vertical_kernel) + self.vertical_bias[:, None]  # [B, n_v, d]
      features.append(vertical.reshape(x.shape[0], -1))
    if self.num_horizontal:
      features.append(self.horizontal_features(x, seq))
    o = self.conv_dropout(jnp.concatenate(features, axis=-1), deterministic=not train)  # [B, n_v d + L n_h]
    z = jax.nn.relu(self.hidden(o))  # [B, d]
    zu = jnp.concatenate([z, self.user_embedding(batch["user"])], axis=-1)  # [B, 2d]
    if self.output == "paper":
      return jnp.concatenate([zu, jnp.ones_like(zu[:, :1])], axis=-1)
    return jax.nn.relu(self.output_dense(zu))

  def item_repr(self) -> jnp.ndarray:
    """[W', b'] `[N, 2d+1]` for "paper"; the input item table `[N, d]` for "recbole" (row 0 = padding)."""
    if self.output == "paper":
      return jnp.concatenate([self.output_embedding.embedding, self.output_bias[:, None]], axis=-1)
    return self.item_embedding.embedding

  def sequence_repr(self, seq: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Not available: raises NotImplementedError (whole-sequence batches need a state per position)."""
    raise NotImplementedError(
      "Caser has no per-position states: it encodes the whole window into one user state; "
      'train it on prefix rows (training="prefix"), which use user_repr'
    )

  def __call__(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """Scores `[B, N]` of the next item; `model.init(rng, batch)` creates every parameter."""
    return self.user_repr(batch, train=train) @ self.item_repr().T
