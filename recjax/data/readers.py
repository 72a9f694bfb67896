"""Format readers: raw files -> `Interactions`.

Every reader parses with pandas (C engine) on the fast path and, only when something is wrong,
re-scans the text line by line to name the exact file and 1-based line in a `DataError`.
Raw ids are kept as str tokens, without the spaces and tabs around them (`"196 "` is user `"196"`); dense ids are
numbered 1.. in order of first appearance. Files are UTF-8 (or latin-1); UTF-16/UTF-32 files are refused.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.tseries.api import guess_datetime_format

from recjax.data.interactions import Interactions, build_vocab, float32_overflow, from_columns
from recjax.errors import ConfigError, DataError

_SUB = "\x1f"   # stands in for multi-character separators such as "::"
ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")
_INTER_FIELDS = {"user_id": "token", "item_id": "token", "timestamp": "float", "rating": "float"}
_ID_FIELDS = ("user_id", "item_id")   # stripped of surrounding spaces and tabs, in every file that has them


def _object_array(values: list) -> np.ndarray:
  out = np.empty(len(values), dtype=object)
  out[:] = values
  return out


@dataclasses.dataclass(frozen=True)
class _Field:
  name: str
  kind: str                 # token | token_seq | float | float_seq
  required: bool = False    # an empty value is an error
  float32: bool = False     # kept as float32 (rating, features): a value beyond its range is an error


# ----------------------------------------------------------------------------- generic parsing

# Byte-order marks of the wide encodings, UTF-32's first (UTF-32 LE's begins with UTF-16 LE's).
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
              (b"\xfe\xff", "UTF-16"))


def _read_text(path: Path) -> str:
  """File contents as str: UTF-8 (a byte-order mark dropped), falling back to latin-1 (MovieLens ships latin-1 files).

  Every reader decodes through here. A UTF-16/UTF-32 file (its byte-order mark, or NUL bytes in the first line) is a
  DataError: decoded as latin-1 it would become text with a NUL after every character, misread field by field.
  """
  try:
    raw = path.read_bytes()
  except FileNotFoundError:
    raise DataError(path, "file not found") from None
  except OSError as exc:   # a directory, no permission, ...
    raise DataError(path, f"cannot read: {exc.strerror or exc}") from None
  end = raw.find(b"\n")
  wide = next((name for bom, name in _WIDE_BOMS if raw.startswith(bom)), None)
  if wide or b"\0" in (raw[:end + 2] if end >= 0 else raw):   # + 2: UTF-16's "\n" may be "\n\0"
    why = f"it starts with a {wide} byte-order mark" if wide else "NUL bytes in its first line: UTF-16 or UTF-32?"
    source = wide or ("UTF-16LE" if raw[1:2] == b"\0" else "UTF-16BE")   # "a\0" or "\0a"
    raise DataError(path, f"not UTF-8 text ({why}): convert it, e.g. iconv -f {source} -t UTF-8 {path.name} > "
                    f"utf8-{path.name}")
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    text = raw.decode("latin-1")
  return text.removeprefix("\ufeff")


# A number as the C parser reads one (ASCII digits; Python's float() also takes "nan", "1_000", other scripts' digits).
_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*", re.ASCII)
_BOOL_WORD = re.compile(r"(?i)\b(true|false)\b")


def _check_number(value: str, float32: bool = False) -> str | None:
  """Why one raw number is invalid (not a decimal number, not finite, beyond float32 when kept so), or None."""
  if not _NUMBER.fullmatch(value):
    return "is not a number"
  if not np.isfinite(float(value)):
    return "is not a finite number"
  if float32 and float32_overflow(np.array([float(value)]))[0]:
    return "is out of float32 range"
  return None


def _spaces(sep: str) -> str:
  """The blanks of a line or around an id: spaces and tabs, the separator excluded."""
  return " \t".replace(sep, "")


def _split_seq(value: str, seq_sep: str) -> list[str]:
  """A token_seq / float_seq value's parts: split at `seq_sep` (" ": at any run of spaces), each stripped of
  spaces, empty parts dropped."""
  return value.split() if seq_sep == " " else [part.strip() for part in value.split(seq_sep) if part.strip()]


def _check_value(field: _Field, value: str, sep: str, seq_sep: str = " ") -> str | None:
  """Why one raw value is invalid for its field, or None (an id as read: without surrounding blanks)."""
  if field.name in _ID_FIELDS:
    value = value.strip(_spaces(sep))
  if value == "":
    return "missing value" if field.required else None
  if field.kind == "float":
    why = _check_number(value, field.float32)
  elif field.kind == "float_seq":   # kept as float32
    why = next(filter(None, (_check_number(v, float32=True) for v in _split_seq(value, seq_sep))), None)
  else:
    return None
  return why and f"{value!r} {why}"


def _blank(line: str, sep: str) -> bool:
  """Whether pandas skips the line: spaces and tabs only, the separator excluded (a lone tab is two empty fields)."""
  return line.strip(_spaces(sep)) == ""


# A carriage return that ends no line (old Mac line ends, or one inside a line): pandas breaks the line there.
_LONE_CR = re.compile(r"\r(?!\n|\Z)")
_LONE_CR_MESSAGE = "carriage return (\\r) without a line feed: lines must end in \\n or \\r\\n"


def _lone_cr(text: str, start: int) -> bool:
  """Whether a lone carriage return (`_LONE_CR`) follows `start`."""
  return _LONE_CR.search(text, start) is not None


def _check_no_lone_cr(path: Path, text: str) -> None:
  """DataError at the line of the first lone carriage return."""
  found = _LONE_CR.search(text)
  if found:
    raise DataError(path, _LONE_CR_MESSAGE, line=text.count("\n", 0, found.start()) + 1)


def _locate(path: Path, text: str, fields: list[_Field], sep: str, header: int, quoted: bool,
            problem: str, seq_sep: str = " ") -> DataError:
  """Slow path, only on bad input: the first offending line as a DataError."""
  display_sep = "::" if sep == _SUB else sep
  for number, line in enumerate(text.split("\n")[header:], start=header + 1):
    line = line.removesuffix("\r")
    if "\r" in line:
      return DataError(path, _LONE_CR_MESSAGE, line=number)
    if _blank(line, sep):
      continue
    values = next(csv.reader([line], delimiter=sep)) if quoted else line.split(sep)
    if len(values) != len(fields):
      names = ", ".join(f.name for f in fields)
      return DataError(path, f"expected {len(fields)} fields separated by {display_sep!r} ({names}), found "
                       f"{len(values)}", line=number)
    for field, value in zip(fields, values):
      why = _check_value(field, value, sep, seq_sep)
      if why:
        return DataError(path, f"field {field.name!r}: {why}", line=number)
  return DataError(path, f"could not parse: {problem}")


def _parse_table(path: Path, text: str, fields: list[_Field], sep: str, *, header: int = 0,
                 quoted: bool = False, seq_sep: str = " ") -> dict[str, np.ndarray]:
  """Typed columns of a delimited text with exactly len(fields) fields per non-blank line.

  Returns: {field name: [n] array}: token -> object str (user_id, item_id without surrounding spaces and tabs),
    float -> float64 (empty -> NaN), token_seq -> object tuples, float_seq -> object float32 arrays (both split
    at `seq_sep`, `_split_seq`).
  """
  if len(sep) > 1:
    text, sep = text.replace(sep, _SUB), _SUB
  assert header in (0, 1)
  start = 0 if header == 0 else (text.find("\n") + 1 or len(text))   # offset of the first data line
  if text[start:].strip() == "":
    raise DataError(path, "no data lines after the header" if header else "file is empty", line=max(header, 1))
  kinds = {i: np.float64 if f.kind == "float" else str for i, f in enumerate(fields)}
  try:
    df = _read_csv(text, sep, header, quoted, dtype=kinds,
                   na_values={i: [""] for i, f in enumerate(fields) if f.kind == "float"})
  except (ValueError, TypeError, pd.errors.ParserError) as exc:
    raise _locate(path, text, fields, sep, header, quoted, str(exc), seq_sep) from None
  if any(c in text for c in _spaces(sep)):   # else nothing to strip (ratings files): skip the pass over the ids
    for i in (i for i, f in enumerate(fields) if f.name in _ID_FIELDS and i in df.columns):
      df[i] = df[i].str.strip(_spaces(sep))
  ok = df.shape[1] == len(fields) and not _lone_cr(text, start)
  # No row has too many fields (else pandas raised), so equal totals mean every row is complete. Quoted
  # fields may hold the separator, so there each row is counted (quoted files are small: movies.csv).
  if quoted:
    ok = ok and all(len(row) == len(fields) for row in csv.reader(io.StringIO(text[start:]), delimiter=sep) if row)
  else:
    ok = ok and text.count(sep, start) == (len(fields) - 1) * len(df)
  for i, f in enumerate(fields):
    if ok and f.required:
      ok = not (df[i].isna().any() if f.kind == "float" else (df[i] == "").any())
    if ok and f.kind == "float":   # "inf", "1e400" are read, and a column of only True/False as 1/0: not data
      x = df[i].to_numpy(np.float64)
      ok = not np.isinf(x).any() and not (f.float32 and float32_overflow(x).any())
      if ok and ((x == 0) | (x == 1) | np.isnan(x)).all() and _BOOL_WORD.search(text, start):
        ok = not _bool_words(text, sep, header, quoted, i)
  if not ok:
    raise _locate(path, text, fields, sep, header, quoted, "inconsistent fields", seq_sep)
  try:
    return {f.name: _convert(df[i], f.kind, seq_sep) for i, f in enumerate(fields)}
  except ValueError as exc:
    raise _locate(path, text, fields, sep, header, quoted, str(exc), seq_sep) from None


def _read_csv(text: str, sep: str, header: int, quoted: bool, **kwargs) -> pd.DataFrame:
  return pd.read_csv(io.StringIO(text), sep=sep, header=None, skiprows=header, keep_default_na=False, engine="c",
                     quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE, skip_blank_lines=True, **kwargs)


def _bool_words(text: str, sep: str, header: int, quoted: bool, column: int) -> bool:
  """Whether a column read as float holds the words True/False, which pandas reads as 1/0."""
  raw = _read_csv(text, sep, header, quoted, usecols=[column], dtype=str)[column]
  return raw.str.lower().isin(("true", "false")).any()


def _convert(column: pd.Series, kind: str, seq_sep: str = " ") -> np.ndarray:
  if kind == "float":
    return column.to_numpy(np.float64)
  if kind == "token_seq":
    return _object_array([tuple(_split_seq(v, seq_sep)) for v in column])
  if kind == "float_seq":   # numbers as the float columns take them: no "nan", "inf", "1_000"; float32 range
    parts = column.str.split() if seq_sep == " " else column.map(lambda v: _split_seq(v, seq_sep))
    x = pd.to_numeric(parts.explode().dropna()).to_numpy(np.float64)   # an empty list explodes to one NaN
    if not np.isfinite(x).all() or float32_overflow(x).any():
      raise ValueError("a float_seq value is not finite or beyond float32")
    return _object_array(np.split(x.astype(np.float32), np.cumsum(parts.str.len())[:-1]))
  return column.to_numpy(object)


def _row_lines(text: str, header: int, sep: str) -> np.ndarray:
  """1-based line numbers of the lines pandas reads as rows, after the header (error messages only)."""
  lines = text.split("\n")
  return np.array([i + 1 for i in range(header, len(lines)) if not _blank(lines[i].removesuffix("\r"), sep)])


def _features(path: Path, text: str, columns: dict[str, np.ndarray], key: str, header: int, sep: str) -> dict:
  """{feature: {raw id: value}} from parsed columns; a repeated id is a DataError."""
  keys = columns.pop(key)
  uniq, first = np.unique(keys.astype(str), return_index=True)
  if len(uniq) != len(keys):
    dup = np.setdiff1d(np.arange(len(keys)), first)[0]
    raise DataError(path, f"{key} {str(keys[dup])!r} appears twice", line=int(_row_lines(text, header, sep)[dup]))
  return {name: dict(zip(keys, values)) for name, values in columns.items()}


# ----------------------------------------------------------------------------- RecBole atomic files

def _atomic_header(path: Path, text: str, inter: bool) -> list[_Field]:
  """Fields of a typed header `name:type<TAB>...`; on .inter files the id columns are required."""
  first = text.split("\n", 1)[0].rstrip("\r")
  if first.strip() == "":
    raise DataError(path, "file is empty (expected a header `field:type<TAB>...`)", line=1)
  fields, seen = [], set()
  for entry in first.split("\t"):
    name, colon, kind = entry.partition(":")
    if not colon:
      raise DataError(path, f"header field {entry!r} has no type (expected name:type, type one of "
                      f"{', '.join(ATOMIC_TYPES)})", line=1)
    if kind not in ATOMIC_TYPES:
      raise DataError(path, f"header field {name!r} has unknown type {kind!r} (expected one of "
                      f"{', '.join(ATOMIC_TYPES)})", line=1)
    if name in seen:
      raise DataError(path, f"header field {name!r} appears twice", line=1)
    seen.add(name)
    if inter and name in _INTER_FIELDS:   # the mapped fields are read with their own meaning
      fields.append(_Field(name, _INTER_FIELDS[name], required=True, float32=name == "rating"))
    elif name in _ID_FIELDS:              # ids are tokens whatever the declared type, to match the .inter's
      fields.append(_Field(name, "token", required=True))
    else:                                 # features are float32, other .inter columns float64
      fields.append(_Field(name, kind, float32=not inter))
  return fields


def _read_atomic_file(path: Path, required: tuple[str, ...], inter: bool,
                      seq_sep: str = " ") -> tuple[str, dict[str, np.ndarray]]:
  text = _read_text(path)
  fields = _atomic_header(path, text, inter)
  for name in required:
    if name not in [f.name for f in fields]:
      raise DataError(path, f"missing column {name!r} (header has {', '.join(f.name for f in fields)})", line=1)
  return text, _parse_table(path, text, fields, "\t", header=1, seq_sep=seq_sep)


def _check_shared_ids(path: Path, ids: np.ndarray, inter_path: Path, inter_ids: np.ndarray, kind: str) -> None:
  """A feature file none of whose ids [n] appear among the interactions' is a DataError: its ids are written another
  way ("m1" or "1.0" for "1") and every feature would silently be empty. Some unseen ids are fine (RecBole's .item
  files list items nobody interacted with)."""
  if not pd.Series(ids).isin(pd.unique(inter_ids)).any():
    show = lambda x: ", ".join(repr(str(v)) for v in pd.unique(x[:1000])[:2])
    raise DataError(path, f"none of its {len(ids)} {kind} ids appear in {inter_path.name} ({path.name}: {show(ids)}; "
                    f"{inter_path.name}: {show(inter_ids)}): write the ids the same way in both")


def read_atomic(directory: str | Path, name: str, seq_separator: str = " ") -> Interactions:
  """RecBole atomic files `{name}.inter` (required), `{name}.item`, `{name}.user` (optional).

  Headers are typed `field:type` (token, token_seq, float, float_seq), fields tab separated, the parts of a
  token_seq / float_seq value separated by `seq_separator` (RecBole's option of that name; default a space: any
  run of spaces; with another, "Action, Comedy" is two tokens, each part stripped of spaces, empty parts
  dropped). `.inter` fields user_id, item_id, timestamp, rating map to the Interactions columns; other `.inter`
  fields go into `columns`. `.item`/`.user` fields become item/user features aligned to the dense ids (ids only
  present in the feature file are dropped; ids missing from it get padding values; a feature file sharing no id
  with `.inter` is a DataError). user_id and item_id values lose surrounding spaces, in every file, so they still
  match.
  """
  directory = Path(directory)
  inter_path = directory / f"{name}.inter"
  if seq_separator in ("", "\t", "\n", "\r"):
    raise ValueError(f"seq_separator {seq_separator!r}: a sequence's parts need a separator other than the field "
                     "separator (tab) and line ends")
  _, cols = _read_atomic_file(inter_path, ("user_id", "item_id"), inter=True, seq_sep=seq_separator)
  feats = {}
  for kind in ("user", "item"):
    path = directory / f"{name}.{kind}"
    if path.exists():
      text, feat_cols = _read_atomic_file(path, (f"{kind}_id",), inter=False, seq_sep=seq_separator)
      ids = feat_cols[f"{kind}_id"]
      feats[kind] = _features(path, text, feat_cols, f"{kind}_id", header=1, sep="\t")
      _check_shared_ids(path, ids, inter_path, cols[f"{kind}_id"], kind)
  extra = {k: v for k, v in cols.items() if k not in _INTER_FIELDS}
  return from_columns(cols["user_id"], cols["item_id"], timestamp=cols.get("timestamp"), rating=cols.get("rating"),
                      columns=extra, user_features=feats.get("user"), item_features=feats.get("item"), name=name)


# ----------------------------------------------------------------------------- MovieLens raw formats

ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")
_RATING_FIELDS = [_Field("user_id", "token", True), _Field("item_id", "token", True),
                  _Field("rating", "float", True, float32=True), _Field("timestamp", "float", True)]


def _tokens(*names: str) -> list[_Field]:
  return [_Field(n, "token", required=i == 0) for i, n in enumerate(names)]


def _ml100k_items(path: Path) -> dict:
  text = _read_text(path)
  fields = _tokens("item_id", "movie_title", "release_date", "video_release_date", "url", *ML100K_GENRES)
  cols = _parse_table(path, text, fields, "|")
  flags = np.stack([cols.pop(g) == "1" for g in ML100K_GENRES], axis=1)   # [n, 19]
  names = np.array(ML100K_GENRES, dtype=object)
  cols = {"item_id": cols["item_id"], "movie_title": cols["movie_title"],
          "release_year": _object_array([d[-4:] for d in cols["release_date"]]),
          "genres": _object_array([tuple(names[row]) for row in flags])}
  return _features(path, text, cols, "item_id", header=0, sep="|")


def _movies(path: Path, sep: str, header: int, quoted: bool) -> dict:
  """`id<sep>title (year)<sep>Genre|Genre` -> movie_title, release_year, genres."""
  text = _read_text(path)
  cols = _parse_table(path, text, _tokens("item_id", "movie_title", "genres"), sep, header=header, quoted=quoted)
  titles = pd.Series(cols["movie_title"], dtype=object)
  years = titles.str.extract(r"\((\d{4})\)\s*$", expand=False).fillna("")
  genres = [() if g in ("", "(no genres listed)") else tuple(g.split("|")) for g in cols["genres"]]
  cols = {"item_id": cols["item_id"], "movie_title": cols["movie_title"],
          "release_year": years.to_numpy(object), "genres": _object_array(genres)}
  return _features(path, text, cols, "item_id", header=header, sep=sep)


def _users(path: Path, sep: str, names: tuple[str, ...]) -> dict | None:
  """Demographics from an optional users file; None when it is absent."""
  if not path.exists():
    return None
  text = _read_text(path)
  return _features(path, text, _parse_table(path, text, _tokens("user_id", *names), sep), "user_id", 0, sep)


def _check_csv_header(path: Path, text: str, expected: tuple[str, ...]) -> None:
  got = tuple(h.strip() for h in text.split("\n", 1)[0].rstrip("\r").split(","))
  if got[:len(expected)] != expected or len(got) != len(expected):
    raise DataError(path, f"expected header {','.join(expected)}, found {','.join(got)}", line=1)


MOVIELENS_VARIANTS = ("ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-32m")


def read_movielens(directory: str | Path, variant: str) -> Interactions:
  """MovieLens as distributed by GroupLens, from the directory holding the unzipped files.

  ml-100k: `u.data` (user item rating timestamp, tab separated), `u.item` (pipe separated,
    latin-1: title, release date, 19 genre flags), `u.user` (age|gender|occupation|zip).
  ml-1m / ml-10m: `ratings.dat` (`::` separated), `movies.dat` (`id::title (year)::A|B`),
    ml-1m `users.dat` (`id::gender::age::occupation::zip`).
  ml-20m / ml-25m / ml-32m: `ratings.csv` (header userId,movieId,rating,timestamp), `movies.csv`
    (movieId,title,genres, quoted CSV).
  Item features: movie_title (str, as in the file), release_year (str, "" when unknown), genres
  (tuple of str). User features (ml-100k, ml-1m): age, gender, occupation, zip_code (str). User and
  item ids lose surrounding spaces and tabs.
  """
  directory = Path(directory)
  if variant not in MOVIELENS_VARIANTS:
    raise ConfigError(f"unknown MovieLens variant {variant!r}; known: {', '.join(MOVIELENS_VARIANTS)}")
  users = items = None
  if variant == "ml-100k":
    path = directory / "u.data"
    cols = _parse_table(path, _read_text(path), _RATING_FIELDS, "\t")
    items = _ml100k_items(directory / "u.item") if (directory / "u.item").exists() else None
    users = _users(directory / "u.user", "|", ("age", "gender", "occupation", "zip_code"))
  elif variant in ("ml-1m", "ml-10m"):
    path = directory / "ratings.dat"
    cols = _parse_table(path, _read_text(path), _RATING_FIELDS, "::")
    movies = directory / "movies.dat"
    items = _movies(movies, "::", 0, quoted=False) if movies.exists() else None
    if variant == "ml-1m":
      users = _users(directory / "users.dat", "::", ("gender", "age", "occupation", "zip_code"))
  else:
    path = directory / "ratings.csv"
    text = _read_text(path)
    _check_csv_header(path, text, ("userId", "movieId", "rating", "timestamp"))
    cols = _parse_table(path, text, _RATING_FIELDS, ",", header=1)
    movies = directory / "movies.csv"
    if movies.exists():
      _check_csv_header(movies, _read_text(movies), ("movieId", "title", "genres"))
      items = _movies(movies, ",", 1, quoted=True)
  return from_columns(cols["user_id"], cols["item_id"], timestamp=cols["timestamp"], rating=cols["rating"],
                      user_features=users, item_features=items, name=variant)


# ----------------------------------------------------------------------------- generic tables

def _table_frame(path: Path, sep: str) -> tuple[pd.DataFrame, np.ndarray | None]:
  """(non-blank rows of the file, 1-based line of each row; None for Parquet, which has no lines)."""
  if path.suffix.lower() in (".parquet", ".pq"):
    try:
      return pd.read_parquet(path), None
    except ImportError as exc:
      raise DataError(path, f"reading Parquet needs pyarrow or fastparquet ({exc})") from None
  text = _read_text(path)
  _check_no_lone_cr(path, text)
  reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
  rows, lines, line = [], [], 1   # line: where the next record starts (a quoted field may span lines)
  try:
    for record in reader:
      if any(field.strip() for field in record):   # rows of empty fields are blank
        rows.append(record)
        lines.append(line)
      line = reader.line_num + 1
  except csv.Error as exc:
    raise DataError(path, f"could not parse: {exc}", line=line) from None
  if not rows:
    raise DataError(path, "file is empty", line=1)
  names, width = rows[0], len(rows[0])
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise DataError(path, f"header names {repeated} more than once", line=lines[0])
  short_or_long = [i for i, record in enumerate(rows) if len(record) != width]
  if short_or_long:
    at = short_or_long[0]
    raise DataError(path, f"expected {width} fields (as the header), found {len(rows[at])}", line=lines[at])
  if len(rows) == 1:
    raise DataError(path, "no data lines after the header", line=lines[0])
  return pd.DataFrame(rows[1:], columns=names, dtype=str), np.asarray(lines[1:])


def _row_error(path: Path, lines: np.ndarray | None, bad: np.ndarray, message: str) -> DataError:
  """DataError at the first True row of `bad` [n]: by line for text files, by row for Parquet."""
  row = int(np.flatnonzero(bad)[0])
  if lines is None:
    return DataError(path, f"row {row}: {message}")
  return DataError(path, message, line=int(lines[row]))


def _seconds(when: pd.Series, epoch: pd.Timestamp) -> np.ndarray:
  """float64 seconds since `epoch` of datetimes (NaT -> NaN), in their own unit: no overflow for years past 2262."""
  return (when - epoch.as_unit(when.dt.unit)).dt.total_seconds().to_numpy(np.float64, copy=True)


def _date_seconds(values: pd.Series) -> tuple[np.ndarray, tuple[str, str] | None]:
  """float64 seconds since the epoch [n] of date strings (NaN where not a date), and (format, first date) or None.

  One format for the column: the one pandas infers from its first date ("01/02/2020": month first, 2 January;
  "13/02/2020": day first), else ISO 8601 (unambiguous, so taken beside any format). Value by value, 01/02/2020
  then 13/02/2020 would be read month first then day first. A date has digits: pandas reads "now" and "today"
  as the clock, "Jan" as the year 1.
  """
  text = values.astype(str).where(lambda s: s.str.contains(r"\d"))
  dated = text.dropna()
  with warnings.catch_warnings():   # pandas warns that "13/02/2020" is guessed day first: meant here
    warnings.simplefilter("ignore", UserWarning)
    fmt = guess_datetime_format(dated.iloc[0]) if len(dated) else None
  utc = lambda s, f: _seconds(pd.to_datetime(s, format=f, errors="coerce", utc=True), pd.Timestamp(0, tz="UTC"))
  x = utc(text, fmt or "ISO8601")
  retry = np.isnan(x)
  if fmt and retry.any():
    x[retry] = utc(text[retry], "ISO8601")
  return x, fmt and (fmt, dated.iloc[0])


def _numeric(path: Path, values: pd.Series, lines: np.ndarray | None, dates: bool) -> np.ndarray:
  """float64 [n] of a column; with `dates`, values that are not numbers (date strings, datetimes) become seconds
  since the epoch (`_date_seconds`). Without `dates` (ratings, kept as float32), values beyond float32 are errors."""
  column_format = None
  if dates and pd.api.types.is_datetime64_any_dtype(values):   # Parquet datetimes; NaT -> NaN
    values = values.dt.tz_convert(None) if values.dt.tz is not None else values   # UTC
    x = _seconds(values, pd.Timestamp(0))
  else:
    x = pd.to_numeric(values, errors="coerce").to_numpy(np.float64, copy=True)
    bad = ~np.isfinite(x)   # not a number, or "inf"
    if bad.any() and dates:
      x[bad], column_format = _date_seconds(values[bad])
  bad = ~np.isfinite(x)
  if bad.any():
    value = values[bad].iloc[0]
    if pd.isna(value) or value == "":
      why = "missing value"
    elif not dates:
      why = f"{value!r} is not a number"
    elif column_format:
      why = (f"{value!r} is not a number or a date in the format of the column's first date {column_format[1]!r} "
             f"({column_format[0]}) or ISO 8601: write ISO dates (YYYY-MM-DD) or Unix seconds")
    else:
      why = f"{value!r} is not a number or a date: write ISO dates (YYYY-MM-DD) or Unix seconds"
    raise _row_error(path, lines, bad, f"column {values.name!r}: {why}")
  if not dates:   # a rating, kept as float32
    over = float32_overflow(x)
    if over.any():
      raise _row_error(path, lines, over, f"column {values.name!r}: {values[over].iloc[0]!r} is out of float32 range")
  return x


def read_table(path: str | Path, *, user_col: str, item_col: str, timestamp_col: str | None = None,
               rating_col: str | None = None, sep: str | None = None, extra_cols: tuple[str, ...] = (),
               name: str | None = None) -> Interactions:
  """Interactions from a CSV/TSV (with a header line) or Parquet file, by column mapping.

  `sep` defaults to tab for .tsv/.tab and comma otherwise. User and item ids lose surrounding spaces
  and tabs (those that are not `sep`): " 2" is item "2". Timestamps may be numbers (seconds) or date
  strings (-> seconds since the epoch), value by value; the date strings of a column are read in one
  format, that of its first date (or ISO 8601), so "01/02/2020" (2 January) beside "13/02/2020" is a
  DataError. Extra columns are kept in `columns`, as float64 when every value is numeric, else as str.
  """
  path = Path(path)
  sep = sep or ("\t" if path.suffix.lower() in (".tsv", ".tab") else ",")
  df, lines = _table_frame(path, sep)
  for col in (user_col, item_col, timestamp_col, rating_col, *extra_cols):
    if col is not None and col not in df.columns:
      raise DataError(path, f"column {col!r} not found (columns: {', '.join(map(str, df.columns))})",
                      line=None if lines is None else 1)
  ids = {col: df[col].astype(str).str.strip(_spaces(sep)).to_numpy(object) for col in (user_col, item_col)}
  for col, values in ids.items():
    if (df[col].isna().to_numpy() | (values == "")).any():
      raise _row_error(path, lines, df[col].isna().to_numpy() | (values == ""), f"column {col!r}: missing id")
  extra = {}
  for col in extra_cols:
    number = pd.to_numeric(df[col], errors="coerce")
    extra[col] = number.to_numpy(np.float64) if not number.isna().any() else df[col].astype(str).to_numpy(object)
  timestamp = None if timestamp_col is None else _numeric(path, df[timestamp_col], lines, dates=True)
  rating = None if rating_col is None else _numeric(path, df[rating_col], lines, dates=False)
  return from_columns(ids[user_col], ids[item_col], timestamp=timestamp, rating=rating, columns=extra,
                      name=name or path.stem)


# ----------------------------------------------------------------------------- whitespace line formats

_ASCII_SPACE = np.isin(np.arange(256), [9, 10, 11, 12, 13, 28, 29, 30, 31, 32])


def _token_lines(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Whitespace-separated tokens of every line.

  Returns: (tokens [T] str, counts [lines] tokens per line, line numbers [lines] 1-based), with
    blank lines dropped; tokens of line j are tokens[offsets[j]:offsets[j] + counts[j]].
  """
  text = _read_text(path)
  _check_no_lone_cr(path, text)
  tokens = np.array(text.split())
  data = np.frombuffer(text.encode("utf-8"), np.uint8)
  space = _ASCII_SPACE[data]
  starts = ~space & np.concatenate([[True], space[:-1]])             # first byte of each token
  counts = np.bincount(np.cumsum(data == 10)[starts], minlength=text.count("\n") + 1)
  if counts.sum() != len(tokens):   # exotic unicode whitespace: count line by line instead
    counts = pd.Series(text.split("\n"), dtype=object).str.split().str.len().to_numpy(np.int64)
  keep = counts > 0
  if not keep.any():
    raise DataError(path, "file is empty", line=1)
  return tokens, counts[keep], np.flatnonzero(keep) + 1


def _check_ids(path: Path, tokens: np.ndarray, counts: np.ndarray, lines: np.ndarray) -> None:
  """LightGCN ids are non-negative integers; name the line of the first one that is not."""
  bad = ~np.char.isdigit(tokens)
  if bad.any():
    at = int(np.flatnonzero(bad)[0])
    line = lines[np.searchsorted(np.cumsum(counts), at, side="right")]
    raise DataError(path, f"id {str(tokens[at])!r} is not a non-negative integer", line=int(line))


def _adjacency(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """`user item item ...` lines -> (line users [m], line numbers [m], item counts [m], items [n])."""
  tokens, counts, lines = _token_lines(path)
  _check_ids(path, tokens, counts, lines)
  starts = np.cumsum(counts) - counts
  is_item = np.ones(len(tokens), bool)
  is_item[starts] = False
  return tokens[starts], lines, counts - 1, tokens[is_item]


def read_lightgcn(directory: str | Path, name: str | None = None) -> tuple[Interactions, Interactions]:
  """LightGCN's published split: `train.txt` and `test.txt`, lines `user item item ...`.

  Both share one vocabulary, numbered over train then test (first appearance). A train line
  with a user and no items is allowed: the user gets an id but no interactions. A test line with
  no items is skipped (a warning counts them). A test user absent from train is a DataError
  (there is nothing to rank from); an item seen only in test is allowed and kept in the
  vocabulary. No timestamps: rows keep the file order.

  Returns: (train, test) Interactions over the same vocabularies.
  """
  directory = Path(directory)
  train_path, test_path = directory / "train.txt", directory / "test.txt"
  train_users, _, train_counts, train_items = _adjacency(train_path)
  test_users, test_lines, test_counts, test_items = _adjacency(test_path)
  if (test_counts == 0).any():
    first = int(test_lines[test_counts == 0][0])
    warnings.warn(f"{test_path}: skipped {(test_counts == 0).sum()} lines with a user and no items "
                  f"(first at line {first})", stacklevel=2)
  test_users, test_lines = test_users[test_counts > 0], test_lines[test_counts > 0]
  unknown = ~np.isin(test_users, train_users)
  if unknown.any():
    at = int(np.flatnonzero(unknown)[0])
    raise DataError(test_path, f"user {str(test_users[at])!r} does not appear in {train_path.name}",
                    line=int(test_lines[at]))
  m = len(train_users)
  users, user_vocab = build_vocab(np.concatenate([train_users, np.repeat(test_users, test_counts[test_counts > 0])]))
  items, item_vocab = build_vocab(np.concatenate([train_items, test_items]))
  make = lambda u, i: Interactions(user=u, item=i, user_vocab=user_vocab, item_vocab=item_vocab,
                                   name=name or directory.name)
  n = len(train_items)
  return make(np.repeat(users[:m], train_counts), items[:n]), make(users[m:], items[n:])


def read_user_item_sequences(path: str | Path, name: str | None = None) -> Interactions:
  """`user item` per line (whitespace separated), each user's lines in time order (SASRec format).

  There are no timestamps in the file, so timestamp = running row index (0., 1., ...) which keeps
  the file order through every time-ordered operation.
  """
  path = Path(path)
  tokens, counts, lines = _token_lines(path)
  if (counts != 2).any():
    at = int(np.flatnonzero(counts != 2)[0])
    raise DataError(path, f"expected 2 fields (user item), found {counts[at]}", line=int(lines[at]))
  return from_columns(tokens[0::2], tokens[1::2], timestamp=np.arange(len(lines), dtype=np.float64),
                      name=name or path.stem)
