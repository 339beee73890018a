"""Command-line entry points: a user error ends the program as `error: ...` on stderr.

`run(main)` is `absl.app.run(main)` for launch.py and the other absl CLIs (ablation,
analysis): a misspelt flag or config key, a bad value, a missing dataset, an unusable
checkpoint or a workdir in use prints one line (and at most one hint line), with no traceback,
and exits with status 2. `--verbosity=1` (or more) prints the traceback too. `--help` prints
the command's own flags with one line each (exit 0); `--helpfull` adds absl's and JAX's.
`--data_root=DIR` sets $USSS_DATA_ROOT before the config file is read. `ArgumentParser` gives
the argparse CLIs (`python -m usss_jax.data`) the same one-line errors, and `setup_logging`
prints the `usss_jax` logger's events above the progress bar (tqdm), never glued to it.
"""

from __future__ import annotations

import argparse
import logging as py_logging
import os
import re
import sys
import textwrap
import traceback
from typing import Callable, NoReturn, Sequence

from absl import app
from absl import flags
from absl import logging
import tqdm

from usss_jax import checkpoint, config, files, metric_writers, workdir
from usss_jax.data import base

EXIT_USER_ERROR = 2
# Errors whose message says what is wrong and what to do: no traceback needed.
USER_ERRORS = (config.ConfigError, base.DataError, checkpoint.CheckpointError,
               workdir.WorkdirInUseError, metric_writers.NonFiniteLossError, flags.Error,
               app.UsageError, files.WriteError, workdir.ProcessLostError)
# XLA:CPU hands convolutions (and what it fuses with them) to YNNPACK by default; for the DRN
# its own convolutions measured faster at the default shapes with a 600 MiB smaller memory plan
# (docs/BENCHMARKS.md). Only XLA:CPU reads it. USSS_XLA_DEFAULTS=off leaves XLA_FLAGS alone.
DEFAULT_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
_VERBOSITY = re.compile(r"^--?(?:verbosity|v)(?:=|$)")
_CONFIG_LOAD_FAILURE = "Failed loading config file"
_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"')


def add_xla_flags(flags_to_add: Sequence[str]) -> None:
  """Appends each `--option=value` to $XLA_FLAGS unless the option is set there already (what
  is set wins); only takes effect before jax initialises its backend."""
  current = os.environ.get("XLA_FLAGS", "")
  for flag in flags_to_add:
    if flag.split("=")[0] + "=" not in current:
      current += " " + flag
  os.environ["XLA_FLAGS"] = current.strip()


def default_xla_flags() -> None:
  """Adds DEFAULT_XLA_FLAGS to $XLA_FLAGS (add_xla_flags) unless USSS_XLA_DEFAULTS=off. The entry
  points call it first; child processes inherit it."""
  if os.environ.get("USSS_XLA_DEFAULTS", "on") != "off":
    add_xla_flags(DEFAULT_XLA_FLAGS)


def traceback_requested(argv: Sequence[str]) -> bool:
  """Whether the command line asks for `--verbosity` (or `-v`) of 1 or more."""
  for i, arg in enumerate(argv):
    if _VERBOSITY.match(arg):
      value = arg.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
      try:
        return int(value) >= 1
      except ValueError:
        return False
  return False


def _flag_error_message(error: Exception, argv: Sequence[str]) -> str:
  """Flag-parsing failures (absl's and ml_collections' config overrides) as one line."""
  text = str(error)
  misspelt = _DID_YOU_MEAN.search(text.replace("\\", ""))
  if isinstance(error, (AttributeError, KeyError)) and misspelt:
    suggestion, key = misspelt.groups()
    flag = next((a.partition("=")[0] for a in argv
                 if a.partition("=")[0].endswith(f".{key}") and a.startswith("--config.")),
                f"--config...{key}")
    return f"{flag}: no such config key (did you mean {suggestion!r}?)"
  config_arg = next((a for a in argv if a.startswith("--config=")), None)
  if isinstance(error, OSError) and config_arg:
    path = config_arg.partition("=")[2].partition(":")[0]
    if not os.path.exists(path):
      return (f"--config={path}: no such config file (pass a configs/*.py file, or an "
              "installed config by name, e.g. --config=demo)")
  if config_arg and "Error whilst parsing config file" in text and "Traceback" in text:
    # get_config raised (a bad "file.py:argument"): its own message, not the traceback.
    kind, _, message = text.strip().splitlines()[-1].partition(": ")
    return f"{config_arg}: {message or kind}"
  return " ".join(text.split())


def _fail(message: str, show_traceback: bool) -> NoReturn:
  if show_traceback:
    traceback.print_exc()
  lines = message.strip().splitlines() or ["(no message)"]
  print(f"error: {lines[0]}", file=sys.stderr)
  if len(lines) > 1:  # the hint
    print(" ".join(" ".join(lines[1:]).split()), file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


_HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "-help", "-helpshort")
DATA_ROOT_FLAG = "--data_root"


def define_data_root_flag(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """--data_root (read by `run` before the flags are parsed; defined so that it is listed)."""
  if "data_root" not in flag_values:
    flags.DEFINE_string("data_root", None, "Folder holding the datasets (sets "
                        f"${config.DATA_ROOT_ENV}; default: ${config.DATA_ROOT_ENV}, else a "
                        "checkout's ../shared/data).", flag_values=flag_values)


def _apply_data_root(argv: Sequence[str], show_traceback: bool) -> None:
  """--data_root=DIR -> $USSS_DATA_ROOT, before the config file (`dataset_root`) is read."""
  for i, arg in enumerate(argv):
    if arg == "--":
      return
    if arg == DATA_ROOT_FLAG or arg.startswith(DATA_ROOT_FLAG + "="):
      value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
      path = os.path.expanduser(value)
      if not os.path.isdir(path):
        _fail(f"{DATA_ROOT_FLAG}={value}: no such directory\nhint: name the folder that holds "
              "the datasets (camvid/, idd_lite/, cityscapes/, ...)", show_traceback)
      os.environ[config.DATA_ROOT_ENV] = os.path.abspath(path)


def print_help(summary: str, modules: Sequence[str], flag_values=flags.FLAGS) -> None:
  """The command's summary, then the flags the given modules define, one entry each."""
  print(summary.strip() + "\n\nflags:")
  seen = set()
  for module in modules:
    for flag in sorted(flag_values.get_flags_for_module(module), key=lambda f: f.name):
      if flag.name in seen:
        continue
      seen.add(flag.name)
      default = "" if flag.default in (None, "", []) else f" (default: {flag.default_as_str})"
      print(textwrap.fill(f"--{flag.name}: {flag.help}{default}", width=92,
                          initial_indent="  ", subsequent_indent="      "))
  print("\n--helpfull lists every flag (absl's and JAX's too).")


class _TqdmHandler(py_logging.StreamHandler):
  """Writes records through tqdm, which lifts a progress bar above each line."""

  def emit(self, record: py_logging.LogRecord) -> None:
    try:
      tqdm.tqdm.write(self.format(record), file=self.stream)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


def setup_logging() -> py_logging.Logger:
  """Events of the `usss_jax` logger on stderr as `HH:MM:SS message`, above the progress bar,
  at DEBUG with --verbosity>=1 (the parameter table, ...), else INFO; absl (and Orbax through
  it) at WARNING unless --verbosity was given. Returns the `usss_jax` logger."""
  verbosity = flags.FLAGS["verbosity"]
  if not verbosity.present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint step at INFO
  events = py_logging.getLogger("usss_jax")
  if not events.handlers:
    handler = _TqdmHandler(sys.stderr)
    handler.setFormatter(py_logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    events.addHandler(handler)
    events.propagate = False
  events.setLevel(py_logging.DEBUG if (verbosity.value or 0) >= 1 else py_logging.INFO)
  return events


class ArgumentParser(argparse.ArgumentParser):
  """argparse with the CLIs' error form: `error: ...`, a `hint:` line, exit status 2."""

  def error(self, message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    print(f"hint: {self.prog} --help", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def run(main: Callable[[list[str]], None], argv: Sequence[str] | None = None, *,
        help_text: str | None = None, help_modules: Sequence[str] = ()) -> None:
  """absl.app.run(main, argv) where user errors end with `error: ...` and status 2.

  Args:
    help_text, help_modules: what --help prints (the summary and the modules whose flags it
      lists); absl's own --help when not given.
  """
  default_xla_flags()
  argv = list(sys.argv if argv is None else argv)
  show_traceback = traceback_requested(argv)
  options = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  if help_text is not None and any(a in _HELP_FLAGS for a in options):
    print_help(help_text, help_modules)
    sys.exit(0)
  _apply_data_root(argv, show_traceback)

  def parse_flags(args: list[str]) -> list[str]:
    try:
      return flags.FLAGS(args)
    except (flags.Error, AttributeError, KeyError, OSError, ValueError, TypeError) as e:
      _fail(_flag_error_message(e, args), show_traceback)

  def guarded_main(args: list[str]) -> None:
    try:
      main(args)
    except USER_ERRORS as e:
      _fail(str(e), show_traceback)
    except OSError as e:  # ml_collections reports a missing config file on first use
      if _CONFIG_LOAD_FAILURE not in str(e):
        raise
      _fail(_flag_error_message(e, argv), show_traceback)

  app.run(guarded_main, argv=argv, flags_parser=parse_flags)
