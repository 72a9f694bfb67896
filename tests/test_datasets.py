from __future__ import annotations

import dataclasses
import hashlib
import shutil
import urllib.request
import zipfile

import numpy as np
import pytest

from recjax.data import datasets
from recjax.data.interactions import from_columns
from recjax.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("tests must not touch the network")
  monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def no_env(monkeypatch):
  monkeypatch.delenv(datasets.ENV_VAR, raising=False)


def write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


def test_resolve_data_dir(monkeypatch, tmp_path, no_env):
  assert datasets.resolve_data_dir(None) is None
  monkeypatch.setenv(datasets.ENV_VAR, str(tmp_path / "env"))
  assert datasets.resolve_data_dir(None) == tmp_path / "env"
  assert datasets.resolve_data_dir(str(tmp_path / "flag")) == tmp_path / "flag"   # the flag wins


def test_registry_names_and_unknown():
  assert set(datasets.DATASETS) == {"synthetic", "synthetic-multidomain", "ml-100k", "ml-1m", "ml-10m", "ml-20m",
                                    "ml-25m", "ml-32m", "gowalla", "beauty"}
  assert all(callable(spec.loader) for spec in datasets.DATASETS.values())
  known = "synthetic, synthetic-multidomain, ml-100k"
  with pytest.raises(ConfigError, match=f"unknown dataset 'ml-5k'; known datasets: {known}"):
    datasets.load_dataset("ml-5k")


def test_missing_data_dir_says_how_to_provide_it(no_env):
  with pytest.raises(DataError) as info:
    datasets.load_dataset("ml-1m")
  message = str(info.value)
  assert "--data-dir" in message and "RECJAX_DATA" in message and "recjax data download ml-1m" in message
  with pytest.raises(DataError, match="RECJAX_DATA") as info:
    datasets.load_dataset("gowalla")
  assert "download" not in str(info.value)


def test_missing_files_name_what_was_looked_for(tmp_path):
  with pytest.raises(DataError, match=r"ml-100k/ml-100k\.inter.*ml-100k/u\.data"):
    datasets.load_dataset("ml-100k", tmp_path)
  with pytest.raises(DataError, match=r"gowalla/train\.txt"):
    datasets.load_dataset("gowalla", tmp_path)
  with pytest.raises(DataError, match=r"beauty/beauty\.txt"):
    datasets.load_dataset("beauty", tmp_path)


def test_load_movielens_atomic_first_then_raw(tmp_path, monkeypatch, no_env):
  write(tmp_path / "ml-100k" / "u.data", "1\t10\t4\t100\n2\t10\t3\t50\n")
  monkeypatch.setenv(datasets.ENV_VAR, str(tmp_path))
  raw = datasets.load_dataset("ml-100k")
  assert len(raw.interactions) == 2 and raw.given is None and raw.interactions.name == "ml-100k"
  write(tmp_path / "ml-100k" / "ml-100k.inter", "user_id:token\titem_id:token\nu\ti\n")
  assert len(datasets.load_dataset("ml-100k").interactions) == 1          # atomic files preferred


def test_load_ml10m_from_the_zip_folder_name(tmp_path):
  write(tmp_path / "ml-10M100K" / "ratings.dat", "1::122::5::838985046\n")
  assert len(datasets.load_dataset("ml-10m", tmp_path).interactions) == 1


def test_load_gowalla_given_split(tmp_path):
  write(tmp_path / "gowalla" / "train.txt", "0 1 2\n1 2\n")
  write(tmp_path / "gowalla" / "test.txt", "0 3\n")
  loaded = datasets.load_dataset("gowalla", tmp_path)
  train, test = loaded.given
  assert (len(train), len(test), len(loaded.interactions)) == (3, 1, 4)
  np.testing.assert_array_equal(loaded.interactions.item, np.concatenate([train.item, test.item]))
  assert loaded.interactions.name == "gowalla"


def test_load_beauty(tmp_path):
  write(tmp_path / "beauty" / "beauty.txt", "1 1\n1 2\n2 1\n")
  loaded = datasets.load_dataset("beauty", tmp_path)
  assert len(loaded.interactions) == 3 and loaded.given is None


def test_load_synthetic():
  loaded = datasets.load_dataset("synthetic")
  assert len(loaded.interactions) > 0 and loaded.interactions.name == "synthetic"


def test_dataset_info():
  inter = from_columns(np.array(["a", "a", "a", "b"]), np.array(["x", "y", "z", "x"]), rating=[1, 2, 3, 4],
                       item_features={"title": {"x": "X"}})
  info = datasets.dataset_info(inter)
  assert (info["num_users"], info["num_items"], info["num_interactions"]) == (2, 3, 4)
  assert info["sparsity"] == pytest.approx(1 - 4 / 6)
  assert (info["seq_len_min"], info["seq_len_median"], info["seq_len_mean"], info["seq_len_max"]) == (1, 2, 2, 3)
  assert info["has_ratings"] and not info["has_timestamps"]
  assert info["item_features"] == ["title"] and info["user_features"] == []


# ----------------------------------------------------------------------------- download (no network)

def make_zip(tmp_path, members: dict[str, str]):
  path = tmp_path / "src.zip"
  with zipfile.ZipFile(path, "w") as zf:
    for name, text in members.items():
      zf.writestr(name, text)
  return path, hashlib.md5(path.read_bytes()).hexdigest()


def serve(monkeypatch, source, seen=None):
  def fake_fetch(url, dest):
    if seen is not None:
      seen.append(url)
    shutil.copy(source, dest)
  monkeypatch.setattr(datasets, "_fetch", fake_fetch)


def with_md5(monkeypatch, name, md5):
  monkeypatch.setitem(datasets.DATASETS, name, dataclasses.replace(datasets.DATASETS[name], md5=md5))


def test_download_verifies_and_extracts(tmp_path, monkeypatch):
  source, md5 = make_zip(tmp_path, {"ml-100k/u.data": "1\t10\t4\t100\n"})
  seen = []
  serve(monkeypatch, source, seen)
  with_md5(monkeypatch, "ml-100k", md5)
  folder = datasets.download("ml-100k", tmp_path / "data")
  assert seen == ["https://files.grouplens.org/datasets/movielens/ml-100k.zip"]
  assert folder == tmp_path / "data" / "ml-100k" and (folder / "u.data").exists()
  assert not (tmp_path / "data" / "ml-100k.zip").exists()
  assert len(datasets.load_dataset("ml-100k", tmp_path / "data").interactions) == 1


def test_download_checksum_mismatch(tmp_path, monkeypatch):
  source, md5 = make_zip(tmp_path, {"ml-1m/ratings.dat": "1::2::3::4\n"})
  serve(monkeypatch, source)                     # the registry's real checksum cannot match this zip
  with pytest.raises(DataError, match=f"ml-1m.zip: checksum mismatch: md5 {md5}, expected c4d9eecf"):
    datasets.download("ml-1m", tmp_path / "data")
  assert not (tmp_path / "data" / "ml-1m").exists() and not (tmp_path / "data" / "ml-1m.zip").exists()


def test_download_unknown_checksum_prints_it_and_renames_ml10m(tmp_path, monkeypatch, capsys):
  source, md5 = make_zip(tmp_path, {"ml-10M100K/ratings.dat": "1::2::3::4\n"})
  serve(monkeypatch, source)
  with_md5(monkeypatch, "ml-10m", None)
  folder = datasets.download("ml-10m", tmp_path)
  assert md5 in capsys.readouterr().out
  assert folder == tmp_path / "ml-10m" and (folder / "ratings.dat").exists()


def test_download_refuses_unsafe_archives_and_other_datasets(tmp_path, monkeypatch):
  source, md5 = make_zip(tmp_path, {"../evil.txt": "x"})
  serve(monkeypatch, source)
  with_md5(monkeypatch, "ml-25m", md5)
  with pytest.raises(DataError, match="unsafe path"):
    datasets.download("ml-25m", tmp_path / "data")
  assert not (tmp_path / "evil.txt").exists()
  with pytest.raises(ConfigError, match="cannot be downloaded"):
    datasets.download("gowalla", tmp_path)


def test_every_movielens_entry_points_at_grouplens():
  for name in ("ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-32m"):
    spec = datasets.DATASETS[name]
    assert spec.url == f"https://files.grouplens.org/datasets/movielens/{name}.zip"
    assert spec.md5 is None or len(spec.md5) == 32


# ----------------------------------------------------------------------------- real data

def test_real_ml100k(data_dir, data_file):
  data_file("ml-100k/ml-100k.inter")
  info = datasets.dataset_info(datasets.load_dataset("ml-100k", data_dir).interactions)
  assert (info["num_users"], info["num_items"], info["num_interactions"]) == (943, 1682, 100000)
  assert info["seq_len_min"] == 20 and info["has_timestamps"] and info["has_ratings"]


def test_real_gowalla_given(data_dir, data_file):
  data_file("gowalla/train.txt")
  loaded = datasets.load_dataset("gowalla", data_dir)
  train, test = loaded.given
  assert len(train) == 810128 and len(loaded.interactions) == len(train) + len(test)
