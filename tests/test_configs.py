"""The paper configs' variants, resolved through the launcher as a user runs them."""

import json
import os
import subprocess

import pytest

from helpers import ROOT, run_cli
from usss_jax import config as config_lib


def _resolved(config_arg: str) -> subprocess.CompletedProcess:
  # batch_per_device: the paper's batch of 10 does not split over the tests' 8 devices.
  return run_cli("--mode=config", f"--config={config_arg}", "--config.batch_per_device=True",
                 timeout=300)


@pytest.mark.parametrize("name", ["cs_camvid", "cs_idd", "cs_sun"])
def test_paper_configs_keep_the_paper_method_and_offer_the_recommended_variant(name):
  paper = config_lib.load_config(f"configs/{name}.py")
  assert paper.method == "full" and paper.self_supervised.steps == 0
  plain = config_lib.load_config(name, "consistency")
  assert plain.to_dict() == {**paper.to_dict(), "method": "consistency"}
  # The recommended recipe over the paper config's own length, in the validated proportions.
  recipe = config_lib.load_config(name, "recommended")
  length = int(paper.total_steps)
  assert (recipe.method, recipe.self_supervised.steps, recipe.warm_start.steps,
          recipe.total_steps) == ("consistency", length // 3, length // 2, length - length // 2)
  assert recipe.consistency.to_dict() == {
      **paper.consistency.to_dict(), "teacher": "ema_train_bn", "ema_decay_start": 0.99,
      "ema_decay": 0.999, "ema_decay_rampup": length - length // 2,
      "distribution_alignment": True, "threshold_rule": "freematch", "class_stats_momentum": 0.99}
  changed = {"method", "self_supervised", "warm_start", "total_steps", "consistency"}
  assert {k: v for k, v in recipe.to_dict().items() if k not in changed} == \
      {k: v for k, v in paper.to_dict().items() if k not in changed}
  assert set(config_lib.PAPER_VARIANTS) == {"consistency", "recommended"}


def test_the_experiment_config_defaults_are_the_reported_recipe():
  for arg in (None, "validation"):
    c = config_lib.load_config("camvid_iddlite", arg)
    assert (c.method, c.self_supervised.steps, c.warm_start.steps, c.total_steps) == (
        "consistency", 1000, 1500, 1500)
    assert (c.consistency.teacher, c.consistency.ema_decay_start, c.consistency.ema_decay,
            c.consistency.ema_decay_rampup, c.consistency.distribution_alignment,
            c.consistency.threshold_rule, c.consistency.class_stats_momentum) == (
        "ema_train_bn", 0.99, 0.999, 1500, True, "freematch", 0.99)
    assert c.eval_every >= c.warm_start.steps + c.total_steps  # the final model only
  results = json.load(open(os.path.join(ROOT, "results", "camvid_iddlite.json")))
  assert results["recommended"] == config_lib.load_config("camvid_iddlite").method


@pytest.mark.slow
def test_variant_through_the_launcher_and_an_unknown_one_is_one_line():
  out = _resolved("configs/cs_sun.py:recommended")
  assert out.returncode == 0, out.stderr[-2000:]
  resolved = json.loads(out.stdout)
  assert (resolved["method"], resolved["warm_start"]["steps"]) == ("consistency", 30000)
  out = _resolved("configs/cs_sun.py:fancy")
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.strip() == ("error: --config=configs/cs_sun.py:fancy: configs/cs_sun.py: "
                                "unknown variant 'fancy'; choose from ['consistency', 'recommended'] or "
                                "none")
