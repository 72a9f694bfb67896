"""Layers of feature-field (context-aware) models: a field encoder, the FM interaction, the DCN-v2
cross network and an MLP whose first layer can be applied to the user and item parts separately.

Fields of a row (one user, one item) are embedded into `[F, d]`: user-side fields first, then
item-side ones; within a side single-valued tokens, then multi-valued tokens, then numbers.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax.nn import initializers

from recjax.data.features import PAD, FeatureTables
from recjax.nn.constants import read_constants
from recjax.nn.dropout import Dropout
from recjax.nn.embedding import embedding_init
from recjax.nn.init import xavier_normal


def fm_interaction(v: jnp.ndarray) -> jnp.ndarray:
  """Second-order FM term sum_{i<j} <v_i, v_j> in O(F d) (Rendle, ICDM 2010):

    0.5 * sum_k ((sum_f v_fk)^2 - sum_f v_fk^2).

  Args:
    v: `[..., F, d]` field embeddings.
  Returns:
    `[...]`.
  """
  return fm_from_sums(v.sum(-2), jnp.square(v).sum((-2, -1)))


def fm_from_sums(total: jnp.ndarray, square_sum: jnp.ndarray) -> jnp.ndarray:
  """The FM term from `total = sum_f v_f [..., d]` and `square_sum = sum_f |v_f|^2 [...]`; both
  add over disjoint field groups, so user and item sides are summed once each and combined here."""
  return 0.5 * (jnp.square(total).sum(-1) - square_sum)


def field_constants(features: FeatureTables) -> dict:
  """The id tables `FieldEncoder` indexes, per side ("user", "item"), as host arrays over the side's
  dense ids (`[rows, ...]`):

    "token_ids"  int32 `[rows, Ft]`: single-valued tokens offset into the shared token table;
    "token_mask" float32 `[rows, Ft]`: 0 where the token is padding;
    "seq"        {field: int32 `[rows, M]`} multi-valued tokens (0 = padding);
    "numeric"    float32 `[rows, Fn]`.

  Keys without fields of their kind are left out ("seq" is always there, maybe empty).
  """
  tokens = [f for f in features.fields if f.kind == "token"]
  offset = dict(zip([f.name for f in tokens], np.cumsum([0] + [f.vocab_size for f in tokens]).tolist()))
  out = {}
  for side in ("user", "item"):
    fields = features.side(side)
    side_tokens = [f for f in fields if f.kind == "token"]
    numeric = [f.values for f in fields if f.kind == "float"]
    tables = {"seq": {f.name: f.values for f in fields if f.kind == "token_seq"}}
    if side_tokens:
      raw = np.stack([f.values for f in side_tokens], -1)
      tables["token_ids"] = (raw + np.array([offset[f.name] for f in side_tokens])).astype(np.int32)
      tables["token_mask"] = (raw != PAD).astype(np.float32)
    if numeric:
      tables["numeric"] = np.stack(numeric, -1).astype(np.float32)
    out[side] = tables
  return out


class FieldEncoder(nn.Module):
  """Per-field embeddings and first-order weights of users and items.

  Parameters (as RecBole 1.2.1's `ContextRecommender`): one table `[T, d]` shared by all
  single-valued token fields (each field's ids offset into it), one table `[V_f, d]` per
  multi-valued field, one vector `[d]` per numeric field; the first-order weights have the same
  layout with width 1. Every table is xavier-normal by default.

  Per field: a token id -> its row (id 0 -> zero vector, weight 0); a token sequence -> the mean of
  its non-padding rows (empty -> zero vector), weight = the sum of their weights (a multi-hot
  linear model); a number x -> x * vector, weight x * w.

  The id tables it indexes (`field_constants(features)`, entries "user" and "item") are read from the
  encoder's scope of the "constants" collection when `apply` is given it (a model's: `{"params": ...,
  "constants": {"encoder": field_constants(...)}}`), else built on the host and embedded in the
  compiled code.

  Attributes:
    features: the fields to encode (already selected).
    dim: embedding width d.
    embedding_init: initialiser name of every table (`recjax.nn.embedding.INITS`).
    std: scale of the "normal" / "uniform" initialisers.
    first_order: create the first-order weights (models without a linear part skip them; their
      weights are then zeros).
  """
  features: FeatureTables
  dim: int
  embedding_init: str = "xavier_normal"
  std: float = 0.02
  first_order: bool = True

  def setup(self):
    tokens = [f for f in self.features.fields if f.kind == "token"]
    self.numeric_names = [f.name for f in self.features.fields if f.kind == "float"]
    init = embedding_init(self.embedding_init, std=self.std)
    seqs = [f for f in self.features.fields if f.kind == "token_seq"]

    def weights(name: str, rows: int) -> jnp.ndarray:
      return self.param(name, init, (rows, 1)) if self.first_order else jnp.zeros((rows, 1))

    if tokens:
      rows = sum(f.vocab_size for f in tokens)
      self.token_embedding = self.param("token_embedding", init, (rows, self.dim))
      self.token_weight = weights("token_weight", rows)
    self.seq_embedding = {f.name: self.param(f"seq_{f.name}_embedding", init, (f.vocab_size, self.dim)) for f in seqs}
    self.seq_weight = {f.name: weights(f"seq_{f.name}_weight", f.vocab_size) for f in seqs}
    if self.numeric_names:
      self.numeric_embedding = self.param("numeric_embedding", init, (len(self.numeric_names), self.dim))
      self.numeric_weight = weights("numeric_weight", len(self.numeric_names))

  def encode(self, side: str, ids: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Fields of one side.

    Args:
      side: "user" or "item".
      ids: `[...]` dense user or item ids.
    Returns:
      (embeddings `[..., F_side, d]`, first-order weights `[..., F_side]`).
    """
    tables = read_constants(self, side, lambda: field_constants(self.features)[side])
    embeddings, weights = [], []
    if "token_ids" in tables:
      index = jnp.asarray(tables["token_ids"])[ids]                         # [..., Ft]
      mask = jnp.asarray(tables["token_mask"])[ids]                         # [..., Ft]
      embeddings.append(self.token_embedding[index] * mask[..., None])
      weights.append(self.token_weight[index, 0] * mask)
    for name in sorted(tables["seq"]):  # by name: jit rebuilds a dict argument with its keys sorted
      tokens = jnp.asarray(tables["seq"][name])[ids]                        # [..., M]
      mask = (tokens != PAD).astype(jnp.float32)
      total = jnp.einsum("...m,...md->...d", mask, self.seq_embedding[name][tokens])
      count = jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
      embeddings.append((total / count)[..., None, :])                      # [..., 1, d]
      weights.append((self.seq_weight[name][tokens, 0] * mask).sum(-1, keepdims=True))
    if "numeric" in tables:
      x = jnp.asarray(tables["numeric"])[ids]                               # [..., Fn]
      cols = np.array([self.numeric_names.index(f.name) for f in self.features.side(side) if f.kind == "float"])
      embeddings.append(x[..., None] * self.numeric_embedding[cols])
      weights.append(x * self.numeric_weight[cols, 0])
    if not embeddings:
      return jnp.zeros((*ids.shape, 0, self.dim)), jnp.zeros((*ids.shape, 0))
    return jnp.concatenate(embeddings, -2), jnp.concatenate(weights, -1)

  def __call__(self, user: jnp.ndarray, item: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`user [B]`, `item [B]` -> (embeddings `[B, F, d]`, first-order weights `[B, F]`), user fields first."""
    user_emb, user_w = self.encode("user", user)
    item_emb, item_w = self.encode("item", item)
    return jnp.concatenate([user_emb, item_emb], -2), jnp.concatenate([user_w, item_w], -1)


class CrossNetwork(nn.Module):
  """DCN-v2 cross layers (Wang et al., "DCN V2: Improved Deep & Cross Network", WWW 2021, Eq. 1),
  full rank:

    x_{l+1} = x_0 * (x_l W_l + b_l) + x_l,   W_l `[D, D]`, b_l `[D]` (zeros).

  `weight_init`: "normal" = N(0, 1) (RecBole 1.2.1 draws W with `torch.randn` and never re-initialises it)
  or "xavier_normal".
  """
  dim: int
  num_layers: int
  weight_init: str = "normal"

  def setup(self):
    if self.weight_init == "normal":
      kernel_init = initializers.normal(1.0)
    elif self.weight_init == "xavier_normal":
      kernel_init = xavier_normal
    else:
      raise ValueError(f"unknown cross weight_init {self.weight_init!r}; expected 'normal' or 'xavier_normal'")
    self.kernels = [self.param(f"kernel_{i}", kernel_init, (self.dim, self.dim)) for i in range(self.num_layers)]
    self.biases = [self.param(f"bias_{i}", initializers.zeros, (self.dim,)) for i in range(self.num_layers)]

  def __call__(self, x0: jnp.ndarray) -> jnp.ndarray:
    """`x0 [..., D]` -> `[..., D]`."""
    x = x0
    for kernel, bias in zip(self.kernels, self.biases):
      x = x0 * (x @ kernel + bias) + x
    return x

  def kernel_norms(self) -> jnp.ndarray:
    """Frobenius norm of each W_l `[num_layers]` (RecBole's `RegLoss` on the cross weights)."""
    return jnp.stack([jnp.sqrt(jnp.sum(jnp.square(k))) for k in self.kernels]) if self.kernels else jnp.zeros(0)


class MLP(nn.Module):
  """RecBole's `MLPLayers`: per hidden layer Dropout -> Dense -> ReLU; kernels xavier-normal,
  biases zero. No batch norm (RecBole's DCNV2 uses it; see recjax.models.ctr).

  The first layer's input may arrive in parts (the user fields and the item fields of a row):
  `project(part, offset)` multiplies one part by its rows of the first kernel, so a user's part is
  projected once and broadcast against many items; `rest(sum of projections)` does the remainder.
  `__call__(x) = rest(project(x, 0))`.

  Attributes:
    in_dim: input width D.
    dims: hidden widths (H_1, ..., H_L); L >= 1.
    dropout: rate of the dropout before every Dense.
  """
  in_dim: int
  dims: Sequence[int]
  dropout: float = 0.0

  def setup(self):
    if not self.dims:
      raise ValueError("MLP needs at least one hidden layer")
    widths = [self.in_dim, *self.dims]
    self.kernels = [self.param(f"kernel_{i}", xavier_normal, (widths[i], widths[i + 1])) for i in range(len(self.dims))]
    self.biases = [self.param(f"bias_{i}", initializers.zeros, (widths[i + 1],)) for i in range(len(self.dims))]
    self.drops = [Dropout(self.dropout) for _ in self.dims]

  @property
  def out_dim(self) -> int:
    return self.dims[-1]

  def project(self, part: jnp.ndarray, offset: int, train: bool = False) -> jnp.ndarray:
    """`part [..., P]` (input columns offset..offset+P) -> its first-layer pre-activation share `[..., H_1]`."""
    width = part.shape[-1]
    if offset < 0 or offset + width > self.in_dim:
      raise ValueError(f"MLP.project: columns {offset}..{offset + width} outside the input width {self.in_dim}")
    return self.drops[0](part, deterministic=not train) @ self.kernels[0][offset:offset + width]

  def rest(self, h: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Sum of the first layer's projections `[..., H_1]` -> output `[..., H_L]`."""
    h = nn.relu(h + self.biases[0])
    for drop, kernel, bias in zip(self.drops[1:], self.kernels[1:], self.biases[1:]):
      h = nn.relu(drop(h, deterministic=not train) @ kernel + bias)
    return h

  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """`x [..., D]` -> `[..., H_L]`."""
    return self.rest(self.project(x, 0, train), train)
