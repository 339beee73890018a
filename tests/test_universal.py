"""Frozen bilinear upsampler and the universal (multi-domain) segmenter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY as TINY_CHANNELS, rel_err
from usss_jax.models.layers import (BilinearUpsample, bilinear_upsample_kernel,
                                    bilinear_upsample_matrix, transposed_conv_upsample)
from usss_jax.models.universal import UniversalSegmenter



@pytest.fixture(autouse=True)
def full_float32_precision():
  """Parity needs true float32 convs/matmuls (GPUs would otherwise use TF32); no-op on CPU."""
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="module")
def upsample_fixture(fixtures_dir):
  with np.load(fixtures_dir / "usss_upsample.npz", allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def test_kernel_matches_reference(upsample_fixture):
  kernel = bilinear_upsample_kernel(8)
  np.testing.assert_array_equal(kernel, upsample_fixture["kernel"])
  np.testing.assert_array_equal(kernel[7], 15 / 16 * upsample_fixture["kernel_1d"])
  np.testing.assert_array_equal(upsample_fixture["weight_torch"][2, 0], kernel)


def test_transposed_upsampler_matches_reference(upsample_fixture):
  up = BilinearUpsample(factor=8, mode="transposed")
  assert up.init(jax.random.key(0), upsample_fixture["x_nhwc"]) == {}  # no variables
  y = up.apply({}, upsample_fixture["x_nhwc"])
  assert y.shape == (2, 56, 72, 5)
  assert rel_err(y, upsample_fixture["y_nhwc"]) <= 1e-6
  ones = up.apply({}, jnp.ones((1, 3, 4, 1)))[0, :, :, 0]
  np.testing.assert_array_equal(ones, upsample_fixture["ones_in_3x4_out"])
  np.testing.assert_array_equal(ones[12, :5], [0.5625, 0.6875, 0.8125, 0.9375, 1.0])
  with jax.enable_x64(True):
    y64 = up.apply({}, upsample_fixture["x_nhwc"].astype(np.float64))
    assert y64.dtype == jnp.float64
    assert rel_err(y64, upsample_fixture["y_f64"].transpose(0, 2, 3, 1)) <= 1e-12


def test_matmul_form_equals_the_literal_transposed_convolution(upsample_fixture):
  x = upsample_fixture["x_nhwc"]
  conv = transposed_conv_upsample(x, 8)
  assert rel_err(conv, upsample_fixture["y_nhwc"]) <= 1e-6
  module = BilinearUpsample(mode="transposed")
  np.testing.assert_allclose(module.apply({}, x), conv, rtol=0, atol=1e-6)
  np.testing.assert_allclose(module.apply({}, x, out_size=(50, 67)), conv[:, :50, :67],
                             rtol=0, atol=1e-6)
  # Rows of the 1-D operator: interior rows sum to 1 (interpolation), edge rows are attenuated.
  matrix = bilinear_upsample_matrix(7, 8)
  np.testing.assert_array_equal(matrix.sum(1)[:5], [0.5625, 0.6875, 0.8125, 0.9375, 1.0])
  np.testing.assert_array_equal(matrix.sum(1)[4:-4], 1.0)
  with pytest.raises(ValueError, match="even factor"):
    bilinear_upsample_matrix(7, 3)


def test_resize_mode_is_plain_bilinear_and_differs_only_at_the_border(upsample_fixture):
  x = upsample_fixture["x_nhwc"]
  interp = upsample_fixture["interp_bilinear_halfpixel"].transpose(0, 2, 3, 1)
  resized = BilinearUpsample(mode="resize").apply({}, x)
  transposed = BilinearUpsample(mode="transposed").apply({}, x)
  scale = np.abs(interp).max()
  assert np.abs(resized - interp)[:, 4:-4, 4:-4].max() <= 1e-6 * scale
  assert np.abs(resized - interp).max() <= 1e-6 * scale  # jax.image.resize clamps like torch
  # The reference upsampler is bilinear in the interior and attenuated on the 4-pixel border.
  assert np.abs(transposed - resized)[:, 4:-4, 4:-4].max() <= 1e-6 * scale
  assert np.abs(transposed - resized).max() > 0.1 * scale


@pytest.mark.parametrize("mode", ["transposed", "resize"])
def test_out_size_crops_bottom_right(mode):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 4, 2)), jnp.float32)
  up = BilinearUpsample(mode=mode)
  full = up.apply({}, x)
  cropped = up.apply({}, x, out_size=(19, 27))
  assert cropped.shape == (1, 19, 27, 2)
  np.testing.assert_array_equal(cropped, full[:, :19, :27])
  with pytest.raises(ValueError, match="out_size"):
    up.apply({}, x, out_size=(25, 8))
  with pytest.raises(ValueError, match="mode"):
    BilinearUpsample(mode="nearest").apply({}, x)


def _abstract_init(model: UniversalSegmenter, shape, **kwargs):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False, **kwargs), x)


@pytest.mark.parametrize("num_classes", [(7,), (5, 3), (19, 26, 11)])
def test_output_shapes_for_any_number_of_domains(num_classes):
  model = UniversalSegmenter(encoder_channels=TINY_CHANNELS, num_classes=num_classes,
                             embedding_dim=6)
  shape = (2, 21, 30, 3)  # not a multiple of 8
  variables = _abstract_init(model, shape, head=0)
  heads = sorted(k for k in variables["params"] if k.startswith("head_"))
  assert heads == [f"head_{d}" for d in range(len(num_classes))]
  for d, c in enumerate(num_classes):
    assert variables["params"][f"head_{d}"]["kernel"].shape == (1, 1, 32, c)
  assert variables["params"]["embedding"]["kernel"].shape == (1, 1, 32, 6)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  for d, c in enumerate(num_classes):
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, head=d), variables, x)
    assert set(out) == {"logits"} and out["logits"].shape == (2, 21, 30, c)
  out = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, embedding=True, features=True), variables, x)
  assert tuple(o.shape for o in out["logits"]) == tuple((2, 21, 30, c) for c in num_classes)
  assert out["embedding"].shape == (2, 21, 30, 6)
  assert out["features"].shape == (2, 3, 4, 32)


def test_full_size_parameter_count_matches_reference_net():
  """Reference Net, DRN-D-22, CS+IDD with 20/27 logits (incl. ignore), em_dim 100: 15,956,163
  optimised parameters. Without the ignore logits the heads lose 2 * (512 + 1)."""
  model = UniversalSegmenter(encoder="drn_d_22", num_classes=(19, 26), embedding_dim=100)
  variables = _abstract_init(model, (1, 16, 16, 3))
  n_params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
  assert n_params == 15_956_163 - 2 * 513
  assert set(variables["params"]) == {"encoder", "head_0", "head_1", "embedding"}
  assert set(variables["batch_stats"]) == {"encoder"}


@pytest.fixture(scope="module")
def two_domain_model():
  model = UniversalSegmenter(encoder_channels=TINY_CHANNELS, num_classes=(5, 3), embedding_dim=6)
  x = np.random.default_rng(1).normal(size=(2, 21, 30, 3)).astype(np.float32)
  # init only asks for head 0, yet every head and the embedding conv must exist afterwards.
  variables = jax.jit(
      lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False, head=0))(x)
  return model, variables, x


def test_heads_and_embedding_are_wired_to_the_encoder_features(two_domain_model):
  model, variables, x = two_domain_model
  assert {"head_0", "head_1", "embedding", "encoder"} == set(variables["params"])
  out = model.apply(variables, x, train=False, logits=True, embedding=True, features=True)
  feats = np.asarray(out["features"], np.float64)
  assert feats.shape == (2, 3, 4, 32)
  up = BilinearUpsample(mode="transposed")
  for name, got in [("head_0", out["logits"][0]), ("head_1", out["logits"][1]),
                    ("embedding", out["embedding"])]:
    p = variables["params"][name]
    manual = np.einsum("bhwc,cd->bhwd", feats, np.asarray(p["kernel"][0, 0], np.float64))
    manual = manual + np.asarray(p["bias"], np.float64)
    manual = up.apply({}, manual.astype(np.float32), out_size=(21, 30))
    assert got.shape == manual.shape == (2, 21, 30, p["bias"].shape[0])
    assert rel_err(got, manual) <= 1e-5, name
  # Selecting a domain returns that head only, identical to the all-heads output.
  single = model.apply(variables, x, train=False, head=1)
  assert set(single) == {"logits"}
  np.testing.assert_allclose(single["logits"], out["logits"][1], rtol=1e-6, atol=1e-6)
  # logits=False: only what was asked for.
  only_embedding = model.apply(variables, x, train=False, logits=False, embedding=True)
  assert set(only_embedding) == {"embedding"}


def test_train_mode_updates_encoder_batch_stats(two_domain_model):
  model, variables, x = two_domain_model
  out, updates = model.apply(variables, x, train=True, head=0, embedding=True,
                             mutable=["batch_stats"])
  assert out["logits"].shape == (2, 21, 30, 5) and out["embedding"].shape == (2, 21, 30, 6)
  counters = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(updates)
              if path[-1].key == "num_batches_tracked"]
  assert len(counters) == 25 and all(int(c) == 1 for c in counters)
  with pytest.raises(Exception, match="batch_stats"):  # train mode needs a mutable collection
    model.apply(variables, x, train=True, head=0)


def test_bfloat16_compute_is_finite_and_close(two_domain_model):
  model, variables, x = two_domain_model
  model_bf16 = model.clone(dtype=jnp.bfloat16)
  ref = model.apply(variables, x, train=False, head=1, embedding=True)
  out = model_bf16.apply(variables, x, train=False, head=1, embedding=True)
  for key in ("logits", "embedding"):
    assert out[key].dtype == jnp.bfloat16
    assert bool(jnp.isfinite(out[key]).all())
    assert rel_err(out[key], ref[key]) < 0.1, key
  _, updates = model_bf16.apply(variables, x, train=True, head=0, mutable=["batch_stats"])
  assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree.leaves(updates))


def test_invalid_requests_raise(two_domain_model):
  model, variables, x = two_domain_model
  with pytest.raises(ValueError, match="head 2 out of range"):
    model.apply(variables, x, train=False, head=2)
  no_embedding = UniversalSegmenter(encoder_channels=TINY_CHANNELS, num_classes=(5, 3),
                                    embedding_dim=0)
  shapes = _abstract_init(no_embedding, (1, 8, 8, 3))
  assert "embedding" not in shapes["params"]
  with pytest.raises(ValueError, match="embedding_dim is 0"):
    jax.eval_shape(lambda v: no_embedding.apply(v, jnp.zeros((1, 8, 8, 3)), train=False,
                                                embedding=True), shapes)
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    model.apply(variables, x[..., :2], train=False)


@pytest.mark.parametrize("head_init", ["reference", "torch_default"])
def test_head_init(head_init):
  model = UniversalSegmenter(encoder_channels=TINY_CHANNELS, num_classes=(48,),
                             embedding_dim=64, head_init=head_init)
  x = jnp.zeros((1, 8, 8, 3))
  params = jax.jit(lambda x: model.init(jax.random.key(1, impl="rbg"), x, train=False))(
      x)["params"]
  for name, out_features in [("head_0", 48), ("embedding", 64)]:
    kernel = np.asarray(params[name]["kernel"])
    bias = np.asarray(params[name]["bias"])
    if head_init == "reference":  # N(0, 2 / out), bias 0
      np.testing.assert_allclose(kernel.std(), np.sqrt(2 / out_features), rtol=0.1)
      np.testing.assert_array_equal(bias, 0)
    else:  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 32
      bound = 1 / np.sqrt(32)
      for values in (kernel, bias):
        assert np.abs(values).max() <= bound and np.abs(values).max() > 0.8 * bound
      np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.1)
