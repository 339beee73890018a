"""The launcher (`python launch.py ...`, or `usss-jax ...` once installed): flags and modes.

  usss-jax --config=configs/demo.py --workdir=runs/demo [--config.key=value ...]
  usss-jax --workdir=runs/demo --mode=eval            # the run's own config.json
  usss-jax --workdir=runs/demo --mode=predict --input=images/ --domain=street
  usss-jax --config=configs/cs_sun.py --mode=config   # print the resolved config

eval and predict read `<workdir>/config.json` when --config is not given, and refuse a
--config that contradicts it (evaluation-only keys may differ); they write nothing into the
run directory but their own outputs. Under a cluster (SLURM, TPU pod, Open MPI, or
JAX_COORDINATOR_ADDRESS set) it initialises jax.distributed.
"""

from __future__ import annotations

import fnmatch
import json
import logging as py_logging
import os
import sys

from absl import app
from absl import flags
from flax import traverse_util
import jax
import ml_collections
from ml_collections import config_flags

from usss_jax import cli, modes, workdir as workdir_lib
from usss_jax import config as config_lib

MODES = {
    "train": "label-embedding stage if needed, then training; resumes from the newest "
             "checkpoint in --workdir",
    "embed": "only the label-embedding stage (<workdir>/label_embeddings/<domain>.npz)",
    "eval": "per-domain mIoU and a per-class IoU table of --checkpoint; writes "
            "<workdir>/eval_<checkpoint>_step<N>.json",
    "predict": "masks of --input in --domain's label space, from the run directory alone "
               "(default output <workdir>/predictions/<domain>)",
    "config": "print the resolved config (no data needed)",
}
HELP = ("usss-jax (= python launch.py): train, evaluate and apply universal semi-supervised "
        "segmentation models.\n\n"
        "  usss-jax --config=configs/demo.py --workdir=runs/demo [--config.KEY=VALUE ...]\n"
        "  usss-jax --workdir=runs/demo --mode=eval\n"
        "  usss-jax --workdir=runs/demo --mode=predict --input=DIR_OR_FILE --domain=street\n\n"
        "modes (--mode):\n" + "".join(f"  {k:8s} {v}\n" for k, v in MODES.items()) +
        "\nEvery key of the config can be set as --config.KEY=VALUE (see --mode=config); a "
        "misspelt key is an error.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (e.g. configs/demo.py; an installed config by "
    "name: demo). eval/predict default to the run's config.json.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, splits, checkpoints, "
                               "logs (required except for --mode=config).")
_MODE = flags.DEFINE_enum("mode", "train", list(MODES),
                          "What to run (each mode has one line in --help).")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                                "eval/predict: which checkpoint of --workdir to use.")
_INPUT = flags.DEFINE_string("input", None, "predict: an image file or a folder of images.")
_DOMAIN = flags.DEFINE_string("domain", None, "predict: label space (domain name) to predict in "
                              "(default: the run's first domain).")
_OUTPUT = flags.DEFINE_string("output", None, "predict: output folder "
                              "(default <workdir>/predictions/<domain>).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Call jax.distributed.initialize(): auto = when a cluster "
                                 "environment is detected.")
cli.define_data_root_flag()

_CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                 "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
# Keys an evaluation of a run may set differently from its training config.
EVALUATION_KEYS = ("eval_batch", "eval_max_examples", "miou_convention", "batch_per_device",
                   "workers", "data_cache_mb", "skip_bad_images", "domains.*.root",
                   "domains.*.eval_split", "domains.*.generate_demo")


def _maybe_initialize_distributed(mode: str) -> None:
  if mode == "off":
    return
  if mode == "auto":
    detected = [v for v in _CLUSTER_VARS if os.environ.get(v)]
    if not detected or os.environ.get("SLURM_NTASKS") == "1":
      return
  kwargs = {}
  # A hand-started cluster (e.g. several processes on CPU hosts) names itself with
  # JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; managed clusters
  # (SLURM, Open MPI, TPU pods) are auto-detected by jax.
  if os.environ.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
  if os.environ.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
  workdir_lib.initialize_distributed(**kwargs)  # a lost process: one error line, exit 2
  py_logging.getLogger("usss_jax").info("jax.distributed: process %d of %d", jax.process_index(),
                                        jax.process_count())


def _flat(config: ml_collections.ConfigDict) -> dict[str, object]:
  """Dotted keys -> JSON-normalised values (tuples and lists compare equal)."""
  return {".".join(k): v for k, v in traverse_util.flatten_dict(
      json.loads(config.to_json()), keep_empty_nodes=True).items()}


def config_differences(trained: ml_collections.ConfigDict,
                       given: ml_collections.ConfigDict) -> list[str]:
  """Keys whose values differ between a run's config and a given one (evaluation keys aside)."""
  a, b = _flat(trained), _flat(given)
  keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  return [k for k in keys if not any(fnmatch.fnmatch(k, p) for p in EVALUATION_KEYS)]


def resolve_config(mode: str, workdir: str | None,
                   given: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """The config a mode runs with: --config, or for eval/predict the run's config.json."""
  if mode in ("eval", "predict") and workdir and os.path.exists(
      os.path.join(workdir, "config.json")):
    trained = config_lib.run_config(workdir)
    if given is None:
      return trained
    differing = config_differences(trained, given)
    if differing:
      shown = ", ".join(f"{k} (run: {_flat(trained).get(k)!r}, --config: {_flat(given).get(k)!r})"
                        for k in differing[:6])
      raise config_lib.ConfigError(
          f"--config contradicts {workdir}/config.json at {shown}"
          f"{' ...' if len(differing) > 6 else ''}; drop --config to use the run's own")
    return given
  if given is None:
    raise app.UsageError(f"--mode={mode} needs --config" + (
        f" ({workdir} has no config.json)" if mode in ("eval", "predict") else ""))
  return given


def class_table(results: dict) -> str:
  """Per domain: mIoU and a class | IoU (%) table (absent classes '-')."""
  lines = []
  for name, res in results.items():
    if not isinstance(res, dict) or "iou" not in res:
      continue
    lines += [f"{name}: mIoU {100 * res['miou']:.1f} %", "", "| class | IoU (%) |", "|---|---:|"]
    lines += [f"| {c} | {'-' if v is None else f'{100 * v:.1f}'} |" for c, v in res["iou"].items()]
    lines.append("")
  if results.get("mean_miou") is not None:
    lines.append(f"mean mIoU over domains: {100 * results['mean_miou']:.1f} % "
                 f"(checkpoint step {results.get('step')})")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  mode, workdir = _MODE.value, _WORKDIR.value
  if workdir is None and mode != "config":
    raise app.UsageError("--workdir is required")
  events = cli.setup_logging()
  if mode in ("eval", "predict"):
    modes.require_run(workdir)  # before anything is read or written
    if mode == "predict" and not _INPUT.value:
      raise app.UsageError("--mode=predict needs --input (an image file or a folder)")
  elif workdir is not None:
    modes.check_workdir(workdir)
  _maybe_initialize_distributed(_DISTRIBUTED.value)
  config = resolve_config(mode, workdir, _CONFIG.value)

  if mode == "config":
    modes.check_config(config)
    try:
      config_lib.check_dataset_roots(config)
    except config_lib.ConfigError as unset:
      events.warning("warning: %s", " ".join(str(unset).split("\n")))
    print(config.to_json_best_effort(indent=2, sort_keys=True))
    return
  if mode in ("train", "embed"):
    try:
      results = (modes.train if mode == "train" else modes.embed)(config, workdir)
    except workdir_lib.Stopped as stopped:  # a requested stop is a success
      events.warning("%s", stopped)
      return
  elif mode == "eval":
    results = modes.evaluate_checkpoint(config, workdir, which=_CHECKPOINT.value)
    print(class_table(results))
    return
  else:
    results = modes.predict(config, workdir, _INPUT.value, domain=_DOMAIN.value,
                            output=_OUTPUT.value, which=_CHECKPOINT.value)
  if results:
    print(json.dumps(results, indent=2, sort_keys=True))


def _installed_config_paths(argv: list[str]) -> list[str]:
  """--config=NAME or --config=configs/NAME.py that is not a file here: the installed one."""
  out = []
  for arg in argv:
    if arg.startswith("--config="):
      path, sep, rest = arg[len("--config="):].partition(":")
      found = config_lib.find_config_file(path)
      if not os.path.exists(path) and found:
        arg = f"--config={found}{sep}{rest}"
    out.append(arg)
  return out


def run() -> None:
  """Entry point of `launch.py` and of the `usss-jax` console script."""
  if workdir_lib.supervision_wanted():  # a lost process: one error line (workdir.supervise)
    sys.exit(workdir_lib.supervise(sys.argv))
  cli.run(main, argv=_installed_config_paths(sys.argv), help_text=HELP,
          help_modules=[__name__, cli.__name__])
