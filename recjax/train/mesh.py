"""Device meshes for data parallelism: the batch is split over the `data` axis, the state replicated.

On a CPU host, `XLA_FLAGS=--xla_force_host_platform_device_count=N` gives N devices that XLA runs
on separate threads; one device keeps most of a step on one core, so data parallelism over host
devices is how a step uses several cores. The same code splits a batch over GPUs or TPUs.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def data_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (all by default), axis name `data`."""
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f"asked for {num_devices} devices; {len(devices)} are visible")
    devices = devices[:num_devices]
  return Mesh(np.array(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis split over `data`, the rest whole."""
  return NamedSharding(mesh, PartitionSpec("data"))


def check_divisible(batch_size: int, mesh: Mesh) -> None:
  """A sharded batch must split evenly; say so up front rather than inside XLA."""
  if batch_size % mesh.devices.size:
    raise ValueError(f"batch size {batch_size} does not split over {mesh.devices.size} devices")
