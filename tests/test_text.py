"""The BERT text encoder: checkpoint mapping, a plain-numpy reference forward pass, pooling, padding,
truncation, MiniLM against sentence-transformers' vectors, cached item texts, text-aware towers."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testutil import check_param_grads, random_variables

from recjax.data import text as item_text
from recjax.errors import ConfigError, DataError
from recjax.nn import text

TINY = text.BertConfig(vocab_size=32, dim=16, num_layers=2, num_heads=2, ffn_dim=32, max_positions=24,
                       dropout=0.0, attn_dropout=0.0)
WORDS = ["the", "toy", "story", "star", "wars", "of", "a", "man", "woman", "year", "genres", "comedy", "drama",
         "1995", "##s", ".", ":", ",", "(", ")", "war", "love", "night", "day", "king", "lion", "red"]


def tiny_tokenizer_json(path) -> str:
  """A WordPiece tokenizer over `WORDS`, saved as tokenizer.json (BERT's normaliser and template)."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

  vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
  assert len(vocab) == TINY.vocab_size
  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                     special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tok.save(str(path))
  return str(path)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  """A randomly initialised tiny BERT written as a Hugging Face checkpoint directory, and its params."""
  root = tmp_path_factory.mktemp("tiny_bert")

  ids = jnp.zeros((1, 4), jnp.int32)
  layer_norm_scale = lambda path: float(jax.tree_util.keystr(path).endswith("['scale']"))  # noqa: E731
  params = random_variables(text.BertEncoder(TINY).init, ids, jnp.ones_like(ids), std=0.2, seed=9,
                            mean=layer_norm_scale)   # biases and norms random too
  directory = text.save_checkpoint(root / "ckpt", TINY, params, tiny_tokenizer_json(root / "tokenizer.json"))
  return directory, params


# --- a plain-numpy BERT, written from the Hugging Face tensor names -------------------------------

def _layer_norm(x, w, b, eps=1e-12):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * w + b


_erf = np.vectorize(math.erf)


def _gelu(x, activation: str):
  if activation == "gelu_tanh":   # HF's gelu_new
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
  return 0.5 * x * (1 + _erf(x / np.sqrt(2)))


def numpy_bert(w: dict, config: text.BertConfig, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Token states [B, T, d] of BertModel, in float64, with HF's additive attention mask."""
  w = {k: v.astype(np.float64) for k, v in w.items() if v.dtype != np.int64}
  B, T = ids.shape
  H, dh = config.num_heads, config.dim // config.num_heads
  x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:T][None]
       + w["embeddings.token_type_embeddings.weight"][0])
  eps = config.layer_norm_eps
  x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
  additive = (1.0 - mask[:, None, None, :]) * -1e9
  for i in range(config.num_layers):
    p = f"encoder.layer.{i}."
    lin = lambda h, n: h @ w[p + n + ".weight"].T + w[p + n + ".bias"]  # noqa: E731
    heads = lambda h: h.reshape(B, T, H, dh).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = (heads(lin(x, f"attention.self.{n}")) for n in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh) + additive
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, config.dim)
    x = _layer_norm(x + lin(context, "attention.output.dense"), w[p + "attention.output.LayerNorm.weight"],
                    w[p + "attention.output.LayerNorm.bias"], eps)
    hidden = _gelu(lin(x, "intermediate.dense"), config.activation)
    x = _layer_norm(x + lin(hidden, "output.dense"), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"],
                    eps)
  return x


def test_flax_bert_equals_numpy_reference_on_a_saved_checkpoint(tiny_checkpoint):
  from safetensors.numpy import load_file

  directory, _ = tiny_checkpoint
  encoder = text.load_text_encoder(directory)
  ids, mask = encoder.tokenizer(["the toy story", "star wars of a king . day night love", "lion"])
  ours, _ = text.BertEncoder(TINY).apply(encoder.params, ids, mask)
  theirs = numpy_bert(load_file(str(directory / "model.safetensors")), TINY, ids, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], theirs[real], atol=2e-5)
  pooled = np.asarray(text.encode(encoder, ["the toy story"]))[0]
  expected = theirs[0][real[0]].mean(0)
  np.testing.assert_allclose(pooled, expected / np.linalg.norm(expected), atol=2e-5)


def test_config_json_sets_the_norm_epsilon_and_the_gelu_form(tmp_path, tiny_checkpoint):
  """A checkpoint with layer_norm_eps 1e-3 and hidden_act gelu_new (tanh GELU) is computed with them."""
  from safetensors.numpy import load_file

  config = dataclasses.replace(TINY, layer_norm_eps=1e-3, activation="gelu_tanh")
  directory = text.save_checkpoint(tmp_path / "ckpt", config, tiny_checkpoint[1], tiny_checkpoint[0] / "tokenizer.json")
  encoder = text.load_text_encoder(directory)
  assert encoder.config == config
  ids, mask = encoder.tokenizer(["the toy story", "star wars of a king . day night love"])
  ours, _ = text.BertEncoder(encoder.config).apply(encoder.params, ids, mask)
  weights = load_file(str(directory / "model.safetensors"))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], numpy_bert(weights, config, ids, mask)[real], atol=2e-5)
  assert np.abs(np.asarray(ours)[real] - numpy_bert(weights, TINY, ids, mask)[real]).max() > 1e-3   # it matters


def test_saved_and_loaded_back_gives_identical_outputs(tiny_checkpoint):
  directory, params = tiny_checkpoint
  encoder = text.load_text_encoder(directory)
  ids, mask = encoder.tokenizer(["the toy story", "star wars"])
  before = text.BertEncoder(TINY).apply(params, ids, mask)
  after = text.BertEncoder(TINY).apply(encoder.params, ids, mask)
  for a, b in zip(before, after):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert encoder.pooling == "mean" and encoder.normalize   # no sentence-transformers files: the defaults


def test_weight_map_covers_every_parameter_once():
  params = text.BertEncoder(TINY).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32))
  mapped = [path for _, path, _, _ in text.weight_map(TINY)]
  leaves = [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params["params"])]
  assert sorted(mapped) == sorted(leaves) and len(set(mapped)) == len(mapped)


def test_checkpoint_with_unused_or_missing_tensors_is_refused(tiny_checkpoint):
  directory, params = tiny_checkpoint
  weights = text.params_to_hf(params, TINY)
  with pytest.raises(DataError, match="unused.*cls.predictions.bias"):
    text.hf_to_params({**weights, "cls.predictions.bias": np.zeros(32, np.float32)}, TINY)
  transposed = weights["encoder.layer.0.intermediate.dense.weight"].T   # [in, out]: the same size, another shape
  with pytest.raises(DataError, match=r"intermediate.dense.weight of shape \(16, 32\).*expected \(32, 16\)"):
    text.hf_to_params({**weights, "encoder.layer.0.intermediate.dense.weight": transposed}, TINY)
  weights.pop("encoder.layer.1.output.dense.bias")
  with pytest.raises(DataError, match="missing.*encoder.layer.1.output.dense.bias"):
    text.hf_to_params(weights, TINY)
  wrong = text.params_to_hf(params, TINY)
  wrong["pooler.dense.weight"] = np.zeros((16, 8), np.float32)
  with pytest.raises(DataError, match=r"pooler.dense.weight of shape \(16, 8\)"):
    text.hf_to_params(wrong, TINY)
  # A task head's `bert.` prefix and TF-era gamma/beta names map to the same params.
  renamed = {("bert." + k).replace("LayerNorm.weight", "LayerNorm.gamma"): v
             for k, v in text.params_to_hf(params, TINY).items()}
  loaded = text.hf_to_params(renamed, TINY)
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))


def test_padding_does_not_change_the_pooled_vector(tiny_checkpoint):
  encoder = text.load_text_encoder(tiny_checkpoint[0])
  alone = text.encode(encoder, ["the toy story"], batch_size=1)
  padded = text.encode(encoder, ["the toy story", "star wars of a king . day night love lion red war"], batch_size=2)
  np.testing.assert_allclose(alone[0], padded[0], atol=1e-6)
  ids, mask = encoder.tokenizer(["the toy story"])
  wide_ids = np.concatenate([ids, np.zeros((1, 9), np.int32)], 1)
  wide_mask = np.concatenate([mask, np.zeros((1, 9), np.int32)], 1)
  states, _ = text.BertEncoder(TINY).apply(encoder.params, wide_ids, wide_mask)
  np.testing.assert_allclose(np.asarray(text.sentence_vectors(states, wide_mask))[0], alone[0], atol=1e-6)


def test_tokenizer_truncates_to_max_length(tiny_checkpoint):
  encoder = text.load_text_encoder(tiny_checkpoint[0])
  tokenizer = text.TextTokenizer.from_file(tiny_checkpoint[0] / "tokenizer.json", max_length=10)
  ids, mask = tokenizer(["the toy story " * 20, "lion"])
  assert ids.shape == (2, 10) and mask[0].sum() == 10 and mask[1].sum() == 3
  assert ids[0, 0] == 2 and ids[0, 9] == 3        # [CLS] ... [SEP]: truncation keeps the special tokens
  long = "the toy story " * 40                       # 120 words > max_positions = 24: the checkpoint's limit holds
  assert encoder.tokenizer.max_length == TINY.max_positions
  vectors = text.encode(encoder, [long, "lion"])
  assert np.all(np.isfinite(vectors)) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_bad_checkpoint_directories_say_what_is_wrong(tmp_path, tiny_checkpoint, monkeypatch):
  with pytest.raises(ConfigError, match="not a directory"):
    text.load_text_encoder(tmp_path / "nowhere")
  (tmp_path / "all-MiniLM-L6-v2").mkdir()   # a local clone named like the built-in checkpoint is read as given
  monkeypatch.chdir(tmp_path)
  assert text.checkpoint_dir("all-MiniLM-L6-v2") == Path("all-MiniLM-L6-v2")
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(DataError, match="a text checkpoint needs model.safetensors"):
    text.load_text_encoder(tmp_path)
  (tmp_path / "model.safetensors").write_bytes(b"garbage")
  (tmp_path / "tokenizer.json").write_text((tiny_checkpoint[0] / "tokenizer.json").read_text())
  with pytest.raises(DataError, match="config.json.*not valid JSON"):
    text.load_text_encoder(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf()))
  with pytest.raises(DataError, match="model.safetensors.*cannot be read"):
    text.load_text_encoder(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**TINY.to_hf(), "position_embedding_type": "relative_key"}))
  with pytest.raises(DataError, match="absolute positions"):
    text.load_text_encoder(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**TINY.to_hf(), "model_type": "roberta"}))   # other positions
  with pytest.raises(DataError, match="model_type 'roberta'"):
    text.load_text_encoder(tmp_path)


def test_tokenizer_past_the_word_table_is_refused_and_do_lower_case_is_honoured(tmp_path, tiny_checkpoint):
  import shutil

  from tokenizers import Tokenizer, normalizers

  directory = shutil.copytree(tiny_checkpoint[0], tmp_path / "ckpt")
  tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
  tok.add_tokens(["newword"])   # id 32: no row of the 32-row word table (it would embed as NaN)
  tok.save(str(directory / "tokenizer.json"))
  with pytest.raises(DataError, match="tokenizer.json: has 33 tokens, more than the 32 rows"):
    text.load_text_encoder(directory)
  cased = Tokenizer.from_file(str(tiny_checkpoint[0] / "tokenizer.json"))
  cased.normalizer = normalizers.BertNormalizer(lowercase=False)   # its vocabulary is lower case
  cased.save(str(directory / "tokenizer.json"))
  lower = text.load_text_encoder(tiny_checkpoint[0]).tokenizer(["toy story"])[0]
  assert (text.load_text_encoder(directory).tokenizer(["Toy Story"])[0][0, 1:3] == 1).all()   # [UNK] [UNK]
  (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24, "do_lower_case": True}))
  np.testing.assert_array_equal(text.load_text_encoder(directory).tokenizer(["Toy Story"])[0], lower)


def test_sentence_transformers_modules_this_encoder_does_not_compute_are_refused(tmp_path, tiny_checkpoint):
  import shutil

  directory = shutil.copytree(tiny_checkpoint[0], tmp_path / "ckpt")
  (directory / "1_Pooling").mkdir(exist_ok=True)
  modules = [{"type": f"sentence_transformers.models.{kind}"} for kind in ("Transformer", "Pooling", "Normalize")]
  (directory / "modules.json").write_text(json.dumps(modules))
  pooling = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False}
  (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
  assert text.load_text_encoder(directory).pooling == "mean"
  (directory / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "pooling_mode_max_tokens": True}))
  with pytest.raises(DataError, match="pooling modes .*max_tokens.*only mean or \\[CLS\\] pooling, alone"):
    text.load_text_encoder(directory)
  (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
  dense = modules[:2] + [{"type": "sentence_transformers.models.Dense"}] + modules[2:]
  (directory / "modules.json").write_text(json.dumps(dense))
  with pytest.raises(DataError, match="modules \\['Dense'\\] are not supported"):
    text.load_text_encoder(directory)


# --- the real all-MiniLM-L6-v2 --------------------------------------------------------------------

def test_minilm_mapping_uses_every_tensor(minilm_dir):
  from safetensors.numpy import load_file

  weights = load_file(str(minilm_dir / "model.safetensors"))
  config = text.BertConfig.from_hf(json.loads((minilm_dir / "config.json").read_text()))
  mapped = {hf for hf, _, _, _ in text.weight_map(config)}
  assert set(weights) == mapped | {"embeddings.position_ids"}   # the one buffer, checked and dropped
  text.hf_to_params(weights, config)   # strict: raises on anything missing or unused


def test_minilm_reproduces_sentence_transformers_on_ml100k_titles(minilm_dir, reference_dir, data_dir):
  from recjax.data.datasets import load_dataset

  with open(reference_dir / "minilm" / "ml-100k-titles.tsv", newline="") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
  reference = np.load(reference_dir / "minilm" / "ml-100k-titles.npy")
  inter = load_dataset("ml-100k", data_dir).interactions
  titles = item_text.item_texts(inter, ["movie_title"])
  by_raw_id = {raw: titles[i] for i, raw in enumerate(inter.item_vocab)}
  ours_text = [by_raw_id[item_id] for item_id, _ in rows]
  assert ours_text == [t for _, t in rows]   # recjax's title texts are the reference's, verbatim
  vectors = text.encode(text.load_text_encoder(minilm_dir), ours_text)
  cosine = np.sum(vectors * reference, 1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
  assert len(cosine) == 1682 and cosine.min() >= 0.9999, np.argsort(cosine)[:5]


# --- item texts and their cache -------------------------------------------------------------------

def _items_with_text():
  from recjax.data.interactions import Interactions

  features = {"movie_title": np.array([(), ("Toy", "Story"), ("Heat",), ()], dtype=object),
              "release_year": np.array(["", "1995", "", ""], dtype=object),
              "class": np.array([(), ("Comedy", "Drama"), ("Crime",), ()], dtype=object)}
  return Interactions(user=np.array([1, 1, 2], np.int32), item=np.array([1, 2, 3], np.int32),
                      user_vocab=np.array(["[PAD]", "a", "b"], dtype=object),
                      item_vocab=np.array(["[PAD]", "i1", "i2", "i3"], dtype=object), item_features=features,
                      name="tiny")


def test_item_texts_from_side_columns():
  inter = _items_with_text()
  assert item_text.item_texts(inter) == ("", "Toy Story. year: 1995. genres: Comedy, Drama", "Heat. genres: Crime", "")
  assert item_text.item_texts(inter, ["movie_title"]) == ("", "Toy Story", "Heat", "")
  inter.item_features["release_year"] = np.array([np.nan, 1995, np.nan, 1995.5], np.float32)   # a float column
  assert item_text.item_texts(inter) == ("", "Toy Story. year: 1995. genres: Comedy, Drama", "Heat. genres: Crime",
                                         "year: 1995.5")
  with pytest.raises(ConfigError, match="unknown item column.*'plot'"):
    item_text.item_texts(inter, ["plot"])
  inter.item_features.clear()
  with pytest.raises(DataError, match="tiny: has no item side file"):
    item_text.item_texts(inter)


def test_item_text_vectors_are_cached_by_checkpoint_and_text(tmp_path, tiny_checkpoint, monkeypatch):
  inter = _items_with_text()
  first = item_text.item_text_vectors(inter, str(tiny_checkpoint[0]), cache=tmp_path)
  assert first.vectors.shape == (4, TINY.dim) and first.path.is_file()
  assert not first.vectors[0].any() and not first.vectors[3].any()   # padding and an item without text: 0
  np.testing.assert_allclose(np.linalg.norm(first.vectors[1:3], axis=1), 1, atol=1e-5)

  def fail(*args, **kwargs):
    raise AssertionError("encoded again although cached")

  monkeypatch.setattr(text, "encode", fail)
  again = item_text.item_text_vectors(inter, str(tiny_checkpoint[0]), cache=tmp_path)
  np.testing.assert_array_equal(again.vectors, first.vectors)
  monkeypatch.undo()
  titles = item_text.item_text_vectors(inter, str(tiny_checkpoint[0]), ["movie_title"], cache=tmp_path)
  assert titles.path != first.path   # other texts, another entry
  for damage in (b"damaged", b""):   # a damaged or empty entry is encoded again
    first.path.write_bytes(damage)
    np.testing.assert_array_equal(
        item_text.item_text_vectors(inter, str(tiny_checkpoint[0]), cache=tmp_path).vectors, first.vectors)
  other = text.save_checkpoint(tmp_path / "other", TINY, jax.tree.map(lambda a: a * 1.5, tiny_checkpoint[1]),
                               tiny_checkpoint[0] / "tokenizer.json")
  retrained = item_text.item_text_vectors(inter, str(other), cache=tmp_path)
  assert retrained.path != first.path and not np.allclose(retrained.vectors, first.vectors)   # another checkpoint


def test_an_interrupted_cache_write_leaves_nothing(tmp_path, monkeypatch):
  def save_half(path, array):
    Path(path).write_bytes(b"\x93NUMPY half")
    raise KeyboardInterrupt

  monkeypatch.setattr(item_text.np, "save", save_half)
  with pytest.raises(KeyboardInterrupt):
    item_text._save_atomic(tmp_path / "entry.npy", np.zeros(3))
  assert list(tmp_path.iterdir()) == []


# --- text-aware item towers -----------------------------------------------------------------------

def _table(tiny_checkpoint, finetune_layers=0, use_id=True):
  encoder = text.load_text_encoder(tiny_checkpoint[0])
  texts = ("", "the toy story", "star wars", "lion king", "")
  vectors = np.zeros((5, TINY.dim), np.float32)
  vectors[1:4] = text.encode(encoder, texts[1:4])
  id_mask = np.array([0, 1, 1, 0, 1], np.float32)   # item 3: never trained (cold)
  return text.item_text_table(vectors, id_mask, use_id=use_id, encoder=encoder, texts=texts,
                              finetune_layers=finetune_layers)


def test_tower_represents_untrained_items_by_text_alone(tiny_checkpoint):
  tower = text.TextItemTower(5, 8, _table(tiny_checkpoint))
  params = tower.init(jax.random.PRNGKey(0))
  grads = jax.grad(lambda p: jnp.sum(tower.apply(p) ** 2))(params)["params"]["id_embedding"]["embedding"]
  assert not np.any(grads[3]) and not np.any(grads[0]) and np.all(np.any(np.asarray(grads)[[1, 2, 4]] != 0, axis=1))
  table = tower.apply(params)
  projected = tower.apply(params, method=lambda m: m.mlp[0](m.text_vectors()))
  np.testing.assert_allclose(table[3], projected[3], rtol=1e-6)
  assert not np.any(table[0])


def test_finetuned_tower_starts_from_the_checkpoint_and_has_correct_gradients(tiny_checkpoint):
  from recjax import models

  frozen = _table(tiny_checkpoint)
  tuned = _table(tiny_checkpoint, finetune_layers=1)
  model = models.create_model("bpr", num_users=3, num_items=5, dim=8, item_text=tuned)
  params = models.init_params(model, jax.random.PRNGKey(0))
  encoder = text.load_text_encoder(tiny_checkpoint[0])
  jax.tree.map(np.testing.assert_array_equal, params["params"]["item_tower"]["encoder_layer_0"],
               jax.tree.map(np.asarray, encoder.params["params"]["layer_1"]))
  tower = model.bind(params).item_tower
  np.testing.assert_allclose(tower.text_vectors(), frozen.vectors, atol=1e-5)   # the frozen vectors at step 0
  weights = jax.random.normal(jax.random.PRNGKey(1), (5, 8))
  constants = models.model_constants(model)   # the text arrays as arguments give the same table
  assert set(constants["constants"]["item_tower"]["text"]) == {"id_mask", "states", "token_mask", "has_text"}
  item_repr = jax.jit(lambda variables: model.apply(variables, method=lambda m: m.item_repr()))
  np.testing.assert_array_equal(item_repr({**params, **constants}), item_repr(params))
  check_param_grads(lambda p: jnp.sum(model.apply(p, method=lambda m: m.item_repr()) * weights), params)


def test_finetuning_updates_encoder_layers_inside_the_jitted_step(tiny_checkpoint):
  import optax

  from recjax import models, tasks
  from recjax.train import create_train_state, make_train_step

  model = models.create_model("sasrec", num_users=3, num_items=5, max_len=4, dim=8, num_heads=2, ffn_dim=16,
                              item_text=_table(tiny_checkpoint, finetune_layers=1))
  state = create_train_state(models.init_params(model, jax.random.PRNGKey(0)), optax.adam(1e-2), jax.random.PRNGKey(1))
  step = make_train_step(tasks.create_loss_fn("sequential", "ce", model=model), optax.adam(1e-2),
                         constants=models.model_constants(model))   # the cached states as arguments, as in a run
  before = jax.tree.map(np.array, state.params["params"]["item_tower"]["encoder_layer_0"])
  batch = {"seq": np.array([[0, 1, 2, 4]], np.int32), "pos": np.array([[0, 2, 4, 1]], np.int32),
           "neg": np.zeros((1, 4, 1), np.int32), "user": np.array([1], np.int32),
           "weight": np.array([[0, 1, 1, 1]], np.float32)}
  state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  after = state.params["params"]["item_tower"]["encoder_layer_0"]
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), after, before))
  assert all(changed)


def test_models_that_read_text_and_those_that_do_not(tiny_checkpoint):
  from recjax import models

  assert models.reads_text("sasrec") and models.reads_text("bpr") and models.reads_text("text_mlp")
  assert not models.reads_text("lightgcn")
  assert "item_text" not in models.default_hparams("sasrec")   # built from data, never a config key
  with pytest.raises(ConfigError, match="text.model"):
    models.create_model("text_mlp", num_users=3, num_items=5)
  model = models.create_model("text_mlp", num_users=3, num_items=5, dim=8, hidden=(12,),
                              item_text=_table(tiny_checkpoint, use_id=False))
  scores = model.apply(models.init_params(model, jax.random.PRNGKey(0)), models.example_batch(model))
  assert scores.shape == (2, 5)
