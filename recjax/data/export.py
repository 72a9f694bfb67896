"""Write a Split as RecBole benchmark files so the peer trains and tests on the identical split.

RecBole reads them with `--set "benchmark_filename=['train','valid','test']"` and
`--data-path OUT` for dataset NAME: `OUT/NAME/NAME.{train,valid,test}.inter`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recjax.data.interactions import Interactions
from recjax.data.splits import Split


def interactions_frame(inter: Interactions) -> pd.DataFrame:
  """Raw-token columns with RecBole's typed headers."""
  frame = {"user_id:token": inter.user_vocab[inter.user], "item_id:token": inter.item_vocab[inter.item]}
  if inter.rating is not None:
    frame["rating:float"] = inter.rating
  # RecBole orders sequences by timestamp; without one, the row index keeps file order.
  frame["timestamp:float"] = inter.timestamp if inter.timestamp is not None else np.arange(len(inter), dtype=float)
  return pd.DataFrame(frame)


def export_recbole_split(split: Split, out_dir: Path, name: str) -> list[Path]:
  """Write `out_dir/name/name.{train,valid,test}.inter`; returns the paths written."""
  folder = Path(out_dir) / name
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for part in ("train", "valid", "test"):
    path = folder / f"{name}.{part}.inter"
    tmp = path.with_suffix(".tmp")
    interactions_frame(getattr(split, part)).to_csv(tmp, sep="\t", index=False)
    tmp.replace(path)
    paths.append(path)
  return paths
