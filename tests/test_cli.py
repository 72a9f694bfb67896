"""End-to-end runs of the `recjax` command: outputs, bad input, resume after SIGKILL, real data."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from testutil import host_devices_env

from recjax.cli import main
from recjax.config import apply_overrides, build_config, default_config
from recjax.errors import ConfigError

SMALL_SASREC = ["--set", "model.dim=32", "--set", "model.ffn_dim=64", "--set", "model.dropout=0.2",
                "--set", "model.attn_dropout=0.2", "--set", "eval_every=5"]


def run_cli(*args: str) -> int:
  return main([str(a) for a in args])


def read_metrics(out: Path) -> dict:
  return json.loads((out / "metrics.json").read_text())


def test_train_writes_every_output(tmp_path):
  out = tmp_path / "bpr"
  assert run_cli("train", "bpr", "--dataset", "synthetic", "--epochs", "3", "--out", out) == 0
  for name in ("config.json", "log.jsonl", "metrics.json", "curves.png"):
    assert (out / name).exists(), name
  assert (out / "checkpoints" / "best").is_dir()
  metrics = read_metrics(out)
  assert set(metrics) >= {"valid", "test", "train_epoch_s", "eval_s", "epochs_run"}
  assert metrics["epochs_run"] == 3 and "ndcg@10" in metrics["test"]
  assert len((out / "log.jsonl").read_text().splitlines()) == 3
  # A second train into the same folder must not overwrite it.
  assert run_cli("train", "bpr", "--dataset", "synthetic", "--epochs", "3", "--out", out) == 2


def test_sasrec_beats_popularity_on_synthetic(tmp_path):
  assert run_cli("train", "pop", "--dataset", "synthetic", "--protocol", "recbole-sequential",
                 "--out", tmp_path / "pop") == 0
  assert run_cli("train", "sasrec", "--dataset", "synthetic", "--epochs", "10", *SMALL_SASREC,
                 "--out", tmp_path / "sasrec") == 0
  pop, sasrec = read_metrics(tmp_path / "pop")["test"], read_metrics(tmp_path / "sasrec")["test"]
  assert sasrec["ndcg@10"] > 2 * pop["ndcg@10"], (sasrec, pop)


def test_evaluate_reproduces_the_run_metrics(tmp_path, capsys):
  out = tmp_path / "bpr"
  run_cli("train", "bpr", "--dataset", "synthetic", "--epochs", "2", "--out", out)
  capsys.readouterr()
  assert run_cli("evaluate", "--run", out) == 0
  evaluated = json.loads(capsys.readouterr().out)
  assert evaluated["test"] == pytest.approx(read_metrics(out)["test"], rel=1e-6)


@pytest.mark.parametrize("args, message", [
    (["train", "bpr", "--set", "model.dimm=3"], "unknown config key 'model.dimm'"),
    (["train", "bpr", "--set", "learning_rate='fast'"], "learning_rate expects float"),
    (["train", "bpr", "--set", "nonsense"], "expected key=value"),
    (["train", "nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["train", "bpr", "--dataset", "nosuchdata"], "unknown dataset"),
    (["train", "bpr", "--protocol", "nosuchprotocol"], "unknown protocol"),
    (["train", "bpr", "--set", "loss='hinge'"], "unknown loss 'hinge'"),
    (["train", "bpr", "--set", "preprocess.user_core=100000"], "no interactions left"),
    (["train", "bpr", "--set", "preprocess.item_core=-1"], "preprocess.item_core must be a count >= 0"),
    (["train", "gru4rec", "--set", "loss='gbce'", "--set", "gbce_t=2.0"], "loss 'gbce'"),
    (["train", "sasrec", "--set", "negative_distribution='zipf'"], "negative_distribution"),
    (["train", "bpr", "--set", "devices=1", "--set", "model_parallel=3"], "model_parallel=3 does not divide"),
    (["train", "bpr", "--set", "devices=64"],
     "are visible (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=64 set"),
    (["train", "deepfm", "--set", "rating_normalization='zscore'"], "rating_normalization applies to rating "
                                                                     "regression (--protocol rating), not to protocol"),
    (["train", "bpr", "--set", "grad_accum=3"], "grad_accum=3 must divide batch_size=2048"),
    (["train", "bpr", "--set", "compute_dtype='float16'"], "compute_dtype"),
    (["train", "bpr", "--set", "pair_sampling='items'"], "pair_sampling: expected one of ('rows', 'users')"),
    (["train", "bpr", "--set", "cpu_devices=0"], "cpu_devices must be a positive count, got 0"),
    (["train", "bpr", "--num-processes", "2"], "without a coordinator"),
    (["train", "bpr", "--set", "eval_every=0"], "eval_every must be a positive count, got 0"),
    (["train", "bpr", "--set", "batch_size=0"], "batch_size must be a positive count"),
    (["train", "bpr", "--set", "learning_rate=-0.001"], "learning_rate must be a rate > 0"),
    (["train", "bpr", "--set", "patience=-1"], "patience must be a count >= 0"),
    (["train", "sasrec", "--set", "adam_b2=1.0"], "adam_b2 must be a decay rate in [0, 1)"),
    (["train", "bpr", "--seed", "-1"], "--seed: seed must be an integer in [0, 2^32), got -1"),
    (["train", "bpr", "--seed", "99999999999999999999999"], "seed must be an integer in [0, 2^32)"),
    (["train", "bpr", "--set", "preprocess=None"], "preprocess expects dict, got None"),
    (["train", "bpr", "--set", "model.dim=None"], "model.dim expects int, got None"),
    (["train", "bpr", "--set", "learning_rate=1e999"], "learning_rate must be a finite number, got inf"),
    (["train", "bpr", "--set", "eval_cpu_cache_mb=0"], "eval_cpu_cache_mb must be a positive count, got 0"),
    (["train", "bpr", "--set", "num_negatives=0"], "num_negatives must be a positive count, got 0"),
    (["train", "bpr", "--set", "model.dim=0"], "model.dim: model 'bpr' needs a value >= 1, got 0"),
    (["train", "ncf_mlp", "--set", "model.hidden=(64, 0)"], "model.hidden: model 'ncf_mlp' needs widths >= 1"),
    (["train", "sasrec", "--set", "model.dropout=1.5"], "model.dropout must be a rate in [0, 1), got 1.5"),
    (["train", "gru4rec", "--set", "model.dropout=-0.1"], "model.dropout must be a rate in [0, 1), got -0.1"),
    (["train", "sasrec", "--set", "window_stride=51"], "window_stride must be in [1, max_len=50], got 51"),
    (["train", "bpr", "--set", "lr_warmup_steps=2147483648"], "lr_warmup_steps (2147483648) and the decay's"),
    (["train", "lightgcn", "--protocol", "lightgcn", "--set", "preprocess.user_core=5"],
     "protocol 'lightgcn' evaluates the dataset's given split as it is: preprocess.user_core cannot apply"),
])
def test_bad_input_is_one_clear_error(tmp_path, capsys, args, message):
  assert run_cli(*args, "--out", tmp_path / "run", "--epochs", "1") == 2
  err = capsys.readouterr().err
  assert err.startswith("recjax: error:") and message in err, err


def test_a_config_file_cannot_set_nan_or_none_where_a_number_belongs():
  for key, value, message in [("l2_weight", float("nan"), "l2_weight must be a finite number, got nan"),
                              ("epochs", None, "epochs expects int, got None")]:
    with pytest.raises(ConfigError, match=message):
      apply_overrides(build_config("bpr"), {key: value}, source="cfg.py")
  assert apply_overrides(build_config("bpr"), {"cpu_devices": None}, source="cfg.py")["cpu_devices"] is None   # "all"


def test_bert4rec_code_evaluates_test_once_after_the_last_epoch(tmp_path):
  """A protocol that evaluates once ignores `eval_every`: nothing is chosen among epochs on test."""
  out = tmp_path / "once"
  assert run_cli("train", "bpr", "--dataset", "synthetic", "--protocol", "bert4rec-code", "--epochs", "3",
                 "--set", "eval_every=1", "--out", out) == 0
  records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records if "valid" in r] == [2]
  assert read_metrics(out)["test"] == read_metrics(out)["valid"]
  # extended: the new last epoch is the one tested, whether or not epoch 2 scored better
  assert run_cli("train", "bpr", "--dataset", "synthetic", "--protocol", "bert4rec-code", "--epochs", "5",
                 "--set", "eval_every=1", "--out", out, "--resume") == 0
  records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records if "valid" in r] == [2, 4]
  assert read_metrics(out)["test"] == read_metrics(out)["valid"] == records[-1]["valid"]


def test_the_epochs_flag_is_checked_as_the_config_key(tmp_path, capsys):
  assert run_cli("train", "bpr", "--epochs", "-1", "--out", tmp_path / "run") == 2
  err = capsys.readouterr().err
  assert "--epochs: epochs must be a count >= 0, got -1" in err, err
  assert not (tmp_path / "run").exists()


def test_nan_loss_stops_with_a_clear_error_and_keeps_earlier_checkpoints(tmp_path, capsys):
  out = tmp_path / "nan"
  code = run_cli("train", "bpr", "--dataset", "synthetic", "--epochs", "3", "--out", out,
                 "--set", "learning_rate=1e38")
  assert code == 2
  err = capsys.readouterr().err
  assert "non-finite" in err and "epoch" in err, err
  assert json.loads((out / "config.json").read_text())["learning_rate"] == 1e38


def test_a_run_whose_every_evaluation_is_nan_stops_with_a_clear_error(tmp_path, capsys):
  out = tmp_path / "diverged"
  code = run_cli("train", "deepfm", "--epochs", "1", "--set", "batch_size=200000", "--set", "learning_rate=1e30",
                 "--out", out)
  assert code == 2
  assert "no evaluation gave a finite auc" in capsys.readouterr().err
  def strict(constant):
    raise ValueError(f"non-standard JSON constant {constant}")
  rows = [json.loads(line, parse_constant=strict) for line in (out / "log.jsonl").read_text().splitlines()]
  assert rows[-1]["valid"] == {"auc": None, "gauc": None, "logloss": None}   # NaN written as null


def test_config_overrides_are_checked():
  config = default_config("sasrec")
  assert apply_overrides(config, ["model.dim=16", "epochs=3"])["model"]["dim"] == 16
  assert apply_overrides(config, {"model": {"dim": 8}})["model"]["dim"] == 8
  with pytest.raises(ConfigError, match="model.name"):
    apply_overrides(config, ["model.name='bpr'"])
  with pytest.raises(ConfigError, match="expects int"):
    apply_overrides(config, ["epochs=2.5"])
  with pytest.raises(ConfigError, match=r"--epochs: epochs must be a count >= 0, got -1"):
    apply_overrides(config, {"epochs": -1}, source="--epochs")
  assert apply_overrides(config, ["epochs=0", "weight_decay=0.0", "adam_b1=0.0"])["epochs"] == 0   # bounds included
  # keys whose default is None ("not set") still have a type
  for override, message in [("preprocess.min_rating='abc'", "preprocess.min_rating expects int or float"),
                            ("preprocess.min_rating=[1]", "preprocess.min_rating expects int or float"),
                            ("data_dir=5", "data_dir expects str"), ("window_stride=True", "window_stride expects int"),
                            ("devices=0", "devices must be a positive count")]:
    with pytest.raises(ConfigError, match=message):
      apply_overrides(config, [override])
  assert apply_overrides(config, ["preprocess.min_rating=4", "text.fields=['movie_title']"])["preprocess"] == {
      **config["preprocess"], "min_rating": 4}
  # a whole section given as a mapping sets its keys one by one, each checked, the others kept
  dedup = apply_overrides(config, ["preprocess={'dedup': True}"])["preprocess"]
  assert dedup == {**config["preprocess"], "dedup": True}
  assert apply_overrides(config, ["model={'dim': 8}"])["model"] == {**config["model"], "dim": 8}
  for override, message in [("preprocess={'dedupx': True}", "unknown config key 'preprocess.dedupx'"),
                            ("domain={'rule': 5}", "domain.rule expects str"),
                            ("model={'name': 'bpr'}", "model.name")]:
    with pytest.raises(ConfigError, match=message):
      apply_overrides(config, [override])


def test_an_unknown_valid_metric_is_refused_before_anything_is_written(tmp_path, capsys):
  assert run_cli("train", "bpr", "--set", "valid_metric='foo@10'", "--out", tmp_path / "run") == 2
  assert "valid_metric 'foo@10'" in capsys.readouterr().err
  assert run_cli("train", "bpr", "--set", "valid_metric='ndcg@20'", "--out", tmp_path / "run") == 2
  assert "is not computed" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model, override, message", [
    ("caser", "training='sequence'", "cannot train with training='sequence'.*NotImplementedError: Caser"),
    ("bpr", "training='sequence'", "cannot train with training='sequence'"),
    ("bpr", "loss='foo'", "unknown loss 'foo'"),
    ("gru4rec", "model.cell='foo'", "unknown recurrent cell 'foo'"),
    ("bpr", "optimizer='sgdd'", "unknown optimizer 'sgdd'"),
    ("bpr", "finetune.trainable='foo'", "finetune.trainable: expected one of"),
    ("bpr", "finetune.from_run='nowhere'", "finetune.from_run: no recjax run at nowhere"),
    ("neumf", "pretrain.gmf_run='nowhere'", "NeuMF pretraining needs both"),
    ("bpr", "finetune.from_run='{untrained}'", "was never trained"),
    ("sasrec", "protocol='bert4rec-sampled'", "ranks each 'valid' item against 100 sampled negatives, but the data "
                                              "has too few items"),
])
@pytest.mark.parametrize("epochs", [[], ["--epochs", "0"]])   # a run that trains nothing is checked alike
def test_a_config_the_model_cannot_train_with_is_refused_before_anything_is_written(tmp_path, capsys, model,
                                                                                    override, message, epochs):
  untrained = tmp_path / "untrained"
  assert run_cli("train", "bpr", "--dataset", "synthetic", "--epochs", "0", "--out", untrained) == 0
  data = ["--dataset", "synthetic"]
  if "bert4rec-sampled" in override:   # 30 items: too few to draw 100 negatives outside a user's history
    (tmp_path / "few" / "beauty").mkdir(parents=True)
    rows = [f"{user} {item}" for user in range(1, 21) for item in np.random.default_rng(user).permutation(30)[:6] + 1]
    (tmp_path / "few" / "beauty" / "beauty.txt").write_text("\n".join(rows) + "\n")
    data = ["--dataset", "beauty", "--data-dir", tmp_path / "few"]
  args = [*data, *epochs, "--set", override.format(untrained=untrained), "--out", tmp_path / "run"]
  assert run_cli("train", model, *args) == 2
  assert re.search(message, capsys.readouterr().err)
  assert not (tmp_path / "run").exists()


def test_a_new_run_never_overwrites_files_of_a_run_folder(tmp_path, capsys):
  out = tmp_path / "notes"
  out.mkdir()
  (out / "config.json").write_text('{"my": "settings"}')
  assert run_cli("train", "bpr", "--dataset", "synthetic", "--epochs", "1", "--out", out) == 2
  assert "already holds a run (config.json)" in capsys.readouterr().err
  assert (out / "config.json").read_text() == '{"my": "settings"}' and len(list(out.iterdir())) == 1


def test_metrics_and_cut_offs_chosen_by_config(tmp_path, capsys):
  out = tmp_path / "run"
  assert run_cli("train", "bpr", "--dataset", "synthetic", "--epochs", "1", "--set", "metrics=['ndcg','map','f1']",
                 "--set", "ks=[5,20]", "--set", "valid_metric='map@20'", "--out", out) == 0
  metrics = read_metrics(out)
  assert set(metrics["test"]) == {f"{name}@{k}" for k in (5, 20) for name in ("ndcg", "map", "f1")}
  assert metrics["valid_metric"] == "map@20"
  for override, message in [("ks=[20]", "valid_metric 'mrr@10' is not computed"),
                            ("metrics=['ndcg','dcg']", "unknown metric(s) ['dcg']"),
                            ("ks=[0]", "ks must be positive integers")]:
    assert run_cli("train", "bpr", "--dataset", "synthetic", "--set", override, "--out", tmp_path / "bad") == 2
    assert message in capsys.readouterr().err
  assert run_cli("train", "deepfm", "--dataset", "synthetic", "--set", "ks=[5]", "--out", tmp_path / "bad") == 2
  assert "has no ranking to cut off" in capsys.readouterr().err
  assert not (tmp_path / "bad").exists()


def test_config_file(tmp_path):
  path = tmp_path / "small.py"
  path.write_text("def get_config():\n  return {'epochs': 4, 'model': {'dim': 16}}\n")
  config = build_config("bpr", str(path), ["epochs=5"])
  assert config["epochs"] == 5 and config["model"]["dim"] == 16
  path.write_text("def get_config():\n  return {'epoch': 4}\n")
  with pytest.raises(ConfigError, match=f"{path}: unknown config key 'epoch'"):
    build_config("bpr", str(path))
  path.write_text("def get_config(:\n  return {}\n")
  with pytest.raises(ConfigError, match=f"{path}:1: syntax error in config file"):
    build_config("bpr", str(path))
  path.write_text("def get_config():\n  return {'epochs': 1 / 0}\n")
  with pytest.raises(ConfigError, match=f"{path}: get_config\\(\\) raised ZeroDivisionError"):
    build_config("bpr", str(path))


def test_dataset_defaults_sit_between_model_defaults_and_user_overrides(tmp_path):
  assert build_config("sasrec")["epochs"] == 30                        # synthetic is the default dataset
  assert build_config("sasrec", dataset="ml-100k")["epochs"] == default_config("sasrec")["epochs"]
  assert build_config("sasrec", overrides=["dataset='ml-100k'"])["epochs"] == default_config("sasrec")["epochs"]
  assert build_config("sasrec", overrides=["epochs=7"])["epochs"] == 7
  path = tmp_path / "c.py"
  path.write_text("def get_config():\n  return {'epochs': 4}\n")
  assert build_config("sasrec", str(path), dataset="synthetic")["epochs"] == 4
  assert build_config("sasrec", dataset="synthetic", overrides=["dataset='ml-100k'"])["dataset"] == "synthetic"


KILL_ARGS = ["train", "bpr", "--dataset", "synthetic", "--epochs", "10", "--set", "batch_size=256"]


def _cli(args, env=None):
  env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
  return subprocess.Popen([sys.executable, "-m", "recjax.cli", *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_metrics(tmp_path):
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  reference = _cli([*KILL_ARGS, "--out", whole])
  victim = _cli([*KILL_ARGS, "--out", killed])
  latest = killed / "checkpoints" / "latest"
  deadline = time.time() + 120
  while time.time() < deadline and not (latest.is_dir() and any(p.name.isdigit() and int(p.name) >= 2
                                                                   for p in latest.iterdir())):
    time.sleep(0.05)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert reference.wait() == 0, reference.stderr.read()
  assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
  resumed = _cli([*KILL_ARGS, "--out", killed, "--resume"])
  assert resumed.wait() == 0, resumed.stderr.read()
  assert read_metrics(killed)["test"] == read_metrics(whole)["test"]
  assert read_metrics(killed)["valid"] == read_metrics(whole)["valid"]
  rows = lambda out: [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}  # noqa: E731
                      for line in (out / "log.jsonl").read_text().splitlines()]
  assert rows(killed) == rows(whole)


def test_resume_refuses_flags_that_differ_from_the_saved_run_but_may_train_longer(tmp_path, capsys):
  out = tmp_path / "run"
  assert run_cli("train", "bpr", "--epochs", "2", "--set", "batch_size=512", "--out", out) == 0
  capsys.readouterr()
  for args, message in [(["bpr", "--set", "learning_rate=0.5"], "learning_rate (0.001 saved, 0.5 given)"),
                        (["sasrec"], "model.name ('bpr' saved, 'sasrec' given)"), (["bpr", "--seed", "3"], "seed"),
                        (["bpr", "--epochs", "0"], "has completed 2 epochs; epochs (the total, counting them) must be "
                                                   "at least 2, got 0"),
                        (["bpr", "--epochs", "1"], "at least 2, got 1")]:
    assert run_cli("train", *args, "--out", out, "--resume") == 2
    assert message in capsys.readouterr().err
  assert read_metrics(out)["epochs_run"] == 2                   # nothing changed by the refusals
  assert run_cli("train", "bpr", "--set", "batch_size=512", "--epochs", "3", "--out", out, "--resume") == 0
  assert read_metrics(out)["epochs_run"] == 3
  assert json.loads((out / "config.json").read_text())["epochs"] == 3


def test_library_train_guards_its_run_folder_as_the_command_does(tmp_path):
  """`experiment.train` (the experiment scripts' path) refuses a second run into a run's folder and a resume
  with another config before it writes anything; it resumes with more epochs and a moved data folder."""
  from recjax import experiment

  out = tmp_path / "run"
  config = apply_overrides(build_config("bpr"), ["epochs=1", "model.dim=8"])
  experiment.train(config, out, log=lambda line: None)
  files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  with pytest.raises(ConfigError, match="already holds a run"):
    experiment.train(config, out, log=lambda line: None)
  with pytest.raises(ConfigError, match=r"learning_rate \(0.001 saved, 0.5 given\); model.dim \(8 saved, 4 given\)"):
    experiment.train(apply_overrides(config, ["learning_rate=0.5", "model.dim=4", "epochs=2"]), out, resume=True)
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files     # nothing written by either
  resumed = experiment.train({**config, "epochs": 2, "data_dir": str(tmp_path)}, out, resume=True,
                             log=lambda line: None)
  assert resumed["epochs_run"] == 2
  record = json.loads((out / "split.json").read_text())   # the split the run trained on
  assert set(record["rows"]) == {"train", "valid", "test"} and len(record["fingerprint"]) == 64
  (out / "split.json").write_text(json.dumps({**record, "fingerprint": "0" * 64}))   # as if the data had changed
  with pytest.raises(ConfigError, match="trained on another split"):
    experiment.train({**config, "epochs": 3}, out, resume=True, log=lambda line: None)
  assert run_cli("evaluate", "--run", out) == 2
  (out / "split.json").write_text(json.dumps(record))
  (out / "config.json").unlink()   # checkpoints that nothing says whose they are are not resumed
  with pytest.raises(ConfigError, match="holds checkpoints but no config.json"):
    experiment.train({**config, "epochs": 3}, out, resume=True, log=lambda line: None)


def test_a_resume_that_finds_no_run_starts_afresh_and_can_be_resumed_after_failing_in_its_first_epoch(tmp_path):
  """A script run again with --resume resumes every run, including one that never started: that one is a fresh
  run, whose config is written before it trains, so a failure in its first epoch leaves a resumable folder."""
  from recjax import experiment

  config = apply_overrides(build_config("bpr"), ["epochs=2", "model.dim=8"])
  whole = experiment.train(config, tmp_path / "whole", log=lambda line: None)

  def interrupt(line):   # the first epoch's line comes before its checkpoint
    raise KeyboardInterrupt

  out = tmp_path / "run"
  with pytest.raises(KeyboardInterrupt):
    experiment.train(config, out, resume=True, log=interrupt)
  assert (out / "config.json").exists() and (out / "split.json").exists()
  assert run_cli("train", "bpr", "--epochs", "1", "--out", tmp_path / "typo", "--resume") == 2   # the command
  assert not (tmp_path / "typo").exists()                                   # refuses a folder with no run in it
  resumed = experiment.train(config, out, resume=True, log=lambda line: None)
  assert resumed["test"] == whole["test"] and resumed["epochs_run"] == 2
  lines = []

  def interrupt_second_epoch(line):   # extended to 4 epochs, interrupted once epoch 2 is saved
    lines.append(line)
    if sum(text.startswith("epoch") for text in lines) == 2:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    experiment.train({**config, "epochs": 4}, out, resume=True, log=interrupt_second_epoch)
  assert not (out / "metrics.json").exists()   # the 2-epoch results no longer describe the run
  assert json.loads((out / "config.json").read_text())["epochs"] == 4


def test_a_split_under_other_dense_ids_is_refused(tmp_path):
  from recjax import experiment
  from recjax.data.interactions import from_columns
  from recjax.data.splits import leave_one_out

  users, items, times = ["a", "a", "a", "b", "b", "b"], ["i1", "i2", "i3", "i2", "i3", "i4"], [1, 2, 3, 1, 2, 3]
  split = leave_one_out(from_columns(users, items, timestamp=times))
  experiment.write_json(tmp_path / "split.json", experiment.split_record(split))
  assert experiment.check_split(split, tmp_path) == experiment.split_record(split)
  reordered = leave_one_out(from_columns(users[::-1], items[::-1], timestamp=times[::-1]))   # ids renumbered
  with pytest.raises(ConfigError, match="numbers its users or items otherwise"):
    experiment.check_split(reordered, tmp_path)
  record = json.loads((tmp_path / "split.json").read_text())
  del record["ids"]   # a record written before the ids were recorded passes
  (tmp_path / "split.json").write_text(json.dumps(record))
  experiment.check_split(reordered, tmp_path)
  (tmp_path / "split.json").write_bytes(b"\xff")   # a damaged file: one error naming it
  with pytest.raises(ConfigError, match="split.json: not valid JSON"):
    experiment.check_split(split, tmp_path)


def _write_inter(data_dir: Path, users: int) -> Path:
  """A small ml-100k-shaped `.inter` file: `users` users with 12 of 30 items each."""
  rows = [f"{u}\t{(u * 7 + j) % 30 + 1}\t{1 + (u + j) % 5}\t{1000 * u + j}"
          for u in range(1, users + 1) for j in range(12)]
  (data_dir / "ml-100k").mkdir(parents=True)
  text = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "\n".join(rows) + "\n"
  (data_dir / "ml-100k" / "ml-100k.inter").write_text(text)
  return data_dir


def test_resume_on_other_data_is_refused_and_keeps_the_run(tmp_path, capsys):
  small, large = _write_inter(tmp_path / "small", 20), _write_inter(tmp_path / "large", 35)
  out = tmp_path / "run"
  args = ["train", "bpr", "--dataset", "ml-100k", "--set", "model.dim=8", "--out", out]
  assert run_cli(*args, "--data-dir", small, "--epochs", "1") == 0
  saved = (out / "config.json").read_text()
  capsys.readouterr()
  assert run_cli(*args, "--data-dir", large, "--epochs", "2", "--resume") == 2
  err = capsys.readouterr().err
  assert "trained on another split" in err, err                # split.json says the data changed
  assert (out / "config.json").read_text() == saved             # the failed resume changed nothing
  record = (out / "split.json").read_text()
  (out / "split.json").unlink()   # a run saved before split.json existed: its checkpoint's shapes refuse the data
  assert run_cli(*args, "--data-dir", large, "--epochs", "2", "--resume") == 2
  err = capsys.readouterr().err
  assert "does not fit this run" in err and "user_embedding" in err, err
  assert (out / "config.json").read_text() == saved and not (out / "split.json").exists()
  (out / "split.json").write_text(record)
  assert run_cli(*args, "--data-dir", small, "--epochs", "2", "--resume") == 0
  assert read_metrics(out)["epochs_run"] == 2


def test_learning_rate_schedule_options_train(tmp_path, capsys):
  from recjax.experiment import learning_rate

  config = apply_overrides(default_config("bpr"), ["epochs=4", "lr_warmup_steps=2", "lr_decay='linear'"])
  schedule = learning_rate(config, steps_per_epoch=5)          # 20 optimizer steps in all
  np.testing.assert_allclose([schedule(0), schedule(1), schedule(10), schedule(20)], [0.0, 5e-4, 5e-4, 0.0],
                             atol=1e-9)
  assert learning_rate(default_config("bpr"), 5) == 1e-3      # constant by default: a float
  assert run_cli("train", "bpr", "--set", "lr_decay='cosine'", "--out", tmp_path / "bad") == 2
  assert "lr_decay: expected one of ('constant', 'linear'), got 'cosine'" in capsys.readouterr().err
  assert not (tmp_path / "bad").exists()                      # refused before anything is written
  out = tmp_path / "bert_style"
  assert run_cli("train", "bpr", "--epochs", "2", "--out", out, "--set", "optimizer='adamw'", "--set",
                 "weight_decay=0.01", "--set", "lr_decay='linear'", "--set", "lr_warmup_steps=3", "--set",
                 "grad_clip_norm=1.0", "--set", "adam_eps=1e-6", "--set", "decay_biases_and_norms=False") == 0
  assert read_metrics(out)["test"]["ndcg@10"] > 0


def test_recommend_needs_a_positive_k(capsys):
  with pytest.raises(SystemExit) as info:
    run_cli("recommend", "--run", "any", "--user", "1", "--k", "0")
  assert info.value.code == 2 and "--k: expected an integer >= 1, got '0'" in capsys.readouterr().err


def test_recommend_leaves_out_every_seen_item(tmp_path, capsys):
  """Seen = any part of the split, the cold-start hold-out, and rows preprocessing dropped; with --k above
  what is left, only the unseen items are printed (no padding id), and stderr says so."""
  data = _write_inter(tmp_path / "data", 20)          # user u has items (7u + j) % 30 + 1, j < 12, rated 1..5
  raw = [line.split("\t") for line in (data / "ml-100k" / "ml-100k.inter").read_text().splitlines()[1:]]
  for protocol, sets in [("recbole-general", ["preprocess.min_rating=3"]), ("cold-start", [])]:
    out = tmp_path / protocol
    args = sum((["--set", s] for s in sets), [])
    assert run_cli("train", "pop", "--dataset", "ml-100k", "--data-dir", data, "--protocol", protocol, *args,
                   "--out", out) == 0
    capsys.readouterr()
    assert run_cli("recommend", "--run", out, "--user", "5", "--k", "100") == 0
    printed = capsys.readouterr()
    items = {line.split()[1] for line in printed.out.strip().splitlines()}
    seen = {item for user, item, _, _ in raw if user == "5"}
    assert len(seen) == 12 and not items & seen and "[PAD]" not in items, (protocol, items & seen)
    assert "fewer than --k 100" in printed.err
    if protocol == "recbole-general":   # every unseen item that survived the filter
      assert len(items) == len({item for _, item, rating, _ in raw if float(rating) >= 3} - seen)


def test_evaluate_refuses_side_features_changed_under_a_feature_model(tmp_path, capsys):
  data = _write_inter(tmp_path / "data", 20)
  item_file = data / "ml-100k" / "ml-100k.item"
  item_file.write_text("item_id:token\tyear:token\n" + "".join(f"{i}\t{1990 + i % 7}\n" for i in range(1, 31)))
  runs = {model: tmp_path / model for model in ("deepfm", "bpr")}
  for model, out in runs.items():
    assert run_cli("train", model, "--dataset", "ml-100k", "--data-dir", data, "--epochs", "1", "--out", out) == 0
  item_file.write_text(item_file.read_text().replace("\t1990\n", "\t1989\n"))
  capsys.readouterr()
  assert run_cli("evaluate", "--run", runs["deepfm"]) == 2   # its inputs would mean other values
  assert "side features differ from those the run was trained on" in capsys.readouterr().err
  assert run_cli("evaluate", "--run", runs["bpr"]) == 0       # BPR-MF does not read them


def test_recommend_tells_a_user_the_preprocessing_dropped_from_an_unknown_one(tmp_path, capsys):
  data = _write_inter(tmp_path / "data", 20)
  with (data / "ml-100k" / "ml-100k.inter").open("a") as f:   # a user whose every rating is 1
    f.write("".join(f"lowrater\t{item}\t1\t{item}\n" for item in range(1, 13)))
  out = tmp_path / "run"
  assert run_cli("train", "pop", "--dataset", "ml-100k", "--data-dir", data, "--set", "preprocess.min_rating=3",
                 "--out", out) == 0
  assert run_cli("recommend", "--run", out, "--user", "lowrater") == 2
  assert ("user 'lowrater' is in dataset ml-100k but the run's preprocessing (preprocess.min_rating) left them no "
          "interactions") in capsys.readouterr().err
  assert run_cli("recommend", "--run", out, "--user", "nobody") == 2
  assert "unknown user id 'nobody'" in capsys.readouterr().err


def test_a_split_without_valid_rows_is_refused_where_one_is_expected(tmp_path, capsys):
  data = tmp_path / "data" / "ml-100k"
  data.mkdir(parents=True)   # every user has 2 rows: an 80/10/10 split per user leaves valid empty
  rows = [f"{u}\t{(u + j) % 9 + 1}\t4\t{10 * u + j}" for u in range(1, 30) for j in range(2)]
  (data / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "\n".join(rows))
  assert run_cli("train", "bpr", "--dataset", "ml-100k", "--data-dir", data.parent, "--out", tmp_path / "run") == 2
  assert "left no valid rows" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_evaluate_only_reads_the_run_folder(tmp_path, capsys):
  out = tmp_path / "bpr"
  assert run_cli("train", "bpr", "--epochs", "1", "--set", "model.dim=8", "--out", out) == 0
  in_flight = out / "checkpoints" / "latest" / "1.orbax-checkpoint-tmp-1700000000"   # a save under way
  in_flight.mkdir()
  assert run_cli("evaluate", "--run", out) == 0 and in_flight.is_dir()
  config_only = tmp_path / "config_only"
  config_only.mkdir()
  (config_only / "config.json").write_bytes((out / "config.json").read_bytes())
  capsys.readouterr()
  assert run_cli("evaluate", "--run", config_only) == 2
  assert "no best checkpoint" in capsys.readouterr().err
  assert [p.name for p in config_only.iterdir()] == ["config.json"]     # nothing created there
  for metadata in (out / "checkpoints" / "best").glob("*/state/_METADATA"):   # a damaged checkpoint
    metadata.unlink()
  assert run_cli("evaluate", "--run", out) == 2
  assert "the checkpoint has no readable state" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("[]", "not a recjax run config"), ('{"model": {"name": "nosuch"}}', "got 'nosuch'"),
    ('{"model": {"name": "bpr", "dim": "eight"}}', "model.dim"), ('{"model": {"name": "bpr"}, "seed": "x"}', "seed")])
def test_a_malformed_run_config_is_one_error_naming_the_file(tmp_path, capsys, text, message):
  (tmp_path / "config.json").write_text(text)
  assert run_cli("evaluate", "--run", tmp_path) == 2
  err = capsys.readouterr().err
  assert str(tmp_path / "config.json") in err and message in err, err


def test_data_commands_refuse_bad_paths_and_sizes(tmp_path, capsys):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  assert run_cli("data", "export", "synthetic", "--out", a_file) == 2
  assert "Not a directory" in capsys.readouterr().err
  assert run_cli("data", "export", "synthetic", "--as", "a/b", "--out", tmp_path / "x") == 2
  assert "a dataset name, not a path" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    run_cli("data", "text", "ml-100k", "--batch-size", "0")
  assert "--batch-size: expected an integer >= 1" in capsys.readouterr().err
  assert run_cli("data", "export", "synthetic", "--protocol", "recbole-context", "--out", tmp_path / "ctx") == 0
  test_file = tmp_path / "ctx" / "synthetic" / "synthetic.test.inter"
  exported = test_file.read_text()
  test_file.write_text("edited by hand")   # an export never replaces files unasked
  assert run_cli("data", "export", "synthetic", "--out", tmp_path / "ctx") == 2
  assert "synthetic.test.inter already exist; pass --overwrite" in capsys.readouterr().err
  assert test_file.read_text() == "edited by hand"
  assert run_cli("data", "export", "synthetic", "--protocol", "recbole-context", "--out", tmp_path / "ctx",
                 "--overwrite") == 0
  assert test_file.read_text() == exported
  for key in ("seed", "protocol"):   # the flags set them; a --set would be overwritten unseen
    assert run_cli("data", "export", "synthetic", "--set", f"{key}=5", "--out", tmp_path / "y") == 2
    assert f"give {key} as --{key}, not --set {key}=..." in capsys.readouterr().err
  for command in (["data", "export", "synthetic", "--out", ""], ["train", "pop", "--out", " "],
                  ["evaluate", "--run", ""]):   # not the current folder, nor the default
    with pytest.raises(SystemExit):
      run_cli(*command)
    assert "expected a folder, got an empty path" in capsys.readouterr().err


def test_ml100k_train_recommend_info(data_dir, tmp_path, capsys):
  out = tmp_path / "ml"
  assert run_cli("train", "bpr", "--dataset", "ml-100k", "--data-dir", data_dir, "--epochs", "2",
                 "--out", out) == 0
  assert read_metrics(out)["test"]["ndcg@10"] > 0
  capsys.readouterr()
  assert run_cli("recommend", "--run", out, "--user", "196", "--k", "5") == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 5 and all(line.split()[0] == str(i) for i, line in enumerate(lines, 1))
  assert any(c.isalpha() for c in lines[0].split(maxsplit=3)[-1])   # a movie title is printed
  assert run_cli("recommend", "--run", out, "--user", "no-such-user") == 2
  assert run_cli("data", "info", "ml-100k", "--data-dir", data_dir) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["num_users"] == 943 and info["num_items"] == 1682 and info["num_interactions"] == 100000


def test_the_default_run_folder_names_the_configured_dataset(data_dir, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)   # runs/MODEL-DATASET, whether --dataset, --set or --config chose the dataset
  assert run_cli("train", "pop", "--set", "dataset='ml-100k'", "--data-dir", data_dir) == 0
  assert (tmp_path / "runs" / "pop-ml-100k" / "metrics.json").is_file()


def test_ml100k_sasrec_prefix_training_runs(data_dir, tmp_path):
  out = tmp_path / "sas"
  assert run_cli("train", "sasrec", "--dataset", "ml-100k", "--data-dir", data_dir, "--epochs", "1",
                 "--set", "training='prefix'", "--set", "batch_size=4096", "--set", "model.dim=16",
                 "--set", "model.ffn_dim=16", "--set", "model.num_blocks=1", "--set", "model.num_heads=1",
                 "--out", out) == 0
  assert read_metrics(out)["epochs_run"] == 1


def test_export_writes_the_identical_split(data_dir, tmp_path, capsys):
  assert run_cli("data", "export", "ml-100k", "--data-dir", data_dir, "--out", tmp_path) == 2   # RecBole's own name
  assert "pass --as" in capsys.readouterr().err
  assert run_cli("data", "export", "ml-100k", "--as", "mlsplit", "--data-dir", data_dir, "--out", tmp_path) == 0
  read = lambda name, part: (tmp_path / name / f"{name}.{part}.inter").read_text().splitlines()  # noqa: E731
  counts = {part: len(read("mlsplit", part)) - 1 for part in ("train", "valid", "test")}
  assert sum(counts.values()) == 100000 and counts["train"] == 80808
  # sequential protocols: (history -> next item) rows, RecBole's 97,171 training prefixes of ml-100k
  assert run_cli("data", "export", "ml-100k", "--as", "mlseq", "--protocol", "recbole-sequential",
                 "--data-dir", data_dir, "--out", tmp_path) == 0
  assert read("mlseq", "train")[0] == "user_id:token\titem_id_list:token_seq\titem_id:token"
  assert [len(read("mlseq", part)) - 1 for part in ("train", "valid", "test")] == [97171, 943, 943]
  # a random split has no history a part can be read from: refused; preprocessing shapes the exported split
  assert run_cli("data", "export", "ml-100k", "--as", "mlbad", "--format", "sequence", "--data-dir", data_dir,
                 "--out", tmp_path) == 2
  assert "needs a leave-one-out split" in capsys.readouterr().err and not (tmp_path / "mlbad").exists()
  assert run_cli("data", "export", "ml-100k", "--as", "mlcore", "--set", "preprocess.min_rating=4", "--data-dir",
                 data_dir, "--out", tmp_path) == 0
  assert sum(len(read("mlcore", part)) - 1 for part in ("train", "valid", "test")) == 55375   # ratings >= 4


def test_evaluate_on_two_host_devices(tmp_path):
  """In a fresh process the CLI splits batches and evaluation users over 2 host devices."""
  env = host_devices_env(2)
  out = tmp_path / "two"
  train = _cli(["train", "bpr", "--dataset", "synthetic", "--epochs", "2", "--set", "devices=2", "--out", out], env=env)
  assert train.wait() == 0, train.stderr.read()
  evaluate = _cli(["evaluate", "--run", out], env=env)
  stdout, stderr = evaluate.communicate()
  assert evaluate.returncode == 0, stderr
  assert json.loads(stdout)["test"] == pytest.approx(read_metrics(out)["test"], rel=1e-5)


def test_a_run_of_more_devices_loads_in_a_process_with_fewer(tmp_path, capsys):
  """A data-parallel run of 2 devices evaluates and seeds fine-tuning in this one-device process (its shapes do
  not depend on the devices); a run with tables row-sharded over 2 devices needs 2, and says how to get them."""
  assert jax.device_count() == 1
  env = host_devices_env(2)
  for name, layout in (("data", []), ("rows", ["--set", "model_parallel=2", "--set", "shard_tables_mb=0"])):
    train = _cli(["train", "bpr", "--dataset", "synthetic", "--epochs", "1", "--set", "model.dim=8", "--set",
                  "devices=2", *layout, "--out", tmp_path / name], env=env)
    assert train.wait() == 0, train.stderr.read()
  capsys.readouterr()
  assert run_cli("evaluate", "--run", tmp_path / "data") == 0
  assert json.loads(capsys.readouterr().out)["test"] == pytest.approx(read_metrics(tmp_path / "data")["test"], rel=1e-5)
  assert run_cli("train", "bpr", "--dataset", "synthetic", "--epochs", "1", "--set", "model.dim=8", "--set",
                 f"finetune.from_run='{tmp_path / 'data'}'", "--out", tmp_path / "tuned") == 0
  assert run_cli("evaluate", "--run", tmp_path / "rows") == 2
  err = capsys.readouterr().err
  assert "model_parallel=2" in err and "xla_force_host_platform_device_count=2" in err, err


def test_feature_tables_are_not_left_whole_under_model_parallel_unannounced(tmp_path):
  """DeepFM's feature tables are not row-sharded: asked to shard tables of any size over 2 devices, the run
  says so before it writes anything."""
  done = _cli(["train", "deepfm", "--dataset", "synthetic", "--epochs", "1", "--set", "devices=2", "--set",
               "model_parallel=2", "--set", "shard_tables_mb=0", "--out", tmp_path / "run"], env=host_devices_env(2))
  _, stderr = done.communicate()
  assert done.returncode == 2 and "token_embedding reach shard_tables_mb=0.0" in stderr, stderr
  assert not (tmp_path / "run").exists()


def test_neumf_pretrained_from_runs_of_another_device_layout_keeps_its_own_tables(tmp_path):
  """GMF and NCF-MLP trained with item tables row-sharded over 2 devices (padded to an even row count), NeuMF on
  one: NeuMF's tables take its own (unpadded) rows, so its checkpoint evaluates."""
  env = host_devices_env(2)
  sharded = ["--set", "devices=2", "--set", "model_parallel=2", "--set", "shard_tables_mb=0"]
  hidden = ["--set", "model.hidden=(16,8)"]
  for model, sizes in (("gmf", []), ("ncf_mlp", hidden)):
    done = _cli(["train", model, "--dataset", "synthetic", "--epochs", "1", "--set", "model.dim=8", *sizes, *sharded,
                 "--out", tmp_path / model], env=env)
    assert done.wait() == 0, done.stderr.read()
  out = tmp_path / "neumf"
  done = _cli(["train", "neumf", "--dataset", "synthetic", "--epochs", "1", "--set", "model.mf_dim=8", "--set",
               "model.mlp_dim=8", *hidden, "--set", f"pretrain.gmf_run='{tmp_path / 'gmf'}'", "--set",
               f"pretrain.mlp_run='{tmp_path / 'ncf_mlp'}'", "--out", out], env=env)
  assert done.wait() == 0, done.stderr.read()
  evaluate = _cli(["evaluate", "--run", out], env=env)
  stdout, stderr = evaluate.communicate()
  assert evaluate.returncode == 0, stderr
  assert json.loads(stdout)["test"] == pytest.approx(read_metrics(out)["test"], rel=1e-5)


def test_a_run_saved_before_newer_config_keys_loads_with_their_defaults(tmp_path):
  """A config.json without keys recjax added later (here adam_b1, pair_sampling, model.norm_queries_only)
  resumes and evaluates with their defaults, which keep the earlier behaviour; saved values stay."""
  from recjax.experiment import saved_config

  old = default_config("sasrec")
  old["learning_rate"] = 0.005
  del old["adam_b1"], old["pair_sampling"], old["model"]["norm_queries_only"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  loaded = saved_config(tmp_path)
  assert loaded == {**default_config("sasrec"), "learning_rate": 0.005}


def test_evaluate_names_a_shape_that_differs_from_the_checkpoint(tmp_path, capsys):
  out = tmp_path / "run"
  assert run_cli("train", "bpr", "--set", "model.dim=8", "--epochs", "1", "--out", out) == 0
  config = json.loads((out / "config.json").read_text())
  (out / "config.json").write_text(json.dumps({**config, "model": {**config["model"], "dim": 4}}))   # edited
  capsys.readouterr()
  assert run_cli("evaluate", "--run", out) == 2
  err = capsys.readouterr().err
  assert "is stored with shape" in err and "model_parallel" not in err, err   # no hint that does not apply
