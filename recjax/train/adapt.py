"""Adaptation: continue from trained parameters, training only part of them.

Multi-scenario models name their parameters by what they belong to (`recjax.models.multidomain.param_group`):
"shared" (embeddings, shared experts and layers), "domain" (towers, per-domain gates and weights) or
"adapter" (per-domain bottleneck adapters). `trainable`:
  "all"       every parameter (plain fine-tuning);
  "domain"    the domain-specific parts and the adapters; the shared part is frozen;
  "adapters"  the adapters only.
Frozen parameters get no update at all (`optax.set_to_zero`, so Adam keeps no moments for them and
decoupled weight decay does not shrink them).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import optax
from flax import traverse_util

from recjax.errors import ConfigError

TRAINABLE = ("all", "domain", "adapters")
_TRAINED_GROUPS = {"all": {"shared", "domain", "adapter"}, "domain": {"domain", "adapter"}, "adapters": {"adapter"}}


def trainable_labels(variables: dict, trainable: str, param_group: Callable[[tuple[str, ...]], str]) -> dict:
  """A pytree like `variables` of "train" / "freeze" labels (non-"params" collections, e.g. running
  statistics, are frozen for the optimizer: the train step writes them itself).

  Raises:
    ConfigError: unknown `trainable`, or nothing would train (e.g. "adapters" on a model without adapters).
  """
  if trainable not in TRAINABLE:
    raise ConfigError(f"finetune.trainable: expected one of {list(TRAINABLE)}, got {trainable!r}")
  groups = _TRAINED_GROUPS[trainable]
  flat = traverse_util.flatten_dict(variables)
  labels = {path: "train" if path[0] == "params" and param_group(path[1:]) in groups else "freeze" for path in flat}
  if "train" not in labels.values():
    raise ConfigError(f"finetune.trainable={trainable!r} leaves nothing to train in this model (its parameter groups: "
                      f"{sorted({param_group(p[1:]) for p in flat if p[0] == 'params'})}); give the model adapters "
                      "(model.adapter_dim > 0) or train 'domain' / 'all'")
  return traverse_util.unflatten_dict(labels)


def partial_optimizer(optimizer: optax.GradientTransformation, variables: dict, trainable: str,
                      param_group: Callable[[tuple[str, ...]], str]) -> optax.GradientTransformation:
  """`optimizer` on the `trainable` parameters, zero updates on the rest (see the module docstring)."""
  if trainable == "all":
    return optimizer
  labels = trainable_labels(variables, trainable, param_group)
  return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)


def merge_pretrained(fresh: dict, pretrained: dict, source: str) -> dict:
  """`fresh` variables with every leaf that `pretrained` also has replaced by its value: parameters
  the pretrained model lacks (e.g. adapters added for fine-tuning) keep their initial values. Embedding
  tables take `fresh`'s padding rows (`_repadded`). `source` names the pretrained runs in errors
  ("finetune.from_run: runs/x").

  Raises:
    ConfigError: a shared leaf whose shape differs, or pretrained leaves this model has no place for.
  """
  new, old = traverse_util.flatten_dict(fresh), traverse_util.flatten_dict(pretrained)
  unused = sorted("/".join(p) for p in old if p not in new)
  if unused:
    raise ConfigError(f"{source} has parameters this model lacks: {unused[:5]}"
                      f"{' ...' if len(unused) > 5 else ''} (model sizes must match)")
  for path, value in list(old.items()):
    if value.shape == new[path].shape:
      continue
    repadded = _repadded(value, new[path].shape) if path[-1] == "embedding" else None
    if repadded is None:
      raise ConfigError(f"{source} parameter {'/'.join(path)} has shape {value.shape}, "
                        f"this model {new[path].shape} (model sizes and data must match)")
    old[path] = repadded
  return traverse_util.unflatten_dict({path: old.get(path, value) for path, value in new.items()})


def _repadded(table, shape):
  """An embedding table stored with another number of zero padding rows (a row-sharded run pads its tables to
  a multiple of its devices, `recjax.train.mesh.pad_tables`) with `shape`'s rows; None when more than padding
  differs."""
  rows = shape[0]
  if table.shape[1:] != tuple(shape[1:]) or (table.shape[0] > rows and np.any(np.asarray(table[rows:]))):
    return None
  return np.pad(np.asarray(table)[:rows], ((0, max(0, rows - table.shape[0])), (0, 0)))
