"""Building blocks shared by the encoder and the heads (Flax Linen, NHWC).

* `BatchNorm`: BatchNorm with PyTorch semantics, so that ImageNet DRN checkpoints and the reference
  training dynamics carry over (Flax's `nn.BatchNorm` stores the *biased* batch variance).
* `BilinearUpsample`: the reference's frozen depthwise bilinear ConvTranspose2d (x8, computed as
  two small matmuls), or a plain bilinear resize.
"""

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
    f = self.factor
    _, h, w, channels = x.shape
    out_h, out_w = out_size if out_size is not None else (f * h, f * w)
    if not (0 < out_h <= f * h and 0 < out_w <= f * w):
      raise ValueError(
          f"out_size {out_size} must lie within the x{f} upsampled size {(f * h, f * w)}")
    if self.mode == "transposed":
      rows = jnp.asarray(bilinear_upsample_matrix(h, f, out_h), x.dtype)
      cols = jnp.asarray(bilinear_upsample_matrix(w, f, out_w), x.dtype)
      # Entries are multiples of 1/(2f), exact in bf16 too; only float32+ needs HIGHEST to
      # avoid TF32 rounding on GPUs.
      precision = (lax.Precision.HIGHEST if jnp.finfo(x.dtype).bits >= 32
                   else lax.Precision.DEFAULT)
      y = jnp.einsum("oh,bhwc->bowc", rows, x, precision=precision)
      return jnp.einsum("pw,bowc->bopc", cols, y, precision=precision)
    if self.mode == "resize":
      y = jax.image.resize(x, (x.shape[0], f * h, f * w, channels), method="bilinear")
      return y[:, :out_h, :out_w, :]
    raise ValueError(f"unknown upsampling mode {self.mode!r}; use 'transposed' or 'resize'")
