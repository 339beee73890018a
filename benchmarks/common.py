"""Shared helpers of the benchmark scripts: timing, memory, machine facts, output.

Not a library API: the benchmarks import it as `benchmarks.common` (the scripts
put the repository root on `sys.path` first).

Timing protocol (see ../shared/notes/env_probe.md §5): W warm-ups, then the
median of N timed calls, each ended by `block_until_ready`; "busy cores" =
process CPU time / wall time over the timed calls. XLA:CPU sometimes runs a whole
process on about one core, so rows with busy cores near 1.0 on a 2-core machine
should be rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# DRN-D widths small enough for a smoke run in seconds.
TINY_CHANNELS = (4, 8, 8, 16, 16, 32, 32, 32)


# ---------------------------------------------------------------------------- timing

def time_calls(fn: Callable[[], Any], *, warmup: int, steps: int) -> dict:
  """Runs `fn` warmup + steps times; each call's result is blocked on.

  Returns:
    {"times_s": [steps] wall seconds per timed call, "median_s", "min_s", "max_s",
     "warmup_s": [warmup], "busy_cores": process CPU s / wall s over the timed calls}.
  """
  warmup_times = []
  for _ in range(warmup):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    warmup_times.append(time.perf_counter() - start)
  times = []
  cpu_start, wall_start = time.process_time(), time.perf_counter()
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  wall = time.perf_counter() - wall_start
  cpu = time.process_time() - cpu_start
  return {"times_s": times, "median_s": statistics.median(times), "min_s": min(times),
          "max_s": max(times), "warmup_s": warmup_times,
          "busy_cores": cpu / wall if wall > 0 else float("nan")}


def flops_of(stage) -> float | None:
  """FLOPs XLA's cost analysis counts for a `Lowered` or `Compiled` stage (None if unknown).

  Use the `Lowered` count to compare backends: it analyses the HLO before any
  backend pass. The `Compiled` count is of the optimised module, and on GPU it
  leaves out convolutions and matmuls that became library (cuDNN/cuBLAS) calls,
  so there it can be far too low. `cost_analysis()` returned a list with one dict
  per computation in older jax versions and returns a dict in newer ones.
  """
  try:
    cost = stage.cost_analysis()
  except NotImplementedError:
    cost = None
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost and hasattr(stage, "compiler_ir"):
    # Lowered.cost_analysis is not implemented for PJRT plugin backends (GPU):
    # it raises (jax 0.12) or returns None (jax 0.11).
    cost = _cpu_cost_analysis(stage)
  if not cost or "flops" not in cost:
    return None
  value = float(cost["flops"])
  return value if value > 0 else None


def _cpu_cost_analysis(lowered) -> dict | None:
  """XLA:CPU's HLO cost analysis of a lowered (unoptimised) module, or None.

  Private jax API, so guarded: the HLO is the backend-independent module before
  any compiler pass; only ops lowered to platform custom calls count as 0.
  """
  try:
    from jax.extend import backend as jex_backend  # pylint: disable=g-import-not-at-top
    try:
      from jax._src.lib import _jax as xla_ext  # pylint: disable=g-import-not-at-top
    except ImportError:
      from jax._src.lib import xla_extension as xla_ext  # pylint: disable=g-import-not-at-top
    module = lowered.compiler_ir("hlo").as_hlo_module()
    return xla_ext.hlo_module_cost_analysis(jex_backend.get_backend("cpu"), module)
  except Exception:  # pylint: disable=broad-except
    return None


def planned_memory_bytes(compiled) -> int | None:
  """XLA's static memory plan of one call: arguments + outputs + temporaries - aliased.

  Unlike the device's peak_bytes_in_use this excludes what compiling itself took
  (GPU autotuning tries convolution algorithms with large scratch buffers).
  """
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if stats is None:
    return None
  try:
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes +
               stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  except AttributeError:
    return None


def matmul_gflops(n: int | None = None, dtype=jnp.float32, repeats: int = 5) -> dict:
  """The machine's dense matmul rate: jitted [n, n] @ [n, n], median of `repeats` calls.

  n defaults to 2048 on CPU (0.05-0.5 s on a few cores) and 8192 elsewhere.
  """
  if n is None:
    n = 2048 if jax.default_backend() == "cpu" else 8192
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  a = jax.random.normal(keys[0], (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(keys[1], (n, n), jnp.float32).astype(dtype)
  matmul = jax.jit(jnp.matmul)
  timing = time_calls(lambda: matmul(a, b), warmup=2, steps=repeats)
  flops = 2.0 * n ** 3
  return {"n": n, "dtype": jnp.dtype(dtype).name, "median_s": timing["median_s"],
          "gflops": flops / timing["median_s"] / 1e9, "busy_cores": timing["busy_cores"]}


# ---------------------------------------------------------------------------- memory

def peak_host_rss_bytes() -> int:
  """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, B on macOS)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int | None:
  """Current resident set size (Linux /proc), None elsewhere."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return None


def device_memory() -> dict | None:
  """{"peak_bytes", "bytes_in_use", "bytes_limit"} of device 0, None when not reported (CPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats:
    return None
  return {"peak_bytes": stats.get("peak_bytes_in_use"),
          "bytes_in_use": stats.get("bytes_in_use"),
          "bytes_limit": stats.get("bytes_limit")}


def tree_nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------- machine

def load_average() -> tuple[float, float, float] | None:
  try:
    return tuple(round(v, 2) for v in os.getloadavg())
  except OSError:
    return None


def machine_info() -> dict:
  devices = jax.devices()
  return {
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "jax_version": jax.__version__,
      "python": platform.python_version(),
      "host_cpus": os.cpu_count(),
      "host_cpu_model": _cpu_model(),
      "load_average": load_average(),
  }


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


# ---------------------------------------------------------------------------- output

def add_output_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--json", action="store_true",
                      help="print one JSON object instead of the table")
  parser.add_argument("--json-out", default="",
                      help="also write the JSON object to this file")


def emit(result: dict, table: str, args: argparse.Namespace) -> None:
  """Prints the table (or the JSON object with --json); writes --json-out if given."""
  text = json.dumps(result, indent=1, default=_json_default)
  if args.json:
    print(text, flush=True)
  else:
    print(table, flush=True)
  if args.json_out:
    with open(args.json_out, "w") as f:
      f.write(text + "\n")


def _json_default(value):
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating,)):
    return float(value)
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """Plain-text table: right-aligned columns, floats with 3 significant decimals."""
  cells = [[_cell(v) for v in row] for row in rows]
  widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c)
            for i, c in enumerate(columns)]
  lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
           "  ".join("-" * w for w in widths)]
  lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
  return "\n".join(lines)


def format_pairs(pairs: Sequence[tuple[str, Any]]) -> str:
  """Two-column "key  value" table."""
  width = max(len(k) for k, _ in pairs)
  return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in pairs)


def _cell(value: Any) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, float):
    if value != value:  # NaN
      return "nan"
    if value == 0 or 0.01 <= abs(value) < 1e6:
      return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return f"{value:.3g}"
  return str(value)


def mib(num_bytes: int | float | None) -> float | None:
  return None if num_bytes is None else num_bytes / 2 ** 20


def header(title: str, info: dict) -> str:
  return (f"{title}\n{info['device_count']}x {info['device_kind']} ({info['backend']}), "
          f"jax {info['jax_version']}, host cpus {info['host_cpus']} ({info['host_cpu_model']}), "
          f"load average {info['load_average']}")


# ---------------------------------------------------------------------------- subprocesses

_RESULT_PREFIX = "BENCHMARK_RESULT "


def print_child_result(result: dict) -> None:
  """What a `--child` run prints for `run_child` to pick up."""
  print(_RESULT_PREFIX + json.dumps(result, default=_json_default), flush=True)


def run_child(script: str, argv: Sequence[str]) -> dict:
  """Runs `python script *argv` in a fresh process and returns its `print_child_result` dict.

  A fresh process per row gives every row its own ru_maxrss and device peak (both
  only ever grow within a process).
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True,
                        check=False)
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(_RESULT_PREFIX):
      return json.loads(line[len(_RESULT_PREFIX):])
  raise RuntimeError(f"{script} {' '.join(argv)} exited with {proc.returncode} and no result;"
                     f" stderr tail:\n{proc.stderr[-3000:]}")
