"""The USSS universal segmentation model: shared DRN-D encoder, one head per domain, entropy module.

Structure (as the reference `Net`, `usss/drnet.py`):

  x [B, H, W, 3] -> encoder (DRN-D, output stride 8) -> f [B, ceil(H/8), ceil(W/8), 512]
  head_d:    1x1 conv with bias f -> C_d logits, then the frozen bilinear x8 upsampler
  embedding: 1x1 conv with bias f -> D pixel embeddings, then the same upsampler

Outputs are cropped to the input size, so any H, W works (the reference needs multiples of 8).

No extra "ignore" logit: the reference heads have C_d + 1 channels, the last one standing for the
void/ignore label. Here void pixels (label 255) are simply excluded from the cross entropy, so
that channel would never be a target; in the reference it only received gradient through the
softmax normaliser (which pushes it down), and at evaluation argmax could still predict "void",
which then counts as a miss. Heads therefore have exactly `num_classes[d]` channels.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from usss_jax.models import drn as drn_lib
from usss_jax.models.layers import BilinearUpsample, upsample_bilinear

Dtype = Any
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config.dtype


def _torch_default_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """torch Conv2d default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / fan_in ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _pointwise_conv(features: int, in_features: int, head_init: str, dtype: Dtype,
                    name: str) -> nn.Conv:
  """1x1 conv with bias, initialised like the reference heads or like torch's default."""
  if head_init == "reference":
    # usss/drnet.py: weight ~ N(0, 2 / out_channels), bias 0.
    kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    bias_init = nn.initializers.zeros
  elif head_init == "torch_default":
    # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
    kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    bias_init = _torch_default_bias_init(in_features)
  else:
    raise ValueError(f"unknown head_init {head_init!r}; use 'reference' or 'torch_default'")
  return nn.Conv(features, (1, 1), use_bias=True, dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=kernel_init, bias_init=bias_init, name=name)


class UniversalSegmenter(nn.Module):
  """Shared encoder + per-domain 1x1 heads + entropy (pixel embedding) module.

  Variables: `params/encoder/...` and `batch_stats/encoder/...` (the DRN, see `models.drn`),
  `params/head_0`, `params/head_1`, ... (one per domain), `params/embedding` (if
  embedding_dim > 0). `init` creates all of them whatever the call flags, so one variables tree
  serves every call. The upsampler is a constant (no variables), so it is never trained.

  Attributes:
    encoder: DRN-D variant, a key of `models.drn.ENCODERS`.
    encoder_channels: optional 8 encoder widths overriding the standard ones (tiny test models).
    num_classes: number of classes of each domain (>= 1 domain), without any ignore class.
    embedding_dim: pixel-embedding size D of the entropy module; 0 = no entropy module.
    upsample: "transposed" (the reference's frozen bilinear ConvTranspose, attenuated 4-pixel
      border) or "resize" (`jax.image.resize` bilinear).
    head_init: "reference" (N(0, 2/C_out) weights, zero bias: what the USSS code does to its heads
      and embedding conv) or "torch_default" (torch Conv2d default init).
    dtype: compute dtype (params stay float32; BN statistics in float32). Outputs come back in
      this dtype; cast logits to float32 in the loss.
    bn_momentum: PyTorch-convention BN momentum of the encoder.
    conv_weight_grad: how the encoder's convolutions compute kernel gradients
      ("auto" | "xla" | "taps", see `layers.Conv2d`).
  """
  encoder: str = "drn_d_22"
  encoder_channels: tuple[int, ...] | None = None
  num_classes: tuple[int, ...] = (19,)
  embedding_dim: int = 128
  upsample: str = "transposed"
  head_init: str = "reference"
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.1
  conv_weight_grad: str = "auto"

  def upsample_scores(self, scores: jax.Array, out_size: tuple[int, int]) -> jax.Array:
    """The model's frozen x8 upsampler on any [B, h, w, M] map, cropped to `out_size`."""
    return upsample_bilinear(scores, drn_lib.OUTPUT_STRIDE, self.upsample, out_size)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, head: int | None = None,
               logits: bool = True, embedding: bool = False,
               features: bool = False, upsample_embedding: bool = True) -> dict[str, Any]:
    """Runs the encoder and the requested heads.

    Args:
      x: [B, H, W, 3] images.
      train: BN in train mode (batch statistics; `batch_stats` must be mutable) or eval mode.
      head: index of the domain head to run; None runs every head.
      logits: return segmentation logits.
      embedding: return pixel embeddings (needs embedding_dim > 0).
      features: return the encoder output.
      upsample_embedding: return the pixel embedding at the input resolution (True) or at the
        encoder's (False; scores against label embeddings can then be computed there and
        upsampled, which is the same for dot products since the upsampler is linear).

    Returns:
      dict with, as requested,
        "logits": [B, H, W, num_classes[head]], or a tuple over all domains when head is None;
        "embedding": [B, H, W, embedding_dim] ([B, ceil(H/8), ceil(W/8), embedding_dim] without
          upsample_embedding);
        "features": [B, ceil(H/8), ceil(W/8), encoder_channels[-1]].
    """
    num_domains = len(self.num_classes)
    if num_domains < 1:
      raise ValueError("UniversalSegmenter needs at least one domain in num_classes")
    if head is not None and not 0 <= head < num_domains:
      raise ValueError(f"head {head} out of range for {num_domains} domain(s)")
    if embedding and self.embedding_dim <= 0:
      raise ValueError("embedding requested but embedding_dim is 0 (no entropy module)")
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected images [B, H, W, 3], got shape {x.shape}")

    out_size = (x.shape[1], x.shape[2])
    encoder = drn_lib.make_encoder(self.encoder, self.encoder_channels, dtype=self.dtype,
                                   bn_momentum=self.bn_momentum, module_name="encoder",
                                   weight_grad=self.conv_weight_grad)
    feats = encoder(x, train)
    in_features = feats.shape[-1]
    upsampler = BilinearUpsample(factor=drn_lib.OUTPUT_STRIDE, mode=self.upsample)
    heads = [
        _pointwise_conv(c, in_features, self.head_init, self.dtype, f"head_{d}")
        for d, c in enumerate(self.num_classes)
    ]
    embed = (_pointwise_conv(self.embedding_dim, in_features, self.head_init, self.dtype,
                             "embedding") if self.embedding_dim > 0 else None)

    if self.is_initializing():
      # Create every head and the embedding conv, whatever the flags ask for.
      for h in heads:
        h(feats)
      if embed is not None:
        embed(feats)

    outputs: dict[str, Any] = {}
    if logits:
      if head is None:
        outputs["logits"] = tuple(upsampler(h(feats), out_size) for h in heads)
      else:
        outputs["logits"] = upsampler(heads[head](feats), out_size)
    if embedding:
      pixel_embedding = embed(feats)
      outputs["embedding"] = (upsampler(pixel_embedding, out_size) if upsample_embedding
                              else pixel_embedding)
    if features:
      outputs["features"] = feats
    return outputs
