"""Run logging: a JSONL metrics file, a dependency-free progress bar, and a PNG of the curves."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np


def _read_rows(path: Path) -> list[dict]:
  """The JSON-object lines of `path`; a line cut short by a killed writer, or any other damaged line, is dropped."""
  rows = []
  for line in path.read_text(errors="replace").splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict):
      rows.append(row)
  return rows


def json_line(obj, **kwargs) -> str:
  """Strict JSON of `obj` (numpy scalars and arrays as numbers and lists) with every non-finite float written
  as null: a diverged metric reads as "none", and any JSON parser reads the file (Python writes NaN)."""
  def plain(x):
    if isinstance(x, (np.generic, np.ndarray)):
      x = x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
      return None
    if isinstance(x, dict):
      return {k: plain(v) for k, v in x.items()}
    return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x
  return json.dumps(plain(obj), allow_nan=False, **kwargs)


def write_atomic(path: Path, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename: a reader, or a kill, never sees half of it."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


class JsonlLogger:
  """Appends one JSON object per line, flushed after every write.

  Args:
    path: the log file; its directory is created if missing.
    append: keep the existing rows (a resumed run); otherwise start an empty file.
    last_epoch: with `append`, first drop rows whose "epoch" is beyond this one, so that a run
      resumed from epoch `last_epoch` ends with the same rows as an uninterrupted run.
  """

  def __init__(self, path, append: bool = False, last_epoch: int | None = None):
    self.path = Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if append and self.path.exists():
      rows = _read_rows(self.path)
      if last_epoch is not None:
        rows = [r for r in rows if type(r.get("epoch")) is int and r["epoch"] <= last_epoch]
      write_atomic(self.path, "".join(json_line(r) + "\n" for r in rows))
    self._file = open(self.path, "a" if append else "w")

  def write(self, row: dict) -> None:
    self._file.write(json_line(row) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> JsonlLogger:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class ProgressBar:
  """A one-line `\\r` progress bar on stderr, drawn only when stderr is a terminal.

  Args:
    total: the number of steps (None if unknown: shows a counter only).
    desc: a prefix such as "epoch 3".
    enabled: force on or off; None means "stderr is a TTY".
  """

  def __init__(self, total: int | None, desc: str = "", enabled: bool | None = None, width: int = 30):
    self.total, self.desc, self.width, self.n = total, desc, width, 0
    self.enabled = sys.stderr.isatty() if enabled is None else enabled
    self._start = self._drawn = time.perf_counter()

  def update(self, n: int = 1) -> None:
    self.n += n
    now = time.perf_counter()
    if self.enabled and (now - self._drawn >= 0.1 or self.n == self.total):
      self._drawn = now
      sys.stderr.write("\r" + self.render(now - self._start))
      sys.stderr.flush()

  def render(self, elapsed: float) -> str:
    rate = self.n / elapsed if elapsed > 0 else 0.0
    if self.total:
      filled = int(self.width * min(self.n, self.total) / self.total)
      bar = "#" * filled + "." * (self.width - filled)
      return f"{self.desc} [{bar}] {self.n}/{self.total} {rate:.1f} it/s"
    return f"{self.desc} {self.n} {rate:.1f} it/s"

  def close(self) -> None:
    """Clears the line so that the caller's next message starts clean."""
    if self.enabled:
      sys.stderr.write("\r" + " " * (len(self.render(1.0)) + 8) + "\r")
      sys.stderr.flush()

  def __enter__(self) -> ProgressBar:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def plot_curves(log_rows: list[dict], path, log: Callable[[str], None] = print) -> bool:
  """Writes a PNG: train loss per epoch (left) and each validation metric (right).

  Args:
    log_rows: rows as written by `fit` ("epoch", "train_loss", optional "valid" dict).
    path: the PNG to write.
    log: receives one line if the plot is skipped.

  Returns:
    True if written; False (after one message) when matplotlib is not installed.
  """
  try:  # the Agg canvas directly: no pyplot, no global backend switch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError:
    log("plot skipped: matplotlib is not installed (pip install recjax[plot])")
    return False
  fig = Figure(figsize=(10, 4), layout="tight")
  FigureCanvasAgg(fig)
  loss_ax, valid_ax = fig.subplots(1, 2)
  train = [r for r in log_rows if "train_loss" in r]
  loss_ax.plot([r["epoch"] for r in train], [r["train_loss"] for r in train], marker=".")
  loss_ax.set(xlabel="epoch", ylabel="train loss", title="training")
  evals = [r for r in log_rows if r.get("valid")]
  names = list(dict.fromkeys(k for r in evals for k in r["valid"]))
  for name in names:
    pts = [(r["epoch"], r["valid"][name]) for r in evals if name in r["valid"]]
    valid_ax.plot(*zip(*pts), marker=".", label=name)
  valid_ax.set(xlabel="epoch", ylabel="metric", title="validation")
  if names:
    valid_ax.legend(fontsize="small")
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp.png")
  fig.savefig(tmp, dpi=100)
  os.replace(tmp, path)
  return True
