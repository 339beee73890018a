"""Test setup: 8 fake CPU devices (for sharding tests) and paths to ../shared."""

import os
import pathlib
import warnings

# Must happen before JAX initialises its backend.
# The tests check wiring and numerics on tiny models, where XLA's compile time dominates:
# backend optimisation level 0 compiles about 1.5x faster (runs here take the default).
_FLAGS = os.environ.get("XLA_FLAGS", "")
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if _flag.split("=")[0] not in _FLAGS:
    _FLAGS += " " + _flag
os.environ["XLA_FLAGS"] = _FLAGS.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Many tests build the same tiny models and steps; a per-session persistent compilation
# cache lets identical computations compile once (it keys on the computation, not on
# the Python function object, which differs between runs).
# Under pytest-xdist (-n) the workers of one run share it.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID")
_CACHE_DIR = (os.path.join(tempfile.gettempdir(), f"usss_jax_xla_cache_{_RUN_ID}") if _RUN_ID
              else tempfile.mkdtemp(prefix="usss_jax_xla_cache_"))
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("USSS_SHARED", PROJECT_ROOT.parent / "shared"))


def _shared_subdir(name: str) -> pathlib.Path:
  path = SHARED / name
  if not path.is_dir():
    msg = f"SKIPPED LOUDLY: {path} is absent; reference {name} not available"
    warnings.warn(msg)
    pytest.skip(msg)
  return path


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  """../shared/fixtures (reference numbers from the PyTorch code); skips when absent."""
  return _shared_subdir("fixtures")


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  """../shared/data (real dataset samples, internal only); skips when absent."""
  return _shared_subdir("data")
