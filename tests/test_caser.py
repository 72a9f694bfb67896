"""Caser: shapes, the lookup + window-max horizontal layer against per-height convolutions, padding,
gradients, dropout and a few training steps."""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from testutil import check_param_grads
from testutil import rbg_key as _key

from recjax.models.caser import Caser, unpack_horizontal
from recjax.optim import adam
from recjax.tasks import next_item_loss_fn

NUM_USERS, DIM, MAX_LEN, N_H, N_V = 6, 8, 5, 3, 2
# The item table holds the rows of the lookups when B L >= N; a larger catalogue than the batch
# has positions switches to the batch's own positions. Both must give the same features.
ITEMS_SMALL, ITEMS_LARGE = 13, 40  # the batches below have 3 x 5 = 15 positions




def _seq(num_items: int = ITEMS_SMALL) -> jnp.ndarray:
  """[3, L]: a left-padded row, a fully padded row, a full row (with a repeated item)."""
  top = num_items - 1
  return jnp.array([[0, 0, 3, 4, 5], [0] * MAX_LEN, [1, 2, 3, 2, top]], jnp.int32)


def _batch(num_items: int = ITEMS_SMALL) -> dict:
  return {"user": jnp.array([1, 2, 5], jnp.int32), "seq": _seq(num_items)}


def _model(output: str = "paper", num_items: int = ITEMS_SMALL, scale: float = 5.0) -> tuple[Caser, dict]:
  """A small model and its initial parameters times `scale` (larger weights than the initialisation
  give the ReLUs and maxima real work to do)."""
  model, params = _init(output, num_items)
  return model, jax.tree.map(lambda p: p * scale, params)


@functools.lru_cache
def _init(output: str, num_items: int) -> tuple[Caser, dict]:
  model = Caser(
    num_users=NUM_USERS, num_items=num_items, max_len=MAX_LEN, dim=DIM, num_horizontal=N_H, num_vertical=N_V,
    output=output,
  )
  return model, jax.jit(model.init)(_key(0), _batch(num_items))


@pytest.mark.parametrize("output", ["paper", "recbole"])
def test_shapes_and_scores(output):
  model, params = _model(output)
  batch = _batch()
  user, items, scores = jax.jit(
    lambda p: (model.apply(p, batch, method="user_repr"), model.apply(p, method="item_repr"), model.apply(p, batch))
  )(params)
  d = 2 * DIM + 1 if output == "paper" else DIM
  chex.assert_shape(user, (3, d))
  chex.assert_shape(items, (ITEMS_SMALL, d))
  chex.assert_shape(scores, (3, ITEMS_SMALL))
  chex.assert_type([user, items, scores], jnp.float32)
  chex.assert_tree_all_finite((user, items, scores))
  np.testing.assert_allclose(scores, user @ items.T, rtol=1e-5, atol=1e-5)
  p = params["params"]
  chex.assert_shape(p["horizontal_kernel"], (DIM, N_H * MAX_LEN * (MAX_LEN + 1) // 2))
  chex.assert_shape(p["vertical_kernel"], (MAX_LEN, N_V))
  if output == "paper":  # [z; P_u; 1] . [W'_i; b'_i] = <[z; P_u], W'_i> + b'_i
    np.testing.assert_array_equal(user[:, -1], 1.0)
    np.testing.assert_array_equal(items[:, -1], p["output_bias"])
    np.testing.assert_allclose(user[:, DIM : 2 * DIM], p["user_embedding"]["embedding"][batch["user"]], rtol=1e-6)
  else:  # scored against the input item table
    np.testing.assert_array_equal(items, p["item_embedding"]["embedding"])


def test_init_is_recbole_style():
  model = Caser(num_users=50, num_items=3000, max_len=4, dim=64, output="paper")
  p = jax.jit(model.init)(_key(0), {"user": jnp.zeros((2,), jnp.int32), "seq": jnp.zeros((2, 4), jnp.int32)})["params"]
  np.testing.assert_allclose(np.std(p["item_embedding"]["embedding"]), 1 / 64, rtol=0.02)
  np.testing.assert_allclose(np.std(p["output_embedding"]["embedding"]), 1 / 128, rtol=0.02)
  np.testing.assert_array_equal(p["output_bias"], 0.0)
  for h, kernel in enumerate(unpack_horizontal(p["horizontal_kernel"], 4), 1):  # U(+-1/sqrt(h d))
    bound = 1 / np.sqrt(h * 64)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
  assert np.abs(p["vertical_kernel"]).max() <= 1 / np.sqrt(4)


def _embedded(params, seq) -> np.ndarray:
  """The masked image X [B, L, d] in float64."""
  table = np.asarray(params["params"]["item_embedding"]["embedding"], np.float64)
  seq = np.asarray(seq)
  return np.where(seq[..., None] != 0, table[seq], 0.0)


def _numpy_horizontal(params, x: np.ndarray) -> np.ndarray:
  """RecBole's per-height convolutions, ReLU and max-pooling over time, in float64: [B, L n_h]."""
  p = params["params"]
  kernels = unpack_horizontal(np.asarray(p["horizontal_kernel"], np.float64), MAX_LEN)
  bias = np.asarray(p["horizontal_bias"], np.float64)
  out = []
  for h, kernel in enumerate(kernels, 1):
    conv = np.stack([np.einsum("bjd,jdk->bk", x[:, t : t + h], kernel) for t in range(MAX_LEN - h + 1)], 1)
    out.append(np.maximum(conv + bias[h - 1], 0.0).max(axis=1))  # [B, n_h]
  return np.concatenate(out, axis=-1)


def _conv_horizontal(params, x: jnp.ndarray) -> jnp.ndarray:
  """The same with `lax.conv` per height (autodiff reference for the custom VJP)."""
  p = params["params"]
  out = []
  for h, kernel in enumerate(unpack_horizontal(p["horizontal_kernel"], MAX_LEN), 1):
    conv = lax.conv_general_dilated(x, kernel, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
    out.append(jnp.max(jax.nn.relu(conv + p["horizontal_bias"][h - 1]), axis=1))
  return jnp.concatenate(out, axis=-1)


@pytest.mark.parametrize("num_items", [ITEMS_SMALL, ITEMS_LARGE], ids=["item-rows", "position-rows"])
def test_horizontal_matches_per_height_convolutions(num_items):
  model, params = _model(num_items=num_items)
  seq = _seq(num_items)
  ref = _numpy_horizontal(params, _embedded(params, seq))
  weights = jax.random.normal(_key(3), ref.shape)

  def loss(params, horizontal):
    table = params["params"]["item_embedding"]["embedding"]
    x = jnp.where((seq != 0)[..., None], table[seq], 0.0)
    features = horizontal(params, x)
    return jnp.sum(weights * features), features

  fast = lambda p, x: model.apply(p, x, seq, method="horizontal_features")  # noqa: E731
  grad = lambda horizontal: jax.grad(loss, has_aux=True)(params, horizontal)  # noqa: E731
  (grads, features), (ref_grads, _) = jax.jit(lambda: (grad(fast), grad(_conv_horizontal)))()
  assert (ref > 0).mean() > 0.3  # the check is not vacuous
  np.testing.assert_allclose(features, ref, rtol=1e-5, atol=1e-5)
  # gradients of the custom VJP (winning window only) equal autodiff through every convolution
  for name in ("horizontal_kernel", "horizontal_bias"):
    np.testing.assert_allclose(grads["params"][name], ref_grads["params"][name], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
    grads["params"]["item_embedding"]["embedding"], ref_grads["params"]["item_embedding"]["embedding"],
    rtol=1e-4, atol=1e-5,
  )


@pytest.mark.parametrize(
  "output, num_items",
  [("recbole", ITEMS_SMALL), ("paper", ITEMS_LARGE)],
  ids=["recbole-item-rows", "paper-position-rows"],
)
def test_padding_never_matters(output, num_items):
  model, params = _model(output, num_items)
  batch = _batch(num_items)
  table = params["params"]["item_embedding"]["embedding"]
  # whatever the padding row embeds to, padded positions contribute zeros
  noisy = jax.tree.map(lambda a: a, params)
  noisy["params"]["item_embedding"]["embedding"] = table.at[0].set(100.0 * jax.random.normal(_key(5), table[0].shape))
  # a history given shorter than max_len is left-padded by the model
  short = {"user": batch["user"][:1], "seq": batch["seq"][:1, 2:]}
  user_repr = functools.partial(model.apply, method="user_repr")
  base, with_noisy_row, from_short = jax.jit(
    lambda: (user_repr(params, batch), user_repr(noisy, batch), user_repr(params, short))
  )()
  np.testing.assert_array_equal(with_noisy_row, base)
  np.testing.assert_allclose(from_short, base[:1], rtol=1e-6, atol=1e-6)


def test_rejects_bad_inputs():
  model, params = _model()
  with pytest.raises(ValueError, match="max_len"):
    model.apply(params, {"user": jnp.ones((1,), jnp.int32), "seq": jnp.ones((1, MAX_LEN + 1), jnp.int32)})
  with pytest.raises(NotImplementedError, match='training="prefix"'):
    model.apply(params, _seq(), method="sequence_repr")
  with pytest.raises(ValueError, match="unknown Caser output"):
    Caser(num_users=2, num_items=3, output="nope").init(_key(0), _batch())
  with pytest.raises(ValueError, match="horizontal or vertical"):
    Caser(num_users=2, num_items=3, num_horizontal=0, num_vertical=0).init(_key(0), _batch())


def test_grads():
  """check_grads in float64 (dropout off) through every parameter, the custom VJP included."""
  model, params = _model()
  batch = _batch()
  check_param_grads(lambda p: model.apply(p, batch), params)


def test_dropout_only_in_training():
  model, params = _model()
  batch = _batch()
  run = lambda key, train: model.apply(params, batch, train, method="user_repr", rngs={"dropout": _key(key)})  # noqa: E731
  eval_a, eval_b, train_a, train_b, train_a2 = jax.jit(
    lambda: (run(1, False), run(2, False), run(1, True), run(2, True), run(1, True))
  )()
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.allclose(train_a, eval_a) and not np.allclose(train_a, train_b)
  np.testing.assert_array_equal(train_a, train_a2)  # same key, same mask
  # the user part [P_u; 1] is never dropped
  np.testing.assert_array_equal(train_a[:, DIM:], eval_a[:, DIM:])


def test_adam_steps_reduce_full_softmax_loss():
  model, params = _model("paper", scale=1.0)
  rng = np.random.default_rng(0)
  size = 16
  lengths = rng.integers(1, MAX_LEN + 1, size)
  seq = np.where(np.arange(MAX_LEN) >= MAX_LEN - lengths[:, None], rng.integers(1, ITEMS_SMALL, (size, MAX_LEN)), 0)
  batch = {
    "user": jnp.asarray(rng.integers(1, NUM_USERS, size), jnp.int32),
    "seq": jnp.asarray(seq, jnp.int32),
    "pos": jnp.asarray(rng.integers(1, ITEMS_SMALL, size), jnp.int32),
    "neg": jnp.ones((size, 1), jnp.int32),
    "weight": jnp.asarray(np.arange(size) < size - 2, jnp.float32),  # 2 padded rows
  }
  loss_fn = next_item_loss_fn(model, loss="ce")
  optimizer = adam(1e-2)

  @jax.jit
  def step(params, opt_state, key):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(p, batch, key)[0])(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  losses = []
  for i in range(30):
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(_key(1), i))
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  assert losses[0] == pytest.approx(np.log(ITEMS_SMALL - 1), abs=0.5)  # near uniform at init
  assert np.mean(losses[-5:]) < 0.75 * losses[0], losses


@pytest.mark.parametrize("output", ["paper", "recbole"])
def test_vertical_layer_fully_connected_layers_and_scores_against_numpy(output):
  """Given the horizontal features (checked against convolutions above): the vertical convolution
  (V^T E per filter, ordered (v, c)), z = ReLU(W [o_v; o_h] + b), [z; P_u], and the output layer."""
  model, params = _model(output)
  batch = _batch()
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  seq = np.asarray(batch["seq"])
  table = p["item_embedding"]["embedding"]
  x = np.where((seq != 0)[..., None], table[seq], 0.0)                                      # [B, L, d]
  vertical = np.einsum("btc,tv->bvc", x, p["vertical_kernel"]) + p["vertical_bias"][:, None]   # [B, n_v, d]
  horizontal = np.asarray(jax.jit(lambda prm: model.apply(
      prm, jnp.asarray(x, jnp.float32), batch["seq"], method="horizontal_features"))(params), np.float64)
  o = np.concatenate([vertical.reshape(len(seq), -1), horizontal], axis=-1)
  z = np.maximum(o @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0.0)
  zu = np.concatenate([z, p["user_embedding"]["embedding"][np.asarray(batch["user"])]], axis=-1)   # [B, 2d]
  if output == "paper":
    expected = zu @ p["output_embedding"]["embedding"].T + p["output_bias"]
  else:
    expected = np.maximum(zu @ p["output_dense"]["kernel"] + p["output_dense"]["bias"], 0.0) @ table.T
  np.testing.assert_allclose(jax.jit(model.apply)(params, batch), expected, rtol=1e-4, atol=1e-4)
