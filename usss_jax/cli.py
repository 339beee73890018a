"""Command-line entry points: a user error ends the program as `error: ...` on stderr.

`run(main)` is `absl.app.run(main)` for launch.py and the other absl CLIs (ablation,
analysis): a misspelt flag or config key, a bad value, a missing dataset, an unusable
checkpoint or a workdir in use prints one line (and at most one hint line), with no traceback,
and exits with status 2. `--verbosity=1` (or more) prints the traceback too.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Callable, NoReturn, Sequence

from absl import app
from absl import flags

from usss_jax import checkpoint, config, metric_writers, workdir
from usss_jax.data import base

EXIT_USER_ERROR = 2
# Errors whose message says what is wrong and what to do: no traceback needed.
USER_ERRORS = (config.ConfigError, base.DataError, checkpoint.CheckpointError,
               workdir.WorkdirInUseError, metric_writers.NonFiniteLossError, flags.Error,
               app.UsageError)
_VERBOSITY = re.compile(r"^--?(?:verbosity|v)(?:=|$)")
_CONFIG_LOAD_FAILURE = "Failed loading config file"
_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"')


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


def run(main: Callable[[list[str]], None], argv: Sequence[str] | None = None) -> None:
  """absl.app.run(main, argv) where user errors end with `error: ...` and status 2."""
  argv = list(sys.argv if argv is None else argv)
  show_traceback = traceback_requested(argv)

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
