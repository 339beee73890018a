"""Test setup: 8 fake CPU devices (for sharding tests) and paths to ../shared."""

import os
import pathlib
import warnings

# Must happen before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Many tests build the same tiny models and steps; a per-session persistent compilation
# cache lets identical computations compile once (it keys on the computation, not on
# the Python function object, which differs between runs).
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="usss_jax_xla_cache_"))
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
