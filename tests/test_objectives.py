"""The semi-supervised objectives: losses against float64 NumPy, gradients, jit, and the step.

Covers weak-to-strong consistency (pseudo-labels, confidence masking, the EMA teacher),
the information-maximisation alignment, the supervised prototype loss, EMA prototypes, the
diagnostics, and that alignment="reference" still computes the reference's entropy terms.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import build_train_step, synthetic_batch, tiny_synthetic_config
from usss_jax import losses
from usss_jax.objectives import consistency
from usss_jax.label_embeddings import ema

NAMES, CLASSES, HW = ("a", "b"), (3, 4), (16, 24)


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _rng_logits(seed, shape):
  return np.random.default_rng(seed).normal(scale=2.0, size=shape).astype(np.float32)


def test_pseudo_labels_are_argmax_and_max_probability():
  logits = _rng_logits(0, (2, 5, 6, 4))
  labels, conf = losses.pseudo_labels(jnp.asarray(logits))
  p = _softmax(logits)
  np.testing.assert_array_equal(labels, p.argmax(-1))
  np.testing.assert_allclose(conf, p.max(-1), rtol=1e-6)
  assert labels.dtype == jnp.int32


def _numpy_consistency(logits, labels, conf, threshold, valid):
  logp = np.log(_softmax(logits))
  nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  return float(np.sum(nll * (conf >= threshold) * valid) / max(valid.sum(), 1))


@pytest.mark.parametrize("threshold", [0.0, 0.6, 1.01])
def test_consistency_cross_entropy_matches_numpy(threshold):
  logits = _rng_logits(1, (2, 5, 6, 4))
  labels = np.random.default_rng(2).integers(0, 4, (2, 5, 6)).astype(np.int32)
  conf = np.random.default_rng(3).random((2, 5, 6)).astype(np.float32)
  valid = np.random.default_rng(4).random((2, 5, 6)) > 0.2
  got = losses.consistency_cross_entropy(jnp.asarray(logits), labels, conf, threshold=threshold,
                                         valid=valid)
  want = _numpy_consistency(logits, labels, conf, threshold, valid)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-7)
  if threshold > 1:
    assert float(got) == 0.0  # nothing confident: no loss
  # The gradient is the softmax minus the one-hot, on confident valid pixels only.
  g = jax.jit(jax.grad(lambda x: losses.consistency_cross_entropy(
      x, labels, conf, threshold=threshold, valid=valid)))(jnp.asarray(logits))
  onehot = np.eye(4)[labels]
  weight = ((conf >= threshold) * valid / max(valid.sum(), 1))[..., None]
  np.testing.assert_allclose(g, (_softmax(logits) - onehot) * weight, atol=1e-6)


def _numpy_im(scores, mask=None, prior=None):
  """float64: E[H(p)] over the masked pixels; the batch mean E[p] over *every* pixel."""
  p = _softmax(scores).reshape(-1, scores.shape[-1])
  m = np.ones(len(p), bool) if mask is None else np.asarray(mask).reshape(-1)
  h = -np.sum(p * np.log(p), -1)
  mean_h = h[m].mean()
  pbar = p.mean(0)
  marginal = -np.sum(pbar * np.log(pbar))
  if prior is None:
    return mean_h - marginal, mean_h, marginal
  return mean_h + np.sum(pbar * np.log(pbar / prior)), mean_h, marginal


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_prior", [False, True])
def test_information_maximization_matches_numpy_and_its_gradient(masked, with_prior):
  scores = _rng_logits(5, (2, 4, 5, 6))
  mask = (np.random.default_rng(6).random((2, 4, 5)) > 0.3) if masked else None
  prior = np.array([0.4, 0.3, 0.1, 0.1, 0.05, 0.05]) if with_prior else None
  got = losses.information_maximization(jnp.asarray(scores), mask, prior)
  want = _numpy_im(scores, mask, prior)
  np.testing.assert_allclose([float(v) for v in got], want, rtol=1e-5)
  fn = jax.jit(lambda s: losses.information_maximization(s, mask, prior)[0])
  g = np.asarray(jax.grad(fn)(jnp.asarray(scores)), np.float64)
  # Central finite differences on a few coordinates (float64 reference of the loss).
  for idx in [(0, 0, 0, 0), (1, 3, 4, 5), (0, 2, 1, 3)]:
    e = np.zeros_like(scores, np.float64)
    e[idx] = 1e-4
    num = (_numpy_im(scores + e, mask, prior)[0] - _numpy_im(scores - e, mask, prior)[0]) / 2e-4
    np.testing.assert_allclose(g[idx], num, rtol=2e-3, atol=1e-6)


def test_the_confidence_mask_leaves_the_batch_mean_over_every_pixel():
  """The bug of issue 17: the mask (alignment_threshold) also restricted H(E[p])."""
  scores = np.zeros((1, 1, 2, 2), np.float32)
  scores[0, 0, 0] = [8.0, 0.0]   # confident, class 0
  scores[0, 0, 1] = [0.0, 0.1]   # unconfident, leaning to class 1
  confident = np.array([[[True, False]]])
  _, _, diversity = losses.information_maximization(jnp.asarray(scores), confident)
  pbar = _softmax(scores).reshape(-1, 2).mean(0)  # both pixels
  np.testing.assert_allclose(float(diversity), -np.sum(pbar * np.log(pbar)), rtol=1e-5)
  assert float(diversity) > 0.5  # the confident pixel alone would give ~0.003


def test_information_maximization_prefers_confident_and_diverse_over_collapse():
  onehots = 10.0 * np.eye(4)[np.arange(16) % 4].reshape(1, 4, 4, 4)
  collapsed = 10.0 * np.eye(4)[np.zeros(16, int)].reshape(1, 4, 4, 4)
  uniform = np.zeros((1, 4, 4, 4))
  im = lambda s: [float(v) for v in losses.information_maximization(jnp.asarray(s, jnp.float32))]
  # Entropy minimisation alone cannot tell confident-and-diverse from collapsed (both ~0)...
  np.testing.assert_allclose(im(onehots)[1], im(collapsed)[1], atol=1e-3)
  # ...IM can: both the collapsed and the uniform assignment score 0, the good one -log M.
  np.testing.assert_allclose([im(collapsed)[0], im(uniform)[0]], [0.0, 0.0], atol=1e-3)
  np.testing.assert_allclose(im(onehots)[0], -np.log(4), atol=3e-3)  # logits 10, not inf


def test_ema_teacher_ramps_its_decay_and_copies_integers():
  teacher = {"params": {"w": jnp.ones(3)}, "batch_stats": {"n": jnp.asarray(2, jnp.int32),
                                                          "mean": jnp.zeros(3)}}
  student = jnp.full(3, 3.0)
  fixed = consistency.ConsistencyOptions(ema_decay=0.99)
  ramped = consistency.ConsistencyOptions(ema_decay=0.999, ema_decay_start=0.99,
                                          ema_decay_rampup=1000)
  for step in (0, 5, 500, 1000, 3000):
    d = min(0.99, (step + 1) / (step + 10))
    np.testing.assert_allclose(consistency.teacher_decay(jnp.asarray(step), fixed), d,
                               rtol=1e-6)
    # 0.99 -> 0.999 linearly over 1000 steps, still capped by the early ramp.
    d_ramped = min(0.99 + 0.009 * min(step / 1000, 1.0), (step + 1) / (step + 10))
    np.testing.assert_allclose(consistency.teacher_decay(jnp.asarray(step), ramped), d_ramped,
                               rtol=1e-6)
    out = consistency.ema_teacher(teacher, {"w": student},
                                  {"n": jnp.asarray(7, jnp.int32), "mean": jnp.ones(3)},
                                  consistency.teacher_decay(jnp.asarray(step), fixed))
    np.testing.assert_allclose(out["params"]["w"], d * 1.0 + (1 - d) * 3.0, rtol=1e-6)
    np.testing.assert_allclose(out["batch_stats"]["mean"], 1 - d, rtol=1e-5)
    assert int(out["batch_stats"]["n"]) == 7


# ---------------------------------------------------------------------------- the step

def _batch(seed=0, b=8):
  return synthetic_batch(NAMES, CLASSES, HW, seed, b)


def _build(method, **overrides):
  config = tiny_synthetic_config(NAMES, HW, method, **overrides)
  embs = [np.random.default_rng(i).normal(size=(c, config.embedding_dim)).astype(np.float32)
          for i, c in enumerate(CLASSES)]
  model, spec, state, step = build_train_step(config, CLASSES, HW, embs, seed=0)
  return config, spec, model, state, jax.jit(step)


def test_consistency_loss_is_the_fixmatch_term_of_the_teacher_pseudo_labels():
  config, spec, model, state, step = _build("consistency", **{"consistency.threshold": 0.0})
  batch = _batch()
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  _, m = step(jax.tree.map(jnp.copy, state), batch)
  # Recompute domain a's term by hand, as the step does it: the labeled forward first (its
  # BN statistics), then the teacher's train-mode forward on the weak view, then the strong.
  _, upd = model.apply(variables, batch["a"]["labeled"]["image"], train=True, head=0,
                       mutable=["batch_stats"])
  v = {"params": state["params"], "batch_stats": upd["batch_stats"]}
  unl = batch["a"]["unlabeled"]
  teacher, upd = model.apply(v, unl["image"], train=True, head=0, mutable=["batch_stats"])
  labels, conf = losses.pseudo_labels(teacher["logits"])
  partner = np.roll(np.arange(8), -1)
  mix = lambda x: np.where(unl["cutmix_mask"].reshape(unl["cutmix_mask"].shape +
                                                      (1,) * (np.ndim(x) - 3)),
                           np.asarray(x)[partner], np.asarray(x))
  strong = mix(unl["strong"])
  out, _ = model.apply({"params": state["params"], "batch_stats": upd["batch_stats"]}, strong,
                       train=True, head=0, mutable=["batch_stats"])
  want = _numpy_consistency(np.asarray(out["logits"]), mix(labels), mix(conf), 0.0,
                            mix(unl["valid"]))
  np.testing.assert_allclose(float(m["consistency/a"]), want, rtol=2e-4)
  assert float(m["confident_fraction/a"]) == 1.0
  # Threshold 1.01: no pseudo-label is confident enough, the term vanishes.
  _, _, _, state2, step2 = _build("consistency", **{"consistency.threshold": 1.0})
  _, m2 = step2(state2, batch)
  assert float(m2["confident_fraction/a"]) < 1.0


def test_ema_teacher_state_follows_the_student():
  _, spec, _, state, step = _build("consistency", **{"consistency.teacher": "ema"})
  assert "teacher" in state
  new, m = step(jax.tree.map(jnp.copy, state), _batch())
  d = min(0.99, 1 / 10)
  k_new = np.asarray(new["params"]["head_0"]["kernel"])
  k_old = np.asarray(state["params"]["head_0"]["kernel"])
  np.testing.assert_allclose(new["teacher"]["params"]["head_0"]["kernel"],
                             d * k_old + (1 - d) * k_new, rtol=1e-5, atol=1e-7)
  assert np.isfinite(float(m["consistency/a"]))


def test_universal_infomax_terms_prototype_loss_and_diagnostics():
  overrides = {"alignment": "infomax", "temperature": 0.1, "prototype_loss_weight": 0.5,
               "label_embeddings.ema_theta": 0.9}
  _, spec, model, state, step = _build("universal", **overrides)
  new, m = step(jax.tree.map(jnp.copy, state), _batch())
  for name in NAMES:
    for key in ("embedding_norm", "within_entropy", "cross_entropy", "diversity",
                "prototype_confident_fraction", "confident_fraction", "prototype_accuracy",
                "prototype_head_agreement", "prototype", "consistency", "within", "cross"):
      assert np.isfinite(float(m[f"{key}/{name}"])), f"{key}/{name}"
    # IM = E[H] - H(E[p]); diversity is at most log(classes).
    np.testing.assert_allclose(float(m[f"within/{name}"]),
                               float(m[f"within_entropy/{name}"]) - float(m[f"diversity/{name}"]),
                               rtol=1e-5, atol=1e-6)
    assert 0 <= float(m[f"diversity/{name}"]) <= np.log(CLASSES[NAMES.index(name)]) + 1e-5
  sup = float(m["supervised/a"]) + float(m["supervised/b"])
  want = (sup + float(m["cross/a"]) + float(m["cross/b"]) + float(m["within/a"]) +
          float(m["within/b"]) + float(m["consistency/a"]) + float(m["consistency/b"]) +
          0.5 * (float(m["prototype/a"]) + float(m["prototype/b"])))
  np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
  # EMA prototypes moved towards the labeled pixels' embeddings (and only the classes seen).
  moved = [not np.allclose(a, b) for a, b in zip(new["label_embeddings"],
                                                 state["label_embeddings"])]
  assert all(moved)


def test_ema_prototypes_are_the_cell_centre_class_means():
  _, spec, model, state, step = _build("full", **{"label_embeddings.ema_theta": 0.5})
  batch = _batch()
  new, _ = step(jax.tree.map(jnp.copy, state), batch)
  out = model.apply({"params": state["params"], "batch_stats": state["batch_stats"]},
                    batch["a"]["labeled"]["image"], train=True, head=0, embedding=True,
                    upsample_embedding=False, mutable=["batch_stats"])[0]
  labels = batch["a"]["labeled"]["label"][:, 4::8, 4::8]  # 16x24 -> 2x3 cell centres
  want = ema.ema_update_centroids(state["label_embeddings"][0], out["embedding"],
                                  np.where(labels == 255, 0, labels), labels != 255, 0.5)
  np.testing.assert_allclose(new["label_embeddings"][0], want, rtol=1e-5, atol=1e-6)


def test_reference_alignment_is_the_entropy_of_the_upsampled_embedding():
  """alignment="reference": the step's terms are the loss functions (checked against the
  reference fixtures in test_losses) on the full-resolution pixel embedding."""
  config, spec, model, state, step = _build("full", alpha=1.0, beta=1.0)
  assert spec.options["alignment"].alignment == "reference"
  batch = _batch()
  _, m = step(jax.tree.map(jnp.copy, state), batch)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  _, upd = model.apply(variables, batch["a"]["labeled"]["image"], train=True, head=0,
                       embedding=True, mutable=["batch_stats"])
  emb = model.apply({"params": state["params"], "batch_stats": upd["batch_stats"]},
                    batch["a"]["unlabeled"]["image"], train=True, head=0, logits=False,
                    embedding=True, mutable=["batch_stats"])[0]["embedding"]
  embs = state["label_embeddings"]
  np.testing.assert_allclose(float(m["within/a"]),
                             float(losses.within_domain_entropy(emb, embs, 0)), rtol=1e-5)
  np.testing.assert_allclose(float(m["cross/a"]),
                             float(losses.cross_domain_entropy(emb, embs, 0)), rtol=1e-5)
