"""The training state: one pytree holding everything a train step reads and writes."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax


@flax.struct.dataclass
class TrainState:
  """Step counter, parameters, optimizer state and base PRNG key.

  Attributes:
    step: int32 scalar, the number of optimizer updates applied so far.
    params: the model parameters (any pytree).
    opt_state: the optimizer state for `params`.
    rng: raw uint32 PRNG key `[2]`; it never changes, step keys are `fold_in(rng, step)`.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def create_train_state(params, optimizer: optax.GradientTransformation, rng) -> TrainState:
  """Returns the state at step 0.

  Args:
    params: the initial parameters.
    optimizer: the transformation whose `init` builds `opt_state`.
    rng: a PRNG key (raw uint32 or typed) or an int seed; stored as a raw uint32 key so that
      orbax can checkpoint it.
  """
  if isinstance(rng, (int, np.integer)):   # a seed (a numpy integer too, e.g. from a config array)
    rng = jax.random.PRNGKey(int(rng))
  elif jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    rng=jnp.asarray(rng, jnp.uint32))
