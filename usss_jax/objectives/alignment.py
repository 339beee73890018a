"""The label-embedding terms: unlabeled pixels scored against every domain's prototypes.

The entropy module embeds every pixel; its similarity to a domain's label embeddings
(prototypes) gives a distribution over that domain's classes. `cross` minimises it against the
other domains' prototypes (alpha), `within` against the domain's own (beta).

config.alignment:
  "reference": the paper's released code exactly: dot product of the unnormalised pixel
    embedding with unit prototypes / temperature, entropy minimisation (it collapses by
    growing the embedding's norm).
  "infomax": cosine / temperature, and per domain and batch E[H(p)] - H(E[p]): confident *and*
    diverse assignments (`alignment_threshold` masks unconfident pixels out of E[H(p)]).
  "infomax_prior": cosine / temperature, E[H(p)] + KL(E[p] || prior): the batch's class mix
    is pulled towards the labeled class frequencies of the prototypes' domain (uniform is
    far from real class mixes), tracked in the state (`class_statistics.py`).
Which forward is scored: `alignment_view` ("unlabeled": a plain forward of the unlabeled
images; "weak": the weak view the teacher labels; "strong": consistency's strong view), by
default "unlabeled" (methods cross, full) or "strong" (universal).

Both terms of a domain share one forward and one set of scores (`_scores_and_terms`), and log
the diagnostics embedding_norm, within_entropy, diversity, prototype_confident_fraction and
cross_domain_entropy (also as the old key cross_entropy, kept for one release).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections

from usss_jax import config as config_lib
from usss_jax import losses
from usss_jax.objectives import class_statistics
from usss_jax.objectives.context import DomainContext
from usss_jax.objectives.term import Term

ALIGNMENTS = ("reference", "infomax", "infomax_prior")
VIEWS = ("unlabeled", "weak", "strong")


@dataclasses.dataclass(frozen=True)
class AlignmentOptions:
  """How pixels are scored against prototypes (config keys of the same names)."""
  alignment: str = "reference"
  temperature: float = 1.0
  normalize_pixels: bool = False
  embeddings_per_class: int = 1
  prototype_reduction: str = "none"
  alignment_threshold: float = 0.0   # infomax: pixels below this confidence leave E[H(p)]
  confident_threshold: float = 0.95  # diagnostics: config.consistency.threshold
  view: str = ""  # config.alignment_view ("": the term's own)

  @property
  def infomax(self) -> bool:
    return self.alignment in ("infomax", "infomax_prior")

  @property
  def uses_prior(self) -> bool:
    return self.alignment == "infomax_prior"

  @property
  def cosine(self) -> bool:
    return self.infomax or self.normalize_pixels

  @property
  def upsample_embedding(self) -> bool:
    """Cosine scores of the reference form need the upsampled embedding; dot products are
    computed at the encoder's resolution and their scores upsampled (exact: it is linear)."""
    return self.normalize_pixels and not self.infomax


def alignment_options(config: ml_collections.ConfigDict) -> AlignmentOptions:
  config_lib.check_choice(config, "alignment", ALIGNMENTS)
  config_lib.check_choice(config, "prototype_reduction", losses.PROTOTYPE_REDUCTIONS)
  if not 0.0 <= config.alignment_threshold <= 1.0:
    raise config_lib.ConfigError(f"config.alignment_threshold={config.alignment_threshold} must "
                                 "be a confidence in [0, 1]")
  if config.alignment_view and config.alignment_view not in VIEWS:
    raise config_lib.ConfigError(f"config.alignment_view={config.alignment_view!r}: expected "
                                 f"one of {VIEWS} or '' (the method's own)")
  if config.embedding_dim <= 0:
    raise config_lib.ConfigError(f"config.embedding_dim={config.embedding_dim}: method "
                                 f"{config.method!r} needs the entropy module")
  return AlignmentOptions(
      alignment=config.alignment, temperature=float(config.temperature),
      normalize_pixels=bool(config.normalize_pixels),
      embeddings_per_class=int(config.embeddings_per_class),
      prototype_reduction=config.prototype_reduction,
      alignment_threshold=float(config.alignment_threshold),
      confident_threshold=float(config.consistency.threshold), view=config.alignment_view)


def prototype_scores(embedding: jax.Array, prototypes: jax.Array,
                     opts: AlignmentOptions) -> jax.Array:
  """[B, h, w, D] pixel embedding x [M, D] prototypes -> [B, h, w, M or C] scores (reduced
  over each class's K prototypes as `prototype_reduction` says)."""
  scores = losses.label_similarity(embedding, prototypes, temperature=opts.temperature,
                                   normalize_pixels=opts.cosine)
  return losses.reduce_prototypes(scores, opts.embeddings_per_class, opts.prototype_reduction)


@dataclasses.dataclass(frozen=True)
class _Terms:
  cross: jax.Array | None  # None with a single domain
  within: jax.Array
  metrics: dict


def _infomax_terms(embedding, label_embeddings, ctx: DomainContext, opts: AlignmentOptions):
  def im(j):
    scores = prototype_scores(embedding, label_embeddings[j], opts)
    confident = None
    if opts.alignment_threshold > 0:
      confident = jnp.max(jax.nn.softmax(jax.lax.stop_gradient(scores)), axis=-1) >= \
          opts.alignment_threshold
    prior = class_statistics.labeled_prior(ctx, j) if opts.uses_prior else None
    return losses.information_maximization(scores, confident, prior), scores

  d = ctx.index
  (within, entropy, diversity), own_scores = im(d)
  others = [j for j in range(len(label_embeddings)) if j != d]
  cross = cross_entropy = None
  if others:
    terms = [im(j)[0] for j in others]
    cross = sum(t[0] for t in terms) / len(terms)
    cross_entropy = sum(t[1] for t in terms) / len(terms)
  return cross, within, entropy, cross_entropy, diversity, own_scores


def _reference_terms(model, embedding, label_embeddings, d: int, out_hw, opts: AlignmentOptions):
  upsample = None
  if not opts.normalize_pixels:
    upsample = functools.partial(model.upsample_scores, out_size=out_hw)
  kwargs = dict(temperature=opts.temperature, normalize_pixels=opts.normalize_pixels,
                embeddings_per_class=opts.embeddings_per_class,
                prototype_reduction=opts.prototype_reduction, upsample=upsample)
  within = losses.within_domain_entropy(embedding, label_embeddings, d, **kwargs)
  cross = (losses.cross_domain_entropy(embedding, label_embeddings, d, **kwargs)
           if len(label_embeddings) > 1 else None)
  own_scores = losses.label_similarity(jax.lax.stop_gradient(embedding), label_embeddings[d],
                                       temperature=opts.temperature,
                                       normalize_pixels=opts.normalize_pixels)
  own_scores = losses.reduce_prototypes(upsample(own_scores) if upsample else own_scores,
                                        opts.embeddings_per_class, opts.prototype_reduction)
  _, _, diversity = losses.information_maximization(own_scores)
  return cross, within, within, cross, diversity, own_scores


def _scores_and_terms(params, batch_stats, domain_batch, ctx: DomainContext, view: str):
  """(_Terms, batch_stats) of the domain, computed once for both terms."""
  images = domain_batch["unlabeled"]["image"]  # the weak view (strong: consistency's forward)
  view = ctx.options("alignment").view or view
  if view == "strong" and "strong" not in ctx.outputs:
    raise config_lib.ConfigError("config.alignment_view='strong' needs a method with "
                                 "consistency (its strong view): consistency or universal")
  out, batch_stats = ctx.view(view, params, batch_stats, images)
  if "alignment" in ctx.memo:
    return ctx.memo["alignment"], batch_stats
  opts = ctx.options("alignment")
  embedding, label_embeddings = out["embedding"], ctx.state["label_embeddings"]
  if opts.infomax:
    cross, within, entropy, cross_entropy, diversity, own_scores = _infomax_terms(
        embedding, label_embeddings, ctx, opts)
  else:
    cross, within, entropy, cross_entropy, diversity, own_scores = _reference_terms(
        ctx.model, embedding, label_embeddings, ctx.index, images.shape[1:3], opts)
  confidence = jnp.max(jax.nn.softmax(jax.lax.stop_gradient(own_scores)), axis=-1)
  name = ctx.name
  metrics = {
      f"embedding_norm/{name}": jnp.mean(jnp.linalg.norm(embedding.astype(jnp.float32),
                                                         axis=-1)),
      f"within_entropy/{name}": entropy,
      f"diversity/{name}": diversity,
      f"prototype_confident_fraction/{name}": jnp.mean(
          (confidence >= opts.confident_threshold).astype(jnp.float32)),
  }
  if cross_entropy is not None:
    metrics[f"cross_domain_entropy/{name}"] = cross_entropy
    metrics[f"cross_entropy/{name}"] = cross_entropy  # old name, kept for one release
  ctx.memo["alignment"] = _Terms(cross, within, metrics)
  return ctx.memo["alignment"], batch_stats


def _cross(view: str):
  def cross_domain_alignment(params, batch_stats, domain_batch, ctx: DomainContext):
    """Entropy (reference) or IM loss of the unlabeled pixels against the other domains'
    prototypes, averaged over them; None with a single domain."""
    terms, batch_stats = _scores_and_terms(params, batch_stats, domain_batch, ctx, view)
    return terms.cross, batch_stats, terms.metrics
  return cross_domain_alignment


def _within(view: str):
  def within_domain_alignment(params, batch_stats, domain_batch, ctx: DomainContext):
    """Entropy (reference) or IM loss of the unlabeled pixels against their own domain's
    prototypes."""
    terms, batch_stats = _scores_and_terms(params, batch_stats, domain_batch, ctx, view)
    return terms.within, batch_stats, terms.metrics
  return within_domain_alignment


def _reads(view: str):
  def reads(opts: AlignmentOptions):
    return {opts.view or view: {"embedding": True,
                                "upsample_embedding": opts.upsample_embedding}}
  return reads


def _terms_on(view: str) -> tuple[Term, Term]:
  common = dict(unlabeled=True, options=alignment_options, options_key="alignment",
                reads=_reads(view), label_embeddings=True,
                class_statistics=lambda opts: opts.uses_prior)
  return (Term(name="cross", loss=_cross(view), weight="alpha", **common),
          Term(name="within", loss=_within(view), weight="beta", **common))


# On a plain forward of the unlabeled images (methods cross, full) ...
CROSS, WITHIN = _terms_on("unlabeled")
# ... or on the strong view that consistency computes anyway (method universal).
CROSS_ON_STRONG, WITHIN_ON_STRONG = _terms_on("strong")
