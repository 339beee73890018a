"""Every method's train step at each shape preset: one fresh process per row, one Markdown table.

  .venv/bin/python benchmarks/methods.py --shapes defaults,camvid_iddlite --steps 5 --warmup 2 \\
      --json-out methods.json
  .venv/bin/python benchmarks/methods.py --methods basic,consistency -- --conv-weight-grad=xla

Runs benchmarks/train_step.py for every method of `usss_jax.objectives.METHODS` (or
`--methods`) and every `--shapes` preset, each in its own process (so each row has its own
peak RSS), with the flags after `--` passed to every run, and prints the table docs/BENCHMARKS.md
takes: s/step, images/s, GFLOP/step, achieved GFLOP/s, peak host RSS, XLA's memory plan.
A row that fails is marked "error" in the table, its stderr listed below it (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from benchmarks import common, train_step  # noqa: E402
from usss_jax import objectives  # noqa: E402


def parse_args(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = []
  if "--" in argv:
    at = argv.index("--")
    argv, extra = argv[:at], argv[at + 1:]
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--methods", default=",".join(objectives.METHODS),
                      help="comma-separated methods (default: all of objectives.METHODS)")
  parser.add_argument("--shapes", default="defaults,camvid_iddlite",
                      help="comma-separated presets of train_step.py --shapes")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  common.add_output_flags(parser)
  args = parser.parse_args(argv)
  unknown = sorted(set(args.shapes.split(",")) - set(train_step.SHAPES))
  if unknown:
    parser.error(f"--shapes: unknown presets {unknown}; choose from {train_step.SHAPES}")
  args.extra = extra
  return args


def run_one(method: str, shapes: str, args) -> dict:
  """train_step.py's JSON result of one row, or {"method", "shapes", "error", "command"}."""
  cmd = [sys.executable, os.path.join(REPO, "benchmarks", "train_step.py"), "--method", method,
         "--shapes", shapes, "--steps", str(args.steps), "--warmup", str(args.warmup),
         "--matmul-size", "0", *args.extra]
  command = " ".join(cmd[1:])
  with tempfile.TemporaryDirectory(prefix="usss_methods_") as tmp:
    out = os.path.join(tmp, "row.json")
    proc = subprocess.run([*cmd, "--json", "--json-out", out], capture_output=True, text=True,
                          check=False)
    if proc.returncode or not os.path.exists(out):
      return {"method": method, "shapes": shapes, "error": proc.stderr[-2000:],
              "command": command}
    with open(out) as f:
      return {**json.load(f), "command": command}


def row(r: dict) -> list:
  if "error" in r:
    return [r["shapes"], r["method"], "error", None, None, None, None, None, None]
  s = r["setup"]
  images = (s["labeled_per_domain"] + s["unlabeled_per_domain"]) * len(s["classes"])
  gflop = r["flops_per_step"] / 1e9 if r.get("flops_per_step") else None
  return [s["shapes"], s["method"], "+".join(s["terms"]), images, gflop,
          r.get("seconds_per_step"), r.get("achieved_gflops"),
          common.mib(r.get("host_peak_rss_bytes")), common.mib(r.get("xla_planned_bytes"))]


COLUMNS = ["shapes", "method", "terms", "images/step", "GFLOP/step", "s/step", "GFLOP/s",
           "peak RSS MiB", "XLA plan MiB"]


def markdown(rows: list[list]) -> str:
  cell = lambda v: "-" if v is None else (f"{v:,.3f}" if isinstance(v, float) and v < 100 else
                                          f"{v:,.0f}" if isinstance(v, float) else str(v))
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
  return "\n".join(lines)


def main(argv=None) -> None:
  args = parse_args(argv)
  load_start = common.load_average()
  results = [run_one(m, shapes, args) for shapes in args.shapes.split(",")
             for m in args.methods.split(",")]
  rows = [row(r) for r in results]
  errors = [f"{r['shapes']} {r['method']}: {r['error']}" for r in results if "error" in r]
  text = (markdown(rows) + f"\n\nload average start {load_start}, end {common.load_average()}" +
          ("\n\nerrors:\n" + "\n".join(errors) if errors else ""))
  common.emit({"benchmark": "methods", "load_average_start": load_start,
               "load_average_end": common.load_average(), "rows": results}, text, args)
  if errors:
    sys.exit(1)


if __name__ == "__main__":
  main()
