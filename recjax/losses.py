"""Recommendation losses on scores, each reduced to a weighted mean.

Every loss computes a per-example value l (one per entry of `weight`, shape `[...]`) and returns

  L = sum(w * l) / max(sum(w), eps)

so padded examples (w = 0) drop out and an all-padding batch gives 0. Per-example values are
finite even where w = 0, so gradients never meet 0 * inf.
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

EPS = 1e-8


def weighted_mean(values: jnp.ndarray, weight: jnp.ndarray, eps: float = EPS) -> jnp.ndarray:
  """sum(w * l) / max(sum(w), eps) for `values` and `weight` of the same shape `[...]`; a scalar."""
  weight = weight.astype(values.dtype)
  return jnp.sum(weight * values) / jnp.maximum(jnp.sum(weight), eps)


def _check_negatives(loss: str, pos_scores: jnp.ndarray, neg_scores: jnp.ndarray) -> None:
  """Negatives must be `[..., n]` over positives `[...]`: a `[B]` array would broadcast silently."""
  if neg_scores.shape[:-1] != pos_scores.shape:
    raise ValueError(f"{loss}: neg_scores {neg_scores.shape} must be positives' {pos_scores.shape} + (n,)")


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
  _check_negatives("bpr", pos_scores, neg_scores)
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
  _check_negatives("bce", pos_scores, neg_scores)
  per_example = -jax.nn.log_sigmoid(pos_scores) - jnp.sum(jax.nn.log_sigmoid(-neg_scores), axis=-1)
  return weighted_mean(per_example, weight)


def sampled_softmax(
  pos_scores: jnp.ndarray,
  neg_scores: jnp.ndarray,
  weight: jnp.ndarray,
  pos_log_q: jnp.ndarray,
  neg_log_q: jnp.ndarray,
  neg_valid: jnp.ndarray | None = None,
) -> jnp.ndarray:
  """Sampled softmax cross-entropy with the log-Q correction (Jean et al., ACL 2015; Yi et al., RecSys 2019).

  The positive competes with itself plus n sampled negatives; every logit is corrected by the log of
  the probability that the sampler draws that item (Yi et al. 2019: s^c(x, y_j) = s(x, y_j) - log p_j):

    z_0 = s_pos - log q_pos,   z_j = s_neg_j - log q_neg_j   (z_j = -inf where neg_valid is False)
    l   = -log softmax(z)_0 = logsumexp(z_0, z_1, ..., z_n) - z_0

  q(i) is the probability of drawing item i under the negative-sampling distribution (e.g.
  popularity^0.75 / Z, or the in-batch frequency estimate of Yi et al.). Only differences of log q
  matter: any constant shared by all entries cancels, so log(expected count) = log(n q) works too,
  and for a uniform sampler the correction vanishes (this is then plain sampled softmax). Without
  it the sampled softmax is biased towards penalising popular (often-sampled) items.

  `neg_valid` drops negatives, e.g. accidental hits equal to the positive (TensorFlow's
  `remove_accidental_hits`), by setting their logit to -inf; the positive logit is always kept, so
  l stays finite (l = 0 when every negative is dropped). Rows with weight = 0 are set to l = 0 with
  zero gradient whatever their scores or log q (a padded positive may have q = 0, log q = -inf).

  Args:
    pos_scores: `[...]` score of the positive item.
    neg_scores: `[..., n]` scores of n sampled negatives.
    weight: `[...]` example weights (0 = padding).
    pos_log_q: `[...]` log q of the positive item (finite where weight > 0).
    neg_log_q: `[..., n]` log q of each negative (finite where the negative is valid).
    neg_valid: `[..., n]` bool, False drops that negative; None keeps all.

  Returns:
    The weighted mean, a scalar.
  """
  _check_negatives("sampled_softmax", pos_scores, neg_scores)
  row = (weight > 0)[..., None]  # [..., 1]
  keep = row if neg_valid is None else jnp.logical_and(row, neg_valid)  # [..., n]
  pos_logit = jnp.where(row, (pos_scores - pos_log_q)[..., None], 0.0)  # [..., 1]
  neg_logits = jnp.where(keep, neg_scores - neg_log_q, -jnp.inf)  # [..., n]
  logits = jnp.concatenate([pos_logit, neg_logits.astype(pos_logit.dtype)], axis=-1)  # [..., n+1]
  return weighted_mean(jax.nn.logsumexp(logits, axis=-1) - pos_logit[..., 0], weight)


def gbce(
  pos_scores: jnp.ndarray, neg_scores: jnp.ndarray, weight: jnp.ndarray, beta: float | jnp.ndarray
) -> jnp.ndarray:
  """Generalised binary cross-entropy of gSASRec (Petrov & Macdonald, RecSys 2023, arXiv:2308.07192).

  l = -log(sigmoid(s_pos)^beta) - sum_j log(1 - sigmoid(s_neg_j))
    = -beta * log_sigmoid(s_pos) - sum_j log_sigmoid(-s_neg_j)

  beta = 1 is `bce`; beta < 1 counters the overconfidence that negative sampling causes (the
  positive share is inflated by sampling only k of the |I| - 1 other items). Pick beta with
  `gbce_beta`. The paper writes the loss divided by (k + 1); recjax sums the negatives as `bce`
  does, which changes the loss only by that constant factor and keeps gbce(beta=1) == bce.

  Args:
    pos_scores: `[...]`; neg_scores: `[..., n]`; weight: `[...]`.
    beta: positive scalar (or an array broadcastable to `[...]`), usually in [alpha, 1].

  Returns:
    The weighted mean, a scalar.
  """
  if isinstance(beta, numbers.Real) and not beta > 0:
    raise ValueError(f"gbce: beta must be > 0, got {beta}")
  _check_negatives("gbce", pos_scores, neg_scores)
  per_example = -beta * jax.nn.log_sigmoid(pos_scores) - jnp.sum(jax.nn.log_sigmoid(-neg_scores), axis=-1)
  return weighted_mean(per_example, weight)


def gbce_beta(num_negatives: int, num_items: int, t: float) -> float:
  """The gBCE exponent beta from the calibration parameter t (Petrov & Macdonald, RecSys 2023).

    alpha = num_negatives / (num_items - 1)               (negative sampling rate)
    beta  = alpha * (t * (1 - 1/alpha) + 1/alpha) = 1 - t * (1 - alpha)

  so t = 0 gives beta = 1 (plain BCE, SASRec) and t = 1 gives beta = alpha (fully calibrated
  probabilities); the authors recommend t = 0.75 with 256 negatives.

  Args:
    num_negatives: k, the negatives sampled per positive, 1 <= k <= num_items - 1.
    num_items: |I|, the number of real items in the catalogue, the padding item NOT counted (a
      recjax model with `num_items` embedding rows, row 0 = padding, has num_items - 1 real
      items), and of them only those a negative can be (not items held out for cold start).
      Negatives are drawn from the |I| - 1 items other than the positive.
    t: calibration parameter in [0, 1].

  Returns:
    beta, a Python float in [alpha, 1].
  """
  for name, value in (("num_negatives", num_negatives), ("num_items", num_items)):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
      raise ValueError(f"gbce_beta: {name} must be an int, got {value!r}")
  if num_items < 2:
    raise ValueError(f"gbce_beta: num_items (real items, padding excluded) must be >= 2, got {num_items}")
  if not 1 <= num_negatives <= num_items - 1:
    raise ValueError(
      f"gbce_beta: num_negatives must be in [1, num_items - 1] = [1, {num_items - 1}] so that the "
      f"sampling rate alpha = num_negatives / (num_items - 1) is in (0, 1], got {num_negatives}"
    )
  if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 <= t <= 1.0:
    raise ValueError(f"gbce_beta: t must be a number in [0, 1], got {t!r}")
  alpha = int(num_negatives) / (int(num_items) - 1)
  t = float(t)
  return float(t * alpha + (1.0 - t))  # = alpha * (t * (1 - 1/alpha) + 1/alpha), exact at t = 0 and t = 1


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


# Logits per chunk of rows in `softmax_ce_rows`: a chunk that stays in a CPU's cache scores ~1.6x faster
# than one pass over every row; accelerators take all rows at once. A chunk has at least CE_CHUNK_MIN_ROWS
# rows whatever the catalogue: each chunk adds an [N, d] gradient, and short chunks make thin products.
CE_CHUNK_BYTES = {"cpu": 8 << 20}
CE_CHUNK_BYTES_DEFAULT = 1 << 30
CE_CHUNK_MIN_ROWS = 1024


def softmax_ce_rows(h: jnp.ndarray, items: jnp.ndarray, target: jnp.ndarray, weight: jnp.ndarray,
                    item_mask: jnp.ndarray | None = None, chunk_bytes: int | None = None,
                    min_chunk_rows: int = CE_CHUNK_MIN_ROWS) -> jnp.ndarray:
  """`softmax_ce(h @ items.T, target, weight)` without the `[..., N]` scores in memory.

  l = logsumexp_{i >= 1, item_mask_i}(<h, items_i>) - <h, items_target>

  Rows of `h` are scored a chunk at a time (at most `chunk_bytes` of logits, default `CE_CHUNK_BYTES`
  for the backend, but at least `min_chunk_rows` rows), and the gradient is computed together with the
  loss (a custom VJP), so nothing of size `[..., N]` is kept for the backward pass and no `[..., N]`
  one-hot is scattered into.

  Args:
    h: `[..., d]` states (float32, bfloat16 or float64; the softmax runs in at least float32).
    items: `[N, d]` item rows; row 0 is padding and never a class.
    target: `[...]` int target item (0 allowed where weight = 0).
    weight: `[...]`.
    item_mask: `[N]` bool or None; items where False are left out of the softmax as well (a target is
      always scored as itself).
    chunk_bytes: logits per chunk, in bytes.
    min_chunk_rows: rows per chunk at least.

  Returns:
    The weighted mean, a scalar. Differentiable in h, items and weight (not in target or item_mask).
  """
  if chunk_bytes is None:
    chunk_bytes = CE_CHUNK_BYTES.get(jax.default_backend(), CE_CHUNK_BYTES_DEFAULT)
  row_bytes = max(items.shape[0] - 1, 1) * jnp.promote_types(h.dtype, jnp.float32).itemsize
  return _softmax_ce_rows(h, items, target, weight, item_mask, max(chunk_bytes // row_bytes, min_chunk_rows, 1))


def _ce_chunked(h, items, target, weight, item_mask, rows_per_chunk: int, grads: bool):
  """Loss (and, with `grads`, its gradients in h, items and weight) of `softmax_ce_rows`."""
  d = h.shape[-1]
  dtype = jnp.promote_types(h.dtype, jnp.float32)
  rows, tgt, w = h.reshape(-1, d), target.reshape(-1), weight.reshape(-1).astype(dtype)  # [R, d], [R], [R]
  classes = items[1:]  # [N-1, d]
  keep = None if item_mask is None else item_mask[1:]
  num_rows = rows.shape[0]
  chunks = _chunk_count(num_rows, -(-num_rows // rows_per_chunk))
  size = -(-num_rows // chunks)  # rows per chunk
  pad = chunks * size - num_rows
  if pad:  # weight 0, target 0: no loss, no gradient
    rows, tgt, w = jnp.pad(rows, ((0, pad), (0, 0))), jnp.pad(tgt, (0, pad)), jnp.pad(w, (0, pad))
  # Chunk j holds rows i * chunks + j: a batch split over devices along its rows splits every chunk alike.
  xs = (rows.reshape(size, chunks, d).swapaxes(0, 1), tgt.reshape(size, chunks).T, w.reshape(size, chunks).T)
  weight_sum = jnp.sum(w)
  total_weight = jnp.maximum(weight_sum, EPS)

  def chunk(grad_items, x):
    h_c, t_c, w_c = x  # [C, d], [C], [C]
    logits = jnp.matmul(h_c, classes.T, preferred_element_type=dtype)  # [C, N-1]
    if keep is not None:
      logits = jnp.where(keep, logits, -jnp.inf)
    log_norm = jax.nn.logsumexp(logits, axis=-1)  # [C]
    target_rows = jnp.take(items, t_c, axis=0)  # [C, d]
    per_row = log_norm - jnp.einsum("cd,cd->c", h_c, target_rows, preferred_element_type=dtype)  # [C]
    if not grads:
      return grad_items, (per_row, None)
    scale = (w_c / total_weight)[:, None]  # [C, 1]: dL / dl
    probs = (jnp.exp(logits - log_norm[:, None]) * scale).astype(h.dtype)  # [C, N-1]
    grad_h = jnp.matmul(probs, classes, preferred_element_type=dtype) - scale * target_rows  # [C, d]
    grad_classes = jnp.matmul(probs.T, h_c, preferred_element_type=dtype)  # [N-1, d]
    grad_items = grad_items.at[1:].add(grad_classes).at[t_c].add(-scale * h_c)
    return grad_items, (per_row, grad_h)

  grad_items, (per_row, grad_h) = jax.lax.scan(chunk, jnp.zeros(items.shape, dtype), xs)
  per_row = per_row.T.reshape(-1)[:num_rows]  # [R]
  loss = jnp.sum(w[:num_rows] * per_row) / total_weight
  if not grads:
    return loss
  grad_h = grad_h.swapaxes(0, 1).reshape(-1, d)[:num_rows].reshape(h.shape)
  # L = sum(w l) / max(sum(w), eps): dL/dw = (l - L [sum(w) > eps]) / max(sum(w), eps)
  grad_w = (per_row - jnp.where(weight_sum > EPS, loss, 0.0)) / total_weight
  return loss, (grad_h, grad_items, grad_w.reshape(weight.shape))


def _chunk_count(num_rows: int, wanted: int) -> int:
  """At least `wanted` chunks; a divisor of `num_rows` when one is at most twice `wanted`, so that no
  padding rows are added (padding a device-split batch's rows would gather them onto every device)."""
  wanted = max(1, min(wanted, num_rows))
  return next((n for n in range(wanted, min(2 * wanted, num_rows) + 1) if num_rows % n == 0), wanted)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _softmax_ce_rows(h, items, target, weight, item_mask, rows_per_chunk):
  return _ce_chunked(h, items, target, weight, item_mask, rows_per_chunk, grads=False)


def _softmax_ce_rows_fwd(h, items, target, weight, item_mask, rows_per_chunk):
  loss, (grad_h, grad_items, grad_w) = _ce_chunked(h, items, target, weight, item_mask, rows_per_chunk, grads=True)
  grad_w = grad_w.astype(weight.dtype) if jnp.issubdtype(weight.dtype, jnp.inexact) else None
  return loss, (grad_h.astype(h.dtype), grad_items.astype(items.dtype), grad_w)


def _softmax_ce_rows_bwd(rows_per_chunk, grads, g):
  grad_h, grad_items, grad_w = ((g * x).astype(x.dtype) if x is not None else None for x in grads)
  return grad_h, grad_items, None, grad_w, None


_softmax_ce_rows.defvjp(_softmax_ce_rows_fwd, _softmax_ce_rows_bwd)


def l2(*arrays: jnp.ndarray) -> jnp.ndarray:
  """Half the squared L2 norm of all arrays together: (1/2) sum_a ||a||^2, a scalar."""
  return 0.5 * sum(jnp.sum(jnp.square(a)) for a in arrays)
