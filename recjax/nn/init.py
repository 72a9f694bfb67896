"""Parameter initialisers shared by the models (beyond `jax.nn.initializers`)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.nn import initializers

Initializer = Callable[..., jnp.ndarray]

# torch.nn.init.xavier_normal_ / xavier_uniform_ on an [in, out] kernel or an [N, d] table (untruncated):
# N(0, 2 / (fan_in + fan_out)) and U(-a, a) with a = sqrt(6 / (fan_in + fan_out)).
xavier_normal = initializers.variance_scaling(1.0, "fan_avg", "normal")
xavier_uniform = initializers.variance_scaling(1.0, "fan_avg", "uniform")


def fan_in_uniform(fan_in):
  """U(-b, b) with b = 1 / sqrt(fan_in): PyTorch's default for `nn.Linear` and `nn.Conv*` weights and
  biases alike. `fan_in` is a number, or an array broadcast to the parameter's shape (one fan-in per
  entry, e.g. convolutions of several heights packed into one matrix)."""
  bound = 1.0 / np.sqrt(np.asarray(fan_in, np.float64))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -1.0, 1.0) * jnp.asarray(np.broadcast_to(bound, shape), dtype)

  return init
