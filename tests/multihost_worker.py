"""One process of the two-process run in `test_multihost.py`: joins `jax.distributed` on loopback, then
trains BPR-MF and SASRec for one epoch into `OUT/<model>`, and resumes each for a second epoch from the
orbax checkpoint the two processes saved together. The second process lags the first at each of its (skipped)
run-file writes, so that a file touched by the wrong process shows in the run folder every time.

    python tests/multihost_worker.py COORDINATOR PROCESS_ID OUT
"""
from __future__ import annotations

import sys
import time

from recjax.train import distributed

CONFIGS = {   # small enough for CI; shared with the single-process reference run of the test
    "bpr": ["batch_size=512", "model.dim=16", "learning_rate=0.01"],
    "sasrec": ["batch_size=64", "model.dim=16", "model.ffn_dim=32", "model.num_blocks=1", "learning_rate=0.005"],
}


def config_for(name: str, epochs: int) -> dict:
  from recjax.config import apply_overrides, default_config

  config = apply_overrides(default_config(name), CONFIGS[name])
  config.update(dataset="synthetic", epochs=epochs, devices=None)
  return config


def _lag_writes(experiment) -> None:
  """Half a second before each of this process's `write_json` calls (which write nothing outside process 0)."""
  write_json = experiment.write_json

  def lagging(path, obj) -> None:
    time.sleep(0.5)
    write_json(path, obj)

  experiment.write_json = lagging


def main(coordinator: str, process_id: int, out: str) -> None:
  distributed.initialize(coordinator, 2, process_id)
  import jax

  from recjax import experiment

  assert jax.process_count() == 2, jax.process_count()
  if process_id == 1:
    _lag_writes(experiment)
  for name in CONFIGS:
    experiment.train(config_for(name, 1), f"{out}/{name}", log=lambda line: None)
    experiment.train(config_for(name, 2), f"{out}/{name}", resume=True, log=lambda line: None)
  print(f"process {process_id}: {jax.device_count()} devices, done")


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
