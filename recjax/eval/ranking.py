"""Ranking evaluation on device: full ranking over all items, and the sampled protocol.

Full ranking: scores [U, N] for a chunk of users, the padding item 0 and (optionally) each
user's history set to -inf, `lax.top_k`, hits against the held-out items, metric sums. One
jitted call per chunk of users; the host only slices chunks and adds the sums. Chunks are sized
to a memory budget and the last one is padded (weight 0) so nothing recompiles.

Ties count against the held-out items, in both rankings: among equal scores every other item ranks
first (full ranking: `_tie_aware_hits`; sampled: `sampled_rank`). So a constant scorer, or one whose
scores are all NaN, hits nothing in its top k (k below the number of rankable items), whatever the
item ids are; a lower-id-first order would credit it with the held-out items that happen to have low
ids (recjax's ids follow first appearance in the data file, which tracks popularity).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recjax.data.samplers import csr_to_padded
from recjax.eval.metrics import SAMPLED_PREFIX, check_metrics, metric_rows
from recjax.train.mesh import fetch, on_mesh, put_global

Array = jnp.ndarray
ScoreFn = Callable[[Any, Mapping[str, Array]], Array]               # (params, inputs) -> [U, N]
ItemScoreFn = Callable[[Any, Mapping[str, Array], Array], Array]    # (..., items [U, C]) -> [U, C]
Exclude = np.ndarray | tuple[np.ndarray, np.ndarray]                # padded [U, H] or CSR

DEFAULT_BUDGET = 256 << 20
DEFAULT_METRICS = ("recall", "mrr", "ndcg", "hit", "precision")


# ----------------------------------------------------------------------------- device functions

def _mask_scores(scores: Array, mask: Array) -> Array:
  """Scores for `lax.top_k`: masked entries -inf, the rest clamped to the lowest finite float or above.

  `lax.top_k` sorts NaN above every number, and a real -inf would tie with the masked entries; so a NaN
  or -inf score becomes the lowest finite value and ranks last among the unmasked items, never ahead
  of them and never behind a masked one.
  """
  lowest = jnp.finfo(scores.dtype).min
  return jnp.where(mask, -jnp.inf, jnp.nan_to_num(scores, nan=lowest, neginf=lowest, posinf=jnp.inf))


def _top_values(scores: Array, k: int) -> Array:
  """`lax.top_k(scores [U, N], k)` values `[U, k]`, behind an optimisation barrier: XLA:CPU otherwise
  rewrites a top-k whose values feed later arithmetic into a full sort of the row (35x slower here)."""
  return jax.lax.optimization_barrier(jax.lax.top_k(scores, k)[0])


def _tie_aware_hits(values: Array, masked: Array, positive_scores: Array, total=lambda count: count) -> Array:
  """hits[u, r]: the item at rank r is held out, ties ordered pessimistically (see the module docstring).

  Among the items scoring `values[u, r]` (a tie group), the non-held-out ones take the first ranks. A
  group other than the last one in the list lies wholly inside it, so its size is counted in `values`;
  the last one may go on past rank k, so its size is counted over all N items.

  Args:
    values: [U, k] the top-k masked scores, best first (-inf: a masked item, never a hit).
    masked: [U, N'] the masked scores (`_mask_scores`) of N' of the items.
    positive_scores: [U, P] the masked scores of those of the held-out items among them (-inf for the others).
    total: sums a count over the item slices (`psum` over `model`) when `masked` holds one slice.
  Returns:
    [U, k] float32.
  """
  k = values.shape[1]
  count_last = total((masked == values[:, -1:]).sum(-1))                                 # [U]
  relevant = total((positive_scores[:, None, :] == values[:, :, None]).sum(-1))          # [U, k]
  equal = values[:, :, None] == values[:, None, :]                   # [U, k, k]
  above = (values[:, None, :] > values[:, :, None]).sum(-1)          # [U, k] items scored higher: all listed
  group = jnp.where(values == values[:, -1:], count_last[:, None], equal.sum(-1))
  hits = (jnp.arange(k) - above >= group - relevant) & (values > -jnp.inf)
  return hits.astype(jnp.float32)


def full_ranking_hits(scores: Array, exclude: Array, positives: Array, k: int) -> Array:
  """Hits at ranks 0..k-1 of each user's full ranking, item 0 and the excluded items never ranked.

  Args:
    scores: [U, N] scores over the item table (column 0 = padding).
    exclude: [U, H] int item ids to mask, 0-padded.
    positives: [U, P] distinct held-out item ids, 0-padded (an excluded one never hits).
    k: list length. With fewer than k unmasked items the remaining ranks are empty (never a hit). A NaN
      or -inf score ranks last among the unmasked items (`_mask_scores`).
  Returns:
    [U, k] float32, 1 where the item at that rank is held out.
  """
  u, n = scores.shape
  mask = jnp.zeros((u, n), bool).at[jnp.arange(u)[:, None], exclude].set(True).at[:, 0].set(True)
  masked = _mask_scores(scores, mask)
  values = _top_values(masked, _ranked(k, n))
  positive_scores = jnp.where(positives > 0, jnp.take_along_axis(masked, positives, axis=1), -jnp.inf)  # [U, P]
  return _pad_ranks(_tie_aware_hits(values, masked, positive_scores), k)


def _ranked(k: int, num_items: int) -> int:
  """Ranks that can hold an item: k, or the N - 1 real items when fewer."""
  return min(k, num_items - 1)


def _pad_ranks(hits: Array, k: int) -> Array:
  """`hits [U, k']` extended with empty ranks (never a hit) to `[U, k]`: the ranks past the last item."""
  return jnp.pad(hits, ((0, 0), (0, k - hits.shape[1])))


def sharded_full_ranking_hits(scores: Array, exclude: Array, positives: Array, k: int, mesh) -> Array:
  """`full_ranking_hits` with the users split over the mesh's `data` axis, each device ranking its own.

  Written per device (`shard_map`) because XLA's partitioner, left to itself, gathers every device's
  `[U, N]` scores for the exclusion scatter and `top_k` and ranks all users on each device: redundant
  work, and on XLA:CPU host devices an all-gather in every chunk, which chunks sent back to back can
  deadlock on.

  Args: scores [U, N], exclude [U, H], positives [U, P] (0-padded), all split over `data` (U a multiple of
    its size); k; mesh.
  Returns: [U, k] float32, as `full_ranking_hits`.
  """
  from jax.sharding import PartitionSpec as P

  return jax.shard_map(functools.partial(full_ranking_hits, k=k), mesh=mesh, in_specs=(P("data"),) * 3,
                       out_specs=P("data"))(scores, exclude, positives)


def merged_full_ranking_hits(scores: Array, exclude: Array, positives: Array, k: int, mesh) -> Array:
  """`full_ranking_hits` with the item axis split over the mesh's `model` axis (users over `data`).

  Each device masks its own slice of the items and takes its top-k scores; the `model` devices exchange
  those (`[U, k]`, never the `[U, N]` scores) and take the top k of them, which are the global top-k
  scores. The tie counts (`_tie_aware_hits`) are summed over the slices. Exact, and equal to
  `full_ranking_hits`.

  Args:
    scores: [U, N]; exclude: [U, H] 0-padded; positives: [U, P] 0-padded; k: list length; mesh: a mesh
      with `data` and `model` axes (U a multiple of the `data` size; N is padded to a multiple of the
      `model` size here).
  Returns:
    [U, k] float32, as `full_ranking_hits`.
  """
  from jax.sharding import PartitionSpec as P

  num_items = scores.shape[1]
  slices = mesh.shape["model"]
  width = -(-num_items // slices)
  scores = jnp.pad(scores, ((0, 0), (0, width * slices - num_items)))

  def local_hits(scores, exclude, positives):   # [u, width] one slice of the items, [u, H], [u, P]
    offset = jax.lax.axis_index("model") * width
    ids = offset + jnp.arange(width)
    in_slice = lambda items: (items > 0) & (items >= offset) & (items < offset + width)  # noqa: E731
    rows = jnp.arange(scores.shape[0])[:, None]
    local = jnp.where(in_slice(exclude), exclude - offset, width)
    mask = jnp.zeros(scores.shape, bool).at[rows, local].set(True, mode="drop") | (ids == 0) | (ids >= num_items)
    masked = _mask_scores(scores, mask)
    ranked = _ranked(k, num_items)
    values = jax.lax.all_gather(_top_values(masked, min(ranked, width)), "model", axis=1, tiled=True)  # [u, slices*k']
    values = _top_values(values, ranked)
    own = jnp.where(in_slice(positives), positives - offset, 0)
    positive_scores = jnp.where(in_slice(positives), jnp.take_along_axis(masked, own, axis=1), -jnp.inf)
    hits = _tie_aware_hits(values, masked, positive_scores, total=lambda count: jax.lax.psum(count, "model"))
    return _pad_ranks(hits, k)

  return jax.shard_map(local_hits, mesh=mesh, in_specs=(P("data", "model"), P("data"), P("data")),
                       out_specs=P("data"), check_vma=False)(scores, exclude, positives)  # equal over `model`


def sampled_rank(scores: Array) -> Array:
  """0-based rank of candidate 0 (the target) among [target, negatives...].

  rank = #{j >= 1 : not s_j < s_0}: ties count against the target (pessimistic), so a constant
  scorer ranks last rather than first; so does a NaN score, the target's or a negative's.

  Args:
    scores: [U, C] with the target's score in column 0.
  Returns:
    [U] int32.
  """
  return (~(scores[:, 1:] < scores[:, :1])).sum(-1).astype(jnp.int32)


def gather_scorer(score_fn: ScoreFn) -> ItemScoreFn:
  """score_fn_items(params, inputs, items [U, C]) -> [U, C] from a full scorer (scores all N)."""
  def score_items(params, inputs, items):
    return jnp.take_along_axis(score_fn(params, inputs), items, axis=1)
  return score_items


def make_full_ranking_eval(score_fn: ScoreFn, ks: Sequence[int] = (10,),
                           metrics: Sequence[str] = DEFAULT_METRICS, mesh=None) -> Callable:
  """Jitted chunk evaluator (params, inputs, exclude [U, H], positives [U, P], weight [U]) ->
  ({"name@k": [U] weighted values}, [U] weights) (`metric_rows`), summed exactly on the host. Cached
  per (score_fn, ks, metrics, mesh), so calling it again with the same scorer reuses the compiled
  function. With a `mesh` (users split over its `data` axis), each device masks and ranks its own users
  (`sharded_full_ranking_hits`); when its `model` axis has more than one device, the items are ranked in
  slices and the top-k merged (`merged_full_ranking_hits`)."""
  metrics, ks = check_metrics(metrics, ks)
  return _full_ranking_eval(score_fn, ks, metrics, mesh)


@functools.lru_cache(maxsize=32)
def _full_ranking_eval(score_fn: ScoreFn, ks: tuple[int, ...], metrics: tuple[str, ...], mesh) -> Callable:
  if mesh is None:
    hits_fn = functools.partial(full_ranking_hits, k=max(ks))
  elif mesh.shape.get("model", 1) > 1:
    hits_fn = functools.partial(merged_full_ranking_hits, k=max(ks), mesh=mesh)
  else:
    hits_fn = functools.partial(sharded_full_ranking_hits, k=max(ks), mesh=mesh)

  @jax.jit
  def evaluate_chunk(params, inputs, exclude, positives, weight):
    hits = hits_fn(score_fn(params, inputs), exclude, positives)
    return metric_rows(hits, (positives > 0).sum(-1), ks, metrics, weight)
  return evaluate_chunk


def make_sampled_eval(score_fn_items: ItemScoreFn, ks: Sequence[int] = (10,),
                      metrics: Sequence[str] = DEFAULT_METRICS) -> Callable:
  """Jitted chunk evaluator (params, inputs, candidates [U, 1+n], weight [U]) -> `metric_rows`;
  candidate 0 is the target, the only relevant item. Cached like make_full_ranking_eval."""
  metrics, ks = check_metrics(metrics, ks)
  return _sampled_eval(score_fn_items, ks, metrics)


@functools.lru_cache(maxsize=32)
def _sampled_eval(score_fn_items: ItemScoreFn, ks: tuple[int, ...], metrics: tuple[str, ...]) -> Callable:
  @jax.jit
  def evaluate_chunk(params, inputs, candidates, weight):
    rank = sampled_rank(score_fn_items(params, inputs, candidates))
    hits = (rank[:, None] == jnp.arange(max(ks))).astype(jnp.float32)  # [U, K]
    return metric_rows(hits, jnp.ones_like(weight), ks, metrics, weight)
  return evaluate_chunk


# ----------------------------------------------------------------------------- host helpers

def chunk_users(num_items: int, budget_bytes: int = DEFAULT_BUDGET, extra_bytes_per_user: int = 0,
                bytes_per_pair: int = 0) -> int:
  """Users per chunk so that a chunk's [chunk, N] temporaries fit in `budget_bytes`.

  Counted per user: float32 scores, the masked copy, top-k workspace (~4 x 4N bytes), the bool
  mask (N), `bytes_per_pair` per item for what the scorer itself holds per (user, item) pair (a
  model that scores pairs, e.g. an MLP's activations: its `score_bytes_per_pair`; 0 for a matmul
  scorer) and `extra_bytes_per_user` (targets, exclusions).
  """
  per_user = (17 + bytes_per_pair) * num_items + extra_bytes_per_user
  return max(1, int(budget_bytes // per_user))


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """Zero-pad axis 0 of x up to `rows`."""
  return x if len(x) == rows else np.pad(x, [(0, rows - len(x))] + [(0, 0)] * (x.ndim - 1))


def _exclude_rows(exclude: Exclude, start: int, stop: int, width: int) -> np.ndarray:
  """Rows [start, stop) of the exclusions as a 0-padded [stop - start, width] array."""
  if isinstance(exclude, tuple):
    items, offsets = exclude
    return csr_to_padded(items, offsets, np.arange(start, stop), width)
  return np.asarray(exclude[start:stop], np.int32)


def _exclude_width(exclude: Exclude) -> int:
  if isinstance(exclude, tuple):
    return max(1, int(np.diff(exclude[1]).max(initial=0)))
  return exclude.shape[1]


def _select_exclude(exclude: Exclude, keep: np.ndarray) -> Exclude:
  """Rows where keep [U] is True, padded or CSR."""
  if not isinstance(exclude, tuple):
    return exclude[keep]
  items, offsets = exclude
  lengths = np.diff(offsets)
  new_items = items[offsets[0]:offsets[-1]][np.repeat(keep, lengths)]
  return new_items, np.concatenate([[0], np.cumsum(lengths[keep])])


def _sharded(step: Callable, chunk: int, params, sharding) -> tuple[int, Callable, Any]:
  """Chunk size rounded up to the device count, `step` with its per-user arguments sharded, and `params`
  placed on the mesh once (not at every chunk)."""
  devices = len(sharding.device_set)
  chunk = -(-chunk // devices) * devices
  return chunk, lambda params, *rows: step(params, *put_global(rows, sharding)), on_mesh(params, sharding.mesh)


def _collectives_on_host_devices(params, mesh=None) -> bool:
  """Whether a chunk evaluator may run collectives between XLA:CPU host devices: the merged top-k (a `model`
  axis) or parameters split over several devices (row-sharded tables). Chunks sent back to back deadlock
  such collectives when the devices outnumber the threads free to run them (a 1 x 2 mesh on one core, a 2 x 2
  mesh on two at k=600: XLA aborts the process after its 40 s rendezvous timeout), so these are sent one at
  a time. Accelerators, and host devices that only rank their own users, keep chunks in flight."""
  arrays = [x for x in jax.tree.leaves(params) if isinstance(x, jax.Array)]
  split = (mesh is not None and mesh.shape.get("model", 1) > 1) or any(not x.is_fully_replicated for x in arrays)
  devices = {d for x in arrays for d in x.sharding.device_set} | (set(mesh.devices.flat) if mesh is not None else set())
  return split and all(d.platform == "cpu" for d in devices)


def _run_chunks(step: Callable, num_rows: int, chunk: int, make_args: Callable,
                one_at_a_time: bool = False) -> tuple[dict, float]:
  """Sums of the per-user rows `step(*make_args(start, stop), weight)` returns for each chunk, fetched
  once at the end and added exactly (`math.fsum`), so they do not depend on the chunking or the devices.
  `one_at_a_time`: each chunk finishes before the next is sent (`_collectives_on_host_devices`)."""
  outs = []
  for start in range(0, num_rows, chunk):
    stop = min(start + chunk, num_rows)
    weight = _pad_rows(np.ones(stop - start, np.float32), chunk)
    outs.append(step(*make_args(start, stop), weight))
    if one_at_a_time:
      jax.block_until_ready(outs[-1])
  outs = fetch(outs)
  exact_sum = lambda parts: math.fsum(np.concatenate([np.ravel(p) for p in parts]).tolist())  # noqa: E731
  sums = {key: exact_sum([rows[key] for rows, _ in outs]) for key in outs[0][0]}
  return sums, exact_sum([w for _, w in outs])


def _means(sums: dict, count: float, ks: Sequence[int], metrics: Sequence[str], prefix: str = "") -> dict[str, float]:
  """{prefix + "name@k": sum / count} in (k, name) order."""
  if count == 0:
    raise ValueError("no user to evaluate (every user has 0 held-out items)")
  return {f"{prefix}{name}@{k}": sums[f"{name}@{k}"] / count for k in ks for name in metrics}


def _chunk_inputs(inputs: Mapping[str, np.ndarray], start: int, stop: int, chunk: int) -> dict:
  return {name: _pad_rows(np.asarray(x[start:stop]), chunk) for name, x in inputs.items()}


# ----------------------------------------------------------------------------- full ranking

def evaluate_full(score_fn: ScoreFn, params, inputs: Mapping[str, np.ndarray], positives: np.ndarray,
                  exclude: Exclude, ks: Sequence[int] = (10,), metrics: Sequence[str] = DEFAULT_METRICS,
                  budget_bytes: int = DEFAULT_BUDGET, num_items: int | None = None,
                  chunk_size: int | None = None, sharding=None, bytes_per_pair: int = 0) -> dict[str, float]:
  """Full-ranking metrics averaged over users with at least one positive.

  Args:
    score_fn: (params, inputs chunk) -> [chunk, N] scores; it is called with padded rows
      (all-zero inputs) that get weight 0.
    params: model parameters (any pytree).
    inputs: name -> [U, ...] arrays, e.g. {"user": [U], "seq": [U, L]}.
    positives: [U, P] distinct held-out item ids, 0-padded; users with none are dropped.
    exclude: items to mask per user, [U, H] 0-padded or CSR (items, offsets [U+1]).
    ks, metrics: cut-offs and metric names (see recjax.eval.metrics).
    budget_bytes: device memory for one chunk's [chunk, N] temporaries.
    num_items: N, for the chunk size; found by scoring one row when None.
    chunk_size: users per chunk, overriding the budget.
    sharding: optional batch sharding (`recjax.train.mesh.batch_sharding`): each chunk's users are
      split over its devices (the chunk is rounded up to a multiple of their count); when its mesh has
      a `model` axis, the items are ranked in slices over it and the slices' top-k merged.
    bytes_per_pair: device bytes the scorer holds per (user, item) pair beyond the scores, for the
      chunk size (see `chunk_users`; a `score_items` model's `score_bytes_per_pair`).
  Returns:
    {"ndcg@10": mean, ...}.
  """
  metrics, ks = check_metrics(metrics, ks)
  positives = np.asarray(positives, np.int32)
  exclude = exclude if isinstance(exclude, tuple) else np.asarray(exclude, np.int32)
  keep = (positives > 0).any(1)
  if not keep.all():
    inputs = {name: np.asarray(x)[keep] for name, x in inputs.items()}
    positives, exclude = positives[keep], _select_exclude(exclude, keep)
  num_rows, width = len(positives), _exclude_width(exclude)
  if num_rows == 0:
    return _means({}, 0.0, ks, metrics)
  if chunk_size is None:
    if num_items is None:
      num_items = jax.eval_shape(score_fn, params, _chunk_inputs(inputs, 0, 1, 1)).shape[-1]
    ranked = _ranked(max(ks), num_items)
    extra = 4 * (width + positives.shape[1]) + ranked * (positives.shape[1] + ranked + 8) + 4 * max(ks)
    chunk_size = chunk_users(num_items, budget_bytes, extra, bytes_per_pair)
  chunk = min(chunk_size, num_rows)
  step = make_full_ranking_eval(score_fn, ks, metrics, None if sharding is None else sharding.mesh)
  if sharding is not None:
    chunk, step, params = _sharded(step, chunk, params, sharding)
  make_args = lambda start, stop: (
      params, _chunk_inputs(inputs, start, stop, chunk),
      _pad_rows(_exclude_rows(exclude, start, stop, width), chunk), _pad_rows(positives[start:stop], chunk))
  in_order = _collectives_on_host_devices(params, None if sharding is None else sharding.mesh)
  return _means(*_run_chunks(step, num_rows, chunk, make_args, in_order), ks, metrics)


# ----------------------------------------------------------------------------- sampled ranking

def _exclusion_keys(exclude: Exclude, num_rows: int, num_items: int) -> np.ndarray:
  """Sorted unique int64 keys row * num_items + item of every (row, excluded item) pair."""
  if isinstance(exclude, tuple):
    items, offsets = exclude
    rows = np.repeat(np.arange(num_rows), np.diff(offsets))
    items = items[offsets[0]:offsets[-1]]
  else:
    rows = np.repeat(np.arange(num_rows), exclude.shape[1])
    items = np.asarray(exclude).reshape(-1)
  return np.unique(rows.astype(np.int64) * num_items + items)


def sample_negatives(targets: np.ndarray, exclude: Exclude, num_items: int, num_negatives: int,
                     probs: np.ndarray | None = None, seed: int = 0, max_rounds: int = 64) -> np.ndarray:
  """Distinct negatives per user, never item 0, the target or an excluded item.

  Vectorised rejection: draw every open slot, reject those hitting the exclusion set or
  repeating an earlier slot of the row, redraw only the rejected slots. Rows still open after
  `max_rounds` (users who interacted with almost every item) are finished exactly, one by one.

  Args:
    targets: [U] target item per user.
    exclude: the user's interacted items, [U, H] 0-padded or CSR (items, offsets [U+1]).
    num_items: N (item table size, padding included).
    num_negatives: n.
    probs: [N] sampling weights (e.g. item counts); None = uniform over 1..N-1.
  Returns:
    [U, n] int32.
  """
  rng = np.random.default_rng(seed)
  u = len(targets)
  weights = np.ones(num_items) if probs is None else np.asarray(probs, np.float64).copy()
  weights[0] = 0.0
  cdf = np.cumsum(weights / weights.sum())
  keys = np.union1d(_exclusion_keys(exclude, u, num_items), np.arange(u, dtype=np.int64) * num_items + targets)
  keys = keys[weights[keys % num_items] > 0]                          # drop padding / never drawn
  allowed = (weights > 0).sum() - np.bincount(keys // num_items, minlength=u)
  if (allowed < num_negatives).any():
    row = int(np.argmax(allowed < num_negatives))
    raise ValueError(f"row {row} has only {allowed[row]} items to sample {num_negatives} negatives from")
  draw = lambda size: np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), num_items - 1)
  rows = np.arange(u, dtype=np.int64)[:, None]
  neg = draw((u, num_negatives))
  for round_ in range(max_rounds + 1):
    todo = np.isin(rows * num_items + neg, keys) | _repeats(neg)
    if not todo.any():
      return neg.astype(np.int32)
    if round_ < max_rounds:
      neg[todo] = draw(int(todo.sum()))
  for row in np.flatnonzero(todo.any(1)):                              # exact fallback
    taken = keys[(keys // num_items) == row] % num_items
    kept = neg[row][~todo[row]]
    pool = np.setdiff1d(np.flatnonzero(weights > 0), np.concatenate([taken, kept]))
    p = weights[pool] / weights[pool].sum()
    neg[row][todo[row]] = rng.choice(pool, int(todo[row].sum()), replace=False, p=p)
  return neg.astype(np.int32)


def _repeats(x: np.ndarray) -> np.ndarray:
  """[U, n] bool: True where x[u, j] equals an earlier entry of its row."""
  order = np.argsort(x, axis=1, kind="stable")
  srt = np.take_along_axis(x, order, 1)
  dup_sorted = np.concatenate([np.zeros((len(x), 1), bool), srt[:, 1:] == srt[:, :-1]], 1)
  dup = np.zeros_like(dup_sorted)
  np.put_along_axis(dup, order, dup_sorted, 1)
  return dup


def draw_negatives(targets: np.ndarray, exclude: Exclude, num_items: int, num_negatives: int = 100,
                   distribution: str = "uniform", item_counts: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
  """The sampled protocol's negatives: `sample_negatives` for the rows with a target (`targets [U]`, 0 = none),
  by `distribution` "uniform" over items 1..N-1 or "popularity" (probability ∝ `item_counts [N]`).

  Returns:
    [U, n] int32; rows without a target hold 0s.
  """
  if distribution not in ("uniform", "popularity"):
    raise ValueError(f"distribution must be 'uniform' or 'popularity', got {distribution!r}")
  if distribution == "popularity" and item_counts is None:
    raise ValueError("popularity sampling needs item_counts [N]")
  targets = np.asarray(targets, np.int64).reshape(-1)
  exclude = exclude if isinstance(exclude, tuple) else np.asarray(exclude, np.int32)
  keep = targets > 0
  out = np.zeros((len(targets), num_negatives), np.int32)
  if keep.any():
    probs = item_counts if distribution == "popularity" else None
    out[keep] = sample_negatives(targets[keep], exclude if keep.all() else _select_exclude(exclude, keep),
                                 num_items, num_negatives, probs, seed)
  return out


def evaluate_sampled(score_fn_items: ItemScoreFn, params, inputs: Mapping[str, np.ndarray],
                     positives: np.ndarray, exclude: Exclude, num_negatives: int = 100,
                     distribution: str = "uniform", item_counts: np.ndarray | None = None,
                     num_items: int | None = None, seed: int = 0, ks: Sequence[int] = (10,),
                     metrics: Sequence[str] = DEFAULT_METRICS, budget_bytes: int = DEFAULT_BUDGET,
                     chunk_size: int | None = None, bytes_per_pair: int | None = None,
                     negatives: np.ndarray | None = None) -> dict[str, float]:
  """Sampled-ranking metrics: the target ranked among itself and `num_negatives` sampled items.

  Only for comparison with papers that used it; every key is prefixed "sampled_"
  ("sampled_ndcg@10"). Ties count against the target (`sampled_rank`).

  Args:
    score_fn_items: (params, inputs, items [U, C]) -> [U, C]; `gather_scorer(score_fn)` builds
      one from a full scorer.
    inputs: name -> [U, ...] arrays.
    positives: [U] one target item per user (0 = no target, row dropped).
    exclude: the user's interacted items, never sampled: [U, H] 0-padded or CSR.
    distribution: "uniform" over items 1..N-1 or "popularity" (probability ∝ item_counts [N]).
    num_items: N; defaults to len(item_counts).
    seed: negatives depend only on the seed.
    chunk_size: users per chunk (default: from budget_bytes and N, as a gathered full scorer
      materialises [chunk, N] scores).
    bytes_per_pair: None sizes chunks as for a gathered full scorer's [chunk, N] scores (safe for any
      scorer); for a scorer of the candidates only, its bytes per (user, item) pair (a `score_items`
      model's `score_bytes_per_pair`): chunks are then sized to the 1+n candidates, not to N.
    negatives: [U, n] the rows' negatives as `draw_negatives` gives them (a run that evaluates the same
      users again draws them once); drawn here from the arguments above when None.
  Returns:
    {"sampled_ndcg@10": mean, ...}.
  """
  metrics, ks = check_metrics(metrics, ks)
  num_items = num_items if num_items is not None else len(item_counts) if item_counts is not None else None
  if num_items is None:
    raise ValueError("evaluate_sampled needs num_items (or item_counts)")
  targets = np.asarray(positives, np.int64).reshape(-1)
  if negatives is None:
    negatives = draw_negatives(targets, exclude, num_items, num_negatives, distribution, item_counts, seed)
  keep = targets > 0
  if not keep.all():
    inputs = {name: np.asarray(x)[keep] for name, x in inputs.items()}
    targets, negatives = targets[keep], negatives[keep]
  candidates = np.concatenate([targets[:, None].astype(np.int32), negatives], 1)   # [U, 1+n]
  num_rows = len(candidates)
  if num_rows == 0:
    return _means({}, 0.0, ks, metrics)
  if not chunk_size:
    chunk_size = (chunk_users(num_items, budget_bytes, 12 * candidates.shape[1]) if bytes_per_pair is None
                  else chunk_users(candidates.shape[1], budget_bytes, bytes_per_pair=bytes_per_pair))
  chunk = min(chunk_size, num_rows)
  step = make_sampled_eval(score_fn_items, ks, metrics)
  make_args = lambda start, stop: (
      params, _chunk_inputs(inputs, start, stop, chunk), _pad_rows(candidates[start:stop], chunk))
  in_order = _collectives_on_host_devices(params)
  return _means(*_run_chunks(step, num_rows, chunk, make_args, in_order), ks, metrics, prefix=SAMPLED_PREFIX)
