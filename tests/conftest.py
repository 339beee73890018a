"""Test setup: 8 fake CPU devices, paths to ../shared, and what many tests share.

Shared fixtures (built once per test run, also across pytest-xdist workers: the first worker
builds under a file lock in the run's common temporary folder, the others wait and reuse):
  demo_root   the embedded demo data, generated once.
  tiny_run    the tiny universal run the loop, fault and analysis tests compare with
              (`helpers.TINY_RUN`: 12 steps on the demo data, checkpoints every 2, one
              evaluation at the end): its workdir (read only: copy it before damaging it),
              final state and results.
Markers: `slow` for tests of a minute or more (subprocess soak runs, the notebook, TFDS
preparation); `pytest -m "not slow"` is the fast subset.
"""

import os
import pathlib
import warnings

# Must happen before JAX initialises its backend.
# The tests check wiring and numerics on tiny models, where XLA's compile time dominates:
# backend optimisation level 0 compiles about 1.5x faster (runs here take the default).
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # read when jax is imported
from usss_jax import cli  # noqa: E402  (imports jax, not its backend)
cli.add_xla_flags(("--xla_force_host_platform_device_count=8",
                   "--xla_backend_optimization_level=0"))
cli.default_xla_flags()  # the entry points' own XLA options: the suite runs what users run

import dataclasses  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

import helpers  # noqa: E402
from usss_jax import modes  # noqa: E402
from usss_jax.data import demo  # noqa: E402

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

SHARED = pathlib.Path(os.environ.get("USSS_SHARED", helpers.ROOT.parent / "shared"))


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


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> str:
  """The demo data (street + indoor), generated once per test run."""
  return str(helpers.built_once(tmp_path_factory, "demo_data",
                                lambda path: demo.ensure_demo_data(str(path))))


@dataclasses.dataclass(frozen=True)
class TinyRun:
  workdir: pathlib.Path  # read only: copy it before changing anything
  state: dict            # the final train state
  results: dict          # the final evaluation ({"mean_miou", <domain>: {...}})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, demo_root) -> TinyRun:
  """The tiny universal run (`helpers.TINY_RUN`), trained once per test run."""
  config = helpers.tiny_demo_config(demo_root, **helpers.TINY_RUN)
  workdir = helpers.built_once(tmp_path_factory, "tiny_run",
                               lambda path: modes.embed_and_train(config, str(path / "run")))
  return TinyRun(workdir / "run", *helpers.final_state_and_results(config, workdir / "run"))
