"""Multi-head self-attention and a Transformer block (Vaswani et al. 2017), with masks built outside.

Masks are boolean, True = "query may attend to key", broadcastable to `[B, H, Lq, Lk]`; a 3-D
`[B, L, L]` mask gets a head axis. `causal_padding_mask` serves left-to-right models (SASRec),
`padding_mask` bidirectional ones (BERT4Rec). A query with no allowed key (a padding position in
a left-padded sequence, or a fully padded row) attends uniformly instead of producing NaN; its
output is meaningless and must be ignored by the loss (its weight is 0).

`TransformerStack` runs `num_blocks` of them (the encoder of SASRec and BERT4Rec).

`last_only=True` computes the outputs of the last position only (`[B, 1, d]`): keys and values
still cover every position, but the query projection, the attention rows, the output projection
and the feed-forward network run for one position instead of L. SASRec's final block uses it
when only the latest state is needed (prefix training, evaluation).
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from recjax.nn.dropout import Dropout
from recjax.nn.embedding import embedding_init

ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # erf form, as BERT / RecBole
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": jax.nn.relu,
  "swish": jax.nn.silu,
  "silu": jax.nn.silu,
  "tanh": jnp.tanh,
  "sigmoid": jax.nn.sigmoid,
}


def add_positions(x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
  """Learned positions counted from the right, for left-padded sequences: the newest column gets
  `positions[max_len - 1]` whatever the padded length L.

  Args:
    x: `[B, L, d]` item embeddings, L <= max_len.
    positions: `[max_len, d]` position table.

  Returns:
    `[B, L, d]`.
  """
  length, max_len = x.shape[-2], positions.shape[0]
  if length > max_len:
    raise ValueError(f"sequence length {length} exceeds max_len={max_len}")
  return x + positions[max_len - length:]


def padding_mask(seq: jnp.ndarray) -> jnp.ndarray:
  """Bidirectional mask: every query may attend to every non-padding key.

  Args:
    seq: `[B, L]` int item ids, 0 = padding.

  Returns:
    `[B, 1, 1, L]` bool (broadcasts over heads and queries).
  """
  return (seq != 0)[:, None, None, :]


def causal_padding_mask(seq: jnp.ndarray) -> jnp.ndarray:
  """Causal mask that also hides padding keys: query i may attend to key j iff j <= i and seq[j] != 0.

  Args:
    seq: `[B, L]` int item ids, 0 = padding.

  Returns:
    `[B, 1, L, L]` bool.
  """
  length = seq.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))  # [L, L]
  return causal[None, None] & padding_mask(seq)


def _activation(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def _as_4d(mask: jnp.ndarray, last_only: bool) -> jnp.ndarray:
  """`[B, L, L]` or `[B, h, Lq, L]` -> `[B, h, Lq', L]` with Lq' = 1 when `last_only`."""
  if mask.ndim == 3:
    mask = mask[:, None]
  if last_only and mask.shape[-2] != 1:
    mask = mask[..., -1:, :]
  return mask


class MultiHeadSelfAttention(nn.Module):
  """softmax(Q K^T / sqrt(d_h) masked) V over H heads, then an output projection.

  Q = x W_q, K = x W_k, V = x W_v with d_h = dim / num_heads; dropout on the attention
  probabilities (as BERT / RecBole). Weights ~ N(0, init_std^2) or as `weight_init` says (`embedding_init`);
  biases 0.
  """

  num_heads: int
  dim: int
  attn_dropout: float = 0.0
  init_std: float = 0.02
  weight_init: str = "normal"

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, *, train: bool = False, last_only: bool = False,
               keys: jnp.ndarray | None = None):
    """Args: x `[B, L, d]` (the queries, and the keys and values unless `keys` is given), mask bool
    broadcastable to `[B, H, L, L]` (or `[B, L, L]`), keys `[B, L, d]` (optional) the keys' and values' input.

    Returns: `[B, L, d]`, or `[B, 1, d]` when `last_only`.
    """
    if self.dim % self.num_heads:
      raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
    head_dim = self.dim // self.num_heads
    dense = lambda features, name, axis=-1: nn.DenseGeneral(  # noqa: E731
      features, axis=axis, kernel_init=embedding_init(self.weight_init, std=self.init_std), name=name
    )
    queries = x[:, -1:] if last_only else x
    keys = x if keys is None else keys
    q = dense((self.num_heads, head_dim), "query")(queries)  # [B, Lq, H, dh]
    k = dense((self.num_heads, head_dim), "key")(keys)  # [B, L, H, dh]
    v = dense((self.num_heads, head_dim), "value")(keys)  # [B, L, H, dh]
    q = q * head_dim**-0.5  # scale the [B, Lq, H, dh] queries, not the [B, H, Lq, L] scores
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)  # [B, H, Lq, L]
    scores = jnp.where(_as_4d(mask, last_only), scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)  # fully masked rows -> uniform, never NaN
    probs = Dropout(self.attn_dropout)(probs, deterministic=not train)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, Lq, H, dh]
    return dense(self.dim, "out", axis=(-2, -1))(context)  # [B, Lq, d]


class TransformerBlock(nn.Module):
  """Self-attention + position-wise feed-forward, each with dropout and a residual connection.

  Post-norm (`pre_norm=False`, BERT / RecBole's SASRec):
    h = LN(x + Drop(MHSA(x))),  y = LN(h + Drop(W_2 act(W_1 h)))
  Pre-norm (`pre_norm=True`, the SASRec paper's g(x) = x + Dropout(g(LayerNorm(x))), Kang & McAuley
  2018, Sec. III-C):
    h = x + Drop(MHSA(LN(x))),  y = h + Drop(W_2 act(W_1 LN(h)))
  (a pre-norm stack needs a final LN after its last block; the model owns it).
  Pre-norm as the SASRec authors' code has it (`pre_norm=True, norm_queries_only=True`): only the
  queries are normalised, and each residual adds the normalised input:
    q = LN(x),  h = q + Drop(MHSA(queries q, keys and values x)),  y = LN(h) + Drop(W_2 act(W_1 LN(h)))
  """

  num_heads: int
  dim: int
  ffn_dim: int
  dropout: float = 0.0
  attn_dropout: float = 0.0
  activation: str = "gelu"
  layer_norm_eps: float = 1e-12
  pre_norm: bool = False
  norm_queries_only: bool = False
  init_std: float = 0.02
  weight_init: str = "normal"     # weight matrices: "normal" N(0, init_std^2) | "xavier_normal" (biases 0 either way)

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, *, train: bool = False, last_only: bool = False):
    """Args: x `[B, L, d]`, mask bool `[B, 1, L, L]` / `[B, L, L]` (or broadcastable).

    Returns: `[B, L, d]`, or `[B, 1, d]` (the last position) when `last_only`.
    """
    act = _activation(self.activation)
    attention = MultiHeadSelfAttention(
      num_heads=self.num_heads, dim=self.dim, attn_dropout=self.attn_dropout, init_std=self.init_std,
      weight_init=self.weight_init, name="attention",
    )
    norm_attn = nn.LayerNorm(epsilon=self.layer_norm_eps, name="norm_attn")
    norm_ffn = nn.LayerNorm(epsilon=self.layer_norm_eps, name="norm_ffn")
    kernel_init = embedding_init(self.weight_init, std=self.init_std)
    dense = lambda features, name: nn.Dense(features, kernel_init=kernel_init, name=name)  # noqa: E731
    dropout = Dropout(self.dropout)
    drop = lambda h: dropout(h, deterministic=not train)  # noqa: E731
    ffn = lambda h: dense(self.dim, "ffn_out")(act(dense(self.ffn_dim, "ffn_in")(h)))  # noqa: E731

    if self.norm_queries_only and not self.pre_norm:
      raise ValueError("norm_queries_only=True is a pre-norm layout: set pre_norm=True too")
    queries = lambda h: h[:, -1:] if last_only else h  # noqa: E731   [B, Lq, d]: the positions computed
    attend = lambda q, **kv: attention(q, mask, train=train, last_only=last_only, **kv)  # noqa: E731
    if self.norm_queries_only:
      normed = norm_attn(x)
      h = norm_ffn(queries(normed) + drop(attend(normed, keys=x)))
      return h + drop(ffn(h))
    if self.pre_norm:
      h = queries(x) + drop(attend(norm_attn(x)))
      return h + drop(ffn(norm_ffn(h)))
    h = norm_attn(queries(x) + drop(attend(x)))
    return norm_ffn(h + drop(ffn(h)))


class TransformerStack(nn.Module):
  """`num_blocks` copies of the `block` template (each with its own parameters, `blocks_{i}`),
  applied in turn with one mask.

  With `last_only`, the final block computes only the last position (`[B, 1, d]`); the earlier
  blocks still compute every position, since the last one attends to all of them.
  """

  block: TransformerBlock
  num_blocks: int

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, *, train: bool = False, last_only: bool = False):
    """Args: x `[B, L, d]`, mask as `TransformerBlock`'s. Returns: `[B, L, d]`, or `[B, 1, d]` when `last_only`."""
    for i in range(self.num_blocks):
      block = self.block.clone(parent=self, name=f"blocks_{i}")
      x = block(x, mask, train=train, last_only=last_only and i == self.num_blocks - 1)
    return x[:, -1:] if last_only and self.num_blocks == 0 else x
