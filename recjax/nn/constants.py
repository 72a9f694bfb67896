"""Data-derived arrays a model reads but never trains (feature id tables, cached text states).

A module keeps them in the "constants" variable collection. When `apply` is given that collection
beside "params" (`recjax.models.model_constants`), the arrays are arguments of the compiled function;
runs on other data of the same shapes (another seed) then reuse its compilation, and a large table is
not copied into the program. Without the collection the module builds the same arrays on the host,
and they are embedded in the compiled code as constants.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn

CONSTANTS = "constants"


def read_constants(module: nn.Module, name: str, build: Callable[[], dict]) -> dict:
  """`module`'s entry `name` of the "constants" collection if `apply` was given it, else `build()`."""
  if module.has_variable(CONSTANTS, name):
    return module.get_variable(CONSTANTS, name)
  return build()
