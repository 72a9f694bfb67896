"""The published-row scripts' settings (`experiments/*.py`: CONFIG and its VARIANTS) are valid configs that
build their model, so a reproduction run does not fail on a typo after its data has loaded; every script reports
bad input as the `recjax` command does (one line `SCRIPT: error: ...`, exit status 2, no traceback) and shows its
docstring's whole first paragraph under --help."""
from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recjax.config import apply_overrides, build_config, merged
from recjax.errors import ConfigError, DataError, TrainingError, UnknownIdError, exit_on_error
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


# ----------------------------------------------------------------------------- bad input, as `recjax` reports it

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
ALL_SCRIPTS = sorted(p.name for p in EXPERIMENTS.glob("*.py") if p.name != "common.py")


def _script_env(data: bool = True) -> dict[str, str]:
  """The test process's environment on the CPU; without RECJAX_DATA when `data` is False."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  if not data:
    env.pop("RECJAX_DATA", None)
  return env


def _run_script(script: str, *args: str, data: bool = True) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(EXPERIMENTS / script), *args], env=_script_env(data),
                        capture_output=True, text=True, timeout=120)


def assert_one_line_error(done: subprocess.CompletedProcess, prog: str, *fragments: str) -> str:
  """Exit status 2 and stderr a single line `PROG: error: ...` holding each of `fragments`, no traceback."""
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  assert done.returncode == 2, done.stderr[-3000:]
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), done.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0]
  return lines[0]


@pytest.mark.parametrize("error", [ConfigError("unknown config key 'x'"), DataError("ratings.csv", "bad line", 3),
                                   TrainingError("loss is nan"), UnknownIdError("no user 'u9'"),
                                   FileNotFoundError(2, "No such file or directory", "/nowhere/x.json")])
def test_exit_on_error_prints_one_line_and_exits_2(error, capsys):
  def main():
    raise error

  with pytest.raises(SystemExit) as exit_info:
    exit_on_error(main, prog="script.py")
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.err == f"script.py: error: {error}\n" and captured.out == ""


def test_exit_on_error_returns_what_main_returns_and_lets_other_errors_through():
  assert exit_on_error(lambda a, b=0: a + b, 1, b=2) == 3
  with pytest.raises(ValueError):   # a bug, not bad input: its traceback is wanted
    exit_on_error(lambda: int("x"))


def test_run_into_a_folder_holding_a_run_is_one_line(tmp_path):
  (tmp_path / "bce").mkdir()
  (tmp_path / "bce" / "metrics.json").write_text("{}")
  done = _run_script("sasrec_losses.py", "--losses", "bce", "--out", str(tmp_path))
  assert_one_line_error(done, "sasrec_losses.py", "already holds a run")


@pytest.mark.parametrize("script, args, first, taken", [
    ("sasrec_losses.py", ["--losses", "ce", "bce"], "ce", "bce"),
    ("ml100k_vs_recbole.py", ["issue4"], "lightgcn", "dcnv2"),
    ("cold_start.py", ["--rows", "sasrec", "pop"], "sasrec", "pop/19"),
    ("multidomain.py", ["--seeds", "0", "1"], "seed0", "seed1/star"),
])
def test_script_of_several_runs_checks_every_folder_before_the_first_trains(script, args, first, taken, tmp_path):
  (tmp_path / taken).mkdir(parents=True)
  (tmp_path / taken / "metrics.json").write_text("{}")
  done = _run_script(script, *args, "--epochs", "1", "--out", str(tmp_path))
  assert_one_line_error(done, script, "already holds a run", taken)
  assert not (tmp_path / first).exists()


def test_missing_data_dir_is_one_line(tmp_path):
  done = _run_script("ml100k_vs_recbole.py", "caser", "--out", str(tmp_path / "run"), data=False)
  assert_one_line_error(done, "ml100k_vs_recbole.py", "no data directory", "--data-dir")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script, args", [
    ("ml100k_vs_recbole.py", ["caser"]),
    ("sasrec_losses.py", ["--losses", "bce"]),
    ("cold_start.py", ["--rows", "sasrec"]),
    ("beauty_sasrec.py", []),          # common.reproduce
    ("multidomain.py", ["--seeds", "0"]),
])
def test_unknown_config_key_is_one_line(script, args, tmp_path):
  done = _run_script(script, *args, "--set", "model.dimm=3", "--out", str(tmp_path / "run"))
  assert_one_line_error(done, script, "unknown config key 'model.dimm'")


def test_like_next_without_data_dir_is_one_line():
  done = _run_script("like_next_lstm.py", data=False)
  assert_one_line_error(done, "like_next_lstm.py", "no data directory")


def test_multidomain_report_before_training_names_the_missing_runs(tmp_path):
  (tmp_path / "seed0" / "all").mkdir(parents=True)   # one finished run, whose domains name seed 0's per-domain runs
  (tmp_path / "seed0" / "all" / "metrics.json").write_text(json.dumps({"domain_sizes": {"d0": {}, "d1": {}}}))
  done = _run_script("multidomain.py", "--report", "--out", str(tmp_path), "--seeds", "0", "1")
  # missing: seed 0's 4 multi-scenario runs and 3 x 2 per-domain ones, seed 1's 5 all-domain runs
  assert_one_line_error(done, "multidomain.py", str(tmp_path), "seed0/shared_bottom, seed0/mmoe, seed0/ple and 12 more",
                        "without --report")


def _first_paragraph(doc: str) -> str:
  return " ".join(doc.split("\n\n")[0].split())


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_help_shows_the_whole_first_paragraph(script):
  done = _run_script(script, "--help")
  assert done.returncode == 0, done.stderr[-3000:]
  doc = ast.get_docstring(ast.parse((EXPERIMENTS / script).read_text()), clean=False)
  assert _first_paragraph(doc) in " ".join(done.stdout.split())
