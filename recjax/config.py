"""Run configuration: a plain nested dict with checked overrides.

A config is built from the defaults of a model (`default_config("sasrec")`), optionally a Python
config file exposing `get_config() -> dict` of overrides, and `--set key=value` strings. Every
override must name an existing key (dotted for nested ones, e.g. `model.dim=32`) and keep the
default's type; a misspelt key is an error, never a silent None.
"""
from __future__ import annotations

import ast
import copy
import importlib.util
import math
from typing import Any, Mapping

from recjax.errors import ConfigError

# Run-level defaults shared by all models; each model's entry in MODEL_DEFAULTS overrides them.
BASE = {
    "dataset": "synthetic",
    "data_dir": None,
    "protocol": "recbole-general",
    "seed": 2020,
    "epochs": 300,
    "batch_size": 2048,
    "optimizer": "adam",
    "learning_rate": 1e-3,
    "weight_decay": 0.0,
    "adam_b1": 0.9,               # Adam's moment decay rates (adam, optax_adam, adamw; the SASRec authors use b2 0.98)
    "adam_b2": 0.999,
    "adam_eps": 1e-8,             # Adam's epsilon (BERT's optimizer: 1e-6)
    "lr_warmup_steps": 0,         # linear warm-up of the learning rate from 0 over this many optimizer steps
    "lr_decay": "constant",       # constant | linear (to 0 at the last step of `epochs`; BERT's schedule)
    "grad_clip_norm": None,       # clip the gradient to this global L2 norm (BERT's optimizer: 1.0; BERT4Rec's: 5.0)
    "decay_biases_and_norms": True,  # weight decay on biases and normalisation scales too (BERT's optimizer: False)
    "loss": "bpr",
    "l2_weight": 0.0,
    "num_negatives": 1,
    "negative_distribution": "uniform",  # uniform | popularity (training negatives; sampled_softmax corrects by log q)
    "gbce_t": 0.75,               # gBCE calibration t (gSASRec): beta = 1 - t (1 - alpha), alpha = sampling rate
    "training": "pairs",          # pairs | sequence (whole sequences) | prefix (RecBole's scheme) | labeled (rows)
    "pair_sampling": "rows",      # pairs: rows (each row once an epoch) | users (a user uniformly, then an item)
    "window_stride": None,        # sequence training: items between windows (None: max_len // 2)
    "eval_every": 1,
    "patience": 10,               # stop when more evaluations than this in a row bring no gain (RecBole: stopping_step)
    "valid_metric": None,         # None: the protocol's
    "metrics": None,              # metric names evaluated (None: the protocol's), e.g. ["ndcg", "recall", "map"]
    "ks": None,                   # ranking cut-offs (None: the protocol's), e.g. [10, 20, 50]
    "eval_budget_mb": 256,        # device memory for one chunk of [users, items] scores
    "eval_cpu_cache_mb": 32,      # on CPU, the chunk cap for pair-wise scorers (NeuMF...): cache-sized, ~1.6x faster
    "keep_checkpoints": 2,
    "devices": None,              # devices for training (None: all visible, across processes; see cpu_devices)
    # On a one-process CPU host, `devices: None` means this many (None: every host device). One XLA:CPU device
    # already uses every core; splitting the batch over host devices pays only for attention models.
    "cpu_devices": 1,
    "model_parallel": 1,          # devices on the mesh's `model` axis; the rest split the batch (`data`)
    "shard_tables_mb": 64.0,      # embedding tables at least this big are row-sharded over `model`
    "compute_dtype": "float32",   # float32 | bfloat16 (forward/backward; weights and Adam state stay float32)
    "grad_accum": 1,              # micro-batches per step (same update, a micro-batch's activation memory)
    "preprocess": {"dedup": False, "min_rating": None, "user_core": 0, "item_core": 0},
    # Item text features (recjax.data.text, recjax.nn.text): a checkpoint directory or "minilm" makes the item
    # tower of models that read text (sasrec, bpr, text_mlp) mix in each item's encoded text.
    "text": {"model": None, "fields": None, "use_id": True, "finetune_layers": 0, "cache_dir": None,
             "batch_size": 256},
    # Scenarios (recjax.data.domains): `rule` gives each row a domain ("column" reads `column`; or
    # "item_genre_group", "user_age_band", "user_feature:NAME", "item_feature:NAME"); metrics are then
    # reported per domain too; `only` restricts the run to one domain's rows (one model per domain).
    "domain": {"rule": None, "column": "domain", "only": None},
    "label_columns": None,        # labelled rows: 0/1 label columns of the data, one task each (default: rating rule)
    # Adaptation (recjax.train.adapt): start from the best params of the run in `from_run` (same data and
    # model) and train only `trainable` of them: "all", "domain" (domain-specific parts and adapters) or
    # "adapters" (adapters and towers/heads of the domains).
    "finetune": {"from_run": None, "trainable": "all"},
    "model": {},
}

# Sequential models: RecBole's sequential preset, whole-sequence training with full softmax CE.
_SEQUENTIAL = {"protocol": "recbole-sequential", "training": "sequence", "loss": "ce", "batch_size": 128, "epochs": 200}

# Context-aware (kind "ctr") models: RecBole's context-aware preset, pointwise training on every labelled
# row (no negatives), label = rating >= label_threshold (ml-100k: `threshold: {rating: 4}`). For rating
# regression: --protocol rating --set loss='mse' (rating_normalization: None | zscore | minmax | user_mean).
_CONTEXT = {"protocol": "recbole-context", "training": "labeled", "loss": "bce", "batch_size": 2048, "epochs": 300,
            "label_threshold": 4.0, "rating_normalization": None}

# Multi-scenario models (recjax.models.multidomain): labelled rows split within each domain; on
# synthetic-multidomain two tasks (click, like), on rated data one (rating >= label_threshold).
_MULTIDOMAIN = {**_CONTEXT, "protocol": "multidomain", "batch_size": 1024, "epochs": 50, "patience": 5}

MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "pop": {"epochs": 0, "loss": None, "training": None},
    "bpr": {"loss": "bpr"},
    # Attention steps gain 1.2x from 2 host devices on 2 CPU cores (every other model is faster on one).
    "sasrec": {**_SEQUENTIAL, "cpu_devices": None},
    "bert4rec": {**_SEQUENTIAL, "cpu_devices": None},
    "gru4rec": _SEQUENTIAL,
    # Caser scores one L-item window per row: RecBole's prefix rows and batch size.
    "caser": {**_SEQUENTIAL, "training": "prefix", "batch_size": 2048},
    # NCF (He et al. 2017) as RecBole's NeuMF: BCE on one uniform negative per positive. A NeuMF run can
    # start from finished GMF and NCF-MLP runs (same data and sizes): pretrain.gmf_run / pretrain.mlp_run
    # name their folders, output layer [alpha w_gmf ; (1 - alpha) w_mlp] (the paper: alpha 0.5, then SGD).
    # RecBole's train_batch_size (2048) counts a pointwise model's negatives too: 1,024 positives and their
    # 1,024 negatives a step, so recjax's batch_size (positives) is 1,024 for the same steps.
    "gmf": {"loss": "bce", "batch_size": 1024},
    "ncf_mlp": {"loss": "bce", "batch_size": 1024},
    "neumf": {"loss": "bce", "batch_size": 1024, "pretrain": {"gmf_run": None, "mlp_run": None, "alpha": 0.5}},
    # Feature-field models (recjax.models.ctr): hyperparameters RecBole 1.2.1's, run defaults its context-aware preset.
    "deepfm": _CONTEXT,
    "dcnv2": _CONTEXT,
    "widedeep": _CONTEXT,
    "feature_mlp": _CONTEXT,
    # Graph models (recjax.models.lightgcn / ngcf): BPR, RecBole 1.2.1's reg_weight 1e-5 as l2_weight. The L2
    # term is the paper's, lambda * mean_b (||u_b||^2 + ||p_b||^2 + ||n_b||^2) / 2 (LightGCN: ego rows; NGCF:
    # final rows); RecBole's EmbLoss (require_pow False) sums unsquared batch norms, (||U|| + ||P|| + ||N||) / B.
    # One device: every step propagates the whole graph, so data parallelism would repeat that work on each device
    # (Gowalla on the 2-core CPU: 2.9 s/step on one device, 6.3 s/step on two).
    "lightgcn": {"loss": "bpr", "l2_weight": 1e-5, "devices": 1},
    # Content model (recjax.models.content): items by their text only; trained as BPR-MF.
    "text_mlp": {"loss": "bpr", "text": {**BASE["text"], "model": "minilm"}},
    "ngcf": {"loss": "bpr", "l2_weight": 1e-5, "devices": 1},
    **{name: _MULTIDOMAIN for name in ("domain_mlp", "shared_bottom", "mmoe", "ple", "star")},
}


# Per-dataset run defaults, applied over the model's and under a config file / --set (as RecBole's
# dataset yaml files). The synthetic data is a quick demonstration: a fixed budget of 30 epochs.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "synthetic": {"epochs": 30},
    "synthetic-multidomain": {"label_columns": ["click", "like"], "domain": {**BASE["domain"], "rule": "column"}},
}


def default_config(model: str) -> dict[str, Any]:
  """The full default config of a model: BASE, the model's run defaults, its hyperparameters."""
  from recjax.models import default_hparams  # models import nothing from here

  if model not in MODEL_DEFAULTS:
    raise ConfigError(f"unknown model {model!r}; known: {', '.join(sorted(MODEL_DEFAULTS))}")
  config = copy.deepcopy(BASE)
  config.update(copy.deepcopy(MODEL_DEFAULTS[model]))
  config["model"] = {"name": model, **default_hparams(model)}
  return config


def merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
  """A copy of `base` with `overrides` on top, nested dicts merged key by key (unchecked, unlike
  `apply_overrides`: for configs that already passed the checks, or defaults under a saved config)."""
  out = copy.deepcopy(dict(base))
  for key, value in overrides.items():
    both = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
    out[key] = merged(out[key], value) if both else copy.deepcopy(value)
  return out


def parse_value(text: str) -> Any:
  """`--set` values are Python literals when they parse (1e-3, [10, 20], None), else strings."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def set_key(config: dict[str, Any], dotted: str, value: Any, source: str = "--set") -> None:
  """Set an existing (possibly nested) key, checking the type against the default's. A mapping given
  for a section (`preprocess={'dedup': False}`) sets its keys one by one, each checked."""
  *parents, leaf = dotted.split(".")
  node = config
  for i, part in enumerate(parents):
    if not isinstance(node.get(part), dict):
      raise ConfigError(f"{source}: unknown config key {'.'.join(parents[:i + 1])!r}")
    node = node[part]
  if leaf not in node:
    known = ", ".join(sorted(node))
    raise ConfigError(f"{source}: unknown config key {dotted!r}; known here: {known}")
  if dotted == "model.name":
    raise ConfigError(f"{source}: the model is chosen by the command's MODEL argument, not model.name")
  if isinstance(node[leaf], dict) and isinstance(value, Mapping):
    for key, item in flatten(value, f"{dotted}."):
      set_key(config, key, item, source)
    return
  node[leaf] = _checked(dotted, node[leaf], value, source)


_COUNT = (lambda v: v >= 0, "a count >= 0")
_POSITIVE = (lambda v: v >= 1, "a positive count")
_WEIGHT = (lambda v: v >= 0, "a weight >= 0")
_DECAY = (lambda v: 0 <= v < 1, "a decay rate in [0, 1)")
_ABOVE_ZERO = (lambda v: v > 0, "a number > 0")
_SEED = (lambda v: 0 <= v < 2**32, "an integer in [0, 2^32)")
# Numeric keys with a valid range: (test, what a valid value is). Pop's default is 0 epochs (it counts, never trains).
_BOUNDS = {
    "epochs": _COUNT, "patience": _COUNT, "seed": _SEED, "lr_warmup_steps": _COUNT, "weight_decay": _WEIGHT,
    "l2_weight": _WEIGHT, "adam_b1": _DECAY, "adam_b2": _DECAY, "learning_rate": (_ABOVE_ZERO[0], "a rate > 0"),
    "adam_eps": _ABOVE_ZERO, "grad_clip_norm": _ABOVE_ZERO, "preprocess.user_core": _COUNT,
    "preprocess.item_core": _COUNT, "shard_tables_mb": _WEIGHT, "eval_cpu_cache_mb": _POSITIVE,
    **{key: _POSITIVE for key in ("batch_size", "num_negatives", "eval_every", "keep_checkpoints", "grad_accum",
                                  "eval_budget_mb", "window_stride", "devices", "cpu_devices", "model_parallel")},
}


# Keys whose default is None ("not set"): the type a set value must have.
_NUMBER = (int, float)
_SEQUENCE = (list, tuple)
_TYPES = {
    "data_dir": str, "valid_metric": str, "loss": str, "training": str, "rating_normalization": str,
    "window_stride": int, "devices": int, "cpu_devices": int, "preprocess.min_rating": _NUMBER,
    "text.model": str, "text.fields": _SEQUENCE, "text.cache_dir": str, "domain.rule": str, "domain.only": str,
    "label_columns": _SEQUENCE, "finetune.from_run": str, "pretrain.gmf_run": str, "pretrain.mlp_run": str,
    "grad_clip_norm": _NUMBER, "metrics": _SEQUENCE, "ks": _SEQUENCE,
}


_RATE = (lambda v: 0 <= v < 1, "a rate in [0, 1)")


def _bound(key: str):
  """`key`'s (test, description): from _BOUNDS, or a rate for every model's dropout (`model.*dropout`)."""
  return _BOUNDS.get(key) or (_RATE if key.startswith("model.") and key.endswith("dropout") else None)


def _in_bounds(key: str, value: Any, source: str) -> Any:
  bound = _bound(key)
  if bound and value is not None and not bound[0](value):
    raise ConfigError(f"{source}: {key} must be {bound[1]}, got {value!r}")
  return value


def _checked(key: str, default: Any, value: Any, source: str) -> Any:
  return _in_bounds(key, _typed(key, default, value, source), source)


def _typed(key: str, default: Any, value: Any, source: str) -> Any:
  if value is None:   # "not set": only for keys that may be unset (default None, or typed in _TYPES)
    if default is None or key in _TYPES:
      return value
    raise ConfigError(f"{source}: {key} expects {type(default).__name__}, got None")
  if isinstance(value, float) and not math.isfinite(value):
    raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
  if default is None:
    expected = _TYPES.get(key, object)
    if isinstance(value, expected) and not (isinstance(value, bool) and expected is not object):
      return value
    names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
    raise ConfigError(f"{source}: {key} expects {names} (or None), got {value!r}")
  if isinstance(default, bool) or isinstance(value, bool):
    if isinstance(default, bool) and isinstance(value, bool):
      return value
  elif isinstance(default, float) and isinstance(value, (int, float)):
    return float(value)
  elif isinstance(default, int) and isinstance(value, int):
    return value
  elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
    return type(default)(value)
  elif isinstance(default, type(value)):
    return value
  raise ConfigError(f"{source}: {key} expects {type(default).__name__}, got {value!r}")


def apply_overrides(config: dict[str, Any], overrides: Mapping[str, Any] | list[str],
                    source: str = "--set") -> dict[str, Any]:
  """A copy of `config` with overrides applied: a mapping (nested dicts allowed) or `key=value` strings."""
  config = copy.deepcopy(config)
  if isinstance(overrides, Mapping):
    for key, value in flatten(overrides):
      set_key(config, key, value, source)
    return config
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise ConfigError(f"{source}: expected key=value, got {item!r}")
    set_key(config, key.strip(), parse_value(text.strip()), source)
  return config


def override_keys(overrides: list[str]) -> list[str]:
  """The dotted keys that `key=value` override strings set."""
  return [item.partition("=")[0].strip() for item in overrides]


def dotted(config: Mapping[str, Any], key: str) -> Any:
  """`config["a"]["b"]` for key "a.b" (None where a level is missing)."""
  for part in key.split("."):
    config = config.get(part) if isinstance(config, Mapping) else None
  return config


def flatten(mapping: Mapping[str, Any], prefix: str = ""):
  """(dotted key, value) of every leaf of a nested mapping (an empty dict is a leaf)."""
  for key, value in mapping.items():
    if isinstance(value, Mapping) and value:
      yield from flatten(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def load_config_file(path: str) -> dict[str, Any]:
  """Overrides from a Python file defining `get_config() -> dict`."""
  spec = importlib.util.spec_from_file_location("recjax_user_config", path)
  if spec is None or spec.loader is None:
    raise ConfigError(f"{path}: cannot load as a Python config file")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except FileNotFoundError as e:
    raise ConfigError(f"{path}: config file not found") from e
  except SyntaxError as e:
    raise ConfigError(f"{path}:{e.lineno}: syntax error in config file: {e.msg}") from None
  except Exception as e:   # the file's own code failed: name it, not a traceback of ours
    raise ConfigError(f"{path}: running the config file raised {type(e).__name__}: {e}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path}: a config file must define get_config() returning a dict")
  try:
    overrides = module.get_config()
  except Exception as e:
    raise ConfigError(f"{path}: get_config() raised {type(e).__name__}: {e}") from e
  if not isinstance(overrides, Mapping):
    raise ConfigError(f"{path}: get_config() must return a dict, got {type(overrides).__name__}")
  return dict(overrides)


def build_config(model: str, config_file: str | None = None, overrides: list[str] = (),
                 dataset: str | None = None, from_file: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Defaults of `model`, then the dataset's `DATASET_DEFAULTS`, then the config file's overrides,
  then `--set` strings; `dataset` (a command-line flag) names the dataset over all of them. `from_file`:
  the file's overrides when the caller has already loaded them (the file runs once)."""
  if from_file is None:
    from_file = load_config_file(config_file) if config_file else {}

  def with_user_overrides(config: dict[str, Any]) -> dict[str, Any]:
    return apply_overrides(apply_overrides(config, from_file, source=config_file or "config"), list(overrides))

  config = default_config(model)
  dataset = dataset or with_user_overrides(config)["dataset"]   # the dataset the user asked for, if any
  config = apply_overrides(config, DATASET_DEFAULTS.get(dataset, {}), source=f"defaults of dataset {dataset!r}")
  return {**with_user_overrides(config), "dataset": dataset}
