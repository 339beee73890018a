"""DRN-D (dilated residual network, Yu et al. CVPR'17) encoder in Flax Linen, NHWC.

Same architecture as `fyu/drn` `DRN(..., arch='D')` without avgpool/fc, as used by USSS:

| stage  | op                                                        | stride | dilation |
|--------|-----------------------------------------------------------|--------|----------|
| layer0 | 7x7 conv 3->c0 (pad 3) + BN + ReLU                         | 1      | 1        |
| layer1 | layers[0] x (3x3 conv + BN + ReLU) -> c0                   | 1      | 1        |
| layer2 | layers[1] x (3x3 conv + BN + ReLU) -> c1, stride on first  | 2      | 1        |
| layer3 | layers[2] residual blocks, planes c2                       | 2      | 1        |
| layer4 | layers[3] residual blocks, planes c3                       | 2      | 1        |
| layer5 | layers[4] residual blocks, planes c4                       | 1      | 2        |
| layer6 | layers[5] residual blocks, planes c5                       | 1      | 4        |
| layer7 | layers[6] x (3x3 conv + BN + ReLU) -> c6, no residual      | 1      | 2        |
| layer8 | layers[7] x (3x3 conv + BN + ReLU) -> c7, no residual      | 1      | 1        |

Output stride 8; a stride-2 stage maps a size n to ceil(n / 2) (every conv pads symmetrically by
its dilation, 1x1 convs by 0 -- JAX's 'SAME' would pad (0, 1) for even sizes and shift the grid).

The module tree mirrors the PyTorch state-dict names so that checkpoint conversion is mechanical:
`layerK/<index>` for the `nn.Sequential` stages (conv at 3i, BN at 3i+1, index 3i+2 being the
parameter-free ReLU), `layerK/<block>/conv1|bn1|conv2|bn2[|conv3|bn3]` and
`layerK/<block>/downsample/0|1` for residual stages. See `usss_jax.convert`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from usss_jax.models.layers import BatchNorm, Conv2d

Dtype = Any

DEFAULT_CHANNELS = (16, 32, 64, 128, 256, 512, 512, 512)
# Every DRN-D maps an H x W image to ceil(H / 8) x ceil(W / 8) features: the one definition of
# the stride that the upsampler, the label-embedding statistics and the strong views rely on.
OUTPUT_STRIDE = 8

# Layer lists of the four DRN-D variants (fyu/drn drn_d_22/38/54/105).
ENCODERS: dict[str, dict[str, Any]] = {
    "drn_d_22": {"block": "basic", "layers": (1, 1, 2, 2, 2, 2, 1, 1)},
    "drn_d_38": {"block": "basic", "layers": (1, 1, 3, 4, 6, 3, 1, 1)},
    "drn_d_54": {"block": "bottleneck", "layers": (1, 1, 3, 4, 6, 3, 1, 1)},
    "drn_d_105": {"block": "bottleneck", "layers": (1, 1, 3, 4, 23, 3, 1, 1)},
}

BLOCK_EXPANSION = {"basic": 1, "bottleneck": 4}

# He (fan-out) normal init, as the reference: N(0, 2 / (kh * kw * out_channels)), untruncated.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, *, stride: int = 1, dilation: int = 1, dtype: Dtype,
          weight_grad: str, name: str) -> Conv2d:
  """Bias-free conv with PyTorch-style symmetric padding `dilation * (kernel - 1) / 2`."""
  return Conv2d(features, kernel, stride=stride, dilation=dilation, dtype=dtype,
                kernel_init=conv_init, weight_grad=weight_grad, name=name)


class _Block(nn.Module):
  """What residual blocks share: their attributes (see `ResidualStage`)."""
  planes: int
  stride: int = 1
  dilation: tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.1
  weight_grad: str = "auto"

  expansion = 1

  def _bn(self, name: str) -> BatchNorm:
    return BatchNorm(momentum=self.bn_momentum, dtype=self.dtype, name=name)


class BasicBlock(_Block):
  """3x3 conv (stride, dilation[0]) -> BN -> ReLU -> 3x3 conv (dilation[1]) -> BN, + shortcut."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, H/stride, W/stride, planes]."""
    bn = self._bn
    y = _conv(self.planes, 3, stride=self.stride, dilation=self.dilation[0], dtype=self.dtype,
              weight_grad=self.weight_grad, name="conv1")(x)
    y = nn.relu(bn("bn1")(y, use_running_average=not train))
    y = _conv(self.planes, 3, dilation=self.dilation[1], dtype=self.dtype,
              weight_grad=self.weight_grad, name="conv2")(y)
    y = bn("bn2")(y, use_running_average=not train)
    return nn.relu(y + _shortcut(self, x, train))


class Bottleneck(_Block):
  """1x1 -> BN -> ReLU -> 3x3 (stride, dilation[1]) -> BN -> ReLU -> 1x1 (x4) -> BN, + shortcut.

  As in fyu/drn the stride sits on the 3x3 conv and dilation[0] is unused.
  """

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, H/stride, W/stride, 4 * planes]."""
    bn = self._bn
    y = _conv(self.planes, 1, dtype=self.dtype, weight_grad=self.weight_grad, name="conv1")(x)
    y = nn.relu(bn("bn1")(y, use_running_average=not train))
    y = _conv(self.planes, 3, stride=self.stride, dilation=self.dilation[1], dtype=self.dtype,
              weight_grad=self.weight_grad, name="conv2")(y)
    y = nn.relu(bn("bn2")(y, use_running_average=not train))
    y = _conv(self.planes * self.expansion, 1, dtype=self.dtype, weight_grad=self.weight_grad,
              name="conv3")(y)
    y = bn("bn3")(y, use_running_average=not train)
    return nn.relu(y + _shortcut(self, x, train))


def _shortcut(block: _Block, x: jax.Array, train: bool) -> jax.Array:
  """Identity, or a strided 1x1 conv + BN projection iff the stride or the width changes."""
  out_features = block.planes * block.expansion
  if block.stride == 1 and x.shape[-1] == out_features:
    return x
  projection = _DownsampleProjection(out_features, block.stride, block.dtype, block.bn_momentum,
                                     block.weight_grad, parent=block, name="downsample")
  return projection(x, train)


class _DownsampleProjection(nn.Module):
  """torch `downsample = Sequential(conv1x1(stride), BN)`: children named "0" and "1"."""
  features: int
  stride: int
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.1
  weight_grad: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = _conv(self.features, 1, stride=self.stride, dtype=self.dtype,
              weight_grad=self.weight_grad, name="0")(x)
    return BatchNorm(momentum=self.bn_momentum, dtype=self.dtype, name="1")(
        y, use_running_average=not train)


class ConvStack(nn.Module):
  """`num_convs` x (conv -> BN -> ReLU), no residual; stride on the first conv only.

  Children are named like the torch `nn.Sequential` indices: conv i is "3i", its BN "3i+1".
  """
  features: int
  num_convs: int
  kernel: int = 3
  stride: int = 1
  dilation: int = 1
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.1
  weight_grad: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, H/stride, W/stride, features]."""
    for i in range(self.num_convs):
      x = _conv(self.features, self.kernel, stride=self.stride if i == 0 else 1,
                dilation=self.dilation, dtype=self.dtype, weight_grad=self.weight_grad,
                name=str(3 * i))(x)
      x = BatchNorm(momentum=self.bn_momentum, dtype=self.dtype, name=str(3 * i + 1))(
          x, use_running_average=not train)
      x = nn.relu(x)
    return x


class ResidualStage(nn.Module):
  """fyu/drn `_make_layer`: `num_blocks` blocks, children named "0", "1", ...

  The first block carries the stride; with dilation > 1 the first block uses
  (dilation // 2 if new_level else dilation, dilation), the others (dilation, dilation).
  """
  block: str
  planes: int
  num_blocks: int
  stride: int = 1
  dilation: int = 1
  new_level: bool = True
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.1
  weight_grad: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
    if self.dilation == 1:
      first_dilation = (1, 1)
    else:
      first_dilation = (self.dilation // 2 if self.new_level else self.dilation, self.dilation)
    for b in range(self.num_blocks):
      x = block_cls(
          planes=self.planes, stride=self.stride if b == 0 else 1,
          dilation=first_dilation if b == 0 else (self.dilation, self.dilation),
          dtype=self.dtype, bn_momentum=self.bn_momentum, weight_grad=self.weight_grad,
          name=str(b))(x, train)
    return x


class DRN(nn.Module):
  """DRN-D encoder (no avgpool / fc).

  Attributes:
    block: "basic" (BasicBlock, expansion 1) or "bottleneck" (expansion 4).
    layers: 8 ints: conv counts of layer1/layer2, block counts of layer3..layer6, conv counts of
      layer7/layer8.
    channels: 8 widths; layer0/1 -> channels[0], layer2 -> channels[1], residual stage K=3..6 has
      planes channels[K-1] (output planes * expansion), layer7 -> channels[6], layer8 ->
      channels[7].
    dtype: compute dtype (params stay float32; BN statistics are computed in float32).
    bn_momentum: PyTorch-convention BN momentum.
    weight_grad: how convolutions compute their kernel gradient (`layers.Conv2d`).
  """
  block: str = "basic"
  layers: tuple[int, ...] = ENCODERS["drn_d_22"]["layers"]
  channels: tuple[int, ...] = DEFAULT_CHANNELS
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.1
  weight_grad: str = "auto"

  @property
  def out_channels(self) -> int:
    return self.channels[-1]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               return_stages: bool = False) -> jax.Array | dict[str, jax.Array]:
    """Encodes an image batch.

    Args:
      x: [B, H, W, 3] (any H, W >= 1).
      train: BN in train mode (batch statistics, updates `batch_stats`, which must then be
        mutable) or eval mode (running statistics).
      return_stages: return every stage output instead of the last one.

    Returns:
      [B, ceil(H/8), ceil(W/8), channels[-1]], or with `return_stages` a dict "layer0".."layer8"
      of NHWC stage outputs.
    """
    if self.block not in BLOCK_EXPANSION:
      raise ValueError(f"unknown DRN block {self.block!r}; use 'basic' or 'bottleneck'")
    if len(self.layers) != 8 or len(self.channels) != 8:
      raise ValueError(f"DRN-D needs 8 layer counts and 8 channels, got layers={self.layers}, "
                       f"channels={self.channels}")
    c, n = self.channels, self.layers
    common = dict(dtype=self.dtype, bn_momentum=self.bn_momentum, weight_grad=self.weight_grad)
    stages = [
        ConvStack(c[0], 1, kernel=7, name="layer0", **common),
        ConvStack(c[0], n[0], name="layer1", **common),
        ConvStack(c[1], n[1], stride=2, name="layer2", **common),
        ResidualStage(self.block, c[2], n[2], stride=2, name="layer3", **common),
        ResidualStage(self.block, c[3], n[3], stride=2, name="layer4", **common),
        ResidualStage(self.block, c[4], n[4], dilation=2, new_level=False, name="layer5",
                      **common),
        ResidualStage(self.block, c[5], n[5], dilation=4, new_level=False, name="layer6",
                      **common),
        ConvStack(c[6], n[6], dilation=2, name="layer7", **common),
        ConvStack(c[7], n[7], dilation=1, name="layer8", **common),
    ]
    x = x.astype(self.dtype)
    outputs = {}
    for stage in stages:
      x = stage(x, train)
      outputs[stage.name] = x
    return outputs if return_stages else x


def make_encoder(name: str, channels: tuple[int, ...] | None = None,
                 dtype: Dtype = jnp.float32, bn_momentum: float = 0.1,
                 module_name: str | None = None, weight_grad: str = "auto") -> DRN:
  """DRN-D variant `name` (a key of ENCODERS), optionally with other widths (tiny test models).

  `module_name` names the module when it is created inside a parent's compact method.
  """
  if name not in ENCODERS:
    raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
  spec = ENCODERS[name]
  return DRN(block=spec["block"], layers=tuple(spec["layers"]),
             channels=tuple(channels) if channels is not None else DEFAULT_CHANNELS,
             dtype=dtype, bn_momentum=bn_momentum, weight_grad=weight_grad, name=module_name)
