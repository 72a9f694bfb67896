"""Tasks bind a model and a loss into `loss_fn(params, batch, rng) -> (loss, metrics)`.

`params` is the model's variables (`{"params": ...}`), `batch` a dict of arrays (see
`docs/architecture.md`, Batches), `rng` the dropout key of this step. Metrics are scalars.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from recjax import losses
from recjax.errors import ConfigError
from recjax.train.step import MODEL_STATE

LossFn = Callable[[dict, dict, jax.Array], tuple[jax.Array, dict]]
ScoreFn = Callable[[dict, dict], jax.Array]

PAIRWISE_LOSSES = ("bpr", "bce")
NEXT_ITEM_LOSSES = ("ce", "bce", "bpr", "sampled_softmax", "gbce")
POINTWISE_LOSSES = ("bce", "mse")


def _user_and_items(module: nn.Module, batch: dict, train: bool):
  """One `apply` computing both towers (models that share work between them do it once; models with
  `ranking_tables`, e.g. graph propagation, compute every user and item at once, then gather)."""
  if hasattr(module, "ranking_tables"):
    users, items = module.ranking_tables(train=train)
    return jnp.take(users, batch["user"], axis=0), items
  return module.user_repr(batch, train=train), module.item_repr()


def _towers_and_ego(module: nn.Module, batch: dict, train: bool):
  """Both towers, and the tables `(users [U, d], items [N, d])` the L2 term applies to when the model
  names them (`ego_tables`: LightGCN's E^(0), not the propagated rows), else None."""
  ego = module.ego_tables() if hasattr(module, "ego_tables") else None
  return (*_user_and_items(module, batch, train), ego)


def _ranking_tables(module: nn.Module, train: bool):
  return module.ranking_tables(train=train)


def _sequence_and_items(module: nn.Module, seq: jnp.ndarray, train: bool):
  return module.sequence_repr(seq, train=train), module.item_repr()


def _score_items(module: nn.Module, batch: dict, items: jnp.ndarray, train: bool):
  return module.score_items(batch, items, train=train)


def is_factorized(model: nn.Module) -> bool:
  """Whether scores are `user_repr @ item_repr().T` (the default); models that cannot factorise set
  `factorized = False`, score (user, item) pairs with `score_items(batch, items [B, C]) -> [B, C]` and
  say what a pair costs in evaluation with `score_bytes_per_pair` (read from the instance: a class
  constant or a property of the sizes)."""
  return getattr(model, "factorized", True)


def _sampled_scores(h: jnp.ndarray, items: jnp.ndarray, pos: jnp.ndarray, neg: jnp.ndarray):
  """Scores of gathered rows only: h `[..., d]`, pos `[...]`, neg `[..., n]` -> scores `[...]`, `[..., n]`
  and the gathered rows `[..., d]`, `[..., n, d]`."""
  pos_emb = jnp.take(items, pos, axis=0)  # [..., d]
  neg_emb = jnp.take(items, neg, axis=0)  # [..., n, d]
  pos_scores = jnp.sum(h * pos_emb, axis=-1)
  neg_scores = jnp.einsum("...d,...nd->...n", h, neg_emb)
  return pos_scores, neg_scores, pos_emb, neg_emb


def _at_least_float32(x: jnp.ndarray) -> jnp.ndarray:
  """Scores of a bfloat16 step as float32, so that the loss (logsumexp, weighted means) runs in float32;
  float64 (gradient checks) stays float64."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _sampled_loss(name: str, pos_scores, neg_scores, weight, pos=None, neg=None, log_q=None, beta=None):
  """A loss over (positive, sampled negatives) scores `[...]`, `[..., n]`; ids `pos [...]`, `neg [..., n]`.
  Computed in at least float32 whatever the scores' dtype (a bfloat16 step's logits)."""
  pos_scores, neg_scores = _at_least_float32(pos_scores), _at_least_float32(neg_scores)
  if name == "bpr":
    return losses.bpr(pos_scores, neg_scores, weight)
  if name == "bce":
    return losses.bce(pos_scores, neg_scores, weight)
  if name == "gbce":
    return losses.gbce(pos_scores, neg_scores, weight, beta)
  if name == "sampled_softmax":
    return losses.sampled_softmax(pos_scores, neg_scores, weight, jnp.take(log_q, pos), jnp.take(log_q, neg),
                                  neg_valid=neg != pos[..., None])  # an accidental hit is not a negative
  raise ConfigError(f"unknown sampled loss {name!r}")


def _check_item_loss(loss: str, log_q, beta) -> None:
  """A known next-item loss with the option it needs."""
  if loss not in NEXT_ITEM_LOSSES:
    raise ConfigError(f"unknown next-item loss {loss!r}; expected one of {NEXT_ITEM_LOSSES}")
  if loss == "sampled_softmax" and log_q is None:
    raise ConfigError("loss 'sampled_softmax' needs log_q, the log probability [N] of drawing each negative")
  if loss == "gbce" and beta is None:
    raise ConfigError("loss 'gbce' needs beta (see recjax.losses.gbce_beta)")


def _item_loss(loss: str, h, items, target, neg, weight, log_q, beta, item_mask=None) -> jnp.ndarray:
  """States `h [..., d]` scored against their `target [...]`: full softmax over `items [N, d]`
  ("ce"; items where `item_mask [N]` is False are left out of it) or the target against its sampled
  negatives `neg [..., n]` (the other losses)."""
  if loss == "ce":
    return losses.softmax_ce_rows(h, items, target, weight, item_mask)  # no [..., N] scores kept
  pos_scores, neg_scores, _, _ = _sampled_scores(h, items, target, neg)
  return _sampled_loss(loss, pos_scores, neg_scores, weight, target, neg, log_q, beta)


def pairwise_loss_fn(model: nn.Module, *, loss: str = "bpr", l2_weight: float = 0.0) -> LossFn:
  """(user, positive, negatives) loss for general models on pair batches.

  scores: s_pos = <u, q_pos>, s_neg = <u, q_neg_j>, with rows gathered from `item_repr()` (no
  matmul against every item). With `l2_weight = lambda`, adds
  lambda * weighted_mean_b( (1/2)(||u_b||^2 + ||q_pos_b||^2 + sum_j ||q_neg_bj||^2) )
  on the rows used by the batch (the usual BPR regulariser). A model with `ego_tables()` (LightGCN, GMF)
  has the term on those tables' rows of the batch's users, positives and negatives instead (the
  LightGCN paper's regulariser, on E^(0)).

  Models that cannot factorise (`is_factorized` False) score [pos ; neg] `[B, 1+n]` with one
  `score_items` call instead; `l2_weight` is then an error (it regularises representations such
  models do not have: use `weight_decay`).

  Batch: `user [B]`, `pos [B]`, `neg [B, n]`, `weight [B]`.
  """
  if loss not in PAIRWISE_LOSSES:
    raise ConfigError(f"unknown pairwise loss {loss!r}; expected one of {PAIRWISE_LOSSES}")
  if not is_factorized(model):
    if l2_weight:
      raise ConfigError(f"l2_weight regularises user/item representations; {type(model).__name__} scores pairs "
                        "with score_items and has none (use weight_decay)")
    return _pair_scoring_loss_fn(model, loss)

  def loss_fn(params, batch, rng):
    user, items, ego = model.apply(params, batch, True, method=_towers_and_ego, rngs={"dropout": rng})  # [B, d], [N, d]
    pos_scores, neg_scores, pos_emb, neg_emb = _sampled_scores(user, items, batch["pos"], batch["neg"])
    rec_loss = _sampled_loss(loss, pos_scores, neg_scores, batch["weight"])
    if not l2_weight:
      return rec_loss, {}
    if ego is not None:   # the regularised rows are the ego embeddings
      user, pos_emb, neg_emb = (jnp.take(ego[0], batch["user"], axis=0), jnp.take(ego[1], batch["pos"], axis=0),
                                jnp.take(ego[1], batch["neg"], axis=0))
    per_row = 0.5 * (
      jnp.sum(jnp.square(user), -1) + jnp.sum(jnp.square(pos_emb), -1) + jnp.sum(jnp.square(neg_emb), (-2, -1))
    )  # [B]
    reg = losses.weighted_mean(per_row, batch["weight"])
    return rec_loss + l2_weight * reg, {"rec_loss": rec_loss, "l2": reg}

  return loss_fn


def _pair_scoring_loss_fn(model: nn.Module, loss: str) -> LossFn:
  """Pairwise loss of a `score_items` model: one apply scores each row's positive and negatives; plus
  `model.penalty()` when the model defines one (as in `pointwise_loss_fn`)."""

  def loss_fn(params, batch, rng):
    items = jnp.concatenate([batch["pos"][:, None], batch["neg"]], axis=1)  # [B, 1+n]
    scores, penalty = model.apply(params, batch, items, True, method=_score_items_and_penalty,
                                  rngs={"dropout": rng})  # [B, 1+n], []
    rec_loss = _sampled_loss(loss, scores[:, 0], scores[:, 1:], batch["weight"])
    return rec_loss + penalty, {"rec_loss": rec_loss, "penalty": penalty}

  return loss_fn


def next_item_loss_fn(model: nn.Module, *, loss: str = "ce", log_q: jnp.ndarray | None = None,
                      beta: float | None = None, item_mask: jnp.ndarray | None = None) -> LossFn:
  """Next-item loss for sequential models; dropout on (`train=True`, rng stream "dropout").

  Whole-sequence batches (`pos [B, L]`, `neg [B, L, n]`, `weight [B, L]`, the SASRec paper's
  scheme) use `sequence_repr(seq) [B, L, d]` and a loss at every position; prefix batches
  (`pos [B]`, `neg [B, n]`, `weight [B]`, RecBole's scheme) use `user_repr [B, d]`, the state
  after the last item.

  - "ce": full softmax over all items, logits = h E^T (`[..., N]`), padding excluded (and the items
    where `item_mask [N]` bool is False, e.g. those held out for cold start);
  - "bce" / "bpr" / "gbce" (with `beta`) / "sampled_softmax" (with `log_q [N]`, the log probability
    of drawing each item as a negative): sampled negatives, only the pos/neg rows of E gathered.
  """
  _check_item_loss(loss, log_q, beta)

  def loss_fn(params, batch, rng):
    rngs = {"dropout": rng}
    if batch["pos"].ndim == 2:  # whole sequence
      h, items = model.apply(params, batch["seq"], True, method=_sequence_and_items, rngs=rngs)  # [B, L, d]
    else:  # prefix
      h, items = model.apply(params, batch, True, method=_user_and_items, rngs=rngs)  # [B, d]
    return _item_loss(loss, h, items, batch["pos"], batch["neg"], batch["weight"], log_q, beta, item_mask), {}

  return loss_fn


def cloze_items(batch: dict) -> jnp.ndarray:
  """The items a masked-item model sees: `[B, L]`, the window's L newest items (padding 0).

  Whole-sequence batches: `seq[:, 1:]` then the last target (`= window[1:]`, whose negatives are
  `batch["neg"]` position by position); prefix batches: the prefix's newest L-1 items, then its target.
  """
  last = batch["pos"][:, -1:] if batch["pos"].ndim == 2 else batch["pos"][:, None]
  return jnp.concatenate([batch["seq"][:, 1:], last], axis=1)


def cloze_mask(rng: jax.Array, items: jnp.ndarray, mask_ratio: float, last_ratio: float) -> jnp.ndarray:
  """bool `[B, L]`: which items to hide. Each real item with probability `mask_ratio`; but a row
  drawn with probability `last_ratio` hides only its newest item (position L-1)."""
  random_rng, last_rng = jax.random.split(rng)
  real = items > 0
  random = jax.random.bernoulli(random_rng, mask_ratio, items.shape) & real
  newest = (jnp.arange(items.shape[1]) == items.shape[1] - 1)[None, :] & real
  only_last = jax.random.bernoulli(last_rng, last_ratio, items.shape[:1])[:, None]
  return jnp.where(only_last, newest, random)


def max_masked(mask_ratio: float, length: int) -> int:
  """How many masked positions per row are scored: the mean of Binomial(L, p) plus 3 standard
  deviations (so almost never fewer than were masked), at least 1, at most L."""
  mean, std = mask_ratio * length, (length * mask_ratio * (1 - mask_ratio)) ** 0.5
  return int(min(length, max(1, -(-(mean + 3 * std) // 1))))


def cloze_inputs(rng: jax.Array, batch: dict, mask_id: int, mask_ratio: float, last_ratio: float,
                 max_scored: int = 0):
  """The Cloze task of one batch: what the model sees and what it must predict.

  `max_scored`: hidden positions scored per row, M; 0 = `max_masked(mask_ratio, L)`, enough for almost
  every row. RecBole 1.2.1 scores int(mask_ratio * L) (its `mask_item_length`).

  Returns:
    inputs `[B, L]`: `cloze_items(batch)` with the hidden items replaced by `mask_id`;
    at `[B, M]`: the positions scored (the newest M hidden ones; others padded);
    target `[B, M]`: the item hidden at each; weight `[B, M]` float: 1 where `at` is a hidden item.
  """
  items = cloze_items(batch)  # [B, L]
  length = items.shape[1]
  hidden = cloze_mask(rng, items, mask_ratio, last_ratio)  # [B, L]
  scored = min(length, max_scored) if max_scored > 0 else max_masked(mask_ratio, length)
  _, at = jax.lax.top_k(jnp.where(hidden, jnp.arange(1, length + 1), 0), scored)
  weight = jnp.take_along_axis(hidden, at, axis=1).astype(jnp.float32)
  return jnp.where(hidden, mask_id, items), at, jnp.take_along_axis(items, at, axis=1), weight


def masked_item_loss_fn(model: nn.Module, *, loss: str = "ce", log_q: jnp.ndarray | None = None,
                        beta: float | None = None, item_mask: jnp.ndarray | None = None) -> LossFn:
  """Cloze loss for masked-item models (BERT4Rec): hide items, predict each hidden one.

  On device, with the step's rng (`cloze_inputs`): `items = cloze_items(batch) [B, L]`, `hidden =
  cloze_mask(...)` (`model.mask_ratio`, `model.last_ratio`), input = items with hidden ones replaced
  by `model.mask_id`; `sequence_repr(input) [B, L, d]`. The newest M = `model.max_scored` (by default
  `max_masked(p, L)`) hidden positions of each row are scored (extra ones stay hidden but unscored, as
  RecBole keeps its newest int(p L)), each against its own item with loss `loss` ("ce": masked-item softmax over all
  items; sampled losses use `batch["neg"] [B, L, n]`, whole-sequence batches only). Every real item
  of a window can be a target, so `batch["weight"]` is not used (padding rows have no real items).
  """
  _check_item_loss(loss, log_q, beta)

  def loss_fn(params, batch, rng):
    mask_rng, dropout_rng = jax.random.split(rng)
    inputs, at, target, weight = cloze_inputs(mask_rng, batch, model.mask_id, model.mask_ratio, model.last_ratio,
                                              model.max_scored)
    h, table = model.apply(params, inputs, True, method=_sequence_and_items, rngs={"dropout": dropout_rng})
    h = jnp.take_along_axis(h, at[..., None], axis=1)  # [B, M, d]
    neg = None
    if loss != "ce":
      if batch["neg"].ndim != 3:
        raise ConfigError(f"masked-item loss {loss!r} needs whole-sequence batches (training='sequence')")
      neg = jnp.take_along_axis(batch["neg"], at[..., None], axis=1)  # [B, M, n]
    return _item_loss(loss, h, table, target, neg, weight, log_q, beta, item_mask), {}

  return loss_fn


def score_fn(model: nn.Module) -> ScoreFn:
  """`f(params, inputs) -> [U, N]` = user_repr(inputs) @ item_repr().T, dropout off.

  `inputs`: `user [U]` and/or `seq [U, L]` (each model reads what it needs). A model that cannot
  factorise scores every item of the table through `score_items(inputs, items [U, N])` (size the
  user chunks with its `score_bytes_per_pair`, see `recjax.eval.ranking.chunk_users`).
  """
  if not is_factorized(model):
    def all_items(params, inputs):
      rows = jax.tree.leaves(inputs)[0].shape[0]
      items = jnp.broadcast_to(jnp.arange(model.num_items, dtype=jnp.int32), (rows, model.num_items))
      return model.apply(params, inputs, items, False, method=_score_items)

    return all_items

  def scores(params, inputs):
    user, items = model.apply(params, inputs, False, method=_user_and_items)  # [U, d], [N, d]
    return user @ items.T

  return scores


def has_ranking_tables(model: nn.Module) -> bool:
  """Whether the model computes every user's and item's representation at once (graph models):
  `ranking_tables(train=False) -> (users [U, d], items [N, d])`."""
  return hasattr(model, "ranking_tables")


def ranking_tables_fn(model: nn.Module) -> Callable[[dict], tuple[jax.Array, jax.Array]]:
  """`f(params) -> (users [U, d], items [N, d])`, dropout off: computed once per evaluation pass, after
  which each chunk of users only gathers (`tables_score`) instead of propagating again."""

  def tables(params):
    return model.apply(params, False, method=_ranking_tables)

  return tables


def tables_score(tables: tuple[jax.Array, jax.Array], inputs: dict) -> jax.Array:
  """`[U', N]` = users[inputs["user"]] @ items.T from `tables = (users [U, d], items [N, d])`: the
  `ScoreFn` of evaluation when `ranking_tables_fn` has made the tables (they take the params' place)."""
  users, items = tables
  return jnp.take(users, inputs["user"], axis=0) @ items.T


def item_score_fn(model: nn.Module) -> Callable[[dict, dict, jax.Array], jax.Array]:
  """`f(params, inputs, items [U, C]) -> [U, C]`, dropout off: the scores of the candidates only (sampled
  ranking), `user_repr · item_repr()[items]` for a factorised model and `score_items(inputs, items)` for one
  that cannot factorise. (Models with ranking tables score from the tables instead: `tables_item_score`.)"""
  if is_factorized(model):
    def factorized(params, inputs, items):
      return _candidate_scores(*model.apply(params, inputs, False, method=_user_and_items), items)

    return factorized

  def scores(params, inputs, items):
    return model.apply(params, inputs, items, False, method=_score_items)

  return scores


def tables_item_score(tables: tuple[jax.Array, jax.Array], inputs: dict, items: jax.Array) -> jax.Array:
  """`[U', C]` scores of the candidates `items [U', C]` from `tables = (users [U, d], items [N, d])`, as
  `tables_score` for every item."""
  users, table = tables
  return _candidate_scores(jnp.take(users, inputs["user"], axis=0), table, items)


def _candidate_scores(user: jax.Array, table: jax.Array, items: jax.Array) -> jax.Array:
  """`[U, C]` = user `[U, d]` · table `[N, d]` rows `items [U, C]` (the candidates' rows only, never all N)."""
  return jnp.einsum("ud,ucd->uc", user, jnp.take(table, items, axis=0))


def objective(model: nn.Module) -> str:
  """What a sequential model is trained to predict: `model.objective`, "next_item" (the default) or
  "masked_item" (BERT4Rec's Cloze task)."""
  return getattr(model, "objective", "next_item")


def sequential_loss_fn(model: nn.Module, *, loss: str = "ce", log_q: jnp.ndarray | None = None,
                       beta: float | None = None, item_mask: jnp.ndarray | None = None) -> LossFn:
  """The model's objective (see `objective`) with `loss`."""
  builder = {"next_item": next_item_loss_fn, "masked_item": masked_item_loss_fn}[objective(model)]
  return builder(model, loss=loss, log_q=log_q, beta=beta, item_mask=item_mask)


def _logits(module: nn.Module, batch: dict, train: bool):
  """`module.logits`: `[B]` for one task (a model with task heads gives `[B, 1]`), `[B, T]` for T > 1."""
  z = module.logits(batch, train=train)
  return z[:, 0] if z.ndim == 2 and z.shape[1] == 1 else z


def _penalty(module: nn.Module) -> jnp.ndarray:
  """The model's own regulariser (DCN-v2's cross-weight norms; 0 without one)."""
  return module.penalty() if hasattr(module, "penalty") else jnp.zeros(())


def _logits_and_penalty(module: nn.Module, batch: dict, train: bool):
  return _logits(module, batch, train), _penalty(module)


def _score_items_and_penalty(module: nn.Module, batch: dict, items: jnp.ndarray, train: bool):
  return _score_items(module, batch, items, train), _penalty(module)


def pointwise_loss_fn(model: nn.Module, *, loss: str = "bce") -> LossFn:
  """Pointwise loss for kind "ctr" models on labelled rows; dropout on (rng stream "dropout").

  z = model.logits(batch) `[B]` (or `[B, T]` with T > 1 tasks, one logit per task), y =
  `batch["label"]` of the same shape, w = `batch["weight"]` `[B]`:
  - "bce": binary cross-entropy with logits, weighted_mean_b( y softplus(-z) + (1 - y) softplus(z) )
    (PyTorch's BCEWithLogitsLoss; RecBole's context-aware models apply sigmoid then BCELoss);
  - "mse": squared error for rating regression, weighted_mean_b( (z - y)^2 );
  with T tasks, each row's loss is the mean over its tasks; plus `model.penalty()` when the model
  defines one (RecBole adds DCN-v2's to its loss too).

  A model with running statistics (variables `batch_stats`, e.g. STAR's partitioned normalisation)
  updates them from the batch: they are returned as `metrics["model_state"]`, which the train step
  writes back after the optimizer update.

  Batch: `user [B]`, `item [B]` (+ whatever else the model reads, e.g. `domain [B]`), `label [B]` or
  `[B, T]` float32, `weight [B]`.
  """
  if loss not in POINTWISE_LOSSES:
    raise ConfigError(f"unknown pointwise loss {loss!r}; expected one of {POINTWISE_LOSSES}")

  def loss_fn(params, batch, rng):
    extra = {}
    if "batch_stats" in params:
      (z, penalty), updated = model.apply(params, batch, True, method=_logits_and_penalty, rngs={"dropout": rng},
                                          mutable=["batch_stats"])
      extra[MODEL_STATE] = jax.lax.stop_gradient(dict(updated))
    else:
      z, penalty = model.apply(params, batch, True, method=_logits_and_penalty, rngs={"dropout": rng})
    z = _at_least_float32(z)
    y = batch["label"].astype(z.dtype)
    if y.shape != z.shape:
      raise ConfigError(f"{type(model).__name__} gives logits of shape {z.shape} for labels of shape {y.shape} "
                        "(one logit per task)")
    if loss == "bce":
      per_entry = y * jax.nn.softplus(-z) + (1 - y) * jax.nn.softplus(z)
    else:
      per_entry = jnp.square(z - y)
    per_row = per_entry if per_entry.ndim == 1 else per_entry.mean(-1)   # [B]
    data_loss = losses.weighted_mean(per_row, batch["weight"])
    return data_loss + penalty, {"data_loss": data_loss, "penalty": penalty, **extra}

  return loss_fn


def logits_fn(model: nn.Module) -> ScoreFn:
  """`f(params, batch) -> [B]` = model.logits(batch), dropout off (kind "ctr" models)."""

  def logits(params, batch):
    return model.apply(params, batch, False, method=_logits)

  return logits


LOSSES: dict[str, dict[str, Callable[..., LossFn]]] = {
  "general": {name: functools.partial(pairwise_loss_fn, loss=name) for name in PAIRWISE_LOSSES},
  "sequential": {name: functools.partial(sequential_loss_fn, loss=name) for name in NEXT_ITEM_LOSSES},
  "ctr": {name: functools.partial(pointwise_loss_fn, loss=name) for name in POINTWISE_LOSSES},
}


def create_loss_fn(model_kind: str, name: str, *, model: nn.Module, **kwargs) -> LossFn:
  """The loss function `name` for a model of kind `model_kind` (see `recjax.models.model_kind`).

  Raises:
    ConfigError: unknown kind (popularity models are counted, not trained: see `pop_params`),
      unknown loss name for that kind, or a keyword the loss does not take.
  """
  if model_kind not in LOSSES:
    raise ConfigError(f"no trainable losses for model kind {model_kind!r}; kinds with losses: {sorted(LOSSES)}")
  if name not in LOSSES[model_kind]:
    raise ConfigError(f"unknown loss {name!r} for {model_kind} models; expected one of {sorted(LOSSES[model_kind])}")
  builder = LOSSES[model_kind][name]
  allowed = [p for p in inspect.signature(builder).parameters if p not in ("model", "loss")]
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ConfigError(f"loss {name!r} got unknown option(s) {unknown}; it takes {allowed}")
  return builder(model, **kwargs)
