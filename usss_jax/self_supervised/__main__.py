"""Command line of the dense contrastive pretraining alone (see `pretrain`).

  python -m usss_jax.self_supervised --config=configs/camvid_iddlite.py:validation \\
      --workdir=runs/ssl/base --config.self_supervised.steps=2000 \\
      [--config.self_supervised.learning_rate=0.05 --config.seed=0 ...]

Writes <workdir>/encoder.npz (train with --config.pretrained=<workdir>/encoder.npz),
<workdir>/metrics.jsonl, <workdir>/pretrain.json and the run's splits (<workdir>/splits). A
training run with `--config.self_supervised.steps=N` does the same in <workdir>/self_supervised.
SIGTERM / SIGINT stop it with a checkpoint; the same command resumes it (checkpoints are also
saved every `config.checkpoint_every` steps).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from usss_jax import cli
from usss_jax import workdir as workdir_lib
from usss_jax.domains import build_domains
from usss_jax.self_supervised import pretrain

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (domains, encoder, crops, self_supervised).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  config = _CONFIG.value
  if int(config.self_supervised.steps) <= 0:
    raise app.UsageError("set --config.self_supervised.steps to the number of pretraining steps")
  try:
    options = pretrain.PretrainOptions.from_config(config)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  try:
    with workdir_lib.RunGuard(_WORKDIR.value):
      pretrain.pretrain(config, _WORKDIR.value, options, build_domains(config, _WORKDIR.value))
  except workdir_lib.Stopped as stopped:  # a requested stop is a success; rerun to continue
    print(stopped, file=sys.stderr)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)
