"""Context-aware (CTR) models over feature fields: DeepFM, DCN-v2, Wide&Deep and a feature MLP.

Each scores a (user, item) row from the embeddings of its fields (`recjax.nn.features.FieldEncoder`:
user id and user features, item id and item features; see `recjax.data.features`) and returns a
logit. Kind "ctr": `logits(batch) -> [B]` for labelled rows `user [B]`, `item [B]`, and
`score_items(batch, items [B, C]) -> [B, C]` so they can also be ranked.

Every model splits its forward pass at the point where the user and item sides meet: the user
side (field embeddings, their sums, the user part of the first MLP layer) is computed once per
user and broadcast against the C items; in evaluation, when B * C exceeds the number of items,
the item side is computed once for every item and gathered. `logits` is `score_items` with C = 1,
so the two agree exactly. In training the dropout before the first MLP layer draws one mask per
user row for the user part (shared by that row's C items) and one per (row, item) for the item part.

Defaults are RecBole 1.2.1's (`properties/model/{DeepFM,DCNV2,WideDeep}.yaml`): embedding size,
MLP widths, dropout, and its initialisation (xavier-normal tables and kernels, zero biases).
`fields` selects feature fields by name (empty: all; see `RECBOLE_ML100K_FIELDS`).

Models also define `penalty() -> scalar`, a regulariser the training loss adds (DCN-v2: RecBole's
`reg_weight * sum_l ||W_l||_2` on the cross weights; 0 for the others).
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.nn import initializers

from recjax.data.features import FeatureTables
from recjax.errors import ConfigError
from recjax.nn.constants import CONSTANTS
from recjax.nn.features import MLP, CrossNetwork, FieldEncoder, field_constants, fm_from_sums, xavier_normal

DCN_STRUCTURES = ("stacked", "parallel")


class FieldSelection:
  """What every model over feature fields shares (mixed into a linen Module that declares `features:
  FeatureTables` and `fields: tuple[str, ...]`): the checks of `check_features` and the selected tables'
  sizes. Kind "ctr": labelled rows, no factorisation."""

  kind: ClassVar[str] = "ctr"
  factorized: ClassVar[bool] = False
  needs_features: ClassVar[bool] = True

  def check_features(self) -> None:
    """ConfigError unless `features` is a FeatureTables and `fields` selects at least one field."""
    if not isinstance(self.features, FeatureTables):
      raise ConfigError(f"{type(self).__name__}: features must be a recjax.data.features.FeatureTables, "
                        f"got {type(self.features).__name__}")
    if not self.tables.fields:
      raise ConfigError(f"{type(self).__name__}: no feature field selected")

  @property
  def tables(self) -> FeatureTables:
    """The selected fields."""
    return self.features.select(self.fields)

  def host_constants(self) -> dict:
    """The "constants" collection of the model's `encoder`: its feature id tables (host arrays)."""
    return {CONSTANTS: {"encoder": field_constants(self.tables)}}

  @property
  def num_fields(self) -> int:
    return len(self.tables.fields)

  @property
  def num_users(self) -> int:
    """User table size (padding row included), from the feature tables."""
    return self.features.num_users

  @property
  def num_items(self) -> int:
    """Item table size (padding row included): `score_items` takes ids in [0, num_items)."""
    return self.features.num_items


class _FieldModel(FieldSelection, nn.Module):
  """Shared plumbing: field selection, the encoder, per-side passes and `score_items`.

  Subclasses declare the fields `features`, `fields`, `dim`, `embedding_init` and implement
  `_side(side, ids, train) -> dict` (arrays `[..., *]` per id) and `_combine(user, item, train)`
  (user leaves `[B, 1, *]`, item leaves `[B, C, *]`) -> logits `[B, C]`.
  """

  def __post_init__(self):
    super().__post_init__()
    self.check_features()

  def _setup_encoder(self, first_order: bool = True):
    tables = self.tables
    self.encoder = FieldEncoder(tables, self.dim, embedding_init=self.embedding_init, first_order=first_order)
    self.offsets = {"user": 0, "item": len(tables.side("user")) * self.dim}   # columns in the flat [F * d] row

  def _setup_deep(self, first_order: bool = True):
    """The encoder, and an MLP over the concatenated field embeddings with one output unit."""
    self._setup_encoder(first_order=first_order)
    self.mlp = MLP(self.num_fields * self.dim, self.mlp_dims, self.dropout)
    self.predict = nn.Dense(1, kernel_init=xavier_normal)

  def _deep(self, user: dict, item: dict, train: bool) -> jnp.ndarray:
    """MLP([e_1; ...; e_F]) h `[B, C]`, from each side's first-layer part `proj` (see `MLP.project`)."""
    return self.predict(self.mlp.rest(user["proj"] + item["proj"], train))[..., 0]

  def _fields(self, side: str, ids: jnp.ndarray):
    """(embeddings `[..., F_side, d]`, weights `[..., F_side]`, flat `[..., F_side * d]`)."""
    emb, weight = self.encoder.encode(side, ids)
    return emb, weight, emb.reshape(*emb.shape[:-2], -1)

  def score_items(self, batch: dict, items: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Logits of `batch["user"] [B]` against `items [B, C]` -> `[B, C]`."""
    user = jax.tree.map(lambda a: a[:, None], self._side("user", batch["user"], train))   # [B, 1, *]
    if not train and items.size > self.num_items:   # cheaper to pass every item once, then gather
      every = self._side("item", jnp.arange(self.num_items), train)                       # [N, *]
      item = jax.tree.map(lambda a: a[items], every)                                      # [B, C, *]
    else:
      item = self._side("item", items, train)
    return self._combine(user, item, train)

  def logits(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """Logits of labelled rows `batch["user"] [B]`, `batch["item"] [B]` -> `[B]`."""
    return self.score_items(batch, batch["item"][:, None], train=train)[:, 0]

  def __call__(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """`logits(batch)`; `model.init(rng, batch)` creates every parameter through it."""
    return self.logits(batch, train=train)

  def penalty(self) -> jnp.ndarray:
    """Regulariser added to the training loss (scalar); none by default."""
    return jnp.zeros(())

  @property
  def score_bytes_per_pair(self) -> int:
    """Device bytes of one (user, item) score's activations (float32), for sizing ranking chunks."""
    return 4 * (2 * self.num_fields * self.dim + self.dim + 3 * sum(self.mlp_dims) + 8)


class DeepFM(_FieldModel):
  """DeepFM (Guo et al., "DeepFM: A Factorization-Machine based Neural Network for CTR
  Prediction", IJCAI 2017): first-order weights, the FM pairwise term and an MLP share the field
  embeddings e_f `[F, d]`:

    logit = b + sum_f w_f + sum_{f<g} <e_f, e_g> + MLP([e_1; ...; e_F]) h.
  """

  features: FeatureTables
  fields: tuple[str, ...] = ()
  dim: int = 10
  mlp_dims: tuple[int, ...] = (128, 128, 128)
  dropout: float = 0.2
  embedding_init: str = "xavier_normal"

  def setup(self):
    self._setup_deep()
    self.bias = self.param("bias", initializers.zeros, ())

  def _side(self, side: str, ids: jnp.ndarray, train: bool) -> dict:
    emb, weight, flat = self._fields(side, ids)
    return {"first": weight.sum(-1), "total": emb.sum(-2), "square": jnp.square(emb).sum((-2, -1)),
            "proj": self.mlp.project(flat, self.offsets[side], train)}

  def _combine(self, user: dict, item: dict, train: bool) -> jnp.ndarray:
    first = self.bias + user["first"] + item["first"]
    fm = fm_from_sums(user["total"] + item["total"], user["square"] + item["square"])
    return first + fm + self._deep(user, item, train)


class WideDeep(_FieldModel):
  """Wide & Deep (Cheng et al., "Wide & Deep Learning for Recommender Systems", DLRS 2016), as
  RecBole 1.2.1 builds it: the wide part is the first-order linear model over the fields (no cross
  products), the deep part an MLP over the concatenated field embeddings:

    logit = b + sum_f w_f + MLP([e_1; ...; e_F]) h.
  """

  features: FeatureTables
  fields: tuple[str, ...] = ()
  dim: int = 10
  mlp_dims: tuple[int, ...] = (32, 16, 8)
  dropout: float = 0.1
  embedding_init: str = "xavier_normal"

  def setup(self):
    self._setup_deep()
    self.bias = self.param("bias", initializers.zeros, ())

  def _side(self, side: str, ids: jnp.ndarray, train: bool) -> dict:
    _, weight, flat = self._fields(side, ids)
    return {"first": weight.sum(-1), "proj": self.mlp.project(flat, self.offsets[side], train)}

  def _combine(self, user: dict, item: dict, train: bool) -> jnp.ndarray:
    return self.bias + user["first"] + item["first"] + self._deep(user, item, train)


class FeatureMLP(_FieldModel):
  """Field embeddings concatenated -> MLP -> one output: logit = MLP([e_1; ...; e_F]) h + c.

  Also a rating regressor (train it on normalised ratings with a squared loss).
  """

  features: FeatureTables
  fields: tuple[str, ...] = ()
  dim: int = 16
  mlp_dims: tuple[int, ...] = (128, 64)
  dropout: float = 0.1
  embedding_init: str = "xavier_normal"

  def setup(self):
    self._setup_deep(first_order=False)

  def _side(self, side: str, ids: jnp.ndarray, train: bool) -> dict:
    _, _, flat = self._fields(side, ids)
    return {"proj": self.mlp.project(flat, self.offsets[side], train)}

  def _combine(self, user: dict, item: dict, train: bool) -> jnp.ndarray:
    return self._deep(user, item, train)


class DCNv2(_FieldModel):
  """DCN-v2 (Wang et al., "DCN V2: Improved Deep & Cross Network and Practical Lessons for
  Web-scale Learning to Rank Systems", WWW 2021), full-rank cross layers over x_0 = [e_1; ...; e_F]:

    stacked:  logit = MLP(Cross(x_0)) h
    parallel: logit = [Cross(x_0); MLP(x_0)] h

  RecBole 1.2.1's DCNV2 defaults; its cross kernels start N(0, 1) (`cross_init="normal"`,
  `torch.randn`, untouched by its xavier init) and its loss adds `reg_weight * sum_l ||W_l||_F`
  (`penalty`). Not copied: RecBole's batch norm after each MLP layer (its running statistics would
  make scores depend on the batch) and the mixture-of-low-rank-experts variant (`mixed=True`).
  """

  features: FeatureTables
  fields: tuple[str, ...] = ()
  dim: int = 16
  structure: str = "stacked"
  cross_layers: int = 3
  mlp_dims: tuple[int, ...] = (768, 768)
  dropout: float = 0.2
  reg_weight: float = 2.0
  cross_init: str = "normal"
  embedding_init: str = "xavier_normal"

  def __post_init__(self):
    super().__post_init__()
    if self.structure not in DCN_STRUCTURES:
      raise ConfigError(f"dcnv2: structure must be one of {DCN_STRUCTURES}, got {self.structure!r}")

  def setup(self):
    self._setup_encoder(first_order=False)
    width = self.num_fields * self.dim
    self.cross = CrossNetwork(width, self.cross_layers, weight_init=self.cross_init)
    self.mlp = MLP(width, self.mlp_dims, self.dropout)
    self.predict = nn.Dense(1, kernel_init=xavier_normal)

  def _side(self, side: str, ids: jnp.ndarray, train: bool) -> dict:
    _, _, flat = self._fields(side, ids)
    if self.structure == "parallel":
      return {"x": flat, "proj": self.mlp.project(flat, self.offsets[side], train)}
    return {"x": flat}

  def _combine(self, user: dict, item: dict, train: bool) -> jnp.ndarray:
    pairs = item["x"].shape[:-1]                                                    # (B, C)
    x0 = jnp.concatenate([jnp.broadcast_to(user["x"], (*pairs, user["x"].shape[-1])), item["x"]], -1)
    crossed = self.cross(x0)                                                        # [B, C, F d]
    if self.structure == "stacked":
      return self.predict(self.mlp(crossed, train))[..., 0]
    deep = self.mlp.rest(user["proj"] + item["proj"], train)                       # [B, C, H_L]
    return self.predict(jnp.concatenate([crossed, deep], -1))[..., 0]

  def penalty(self) -> jnp.ndarray:
    """`reg_weight * sum_l ||W_l||_F` (RecBole's `RegLoss` on the cross kernels)."""
    return self.reg_weight * self.cross.kernel_norms().sum()

  @property
  def score_bytes_per_pair(self) -> int:
    width = self.num_fields * self.dim
    return 4 * (width * (2 * self.cross_layers + 4) + 3 * sum(self.mlp_dims) + 8)
