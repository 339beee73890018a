"""Input pipeline throughput (images/s) at the paper's training crops.

  .venv/bin/python benchmarks/input_pipeline.py [--steps 10] [--batch 8] [--json]

Per dataset: `TrainInput` with one domain, labeled and unlabeled batches of
`--batch` each (the USSS step consumes both), host NumPy output (no device
transfer), for worker_count 0 and 2. Real samples under ../shared/data are used
when present (Cityscapes, IDD-Lite, CamVid, SUN RGB-D), else the demo data,
which `resize_hw` upscales to the paper's sizes. Not a test; numbers depend on
the CPU count and on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from usss_jax.data import pipeline  # noqa: E402
from usss_jax.domains import Domain  # noqa: E402
from usss_jax.data.demo import ensure_demo_data  # noqa: E402
from usss_jax.data.registry import get_reader  # noqa: E402


@dataclasses.dataclass
class Case:
  name: str          # row label
  reader: str        # registry name
  subdir: str        # under ../shared/data
  reader_kwargs: dict
  resize_hw: tuple[int, int]
  crop_hw: tuple[int, int] | None
  demo_domain: str   # demo fallback domain


# Reference training transforms: CS/IDD resize to 512x1024 then 512x512 crop;
# CamVid 360x480 and SUN 480x640 resize without crop; flips everywhere.
CASES = (
    Case("cityscapes", "cityscapes", "cityscapes", {}, (512, 1024), (512, 512), "street"),
    Case("idd_lite", "idd_lite", "idd_lite", {}, (512, 1024), (512, 512), "street"),
    Case("camvid", "camvid", "camvid", {"list_suffix": ".subset"}, (360, 480), None, "street"),
    Case("sunrgbd", "sunrgbd", "sunrgbd", {}, (480, 640), None, "indoor"),
)


def _examples(case: Case, shared: str, demo_root: str):
  root = os.path.join(shared, case.subdir)
  if os.path.isdir(root):
    reader = get_reader(case.reader, root, **case.reader_kwargs)
    return reader, reader.list_examples("train"), f"shared/{case.subdir}"
  path = ensure_demo_data(demo_root)[case.demo_domain]
  reader = get_reader("folder", path)
  return reader, reader.list_examples("train"), f"demo/{case.demo_domain} upscaled"


def _measure(case, reader, examples, batch, steps, warmup, workers) -> dict:
  domain = Domain(name=case.name, labeled=examples, unlabeled=examples, reader=reader,
                  crop_hw=case.crop_hw, resize_hw=case.resize_hw)
  with pipeline.TrainInput([domain], labeled_batch=batch, unlabeled_batch=batch, seed=0,
                           mesh=None, worker_count=workers) as it:
    start = time.perf_counter()
    for _ in range(warmup):
      next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
      out = next(it)[case.name]
    elapsed = time.perf_counter() - start
  h, w = out["labeled"]["image"].shape[1:3]
  images = steps * 2 * batch
  return {"dataset": case.name, "hw": f"{h}x{w}", "workers": workers,
          "images_per_s": images / elapsed, "ms_per_step": 1e3 * elapsed / steps,
          "startup_s": first, "num_examples": len(examples)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--batch", type=int, default=8, help="labeled = unlabeled batch")
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  parser.add_argument("--datasets", nargs="+", default=[c.name for c in CASES])
  parser.add_argument("--shared", default=os.path.join(os.path.dirname(REPO), "shared", "data"))
  parser.add_argument("--demo_root", default=os.path.join(tempfile.gettempdir(), "usss_demo"))
  parser.add_argument("--json", action="store_true", help="print JSON lines instead")
  args = parser.parse_args()

  rows = []
  for case in CASES:
    if case.name not in args.datasets:
      continue
    reader, examples, source = _examples(case, args.shared, args.demo_root)
    for workers in args.workers:
      row = _measure(case, reader, examples, args.batch, args.steps, args.warmup, workers)
      row["source"] = source
      rows.append(row)
      if args.json:
        print(json.dumps(row), flush=True)
  if not args.json:
    print(f"cpus={os.cpu_count()} batch={args.batch}+{args.batch} (labeled+unlabeled) "
          f"steps={args.steps}")
    print(f"{'dataset':<11} {'crop':>8} {'workers':>7} {'images/s':>9} {'ms/step':>8} "
          f"{'startup s':>9}  source (#train)")
    for r in rows:
      print(f"{r['dataset']:<11} {r['hw']:>8} {r['workers']:>7} {r['images_per_s']:>9.1f} "
            f"{r['ms_per_step']:>8.0f} {r['startup_s']:>9.1f}  {r['source']} "
            f"({r['num_examples']})")


if __name__ == "__main__":  # required: grain workers re-import this module
  main()
