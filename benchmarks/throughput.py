"""Hot-path timing across device counts: the jitted train step and the full-ranking eval pass.

    python benchmarks/throughput.py                                   # bpr lightgcn sasrec, synthetic, all devices
    python benchmarks/throughput.py --cpu-devices 4 --devices 1 2 4   # N fake CPU devices (this must come first)
    python benchmarks/throughput.py --model sasrec --dataset ml-100k --data-dir ../shared/data --dtype bfloat16
    python benchmarks/throughput.py --model bpr --devices 4 --model-parallel 4 --set shard_tables_mb=0

On a GPU/TPU host it uses whatever `jax.devices()` shows (install the matching jax, e.g.
`pip install -U "jax[cuda12]"`); on CPU, `--cpu-devices N` gives N XLA host devices (by default one per
core). For each model and device count (`--devices`, default 1, 2, 4, ... up to all): the step's compile
seconds (compilation alone), median ms/step over `--steps` steps after `--warmup` (each blocked until
ready), examples/s (real rows of the global batch), the eval pass (all valid users, full ranking; the
same work as the test pass under leave-one-out) median seconds and users/s (and `eval_first_s`,
compilation plus one pass), and the peak device memory where the backend reports it. For the graph
models (LightGCN, NGCF) also the rate at which the step reads edge rows: each layer's sparse product reads
one `d`-float source row per edge, in the forward and in the backward pass, shown beside the device's
measured copy bandwidth (a small graph whose rows stay in cache can read them faster than that).
Prints a table and writes JSON (`--json`). Bad input (an unknown model or config key, no data) prints as one
line `throughput.py: error: ...`, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", nargs="+", default=["bpr", "lightgcn", "sasrec"])
  parser.add_argument("--dataset", default="synthetic")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--devices", nargs="+", type=int, default=None,
                      help="device counts to run (default: 1, 2, 4, ... up to all visible)")
  parser.add_argument("--cpu-devices", type=int, default=None, help="XLA host devices on a CPU host")
  parser.add_argument("--model-parallel", type=int, default=1, help="devices on the mesh's model axis")
  parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: the model's)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override applied to every model (e.g. training=prefix)")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--eval-repeats", type=int, default=3)
  parser.add_argument("--copy-mb", type=int, default=256, help="array size of the copy-bandwidth reference")
  parser.add_argument("--json", default="throughput.json", help="where to write the results")
  return parser.parse_args(argv)


ARGS = _parse(sys.argv[1:] if __name__ == "__main__" else [])
from recjax.errors import exit_on_error  # noqa: E402
from recjax.launch import malloc_in_use, relaunch_with_fast_malloc, use_all_cpu_cores, with_host_devices  # noqa: E402,E501

if __name__ == "__main__":
  relaunch_with_fast_malloc()   # the same command under a malloc that keeps XLA's large buffers (recjax.launch)

if ARGS.cpu_devices:   # before jax starts
  os.environ["XLA_FLAGS"] = with_host_devices(os.environ.get("XLA_FLAGS", ""), ARGS.cpu_devices)

use_all_cpu_cores()  # one host device per core on CPU, unless chosen above

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from recjax import experiment  # noqa: E402
from recjax.config import build_config  # noqa: E402

PROPAGATION_PASSES = 2     # forward and backward propagation per layer and training step


def _timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def peak_memory_bytes() -> int | None:
  """Largest peak allocation over the devices, where the backend reports it (GPU/TPU; not CPU)."""
  stats = [d.memory_stats() for d in jax.local_devices()]
  peaks = [s.get("peak_bytes_in_use") for s in stats if s]
  return max(peaks) if peaks and None not in peaks else None


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 10) -> float:
  """Bytes/s of a device-to-device copy on one device (read + write counted).

  The copies are queued back to back and waited for once, so per-call dispatch and sync (a large share of
  a 0.1 ms copy on a GPU) do not count; the median over `repeats` such runs of `repeats` copies.
  """
  x = jnp.ones(nbytes // 4, jnp.float32)
  copy = jax.jit(lambda x: x + 1.0)
  jax.block_until_ready(copy(x))

  def run_of_copies() -> float:
    start, y = time.perf_counter(), x
    for _ in range(repeats):
      y = copy(y)
    jax.block_until_ready(y)
    return (time.perf_counter() - start) / repeats

  return 2 * nbytes / statistics.median(run_of_copies() for _ in range(repeats))


def _config(name: str, args, devices: int) -> dict:
  config = build_config(name, overrides=args.set, dataset=args.dataset)   # the dataset's defaults too
  config.update(data_dir=args.data_dir, devices=devices, model_parallel=args.model_parallel,
                compute_dtype=args.dtype)
  if args.batch_size:
    config["batch_size"] = args.batch_size
  return config


def bench(name: str, args, devices: int) -> dict:
  config = _config(name, args, devices)
  exp = experiment.build(config)
  sampler, state, step = experiment.training_setup(exp, jax.random.PRNGKey(config["seed"]))
  batches, epoch, to_device = [], 0, experiment.device_batches(exp, sampler)
  while len(batches) < args.warmup + args.steps + 1:   # on device before timing starts
    batches.extend(to_device(epoch))
    epoch += 1
  start = time.perf_counter()   # compilation alone; the first call then reuses the compiled program
  step.jitted.lower(state, batches[0], step.constants).compile()
  compile_s = time.perf_counter() - start
  state, metrics = step(state, batches[0])
  jax.block_until_ready(metrics)
  times = []
  for i, batch in enumerate(batches[1:args.warmup + args.steps + 1]):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    if i >= args.warmup:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  weight = np.asarray(jax.device_get(batches[1]["weight"]))
  examples = float(np.sum(weight.reshape(len(weight), -1).sum(1) > 0))   # real rows of a global batch

  evaluate = experiment.make_evaluator(exp, "valid")
  _, eval_first_s = _timed(evaluate, state.params)   # compilation and one pass
  eval_s = statistics.median(_timed(evaluate, state.params)[1] for _ in range(args.eval_repeats))
  valid = exp.eval_sets["valid"]
  users = len(valid["positives"]) if "positives" in valid else len(valid["user"])   # ranked users or labelled rows
  row = {"model": name, "devices": devices, "model_parallel": args.model_parallel, "dtype": args.dtype,
         "training": config["training"], "batch_size": config["batch_size"], "steps_per_epoch": sampler.num_batches,
         "compile_s": compile_s,
         "step_ms": 1e3 * step_s, "examples_per_s": examples / step_s, "epoch_s_est": step_s * sampler.num_batches,
         "eval_first_s": eval_first_s, "eval_s": eval_s, "eval_users_per_s": users / eval_s,
         "peak_memory_bytes": peak_memory_bytes()}
  if getattr(exp.model, "graph", None) is not None:
    graph = exp.model.graph
    # bytes a propagated value takes: the compute dtype's, but XLA:CPU's sparse kernel runs in float32
    value_bytes = 4 if jax.default_backend() == "cpu" else jnp.dtype(args.dtype).itemsize
    moved = PROPAGATION_PASSES * graph.num_edges * sum(exp.model.propagation_widths) * value_bytes
    row.update(edges=graph.num_edges, propagation_bytes_per_step=moved, achieved_gb_per_s=moved / step_s / 1e9)
  return row


def main() -> None:
  args = ARGS
  available = jax.device_count()
  counts = args.devices or [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= available]
  rows = []
  for name in args.model:
    for n in counts:
      row = bench(name, args, n)
      rows.append(row)
      print(json.dumps(row), file=sys.stderr, flush=True)
  device = jax.devices()[0]
  copy_gb_per_s = copy_bandwidth(args.copy_mb << 20) / 1e9
  malloc = malloc_in_use(os.environ)
  print(f"# {device.platform} x{available} ({device.device_kind}), jax {jax.__version__}, dataset {args.dataset}, "
        f"dtype {args.dtype}, model axis {args.model_parallel}, copy bandwidth {copy_gb_per_s:.1f} GB/s per device, "
        f"malloc {malloc}")
  print(f"{'model':<9} {'dev':>3} {'batch':>6} {'compile s':>9} {'ms/step':>9} {'examples/s':>11} {'speedup':>7} "
        f"{'eval s':>8} {'users/s':>9} {'peak MiB':>9} {'GB/s':>6}")
  for r in rows:
    first = next(x for x in rows if x["model"] == r["model"])
    speedup = r["examples_per_s"] / first["examples_per_s"]
    peak = f"{r['peak_memory_bytes'] / 2**20:.0f}" if r["peak_memory_bytes"] else "n/a"
    bandwidth = f"{r['achieved_gb_per_s']:.1f}" if "achieved_gb_per_s" in r else ""
    print(f"{r['model']:<9} {r['devices']:>3} {r['batch_size']:>6} {r['compile_s']:>9.2f} {r['step_ms']:>9.2f} "
          f"{r['examples_per_s']:>11.0f} {speedup:>6.2f}x {r['eval_s']:>8.4f} {r['eval_users_per_s']:>9.0f} "
          f"{peak:>9} {bandwidth:>6}")
  with open(args.json, "w") as f:
    json.dump({"device": f"{device.platform}:{device.device_kind}", "device_count": available,
               "copy_gb_per_s": copy_gb_per_s, "malloc": malloc, "jax": jax.__version__,
               "host": platform.node(), "date": time.strftime("%Y-%m-%d"), "args": vars(args), "rows": rows}, f,
              indent=2)


if __name__ == "__main__":
  exit_on_error(main)
