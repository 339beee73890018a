"""The README's and docs/'s commands are true: the cheap ones (under a minute: `--help`,
`--mode=config`, `describe`, imports) run as written from the repository root, and every other
command names modules, config files and flags that exist. The README's Python snippet runs
against a trained run."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import helpers
from helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLIS = {"launch": ["launch.py"], "usss_jax.analysis": ["-m", "usss_jax.analysis"],
        "usss_jax.ablation": ["-m", "usss_jax.ablation"]}
# Stand-ins a reader replaces (not runnable as written).
PLACEHOLDERS = re.compile(r"DIR|<[a-z_]+>|\$[A-Z]|\.\.\.|/path/to|NAME|FILE")


def bash_commands(path: pathlib.Path) -> list[str]:
  """The commands of a Markdown file's ```bash blocks, continuation lines joined, comments and
  alternative flag lines (starting with --) dropped."""
  out = []
  for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = re.sub(r"(^|\s)#.*$", "", line).strip()
      if line and not line.startswith("--"):
        out.append(" ".join(line.split()))
  return out


def _cli(command: str) -> str | None:
  if "launch.py" in command or command.startswith("usss-jax"):
    return "launch"
  match = re.search(r"-m (usss_jax\.\w+)", command)
  return match.group(1) if match else None


def _argv(command: str) -> list[str]:
  """The command with this interpreter for `python`, `.venv/bin/python` and `usss-jax`."""
  words = shlex.split(command)
  if words[0] == "usss-jax":
    return [sys.executable, "launch.py", *words[1:]]
  assert words[0].endswith("python") or words[0] == "python3", command
  return [sys.executable, *words[1:]]


ALL = [(path.name, c) for path in DOCS for c in bash_commands(path)]


def _cheap(command: str) -> bool:
  return (not PLACEHOLDERS.search(command) and command.split()[0] in (
      ".venv/bin/python", "python", "usss-jax") and
          ("--mode=config" in command or "--help" in command or " describe " in command))


def test_the_docs_have_commands_and_cheap_ones_among_them():
  assert len(ALL) > 20 and sum(_cheap(c) for _, c in ALL) >= 3


@pytest.mark.parametrize("doc,command", [a for a in ALL if _cli(a[1])],
                         ids=lambda v: v if len(v) < 40 else v[:60])
def test_every_documented_module_and_config_exists(doc, command):
  module = re.search(r"-m (usss_jax[\w.]*)", command)
  if module:
    path = ROOT / (module.group(1).replace(".", "/"))
    assert path.with_suffix(".py").exists() or (path / "__main__.py").exists(), (
        f"{doc}: no module {module.group(1)}: {command}")
  for config in re.findall(r"--config=(\S+?)(?::\w+)?(?:\s|$)", command):
    name = config.removeprefix("configs/").removesuffix(".py")
    assert (ROOT / "configs" / f"{name}.py").exists(), f"{doc}: no config {config}: {command}"


@pytest.fixture(scope="module")
def known_flags() -> dict[str, set[str]]:
  """The flags each CLI's --help lists."""
  out = {}
  for name, args in CLIS.items():
    result = subprocess.run([sys.executable, *args, "--help"], cwd=ROOT, capture_output=True,
                            text=True, env=helpers.child_env(), timeout=600)
    assert result.returncode == 0, result.stderr
    out[name] = set(re.findall(r"^  --(\w+):", result.stdout, re.M))
  return out


def test_documented_flags_exist(known_flags):
  unknown = []
  for doc, command in ALL:
    cli = _cli(command)
    if cli not in known_flags:
      continue
    for flag in re.findall(r"(?:^|\s)--(\w+)(?=[=\s]|$)", command):
      if flag not in known_flags[cli] and flag not in ("help", "helpfull", "verbosity"):
        unknown.append(f"{doc}: --{flag} in {command}")
  assert not unknown, "\n".join(unknown)


def _user_env() -> dict:
  """A user's environment: the machine's own devices, not the tests' 8 forced CPU devices (the
  paper configs' batch of 10 does not split over 8)."""
  xla_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                       if not f.startswith("--xla_force_host_platform_device_count"))
  return helpers.child_env(XLA_FLAGS=xla_flags)


@pytest.mark.parametrize("doc,command", [a for a in ALL if _cheap(a[1])],
                         ids=lambda v: v if len(v) < 40 else v[:60])
def test_cheap_commands_run_as_written(doc, command, request):
  if "shared/data" in command:
    request.getfixturevalue("shared_data_dir")  # skipped (loudly) without ../shared/data
  result = subprocess.run(_argv(command), cwd=ROOT, capture_output=True, text=True,
                          env=_user_env(), timeout=600)
  assert result.returncode == 0, f"{doc}: {command}\n{result.stderr[-3000:]}"
  assert "Traceback" not in result.stderr


def test_the_library_imports_from_any_directory(tmp_path):
  # What the quick start's editable install gives: usss_jax importable outside the checkout.
  env = dict(helpers.child_env(), PYTHONPATH=str(ROOT))
  result = subprocess.run([sys.executable, "-c", "from usss_jax import Segmenter, losses"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr


def test_the_python_snippet_runs(tiny_run, demo_root, tmp_path, monkeypatch):
  readme = (ROOT / "README.md").read_text()
  section = readme[readme.index("### Segmenting images from Python"):]
  snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  image = sorted((pathlib.Path(demo_root) / "street" / "images" / "val").iterdir())[0]
  snippet = snippet.replace('"runs/demo"', repr(str(tiny_run.workdir)))
  snippet = snippet.replace('"photo.png"', repr(str(image)))
  scope = {"image_array": np.asarray(Image.open(image).convert("RGB"))}
  monkeypatch.chdir(tmp_path)
  exec(compile(snippet, "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert scope["mask"].dtype == np.uint8 and scope["colours"].shape[-1] == 3
  assert scope["any_mask"].shape == scope["mask"].shape
  assert os.listdir(tmp_path) == []
