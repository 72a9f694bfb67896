"""Neural collaborative filtering (He et al., "Neural Collaborative Filtering", WWW 2017).

Three scorers of a (user u, item i) pair, each ending in one linear output unit (a logit):

  GMF:     y = w^T (p_u * q_i) + b
  NCF-MLP: z_0 = [p'_u ; q'_i],  z_l = ReLU(W_l Drop(z_{l-1}) + b_l),  y = w^T z_L + b
  NeuMF:   y = w^T [p_u * q_i ; z_L] + b        (separate GMF and MLP embedding tables)

GMF factorises: y = <[p_u * w ; b], [q_i ; 1]>, so it exposes `user_repr` / `item_repr` and is
full-ranked by one matmul. NCF-MLP and NeuMF do not (`factorized = False`); they score pairs with
`score_items(batch, items [B, C]) -> [B, C]`, which the tasks and evaluators use (training; full
ranking of all N items per user chunk, chunks sized by `score_bytes_per_pair`, a property of the
sizes; sampled ranking of the candidates only). A linear layer on a concatenation is computed as
sum_p x_p W_p + b (`Linear.concat`): the user's half of the first MLP layer is multiplied once per
user, not once per (user, item) pair, and NeuMF's concatenated features are never materialised.

Pretraining (Sec. 3.4.1): `neumf_from_pretrained` builds NeuMF's parameters from trained GMF and
NCF-MLP ones with output weights [alpha w_gmf ; (1 - alpha) w_mlp] and bias alpha b_gmf + (1 - alpha)
b_mlp, so its logits are exactly alpha * GMF + (1 - alpha) * MLP at the start.

Hyperparameters: `dim` (GMF, NCF-MLP), `mf_dim` / `mlp_dim` (NeuMF's two tables), `hidden`, `dropout`,
`embedding_std`. Defaults and initialisation follow RecBole 1.2.1 (`NeuMF`, `MLPLayers`): embedding sizes 64,
hidden (128, 64), dropout 0.1 before every hidden layer (on the concatenated embeddings too), ReLU
after every hidden layer (the last included), embeddings N(0, 0.01^2), linear layers PyTorch's
default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases. RecBole trains NeuMF pointwise
with BCE on one uniform negative per positive; here that is pair batches with loss "bce".

Differences from RecBole 1.2.1: RecBole's BCE averages over the 2B rows of positives and negatives
(half of recjax's per-pair sum; Adam is insensitive to the scale); its pretraining copies the output
weights unscaled ([w_gmf ; w_mlp], bias 0.5 (b_gmf + b_mlp)) where the paper and recjax scale them
by alpha and 1 - alpha; GMF and NCF-MLP are separate models here (RecBole's NeuMF with
`mlp_train` / `mf_train` off). From the paper: an output bias (RecBole's) and no L2 regulariser;
the paper fine-tunes a pretrained NeuMF with plain SGD (`optimizer="sgd"` here), not Adam.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from recjax.errors import ConfigError
from recjax.nn.dropout import Dropout
from recjax.nn.embedding import embedding_table
from recjax.nn.init import fan_in_uniform


class Linear(nn.Module):
  """y = x W + b, W `[fan_in, features]`, initialised as PyTorch's `nn.Linear` (weights and bias
  U(-1/sqrt(fan_in), 1/sqrt(fan_in))). Params are created in `setup`, so a parent can read them."""

  fan_in: int
  features: int

  def setup(self):
    self.kernel = self.param("kernel", fan_in_uniform(self.fan_in), (self.fan_in, self.features))
    self.bias = self.param("bias", fan_in_uniform(self.fan_in), (self.features,))

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """`[..., fan_in]` -> `[..., features]`."""
    return x @ self.kernel + self.bias

  def concat(self, *parts: jnp.ndarray) -> jnp.ndarray:
    """The layer on `[part_1 ; part_2 ; ...]` as sum_p part_p W_p + b, W_p the rows of W facing part p.

    Parts broadcast against each other (`[B, 1, d_u]` with `[B, C, d_i]` -> `[B, C, features]`), so a
    part shared by a row's C items is multiplied once.
    """
    widths = [x.shape[-1] for x in parts]
    if sum(widths) != self.fan_in:
      raise ValueError(f"Linear.concat: parts of widths {widths} do not sum to fan_in {self.fan_in}")
    out, start = self.bias, 0
    for x, width in zip(parts, widths):
      out = out + x @ self.kernel[start:start + width]
      start += width
    return out


def _table(rows: int, dim: int, std: float) -> nn.Embed:
  return embedding_table(rows, dim, init="normal", std=std)


class GMFTower(nn.Module):
  """Element-wise product of user and item embeddings: `user [B]`, `items [B, C]` -> `[B, C, d]`."""

  num_users: int
  num_items: int
  dim: int
  embedding_std: float

  def setup(self):
    self.user = _table(self.num_users, self.dim, self.embedding_std)
    self.item = _table(self.num_items, self.dim, self.embedding_std)

  def __call__(self, user: jnp.ndarray, items: jnp.ndarray) -> jnp.ndarray:
    return self.user(user)[:, None, :] * self.item(items)


class MLPTower(nn.Module):
  """Tower over [p'_u ; q'_i]: `user [B]`, `items [B, C]` -> `[B, C, hidden[-1]]`.

  Each hidden layer is Dropout -> Linear -> ReLU (RecBole's `MLPLayers`). Without dropout the user's
  half of the first layer is computed once per row and broadcast over its C items; with dropout
  (training) the user embedding is repeated per item and concatenated with it, so every pair draws
  its own mask, and the first layer is one matmul (on CPU about 5% of NeuMF's step faster than two).
  """

  num_users: int
  num_items: int
  dim: int
  hidden: tuple[int, ...]
  dropout: float
  embedding_std: float

  def setup(self):
    _check_hidden(self.hidden)
    self.user = _table(self.num_users, self.dim, self.embedding_std)
    self.item = _table(self.num_items, self.dim, self.embedding_std)
    widths = (2 * self.dim, *self.hidden)
    self.layers = [Linear(fan_in, features) for fan_in, features in zip(widths[:-1], widths[1:])]
    self.drop = Dropout(self.dropout)

  def __call__(self, user: jnp.ndarray, items: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    u = self.user(user)[:, None, :]                   # [B, 1, d]
    i = self.item(items)                              # [B, C, d]
    if train and self.dropout > 0:   # one mask per pair over [u ; i], then one matmul
      ui = jnp.concatenate([jnp.broadcast_to(u, i.shape), i], axis=-1)   # [B, C, 2d]
      h = nn.relu(self.layers[0](self.drop(ui, False)))                   # [B, C, h_1]
    else:
      h = nn.relu(self.layers[0].concat(u, i))                            # [B, C, h_1]
    for layer in self.layers[1:]:
      h = nn.relu(layer(self.drop(h, not train)))     # [B, C, h_l]
    return h


def _check_hidden(hidden: tuple[int, ...]) -> None:
  if not hidden or any(not isinstance(h, int) or h < 1 for h in hidden):
    raise ConfigError(f"NCF MLP: hidden must list at least one positive layer width, got {hidden!r}")


def _mlp_bytes_per_pair(dim: int, hidden: tuple[int, ...]) -> int:
  """Evaluation bytes per (user, item) pair of an MLP tower: the gathered item embedding and each
  layer's pre- and post-activation, float32."""
  return 4 * (dim + 2 * sum(hidden))


class GMF(nn.Module):
  """Generalized matrix factorisation: y = w^T (p_u * q_i) + b (factorised, see the module doc)."""

  num_users: int
  num_items: int
  dim: int = 64
  embedding_std: float = 0.01
  kind: ClassVar[str] = "general"
  factorized: ClassVar[bool] = True

  def setup(self):
    self.gmf = GMFTower(self.num_users, self.num_items, self.dim, self.embedding_std)
    self.output = Linear(self.dim, 1)

  def score_items(self, batch: dict, items: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """`batch["user"] [B]`, `items [B, C]` -> logits `[B, C]`."""
    del train
    return self.output(self.gmf(batch["user"], items))[..., 0]

  def user_repr(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """[p_u * w ; b] `[B, d + 1]`."""
    del train
    p = self.gmf.user(batch["user"])                  # [B, d]
    bias = jnp.broadcast_to(self.output.bias, (p.shape[0], 1))
    return jnp.concatenate([p * self.output.kernel[:, 0], bias], axis=-1)

  def ego_tables(self) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The embedding tables P `[U, d]` and Q `[N, d]`: what `l2_weight` regularises (not the output layer
    folded into `user_repr`, nor the constant 1 of `item_repr`)."""
    return self.gmf.user.embedding, self.gmf.item.embedding

  def item_repr(self) -> jnp.ndarray:
    """[q_i ; 1] `[N, d + 1]` (row 0 = padding)."""
    q = self.gmf.item.embedding
    return jnp.concatenate([q, jnp.ones((q.shape[0], 1), q.dtype)], axis=-1)

  def __call__(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """Scores `[B, N]`; `model.init` creates every parameter through it."""
    return self.user_repr(batch, train) @ self.item_repr().T


class NCFMLP(nn.Module):
  """NCF's MLP scorer: y = w^T MLP([p'_u ; q'_i]) + b. Not factorised (contract: `score_items`)."""

  num_users: int
  num_items: int
  dim: int = 64
  hidden: tuple[int, ...] = (128, 64)
  dropout: float = 0.1
  embedding_std: float = 0.01
  kind: ClassVar[str] = "general"
  factorized: ClassVar[bool] = False

  def setup(self):
    _check_hidden(self.hidden)
    self.mlp = MLPTower(self.num_users, self.num_items, self.dim, tuple(self.hidden), self.dropout,
                        self.embedding_std)
    self.output = Linear(self.hidden[-1], 1)

  @property
  def score_bytes_per_pair(self) -> int:
    """Device bytes per (user, item) score in an evaluation forward pass (item id, tower, logit)."""
    return 4 + _mlp_bytes_per_pair(self.dim, tuple(self.hidden)) + 4

  def score_items(self, batch: dict, items: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """`batch["user"] [B]`, `items [B, C]` -> logits `[B, C]`; dropout when `train` (rng "dropout")."""
    return self.output(self.mlp(batch["user"], items, train))[..., 0]

  def __call__(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """Logits `[B]` of the pairs (`batch["user"]`, `batch["item"]`); used by `model.init`."""
    return self.score_items(batch, batch["item"][:, None], train)[:, 0]


class NeuMF(nn.Module):
  """GMF and MLP towers with separate embeddings, concatenated before one output unit."""

  num_users: int
  num_items: int
  mf_dim: int = 64
  mlp_dim: int = 64
  hidden: tuple[int, ...] = (128, 64)
  dropout: float = 0.1
  embedding_std: float = 0.01
  kind: ClassVar[str] = "general"
  factorized: ClassVar[bool] = False

  def setup(self):
    _check_hidden(self.hidden)
    self.gmf = GMFTower(self.num_users, self.num_items, self.mf_dim, self.embedding_std)
    self.mlp = MLPTower(self.num_users, self.num_items, self.mlp_dim, tuple(self.hidden), self.dropout,
                        self.embedding_std)
    self.output = Linear(self.mf_dim + self.hidden[-1], 1)

  @property
  def score_bytes_per_pair(self) -> int:
    """Device bytes per (user, item) score in an evaluation forward pass: item id, the GMF gather and
    product, the MLP tower, the two output halves and the logit."""
    return 4 + 8 * self.mf_dim + _mlp_bytes_per_pair(self.mlp_dim, tuple(self.hidden)) + 12

  def score_items(self, batch: dict, items: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """`batch["user"] [B]`, `items [B, C]` -> logits `[B, C]`; dropout when `train` (rng "dropout")."""
    gmf = self.gmf(batch["user"], items)              # [B, C, d_mf]
    mlp = self.mlp(batch["user"], items, train)       # [B, C, h_L]
    return self.output.concat(gmf, mlp)[..., 0]

  def __call__(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """Logits `[B]` of the pairs (`batch["user"]`, `batch["item"]`); used by `model.init`."""
    return self.score_items(batch, batch["item"][:, None], train)[:, 0]


def neumf_from_pretrained(gmf: dict, mlp: dict, alpha: float = 0.5) -> dict:
  """NeuMF variables from trained GMF and NCF-MLP variables (He et al. 2017, Sec. 3.4.1).

  Towers are copied; the output layer is h = [alpha h_gmf ; (1 - alpha) h_mlp] with bias
  alpha b_gmf + (1 - alpha) b_mlp, so NeuMF's logit equals alpha y_gmf + (1 - alpha) y_mlp.

  Args:
    gmf: `{"params": ...}` of a `GMF`; mlp: `{"params": ...}` of an `NCFMLP`.
    alpha: the GMF share, in [0, 1] (the paper: 0.5).
  Returns:
    `{"params": ...}` of a `NeuMF` with the same sizes.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ConfigError(f"NeuMF pretraining: alpha must lie in [0, 1], got {alpha}")
  g, m = gmf["params"], mlp["params"]
  kernel = jnp.concatenate([alpha * g["output"]["kernel"], (1.0 - alpha) * m["output"]["kernel"]], axis=0)
  bias = alpha * g["output"]["bias"] + (1.0 - alpha) * m["output"]["bias"]
  return {"params": {"gmf": g["gmf"], "mlp": m["mlp"], "output": {"kernel": kernel, "bias": bias}}}
