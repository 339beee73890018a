"""Universal training step: seconds/step, images/s, FLOPs and memory.

  .venv/bin/python benchmarks/train_step.py [--embedding-dim 100] [--json]
  .venv/bin/python benchmarks/train_step.py --shapes camvid_iddlite   # an experiment's shapes
  .venv/bin/python benchmarks/train_step.py --tiny          # seconds-long smoke run

The step is the project's own (`train_step.make_train_step` + `train_step.jit_train_step`
on `sharding.make_mesh()`), built from `usss_jax.config.base_config()`: method
"full" with alpha = beta = 1, DRN-D-22, two domains (19 and 26 classes), per
domain 2 labeled + 2 unlabeled 256x512 images, random label embeddings. Inputs
are random and placed on the devices (batch-sharded) before timing, so this is
the step alone, without the input pipeline.

`--shapes NAME` takes the step's shapes from the experiment config configs/NAME.py instead:
its encoder and widths, embedding size, classes per domain (its datasets' readers), labeled +
unlabeled images per domain and training crop (camvid_iddlite: tiny DRN-D-22 widths, d = 32,
11 + 7 classes, 4 + 4 images of 96x128; cs_idd, the paper's: 19 + 26 classes, 10 + 10 crops of
512x512). Flags given on the command line win over the preset; "defaults" is the above.

The reference PyTorch step of ../shared/notes/usss_reference.md §9 has this
shape with embedding_dim 100 (and 20/27 classes: its heads carry an extra void
channel) and ran at a median 4.47 s/step on the 2-core development VM; pass
`--embedding-dim 100` to compare. Not a test; the numbers depend on the machine
and on what else runs on it (the load average is printed).
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from benchmarks import common  # noqa: E402
from usss_jax import config as config_lib  # noqa: E402
from usss_jax import cli, convert, data, modes, objectives, sharding, train_step  # noqa: E402
from usss_jax import state as state_lib  # noqa: E402
from usss_jax.label_embeddings import store  # noqa: E402
from usss_jax.models import drn  # noqa: E402


# --shapes: "defaults" (the flags' own) or an experiment config of configs/.
SHAPES = ("defaults", "camvid_iddlite", "cs_idd")


def _int_list(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.split(",") if v)


def shape_preset(name: str) -> dict:
  """The flag values (argparse dests) of the --shapes preset `name` of SHAPES ({} for defaults).

  Read from configs/<name>.py: encoder and widths, embedding size, classes per domain (the
  domains' dataset readers), labeled and unlabeled images per domain, the training crop.
  """
  if name == "defaults":
    return {}
  config = config_lib.load_config(name)
  domains = [config.domains[n] for n in config.domain_names]
  crops = {tuple(d.crop) for d in domains}
  if len(crops) != 1:  # the benchmark's step takes one image size for every domain
    raise SystemExit(f"--shapes {name}: the domains' crops differ ({sorted(crops)})")
  (height, width), = crops
  return {"encoder": config.encoder, "encoder_channels": tuple(config.encoder_channels),
          "embedding_dim": int(config.embedding_dim),
          "classes": tuple(data.READERS[d.dataset].spec.num_classes for d in domains),
          "labeled": int(config.labeled_batch), "unlabeled": int(config.unlabeled_batch),
          "height": height, "width": width}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default="defaults", choices=SHAPES,
                      help="shapes of configs/<NAME>.py (flags given explicitly win)")
  parser.add_argument("--encoder", default="drn_d_22")
  parser.add_argument("--encoder-channels", type=_int_list, default=(),
                      help="8 comma-separated widths (default: the encoder's own)")
  parser.add_argument("--height", type=int, default=256)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--labeled", type=int, default=2, help="labeled images per domain")
  parser.add_argument("--unlabeled", type=int, default=2, help="unlabeled images per domain")
  parser.add_argument("--method", default="full", choices=list(objectives.METHODS))
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--conv-weight-grad", default="auto", choices=("auto", "xla", "taps"),
                      help="how convolutions compute kernel gradients (usss_jax.models.layers)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
  parser.add_argument("--classes", type=_int_list, default=(19, 26),
                      help="classes per domain, e.g. 19,26")
  parser.add_argument("--embedding-dim", type=int, default=128)
  parser.add_argument("--devices", type=int, default=None,
                      help="mesh size (default: all devices)")
  parser.add_argument("--matmul-size", type=int, default=None,
                      help="n of the n x n matmul peak probe (default 2048 on CPU, 8192 else; "
                           "0: no probe)")
  parser.add_argument("--compare-torch", action="store_true",
                      help="also time benchmarks/torch_step.py (the PyTorch step) on the same "
                           "weights and batch, check its losses and print the ratio")
  parser.add_argument("--torch-python", default=os.environ.get("USSS_TORCH_PYTHON", "python3"),
                      help="interpreter with torch for --compare-torch (torch is not a project "
                           "dependency; default $USSS_TORCH_PYTHON or python3)")
  parser.add_argument("--torch-threads", type=int, default=2)
  parser.add_argument("--torch-low-res-scores", action="store_true",
                      help="torch step takes the entropy scores at 1/8 resolution, as ours does "
                           "(default: the reference's order, upsampled embedding first)")
  parser.add_argument("--tiny", action="store_true",
                      help="smoke preset: tiny widths, 32x64 images, 1 warm-up, 2 steps")
  common.add_output_flags(parser)
  # The preset becomes the flags' defaults, so flags given on the command line still win.
  parser.set_defaults(**shape_preset(parser.parse_known_args(argv)[0].shapes))
  args = parser.parse_args(argv)
  if args.tiny:
    args.encoder_channels = args.encoder_channels or common.TINY_CHANNELS
    args.height, args.width = 32, 64
    args.steps, args.warmup = 2, 1
    args.embedding_dim = min(args.embedding_dim, 16)
    args.matmul_size = 256 if args.matmul_size is None else args.matmul_size
  return args


def make_config(args):
  config = config_lib.base_config()
  config.method = args.method
  config.alpha = config.beta = 1.0
  names = tuple(f"domain{i}" for i in range(len(args.classes)))
  config.domain_names = names
  for name in names:
    config.domains[name] = config_lib.domain("folder", "/nonexistent",
                                                crop=(args.height, args.width))
  config.encoder = args.encoder
  config.encoder_channels = tuple(args.encoder_channels)
  config.embedding_dim = args.embedding_dim
  config.dtype = args.dtype
  config.conv_weight_grad = args.conv_weight_grad
  config.labeled_batch = args.labeled
  config.unlabeled_batch = args.unlabeled
  config.eval_batch = args.labeled  # not timed; only has to split over the devices as the rest
  config.label_embeddings.source = "random"
  return config


def random_batch(args, names, spec, placement, seed: int = 0) -> dict:
  """{name: {"labeled": {"image", "label"}, "unlabeled": {"image"}}} on the devices."""
  rng = np.random.default_rng(seed)
  hw = (args.height, args.width)
  batch = {}
  for name, classes in zip(names, args.classes):
    labeled = {"image": rng.standard_normal((args.labeled, *hw, 3), np.float32),
               "label": rng.integers(0, classes, (args.labeled, *hw), dtype=np.int32)}
    batch[name] = {"labeled": labeled}
    if spec.uses_unlabeled and args.unlabeled > 0:
      batch[name]["unlabeled"] = {
          "image": rng.standard_normal((args.unlabeled, *hw, 3), np.float32)}
      if spec.uses_strong_views:  # the strong view, its CutMix box, no crop padding
        box = np.zeros((args.unlabeled, *hw), bool)
        box[:, hw[0] // 4:hw[0] // 2, hw[1] // 4:hw[1] // 2] = True
        batch[name]["unlabeled"].update(
            strong=rng.standard_normal((args.unlabeled, *hw, 3), np.float32),
            cutmix_mask=box, valid=np.ones((args.unlabeled, *hw), bool))
  return jax.device_put(batch, placement)


def torch_inputs(path: str, state: dict, batch: dict, names, config) -> str:
  """Writes the step's initial weights and batch as benchmarks/torch_step.py --inputs reads them."""
  host = jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"],
                         "label_embeddings": state["label_embeddings"], "batch": batch})
  encoder = drn.make_encoder(config.encoder, tuple(config.encoder_channels) or None)
  arrays = {f"encoder/{k}": v for k, v in convert.drn_variables_to_torch(
      {"params": host["params"]["encoder"], "batch_stats": host["batch_stats"]["encoder"]},
      encoder).items()}
  as_torch = lambda kernel: np.ascontiguousarray(np.asarray(kernel).transpose(3, 2, 0, 1))
  for d, name in enumerate(names):
    head = host["params"][f"head_{d}"]
    arrays[f"head_{d}/weight"], arrays[f"head_{d}/bias"] = as_torch(head["kernel"]), head["bias"]
    arrays[f"label_embeddings/{d}"] = np.asarray(host["label_embeddings"][d])
    for split, values in host["batch"][name].items():
      for key, value in values.items():
        arrays[f"batch/{d}/{split}/{key}"] = np.asarray(value)
  if "embedding" in host["params"]:
    arrays["embedding/weight"] = as_torch(host["params"]["embedding"]["kernel"])
    arrays["embedding/bias"] = np.asarray(host["params"]["embedding"]["bias"])
  arrays["domain_names"] = np.array(names)
  np.savez(path, **arrays)
  return path


def run_torch(args, inputs: str) -> dict:
  """benchmarks/torch_step.py on the same weights and batch, in --torch-python's interpreter."""
  out = os.path.join(os.path.dirname(inputs), "torch.json")
  cmd = [args.torch_python, os.path.join(REPO, "benchmarks", "torch_step.py"), "--inputs",
         inputs, "--method", args.method, "--encoder", args.encoder, "--steps", str(args.steps),
         "--warmup", str(args.warmup), "--threads", str(args.torch_threads), "--json",
         "--json-out", out]
  if args.encoder_channels:
    cmd += ["--encoder-channels", ",".join(map(str, args.encoder_channels))]
  if args.torch_low_res_scores:
    cmd.append("--low-res-scores")
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"torch step failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
  with open(out) as f:
    return json.load(f)


def compare_losses(jax_metrics: dict, torch_result: dict) -> dict:
  """Per term (JAX, torch, relative difference) of the first step's losses on the same inputs."""
  rows = {}
  for name, torch_value in torch_result["check"].items():
    if name in jax_metrics:
      ours = float(jax_metrics[name])
      rows[name] = (ours, torch_value, abs(ours - torch_value) / max(abs(ours), 1e-12))
  return rows


def build(args) -> dict:
  """The compiled step and what it runs on.

  Returns:
    {"info", "config", "spec", "names", "mesh", "state" (initial: the first step donates it),
     "batch", "compiled", "init_s", "lower_s", "compile_s", "flops" (of the lowered HLO),
     "flops_compiled", "planned" (XLA's memory plan, bytes), "num_params"}.
  """
  info = common.machine_info()
  config = make_config(args)
  spec = modes.check_config(config)
  names = tuple(config.domain_names)
  model = state_lib.make_model(config, args.classes)
  tx, _ = state_lib.make_optimizer(config)
  mesh = sharding.make_mesh(args.devices)
  replicated = NamedSharding(mesh, P())

  label_embeddings = tuple(
      store.random_embeddings(c, int(config.embeddings_per_class), args.embedding_dim,
                                        config.seed + i) for i, c in enumerate(args.classes))
  start = time.perf_counter()
  state = jax.block_until_ready(state_lib.initial_state(
      config, model, tx, spec, (args.height, args.width), label_embeddings, replicated))
  init_s = time.perf_counter() - start
  num_params = common.tree_nbytes(state["params"]) // 4
  batch = random_batch(args, names, spec, NamedSharding(mesh, P("data")))
  jax.block_until_ready(batch)

  jitted = train_step.jit_train_step(train_step.make_train_step(model, tx, spec, names), mesh)
  start = time.perf_counter()
  lowered = jitted.lower(state, batch)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  return {"info": info, "config": config, "spec": spec, "names": names, "mesh": mesh,
          "state": state, "batch": batch, "compiled": compiled, "init_s": init_s,
          "lower_s": lower_s, "compile_s": compile_s,
          "flops": common.flops_of(lowered),  # backend-independent (see common.flops_of)
          "flops_compiled": common.flops_of(compiled),
          "planned": common.planned_memory_bytes(compiled), "num_params": num_params}


def setup_of(args, built: dict) -> dict:
  """The JSON's "setup": what was timed."""
  spec = built["spec"]
  return {
      "shapes": args.shapes,
      "encoder": args.encoder, "encoder_channels": list(args.encoder_channels) or None,
      "method": args.method,
      "terms": {t.name: w for t, w in zip(spec.terms, spec.weights)},
      "classes": list(args.classes), "embedding_dim": args.embedding_dim,
      "height": args.height, "width": args.width, "labeled_per_domain": args.labeled,
      "unlabeled_per_domain": args.unlabeled if spec.uses_unlabeled else 0,
      "dtype": args.dtype, "conv_weight_grad": args.conv_weight_grad,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "mesh_devices": built["mesh"].devices.size, "params": int(built["num_params"]),
      "warmup": args.warmup, "steps": args.steps,
  }


def stepper(built: dict):
  """`step() -> (state, metrics)`: one step of `build`'s compiled step on its batch. The
  executable donates its state argument, so each call passes on the state the last returned."""
  holder = {"state": built["state"]}

  def step():
    holder["state"], metrics = built["compiled"](holder["state"], built["batch"])
    return holder["state"], metrics
  return step


def run(args) -> dict:
  built = build(args)
  names, spec, batch = built["names"], built["spec"], built["batch"]
  step = stepper(built)
  workdir = tempfile.mkdtemp(prefix="usss_train_step_")
  if args.compare_torch:  # before the first step: it donates (deletes) the initial state
    inputs = torch_inputs(os.path.join(workdir, "inputs.npz"), built["state"], batch, names,
                          built["config"])
  first_start = time.perf_counter()
  first_metrics = jax.device_get(jax.block_until_ready(step())[1])
  first_step_s = time.perf_counter() - first_start
  timing = common.time_calls(step, warmup=max(args.warmup - 1, 0), steps=args.steps)
  loss = float(jax.device_get(step()[1]["loss"]))
  device_mem = common.device_memory()
  host_peak = common.peak_host_rss_bytes()

  peak = (common.matmul_gflops(args.matmul_size, jnp.dtype(args.dtype))
          if args.matmul_size != 0 else None)
  images = len(names) * (args.labeled + (args.unlabeled if spec.uses_unlabeled else 0))
  seconds = timing["median_s"]
  flops = built["flops"]
  achieved = flops / seconds / 1e9 if flops else None
  torch_result = losses_check = None
  if args.compare_torch:
    torch_result = run_torch(args, inputs)
    losses_check = compare_losses(first_metrics, torch_result)
  shutil.rmtree(workdir, ignore_errors=True)
  return {
      "benchmark": "train_step",
      "machine": built["info"],
      "load_average_end": common.load_average(),
      "setup": setup_of(args, built),
      "seconds_per_step": seconds,
      "seconds_min": timing["min_s"],
      "seconds_max": timing["max_s"],
      "times_s": timing["times_s"],
      "images_per_step": images,
      "images_per_s": images / seconds,
      "flops_per_step": flops,
      "flops_per_step_compiled": built["flops_compiled"],
      "achieved_gflops": achieved,
      "matmul_peak": peak,
      "fraction_of_matmul_peak": achieved / peak["gflops"] if achieved and peak else None,
      "busy_cores": timing["busy_cores"],
      "init_s": built["init_s"],
      "lower_s": built["lower_s"],
      "compile_s": built["compile_s"],
      "first_step_s": first_step_s,
      "warmup_s": timing["warmup_s"],
      "final_loss": loss,
      "host_peak_rss_bytes": host_peak,
      "device_peak_bytes": device_mem["peak_bytes"] if device_mem else None,
      "xla_planned_bytes": built["planned"],
      "torch": torch_result,
      "torch_seconds_per_step": torch_result["seconds_per_step"] if torch_result else None,
      "speedup_vs_torch": (torch_result["seconds_per_step"] / seconds) if torch_result else None,
      "torch_loss_check": losses_check,
  }


def table(r: dict) -> str:
  s, m = r["setup"], r["matmul_peak"]
  widths = f" widths {s['encoder_channels']}" if s["encoder_channels"] else ""
  terms = ", ".join(f"{name} x{weight:g}" for name, weight in s["terms"].items())
  title = (f"train step ({s['shapes']} shapes): {s['encoder']}{widths}, method {s['method']} "
           f"({terms}), domains {s['classes']} classes, per domain "
           f"{s['labeled_per_domain']}+{s['unlabeled_per_domain']} images "
           f"{s['height']}x{s['width']}, D={s['embedding_dim']}, {s['dtype']}, "
           f"{s['mesh_devices']}-device mesh, {s['params']:,} params")
  times = ", ".join(f"{t:.3f}" for t in r["times_s"])
  pairs = [
      ("seconds/step (median)", r["seconds_per_step"]),
      ("  min / max", f"{r['seconds_min']:.3f} / {r['seconds_max']:.3f}"),
      (f"  timed steps ({s['steps']}, after {s['warmup']} warm-ups)", times),
      ("images/s (labeled+unlabeled)", r["images_per_s"]),
      ("GFLOP/step (cost analysis of the lowered HLO)",
       r["flops_per_step"] / 1e9 if r["flops_per_step"] else None),
      ("  of the compiled module (GPU: w/o library calls)",
       r["flops_per_step_compiled"] / 1e9 if r["flops_per_step_compiled"] else None),
      ("achieved GFLOP/s", r["achieved_gflops"]),
      *([(f"matmul GFLOP/s ({m['dtype']} {m['n']}^2 @ {m['n']}^2)", m["gflops"]),
         ("achieved / matmul", r["fraction_of_matmul_peak"])] if m else []),
      ("busy cores (CPU s / wall s)", r["busy_cores"]),
      ("init s (jit init_state)", r["init_s"]),
      ("lower s / compile s", f"{r['lower_s']:.2f} / {r['compile_s']:.2f}"),
      ("first step s", r["first_step_s"]),
      ("peak host RSS MiB", common.mib(r["host_peak_rss_bytes"])),
      ("peak device MiB (incl. compile/autotune)", common.mib(r["device_peak_bytes"])),
      ("XLA memory plan MiB (args+out+temp-alias)", common.mib(r["xla_planned_bytes"])),
      ("loss after the timed steps", r["final_loss"]),
      *(_torch_rows(r) if r["torch"] else []),
      ("load average start / end", f"{r['machine']['load_average']} / {r['load_average_end']}"),
  ]
  return (common.header(title, r["machine"]) + "\n" + common.format_pairs(pairs))


def _torch_rows(r: dict) -> list:
  t, check = r["torch"], r["torch_loss_check"]
  worst = max(v[2] for v in check.values()) if check else None
  return [
      (f"PyTorch {t['torch_version']} step s/step (median, {t['threads']} threads)",
       t["seconds_per_step"]),
      ("  PyTorch busy cores", t["busy_cores"]),
      ("speedup vs PyTorch (torch s / ours s)", r["speedup_vs_torch"]),
      (f"first-step losses: worst relative difference ({len(check)} terms)", worst),
  ]


def main(argv=None) -> None:
  cli.default_xla_flags()  # the launcher's XLA options (before jax starts its backend)
  args = parse_args(argv)
  result = run(args)
  common.emit(result, table(result), args)


if __name__ == "__main__":
  main()
