"""The registry of named datasets: where their files live, how to read them, how to fetch them.

Data lives under one directory (`--data-dir` or env RECJAX_DATA), one folder per dataset:
`ml-100k/` (RecBole atomic `ml-100k.inter` or raw `u.data`), `ml-1m/` ... `ml-32m/` (atomic or
raw), `gowalla/` (LightGCN `train.txt`, `test.txt`), `beauty/beauty.txt` (`user item` lines).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from recjax.data import readers
from recjax.data.interactions import Interactions
from recjax.errors import ConfigError, DataError

ENV_VAR = "RECJAX_DATA"
MOVIELENS_URL = "https://files.grouplens.org/datasets/movielens/{name}.zip"
# MD5 of the official archives, as published by GroupLens in {name}.zip.md5.
MOVIELENS_MD5 = {
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
    "ml-10m": "ce571fd55effeba0271552578f2648bd",
    "ml-20m": "cd245b17a1ae2cc31bb14903e1204af3",
    "ml-25m": "6b51fb2759a8657d3bfcbfc42b592ada",
    "ml-32m": "d472be332d4daa821edc399621853b57",
}
_ML_FOLDERS = {"ml-10m": ("ml-10m", "ml-10M100K")}   # the ml-10m zip unpacks to ml-10M100K/
_ML_RAW = {"ml-100k": "u.data", "ml-1m": "ratings.dat", "ml-10m": "ratings.dat"}


@dataclasses.dataclass(frozen=True)
class LoadedDataset:
  """A loaded dataset: all interactions, plus the published split for pre-split datasets.

  Attributes:
    interactions: every interaction (for gowalla, train then test rows).
    given: (train, test) over the same vocabularies as `interactions`, or None.
  """
  interactions: Interactions
  given: tuple[Interactions, Interactions] | None = None


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A registry entry. `loader(data_dir)` reads the files; `url`/`md5` are set for downloadable ones."""
  name: str
  description: str
  loader: Callable[[Path | None], LoadedDataset]
  url: str | None = None
  md5: str | None = None


def resolve_data_dir(flag: str | Path | None) -> Path | None:
  """The data directory: the `--data-dir` flag when given, else env RECJAX_DATA, else None."""
  value = flag if flag not in (None, "") else os.environ.get(ENV_VAR) or None
  return None if value is None else Path(value).expanduser()


def _how_to(name: str) -> str:
  hint = f"pass --data-dir DIR or set {ENV_VAR}=DIR, with the files under DIR/{name}/"
  if name in MOVIELENS_MD5:
    hint += f", or fetch them with `recjax data download {name} --data-dir DIR`"
  return hint


def _need_dir(name: str, data_dir: Path | None) -> Path:
  if data_dir is None:
    raise DataError(name, f"no data directory for dataset {name!r}: {_how_to(name)}")
  return data_dir


def _named(inter: Interactions, name: str) -> Interactions:
  return dataclasses.replace(inter, name=name)


def _load_synthetic(data_dir: Path | None) -> LoadedDataset:
  from recjax.data.synthetic import make_synthetic  # lazy: keeps the registry import light
  return LoadedDataset(_named(make_synthetic(seed=0), "synthetic"))


def _load_synthetic_multidomain(data_dir: Path | None) -> LoadedDataset:
  from recjax.data.domains import make_multidomain
  return LoadedDataset(make_multidomain(seed=0)[0])


def _movielens_loader(name: str) -> Callable[[Path | None], LoadedDataset]:
  raw_file = _ML_RAW.get(name, "ratings.csv")

  def load(data_dir: Path | None) -> LoadedDataset:
    root = _need_dir(name, data_dir)
    looked = []
    for folder in (root / f for f in _ML_FOLDERS.get(name, (name,))):
      atomic, raw = folder / f"{name}.inter", folder / raw_file
      if atomic.exists():
        return LoadedDataset(_named(readers.read_atomic(folder, name), name))
      if raw.exists():
        return LoadedDataset(_named(readers.read_movielens(folder, name), name))
      looked += [str(atomic), str(raw)]
    raise DataError(looked[0], f"dataset {name!r} not found (looked for {' or '.join(looked)}): {_how_to(name)}")
  return load


def _require(name: str, path: Path) -> Path:
  if not path.exists():
    raise DataError(path, f"dataset {name!r} not found (looked for this file): {_how_to(name)}")
  return path


def _load_gowalla(data_dir: Path | None) -> LoadedDataset:
  folder = _need_dir("gowalla", data_dir) / "gowalla"
  for file in ("train.txt", "test.txt"):
    _require("gowalla", folder / file)
  train, test = readers.read_lightgcn(folder, name="gowalla")
  return LoadedDataset(train.concat(test), given=(train, test))


def _load_beauty(data_dir: Path | None) -> LoadedDataset:
  path = _require("beauty", _need_dir("beauty", data_dir) / "beauty" / "beauty.txt")
  return LoadedDataset(readers.read_user_item_sequences(path, name="beauty"))


DATASETS: dict[str, DatasetSpec] = {
    "synthetic": DatasetSpec("synthetic", "generated users/items with planted structure (no files)", _load_synthetic),
    "synthetic-multidomain": DatasetSpec(
        "synthetic-multidomain", "generated multi-domain click/like rows: 2 big, 2 small domains (no files)",
        _load_synthetic_multidomain),
    **{name: DatasetSpec(name, f"MovieLens {name[3:].upper()} ratings (GroupLens)", _movielens_loader(name),
                         url=MOVIELENS_URL.format(name=name), md5=md5) for name, md5 in MOVIELENS_MD5.items()},
    "gowalla": DatasetSpec("gowalla", "Gowalla check-ins, LightGCN's published train/test split", _load_gowalla),
    "beauty": DatasetSpec("beauty", "Amazon Beauty `user item` sequences (SASRec preprocessing)", _load_beauty),
}


def get_spec(name: str) -> DatasetSpec:
  """The registry entry for `name`; ConfigError listing the known names otherwise."""
  if name not in DATASETS:
    raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
  return DATASETS[name]


def load_dataset(name: str, data_dir: str | Path | None = None) -> LoadedDataset:
  """Read dataset `name` from `data_dir` (or env RECJAX_DATA); see the module docstring for layout."""
  spec = get_spec(name)
  return spec.loader(resolve_data_dir(data_dir))


# ----------------------------------------------------------------------------- download

def _fetch(url: str, dest: Path) -> None:
  """Stream `url` into `dest` (through a .part file, so an interrupted download leaves nothing)."""
  part = dest.with_name(dest.name + ".part")
  try:
    with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
      shutil.copyfileobj(response, out, length=1 << 20)
  except (urllib.error.URLError, OSError) as exc:
    part.unlink(missing_ok=True)
    raise DataError(url, f"download failed: {exc}") from None
  part.replace(dest)


def _md5(path: Path) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _extract(archive: Path, into: Path) -> None:
  """Unzip `archive` under `into`, refusing members that would land outside it."""
  root = into.resolve()
  try:
    with zipfile.ZipFile(archive) as zf:
      for member in zf.namelist():
        if not (root / member).resolve().is_relative_to(root):
          raise DataError(archive, f"unsafe path in archive: {member!r}")
      zf.extractall(root)
  except zipfile.BadZipFile as exc:
    raise DataError(archive, f"not a valid zip file: {exc}") from None


def download(name: str, data_dir: str | Path) -> Path:
  """Download and unpack a MovieLens archive from GroupLens into `data_dir/{name}/`.

  The archive's MD5 is checked against the published value (a mismatch deletes the archive and
  raises DataError); when no checksum is known the computed one is printed. Returns the folder.
  """
  spec = get_spec(name)
  if spec.url is None:
    downloadable = [n for n, s in DATASETS.items() if s.url]
    raise ConfigError(f"dataset {name!r} cannot be downloaded; downloadable: {', '.join(downloadable)}")
  data_dir = Path(data_dir).expanduser()
  data_dir.mkdir(parents=True, exist_ok=True)
  archive = data_dir / f"{name}.zip"
  _fetch(spec.url, archive)
  digest = _md5(archive)
  if spec.md5 is None:
    print(f"{archive.name}: md5 {digest} (no published checksum on record to compare against)")
  elif digest != spec.md5:
    archive.unlink()
    raise DataError(archive, f"checksum mismatch: md5 {digest}, expected {spec.md5} (corrupt download or the "
                    f"file changed upstream); try again")
  _extract(archive, data_dir)
  archive.unlink()
  folder = data_dir / name
  for alias in _ML_FOLDERS.get(name, ())[1:]:
    if not folder.exists() and (data_dir / alias).exists():
      (data_dir / alias).rename(folder)
  return folder


# ----------------------------------------------------------------------------- summary

def dataset_info(inter: Interactions) -> dict:
  """Summary statistics; user/item counts exclude the padding row.

  sparsity = 1 - interactions / (users * items); sequence lengths are interactions per user
  over every user in the vocabulary (so min can be 0 after filtering).
  """
  users, items = inter.num_users - 1, inter.num_items - 1
  lengths = np.bincount(inter.user, minlength=inter.num_users)[1:]
  stats = lambda f: float(f(lengths)) if len(lengths) else 0.0
  return {
      "name": inter.name,
      "num_users": users,
      "num_items": items,
      "num_interactions": len(inter),
      "sparsity": 1.0 - len(inter) / (users * items) if users and items else 1.0,
      "seq_len_min": int(stats(np.min)),
      "seq_len_median": stats(np.median),
      "seq_len_mean": stats(np.mean),
      "seq_len_max": int(stats(np.max)),
      "has_timestamps": inter.timestamp is not None,
      "has_ratings": inter.rating is not None,
      "user_features": sorted(inter.user_features),
      "item_features": sorted(inter.item_features),
      "columns": sorted(inter.columns),
  }
