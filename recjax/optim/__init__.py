"""Optimizers: recjax's from-scratch Adam/AdamW and a name -> optax transformation registry."""
from __future__ import annotations

import optax

from recjax.errors import ConfigError
from recjax.optim.adam import AdamState, adam

OPTIMIZERS = ("adam", "optax_adam", "adamw", "sgd")

__all__ = ["OPTIMIZERS", "AdamState", "adam", "create_optimizer"]


def _with_l2(weight_decay: float, inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Coupled L2 decay, g <- g + wd * theta before the optimizer (torch.optim's `weight_decay`)."""
  if not weight_decay:
    return inner
  return optax.chain(optax.add_decayed_weights(weight_decay), inner)


def create_optimizer(
  name: str, learning_rate: float | optax.Schedule, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999
) -> optax.GradientTransformation:
  """The optimizer `name` with the given learning rate (float or schedule), weight decay and (Adam's
  variants) moment decay rates `b1`, `b2`.

  - "adam": `recjax.optim.adam`; a `weight_decay` is coupled L2 added to the gradient, as
    `torch.optim.Adam(weight_decay=...)` (what RecBole's `weight_decay` means);
  - "optax_adam": `optax.adam`, with the same coupled L2 (the reference implementation);
  - "adamw": `recjax.optim.adam` with decoupled weight decay (AdamW);
  - "sgd": `optax.sgd`, with coupled L2.

  Raises:
    ConfigError: unknown name.
  """
  if name == "adam":
    return _with_l2(weight_decay, adam(learning_rate, b1, b2))
  if name == "optax_adam":
    return _with_l2(weight_decay, optax.adam(learning_rate, b1, b2))
  if name == "adamw":
    return adam(learning_rate, b1, b2, weight_decay=weight_decay)
  if name == "sgd":
    return _with_l2(weight_decay, optax.sgd(learning_rate))
  raise ConfigError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
