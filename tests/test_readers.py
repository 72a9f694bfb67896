from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

from recjax.data import readers
from recjax.data.interactions import PAD_TOKEN, from_columns
from recjax.errors import DataError, UnknownIdError


def write(path, text: str, encoding: str = "utf-8"):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(text.encode(encoding))
  return path


def raises_at(file_name: str, line: int | None):
  """pytest.raises(DataError) whose message names `file_name` and (when given) `:line`."""
  where = re.escape(file_name) + (f":{line}:" if line is not None else "")
  return pytest.raises(DataError, match=where)


# ----------------------------------------------------------------------------- atomic files

INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\tdomain:token\n"
         "u1\ti1\t5\t10\tA\n"
         "u2\ti2\t3\t20\tB\n"
         "\n"
         "u1\ti3\t4.5\t30\tA\n")
ITEM = ("item_id:token\ttitle:token_seq\tyear:token\tprice:float\temb:float_seq\n"
        "i1\tToy Story\t1995\t9.5\t1 2\n"
        "i3\tHeat\t1995\t\t3 4\n"
        "i9\tNever Seen\t2000\t1\t0 0\n")
USER = "user_id:token\tage:token\nu2\t31\nu1\t24\n"


def test_read_atomic_columns_features_and_order(tmp_path):
  write(tmp_path / "toy.inter", INTER)
  write(tmp_path / "toy.item", ITEM)
  write(tmp_path / "toy.user", USER)
  inter = readers.read_atomic(tmp_path, "toy")
  assert list(inter.user_vocab) == [PAD_TOKEN, "u1", "u2"]
  assert list(inter.item_vocab) == [PAD_TOKEN, "i1", "i2", "i3"]
  np.testing.assert_array_equal(inter.user, [1, 2, 1])
  np.testing.assert_array_equal(inter.item, [1, 2, 3])
  np.testing.assert_allclose(inter.rating, [5, 3, 4.5])
  assert inter.rating.dtype == np.float32 and inter.timestamp.dtype == np.float64
  assert list(inter.columns["domain"]) == ["A", "B", "A"]
  feats = inter.item_features
  assert feats["title"][inter.item_id("i1")] == ("Toy", "Story")
  assert feats["title"][inter.item_id("i2")] == ()                 # not in .item: padding value
  assert feats["year"][inter.item_id("i3")] == "1995"
  assert feats["price"][1] == np.float32(9.5) and np.isnan(feats["price"][3])   # empty float -> NaN
  np.testing.assert_array_equal(feats["emb"][3], np.array([3, 4], np.float32))
  assert inter.user_features["age"][inter.user_id("u2")] == "31"
  assert inter.name == "toy"


def test_read_atomic_seq_separator(tmp_path):
  """RecBole's `seq_separator`: a space by default (a comma then stays part of a token), or another string."""
  write(tmp_path / "toy.inter", "user_id:token\titem_id:token\tmoods:token_seq\nu\ti1\tcalm, sunny\nu\ti2\t\n")
  write(tmp_path / "toy.item", "item_id:token\tgenres:token_seq\temb:float_seq\n"
                               "i1\tAction,Comedy\t1,2.5\ni2\tFilm Noir, ,Drama,\t 3 ,4\n")
  commas = readers.read_atomic(tmp_path, "toy", seq_separator=",")
  genres, emb = commas.item_features["genres"], commas.item_features["emb"]
  assert genres[1] == ("Action", "Comedy") and genres[2] == ("Film Noir", "Drama")
  np.testing.assert_array_equal(emb[1], np.array([1, 2.5], np.float32))
  np.testing.assert_array_equal(emb[2], np.array([3, 4], np.float32))
  assert list(commas.columns["moods"]) == [("calm", "sunny"), ()]
  with raises_at("toy.item", 2):   # with spaces between parts, "1,2.5" is no number
    readers.read_atomic(tmp_path, "toy")
  write(tmp_path / "toy.item", "item_id:token\tgenres:token_seq\ni1\tAction,Comedy\ni2\tFilm Noir\n")
  spaced = readers.read_atomic(tmp_path, "toy")
  assert spaced.item_features["genres"][1] == ("Action,Comedy",) and spaced.item_features["genres"][2] == (
      "Film", "Noir")
  assert list(spaced.columns["moods"]) == [("calm,", "sunny"), ()]
  for bad in ("", "\t", "\n"):
    with pytest.raises(ValueError, match="seq_separator"):
      readers.read_atomic(tmp_path, "toy", seq_separator=bad)


def test_read_atomic_windows_line_endings(tmp_path):
  write(tmp_path / "crlf.inter", INTER.replace("\n", "\r\n"))
  inter = readers.read_atomic(tmp_path, "crlf")
  assert list(inter.columns["domain"]) == ["A", "B", "A"] and inter.timestamp.tolist() == [10, 20, 30]
  write(tmp_path / "crlf.inter", "user_id:token\titem_id:token\r\nu\ti\r\nu\r\n")
  with raises_at("crlf.inter", 3):
    readers.read_atomic(tmp_path, "crlf")


def test_read_atomic_without_optional_files(tmp_path):
  write(tmp_path / "toy.inter", "user_id:token\titem_id:token\nu\ti\n")
  inter = readers.read_atomic(tmp_path, "toy")
  assert len(inter) == 1 and inter.timestamp is None and inter.rating is None
  assert inter.item_features == {} and inter.user_features == {}


@pytest.mark.parametrize("text, line, message", [
    ("user_id:token\titem_id\nu\ti\n", 1, "no type"),
    ("user_id:token\titem_id:integer\nu\ti\n", 1, "unknown type 'integer'"),
    ("user_id:token\trating:float\nu\t5\n", 1, "missing column 'item_id'"),
    ("user_id:token\titem_id:token\nu\ti\nu\ti\textra\n", 3, "expected 2 fields"),
    ("user_id:token\titem_id:token\tx:token\nu\ti\tx\nu\ti\n", 3, "expected 3 fields"),
    ("user_id:token\titem_id:token\tx:token\nu\ti\n", 2, "expected 3 fields"),
    ("user_id:token\titem_id:token\trating:float\nu\ti\t4\n\nu\ti\tabc\n", 4, "'abc' is not a number"),
    ("user_id:token\titem_id:token\trating:float\nu\ti\t\n", 2, "missing value"),
    ("user_id:token\titem_id:token\trating:float\nu\ti\t4\nu\ti\tnan\n", 3, "'nan' is not a number"),
    ("user_id:token\titem_id:token\trating:float\nu\ti\t4\nu\ti\t1_000\n", 3, "'1_000' is not a number"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1e400\n", 2, "'1e400' is not a finite number"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ti\t5\nu\ti\tinf\n", 3, "'inf' is not a number"),
    ("user_id:token\titem_id:token\trating:float\nu\ti\tTrue\nu\ti\tFalse\n", 2, "'True' is not a number"),
    ("user_id:token\titem_id:token\trating:float\nu\ti\t4\nu\ti\t1e39\n", 3, "'1e39' is out of float32 range"),
    ("user_id:token\titem_id:token\trating:float\nu\ti\t4\nu\ti\t\u0663\n", 3, "'\u0663' is not a number"),
    ("user_id:token\titem_id:token\tnote:token\nu\ti\tab\rcd\nu\ti\tx\n", 2, "carriage return"),
    ("user_id:token\titem_id:token\nu\ti\nu\ti\r\r\n", 3, "carriage return"),
    ("user_id:token\titem_id:token\n\ti\n", 2, "'user_id': missing value"),
    ("", 1, "empty"),
    ("user_id:token\titem_id:token\n", 1, "no data lines"),
    ("user_id:token\titem_id:token\n\n\n", 1, "no data lines"),
])
def test_read_atomic_bad_inter(tmp_path, text, line, message):
  write(tmp_path / "bad.inter", text)
  with raises_at("bad.inter", line) as info:
    readers.read_atomic(tmp_path, "bad")
  assert message in str(info.value)
  assert info.value.line == line


@pytest.mark.parametrize("text, line, message", [
    ("item_id:token\temb:float_seq\ni\t1 x\n", 2, "'1 x' is not a number"),
    ("item_id:token\tp:float\ni\t1\nj\tcheap\n", 3, "'cheap' is not a number"),
    ("item_id:token\tp:float\ni\t1\ni\t2\n", 3, "appears twice"),
    ("item_id:token\tp:float\n10\t1\n   \n20\t2\n10\t3\n", 5, "'10' appears twice"),
    ("item_id:token\tp:float\ni\t1\nj\t-1e39\n", 3, "'-1e39' is out of float32 range"),
    ("item_id:token\tp:float\ni\t0\nj\tTrue\nk\t\nl\tfalse\n", 3, "'True' is not a number"),
    ("item_id:token\tp:float\ni\tTrue\nk\t\nl\tfalse\n", 2, "'True' is not a number"),
    ("item_id:token\temb:float_seq\ni\t1 2\nj\t1 nan\n", 3, "'1 nan' is not a number"),
    ("item_id:token\temb:float_seq\ni\t1 inf\n", 2, "'1 inf' is not a number"),
    ("item_id:token\temb:float_seq\ni\t1 2\nj\t\nk\t1e39 0\n", 4, "'1e39 0' is out of float32 range"),
    ("title:token\nx\n", 1, "missing column 'item_id'"),
])
def test_read_atomic_bad_item_file(tmp_path, text, line, message):
  write(tmp_path / "toy.inter", "user_id:token\titem_id:token\nu\ti\n")
  write(tmp_path / "toy.item", text)
  with raises_at("toy.item", line) as info:
    readers.read_atomic(tmp_path, "toy")
  assert message in str(info.value)


def test_read_atomic_float_column_of_0_and_1_beside_the_words_true_false(tmp_path):
  write(tmp_path / "toy.inter", "user_id:token\titem_id:token\tlabel:float\tnote:token\nu\t10\t1\ttrue\nu\t20\t0\tx\n")
  write(tmp_path / "toy.item", "item_id:token\tmovie_title:token_seq\tprice:float\n10\tTrue Lies\t1\n20\tHeat\t0\n")
  inter = readers.read_atomic(tmp_path, "toy")
  assert inter.columns["label"].tolist() == [1.0, 0.0]
  assert inter.item_features["price"][1:].tolist() == [1.0, 0.0]
  assert inter.item_features["movie_title"][1] == ("True", "Lies")


def test_read_atomic_missing_inter(tmp_path):
  with pytest.raises(DataError, match="nothing.inter: file not found"):
    readers.read_atomic(tmp_path, "nothing")
  (tmp_path / "folder.inter").mkdir()
  with pytest.raises(DataError, match="folder.inter: cannot read"):
    readers.read_atomic(tmp_path, "folder")


def test_read_atomic_feature_ids_are_tokens_whatever_their_declared_type(tmp_path):
  write(tmp_path / "toy.inter", "user_id:token\titem_id:token\nu\t10\n")
  write(tmp_path / "toy.item", "item_id:float\tprice:float\n10\t2.5\n")
  inter = readers.read_atomic(tmp_path, "toy")
  assert inter.item_features["price"][inter.item_id("10")] == 2.5



@pytest.mark.parametrize("kind, ids", [("item", ("mi1", "mi2")), ("item", ("1.0", "2.0")), ("user", ("U1",))])
def test_read_atomic_side_file_sharing_no_id_with_the_inter_is_an_error(tmp_path, kind, ids):
  write(tmp_path / "toy.inter", "user_id:token\titem_id:token\nu1\t1\nu1\t2\nu2\t1\n")
  write(tmp_path / f"toy.{kind}", f"{kind}_id:token\tx:token\n" + "".join(f"{i}\tv\n" for i in ids))
  with raises_at(f"toy.{kind}", None) as info:
    readers.read_atomic(tmp_path, "toy")
  message = str(info.value)
  assert f"none of its {len(ids)} {kind} ids appear in toy.inter" in message
  assert repr(ids[0]) in message and ("'1', '2'" if kind == "item" else "'u1', 'u2'") in message   # both sides shown


def test_read_atomic_side_file_sharing_some_ids_is_read(tmp_path):
  write(tmp_path / "toy.inter", "user_id:token\titem_id:token\nu1\t1\n")
  write(tmp_path / "toy.item", "item_id:token\tx:token\n9\tunseen\n1\tseen\n")
  assert readers.read_atomic(tmp_path, "toy").item_features["x"].tolist() == ["", "seen"]


def test_read_atomic_strips_spaces_around_ids_only(tmp_path):
  write(tmp_path / "toy.inter", "user_id:token\titem_id:token\tnote:token\n196 \t i1\t a \n196\ti1 \tb\n")
  write(tmp_path / "toy.item", "item_id:token\tyear:token\n i1 \t 1995 \n")
  write(tmp_path / "toy.user", "user_id:token\tage:token\n  196\t24\n")
  inter = readers.read_atomic(tmp_path, "toy")
  assert list(inter.user_vocab) == [PAD_TOKEN, "196"] and list(inter.item_vocab) == [PAD_TOKEN, "i1"]
  assert inter.columns["note"].tolist() == [" a ", "b"]                    # other fields as written
  assert inter.item_features["year"][1] == " 1995 " and inter.user_features["age"][1] == "24"
  write(tmp_path / "toy.item", "item_id:token\tyear:token\ni1\t1995\ni1 \t1996\n")
  with raises_at("toy.item", 3) as info:
    readers.read_atomic(tmp_path, "toy")
  assert "'i1' appears twice" in str(info.value)
  write(tmp_path / "toy.inter", "user_id:token\titem_id:token\nu\ti\n  \ti\n")
  with raises_at("toy.inter", 3) as info:
    readers.read_atomic(tmp_path, "toy")
  assert "'user_id': missing value" in str(info.value)


def test_read_movielens_strips_spaces_around_ids(tmp_path):
  write(tmp_path / "ratings.dat", "1 ::10::5::1\n1::10 ::4::2\n")
  write(tmp_path / "movies.dat", " 10::Heat (1995)::Drama\n")
  inter = readers.read_movielens(tmp_path, "ml-1m")
  assert (inter.num_users, inter.num_items) == (2, 2) and inter.item_features["release_year"][1] == "1995"


# ----------------------------------------------------------------------------- MovieLens raw

def test_read_movielens_100k(tmp_path):
  flags = ["0"] * 19
  comedy = flags.copy()
  comedy[5] = comedy[8] = "1"
  write(tmp_path / "u.data", "1\t10\t4\t100\n2\t10\t3\t50\n1\t20\t5\t60\n")
  write(tmp_path / "u.item", "|".join(["10", "Café (1995)", "01-Jan-1995", "", "http://x", *comedy]) + "\n"
        + "|".join(["20", "unknown", "", "", "", "1", *flags[1:]]) + "\n", encoding="latin-1")
  write(tmp_path / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
  inter = readers.read_movielens(tmp_path, "ml-100k")
  assert len(inter) == 3 and inter.num_users == 3 and inter.num_items == 3
  i10 = inter.item_id("10")
  assert inter.item_features["movie_title"][i10] == "Café (1995)"
  assert inter.item_features["release_year"][i10] == "1995"
  assert inter.item_features["genres"][i10] == ("Comedy", "Drama")
  assert inter.item_features["genres"][inter.item_id("20")] == ("unknown",)
  assert inter.user_features["occupation"][inter.user_id("2")] == "other"
  np.testing.assert_allclose(inter.timestamp, [100, 50, 60])


def test_read_movielens_1m_dat(tmp_path):
  write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
  write(tmp_path / "movies.dat", "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n", encoding="latin-1")
  write(tmp_path / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
  inter = readers.read_movielens(tmp_path, "ml-1m")
  assert len(inter) == 3 and list(inter.item_vocab) == [PAD_TOKEN, "1193", "661"]
  assert inter.item_features["genres"][2] == ("Animation", "Children's", "Musical")
  assert inter.item_features["release_year"][1] == "1975"
  assert inter.user_features["age"][inter.user_id("2")] == "56"


def test_read_movielens_csv(tmp_path):
  write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,4.0,1112484676\n")
  write(tmp_path / "movies.csv", 'movieId,title,genres\n2,"Jumanji, The (1995)",Adventure|Fantasy\n'
        "29,Untitled,(no genres listed)\n")
  inter = readers.read_movielens(tmp_path, "ml-25m")
  assert inter.item_features["movie_title"][inter.item_id("2")] == "Jumanji, The (1995)"
  assert inter.item_features["genres"][inter.item_id("29")] == ()
  assert inter.item_features["release_year"][inter.item_id("29")] == ""
  np.testing.assert_allclose(inter.rating, [3.5, 4.0])


@pytest.mark.parametrize("variant, file, text, line, message", [
    ("ml-100k", "u.data", "1\t2\t3\t4\n1\t2\t3\n", 2, "expected 4 fields"),
    ("ml-1m", "ratings.dat", "1::2::3::4\n1::2::five::4\n", 2, "'five' is not a number"),
    ("ml-10m", "ratings.dat", "1::2::3::4::5\n", 1, "expected 4 fields"),
    ("ml-20m", "ratings.csv", "user,movie,rating,timestamp\n1,2,3,4\n", 1, "expected header"),
    ("ml-32m", "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,3,x\n", 3, "'x' is not a number"),
    ("ml-1m", "ratings.dat", "", 1, "file is empty"),
    ("ml-100k", "u.data", "1\t2\t3\t4\n1\t3\t4e38\t5\n", 2, "'4e38' is out of float32 range"),
    ("ml-20m", "movies.csv", 'movieId,title,genres\n1,"A (1995)",Drama\n2,B (1996)\n', 3, "expected 3 fields"),
])
def test_read_movielens_errors(tmp_path, variant, file, text, line, message):
  write(tmp_path / file, text)
  if file == "movies.csv":
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,3,4\n")
  with raises_at(file, line) as info:
    readers.read_movielens(tmp_path, variant)
  assert message in str(info.value)


# ----------------------------------------------------------------------------- generic tables

def test_read_table_csv_and_tsv(tmp_path):
  write(tmp_path / "log.csv", "uid,iid,when,stars,device\na,x,2020-01-01,5,phone\nb,x,2020-01-02,3,web\n")
  inter = readers.read_table(tmp_path / "log.csv", user_col="uid", item_col="iid", timestamp_col="when",
                             rating_col="stars", extra_cols=("device",))
  assert len(inter) == 2 and inter.num_items == 2
  assert inter.timestamp[1] - inter.timestamp[0] == 86400.0
  assert list(inter.columns["device"]) == ["phone", "web"]
  write(tmp_path / "log.tsv", "u\ti\tt\n1\t2\t3\n")
  inter = readers.read_table(tmp_path / "log.tsv", user_col="u", item_col="i", timestamp_col="t")
  assert inter.timestamp.tolist() == [3.0] and inter.user_vocab[1] == "1"


def test_read_table_errors(tmp_path):
  path = write(tmp_path / "log.csv", "uid,iid,stars\na,x,5\n\nb,y,abc\n")
  with raises_at("log.csv", 1, ) as info:
    readers.read_table(path, user_col="user", item_col="iid")
  assert "'user' not found" in str(info.value)
  with raises_at("log.csv", 4) as info:
    readers.read_table(path, user_col="uid", item_col="iid", rating_col="stars")
  assert "'abc' is not a number" in str(info.value)
  with raises_at("log.csv", 3):
    readers.read_table(write(tmp_path / "log.csv", "uid,iid\na,x\n,y\n"), user_col="uid", item_col="iid")
  for text, line, message in [("uid,iid,stars\na,x,5\nb,y,inf\n", 3, "'inf' is not a number"),
                              ("uid,iid,uid\na,x,b\n", 1, "header names ['uid'] more than once"),
                              ("uid,iid,when\na,x,2020-01-01\nb,y,2020-13-45\n", 3,
                               "'2020-13-45' is not a number or a date")]:
    with raises_at("log.csv", line) as info:
      readers.read_table(write(tmp_path / "log.csv", text), user_col="uid", item_col="iid", rating_col="stars"
                         if "stars" in text else None, timestamp_col="when" if "when" in text else None)
    assert message in str(info.value)


@pytest.mark.parametrize("text, line, message", [
    ("u,i,r\n1,10,5,\n2,20,3,\n", 2, "expected 3 fields (as the header), found 4"),   # pandas: an index column
    ("u,i,r\n1,10,5\n2,20,3,7\n", 3, "expected 3 fields (as the header), found 4"),
    ("u,i,r\n1,10,5\n2,20\n", 3, "expected 3 fields (as the header), found 2"),        # pandas: r = ""
    ("u,i,r\n1,\"a\nb\",5\n2,20,x\n", 4, "'x' is not a number"),                        # a field over two lines
    ("u,i,r\r1,10,5\r", 1, "carriage return (\\r) without a line feed"),
])
def test_read_table_refuses_rows_of_another_width_by_their_line(tmp_path, text, line, message):
  with raises_at("log.csv", line) as info:
    readers.read_table(write(tmp_path / "log.csv", text), user_col="u", item_col="i", rating_col="r")
  assert message in str(info.value)


def test_read_table_dates_need_digits_and_may_pass_2262(tmp_path):
  for word in ("now", "today", "Jan"):   # pandas: the clock, the clock, the year 1
    with raises_at("log.csv", 3) as info:
      readers.read_table(write(tmp_path / "log.csv", f"u,i,t\n1,2,5\n1,3,{word}\n"), user_col="u", item_col="i",
                         timestamp_col="t")
    assert f"{word!r} is not a number or a date" in str(info.value)
  path = write(tmp_path / "log.csv", "u,i,t\n1,2,9999-12-31\n1,3,1500-01-01\n")
  assert readers.read_table(path, user_col="u", item_col="i", timestamp_col="t").timestamp.tolist() == [
      253402214400.0, -14831769600.0]


def test_datetime_columns_are_utc_seconds_and_nat_is_missing():
  """The Parquet path: datetime columns (pyarrow is not a dependency, so the column is built here)."""
  import pandas as pd
  aware = pd.Series(pd.to_datetime(["2020-01-01 00:00", "2020-01-01 02:00"]).tz_localize("Europe/Berlin"), name="t")
  np.testing.assert_array_equal(readers._numeric(Path("x.parquet"), aware, None, dates=True),
                                [1577833200.0, 1577840400.0])              # 23:00 and 01:00 UTC
  with pytest.raises(DataError, match="x.parquet: row 1: column 't': missing value"):
    readers._numeric(Path("x.parquet"), pd.Series(pd.to_datetime(["2020-01-01", None]), name="t"), None, dates=True)


def test_read_table_names_the_bad_value_of_a_timestamp_or_rating(tmp_path):
  for text, line, message in [("u,i,t\n1,2,100\n1,3,abc\n", 3, "'abc' is not a number or a date"),
                              ("u,i,t\n1,2,1600000000\n1,3,\n", 3, "column 't': missing value"),
                              ("u,i,r\n1,2,5\n1,3,1e39\n", 3, "column 'r': '1e39' is out of float32 range")]:
    with raises_at("log.csv", line) as info:
      readers.read_table(write(tmp_path / "log.csv", text), user_col="u", item_col="i",
                         timestamp_col="t" if "t\n" in text else None, rating_col="r" if "r\n" in text else None)
    assert message in str(info.value)
  path = write(tmp_path / "log.csv", "u,i,t\n1,2,86400\n1,3,1970-01-03\n")   # numbers are seconds, dates converted
  assert readers.read_table(path, user_col="u", item_col="i", timestamp_col="t").timestamp.tolist() == [86400, 172800]


def test_a_raw_id_that_spells_the_padding_token_is_found():
  inter = from_columns([PAD_TOKEN, "bob"], ["x", PAD_TOKEN])
  assert inter.user_id(PAD_TOKEN) == 1 and inter.item_id(PAD_TOKEN) == 2 and inter.user_id("bob") == 2
  with pytest.raises(UnknownIdError, match="unknown user id 'ann'"):
    inter.user_id("ann")


def test_from_columns_refuses_a_rating_beyond_float32():
  with pytest.raises(ValueError, match="'rating'.*out of float32 range"):
    from_columns(["u"], ["i"], rating=[1e39])


def test_read_table_dates_of_several_formats(tmp_path):
  path = write(tmp_path / "log.csv", "u,i,t\n1,10,2020-01-01\n2,20,2020-01-02T10:00:00\n"
               "3,20,2020-01-03 00:00:00+02:00\n")
  inter = readers.read_table(path, user_col="u", item_col="i", timestamp_col="t")
  np.testing.assert_array_equal(np.diff(inter.timestamp), [34 * 3600.0, 12 * 3600.0])   # +02:00 is 22:00 UTC


def test_read_table_parquet(tmp_path):
  path = tmp_path / "log.parquet"
  try:
    import pyarrow  # noqa: F401
  except ImportError:
    path.write_bytes(b"PAR1")
    with pytest.raises(DataError, match="log.parquet: reading Parquet needs pyarrow"):
      readers.read_table(path, user_col="u", item_col="i")
    return
  import pandas as pd
  pd.DataFrame({"u": [1, 2], "i": [3, 3], "r": [1.0, 2.0]}).to_parquet(path)
  inter = readers.read_table(path, user_col="u", item_col="i", rating_col="r")
  assert len(inter) == 2 and inter.num_items == 2



@pytest.mark.parametrize("name, text", [("log.csv", "u,i\n1,2\n 1 ,\t2\n"), ("log.tsv", "u\ti\n1\t2\n 1 \t2  \n")])
def test_read_table_strips_spaces_and_tabs_around_ids(tmp_path, name, text):
  inter = readers.read_table(write(tmp_path / name, text), user_col="u", item_col="i")
  assert list(inter.user_vocab) == [PAD_TOKEN, "1"] and list(inter.item_vocab) == [PAD_TOKEN, "2"]
  with raises_at("log.csv", 3) as info:
    readers.read_table(write(tmp_path / "log.csv", "u,i\n1,2\n1,  \n"), user_col="u", item_col="i")
  assert "column 'i': missing id" in str(info.value)


def test_read_table_reads_a_date_column_in_one_order(tmp_path):
  read = lambda text: readers.read_table(write(tmp_path / "log.csv", "u,i,t\n" + text), user_col="u", item_col="i",
                                         timestamp_col="t").timestamp.tolist()
  day = 86400.0
  jan1 = 1577836800.0
  assert read("1,2,13/02/2020\n1,3,01/02/2020\n") == [jan1 + 43 * day, jan1 + 31 * day]   # both day first
  assert read("1,2,01/02/2020\n1,3,02/13/2020\n") == [jan1 + day, jan1 + 43 * day]        # both month first
  assert read("1,2,01/02/2020\n1,3,2020-01-03T00:00Z\n1,4,0\n") == [jan1 + day, jan1 + 2 * day, 0]   # ISO: any
  for text, value in [("1,2,01/02/2020\n1,3,13/02/2020\n", "13/02/2020"),    # month first, then day first
                      ("1,2,13/02/2020\n1,3,02/13/2020\n", "02/13/2020"),    # day first, then month first
                      ("1,2,2020-01-05\n1,3,01/02/2020\n", "01/02/2020")]:   # ISO, then another format
    with raises_at("log.csv", 3) as info:
      read(text)
    assert f"{value!r} is not a number or a date in the format of the column's first date" in str(info.value)
    assert "YYYY-MM-DD" in str(info.value) and "Unix seconds" in str(info.value)


# ----------------------------------------------------------------------------- LightGCN and sequences

def test_read_lightgcn_shared_vocab(tmp_path):
  write(tmp_path / "train.txt", "0 5 6\n1 6\n2\n")
  write(tmp_path / "test.txt", "0 7\n1 5 6\n")
  train, test = readers.read_lightgcn(tmp_path)
  assert list(train.user_vocab) == [PAD_TOKEN, "0", "1", "2"]     # user 2 has no train items
  assert list(train.item_vocab) == [PAD_TOKEN, "5", "6", "7"]     # item 7 is test-only, kept
  assert train.user_vocab is test.user_vocab and train.item_vocab is test.item_vocab
  np.testing.assert_array_equal(train.user, [1, 1, 2])
  np.testing.assert_array_equal(train.item, [1, 2, 2])
  np.testing.assert_array_equal(test.user, [1, 2, 2])
  np.testing.assert_array_equal(test.item, [3, 1, 2])
  assert train.timestamp is None and train.concat(test).num_items == 4


def test_read_lightgcn_skips_empty_test_lines(tmp_path):
  write(tmp_path / "train.txt", "0 5\n1 6\n")
  write(tmp_path / "test.txt", "0 6\n1\n")
  with pytest.warns(UserWarning, match="test.txt: skipped 1 lines .* line 2"):
    _, test = readers.read_lightgcn(tmp_path)
  assert len(test) == 1


@pytest.mark.parametrize("train, test, file, line, message", [
    ("0 5\n1 6\n", "0 6\n\n9 5\n", "test.txt", 3, "user '9' does not appear in train.txt"),
    ("0 5\n1 x6\n", "0 6\n", "train.txt", 2, "'x6' is not a non-negative integer"),
    ("", "0 6\n", "train.txt", 1, "file is empty"),
    ("0 5 6\r1 6\r", "0 6\n", "train.txt", 1, "carriage return (\\r) without a line feed"),   # not one user
])
def test_read_lightgcn_errors(tmp_path, train, test, file, line, message):
  write(tmp_path / "train.txt", train)
  write(tmp_path / "test.txt", test)
  with raises_at(file, line) as info:
    readers.read_lightgcn(tmp_path)
  assert message in str(info.value)


def test_read_user_item_sequences(tmp_path):
  path = write(tmp_path / "seq.txt", "1 10\n1 11\n2 11\n\n1 12\n2 10\n")
  inter = readers.read_user_item_sequences(path)
  np.testing.assert_array_equal(inter.timestamp, np.arange(5))
  np.testing.assert_array_equal(inter.user, [1, 1, 2, 1, 2])
  np.testing.assert_array_equal(inter.item, [1, 2, 2, 3, 1])
  with raises_at("bad.txt", 2) as info:
    readers.read_user_item_sequences(write(tmp_path / "bad.txt", "1 10\n1 11 12\n"))
  assert "expected 2 fields" in str(info.value)
  with raises_at("mac.txt", 2) as info:
    readers.read_user_item_sequences(write(tmp_path / "mac.txt", "1 10\n1 11\r1 12\r"))
  assert "carriage return" in str(info.value)


# ----------------------------------------------------------------------------- real data

def test_real_ml100k_atomic(data_file):
  folder = data_file("ml-100k/ml-100k.inter").parent
  start = time.perf_counter()
  inter = readers.read_atomic(folder, "ml-100k")
  elapsed = time.perf_counter() - start
  assert (inter.num_users - 1, inter.num_items - 1, len(inter)) == (943, 1682, 100000)
  assert set(inter.item_features) == {"movie_title", "release_year", "class"}
  assert inter.item_features["class"][inter.item_id("1")] == ("Animation", "Children's", "Comedy")
  assert inter.user_features["occupation"][inter.user_id("1")] == "technician"
  assert (inter.user_vocab[1], inter.item_vocab[1]) == ("196", "242")     # first row of the file
  assert set(np.unique(inter.rating)) == {1, 2, 3, 4, 5}
  assert elapsed < 5.0, f"ml-100k took {elapsed:.2f}s"


def test_real_gowalla(data_file):
  folder = data_file("gowalla/train.txt").parent
  train, test = readers.read_lightgcn(folder)
  assert len(train) == 810128
  assert (train.num_users - 1, train.num_items - 1) == (29858, 40981)
  assert len(test) == 217242       # lines of test.txt minus user tokens, observed
  assert train.user_vocab[1] == "0" and train.item_vocab[1] == "0"
  assert np.isin(np.unique(test.user), np.unique(train.user)).all()


def test_real_beauty_keeps_order(data_file):
  path = data_file("beauty/beauty.txt")
  inter = readers.read_user_item_sequences(path)
  assert (len(inter), inter.num_users - 1, inter.num_items - 1) == (353962, 40226, 54542)
  assert np.all(np.diff(inter.timestamp) > 0)
  with open(path) as f:
    first = [f.readline().split() for _ in range(3)]
  assert [[inter.user_vocab[u], inter.item_vocab[i]] for u, i in zip(inter.user[:3], inter.item[:3])] == first



@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
@pytest.mark.parametrize("file, read", [
    ("toy.inter", lambda d: readers.read_atomic(d, "toy")),
    ("toy.item", lambda d: readers.read_atomic(d, "toy")),
    ("log.csv", lambda d: readers.read_table(d / "log.csv", user_col="user_id", item_col="item_id")),
    ("train.txt", readers.read_lightgcn),
    ("seq.txt", lambda d: readers.read_user_item_sequences(d / "seq.txt")),
    ("u.data", lambda d: readers.read_movielens(d, "ml-100k")),
    ("u.item", lambda d: readers.read_movielens(d, "ml-100k")),
])
def test_readers_refuse_utf16_and_utf32_files(tmp_path, encoding, file, read):
  texts = {"toy.inter": "user_id:token\titem_id:token\n1\t2\n", "toy.item": "item_id:token\tx:token\n2\ty\n",
           "log.csv": "user_id,item_id\n1,2\n", "train.txt": "0 1\n", "test.txt": "0 1\n", "seq.txt": "1 2\n",
           "u.data": "1\t2\t3\t4\n", "u.item": "|".join(["2", "T", "", "", "", *["0"] * 19]) + "\n"}
  for name, text in texts.items():
    write(tmp_path / name, text, encoding if name == file else "utf-8")
  with raises_at(file, None) as info:
    read(tmp_path)
  assert "not UTF-8 text" in str(info.value) and "iconv" in str(info.value)
  assert ("UTF-32" if encoding == "utf-32" else "UTF-16") in str(info.value)


def test_readers_refuse_a_utf16_file_whose_first_line_is_blank(tmp_path):
  with raises_at("seq.txt", None) as info:
    readers.read_user_item_sequences(write(tmp_path / "seq.txt", "\n1 2\n", "utf-16-le"))
  assert "not UTF-8 text" in str(info.value)


def test_readers_accept_a_utf8_byte_order_mark(tmp_path):
  write(tmp_path / "toy.inter", "\ufeff" + INTER)
  assert len(readers.read_atomic(tmp_path, "toy")) == 3
  assert len(readers.read_table(write(tmp_path / "log.csv", "\ufeffu,i\n1,2\n"), user_col="u", item_col="i")) == 1
