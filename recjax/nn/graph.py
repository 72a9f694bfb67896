"""The user-item bipartite graph and its normalised propagation, for graph collaborative filtering.

Nodes are the users then the items: node `u` is user `u` (`0 <= u < num_users`, row 0 = padding)
and node `num_users + i` is item `i`. The adjacency A has a 1 for every distinct training pair
(in both directions); the propagation matrix is its symmetric normalisation

  Â = D^-1/2 A D^-1/2,   Â[u, U+i] = Â[U+i, u] = 1 / sqrt(deg(u) deg(i)),

(LightGCN eq. 7, NGCF's Laplacian L; RecBole 1.2.1's `get_norm_adj_mat` up to its 1e-7 in the
degree). Nodes with no edge (the padding rows, users or items unseen in training) get zero rows.

`Graph` holds the edges as host numpy arrays, sorted by destination node, and hashes by identity,
so a model carrying it stays a valid jit static argument; the arrays enter compiled code as
constants (see `propagate`).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from recjax.data.interactions import Interactions
from recjax.errors import DataError


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
  """Â as an edge list over `num_users + num_items` nodes (hash and equality by identity).

  Attributes:
    dst: int32 [E] destination node of each edge, sorted ascending.
    src: int32 [E] source node.
    weight: float32 [E] the entry Â[dst, src].
    num_users: user table size (padding row included).
    num_items: item table size (padding row included).
  """
  dst: np.ndarray
  src: np.ndarray
  weight: np.ndarray
  num_users: int
  num_items: int

  @property
  def num_nodes(self) -> int:
    return self.num_users + self.num_items

  @property
  def num_edges(self) -> int:
    return len(self.dst)

  def dense(self) -> np.ndarray:
    """Â as a dense float64 `[U+I, U+I]` matrix (for tests on small graphs)."""
    out = np.zeros((self.num_nodes, self.num_nodes))
    np.add.at(out, (self.dst, self.src), self.weight)
    return out


def normalized_adjacency(train: Interactions) -> Graph:
  """Â = D^-1/2 A D^-1/2 of the training pairs (a pair seen twice is one edge).

  Returns:
    A `Graph` with 2 x (distinct pairs) edges, sorted by destination (users' rows first).
  Raises:
    DataError: an id outside `[1, table size)`.
  """
  num_users, num_items = train.num_users, train.num_items
  where = train.name or "interactions"
  for kind, ids, size in (("user", train.user, num_users), ("item", train.item, num_items)):
    bad = np.flatnonzero((ids < 1) | (ids >= size))
    if len(bad):
      raise DataError(where, f"graph: {kind} id {int(ids[bad[0]])} (row {int(bad[0])}) outside [1, {size})")
  keys = np.unique(train.user.astype(np.int64) * num_items + train.item)   # sorted by (user, item)
  user, item = (keys // num_items).astype(np.int32), (keys % num_items).astype(np.int32)
  user_degree = np.bincount(user, minlength=num_users).astype(np.float64)
  item_degree = np.bincount(item, minlength=num_items).astype(np.float64)
  weight = (1.0 / np.sqrt(user_degree[user] * item_degree[item])).astype(np.float32)
  by_item = np.lexsort((user, item))                                        # item rows, sorted
  item_node = item + np.int32(num_users)
  return Graph(
      dst=np.concatenate([user, item_node[by_item]]),
      src=np.concatenate([item_node, user[by_item]]),
      weight=np.concatenate([weight, weight[by_item]]),
      num_users=num_users, num_items=num_items)


def propagate(graph: Graph, emb: jnp.ndarray, weight: jnp.ndarray | None = None) -> jnp.ndarray:
  """One propagation step Â E: `emb [U+I, d] -> [U+I, d]`.

  out[v] = sum over edges (v <- s) of w_e emb[s]: a row gather and a sorted segment sum
  (`lax.gather` + `lax.scatter_add`, what `jax.ops.segment_sum` lowers to; on CPU as fast as
  `jax.experimental.sparse.BCOO` @ E, which compiles 7x slower on Gowalla's graph as XLA
  constant-folds its indices). The edge arrays enter the traced function as constants, already
  shaped `[E, 1]` and promised in bounds, so XLA has nothing to fold (jnp indexing on the same
  constants compiles 4x slower; passing them as arguments saves under a second).

  Args:
    graph: the normalised adjacency.
    emb: node embeddings `[U+I, d]` (users first).
    weight: optional `[E]` edge weights replacing `graph.weight` (e.g. after edge dropout).
  """
  if emb.ndim != 2 or emb.shape[0] != graph.num_nodes:
    raise ValueError(f"propagate: expected embeddings [{graph.num_nodes}, d] (users + items), got {emb.shape}")
  w = graph.weight[:, None] if weight is None else weight[:, None]                     # [E, 1]
  messages = lax.gather(emb, graph.src[:, None], _ROWS, (1, emb.shape[1]), mode=_IN_BOUNDS) * w.astype(emb.dtype)
  return lax.scatter_add(jnp.zeros_like(emb), graph.dst[:, None], messages, _ROW_UPDATES,  # [U+I, d]
                         indices_are_sorted=True, mode=_IN_BOUNDS)


_IN_BOUNDS = lax.GatherScatterMode.PROMISE_IN_BOUNDS
_ROWS = lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,), start_index_map=(0,))
_ROW_UPDATES = lax.ScatterDimensionNumbers(update_window_dims=(1,), inserted_window_dims=(0,),
                                          scatter_dims_to_operand_dims=(0,))


def split_nodes(graph: Graph, emb: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Node rows `[U+I, d]` -> (users `[U, d]`, items `[I, d]`)."""
  return emb[:graph.num_users], emb[graph.num_users:]


class GraphTowers(nn.Module):
  """Base of the graph models: every tower comes from `ranking_tables(train) -> (users [U, D],
  items [N, D])`, which the subclass defines (one propagation of the whole graph). Subclasses have
  the fields `num_users`, `num_items` and `graph`, whose sizes must agree."""

  def __post_init__(self):
    super().__post_init__()
    if (self.graph.num_users, self.graph.num_items) != (self.num_users, self.num_items):
      raise ValueError(f"{type(self).__name__}: graph has ({self.graph.num_users}, {self.graph.num_items}) "
                       f"users/items, the tables ({self.num_users}, {self.num_items})")

  def user_repr(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """`batch["user"] [B]` -> `[B, D]` (propagates the whole graph)."""
    users, _ = self.ranking_tables(train)
    return jnp.take(users, batch["user"], axis=0)

  def item_repr(self) -> jnp.ndarray:
    """`[N, D]` (row 0 = padding, never ranked; propagates the whole graph)."""
    return self.ranking_tables()[1]

  def __call__(self, batch: dict, train: bool = False) -> jnp.ndarray:
    """Scores `[B, N]`; `model.init(rng, batch)` creates every parameter through it."""
    users, items = self.ranking_tables(train)
    return jnp.take(users, batch["user"], axis=0) @ items.T
