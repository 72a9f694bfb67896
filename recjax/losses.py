"""Recommendation losses on scores, each reduced to a weighted mean.

Every loss computes a per-example value l (one per entry of `weight`, shape `[...]`) and returns

  L = sum(w * l) / max(sum(w), eps)

so padded examples (w = 0) drop out and an all-padding batch gives 0. Per-example values are
finite even where w = 0, so gradients never meet 0 * inf.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-8


def weighted_mean(values: jnp.ndarray, weight: jnp.ndarray, eps: float = EPS) -> jnp.ndarray:
  """sum(w * l) / max(sum(w), eps) for `values` and `weight` of the same shape `[...]`; a scalar."""
  weight = weight.astype(values.dtype)
  return jnp.sum(weight * values) / jnp.maximum(jnp.sum(weight), eps)


def bpr(pos_scores: jnp.ndarray, neg_scores: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  """Bayesian personalised ranking (Rendle et al., UAI 2009).

  l = -(1/n) sum_j log sigmoid(s_pos - s_neg_j), averaged over the n negatives.

  Args:
    pos_scores: `[...]` score of the positive item.
    neg_scores: `[..., n]` scores of n sampled negatives.
    weight: `[...]` example weights (0 = padding).

  Returns:
    The weighted mean, a scalar.
  """
  per_pair = -jax.nn.log_sigmoid(pos_scores[..., None] - neg_scores)  # [..., n]
  return weighted_mean(jnp.mean(per_pair, axis=-1), weight)


def bce(pos_scores: jnp.ndarray, neg_scores: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  """Binary cross-entropy with sampled negatives (SASRec, Kang & McAuley 2018, Eq. 4).

  l = -log sigmoid(s_pos) - sum_j log(1 - sigmoid(s_neg_j))
    = -log_sigmoid(s_pos) - sum_j log_sigmoid(-s_neg_j)

  Negatives are summed, not averaged, as in the SASRec paper and code (each negative is its own
  binary example; with the usual n = 1 both conventions agree).

  Args:
    pos_scores: `[...]`; neg_scores: `[..., n]`; weight: `[...]`.

  Returns:
    The weighted mean, a scalar.
  """
  per_example = -jax.nn.log_sigmoid(pos_scores) - jnp.sum(jax.nn.log_sigmoid(-neg_scores), axis=-1)
  return weighted_mean(per_example, weight)


def softmax_ce(logits: jnp.ndarray, target: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  """Full softmax cross-entropy over all items, the padding item excluded.

  l = logsumexp_{i >= 1}(z_i) - z_target  (the padding logit z_0 is set to -inf)

  Args:
    logits: `[..., N]` scores of every item (column 0 = padding).
    target: `[...]` int target item (0 allowed where weight = 0; its l stays finite).
    weight: `[...]`.

  Returns:
    The weighted mean, a scalar.
  """
  not_padding = jnp.arange(logits.shape[-1]) > 0  # [N]
  log_norm = jax.nn.logsumexp(jnp.where(not_padding, logits, -jnp.inf), axis=-1)  # [...]
  target_logit = jnp.take_along_axis(logits, target[..., None].astype(jnp.int32), axis=-1)[..., 0]  # [...]
  return weighted_mean(log_norm - target_logit, weight)


def l2(*arrays: jnp.ndarray) -> jnp.ndarray:
  """Half the squared L2 norm of all arrays together: (1/2) sum_a ||a||^2, a scalar."""
  return 0.5 * sum(jnp.sum(jnp.square(a)) for a in arrays)
