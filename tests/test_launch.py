"""The process settings made before JAX starts: which malloc a command re-runs itself under, and that it
does so once, with the same command line, only from a program's entry point."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from recjax import cli, launch

TCMALLOC = "libtcmalloc_minimal.so.4"


def _env(environ, tcmalloc=TCMALLOC, hugetlb=True):
  return launch.fast_malloc_env(environ, find_tcmalloc=lambda: tcmalloc, hugetlb_available=lambda: hugetlb)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator switch is for Linux")
def test_tcmalloc_first_then_glibc_huge_pages_then_nothing():
  assert _env({}) == {"LD_PRELOAD": TCMALLOC, "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
  # a preload already there stays first; a threshold the user set is kept
  assert _env({"LD_PRELOAD": "/opt/libfoo.so", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"}) == {
      "LD_PRELOAD": f"/opt/libfoo.so:{TCMALLOC}", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"}
  assert _env({}, tcmalloc=None) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert _env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, tcmalloc=None) == {
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
  assert _env({}, tcmalloc=None, hugetlb=False) == {}


@pytest.mark.parametrize("environ", [
    {"RECJAX_MALLOC": "system"},                                   # opted out
    {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},                   # the user's own allocator
    {"LD_PRELOAD": TCMALLOC},                                      # already relaunched
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},                  # already relaunched (glibc)
])
def test_nothing_added_when_chosen_already(environ):
  assert _env(environ) == {}


def test_malloc_in_use_names_the_allocator():
  assert launch.malloc_in_use({"LD_PRELOAD": f"/opt/libfoo.so:/usr/lib/{TCMALLOC}"}) == TCMALLOC
  assert launch.malloc_in_use({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) == "glibc, hugetlb"
  assert launch.malloc_in_use({"LD_PRELOAD": "/opt/libfoo.so"}) == "system"


def test_a_command_reruns_itself_once_with_the_same_arguments():
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", "RECJAX_MALLOC")}
  expected = launch.fast_malloc_env(env)
  program = ("import os, sys; from recjax import launch; print('start', sys.argv[1:], flush=True); "
             "launch.relaunch_with_fast_malloc(); print('malloc', launch.malloc_in_use(os.environ))")
  done = subprocess.run([sys.executable, "-c", program, "a", "--b"], env=env, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr
  lines = done.stdout.splitlines()
  assert lines.count("start ['a', '--b']") == (2 if expected else 1)     # re-run once, arguments intact
  assert lines[-1] == f"malloc {launch.malloc_in_use({**env, **expected})}"


def test_cli_called_with_arguments_never_relaunches(monkeypatch, capsys):
  # tests and other Python callers pass argv; only the console script (argv None) may re-run the process
  def refuse():
    raise AssertionError("relaunched")
  monkeypatch.setattr(cli, "relaunch_with_fast_malloc", refuse)
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  assert cli.main(["data", "info", "synthetic"]) == 0
  assert '"num_users": 1000' in capsys.readouterr().out
