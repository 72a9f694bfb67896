"""Errors recjax raises on bad input; each says what was wrong and where. `exit_on_error` reports them as a
script's one-line error."""
from __future__ import annotations

import os
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class RecjaxError(Exception):
  """Base class: the CLI prints these as one line and exits non-zero."""


class DataError(RecjaxError):
  """Malformed or inconsistent data: names the file, the line (1-based) when known, and the problem."""

  def __init__(self, path, message: str, line: int | None = None):
    self.path, self.line, self.message = str(path), line, message
    where = f"{self.path}:{line}" if line is not None else self.path
    super().__init__(f"{where}: {message}")


class ConfigError(RecjaxError):
  """Unknown or mistyped configuration key, unknown model / dataset / loss name."""


class TrainingError(RecjaxError):
  """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class UnknownIdError(RecjaxError, KeyError):
  """A raw user or item id the data does not hold (a KeyError too, as a failed lookup)."""

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else ""


def exit_on_error(main: Callable[..., T], *args, prog: str | None = None, **kwargs) -> T:
  """Runs a script's entry point `main(*args, **kwargs)` and returns what it returns. Bad input (a RecjaxError, or
  an OSError: a path that cannot be read or written) prints as one line `PROG: error: MESSAGE` on stderr and exits
  with status 2, without a traceback, as the `recjax` command and argparse's usage errors do; any other exception
  (a bug) goes through with its traceback. `prog`: by default the script's file name, as argparse names it."""
  try:
    return main(*args, **kwargs)
  except (RecjaxError, OSError) as e:
    print(f"{prog or os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
