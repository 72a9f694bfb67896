"""Optimizers: recjax's from-scratch Adam/AdamW and a name -> optax transformation registry."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from recjax.errors import ConfigError
from recjax.optim.adam import AdamState, adam

OPTIMIZERS = ("adam", "optax_adam", "adamw", "sgd")

__all__ = ["OPTIMIZERS", "AdamState", "adam", "create_optimizer", "no_decay_on_biases_and_norms", "warmup_linear_decay"]


def _with_l2(weight_decay: float, inner: optax.GradientTransformation, mask: Any = None
             ) -> optax.GradientTransformation:
  """Coupled L2 decay, g <- g + wd * theta before the optimizer (torch.optim's `weight_decay`), where `mask`."""
  if not weight_decay:
    return inner
  return optax.chain(optax.add_decayed_weights(weight_decay, mask), inner)


def create_optimizer(
  name: str, learning_rate: float | optax.Schedule, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
  eps: float = 1e-8, decay_mask: Any = None, clip_norm: float | None = None,
) -> optax.GradientTransformation:
  """The optimizer `name` with the given learning rate (float or schedule), weight decay and (Adam's
  variants) moment decay rates `b1`, `b2` and `eps`.

  - "adam": `recjax.optim.adam`; a `weight_decay` is coupled L2 added to the gradient, as
    `torch.optim.Adam(weight_decay=...)` (what RecBole's `weight_decay` means);
  - "optax_adam": `optax.adam`, with the same coupled L2 (the reference implementation);
  - "adamw": `recjax.optim.adam` with decoupled weight decay (AdamW);
  - "sgd": `optax.sgd`, with coupled L2.
  `decay_mask` (a params-shaped pytree of bools, or a function of the params giving one) limits the weight
  decay to some parameters; `clip_norm` first scales the gradient to at most that global L2 norm.

  Raises:
    ConfigError: unknown name.
  """
  if name == "adam":
    optimizer = _with_l2(weight_decay, adam(learning_rate, b1, b2, eps), decay_mask)
  elif name == "optax_adam":
    optimizer = _with_l2(weight_decay, optax.adam(learning_rate, b1, b2, eps), decay_mask)
  elif name == "adamw":
    optimizer = adam(learning_rate, b1, b2, eps, weight_decay=weight_decay, mask=decay_mask)
  elif name == "sgd":
    optimizer = _with_l2(weight_decay, optax.sgd(learning_rate), decay_mask)
  else:
    raise ConfigError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
  return optax.chain(optax.clip_by_global_norm(clip_norm), optimizer) if clip_norm else optimizer


def warmup_linear_decay(learning_rate: float, warmup_steps: int, decay_steps: int | None) -> optax.Schedule:
  """lr(t) for update t = 0, 1, ...: `learning_rate * t / warmup_steps` while t < warmup_steps, then
  `learning_rate * max(0, 1 - t / decay_steps)` (constant with `decay_steps` None). BERT's (and BERT4Rec's)
  schedule: the decay is counted from step 0, so it has already begun when the warm-up ends."""
  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    after = learning_rate if decay_steps is None else learning_rate * jnp.maximum(0.0, 1.0 - t / decay_steps)
    return jnp.where(t < warmup_steps, learning_rate * t / max(warmup_steps, 1), after)
  return schedule


_NORM_PARAMS = frozenset({"scale", "gamma", "beta", "domain_gamma", "domain_beta"})


def no_decay_on_biases_and_norms(params) -> Any:
  """A weight-decay mask: False on biases and normalisation parameters (a leaf whose name holds "bias", or
  named "scale", or STAR's partitioned normalisation "gamma", "beta", "domain_gamma", "domain_beta"), True
  elsewhere; BERT's optimizer excludes the same ("bias", "LayerNorm")."""
  def decays(path, _):
    name = jax.tree_util.keystr(path[-1:], simple=True)   # the leaf's own key
    return not ("bias" in name or name in _NORM_PARAMS)
  return jax.tree_util.tree_map_with_path(decays, params)
