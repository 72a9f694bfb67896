"""Write a Split as RecBole benchmark files so the peer trains and tests on the identical split.

RecBole reads them with `--set "benchmark_filename=['train','valid','test']"` and
`--data-path OUT` for dataset NAME: `OUT/NAME/NAME.{train,valid,test}.inter`. RecBole 1.2.1 replaces the
data path of a dataset it bundles (ml-100k) with its own copy, so such a split is written under another name.

Two formats:
- "plain" (general and context-aware models): the part's rows, `user_id`, `item_id`, `rating`, `timestamp`.
- "sequence" (sequential models): with benchmark files RecBole's SequentialDataset builds no histories, it
  reads them: one row per (history -> next item), `user_id:token`, `item_id_list:token_seq` (the up to
  `max_len` earlier items, oldest first), `item_id:token`. Train rows are the prefixes inside train; a valid
  row's history is the user's train items, a test row's train + valid, as recjax's leave-one-out evaluates.
  RecBole then needs `--set "load_col={'inter': ['user_id', 'item_id', 'item_id_list']}"
  --set "alias_of_item_id=['item_id_list']"`. Only for leave-one-out splits (`leave_one_out`,
  `leave_last_out`): under other splits a part's rows interleave with the others' in time.

Tokens RecBole would read otherwise (a tab or newline anywhere, a space inside `token_seq`, and the
strings pandas reads as missing, such as "NA" or "None") are refused rather than written.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recjax.data.interactions import Interactions, time_order
from recjax.data.samplers import windows
from recjax.data.splits import Split
from recjax.errors import ConfigError, DataError

# What pandas' read_csv, and so RecBole, reads as a missing value by default.
PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
SEQUENCE_SPLITS = ("leave_one_out", "leave_last_out")


def check_tokens(tokens, what: str, spaces: bool = True) -> None:
  """DataError naming the first token RecBole would not read back as written (see the module docstring)."""
  for token in map(str, tokens):
    if token in PANDAS_NA or any(c in token for c in "\t\n\r") or (not spaces and " " in token):
      raise DataError(what, f"the token {token!r} would not survive RecBole's reader (a tab, newline"
                      f"{'' if spaces else ', space'} or missing-value string); rename it before exporting")


def interactions_frame(inter: Interactions) -> pd.DataFrame:
  """Raw-token columns with RecBole's typed headers."""
  frame = {"user_id:token": inter.user_vocab[inter.user], "item_id:token": inter.item_vocab[inter.item]}
  if inter.rating is not None:
    frame["rating:float"] = inter.rating
  # RecBole orders sequences by timestamp; without one, the row index keeps file order.
  frame["timestamp:float"] = inter.timestamp if inter.timestamp is not None else np.arange(len(inter), dtype=float)
  return pd.DataFrame(frame)


FORMATS = ("plain", "sequence")
PARTS = ("train", "valid", "test")


def sequence_frames(split: Split, max_len: int) -> dict[str, pd.DataFrame]:
  """Per part, the (history -> next item) rows RecBole's sequential models read from benchmark files."""
  parts = [getattr(split, part) for part in PARTS]
  whole = parts[0].concat(parts[1]).concat(parts[2])
  order = time_order(whole)                                   # stable: on a time tie train, valid, then test
  part = np.repeat(np.arange(len(parts)), [len(p) for p in parts])[order]
  user, item = whole.user[order], whole.item[order]
  first = np.r_[True, user[1:] != user[:-1]]                                # a user's first item: no history
  start = np.maximum.accumulate(np.where(first, np.arange(len(user)), 0))   # where each row's user begins
  rows = np.flatnonzero(~first)
  tokens = whole.item_vocab
  previous = windows(item, start[rows], rows, max_len)                      # [m, L] left-padded with 0
  history = np.array([" ".join(tokens[ids[ids > 0]]) for ids in previous], dtype=object)
  frame = pd.DataFrame({"user_id:token": whole.user_vocab[user[rows]], "item_id_list:token_seq": history,
                        "item_id:token": tokens[item[rows]]})
  return {name: frame[part[rows] == index].reset_index(drop=True) for index, name in enumerate(PARTS)}


def export_recbole_split(split: Split, out_dir: Path, name: str, fmt: str = "plain", max_len: int = 50,
                         overwrite: bool = False) -> list[Path]:
  """Write `out_dir/name/name.{train,valid,test}.inter` in format `fmt`; returns the paths written. Files
  already there are replaced only with `overwrite` (ConfigError otherwise, before anything is written)."""
  if fmt not in FORMATS:
    raise ValueError(f"export format must be one of {FORMATS}, got {fmt!r}")
  if fmt == "sequence" and not split.name.startswith(SEQUENCE_SPLITS):
    raise ConfigError(f"export format 'sequence' needs a leave-one-out split ({', '.join(SEQUENCE_SPLITS)}), "
                      f"not {split.name!r}: there every history comes from earlier parts; use 'plain'")
  check_tokens(split.train.user_vocab[1:], f"{name}: user ids")
  check_tokens(split.train.item_vocab[1:], f"{name}: item ids", spaces=fmt != "sequence")
  folder = Path(out_dir) / name
  paths = {part: folder / f"{name}.{part}.inter" for part in PARTS}
  existing = [str(path) for path in paths.values() if path.exists()]
  if existing and not overwrite:
    raise ConfigError(f"data export: {', '.join(existing)} already exist; pass --overwrite to replace them or "
                      "choose another --out")
  folder.mkdir(parents=True, exist_ok=True)
  frames = sequence_frames(split, max_len) if fmt == "sequence" else {
      part: interactions_frame(getattr(split, part)) for part in PARTS}
  for part, path in paths.items():
    tmp = path.with_suffix(".tmp")
    frames[part].to_csv(tmp, sep="\t", index=False)
    tmp.replace(path)
  return list(paths.values())
