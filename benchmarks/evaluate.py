"""Full-resolution inference: images/s, ms/image and peak memory per input size.

  .venv/bin/python benchmarks/evaluate.py [--sizes 1024x2048,360x480,480x640] [--json]
  .venv/bin/python benchmarks/evaluate.py --tiny            # seconds-long smoke run

What is timed is one evaluation batch exactly as `usss_jax.evaluate` runs it:
the jitted `evaluate._confusion_step` (eval-mode forward of one head, argmax,
`metrics.confusion_matrix` at label resolution) on a batch already on the
devices (sharded over `sharding.local_mesh()`), plus fetching the small confusion
matrix to the host. Decoding and normalising images is not included.

Default sizes: Cityscapes/IDD full resolution 1024x2048, CamVid 360x480,
SUN RGB-D 480x640. Each size runs in a fresh process (`--no-isolate` to run
them in this one), so every row has its own peak host RSS (ru_maxrss) and peak
device memory (where the backend reports it). Weights are random (model.init):
speed does not depend on them. On a 2-core CPU a 1024x2048 DRN-D-22 forward
takes several seconds, so the default repetitions are small.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from benchmarks import common  # noqa: E402
from usss_jax import config as config_lib  # noqa: E402
from usss_jax import evaluate, sharding  # noqa: E402
from usss_jax import state as state_lib  # noqa: E402

from usss_jax.data.base import IGNORE_LABEL  # noqa: E402


def _size(text: str) -> tuple[int, int]:
  h, w = text.lower().split("x")
  return int(h), int(w)


def _sizes(text: str) -> list[tuple[int, int]]:
  return [_size(s) for s in text.split(",") if s]


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--encoder", default="drn_d_22")
  parser.add_argument("--encoder-channels", default="",
                      help="8 comma-separated widths (default: the encoder's own)")
  parser.add_argument("--sizes", type=_sizes, default=_sizes("1024x2048,360x480,480x640"),
                      help="comma-separated HxW input (= label) sizes")
  parser.add_argument("--classes", type=int, default=19, help="classes of the evaluated head")
  parser.add_argument("--batch", type=int, default=1,
                      help="images per call (rounded up to a multiple of the local devices)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
  parser.add_argument("--repeats", type=int, default=2, help="timed calls (median reported)")
  parser.add_argument("--no-isolate", action="store_true",
                      help="run every size in this process (peaks then accumulate)")
  parser.add_argument("--tiny", action="store_true",
                      help="smoke preset: tiny widths, sizes 64x128,45x60, 2 repeats")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  common.add_output_flags(parser)
  args = parser.parse_args(argv)
  if args.tiny:
    args.encoder_channels = args.encoder_channels or ",".join(map(str, common.TINY_CHANNELS))
    args.sizes = [(64, 128), (45, 60)]
    args.warmup, args.repeats = 1, 2
  return args


def make_model(args):
  config = config_lib.base_config()
  config.encoder = args.encoder
  config.encoder_channels = tuple(int(v) for v in args.encoder_channels.split(",") if v)
  config.dtype = args.dtype
  return state_lib.make_model(config, (args.classes,))


def measure_size(args, hw: tuple[int, int]) -> dict:
  """One row: compile, warm up and time `_confusion_step` at input size `hw`."""
  load_start = common.load_average()
  model = make_model(args)
  start = time.perf_counter()
  variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, 64, 64, 3)), train=False))(
      state_lib.init_rng(0))
  variables = jax.block_until_ready(variables)
  init_s = time.perf_counter() - start
  mesh = sharding.local_mesh()
  n_local = mesh.devices.size
  batch = -(-args.batch // n_local) * n_local
  local_vars = sharding.to_local_replicated(variables, mesh)

  rng = np.random.default_rng(0)
  labels = rng.integers(0, args.classes, (batch, *hw), dtype=np.int32)
  labels[rng.random(labels.shape) < 0.1] = IGNORE_LABEL
  valid_pixels = int((labels != IGNORE_LABEL).sum())
  data = NamedSharding(mesh, P("data"))
  images = jax.device_put(rng.standard_normal((batch, *hw, 3), np.float32), data)
  labels = jax.device_put(labels, data)
  real = jax.device_put(np.ones(batch, bool), data)
  rss_before = common.current_rss_bytes()

  start = time.perf_counter()
  lowered = evaluate._confusion_step.lower(model, local_vars, images, labels, real, head=0,
                                          num_classes=args.classes)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  flops = common.flops_of(lowered)  # backend-independent (see common.flops_of)
  planned = common.planned_memory_bytes(compiled)

  def call():
    return np.asarray(compiled(local_vars, images, labels, real)[0])

  start = time.perf_counter()
  confusion = call()
  first_s = time.perf_counter() - start
  if int(confusion.sum()) != valid_pixels:
    raise RuntimeError(f"confusion matrix counts {int(confusion.sum())} pixels, expected "
                       f"{valid_pixels} non-ignored ones")
  timing = common.time_calls(call, warmup=args.warmup, steps=args.repeats)
  device_mem = common.device_memory()
  per_image = timing["median_s"] / batch
  return {
      "height": hw[0], "width": hw[1], "batch": batch,
      "seconds_per_batch": timing["median_s"], "times_s": timing["times_s"],
      "ms_per_image": 1e3 * per_image, "images_per_s": 1.0 / per_image,
      "gflops_per_image": flops / batch / 1e9 if flops else None,
      "achieved_gflops": flops / timing["median_s"] / 1e9 if flops else None,
      "busy_cores": timing["busy_cores"], "init_s": init_s, "compile_s": compile_s,
      "first_call_s": first_s,
      "host_peak_rss_bytes": common.peak_host_rss_bytes(),
      "host_rss_growth_bytes": (common.current_rss_bytes() - rss_before
                                if rss_before is not None else None),
      "device_peak_bytes": device_mem["peak_bytes"] if device_mem else None,
      "xla_planned_bytes": planned,
      "load_average": [load_start, common.load_average()],
  }


def _child_argv(args, hw) -> list[str]:
  argv = ["--child", "--sizes", f"{hw[0]}x{hw[1]}", "--encoder", args.encoder,
          "--classes", str(args.classes), "--batch", str(args.batch), "--dtype", args.dtype,
          "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
  if args.encoder_channels:
    argv += ["--encoder-channels", args.encoder_channels]
  return argv


def run(args) -> dict:
  info = common.machine_info()
  rows = []
  for hw in args.sizes:
    if args.no_isolate:
      rows.append(measure_size(args, hw))
    else:
      rows.append(common.run_child(os.path.abspath(__file__), _child_argv(args, hw)))
  return {
      "benchmark": "evaluate",
      "machine": info,
      "load_average_end": common.load_average(),
      "setup": {"encoder": args.encoder, "encoder_channels": args.encoder_channels or None,
                "classes": args.classes, "dtype": args.dtype, "warmup": args.warmup,
                "repeats": args.repeats, "isolated_processes": not args.no_isolate},
      "rows": rows,
  }


def table(r: dict) -> str:
  s = r["setup"]
  widths = f" widths {s['encoder_channels']}" if s["encoder_channels"] else ""
  title = (f"inference (forward + argmax + confusion matrix): {s['encoder']}{widths}, "
           f"{s['classes']} classes, {s['dtype']}, median of {s['repeats']} after "
           f"{s['warmup']} warm-up(s), "
           + ("one fresh process per size" if s["isolated_processes"] else
              "one process (peaks accumulate down the table)"))
  columns = ("HxW", "batch", "images/s", "ms/image", "GFLOP/img", "GFLOP/s", "busy cores",
             "compile s", "first s", "peak host MiB", "XLA plan MiB", "peak dev MiB*",
             "load avg 1m")
  rows = [(f"{x['height']}x{x['width']}", x["batch"], x["images_per_s"], x["ms_per_image"],
           x["gflops_per_image"], x["achieved_gflops"], x["busy_cores"], x["compile_s"],
           x["first_call_s"], common.mib(x["host_peak_rss_bytes"]),
           common.mib(x["xla_planned_bytes"]), common.mib(x["device_peak_bytes"]),
           x["load_average"][0][0]) for x in r["rows"]]
  return (common.header(title, r["machine"]) + "\n" + common.format_table(columns, rows) +
          "\nGFLOP: cost analysis of the lowered HLO. XLA plan: arguments + outputs + "
          "temporaries of one call.\n*peak_bytes_in_use of device 0 over the process, compiling "
          "included (GPU autotuning scratch can dominate it); n/a where not reported (CPU)."
          f"\nload average at the end {r['load_average_end']}")


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.child:
    common.print_child_result(measure_size(args, args.sizes[0]))
    return
  result = run(args)
  common.emit(result, table(result), args)


if __name__ == "__main__":
  main()
