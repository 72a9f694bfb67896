"""The fit loop on a toy linear regression: progress, early stopping, exact resume, failures."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recjax.errors import DataError, TrainingError
from recjax.train import Checkpointer, create_train_state, fit, make_train_step

N, D, B = 96, 4, 16
_data = np.random.default_rng(0)
X = _data.normal(size=(N, D)).astype(np.float32)
Y = (X @ np.array([1.0, -2.0, 0.5, 3.0], np.float32) + 0.3).astype(np.float32)
XV = _data.normal(size=(32, D)).astype(np.float32)
YV = (XV @ np.array([1.0, -2.0, 0.5, 3.0], np.float32) + 0.3).astype(np.float32)


def loss_fn(params, batch, rng):
  """Weighted least squares plus rng noise (so resume must continue the key sequence)."""
  pred = batch["x"] @ params["w"] + params["b"] + 0.01 * jax.random.normal(rng, batch["y"].shape)
  mse = jnp.sum(batch["weight"] * (pred - batch["y"]) ** 2) / jnp.sum(batch["weight"])
  return mse, {"mse": mse}


def batches(epoch, seed=0):
  """Batch order depends only on (seed, epoch): x [B, D], y [B], weight [B]."""
  order = np.random.default_rng((seed, epoch)).permutation(N)
  for i in range(0, N, B):
    idx = order[i:i + B]
    yield {"x": X[idx], "y": Y[idx], "weight": np.ones(B, np.float32)}


def evaluate(params):
  mse = float(jnp.mean((XV @ params["w"] + params["b"] - YV) ** 2))
  return {"neg_mse": -mse, "mrr@10": 1.0 / (1.0 + mse)}


def fresh_state(lr=0.05):
  params = {"w": jnp.zeros(D), "b": jnp.zeros(())}
  return create_train_state(params, optax.adam(lr), jax.random.PRNGKey(1))


train_step = make_train_step(loss_fn, optax.adam(0.05))

TIMINGS = ("train_epoch_s", "eval_s")


def without_timings(rows):
  return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def assert_tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def quiet(line):
  pass


def run(data=batches, scores=evaluate, **kwargs):
  """`fit` from a fresh state on the toy problem, quiet and without the plot unless asked."""
  kwargs = {"log": quiet, "plot": False, **kwargs}
  return fit(fresh_state(), train_step, data, scores, **kwargs)


def test_fit_improves_metric():
  lines = []
  result = run(epochs=5, log=lines.append)
  valid = [r["valid"]["mrr@10"] for r in result.history]
  assert valid[-1] > valid[0] and result.history[-1]["train_loss"] < result.history[0]["train_loss"]
  assert result.best_epoch == 4 and result.epochs_run == 5 and not result.stopped_early
  assert result.best_valid == result.history[-1]["valid"]
  assert_tree_equal(result.best_params, result.state.params)
  assert len(result.train_epoch_s) == 5 and len(result.eval_s) == 5 and all(t > 0 for t in result.train_epoch_s)
  assert int(result.state.step) == 5 * (N // B)
  assert len(lines) == 5 and lines[0].startswith("epoch    0  train_loss") and "mrr@10" in lines[0]


def test_eval_every_and_final_epoch():
  result = run(epochs=5, eval_every=2)
  assert [r["epoch"] for r in result.history if "valid" in r] == [1, 3, 4]
  assert len(result.eval_s) == 3 and "eval_s" not in result.history[0]


def test_final_only_evaluates_the_last_epoch_and_takes_it_even_over_a_resumed_runs_better_one(tmp_path):
  scores = iter([0.9, 0.2])

  def scripted(params):
    return {"mrr@10": next(scores)}

  first = run(scores=scripted, epochs=2, eval_every=1, final_only=True, out_dir=tmp_path)
  assert [r["epoch"] for r in first.history if "valid" in r] == [1] and first.best_valid == {"mrr@10": 0.9}
  longer = run(scores=scripted, epochs=4, final_only=True, out_dir=tmp_path, resume=True)   # worse at the end
  assert [r["epoch"] for r in longer.history if "valid" in r] == [1, 3]
  assert longer.best_epoch == 3 and longer.best_valid == {"mrr@10": 0.2}
  assert_tree_equal(longer.best_params, longer.state.params)
  with Checkpointer(tmp_path / "checkpoints") as ckpt:
    assert ckpt.best_epoch() == 3


def test_early_stopping_after_patience():
  scores = iter([0.5, 0.7, 0.6, 0.7, 0.65, 0.6, 0.69, 0.9, 1.0])

  def scripted(params):
    return {"mrr@10": next(scores)}

  result = run(scores=scripted, epochs=9, patience=2)
  # 0.7 at epoch 3 ties the best (an improvement, as in RecBole); epochs 4, 5, 6 are not: 3 > 2
  assert result.stopped_early and result.epochs_run == 7
  assert result.best_epoch == 3 and result.best_valid == {"mrr@10": 0.7}
  with pytest.raises(TrainingError, match="'ndcg@10' is not among"):
    run(scores=scripted, epochs=1, valid_metric="ndcg@10")


def test_resume_is_exact(tmp_path):
  full = run(epochs=6, patience=1, out_dir=tmp_path / "a")

  def interrupt(epoch, state, row):
    if epoch == 2:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    run(epochs=6, patience=1, out_dir=tmp_path / "b", on_epoch=interrupt)
  with pytest.raises(TrainingError, match="already holds checkpoints"):
    run(epochs=6, out_dir=tmp_path / "b")
  lines = []
  resumed = run(epochs=6, patience=1, out_dir=tmp_path / "b", resume=True, log=lines.append, plot=True)
  assert lines[0].startswith("resume: restored epoch 2") and lines[1].startswith("epoch    3")
  assert_tree_equal(resumed.state, full.state)
  assert_tree_equal(resumed.best_params, full.best_params)
  assert without_timings(resumed.history) == without_timings(full.history)
  assert (resumed.best_epoch, resumed.best_valid, resumed.epochs_run) == (full.best_epoch, full.best_valid, 6)
  assert len(resumed.train_epoch_s) == 6 and len(resumed.eval_s) == 6
  logs = [[json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in "ab"]
  assert without_timings(logs[0]) == without_timings(logs[1]) == without_timings(full.history)
  assert (tmp_path / "b" / "curves.png").exists()
  with Checkpointer(tmp_path / "b" / "checkpoints") as ckpt:
    assert ckpt.latest_epochs() == [3, 4, 5] and ckpt.best_epoch() == full.best_epoch
  again = run(epochs=6, out_dir=tmp_path / "b", resume=True)
  assert_tree_equal(again.state, full.state)  # nothing left to run


def test_resume_repairs_missing_best(tmp_path):
  """Killed after saving the latest checkpoint but before the best one of the same epoch."""
  full = run(epochs=4, out_dir=tmp_path / "a")

  def interrupt(epoch, state, row):
    if epoch == 1:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    run(epochs=4, out_dir=tmp_path / "b", on_epoch=interrupt)
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "best" / "1")
  resumed = run(epochs=4, out_dir=tmp_path / "b", resume=True)
  assert_tree_equal(resumed.state, full.state)
  assert_tree_equal(resumed.best_params, full.best_params)


def test_resume_refuses_a_run_whose_best_checkpoint_is_gone(tmp_path):
  """Going on would train, replace the latest checkpoints and end with no best model to test."""
  out = tmp_path / "run"
  falling = iter([1.0, 0.5, 0.2])
  run(epochs=3, eval_every=1, out_dir=out, scores=lambda params: {"mrr@10": next(falling)})   # epoch 0 the best
  shutil.rmtree(out / "checkpoints" / "best")
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  with pytest.raises(TrainingError, match=r"names epoch 0 the best, but .*best holds no checkpoint"):
    run(epochs=5, out_dir=out, resume=True)
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("meta", ['{"epoch": 1}', '[1]', None])
def test_resume_refuses_damaged_bookkeeping_naming_the_checkpoint(tmp_path, meta):
  out = tmp_path / "run"
  run(batches, epochs=2, out_dir=out)
  metadata = out / "checkpoints" / "latest" / "1" / "meta" / "metadata"
  book = json.loads(metadata.read_text())
  metadata.write_text(meta or json.dumps({**book, "epoch": "1"}))   # None: the epoch as a string
  with pytest.raises(DataError, match=r"latest/1: the checkpoint's meta (has no valid|is not a JSON object)"):
    run(batches, epochs=3, out_dir=out, resume=True)
  from recjax.train.fit import _BOOK_TYPES, _fresh_book
  assert set(_BOOK_TYPES) == set(_fresh_book())   # every entry checked


def test_nan_loss_raises_and_keeps_checkpoint(tmp_path):
  def poisoned(epoch):
    for i, batch in enumerate(batches(epoch)):
      if epoch == 2 and i == 3:
        batch = {**batch, "y": np.full_like(batch["y"], np.nan)}
      yield batch

  out = tmp_path / "run"
  with pytest.raises(TrainingError, match=r"epoch 2 at step 3 of the epoch \(global step 15\).*epoch 1 is kept"):
    run(poisoned, epochs=5, out_dir=out)
  with Checkpointer(out / "checkpoints") as ckpt:
    assert ckpt.latest_epochs() == [0, 1]
    epoch, state, meta = ckpt.restore_latest(fresh_state())
  assert epoch == 1 and meta["epoch"] == 1 and int(state.step) == 2 * (N // B)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1]


def test_a_finite_loss_with_a_nan_gradient_stops_before_its_epoch_is_saved(tmp_path):
  def root_loss(params, batch, rng):   # sqrt(0) = 0, but its gradient is 0 * inf = NaN
    del rng
    return jnp.sqrt(jnp.sum((batch["x"] @ params["w"] - batch["y"]) ** 2)), {}

  def poisoned(epoch):   # the last batch of epoch 1 fits exactly: loss 0, gradient NaN
    for i, batch in enumerate(batches(epoch)):
      last = epoch == 1 and i == N // B - 1
      yield {**batch, "x": np.zeros_like(batch["x"]), "y": np.zeros_like(batch["y"])} if last else batch

  out = tmp_path / "run"
  state = create_train_state({"w": jnp.zeros(D), "b": jnp.zeros(())}, optax.adam(0.05), jax.random.PRNGKey(1))
  with pytest.raises(TrainingError, match=rf"loss or gradient in epoch 1 at step {N // B - 1} .*epoch 0 is kept"):
    fit(state, make_train_step(root_loss, optax.adam(0.05)), poisoned, evaluate, epochs=3, out_dir=out,
        log=lambda line: None, plot=False)
  with Checkpointer(out / "checkpoints") as ckpt:
    assert ckpt.latest_epochs() == [0]


def test_restore_into_other_shapes_names_the_array(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save_latest(0, fresh_state(), {"epoch": 0})
  wide = create_train_state({"w": jnp.zeros(D + 1), "b": jnp.zeros(())}, optax.adam(0.05), 0)
  for seed in (3, np.int64(3)):   # an int seed, a numpy one too, is a key
    assert create_train_state({"w": jnp.zeros(D)}, optax.adam(0.05), seed).rng.tolist() == [0, 3]
  with Checkpointer(tmp_path) as ckpt:   # a fresh manager, as on --resume
    with pytest.raises(ValueError, match=r"params.w is stored with shape \(4,\), this run expects \(5,\)"):
      ckpt.restore_latest(wide)


def test_empty_epoch_raises():
  with pytest.raises(TrainingError, match="no batches"):
    run(lambda e: [], epochs=1)


SCRIPT = """
import sys, time
import numpy as np
from recjax.train import fit
sys.path.insert(0, sys.argv[4])
from test_fit import batches, evaluate, fresh_state, train_step

out, resume, pause = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
result = fit(fresh_state(), train_step, batches, evaluate, epochs=6, out_dir=out, resume=resume,
             on_epoch=lambda epoch, state, row: time.sleep(pause), log=lambda line: None, plot=False)
np.savez(out + "/final.npz", **{k: np.asarray(v) for k, v in result.state.params.items()})
"""


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
  """A run killed with SIGKILL after epoch 2's checkpoint resumes to the uninterrupted result."""
  script = tmp_path / "run.py"
  script.write_text(SCRIPT)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = {}

  def start(name, out, resume, pause):
    args = [sys.executable, str(script), str(tmp_path / out), resume, str(pause), os.path.dirname(__file__)]
    with open(tmp_path / f"{name}.err", "w") as err:
      procs[name] = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err)

  def finish(name):
    assert procs[name].wait(timeout=60) == 0, (tmp_path / f"{name}.err").read_text()

  try:
    start("full", "a", "0", 0.0)
    start("killed", "b", "0", 0.3)  # sleeps after each epoch's checkpoint
    deadline = time.monotonic() + 60
    while not (tmp_path / "b" / "checkpoints" / "latest" / "2").is_dir():
      assert procs["killed"].poll() is None and time.monotonic() < deadline, (tmp_path / "killed.err").read_text()
      time.sleep(0.02)
    procs["killed"].send_signal(signal.SIGKILL)
    assert procs["killed"].wait() == -signal.SIGKILL and not (tmp_path / "b" / "final.npz").exists()
    start("resumed", "b", "1", 0.0)
    finish("full")
    finish("resumed")
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
  a, b = np.load(tmp_path / "a" / "final.npz"), np.load(tmp_path / "b" / "final.npz")
  for k in ("w", "b"):
    np.testing.assert_array_equal(a[k], b[k])
  logs = [[json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in "ab"]
  assert without_timings(logs[0]) == without_timings(logs[1]) and len(logs[0]) == 6
