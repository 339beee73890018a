"""The paper configs' variants, resolved through the launcher as a user runs them."""

import json
import subprocess

import pytest

from helpers import run_cli
from usss_jax import config as config_lib


def _resolved(config_arg: str) -> subprocess.CompletedProcess:
  # batch_per_device: the paper's batch of 10 does not split over the tests' 8 devices.
  return run_cli("--mode=config", f"--config={config_arg}", "--config.batch_per_device=True",
                 timeout=300)


@pytest.mark.parametrize("name", ["cs_camvid", "cs_idd", "cs_sun"])
def test_paper_configs_keep_the_paper_method_and_offer_the_recommended_variant(name):
  paper = config_lib.load_config(f"configs/{name}.py")
  variant = config_lib.load_config(name, "consistency")
  assert paper.method == "full" and variant.method == "consistency"
  # The variant changes the method only.
  assert {k: v for k, v in variant.to_dict().items() if k != "method"} == \
      {k: v for k, v in paper.to_dict().items() if k != "method"}
  assert set(config_lib.PAPER_VARIANTS) == {"consistency"}


@pytest.mark.slow
def test_variant_through_the_launcher_and_an_unknown_one_is_one_line():
  out = _resolved("configs/cs_sun.py:consistency")
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout)["method"] == "consistency"
  out = _resolved("configs/cs_sun.py:fancy")
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.strip() == ("error: --config=configs/cs_sun.py:fancy: configs/cs_sun.py: "
                                "unknown variant 'fancy'; choose from ['consistency'] or none")
