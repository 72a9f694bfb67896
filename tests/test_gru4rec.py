"""GRU4Rec and the padding-aware recurrent encoder: shapes, padding, causality, gradients, dropout, training."""
from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from testutil import check_param_grads, random_variables
from testutil import rbg_key as _key

from recjax.models import init_params
from recjax.models.gru4rec import GRU4Rec
from recjax.nn.recurrent import RecurrentEncoder
from recjax.tasks import next_item_loss_fn

NUM_ITEMS, DIM, HIDDEN, MAX_LEN = 13, 8, 10, 6
CELLS = ("gru", "lstm")




def _seq() -> jnp.ndarray:
  """[3, L]: a left-padded row, a fully padded row, a full row."""
  return jnp.array([[0, 0, 0, 3, 4, 5], [0] * MAX_LEN, [1, 2, 3, 4, 5, 12]], jnp.int32)


# Random weights of some size by numpy (`testutil.random_variables`, nothing compiled), not RecBole's
# distribution: the init itself is checked once, in `test_init_follows_recbole`.
@functools.lru_cache
def _gru4rec(cell: str = "gru", num_layers: int = 1) -> tuple[GRU4Rec, dict]:
  model = GRU4Rec(num_items=NUM_ITEMS, max_len=MAX_LEN, dim=DIM, hidden_size=HIDDEN, num_layers=num_layers, cell=cell)
  return model, random_variables(model.init, {"seq": _seq()})


@functools.lru_cache
def _jit_apply(model, method: str):
  """`f(params, x) -> model.apply(params, x, method=method)` (eval mode), jitted once per model."""
  return jax.jit(lambda params, x: model.apply(params, x, method=method))


def _seq_repr(model, params, seq):
  return _jit_apply(model, "sequence_repr")(params, seq)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_shapes_finite_and_user_repr_is_last_state(cell, num_layers):
  model, params = _gru4rec(cell, num_layers)
  batch = {"seq": _seq()}

  @jax.jit
  def run(p):
    return (
      model.apply(p, batch["seq"], method="sequence_repr"),
      model.apply(p, batch, method="user_repr"),
      model.apply(p, method="item_repr"),
      model.apply(p, batch),
    )

  h, user, items, scores = run(params)
  chex.assert_shape(h, (3, MAX_LEN, DIM))
  chex.assert_shape(user, (3, DIM))
  chex.assert_shape(items, (NUM_ITEMS, DIM))
  chex.assert_shape(scores, (3, NUM_ITEMS))
  chex.assert_type([h, user, items, scores], jnp.float32)
  chex.assert_tree_all_finite((h, user, items, scores))  # the fully padded row included
  np.testing.assert_allclose(user, h[:, -1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(scores, user @ items.T, rtol=1e-5, atol=1e-6)
  assert model.kind == "sequential"
  layers = params["params"]["encoder"]
  assert sorted(layers) == [f"layer_{k}" for k in range(num_layers)]


@pytest.mark.parametrize("cell", CELLS)
def test_encoder_shapes_and_padded_inputs_are_ignored(cell):
  encoder = RecurrentEncoder(cell=cell, hidden_size=5, num_layers=2)
  x = jax.random.normal(_key(0), (3, 4, 3))
  valid = jnp.array([[False, False, True, True], [False] * 4, [True] * 4])
  params = random_variables(encoder.init, x, valid)
  apply = jax.jit(encoder.apply)
  out = apply(params, x, valid)
  chex.assert_shape(out, (3, 4, 5))
  # garbage (huge, or NaN-free but wild) inputs at padded steps change nothing anywhere
  garbage = jnp.where(valid[..., None], x, 1e6 * jax.random.normal(_key(2), x.shape))
  np.testing.assert_array_equal(apply(params, garbage, valid), out)
  # before the first real item the held state is the initial zero state; the fully padded row stays 0
  np.testing.assert_array_equal(out[0, :2], 0.0)
  np.testing.assert_array_equal(out[1], 0.0)


def test_encoder_rejects_unknown_cell_and_init():
  x, valid = jnp.zeros((1, 2, 3)), jnp.ones((1, 2), bool)
  with pytest.raises(ValueError, match=r"unknown recurrent cell 'rnn'.*'gru', 'lstm'"):
    RecurrentEncoder(cell="rnn").init(_key(0), x, valid)
  with pytest.raises(ValueError, match="unknown recurrent weight_init"):
    RecurrentEncoder(weight_init="nope").init(_key(0), x, valid)


@pytest.mark.parametrize("cell", CELLS)
def test_left_padding_never_changes_real_outputs(cell):
  model, params = _gru4rec(cell, 2)
  short = jnp.array([[0, 3, 4, 5], [1, 2, 12, 7], [11, 7, 7, 9]], jnp.int32)  # [B, 4]
  long = jnp.pad(short, ((0, 0), (MAX_LEN - 4, 0)))  # [B, L]: the same histories, padded further

  @jax.jit
  def run(p):
    return (
      model.apply(p, short, method="sequence_repr"),
      model.apply(p, long, method="sequence_repr"),
      model.apply(p, {"seq": short}, method="user_repr"),
      model.apply(p, {"seq": long}, method="user_repr"),
    )

  h_short, h_long, user_short, user_long = run(params)
  np.testing.assert_allclose(h_long[:, -4:], h_short, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(user_long, user_short, rtol=1e-6, atol=1e-6)
  # a garbage padding row E_0 (nothing keeps it at 0) changes no output at a real position
  garbage = jax.tree.map(lambda a: a, params)
  garbage["params"]["item_embedding"]["embedding"] = params["params"]["item_embedding"]["embedding"].at[0].set(50.0)
  g_short, g_long, g_user_short, g_user_long = run(garbage)
  real_long, real_short = np.asarray(long != 0), np.asarray(short != 0)
  np.testing.assert_array_equal(np.asarray(g_long)[real_long], np.asarray(h_long)[real_long])
  np.testing.assert_array_equal(np.asarray(g_short)[real_short], np.asarray(h_short)[real_short])
  np.testing.assert_array_equal(g_user_long, user_long)
  np.testing.assert_array_equal(g_user_short, user_short)


@pytest.mark.parametrize("cell", CELLS)
def test_is_causal(cell):
  model, params = _gru4rec(cell, 1)
  seqs = np.repeat(np.asarray(_seq()[2:]), MAX_LEN, axis=0)  # [L, L]: row t changes the items from t on
  for t in range(1, MAX_LEN):
    seqs[t, t:] = 7
  h = _seq_repr(model, params, jnp.asarray(seqs))  # [L, L, d]
  for t in range(1, MAX_LEN):
    np.testing.assert_array_equal(h[t, :t], h[0, :t])
    assert not np.allclose(h[t, t], h[0, t])




@pytest.mark.parametrize("cell", CELLS)
def test_encoder_grads(cell):
  encoder = RecurrentEncoder(cell=cell, hidden_size=4, num_layers=1)  # one layer: the backward scan compiles slowly
  x = jax.random.normal(_key(0), (2, 4, 3))
  valid = jnp.array([[False, True, True, True], [True] * 4])
  params = random_variables(encoder.init, x, valid, std=0.7)  # large weights: a non-trivial (less linear) check
  check_param_grads(lambda px: encoder.apply(px[0], px[1], valid), (params, x))


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_only_in_train_mode(cell):
  model, params = _gru4rec(cell, 1)
  seq = _seq()

  @jax.jit
  def run(p):
    train = lambda key: model.apply(p, seq, True, method="sequence_repr", rngs={"dropout": key})  # noqa: E731
    return model.apply(p, seq, method="sequence_repr"), train(_key(2)), train(_key(2)), train(_key(3))

  h_eval, h_a, h_a2, h_b = run(params)
  np.testing.assert_array_equal(run(params)[0], h_eval)  # eval mode needs no rng and is deterministic
  np.testing.assert_array_equal(h_a, h_a2)  # same key, same mask
  assert not np.allclose(h_a[0], h_eval[0])
  assert not np.allclose(h_a, h_b)
  chex.assert_tree_all_finite((h_a, h_b))


@pytest.mark.parametrize("cell", CELLS)
def test_a_few_adam_steps_reduce_full_softmax_loss(cell):
  model, params = _gru4rec(cell, 1)
  seq = jnp.array([[0, 0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [0, 0, 0, 11, 12, 1], [2, 4, 6, 8, 10, 12]], jnp.int32)
  pos = jnp.concatenate([seq[:, 1:], jnp.array([[5], [11], [2], [1]], jnp.int32)], axis=1)  # [B, L]
  weight = (seq != 0).astype(jnp.float32)
  batch = {"seq": seq, "pos": pos, "neg": jnp.ones((4, MAX_LEN, 1), jnp.int32), "weight": weight}
  loss_fn = next_item_loss_fn(model, loss="ce")
  optimizer = optax.adam(0.05)

  @jax.jit
  def train(params):
    def step(carry, i):
      params, opt_state = carry
      (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, jax.random.fold_in(_key(4), i))
      updates, opt_state = optimizer.update(grads, opt_state, params)
      pad_grad = grads["params"]["item_embedding"]["embedding"][0]
      return (optax.apply_updates(params, updates), opt_state), (loss, pad_grad)

    _, (losses, pad_grads) = jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(20))
    return losses, pad_grads

  losses, pad_grads = train(params)
  chex.assert_tree_all_finite(losses)
  assert losses[-1] < 0.5 * losses[0], losses
  np.testing.assert_array_equal(pad_grads, 0.0)  # the padding row gets no gradient at all


def test_init_follows_recbole():
  model = GRU4Rec(num_items=2000, max_len=MAX_LEN, dim=64, hidden_size=128)
  params = init_params(model, _key(0))["params"]
  table = params["item_embedding"]["embedding"]
  np.testing.assert_allclose(np.std(table), math.sqrt(2 / (2000 + 64)), rtol=0.02)  # xavier_normal
  cell = params["encoder"]["layer_0"]["cell"]
  for name, fan_in in [("ir", 64), ("hz", 128)]:  # stacked xavier_uniform: U(+-sqrt(6 / (fan_in + 3H)))
    limit = math.sqrt(6 / (fan_in + 3 * 128))
    assert 0.98 * limit < np.abs(cell[name]["kernel"]).max() <= limit
  np.testing.assert_array_equal(cell["in"]["bias"], 0.0)
  for leaf in (params["dense"]["kernel"], params["dense"]["bias"]):  # torch nn.Linear: U(+-1/sqrt(H))
    assert 0.7 / math.sqrt(128) < np.abs(leaf).max() <= 1 / math.sqrt(128)
