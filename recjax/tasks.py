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

LossFn = Callable[[dict, dict, jax.Array], tuple[jax.Array, dict]]
ScoreFn = Callable[[dict, dict], jax.Array]

PAIRWISE_LOSSES = ("bpr", "bce")
NEXT_ITEM_LOSSES = ("ce", "bce", "bpr")


def _user_and_items(module: nn.Module, batch: dict, train: bool):
  """One `apply` computing both towers (models that share work between them do it once)."""
  return module.user_repr(batch, train=train), module.item_repr()


def _sequence_and_items(module: nn.Module, seq: jnp.ndarray, train: bool):
  return module.sequence_repr(seq, train=train), module.item_repr()


def _sampled_scores(h: jnp.ndarray, items: jnp.ndarray, pos: jnp.ndarray, neg: jnp.ndarray):
  """Scores of gathered rows only: h `[..., d]`, pos `[...]`, neg `[..., n]` -> `[...]`, `[..., n]`."""
  pos_emb = jnp.take(items, pos, axis=0)  # [..., d]
  neg_emb = jnp.take(items, neg, axis=0)  # [..., n, d]
  pos_scores = jnp.sum(h * pos_emb, axis=-1)
  neg_scores = jnp.einsum("...d,...nd->...n", h, neg_emb)
  return pos_scores, neg_scores, pos_emb, neg_emb


def _sampled_loss(name: str, pos_scores, neg_scores, weight):
  return losses.bpr(pos_scores, neg_scores, weight) if name == "bpr" else losses.bce(pos_scores, neg_scores, weight)


def pairwise_loss_fn(model: nn.Module, *, loss: str = "bpr", l2_weight: float = 0.0) -> LossFn:
  """(user, positive, negatives) loss for general models on pair batches.

  scores: s_pos = <u, q_pos>, s_neg = <u, q_neg_j>, with rows gathered from `item_repr()` (no
  matmul against every item). With `l2_weight = lambda`, adds
  lambda * weighted_mean_b( (1/2)(||u_b||^2 + ||q_pos_b||^2 + sum_j ||q_neg_bj||^2) )
  on the rows used by the batch (the usual BPR regulariser, as in LightGCN).

  Batch: `user [B]`, `pos [B]`, `neg [B, n]`, `weight [B]`.
  """
  if loss not in PAIRWISE_LOSSES:
    raise ConfigError(f"unknown pairwise loss {loss!r}; expected one of {PAIRWISE_LOSSES}")

  def loss_fn(params, batch, rng):
    user, items = model.apply(params, batch, True, method=_user_and_items, rngs={"dropout": rng})  # [B, d], [N, d]
    pos_scores, neg_scores, pos_emb, neg_emb = _sampled_scores(user, items, batch["pos"], batch["neg"])
    rec_loss = _sampled_loss(loss, pos_scores, neg_scores, batch["weight"])
    if not l2_weight:
      return rec_loss, {}
    per_row = 0.5 * (
      jnp.sum(jnp.square(user), -1) + jnp.sum(jnp.square(pos_emb), -1) + jnp.sum(jnp.square(neg_emb), (-2, -1))
    )  # [B]
    reg = losses.weighted_mean(per_row, batch["weight"])
    return rec_loss + l2_weight * reg, {"rec_loss": rec_loss, "l2": reg}

  return loss_fn


def next_item_loss_fn(model: nn.Module, *, loss: str = "ce") -> LossFn:
  """Next-item loss for sequential models; dropout on (`train=True`, rng stream "dropout").

  Whole-sequence batches (`pos [B, L]`, `neg [B, L, n]`, `weight [B, L]`, the SASRec paper's
  scheme) use `sequence_repr(seq) [B, L, d]` and a loss at every position; prefix batches
  (`pos [B]`, `neg [B, n]`, `weight [B]`, RecBole's scheme) use `user_repr [B, d]`, the state
  after the last item.

  - "ce": full softmax over all items, logits = h E^T (`[..., N]`), padding excluded;
  - "bce" / "bpr": sampled negatives, only the pos/neg rows of E are gathered.
  """
  if loss not in NEXT_ITEM_LOSSES:
    raise ConfigError(f"unknown next-item loss {loss!r}; expected one of {NEXT_ITEM_LOSSES}")

  def loss_fn(params, batch, rng):
    rngs = {"dropout": rng}
    if batch["pos"].ndim == 2:  # whole sequence
      h, items = model.apply(params, batch["seq"], True, method=_sequence_and_items, rngs=rngs)  # [B, L, d]
    else:  # prefix
      h, items = model.apply(params, batch, True, method=_user_and_items, rngs=rngs)  # [B, d]
    if loss == "ce":
      logits = jnp.einsum("...d,nd->...n", h, items)  # [B, (L,) N]
      return losses.softmax_ce(logits, batch["pos"], batch["weight"]), {}
    pos_scores, neg_scores, _, _ = _sampled_scores(h, items, batch["pos"], batch["neg"])
    return _sampled_loss(loss, pos_scores, neg_scores, batch["weight"]), {}

  return loss_fn


def score_fn(model: nn.Module) -> ScoreFn:
  """`f(params, inputs) -> [U, N]` = user_repr(inputs) @ item_repr().T, dropout off.

  `inputs`: `user [U]` and/or `seq [U, L]` (each model reads what it needs).
  """

  def scores(params, inputs):
    user, items = model.apply(params, inputs, False, method=_user_and_items)  # [U, d], [N, d]
    return user @ items.T

  return scores


LOSSES: dict[str, dict[str, Callable[..., LossFn]]] = {
  "general": {name: functools.partial(pairwise_loss_fn, loss=name) for name in PAIRWISE_LOSSES},
  "sequential": {name: functools.partial(next_item_loss_fn, loss=name) for name in NEXT_ITEM_LOSSES},
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
