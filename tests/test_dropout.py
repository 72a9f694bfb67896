"""Hash dropout: keep rate, scaling, determinism, independence across keys, module behaviour."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recjax.nn.dropout import Dropout, dropout, hash_bits


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_rate_and_scaling(rate):
  y = np.asarray(dropout(jnp.ones((500, 400)), rate, jax.random.PRNGKey(0)))
  kept = y > 0
  assert abs(kept.mean() - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / y.size)
  np.testing.assert_allclose(y[kept], 1 / (1 - rate), rtol=1e-6)


def test_masks_are_deterministic_and_uncorrelated():
  key_a, key_b = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  a = np.asarray(hash_bits(key_a, (1000, 1000)))
  np.testing.assert_array_equal(a, np.asarray(hash_bits(key_a, (1000, 1000))))
  b = np.asarray(hash_bits(key_b, (1000, 1000)))
  bit = lambda x, i: ((x >> i) & 1).ravel().astype(float)  # noqa: E731
  for i in (0, 15, 31):
    assert abs(bit(a, i).mean() - 0.5) < 0.005
    assert abs(np.corrcoef(bit(a, i), bit(b, i))[0, 1]) < 0.01           # across keys
  assert abs(np.corrcoef(bit(a[:, :-1], 0), bit(a[:, 1:], 0))[0, 1]) < 0.01   # neighbours
  typed = np.asarray(hash_bits(jax.random.wrap_key_data(key_a), (1000, 1000)))
  np.testing.assert_array_equal(a, typed)


def test_module_is_identity_when_deterministic_and_uses_the_dropout_stream():
  x = jnp.ones((4, 8))
  module = Dropout(0.5)
  assert module.apply({}, x, deterministic=True) is x
  y1 = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
  y2 = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(4)})
  assert not np.array_equal(np.asarray(y1), np.asarray(y2))


def test_masks_under_jaxs_rbg_default_impl():
  """With JAX's default PRNG set to "rbg" (4-word keys), keys made by `PRNGKey` still give masks: the
  seeds are drawn from the key's first two words with threefry, whatever the default."""
  from jax._src import config as jax_config

  with jax_config.default_prng_impl("rbg"):
    key = jax.random.PRNGKey(3)
    assert key.shape == (4,)
    bits = jax.jit(lambda k: hash_bits(k, (8, 5)))(key)
    typed = hash_bits(jax.random.key(3), (8, 5))
  assert bits.shape == (8, 5) and len(np.unique(np.asarray(bits))) == 40
  np.testing.assert_array_equal(hash_bits(jnp.asarray(key)[:2], (8, 5)), bits)   # the first two words decide
  np.testing.assert_array_equal(typed, bits)
