"""Multi-scenario runs end to end: per-domain metrics and sizes in metrics.json, one model per domain,
fine-tuning with the shared part frozen, clear errors; and the acceptance check on the synthetic data:
multi-scenario models beat one model for all and one model per domain on the small domains."""
from __future__ import annotations

import json

import numpy as np
import pytest
from flax import traverse_util

from recjax.config import apply_overrides, build_config
from recjax.data import datasets, domains
from recjax.errors import ConfigError
from recjax.experiment import restore_best_params, train
from recjax.models.multidomain import param_group


def _use_multidomain(monkeypatch, domain_rows: tuple[int, ...], num_users: int, num_items: int, seed: int) -> None:
  """The registry's synthetic-multidomain replaced by a draw of these sizes."""
  spec = datasets.DATASETS["synthetic-multidomain"]
  data = domains.make_multidomain(domain_rows, num_users=num_users, num_items=num_items, seed=seed)[0]
  monkeypatch.setitem(datasets.DATASETS, spec.name,
                      datasets.DatasetSpec(spec.name, spec.description, lambda data_dir: datasets.LoadedDataset(data)))


@pytest.fixture
def small_multidomain(monkeypatch):
  """synthetic-multidomain, smaller (2 big, 2 small domains) so runs take seconds."""
  _use_multidomain(monkeypatch, (4000, 4000, 600, 600), num_users=400, num_items=200, seed=0)


def _config(model: str, overrides: dict | None = None):
  """The model's config on synthetic-multidomain, 2 epochs, then `overrides` (dotted keys)."""
  config = apply_overrides(build_config(model, dataset="synthetic-multidomain"), {"epochs": 2, "batch_size": 256})
  return apply_overrides(config, overrides or {})


def test_run_reports_every_domain_and_task(small_multidomain, tmp_path):
  metrics = train(_config("mmoe"), tmp_path / "mmoe", log=lambda line: None)
  names = ("d0", "d1", "d2", "d3")
  assert metrics["domain_sizes"] == {"d0": {"train": 3200, "valid": 400, "test": 400},
                                     "d1": {"train": 3200, "valid": 400, "test": 400},
                                     "d2": {"train": 480, "valid": 60, "test": 60},
                                     "d3": {"train": 480, "valid": 60, "test": 60}}
  for metric in ("auc", "gauc", "logloss"):
    for task in ("click", "like"):
      # GAUC needs users with both classes: the small domains' 60 test rows over 400 users have none
      assert all(f"{metric}:{task}/{d}" in metrics["test"] for d in (names[:2] if metric == "gauc" else names))
    assert metrics["test"][metric] == pytest.approx(
        (metrics["test"][f"{metric}:click"] + metrics["test"][f"{metric}:like"]) / 2)
  assert json.loads((tmp_path / "mmoe" / "metrics.json").read_text())["test"] == pytest.approx(metrics["test"])


def test_one_model_per_domain_and_frozen_fine_tuning(small_multidomain, tmp_path):
  source = tmp_path / "all"
  trained = train(_config("mmoe"), source, log=lambda line: None)
  # 0 epochs from a finished run: the run's parameters, in train and in a later evaluate alike
  copied = _config("mmoe", {"epochs": 0, "finetune.from_run": str(source)})
  assert train(copied, tmp_path / "copy", log=lambda line: None)["test"] == pytest.approx(trained["test"])
  from recjax.experiment import build, make_evaluator
  exp = build(copied)
  assert make_evaluator(exp, "test")(restore_best_params(exp, tmp_path / "copy")) == pytest.approx(trained["test"])
  only = train(_config("domain_mlp", {"domain.only": "d2"}), tmp_path / "d2", log=lambda line: None)
  assert only["domain_sizes"]["d2"] == {"train": 480, "valid": 60, "test": 60}
  assert only["domain_sizes"]["d0"]["test"] == 0 and "auc/d0" not in only["test"]
  tuned = _config("mmoe", {"domain.only": "d3", "finetune.from_run": str(source), "finetune.trainable": "domain"})
  tuned_metrics = train(tuned, tmp_path / "tuned", log=lambda line: None)
  # a fine-tuned run is a source too (its checkpoint holds the partitioned optimizer's state)
  chained = _config("mmoe", {"domain.only": "d3", "finetune.from_run": str(tmp_path / "tuned"), "epochs": 0})
  assert train(chained, tmp_path / "chained", log=lambda line: None)["test"] == pytest.approx(tuned_metrics["test"])
  before = traverse_util.flatten_dict(restore_best_params(build(_config("mmoe")), source)["params"])
  after = traverse_util.flatten_dict(restore_best_params(build(tuned), tmp_path / "tuned")["params"])
  moved = {param_group(path) for path in before if not np.array_equal(before[path], after[path])}
  assert moved == {"domain"}                     # the shared experts and embeddings stayed as trained
  bad = _config("mmoe", {"finetune.from_run": str(tmp_path / "d2")})
  with pytest.raises(ConfigError, match="model.name='domain_mlp'"):
    train(bad, tmp_path / "bad", log=lambda line: None)
  record = source / "split.json"   # a source whose rows were split otherwise (as if its data had differed)
  record.write_text(json.dumps({**json.loads(record.read_text()), "fingerprint": "0" * 64}))
  with pytest.raises(ConfigError, match="finetune.from_run: .* trained on another split"):
    train(copied, tmp_path / "other", log=lambda line: None)


def test_errors_name_the_missing_piece(small_multidomain, tmp_path):
  with pytest.raises(ConfigError, match="needs domains: set domain.rule"):
    train(_config("mmoe", {"domain.rule": None}), tmp_path / "a")
  with pytest.raises(ConfigError, match="unknown domain 'd9'"):
    train(_config("star", {"domain.only": "d9"}), tmp_path / "b")
  with pytest.raises(ConfigError, match="leaves nothing to train"):
    train(_config("domain_mlp", {"finetune.trainable": "adapters"}), tmp_path / "c")
  # refused before training: a ranking protocol or pair training for a model that only predicts labels, a
  # one-label model for two tasks, a valid_metric of a domain or task the run does not have
  for model, overrides, message in [("mmoe", {"protocol": "recbole-general"}, "does not score items"),
                                    ("mmoe", {"training": "pairs"}, "training='labeled', not protocol 'multidomain'"),
                                    ("deepfm", {}, "several tasks need a multi-task model"),
                                    ("mmoe", {"valid_metric": "auc/d9"}, "no domain 'd9'"),
                                    ("mmoe", {"valid_metric": "auc:view/d2"}, "no task 'view'"),
                                    ("domain_mlp", {"domain.only": "d2", "valid_metric": "auc/d3"},
                                     r"no domain 'd3' \(domains: \['d2'\]\)")]:
    with pytest.raises(ConfigError, match=message):
      train(_config(model, overrides), tmp_path / "d", log=lambda line: None)
  assert not (tmp_path / "d").exists()
  assert train(_config("mmoe", {"valid_metric": "auc/d2", "epochs": 1}), tmp_path / "e",
               log=lambda line: None)["valid"]["auc/d2"] > 0


def test_a_plain_ctr_model_is_reported_per_domain_on_ml100k(data_dir, tmp_path):
  config = build_config("deepfm", dataset="ml-100k")
  config.update(data_dir=str(data_dir), epochs=1, protocol="multidomain")
  config["domain"] = {**config["domain"], "rule": "item_genre_group"}
  metrics = train(config, tmp_path / "deepfm", log=lambda line: None)
  genres = ("action", "children", "comedy", "drama", "horror", "scifi")
  assert sorted(metrics["domain_sizes"]) == list(genres)
  assert sum(sum(s.values()) for s in metrics["domain_sizes"].values()) == 100000
  assert all(0.5 < metrics["test"][f"auc/{g}"] < 1 for g in genres)


def test_ranking_metrics_per_domain_add_up_under_leave_one_out(data_dir):
  config = build_config("pop", dataset="ml-100k")
  config.update(data_dir=str(data_dir), protocol="recbole-sequential")
  config["domain"] = {**config["domain"], "rule": "item_genre_group"}
  metrics = train(config, None, log=lambda line: None)
  sizes = {name: size["test"] for name, size in metrics["domain_sizes"].items()}
  assert sum(sizes.values()) == 943                  # one test item per user, so one domain per user
  for key in ("ndcg@10", "hit@10", "mrr@10"):
    weighted = sum(sizes[d] * metrics["test"][f"{key}/{d}"] for d in sizes) / 943
    assert metrics["test"][key] == pytest.approx(weighted, rel=1e-5)
  assert len({round(metrics["test"][f"ndcg@10/{d}"], 6) for d in sizes}) == len(sizes)


SMALL_DOMAINS = ("d2", "d3")
# What the generator makes possible (make_multidomain: shared and domain-specific weights 1.5; here 8,000
# rows in each big domain and 2,000 in each small one, 10 epochs): on the small domains, every
# multi-scenario model's test AUC (mean over the two small domains and the click and like tasks) beats
# both one model for all and one model per domain by at least this much, for each of the seeds.
MARGIN = 0.01


def _small_domain_auc(metrics: dict, domain: str) -> float:
  return (metrics["test"][f"auc:click/{domain}"] + metrics["test"][f"auc:like/{domain}"]) / 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_scenario_models_beat_both_baselines_on_the_small_domains(monkeypatch, seed):
  _use_multidomain(monkeypatch, (8000, 8000, 2000, 2000), num_users=600, num_items=300, seed=seed)

  def auc(model: str, overrides: dict | None = None) -> dict[str, float]:
    config = _config(model, {"seed": seed, "epochs": 10, "batch_size": 512, **(overrides or {})})
    metrics = train(config, None, log=lambda line: None)
    return {d: _small_domain_auc(metrics, d) for d in SMALL_DOMAINS if f"auc:click/{d}" in metrics["test"]}

  one_for_all = np.mean(list(auc("domain_mlp").values()))
  per_domain = np.mean([auc("domain_mlp", {"domain.only": d})[d] for d in SMALL_DOMAINS])
  for model in ("mmoe", "ple", "star"):
    ours = np.mean(list(auc(model).values()))
    assert ours >= max(one_for_all, per_domain) + MARGIN, (model, ours, one_for_all, per_domain)


def test_one_task_from_the_rating_rule(small_multidomain):
  metrics = train(_config("star", {"label_columns": None, "epochs": 1}), None, log=lambda line: None)
  assert {f"auc/d{k}" for k in range(4)} <= set(metrics["test"]) and "auc:click" not in metrics["test"]
