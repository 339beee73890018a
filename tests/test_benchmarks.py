"""The benchmark scripts' wiring: train_step.py's shape presets and the methods table."""

import sys

import helpers
from usss_jax import config as config_lib

sys.path.insert(0, str(helpers.ROOT))
from benchmarks import methods, train_step  # noqa: E402


def test_shape_presets_take_the_experiment_configs_and_explicit_flags_win():
  config = config_lib.load_config("camvid_iddlite")
  args = train_step.parse_args(["--shapes", "camvid_iddlite"])
  assert (args.encoder, args.encoder_channels, args.embedding_dim) == (
      config.encoder, tuple(config.encoder_channels), config.embedding_dim)
  assert (args.classes, args.labeled, args.unlabeled, args.height, args.width) == (
      (11, 7), 4, 4, 96, 128)
  args = train_step.parse_args(["--shapes=camvid_iddlite", "--labeled", "16", "--height=64"])
  assert (args.labeled, args.unlabeled, args.height, args.width) == (16, 4, 64, 128)
  paper = train_step.parse_args(["--shapes", "cs_idd"])
  assert (paper.classes, paper.labeled, paper.unlabeled, paper.height, paper.width,
          paper.embedding_dim, paper.encoder_channels) == ((19, 26), 10, 10, 512, 512, 128, ())
  defaults = train_step.parse_args([])
  assert (defaults.shapes, defaults.classes, defaults.labeled, defaults.height,
          defaults.width) == ("defaults", (19, 26), 2, 256, 512)


def test_methods_table_marks_failed_rows():
  text = methods.markdown([methods.row({"method": "basic", "shapes": "defaults", "error": "x"})])
  assert text.splitlines()[2].startswith("| defaults | basic | error |")
