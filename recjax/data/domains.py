"""Scenarios (domains) of interactions: where each row's domain comes from, per-domain splits, and a
synthetic multi-domain generator with a known share of shared and domain-specific structure.

A row's domain is the string column `columns["domain"]` of an `Interactions`. It is taken from a file
column or derived by a rule (`assign_domains`); `domain_names` fixes the numbering 0..D-1 (sorted names)
once for the whole dataset, so every split part numbers domains alike.

Rules (`domain.rule` in a config):
- "column": the interaction column `domain.column` as read (e.g. a RecBole `.inter` field `domain:token`).
- "item_genre_group" (ml-100k and other MovieLens data with a genre field `class` or `genres`): an item's
  domain is the first group of `GENRE_GROUPS` that holds one of its genres, in this order:
    children = Animation, Children's;  horror = Horror;  scifi = Sci-Fi, Fantasy;
    action = Action, Adventure, Thriller, War, Western, Crime, Mystery, Film-Noir;
    comedy = Comedy, Musical;  drama = Drama, Romance, Documentary, and items with none of these
    (ml-100k's "unknown" genre: 10 ratings, too few for a domain of their own).
  The small, distinctive groups come first, so a "Toy Story" (Animation, Children's, Comedy) row is a
  children's row. On ml-100k: action 36,462 ratings, comedy 19,896, drama 18,991, scifi 11,552, children 7,855,
  horror 5,244.
- "user_age_band" (a numeric user feature `age`): "<25", "25-34", "35-44", "45+".
- "user_feature:NAME" / "item_feature:NAME": the value of a single-valued user or item feature (e.g.
  `user_feature:gender`).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from recjax.data.interactions import Interactions, from_columns
from recjax.data.splits import PARTS, Split, part_counts
from recjax.errors import ConfigError, DataError

DOMAIN = "domain"
GENRE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("children", ("Animation", "Children's")),
    ("horror", ("Horror",)),
    ("scifi", ("Sci-Fi", "Fantasy")),
    ("action", ("Action", "Adventure", "Thriller", "War", "Western", "Crime", "Mystery", "Film-Noir")),
    ("comedy", ("Comedy", "Musical")),
    ("drama", ("Drama", "Romance", "Documentary")),
)
AGE_BANDS: tuple[tuple[float, str], ...] = ((25, "<25"), (35, "25-34"), (45, "35-44"), (np.inf, "45+"))
RULES = ("column", "item_genre_group", "user_age_band", "user_feature:NAME", "item_feature:NAME")


def _genre_group(genres) -> str:
  genres = set(genres) if genres is not None and not isinstance(genres, str) else set(str(genres or "").split())
  for group, members in GENRE_GROUPS:
    if genres & set(members):
      return group
  return GENRE_GROUPS[-1][0]


def _age_band(age) -> str:
  try:
    value = float(age)
  except (TypeError, ValueError):
    return "unknown"
  if not np.isfinite(value):
    return "unknown"
  return next(name for bound, name in AGE_BANDS if value < bound)


def _feature(inter: Interactions, side: str, names: Sequence[str], rule: str) -> np.ndarray:
  """The first of `names` among the `side` features (object or float array by dense id)."""
  features = inter.user_features if side == "user" else inter.item_features
  for name in names:
    if name in features:
      return features[name]
  raise DataError(inter.name or "dataset", f"domain rule {rule!r} needs a {side} feature "
                  f"{' or '.join(map(repr, names))}; the {side} features are {sorted(features) or 'none'}")


def row_domains(inter: Interactions, rule: str, column: str = DOMAIN) -> np.ndarray:
  """object `[n]`: each row's domain name under `rule` (see the module docstring).

  Raises:
    ConfigError: an unknown rule.  DataError: the column or feature the rule reads is missing.
  """
  if rule == "column":
    if column not in inter.columns:
      raise DataError(inter.name or "dataset", f"domain rule 'column' reads the interaction column {column!r}; "
                      f"the columns are {sorted(inter.columns) or 'none'}")
    return np.asarray(inter.columns[column]).astype(str).astype(object)
  if rule == "item_genre_group":
    genres = _feature(inter, "item", ("class", "genres", "genre"), rule)
    per_item = np.array([_genre_group(g) for g in genres], dtype=object)
    return per_item[inter.item]
  if rule == "user_age_band":
    per_user = np.array([_age_band(a) for a in _feature(inter, "user", ("age",), rule)], dtype=object)
    return per_user[inter.user]
  side, _, name = rule.partition("_feature:")
  if side in ("user", "item") and name:
    per_id = np.array([str(v) for v in _feature(inter, side, (name,), rule)], dtype=object)
    return per_id[inter.user if side == "user" else inter.item]
  raise ConfigError(f"domain.rule: unknown rule {rule!r}; expected one of {list(RULES)}")


def assign_domains(inter: Interactions, rule: str, column: str = DOMAIN) -> Interactions:
  """`inter` with `columns["domain"]` = each row's domain name under `rule`."""
  return dataclasses.replace(inter, columns={**inter.columns, DOMAIN: row_domains(inter, rule, column)})


def domain_names(inter: Interactions) -> tuple[str, ...]:
  """The sorted domain names of `inter`'s rows: name k is domain id k."""
  if DOMAIN not in inter.columns:
    raise DataError(inter.name or "dataset", "no domain column: set domain.rule (see recjax.data.domains)")
  return tuple(np.unique(inter.columns[DOMAIN].astype(str)).tolist())


def domain_ids(inter: Interactions, names: Sequence[str]) -> np.ndarray:
  """int32 `[n]`: each row's domain as its index in `names`; DataError for a domain not in `names`."""
  index = {name: k for k, name in enumerate(names)}
  present, rows = np.unique(inter.columns[DOMAIN].astype(str), return_inverse=True)   # one lookup per domain
  unknown = sorted(str(name) for name in set(present) - set(index))
  if unknown:
    raise DataError(inter.name or "dataset", f"domain(s) {unknown} not among the known domains {list(names)}")
  return np.array([index[name] for name in present], np.int32)[rows].reshape(-1)


def in_domain(inter: Interactions, name: str) -> np.ndarray:
  """bool `[n]`: the rows of domain `name`."""
  return inter.columns[DOMAIN].astype(str) == name


def domain_sizes(inter: Interactions, names: Sequence[str]) -> dict[str, int]:
  """Rows per domain, every name listed (0 where absent)."""
  counts = np.bincount(domain_ids(inter, names), minlength=len(names))
  return {name: int(c) for name, c in zip(names, counts)}


def split_by_domain(inter: Interactions, ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> Split:
  """Random rows cut within each domain by `part_counts` (RecBole's counts), so every domain has rows in
  train, valid and test in the same shares (2 ratios: train and test, valid empty); rows keep their order
  inside each part.

  Raises:
    DataError: no domain column, or a domain with fewer than 3 rows (it cannot be in all three parts).
  """
  names = domain_names(inter)
  ids = domain_ids(inter, names)
  sizes = np.bincount(ids, minlength=len(names))
  small = [f"{names[d]} ({sizes[d]} rows)" for d in range(len(names)) if sizes[d] < 3]
  if small:
    raise DataError(inter.name or "dataset", f"domain(s) {', '.join(small)} have too few rows for train, valid and "
                    "test: merge them or drop them")
  counts = part_counts(sizes, ratios)                                      # [D, 3]
  part = np.empty(len(inter), np.int8)
  rng = np.random.default_rng([seed, 11])
  for d in range(len(names)):
    rows = rng.permutation(np.flatnonzero(ids == d))
    bounds = np.cumsum(counts[d])
    part[rows[:bounds[0]]], part[rows[bounds[0]:bounds[1]]], part[rows[bounds[1]:]] = 0, 1, 2
  return Split(*(inter.subset(part == p) for p in range(3)), "domain_rows")


def only_domain(split: Split, name: str) -> Split:
  """The split restricted to the rows of domain `name` (one model per domain trains on these)."""
  names = domain_names(split.train)
  if name not in names:
    raise ConfigError(f"domain.only: unknown domain {name!r}; the domains are {list(names)}")
  parts = {part: getattr(split, part).subset(in_domain(getattr(split, part), name)) for part in PARTS}
  return dataclasses.replace(split, **parts, name=f"{split.name}[{name}]")


@dataclasses.dataclass(frozen=True)
class MultiDomainPlan:
  """The planted structure of `make_multidomain`: the logit of task t for user u, item i in domain d is

    z = bias[t, d] + shared_weight * S[t, seg_u, cat_i] + specific_weight * P[t, d, seg_u, cat_i],

  S and P standard normal. `shared_weight` = 0 makes domains unrelated; `specific_weight` = 0 makes them one.
  """
  shared: np.ndarray        # [T, segments, categories]
  specific: np.ndarray      # [T, D, segments, categories]
  bias: np.ndarray          # [T, D]
  user_segment: np.ndarray  # [U] (row 0 = padding)
  item_category: np.ndarray  # [I]
  shared_weight: float
  specific_weight: float

  def logits(self, user: np.ndarray, item: np.ndarray, domain: np.ndarray) -> np.ndarray:
    """`[n, T]` planted logits of rows (dense user, item, domain id)."""
    s, c = self.user_segment[user], self.item_category[item]
    shared = self.shared[:, s, c]                                            # [T, n]
    specific = self.specific[:, domain, s, c]                                # [T, n]
    return (self.bias[:, domain] + self.shared_weight * shared + self.specific_weight * specific).T


TASKS = ("click", "like")


def make_multidomain(domain_rows: Sequence[int] = (30000, 30000, 3000, 3000), num_users: int = 2000,
                     num_items: int = 1000, segments: int = 12, categories: int = 12, shared_weight: float = 1.5,
                     specific_weight: float = 1.5, seed: int = 0) -> tuple[Interactions, MultiDomainPlan]:
  """Multi-domain, multi-task labelled rows with planted structure (`MultiDomainPlan`).

  Users belong to one of `segments` segments and items to one of `categories` categories, visible as
  the features `segment` and `category`; domain d has `domain_rows[d]` rows of uniformly drawn (user,
  item) pairs (domains named "d0", "d1", ...). Each row has the labels `click` and `like`
  (`columns`, float32 0/1) drawn from the sigmoid of the planted logits, and a rating (1 + click + like
  * 3) so rating-based tools work too. With big and small domains, a model must share the big
  domains' evidence of S while keeping each domain's own P: one model for all blurs P, one model per
  domain learns S from its own rows alone.
  """
  if min(domain_rows) < 1 or len(domain_rows) < 1:
    raise ConfigError(f"make_multidomain: every domain needs rows, got {list(domain_rows)}")
  rng = np.random.default_rng(seed)
  num_domains, num_tasks = len(domain_rows), len(TASKS)
  plan = MultiDomainPlan(
      shared=rng.standard_normal((num_tasks, segments, categories)),
      specific=rng.standard_normal((num_tasks, num_domains, segments, categories)),
      bias=rng.normal(0.0, 0.3, (num_tasks, num_domains)),
      user_segment=np.concatenate([[0], rng.integers(0, segments, num_users)]),
      item_category=np.concatenate([[0], rng.integers(0, categories, num_items)]),
      shared_weight=shared_weight, specific_weight=specific_weight)
  domain = np.repeat(np.arange(num_domains), domain_rows)
  user = rng.integers(1, num_users + 1, len(domain))
  item = rng.integers(1, num_items + 1, len(domain))
  labels = (rng.random((len(domain), num_tasks)) < 1 / (1 + np.exp(-plan.logits(user, item, domain)))
            ).astype(np.float32)
  raw = lambda prefix, ids: np.array([f"{prefix}{i}" for i in ids], dtype=object)  # noqa: E731
  inter = from_columns(
      raw("u", user), raw("i", item), rating=1 + labels[:, 0] + 3 * labels[:, 1],
      timestamp=np.arange(len(domain), dtype=np.float64),
      columns={DOMAIN: np.array([f"d{d}" for d in domain], dtype=object),
               **{task: labels[:, t] for t, task in enumerate(TASKS)}},
      user_features={"segment": {f"u{u}": f"s{plan.user_segment[u]}" for u in range(1, num_users + 1)}},
      item_features={"category": {f"i{i}": f"c{plan.item_category[i]}" for i in range(1, num_items + 1)}},
      name="synthetic-multidomain")
  return inter, _renumbered(plan, inter, num_users, num_items)


def _renumbered(plan: MultiDomainPlan, inter: Interactions, num_users: int, num_items: int) -> MultiDomainPlan:
  """The plan's user / item tables re-indexed by `inter`'s dense ids (its vocabularies order raw ids)."""
  user_raw = np.array([int(str(t)[1:]) if t != inter.user_vocab[0] else 0 for t in inter.user_vocab])
  item_raw = np.array([int(str(t)[1:]) if t != inter.item_vocab[0] else 0 for t in inter.item_vocab])
  return dataclasses.replace(plan, user_segment=plan.user_segment[user_raw], item_category=plan.item_category[item_raw])
