"""Building blocks shared by the encoder and the heads (Flax Linen, NHWC).

* `BatchNorm`: BatchNorm with PyTorch semantics, so that ImageNet DRN checkpoints and the reference
  training dynamics carry over (Flax's `nn.BatchNorm` stores the *biased* batch variance).
* `Conv2d`: a bias-free convolution (PyTorch-style explicit padding) whose kernel gradient can be
  computed as one matrix product per kernel tap, which XLA:CPU runs up to 9x faster than its own
  weight-gradient convolution for wide layers.
* `BilinearUpsample`: the reference's frozen depthwise bilinear ConvTranspose2d (x8, computed as
  two small matmuls), or a plain bilinear resize.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Dtype = Any


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, with `torch.nn.BatchNorm2d` semantics.

  Train mode normalises with the batch mean and the *biased* batch variance, and updates
  `running = (1 - momentum) * running + momentum * batch` with the *unbiased* variance
  (factor n / (n - 1)), plus an int32 `num_batches_tracked` counter, exactly like PyTorch.
  Eval mode uses the running statistics. Statistics are computed in float32 (or float64 under
  x64 with float64 inputs) whatever the compute dtype.

  Under `jax.jit` with a batch-sharded input the reductions are global, i.e. SyncBN semantics
  (XLA inserts the cross-device reduction).

  Variables: params `scale` [C] (init 1), `bias` [C] (init 0); batch_stats `mean` [C] (init 0),
  `var` [C] (init 1), `num_batches_tracked` [] int32 (init 0).

  Attributes:
    momentum: PyTorch convention (weight of the *new* batch statistic), i.e. Flax momentum 0.9
      equals 0.1 here.
    epsilon: added to the variance before the square root.
    dtype: output dtype; None keeps the input's dtype.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    """x: [..., C] -> [..., C]."""
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    num_batches = self.variable(
        "batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)

    stats_dtype = jnp.promote_types(x.dtype, jnp.float32)
    x_stats = x.astype(stats_dtype)
    if use_running_average:
      mean = running_mean.value.astype(stats_dtype)
      var = running_var.value.astype(stats_dtype)
    else:
      reduce_axes = tuple(range(x.ndim - 1))
      count = math.prod(x.shape[:-1])
      if count < 2:
        # PyTorch refuses this too: the unbiased variance of one value is undefined.
        raise ValueError(
            f"BatchNorm in train mode needs more than 1 value per channel, got input shape "
            f"{x.shape}")
      mean = jnp.mean(x_stats, axis=reduce_axes)
      # Two-pass variance: E[(x - mean)^2] is more accurate than E[x^2] - mean^2 in float32.
      var = jnp.mean(jnp.square(x_stats - mean), axis=reduce_axes)
      if not self.is_initializing():
        unbiased_var = var * (count / (count - 1))
        m = self.momentum
        running_mean.value = ((1 - m) * running_mean.value + m * mean).astype(jnp.float32)
        running_var.value = ((1 - m) * running_var.value + m * unbiased_var).astype(jnp.float32)
        num_batches.value = num_batches.value + 1

    multiplier = scale.astype(stats_dtype) * lax.rsqrt(var + self.epsilon)
    y = (x_stats - mean) * multiplier + bias.astype(stats_dtype)
    return y.astype(self.dtype or x.dtype)


WEIGHT_GRADS = ("auto", "xla", "taps")
UPSAMPLE_MODES = ("transposed", "resize")
# From this many input x output channels on, the per-tap matmuls beat XLA:CPU's own
# weight-gradient convolution (2-core AVX2 VM, 3x3 conv, batch 4 at 32x64: 512x512 channels
# 4.4 s vs 0.5 s, 256x256 285 vs 162 ms); for narrow layers they lose inside a whole network
# (tiny DRN-D-22 encoder fwd+bwd 92 -> 138 ms with every layer on taps). docs/BENCHMARKS.md.
_TAPS_MIN_CHANNEL_PRODUCT = 256 * 256


def _conv_forward(x, kernel, stride: int, dilation: int, padding: int):
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((padding, padding),) * 2,
      rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d_tap_grad(x: jax.Array, kernel: jax.Array, stride: int, dilation: int,
                    padding: int) -> jax.Array:
  """`lax.conv_general_dilated` (NHWC, HWIO, symmetric padding) with a per-tap kernel gradient.

  The forward and the input gradient are XLA's convolutions; the kernel gradient is, for each
  of the kh x kw taps, `x_tap^T @ dy` contracted over batch and output pixels, where `x_tap` is
  the strided slice of the padded input that the tap sees. Same maths as the convolution
  (different summation order).

  Args:
    x: [B, H, W, Cin].
    kernel: [kh, kw, Cin, Cout].
    stride, dilation, padding: static ints, the same for both spatial axes.
  Returns:
    [B, Ho, Wo, Cout] with Ho = (H + 2 padding - dilation (kh - 1) - 1) // stride + 1.
  """
  return _conv_forward(x, kernel, stride, dilation, padding)


def _conv2d_fwd(x, kernel, stride, dilation, padding):
  return _conv_forward(x, kernel, stride, dilation, padding), (x, kernel)


def _conv2d_bwd(stride, dilation, padding, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda v: _conv_forward(v, kernel, stride, dilation, padding), x)
  (dx,) = input_vjp(dy)
  # The shifted copies below depend only on the forward's input, so XLA's scheduler is free to
  # make them early, during the forward pass, and then every tap layer's copies are live at
  # once (default train step: +1.8 GiB planned memory). Tying x to dy makes them wait until the
  # backward reaches this layer: the plan drops back to XLA's own weight gradient's.
  x, dy = lax.optimization_barrier((x, dy))
  kh, kw = kernel.shape[:2]
  batch, out_h, out_w, _ = dy.shape
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  accumulate = jnp.promote_types(x.dtype, jnp.float32)  # float32 for bf16, float64 stays
  taps = []
  for i in range(kh):
    for j in range(kw):
      start = (0, i * dilation, j * dilation, 0)
      limit = (batch, i * dilation + stride * (out_h - 1) + 1,
               j * dilation + stride * (out_w - 1) + 1, x.shape[-1])
      x_tap = lax.slice(xp, start, limit, (1, stride, stride, 1))
      taps.append(lax.dot_general(x_tap, dy, (((0, 1, 2), (0, 1, 2)), ((), ())),
                                  preferred_element_type=accumulate))
  dkernel = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
  return dx, dkernel


conv2d_tap_grad.defvjp(_conv2d_fwd, _conv2d_bwd)


def use_tap_weight_grad(weight_grad: str, in_features: int, out_features: int) -> bool:
  """Whether `Conv2d` takes the per-tap kernel gradient ("auto": on CPU, for wide layers)."""
  if weight_grad not in WEIGHT_GRADS:
    raise ValueError(f"unknown weight_grad {weight_grad!r}; use one of {WEIGHT_GRADS}")
  if weight_grad != "auto":
    return weight_grad == "taps"
  return (jax.default_backend() == "cpu" and
          in_features * out_features >= _TAPS_MIN_CHANNEL_PRODUCT)


class Conv2d(nn.Module):
  """Bias-free square convolution with PyTorch-style symmetric padding `dilation * (k - 1) / 2`.

  Parameter `kernel` [k, k, Cin, features] (HWIO), like `nn.Conv`, so checkpoints and the
  PyTorch converter see the same tree.

  Attributes:
    features: output channels.
    kernel_size: k.
    stride, dilation: the same for both spatial axes.
    dtype: compute dtype (the kernel is stored in float32 and cast).
    kernel_init: initializer of the kernel.
    weight_grad: "xla" (XLA's weight-gradient convolution), "taps" (`conv2d_tap_grad`) or
      "auto" (taps on CPU when Cin * Cout >= 256 * 256).
  """
  features: int
  kernel_size: int
  stride: int = 1
  dilation: int = 1
  dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  weight_grad: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, Ho, Wo, features]."""
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    padding = self.dilation * (k - 1) // 2
    if use_tap_weight_grad(self.weight_grad, x.shape[-1], self.features):
      return conv2d_tap_grad(x, kernel, self.stride, self.dilation, padding)
    return _conv_forward(x, kernel, self.stride, self.dilation, padding)


def _bilinear_taps(factor: int) -> np.ndarray:
  """1-D taps of `bilinear_upsample_kernel`: [2 * factor]."""
  size = 2 * factor
  f = math.ceil(size / 2)
  center = (2 * f - 1 - f % 2) / (2.0 * f)
  return 1.0 - np.abs(np.arange(size) / f - center)


def bilinear_upsample_kernel(factor: int) -> np.ndarray:
  """The reference `fill_up_weights` kernel for upsampling by `factor`.

  Returns:
    [2 * factor, 2 * factor] float64, the outer product of the 1-D tent
    `1 - |i / factor - c|` with `c = (2 * factor - 1 - factor % 2) / (2 * factor)`; for factor 8
    the 1-D taps are (1, 3, 5, ..., 15, 15, ..., 3, 1) / 16.
  """
  if factor < 1:
    raise ValueError(f"upsampling factor must be >= 1, got {factor}")
  taps = _bilinear_taps(factor)
  return np.outer(taps, taps)


def bilinear_upsample_matrix(n: int, factor: int, out_len: int | None = None) -> np.ndarray:
  """1-D form of the reference transposed conv (kernel 2f, stride f, padding f/2) as a matrix.

  Input pixel i stamps the taps at outputs f*i - f/2 ... f*i + 3f/2 - 1; outputs outside
  [0, f*n) are dropped, which is what attenuates the border.

  Returns:
    [out_len or f*n, n] float64 with `y = A @ x` along one axis (rows past out_len cropped).
  """
  if factor < 2 or factor % 2:
    raise ValueError(f"transposed bilinear upsampling needs an even factor >= 2, got {factor}")
  taps = _bilinear_taps(factor)
  matrix = np.zeros((factor * n, n))
  for i in range(n):
    start = factor * i - factor // 2
    for t, tap in enumerate(taps):
      if 0 <= start + t < factor * n:
        matrix[start + t, i] = tap
  return matrix[:out_len] if out_len is not None else matrix


def transposed_conv_upsample(x: jax.Array, factor: int = 8) -> jax.Array:
  """The reference upsampler written literally as an input-dilated depthwise convolution.

  Kept as an independent formulation for tests; `BilinearUpsample` computes the same linear map
  with two small matmuls instead, which on an H100 is 40-200x faster (this lhs-dilated
  16x16 depthwise conv took 25 ms for [8, 64, 128, 20] and 550 ms for 128 channels, float32).

  Args:
    x: [B, h, w, C].

  Returns:
    [B, f*h, f*w, C].
  """
  channels = x.shape[-1]
  kernel = bilinear_upsample_kernel(factor)
  # HWIO depthwise kernel: I = 1 per group, O = C groups. The kernel is symmetric, so the
  # spatial flip that turns a transposed conv into a dilated conv is a no-op.
  rhs = jnp.broadcast_to(jnp.asarray(kernel, x.dtype)[:, :, None, None],
                         (2 * factor, 2 * factor, 1, channels))
  pad = 2 * factor - 1 - factor // 2
  return lax.conv_general_dilated(
      x, rhs, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
      lhs_dilation=(factor, factor), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=channels)


class BilinearUpsample(nn.Module):
  """Frozen x`factor` bilinear upsampling of NHWC maps (no parameters).

  mode="transposed" reproduces the reference's depthwise `ConvTranspose2d(C, C, 2f, stride=f,
  padding=f/2, groups=C, bias=False)` with bilinear weights: in the interior it is bilinear
  interpolation with half-pixel centres, but the outer f/2 output rows/columns are attenuated
  (the transposed conv sees zeros beyond the border; a constant 1 becomes 0.5625 at the edge for
  f=8). The kernel is separable, so the operator is `A_h X A_w^T` with constant [f*h, h] and
  [f*w, w] matrices (`bilinear_upsample_matrix`); two einsums compute it far faster on GPU than
  the equivalent input-dilated convolution (`transposed_conv_upsample`), and the crop to
  `out_size` is folded into the matrices. Float32 inputs use full-precision matmuls (no TF32),
  so the result matches the reference to float32 rounding on GPUs too.

  mode="resize" is `jax.image.resize(..., "bilinear")` to f x the size (edge clamping, no
  attenuation).

  Attributes:
    factor: integer upsampling factor (8 in USSS; must be even in "transposed" mode).
    mode: "transposed" (reference-exact) or "resize".
  """
  factor: int = 8
  mode: str = "transposed"

  @nn.compact
  def __call__(self, x: jax.Array, out_size: tuple[int, int] | None = None) -> jax.Array:
    """Upsamples x.

    Args:
      x: [B, h, w, C].
      out_size: optional (H, W) with H <= f*h and W <= f*w. The f*h x f*w result is cropped at
        the bottom/right. This matches inputs whose size is not a multiple of f: the stride-2
        convolutions of the encoder (symmetric padding) keep the top-left pixel aligned and round
        up, so f*h covers the input plus some extra rows at the bottom. Both modes crop (rather
        than resizing to exactly (H, W)) so that feature pixels keep their f-pixel footprint.

    Returns:
      [B, f*h, f*w, C], or [B, H, W, C] with `out_size`.
    """
    return upsample_bilinear(x, self.factor, self.mode, out_size)


def upsample_bilinear(x: jax.Array, factor: int = 8, mode: str = "transposed",
                      out_size: tuple[int, int] | None = None) -> jax.Array:
  """`BilinearUpsample` as a plain function: [B, h, w, C] -> [B, f*h, f*w, C] or out_size."""
  f = factor
  _, h, w, channels = x.shape
  out_h, out_w = out_size if out_size is not None else (f * h, f * w)
  if not (0 < out_h <= f * h and 0 < out_w <= f * w):
    raise ValueError(
        f"out_size {out_size} must lie within the x{f} upsampled size {(f * h, f * w)}")
  if mode == "transposed":
    rows = jnp.asarray(bilinear_upsample_matrix(h, f, out_h), x.dtype)
    cols = jnp.asarray(bilinear_upsample_matrix(w, f, out_w), x.dtype)
    # Entries are multiples of 1/(2f), exact in bf16 too; only float32+ needs HIGHEST to
    # avoid TF32 rounding on GPUs.
    precision = (lax.Precision.HIGHEST if jnp.finfo(x.dtype).bits >= 32
                 else lax.Precision.DEFAULT)
    y = jnp.einsum("oh,bhwc->bowc", rows, x, precision=precision)
    return jnp.einsum("pw,bowc->bopc", cols, y, precision=precision)
  if mode == "resize":
    y = jax.image.resize(x, (x.shape[0], f * h, f * w, channels), method="bilinear")
    return y[:, :out_h, :out_w, :]
  raise ValueError(f"unknown upsampling mode {mode!r}; use one of {UPSAMPLE_MODES}")

