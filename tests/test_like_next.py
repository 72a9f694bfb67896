"""experiments/like_next_lstm.py: example building (labels, padding, split, no leakage) and a short training run."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from recjax.data.interactions import from_columns
from recjax.data.splits import leave_one_out
from recjax.eval.classification import auc, log_loss

_SCRIPT = Path(__file__).parents[1] / "experiments" / "like_next_lstm.py"


def _load_script():
  """The script as a module (experiments/ is not a package)."""
  name = "like_next_lstm"
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # flax's dataclass transform looks the module up in sys.modules
    spec.loader.exec_module(module)
  return sys.modules[name]


ln = _load_script()
INPUTS = ("seq", "seq_label", "cand", "user_mean")


def _tiny():
  """User a: items 10..14 rated 5 2 4 3 5 (labels 1 0 1 0 1), rows out of time order; user b: 20 (1), 21 (4)."""
  rows = [  # user, item, rating, timestamp
    ("a", "12", 4.0, 30.0), ("b", "21", 4.0, 2.0), ("a", "10", 5.0, 10.0), ("a", "14", 5.0, 50.0),
    ("a", "11", 2.0, 20.0), ("b", "20", 1.0, 1.0), ("a", "13", 3.0, 40.0),
  ]
  user, item, rating, ts = zip(*rows)
  return from_columns(user, item, rating=rating, timestamp=ts, name="tiny")


def _random_inter(seed: int = 0, users: int = 6, per_user: int = 9):
  """Random ratings 1..5 with timestamp ties, each user's items distinct, rows shuffled."""
  rng = np.random.default_rng(seed)
  user = np.repeat(np.arange(users), per_user)
  item = np.concatenate([rng.choice(40, per_user, replace=False) for _ in range(users)])
  ts = rng.integers(0, 4, len(user)).astype(np.float64)  # many ties: order falls back to file order
  rating = rng.integers(1, 6, len(user)).astype(np.float32)
  perm = rng.permutation(len(user))
  return from_columns(user[perm], item[perm], rating=rating[perm], timestamp=ts[perm], name="random")


def test_examples_labels_padding_and_split():
  inter = _tiny()
  parts = ln.build_examples(inter, max_len=3, holdout=1)
  i = lambda *raw: [inter.item_id(r) for r in raw]
  a, b = inter.user_id("a"), inter.user_id("b")

  train = parts["train"]  # a's targets 11, 12 (positions 1, 2), then b's 21 (a 2-interaction user: all train)
  np.testing.assert_array_equal(train["user"], [a, a, b])
  np.testing.assert_array_equal(train["position"], [1, 2, 1])
  np.testing.assert_array_equal(train["seq"], [[0, 0, *i("10")], [0, *i("10", "11")], [0, 0, *i("20")]])
  np.testing.assert_array_equal(train["seq_label"], [[0, 0, 2], [0, 2, 1], [0, 0, 1]])
  np.testing.assert_array_equal(train["cand"], i("11", "12", "21"))
  np.testing.assert_array_equal(train["label"], [0, 1, 1])
  np.testing.assert_allclose(train["user_mean"], [1.0, 0.5, 0.0])

  valid, test = parts["valid"], parts["test"]  # a's second-to-last (13) and last (14) interactions
  np.testing.assert_array_equal(valid["seq"], [i("10", "11", "12")])
  np.testing.assert_array_equal(valid["seq_label"], [[2, 1, 2]])
  np.testing.assert_array_equal(valid["cand"], i("13"))
  np.testing.assert_array_equal(valid["label"], [0])
  np.testing.assert_array_equal(test["seq"], [i("11", "12", "13")])  # cut to the last L = 3
  np.testing.assert_array_equal(test["seq_label"], [[1, 2, 1]])
  np.testing.assert_array_equal(test["cand"], i("14"))
  np.testing.assert_array_equal(test["label"], [1])
  np.testing.assert_allclose(test["user_mean"], [0.5])  # over the whole past (4 rows), not only the window
  for part in parts.values():
    assert part["seq"].dtype == np.int32 and part["label"].dtype == np.float32


def test_split_matches_leave_one_out():
  inter = _random_inter(seed=1)
  parts = ln.build_examples(inter, max_len=4, holdout=1)
  split = leave_one_out(inter)
  for name, rows in (("valid", split.valid), ("test", split.test)):
    got = sorted(zip(parts[name]["user"].tolist(), parts[name]["cand"].tolist()))
    assert got == sorted(zip(rows.user.tolist(), rows.item.tolist())), name
  n_examples = sum(len(p["label"]) for p in parts.values())
  assert n_examples == len(inter) - (inter.num_users - 1)  # every row but each user's first


@pytest.mark.parametrize("holdout", [1, 2])
def test_inputs_depend_only_on_strictly_earlier_interactions(holdout):
  """Flipping one interaction's label flips its own example's label and changes only later examples' inputs."""
  inter = _random_inter(seed=2)
  base = ln.build_examples(inter, max_len=4, holdout=holdout)
  key = lambda part: {(u, p): k for k, (u, p) in enumerate(zip(part["user"].tolist(), part["position"].tolist()))}
  keys = {name: key(part) for name, part in base.items()}
  position = {}  # row -> its position in its user's time order (the builder's order: stable sort on ties)
  order = np.lexsort((inter.timestamp, inter.user))
  starts = np.searchsorted(inter.user[order], inter.user[order])
  position.update(zip(order.tolist(), (np.arange(len(order)) - starts).tolist()))

  for row in range(len(inter)):
    rating = inter.rating.copy()
    rating[row] = 1.0 if rating[row] >= 4 else 5.0
    flipped = ln.build_examples(dataclasses.replace(inter, rating=rating), max_len=4, holdout=holdout)
    u, p = int(inter.user[row]), position[row]
    for name in ln.PARTS:
      assert keys[name] == key(flipped[name])
      for (eu, ep), k in keys[name].items():
        same_inputs = all(np.array_equal(base[name][f][k], flipped[name][f][k]) for f in INPUTS)
        if eu != u or ep <= p:  # other users, the example of this row and earlier ones: untouched inputs
          assert same_inputs, (row, name, eu, ep)
        else:  # a later example of the same user sees the flipped label
          assert not same_inputs, (row, name, eu, ep)
        assert (base[name]["label"][k] != flipped[name]["label"][k]) == (eu == u and ep == p)


def test_batches_are_fixed_size_with_zero_weight_padding():
  parts = ln.build_examples(_random_inter(seed=3), max_len=4)
  train = parts["train"]
  got = list(ln.batches(train, 16, np.random.default_rng(0)))
  assert all(b["seq"].shape == (16, 4) and b["label"].shape == (16,) for b in got)
  assert sum(b["weight"].sum() for b in got) == len(train["label"])
  cands = np.concatenate([b["cand"][b["weight"] > 0] for b in got])
  np.testing.assert_array_equal(np.sort(cands), np.sort(train["cand"]))  # each example exactly once


def test_bce_matches_log_loss():
  rng = np.random.default_rng(0)
  logits, labels = 3 * rng.standard_normal(12), rng.integers(0, 2, 12).astype(np.float32)
  weight = np.array([1.0] * 9 + [0.0] * 3, np.float32)
  got = float(ln.bce_with_logits(logits.astype(np.float32), labels, weight))
  assert got == pytest.approx(log_loss(logits[:9], labels[:9]), rel=1e-5)


def test_learns_a_planted_rule():
  """label = parity of the raw item id: 30 Adam steps bring the held-out AUC well above 0.5."""
  rng = np.random.default_rng(0)
  users, per_user = 200, 12
  user = np.repeat(np.arange(users), per_user)
  item = rng.integers(0, 30, len(user))
  rating = np.where(item % 2 == 0, 5.0, 1.0)
  inter = from_columns(user, item, rating=rating, timestamp=np.tile(np.arange(per_user), users), name="parity")
  parts = ln.build_examples(inter, max_len=8)
  model = ln.LikeNext(num_items=inter.num_items, dim=16, hidden_size=16, mlp_size=16, dropout=0.0, cell="lstm")
  params = ln.init_params(model, parts["train"], seed=0)
  losses = []
  params = ln.train(model, params, parts["train"], lr=1e-2, batch_size=64, seed=0, epochs=1, max_steps=30,
                    on_epoch=lambda epoch, p, loss: losses.append(loss))
  test = parts["test"]
  logits = ln.make_predict(model)(params, test, 64)
  assert np.all(np.isfinite(logits)) and logits.shape == test["label"].shape
  assert auc(logits, test["label"]) > 0.9
  assert auc(test["user_mean"], test["label"]) < 0.7  # the past labels alone do not carry the rule
  assert len(losses) == 1 and losses[0] < np.log(2)
