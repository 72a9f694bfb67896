"""Multi-host runs on JAX's own runtime (`jax.distributed`), not a home-made one.

Every process runs the same program: it builds the same data, draws the same seeded global batches and
puts only its own devices' rows on device (`recjax.train.mesh.put_global`); the mesh spans every
process's devices; orbax saves and restores each process's shards of the checkpoints; the first process
alone writes the logs and JSON files. Settings come from flags or the environment:

    RECJAX_COORDINATOR=host:port RECJAX_NUM_PROCESSES=2 RECJAX_PROCESS_ID=0 recjax train sasrec ...
    recjax train sasrec --coordinator host:port --num-processes 2 --process-id 1 ...

On clusters JAX detects itself (SLURM, Cloud TPU), `--coordinator auto` calls
`jax.distributed.initialize()` with no arguments. On CPU the processes exchange data over gloo.
"""
from __future__ import annotations

import os

import jax

from recjax.errors import ConfigError

ENV = {"coordinator": "RECJAX_COORDINATOR", "num_processes": "RECJAX_NUM_PROCESSES", "process_id": "RECJAX_PROCESS_ID"}


def distributed_settings(coordinator: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None) -> dict | None:
  """The run's `{coordinator, num_processes, process_id}`, flags over environment; None for a
  single-process run (no coordinator named)."""
  given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
  settings = {key: given[key] if given[key] is not None else os.environ.get(var) for key, var in ENV.items()}
  if settings["coordinator"] is None:
    if any(v is not None for v in settings.values()):
      raise ConfigError(f"multi-host: a process count or id was given without a coordinator "
                        f"(--coordinator or {ENV['coordinator']})")
    return None
  if settings["coordinator"] == "auto":
    return settings
  try:
    count, index = int(settings["num_processes"]), int(settings["process_id"])
  except (TypeError, ValueError):
    raise ConfigError(f"multi-host: coordinator {settings['coordinator']!r} needs an integer process count and "
                      f"id (--num-processes/--process-id or {ENV['num_processes']}/{ENV['process_id']}); "
                      f"got {settings['num_processes']!r} and {settings['process_id']!r}") from None
  if not 0 <= index < count:
    raise ConfigError(f"multi-host: process id {index} is not in [0, {count})")
  return {"coordinator": settings["coordinator"], "num_processes": count, "process_id": index}


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins the multi-host run the settings describe (waiting for every process); returns whether there
  is one. Call it before anything touches a device."""
  settings = distributed_settings(coordinator, num_processes, process_id)
  if settings is None:
    return False
  if settings["coordinator"] == "auto":
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=settings["coordinator"],
                               num_processes=settings["num_processes"], process_id=settings["process_id"])
  return True


def sync_processes(name: str) -> None:
  """Waits until every process of a multi-host run has reached the point `name` (nothing to wait for with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
