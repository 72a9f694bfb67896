"""Wall-clock time until a model's test metric reaches a target (e.g. RecBole's final figure).

    python benchmarks/time_to_quality.py sasrec --dataset ml-100k --data-dir ../shared/data \
        --target 0.0613 [--set key=value ...] [--max-epochs 200]

The clock starts before the data is read and includes compilation; the test metric is checked
after every epoch (its time counted too). Prints one JSON line: seconds, epochs, the metric path. Bad input
(an unknown model or config key, no data) prints as one line `time_to_quality.py: error: ...`, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from recjax.errors import exit_on_error
from recjax.launch import relaunch_with_fast_malloc, use_all_cpu_cores

if __name__ == "__main__":
  relaunch_with_fast_malloc()   # the same command under a malloc that keeps XLA's large buffers (recjax.launch)
use_all_cpu_cores()  # before jax starts: one host device per core on CPU

import jax  # noqa: E402

from recjax import experiment
from recjax.config import build_config
from recjax.eval.protocols import higher_is_better


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("model")
  parser.add_argument("--dataset", default="ml-100k")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--target", type=float, required=True)
  parser.add_argument("--metric", default="ndcg@10")
  parser.add_argument("--max-epochs", type=int, default=200)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  args = parser.parse_args(argv)

  start = time.perf_counter()
  config = build_config(args.model, overrides=args.set, dataset=args.dataset)
  config["data_dir"] = args.data_dir
  exp = experiment.build(config)
  sampler, state, step = experiment.training_setup(exp, jax.random.PRNGKey(config["seed"]))
  test = experiment.make_evaluator(exp, "test")
  batches = experiment.device_batches(exp, sampler)
  path, reached = [], False
  for epoch in range(args.max_epochs):
    for batch in batches(epoch):
      state, _ = step(state, batch)
    value = test(state.params)[args.metric]
    path.append(round(value, 4))
    elapsed = time.perf_counter() - start
    print(f"epoch {epoch}: {args.metric} {value:.4f} at {elapsed:.1f}s", file=sys.stderr, flush=True)
    # on the value itself, not the rounded one in `path`; logloss, rmse and the like reach it from above
    reached = value >= args.target if higher_is_better(args.metric) else value <= args.target
    if reached:
      break
  seconds = time.perf_counter() - start
  print(json.dumps({"model": args.model, "dataset": args.dataset, "target": args.target, "metric": args.metric,
                    "reached": reached, "seconds": round(seconds, 2), "epochs": len(path),
                    "devices": exp.mesh.size if exp.mesh else 1, "path": path}))   # the devices it trained on


if __name__ == "__main__":
  exit_on_error(main)
