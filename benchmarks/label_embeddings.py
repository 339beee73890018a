"""Label-embedding stage: time and memory as the number of labeled images grows.

  .venv/bin/python benchmarks/label_embeddings.py [--images 4,16,64] [--json]
  .venv/bin/python benchmarks/label_embeddings.py --tiny    # quick smoke run

The stage is what `label_embedding_stage.compute_from_model` runs: the encoder over
every labeled image (`stage.feature_label_batches`: eval-mode forward,
labels sampled at the feature cells), then `label_embeddings.compute_label_embeddings`
(streaming PCA pass + streaming centroid pass, so the images go through the
encoder twice). The same two calls are made here, with the feature generator
wrapped only to time each pass. Images and labels are synthetic (an in-memory
reader; 10 % of the pixels are void), the weights random (model.init).

Each image count runs in a fresh process, so the memory columns are per row:
  accum KiB     bytes of the streaming accumulators (`StreamingMoments` over the
                F encoder channels + `StreamingClassCentroids`), fixed by F, d, C;
  py peak MiB   tracemalloc peak of Python + NumPy allocations during the stage
                (XLA buffers are not Python allocations and are not counted);
  RSS +MiB      resident set growth from just before to just after the stage;
  max RSS MiB   ru_maxrss of the process (includes JAX, the model and compiling).
Flat columns as the image count grows are the point: memory must not depend on
the number of images.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from usss_jax import config as config_lib  # noqa: E402
from usss_jax import domains  # noqa: E402
from usss_jax import state as state_lib  # noqa: E402
from usss_jax import label_embedding_stage as stage  # noqa: E402
from usss_jax.label_embeddings import compute_label_embeddings, stats  # noqa: E402
from usss_jax.data import base as data_base  # noqa: E402


class SyntheticReader:
  """In-memory stand-in for a DatasetReader: deterministic random images and labels.

  `load_example` returns the same arrays for the same key every time (the
  embedding stage reads every image twice and requires identical passes).
  """

  def __init__(self, num_classes: int, hw: tuple[int, int], void_fraction: float = 0.1):
    self.spec = data_base.DatasetSpec(
        name="synthetic", classes=tuple(f"class{c}" for c in range(num_classes)),
        palette=tuple((c, c, c) for c in range(num_classes)))
    self.hw = hw
    self.void_fraction = void_fraction

  def examples(self, count: int) -> list[data_base.Example]:
    return [data_base.Example(key=f"img{i:05d}", image_path=f"<synthetic {i}>",
                              label_path=f"<synthetic {i}>") for i in range(count)]

  def load_example(self, ex: data_base.Example) -> dict:
    rng = np.random.default_rng(zlib.crc32(ex.key.encode()))
    image = rng.integers(0, 256, (*self.hw, 3), dtype=np.uint8)
    label = rng.integers(0, self.spec.num_classes, self.hw, dtype=np.uint8)
    label[rng.random(self.hw) < self.void_fraction] = data_base.IGNORE_LABEL
    return {"key": ex.key, "image": image, "label": label}


def _int_list(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v]


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=_int_list, default=[4, 16, 64],
                      help="comma-separated numbers of labeled images, one row each")
  parser.add_argument("--encoder", default="drn_d_22")
  parser.add_argument("--encoder-channels", default="",
                      help="8 comma-separated widths (default: the encoder's own)")
  parser.add_argument("--height", type=int, default=256)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--classes", type=int, default=19)
  parser.add_argument("--embedding-dim", type=int, default=128)
  parser.add_argument("--max-pixels-per-image", type=int, default=4096)
  parser.add_argument("--no-tracemalloc", action="store_true",
                      help="skip the Python-heap peak (tracemalloc slows Python allocations)")
  parser.add_argument("--no-isolate", action="store_true",
                      help="run every size in this process (ru_maxrss then accumulates)")
  parser.add_argument("--tiny", action="store_true",
                      help="smoke preset: tiny widths, 64x128 images, 2,4,8 images, d=16")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  common.add_output_flags(parser)
  args = parser.parse_args(argv)
  if args.tiny:
    args.encoder_channels = args.encoder_channels or ",".join(map(str, common.TINY_CHANNELS))
    args.height, args.width = 64, 128
    args.images = [2, 4, 8]
    args.embedding_dim = min(args.embedding_dim, 16)
  return args


def measure(args, num_images: int) -> dict:
  """One row: the whole embedding stage over `num_images` images in this process."""
  load_start = common.load_average()
  config = config_lib.base_config()
  config.encoder = args.encoder
  config.encoder_channels = tuple(int(v) for v in args.encoder_channels.split(",") if v)
  model = state_lib.make_model(config, (args.classes,))
  variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, 64, 64, 3)), train=False))(
      state_lib.init_rng(0))
  variables = jax.block_until_ready(variables)
  reader = SyntheticReader(args.classes, (args.height, args.width))
  domain = domains.Domain(name="synthetic", reader=reader, labeled=reader.examples(num_images))

  passes = []  # per pass: wall s, s to the first image (includes compiling), rows yielded

  def batches_fn():
    start = time.perf_counter()
    record = {"first_s": None, "rows": 0}
    for features, labels in stage.feature_label_batches(
        model, variables, domain, resize_hw=None, normalization="imagenet",
        max_pixels_per_image=args.max_pixels_per_image, seed=0):
      if record["first_s"] is None:
        record["first_s"] = time.perf_counter() - start
      record["rows"] += len(labels)
      yield features, labels
    record["wall_s"] = time.perf_counter() - start
    passes.append(record)

  rss_before = common.current_rss_bytes()
  maxrss_before = common.peak_host_rss_bytes()
  if not args.no_tracemalloc:
    tracemalloc.start()
  cpu_start, start = time.process_time(), time.perf_counter()
  result = compute_label_embeddings(batches_fn, num_classes=args.classes,
                                            dim=args.embedding_dim, k=1, seed=0)
  wall = time.perf_counter() - start
  cpu = time.process_time() - cpu_start
  py_peak = None
  if not args.no_tracemalloc:
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
  rss_after = common.current_rss_bytes()

  feature_dim = int(result.metadata["feature_dim"])
  accumulator_bytes = (stats.StreamingMoments(feature_dim).nbytes +
                       stats.StreamingClassCentroids(args.classes, args.embedding_dim).nbytes)
  steady = [p["wall_s"] - p["first_s"] for p in passes]
  steady_images = max(num_images - 1, 0) * len(passes)
  return {
      "images": num_images,
      "stage_s": wall,
      "busy_cores": cpu / wall if wall > 0 else None,
      "passes": passes,
      "s_per_image_steady": sum(steady) / steady_images if steady_images else None,
      "labeled_pixels": int(result.metadata["labeled_pixels"]),
      "feature_dim": feature_dim,
      "embeddings_shape": list(result.embeddings.shape),
      "accumulator_bytes": accumulator_bytes,
      "python_peak_bytes": py_peak,
      "rss_growth_bytes": (rss_after - rss_before) if rss_before is not None else None,
      "maxrss_growth_bytes": common.peak_host_rss_bytes() - maxrss_before,
      "host_peak_rss_bytes": common.peak_host_rss_bytes(),
      "load_average": [load_start, common.load_average()],
  }


def _child_argv(args, n: int) -> list[str]:
  argv = ["--child", "--images", str(n), "--encoder", args.encoder,
          "--height", str(args.height), "--width", str(args.width),
          "--classes", str(args.classes), "--embedding-dim", str(args.embedding_dim),
          "--max-pixels-per-image", str(args.max_pixels_per_image)]
  if args.encoder_channels:
    argv += ["--encoder-channels", args.encoder_channels]
  if args.no_tracemalloc:
    argv.append("--no-tracemalloc")
  return argv


def run(args) -> dict:
  info = common.machine_info()
  rows = []
  for n in args.images:
    if args.no_isolate:
      rows.append(measure(args, n))
    else:
      rows.append(common.run_child(os.path.abspath(__file__), _child_argv(args, n)))
  return {
      "benchmark": "label_embeddings",
      "machine": info,
      "load_average_end": common.load_average(),
      "setup": {"encoder": args.encoder, "encoder_channels": args.encoder_channels or None,
                "height": args.height, "width": args.width, "classes": args.classes,
                "embedding_dim": args.embedding_dim, "k": 1,
                "max_pixels_per_image": args.max_pixels_per_image,
                "tracemalloc": not args.no_tracemalloc,
                "isolated_processes": not args.no_isolate},
      "rows": rows,
  }


def table(r: dict) -> str:
  s = r["setup"]
  widths = f" widths {s['encoder_channels']}" if s["encoder_channels"] else ""
  title = (f"label-embedding stage (encoder x2 passes + streaming PCA + centroids): "
           f"{s['encoder']}{widths}, {s['height']}x{s['width']} images, C={s['classes']}, "
           f"d={s['embedding_dim']}, K=1, "
           + ("one fresh process per row" if s["isolated_processes"] else "one process")
           + (", tracemalloc on" if s["tracemalloc"] else ""))
  columns = ("images", "pixels", "stage s", "s/img steady", "1st img s (pass1/2)", "busy cores",
             "accum KiB", "py peak MiB", "RSS +MiB", "max RSS MiB", "load avg 1m")
  rows = []
  for x in r["rows"]:
    first = "/".join(f"{p['first_s']:.2f}" for p in x["passes"])
    rows.append((x["images"], x["labeled_pixels"], x["stage_s"], x["s_per_image_steady"], first,
                 x["busy_cores"], x["accumulator_bytes"] / 1024,
                 common.mib(x["python_peak_bytes"]), common.mib(x["rss_growth_bytes"]),
                 common.mib(x["host_peak_rss_bytes"]), x["load_average"][0][0]))
  return (common.header(title, r["machine"]) + "\n" + common.format_table(columns, rows) +
          f"\nload average at the end {r['load_average_end']}")


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.child:
    common.print_child_result(measure(args, args.images[0]))
    return
  result = run(args)
  common.emit(result, table(result), args)


if __name__ == "__main__":
  main()
