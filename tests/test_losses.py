"""Losses against plain-numpy references, and the tasks that bind models to them."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from testutil import rbg_key as _key

from recjax import losses, tasks
from recjax.errors import ConfigError
from recjax.models import BPRMF, SASRec, init_params

RNG = np.random.default_rng(0)




def _np_weighted_mean(values, weight):
  return np.sum(weight * values) / max(np.sum(weight), losses.EPS)


def np_bpr(pos, neg, weight):
  pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
  return _np_weighted_mean(np.mean(np.logaddexp(0.0, -(pos[..., None] - neg)), -1), weight)


def np_bce(pos, neg, weight):
  sig = lambda x: 1 / (1 + np.exp(-np.asarray(x, np.float64)))  # noqa: E731
  return _np_weighted_mean(-np.log(sig(pos)) - np.sum(np.log(1 - sig(neg)), -1), weight)


def np_softmax_ce(logits, target, weight):
  logits = np.asarray(logits, np.float64)
  log_norm = np.log(np.sum(np.exp(logits[..., 1:]), -1))  # the padding column 0 left out
  return _np_weighted_mean(log_norm - np.take_along_axis(logits, target[..., None], -1)[..., 0], weight)


def np_sampled_softmax(pos, neg, weight, pos_log_q, neg_log_q, neg_valid=None):
  pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
  neg_logits = neg - np.asarray(neg_log_q, np.float64)
  if neg_valid is not None:
    neg_logits = np.where(neg_valid, neg_logits, -np.inf)
  logits = np.concatenate([(pos - np.asarray(pos_log_q, np.float64))[..., None], neg_logits], -1)
  top = logits.max(-1, keepdims=True)  # the positive logit is finite, so top is too
  log_norm = np.log(np.sum(np.exp(logits - top), -1)) + top[..., 0]
  return _np_weighted_mean(log_norm - logits[..., 0], weight)


def np_gbce(pos, neg, weight, beta):
  sig = lambda x: 1 / (1 + np.exp(-np.asarray(x, np.float64)))  # noqa: E731
  return _np_weighted_mean(-np.log(sig(pos) ** beta) - np.sum(np.log(1 - sig(neg)), -1), weight)


NP_LOSSES = {"bpr": np_bpr, "bce": np_bce}
# Jitted once per shape: op-by-op execution would compile every primitive separately.
BPR, BCE = (jax.jit(jax.value_and_grad(f, argnums=(0, 1))) for f in (losses.bpr, losses.bce))
SOFTMAX_CE = jax.jit(jax.value_and_grad(losses.softmax_ce))
SAMPLED_SOFTMAX = jax.jit(jax.value_and_grad(losses.sampled_softmax, argnums=(0, 1, 3, 4)))
GBCE = jax.jit(jax.value_and_grad(losses.gbce, argnums=(0, 1)))


def _scores(shape, n):
  pos = RNG.normal(size=shape).astype(np.float32) * 3
  neg = RNG.normal(size=shape + (n,)).astype(np.float32) * 3
  weight = (RNG.random(shape) > 0.3).astype(np.float32)
  return pos, neg, weight


@pytest.mark.parametrize("shape", [(5,), (3, 4)])
def test_sampled_losses_match_numpy(shape):
  pos, neg, weight = _scores(shape, 3)
  np.testing.assert_allclose(BPR(pos, neg, weight)[0], np_bpr(pos, neg, weight), rtol=1e-5)
  np.testing.assert_allclose(BCE(pos, neg, weight)[0], np_bce(pos, neg, weight), rtol=1e-5)


def test_sampled_losses_stable_for_large_scores():
  pos, neg, weight = np.array([80.0, -80.0]), np.array([[-80.0], [80.0]]), np.ones(2)
  for fn in (BPR, BCE):
    chex.assert_tree_all_finite(fn(pos, neg, weight))
  np.testing.assert_allclose(BPR(pos, neg, weight)[0], (0 + 160) / 2, rtol=1e-6)


@pytest.mark.parametrize("shape", [(4,), (2, 3)])
def test_softmax_ce_matches_numpy_and_excludes_padding(shape):
  num_items = 7
  logits = RNG.normal(size=shape + (num_items,)).astype(np.float32) * 2
  target = RNG.integers(1, num_items, size=shape)
  weight = (RNG.random(shape) > 0.3).astype(np.float32)
  ref = np_softmax_ce(logits, target, weight)
  value, grad = SOFTMAX_CE(logits, target, weight)
  np.testing.assert_allclose(value, ref, rtol=1e-5)
  np.testing.assert_array_equal(grad[..., 0], 0.0)
  bumped = logits.copy()
  bumped[..., 0] = 50.0  # the padding logit does not matter
  np.testing.assert_allclose(SOFTMAX_CE(bumped, target, weight)[0], ref, rtol=1e-5)


def np_softmax_ce_rows_grads(h, items, target, weight, item_mask):
  """Loss and its gradients in h, items and weight of the full softmax over items[1:] where item_mask."""
  h, items, weight = (np.asarray(a, np.float64) for a in (h, items, weight))
  keep = np.asarray(item_mask).copy()
  keep[0] = False
  logits = np.where(keep, h @ items.T, -np.inf)  # [R, N]
  top = logits.max(-1, keepdims=True)
  log_norm = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
  per_row = log_norm - np.sum(h * items[target], -1)
  total = max(weight.sum(), losses.EPS)
  loss = np.sum(weight * per_row) / total
  scale = (weight / total)[:, None]
  probs = np.exp(logits - log_norm[:, None]) * scale  # dL/dlogits of the softmax part
  grad_h = probs @ items - scale * items[target]
  grad_items = probs.T @ h
  np.add.at(grad_items, target, -scale * h)
  return loss, grad_h, grad_items, (per_row - loss) / total


# Logit bytes per chunk (a row of 11 classes is 44 bytes) for 13 rows: one chunk; 4 chunks of 4 rows and
# 2 of 7 (13 is prime: both padded with weight-0 rows); 13 chunks of one row.
@pytest.mark.parametrize("chunk_bytes", [1 << 30, 44 * 4, 44 * 7, 1])
@pytest.mark.parametrize("masked", [False, True])
def test_softmax_ce_rows_matches_numpy_values_and_gradients(chunk_bytes, masked):
  rows, num_items, dim = 13, 12, 5
  h = RNG.normal(size=(rows, dim)).astype(np.float32)
  items = RNG.normal(size=(num_items, dim)).astype(np.float32)
  target = RNG.integers(1, num_items, size=rows)
  weight = (RNG.random(rows) > 0.3).astype(np.float32) * RNG.random(rows).astype(np.float32)
  item_mask = RNG.random(num_items) > 0.3 if masked else np.ones(num_items, bool)
  item_mask[target] = True
  loss_fn = lambda h, items, weight: losses.softmax_ce_rows(  # noqa: E731
    h, items, target, weight, jnp.asarray(item_mask) if masked else None, chunk_bytes=chunk_bytes, min_chunk_rows=1)
  value, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)))(h, items, weight)
  ref = np_softmax_ce_rows_grads(h, items, target, weight, item_mask)
  np.testing.assert_allclose(value, ref[0], rtol=1e-5)
  for got, want in zip(grads, ref[1:]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # the same loss as the plain softmax over the [R, N] scores, for any leading shape
  plain = losses.softmax_ce(np.where(item_mask, h @ items.T, np.finfo(np.float32).min), target, weight)
  np.testing.assert_allclose(loss_fn(h.reshape(1, rows, dim), items, weight.reshape(1, rows)), plain, rtol=1e-5)


def test_softmax_ce_rows_gradients_check_in_float64():
  with jax.enable_x64(True):
    h, items = RNG.normal(size=(4, 3, 5)), RNG.normal(size=(9, 5))
    target, weight = RNG.integers(1, 9, size=(4, 3)), RNG.random((4, 3))
    loss_fn = lambda h, items, weight: losses.softmax_ce_rows(  # noqa: E731
      h, items, target, weight, chunk_bytes=64, min_chunk_rows=1)
    check_grads(loss_fn, (h, items, weight), order=1, modes=["rev"])


def test_softmax_ce_rows_chunks_divide_the_rows_when_they_can():
  assert losses._chunk_count(20480, 17) == 20   # 1,024 rows each, no padding
  assert losses._chunk_count(7, 2) == 2          # 7 is prime: no divisor within 2x, so padded
  assert losses._chunk_count(5, 9) == 5          # never more chunks than rows
  assert losses._chunk_count(0, 1) == 1


def test_zero_weight_rows_are_ignored():
  logits = np.array([[0.0, 1.0, 2.0], [5.0, -3.0, 9.0]], np.float32)
  target = np.array([2, 0])  # the second row is padding: target 0, weight 0
  weight = np.array([1.0, 0.0], np.float32)
  value, grad = SOFTMAX_CE(logits, target, weight)
  np.testing.assert_allclose(value, np.log(np.exp(1.0) + np.exp(2.0)) - 2.0, rtol=1e-6)
  chex.assert_tree_all_finite(grad)
  np.testing.assert_array_equal(grad[1], 0.0)
  pos, neg = np.array([1.0, 1e4], np.float32), np.array([[0.0], [-1e4]], np.float32)
  for fn in (BPR, BCE):
    np.testing.assert_allclose(fn(pos, neg, weight)[0], fn(pos[:1], neg[:1], weight[:1])[0], rtol=1e-6)
  assert float(BPR(pos, neg, np.zeros(2, np.float32))[0]) == 0.0


def test_negatives_without_their_own_axis_are_refused():
  pos, neg, weight = jnp.zeros(4), jnp.ones(4), jnp.ones(4)   # neg [B] instead of [B, n] would broadcast
  for name, fn in [("bpr", losses.bpr), ("bce", losses.bce), ("gbce", lambda *a: losses.gbce(*a, beta=0.5)),
                   ("sampled_softmax", lambda p, n, w: losses.sampled_softmax(p, n, w, p, n))]:
    with pytest.raises(ValueError, match=rf"{name}: neg_scores \(4,\) must be positives' \(4,\) \+ \(n,\)"):
      fn(pos, neg, weight)


def test_l2():
  a, b = np.arange(3.0), np.ones((2, 2))
  np.testing.assert_allclose(losses.l2(a, b), 0.5 * (5.0 + 4.0))


# --- sampled softmax with log-Q correction, gBCE ----------------------------------------------


def _log_q(shape):
  """log of random sampling probabilities, spread over a few orders of magnitude."""
  return np.log(RNG.uniform(1e-4, 1e-1, size=shape)).astype(np.float32)


@pytest.mark.parametrize("shape", [(6,), (3, 4)])
def test_sampled_softmax_matches_numpy(shape):
  n = 5
  pos, neg, weight = _scores(shape, n)
  weight[..., 0] = 0.0  # at least one padded row
  pos_lq, neg_lq = _log_q(shape), _log_q(shape + (n,))
  valid = RNG.random(shape + (n,)) > 0.3
  valid.reshape(-1, n)[1] = False  # a row whose negatives are all dropped: l = 0
  for mask in (None, valid):
    value, grads = SAMPLED_SOFTMAX(pos, neg, weight, pos_lq, neg_lq, mask)
    np.testing.assert_allclose(value, np_sampled_softmax(pos, neg, weight, pos_lq, neg_lq, mask), rtol=1e-5)
    chex.assert_tree_all_finite(grads)
    for g in grads:  # padded rows get no gradient
      np.testing.assert_array_equal(g[weight == 0], 0.0)
  _, (_, g_neg, _, g_neg_lq) = SAMPLED_SOFTMAX(pos, neg, weight, pos_lq, neg_lq, valid)
  np.testing.assert_array_equal(g_neg[~valid], 0.0)  # dropped negatives get no gradient
  np.testing.assert_allclose(g_neg_lq, -g_neg, rtol=1e-6)  # logits depend on s - log q only
  row = np.zeros_like(weight)
  row.reshape(-1)[1] = 1.0  # the all-dropped row alone
  np.testing.assert_allclose(SAMPLED_SOFTMAX(pos, neg, row, pos_lq, neg_lq, valid)[0], 0.0, atol=1e-7)


def test_sampled_softmax_uniform_q_is_plain_sampled_softmax():
  pos, neg, weight = _scores((6,), 4)
  plain = SAMPLED_SOFTMAX(pos, neg, weight, np.zeros(6, np.float32), np.zeros((6, 4), np.float32), None)[0]
  uniform = np.full((6, 5), np.log(1 / 1000), np.float32)  # q = 1/1000 for every item: the correction cancels
  corrected = SAMPLED_SOFTMAX(pos, neg, weight, uniform[:, 0], uniform[:, 1:], None)[0]
  np.testing.assert_allclose(corrected, plain, rtol=1e-6)
  # plain sampled softmax = full softmax over [padding, positive, negatives] with target 1
  logits = np.concatenate([np.zeros((6, 1), np.float32), pos[:, None], neg], -1)
  full = SOFTMAX_CE(logits, np.ones(6, np.int32), weight)[0]
  np.testing.assert_allclose(plain, full, rtol=1e-5)
  np.testing.assert_allclose(plain, np_softmax_ce(logits, np.ones(6, int), weight), rtol=1e-5)


def test_sampled_softmax_correction_direction():
  # an often-sampled (popular) negative is discounted: raising its q lowers the loss
  pos, neg, weight = np.zeros(1, np.float32), np.zeros((1, 2), np.float32), np.ones(1, np.float32)
  lq = lambda a, b: np.log(np.array([[a, b]], np.float32))  # noqa: E731
  rare = SAMPLED_SOFTMAX(pos, neg, weight, np.log([0.01]).astype(np.float32), lq(0.01, 0.01), None)[0]
  popular = SAMPLED_SOFTMAX(pos, neg, weight, np.log([0.01]).astype(np.float32), lq(0.01, 0.5), None)[0]
  np.testing.assert_allclose(rare, np.log(3.0), rtol=1e-6)
  np.testing.assert_allclose(popular, np.log(2.0 + 0.01 / 0.5), rtol=1e-6)


def test_sampled_softmax_neg_valid_removes_accidental_hits():
  pos, neg, weight = _scores((5,), 4)
  pos_lq, neg_lq = _log_q((5,)), _log_q((5, 4))
  valid = np.ones((5, 4), bool)
  valid[:, 2] = False  # say column 2 drew the positive itself
  masked = SAMPLED_SOFTMAX(pos, neg, weight, pos_lq, neg_lq, valid)[0]
  dropped = np.delete(np.arange(4), 2)
  without = SAMPLED_SOFTMAX(pos, neg[:, dropped], weight, pos_lq, neg_lq[:, dropped], None)[0]
  np.testing.assert_allclose(masked, without, rtol=1e-6)
  # a -inf score (an item masked upstream) acts like a dropped negative, gradients stay finite
  neg_inf = neg.copy()
  neg_inf[:, 2] = -np.inf
  value, grads = SAMPLED_SOFTMAX(pos, neg_inf, weight, pos_lq, neg_lq, None)
  np.testing.assert_allclose(value, without, rtol=1e-6)
  np.testing.assert_allclose(value, np_sampled_softmax(pos, neg_inf, weight, pos_lq, neg_lq), rtol=1e-6)
  chex.assert_tree_all_finite(grads)


def test_sampled_softmax_ignores_junk_in_padded_rows():
  pos, neg, weight = _scores((4,), 3)
  weight[:] = [1.0, 0.0, 1.0, 0.0]
  pos_lq, neg_lq = _log_q((4,)), _log_q((4, 3))
  ref = SAMPLED_SOFTMAX(pos, neg, weight, pos_lq, neg_lq, None)[0]
  pos_j, neg_j, pos_lq_j, neg_lq_j = pos.copy(), neg.copy(), pos_lq.copy(), neg_lq.copy()
  pos_lq_j[1], pos_j[3], neg_j[3, 0], neg_lq_j[1] = -np.inf, np.nan, np.inf, -np.inf  # padding: q = 0, junk scores
  value, grads = SAMPLED_SOFTMAX(pos_j, neg_j, weight, pos_lq_j, neg_lq_j, None)
  np.testing.assert_allclose(value, ref, rtol=1e-6)
  chex.assert_tree_all_finite(grads)
  for g in grads:
    np.testing.assert_array_equal(g[weight == 0], 0.0)
  assert float(SAMPLED_SOFTMAX(pos_j, neg_j, np.zeros(4, np.float32), pos_lq_j, neg_lq_j, None)[0]) == 0.0


@pytest.mark.parametrize("shape", [(6,), (3, 4)])
def test_gbce_matches_numpy_and_bce(shape):
  pos, neg, weight = _scores(shape, 3)
  weight[..., 0] = 0.0
  for beta in (0.25, 1.0):
    value, grads = GBCE(pos, neg, weight, beta)
    np.testing.assert_allclose(value, np_gbce(pos, neg, weight, beta), rtol=1e-5)
    chex.assert_tree_all_finite(grads)
    for g in grads:
      np.testing.assert_array_equal(g[weight == 0], 0.0)
  np.testing.assert_allclose(GBCE(pos, neg, weight, 1.0)[0], BCE(pos, neg, weight)[0], rtol=1e-6)
  np.testing.assert_allclose(GBCE(pos, neg, weight, 1.0)[1][1], BCE(pos, neg, weight)[1][1], rtol=1e-6)
  # beta only scales the positive term: d l / d s_pos = -beta * sigmoid(-s_pos) * w / sum(w)
  g_pos = GBCE(pos, neg, weight, 0.25)[1][0]
  np.testing.assert_allclose(g_pos, 0.25 * BCE(pos, neg, weight)[1][0], rtol=1e-5, atol=1e-7)


def test_gbce_stable_for_large_scores():
  pos, neg, weight = np.array([80.0, -80.0]), np.array([[-80.0], [80.0]]), np.array([1.0, 1.0])
  value, grads = GBCE(pos, neg, weight, 0.5)
  chex.assert_tree_all_finite(grads)
  np.testing.assert_allclose(value, (0 + (0.5 * 80 + 80)) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match="beta"):
    losses.gbce(pos, neg, weight, 0.0)


def test_gbce_beta():
  alpha = 256 / (3417 - 1)
  assert losses.gbce_beta(256, 3417, 0.0) == 1.0  # plain BCE
  assert losses.gbce_beta(256, 3417, 1.0) == pytest.approx(alpha, rel=1e-12)  # fully calibrated
  t = 0.75
  assert losses.gbce_beta(256, 3417, t) == pytest.approx(alpha * (t * (1 - 1 / alpha) + 1 / alpha), rel=1e-12)
  assert losses.gbce_beta(9, 10, 0.3) == pytest.approx(1.0)  # every other item sampled: alpha = 1
  assert losses.gbce_beta(1, 2, 1) == 1.0
  assert isinstance(losses.gbce_beta(1, 100, 0.5), float)
  assert losses.gbce_beta(np.int64(256), np.int64(3417), np.float32(1.0)) == pytest.approx(alpha, rel=1e-12)
  bad = [
    (dict(num_negatives=0, num_items=10, t=0.5), "num_negatives"),
    (dict(num_negatives=10, num_items=10, t=0.5), "num_negatives"),  # alpha would exceed 1
    (dict(num_negatives=1, num_items=1, t=0.5), "num_items"),
    (dict(num_negatives=2.0, num_items=10, t=0.5), "int"),
    (dict(num_negatives=True, num_items=10, t=0.5), "int"),
    (dict(num_negatives=1, num_items=10, t=-0.1), "t must"),
    (dict(num_negatives=1, num_items=10, t=1.5), "t must"),
    (dict(num_negatives=1, num_items=10, t=float("nan")), "t must"),
    (dict(num_negatives=1, num_items=10, t="0.5"), "t must"),
  ]
  for kwargs, match in bad:
    with pytest.raises(ValueError, match=match):
      losses.gbce_beta(**kwargs)


# --- tasks -------------------------------------------------------------------------------------


def _pair_batch():
  return {
    "user": jnp.array([1, 2, 3, 0]),
    "pos": jnp.array([4, 5, 6, 0]),
    "neg": jnp.array([[1, 2], [3, 7], [8, 1], [0, 0]]),
    "weight": jnp.array([1.0, 1.0, 1.0, 0.0]),
  }


@pytest.mark.parametrize("loss", ["bpr", "bce"])
def test_pairwise_loss_fn_matches_manual(loss):
  model = BPRMF(num_users=4, num_items=9, dim=4)
  params = init_params(model, _key(0))
  batch = _pair_batch()
  value, metrics = jax.jit(tasks.pairwise_loss_fn(model, loss=loss, l2_weight=0.5))(params, batch, _key(1))
  users = np.asarray(params["params"]["user_embedding"]["embedding"])[batch["user"]]
  items = np.asarray(params["params"]["item_embedding"]["embedding"])
  pos = np.sum(users * items[batch["pos"]], -1)
  neg = np.einsum("bd,bnd->bn", users, items[batch["neg"]])
  base = NP_LOSSES[loss](pos, neg, np.asarray(batch["weight"]))
  reg = 0.5 * (np.sum(users**2, -1) + np.sum(items[batch["pos"]] ** 2, -1) + np.sum(items[batch["neg"]] ** 2, (-2, -1)))
  reg = _np_weighted_mean(reg, np.asarray(batch["weight"]))
  np.testing.assert_allclose(value, base + 0.5 * reg, rtol=1e-5)
  np.testing.assert_allclose(metrics["l2"], reg, rtol=1e-5)


# The small SASRec of test_models.py: equal models share one compiled `init_params`.
SMALL_SASREC = dict(num_items=13, max_len=6, dim=8, num_heads=2, ffn_dim=16)


@pytest.fixture(scope="module")
def sasrec():
  """A dropout-free model (train == eval) and its parameters."""
  model = SASRec(**SMALL_SASREC)
  return model.clone(dropout=0.0, attn_dropout=0.0), init_params(model, _key(0))


def test_next_item_loss_fn_whole_sequence_and_prefix_modes(sasrec):
  model, params = sasrec
  seq = np.array([[0, 0, 1, 2, 3], [4, 5, 6, 7, 8]], np.int32)
  pos = np.array([[0, 0, 2, 3, 9], [5, 6, 7, 8, 10]], np.int32)
  neg = np.broadcast_to(np.array([[1], [4]])[:, :, None], (2, 5, 1))
  weight = (pos > 0).astype(np.float32)
  whole = {"seq": seq, "pos": pos, "neg": neg, "weight": weight}
  prefix = {"seq": seq, "pos": pos[:, -1], "neg": neg[:, -1], "weight": weight[:, -1]}

  @jax.jit
  def run(params):  # one compilation for the three losses in both modes
    h = model.apply(params, seq, method="sequence_repr")  # dropout is 0: train == eval
    values = {
      (loss, mode): tasks.next_item_loss_fn(model, loss=loss)(params, batch, _key(1))[0]
      for loss in ("ce", *NP_LOSSES)  # the losses with a numpy reference here; others need options
      for mode, batch in (("whole", whole), ("prefix", prefix))
    }
    return h, values

  h, values = run(params)
  h = np.asarray(h, np.float64)
  items = np.asarray(params["params"]["item_embedding"]["embedding"], np.float64)
  logits = h @ items.T
  pos_s, neg_s = np.sum(h * items[pos], -1), np.einsum("bld,blnd->bln", h, items[neg])
  refs = {
    ("ce", "whole"): np_softmax_ce(logits, pos, weight),
    ("ce", "prefix"): np_softmax_ce(logits[:, -1], pos[:, -1], weight[:, -1]),
  }
  for loss, fn in NP_LOSSES.items():
    refs[loss, "whole"] = fn(pos_s, neg_s, weight)
    refs[loss, "prefix"] = fn(pos_s[:, -1], neg_s[:, -1], weight[:, -1])
  for key, ref in refs.items():
    np.testing.assert_allclose(values[key], ref, rtol=1e-5, err_msg=str(key))


def test_next_item_loss_uses_dropout_rng(sasrec):
  _, params = sasrec
  model = SASRec(**SMALL_SASREC)  # dropout 0.5
  batch = {"seq": jnp.array([[0, 1, 2, 3, 4]]), "pos": jnp.array([5]), "neg": jnp.array([[6]]), "weight": jnp.ones(1)}
  fn = jax.jit(tasks.next_item_loss_fn(model, loss="ce"))
  a, b, c = (float(fn(params, batch, _key(s))[0]) for s in (1, 2, 1))
  assert a != b and a == c


def test_score_fn(sasrec):
  model, params = sasrec
  inputs = {"user": np.array([1, 2]), "seq": np.array([[0, 0, 1, 2, 3], [0, 0, 0, 0, 0]], np.int32)}
  last_state = lambda p: model.apply(p, inputs["seq"], method="sequence_repr")[:, -1]  # noqa: E731
  scores, h = jax.jit(lambda p: (tasks.score_fn(model)(p, inputs), last_state(p)))(params)
  chex.assert_shape(scores, (2, 13))
  chex.assert_tree_all_finite(scores)
  np.testing.assert_allclose(scores, h @ params["params"]["item_embedding"]["embedding"].T, rtol=1e-5, atol=1e-6)


def test_create_loss_fn_registry():
  model = BPRMF(num_users=4, num_items=9, dim=4)
  fn = tasks.create_loss_fn("general", "bpr", model=model, l2_weight=0.1)
  params = init_params(model, _key(0))
  value, _ = fn(params, _pair_batch(), _key(1))
  assert np.isfinite(value)
  assert set(tasks.LOSSES) == {"general", "sequential", "ctr"}
  with pytest.raises(ConfigError, match="unknown loss"):
    tasks.create_loss_fn("general", "ce", model=model)
  with pytest.raises(ConfigError, match="unknown option"):
    tasks.create_loss_fn("general", "bpr", model=model, l2=0.1)
  with pytest.raises(ConfigError, match="unknown option"):
    tasks.create_loss_fn("sequential", "ce", model=model, l2_weight=0.1)
  with pytest.raises(ConfigError, match="popularity"):
    tasks.create_loss_fn("popularity", "bpr", model=model)
  with pytest.raises(ConfigError):
    tasks.pairwise_loss_fn(model, loss="ce")
  with pytest.raises(ConfigError):
    tasks.next_item_loss_fn(model, loss="softmax")


def test_next_item_sampled_softmax_and_gbce_match_numpy(sasrec):
  """The options-taking losses through `next_item_loss_fn`: log-Q gathered per item, an accidental hit
  (a negative equal to the target) dropped, gBCE's beta on the positive term."""
  model, params = sasrec
  seq = np.array([[0, 0, 1, 2, 3], [4, 5, 6, 7, 8]], np.int32)
  pos = np.array([[0, 0, 2, 3, 9], [5, 6, 7, 8, 10]], np.int32)
  neg = np.stack([np.stack([np.array([1, 4, 9]), np.array([2, 3, 11])])] * 5, axis=2).transpose(0, 2, 1)
  neg[1, 4] = [10, 1, 2]                                    # an accidental hit of target 10
  weight = (pos > 0).astype(np.float32)
  batch = {"seq": seq, "pos": pos, "neg": neg.astype(np.int32), "weight": weight}
  log_q = np.log(np.linspace(0.01, 0.2, model.num_items)).astype(np.float32)
  sampled = tasks.next_item_loss_fn(model, loss="sampled_softmax", log_q=jnp.asarray(log_q))
  gbce = tasks.next_item_loss_fn(model, loss="gbce", beta=0.3)
  got_sampled, got_gbce = (float(f(params, batch, _key(1))[0]) for f in (sampled, gbce))

  h = np.asarray(model.apply(params, seq, method="sequence_repr"), np.float64)
  items = np.asarray(params["params"]["item_embedding"]["embedding"], np.float64)
  pos_s, neg_s = np.sum(h * items[pos], -1), np.einsum("bld,blnd->bln", h, items[neg])
  neg_z = np.where(neg == pos[..., None], -np.inf, neg_s - log_q[neg])
  z = np.concatenate([(pos_s - log_q[pos])[..., None], neg_z], -1)
  per = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1) - z[..., 0]
  np.testing.assert_allclose(got_sampled, np.sum(per * weight) / weight.sum(), rtol=1e-5)
  log_sig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
  per = -0.3 * log_sig(pos_s) - np.sum(log_sig(-neg_s), -1)
  np.testing.assert_allclose(got_gbce, np.sum(per * weight) / weight.sum(), rtol=1e-5)


def test_losses_of_bfloat16_scores_are_computed_in_float32():
  # A bfloat16 step's scores: the loss (logsumexp, weighted means) still runs in float32.
  rng = np.random.default_rng(0)
  pos, neg = (jnp.asarray(rng.normal(size=shape), jnp.bfloat16) for shape in ((6,), (6, 4)))
  weight = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 1.0])
  for name in ("bpr", "bce"):
    got = tasks._sampled_loss(name, pos, neg, weight)
    assert got.dtype == jnp.float32
    assert got == tasks._sampled_loss(name, pos.astype(jnp.float32), neg.astype(jnp.float32), weight)
  h, items = jnp.asarray(rng.normal(size=(6, 3)), jnp.bfloat16), jnp.asarray(rng.normal(size=(9, 3)), jnp.bfloat16)
  target = jnp.array([1, 2, 3, 4, 5, 6])
  ce = tasks._item_loss("ce", h, items, target, None, weight, None, None)
  assert ce.dtype == jnp.float32
  # the scores too: products of the bfloat16 values summed in float32, not rounded to bfloat16
  scores = h.astype(jnp.float32) @ items.astype(jnp.float32).T
  np.testing.assert_allclose(ce, losses.softmax_ce(scores, target, weight), rtol=1e-6)
