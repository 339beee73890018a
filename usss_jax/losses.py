"""Loss functions of universal semi-supervised segmentation: pure, jit-able, no state.

Notation: B batch, H x W pixels, C classes of a domain, D embedding dimension,
M label-embedding rows of a domain (C, or C*K with K prototypes per class,
class-major: rows c*K .. c*K+K-1 belong to class c).

Defaults reproduce the reference (tarun005/USSS_ICCV19): label embeddings are
L2-normalised, pixel embeddings are not, temperature 1, natural log, every pixel
of an unlabeled image counts, alpha weights the cross-domain term and beta the
within-domain term, per-domain losses are summed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from usss_jax.data.base import IGNORE_LABEL

PROTOTYPE_REDUCTIONS = ("none", "max", "logsumexp")


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean of `values` over `mask` (all elements when None); 0 when the mask is empty."""
  if mask is None:
    return jnp.mean(values)
  mask = mask.astype(values.dtype)
  # max(.., 1) gives 0 (not 0/0 = NaN) and a zero gradient when nothing is valid.
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                        ignore_label: int = IGNORE_LABEL) -> jax.Array:
  """Supervised softmax cross entropy averaged over the non-ignored pixels.

  Args:
    logits: [B, H, W, C] class scores (any float dtype; computed in float32).
    labels: [B, H, W] integer class ids in [0, C), or `ignore_label`.
    ignore_label: label value excluded from the loss.
  Returns:
    Scalar float32: mean over valid pixels of -log softmax(logits)[label]. When
    every pixel is ignored the loss is 0 with zero gradient (the reference gives
    NaN there, which would poison the parameters).
  """
  logits = logits.astype(jnp.float32)
  valid = labels != ignore_label
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  # take_along_axis stays valid under batch sharding (fancy indexing does not on explicit meshes).
  nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  return _masked_mean(nll, valid)


def normalize_rows(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """L2-normalises the last axis: [..., D] -> [..., D]."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def label_similarity(pixel_embedding: jax.Array, label_embeddings: jax.Array, *,
                     temperature: float = 1.0,
                     normalize_pixels: bool = False) -> jax.Array:
  """Similarity of every pixel embedding to every label embedding.

  Args:
    pixel_embedding: [B, H, W, D] output of the entropy module.
    label_embeddings: [M, D] a domain's label embeddings (rows are L2-normalised here).
    temperature: scores are divided by it.
    normalize_pixels: cosine similarity instead of the reference's dot product with
      an unnormalised pixel embedding (which lets the entropy shrink by growing the
      embedding norm).
  Returns:
    [B, H, W, M] float32 scores.
  """
  pixel_embedding = pixel_embedding.astype(jnp.float32)
  if normalize_pixels:
    pixel_embedding = normalize_rows(pixel_embedding)
  prototypes = normalize_rows(label_embeddings.astype(jnp.float32))
  scores = jnp.einsum("bhwd,md->bhwm", pixel_embedding, prototypes,
                      precision=jax.lax.Precision.HIGHEST)
  return scores / temperature


def reduce_prototypes(scores: jax.Array, k: int, how: str = "none") -> jax.Array:
  """Turns scores over C*K prototypes into scores over the C classes.

  Args:
    scores: [..., C*K] class-major prototype scores.
    k: prototypes per class.
    how: "none" keeps all C*K rows (the softmax runs over prototypes, as the
      reference treats the rows of its embedding file); "max" takes the best
      prototype of each class; "logsumexp" sums the class's prototype
      probabilities before the entropy.
  Returns:
    [..., C*K] for "none", else [..., C].
  """
  if how == "none" or k == 1:
    return scores
  grouped = scores.reshape(scores.shape[:-1] + (scores.shape[-1] // k, k))
  if how == "max":
    return jnp.max(grouped, axis=-1)
  if how == "logsumexp":
    return jax.nn.logsumexp(grouped, axis=-1)
  raise ValueError(f"unknown prototype reduction {how!r}; use one of {PROTOTYPE_REDUCTIONS}")


def softmax_entropy(scores: jax.Array, axis: int = -1) -> jax.Array:
  """Entropy (nats) of softmax(scores) along `axis`: [..., M] -> [...].

  Lies in [0, log M]. Written as logsumexp - E_p[s] so that it stays finite for
  very confident scores.
  """
  scores = scores.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(scores, axis=axis)
  return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=axis)


def label_embedding_entropy(pixel_embedding: jax.Array, label_embeddings: jax.Array, *,
                            mask: jax.Array | None = None,
                            temperature: float = 1.0,
                            normalize_pixels: bool = False,
                            embeddings_per_class: int = 1,
                            prototype_reduction: str = "none",
                            upsample: Callable[[jax.Array], jax.Array] | None = None
                            ) -> jax.Array:
  """Mean per-pixel entropy of the similarities to one domain's label embeddings.

  Args:
    pixel_embedding: [B, H, W, D] (or [B, h, w, D] with `upsample`).
    label_embeddings: [M, D], M = C * embeddings_per_class.
    mask: optional [B, H, W] bool of pixels that count (e.g. not crop padding);
      None = every pixel, as in the reference.
    temperature, normalize_pixels: see `label_similarity`.
    embeddings_per_class, prototype_reduction: see `reduce_prototypes`.
    upsample: optional linear map [B, h, w, M] -> [B, H, W, M] applied to the scores. For a
      pixel embedding at the encoder's resolution this gives exactly the scores of the
      upsampled embedding (dot products commute with a linear, channel-wise upsampler) at
      M / D of the cost; with `normalize_pixels` the normalisation then happens before
      upsampling.
  Returns:
    Scalar float32.
  """
  scores = label_similarity(pixel_embedding, label_embeddings, temperature=temperature,
                            normalize_pixels=normalize_pixels)
  if upsample is not None:
    scores = upsample(scores)
  scores = reduce_prototypes(scores, embeddings_per_class, prototype_reduction)
  return _masked_mean(softmax_entropy(scores), mask)


def within_domain_entropy(pixel_embedding: jax.Array,
                          label_embeddings: Sequence[jax.Array], domain_index: int,
                          **kwargs) -> jax.Array:
  """L_within for an unlabeled batch of a domain: entropy w.r.t. its own label embeddings.

  Args:
    pixel_embedding: [B, H, W, D] embeddings of unlabeled images of the domain.
    label_embeddings: per-domain [M_k, D] matrices.
    domain_index: index of the images' domain.
    **kwargs: forwarded to `label_embedding_entropy`.
  Returns:
    Scalar float32.
  """
  return label_embedding_entropy(pixel_embedding, label_embeddings[domain_index], **kwargs)


def cross_domain_entropy(pixel_embedding: jax.Array,
                         label_embeddings: Sequence[jax.Array], domain_index: int,
                         **kwargs) -> jax.Array:
  """L_cross for an unlabeled batch of a domain: entropy w.r.t. the other domains' embeddings.

  With more than two domains the entropies to each other domain are averaged, so
  that alpha means the same for any number of domains (with two domains this is
  exactly the reference's single cross term). With one domain it is 0.

  Args:
    pixel_embedding: [B, H, W, D].
    label_embeddings: per-domain [M_k, D] matrices.
    domain_index: index of the images' domain.
    **kwargs: forwarded to `label_embedding_entropy`.
  Returns:
    Scalar float32.
  """
  others = [e for k, e in enumerate(label_embeddings) if k != domain_index]
  if not others:
    return jnp.zeros((), jnp.float32)
  terms = [label_embedding_entropy(pixel_embedding, e, **kwargs) for e in others]
  return sum(terms) / len(terms)


def decoder_softmax_entropy(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Direct softmax-entropy regulariser (SER baseline) on a decoder's output.

  Args:
    logits: [B, H, W, C] head output on unlabeled images.
    mask: optional [B, H, W] bool of pixels that count.
  Returns:
    Scalar float32 mean per-pixel entropy of softmax(logits).
  """
  return _masked_mean(softmax_entropy(logits), mask)


def total_loss(supervised: Sequence[jax.Array], cross: Sequence[jax.Array],
               within: Sequence[jax.Array], *, alpha: float, beta: float) -> jax.Array:
  """L = sum_d L_S(d) + alpha * sum_d L_cross(d) + beta * sum_d L_within(d).

  Args:
    supervised: per-domain scalar supervised losses.
    cross: per-domain scalar cross-domain entropies (may be empty).
    within: per-domain scalar within-domain entropies (may be empty).
    alpha: weight of the cross-domain term.
    beta: weight of the within-domain term.
  Returns:
    Scalar.
  """
  zero = jnp.zeros((), jnp.float32)
  return (sum(supervised, zero) + alpha * sum(cross, zero) + beta * sum(within, zero))


# ---------------------------------------------------------------------------- semi-supervised

def pseudo_labels(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Hard pseudo-labels of a (teacher) prediction.

  Args:
    logits: [B, H, W, C].
  Returns:
    (labels [B, H, W] int32 argmax, confidence [B, H, W] float32 max softmax probability),
    both without gradient.
  """
  probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
  return jnp.argmax(probs, axis=-1).astype(jnp.int32), jnp.max(probs, axis=-1)


def cutmix(x: jax.Array, mask: jax.Array, partner: jax.Array) -> jax.Array:
  """Pastes, for each example i, the masked pixels of example partner[i] into it.

  Args:
    x: [B, H, W, ...] images, labels, confidences or probabilities.
    mask: [B, H, W] bool, True where example i takes its partner's pixel.
    partner: [B] int indices into the batch.
  Returns:
    Same shape and dtype as `x`.
  """
  m = mask.reshape(mask.shape + (1,) * (x.ndim - 3))
  return jnp.where(m, jnp.take(x, partner, axis=0), x)


def consistency_cross_entropy(logits: jax.Array, labels: jax.Array, confidence: jax.Array, *,
                              threshold: float | jax.Array,
                              valid: jax.Array | None = None) -> jax.Array:
  """FixMatch's unlabeled loss: cross entropy against confident pseudo-labels.

  Pixels whose pseudo-label confidence is below `threshold` contribute 0; the sum is divided
  by the number of valid pixels (not the confident ones), so the loss grows as the teacher
  becomes confident, as in FixMatch / UniMatch.

  Args:
    logits: [B, H, W, C] student scores on the strong view.
    labels: [B, H, W] int pseudo-labels (of the weak view, mixed like the strong view).
    confidence: [B, H, W] float their confidence.
    threshold: confidence in [0, 1] from which a pseudo-label counts: a scalar, or [B, H, W]
      (per pixel, e.g. the threshold of its pseudo-label's class).
    valid: optional [B, H, W] bool of pixels that exist (not crop padding).
  Returns:
    Scalar float32.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels.astype(jnp.int32)[..., None], axis=-1)[..., 0]
  weight = (confidence >= threshold).astype(jnp.float32)
  return _masked_mean(nll * jax.lax.stop_gradient(weight), valid)


def information_maximization(scores: jax.Array, confident: jax.Array | None = None,
                             prior: jax.Array | None = None
                             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """E[H(p)] - H(E[p]) (or E[H(p)] + KL(E[p] || prior)) of softmax(scores) over a batch.

  Minimising the mean per-pixel entropy alone can put every pixel on one label; subtracting
  the entropy of the batch-mean distribution (its diversity) rules that out: the minimum is
  confident pixels spread over all labels, *uniformly* (SHOT / IIC's IM loss). With `prior`,
  the batch mean is pulled towards that class distribution instead (e.g. the labeled images'
  class frequencies): E[H(p)] + KL(E[p] || prior).

  Args:
    scores: [B, H, W, M] similarity scores (already divided by a temperature).
    confident: optional [B, H, W] bool: only these pixels count in E[H(p)] (the batch mean
      E[p] is over every pixel, so that unconfident pixels still spread).
    prior: optional [M] probabilities.
  Returns:
    (loss, mean per-pixel entropy, entropy of the mean distribution), scalars float32.
  """
  log_probs = jax.nn.log_softmax(scores.astype(jnp.float32), axis=-1)
  probs = jnp.exp(log_probs)
  pixel_entropy = -jnp.sum(probs * log_probs, axis=-1)
  mean_probs = jnp.mean(probs.reshape(-1, probs.shape[-1]), axis=0)
  log_mean = jnp.log(jnp.maximum(mean_probs, 1e-12))
  marginal_entropy = -jnp.sum(mean_probs * log_mean)
  mean_entropy = _masked_mean(pixel_entropy, confident)
  if prior is None:
    return mean_entropy - marginal_entropy, mean_entropy, marginal_entropy
  divergence = jnp.sum(mean_probs * (log_mean - jnp.log(jnp.maximum(prior, 1e-12))))
  return mean_entropy + divergence, mean_entropy, marginal_entropy
