"""torch <-> Flax DRN checkpoint conversion."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from usss_jax import convert
from usss_jax.models import drn as drn_lib

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ["drn_d_22", "drn_d_38", "drn_d_54", "drn_d_105"]
TINY = {"drn_tiny_d22": "drn_d_22", "drn_tiny_d54": "drn_d_54"}


def read_tsv(path) -> list[tuple[str, tuple[int, ...], str]]:
  rows = []
  for line in path.read_text().splitlines():
    key, shape, dtype = line.split("\t")
    rows.append((key, tuple(json.loads(shape)), dtype))
  return rows


def load_tiny(fixtures_dir, name):
  """(torch state dict incl. fc, in file order; DRN) of a tiny fixture model."""
  with np.load(fixtures_dir / f"{name}.npz", allow_pickle=False) as z:
    state_dict = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
    cfg = json.loads(str(z["config_json"]))
  return state_dict, drn_lib.make_encoder(TINY[name], tuple(cfg["channels"]))


def without_fc(state_dict):
  return {k: v for k, v in state_dict.items() if not k.startswith("fc.")}


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", VARIANTS)
def test_layout_matches_reference_key_listing(fixtures_dir, name):
  reference = read_tsv(fixtures_dir / "drn_state_dict_keys" / f"{name}.tsv")
  assert reference[-2][0] == "fc.weight" and reference[-1][0] == "fc.bias"
  layout = convert.torch_state_dict_layout(drn_lib.make_encoder(name))
  assert layout == reference[:-2]  # same keys, order, shapes and dtypes; no fc


def test_real_full_size_export_matches_reference_listing(fixtures_dir):
  model = drn_lib.make_encoder("drn_d_22")
  variables = jax.jit(lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False))(
      jnp.zeros((1, 8, 8, 3)))
  state_dict = convert.drn_variables_to_torch(variables, model)
  reference = read_tsv(fixtures_dir / "drn_state_dict_keys" / "drn_d_22.tsv")[:-2]
  assert [(k, v.shape, str(v.dtype)) for k, v in state_dict.items()] == reference
  # OIHW: the stem conv is (16, 3, 7, 7) and holds the same numbers as the HWIO kernel.
  np.testing.assert_array_equal(state_dict["layer0.0.weight"],
                                np.asarray(variables["params"]["layer0"]["0"]["kernel"]).transpose(
                                    3, 2, 0, 1))
  back = convert.drn_variables_from_torch(state_dict, model)
  assert_trees_equal(back, jax.device_get(variables))


@pytest.mark.parametrize("name", sorted(TINY))
def test_round_trip_is_exact_on_tiny_fixtures(fixtures_dir, name):
  state_dict, model = load_tiny(fixtures_dir, name)
  variables = convert.drn_variables_from_torch(state_dict, model)
  # Spot-check the layout change and the collections.
  kernel = variables["params"]["layer3"]["0"]["conv1"]["kernel"]
  np.testing.assert_array_equal(kernel, state_dict["layer3.0.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["layer8"]["1"]["var"],
                                state_dict["layer8.1.running_var"])
  np.testing.assert_array_equal(variables["params"]["layer8"]["1"]["scale"],
                                state_dict["layer8.1.weight"])
  assert variables["batch_stats"]["layer0"]["1"]["num_batches_tracked"].dtype == np.int32
  back = convert.drn_variables_to_torch(variables, model)
  expected = without_fc(state_dict)
  assert list(back) == list(expected)  # torch order
  for key, value in expected.items():
    assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
    np.testing.assert_array_equal(back[key], value)


def test_prefixed_key_forms_are_accepted(fixtures_dir):
  state_dict, model = load_tiny(fixtures_dir, "drn_tiny_d22")
  plain = convert.drn_variables_from_torch(state_dict, model)
  as_usss = {("base." + k[len("layer"):] if k.startswith("layer") else k): v
             for k, v in state_dict.items()}
  assert "base.3.0.conv1.weight" in as_usss
  for variant in (as_usss,
                  {"module." + k: v for k, v in state_dict.items()},
                  {"module." + k: v for k, v in as_usss.items()}):
    assert_trees_equal(convert.drn_variables_from_torch(variant, model), plain)


def test_missing_num_batches_tracked_is_accepted_as_zero(fixtures_dir):
  state_dict, model = load_tiny(fixtures_dir, "drn_tiny_d54")
  old_style = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  assert len(old_style) < len(state_dict)
  variables = convert.drn_variables_from_torch(old_style, model)
  counters = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
              if path[-1].key == "num_batches_tracked"]
  assert len(counters) == 57 and all(c.dtype == np.int32 and int(c) == 0 for c in counters)


def test_bad_state_dicts_raise_naming_the_keys(fixtures_dir):
  state_dict, model = load_tiny(fixtures_dir, "drn_tiny_d22")
  missing = dict(state_dict)
  del missing["layer5.1.bn2.running_var"]
  with pytest.raises(ValueError, match=r"1 missing keys: layer5\.1\.bn2\.running_var"):
    convert.drn_variables_from_torch(missing, model)

  misshaped = dict(state_dict)
  misshaped["layer4.0.conv2.weight"] = np.zeros((16, 16, 3, 2), np.float32)
  with pytest.raises(ValueError, match=r"layer4\.0\.conv2\.weight: expected \[16, 16, 3, 3\], "
                     r"got \[16, 16, 3, 2\]"):
    convert.drn_variables_from_torch(misshaped, model)

  unexpected = {"module." + k: v for k, v in state_dict.items()}
  unexpected["module.seg.0.weight"] = np.zeros((5, 32, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"unexpected keys: module\.seg\.0\.weight"):
    convert.drn_variables_from_torch(unexpected, model)
  # ... unless told to skip it.
  convert.drn_variables_from_torch(unexpected, model, ignore_prefixes=("fc.", "seg."))

  duplicated = dict(state_dict)
  duplicated["base.0.0.weight"] = state_dict["layer0.0.weight"]
  with pytest.raises(ValueError, match="both map to 'layer0.0.weight'"):
    convert.drn_variables_from_torch(duplicated, model)

  # All problems are reported at once.
  with pytest.raises(ValueError) as info:
    convert.drn_variables_from_torch({**missing, "layer9.0.weight": np.zeros(1)}, model)
  assert "layer5.1.bn2.running_var" in str(info.value) and "layer9.0.weight" in str(info.value)

  # Wrong widths for the model: the layout says which tensors do not fit.
  other = drn_lib.make_encoder("drn_d_22")
  with pytest.raises(ValueError, match=r"layer0\.0\.weight: expected \[16, 3, 7, 7\], got "
                     r"\[4, 3, 7, 7\]"):
    convert.drn_variables_from_torch(state_dict, other)


def test_export_rejects_mismatched_variables(fixtures_dir):
  state_dict, model = load_tiny(fixtures_dir, "drn_tiny_d22")
  variables = convert.drn_variables_from_torch(state_dict, model)
  variables["params"]["layer2"]["0"]["kernel"] = np.zeros((3, 3, 4, 9), np.float32)
  with pytest.raises(ValueError, match=r"params/layer2/0/kernel: expected \[3, 3, 4, 8\]"):
    convert.drn_variables_to_torch(variables, model)
  del variables["batch_stats"]["layer1"]
  with pytest.raises(ValueError, match=r"missing: batch_stats/layer1/1/mean"):
    convert.drn_variables_to_torch(variables, model)


def test_cli_round_trip_through_npz(fixtures_dir, tmp_path, capsys):
  state_dict, model = load_tiny(fixtures_dir, "drn_tiny_d54")
  torch_in = tmp_path / "torch_in.npz"
  np.savez(torch_in, **{"module." + k: v for k, v in state_dict.items()})  # fc included
  flax_file = tmp_path / "flax.npz"
  torch_out = tmp_path / "torch_out.npz"
  channels = ",".join(str(c) for c in model.channels)
  assert convert.main(["--arch", "drn_d_54", "--channels", channels, "--input", str(torch_in),
                       "--output", str(flax_file)]) == 0
  assert "wrote drn_d_54 variables" in capsys.readouterr().out
  with np.load(flax_file) as z:
    assert "params/layer6/0/downsample/0/kernel" in z.files
    assert "batch_stats/layer6/0/downsample/1/num_batches_tracked" in z.files
  assert_trees_equal(convert.load_flax_variables(flax_file),
                     convert.drn_variables_from_torch(state_dict, model))
  assert convert.main(["--arch", "drn_d_54", "--channels", channels, "--reverse", "--input",
                       str(flax_file), "--output", str(torch_out)]) == 0
  with np.load(torch_out) as z:
    back = {k: z[k] for k in z.files}
  expected = without_fc(state_dict)
  assert list(back) == list(expected)
  for key, value in expected.items():
    assert back[key].dtype == value.dtype
    np.testing.assert_array_equal(back[key], value)


def test_cli_as_module_reports_bad_input(fixtures_dir, tmp_path):
  state_dict, _ = load_tiny(fixtures_dir, "drn_tiny_d22")
  torch_in = tmp_path / "weights.npz"
  np.savez(torch_in, **state_dict)
  # Standard widths do not fit the tiny checkpoint: the error names the file and the keys.
  result = subprocess.run(
      [sys.executable, "-m", "usss_jax.convert", "--arch", "drn_d_22", "--input", str(torch_in),
       "--output", str(tmp_path / "out.npz")],
      capture_output=True, text=True, check=False, cwd=PROJECT_ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(PROJECT_ROOT)})
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "weights.npz" in result.stderr and "layer0.0.weight: expected [16, 3, 7, 7]" in (
      result.stderr)
  assert not (tmp_path / "out.npz").exists()


def test_load_state_dict_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothere.npz"):
    convert.load_state_dict(tmp_path / "nothere.npz")
  bad = tmp_path / "broken.npz"
  bad.write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="broken.npz"):
    convert.load_state_dict(bad)
  other = tmp_path / "weights.h5"
  other.write_bytes(b"")
  with pytest.raises(ValueError, match=r"weights.h5: unknown checkpoint format"):
    convert.load_state_dict(other)
  pth = tmp_path / "drn_d_22.pth"
  pth.write_bytes(b"")
  if importlib.util.find_spec("torch") is None:
    with pytest.raises(RuntimeError, match=r"drn_d_22.pth: .*needs PyTorch.*\.npz"):
      convert.load_state_dict(pth)
