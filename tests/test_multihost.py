"""Two local processes joined by `jax.distributed` on 127.0.0.1 (one CPU device each) train BPR-MF and
SASRec data-parallel, save orbax checkpoints together, resume from them, and agree with one process on
one device (`multihost_worker.py` is each process's program)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from recjax import experiment

sys.path.insert(0, str(Path(__file__).parent))
from multihost_worker import CONFIGS, config_for  # noqa: E402
from testutil import host_devices_env  # noqa: E402

WORKER = Path(__file__).with_name("multihost_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("multihost")
  env = host_devices_env(1)
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen([sys.executable, str(WORKER), coordinator, str(i), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for i, (p, (stdout, stderr)) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i}:\n{stderr[-4000:]}"
    assert f"process {i}: 2 devices, done" in stdout
  return out


def _rows(run: Path) -> list[dict]:
  return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_agree_with_one(two_process_run, tmp_path, name):
  reference = experiment.train({**config_for(name, 2), "devices": 1}, tmp_path, log=lambda line: None)
  run = two_process_run / name
  rows, want = _rows(run), _rows(tmp_path)
  assert [r["epoch"] for r in rows] == [0, 1]                  # epoch 1 ran after resuming from epoch 0
  for got_row, want_row in zip(rows, want):
    assert got_row["train_loss"] == pytest.approx(want_row["train_loss"], rel=1e-5)
  metrics = json.loads((run / "metrics.json").read_text())
  assert metrics["epochs_run"] == 2
  for key, value in reference["test"].items():
    assert metrics["test"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
  exp = experiment.build({**config_for(name, 2), "devices": 1})
  got, expected = experiment.restore_best_params(exp, run), experiment.restore_best_params(exp, tmp_path)
  diffs = {jax.tree_util.keystr(path): float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(expected))}
  # An attention key bias shifts every logit of a query's softmax equally, so its true gradient is 0 and
  # what it gets is rounding noise, which Adam scales up to steps of the learning rate's order: it drifts
  # apart under any change of summation order and is held to a looser bound.
  key_bias = {path: d for path, d in diffs.items() if "'key']['bias']" in path}
  assert (name == "sasrec") == bool(key_bias)
  assert max(d for path, d in diffs.items() if path not in key_bias) < 1e-5, diffs
  assert all(d < 1e-3 for d in key_bias.values()), key_bias


def test_the_command_resumes_a_two_process_run(tmp_path):
  """`recjax train --resume` over two processes: its run-folder checks come before `jax.distributed.initialize`,
  so they must not start JAX."""
  env, out = host_devices_env(1), tmp_path / "run"

  def train(*flags: str) -> None:
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "recjax.cli", "train", "bpr", "--dataset", "synthetic", "--set",
                               "model.dim=8", "--out", str(out), "--coordinator", coordinator, "--num-processes", "2",
                               "--process-id", str(i), *flags], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for i, p in enumerate(procs):
      _, stderr = p.communicate(timeout=300)
      assert p.returncode == 0, f"process {i}:\n{stderr[-4000:]}"

  train("--epochs", "1")
  train("--epochs", "2", "--resume")
  assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1]
