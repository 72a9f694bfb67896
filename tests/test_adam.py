"""recjax.optim.adam against optax.adam / optax.adamw on real models, and the optimizer registry."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from testutil import rbg_key as _key

from recjax import tasks
from recjax.errors import ConfigError
from recjax.models import BPRMF, SASRec, init_params
from recjax.optim import (
    OPTIMIZERS,
    AdamState,
    adam,
    create_optimizer,
    no_decay_on_biases_and_norms,
    warmup_linear_decay,
)

STEPS = 100
USER_ONLY = {"params": {"user_embedding": True, "item_embedding": False}}  # a weight-decay mask




def _pair_batches(num_users, num_items, steps, batch_size=16, num_neg=2, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {
      "user": rng.integers(1, num_users, batch_size),
      "pos": rng.integers(1, num_items, batch_size),
      "neg": rng.integers(1, num_items, (batch_size, num_neg)),
      "weight": (np.arange(batch_size) < batch_size - 2).astype(np.float32),  # 2 padded rows
    }
    for _ in range(steps)
  ]


def _sequence_batches(num_items, max_len, steps, batch_size=4, seed=0):
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(steps):
    full = rng.integers(1, num_items, (batch_size, max_len + 1))
    lengths = rng.integers(2, max_len + 2, batch_size)
    full[np.arange(max_len + 1)[None, :] < (max_len + 1 - lengths)[:, None]] = 0  # left padding
    pos = full[:, 1:]
    batches.append({
      "seq": full[:, :-1],
      "pos": pos,
      "neg": rng.integers(1, num_items, (batch_size, max_len, 1)),
      "weight": (pos > 0).astype(np.float32),
    })
  return batches


def _make_step(loss_fn, optimizer):
  grad_fn = jax.grad(lambda p, b, r: loss_fn(p, b, r)[0])

  @jax.jit
  def step(params, opt_state, batch, rng):
    updates, opt_state = optimizer.update(grad_fn(params, batch, rng), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def _train(loss_fn, optimizer, params, batches):
  step = _make_step(loss_fn, optimizer)
  opt_state = optimizer.init(params)
  for i, batch in enumerate(batches):
    params, opt_state = step(params, opt_state, batch, jax.random.fold_in(_key(1), i))
  assert step._cache_size() == 1  # compiled once: no recompilation after the first step
  return params, opt_state


def _assert_trees_close(a, b, rtol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=_ATOL), a, b)


# SASRec's attention key biases have a true gradient of zero (they shift a softmax's logits equally), so
# they hold rounding noise that Adam scales to about lr * 1e-4. On a CPU both optimizers see the same noise;
# on a GPU its reductions' order differs between two compiled programs (seen on an H100: 2e-7 apart).
_ATOL = 1e-7 if jax.default_backend() == "cpu" else 1e-6


@pytest.fixture(scope="module")
def bpr():
  model = BPRMF(num_users=20, num_items=30, dim=8)
  return tasks.pairwise_loss_fn(model, loss="bpr"), init_params(model, _key(0)), _pair_batches(20, 30, STEPS)


@pytest.mark.parametrize(
  "ours, reference",
  [
    (lambda: adam(1e-2), lambda: optax.adam(1e-2)),
    (lambda: adam(3e-3, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-8), lambda: optax.adam(3e-3, 0.8, 0.99, 1e-6, 1e-8)),
    (lambda: adam(1e-2, weight_decay=0.05), lambda: optax.adamw(1e-2, weight_decay=0.05)),
    (
      lambda: adam(optax.cosine_decay_schedule(1e-2, STEPS), weight_decay=0.05, mask=USER_ONLY),
      lambda: optax.adamw(optax.cosine_decay_schedule(1e-2, STEPS), weight_decay=0.05, mask=USER_ONLY),
    ),
  ],
  ids=["adam", "adam-hparams", "adamw", "adamw-schedule-mask"],
)
def test_matches_optax_on_bprmf(bpr, ours, reference):
  loss_fn, params, batches = bpr
  ours_params, ours_state = _train(loss_fn, ours(), params, batches)
  ref_params, _ = _train(loss_fn, reference(), params, batches)
  _assert_trees_close(ours_params, ref_params)
  assert int(ours_state.count) == STEPS
  users = lambda p: p["params"]["user_embedding"]["embedding"]  # noqa: E731
  assert not np.allclose(users(ours_params), users(params))


def test_callable_mask_and_no_decay_where_masked(bpr):
  loss_fn, params, batches = bpr
  mask = lambda p: jax.tree.map(lambda x: x.shape[0] == 20, p)  # noqa: E731  decay the user table only
  ours, _ = _train(loss_fn, adam(1e-2, weight_decay=0.1, mask=mask), params, batches[:10])
  ref, _ = _train(loss_fn, optax.adamw(1e-2, weight_decay=0.1, mask=mask), params, batches[:10])
  _assert_trees_close(ours, ref)
  # with zero gradients only the decay moves the parameters: -lr * wd * theta where the mask is True
  theta = {"user": jnp.ones(3), "item": jnp.ones(2)}
  opt = adam(0.5, weight_decay=0.1, mask={"user": True, "item": False})
  updates, _ = opt.update(jax.tree.map(jnp.zeros_like, theta), opt.init(theta), theta)
  np.testing.assert_allclose(updates["user"], -0.05 * np.ones(3), rtol=1e-6)
  np.testing.assert_array_equal(updates["item"], 0.0)


def test_matches_optax_on_sasrec():
  """Whole-sequence CE training with dropout on (AdamW is covered on BPR-MF above)."""
  model = SASRec(num_items=13, max_len=6, dim=8, num_heads=2, ffn_dim=16)  # as test_models.py: a shared init
  loss_fn = tasks.next_item_loss_fn(model, loss="ce")
  params = init_params(model, _key(0))
  batches = _sequence_batches(13, 6, STEPS)
  ours, _ = _train(loss_fn, adam(1e-3), params, batches)
  ref, _ = _train(loss_fn, optax.adam(1e-3), params, batches)
  _assert_trees_close(ours, ref)


def test_state_is_a_named_tuple():
  params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  state = adam(1e-3).init(params)
  assert isinstance(state, AdamState) and isinstance(state, tuple)
  assert state._fields == ("count", "mu", "nu")
  assert state.count.dtype == jnp.int32 and state.count.shape == ()
  assert jax.tree.structure(state.mu) == jax.tree.structure(params)
  updates, state = adam(1e-3).update(params, state)
  np.testing.assert_allclose(updates["w"], -1e-3 * np.ones((2, 3)), rtol=1e-5)  # first step: -lr * sign(g)
  with pytest.raises(ValueError, match="params"):
    adam(1e-3, weight_decay=0.1).update(params, state)


def test_create_optimizer():
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = {"w": jnp.array([0.5, 0.1, -0.3])}

  def run(opt, steps=3):
    update = jax.jit(opt.update)  # jitted, as in a train step (op-by-op execution may differ by an ulp)
    p, state = params, opt.init(params)
    for step in range(steps):   # gradients that change, so that the moment decay rates matter
      updates, state = update(jax.tree.map(lambda g: g * (1 + step) ** 2, grads), state, p)
      p = optax.apply_updates(p, updates)
    return p

  assert set(OPTIMIZERS) == {"adam", "optax_adam", "adamw", "sgd"}
  betas = {"b1": 0.8, "b2": 0.98}
  _assert_trees_close(run(create_optimizer("adam", 0.1, **betas)), run(optax.adam(0.1, **betas)))
  _assert_trees_close(run(create_optimizer("adamw", 0.1, 0.1, **betas)),
                      run(optax.adamw(0.1, weight_decay=0.1, **betas)))
  assert not np.allclose(run(create_optimizer("adam", 0.1, **betas))["w"], run(create_optimizer("adam", 0.1))["w"])
  for wd in (0.0, 0.1):
    _assert_trees_close(run(create_optimizer("adam", 0.1, wd)), run(create_optimizer("optax_adam", 0.1, wd)))
  _assert_trees_close(run(create_optimizer("adamw", 0.1, 0.1)), run(optax.adamw(0.1, weight_decay=0.1)))
  _assert_trees_close(run(create_optimizer("sgd", 0.1)), run(optax.sgd(0.1)))
  with pytest.raises(ConfigError, match="unknown optimizer"):
    create_optimizer("adagrad", 0.1)


def test_bert_style_schedule_clipping_eps_and_decay_mask_equal_optax():
  """BERT's optimizer from these options equals the same thing written with optax's own pieces."""
  params = {"dense": {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "bias": jnp.array([0.3, -0.1])},
            "norm": {"scale": jnp.array([1.0, 1.5])}, "output_bias": jnp.array([0.2])}
  schedule = warmup_linear_decay(0.1, warmup_steps=3, decay_steps=10)
  np.testing.assert_allclose([schedule(t) for t in (0, 1, 3, 5, 10, 12)],
                             [0.0, 0.1 / 3, 0.1 * 0.7, 0.1 * 0.5, 0.0, 0.0], rtol=1e-6, atol=1e-9)
  mask = no_decay_on_biases_and_norms(params)
  assert mask == {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}, "output_bias": False}
  star_norm = {"gamma": 1.0, "beta": 0.0, "domain_gamma": 1.0, "domain_beta": 0.0, "domain_kernel": 1.0}
  star_mask = no_decay_on_biases_and_norms({"pn": star_norm})["pn"]     # STAR's partitioned normalisation
  assert star_mask == {"gamma": False, "beta": False, "domain_gamma": False, "domain_beta": False,
                       "domain_kernel": True}
  ours = create_optimizer("adamw", schedule, 0.01, eps=1e-6, decay_mask=no_decay_on_biases_and_norms, clip_norm=0.5)
  reference = optax.chain(optax.clip_by_global_norm(0.5),
                          optax.adamw(schedule, eps=1e-6, weight_decay=0.01, mask=no_decay_on_biases_and_norms))

  def run(opt, steps=6):
    update = jax.jit(opt.update)
    p, state = params, opt.init(params)
    for step in range(steps):   # large gradients, so that the clipping acts
      grads = jax.tree.map(lambda x: (step + 1.0) * jnp.ones_like(x) + x, p)
      updates, state = update(grads, state, p)
      p = optax.apply_updates(p, updates)
    return p

  _assert_trees_close(run(ours), run(reference))
  unclipped = create_optimizer("adamw", schedule, 0.01, eps=1e-6, decay_mask=no_decay_on_biases_and_norms)
  assert not np.allclose(run(ours)["dense"]["kernel"], run(unclipped)["dense"]["kernel"])
  coupled = create_optimizer("adam", 0.1, 0.01, decay_mask=no_decay_on_biases_and_norms)   # L2 where the mask says
  reference = optax.chain(optax.add_decayed_weights(0.01, no_decay_on_biases_and_norms), optax.adam(0.1))
  _assert_trees_close(run(coupled), run(reference))
