"""Command line of the analyses.

  python -m usss_jax.analysis predict_any --config=configs/demo.py --workdir=runs/demo \\
      --input=some/images --label_space=indoor --output=out/any
  python -m usss_jax.analysis correspondence --config=configs/demo.py --workdir=runs/demo \\
      --domain_a=street --domain_b=indoor --output=out/corr
  python -m usss_jax.analysis tsne --config=configs/demo.py --workdir=runs/full \\
      --output=out/tsne.png [--compare_workdir=runs/basic --labels=basic,full]

See `usss_jax.analysis.commands` for what each command computes. The flags, the run
directories and the domains are checked before any model is restored; nothing is written
into a run directory but the command's own outputs.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from usss_jax import cli, modes
from usss_jax import config as config_lib
from usss_jax.analysis import commands

COMMANDS = {
    "predict_any": "segment --input in --label_space's classes through its prototypes (any "
                   "domain's label set, no head needed); writes masks, legend.png, "
                   "agreement.json",
    "correspondence": "which classes of --domain_a match which of --domain_b: heat maps "
                      "(label-embedding cosine, co-occurrence), Markdown and JSON tables",
    "tsne": "t-SNE of encoder features per class and domain (one row of panels per run; "
            "--compare_workdir adds a second run)",
}
HELP = ("python -m usss_jax.analysis COMMAND --workdir=RUN [--config=CONFIG] [flags]: analyses "
        "of a trained run.\n\ncommands:\n" +
        "".join(f"  {k:15s} {v}\n" for k, v in COMMANDS.items()))


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the CLI flags on `flag_values` (the global FLAGS under `python -m`)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file (as launch.py; "
                                  "default: the run's config.json).",
                                  flag_values=flag_values, lock_config=True)
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "Work directory of a trained run.", **fv)
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to use.", **fv)
  flags.DEFINE_string("output", None, "predict_any/correspondence: output folder; tsne: PNG "
                      "path (default under <workdir>/visualize).", **fv)
  flags.DEFINE_string("input", None, "predict_any: an image file or a folder of images.", **fv)
  flags.DEFINE_string("label_space", None, "predict_any: domain whose classes to predict.",
                      **fv)
  flags.DEFINE_string("domain_a", None, "correspondence: rows (its eval images are used).",
                      **fv)
  flags.DEFINE_string("domain_b", None, "correspondence: columns (its head predicts).", **fv)
  flags.DEFINE_string("compare_workdir", None, "tsne: a second run for a second panel.", **fv)
  flags.DEFINE_list("labels", [], "tsne: panel titles, one per run (e.g. basic,full).", **fv)
  flags.DEFINE_integer("per_class", 200, "tsne: pixels per class and domain.", **fv)
  flags.DEFINE_integer("max_pixels_per_image", 512, "tsne: pixels drawn per image.", **fv)
  flags.DEFINE_float("perplexity", 30.0, "tsne: t-SNE perplexity.", **fv)
  flags.DEFINE_integer("max_images", 0, "Evaluation images per domain (0 = all).", **fv)
  flags.DEFINE_integer("seed", 0, "Sampling and t-SNE seed.", **fv)


def run_command(command: str, flag_values: flags.FlagValues = flags.FLAGS) -> dict:
  """Runs one command with parsed flags; returns its JSON-able summary."""
  fv = flag_values
  if command not in COMMANDS:
    raise app.UsageError(f"unknown command {command!r}; expected one of {tuple(COMMANDS)}")
  if fv.workdir is None:
    raise app.UsageError("--workdir is required")
  config, workdir = fv["config"].value, fv.workdir
  modes.require_run(workdir)
  if config is None:  # the run's own config
    if not os.path.exists(os.path.join(workdir, "config.json")):
      raise app.UsageError(f"--config is required ({workdir} has no config.json)")
    config = config_lib.run_config(workdir)
  if command == "predict_any":
    if not fv.input:
      raise app.UsageError("predict_any needs --input (an image or a folder)")
    return commands.predict_any(config, workdir, fv.input, label_space=fv.label_space,
                                output=fv.output, which=fv.checkpoint,
                                max_images=fv.max_images)
  if command == "correspondence":
    return commands.correspondence(config, workdir, domain_a=fv.domain_a,
                                   domain_b=fv.domain_b, output=fv.output,
                                   which=fv.checkpoint, max_images=fv.max_images)
  return commands.tsne(config, workdir, output=fv.output, compare_workdir=fv.compare_workdir,
                       labels=fv.labels, which=fv.checkpoint, per_class=fv.per_class,
                       max_pixels_per_image=fv.max_pixels_per_image,
                       perplexity=fv.perplexity, seed=fv.seed, max_images=fv.max_images)


def _is_matrix(value) -> bool:
  return isinstance(value, list) and bool(value) and isinstance(value[0], list)


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError(f"expected one command ({' | '.join(COMMANDS)}), got {argv[1:]}")
  cli.setup_logging()
  result = run_command(argv[1])
  # Matrices are in the written JSON; the terminal gets the summary.
  print(json.dumps({k: v for k, v in result.items() if not _is_matrix(v)}, indent=2,
                   sort_keys=True, default=str))


if __name__ == "__main__":
  define_flags()
  cli.define_data_root_flag()
  cli.run(main, help_text=HELP, help_modules=[__name__, cli.__name__])
