"""usss-jax launcher.

  python launch.py --config=configs/demo.py --workdir=runs/demo [--config.key=value ...]
  python launch.py --config=configs/cs_sun.py --workdir=runs/cs_sun --mode=eval
  python launch.py --config=configs/demo.py --workdir=runs/demo --mode=predict \\
      --input=some/images --domain=street --output=runs/demo/predictions

Modes: train (default; resumes from the latest checkpoint in --workdir), embed
(only the label-embedding stage), eval (evaluate the best or latest checkpoint),
predict (colourised masks and overlays in a domain's label space).
Runs unchanged on CPU, GPU, TPU and Colab; under a cluster (SLURM, TPU pod,
Open MPI, or JAX_COORDINATOR_ADDRESS set) it initialises jax.distributed.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from usss_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and splits.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "embed", "eval", "predict"], "What to run.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                                "eval/predict: which checkpoint of --workdir to use.")
_INPUT = flags.DEFINE_string("input", None, "predict: an image file or a folder of images.")
_DOMAIN = flags.DEFINE_string("domain", None, "predict: label space (domain name) to predict in.")
_OUTPUT = flags.DEFINE_string("output", None, "predict: output folder "
                              "(default <workdir>/predictions/<domain>).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Call jax.distributed.initialize(): auto = when a cluster "
                                 "environment is detected.")

_CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                 "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


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
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  if not flags.FLAGS["verbosity"].present:
    # Orbax and absl log every checkpoint step at INFO; keep the console for progress.
    logging.set_verbosity(logging.WARNING)
  _maybe_initialize_distributed(_DISTRIBUTED.value)
  config = _CONFIG.value
  workdir = _WORKDIR.value

  if _MODE.value == "train":
    results = runtime.train(config, workdir)
  elif _MODE.value == "embed":
    results = runtime.embed(config, workdir)
  elif _MODE.value == "eval":
    results = runtime.evaluate_checkpoint(config, workdir, which=_CHECKPOINT.value)
  else:
    if not _INPUT.value:
      raise app.UsageError("--mode=predict needs --input")
    results = runtime.predict(config, workdir, _INPUT.value, domain=_DOMAIN.value,
                              output=_OUTPUT.value, which=_CHECKPOINT.value)
  if results:
    print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
