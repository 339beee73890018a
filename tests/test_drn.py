"""DRN-D encoder and PyTorch-semantics BatchNorm against the reference fixtures."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY as TINY_CHANNELS, rel_err
from usss_jax import convert, sharding
from usss_jax.models import drn as drn_lib
from usss_jax.models.layers import BatchNorm

TINY = {"drn_tiny_d22": "drn_d_22", "drn_tiny_d54": "drn_d_54"}
STAGES = [f"layer{k}" for k in range(9)]


@pytest.fixture(autouse=True)
def full_float32_precision():
  """Parity needs true float32 convs/matmuls (GPUs would otherwise use TF32); no-op on CPU."""
  with jax.default_matmul_precision("highest"):
    yield


def nchw_to_nhwc(a: np.ndarray) -> np.ndarray:
  return a.transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, fixtures_dir):
  """(npz contents, DRN, converted variables) of one tiny reference model."""
  path = fixtures_dir / f"{request.param}.npz"
  with np.load(path, allow_pickle=False) as z:
    data = {k: z[k] for k in z.files}
  cfg = json.loads(str(data["config_json"]))
  model = drn_lib.make_encoder(TINY[request.param], tuple(cfg["channels"]))
  assert model.block == {"BasicBlock": "basic", "Bottleneck": "bottleneck"}[cfg["block"]]
  assert model.layers == tuple(cfg["layers"])
  state_dict = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
  variables = convert.drn_variables_from_torch(state_dict, model)
  return data, model, variables


def test_eval_stages_match_reference(tiny):
  data, model, variables = tiny
  stages = model.apply(variables, data["x_nhwc"], train=False, return_stages=True)
  assert sorted(stages) == STAGES
  for name in STAGES:
    ref = data[f"out_nhwc/{name}"]
    assert stages[name].shape == ref.shape, name
    assert rel_err(stages[name], ref) <= 1e-5, name


def test_train_stages_and_running_stats_match_reference(tiny):
  data, model, variables = tiny
  stages, updates = model.apply(variables, data["x_nhwc"], train=True, return_stages=True,
                                mutable=["batch_stats"])
  for name in STAGES:
    assert rel_err(stages[name], nchw_to_nhwc(data[f"train_out/{name}"])) <= 1e-3, name
  new_state = convert.drn_variables_to_torch(
      {"params": variables["params"], "batch_stats": updates["batch_stats"]}, model)
  stat_keys = [k for k in data if k.startswith("train_stats/")]
  assert len(stat_keys) == 3 * sum(k.endswith(".running_mean") for k in new_state)
  for key in stat_keys:
    torch_key = key[len("train_stats/"):]
    ref, got = data[key], new_state[torch_key]
    if torch_key.endswith("num_batches_tracked"):
      assert got.dtype == np.int64 and got.shape == () and int(got) == int(ref) == 1
    else:
      assert rel_err(got, ref) <= 1e-4, torch_key
      # Eval-mode stats were random and differ from the batch ones: the update really happened.
      assert rel_err(data[f"param/{torch_key}"], ref) > 1e-3, torch_key


def test_float64_forward_matches_reference(tiny):
  data, model, variables = tiny
  with jax.enable_x64(True):
    model64 = model.clone(dtype=jnp.float64)
    vars64 = jax.tree.map(
        lambda a: np.asarray(a, np.float64) if a.dtype == np.float32 else a, variables)
    x64 = data["x_nhwc"].astype(np.float64)
    out = model64.apply(vars64, x64, train=False)
    assert out.dtype == jnp.float64
    assert rel_err(out, nchw_to_nhwc(data["out_f64/layer8"])) <= 1e-10
    out, _ = model64.apply(vars64, x64, train=True, mutable=["batch_stats"])
    assert rel_err(out, nchw_to_nhwc(data["train_out_f64/layer8"])) <= 1e-10


def test_flax_biased_running_var_would_fail_the_fixture(tiny):
  """Flax's nn.BatchNorm stores the biased variance; the fixture tolerance catches that."""
  data, model, variables = tiny
  _, updates = model.apply(variables, data["x_nhwc"], train=True, mutable=["batch_stats"])
  new_state = convert.drn_variables_to_torch(
      {"params": variables["params"], "batch_stats": updates["batch_stats"]}, model)
  n = 2 * 8 * 12  # N*H*W of every BN in layer4..layer8 (8x12 maps, batch 2)
  worst_flax_style = 0.0
  for key in new_state:
    if not (key.endswith("running_var") and key[:6] in ("layer4", "layer5", "layer6", "layer7",
                                                          "layer8")):
      continue
    old_var = data[f"param/{key}"]
    ref = data[f"train_stats/{key}"]
    assert rel_err(new_state[key], ref) <= 1e-4, key
    batch_unbiased = (new_state[key] - 0.9 * old_var) / 0.1
    flax_style = 0.9 * old_var + 0.1 * batch_unbiased * (n - 1) / n
    worst_flax_style = max(worst_flax_style, rel_err(flax_style, ref))
  # Several times the 1e-4 tolerance (README: up to 2e-3 / 5e-3 element-wise).
  assert worst_flax_style > 2e-4


def test_batchnorm_matches_float64_torch_semantics():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(3, 5, 4, 6)) * 2 + 1).astype(np.float32)
  bn = BatchNorm(momentum=0.1)
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  # init must not count as a training step
  assert int(variables["batch_stats"]["num_batches_tracked"]) == 0
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(6))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(6))
  params = {"scale": rng.uniform(0.5, 1.5, 6).astype(np.float32),
            "bias": rng.normal(size=6).astype(np.float32)}
  stats = {"mean": rng.normal(size=6).astype(np.float32),
           "var": rng.uniform(0.5, 1.5, 6).astype(np.float32),
           "num_batches_tracked": np.int32(4)}
  y, updates = bn.apply({"params": params, "batch_stats": stats}, x,
                        use_running_average=False, mutable=["batch_stats"])
  x64 = x.astype(np.float64).reshape(-1, 6)
  n = x64.shape[0]
  mean, var = x64.mean(0), x64.var(0)
  y_ref = (x64 - mean) / np.sqrt(var + 1e-5) * params["scale"] + params["bias"]
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 6), y_ref, rtol=1e-5, atol=1e-5)
  new = updates["batch_stats"]
  np.testing.assert_allclose(new["mean"], 0.9 * stats["mean"] + 0.1 * mean, rtol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * stats["var"] + 0.1 * var * n / (n - 1),
                             rtol=1e-6)
  assert new["num_batches_tracked"].dtype == jnp.int32 and int(new["num_batches_tracked"]) == 5
  # Eval mode: running statistics.
  y_eval = bn.apply({"params": params, "batch_stats": stats}, x, use_running_average=True)
  y_eval_ref = ((x64 - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * params["scale"]
                + params["bias"])
  np.testing.assert_allclose(np.asarray(y_eval).reshape(-1, 6), y_eval_ref, rtol=1e-5,
                             atol=1e-5)
  # Same outputs and mean as Flax's BatchNorm, but Flax keeps the biased variance.
  flax_bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5)
  flax_vars = {"params": params, "batch_stats": {"mean": stats["mean"], "var": stats["var"]}}
  y_flax, flax_updates = flax_bn.apply(flax_vars, x, use_running_average=False,
                                       mutable=["batch_stats"])
  np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new["mean"], flax_updates["batch_stats"]["mean"], rtol=1e-6)
  np.testing.assert_allclose(flax_updates["batch_stats"]["var"],
                             0.9 * stats["var"] + 0.1 * var, rtol=1e-6)


def test_batchnorm_bf16_keeps_float32_statistics_and_rejects_single_values():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 3, 4)) * 100 + 1000, jnp.bfloat16)
  bn = BatchNorm(dtype=jnp.bfloat16)
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16
  assert updates["batch_stats"]["var"].dtype == jnp.float32
  # Large offset, small spread: float32 statistics still normalise to ~unit variance.
  np.testing.assert_allclose(np.asarray(y, np.float32).reshape(-1, 4).std(0), 1.0, atol=0.05)
  with pytest.raises(ValueError, match="more than 1 value per channel"):
    bn.apply(variables, x[:1, :1, :1], use_running_average=False, mutable=["batch_stats"])


def test_batchnorm_statistics_are_global_under_sharded_jit():
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip("needs several (fake) devices")
  mesh = sharding.make_mesh()
  x = np.random.default_rng(2).normal(size=(len(devices) * 2, 4, 4, 3)).astype(np.float32)
  x[: 2] += 5.0  # make per-device statistics differ from the global ones
  bn = BatchNorm()
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  step = jax.jit(lambda v, x: bn.apply(v, x, use_running_average=False, mutable=["batch_stats"]))
  y_ref, stats_ref = step(variables, x)
  x_sharded = jax.device_put(x, sharding.batch_sharded(mesh))
  y, stats = step(variables, x_sharded)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats["batch_stats"]["var"], stats_ref["batch_stats"]["var"],
                             rtol=1e-5)


@pytest.mark.parametrize("name, params, running_floats", [
    ("drn_d_22", 15_880_752, 11_776),
    ("drn_d_38", 25_988_912, 19_200),
    ("drn_d_54", 35_296_176, 55_168),
    ("drn_d_105", 54_288_304, 107_392),
])
def test_parameter_counts_of_full_size_variants(name, params, running_floats):
  model = drn_lib.make_encoder(name)
  shapes = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
  assert sum(leaf.size for leaf in jax.tree.leaves(shapes["params"])) == params
  running = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(shapes["batch_stats"])
             if path[-1].key in ("mean", "var")]
  assert sum(leaf.size for leaf in running) == running_floats
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("height, width", [(64, 96), (37, 50), (9, 17), (8, 8), (1, 3)])
@pytest.mark.parametrize("name", ["drn_d_22", "drn_d_54"])
def test_output_stride_8_rounds_up(name, height, width):
  model = drn_lib.make_encoder(name, (4, 8, 4, 6, 8, 10, 12, 16))
  x = jax.ShapeDtypeStruct((2, height, width, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  stages = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, return_stages=True), variables, x)
  expansion = drn_lib.BLOCK_EXPANSION[model.block]
  h, w = height, width
  for k in range(9):
    if k in (2, 3, 4):
      h, w = -(-h // 2), -(-w // 2)
    widths = [4, 4, 8, 4 * expansion, 6 * expansion, 8 * expansion, 10 * expansion, 12, 16]
    assert stages[f"layer{k}"].shape == (2, h, w, widths[k]), k
  assert (h, w) == (-(-height // 8), -(-width // 8))


def test_odd_input_forward_and_symmetric_stride2_padding():
  model = drn_lib.make_encoder("drn_d_22", TINY_CHANNELS)
  x = np.random.default_rng(3).normal(size=(1, 19, 27, 3)).astype(np.float32)
  variables = jax.jit(lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False))(x)
  out = model.apply(variables, x, train=False)
  assert out.shape == (1, 3, 4, 32) and bool(jnp.isfinite(out).all())

  # Even height: perturbing input row 10 changes layer1 rows 6..14 (7x7 stem + 3x3 conv). The
  # stride-2 3x3 conv of layer2 with symmetric padding 1 reads rows 2i-1..2i+1, so exactly
  # layer2 rows 3..7 change; 'SAME' padding (0, 1) would read 2i..2i+2 and also change row 2.
  x = np.random.default_rng(4).normal(size=(1, 32, 12, 3)).astype(np.float32)
  x_perturbed = x.copy()
  x_perturbed[:, 10] += 1.0
  layer2 = model.apply(variables, np.concatenate([x, x_perturbed]), train=False,
                       return_stages=True)["layer2"]  # eval mode: batch entries independent
  changed_rows = np.nonzero(np.abs(np.asarray(layer2[1] - layer2[0])).max(axis=(1, 2)) > 0)[0]
  assert changed_rows.tolist() == [3, 4, 5, 6, 7]


def test_init_is_he_fan_out_normal_and_bn_identity():
  model = drn_lib.make_encoder("drn_d_22")
  variables = jax.jit(lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False))(
      jnp.zeros((1, 8, 8, 3)))
  kernel = np.asarray(variables["params"]["layer6"]["0"]["conv2"]["kernel"])
  assert kernel.shape == (3, 3, 512, 512)
  std = np.sqrt(2.0 / (3 * 3 * 512))
  assert abs(kernel.std() / std - 1) < 0.01 and abs(kernel.mean()) < 0.01 * std
  assert np.abs(kernel).max() > 4 * std  # untruncated normal
  stem = np.asarray(variables["params"]["layer0"]["0"]["kernel"])
  assert stem.shape == (7, 7, 3, 16)
  np.testing.assert_allclose(stem.std(), np.sqrt(2.0 / (7 * 7 * 16)), rtol=0.1)
  bn = variables["params"]["layer3"]["0"]["bn1"]
  np.testing.assert_array_equal(bn["scale"], np.ones(64))
  np.testing.assert_array_equal(bn["bias"], np.zeros(64))
