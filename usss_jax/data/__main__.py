"""Dataset command line.

  python -m usss_jax.data describe --dataset NAME --root DIR --split SPLIT \
      [--option key=value ...] [--limit N]
  python -m usss_jax.data demo --root DIR [--force]

`describe` loads every example of the split (image and decoded label, so bad
files are found) and prints one JSON object: dataset, split, num_examples,
classes, ignore_label, label_histogram (pixel count per train id as a string,
every class and the ignore value included), image_sizes ("WxH" -> count) and
skipped (number of unpaired files dropped with `--option skip_unpaired=true`,
listed in skipped_files). Option values are parsed as JSON where possible
(`true`, `3`, `null`), `None` means None, anything else is a string.
Bad data or a bad flag prints `error: <message>` (and a `hint:` line) on stderr and exits with
status 2.
"""

from __future__ import annotations

import collections
import json
import sys
from typing import Any, Sequence

import numpy as np

from usss_jax import cli
from usss_jax.data import demo
from usss_jax.data.base import DataError
from usss_jax.data.registry import READERS, get_reader

EXIT_DATA_ERROR = 2
MAX_LISTED_SKIPPED = 50


def parse_option(text: str) -> tuple[str, Any]:
  """`key=value` -> (key, value); value as JSON when it parses, else a string."""
  key, sep, raw = text.partition("=")
  if not sep or not key:
    raise ValueError(f"--option expects key=value, got {text!r}")
  if raw in ("None", "none"):
    return key, None
  if raw in ("True", "False"):
    return key, raw == "True"
  try:
    value = json.loads(raw)
  except ValueError:
    value = raw
  if isinstance(value, (dict, list)):
    value = raw  # Only scalars are reader options.
  return key, value


def describe(name: str, root: str, split: str, options: dict[str, Any],
             limit: int | None = None) -> dict[str, Any]:
  """Statistics of one split; raises DataError on bad data."""
  reader = get_reader(name, root, **options)
  examples = reader.list_examples(split)
  spec = reader.spec
  histogram = np.zeros(256, np.int64)
  sizes: collections.Counter[str] = collections.Counter()
  described = examples if limit is None else examples[:limit]
  for example in described:
    loaded = reader.load_example(example)
    height, width = loaded["image"].shape[:2]
    sizes[f"{width}x{height}"] += 1
    if "label" in loaded:
      histogram += np.bincount(loaded["label"].ravel(), minlength=256)
  ids = list(range(spec.num_classes)) + [spec.ignore_label]
  # Decoded labels hold only class ids and the ignore value (the readers' LUTs
  # guarantee it), so this histogram covers every pixel.
  skipped = getattr(reader, "skipped", {}).get(split, [])
  return {
      "dataset": name,
      "spec_name": spec.name,
      "root": reader.root,
      "split": split,
      "num_examples": len(examples),
      "num_described": len(described),
      "num_classes": spec.num_classes,
      "classes": list(spec.classes),
      "ignore_label": spec.ignore_label,
      "label_histogram": {str(i): int(histogram[i]) for i in ids},
      "image_sizes": dict(sorted(sizes.items())),
      "skipped": len(skipped),
      "skipped_files": skipped[:MAX_LISTED_SKIPPED],
  }


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli.ArgumentParser(prog="python -m usss_jax.data",
                              description="Dataset tools: check a dataset before training, "
                              "or write the demo data.")
  commands = parser.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)
  p_describe = commands.add_parser("describe", help="statistics of one split as JSON")
  p_describe.add_argument("--dataset", required=True, choices=sorted(READERS),
                          help="reader (dataset format)")
  p_describe.add_argument("--root", required=True, help="dataset root in its official layout")
  p_describe.add_argument("--split", required=True, help="split name, e.g. train, val, test")
  p_describe.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                          help="reader option, e.g. list_suffix=.subset (repeatable)")
  p_describe.add_argument("--limit", type=int, default=None,
                          help="describe only the first N examples (sorted by key)")
  p_demo = commands.add_parser("demo", help="(re)generate the demo dataset")
  p_demo.add_argument("--root", required=True, help="where to write street/ and indoor/")
  p_demo.add_argument("--num-train", type=int, default=48)
  p_demo.add_argument("--num-val", type=int, default=16)
  p_demo.add_argument("--height", type=int, default=96)
  p_demo.add_argument("--width", type=int, default=128)
  p_demo.add_argument("--seed", type=int, default=0)
  p_demo.add_argument("--force", action="store_true", help="regenerate even if present")
  args = parser.parse_args(argv)

  try:
    if args.command == "describe":
      options = dict(parse_option(o) for o in args.option)
      result = describe(args.dataset, args.root, args.split, options, args.limit)
    else:
      result = demo.ensure_demo_data(args.root, num_train=args.num_train,
                                     num_val=args.num_val,
                                     size=(args.height, args.width), seed=args.seed,
                                     force=args.force)
  except (DataError, ValueError, OSError) as e:  # DataError is a ValueError (bad options too)
    message = str(e).strip().splitlines() or [type(e).__name__]
    print(f"error: {message[0]}", file=sys.stderr)
    if len(message) > 1:
      print(" ".join(" ".join(message[1:]).split()), file=sys.stderr)
    return EXIT_DATA_ERROR
  json.dump(result, sys.stdout, indent=1)
  sys.stdout.write("\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
