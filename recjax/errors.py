"""Errors recjax raises on bad input; each says what was wrong and where."""
from __future__ import annotations


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
