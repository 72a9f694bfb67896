"""Layers of multi-scenario (multi-domain, multi-task) models: vectorised experts and their softmax
gates (MMoE, PLE), STAR's partitioned normalisation and star-topology linear layer (Sheng et al.,
"One Model to Serve All: Star Topology Adaptive Recommender for Multi-Domain CTR Prediction",
CIKM 2021) and per-domain residual bottleneck adapters.

Rows carry a domain id `domain [B]` in [0, K). A layer with one weight set per domain evaluates
every domain's weights on every row and keeps the row's own (`domain_dense`): K times the flops of
one shared layer and a `[B, K, ..., H]` intermediate, but plain dense matmuls, with no per-row
kernel gather (`[B, D, H]` floats) and no sorting of rows by domain. For the few (up to ~10)
domains of multi-scenario data and widths of a few hundred this is the cheaper choice. Groups of
layers (E experts, G gates or heads) are one batched matmul over a `[G, D, H]` kernel (`grouped_dense`).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.nn import initializers

from recjax.nn.dropout import Dropout
from recjax.nn.init import xavier_normal

# xavier_normal of each `[D, H]` slice of a grouped `[G, D, H]` kernel.
grouped_xavier_normal = initializers.variance_scaling(1.0, "fan_avg", "normal", in_axis=-2, out_axis=-1,
                                                      batch_axis=(0,))


def select_domain(x: jnp.ndarray, domain: jnp.ndarray) -> jnp.ndarray:
  """The row's own domain slice: `x [B, K, ...]`, `domain [B]` -> `[B, ...]`."""
  return x[jnp.arange(x.shape[0], dtype=jnp.int32), jnp.asarray(domain, jnp.int32)]


def select_heads(x: jnp.ndarray, domain: jnp.ndarray, num_tasks: int) -> jnp.ndarray:
  """The row's domain's heads (head = domain * T + task): `x [B, G, ...]` (G = K * T), `domain [B]`
  -> `[B, T, ...]`."""
  b, g = x.shape[:2]
  return select_domain(x.reshape(b, g // num_tasks, num_tasks, *x.shape[2:]), domain)


def domain_dense(x: jnp.ndarray, domain: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
  """`x kernel[d] + bias[d]` with each row's domain d: `x [B, ..., D]`, `domain [B]`, `kernel [K, D, H]`,
  `bias [K, H]` -> `[B, ..., H]`. Costs K Dense layers (every domain computed, the row's kept)."""
  domain = jnp.asarray(domain, jnp.int32)
  every = jnp.einsum("b...d,kdh->bk...h", x, kernel)                    # [B, K, ..., H]
  b = bias[domain].reshape(x.shape[0], *(1,) * (x.ndim - 2), bias.shape[-1])
  return select_domain(every, domain) + b


def grouped_dense(x: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
  """G Dense layers at once: `x [B, D]` (one input for all) or `[B, G, D]` (one per group),
  `kernel [G, D, H]`, `bias [G, H]` -> `[B, G, H]`."""
  if x.ndim == 2:
    return jnp.einsum("bd,gdh->bgh", x, kernel) + bias
  return jnp.einsum("bgd,gdh->bgh", x, kernel) + bias


def gate_weights(logits: jnp.ndarray) -> jnp.ndarray:
  """Softmax over the experts (last axis): `[..., E]` -> `[..., E]`, non-negative, summing to 1."""
  return jax.nn.softmax(logits, axis=-1)


def mix(weights: jnp.ndarray, experts: jnp.ndarray) -> jnp.ndarray:
  """Gated mixtures: `weights [B, G, E]`, `experts [B, E, H]` -> `[B, G, H]`."""
  return jnp.einsum("bge,beh->bgh", weights, experts)


def grouped_params(module: nn.Module, groups: int, in_dim: int, out_dim: int, suffix: str = ""):
  """`module`'s params `kernel{suffix} [G, D, H]` (xavier-normal per group) and `bias{suffix} [G, H]` (zeros)."""
  kernel = module.param(f"kernel{suffix}", grouped_xavier_normal, (groups, in_dim, out_dim))
  return kernel, module.param(f"bias{suffix}", initializers.zeros, (groups, out_dim))


class GroupedDense(nn.Module):
  """G independent Dense layers (`grouped_dense`): `x [B, D]` or `[B, G, D]` -> `[B, G, H]`.
  Params `kernel [G, D, H]` (xavier-normal per group), `bias [G, H]` (zeros)."""
  groups: int
  features: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return grouped_dense(x, *grouped_params(self, self.groups, x.shape[-1], self.features))


class Experts(nn.Module):
  """E independent MLPs (per hidden layer Dropout -> Dense -> ReLU, as `recjax.nn.features.MLP`),
  evaluated as one batched matmul per layer.

  Params `kernel_i [E, D_i, D_{i+1}]` (xavier-normal per expert), `bias_i [E, D_{i+1}]` (zeros).

  Attributes:
    num_experts: E.
    dims: hidden widths (H_1, ..., H_L); L >= 1.
    dropout: rate of the dropout before every Dense (each expert draws its own mask).
  """
  num_experts: int
  dims: Sequence[int]
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """`x [B, D]` (the same input to every expert) or `[B, E, D]` (one per expert) -> `[B, E, H_L]`."""
    if not self.dims:
      raise ValueError("Experts needs at least one hidden layer")
    if train and self.dropout > 0 and x.ndim == 2:   # independent masks per expert
      x = jnp.broadcast_to(x[:, None], (x.shape[0], self.num_experts, x.shape[-1]))
    for i, width in enumerate(self.dims):
      params = grouped_params(self, self.num_experts, x.shape[-1], width, suffix=f"_{i}")
      x = nn.relu(grouped_dense(Dropout(self.dropout)(x, deterministic=not train), *params))
    return x


class Gate(nn.Module):
  """G softmax gates over E experts, each from its own Dense on its input:
  `x [B, D]` (one input for all gates) or `[B, G, D]` (one per gate) -> weights `[B, G, E]`.
  Params `kernel [G, D, E]` (xavier-normal per gate), `bias [G, E]` (zeros)."""
  num_gates: int
  num_experts: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return gate_weights(grouped_dense(x, *grouped_params(self, self.num_gates, x.shape[-1], self.num_experts)))


def partitioned_stats(z: jnp.ndarray, domain: jnp.ndarray, num_domains: int,
                      weight: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Per-domain mean and (biased) variance of the rows with nonzero weight.

  Args:
    z: `[B, D]`.
    domain: `[B]` ids in [0, K).
    num_domains: K.
    weight: `[B]` or None; rows with weight 0 (padding) are left out.
  Returns:
    (mean `[K, D]`, var `[K, D]`, rows counted `[K]`), in at least float32 (as flax's BatchNorm); a domain
    without rows gets 0 and 0.
  """
  domain = jnp.asarray(domain, jnp.int32)
  z = z.astype(jnp.promote_types(z.dtype, jnp.float32))
  member = jax.nn.one_hot(domain, num_domains, dtype=z.dtype)            # [B, K]
  if weight is not None:
    member = member * (weight != 0).astype(z.dtype)[:, None]
  count = member.sum(0)                                                  # [K]
  scale = 1.0 / jnp.maximum(count, 1.0)[:, None]
  mean = (member.T @ z) * scale
  var = (member.T @ jnp.square(z - mean[domain])) * scale               # two-pass: no cancellation
  return mean, var, count


class PartitionedNorm(nn.Module):
  """STAR's partitioned normalisation (Sheng et al. 2021, Eq. 2), per row of domain d:

    PN(z) = (gamma * gamma_d) * (z - mu_d) / sqrt(var_d + eps) + (beta + beta_d).

  Training: mu_d, var_d are the mean and biased variance of the batch's rows of domain d with
  nonzero weight (`partitioned_stats`). When "batch_stats" is mutable, the running averages of the
  domains present in the batch move by an EMA (`momentum`); the others keep theirs (none move
  while initialising). Evaluation: the running averages.

  Params `gamma [D]` (ones), `beta [D]` (zeros), `domain_gamma [K, D]` (ones), `domain_beta [K, D]`
  (zeros); "batch_stats" `mean [K, D]` (zeros), `var [K, D]` (ones).
  """
  num_domains: int
  momentum: float = 0.99
  eps: float = 1e-5

  @nn.compact
  def __call__(self, z: jnp.ndarray, domain: jnp.ndarray, train: bool = False,
               weight: jnp.ndarray | None = None) -> jnp.ndarray:
    """`z [B, D]`, `domain [B]`, `weight [B]` (optional) -> `[B, D]`."""
    k, d, domain = self.num_domains, z.shape[-1], jnp.asarray(domain, jnp.int32)
    gamma = self.param("gamma", initializers.ones, (d,))
    beta = self.param("beta", initializers.zeros, (d,))
    domain_gamma = self.param("domain_gamma", initializers.ones, (k, d))
    domain_beta = self.param("domain_beta", initializers.zeros, (k, d))
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((k, d), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((k, d), jnp.float32))
    if train:
      mean, var, count = partitioned_stats(z, domain, k, weight)
      if self.is_mutable_collection("batch_stats") and not self.is_initializing():
        present = (count > 0)[:, None]
        ema = lambda old, new: jnp.where(present, self.momentum * old + (1 - self.momentum) * new, old)  # noqa: E731
        ra_mean.value = ema(ra_mean.value, jax.lax.stop_gradient(mean))
        ra_var.value = ema(ra_var.value, jax.lax.stop_gradient(var))
    else:
      mean, var = ra_mean.value, ra_var.value
    scale = gamma * domain_gamma[domain] * jax.lax.rsqrt(var[domain] + self.eps)   # [B, D]
    return ((z - mean[domain]) * scale + beta + domain_beta[domain]).astype(z.dtype)


class StarLinear(nn.Module):
  """STAR's star-topology fully connected layer (Sheng et al. 2021, Eq. 1): domain d uses the
  kernel `W * W_d` (elementwise) and bias `b + b_d`. Computed with `domain_dense` (K Dense layers'
  flops, every domain evaluated, the row's kept).

  Params `kernel [D, H]` (xavier-normal), `bias [H]` (zeros), `domain_kernel [K, D, H]` (ones),
  `domain_bias [K, H]` (zeros): untrained, every domain equals the shared layer.
  """
  num_domains: int
  features: int

  @nn.compact
  def __call__(self, x: jnp.ndarray, domain: jnp.ndarray) -> jnp.ndarray:
    """`x [B, D]`, `domain [B]` -> `[B, H]`."""
    d, h = x.shape[-1], self.features
    kernel = self.param("kernel", xavier_normal, (d, h))
    bias = self.param("bias", initializers.zeros, (h,))
    domain_kernel = self.param("domain_kernel", initializers.ones, (self.num_domains, d, h))
    domain_bias = self.param("domain_bias", initializers.zeros, (self.num_domains, h))
    return domain_dense(x, domain, kernel * domain_kernel, bias + domain_bias)


class DomainAdapter(nn.Module):
  """Per-domain residual bottleneck adapter `h + up_d(relu(down_d(h)))` (Houlsby et al., ICML 2019,
  one adapter per domain). `up_d` starts at zero, so an untrained adapter is the identity.

  Params `down_kernel [K, W, r]` (xavier-normal per domain), `down_bias [K, r]`, `up_kernel [K, r, W]`,
  `up_bias [K, W]` (zeros).

  Attributes:
    num_domains: K.
    width: W, the width of the adapted activations.
    bottleneck: r.
  """
  num_domains: int
  width: int
  bottleneck: int

  @nn.compact
  def __call__(self, h: jnp.ndarray, domain: jnp.ndarray) -> jnp.ndarray:
    """`h [B, ..., W]`, `domain [B]` -> `[B, ..., W]`."""
    if h.shape[-1] != self.width:
      raise ValueError(f"DomainAdapter: input width {h.shape[-1]} != width {self.width}")
    k, w, r = self.num_domains, self.width, self.bottleneck
    down_kernel = self.param("down_kernel", grouped_xavier_normal, (k, w, r))
    down_bias = self.param("down_bias", initializers.zeros, (k, r))
    up_kernel = self.param("up_kernel", initializers.zeros, (k, r, w))
    up_bias = self.param("up_bias", initializers.zeros, (k, w))
    return h + domain_dense(nn.relu(domain_dense(h, domain, down_kernel, down_bias)), domain, up_kernel, up_bias)


class AdaptedMLP(nn.Module):
  """A shared MLP (per hidden layer Dropout -> Dense -> ReLU; kernels xavier-normal, biases zero),
  with a per-domain `DomainAdapter` after each hidden layer when `adapter_dim > 0`.

  Params `dense_i/{kernel, bias}`, `adapter_i/...`.
  """
  num_domains: int
  dims: Sequence[int]
  dropout: float = 0.0
  adapter_dim: int = 0

  @nn.compact
  def __call__(self, x: jnp.ndarray, domain: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """`x [B, D]`, `domain [B]` -> `[B, H_L]`."""
    if not self.dims:
      raise ValueError("AdaptedMLP needs at least one hidden layer")
    for i, width in enumerate(self.dims):
      x = Dropout(self.dropout)(x, deterministic=not train)
      x = nn.relu(nn.Dense(width, kernel_init=xavier_normal, name=f"dense_{i}")(x))
      if self.adapter_dim > 0:
        x = DomainAdapter(self.num_domains, width, self.adapter_dim, name=f"adapter_{i}")(x, domain)
    return x
