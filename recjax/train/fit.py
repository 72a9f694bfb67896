"""The epoch loop: train, evaluate, keep the best, stop early, checkpoint, resume exactly."""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from recjax.errors import DataError, TrainingError
from recjax.train.checkpoint import Checkpointer
from recjax.train.logging import JsonlLogger, ProgressBar, plot_curves
from recjax.train.state import TrainState


@dataclasses.dataclass
class FitResult:
  """What `fit` returns.

  Attributes:
    state: the state after the last epoch run.
    best_params: params at the best evaluation (None if nothing was evaluated).
    best_valid: the validation metrics of that evaluation.
    best_epoch: its epoch (0-based), or None.
    epochs_run: epochs completed, counting those before a resume.
    train_epoch_s: wall seconds of each epoch's training (device work included).
    eval_s: wall seconds of each evaluation.
    history: one row per epoch, as written to `log.jsonl`.
    stopped_early: whether early stopping ended the run.
  """
  state: TrainState
  best_params: Any
  best_valid: dict[str, float]
  best_epoch: int | None
  epochs_run: int
  train_epoch_s: list[float]
  eval_s: list[float]
  history: list[dict]
  stopped_early: bool


def _fresh_book() -> dict:
  """The JSON bookkeeping saved with every checkpoint; "epoch" is the last completed one."""
  return {"epoch": -1, "best_value": None, "best_epoch": None, "best_valid": {}, "bad_evals": 0,
          "stopped_early": False, "history": [], "train_epoch_s": [], "eval_s": []}


@jax.jit
def _add_step_loss(acc, loss, grad_norm, index):
  """Adds a step's loss on device; also records the first step whose loss or gradient is not finite (a
  finite loss with a non-finite gradient has already spoilt the parameters that step returns).

  acc: `(loss sum [], first non-finite step index [] or -1)`.
  """
  total, bad = acc
  bad = jnp.where((bad < 0) & ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm)), index, bad)
  return total + loss.astype(jnp.float32), bad


def _train_epoch(state, train_step, batches: Iterable[dict], bar: ProgressBar):
  """Runs one epoch; returns `(state, loss sum, first bad step or -1, steps, seconds)`."""
  start = time.perf_counter()
  acc = (jnp.zeros((), jnp.float32), jnp.full((), -1, jnp.int32))
  steps = 0
  with bar:
    for batch in batches:
      state, metrics = train_step(state, batch)
      acc = _add_step_loss(acc, metrics["loss"], metrics.get("grad_norm", metrics["loss"]), steps)
      steps += 1
      bar.update()
    total, bad = jax.device_get(acc)  # the one host sync of the epoch
    jax.block_until_ready(state)
  return state, float(total), int(bad), steps, time.perf_counter() - start


def _record_eval(book: dict, epoch: int, valid: dict, valid_metric: str, patience: int,
                 higher_is_better: bool = True, replace: bool = False) -> bool:
  """Updates the best / early-stopping bookkeeping; returns whether this evaluation is the best.

  RecBole's rule (`stopping_step` = patience): a value >= the best so far (<= when lower is better,
  as RecBole's `valid_metric_bigger: False`) is an improvement (ties included); the run stops once
  more than `patience` evaluations in a row are not. `replace`: this evaluation is the best, whatever
  came before.
  """
  if valid_metric not in valid:
    raise TrainingError(f"valid_metric {valid_metric!r} is not among the evaluation metrics {sorted(valid)}")
  value = valid[valid_metric]
  best = book["best_value"]
  if replace or (math.isfinite(value) and (best is None or (value >= best if higher_is_better else value <= best))):
    book.update(best_value=value, best_epoch=epoch, best_valid=valid, bad_evals=0)
    return True
  book["bad_evals"] += 1
  book["stopped_early"] = book["bad_evals"] > patience
  return False


def _describe(row: dict, improved: bool) -> str:
  line = f"epoch {row['epoch']:4d}  train_loss {row['train_loss']:.5f}  ({row['train_epoch_s']:.2f}s)"
  if "valid" in row:
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in row["valid"].items())
    line += f"  valid: {metrics}  ({row['eval_s']:.2f}s)" + ("  *best" if improved else "")
  return line


# The type of each entry of `_fresh_book`, as a restored checkpoint must hold it.
_BOOK_TYPES = {"epoch": int, "best_epoch": (int, type(None)), "best_value": (int, float, type(None)),
               "best_valid": dict, "bad_evals": int, "stopped_early": bool, "history": list, "train_epoch_s": list,
               "eval_s": list}


def _check_book(book, folder) -> None:
  """DataError naming `folder` when a checkpoint's bookkeeping (`meta`, a dict) lacks a key of `_fresh_book` or holds
  another type there (a damaged or hand-edited file)."""
  for key, types in _BOOK_TYPES.items():
    if key not in book or not isinstance(book[key], types) or (types is int and isinstance(book[key], bool)):
      raise DataError(folder, f"the checkpoint's meta has no valid {key!r} (got {book.get(key)!r}): damaged or "
                              "edited; resume from an earlier checkpoint or start afresh")


def _resume(ckpt: Checkpointer, state, log) -> tuple[Any, dict, Any]:
  """Restores `(state, book, best_params)` from `ckpt`, or returns the inputs if it is empty."""
  try:
    restored = ckpt.restore_latest(state)
  except ValueError as e:   # a stored shape differs from this run's
    raise TrainingError(f"resume: the checkpoint in {ckpt.directory} does not fit this run: {e} (was it trained on "
                        "other data, e.g. another --data-dir, or with another model size?)") from None
  if restored is None:
    log(f"resume: no checkpoint in {ckpt.directory}, starting from epoch 0")
    return state, _fresh_book(), None
  epoch, state, book = restored
  _check_book(book, ckpt.directory / "latest" / str(epoch))
  best_params = None
  if book["best_epoch"] == epoch and ckpt.best_epoch() != epoch:
    # killed between saving latest and best: the latest state is the best one
    ckpt.save_best(epoch, state, book)
    best_params = jax.tree.map(jnp.copy, state.params)
  elif book["best_epoch"] is not None:
    best = ckpt.restore_best(state)
    if best is None:   # the run would go on without its best model and end with nothing to test
      raise TrainingError(f"resume: epoch {epoch}'s bookkeeping names epoch {book['best_epoch']} the best, but "
                          f"{ckpt.directory / 'best'} holds no checkpoint (removed?); restore it or start a new run")
    best_params = best[0].params
  log(f"resume: restored epoch {epoch} from {ckpt.directory}")
  return state, book, best_params


def fit(state: TrainState, train_step: Callable, batches: Callable[[int], Iterable[dict]],
        evaluate: Callable[[Any], dict[str, float]], *, epochs: int, eval_every: int = 1,
        valid_metric: str = "mrr@10", higher_is_better: bool = True, patience: int = 10, final_only: bool = False,
        out_dir=None, resume: bool = False, keep: int = 3, plot: bool = True, steps_per_epoch: int | None = None,
        on_epoch: Callable[[int, TrainState, dict], None] | None = None,
        log: Callable[[str], None] = print) -> FitResult:
  """Trains for up to `epochs` epochs with validation, early stopping and checkpoints.

  Epoch `e` (0-based) runs `train_step` over `batches(e)`; every `eval_every` epochs and at the
  last epoch, `evaluate(state.params)` returns metrics (`higher_is_better` says which way
  `valid_metric` improves). `final_only`: only the last epoch is evaluated and its model is the
  best, even over an evaluation saved by a shorter run this one resumes (a protocol whose "valid"
  set is its test set must select nothing on it).
  With `out_dir`: `log.jsonl` (one row per epoch; its `train_loss` is the mean of the epoch's step losses,
  so a short last batch counts as much as a full one), `checkpoints/latest/<epoch>` every epoch,
  `checkpoints/best/<epoch>`, and `curves.png` at the end. A resumed run (`resume=True`)
  continues after the newest checkpoint and, when `batches(e)` depends only on the seed and
  `e`, ends with the same state, history and log rows as an uninterrupted one (timings aside).

  Args:
    state: the initial state (donated to `train_step`: use the returned one); when resuming,
      a template for the restored one.
    train_step: `step(state, batch) -> (state, metrics)` with a scalar `metrics["loss"]`.
    batches: `batches(epoch) -> iterable of batches`.
    evaluate: `evaluate(params) -> {metric: float}`.
    epochs: the total number of epochs, counting those before a resume.
    patience: RecBole's `stopping_step`; see `_record_eval`.
    final_only: evaluate only the last epoch, and take its model (see above).
    keep: how many latest checkpoints to keep.
    plot: write `out_dir/curves.png` at the end (skipped with a message without matplotlib).
    steps_per_epoch: progress-bar total (defaults to `len(batches(e))` or the last epoch's count).
    on_epoch: called as `on_epoch(epoch, state, row)` after the epoch is logged and saved.
    log: receives one human-readable line per epoch.

  Raises:
    TrainingError: a non-finite training loss or gradient norm (nothing of that epoch is saved, earlier
      checkpoints are kept), an unknown `valid_metric`, or a fresh run into an `out_dir` that
      already holds checkpoints.
  """
  if resume and out_dir is None:
    raise ValueError("resume=True needs out_dir")
  book, best_params, ckpt, logger = _fresh_book(), None, None, None
  if out_dir is not None:
    out_dir = Path(out_dir)
    ckpt = Checkpointer(out_dir / "checkpoints", keep=keep)
    if resume:
      try:
        state, book, best_params = _resume(ckpt, state, log)
      except Exception:
        ckpt.close()
        raise
    elif ckpt.latest_epochs():
      ckpt.close()
      raise TrainingError(f"{out_dir} already holds checkpoints: pass resume=True or use a new directory")
    if jax.process_index() == 0:   # one log per run; every process saves its shards of the checkpoints
      logger = JsonlLogger(out_dir / "log.jsonl", append=resume, last_epoch=book["epoch"])
  try:
    for epoch in range(book["epoch"] + 1, epochs):
      if book["stopped_early"]:
        break
      epoch_batches = batches(epoch)
      total = len(epoch_batches) if hasattr(epoch_batches, "__len__") else steps_per_epoch
      bar = ProgressBar(total, desc=f"epoch {epoch}")
      state, loss_sum, bad, steps, train_s = _train_epoch(state, train_step, epoch_batches, bar)
      steps_per_epoch = steps_per_epoch or steps
      if steps == 0:
        raise TrainingError(f"batches({epoch}) yielded no batches")
      if bad >= 0 or not math.isfinite(loss_sum):
        kept = f"; the checkpoint of epoch {book['epoch']} is kept" if ckpt and book["epoch"] >= 0 else ""
        where = f" at step {bad} of the epoch (global step {int(state.step) - steps + bad})" if bad >= 0 else ""
        raise TrainingError(f"non-finite training loss or gradient in epoch {epoch}{where}{kept}")
      row = {"epoch": epoch, "train_loss": loss_sum / steps, "train_epoch_s": train_s}
      book["train_epoch_s"].append(train_s)
      improved = False
      if epoch == epochs - 1 or ((epoch + 1) % eval_every == 0 and not final_only):
        start = time.perf_counter()
        valid = {k: float(v) for k, v in evaluate(state.params).items()}
        row.update(eval_s=time.perf_counter() - start, valid=valid)
        book["eval_s"].append(row["eval_s"])
        improved = _record_eval(book, epoch, valid, valid_metric, patience, higher_is_better, replace=final_only)
        if improved:
          best_params = jax.tree.map(jnp.copy, state.params)  # the next step donates state.params
      book["epoch"] = epoch
      book["history"].append(row)
      log(_describe(row, improved))
      if logger:
        logger.write(row)
      if ckpt:
        ckpt.save_latest(epoch, state, book)
        if improved:
          ckpt.save_best(epoch, state, book)
      if on_epoch:
        on_epoch(epoch, state, row)
    if book["stopped_early"]:
      log(f"early stop after epoch {book['epoch']}: no improvement of {valid_metric} in "
          f"{book['bad_evals']} evaluations (best {book['best_value']} at epoch {book['best_epoch']})")
  finally:
    if logger:
      logger.close()
    if ckpt:
      ckpt.close()
  if out_dir is not None and plot and jax.process_index() == 0:
    plot_curves(book["history"], out_dir / "curves.png", log=log)
  return FitResult(state=state, best_params=best_params, best_valid=book["best_valid"],
                   best_epoch=book["best_epoch"], epochs_run=book["epoch"] + 1,
                   train_epoch_s=book["train_epoch_s"], eval_s=book["eval_s"], history=book["history"],
                   stopped_early=book["stopped_early"])
