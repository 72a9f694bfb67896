"""Multi-scenario (multi-domain, multi-task) CTR models: a domain-aware MLP baseline, Shared-Bottom,
MMoE, PLE and STAR.

Rows are labelled (user, item) pairs of one domain (scenario): `batch["user"] [B]`, `batch["item"] [B]`,
`batch["domain"] [B]` in [0, num_domains) (absent: domain 0), and optionally `batch["weight"] [B]`
(used only by STAR's partitioned normalisation, whose statistics skip weight-0 padding rows). Each
row's fields are embedded by `recjax.nn.features.FieldEncoder` and flattened `[B, F * dim]`.
`logits(batch, train=False) -> [B, T]` gives one logit per task (T = num_tasks: click, like, ...).

Heads. A model with per-domain outputs has one head per (domain, task) pair, head index
`domain * num_tasks + task`, G = num_domains * num_tasks heads in all; every row evaluates all G
heads and keeps its domain's T (`recjax.nn.multidomain.select_heads`), which costs num_domains
times one domain's towers (small) and avoids gathering per-row weights.

Parameter groups (the fine-tuning code freezes by name; `param_group` classifies a path):
  - "adapter": any path component starting with `adapter_` (per-domain `DomainAdapter`s, present
    when `adapter_dim > 0`; untrained they are the identity);
  - "domain": else any component starting with `domain_`: everything that belongs to one domain
    or head (towers `domain_towers`, outputs `domain_output`, per-head gates `domain_gate*`,
    head-specific experts `domain_experts_*`, STAR's `domain_kernel` / `domain_bias`,
    PartitionedNorm's `domain_gamma` / `domain_beta`, and the domain-id tables `domain_embedding`,
    whose row d serves domain d only);
  - "shared": the rest (field embeddings `encoder`, shared MLPs / experts / gates, STAR's shared
    kernels, the auxiliary network).

Models (paper defaults scaled down to small widths):
  - `DomainMLP`: MLP([fields; domain embedding]) -> T logits shared by all domains (one model for
    all; trained on one domain's rows, one model per domain).
  - `SharedBottom`: shared MLP bottom, a tower and an output per head (Caruana 1997).
  - `MMoE`: shared experts, a softmax gate per head, a tower per head (Ma et al., KDD 2018).
  - `PLE`: progressive layered extraction with customized gate control (Tang et al., RecSys 2020).
  - `STAR`: partitioned normalisation, a star-topology FCN and an auxiliary network (Sheng et al.,
    CIKM 2021).
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from recjax.data.features import FeatureTables
from recjax.errors import ConfigError
from recjax.models.ctr import FieldSelection
from recjax.nn.dropout import Dropout
from recjax.nn.embedding import Embed
from recjax.nn.embedding import embedding_init as _embedding_init
from recjax.nn.features import MLP, FieldEncoder, xavier_normal
from recjax.nn.multidomain import (
  AdaptedMLP,
  DomainAdapter,
  Experts,
  Gate,
  GroupedDense,
  PartitionedNorm,
  StarLinear,
  mix,
  select_heads,
)

PARAM_GROUPS = ("adapter", "domain", "shared")


def param_group(path: tuple[str, ...]) -> str:
  """"adapter", "domain" or "shared" for a flattened parameter path, e.g. a key of
  `flax.traverse_util.flatten_dict(variables["params"])` (see the module docstring)."""
  names = [str(getattr(p, "key", p)) for p in path]   # plain strings or jax tree-path entries
  if any(n.startswith("adapter_") for n in names):
    return "adapter"
  if any(n.startswith("domain_") for n in names):
    return "domain"
  return "shared"


class _MultiDomainModel(FieldSelection, nn.Module):
  """Shared plumbing: field selection, the encoder, the row's domain, adapters' bookkeeping."""

  multidomain: ClassVar[bool] = True

  features: FeatureTables
  num_domains: int = 1
  num_tasks: int = 1
  fields: tuple[str, ...] = ()
  dim: int = 16
  embedding_init: str = "xavier_normal"
  dropout: float = 0.1
  adapter_dim: int = 0

  def __post_init__(self):
    super().__post_init__()
    self.check_features()
    name = type(self).__name__
    if self.num_domains < 1 or self.num_tasks < 1:
      raise ConfigError(f"{name}: num_domains and num_tasks must be >= 1, got {self.num_domains}, {self.num_tasks}")
    if self.adapter_dim < 0:
      raise ConfigError(f"{name}: adapter_dim must be >= 0, got {self.adapter_dim}")

  @property
  def num_heads(self) -> int:
    """G = num_domains * num_tasks; head = domain * num_tasks + task."""
    return self.num_domains * self.num_tasks

  @property
  def in_dim(self) -> int:
    """Width of the flattened field embeddings F * dim."""
    return self.num_fields * self.dim

  def _setup_encoder(self):
    self.encoder = FieldEncoder(self.tables, self.dim, embedding_init=self.embedding_init, first_order=False)

  def _inputs(self, batch: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(flat field embeddings `[B, F * dim]`, domain `[B]`) of the rows."""
    emb, _ = self.encoder(batch["user"], batch["item"])
    domain = batch["domain"] if "domain" in batch else jnp.zeros_like(batch["user"])
    return emb.reshape(emb.shape[0], -1), domain.astype(jnp.int32)

  def _domain_table(self) -> Embed:
    # recjax's Embed: a row-sharded run may store the table padded (recjax.train.mesh.pad_tables)
    return Embed(self.num_domains, self.dim, embedding_init=_embedding_init(self.embedding_init),
                 name="domain_embedding")

  def logits(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """Logits of the rows' tasks `[B, T]`."""
    raise NotImplementedError

  def __call__(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """`logits(batch)`; `model.init(rng, batch)` creates every parameter through it."""
    return self.logits(batch, train=train)

  def penalty(self) -> jnp.ndarray:
    """Regulariser added to the training loss (scalar); none."""
    return jnp.zeros(())

  def _bytes(self, *widths: int) -> int:
    """float32 bytes of one row: fields (embeddings and their flat copy) plus the given activations,
    three times (forward value, dropout copy, backward cotangent)."""
    return 4 * (2 * self.in_dim + 3 * sum(widths) + 8)


class DomainMLP(_MultiDomainModel):
  """The single-model baseline: logits = MLP([e_1; ...; e_F; domain embedding]) W + b, one Dense with
  T outputs shared by every domain (`domain_input=False` leaves the domain embedding out).

  Params: `encoder`, `domain_embedding` (domain), `mlp/dense_i`, `mlp/adapter_i` (adapter), `output`.
  """

  mlp_dims: tuple[int, ...] = (64, 32)
  domain_input: bool = True

  def setup(self):
    self._setup_encoder()
    if self.domain_input:
      self.domain_embedding = self._domain_table()
    self.mlp = AdaptedMLP(self.num_domains, self.mlp_dims, self.dropout, self.adapter_dim)
    self.output = nn.Dense(self.num_tasks, kernel_init=xavier_normal)

  def logits(self, batch: dict, train: bool = False) -> jnp.ndarray:
    x, domain = self._inputs(batch)
    if self.domain_input:
      x = jnp.concatenate([x, self.domain_embedding(domain)], -1)
    return self.output(self.mlp(x, domain, train))

  @property
  def score_bytes_per_pair(self) -> int:
    return self._bytes(self.dim, *self.mlp_dims, self.num_tasks)


class SharedBottom(_MultiDomainModel):
  """Shared-Bottom: a shared MLP bottom h = MLP(x), then per head a tower and one output:
  logit_g = tower_g(h) w_g + c_g.

  Params: `encoder`, `bottom/dense_i`, `bottom/adapter_i` (adapter), `domain_towers`, `domain_output`
  (domain: `Experts` / `GroupedDense` with one group per head).
  """

  bottom_dims: tuple[int, ...] = (64,)
  tower_dims: tuple[int, ...] = (32,)

  def setup(self):
    self._setup_encoder()
    self.bottom = AdaptedMLP(self.num_domains, self.bottom_dims, self.dropout, self.adapter_dim)
    self.domain_towers = Experts(self.num_heads, self.tower_dims, self.dropout)
    self.domain_output = GroupedDense(self.num_heads, 1)

  def logits(self, batch: dict, train: bool = False) -> jnp.ndarray:
    x, domain = self._inputs(batch)
    h = self.bottom(x, domain, train)                                          # [B, H]
    heads = self.domain_output(self.domain_towers(h, train))[..., 0]           # [B, G]
    return select_heads(heads, domain, self.num_tasks)

  @property
  def score_bytes_per_pair(self) -> int:
    return self._bytes(*self.bottom_dims, self.num_heads * (sum(self.tower_dims) + 1))


class MMoE(_MultiDomainModel):
  """Multi-gate Mixture-of-Experts (Ma et al., "Modeling Task Relationships in Multi-task Learning
  with Multi-gate Mixture-of-Experts", KDD 2018): E shared experts f_e(x); per head g a softmax gate
  w_g(x) = softmax(x W_g + b_g) `[E]` and a tower: logit_g = tower_g(sum_e w_ge f_e(x)).

  Params: `encoder`, `experts` (shared `Experts`), `adapter_0` (adapter, on every expert's output),
  `domain_gate` (`Gate` with G gates), `domain_towers`, `domain_output`.
  """

  num_experts: int = 4
  expert_dims: tuple[int, ...] = (64,)
  tower_dims: tuple[int, ...] = (32,)

  def setup(self):
    self._setup_encoder()
    self.experts = Experts(self.num_experts, self.expert_dims, self.dropout)
    self.adapter = [DomainAdapter(self.num_domains, self.expert_dims[-1], self.adapter_dim)] if self.adapter_dim else []
    self.domain_gate = Gate(self.num_heads, self.num_experts)
    self.domain_towers = Experts(self.num_heads, self.tower_dims, self.dropout)
    self.domain_output = GroupedDense(self.num_heads, 1)

  def logits(self, batch: dict, train: bool = False) -> jnp.ndarray:
    x, domain = self._inputs(batch)
    experts = self.experts(x, train)                                           # [B, E, H]
    for adapter in self.adapter:
      experts = adapter(experts, domain)
    mixed = mix(self.domain_gate(x), experts)                                  # [B, G, H]
    heads = self.domain_output(self.domain_towers(mixed, train))[..., 0]       # [B, G]
    return select_heads(heads, domain, self.num_tasks)

  @property
  def score_bytes_per_pair(self) -> int:
    g = self.num_heads
    return self._bytes(self.num_experts * sum(self.expert_dims), g * self.num_experts,
                       g * (self.expert_dims[-1] + sum(self.tower_dims) + 1))


class PLE(_MultiDomainModel):
  """Progressive Layered Extraction (Tang et al., "Progressive Layered Extraction (PLE): A Novel
  Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020).

  Level l has `shared_experts` shared experts and `specific_experts` experts per head. Head g's
  gate (on head g's input) mixes its own specific experts with the shared ones (Customized Gate
  Control); in non-final levels a shared gate (on the shared input) mixes every expert into the
  next level's shared input. Level 1's inputs are all x; the last level's head outputs feed a
  tower and an output per head.

  Params per level l: `experts_l` (shared), `domain_experts_l` (head-specific, G * S of them, head g's
  are g * S .. g * S + S - 1), `domain_gate_l` (G gates over [own specific; shared]), `gate_l`
  (shared gate over [all specific; shared], non-final levels), `adapter_l` (adapter, on the shared
  experts' outputs); then `domain_towers`, `domain_output`.
  """

  num_levels: int = 2
  shared_experts: int = 2
  specific_experts: int = 1
  expert_dims: tuple[int, ...] = (64,)
  tower_dims: tuple[int, ...] = (32,)

  def __post_init__(self):
    super().__post_init__()
    if self.num_levels < 1 or self.shared_experts < 0 or self.specific_experts < 0 \
       or self.shared_experts + self.specific_experts < 1:
      raise ConfigError("ple: needs num_levels >= 1 and at least one shared or specific expert")

  def setup(self):
    self._setup_encoder()
    g, s, e, levels = self.num_heads, self.specific_experts, self.shared_experts, range(self.num_levels)
    self.experts = [Experts(e, self.expert_dims, self.dropout) for _ in levels] if e else []
    self.domain_experts = [Experts(g * s, self.expert_dims, self.dropout) for _ in levels] if s else []
    self.domain_gate = [Gate(g, s + e) for _ in levels]
    self.gate = [Gate(1, g * s + e) for _ in levels[:-1]]
    self.adapter = [DomainAdapter(self.num_domains, self.expert_dims[-1], self.adapter_dim)
                    for _ in levels] if self.adapter_dim and e else []
    self.domain_towers = Experts(g, self.tower_dims, self.dropout)
    self.domain_output = GroupedDense(g, 1)

  def _level(self, l: int, heads: jnp.ndarray, shared: jnp.ndarray, domain: jnp.ndarray, train: bool):
    """One extraction level: head inputs `[B, D]` (level 1) or `[B, G, D]`, shared input `[B, D]` ->
    (head outputs `[B, G, H]`, next shared input `[B, H]` or None after the last level)."""
    g, s, e = self.num_heads, self.specific_experts, self.shared_experts
    weights = self.domain_gate[l](heads)                                       # [B, G, S + E]
    groups, out = [], 0.0                                                      # every expert's output, head outputs
    if s:
      inputs = heads if heads.ndim == 2 else jnp.repeat(heads, s, axis=1)     # [B, D] or [B, G * S, D]
      specific = self.domain_experts[l](inputs, train)                         # [B, G * S, H]
      own = specific.reshape(specific.shape[0], g, s, -1)                      # [B, G, S, H]
      out = out + jnp.einsum("bgs,bgsh->bgh", weights[..., :s], own)
      groups.append(specific)
    if e:
      common = self.experts[l](shared, train)                                  # [B, E, H]
      if self.adapter:
        common = self.adapter[l](common, domain)
      out = out + mix(weights[..., s:], common)
      groups.append(common)
    if l == self.num_levels - 1:
      return out, None
    return out, mix(self.gate[l](shared), jnp.concatenate(groups, 1))[:, 0]   # [B, H]

  def logits(self, batch: dict, train: bool = False) -> jnp.ndarray:
    x, domain = self._inputs(batch)
    heads, shared = x, x
    for l in range(self.num_levels):
      heads, shared = self._level(l, heads, shared, domain, train)
    out = self.domain_output(self.domain_towers(heads, train))[..., 0]        # [B, G]
    return select_heads(out, domain, self.num_tasks)

  @property
  def score_bytes_per_pair(self) -> int:
    g, s, e = self.num_heads, self.specific_experts, self.shared_experts
    per_level = (g * s + e) * sum(self.expert_dims) + g * (s + e) + (g * s + e) + (g + 1) * self.expert_dims[-1]
    return self._bytes(self.num_levels * per_level + g * s * self.in_dim, g * (sum(self.tower_dims) + 1))


class STAR(_MultiDomainModel):
  """Star Topology Adaptive Recommender (Sheng et al., "One Model to Serve All: Star Topology
  Adaptive Recommender for Multi-Domain CTR Prediction", CIKM 2021):

    z = PN_d([e_1; ...; e_F])                         partitioned normalisation (per domain)
    h_{i+1} = relu(StarLinear_i(h_i, d))              kernel W_i * W_{i,d}, bias b_i + b_{i,d}
    logit = StarLinear_out(h_L, d) + aux([domain embedding; e_1; ...; e_F])

  The auxiliary network is a small shared MLP whose T logits are added to the star network's.
  Training normalises with the batch's per-domain statistics (`batch["weight"]` 0 rows left out)
  and, with "batch_stats" mutable, updates the per-domain running averages used in evaluation.

  Params: `encoder`, `norm` (`gamma`, `beta` shared; `domain_gamma`, `domain_beta` domain), `star_i`
  and `star_output` (`kernel`, `bias` shared; `domain_kernel`, `domain_bias` domain), `adapter_i`
  (adapter, after each hidden star layer), `domain_embedding` (domain), `aux`, `aux_output`.
  "batch_stats": `norm/{mean, var}` `[K, F * dim]`.
  """

  star_dims: tuple[int, ...] = (64, 32)
  aux_dims: tuple[int, ...] = (32,)
  norm_momentum: float = 0.99

  def setup(self):
    self._setup_encoder()
    k = self.num_domains
    self.norm = PartitionedNorm(k, momentum=self.norm_momentum)
    self.star = [StarLinear(k, w) for w in self.star_dims]
    self.star_output = StarLinear(k, self.num_tasks)
    self.drops = [Dropout(self.dropout) for _ in range(len(self.star_dims) + 1)]
    self.adapter = [DomainAdapter(k, w, self.adapter_dim) for w in self.star_dims] if self.adapter_dim else []
    self.domain_embedding = self._domain_table()
    self.aux = MLP(self.in_dim + self.dim, self.aux_dims, self.dropout)
    self.aux_output = nn.Dense(self.num_tasks, kernel_init=xavier_normal)

  def logits(self, batch: dict, train: bool = False) -> jnp.ndarray:
    x, domain = self._inputs(batch)
    h = self.norm(x, domain, train, batch["weight"] if "weight" in batch else None)
    for i, layer in enumerate(self.star):
      h = nn.relu(layer(self.drops[i](h, deterministic=not train), domain))
      if self.adapter:
        h = self.adapter[i](h, domain)
    star = self.star_output(self.drops[-1](h, deterministic=not train), domain)        # [B, T]
    aux = self.aux_output(self.aux(jnp.concatenate([self.domain_embedding(domain), x], -1), train))
    return star + aux

  @property
  def score_bytes_per_pair(self) -> int:
    k = self.num_domains
    return self._bytes(self.in_dim, k * (sum(self.star_dims) + self.num_tasks), *self.star_dims,
                       self.dim, *self.aux_dims, 2 * self.num_tasks)
