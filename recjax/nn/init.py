"""Parameter initialisers shared by the models (beyond `jax.nn.initializers`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def fan_in_uniform(fan_in):
  """U(-b, b) with b = 1 / sqrt(fan_in): PyTorch's default for `nn.Linear` and `nn.Conv*` weights and
  biases alike. `fan_in` is a number, or an array broadcast to the parameter's shape (one fan-in per
  entry, e.g. convolutions of several heights packed into one matrix)."""
  bound = 1.0 / np.sqrt(np.asarray(fan_in, np.float64))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -1.0, 1.0) * jnp.asarray(np.broadcast_to(bound, shape), dtype)

  return init
