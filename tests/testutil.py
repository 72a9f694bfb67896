"""Helpers shared by the test files (imported as `testutil`; pytest puts this folder on sys.path)."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads

from recjax.launch import with_host_devices


def host_devices_env(count: int) -> dict[str, str]:
  """The environment for a subprocess on `count` XLA CPU host devices, keeping the run's other XLA flags."""
  return {**os.environ, "XLA_FLAGS": with_host_devices(os.environ.get("XLA_FLAGS", ""), count), "JAX_PLATFORMS": "cpu"}


def rbg_key(seed: int) -> jax.Array:
  """An "rbg" key: XLA's RngBitGenerator compiles several times faster than threefry (fast tests)."""
  return jax.random.key(seed, impl="rbg")


def check_param_grads(f, tree) -> None:
  """check_grads of the scalar or array `f(tree)` in float64 on the flattened tree (one array keeps
  op-by-op work small): first-order, reverse mode."""
  with jax.enable_x64(True):
    flat, unravel = ravel_pytree(jax.tree.map(lambda a: np.asarray(a, np.float64), tree))
    check_grads(jax.jit(lambda v: f(unravel(v))), (flat,), order=1, modes=["rev"], eps=1e-5)


def random_variables(init, *args, std: float = 0.3, seed: int = 0, mean=lambda path: 0.0) -> dict:
  """Variables of `init(key, *args)`'s structure drawn N(mean(path), std^2) by numpy, leaf by leaf in tree
  order. The structure is traced with `jax.eval_shape`, never compiled: a jitted initialiser costs seconds
  of XLA compilation per model on CPU, and tests that need weights of some size need no more."""
  shapes = jax.eval_shape(init, rbg_key(0), *args)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(mean(path) + rng.normal(0.0, std, s.shape), s.dtype), shapes)
