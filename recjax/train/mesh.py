"""Device meshes and shardings: the batch split over the `data` axis, big embedding tables over `model`.

A mesh is `[data, model]`. Batches are split on their leading axis over `data` (and repeated over
`model`); parameters are replicated, except embedding tables (flax `nn.Embed` leaves, named
`embedding`) of at least `shard_min_bytes`, which are row-sharded over `model` so each device holds
`rows / model` of them. The rule applies to every leaf of the training state by shape, so Adam's
moments of a sharded table are sharded alike. Under `jit` XLA's SPMD partitioner turns the lookups
and their gradients into the collectives they need; the result equals the single-device step up to
float summation order.

On a CPU host, `XLA_FLAGS=--xla_force_host_platform_device_count=N` gives N devices that XLA runs
on separate threads; one device keeps most of a step on one core, so data parallelism over host
devices is how a step uses several cores. The same code splits a batch over GPUs or TPUs, and over
the processes of a multi-host run (`recjax.train.distributed`).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"
TABLE_LEAF = "embedding"       # the param name of flax `nn.Embed` tables
DEFAULT_SHARD_MIN_BYTES = 64 << 20


def make_mesh(num_devices: int | None = None, model_parallel: int = 1) -> Mesh:
  """A `[data, model]` mesh over the first `num_devices` devices (all, across processes, by default).

  `model_parallel` devices hold one replica's row-sharded tables; `data = num_devices / model_parallel`
  replicas each take a slice of the batch. Devices are laid out process by process, so in a multi-host
  run each process's devices are neighbours on the mesh.
  """
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      hint = (f" (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} set before the process "
              "starts gives that many)" if devices[0].platform == "cpu" else "")
      raise ValueError(f"asked for {num_devices} devices; {len(devices)} are visible{hint}")
    devices = devices[:num_devices]
  if model_parallel < 1 or len(devices) % model_parallel:
    raise ValueError(f"model_parallel={model_parallel} does not divide the {len(devices)} devices")
  grid = np.array(devices).reshape(len(devices) // model_parallel, model_parallel)
  return Mesh(grid, (DATA, MODEL))


def data_mesh(num_devices: int | None = None) -> Mesh:
  """A mesh with every device on `data` (pure data parallelism)."""
  return make_mesh(num_devices, 1)


def axis_size(mesh: Mesh, axis: str) -> int:
  return mesh.shape[axis] if axis in mesh.shape else 1


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis split over `data`, the rest whole (repeated over `model`)."""
  return NamedSharding(mesh, PartitionSpec(DATA))


def check_divisible(batch_size: int, mesh: Mesh) -> None:
  """A sharded batch must split evenly; say so up front rather than inside XLA."""
  if batch_size % axis_size(mesh, DATA):
    raise ValueError(f"batch size {batch_size} does not split over {axis_size(mesh, DATA)} data-parallel devices")


def _big_matrix(leaf, mesh: Mesh, shard_min_bytes: int) -> bool:
  """Whether `leaf` is 2-D, of at least `shard_min_bytes`, on a mesh with a `model` axis: one to split by rows."""
  shape = getattr(leaf, "shape", ())
  return (axis_size(mesh, MODEL) > 1 and len(shape) == 2
          and int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize >= shard_min_bytes)


def _leaf_name(path) -> str:
  return jax.tree_util.keystr(path[-1:], simple=True)   # the leaf's own key


def _is_big_table(path, leaf, mesh: Mesh, shard_min_bytes: int) -> bool:
  """Whether `leaf` is a flax `embedding` table to split by rows (`_big_matrix`)."""
  return _leaf_name(path) == TABLE_LEAF and _big_matrix(leaf, mesh, shard_min_bytes)


def unsplit_tables(params, mesh: Mesh, shard_min_bytes: int) -> list[str]:
  """Paths of the `*_embedding` params other than `embedding` tables (feature-field tables of the CTR and
  multi-domain models) big enough to split by rows (`_big_matrix`): row-sharding does not cover them, so they
  would stay whole on every device."""
  return [jax.tree_util.keystr(path, simple=True, separator="/")
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
          if _leaf_name(path).endswith("embedding") and _leaf_name(path) != TABLE_LEAF
          and _big_matrix(leaf, mesh, shard_min_bytes)]


def table_spec(path, leaf, mesh: Mesh, shard_min_bytes: int) -> PartitionSpec:
  """Row-sharded on `model` for a big embedding table whose rows split evenly over the `model` axis
  (`pad_tables` makes them); replicated otherwise."""
  if _is_big_table(path, leaf, mesh, shard_min_bytes) and leaf.shape[0] % axis_size(mesh, MODEL) == 0:
    return PartitionSpec(MODEL)
  return PartitionSpec()


def state_shardings(tree, mesh: Mesh, shard_min_bytes: int = DEFAULT_SHARD_MIN_BYTES):
  """A `NamedSharding` per leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s), by `table_spec`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, table_spec(path, leaf, mesh, shard_min_bytes)), tree)


def pad_tables(params, mesh: Mesh, shard_min_bytes: int = DEFAULT_SHARD_MIN_BYTES):
  """Embedding tables of at least `shard_min_bytes` with zero rows appended up to a multiple of the
  `model` axis, so they split evenly (`recjax.nn.embedding.Embed` shows the model only its real rows;
  the extra rows get zero gradients). Unchanged without a `model` axis."""
  def pad(path, leaf):
    if not _is_big_table(path, leaf, mesh, shard_min_bytes):
      return leaf
    return jax.numpy.pad(leaf, ((0, -leaf.shape[0] % axis_size(mesh, MODEL)), (0, 0)))
  return jax.tree_util.tree_map_with_path(pad, params)


def create_sharded(init_fn, mesh: Mesh, shard_min_bytes: int = DEFAULT_SHARD_MIN_BYTES):
  """Runs `init_fn() -> pytree` with its outputs placed by `state_shardings`, so a table too big for one
  device is created in shards and never whole. Returns `(tree, shardings)`."""
  shardings = state_shardings(jax.eval_shape(init_fn), mesh, shard_min_bytes)
  return jax.jit(init_fn, out_shardings=shardings)(), shardings


def put_global(tree, sharding: NamedSharding):
  """Host arrays (the same global values in every process) as global arrays placed by `sharding`.

  Each process transfers only the parts its own devices hold, so the same call serves one host and a
  multi-host run (where `jax.device_put` of a host array cannot reach other processes' devices).
  """
  def put(x):
    x = np.asarray(x)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree)


def on_mesh(tree, mesh: Mesh):
  """`tree` with every array not yet placed on `mesh` replicated over it (arrays already on it, e.g.
  row-sharded tables, keep their sharding)."""
  def place(x):
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
      return x
    if isinstance(x, jax.Array) and jax.process_count() > 1:
      x = np.asarray(x)   # a single-device array of this process: the same values in every process
    return put_global(x, replicated(mesh))
  return jax.tree.map(place, tree)


def fetch(tree):
  """`jax.device_get`; in a multi-host run, arrays split across processes are gathered first."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  def get(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
  return jax.tree.map(get, tree)


def shard_shapes(x: jax.Array) -> list[tuple[int, ...]]:
  """The shape each addressable device holds of `x`."""
  return [tuple(shard.data.shape) for shard in x.addressable_shards]
