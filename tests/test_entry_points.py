"""Every entry point as careful as training (issue 20): each command a user can mistype ends with
one `error:` line (at most one `hint:` line after it), exit status 2, no traceback, and leaves
the run directory as it was; eval, predict and the analyses write nothing into a run but their
own outputs; config values are checked, not only keys; --help lists the project's flags.

Each case runs the real command in a subprocess (`helpers.run_cli`).
"""

import io
import logging
import os
import pathlib
import shutil
import subprocess
import sys

from absl import flags
import numpy as np
import pytest
import tqdm
from PIL import Image

import helpers
from helpers import demo_overrides, error_lines, run_cli, tiny_demo_config
from usss_jax import cli, modes
from usss_jax import config as config_lib
from usss_jax.domains import build_domains


@pytest.fixture(scope="module")
def env():
  return helpers.child_env()


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> pathlib.Path:
  """A private copy of the shared tiny run (the shared one is read only)."""
  return pathlib.Path(shutil.copytree(tiny_run.workdir, tmp_path / "run"))


def snapshot(path: pathlib.Path) -> dict:
  """Every file and folder under `path` with its size and modification time."""
  out = {}
  for p in sorted(path.rglob("*")):
    st = p.stat()
    out[str(p.relative_to(path))] = (p.is_dir(), st.st_size, st.st_mtime_ns)
  return out


def assert_user_error(out, first_line: str, *, hint: str | None = None) -> None:
  """Exit 2, no traceback, `first_line` exactly, at most one more line (starting `hint`)."""
  lines = error_lines(out.stderr)
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert lines and lines[0] == first_line, lines
  assert len(lines) <= 2, lines
  if hint is not None:
    assert len(lines) == 2 and lines[1].startswith("hint: ") and hint in lines[1], lines


def _demo_flags(demo_root: str) -> list[str]:
  return ["--config=configs/demo.py", "--config.batch_per_device=True",
          *demo_overrides(demo_root)]


# 1. launch.py: predict, eval, and a workdir that is a file.

def test_predict_errors_name_the_problem_and_create_nothing(run_copy, tmp_path, env):
  before = snapshot(run_copy)
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "notes.txt").write_text("no images here")
  nosuch = tmp_path / "nosuch.png"
  cases = [
      ([f"--input={nosuch}", "--domain=street"], f"error: {nosuch}: no such image file or folder"),
      ([f"--input={empty}", "--domain=nosuch"],
       "error: --domain='nosuch': not one of this run's domains ['street', 'indoor']"),
      ([f"--input={empty}", "--domain=street"],
       f"error: {empty}: folder holds no images (.png, .jpg, .jpeg, .bmp, .ppm)"),
      (["--domain=street"], "error: --mode=predict needs --input (an image file or a folder)"),
  ]
  for args, first_line in cases:
    out = run_cli("--mode=predict", f"--workdir={run_copy}", *args, env=env)
    assert_user_error(out, first_line)
    assert snapshot(run_copy) == before, args  # no empty predictions/ folder either
  assert sorted(p.name for p in empty.iterdir()) == ["notes.txt"]


def test_eval_and_predict_of_a_missing_run_create_nothing(tmp_path, demo_root, env):
  typo = tmp_path / "runs" / "typo"
  for mode in ("eval", "predict"):
    out = run_cli(*_demo_flags(demo_root), f"--mode={mode}", f"--workdir={typo}",
                  f"--input={demo_root}", env=env)
    assert_user_error(out, f"error: --workdir={typo}: no such run directory (train one with "
                           f"launch.py --config=... --workdir={typo})")
    assert not (tmp_path / "runs").exists()
  # A directory that is not a trained run: refused, left as it was.
  (tmp_path / "plain").mkdir()
  out = run_cli("--mode=eval", f"--workdir={tmp_path / 'plain'}", env=env)
  assert_user_error(out, f"error: --workdir={tmp_path / 'plain'}: not a trained run directory "
                         "(no checkpoints/); train it first, or name the run's workdir")
  assert list((tmp_path / "plain").iterdir()) == []


def test_workdir_that_is_a_file_is_one_line(tmp_path, demo_root, env):
  path = tmp_path / "a_file"
  path.write_text("keep me")
  for mode in ("train", "embed", "eval"):
    out = run_cli(*_demo_flags(demo_root), f"--mode={mode}", f"--workdir={path}", env=env)
    first = (f"error: --workdir={path}: exists and is not a directory; choose another work "
             "directory")
    assert_user_error(out, first)
    assert path.read_text() == "keep me"


# 2. Config values, not only keys.

@pytest.mark.parametrize("flag,first_line,hint", [
    ("--config.learning_rate=-1", "error: config.learning_rate=-1.0 must be positive", None),
    ("--config.num_labeled=100000",
     "error: config.num_labeled=100000 is more than the 48 training images of domain 'street'",
     "--config.num_labeled_above_pool=warn"),
    ("--config.num_labeled=48",
     "error: domain 'street': no unlabeled images left (config.num_labeled=48 labels all 48 "
     "training images) and config.method='full' trains on unlabeled images",
     "--config.unlabeled_includes_labeled=True"),
])
def test_config_values_are_checked_before_anything_runs(flag, first_line, hint, tmp_path,
                                                        demo_root, env):
  workdir = tmp_path / "new"
  out = run_cli(*_demo_flags(demo_root), f"--workdir={workdir}", flag, env=env)
  assert_user_error(out, first_line, hint=hint)
  assert not workdir.exists()


@pytest.mark.parametrize("key,value,message", [
    ("learning_rate", 0.0, "config.learning_rate=0.0 must be positive"),
    ("learning_rate", float("nan"), "config.learning_rate=nan: expected a finite number"),
    ("momentum", 1.5, r"config.momentum=1.5 must be in \[0, 1\)"),
    ("weight_decay", -0.1, "config.weight_decay=-0.1 must be >= 0"),
    ("alpha", -1.0, "config.alpha=-1.0 must be >= 0"),
    ("temperature", 0.0, "config.temperature=0.0 must be positive"),
    ("eval_batch", 0, "config.eval_batch=0 must be positive"),
    ("keep_checkpoints", 0, "config.keep_checkpoints=0 must be >= 1"),
    ("label_embeddings.max_pixels_per_image", 0,
     "config.label_embeddings.max_pixels_per_image=0 must be positive"),
    ("num_labeled_above_pool", "ignore", "config.num_labeled_above_pool='ignore': expected one of"),
])
def test_values_out_of_range_are_errors_naming_the_key(key, value, message, demo_root):
  config = helpers.set_overrides(tiny_demo_config(demo_root), {key: value})
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate_config(config)


def test_num_labeled_above_pool_can_be_a_warning(demo_root, tmp_path):
  config = tiny_demo_config(demo_root, num_labeled=100000, method="basic",
                            num_labeled_above_pool="warn")
  with helpers.logs_warning(r"config.num_labeled=100000 is more than the 48 training images "
                            r"of domain 'street': all 48 are labeled"):
    domains = build_domains(config, str(tmp_path / "w"))
  assert [len(d.labeled) for d in domains] == [48, 48]
  # A method that needs unlabeled images still refuses the empty pool, warning or not.
  with pytest.raises(config_lib.ConfigError, match="no unlabeled images left"):
    build_domains(tiny_demo_config(demo_root, num_labeled=100000, num_labeled_above_pool="warn"),
                  str(tmp_path / "x"), needs_unlabeled=True)
  # ... unless the labeled images are in the unlabeled pool too (the reference's setting).
  domains = build_domains(tiny_demo_config(demo_root, num_labeled=0,
                                           unlabeled_includes_labeled=True),
                          str(tmp_path / "y"), needs_unlabeled=True)
  assert len(domains[0].unlabeled) == 48


def test_reading_a_run_writes_no_split_lists(demo_root, tmp_path):
  config = tiny_demo_config(demo_root)
  domains = build_domains(config, str(tmp_path / "run"), write_splits=False)
  assert not (tmp_path / "run").exists()
  written = build_domains(config, str(tmp_path / "run"))
  assert [d.labeled for d in domains] == [d.labeled for d in written]


# 3. The data root.

def test_data_root_is_the_environment_the_flag_or_an_error_saying_what_to_set(
    tmp_path, monkeypatch, env):
  # An installed package (no pyproject.toml beside it) without $USSS_DATA_ROOT knows no root.
  monkeypatch.delenv(config_lib.DATA_ROOT_ENV, raising=False)
  monkeypatch.setattr(config_lib, "_CHECKOUT", str(tmp_path / "site-packages"))
  assert config_lib.data_root() == "" and config_lib.dataset_root("camvid") == ""
  config = config_lib.load_config("camvid_iddlite")
  with pytest.raises(config_lib.ConfigError, match=r"config.domains.camvid.root is empty: no "
                     r"data root is known\nhint: set \$USSS_DATA_ROOT .* --data_root=DIR"):
    config_lib.check_dataset_roots(config)
  monkeypatch.setenv(config_lib.DATA_ROOT_ENV, str(tmp_path / "data"))
  assert config_lib.dataset_root("camvid") == str(tmp_path / "data" / "camvid")

  workdir = tmp_path / "w"
  out = run_cli("--config=configs/camvid_iddlite.py", f"--workdir={workdir}",
                "--config.domains.camvid.root=", "--config.batch_per_device=True", env=env)
  assert_user_error(out, "error: config.domains.camvid.root is empty: no data root is known",
                    hint="$USSS_DATA_ROOT")
  assert not workdir.exists()
  out = run_cli("--config=configs/camvid_iddlite.py", "--mode=config",
                "--config.batch_per_device=True", f"--data_root={tmp_path / 'nowhere'}", env=env)
  assert_user_error(out, f"error: --data_root={tmp_path / 'nowhere'}: no such directory")
  (tmp_path / "data").mkdir()
  out = run_cli("--config=configs/camvid_iddlite.py", "--mode=config",
                "--config.batch_per_device=True", f"--data_root={tmp_path / 'data'}", env=env)
  assert out.returncode == 0, out.stderr
  assert f'"root": "{tmp_path / "data" / "camvid"}"' in out.stdout


# 4. The analyses, the ablation, the data and convert CLIs.

def test_analysis_errors_come_before_any_restore(run_copy, tmp_path, env):
  before = snapshot(run_copy)
  empty = tmp_path / "empty"
  empty.mkdir()
  missing = tmp_path / "runs" / "basic"
  cases = [
      (["predict_any", f"--input={empty}", "--label_space=nosuch"],
       "error: --label_space='nosuch': not one of this run's domains ['street', 'indoor']"),
      (["predict_any", f"--input={empty}", "--label_space=indoor"],
       f"error: {empty}: folder holds no images (.png, .jpg, .jpeg, .bmp, .ppm)"),
      (["correspondence", "--domain_a=street", "--domain_b=kitchen"],
       "error: --domain_b='kitchen': not one of this run's domains ['street', 'indoor']"),
      (["tsne", f"--compare_workdir={missing}"],
       f"error: --compare_workdir={missing}: no such run directory (train one with launch.py "
       f"--config=... --workdir={missing})"),
      (["tsne", "--labels=a,b,c"],
       "error: --labels names 3 panels (['a', 'b', 'c']) but there are 1 runs"),
      (["nonsense"], "error: unknown command 'nonsense'; expected one of ('predict_any', "
                     "'correspondence', 'tsne')"),
  ]
  for args, first_line in cases:
    out = run_cli(args[0], f"--workdir={run_copy}", *args[1:], module="usss_jax.analysis",
                  env=env)
    assert_user_error(out, first_line)
    assert snapshot(run_copy) == before, args
  assert not (tmp_path / "runs").exists()
  out = run_cli("tsne", f"--workdir={tmp_path / 'typo'}", module="usss_jax.analysis", env=env)
  assert_user_error(out, f"error: --workdir={tmp_path / 'typo'}: no such run directory (train "
                         f"one with launch.py --config=... --workdir={tmp_path / 'typo'})")


def test_ablation_checks_every_flag_before_the_first_run(tmp_path, demo_root, env):
  workdir = tmp_path / "ablation"
  flags = [*_demo_flags(demo_root), f"--workdir={workdir}"]
  methods = ",".join(["single", "basic", "cross", "full", "ser", "consistency", "universal"])
  cases = [
      (["--methods=basic,nosuch"], f"error: --methods: unknown ['nosuch']; choose from {methods}"),
      (["--seeds=0,one"], "error: --seeds=0,one: expected integers, e.g. --seeds=0,1,2"),
      (["--methods=basic", "--recommended=full"],
       "error: --recommended='full' is not among --methods=basic"),
      (["--methods=basic", "--config.learning_rate=0"],
       "error: config.learning_rate=0.0 must be positive"),
      (["--methods=basic", "--upper_labeled=-5"], "error: --upper_labeled=-5: expected a number "
       "of labeled images per domain, or 0 for no upper reference row"),
  ]
  for args, first_line in cases:
    out = run_cli(*flags, *args, module="usss_jax.ablation", env=env)
    assert_user_error(out, first_line)
    assert not workdir.exists()


def test_data_and_convert_clis_share_the_error_form(tmp_path, env):
  out = run_cli("describe", "--dataset", "camvid", "--split", "val", module="usss_jax.data",
                env=env)
  assert_user_error(out, "error: the following arguments are required: --root",
                    hint="python -m usss_jax.data describe --help")
  out = run_cli("describe", "--dataset", "camvid", "--root", str(tmp_path / "nowhere"),
                "--split", "val", module="usss_jax.data", env=env)
  assert out.returncode == 2 and error_lines(out.stderr)[0].startswith("error: ")
  assert "Traceback" not in out.stderr and len(error_lines(out.stderr)) <= 2
  out = run_cli("--arch", "drn_d_22", "--input", str(tmp_path / "nosuch.pth"), "--output",
                str(tmp_path / "out.npz"), module="usss_jax.convert", env=env)
  assert_user_error(out, f"error: {tmp_path / 'nosuch.pth'}: no such checkpoint file")
  out = run_cli("--arch", "drn_d_99", module="usss_jax.convert", env=env)
  assert out.returncode == 2 and error_lines(out.stderr)[0].startswith(
      "error: argument --arch: invalid choice: 'drn_d_99'"), out.stderr
  assert not (tmp_path / "out.npz").exists()


# 5. Help and output.

def test_help_lists_the_project_flags_and_modes(env):
  out = run_cli("--help", env=env)
  assert out.returncode == 0, out.stderr
  for text in ("--workdir:", "--mode:", "--input:", "--domain:", "--checkpoint:", "--data_root:",
               "--config.KEY=VALUE"):
    assert text in out.stdout, text
  for mode in ("train", "embed", "eval", "predict", "config"):
    assert f"\n  {mode} " in out.stdout, mode
  assert len(out.stdout.splitlines()) < 60  # not absl's 177 lines
  out = run_cli("--help", module="usss_jax.ablation", env=env)
  assert out.returncode == 0, out.stderr
  for method in ("single", "basic", "cross", "full", "ser", "consistency", "universal"):
    assert f"\n  {method} " in out.stdout, method
  assert "default all 7" in out.stdout and "--seeds:" in out.stdout
  out = run_cli("--help", module="usss_jax.analysis", env=env)
  assert out.returncode == 0, out.stderr
  for text in ("predict_any", "correspondence", "tsne", "--label_space:", "--compare_workdir:"):
    assert text in out.stdout, text


def test_log_lines_are_written_above_the_progress_bar(monkeypatch):
  stream = io.StringIO()
  bar = tqdm.tqdm(total=10, file=stream, mininterval=0, ascii=True)
  bar.update(3)
  handler = cli._TqdmHandler(stream)
  handler.setFormatter(logging.Formatter("%(message)s"))
  logger = logging.getLogger("usss_jax.test_progress")
  logger.addHandler(handler)
  logger.propagate = False
  try:
    logger.warning("saved checkpoint 3")
  finally:
    logger.removeHandler(handler)
    bar.close()
  text = stream.getvalue()
  # The bar is cleared (carriage return) before the line, and the line ends with a newline.
  assert "\rsaved checkpoint 3\n" in text or "\nsaved checkpoint 3\n" in text, repr(text)
  assert "]saved" not in text


@pytest.mark.parametrize("verbosity,level", [(0, logging.INFO), (1, logging.DEBUG)])
def test_verbosity_one_shows_the_debug_events(verbosity, level, monkeypatch):
  # The parameter table is logged at DEBUG: --verbosity=1 shows it, the default does not.
  events = logging.getLogger("usss_jax")
  monkeypatch.setattr(events, "handlers", [])
  monkeypatch.setattr(events, "propagate", events.propagate)
  monkeypatch.setattr(events, "level", events.level)
  monkeypatch.setattr(flags.FLAGS["verbosity"], "value", verbosity)
  monkeypatch.setattr(flags.FLAGS["verbosity"], "present", 1)
  assert cli.setup_logging() is events
  assert events.level == level and len(events.handlers) == 1
  assert isinstance(events.handlers[0], cli._TqdmHandler)


# 6. What eval and predict write.

@pytest.mark.slow
def test_eval_and_predict_write_only_their_outputs(run_copy, demo_root, tmp_path, env):
  before = snapshot(run_copy)
  out = run_cli("--mode=eval", f"--workdir={run_copy}", env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  added = set(snapshot(run_copy)) - set(before)
  assert len(added) == 1 and next(iter(added)).startswith("eval_best_step"), added
  assert {k: v for k, v in snapshot(run_copy).items() if k in before} == before

  images = pathlib.Path(demo_root) / "indoor" / "images" / "val"
  output = tmp_path / "pred"
  out = run_cli("--mode=predict", f"--workdir={run_copy}", f"--input={images}",
                "--domain=indoor", f"--output={output}", env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  stems = sorted(p.stem for p in images.iterdir())
  assert sorted(p.name for p in output.iterdir()) == sorted(
      ["legend.png"] + [f"{s}{k}" for s in stems for k in ("_mask.png", "_color.png",
                                                             "_overlay.png")])
  assert all(p.stat().st_mode & 0o777 == 0o644 for p in output.iterdir())
  mask = np.asarray(Image.open(output / f"{stems[0]}_mask.png"))
  colour = np.asarray(Image.open(output / f"{stems[0]}_color.png"))
  assert mask.max() < 5 and colour.shape == (*mask.shape, 3)
  assert {k: v for k, v in snapshot(run_copy).items() if k in before} == before


def test_run_directory_files_are_0644(tiny_run):
  modes_seen = {str(p.relative_to(tiny_run.workdir)): p.stat().st_mode & 0o777
                for p in tiny_run.workdir.rglob("*") if p.is_file()}
  assert any(k.startswith("splits/") for k in modes_seen)
  assert any(k.startswith("checkpoints/") for k in modes_seen)
  wrong = {k: oct(v) for k, v in modes_seen.items() if v != 0o644}
  assert not wrong, wrong


def test_run_directory_is_required_before_reading(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="no such run directory"):
    modes.require_run(str(tmp_path / "typo"))
  assert not (tmp_path / "typo").exists()
  assert os.listdir(tmp_path) == []


def test_the_entry_points_xla_defaults_join_the_users_flags_and_yield_to_them(monkeypatch):
  monkeypatch.delenv("USSS_XLA_DEFAULTS", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  cli.default_xla_flags()
  cli.default_xla_flags()  # once only
  assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                             *cli.DEFAULT_XLA_FLAGS]
  own = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
  monkeypatch.setenv("XLA_FLAGS", own)
  cli.default_xla_flags()
  assert os.environ["XLA_FLAGS"] == own
  monkeypatch.delenv("XLA_FLAGS")
  monkeypatch.setenv("USSS_XLA_DEFAULTS", "off")
  cli.default_xla_flags()
  assert "XLA_FLAGS" not in os.environ


_CONV_PROBE = """
from usss_jax import cli
cli.default_xla_flags()
import jax, jax.numpy as jnp
from jax import lax
def loss(x, w):
  y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.sum(jax.nn.relu(y) ** 2)
x, w = jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 32))
text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
print(sum("= " in line and "ynn_fusion" in line.split("=")[0] for line in text.splitlines()))
"""


@pytest.mark.parametrize("defaults", ["on", "off"])
def test_the_xla_defaults_reach_the_compiler_when_set_after_importing_jax(defaults):
  """The entry points import jax (not its backend) before they set the flags; XLA reads them when
  the backend starts, so a convolution's gradient compiles without YNNPACK fusions."""
  env = helpers.child_env(USSS_XLA_DEFAULTS=defaults, XLA_FLAGS="", PYTHONPATH=str(helpers.ROOT))
  out = subprocess.run([sys.executable, "-c", _CONV_PROBE], capture_output=True, text=True,
                       env=env, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  fusions = int(out.stdout.split()[-1])
  assert (fusions == 0) if defaults == "on" else (fusions >= 3), out.stdout
