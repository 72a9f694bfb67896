"""TrainState, the compiled step, checkpoints and the logging helpers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recjax.train import (
  Checkpointer,
  JsonlLogger,
  ProgressBar,
  TrainState,
  create_train_state,
  make_pmap_train_step,
  make_train_step,
  plot_curves,
  replicate,
  split_for_pmap,
  unreplicate,
)


def loss_fn(params, batch, rng):
  """Least squares with a little rng noise, so the per-step key matters. x [B, 3], y [B]."""
  pred = batch["x"] @ params["w"] + params["b"] + 0.01 * jax.random.normal(rng, batch["y"].shape)
  mse = jnp.mean((pred - batch["y"]) ** 2)
  return mse, {"mse": mse}


def toy_batch(seed=0, n=32):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 3)).astype(np.float32)
  return {"x": x, "y": (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3).astype(np.float32)}


def fresh_state(seed=0):
  params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
  return create_train_state(params, optax.adam(0.1), jax.random.PRNGKey(seed))


def test_create_train_state():
  state = fresh_state()
  assert isinstance(state, TrainState)
  assert state.step.dtype == jnp.int32 and state.step.shape == ()
  assert state.rng.dtype == jnp.uint32 and state.rng.shape == (2,)
  typed = create_train_state({"w": jnp.zeros(2)}, optax.sgd(0.1), jax.random.key(3))
  np.testing.assert_array_equal(typed.rng, jax.random.PRNGKey(3))
  np.testing.assert_array_equal(create_train_state({"w": jnp.zeros(2)}, optax.sgd(0.1), 3).rng, typed.rng)
  leaves = jax.tree.leaves(state)  # a pytree: step, params, opt_state, rng
  assert len(leaves) == 1 + 2 + 5 + 1


def test_step_decreases_loss_and_compiles_once():
  step = make_train_step(loss_fn, optax.adam(0.1))
  state, batch = fresh_state(), toy_batch()
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert step.jitted._cache_size() == 1
  assert losses[-1] < 0.1 * losses[0]
  assert set(metrics) == {"loss", "mse", "grad_norm"}
  assert float(metrics["grad_norm"]) >= 0 and int(state.step) == 30


def test_step_key_is_folded_from_step():
  step = make_train_step(loss_fn, optax.sgd(0.1), donate=False)
  state = fresh_state()
  batch = toy_batch()
  _, m1 = step(state, batch)
  _, m2 = step(state.replace(step=jnp.int32(5)), batch)
  rng = jax.random.fold_in(state.rng, 0)
  np.testing.assert_allclose(float(m1["loss"]), float(loss_fn(state.params, batch, rng)[0]), rtol=1e-6)
  assert float(m1["loss"]) != float(m2["loss"])


def test_step_donates_state():
  step = make_train_step(loss_fn, optax.adam(0.1))
  state = fresh_state()
  new_state, _ = step(state, toy_batch())
  if jax.default_backend() == "cpu" or state.params["w"].is_deleted():
    assert state.params["w"].is_deleted()  # the caller must use the returned state
  new_state, _ = step(new_state, toy_batch(1))
  assert int(new_state.step) == 2 and step.jitted._cache_size() == 1
  kept = make_train_step(loss_fn, optax.adam(0.1), donate=False)
  state = fresh_state()
  kept(state, toy_batch())
  assert not state.params["w"].is_deleted()


def test_constants_are_step_arguments_without_gradients():
  """A loss reading data-derived arrays beside the params (`constants`): the same states as a loss that
  closes over them; int tables are fine (no gradient is taken), float ones stay float32 under bfloat16."""
  rows, scale = np.array([2, 0, 1], np.int32), np.array([1.0, 3.0, 0.5], np.float32)

  def reading(variables, batch, rng):
    w = variables["w"][variables["constants"]["rows"]] * variables["constants"]["scale"]
    return loss_fn({"w": w, "b": variables["b"]}, batch, rng)

  constants = {"constants": {"rows": rows, "scale": scale}}
  closing = lambda params, batch, rng: reading({**params, **constants}, batch, rng)  # noqa: E731
  with_args = make_train_step(reading, optax.adam(0.1), constants=constants)
  closed = make_train_step(closing, optax.adam(0.1))
  a, b = fresh_state(), fresh_state()
  for i in range(3):
    a, _ = with_args(a, toy_batch(i))
    b, _ = closed(b, toy_batch(i))
  assert jax.tree.structure(a) == jax.tree.structure(fresh_state())   # the constants are not state
  np.testing.assert_array_equal(a.params["w"], b.params["w"])
  assert with_args.jitted._cache_size() == 1
  pmapped = [make_pmap_train_step(reading, optax.adam(0.1), constants=constants),
             make_pmap_train_step(closing, optax.adam(0.1))]
  states = [replicate(fresh_state()) for _ in pmapped]
  for i in range(3):
    batch = split_for_pmap({**toy_batch(i), "weight": np.ones(32, np.float32)})
    states = [step(state, batch)[0] for step, state in zip(pmapped, states)]
  np.testing.assert_array_equal(*(unreplicate(state).params["w"] for state in states))

  def dtypes(variables, batch, rng):
    assert variables["w"].dtype == jnp.bfloat16 and variables["constants"]["scale"].dtype == jnp.float32
    return reading(variables, batch, rng)

  state, _ = make_train_step(dtypes, optax.adam(0.1), constants=constants, compute_dtype=jnp.bfloat16)(
      fresh_state(), toy_batch())
  assert state.params["w"].dtype == jnp.float32


KEEP_STEP = make_train_step(loss_fn, optax.adam(0.1), donate=False)


def trained(steps=3):
  state = fresh_state()
  for i in range(steps):
    state, _ = KEEP_STEP(state, toy_batch(i))
  return state


def assert_tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("asynchronous", [True, False])
def test_checkpoint_roundtrip_and_keep(tmp_path, asynchronous):
  template = fresh_state()
  with Checkpointer(tmp_path / "ck", keep=2, asynchronous=asynchronous) as ckpt:
    assert ckpt.restore_latest(template) is None and ckpt.restore_best(template) is None
    states = [trained(s) for s in range(1, 5)]
    for epoch, state in enumerate(states):
      ckpt.save_latest(epoch, state, {"epoch": epoch, "history": [{"loss": 0.5}], "best": None})
    assert ckpt.latest_epochs() == [2, 3]
    ckpt.save_best(1, states[1], {"v": 1})
    ckpt.save_best(3, states[3], {"v": 3})
    ckpt.save_best(3, states[3], {"v": 3.5})  # the same epoch again (a resumed run) replaces it
    assert ckpt.best_epoch() == 3
  assert sorted(p.name for p in (tmp_path / "ck" / "best").iterdir() if p.is_dir()) == ["3"]
  with Checkpointer(tmp_path / "ck", keep=2) as ckpt:  # reopened, as a resumed process does
    epoch, state, meta = ckpt.restore_latest(template)
    assert epoch == 3 and meta == {"epoch": 3, "history": [{"loss": 0.5}], "best": None}
    assert_tree_equal(state, states[3])
    assert type(state.opt_state) is type(states[3].opt_state) and state.rng.dtype == jnp.uint32
    best, best_meta = ckpt.restore_best(template)
    assert best_meta == {"v": 3.5}
    assert_tree_equal(best.params, states[3].params)


@pytest.mark.parametrize("asynchronous", [True, False])
def test_checkpoint_restores_into_donated_template(tmp_path, asynchronous):
  step = make_train_step(loss_fn, optax.adam(0.1))
  state = fresh_state()
  with Checkpointer(tmp_path, asynchronous=asynchronous) as ckpt:
    ckpt.save_latest(0, state, {})
    step(state, toy_batch())  # donates `state`
    _, restored, _ = ckpt.restore_latest(state)
  assert_tree_equal(restored, fresh_state())


def test_a_reader_follows_a_best_checkpoint_replaced_while_it_reads(tmp_path):
  """`recjax evaluate` beside a training run: the best checkpoint the reader listed is replaced before it reads
  it; the reader reads the new one. It opens only what it reads (no `latest/`)."""
  with Checkpointer(tmp_path, keep=3, asynchronous=False) as writer:
    writer.save_best(0, trained(1), {"v": 0})
    reader = Checkpointer(tmp_path, read_only=True)
    assert reader.best_epoch() == 0   # listed
    writer.save_best(1, trained(2), {"v": 1})   # replaces best/0
    state, meta = reader.restore_best(fresh_state())
    reader.close()
  assert meta == {"v": 1}
  assert_tree_equal(state, trained(2))
  assert list(reader._managers) == ["best"]


def test_checkpoint_ignores_interrupted_save(tmp_path):
  with Checkpointer(tmp_path, keep=3) as ckpt:
    ckpt.save_latest(0, trained(1), {"epoch": 0})
  # what a save killed before its rename leaves behind
  partial = tmp_path / "latest" / "1.orbax-checkpoint-tmp-123"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "junk").write_text("x")
  with Checkpointer(tmp_path, keep=3) as ckpt:
    epoch, state, meta = ckpt.restore_latest(fresh_state())
    assert epoch == 0 and meta == {"epoch": 0}
    assert_tree_equal(state, trained(1))
    ckpt.save_latest(1, trained(2), {"epoch": 1})
    assert ckpt.latest_epochs() == [0, 1]


DAMAGED_RESTORES = """
import gc, shutil, sys, time
from pathlib import Path
import numpy as np
from recjax.errors import DataError
from recjax.train import Checkpointer

root = Path(sys.argv[1])
state = {f"table{i}": np.full((300, 8), i, np.float32) for i in range(6)}
with Checkpointer(root / "whole", asynchronous=False) as ckpt:
  ckpt.save_best(0, state, {})
damages = {"data files gone": lambda s: shutil.rmtree(s / "d"),
           "data files cut short": lambda s: [f.write_bytes(f.read_bytes()[:10]) for f in (s / "d").iterdir()],
           "manifest gone": lambda s: (s / "manifest.ocdbt").unlink()}
for name, damage in damages.items():
  shutil.copytree(root / "whole", root / name)
  damage(root / name / "best" / "0" / "state")
  with Checkpointer(root / name, read_only=True) as ckpt:
    try:
      ckpt.restore_best(state)
    except DataError as e:
      print(e)
    else:
      sys.exit(f"{name}: restored")
gc.collect()
time.sleep(1)   # the abandoned reads finish
"""


def test_a_damaged_checkpoint_is_one_error_without_orbax_tracebacks(tmp_path):
  """A restore that fails part-way leaves orbax's other reads running; what they print as they finish (into a
  closed event loop, or as never-awaited tasks) would bury the one error under tracebacks."""
  done = subprocess.run([sys.executable, "-c", DAMAGED_RESTORES, str(tmp_path)], capture_output=True, text=True,
                        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr[-3000:]
  errors = done.stdout.strip().splitlines()
  assert len(errors) == 3 and all("the checkpoint cannot be read" in e for e in errors), done.stdout
  assert done.stderr == "", done.stderr[-3000:]


def test_jsonl_logger_truncates_on_resume(tmp_path):
  path = tmp_path / "run" / "log.jsonl"
  with JsonlLogger(path, append=False) as log:
    for e in range(5):
      log.write({"epoch": e, "train_loss": 1.0 / (e + 1)})
  with open(path, "ab") as f:
    f.write(b'5\n{"epoch": null}\n\xff\n{"epoch": 5, "tra')  # damaged rows, then a row cut short by a kill
  with JsonlLogger(path, append=True, last_epoch=2) as log:
    log.write({"epoch": 3, "train_loss": 0.0})
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and rows[3]["train_loss"] == 0.0
  with JsonlLogger(path, append=False) as log:
    log.write({"epoch": 0})
  assert path.read_text() == '{"epoch": 0}\n'


def test_progress_bar(capsys):
  with ProgressBar(4, "epoch 0", enabled=True) as bar:
    for _ in range(4):
      bar.update()
  err = capsys.readouterr().err
  assert "epoch 0 [" in err and "4/4" in err and err.endswith("\r")
  with ProgressBar(4, "quiet") as bar:  # not a TTY under pytest
    bar.update()
  assert capsys.readouterr().err == ""
  counter = ProgressBar(None, "x", enabled=False)
  counter.update(7)
  assert counter.render(1.0) == "x 7 7.0 it/s"


ROWS = [{"epoch": e, "train_loss": 1.0 / (e + 1), "train_epoch_s": 0.1} for e in range(4)]
for r in ROWS[1::2]:
  r.update(eval_s=0.01, valid={"mrr@10": 0.1 * r["epoch"], "recall@20": 0.2 * r["epoch"]})


def test_plot_curves_writes_png(tmp_path):
  path = tmp_path / "curves.png"
  assert plot_curves(ROWS, path, log=pytest.fail)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_plot_curves_without_matplotlib(tmp_path, monkeypatch):
  for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
  lines = []
  assert plot_curves(ROWS, tmp_path / "curves.png", log=lines.append) is False
  assert len(lines) == 1 and "matplotlib is not installed" in lines[0] and "pip install recjax[plot]" in lines[0]
  assert not (tmp_path / "curves.png").exists()
