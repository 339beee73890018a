"""The GPU check (benchmarks/gpu_check.sh): versions, train steps, the PyTorch step, a demo run.

  benchmarks/gpu_check.sh [--out DIR] [--torch-python PY]   # on a GPU machine, under 8 minutes
  benchmarks/gpu_check.sh --dry-run [--out DIR]             # CPU, tiny shapes: the wiring

Writes DIR/gpu_check.json and DIR/gpu_check.md (the table for docs/BENCHMARKS.md):

1. versions: Python, jax, jaxlib, flax, optax, the CUDA plugin, the devices, nvidia-smi, torch;
2. the train step (benchmarks/train_step.py, method full) in float32 and bfloat16 at the
   defaults (2 + 2 images of 256x512 per domain) and at the paper's shapes (`--shapes cs_idd`:
   10 + 10 crops of 512x512 per domain, 19 + 26 classes): s/step, images/s, GFLOP/step,
   achieved TFLOP/s, MFU (against the device's nominal dense peak, and against the matmul rate
   measured in the same process), peak device memory;
3. the PyTorch step of the same shapes on the same device (benchmarks/torch_step.py --device
   cuda, float32 and bf16 autocast), when `--torch-python` (default: this Python) imports torch;
4. a short real training of the demo (launch.py --config=configs/demo.py, `--demo-steps`) and
   its mean mIoU.

Every item runs in its own process (its own device-memory peak; this process initialises no
jax backend), with a time limit cut from the overall `--budget-s`. An item that fails or runs
out of time is recorded with its error and the check goes on; the exit status is then 1.
`--dry-run` runs the same items on the CPU with tiny shapes (train_step.py --tiny, the tiny
demo of the tests): tests/test_benchmarks.py runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from benchmarks import common, train_step  # noqa: E402

# train_step.py --shapes presets the check times: the defaults and the paper's (cs_idd).
SHAPES = ("defaults", "cs_idd")
DTYPES = ("float32", "bfloat16")
# Nominal dense peaks in FLOP/s by device kind, most specific name first: bf16 tensor cores,
# and the TF32 ones that float32 convolutions and matmuls use at JAX's default precision.
NOMINAL_PEAKS = (
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float32": 494.7e12}),
    ("H200", {"bfloat16": 989e12, "float32": 494.7e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("L4", {"bfloat16": 121e12, "float32": 60e12}),
)
# An item is not started with less time than this left of the budget.
MIN_ITEM_S = 10.0

_VERSIONS = """
import importlib.metadata, json, sys
import jax
info = {"python": sys.version.split()[0], "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()]}
for package in ("jaxlib", "flax", "optax", "jax-cuda12-plugin", "jax-cuda13-plugin"):
  try:
    info[package] = importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    pass
print(json.dumps(info))
"""


class Budget:
  """What is left of the overall time limit."""

  def __init__(self, seconds: float):
    self.end = time.monotonic() + seconds

  def left(self) -> float:
    return self.end - time.monotonic()


def child_env(dry_run: bool) -> dict:
  """The items' environment; a dry run's: the CPU as one device (a test's fake devices would
  split the batch) at XLA's optimisation level 0 (tiny models: compiling dominates)."""
  if not dry_run:
    return dict(os.environ)
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith(("--xla_force_host_platform_device_count",
                                "--xla_backend_optimization_level"))]
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=" ".join([*flags, "--xla_backend_optimization_level=0"]))


def run_item(cmd: list[str], limit_s: float, env: dict) -> dict:
  """Runs `cmd` under a time limit: {"ok", "seconds", "returncode", "error" (on failure)}."""
  if limit_s < MIN_ITEM_S:
    return {"ok": False, "seconds": 0.0, "error": "not run: the time budget is spent"}
  start = time.monotonic()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s, env=env,
                          cwd=REPO, check=False)
  except subprocess.TimeoutExpired:
    return {"ok": False, "seconds": time.monotonic() - start,
            "error": f"timed out after {limit_s:.0f} s"}
  except OSError as e:  # e.g. no such interpreter
    return {"ok": False, "seconds": time.monotonic() - start, "error": str(e)}
  item = {"ok": proc.returncode == 0, "seconds": time.monotonic() - start,
          "returncode": proc.returncode}
  if proc.returncode:
    item["error"] = (proc.stderr or proc.stdout)[-2500:]
  return item


def add_result(item: dict, path: str, fields) -> None:
  """Adds `fields(path)` (what an item's output file says) to a finished item; a missing or
  incomplete output marks the item failed instead."""
  if not item["ok"]:
    return
  try:
    item.update(fields(path))
  except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
    item.update(ok=False, error=f"no usable result in {path}: {e!r}")


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def versions(torch_python: str, env: dict) -> dict:
  """jax and its devices (read in a child: this process holds no device), nvidia-smi, torch."""
  proc = subprocess.run([sys.executable, "-c", _VERSIONS], capture_output=True, text=True,
                        env=env, check=False)
  try:
    info = json.loads(proc.stdout.strip().splitlines()[-1])
  except (IndexError, ValueError):
    info = {"jax": None, "devices": [], "error": proc.stderr[-1500:]}
  if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True, check=False)
    info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
  try:
    torch = subprocess.run([torch_python, "-c", "import torch; print(torch.__version__, "
                            "torch.version.cuda, torch.cuda.is_available())"],
                           capture_output=True, text=True, check=False)
    info["torch"] = torch.stdout.strip() if torch.returncode == 0 else None
  except OSError:
    info["torch"] = None
  return info


def nominal_peak(device_kind: str, dtype: str) -> float | None:
  return next((peaks[dtype] for name, peaks in NOMINAL_PEAKS if name in device_kind), None)


def step_flags(shape: str, dry_run: bool) -> list[str]:
  """train_step.py's flags of one shape preset (a dry run: --tiny on top)."""
  return ["--shapes", shape, *(["--tiny"] if dry_run else [])]


def train_step_item(shape: str, dtype: str, args, budget: Budget, out_dir: str,
                    env: dict) -> dict:
  out = os.path.join(out_dir, f"train_step_{shape}_{dtype}.json")
  cmd = [sys.executable, os.path.join("benchmarks", "train_step.py"), "--dtype", dtype,
         "--steps", str(args.steps), "--warmup", str(args.warmup),
         *step_flags(shape, args.dry_run), "--json-out", out]
  item = {"kind": "train_step", "shape": shape, "dtype": dtype, "command": " ".join(cmd[1:]),
          **run_item(cmd, min(args.item_limit_s, budget.left()), env)}

  def fields(path: str) -> dict:
    r = read_json(path)
    device_kind = r["machine"]["device_kind"]
    achieved = r["achieved_gflops"] * 1e9 if r["achieved_gflops"] else None
    peak = nominal_peak(device_kind, dtype)
    return {"device": device_kind, "seconds_per_step": r["seconds_per_step"],
            "images_per_step": r["images_per_step"], "images_per_s": r["images_per_s"],
            "gflop_per_step": r["flops_per_step"] / 1e9 if r["flops_per_step"] else None,
            "achieved_tflops": achieved / 1e12 if achieved else None,
            "mfu_nominal": achieved / peak if achieved and peak else None,
            "mfu_matmul": r["fraction_of_matmul_peak"],
            "matmul_tflops": r["matmul_peak"]["gflops"] / 1e3 if r["matmul_peak"] else None,
            "device_peak_mib": common.mib(r["device_peak_bytes"]),
            "xla_plan_mib": common.mib(r["xla_planned_bytes"]),
            "compile_s": r["compile_s"], "setup": r["setup"]}

  add_result(item, out, fields)
  return item


def torch_flags(shape: str, dry_run: bool) -> list[str]:
  """torch_step.py's flags for the shapes train_step.py takes for `shape` (it has no presets)."""
  a = train_step.parse_args(step_flags(shape, dry_run))
  flags = ["--encoder", a.encoder, "--classes", ",".join(map(str, a.classes)),
           "--embedding-dim", str(a.embedding_dim), "--height", str(a.height),
           "--width", str(a.width), "--labeled", str(a.labeled), "--unlabeled", str(a.unlabeled)]
  if a.encoder_channels:
    flags += ["--encoder-channels", ",".join(map(str, a.encoder_channels))]
  return flags


def torch_item(shape: str, dtype: str, args, budget: Budget, out_dir: str, env: dict,
               has_torch: bool) -> dict:
  item = {"kind": "torch_step", "shape": shape, "dtype": dtype}
  if not has_torch:
    return {**item, "ok": False, "skipped": True,
            "error": f"skipped: {args.torch_python} cannot import torch"}
  out = os.path.join(out_dir, f"torch_step_{shape}_{dtype}.json")
  # --low-res-scores: the entropy scores at 1/8 resolution, as train_step.py's step takes them.
  # A dry run's CPU step takes one thread: torch's threads wait on each other on a busy machine.
  device = ["--device", "cpu", "--threads", "1"] if args.dry_run else ["--device", "cuda"]
  cmd = [args.torch_python, os.path.join("benchmarks", "torch_step.py"), "--steps",
         str(args.steps), "--warmup", str(args.warmup), *torch_flags(shape, args.dry_run),
         *device, "--low-res-scores", *(["--bf16"] if dtype == "bfloat16" else []),
         "--json-out", out]
  item.update(command=" ".join(cmd[1:]),
              **run_item(cmd, min(args.item_limit_s, budget.left()), env))

  def fields(path: str) -> dict:
    r = read_json(path)
    return {"device": r["device_name"] or r["device"], "seconds_per_step": r["seconds_per_step"],
            "images_per_step": r["images_per_step"], "images_per_s": r["images_per_s"],
            "device_peak_mib": common.mib(r["device_peak_bytes"]),
            "torch_version": r["torch_version"]}

  add_result(item, out, fields)
  return item


def demo_flags(steps: int, work: str, dry_run: bool) -> list[str]:
  """launch.py's flags of the demo run: `steps` steps, one evaluation at the end; a dry run's
  on a fresh copy of the demo data, with tests/helpers.py's tiny model and random label
  embeddings (no pre-training stage: compiling dominates the dry run)."""
  flags = ["--config=configs/demo.py", f"--workdir={os.path.join(work, 'demo')}",
           f"--config.total_steps={steps}", f"--config.eval_every={steps}"]
  if dry_run:
    data = os.path.join(work, "demo_data")
    flags += [f"--config.domains.street.root={data}/street",
              f"--config.domains.indoor.root={data}/indoor",
              "--config.domains.street.crop=(32, 48)", "--config.domains.indoor.crop=(32, 48)",
              "--config.encoder_channels=(4, 8, 12, 16, 20, 24, 28, 32)",
              "--config.embedding_dim=8", "--config.num_labeled=4",
              "--config.eval_max_examples=8", "--config.label_embeddings.source=random",
              f"--config.checkpoint_every={steps}", f"--config.log_every={steps}"]
  return flags


def demo_item(args, budget: Budget, work: str, env: dict) -> dict:
  steps = 4 if args.dry_run else args.demo_steps
  cmd = [sys.executable, "launch.py", *demo_flags(steps, work, args.dry_run)]
  item = {"kind": "demo", "steps": steps, "command": " ".join(cmd[1:]),
          **run_item(cmd, min(args.demo_limit_s, budget.left()), env)}

  def fields(path: str) -> dict:
    final = [r for r in read_jsonl(path) if r.get("kind") == "eval"][-1]
    return {"mean_miou": final["mean_miou"],
            "miou": {k: v["miou"] for k, v in final.items() if isinstance(v, dict) and "miou" in v}}

  add_result(item, os.path.join(work, "demo", "metrics.jsonl"), fields)
  return item


def markdown(result: dict) -> str:
  v = result["versions"]
  cell = lambda x, fmt: "-" if x is None else fmt.format(x)
  lines = [f"GPU check {result['date']}: {', '.join(v['devices']) or 'no devices'}; jax "
           f"{v['jax']}, jaxlib {v.get('jaxlib')}, flax {v.get('flax')}, torch {v.get('torch')}"
           + (f"; nvidia-smi: {v['nvidia_smi']}" if v.get("nvidia_smi") else "")
           + (" (DRY RUN: CPU, tiny shapes)" if result["dry_run"] else ""), "",
           "| step | shapes | dtype | s/step | images/s | GFLOP/step | TFLOP/s | MFU (nominal) "
           "| MFU (matmul) | peak device MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
  for it in result["items"]:
    if it["kind"] == "demo":
      continue
    name = "usss-jax" if it["kind"] == "train_step" else "PyTorch"
    if not it["ok"]:
      error = (it.get("error") or "failed").strip().splitlines() or ["failed"]
      reason = error[-1][:100].replace("|", "/")
      lines.append(f"| {name} | {it['shape']} | {it['dtype']} | {reason} | | | | | | |")
      continue
    lines.append(
        f"| {name} | {it['shape']} | {it['dtype']} | {cell(it['seconds_per_step'], '{:.4f}')} | "
        f"{cell(it['images_per_s'], '{:.1f}')} | {cell(it.get('gflop_per_step'), '{:,.1f}')} | "
        f"{cell(it.get('achieved_tflops'), '{:.2f}')} | {cell(it.get('mfu_nominal'), '{:.1%}')} | "
        f"{cell(it.get('mfu_matmul'), '{:.1%}')} | {cell(it.get('device_peak_mib'), '{:,.0f}')} |")
  demo = next(it for it in result["items"] if it["kind"] == "demo")
  if demo["ok"]:
    lines += ["", f"Demo training (configs/demo.py, {demo['steps']} steps): mean mIoU "
                  f"{demo['mean_miou']:.4f} ({demo['miou']}), {demo['seconds']:.0f} s for the "
                  "whole launch.py run"]
  else:
    lines += ["", f"Demo training failed: {(demo.get('error') or '')[-300:]}"]
  lines += ["", f"Total {result['seconds']:.0f} s."]
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
  parser.add_argument("--out", default="", help="output folder (default: a new temporary one)")
  parser.add_argument("--torch-python", default=sys.executable,
                      help="interpreter with torch for the PyTorch step (default: this one)")
  parser.add_argument("--budget-s", type=float, default=450.0, help="overall time limit")
  parser.add_argument("--item-limit-s", type=float, default=150.0,
                      help="time limit of one train step item (JAX or PyTorch)")
  parser.add_argument("--demo-limit-s", type=float, default=240.0,
                      help="time limit of the demo training")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per item")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps per item")
  parser.add_argument("--demo-steps", type=int, default=1200,
                      help="demo training steps (configs/demo.py's own: 1200)")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.dry_run:  # train_step.py --tiny's; the PyTorch step takes the same
    args.steps, args.warmup = 2, 1
  start = time.monotonic()
  budget = Budget(args.budget_s)
  out_dir = args.out or tempfile.mkdtemp(prefix="usss_gpu_check_")
  os.makedirs(out_dir, exist_ok=True)
  work = tempfile.mkdtemp(prefix="usss_gpu_check_work_")
  env = child_env(args.dry_run)
  info = versions(args.torch_python, env)
  items = [train_step_item(shape, dtype, args, budget, out_dir, env)
           for shape in SHAPES for dtype in DTYPES]
  items.append(demo_item(args, budget, work, env))
  items += [torch_item(shape, dtype, args, budget, out_dir, env, info["torch"] is not None)
            for shape in SHAPES for dtype in DTYPES]
  shutil.rmtree(work, ignore_errors=True)
  result = {"benchmark": "gpu_check", "date": time.strftime("%Y-%m-%d %H:%M"),
            "dry_run": args.dry_run, "versions": info, "items": items,
            "seconds": time.monotonic() - start}
  with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
    json.dump(result, f, indent=1, default=str)
  text = markdown(result)
  with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
    f.write(text + "\n")
  print(text + f"\n\nwritten: {out_dir}/gpu_check.json, {out_dir}/gpu_check.md", flush=True)
  failed = [" ".join(str(it.get(k, "")) for k in ("kind", "shape", "dtype")).strip()
            for it in items if not it["ok"] and not it.get("skipped")]
  if failed:
    print("failed: " + "; ".join(failed), file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
