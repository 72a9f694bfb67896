"""Model registry: names -> linen Modules, built from explicit keyword arguments.

Factorised models expose `user_repr(batch, train=False) -> [B, d]`, `item_repr() -> [N, d]` (row 0 =
padding) and `__call__(batch, train=False) -> scores [B, N]` (used by `init_params`); sequential
models also `sequence_repr(seq [B, L], train=False) -> [B, L, d]` (BERT4Rec's is `[B, L, d + 1]`: a
column of ones meets the items' output biases; Caser's raises: it encodes one window, not every
position). Models that score pairs (`factorized = False`) expose `score_items(batch, items [B, C])`
instead (docs/architecture.md). Each class carries `kind` in {"general", "sequential", "ctr",
"popularity"}, which picks the batches and losses.
"""
from __future__ import annotations

import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from recjax.errors import ConfigError
from recjax.models.bert4rec import BERT4Rec
from recjax.models.caser import Caser
from recjax.models.content import TextMLP
from recjax.models.ctr import DCNv2, DeepFM, FeatureMLP, WideDeep
from recjax.models.gru4rec import GRU4Rec
from recjax.models.lightgcn import LightGCN
from recjax.models.mf import BPRMF
from recjax.models.multidomain import PLE, STAR, DomainMLP, MMoE, SharedBottom
from recjax.models.ncf import GMF, NCFMLP, NeuMF, neumf_from_pretrained
from recjax.models.ngcf import NGCF
from recjax.models.pop import Pop, pop_params
from recjax.models.sasrec import SASRec
from recjax.nn.constants import CONSTANTS
from recjax.nn.text import tower_pretrained

MODELS: dict[str, type[nn.Module]] = {"pop": Pop, "bpr": BPRMF, "sasrec": SASRec, "bert4rec": BERT4Rec,
                                     "gru4rec": GRU4Rec, "caser": Caser,
                                     "gmf": GMF, "ncf_mlp": NCFMLP, "neumf": NeuMF,
                                     "deepfm": DeepFM, "dcnv2": DCNv2, "widedeep": WideDeep, "feature_mlp": FeatureMLP,
                                     "lightgcn": LightGCN, "ngcf": NGCF, "text_mlp": TextMLP,
                                     "domain_mlp": DomainMLP, "shared_bottom": SharedBottom, "mmoe": MMoE, "ple": PLE,
                                     "star": STAR}

# Set by `create_model` itself, never a hyperparameter; `parent`/`name` are linen's own fields.
_SIZE_FIELDS = ("num_users", "num_items")
# Multi-scenario models' head counts, set by recjax.experiment.build from the data's domains and label columns.
_COUNT_FIELDS = ("num_domains", "num_tasks")
# Built from the data by recjax.experiment.build (the config's `text` section), never a config key.
_DATA_FIELDS = ("item_text",)
_LINEN_FIELDS = ("parent", "name")

__all__ = [
  "BERT4Rec",
  "BPRMF",
  "Caser",
  "DCNv2",
  "DeepFM",
  "DomainMLP",
  "FeatureMLP",
  "GMF",
  "GRU4Rec",
  "LightGCN",
  "MMoE",
  "MODELS",
  "NCFMLP",
  "NGCF",
  "NeuMF",
  "PLE",
  "Pop",
  "SASRec",
  "STAR",
  "SharedBottom",
  "TextMLP",
  "WideDeep",
  "create_model",
  "default_hparams",
  "example_batch",
  "init_params",
  "model_kind",
  "neumf_from_pretrained",
  "pop_params",
]


def _model_class(name: str) -> type[nn.Module]:
  if name not in MODELS:
    raise ConfigError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
  return MODELS[name]


def _fields(cls: type[nn.Module]) -> dict[str, dataclasses.Field]:
  return {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in _LINEN_FIELDS}


def default_hparams(name: str) -> dict:
  """The model's constructor defaults (sizes excluded), e.g. RecBole's for SASRec."""
  return {
    k: f.default
    for k, f in _fields(_model_class(name)).items()
    if k not in _SIZE_FIELDS + _DATA_FIELDS + _COUNT_FIELDS and f.default is not dataclasses.MISSING
  }


def reads_text(name: str) -> bool:
  """Whether model `name` can take item text vectors (an `item_text` field)."""
  return "item_text" in _fields(_model_class(name))


def is_multidomain(name: str) -> bool:
  """Whether model `name` predicts labels per domain and task (recjax.models.multidomain): it scores no items."""
  return getattr(_model_class(name), "multidomain", False)


def model_kind(name: str) -> str:
  """The model's kind: "general" (pair batches), "sequential" (sequence batches), "ctr" (labelled rows)
  or "popularity" (counted)."""
  return _model_class(name).kind


def create_model(name: str, /, *, num_users: int, num_items: int, **kwargs) -> nn.Module:
  """Builds model `name` with table sizes (including the padding row 0) and hyperparameters.

  Raises:
    ConfigError: unknown model name or a keyword the model does not take.
  """
  cls = _model_class(name)
  fields = _fields(cls)
  unknown = sorted(k for k in kwargs if k not in fields or k in _SIZE_FIELDS)
  if getattr(cls, "needs_text", False) and kwargs.get("item_text") is None:
    raise ConfigError(f"model {name!r} ranks items by their text: set text.model (e.g. --set text.model='minilm')")
  if unknown:
    allowed = sorted(k for k in fields if k not in _SIZE_FIELDS)
    raise ConfigError(f"model {name!r} got unknown hyperparameter(s) {unknown}; it takes {allowed}")
  _check_sizes(name, kwargs)
  missing = sorted(k for k, f in fields.items() if k not in kwargs and k not in _SIZE_FIELDS
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
  if missing:   # data-derived constants (a graph, feature tables): recjax.experiment.build supplies them
    raise ConfigError(f"model {name!r} needs {missing}, built from the training data (see recjax.experiment.build)")
  sizes = {"num_users": num_users, "num_items": num_items}
  return cls(**{k: v for k, v in sizes.items() if k in fields}, **hashable_hparams(kwargs))


# Integer hyperparameters that must be at least 1; any other integer (a layer count, `max_scored`, `adapter_dim`:
# 0 means none or all) must be at least 0, and every entry of a layer-width tuple at least 1.
_POSITIVE_HPARAMS = frozenset({"dim", "ffn_dim", "hidden_size", "max_len", "mf_dim", "mlp_dim", "num_heads",
                               "num_experts", "num_domains", "num_tasks", "num_levels"})


def _check_sizes(name: str, hparams: dict) -> None:
  """ConfigError naming `model.KEY` for a negative integer hyperparameter, or a zero size or layer width."""
  for key, value in hparams.items():
    widths = isinstance(value, (list, tuple))
    ints = [v for v in (value if widths else (value,)) if isinstance(v, int) and not isinstance(v, bool)]
    low = 1 if widths or key in _POSITIVE_HPARAMS else 0
    if any(v < low for v in ints):
      raise ConfigError(f"model.{key}: model {name!r} needs {'widths' if widths else 'a value'} >= {low}, "
                        f"got {value!r}")


def hashable_hparams(hparams: dict) -> dict:
  """Hyperparameters with JSON's lists made tuples, as module fields must be hashable."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in hparams.items()}


def example_batch(model: nn.Module, batch_size: int = 2) -> dict:
  """A padding-only evaluation batch (`user [B]`, `item [B]`, `domain [B]`, `seq [B, max_len]`) for `init` /
  shape checks."""
  max_len = getattr(model, "max_len", 1)
  return {"user": jnp.zeros((batch_size,), jnp.int32), "item": jnp.zeros((batch_size,), jnp.int32),
          "domain": jnp.zeros((batch_size,), jnp.int32), "seq": jnp.zeros((batch_size, max_len), jnp.int32)}


def model_constants(model: nn.Module) -> dict:
  """The model's data-derived arrays as a variable collection (`{"constants": ...}` of host arrays; `{}`
  for models without): feature id tables (`host_constants()` of kind "ctr" models) or the item text
  arrays of a text-aware model's `item_tower`. Passed to `apply` beside the params (`{**params,
  **constants}`) they enter compiled code as arguments (see `recjax.nn.constants`)."""
  if hasattr(model, "host_constants"):
    return model.host_constants()
  text = getattr(model, "item_text", None)
  return {} if text is None else {CONSTANTS: {"item_tower": {"text": text.arrays()}}}


def _init(model: nn.Module, rng: jax.Array, constants: dict) -> dict:
  """`model.init` with the constants given (every other collection created; none returned twice)."""
  _, variables = model.apply(constants, example_batch(model), rngs={"params": rng},
                             mutable=flax.core.DenyList((*constants, "intermediates")))
  return variables


# Initialisation runs once per model, and on CPU its compile costs as much as a train step's (~5 XLA
# kernels per parameter: key fold-in, random bits, their transform). LLVM optimisation level 1 compiles
# it in 50–80% of the time (SASRec 1.74 -> 1.41 s, GRU4Rec 1.64 -> 0.94 s, BPR-MF 0.75 -> 0.38 s) with the
# same values bit for bit (tests/test_models.py checks this) and no slower. Compiler options are allowed
# on a top-level jit only: traced inside another jit (e.g. `create_sharded`) the plain one is inlined.
_jit_init = jax.jit(_init, static_argnums=0)
_jit_init_fast_compile = jax.jit(_init, static_argnums=0, compiler_options={"xla_backend_optimization_level": 1})


def _pick_init():
  under_trace = isinstance(jnp.zeros(()), jax.core.Tracer)   # a jnp op is staged out inside a trace
  return _jit_init_fast_compile if jax.default_backend() == "cpu" and not under_trace else _jit_init


def init_params(model: nn.Module, rng: jax.Array, constants: dict | None = None) -> dict:
  """Initial parameters `{"params": ...}` of every submodule (runs `__call__` once), with fine-tuned
  text-encoder layers set to their checkpoint's values.

  Jitted with the model static, so equal models share one compilation; the model's constants are
  arguments (`constants`, by default `model_constants(model)`; a run passes the ones it already placed),
  so models over other data of the same shapes share it too.
  """
  constants = model_constants(model) if constants is None else constants
  params = _pick_init()(model, rng, constants)
  text = getattr(model, "item_text", None)
  if text is not None and text.layers:
    params = flax.core.unfreeze(params)
    params["params"]["item_tower"].update(jax.tree.map(jnp.asarray, tower_pretrained(text)))
  return params
