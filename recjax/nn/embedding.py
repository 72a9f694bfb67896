"""Embedding tables: `nn.Embed` with named initialisers and optional logical axis names.

A table is `[N, d]` with row 0 reserved for padding (recjax's dense ids start at 1). Lookups
(`table(ids)`) gather rows; scoring against every row uses `table.attend(h)` = `h @ E^T`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.nn import initializers

from recjax.nn.init import Initializer, xavier_normal, xavier_uniform

# Logical axis names of an embedding table; a mesh rule such as ("vocab", "model") row-shards it.
EMBED_AXES = ("vocab", "embed")

INITS = ("normal", "xavier_normal", "xavier_uniform", "uniform")


def embedding_init(init: str = "normal", *, std: float = 0.02) -> Initializer:
  """Initialiser for an `[N, d]` table.

  - "normal": N(0, std^2) (BERT / RecBole transformers, `initializer_range`);
  - "xavier_normal": N(0, 2 / (N + d)), untruncated, as `torch.nn.init.xavier_normal_` (RecBole
    BPR, Glorot & Bengio 2010);
  - "xavier_uniform": U(-a, a) with a = sqrt(6 / (N + d));
  - "uniform": U(-std, std).
  """
  if init == "normal":
    return initializers.normal(stddev=std)
  if init == "xavier_normal":
    return xavier_normal
  if init == "xavier_uniform":
    return xavier_uniform
  if init == "uniform":
    return _symmetric_uniform(std)
  raise ValueError(f"unknown embedding init {init!r}; expected one of {INITS}")


def _symmetric_uniform(scale: float) -> Initializer:
  def init(key, shape, dtype=jnp.float32):
    return initializers.uniform(scale=2 * scale)(key, shape, dtype) - scale

  return init


class Embed(nn.Embed):
  """`nn.Embed` whose stored table may hold more rows than `num_embeddings`: a row-sharded table is
  padded to a multiple of the devices it is split over (`recjax.train.mesh.pad_tables`), and the
  module reads the stored table as it is and shows the model exactly `num_embeddings` rows."""

  def setup(self):
    if self.has_variable("params", "embedding"):   # applying: the stored (maybe padded) table
      table = nn.meta.unbox(self.get_variable("params", "embedding"))   # boxed when logical_axes were given
    else:
      table = self.param("embedding", self.embedding_init, (self.num_embeddings, self.features), self.param_dtype)
    self.embedding = table[:self.num_embeddings]


def embedding_table(
  num_embeddings: int,
  features: int,
  *,
  init: str = "normal",
  std: float = 0.02,
  logical_axes: tuple[str, str] | None = None,
  param_dtype=jnp.float32,
  name: str | None = None,
) -> Embed:
  """An `Embed` of shape `[num_embeddings, features]` with a named initialiser.

  Args:
    num_embeddings: rows N, including the padding row 0.
    features: width d.
    init: one of `INITS` (see `embedding_init`).
    std: scale for "normal" / "uniform".
    logical_axes: e.g. `EMBED_AXES`; when given, the param is created boxed with
      `nn.with_logical_partitioning` (unbox with `nn.meta.unbox` before handing params to code
      that expects plain arrays). Off by default so params stay plain arrays.
    param_dtype: dtype of the table.
    name: submodule name (inside `setup`, the attribute name is used instead).

  Returns:
    The module; `module(ids [...]) -> [..., d]`, `module.attend(h [..., d]) -> [..., N]`,
    `module.embedding -> [N, d]`.
  """
  init_fn = embedding_init(init, std=std)
  if logical_axes is not None:
    init_fn = nn.with_logical_partitioning(init_fn, logical_axes)
  return Embed(
    num_embeddings=num_embeddings, features=features, embedding_init=init_fn, param_dtype=param_dtype, name=name
  )


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
  """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize); written with the squared
  norm so that a zero row (an item without text, an edgeless node) has a finite gradient, not NaN."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))
