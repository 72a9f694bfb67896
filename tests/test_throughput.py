"""benchmarks/throughput.py runs over several device counts and writes its table and JSON; time_to_quality.py
stops at its target from the metric's good side."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "throughput.py"
TIME_TO_QUALITY = SCRIPT.with_name("time_to_quality.py")


def test_throughput_table_over_device_counts(tmp_path):
  out = tmp_path / "tp.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-devices", "2", "--devices", "1", "2", "--model", "bpr",
                         "lightgcn", "--batch-size", "256", "--steps", "3", "--warmup", "1", "--eval-repeats", "1",
                         "--copy-mb", "16", "--json", str(out)], env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["device_count"] == 2 and report["copy_gb_per_s"] > 0
  rows = {(r["model"], r["devices"]): r for r in report["rows"]}
  assert set(rows) == {("bpr", 1), ("bpr", 2), ("lightgcn", 1), ("lightgcn", 2)}
  for row in rows.values():
    assert row["batch_size"] == 256 and row["step_ms"] > 0 and row["eval_users_per_s"] > 0
    assert row["examples_per_s"] == pytest.approx(256e3 / row["step_ms"])   # every row of the batch is real
  assert rows[("lightgcn", 1)]["achieved_gb_per_s"] > 0 and "achieved_gb_per_s" not in rows[("bpr", 1)]
  table = done.stdout.splitlines()
  assert table[0].startswith("# cpu x2") and len(table) == 2 + len(rows)


def test_time_to_quality_reaches_a_lower_is_better_target_from_above():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, str(TIME_TO_QUALITY), "feature_mlp", "--dataset", "synthetic", "--metric",
                         "logloss", "--target", "10", "--max-epochs", "2"], env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads(done.stdout.splitlines()[-1])
  assert report["reached"] and report["epochs"] == 1 and report["path"][0] < 10   # any logloss under 10 reaches it


def _bad_input(script: Path, *args: str) -> str:
  """Runs `script` with bad input (and no RECJAX_DATA): exit status 2 and one line `NAME: error: ...`, no traceback."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("RECJAX_DATA", None)
  done = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=120)
  assert "Traceback" not in done.stderr and done.returncode == 2, done.stderr[-3000:]
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{script.name}: error: "), done.stderr[-3000:]
  return lines[0]


def test_time_to_quality_without_data_dir_is_one_line():
  assert "no data directory" in _bad_input(TIME_TO_QUALITY, "bpr", "--target", "0.9")


def test_time_to_quality_unknown_config_key_is_one_line():
  assert "unknown config key 'model.dimm'" in _bad_input(TIME_TO_QUALITY, "bpr", "--dataset", "synthetic", "--target",
                                                         "0.9", "--set", "model.dimm=3")


def test_throughput_unknown_config_key_is_one_line(tmp_path):
  line = _bad_input(SCRIPT, "--model", "bpr", "--devices", "1", "--set", "model.dimm=3", "--json",
                    str(tmp_path / "tp.json"))
  assert "unknown config key 'model.dimm'" in line and not (tmp_path / "tp.json").exists()
