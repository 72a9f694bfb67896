"""The published-row scripts' settings (`experiments/*.py`: CONFIG and its VARIANTS) are valid configs that
build their model, so a reproduction run does not fail on a typo after its data has loaded."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from recjax.config import apply_overrides, build_config, merged
from recjax.models import create_model

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))   # the scripts import their `common`

SCRIPTS = {"beauty_sasrec": "sasrec", "beauty_bert4rec": "bert4rec", "gowalla_lightgcn": "lightgcn"}


def _settings(script: str) -> list[tuple[str, dict]]:
  module = importlib.import_module(script)
  variants = getattr(module, "VARIANTS", {})
  return [(script, module.CONFIG)] + [(script, merged(module.CONFIG, o)) for o in variants.values()]


@pytest.mark.parametrize("script, overrides", [s for script in SCRIPTS for s in _settings(script)])
def test_script_settings_build_their_model(script, overrides):
  name = SCRIPTS[script]
  config = apply_overrides(build_config(name), dict(overrides))   # unknown keys and wrong types raise here
  if name != "lightgcn":    # a graph model also needs its training graph
    create_model(name, num_users=3, num_items=5, **{k: v for k, v in config["model"].items() if k != "name"})


def test_variants_merge_nested_keys():
  base = {"a": 1, "model": {"dim": 50, "dropout": 0.5}}
  assert merged(base, {"model": {"dim": 64}, "b": 2}) == {"a": 1, "b": 2, "model": {"dim": 64, "dropout": 0.5}}
  assert base == {"a": 1, "model": {"dim": 50, "dropout": 0.5}}   # a copy: the base is left as it was
