"""Loss functions vs the reference fixtures, float64 NumPy and finite differences."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from usss_jax import losses


# ---------------------------------------------------------------- NumPy float64 references

def np_log_softmax(s, axis=-1):
  s = s - s.max(axis=axis, keepdims=True)
  return s - np.log(np.exp(s).sum(axis=axis, keepdims=True))


def np_entropy_to(x, emb, temperature=1.0, normalize_pixels=False):
  """x [B,H,W,D], emb [M,D] -> mean per-pixel entropy (float64)."""
  x = np.asarray(x, np.float64)
  emb = np.asarray(emb, np.float64)
  emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  if normalize_pixels:
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  s = np.einsum("bhwd,md->bhwm", x, emb) / temperature
  lp = np_log_softmax(s)
  return float(np.mean(-(np.exp(lp) * lp).sum(-1)))


def np_cross_entropy(logits, labels, ignore):
  lp = np_log_softmax(np.asarray(logits, np.float64))
  valid = labels != ignore
  nll = -np.take_along_axis(lp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  return float(nll[valid].mean())


# ---------------------------------------------------------------- reference fixtures

@pytest.fixture(scope="module")
def entropy_fixture(fixtures_dir):
  return np.load(fixtures_dir / "usss_entropy.npz")


@pytest.fixture(scope="module")
def ce_fixture(fixtures_dir):
  return np.load(fixtures_dir / "usss_ce.npz")


def _reference_pair(z, domain):
  """The reference drops the last ("None") row of each embedding matrix."""
  embs = [jnp.asarray(z["label_emb_A"][:-1]), jnp.asarray(z["label_emb_B"][:-1])]
  return embs, {"A": 0, "B": 1}[domain]


@pytest.mark.parametrize("domain", ["A", "B"])
def test_entropy_matches_reference(entropy_fixture, domain):
  z = entropy_fixture
  x = jnp.asarray(z["x_nhwc"])
  embs, d = _reference_pair(z, domain)
  within = losses.within_domain_entropy(x, embs, d)
  cross = losses.cross_domain_entropy(x, embs, d)
  np.testing.assert_allclose(within, z[f"within_{domain}"], atol=1e-5)
  np.testing.assert_allclose(cross, z[f"cross_{domain}"], atol=1e-5)
  # alpha weights cross, beta weights within: (2, 3) catches swapped weights.
  total = losses.total_loss([], [cross], [within], alpha=2.0, beta=3.0)
  np.testing.assert_allclose(total, z[f"total_a2b3_{domain}"], atol=1e-5)


@pytest.mark.parametrize("domain", ["A", "B"])
def test_entropy_gradient_matches_reference(entropy_fixture, domain):
  z = entropy_fixture
  embs, d = _reference_pair(z, domain)

  def total(x):
    return losses.total_loss([], [losses.cross_domain_entropy(x, embs, d)],
                             [losses.within_domain_entropy(x, embs, d)], alpha=1.0, beta=1.0)

  value, grad = jax.value_and_grad(total)(jnp.asarray(z["x_nhwc"]))
  np.testing.assert_allclose(value, z[f"total_{domain}"], atol=1e-5)
  ref = z[f"grad_total_{domain}_nhwc"]
  assert np.max(np.abs(grad - ref)) <= 1e-5 * np.max(np.abs(ref))


def test_entropy_float64_matches_reference_f64(entropy_fixture):
  z = entropy_fixture
  with jax.enable_x64(True):
    x = jnp.asarray(z["x_nhwc"], jnp.float64)
    embs = [jnp.asarray(z["label_emb_A"][:-1], jnp.float64),
            jnp.asarray(z["label_emb_B"][:-1], jnp.float64)]
    # The loss computes in float32 by design; the float64 NumPy model checks the maths tightly.
    for d, name in enumerate("AB"):
      within_np = np_entropy_to(np.asarray(x), np.asarray(embs[d]))
      cross_np = np_entropy_to(np.asarray(x), np.asarray(embs[1 - d]))
      np.testing.assert_allclose(within_np, z[f"within_{name}_f64"], rtol=0, atol=1e-12)
      np.testing.assert_allclose(cross_np, z[f"cross_{name}_f64"], rtol=0, atol=1e-12)


def test_cross_entropy_matches_reference(ce_fixture):
  z = ce_fixture
  cfg = json.loads(str(z["config_json"]))
  ignore = cfg["ignore_index"]
  logits = jnp.asarray(z["logits_nhwc"])
  labels = jnp.asarray(z["labels"])
  value, grad = jax.value_and_grad(
      lambda l: losses.pixel_cross_entropy(l, labels, ignore_label=ignore))(logits)
  np.testing.assert_allclose(value, z["ce"], atol=1e-5)
  ref = z["grad_nhwc"]
  assert np.max(np.abs(grad - ref)) <= 1e-5 * np.max(np.abs(ref))
  # Ignored pixels get exactly zero gradient; valid count as in the reference.
  ignored = np.asarray(labels) == ignore
  assert int((~ignored).sum()) == int(z["n_valid"])
  assert np.all(np.asarray(grad)[ignored] == 0)
  np.testing.assert_allclose(np_cross_entropy(z["logits_nhwc"], z["labels"], ignore),
                             z["ce_f64"], atol=1e-12)


def test_cross_entropy_all_ignored_is_zero_not_nan(ce_fixture):
  # The reference returns NaN (0/0); ours is defined: 0 with zero gradient.
  assert np.isnan(ce_fixture["ce_all_ignored"])
  logits = jnp.asarray(ce_fixture["logits_nhwc"])
  labels = jnp.full(logits.shape[:-1], 255, jnp.int32)
  value, grad = jax.value_and_grad(lambda l: losses.pixel_cross_entropy(l, labels))(logits)
  assert float(value) == 0.0
  assert np.all(np.asarray(grad) == 0)


# ---------------------------------------------------------------- self-contained checks

def _random_problem(seed=0, b=2, h=5, w=6, d=7, m=(4, 3, 5)):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, h, w, d)).astype(np.float32) * 2
  embs = [rng.normal(size=(mi, d)).astype(np.float32) for mi in m]
  return x, embs


@pytest.mark.parametrize("temperature,normalize_pixels", [(1.0, False), (0.5, False), (0.1, True)])
def test_entropy_vs_float64_numpy_three_domains(temperature, normalize_pixels):
  x, embs = _random_problem()
  kw = dict(temperature=temperature, normalize_pixels=normalize_pixels)
  for d in range(3):
    within = losses.within_domain_entropy(jnp.asarray(x), [jnp.asarray(e) for e in embs], d, **kw)
    cross = losses.cross_domain_entropy(jnp.asarray(x), [jnp.asarray(e) for e in embs], d, **kw)
    np.testing.assert_allclose(within, np_entropy_to(x, embs[d], **kw), rtol=1e-5)
    others = [np_entropy_to(x, embs[k], **kw) for k in range(3) if k != d]
    np.testing.assert_allclose(cross, np.mean(others), rtol=1e-5)


def test_cross_entropy_vs_numpy_with_255():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 4, 5, 6)).astype(np.float32) * 3
  labels = rng.integers(0, 6, size=(3, 4, 5))
  labels[rng.random(labels.shape) < 0.3] = 255
  ours = losses.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(ours, np_cross_entropy(logits, labels, 255), rtol=1e-6)


def test_single_domain_cross_entropy_is_zero():
  x, embs = _random_problem(m=(4,))
  assert float(losses.cross_domain_entropy(jnp.asarray(x), [jnp.asarray(embs[0])], 0)) == 0.0


def test_entropy_bounds():
  rng = np.random.default_rng(2)
  for scale in (0.0, 1.0, 100.0):
    s = jnp.asarray(rng.normal(size=(64, 9)) * scale, jnp.float32)
    h = np.asarray(losses.softmax_entropy(s))
    assert np.all(h >= -1e-6) and np.all(h <= np.log(9) + 1e-5)
    assert np.all(np.isfinite(h))
  # Uniform scores give exactly log M; one-hot-like scores give ~0.
  np.testing.assert_allclose(losses.softmax_entropy(jnp.zeros((9,))), np.log(9), rtol=1e-6)
  assert float(losses.softmax_entropy(jnp.array([1e4, 0.0, 0.0]))) < 1e-6


def test_gradients_match_finite_differences():
  x, embs = _random_problem(seed=3, b=1, h=2, w=3, d=4, m=(3, 2))
  labels = np.array([[[0, 1, 255], [2, 0, 1]]])
  logits = np.random.default_rng(4).normal(size=(1, 2, 3, 3))
  with jax.enable_x64(True):
    embs64 = [jnp.asarray(e, jnp.float64) for e in embs]

    def entropy_fn(v):
      return losses.total_loss([], [losses.cross_domain_entropy(v, embs64, 0)],
                               [losses.within_domain_entropy(v, embs64, 0)], alpha=0.7, beta=1.3)

    def ce_fn(v):
      return losses.pixel_cross_entropy(v, jnp.asarray(labels))

    for fn, v0 in ((entropy_fn, np.asarray(x, np.float64)), (ce_fn, logits),
                   (losses.decoder_softmax_entropy, logits)):
      # The losses cast to float32 internally; check the analytic gradient against central
      # differences with a step large enough for float32 rounding.
      g = np.asarray(jax.grad(fn)(jnp.asarray(v0)))
      eps = 1e-2
      num = np.zeros_like(v0)
      for idx in np.ndindex(v0.shape):
        vp, vm = v0.copy(), v0.copy()
        vp[idx] += eps
        vm[idx] -= eps
        num[idx] = (float(fn(jnp.asarray(vp))) - float(fn(jnp.asarray(vm)))) / (2 * eps)
      np.testing.assert_allclose(g, num, atol=2e-3, rtol=2e-2)


def test_every_loss_jits_and_differentiates():
  x, embs = _random_problem()
  embs = [jnp.asarray(e) for e in embs]
  logits = jnp.asarray(np.random.default_rng(5).normal(size=(2, 5, 6, 4)), jnp.float32)
  labels = jnp.asarray(np.random.default_rng(6).integers(0, 4, size=(2, 5, 6)))
  fns = {
      "ce": lambda v: losses.pixel_cross_entropy(v, labels),
      "ser": losses.decoder_softmax_entropy,
  }
  for name, fn in fns.items():
    v, g = jax.jit(jax.value_and_grad(fn))(logits)
    assert np.isfinite(float(v)) and np.all(np.isfinite(g)), name
  for fn in (losses.within_domain_entropy, losses.cross_domain_entropy):
    v, g = jax.jit(jax.value_and_grad(lambda p: fn(p, embs, 1)))(jnp.asarray(x))
    assert np.isfinite(float(v)) and float(jnp.abs(g).sum()) > 0


def test_prototypes_per_class():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(1, 3, 3, 5)).astype(np.float32)
  protos = rng.normal(size=(4 * 2, 5)).astype(np.float32)  # C=4, K=2
  s = np.asarray(losses.label_similarity(jnp.asarray(x), jnp.asarray(protos)))
  grouped = s.reshape(1, 3, 3, 4, 2)
  np.testing.assert_allclose(losses.reduce_prototypes(jnp.asarray(s), 2, "max"), grouped.max(-1))
  lse = np.log(np.exp(grouped).sum(-1))
  np.testing.assert_allclose(losses.reduce_prototypes(jnp.asarray(s), 2, "logsumexp"), lse,
                             rtol=1e-5)
  # "none" = softmax over all C*K rows, as the reference does with its embedding file.
  h = losses.label_embedding_entropy(jnp.asarray(x), jnp.asarray(protos), embeddings_per_class=2)
  np.testing.assert_allclose(h, np_entropy_to(x, protos), rtol=1e-5)
  h_max = losses.label_embedding_entropy(jnp.asarray(x), jnp.asarray(protos),
                                         embeddings_per_class=2, prototype_reduction="max")
  lp = np_log_softmax(grouped.max(-1).astype(np.float64))
  np.testing.assert_allclose(h_max, np.mean(-(np.exp(lp) * lp).sum(-1)), rtol=1e-5)
  with pytest.raises(ValueError, match="prototype reduction"):
    losses.reduce_prototypes(jnp.asarray(s), 2, "mean")


def test_mask_restricts_pixels():
  x, embs = _random_problem(m=(4,))
  mask = np.zeros(x.shape[:-1], bool)
  mask[0, :2] = True
  h = losses.label_embedding_entropy(jnp.asarray(x), jnp.asarray(embs[0]), mask=jnp.asarray(mask))
  np.testing.assert_allclose(h, np_entropy_to(x[:1, :2], embs[0]), rtol=1e-5)


def test_total_loss_composition():
  sup, cross, within = [1.0, 2.0], [0.5, 0.25], [0.1, 0.2]
  got = losses.total_loss([jnp.float32(v) for v in sup], [jnp.float32(v) for v in cross],
                          [jnp.float32(v) for v in within], alpha=2.0, beta=10.0)
  np.testing.assert_allclose(got, 3.0 + 2.0 * 0.75 + 10.0 * 0.3, rtol=1e-6)
  assert float(losses.total_loss([jnp.float32(1.5)], [], [], alpha=1.0, beta=1.0)) == 1.5
