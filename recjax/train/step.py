"""The compiled training step: one `jit` for one device or a mesh, and a `pmap` variant.

Options of both: mixed precision (`compute_dtype`: the loss sees the params cast to e.g. bfloat16, the
gradients, master weights and optimizer state stay float32) and, for `make_train_step`, gradient
accumulation (`accum_steps` micro-batches of one global batch, scanned on device).

Combining the gradients of parts of a batch (micro-batches, or pmap's per-device shards) weights each
part by its share of the batch's total `weight`: the result is exact for losses that are weighted means
over `weight` (every recjax loss except BERT4Rec's Cloze loss, which averages over its masked positions).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from recjax.train.mesh import DATA, batch_sharding, on_mesh, replicated
from recjax.train.state import TrainState

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
PMAP_AXIS = "devices"
# Key of a loss's metrics holding updated non-trainable collections (see `_apply`); never logged.
MODEL_STATE = "model_state"


def cast_floating(tree, dtype):
  """Floating leaves of `tree` as `dtype` (None: unchanged); the transpose of the cast makes the
  gradients of float32 params float32 again."""
  if dtype is None:
    return tree
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _cast_trainable(variables, dtype):
  """The "params" collection of model variables cast to `dtype`; the others (running statistics such as
  "batch_stats", whose small EMA steps bfloat16 would round away) keep their dtype. A tree without a "params"
  collection is cast whole."""
  if isinstance(variables, dict) and "params" in variables:
    return {**variables, "params": cast_floating(variables["params"], dtype)}
  return cast_floating(variables, dtype)


def _grad_fn(loss_fn: LossFn, compute_dtype):
  """`(params, constants, batch, rng) -> ((loss f32, metrics), grads)` with the forward pass in
  `compute_dtype` (`_cast_trainable`); the loss sees `{**params, **constants}` (constants: variable
  collections that get no gradient, kept in their own dtype)."""
  def loss_in_dtype(params, constants, batch, rng):
    loss, metrics = loss_fn({**_cast_trainable(params, compute_dtype), **constants}, batch, rng)
    return loss.astype(jnp.float32), jax.tree.map(lambda m: m.astype(jnp.float32), metrics)
  return jax.value_and_grad(loss_in_dtype, has_aux=True)


def _batch_weight(batch: dict) -> jax.Array:
  """The total `weight` of a batch (its real targets), the share a part of it carries."""
  return jnp.sum(batch["weight"]).astype(jnp.float32)


def _apply(state: TrainState, optimizer, loss, metrics, grads) -> tuple[TrainState, dict]:
  """One optimizer update; then the non-trainable collections a loss returned under `metrics["model_state"]`
  (e.g. `{"batch_stats": ...}`, running normalisation statistics, which get no gradient) replace theirs."""
  metrics = dict(metrics)
  model_state = metrics.pop(MODEL_STATE, None)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if model_state is not None:
    params = {**params, **jax.tree.map(lambda new, old: new.astype(old.dtype), model_state,
                                       {k: params[k] for k in model_state})}
  metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _accumulated(grad_fn, params, constants, batch: dict, rng, accum_steps: int, mesh: Mesh | None = None):
  """Loss, metrics and gradients of `batch` from `accum_steps` equal micro-batches (scanned, so one
  micro-batch's activations are live at a time), each weighted by its share of the total weight.

  Micro-batch a is rows a, a + A, a + 2A, ... (A = accum_steps): with the batch split over a mesh's
  `data` axis in contiguous blocks, every device then holds its share of every micro-batch, and each
  micro-batch stays split over the devices instead of being gathered onto all of them."""
  size = jax.tree.leaves(batch)[0].shape[0]
  if size % accum_steps:
    raise ValueError(f"batch of {size} rows does not split into {accum_steps} micro-batches")

  def strided(x):   # [B, ...] -> [A, B/A, ...]
    x = jnp.swapaxes(x.reshape(size // accum_steps, accum_steps, *x.shape[1:]), 0, 1)
    if mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(None, DATA)))

  micro = jax.tree.map(strided, batch)
  total = jnp.maximum(_batch_weight(batch), 1e-12)

  def body(acc, part):
    index, micro_batch = part
    (loss, metrics), grads = grad_fn(params, constants, micro_batch, jax.random.fold_in(rng, index))
    share = _batch_weight(micro_batch) / total
    return jax.tree.map(lambda a, x: a + share * x, acc, (loss, metrics, grads)), None

  (loss, metrics), grads = jax.eval_shape(grad_fn, params, constants, jax.tree.map(lambda x: x[0], micro), rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss, metrics, grads))
  (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
  return loss, metrics, grads


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, mesh: Mesh | None = None,
                    state_sharding=None, compute_dtype=None, accum_steps: int = 1, donate: bool = True,
                    constants: dict | None = None):
  """Builds `step(state, batch) -> (state, metrics)`, jitted once.

  The step key is `fold_in(state.rng, state.step)`, so a run is a pure function of the initial
  state and the batches, and resuming from a checkpoint continues the same key sequence.

  Args:
    loss_fn: `loss_fn(params, batch, rng) -> (loss, metrics)` with a scalar loss and a dict of
      scalar metrics.
    optimizer: any optax transformation.
    mesh: with a mesh (`recjax.train.mesh.make_mesh`), the batch is split over its `data` axis; the
      state is placed by `state_sharding` (default: replicated; `recjax.train.mesh.state_shardings`
      row-shards big embedding tables over `model`). The result equals the single-device step up to
      float summation order.
    state_sharding: a sharding per state leaf (a pytree matching the state), with `mesh` only.
    compute_dtype: e.g. `jnp.bfloat16`: the forward and backward passes run on params cast to it;
      params, gradients and optimizer state stay in their own dtype (float32).
    accum_steps: split each batch into this many micro-batches and sum their weighted gradients
      before one update (with a micro-batch's memory; the same update as the whole batch, except that
      each micro-batch draws its own dropout masks).
    donate: donate the input state's buffers (the caller must use the returned state; the one
      passed in is invalidated).
    constants: variable collections the loss reads beside the params but never trains (the model's
      `recjax.models.model_constants`); placed on the devices once and passed to every call as an
      argument of the compiled step, not baked into it.

  Returns:
    The jitted step; its metrics are `loss_fn`'s plus "loss" and "grad_norm" (the global L2 norm
    of the gradients), all device scalars.
  """
  grad_fn = _grad_fn(loss_fn, compute_dtype)

  def step(state: TrainState, batch: dict, constants: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    if accum_steps == 1:
      (loss, metrics), grads = grad_fn(state.params, constants, batch, rng)
    else:
      loss, metrics, grads = _accumulated(grad_fn, state.params, constants, batch, rng, accum_steps, mesh)
    return _apply(state, optimizer, loss, metrics, grads)

  donate_argnums = (0,) if donate else ()
  if mesh is None:
    return _bind_constants(jax.jit(step, donate_argnums=donate_argnums), jax.device_put(constants or {}))
  state_sharding = replicated(mesh) if state_sharding is None else state_sharding
  jitted = jax.jit(step, in_shardings=(state_sharding, batch_sharding(mesh), replicated(mesh)),
                   out_shardings=(state_sharding, replicated(mesh)), donate_argnums=donate_argnums)
  return _bind_constants(jitted, on_mesh(constants or {}, mesh))


def _bind_constants(jitted, constants):
  """`step(state, batch)` calling `jitted(state, batch, constants)`; `step.jitted` is the compiled
  function itself (for `.lower` and the like)."""
  def step(state, batch):
    return jitted(state, batch, constants)
  step.jitted, step.constants = jitted, constants
  return step


# ----------------------------------------------------------------------------- pmap

def make_pmap_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, compute_dtype=None,
                         donate: bool = True, constants: dict | None = None):
  """The step as `pmap` over the local devices: `step(state, batch) -> (state, metrics)` with the state
  replicated (`replicate`) and the batch split (`split_for_pmap`, `[D, B/D, ...]`).

  Each device takes the gradient of its shard; `lax.psum` of the gradients weighted by each shard's share
  of the batch weight gives every device the whole batch's gradient (exact for weighted-mean losses,
  where a plain `pmean` is exact only when every shard carries the same weight), so the replicas stay
  equal to each other and to `make_train_step`'s state. Dropout keys are folded with the device index:
  the masks differ from the jitted step's, which draws them for the global batch. `constants` as in
  `make_train_step`, except that they are broadcast to every device on each call.
  """
  grad_fn = _grad_fn(loss_fn, compute_dtype)

  def step(state: TrainState, batch: dict, constants: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(PMAP_AXIS))
    (loss, metrics), grads = grad_fn(state.params, constants, batch, rng)
    weight = _batch_weight(batch)
    share = weight / jnp.maximum(jax.lax.psum(weight, PMAP_AXIS), 1e-12)
    loss, metrics, grads = jax.lax.psum(jax.tree.map(lambda x: share * x, (loss, metrics, grads)), PMAP_AXIS)
    return _apply(state, optimizer, loss, metrics, grads)

  pmapped = jax.pmap(step, axis_name=PMAP_AXIS, in_axes=(0, 0, None), donate_argnums=(0,) if donate else ())
  return _bind_constants(pmapped, constants or {})


def replicate(tree, devices=None):
  """`tree` with a leading axis of one copy per local device (the pmap state layout)."""
  return flax.jax_utils.replicate(tree, devices)


def unreplicate(tree):
  """The first device's copy of a replicated tree."""
  return flax.jax_utils.unreplicate(tree)


def split_for_pmap(batch: dict, num_devices: int | None = None) -> dict:
  """`[B, ...]` host arrays as `[D, B / D, ...]`."""
  num_devices = num_devices or jax.local_device_count()
  def split(x):
    x = np.asarray(x)
    if x.shape[0] % num_devices:
      raise ValueError(f"batch of {x.shape[0]} rows does not split over {num_devices} devices")
    return x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])
  return {name: split(x) for name, x in batch.items()}
