"""Tests of usss_jax.label_embeddings (stats, kmeans, store, the two-pass driver, ema).

Against float64 NumPy references.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import logs_warning
from usss_jax.label_embeddings import compute_label_embeddings, ema, kmeans, stats, store


def _canonical(components):
  """Reference sign convention: largest-|value| entry of each row positive."""
  out = components.copy()
  for i, row in enumerate(out):
    if row[np.argmax(np.abs(row))] < 0:
      out[i] = -row
  return out


def _reference_pca(x, dim):
  """Full-data PCA by eigh of np.cov: (mean, components [dim, F], variances [dim])."""
  cov = np.cov(x, rowvar=False)
  values, vectors = np.linalg.eigh(cov)
  order = np.argsort(values)[::-1][:dim]
  return x.mean(axis=0), _canonical(vectors[:, order].T), values[order]


def _anisotropic_data(rng, n, f, offset=0.0):
  """Rows with clearly distinct variances per principal axis (a random rotation)."""
  rotation, _ = np.linalg.qr(rng.standard_normal((f, f)))
  scales = np.linspace(3.0, 0.3, f)
  return offset + (rng.standard_normal((n, f)) * scales) @ rotation.T


def _split(x, sizes):
  assert sum(sizes) == x.shape[0]
  return np.split(x, np.cumsum(sizes)[:-1])


# ---------------------------------------------------------------------------------------
# StreamingMoments


@pytest.mark.parametrize("sizes", [
    [1000],
    [250, 250, 250, 250],
    [1, 2, 997],
    [997, 1, 1, 1],
    [1] * 40 + [960],
    [0, 500, 0, 500],
])
def test_moments_match_numpy_for_any_split(sizes):
  rng = np.random.default_rng(0)
  x = _anisotropic_data(rng, 1000, 6)
  moments = stats.StreamingMoments()
  for chunk in _split(x, sizes):
    moments.update(chunk)
  assert moments.count == 1000
  np.testing.assert_allclose(moments.mean, np.mean(x, axis=0), rtol=0, atol=1e-12)
  np.testing.assert_allclose(moments.covariance(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(moments.covariance(ddof=0), np.cov(x, rowvar=False, ddof=0),
                             rtol=1e-10, atol=1e-12)


def test_moments_stable_with_large_offset():
  rng = np.random.default_rng(1)
  x = _anisotropic_data(rng, 2000, 5, offset=1e8)
  moments = stats.StreamingMoments()
  for chunk in _split(x, [3, 1500, 1, 496]):
    moments.update(chunk.astype(np.float64))
  reference = np.cov(x, rowvar=False)
  np.testing.assert_allclose(moments.mean, x.mean(axis=0), rtol=1e-14)
  np.testing.assert_allclose(moments.covariance(), reference, rtol=1e-10, atol=1e-10)
  # The naive sum / sum-of-squares formula fails here, so the check above has teeth.
  # Shards with different reference points merge to the same result.
  shard_a = stats.StreamingMoments().update(x[:700])
  shard_b = stats.StreamingMoments().update(x[700:] + 0.0)
  merged = stats.StreamingMoments().merge(shard_a).merge(shard_b)
  np.testing.assert_allclose(merged.covariance(), reference, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(merged.mean, x.mean(axis=0), rtol=1e-14)
  naive = (x.T @ x - np.outer(x.sum(0), x.sum(0)) / len(x)) / (len(x) - 1)
  assert np.max(np.abs(naive - reference)) > 1e-3


def test_moments_mask_merge_and_errors():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((300, 4)) + 5.0
  mask = rng.random(300) < 0.6
  a = stats.StreamingMoments().update(x[:100], mask[:100])
  b = stats.StreamingMoments().update(x[100:], mask[100:])
  merged = a.merge(b).merge(stats.StreamingMoments())
  assert merged.count == mask.sum()
  np.testing.assert_allclose(merged.mean, x[mask].mean(0), atol=1e-12)
  np.testing.assert_allclose(merged.covariance(), np.cov(x[mask], rowvar=False), rtol=1e-10)
  # Merging into an empty accumulator copies.
  empty = stats.StreamingMoments().merge(merged)
  np.testing.assert_array_equal(empty.covariance(), merged.covariance())
  with pytest.raises(ValueError, match="3 columns, expected 4"):
    merged.update(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="NaN or Inf"):
    stats.StreamingMoments().update(np.array([[1.0, np.nan]]))
  with pytest.raises(ValueError, match="mask must be a bool"):
    stats.StreamingMoments().update(np.zeros((3, 2)), np.ones(3))
  with pytest.raises(ValueError, match="needs more than 1 rows"):
    stats.StreamingMoments().update(np.zeros((1, 2))).covariance()
  with pytest.raises(ValueError, match="2-D"):
    stats.StreamingMoments().update(np.zeros((2, 3, 4)))


def test_moments_memory_is_flat():
  rng = np.random.default_rng(3)
  moments = stats.StreamingMoments()
  moments.update(rng.standard_normal((50, 8)))
  after_one = moments.nbytes
  for _ in range(100):
    moments.update(rng.standard_normal((50, 8)))
  assert moments.nbytes == after_one == 2 * 8 * 8 + 8 * 8 * 8


# ---------------------------------------------------------------------------------------
# PCA


def test_pca_matches_eigh_and_svd():
  rng = np.random.default_rng(4)
  x = _anisotropic_data(rng, 800, 7, offset=3.0)
  moments = stats.StreamingMoments()
  for chunk in _split(x, [5, 300, 495]):
    moments.update(chunk)
  pca = stats.pca_from_moments(moments, 4)
  mean, components, variances = _reference_pca(x, 4)
  np.testing.assert_allclose(pca.mean, mean, atol=1e-12)
  np.testing.assert_allclose(pca.components, components, atol=1e-10)
  np.testing.assert_allclose(pca.explained_variance, variances, rtol=1e-10)
  # Independent route: SVD of the centred data.
  _, singular, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
  np.testing.assert_allclose(pca.components, _canonical(vt[:4]), atol=1e-10)
  np.testing.assert_allclose(pca.explained_variance, singular[:4] ** 2 / (len(x) - 1), rtol=1e-10)
  # Orthonormal rows, descending variances, sign convention.
  np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(4), atol=1e-12)
  assert np.all(np.diff(pca.explained_variance) < 0)
  pivots = np.argmax(np.abs(pca.components), axis=1)
  assert np.all(pca.components[np.arange(4), pivots] > 0)
  # transform, also for [..., F].
  z = pca.transform(x)
  np.testing.assert_allclose(z, (x - mean) @ components.T, atol=1e-10)
  np.testing.assert_allclose(np.var(z, axis=0, ddof=1), variances, rtol=1e-10)
  np.testing.assert_allclose(pca.transform(x[:6].reshape(2, 3, 7)), z[:6].reshape(2, 3, 4),
                             atol=1e-12)
  with pytest.raises(ValueError, match=r"\[\.\.\., 7\]"):
    pca.transform(np.zeros((3, 5)))


def test_pca_dim_errors():
  moments = stats.StreamingMoments().update(np.random.default_rng(5).standard_normal((20, 3)))
  with pytest.raises(ValueError, match=r"PCA dim must be in \[1, 3\].*got 4"):
    stats.pca_from_moments(moments, 4)
  with pytest.raises(ValueError, match="got 0"):
    stats.pca_from_moments(moments, 0)
  with pytest.raises(ValueError, match="seen no rows"):
    stats.pca_from_moments(stats.StreamingMoments(), 1)


# ---------------------------------------------------------------------------------------
# K = 1 centroids


def test_class_centroids_match_group_mean_and_skip_ignore():
  rng = np.random.default_rng(6)
  x = _anisotropic_data(rng, 600, 6, offset=2.0)
  labels = rng.integers(0, 4, 600)
  labels[rng.random(600) < 0.2] = 255
  pca = stats.pca_from_moments(stats.StreamingMoments().update(x), 3)
  accumulator = stats.StreamingClassCentroids(4, 3)
  for z_chunk, y_chunk in zip(_split(pca.transform(x), [1, 99, 500]), _split(labels, [1, 99, 500])):
    accumulator.update(z_chunk, y_chunk)
  z = pca.transform(x)
  expected = np.stack([z[labels == c].mean(0) for c in range(4)])
  np.testing.assert_allclose(accumulator.centroids(), expected, atol=1e-12)
  np.testing.assert_array_equal(accumulator.counts, [np.sum(labels == c) for c in range(4)])
  assert accumulator.missing_classes == ()
  # Merge of two halves == one pass.
  half_a = stats.StreamingClassCentroids(4, 3).update(z[:300], labels[:300])
  half_b = stats.StreamingClassCentroids(4, 3).update(z[300:], labels[300:])
  np.testing.assert_allclose(half_a.merge(half_b).centroids(), expected, atol=1e-12)


def test_class_centroids_missing_class_policies():
  z = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [9.0, 9.0]])
  labels = np.array([0, 0, 2, 7])  # class 1 has no pixels; 7 is the ignore label here
  accumulator = stats.StreamingClassCentroids(3, 2).update(z, labels, ignore_label=7)
  assert accumulator.missing_classes == (1,)
  with logs_warning(r"classes \[1\]"):
    rows = accumulator.centroids(seed=3)
  np.testing.assert_allclose(rows[[0, 2]], [[2.0, 0.0], [0.0, 2.0]])
  # Deterministic, seed-dependent, scaled to the mean centroid norm (2).
  np.testing.assert_allclose(np.linalg.norm(rows[1]), 2.0)
  with logs_warning():
    np.testing.assert_array_equal(accumulator.centroids(seed=3), rows)
    assert not np.allclose(accumulator.centroids(seed=4)[1], rows[1])
    np.testing.assert_array_equal(accumulator.centroids(missing="zeros")[1], [0.0, 0.0])
  with pytest.raises(ValueError, match=r"classes \[1\] have no labeled pixels"):
    accumulator.centroids(missing="error")
  with pytest.raises(ValueError, match=r"outside \[0, 3\).*\[5\]"):
    accumulator.update(z[:1], np.array([5]))
  with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
    accumulator.update(z, np.zeros(3, np.int32))


def test_class_centroids_memory_is_flat():
  rng = np.random.default_rng(7)
  accumulator = stats.StreamingClassCentroids(5, 4)
  accumulator.update(rng.standard_normal((10, 4)), rng.integers(0, 5, 10))
  after_one = accumulator.nbytes
  for _ in range(50):
    accumulator.update(rng.standard_normal((100, 4)), rng.integers(0, 5, 100))
  assert accumulator.nbytes == after_one


# ---------------------------------------------------------------------------------------
# K > 1: reservoir + k-means


def _clusters(rng, centres, per_cluster, noise=0.05):
  rows = [c + noise * rng.standard_normal((per_cluster, len(c))) for c in centres]
  return np.concatenate(rows)


def _match_rows(found, expected, atol):
  """Every expected row has a found row within atol (and vice versa, 1:1)."""
  d = np.linalg.norm(found[:, None] - expected[None], axis=-1)
  assert sorted(np.argmin(d, axis=1).tolist()) == list(range(len(expected)))
  assert np.max(np.min(d, axis=1)) < atol


def test_kmeans_recovers_separated_clusters_per_class():
  rng = np.random.default_rng(8)
  true = {0: np.array([[5.0, 0, 0], [-5, 0, 0], [0, 5, 0]]),
          1: np.array([[0.0, 0, 8], [0, 8, 8], [8, 0, 8]])}
  z = np.concatenate([_clusters(rng, true[0], 200), _clusters(rng, true[1], 200)])
  labels = np.repeat([0, 1], 600)
  order = rng.permutation(len(z))
  z, labels = z[order], labels[order]
  accumulator = kmeans.StreamingClassKMeans(2, 3, 3, max_samples_per_class=400, seed=0)
  for z_chunk, y_chunk in zip(np.array_split(z, 7), np.array_split(labels, 7)):
    accumulator.update(z_chunk, y_chunk)
  rows = accumulator.centroids()
  assert rows.shape == (6, 3)
  _match_rows(rows[0:3], true[0], atol=0.05)  # class-major: rows 0..2 are class 0
  _match_rows(rows[3:6], true[1], atol=0.05)


def test_kmeans_deterministic_for_seed_and_sorted_by_size():
  rng = np.random.default_rng(9)
  x = np.concatenate([_clusters(rng, [[0.0, 0.0]], 30), _clusters(rng, [[4.0, 0.0]], 90),
                      _clusters(rng, [[0.0, 4.0]], 60)])
  a = kmeans.kmeans(x, 3, seed=[1, 2])
  np.testing.assert_array_equal(a, kmeans.kmeans(x, 3, seed=[1, 2]))
  # Largest cluster first.
  _match_rows(a, np.array([[4.0, 0.0], [0.0, 4.0], [0.0, 0.0]]), atol=0.05)
  np.testing.assert_allclose(a[0], x[30:120].mean(0), atol=1e-12)
  np.testing.assert_allclose(a[2], x[:30].mean(0), atol=1e-12)
  # Whole streaming accumulator: same seed and stream -> identical output.
  labels = rng.integers(0, 2, len(x))
  outputs = []
  for _ in range(2):
    accumulator = kmeans.StreamingClassKMeans(2, 2, 2, max_samples_per_class=50, seed=11)
    for z_chunk, y_chunk in zip(np.array_split(x, 4), np.array_split(labels, 4)):
      accumulator.update(z_chunk, y_chunk)
    outputs.append(accumulator.centroids())
  np.testing.assert_array_equal(outputs[0], outputs[1])


def test_kmeans_fewer_distinct_rows_than_k_duplicates():
  x = np.array([[1.0, 1.0], [0.0, 2.0], [1.0, 1.0], [0.0, 2.0], [1.0, 1.0]])
  np.testing.assert_array_equal(kmeans.kmeans(x, 5),
                                [[0, 2], [1, 1], [0, 2], [1, 1], [0, 2]])
  accumulator = kmeans.StreamingClassKMeans(2, 2, 3, seed=0).update(x, np.zeros(5, np.int32))
  with logs_warning(r"classes \[1\]"):
    rows = accumulator.centroids()
  np.testing.assert_array_equal(rows[:3], [[0, 2], [1, 1], [0, 2]])
  assert accumulator.missing_classes == (1,)
  # Missing class gets K distinct fallback rows.
  assert len({tuple(r) for r in rows[3:]}) == 3


def test_reservoir_is_bounded_uniform_and_memory_flat():
  cap = 200
  accumulator = kmeans.StreamingClassKMeans(3, 1, 2, max_samples_per_class=cap, seed=5)
  fed = np.zeros(3, np.int64)
  nbytes_when_full = None
  stream_index = 0
  for batch in range(40):  # 40 * 150 = 6000 rows for class 0, ~30x the cap
    labels = np.zeros(150, np.int64)
    labels[:50] = 1 if batch % 2 else 255  # class 1 gets 50 rows every other batch
    values = np.arange(stream_index, stream_index + 150, dtype=np.float64)[:, None]
    stream_index += 150
    accumulator.update(values, labels)
    fed += [np.sum(labels == c) for c in range(3)]
    assert np.all(accumulator.stored_counts <= cap)
    if np.all(accumulator.stored_counts[:2] == cap):
      if nbytes_when_full is None:
        nbytes_when_full = accumulator.nbytes
      assert accumulator.nbytes == nbytes_when_full
  np.testing.assert_array_equal(accumulator.counts, fed)
  assert fed[0] >= 10 * cap and fed[1] >= 4 * cap
  assert nbytes_when_full is not None
  assert accumulator.nbytes <= 3 * cap * 1 * 4 + 3 * 8
  sample = accumulator.samples(0)[:, 0]
  # Distinct rows of the stream (no duplicates from a broken replacement).
  assert len(np.unique(sample)) == cap
  # Class-0 values are the stream indices with row offset >= 50 in each batch; a
  # uniform sample's mean index is ~3000 (std of the mean ~ 1732 / sqrt(200) ~ 122).
  class0_values = np.concatenate([np.arange(b * 150 + 50, b * 150 + 150) for b in range(40)])
  assert np.all(np.isin(sample, class0_values))
  assert abs(sample.mean() - class0_values.mean()) < 4 * class0_values.std() / np.sqrt(cap)
  # Both halves of the stream are represented (early rows do survive).
  assert 0.3 < np.mean(sample < 3000) < 0.7


# ---------------------------------------------------------------------------------------
# compute_label_embeddings


def _make_domain(seed=10, num_classes=4, images=6, pixels=120, features=8, missing=()):
  rng = np.random.default_rng(seed)
  class_means = 4.0 * rng.standard_normal((num_classes, features))
  batches = []
  for _ in range(images):
    labels = rng.integers(0, num_classes, pixels)
    labels = np.where(np.isin(labels, missing), 255, labels)
    labels[rng.random(pixels) < 0.1] = 255
    feats = class_means[np.minimum(labels, num_classes - 1)] + rng.standard_normal(
        (pixels, features))
    batches.append((feats.astype(np.float32), labels.astype(np.int32)))
  return batches


def test_compute_label_embeddings_k1_matches_numpy():
  batches = _make_domain()
  result = compute_label_embeddings(lambda: iter(batches), num_classes=4, dim=3)
  x = np.concatenate([f for f, _ in batches]).astype(np.float64)
  y = np.concatenate([l for _, l in batches])
  x, y = x[y != 255], y[y != 255]
  mean, components, variances = _reference_pca(x, 3)
  z = (x - mean) @ components.T
  expected = np.stack([z[y == c].mean(0) for c in range(4)])
  assert result.embeddings.dtype == np.float32 and result.embeddings.shape == (4, 3)
  np.testing.assert_allclose(result.embeddings, expected, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(result.pca_components, components, atol=1e-9)
  np.testing.assert_allclose(result.pca_mean, mean, atol=1e-9)
  np.testing.assert_allclose(result.pca_explained_variance, variances, rtol=1e-9)
  np.testing.assert_array_equal(result.class_pixel_counts, np.bincount(y, minlength=4))
  assert result.k == 1 and result.num_classes == 4 and result.missing_classes == ()
  assert result.source == "pca_centroids"
  assert result.metadata["labeled_pixels"] == len(y)
  assert result.metadata["feature_dim"] == 8
  np.testing.assert_allclose(result.metadata["explained_variance_ratio"],
                             variances.sum() / np.trace(np.cov(x, rowvar=False)), rtol=1e-9)


def test_compute_label_embeddings_k2_matches_kmeans_reference_and_accepts_jax():
  batches = [(jnp.asarray(f), jnp.asarray(l)) for f, l in _make_domain(seed=11, missing=(2,))]
  with logs_warning(r"classes \[2\]"):
    result = compute_label_embeddings(lambda: batches, num_classes=4, dim=3, k=2, seed=7)
  x = np.concatenate([np.asarray(f) for f, _ in batches]).astype(np.float64)
  y = np.concatenate([np.asarray(l) for _, l in batches])
  x, y = x[y != 255], y[y != 255]
  mean, components, _ = _reference_pca(x, 3)
  z = ((x - mean) @ components.T).astype(np.float32)  # the reservoir stores float32
  assert result.embeddings.shape == (8, 3) and result.missing_classes == (2,)
  assert result.source == "pca_kmeans"
  for c in (0, 1, 3):
    expected = kmeans.kmeans(z[y == c], 2, seed=[7, 2, c])
    np.testing.assert_allclose(result.embeddings[2 * c:2 * c + 2], expected, rtol=1e-5, atol=1e-5)
  assert np.all(np.isfinite(result.embeddings[4:6]))


def test_compute_label_embeddings_input_errors():
  batches = _make_domain(images=2)
  with pytest.raises(TypeError, match="zero-argument callable"):
    compute_label_embeddings(batches, num_classes=4, dim=3)
  generator = iter(batches)
  with pytest.raises(ValueError, match="second call of batches_fn yielded no labeled pixels"):
    compute_label_embeddings(lambda: generator, num_classes=4, dim=3)
  with pytest.raises(ValueError, match=r"PCA dim must be in \[1, 8\]"):
    compute_label_embeddings(lambda: batches, num_classes=4, dim=9)
  with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
    compute_label_embeddings(lambda: batches, num_classes=3, dim=2)
  all_ignored = [(f, np.full_like(l, 255)) for f, l in batches]
  with pytest.raises(ValueError, match="at least 2 labeled pixels"):
    compute_label_embeddings(lambda: all_ignored, num_classes=4, dim=2)


# ---------------------------------------------------------------------------------------
# File format


def test_save_load_round_trip_is_atomic(tmp_path):
  batches = _make_domain(seed=12, images=2, missing=(1,))
  with logs_warning():
    result = compute_label_embeddings(lambda: batches, num_classes=4, dim=3)
  path = tmp_path / "sub" / "cs_label_embeddings.npz"
  result.save(path)
  result.save(path)  # overwrite in place
  assert sorted(os.listdir(tmp_path / "sub")) == ["cs_label_embeddings.npz"]
  loaded = store.LabelEmbeddings.load(path)
  np.testing.assert_array_equal(loaded.embeddings, result.embeddings)
  for name in ("pca_mean", "pca_components", "pca_explained_variance", "class_pixel_counts"):
    np.testing.assert_array_equal(getattr(loaded, name), getattr(result, name))
  assert (loaded.num_classes, loaded.k, loaded.missing_classes, loaded.source) == (
      4, 1, (1,), "pca_centroids")
  assert loaded.metadata == result.metadata
  # A loaded file is no pickle.
  with np.load(path, allow_pickle=False) as data:
    assert "header_json" in data.files


def test_load_rejects_foreign_files(tmp_path):
  foreign = tmp_path / "foreign.npz"
  np.savez(foreign, embeddings=np.zeros((2, 2)))
  with pytest.raises(ValueError, match=r"foreign\.npz: not a label-embeddings file"):
    store.LabelEmbeddings.load(foreign)
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not a zip")
  with pytest.raises(ValueError, match=r"garbage\.npz: cannot read"):
    store.LabelEmbeddings.load(garbage)


def test_from_external_npy_npz_and_shape_errors(tmp_path):
  vectors = np.random.default_rng(13).standard_normal((6, 5)).astype(np.float32)
  npy = tmp_path / "word2vec.npy"
  np.save(npy, vectors)
  loaded = store.LabelEmbeddings.from_external(npy, num_classes=3, k=2, dim=5)
  np.testing.assert_array_equal(loaded.embeddings, vectors)
  assert loaded.source == f"external:{npy}" and loaded.k == 2
  npz = tmp_path / "glove.npz"
  np.savez(npz, vectors=vectors)
  np.testing.assert_array_equal(
      store.LabelEmbeddings.from_external(npz, num_classes=6, k=1, dim=5).embeddings, vectors)
  with pytest.raises(ValueError, match=r"word2vec\.npy: expected label embeddings of shape "
                     r"\(6, 4\).*got \(6, 5\)"):
    store.LabelEmbeddings.from_external(npy, num_classes=6, k=1, dim=4)
  with pytest.raises(ValueError, match=r"glove\.npz: expected .*\(8, 5\).*got \(6, 5\)"):
    store.LabelEmbeddings.from_external(npz, num_classes=4, k=2, dim=5)
  two = tmp_path / "two.npz"
  np.savez(two, a=vectors, b=vectors)
  with pytest.raises(ValueError, match=r"two\.npz: expected an 'embeddings' array.*\['a', 'b'\]"):
    store.LabelEmbeddings.from_external(two, num_classes=6, k=1, dim=5)
  bad = tmp_path / "nan.npy"
  np.save(bad, np.full((6, 5), np.nan))
  with pytest.raises(ValueError, match=r"nan\.npy: label embeddings contain NaN"):
    store.LabelEmbeddings.from_external(bad, num_classes=6, k=1, dim=5)
  with pytest.raises(ValueError, match=r"vectors\.txt: .*must be a \.npy or \.npz"):
    store.LabelEmbeddings.from_external(tmp_path / "vectors.txt", num_classes=6, k=1, dim=5)
  # A file written by save() is accepted too, with its shape checked.
  saved = tmp_path / "saved.npz"
  store.LabelEmbeddings(embeddings=vectors, num_classes=3, k=2, source="x").save(saved)
  assert store.LabelEmbeddings.from_external(saved, num_classes=3, k=2, dim=5).source == "x"
  with pytest.raises(ValueError, match=r"saved\.npz: expected .*\(6, 4\)"):
    store.LabelEmbeddings.from_external(saved, num_classes=3, k=2, dim=4)


# ---------------------------------------------------------------------------------------
# EMA update


def _reference_ema(old, x, labels, valid, theta, k):
  old = old.astype(np.float64)
  x = x.astype(np.float64)
  num_classes = old.shape[0] // k
  rows = np.full(len(x), -1)
  for i in range(len(x)):
    if valid[i] and 0 <= labels[i] < num_classes:
      block = old[labels[i] * k:(labels[i] + 1) * k]
      rows[i] = labels[i] * k + np.argmin(np.sum((block - x[i]) ** 2, axis=1))
  new = old.copy()
  for r in range(old.shape[0]):
    if np.any(rows == r):
      new[r] = theta * old[r] + (1 - theta) * x[rows == r].mean(0)
  return new, rows


_ema_jit = jax.jit(ema.ema_update_centroids, static_argnames="k")


@pytest.mark.parametrize("k", [1, 3])
def test_ema_update_matches_numpy(k):
  rng = np.random.default_rng(14)
  num_classes, dim, n = 5, 4, 200
  old = rng.standard_normal((num_classes * k, dim)).astype(np.float32)
  x = (2.0 * rng.standard_normal((n, dim))).astype(np.float32)
  labels = rng.integers(0, 3, n).astype(np.int32)  # classes 3, 4 never occur
  labels[:10] = 255
  valid = rng.random(n) < 0.8
  valid[labels == 1] = False  # class 1 occurs only on invalid pixels
  expected, rows = _reference_ema(old, x, labels, valid, 0.9, k)
  assert set(np.unique(rows[rows >= 0]) // k) == {0, 2}
  out = _ema_jit(jnp.asarray(old), jnp.asarray(x), jnp.asarray(labels), jnp.asarray(valid),
                 0.9, k=k)
  assert out.shape == old.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
  untouched = np.setdiff1d(np.arange(num_classes * k), rows)
  np.testing.assert_array_equal(np.asarray(out)[untouched], old[untouched])
  if k == 3:  # nearest-prototype assignment actually spreads pixels over several rows
    assert len(np.unique(rows[rows >= 0])) > 2
  # theta is traceable; theta=1 keeps everything, theta=0 jumps to the batch mean.
  np.testing.assert_allclose(
      np.asarray(_ema_jit(old, x, labels, valid, jnp.float32(1.0), k=k)), old, atol=0)
  expected0, _ = _reference_ema(old, x, labels, valid, 0.0, k)
  np.testing.assert_allclose(np.asarray(_ema_jit(old, x, labels, valid, 0.0, k=k)), expected0,
                             rtol=1e-5, atol=1e-5)


def test_ema_update_accepts_image_shaped_inputs_and_checks_k():
  rng = np.random.default_rng(15)
  old = rng.standard_normal((4, 3)).astype(np.float32)
  x = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
  labels = rng.integers(0, 4, (2, 5, 6)).astype(np.int32)
  valid = np.ones((2, 5, 6), bool)
  flat = ema.ema_update_centroids(old, x.reshape(-1, 3), labels.reshape(-1), valid.reshape(-1),
                                  0.5, k=1)
  shaped = ema.ema_update_centroids(old, x, labels, valid, 0.5, k=1)
  np.testing.assert_array_equal(np.asarray(flat), np.asarray(shaped))
  with pytest.raises(ValueError, match="not a multiple of k=3"):
    ema.ema_update_centroids(old, x, labels, valid, 0.5, k=3)
