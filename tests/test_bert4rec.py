"""BERT4Rec and its Cloze task: shapes, padding, the appended mask, masking that never leaks, grads."""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from testutil import check_param_grads
from testutil import rbg_key as _key

from recjax import losses, tasks
from recjax.errors import ConfigError
from recjax.models import BERT4Rec, create_model, default_hparams, init_params

NUM_ITEMS, DIM, MAX_LEN = 13, 8, 6
SMALL = dict(max_len=MAX_LEN, dim=DIM, num_heads=2, ffn_dim=16)




@functools.lru_cache
def _model(**kwargs) -> tuple[BERT4Rec, dict]:
  model = create_model("bert4rec", num_users=3, num_items=NUM_ITEMS, **{**SMALL, **kwargs})
  return model, init_params(model, _key(0))


def _apply(model, params, x, method):
  if x is None:
    return jax.jit(lambda p: model.apply(p, method=method))(params)
  return jax.jit(lambda p, x: model.apply(p, x, method=method))(params, x)


def test_defaults_are_recboles():
  assert default_hparams("bert4rec") == dict(
    max_len=50, dim=64, num_blocks=2, num_heads=2, ffn_dim=256, dropout=0.2, attn_dropout=0.2, activation="gelu",
    layer_norm_eps=1e-12, init_std=0.02, mask_ratio=0.2, last_ratio=0.5, max_scored=0)


def test_mask_token_has_its_own_row_and_is_never_scored():
  model, params = _model()
  table = params["params"]["item_embedding"]["embedding"]
  chex.assert_shape(table, (NUM_ITEMS + 1, DIM))
  items = _apply(model, params, None, "item_repr")
  chex.assert_shape(items, (NUM_ITEMS, DIM + 1))  # real items (and padding) only, plus the bias column
  np.testing.assert_array_equal(items[:, :DIM], table[:NUM_ITEMS])
  np.testing.assert_array_equal(items[:, DIM], params["params"]["output_bias"])


def test_user_repr_appends_a_mask_after_the_history():
  model, params = _model()
  seq = jnp.array([[0, 0, 0, 3, 4, 5], [1, 2, 3, 4, 5, 12], [0] * MAX_LEN], jnp.int32)
  user = _apply(model, params, {"seq": seq}, "user_repr")
  masked = jnp.concatenate([seq[:, 1:], jnp.full((3, 1), model.mask_id, jnp.int32)], axis=1)
  h = _apply(model, params, masked, "sequence_repr")
  np.testing.assert_allclose(user, h[:, -1], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(user[:, -1], 1.0)  # the bias column
  scores = _apply(model, params, {"seq": seq}, "__call__")
  np.testing.assert_allclose(scores, user @ _apply(model, params, None, "item_repr").T, rtol=1e-5, atol=1e-6)


def test_is_bidirectional():
  model, params = _model()
  seq = jnp.array([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]], jnp.int32)  # only the newest item differs
  h = _apply(model, params, seq, "sequence_repr")
  assert not np.allclose(h[0, 0], h[1, 0])  # an earlier position sees a later item


def test_padding_never_changes_outputs():
  model, params = _model()
  long = jnp.array([[0, 0, 0, 3, 4, 5]], jnp.int32)
  h_long = _apply(model, params, long, "sequence_repr")
  h_short = _apply(model, params, long[:, -4:], "sequence_repr")  # the same history padded to another L
  np.testing.assert_allclose(h_long[:, -3:], h_short[:, -3:], rtol=1e-5, atol=1e-6)
  # garbage in the padding row changes nothing at real positions
  noisy = jax.tree_util.tree_map_with_path(
    lambda path, p: p.at[0].set(5.0) if "item_embedding" in jax.tree_util.keystr(path) else p, params)
  np.testing.assert_allclose(_apply(model, noisy, long, "sequence_repr")[:, -3:], h_long[:, -3:], rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="exceeds max_len"):
    _apply(model, params, jnp.ones((1, model.max_len + 1), jnp.int32), "sequence_repr")


def test_cloze_items_align_with_sequence_and_prefix_batches():
  seq = jnp.array([[0, 0, 1, 2], [5, 6, 7, 8]], jnp.int32)
  whole = {"seq": seq, "pos": jnp.array([[0, 0, 2, 3], [6, 7, 8, 9]], jnp.int32)}
  np.testing.assert_array_equal(tasks.cloze_items(whole), [[0, 1, 2, 3], [6, 7, 8, 9]])
  prefix = {"seq": seq, "pos": jnp.array([3, 9], jnp.int32)}
  np.testing.assert_array_equal(tasks.cloze_items(prefix), [[0, 1, 2, 3], [6, 7, 8, 9]])


def test_cloze_inputs_hide_every_scored_target():
  rng = np.random.default_rng(0)
  length, batch_size = 30, 400
  items = rng.integers(1, 50, (batch_size, length + 1)).astype(np.int32)
  items[:100, :12] = 0  # some left padding
  batch = {"seq": jnp.asarray(items[:, :-1]), "pos": jnp.asarray(np.where(items[:, :-1] > 0, items[:, 1:], 0))}
  mask_id = 99
  inputs, at, target, weight = jax.jit(tasks.cloze_inputs, static_argnums=(2, 3, 4))(_key(3), batch, mask_id, 0.3, 0.25)
  inputs, at, target, weight = map(np.asarray, (inputs, at, target, weight))
  window = items[:, 1:]
  rows = np.arange(batch_size)[:, None]
  scored = weight > 0
  assert (inputs[rows, at][scored] == mask_id).all()          # the model never sees a scored target
  assert (target[scored] == window[rows, at][scored]).all()   # and is asked for the hidden item
  assert (target[scored] > 0).all()                            # never a padding target
  hidden = inputs == mask_id
  assert (window[hidden] > 0).all() and (inputs[~hidden] == window[~hidden]).all()
  # each row scores its newest hidden positions, as many as max_masked allows
  assert at.shape[1] == tasks.max_masked(0.3, length)
  assert (scored.sum(1) == np.minimum(hidden.sum(1), at.shape[1])).all()
  # RecBole's budget: the newest max_scored hidden positions, the same hidden items and inputs
  small = jax.jit(tasks.cloze_inputs, static_argnums=(2, 3, 4, 5))(_key(3), batch, mask_id, 0.3, 0.25, 9)
  small_inputs, small_at, _, small_weight = map(np.asarray, small)
  np.testing.assert_array_equal(small_inputs, inputs)
  assert small_at.shape[1] == 9 and (small_weight.sum(1) == np.minimum(hidden.sum(1), 9)).all()
  newest = np.sort(np.where(hidden, np.arange(length), -1), axis=1)[:, -9:]  # each row's 9 newest hidden
  np.testing.assert_array_equal(np.sort(np.where(small_weight > 0, small_at, -1), axis=1),
                                np.where(np.arange(9) >= 9 - np.minimum(hidden.sum(1), 9)[:, None], newest, -1))
  # ~25% of rows hide only their newest item; the others hide ~30% of their real items
  only_last = (hidden.sum(1) == 1) & hidden[:, -1]
  assert 0.15 < only_last.mean() < 0.35
  rate = hidden[~only_last].sum() / (window[~only_last] > 0).sum()
  assert 0.25 < rate < 0.35


def _iid_batch(rng, batch_size, length, num_items):
  """Sequences of distinct uniform items: no item says anything about another."""
  seq = np.stack([rng.choice(np.arange(1, num_items), length + 1, replace=False) for _ in range(batch_size)])
  return {"seq": jnp.asarray(seq[:, :-1], jnp.int32), "pos": jnp.asarray(seq[:, 1:], jnp.int32),
          "weight": jnp.ones((batch_size, length), jnp.float32)}


def _train(loss_fn, params, batches, lr=1e-2):
  opt = optax.adam(lr)

  @jax.jit
  def step(params, opt_state, batch, key):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(p, batch, key)[0])(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, losses_seen = opt.init(params), []
  for i, batch in enumerate(batches):
    params, opt_state, loss = step(params, opt_state, batch, jax.random.fold_in(_key(7), i))
    losses_seen.append(float(loss))
  return np.mean(losses_seen[-10:])


def test_masking_never_leaks_the_target():
  """On sequences of independent items the best possible loss is ~log(#items); a leak of the hidden
  item into the input (or a target misaligned onto a visible neighbour) lets the model copy it and
  drives the loss far below. The control trains the same model with the target left visible."""
  num_items, length = 40, 8
  model = create_model("bert4rec", num_users=1, num_items=num_items,
                       **{**SMALL, "max_len": length, "dropout": 0.0, "attn_dropout": 0.0, "mask_ratio": 0.4})
  params = init_params(model, _key(0))
  rng = np.random.default_rng(0)
  batches = [_iid_batch(rng, 64, length, num_items) for _ in range(150)]
  chance = np.log(num_items - 1)
  honest = _train(tasks.masked_item_loss_fn(model, loss="ce"), params, batches)
  assert honest > 0.9 * chance, (honest, chance)

  def leaky_loss(params, batch, key):  # the same scoring, but the model sees the original items
    _, at, target, weight = tasks.cloze_inputs(key, batch, model.mask_id, model.mask_ratio, model.last_ratio)
    h, table = model.apply(params, tasks.cloze_items(batch), method=lambda m, s: (m.sequence_repr(s), m.item_repr()))
    h = jnp.take_along_axis(h, at[..., None], axis=1)
    return losses.softmax_ce(jnp.einsum("bmd,nd->bmn", h, table), target, weight), {}

  assert _train(leaky_loss, params, batches) < 0.5 * chance  # the test has the power to see a leak


def test_sampled_losses_and_errors():
  model, params = _model()
  rng = np.random.default_rng(1)
  batch = _iid_batch(rng, 4, MAX_LEN, NUM_ITEMS)
  batch["neg"] = jnp.asarray(rng.integers(1, NUM_ITEMS, (4, MAX_LEN, 3)), jnp.int32)
  log_q = jnp.full((NUM_ITEMS,), -np.log(NUM_ITEMS - 1), jnp.float32)
  for name, options in [("bce", {}), ("bpr", {}), ("gbce", {"beta": 0.5}), ("sampled_softmax", {"log_q": log_q})]:
    loss, _ = tasks.create_loss_fn("sequential", name, model=model, **options)(params, batch, _key(2))
    assert np.isfinite(loss) and loss > 0
  prefix = {"seq": batch["seq"], "pos": batch["pos"][:, -1], "neg": batch["neg"][:, -1], "weight": jnp.ones(4)}
  with pytest.raises(ConfigError, match="whole-sequence"):
    tasks.masked_item_loss_fn(model, loss="bce")(params, prefix, _key(2))
  with pytest.raises(ConfigError, match="log_q"):
    tasks.masked_item_loss_fn(model, loss="sampled_softmax")
  with pytest.raises(ValueError, match="mask_ratio"):
    _model(mask_ratio=0.0)


def test_masked_item_loss_grads():
  model = create_model("bert4rec", num_users=1, num_items=NUM_ITEMS, **{**SMALL, "dropout": 0.0, "attn_dropout": 0.0})
  params = jax.tree.map(lambda p: 10 * p, init_params(model, _key(0)))
  batch = _iid_batch(np.random.default_rng(2), 3, MAX_LEN, NUM_ITEMS)
  loss_fn = tasks.masked_item_loss_fn(model, loss="ce")
  check_param_grads(lambda p: loss_fn(p, batch, _key(4))[0], params)


def test_output_head_and_scores_against_numpy():
  """h = LN(GELU_erf(x W + c)) on the encoder's output x, scored against the tied item table plus a bias."""
  import math

  from recjax.nn.attention import add_positions, padding_mask

  model, params = _model()
  params = jax.tree_util.tree_map_with_path(   # random norm scales and biases: a dropped or swapped norm fails
    lambda path, a: a + 0.3 * jax.random.normal(_key(len(str(path))), a.shape) if "norm" in str(path) else a, params)
  params = {"params": {**params["params"], "head": {**params["params"]["head"],   # GELU's inputs of order 1
                                                    "kernel": 30 * params["params"]["head"]["kernel"]}}}

  def encoded(m, seq):   # the encoder's output, before the head
    x = m.input_norm(add_positions(m.item_embedding(seq), m.position_embedding))
    return m.encoder(x, padding_mask(seq), train=False, last_only=False)

  seq = jnp.array([[0, 0, 3, 4, 5, NUM_ITEMS], [1, 2, 3, 4, 5, NUM_ITEMS]], jnp.int32)   # [mask] last
  x = np.asarray(jax.jit(lambda p, s: model.apply(p, s, method=encoded))(params, seq), np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  pre = x @ p["head"]["kernel"] + p["head"]["bias"]
  gelu = 0.5 * pre * (1 + np.vectorize(math.erf)(pre / math.sqrt(2)))
  mean, var = gelu.mean(-1, keepdims=True), gelu.var(-1, keepdims=True)
  h = (gelu - mean) / np.sqrt(var + 1e-12) * p["head_norm"]["scale"] + p["head_norm"]["bias"]
  got = _apply(model, params, seq, "sequence_repr")
  np.testing.assert_allclose(got[..., :DIM], h, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(got[..., DIM], 1.0)
  scores = _apply(model, params, {"seq": jnp.concatenate([jnp.zeros((2, 1), jnp.int32), seq[:, :-1]], 1)}, "__call__")
  table = p["item_embedding"]["embedding"][:NUM_ITEMS]   # [mask]'s row never scored
  np.testing.assert_allclose(scores, h[:, -1] @ table.T + p["output_bias"], rtol=1e-4, atol=1e-5)
