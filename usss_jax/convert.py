"""Convert DRN-D weights between PyTorch state dicts (fyu/drn, USSS) and Flax variables.

The Flax module tree of `usss_jax.models.drn.DRN` mirrors the torch names, so the mapping is
mechanical: torch key `<module path>.<leaf>` <-> Flax `(collection, *module path, leaf)` with

| torch leaf            | Flax collection / leaf                      | layout change      |
|-----------------------|---------------------------------------------|--------------------|
| conv `weight`         | params / `kernel`                           | OIHW <-> HWIO      |
| BN `weight`, `bias`   | params / `scale`, `bias`                    |                    |
| `running_mean`, `running_var` | batch_stats / `mean`, `var`         |                    |
| `num_batches_tracked` | batch_stats / `num_batches_tracked`         | int64 <-> int32    |

Accepted torch key spellings: `layerK.<rest>` (fyu/drn), `base.K.<rest>` (the USSS `Net` encoder)
and either with a `module.` prefix (DataParallel). `fc.*` (the ImageNet classifier) is ignored on
import and never produced on export: USSS drops avgpool/fc, and the Flax encoder has no fc.
Checkpoints without `num_batches_tracked` (PyTorch < 0.4.1) are accepted; the counter is set to 0,
as PyTorch does.

File formats:
* torch side: `.npz` with torch keys (always), `.pth`/`.pt`/`.pth.tar` only where torch is
  importable (it is not a dependency of this project).
* Flax side: `.npz` of the flattened variables with '/'-joined keys, e.g.
  `params/layer3/0/conv1/kernel`, `batch_stats/layer3/0/bn1/mean` (NumPy-only, inspectable,
  round-trips exactly; load with `load_flax_variables`).

CLI:
  python -m usss_jax.convert --arch drn_d_22 --input drn_d_22.pth --output drn_d_22_flax.npz
  python -m usss_jax.convert --arch drn_d_22 --reverse --input drn_d_22_flax.npz --output torch.npz
"""

import argparse
from collections.abc import Mapping, Sequence
import os
import re
import sys
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from usss_jax import files
from usss_jax.models import drn as drn_lib

Variables = dict[str, Any]

# Flax leaf name -> torch leaf name, per collection.
_TORCH_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
    ("batch_stats", "num_batches_tracked"): "num_batches_tracked",
}
# Order of torch's state_dict: module registration order, then parameters before buffers.
_MODULE_RANK = {name: i for i, name in enumerate(
    ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample"])}
_LEAF_RANK = {name: i for i, name in enumerate(
    ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"])}
_COUNTER = "num_batches_tracked"


def _sort_key(torch_key: str) -> tuple[tuple[int, int], ...]:
  """Sorts torch keys of a DRN into `state_dict()` order."""
  parts = torch_key.split(".")
  key = []
  for part in parts[:-1]:
    if part.isdigit():
      key.append((0, int(part)))
    elif (m := re.fullmatch(r"layer(\d+)", part)):
      key.append((0, int(m.group(1))))
    else:
      key.append((1, _MODULE_RANK[part]))
  key.append((2, _LEAF_RANK[parts[-1]]))
  return tuple(key)


def _flax_shapes(model: drn_lib.DRN) -> Variables:
  """Abstract variables of `model` (no computation, no memory)."""
  dummy = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)


def _torch_shape(flax_leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if flax_leaf == "kernel":  # HWIO -> OIHW
    h, w, i, o = shape
    return (o, i, h, w)
  return tuple(shape)


def _layout(model: drn_lib.DRN) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], str]]:
  """torch key -> (Flax path incl. collection, torch shape, torch dtype), in state_dict order."""
  entries = {}
  for path, leaf in traverse_util.flatten_dict(_flax_shapes(model)).items():
    collection, module_path, name = path[0], path[1:-1], path[-1]
    torch_key = ".".join(module_path + (_TORCH_LEAF[(collection, name)],))
    dtype = "int64" if name == _COUNTER else "float32"
    entries[torch_key] = (path, _torch_shape(name, leaf.shape), dtype)
  return {k: entries[k] for k in sorted(entries, key=_sort_key)}


def torch_state_dict_layout(model: drn_lib.DRN) -> list[tuple[str, tuple[int, ...], str]]:
  """(key, shape, dtype) of the torch state dict matching `model`, without fc, in torch order."""
  return [(key, shape, dtype) for key, (_, shape, dtype) in _layout(model).items()]


def normalize_torch_key(key: str) -> str:
  """Strips `module.` prefixes and maps the USSS `base.K.` form to `layerK.`."""
  while key.startswith("module."):
    key = key[len("module."):]
  return re.sub(r"^base\.(\d+)\.", r"layer\1.", key)


def drn_variables_from_torch(state_dict: Mapping[str, Any], model: drn_lib.DRN, *,
                             ignore_prefixes: Sequence[str] = ("fc.",)) -> Variables:
  """Builds Flax variables for `model` from a torch DRN state dict.

  Args:
    state_dict: torch key -> array (NumPy, or anything `np.asarray` takes). Keys may be
      `layerK.*`, `base.K.*`, with or without `module.`.
    model: the DRN the variables are for (its widths decide the expected shapes).
    ignore_prefixes: keys (after normalisation) starting with these are skipped.

  Returns:
    {"params": ..., "batch_stats": ...} of NumPy arrays (float32; counters int32).

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped key (shapes in torch layout).
  """
  layout = _layout(model)
  given: dict[str, Any] = {}
  raw_names: dict[str, str] = {}
  duplicates = []
  for raw_key, value in state_dict.items():
    key = normalize_torch_key(raw_key)
    if key.startswith(tuple(ignore_prefixes)):
      continue
    if key in given:
      duplicates.append(f"{raw_names[key]!r} and {raw_key!r} both map to {key!r}")
    given[key] = value
    raw_names[key] = raw_key

  missing = [k for k in layout if k not in given and not k.endswith("." + _COUNTER)]
  unexpected = [raw_names[k] for k in given if k not in layout]
  misshaped = []
  for key, value in given.items():
    if key in layout and tuple(np.shape(value)) != layout[key][1]:
      misshaped.append(f"{raw_names[key]}: expected {list(layout[key][1])}, got "
                       f"{list(np.shape(value))}")
  if missing or unexpected or misshaped or duplicates:
    raise ValueError(_report(f"state dict does not fit {_describe(model)}", [
        ("missing keys", missing), ("unexpected keys", unexpected),
        ("mis-shaped keys", misshaped), ("duplicate keys", duplicates)]))

  flat = {}
  for key, (path, _, _) in layout.items():
    if key not in given:  # a counter missing from an old checkpoint
      flat[path] = np.zeros((), np.int32)
      continue
    value = np.asarray(given[key])
    if path[-1] == _COUNTER:
      flat[path] = value.astype(np.int32)
    elif path[-1] == "kernel":  # OIHW -> HWIO
      flat[path] = np.ascontiguousarray(value.transpose(2, 3, 1, 0), dtype=np.float32)
    else:
      flat[path] = value.astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def drn_variables_to_torch(variables: Mapping[str, Any], model: drn_lib.DRN) -> dict[str,
                                                                                    np.ndarray]:
  """Torch state dict (`layerK.*` keys, torch order, no fc) from Flax DRN variables.

  Args:
    variables: {"params": ..., "batch_stats": ...} of `model` (extra collections are ignored).
    model: the DRN the variables belong to.

  Returns:
    torch key -> NumPy array: conv weights OIHW float32, BN tensors float32,
    `num_batches_tracked` 0-d int64 -- the layout of the published fyu/drn checkpoints minus fc.

  Raises:
    ValueError: if the variables do not match `model` (missing/unexpected/mis-shaped leaves).
  """
  layout = _layout(model)
  flat = traverse_util.flatten_dict(
      {c: variables[c] for c in ("params", "batch_stats") if c in variables})
  by_path = {path: (key, shape) for key, (path, shape, _) in layout.items()}
  missing = ["/".join(p) for p in by_path if p not in flat]
  unexpected = ["/".join(p) for p in flat if p not in by_path]
  misshaped = []
  for path, value in flat.items():
    if path in by_path:
      expected = _flax_shape(path[-1], by_path[path][1])
      if tuple(np.shape(value)) != expected:
        misshaped.append(f"{'/'.join(path)}: expected {list(expected)}, got "
                         f"{list(np.shape(value))}")
  if missing or unexpected or misshaped:
    raise ValueError(_report(f"variables do not fit {_describe(model)}", [
        ("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)]))

  state_dict = {}
  for key, (path, _, _) in layout.items():
    value = np.asarray(jax.device_get(flat[path]))
    if path[-1] == _COUNTER:
      state_dict[key] = value.astype(np.int64).reshape(())
    elif path[-1] == "kernel":  # HWIO -> OIHW
      state_dict[key] = np.ascontiguousarray(value.transpose(3, 2, 0, 1), dtype=np.float32)
    else:
      state_dict[key] = value.astype(np.float32)
  return state_dict


def _flax_shape(flax_leaf: str, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
  if flax_leaf == "kernel":  # OIHW -> HWIO
    o, i, h, w = torch_shape
    return (h, w, i, o)
  return tuple(torch_shape)


def _report(header: str, groups: Sequence[tuple[str, Sequence[str]]],
            max_items: int = 20) -> str:
  """Multi-line error text: a count per problem kind, then up to `max_items` entries each."""
  lines = [header + ":"]
  for title, items in groups:
    if items:
      lines.append(f"  {len(items)} {title}: " + ", ".join(items[:max_items])
                   + (f", ... ({len(items) - max_items} more)" if len(items) > max_items else ""))
  return "\n".join(lines)


def _describe(model: drn_lib.DRN) -> str:
  return f"DRN(block={model.block!r}, layers={model.layers}, channels={model.channels})"


# ----------------------------------------------------------------------------------------------
# File I/O


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a torch state dict from `.npz` (always) or `.pth`/`.pt`/`.pth.tar` (needs torch).

  A torch file holding {"state_dict": ...} (training checkpoints) is unwrapped.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}
    except (ValueError, OSError) as e:
      raise ValueError(f"{path}: not a readable .npz archive ({e})") from e
  if path.endswith((".pth", ".pt", ".pth.tar")):
    try:
      import torch  # pylint: disable=g-import-not-at-top  # optional, not a project dependency
    except ImportError as e:
      raise RuntimeError(
          f"{path}: reading .pth/.pt files needs PyTorch, which is not installed here. Convert it "
          "to .npz where torch is available, e.g. np.savez('weights.npz', **{k: v.numpy() for k, "
          f"v in torch.load('{os.path.basename(path)}', map_location='cpu').items()}})") from e
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
      loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
      raise ValueError(f"{path}: expected a state dict (mapping), got {type(loaded).__name__}")
    return {key: value.detach().cpu().numpy() for key, value in loaded.items()}
  raise ValueError(f"{path}: unknown checkpoint format; expected .npz, .pth, .pt or .pth.tar")


def save_state_dict(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> None:
  """Writes a torch-keyed state dict to `.npz` (exactly at `path`, atomically)."""
  with files.atomic_write(os.fspath(path), "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in state_dict.items()})


def save_flax_variables(path: str | os.PathLike, variables: Mapping[str, Any]) -> None:
  """Writes Flax variables as `.npz` with '/'-joined keys (exactly at `path`)."""
  flat = {"/".join(p): np.asarray(jax.device_get(v))
          for p, v in traverse_util.flatten_dict(variables).items()}
  with files.atomic_write(os.fspath(path), "wb") as f:
    np.savez(f, **flat)


def load_flax_variables(path: str | os.PathLike) -> Variables:
  """Reads variables written by `save_flax_variables` (nested dicts of NumPy arrays)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such Flax variables file")
  try:
    with np.load(path, allow_pickle=False) as archive:
      flat = {tuple(key.split("/")): archive[key] for key in archive.files}
  except (ValueError, OSError) as e:
    raise ValueError(f"{path}: not a readable .npz archive ({e})") from e
  if any(len(p) < 2 for p in flat):
    raise ValueError(f"{path}: keys must look like 'params/<module>/.../<leaf>'")
  return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------------------------
# CLI


def _parse_channels(text: str) -> tuple[int, ...]:
  try:
    channels = tuple(int(c) for c in text.split(","))
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"--channels must be 8 comma-separated ints: {text!r}") from e
  if len(channels) != 8:
    raise argparse.ArgumentTypeError(f"--channels needs 8 widths, got {len(channels)}")
  return channels


EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
  """argparse with the project's error form (`usss_jax.cli.ArgumentParser`): one `error:` line,
  a `hint:` line, exit status 2."""

  def error(self, message: str):
    print(f"error: {message}\nhint: {self.prog} --help", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def main(argv: Sequence[str] | None = None) -> int:
  parser = _Parser(
      prog="python -m usss_jax.convert",
      description="Convert DRN-D weights: torch state dict (.pth/.pt/.npz) -> Flax variables "
      "(.npz, '/'-joined keys), or back with --reverse (torch-keyed .npz, no fc).")
  parser.add_argument("--arch", required=True, choices=sorted(drn_lib.ENCODERS))
  parser.add_argument("--input", required=True, help="source file")
  parser.add_argument("--output", required=True, help="destination .npz (written as given)")
  parser.add_argument("--reverse", action="store_true", help="Flax .npz -> torch-keyed .npz")
  parser.add_argument("--channels", type=_parse_channels, default=None,
                      help="8 comma-separated widths (default: the standard DRN-D widths)")
  args = parser.parse_args(argv)

  model = drn_lib.make_encoder(args.arch, args.channels)
  loaded = (load_flax_variables if args.reverse else load_state_dict)(args.input)
  try:
    converted = (drn_variables_to_torch if args.reverse else drn_variables_from_torch)(
        loaded, model)
  except ValueError as e:
    raise ValueError(f"{args.input}: {e}") from e
  if args.reverse:
    save_state_dict(args.output, converted)
    print(f"wrote {len(converted)} torch tensors to {args.output}")
  else:
    variables = converted
    save_flax_variables(args.output, variables)
    n_params = sum(v.size for v in traverse_util.flatten_dict(variables["params"]).values())
    print(f"wrote {args.arch} variables ({n_params:,} parameters) to {args.output}")
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except (ValueError, OSError, RuntimeError) as error:  # bad input: one line, no traceback
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
