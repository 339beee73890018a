"""`layers.conv2d_tap_grad`: the per-tap kernel gradient against a NumPy reference (float64) and
XLA's own gradient (float32), and its memory plan against XLA's weight-gradient convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_err
from usss_jax.models import layers

# (kernel, stride, dilation) as the DRN's convolutions use them (padding dilation * (k - 1) / 2):
# the 7x7 stem, strided 3x3 and 1x1 downsamples, 3x3 at dilation 1, 2 and 4.
DRN_CONVS = [(7, 1, 1), (3, 1, 1), (3, 2, 1), (1, 2, 1), (3, 1, 2), (3, 1, 4), (3, 2, 2)]


def numpy_conv_grads(x, kernel, dy, stride, dilation, padding):
  """Forward and kernel gradient of the convolution, straight from its definition:
  y[b, o, p, co] = sum_{i, j, ci} xp[b, s o + d i, s p + d j, ci] k[i, j, ci, co]."""
  kh, kw = kernel.shape[:2]
  _, out_h, out_w, _ = dy.shape
  xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  rows = stride * np.arange(out_h)[:, None] + dilation * np.arange(kh)[None, :]  # [o, i]
  cols = stride * np.arange(out_w)[:, None] + dilation * np.arange(kw)[None, :]  # [p, j]
  patches = xp[:, rows[:, :, None, None], cols[None, None, :, :], :]  # [b, o, i, p, j, ci]
  y = np.einsum("boipjc,ijcd->bopd", patches, kernel)
  dkernel = np.einsum("boipjc,bopd->ijcd", patches, dy)
  return y, dkernel


def tap_vjp(x, kernel, dy, stride, dilation, padding):
  y, vjp = jax.vjp(lambda a, k: layers.conv2d_tap_grad(a, k, stride, dilation, padding),
                   x, kernel)
  return (y, *vjp(dy))


def xla_vjp(x, kernel, dy, stride, dilation, padding):
  y, vjp = jax.vjp(lambda a, k: layers._conv_forward(a, k, stride, dilation, padding), x, kernel)
  return (y, *vjp(dy))


@pytest.mark.parametrize("k,stride,dilation", DRN_CONVS)
def test_float64_kernel_gradient_matches_numpy(k, stride, dilation):
  padding = dilation * (k - 1) // 2
  rng = np.random.default_rng(k * 100 + stride * 10 + dilation)
  x = rng.standard_normal((2, 11, 13, 3))
  kernel = rng.standard_normal((k, k, 3, 4))
  out_h = (11 + 2 * padding - dilation * (k - 1) - 1) // stride + 1
  out_w = (13 + 2 * padding - dilation * (k - 1) - 1) // stride + 1
  dy = rng.standard_normal((2, out_h, out_w, 4))
  ref_y, ref_dkernel = numpy_conv_grads(x, kernel, dy, stride, dilation, padding)
  with jax.enable_x64(True):
    y, dx, dkernel = jax.jit(tap_vjp, static_argnums=(3, 4, 5))(
        x, kernel, dy, stride, dilation, padding)
    _, xla_dx, _ = xla_vjp(x, kernel, dy, stride, dilation, padding)
    assert dkernel.dtype == jnp.float64 and dkernel.shape == kernel.shape
    assert rel_err(y, ref_y) <= 1e-12
    assert rel_err(dkernel, ref_dkernel) <= 1e-12
    assert rel_err(dx, xla_dx) <= 1e-12


@pytest.mark.parametrize("k,stride,dilation", [(3, 1, 4), (3, 2, 1), (1, 2, 1)])
def test_float32_gradients_match_xla(k, stride, dilation):
  padding = dilation * (k - 1) // 2
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  x = jax.random.normal(keys[0], (2, 16, 24, 32))
  kernel = jax.random.normal(keys[1], (k, k, 32, 48)) * 0.1

  def loss(fn, a, w):
    return jnp.sum(jnp.sin(fn(a, w, stride, dilation, padding)))

  got = jax.jit(jax.grad(lambda a, w: loss(layers.conv2d_tap_grad, a, w), (0, 1)))(x, kernel)
  ref = jax.jit(jax.grad(lambda a, w: loss(layers._conv_forward, a, w), (0, 1)))(x, kernel)
  assert rel_err(got[0], ref[0]) <= 1e-5
  assert rel_err(got[1], ref[1]) <= 1e-5


def _planned_temp_bytes(weight_grad: str) -> int:
  """Temporaries of a jitted gradient through a chain of wide dilated convolutions."""
  convs = [layers.Conv2d(64, 3, dilation=d, weight_grad=weight_grad) for d in (1, 2, 4, 2, 1)]
  x = jnp.zeros((2, 16, 32, 64))
  params = [c.init(jax.random.PRNGKey(i), x) for i, c in enumerate(convs)]

  def loss(params, x):
    for conv, p in zip(convs, params):
      x = jax.nn.relu(conv.apply(p, x))
    return jnp.sum(x * x)

  compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_tap_gradient_memory_plan_close_to_xla():
  """The taps' shifted copies are made when the backward reaches the layer (not hoisted into
  the forward pass, where all layers' copies would be live at once): issue 19 item 2."""
  taps, xla = _planned_temp_bytes("taps"), _planned_temp_bytes("xla")
  one_activation = 2 * 16 * 32 * 64 * 4
  assert taps <= xla + 9 * one_activation, (taps, xla)
