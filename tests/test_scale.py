"""Sharded training and evaluation equal the single-device paths (4 CPU devices, in a subprocess:
`scale_checks.py`), and the mesh, padding and multi-host settings behave."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testutil import host_devices_env

from recjax.errors import ConfigError
from recjax.train import distributed
from recjax.train.mesh import MODEL, make_mesh, pad_tables, table_spec

CHECKS = Path(__file__).with_name("scale_checks.py")
TOLERANCE = 1e-5      # the bar: parameters after 20 steps within 1e-5 of the single-device step


@pytest.fixture(scope="module")
def checks() -> dict:
  env = host_devices_env(4)
  done = subprocess.run([sys.executable, str(CHECKS)], env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-4000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["dp_bpr", "dp_sasrec", "rows_bpr", "rows_sasrec"])
def test_mesh_step_equals_single_device(checks, name):
  got = checks[name]
  assert got["steps"] == 20
  assert got["params_diff"] < TOLERANCE and got["opt_state_diff"] < TOLERANCE, got
  assert got["loss"] == pytest.approx(got["reference_loss"], rel=1e-5)


def test_tables_are_row_sharded_over_the_model_axis(checks):
  # data parallel: every device holds the whole (unpadded) table
  assert checks["dp_bpr"]["table_shards"] == [[501, 16]] * 4
  # 2 x 2 mesh: 501 rows padded to 502, half on each model device (each half on both data replicas)
  assert checks["rows_bpr"]["table_shape"] == [502, 16] and checks["rows_bpr"]["table_shards"] == [[251, 16]] * 4
  # 1 x 4 mesh: 501 -> 504 rows, a quarter each
  assert checks["rows_sasrec"]["table_shape"] == [504, 16] and checks["rows_sasrec"]["table_shards"] == [[126, 16]] * 4


@pytest.mark.parametrize("name", ["pmap_bpr", "pmap_sasrec"])
def test_pmap_step_equals_single_device(checks, name):
  got = checks[name]
  assert got["params_diff"] < TOLERANCE and got["replica_spread"] == 0.0, got


@pytest.mark.parametrize("name", ["accum_bpr", "accum_sasrec"])
def test_gradient_accumulation_equals_the_whole_batch(checks, name):
  assert checks[name]["params_diff"] < TOLERANCE, checks[name]


def test_gradient_accumulation_on_a_mesh_keeps_each_micro_batch_split(checks):
  got = checks["accum_mesh_bpr"]
  assert got["params_diff"] < TOLERANCE and got["all_gathers"] == 0, got


def test_bfloat16_compute_keeps_float32_weights_and_state(checks):
  got = checks["bf16_sasrec"]
  assert got["state_float_dtypes"] == ["float32"]
  assert math.isfinite(got["loss"]) and got["loss"] == pytest.approx(got["reference_loss"], abs=0.05)
  assert got["params_diff"] > 1e-4          # the forward pass did run in bfloat16


def test_sharded_evaluation_returns_exactly_the_single_device_metrics(checks):
  for name in ("bpr", "sasrec"):
    runs = checks["eval"][name]
    assert set(runs) == {"single", "4x1", "2x2", "1x4"}
    assert runs["single"]["ndcg@10"] > 0
    for layout, metrics in runs.items():
      assert metrics == runs["single"], (name, layout)


def test_users_split_over_devices_are_ranked_without_collectives(checks):
  assert set(checks["eval_collectives"].values()) == {0}, checks["eval_collectives"]


def test_merged_ranking_equals_the_single_device_one(checks):
  assert checks["merged_hits"] == {"37/10/4": True, "37/40/2": True, "9/12/4": True, "64/5/2": True}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity to run on one core")
def test_merged_ranking_in_many_chunks_on_one_core():
  """1,500 chunks of the merged full ranking on two host devices sharing one core: sent back to back, they
  deadlocked XLA:CPU's collectives (it aborts after its 40 s rendezvous timeout) in 7 test runs of 7. Fewer
  chunks, and tcmalloc's timing, let some runs through, so the check runs many chunks under the system malloc.
  Sent one at a time, they equal one device's ranking."""
  env = {name: value for name, value in host_devices_env(2).items() if name != "LD_PRELOAD"}
  done = subprocess.run([sys.executable, str(CHECKS), "merged_eval_in_chunks", "--one-core"], env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-4000:]
  got = json.loads(done.stdout.strip().splitlines()[-1])["merged_eval_in_chunks"]
  assert got["merged"] == pytest.approx(got["single"], rel=1e-6)
  assert got["single"]["recall@600"] > 0.3   # k=600 of 1,500 items: a real ranking, not empty lists


def test_a_table_too_big_to_replicate_trains_in_quarters(checks):
  got = checks["big_table"]
  assert got["table_shape"] == [4_000_004, 64]                       # 4M items + padding row, padded to 4 | rows
  assert got["table_shards"] == [[1_000_001, 64]] * 4                # each device holds a quarter
  assert got["mu_shards"] == [[1_000_001, 64]] * 4                   # Adam's moments sharded alike
  assert got["user_shards"] == [[1000, 64]] * 4                      # a small table stays replicated
  assert all(math.isfinite(x) for x in got["losses"]) and len(got["losses"]) == 3


def test_cpu_runs_split_batches_only_for_attention_models(checks):
  assert checks["default_devices"] == {"bpr": 1, "neumf": 1, "sasrec": 4, "bert4rec": 4, "bpr cpu_devices=None": 4,
                                       "bpr cpu_devices=8": 4, "bpr model_parallel=2": 4}


# ----------------------------------------------------------------------------- in process, one device

def test_table_spec_and_padding_rules():
  mesh = make_mesh(1, 1)
  table = jnp.zeros((7, 4))
  path = (jax.tree_util.DictKey("embedding"),)
  assert table_spec(path, table, mesh, 0) == jax.sharding.PartitionSpec()     # no model axis: replicated
  assert pad_tables({"embedding": table}, mesh, 0)["embedding"].shape == (7, 4)


def test_padded_table_shows_the_model_its_real_rows():
  from recjax import tasks
  from recjax.models import create_model, init_params

  model = create_model("bpr", num_users=5, num_items=7, dim=4)
  params = init_params(model, jax.random.PRNGKey(0))
  padded = jax.tree.map(lambda x: jnp.pad(x, ((0, 1), (0, 0))), params)   # what pad_tables does for 2 devices
  assert model.apply(padded, method="item_repr").shape == (7, 4)
  scores = tasks.score_fn(model)
  inputs = {"user": jnp.arange(5)}
  assert np.array_equal(scores(padded, inputs), scores(params, inputs))


def test_cpu_devices_must_be_positive():
  from recjax.config import apply_overrides, default_config

  for model in ("bpr", "sasrec"):   # default 1, default None
    for bad in ("0", "-2"):
      with pytest.raises(ConfigError, match="cpu_devices must be a positive count, got"):
        apply_overrides(default_config(model), [f"cpu_devices={bad}"])
    with pytest.raises(ConfigError, match="cpu_devices expects int"):
      apply_overrides(default_config(model), ["cpu_devices='two'"])


def test_mesh_errors_are_clear():
  with pytest.raises(ValueError, match="model_parallel=2 does not divide the 1 devices"):
    make_mesh(1, 2)
  with pytest.raises(ValueError, match="asked for 3 devices"):
    make_mesh(3, 1)
  assert MODEL in make_mesh(1, 1).shape


def test_a_multi_host_run_trains_on_every_device(monkeypatch):
  """A mesh leaving out another process's devices (devices=1, or text fine-tuning's one device) is refused before
  anything is written: orbax cannot save one process's local arrays in a multi-host run (it failed after epoch 0)."""
  from recjax import experiment
  from recjax.config import apply_overrides, default_config

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "device_count", lambda: 2)
  with pytest.raises(ConfigError, match="devices=1: a multi-host run trains on every process's devices, 2 here"):
    experiment.train_mesh(apply_overrides(default_config("bpr"), ["devices=1"]))
  with pytest.raises(ConfigError, match=r"devices=1 \(text.finetune_layers > 0 trains on one device\)"):
    experiment.train_mesh(apply_overrides(default_config("bpr"), ["text.finetune_layers=1"]))


def test_bad_step_options_are_config_errors():
  from recjax import experiment
  from recjax.config import apply_overrides, default_config

  config = apply_overrides(default_config("bpr"), ["grad_accum=3"])
  with pytest.raises(ConfigError, match="grad_accum=3 must divide batch_size=2048"):
    experiment.train_mesh(config)
  config = apply_overrides(default_config("bpr"), ["compute_dtype='float16'"])
  with pytest.raises(ConfigError, match="compute_dtype"):
    experiment.compute_dtype(config)


@pytest.mark.parametrize("flags, env, want", [
    ({}, {}, None),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 1}, {}, {"coordinator": "h:1", "num_processes": 2,
                                                                       "process_id": 1}),
    ({}, {"RECJAX_COORDINATOR": "h:2", "RECJAX_NUM_PROCESSES": "4", "RECJAX_PROCESS_ID": "3"},
     {"coordinator": "h:2", "num_processes": 4, "process_id": 3}),
    ({"process_id": 0}, {"RECJAX_COORDINATOR": "h:2", "RECJAX_NUM_PROCESSES": "2", "RECJAX_PROCESS_ID": "1"},
     {"coordinator": "h:2", "num_processes": 2, "process_id": 0}),                        # flags win
])
def test_distributed_settings_from_flags_or_environment(monkeypatch, flags, env, want):
  for var in distributed.ENV.values():
    monkeypatch.delenv(var, raising=False)
  for var, value in env.items():
    monkeypatch.setenv(var, value)
  assert distributed.distributed_settings(**flags) == want


@pytest.mark.parametrize("flags, message", [
    ({"num_processes": 2}, "without a coordinator"),
    ({"coordinator": "h:1", "num_processes": 2}, "integer process count and id"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, "process id 2 is not in"),
])
def test_distributed_settings_errors(monkeypatch, flags, message):
  for var in distributed.ENV.values():
    monkeypatch.delenv(var, raising=False)
  with pytest.raises(ConfigError, match=message):
    distributed.distributed_settings(**flags)
