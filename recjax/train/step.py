"""The compiled training step."""
from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from jax.sharding import Mesh

from recjax.train.mesh import batch_sharding, replicated
from recjax.train.state import TrainState

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, mesh: Mesh | None = None,
                    donate: bool = True):
  """Builds `step(state, batch) -> (state, metrics)`, jitted once.

  The step key is `fold_in(state.rng, state.step)`, so a run is a pure function of the initial
  state and the batches, and resuming from a checkpoint continues the same key sequence.

  Args:
    loss_fn: `loss_fn(params, batch, rng) -> (loss, metrics)` with a scalar loss and a dict of
      scalar metrics.
    optimizer: any optax transformation.
    mesh: with a mesh (`recjax.train.mesh.data_mesh`), the batch is split over its `data` axis and
      the state replicated; the result equals the single-device step up to float summation order.
    donate: donate the input state's buffers (the caller must use the returned state; the one
      passed in is invalidated).

  Returns:
    The jitted step; its metrics are `loss_fn`'s plus "loss" and "grad_norm" (the global L2 norm
    of the gradients), all device scalars.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, metrics), grads = grad_fn(state.params, batch, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  donate_argnums = (0,) if donate else ()
  if mesh is None:
    return jax.jit(step, donate_argnums=donate_argnums)
  state_sharding, data_sharding = replicated(mesh), batch_sharding(mesh)
  return jax.jit(step, in_shardings=(state_sharding, data_sharding), out_shardings=(state_sharding, state_sharding),
                 donate_argnums=donate_argnums)
