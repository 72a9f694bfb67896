"""Hot-path timing: the jitted train step and the full-ranking eval pass, compile time apart.

    python benchmarks/throughput.py --model bpr sasrec --dataset ml-100k --data-dir ../shared/data
    python benchmarks/throughput.py --dataset synthetic --json out.json

Runs unchanged on CPU and GPU (whatever `jax.devices()` shows). For each model: compile seconds of
the step, median ms/step over `--steps` timed steps after `--warmup` burn-in steps (each blocked
until ready), examples/s, and the eval pass (all valid users, full ranking) median seconds and
users/s (labelled rows/s for context-aware models). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from recjax.cli import use_all_cpu_cores

use_all_cpu_cores()  # before jax starts: one host device per core on CPU

import jax  # noqa: E402
import numpy as np

from recjax import experiment
from recjax.config import apply_overrides, default_config
from recjax.train import create_train_state, make_train_step


def _timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def bench_model(name: str, dataset: str, data_dir: str | None, overrides: list[str], steps: int,
                warmup: int, eval_repeats: int) -> dict:
  config = apply_overrides(default_config(name), overrides)
  config.update(dataset=dataset, data_dir=data_dir)
  exp = experiment.build(config)
  sampler = experiment.make_sampler(exp)
  loss_fn = experiment.make_loss_fn(exp)
  optimizer = experiment.make_optimizer(config)
  rng = jax.random.PRNGKey(config["seed"])
  state = create_train_state(experiment.init_params(exp, rng), optimizer, rng)
  step = make_train_step(loss_fn, optimizer)

  batches, epoch = [], 0
  while len(batches) < warmup + steps + 1:   # host batches made before timing starts
    batches.extend(jax.device_put(b) for b in sampler.epoch(epoch))
    epoch += 1
  start = time.perf_counter()
  state, metrics = step(state, batches[0])
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  times = []
  for i, batch in enumerate(batches[1:warmup + steps + 1]):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    if i >= warmup:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  weight = np.asarray(batches[1]["weight"])
  examples = float(np.sum(weight.reshape(len(weight), -1).sum(1) > 0))  # real rows of a batch

  evaluate = experiment.make_evaluator(exp, "valid")
  _, eval_compile_s = _timed(evaluate, state.params)
  eval_times = [_timed(evaluate, state.params)[1] for _ in range(eval_repeats)]
  eval_s = statistics.median(eval_times)
  valid = exp.eval_sets["valid"]
  num_users = len(valid["positives"]) if "positives" in valid else len(valid["user"])   # ranked users or labelled rows
  return {
      "model": name, "dataset": dataset, "training": config["training"], "batch_size": config["batch_size"],
      "steps_per_epoch": sampler.num_batches, "compile_s": compile_s, "step_ms": 1e3 * step_s,
      "examples_per_s": examples / step_s, "epoch_s_est": step_s * sampler.num_batches,
      "eval_compile_s": eval_compile_s, "eval_s": eval_s, "eval_users_per_s": num_users / eval_s,
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", nargs="+", default=["bpr", "sasrec"])
  parser.add_argument("--dataset", default="synthetic")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override applied to every model (e.g. training=prefix)")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--eval-repeats", type=int, default=5)
  parser.add_argument("--json", default="throughput.json", help="where to write the results")
  args = parser.parse_args(argv)

  rows = [bench_model(m, args.dataset, args.data_dir, args.set, args.steps, args.warmup, args.eval_repeats)
          for m in args.model]
  device = jax.devices()[0]
  header = f"{'model':<8} {'training':<9} {'batch':>6} {'compile s':>9} {'ms/step':>9} {'examples/s':>11} " \
           f"{'epoch s':>8} {'eval s':>8} {'users/s':>9}"
  print(f"# {device.platform} x{jax.device_count()} ({device.device_kind}), jax {jax.__version__}, "
        f"dataset {args.dataset}")
  print(header)
  for r in rows:
    print(f"{r['model']:<8} {r['training']:<9} {r['batch_size']:>6} {r['compile_s']:>9.2f} {r['step_ms']:>9.2f} "
          f"{r['examples_per_s']:>11.0f} {r['epoch_s_est']:>8.2f} {r['eval_s']:>8.4f} {r['eval_users_per_s']:>9.0f}")
  with open(args.json, "w") as f:
    json.dump({"device": f"{device.platform}:{device.device_kind}", "device_count": jax.device_count(),
               "jax": jax.__version__, "host": platform.node(), "date": time.strftime("%Y-%m-%d"),
               "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
