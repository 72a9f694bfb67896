"""Adam and AdamW written from scratch as an `optax.GradientTransformation`.

Adam (Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015), at step t = 1, 2, ...
with gradient g_t:

  m_t = b1 m_{t-1} + (1 - b1) g_t              v_t = b2 v_{t-1} + (1 - b2) g_t^2
  m^_t = m_t / (1 - b1^t)                      v^_t = v_t / (1 - b2^t)
  u_t = m^_t / (sqrt(v^_t + eps_root) + eps)
  AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019):
  u_t <- u_t + wd * theta_{t-1}                 (only where `mask` is True)
  theta_t = theta_{t-1} - lr_t * u_t            (lr_t = learning_rate(t - 1) for a schedule)

The operations run in the same order as `optax.adam` / `optax.adamw`, so the two agree to the
last bit in float32 under `jit` (as in a training step; run op by op, XLA may fuse the two differently,
within a few ulp).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


class AdamState(NamedTuple):
  """count: `[]` int32 steps taken; mu, nu: first and second moments, shaped like the params."""

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def _safe_increment(count: jax.Array) -> jax.Array:
  """count + 1, saturating at the dtype's maximum instead of wrapping around."""
  top = jnp.iinfo(count.dtype).max
  return jnp.where(count < top, count + 1, top).astype(count.dtype)


def adam(
  learning_rate: float | optax.Schedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  weight_decay: float = 0.0,
  mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
  """Adam, or AdamW when `weight_decay > 0` (see the module docstring for the maths).

  Args:
    learning_rate: a float, or a schedule `count -> lr` evaluated at the step count before the
      update (0 on the first step), as optax does.
    b1, b2: decay rates of the first and second moment estimates.
    eps: added to sqrt(v^) in the denominator.
    eps_root: added to v^ inside the square root (keeps gradients through the update finite).
    weight_decay: decoupled weight decay wd; the step subtracts lr * wd * theta.
    mask: where to decay: a pytree of bools (a prefix of the params tree is enough) or a function
      `params -> that pytree`; None decays every parameter.

  Returns:
    An `optax.GradientTransformation` with state `AdamState`; `update` needs `params` when
    `weight_decay > 0`.

  Example:
    >>> opt = adam(1e-3)
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)
    >>> params = optax.apply_updates(params, updates)  # w = 1 - 1e-3
  """

  def init(params):
    zeros = lambda p: jnp.zeros_like(p)  # noqa: E731
    return AdamState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params))

  def update(updates, state, params=None):
    mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, updates, state.mu)
    nu = jax.tree.map(lambda g, v: (1 - b2) * (g**2) + b2 * v, updates, state.nu)
    count = _safe_increment(state.count)
    correction1 = 1 - b1**count  # [] float32, computed before casting to the moments' dtype
    correction2 = 1 - b2**count
    steps = jax.tree.map(
      lambda m, v: (m / correction1.astype(m.dtype)) / (jnp.sqrt(v / correction2.astype(v.dtype) + eps_root) + eps),
      mu,
      nu,
    )
    if weight_decay:
      if params is None:
        raise ValueError("adam with weight_decay > 0 needs params in update(updates, state, params)")
      decay = mask(params) if callable(mask) else mask
      if decay is None:
        steps = jax.tree.map(lambda u, p: u + weight_decay * p, steps, params)
      else:
        steps = jax.tree.map(
          lambda keep, u, p: jax.tree.map(lambda u_, p_: u_ + weight_decay * p_ if keep else u_, u, p),
          decay,
          steps,
          params,
        )
    if callable(learning_rate):
      lr = learning_rate(state.count)
      steps = jax.tree.map(lambda u: jnp.asarray(-lr, dtype=u.dtype) * u, steps)
    else:
      steps = jax.tree.map(lambda u: -learning_rate * u, steps)
    return steps, AdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)
