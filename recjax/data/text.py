"""Item text features: a text per item from the dataset's side columns, encoded once and cached.

`item_texts(inter, fields)` writes one text per dense item id (row 0, the padding item, is ""):
the first field verbatim (a `token_seq` title joined by spaces, as it was in the file), then
"label: value" for each further field (`token_seq` values joined by ", "), parts joined by ". ".
ml-100k: "Toy Story. year: 1995. genres: Animation, Children's, Comedy".

`item_text_vectors(inter, model, fields, cache_dir)` encodes those texts with a BERT-family
checkpoint (`recjax.nn.text`) into `[num_items, d]` float32 (row 0 and items without text are 0)
and caches the array under `cache_dir` (default `$RECJAX_CACHE/text`, else `~/.cache/recjax/text`),
keyed by the checkpoint's file hash and the texts, so a second run reads it instead of encoding.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from recjax.data.interactions import Interactions
from recjax.errors import ConfigError, DataError

# Columns tried, in this order, when no `fields` are given (the first present one leads the text).
DEFAULT_FIELDS = ("movie_title", "title", "name", "release_year", "year", "genres", "class", "categories",
                  "brand", "description")
LABELS = {"release_year": "year", "class": "genres"}


@dataclasses.dataclass(frozen=True)
class ItemTexts:
  """Encoded item texts: `vectors [num_items, d]` float32 (row 0 = 0), `texts [num_items]`, the
  `fields` used, and the cache file `path` they are kept in."""
  vectors: np.ndarray
  texts: tuple[str, ...]
  fields: tuple[str, ...]
  path: Path


def text_fields(inter: Interactions, fields: Sequence[str] | None = None) -> tuple[str, ...]:
  """The item columns a text is built from: `fields` (checked), or the `DEFAULT_FIELDS` present."""
  columns = inter.item_features
  if not columns:
    raise DataError(inter.name or "dataset", "has no item side file (RecBole's .item; MovieLens' u.item or "
                    "movies.*): item texts are built from its columns")
  if fields is None:
    chosen = tuple(f for f in DEFAULT_FIELDS if f in columns)
    if not chosen:
      raise DataError(inter.name or "dataset", f"no item column to build texts from (have {sorted(columns)}; "
                      f"looked for {list(DEFAULT_FIELDS)}); name them with text.fields")
    return chosen
  unknown = [f for f in fields if f not in columns]
  if unknown or not fields:
    raise ConfigError(f"text.fields: {list(fields)} — unknown item column(s) {unknown}; "
                      f"{inter.name or 'the dataset'} has {sorted(columns)}")
  return tuple(fields)


def _value(value, joiner: str) -> str:
  if isinstance(value, (tuple, list, np.ndarray)):
    return joiner.join(str(v) for v in value)
  if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
    return ""   # a missing number (floats are stored as float32, NaN when absent)
  if isinstance(value, (float, np.floating)) and float(value).is_integer():
    return str(int(value))   # 1995, not 1995.0
  return str(value)


def item_texts(inter: Interactions, fields: Sequence[str] | None = None) -> tuple[str, ...]:
  """One text per dense item id (see the module docstring); "" for row 0 and items with no values."""
  fields = text_fields(inter, fields)
  texts = []
  for item in range(inter.num_items):
    parts = []
    for i, field in enumerate(fields):
      value = _value(inter.item_features[field][item], " " if i == 0 else ", ")
      if value:
        parts.append(value if i == 0 else f"{LABELS.get(field, field)}: {value}")
    texts.append(". ".join(parts) if item else "")
  return tuple(texts)


def cache_dir(path: str | os.PathLike | None = None) -> Path:
  """Where encoded texts are kept: `path`, else `$RECJAX_CACHE/text`, else `~/.cache/recjax/text`."""
  if path is not None:
    return Path(path).expanduser()
  root = os.environ.get("RECJAX_CACHE")
  return (Path(root).expanduser() if root else Path.home() / ".cache" / "recjax") / "text"


def cache_key(fingerprint: str, texts: Sequence[str]) -> str:
  """sha256 of the checkpoint's fingerprint and the texts: equal inputs, equal vectors."""
  digest = hashlib.sha256(fingerprint.encode())
  digest.update(json.dumps(list(texts)).encode())
  return digest.hexdigest()


def _save_atomic(path: Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")   # one per process: concurrent writers never share it
  try:
    np.save(tmp, array)
    os.replace(tmp, path)
  except BaseException:   # an interrupted or failed write leaves nothing behind
    tmp.unlink(missing_ok=True)
    raise


def item_text_vectors(inter: Interactions, model: str, fields: Sequence[str] | None = None,
                      cache: str | os.PathLike | None = None, batch_size: int = 256, encoder=None) -> ItemTexts:
  """The items' text vectors `[num_items, d]`, read from the cache or encoded (then cached).

  Args:
    inter: any part over the dataset's vocabularies (features cover every dense item id).
    model: a checkpoint directory or "minilm" (see `recjax.nn.text.checkpoint_dir`).
    fields: item columns (see `text_fields`).
    cache: the cache directory (see `cache_dir`).
    encoder: an already loaded `recjax.nn.text.TextEncoder` of `model`; otherwise the weights are
      loaded only when the cache misses (a hit hashes the checkpoint's files, nothing more).
  """
  from recjax.nn import text  # the text extra is needed only here

  fields = text_fields(inter, fields)
  texts = item_texts(inter, fields)
  key = cache_key(encoder.fingerprint if encoder else text.checkpoint_fingerprint(model), texts)
  path = cache_dir(cache) / f"{key[:32]}.npy"
  vectors = _load_cached(path, len(texts))
  if vectors is None:
    path.parent.mkdir(parents=True, exist_ok=True)   # a cache folder that cannot be made fails before the encoding
    encoder = encoder or text.load_text_encoder(model)
    rows = np.flatnonzero([bool(t) for t in texts])
    vectors = np.zeros((len(texts), encoder.dim), np.float32)
    vectors[rows] = text.encode(encoder, [texts[i] for i in rows], batch_size=batch_size)
    _save_atomic(path, vectors)
  return ItemTexts(vectors, texts, fields, path)


def _load_cached(path: Path, rows: int) -> np.ndarray | None:
  """The cached `[rows, d]` float32 array at `path`, or None when absent, damaged or of other rows."""
  if not path.is_file():
    return None
  try:
    vectors = np.load(path)
  except (ValueError, OSError, EOFError):   # a damaged (or empty) entry is encoded again
    return None
  return vectors if vectors.ndim == 2 and len(vectors) == rows and vectors.dtype == np.float32 else None
