"""The Colab quickstart notebook runs end to end (on CPU, with a tiny model and few steps)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def notebook_script(path: pathlib.Path) -> str:
  """The notebook's code cells as one script; IPython magics and shell lines become `pass`."""
  cells = json.loads(path.read_text())["cells"]
  lines = []
  for cell in cells:
    if cell["cell_type"] != "code":
      continue
    for line in "".join(cell["source"]).splitlines():
      lines.append(re.sub(r"^(\s*)[%!].*$", r"\1pass", line))
  return "import matplotlib\nmatplotlib.use('Agg')\n" + "\n".join(lines) + "\n"


@pytest.mark.slow
def test_quickstart_notebook_runs_on_cpu(tmp_path):
  script = tmp_path / "quickstart.py"
  script.write_text(notebook_script(NOTEBOOK))
  workdir = tmp_path / "run"
  env = dict(os.environ)
  # One CPU device, as on Colab; the fast-compiling optimisation level of conftest.py.
  env.update(XLA_FLAGS="--xla_backend_optimization_level=0",
             USSS_NOTEBOOK_STEPS="4", USSS_NOTEBOOK_TINY="1", USSS_NOTEBOOK_WORKDIR=str(workdir),
             USSS_DEMO_DATA=str(tmp_path / "demo"), USSS_JAX_SRC=str(ROOT), PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "on cpu" in out.stdout
  # It trained, evaluated, segmented and mapped the label spaces.
  evals = [json.loads(l) for l in open(workdir / "metrics.jsonl") if '"eval"' in l]
  assert evals and 0 <= evals[-1]["street"]["miou"] <= 1
  assert "'street': ('sky', 'building', 'road', 'vegetation', 'car')" in out.stdout
  assert (workdir / "correspondence" / "cooccurrence_street_indoor.png").stat().st_size > 0
  assert re.search(r"^\s+sky -> \w+", out.stdout, re.M)
