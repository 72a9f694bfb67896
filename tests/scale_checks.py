"""Checks of the sharded training and evaluation paths, run by `test_scale.py` in a subprocess that has
4 CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=4`). Each check returns JSON-able
figures (differences, shapes, metrics) that the tests assert on; run one by hand with

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/scale_checks.py dp_bpr
"""
from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from recjax import experiment, models
from recjax.config import apply_overrides, default_config
from recjax.eval import ranking
from recjax.optim import create_optimizer
from recjax.train import (
  create_train_state,
  make_pmap_train_step,
  make_train_step,
  replicate,
  split_for_pmap,
  unreplicate,
)
from recjax.train.mesh import (
  batch_sharding,
  create_sharded,
  make_mesh,
  pad_tables,
  put_global,
  shard_shapes,
  state_shardings,
)

STEPS = 20
# pmap and micro-batches draw dropout masks per shard, the single-device step for the whole batch
NO_DROPOUT = ("model.dropout=0.0", "model.attn_dropout=0.0")
SMALL = {"bpr": ["batch_size=256", "model.dim=16", "learning_rate=0.01"],
         "sasrec": ["batch_size=32", "model.dim=16", "model.ffn_dim=32", "model.num_blocks=1", "learning_rate=0.005"]}


@functools.cache
def _setup(name: str, extra: tuple[str, ...]):
  config = apply_overrides(default_config(name), [*SMALL[name], *extra])
  config.update(dataset="synthetic", devices=1)
  exp = experiment.build(config)
  batches = []
  for epoch in range(10):
    batches.extend(experiment.make_sampler(exp).epoch(epoch))
    if len(batches) >= STEPS:
      break
  return exp, batches[:STEPS]


def _state(exp, optimizer, mesh=None, shard_min_bytes=0):
  rng = jax.random.PRNGKey(0)
  params = models.init_params(exp.model, rng)
  if mesh is None:
    return create_train_state(params, optimizer, rng), None
  params = pad_tables(params, mesh, shard_min_bytes)
  return create_sharded(lambda: create_train_state(params, optimizer, rng), mesh, shard_min_bytes)


def _run(step, state, batches, put=lambda b: b):
  for batch in batches:
    state, metrics = step(state, put(batch))
  return state, float(np.ravel(metrics["loss"])[0])   # pmap: one copy per device


def _max_diff(a, b) -> float:
  """Largest |a - b| over matching leaves; a padded (row-sharded) table is compared on its real rows."""
  def diff(x, y):
    x, y = np.asarray(x), np.asarray(y)
    x = x[:y.shape[0]] if x.ndim else x
    return float(np.max(np.abs(x.astype(np.float64) - y), initial=0.0))
  return max(jax.tree.leaves(jax.tree.map(diff, a, b)))


@functools.cache
def _reference(name: str, extra: tuple[str, ...]):
  """The single-device run every other path is compared with: (experiment, batches, optimizer, state, loss).
  Cached by its arguments, which every caller passes positionally (so equal runs share one entry)."""
  exp, batches = _setup(name, extra)
  optimizer = create_optimizer("adam", exp.config["learning_rate"])
  state, _ = _state(exp, optimizer)
  state, loss = _run(make_train_step(experiment.make_loss_fn(exp), optimizer), state, batches)
  return exp, batches, optimizer, jax.device_get(state), loss


def check_mesh(name: str, data: int, model: int, extra=()) -> dict:
  """jit step on a [data, model] mesh (every table row-sharded when model > 1) vs one device."""
  exp, batches, optimizer, reference, ref_loss = _reference(name, tuple(extra))
  mesh = make_mesh(data * model, model)
  state, sharding = _state(exp, optimizer, mesh)
  step = make_train_step(experiment.make_loss_fn(exp), optimizer, mesh=mesh, state_sharding=sharding)
  state, loss = _run(step, state, batches, lambda b: put_global(b, batch_sharding(mesh)))
  table = state.params["params"]["item_embedding"]["embedding"]
  return {"params_diff": _max_diff(state.params, reference.params),
          "opt_state_diff": _max_diff(state.opt_state, reference.opt_state),
          "loss": loss, "reference_loss": ref_loss, "table_shape": list(table.shape),
          "table_shards": shard_shapes(table), "steps": int(state.step)}


def check_pmap(name: str, extra=()) -> dict:
  exp, batches, optimizer, reference, ref_loss = _reference(name, tuple(extra))
  state, _ = _state(exp, optimizer)
  step = make_pmap_train_step(experiment.make_loss_fn(exp), optimizer)
  state, loss = _run(step, replicate(state), batches, lambda b: split_for_pmap(b, jax.local_device_count()))
  spread = _max_diff(jax.tree.map(lambda x: x[0], state.params), jax.tree.map(lambda x: x[-1], state.params))
  return {"params_diff": _max_diff(unreplicate(state).params, reference.params), "replica_spread": spread,
          "loss": loss, "reference_loss": ref_loss}


def check_accumulation(name: str, accum_steps: int = 4, extra=()) -> dict:
  exp, batches, optimizer, reference, ref_loss = _reference(name, tuple(extra))
  state, _ = _state(exp, optimizer)
  state, loss = _run(make_train_step(experiment.make_loss_fn(exp), optimizer, accum_steps=accum_steps), state, batches)
  return {"params_diff": _max_diff(state.params, reference.params), "loss": loss, "reference_loss": ref_loss}


def check_mesh_accumulation(name: str, accum_steps: int = 2) -> dict:
  """Micro-batches on a 4-device data mesh: the single-device result, each micro-batch still split over the
  devices (no all-gather in the compiled step; the gradients' all-reduce is expected)."""
  exp, batches, optimizer, reference, ref_loss = _reference(name, ())
  mesh = make_mesh(4, 1)
  state, sharding = _state(exp, optimizer, mesh)
  step = make_train_step(experiment.make_loss_fn(exp), optimizer, mesh=mesh, state_sharding=sharding,
                         accum_steps=accum_steps)
  put = lambda b: put_global(b, batch_sharding(mesh))   # noqa: E731
  text = step.jitted.lower(state, put(batches[0]), step.constants).compile().as_text()
  state, loss = _run(step, state, batches, put)
  return {"params_diff": _max_diff(state.params, reference.params), "loss": loss, "reference_loss": ref_loss,
          "all_gathers": text.count(" all-gather(")}


def check_bfloat16(name: str) -> dict:
  exp, batches, optimizer, reference, ref_loss = _reference(name, ())
  state, _ = _state(exp, optimizer)
  step = make_train_step(experiment.make_loss_fn(exp), optimizer, compute_dtype=jnp.bfloat16)
  state, loss = _run(step, state, batches)
  leaves = jax.tree.leaves((state.params, state.opt_state))
  dtypes = {str(x.dtype) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}
  return {"loss": loss, "reference_loss": ref_loss, "state_float_dtypes": sorted(dtypes),
          "params_diff": _max_diff(state.params, reference.params)}


def check_eval() -> dict:
  """Full-ranking metrics of trained BPR-MF and SASRec: one device vs users split over 4 devices, and
  items split over 2 and 4 (row-sharded tables, merged top-k)."""
  out = {}
  for name in ("bpr", "sasrec"):
    exp, _, _, reference, _ = _reference(name, ())
    params = reference.params
    data = exp.eval_sets["test"]

    def evaluate(params, sharding, exp=exp, data=data):
      return ranking.evaluate_full(exp.score_fn, params, data["inputs"], data["positives"], data["exclude"],
                                   ks=(5, 10, 20), metrics=("recall", "ndcg", "mrr", "hit", "precision"),
                                   chunk_size=64, sharding=sharding)

    out[name] = {"single": evaluate(params, None)}
    for data_axis, model_axis in ((4, 1), (2, 2), (1, 4)):
      mesh = make_mesh(4, model_axis)
      placed = pad_tables(params, mesh, 0)
      placed = jax.device_put(placed, state_shardings(placed, mesh, 0))
      out[name][f"{data_axis}x{model_axis}"] = evaluate(placed, batch_sharding(mesh))
  return out


def check_eval_collectives() -> dict:
  """The collective ops in the compiled full-ranking chunk evaluator of BPR-MF with users split over 4 devices:
  none are needed (each device ranks its own users), and an all-gather here would also make XLA:CPU host
  devices deadlock when chunks are sent back to back."""
  exp, _, _, reference, _ = _reference("bpr", ())
  data = exp.eval_sets["test"]
  mesh = make_mesh(4, 1)
  step = ranking.make_full_ranking_eval(exp.score_fn, (10,), ("ndcg",), mesh)
  rows = 64
  args = ({name: x[:rows] for name, x in data["inputs"].items()}, np.asarray(data["exclude"])[:rows],
          np.asarray(data["positives"])[:rows], np.ones(rows, np.float32))
  placed = jax.device_put(reference.params, state_shardings(reference.params, mesh, 1 << 40))
  text = step.lower(placed, *put_global(args, batch_sharding(mesh))).compile().as_text()
  ops = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
  return {op: text.count(f" {op}(") for op in ops}


def check_merged_hits() -> dict:
  """merged_full_ranking_hits vs full_ranking_hits on scores with many ties, NaN and -inf, exclusions,
  and k above the number of rankable items."""
  rng = np.random.default_rng(0)
  out = {}
  for num_items, k, model_axis in ((37, 10, 4), (37, 40, 2), (9, 12, 4), (64, 5, 2)):
    scores = rng.integers(0, num_items // 8 + 2, (8, num_items)).astype(np.float32)   # ties everywhere
    scores[rng.random(scores.shape) < 0.1] = np.nan                         # non-finite scores rank last
    scores[rng.random(scores.shape) < 0.1] = -np.inf
    exclude = rng.integers(0, num_items, (8, 5)).astype(np.int32)
    positives = np.stack([rng.permutation(np.arange(1, num_items))[:4] for _ in range(8)]).astype(np.int32)
    positives[rng.random(positives.shape) < 0.3] = 0                        # 0-padded, some excluded too
    mesh = make_mesh(4, model_axis)
    expected = ranking.full_ranking_hits(jnp.asarray(scores), jnp.asarray(exclude), jnp.asarray(positives), k)
    merged = jax.jit(lambda s, e, p, mesh=mesh, k=k: ranking.merged_full_ranking_hits(s, e, p, k, mesh))(
        scores, exclude, positives)
    same = np.array_equal(np.asarray(expected), np.asarray(merged))
    out[f"{num_items}/{k}/{model_axis}"] = bool(same and np.asarray(expected).any())   # and not all misses
  return out


def check_merged_eval_in_chunks(users: int = 6000, num_items: int = 1500, k: int = 600) -> dict:
  """Merged full ranking (a 1 x 2 mesh, the items split in two) of many small chunks against one device's; the
  test runs it on one core, where chunks sent back to back deadlocked XLA:CPU's collectives."""
  rng = np.random.default_rng(0)
  params = {"users": rng.normal(size=(users, 8)).astype(np.float32),
            "items": rng.normal(size=(num_items, 8)).astype(np.float32)}
  score = lambda params, inputs: params["users"][inputs["user"]] @ params["items"].T   # noqa: E731
  inputs = {"user": np.arange(users, dtype=np.int32)}
  positives = rng.integers(1, num_items, (users, 3)).astype(np.int32)
  exclude = rng.integers(1, num_items, (users, 20)).astype(np.int32)
  evaluate = functools.partial(ranking.evaluate_full, score, inputs=inputs, positives=positives, exclude=exclude,
                               ks=(10, k), metrics=("ndcg", "recall"), chunk_size=4)
  return {"single": evaluate(params), "merged": evaluate(params, sharding=batch_sharding(make_mesh(2, 2)))}


def check_big_table(rows: int = 4_000_000, dim: int = 64, steps: int = 3) -> dict:
  """A BPR-MF item table of `rows` x `dim` float32 row-sharded over 4 devices, trained with Adam."""
  mesh = make_mesh(4, 4)
  model = models.create_model("bpr", num_users=1000, num_items=rows + 1, dim=dim)
  loss_fn = experiment.tasks.pairwise_loss_fn(model, loss="bpr")
  optimizer = create_optimizer("adam", 1e-3)
  min_bytes = 64 << 20

  def init():
    params = pad_tables(models.init_params(model, jax.random.PRNGKey(0)), mesh, min_bytes)
    return create_train_state(params, optimizer, jax.random.PRNGKey(0))

  state, sharding = create_sharded(init, mesh, min_bytes)
  step = make_train_step(loss_fn, optimizer, mesh=mesh, state_sharding=sharding)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(steps):
    batch = {"user": rng.integers(1, 1000, 1024), "pos": rng.integers(1, rows + 1, 1024),
             "neg": rng.integers(1, rows + 1, (1024, 1)), "weight": np.ones(1024)}
    batch = {key: x.astype(np.float32 if key == "weight" else np.int32) for key, x in batch.items()}
    state, metrics = step(state, put_global(batch, batch_sharding(mesh)))
    losses.append(float(metrics["loss"]))
  table = state.params["params"]["item_embedding"]["embedding"]
  mu = state.opt_state.mu["params"]["item_embedding"]["embedding"]
  user = state.params["params"]["user_embedding"]["embedding"]
  return {"table_shape": list(table.shape), "table_shards": shard_shapes(table), "mu_shards": shard_shapes(mu),
          "user_shards": shard_shapes(user), "losses": losses, "table_bytes": table.size * 4}


def check_default_devices() -> dict:
  """Training devices of `devices: None` configs on this one-process CPU host with 4 host devices."""
  def count(name, *overrides):
    return experiment.default_device_count(apply_overrides(default_config(name), list(overrides)))
  return {"bpr": count("bpr"), "neumf": count("neumf"), "sasrec": count("sasrec"), "bert4rec": count("bert4rec"),
          "bpr cpu_devices=None": count("bpr", "cpu_devices=None"), "bpr cpu_devices=8": count("bpr", "cpu_devices=8"),
          "bpr model_parallel=2": count("bpr", "model_parallel=2")}


CHECKS = {
    "dp_bpr": lambda: check_mesh("bpr", 4, 1),
    "dp_sasrec": lambda: check_mesh("sasrec", 4, 1),
    "rows_bpr": lambda: check_mesh("bpr", 2, 2),
    "rows_sasrec": lambda: check_mesh("sasrec", 1, 4),
    "pmap_bpr": lambda: check_pmap("bpr"),
    "pmap_sasrec": lambda: check_pmap("sasrec", NO_DROPOUT),
    "accum_bpr": lambda: check_accumulation("bpr"),
    "accum_sasrec": lambda: check_accumulation("sasrec", extra=NO_DROPOUT),
    "accum_mesh_bpr": lambda: check_mesh_accumulation("bpr"),
    "bf16_sasrec": lambda: check_bfloat16("sasrec"),
    "eval": check_eval,
    "eval_collectives": check_eval_collectives,
    "merged_hits": check_merged_hits,
    "merged_eval_in_chunks": check_merged_eval_in_chunks,
    "big_table": check_big_table,
    "default_devices": check_default_devices,
}

if __name__ == "__main__":
  names = sys.argv[1:] or [name for name in CHECKS if name != "merged_eval_in_chunks"]
  if "--one-core" in names:   # before JAX makes its CPU client, which sizes its thread pools by the cores
    names.remove("--one-core")
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  print(json.dumps({name: CHECKS[name]() for name in names}))
