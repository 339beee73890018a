"""Confusion matrix and IoU vs the reference iouEval fixture and NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from usss_jax import metrics, sharding


@pytest.fixture(scope="module")
def iou_fixture(fixtures_dir):
  return np.load(fixtures_dir / "usss_iou.npz")


def test_reference_and_standard_miou(iou_fixture):
  z = iou_fixture
  n_classes = int(z["n_classes"]) - 1  # the reference counts its ignore class
  ignore = int(z["ignore_index"])
  cm = np.asarray(metrics.confusion_matrix(jnp.asarray(z["pred"]), jnp.asarray(z["label"]),
                                           n_classes, ignore_label=ignore))
  tp = np.diag(cm[:, :n_classes])
  np.testing.assert_array_equal(tp, z["tp"])
  np.testing.assert_array_equal(cm.sum(1) - tp, z["fn"])
  np.testing.assert_array_equal(cm[:, :n_classes].sum(0) - tp, z["fp"])
  iou, miou = metrics.iou_from_confusion(cm, absent="zero")
  np.testing.assert_allclose(iou, z["iou_ref"], atol=1e-12)
  np.testing.assert_allclose(miou, z["miou_ref"], atol=1e-12)
  iou, miou = metrics.iou_from_confusion(cm, absent="nan")
  np.testing.assert_allclose(iou, z["iou_nanaware"], atol=1e-12)  # NaN positions must agree too
  np.testing.assert_allclose(miou, z["miou_nanaware"], atol=1e-12)


def test_confusion_matrix_vs_numpy_and_jit():
  rng = np.random.default_rng(0)
  c = 7
  label = rng.integers(0, c, size=(4, 9, 11))
  label[rng.random(label.shape) < 0.2] = 255
  pred = rng.integers(0, c, size=label.shape)
  ref = np.zeros((c, c + 1), np.int64)
  for g, p in zip(label.ravel(), pred.ravel()):
    if g != 255:
      ref[g, p] += 1
  confusion = jax.jit(metrics.confusion_matrix, static_argnums=2)
  got = confusion(jnp.asarray(pred), jnp.asarray(label), c)
  np.testing.assert_array_equal(got, ref)
  assert got.sum() == (label != 255).sum()
  acc = metrics.pixel_accuracy(got)
  np.testing.assert_allclose(acc, (pred == label)[label != 255].mean())


def test_confusion_matrix_on_sharded_batch():
  mesh = sharding.make_mesh()
  n = len(jax.devices())
  rng = np.random.default_rng(1)
  label = rng.integers(0, 5, size=(n, 6, 6))
  pred = rng.integers(0, 5, size=(n, 6, 6))
  sh = NamedSharding(mesh, P("data"))
  got = jax.jit(metrics.confusion_matrix, static_argnums=2)(
      jax.device_put(pred, sh), jax.device_put(label, sh), 5)
  want = metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), 5)
  np.testing.assert_array_equal(got, want)


def test_perfect_prediction_and_bad_args():
  label = jnp.array([[0, 1], [2, 255]])
  iou, miou = metrics.iou_from_confusion(metrics.confusion_matrix(label, label, 4))
  np.testing.assert_array_equal(iou[:3], 1.0)
  assert np.isnan(iou[3]) and miou == 1.0
  _, miou_ref = metrics.iou_from_confusion(metrics.confusion_matrix(label, label, 4), absent="zero")
  assert miou_ref == pytest.approx(0.75)
  with pytest.raises(ValueError, match="shape"):
    metrics.confusion_matrix(label, label[0], 4)
  with pytest.raises(ValueError, match="absent"):
    metrics.iou_from_confusion(np.zeros((2, 3)), absent="drop")
