"""The analyses: label-space-agnostic prediction, label correspondence, t-SNE of features.

1. predict_any: the entropy module embeds every pixel in the space of the label embeddings,
   so any domain's prototypes score the pixel embedding for that domain's classes
   (`inference.prototype_scores`): any image segmented in any training domain's label set
   without a head of its own. Its agreement with the domain's head and its mIoU on the
   domain's evaluation split are reported alongside.
2. correspondence: which classes of domain A align with which of domain B, (a) from the
   cosine similarity of their label embeddings, (b) from data: A's ground truth against B's
   head predictions on A's evaluation images.
3. tsne: encoder features (1/8 resolution, labels at cell centres) sampled per class and
   domain, embedded with t-SNE (the paper's Figure 4); one panel per run.

Evaluation-split statistics go through the batched evaluation loop (`evaluate.sum_over_split`),
as the mIoU does; restored models sit on one device until then.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from usss_jax import config as config_lib
from usss_jax import evaluate, files, inference, label_embedding_stage, metrics, modes, sharding
from usss_jax import state as state_lib
from usss_jax.analysis import plots, scores
from usss_jax.data.base import IGNORE_LABEL, load_rgb
from usss_jax.domains import Domain
from usss_jax.label_embeddings.store import LabelEmbeddings


def restore_state(config: ml_collections.ConfigDict, workdir: str, which: str = "best"):
  """(model, state, domains, step) of `workdir` on one local device (`modes.restore_with_domains`).

  The whole train state is kept, in particular `state["label_embeddings"]` (which EMA may
  have moved away from the saved files).
  """
  return modes.restore_with_domains(config, workdir, which,
                               placement=sharding.replicated(sharding.single_device_mesh()))


def domain_label_embeddings(config: ml_collections.ConfigDict, workdir: str, state: dict,
                            domains: Sequence[Domain], index: int) -> np.ndarray:
  """[C*K, D] float32 label embeddings of domain `index`: the checkpoint's, else the saved file.

  A run whose method does not use label embeddings keeps zero placeholders in its
  state; then `<workdir>/label_embeddings/<name>.npz` is used if it exists.
  """
  dom = domains[index]
  k = int(config.embeddings_per_class)
  emb = np.asarray(jax.device_get(state["label_embeddings"][index]), np.float32)
  if not np.any(np.linalg.norm(emb, axis=1) > 0):
    path = os.path.join(label_embedding_stage.embeddings_dir(workdir), f"{dom.name}.npz")
    if not os.path.exists(path):
      raise config_lib.ConfigError(
          f"{workdir}: the checkpoint holds no label embeddings for domain {dom.name!r} "
          f"(method {config.method!r} does not train with them) and {path} does not exist")
    emb = np.asarray(LabelEmbeddings.load(path).embeddings, np.float32)
  if emb.shape[0] != dom.num_classes * k:
    raise config_lib.ConfigError(f"{workdir}: label embeddings of {dom.name!r} have "
                                 f"{emb.shape[0]} rows, expected {dom.num_classes} classes x "
                                 f"{k} prototypes")
  if int(config.embedding_dim) and emb.shape[1] != int(config.embedding_dim):
    raise config_lib.ConfigError(f"{workdir}: label embeddings of {dom.name!r} have dimension "
                                 f"{emb.shape[1]}, the model's embedding_dim is "
                                 f"{config.embedding_dim}")
  return emb


# Images per evaluation batch of the analyses (offline, a few images; split over the local
# devices).
_BATCH = 8


def _eval_examples(dom: Domain, max_images: int) -> list:
  """The first `max_images` (0 = all) evaluation examples of `dom`; an error when it has none."""
  examples = dom.eval_examples[:max_images] if max_images > 0 else dom.eval_examples
  if not examples:
    raise config_lib.ConfigError(f"domain {dom.name!r} has no evaluation examples "
                                 f"(set config.domains.{dom.name}.eval_split)")
  return examples


def _network_input(image: np.ndarray, dom: Domain, normalization: str) -> np.ndarray:
  """[H, W, 3] uint8 -> [1, h, w, 3] float32 as evaluation feeds it."""
  return inference.preprocess(image, resize_hw=dom.eval_resize_hw,
                              normalization=normalization)[None]


@functools.partial(jax.jit, static_argnames=("model", "head", "k", "normalize_pixels",
                                             "num_classes"))
def _agreement_counts(model, variables, images, labels, real, prototypes, *, head: int, k: int,
                      normalize_pixels: bool, num_classes: int):
  """Confusion matrices of the head and of the prototypes, and [agreeing labelled pixels,
  labelled pixels, agreeing pixels, pixels] of the real (not padding) images."""
  heads, protos = inference.predictor(model, k, normalize_pixels)(
      variables, images, (prototypes,), labels.shape[1:3])
  head_pred, proto_pred = heads[head], protos[0]
  labelled = labels != IGNORE_LABEL
  same = head_pred == proto_pred
  pixels = real[:, None, None] & jnp.ones_like(same)
  return (metrics.confusion_matrix(head_pred, labels, num_classes),
          metrics.confusion_matrix(proto_pred, labels, num_classes),
          jnp.stack([jnp.sum(same & labelled), jnp.sum(labelled), jnp.sum(same & pixels),
                     jnp.sum(pixels)]))


@functools.partial(jax.jit, static_argnames=("model", "head", "num_classes", "num_predicted"))
def _head_counts(model, variables, images, labels, real, *, head: int, num_classes: int,
                 num_predicted: int):
  """(ground truth, head `head`'s prediction) counts [C, P + 1] of a batch."""
  del real  # padding images have all-ignore labels
  pred = jnp.argmax(inference.head_logits(model, variables, images, head, labels.shape[1:3]), -1)
  return (metrics.confusion_matrix(pred, labels, num_classes, num_predicted=num_predicted),)


def prototype_agreement(model, variables, dom: Domain, label_embeddings: np.ndarray, *,
                        k: int, normalization: str, normalize_pixels: bool = False,
                        max_images: int = 0) -> dict:
  """Prototype prediction vs the domain's own head on its evaluation split.

  Args:
    model, variables: the universal model and its {"params", "batch_stats"}.
    dom: the domain (reader, evaluation examples, eval resize, head index).
    label_embeddings: [C*K, D] the domain's label embeddings.
    k, normalize_pixels: see `inference.prototype_scores`.
    normalization: input normalisation (as in training).
    max_images: use the first `max_images` evaluation images (0 = all).
  Returns:
    {"domain", "num_images", "agreement": fraction of labelled pixels where both
    argmaxes agree, "agreement_all_pixels", "head": {"miou", "pixel_accuracy",
    "iou"}, "prototypes": {same}} (mIoU with absent classes excluded).
  """
  count = functools.partial(_agreement_counts, model, prototypes=jnp.asarray(label_embeddings),
                            head=dom.index, k=k, normalize_pixels=normalize_pixels,
                            num_classes=dom.num_classes)
  (cm_head, cm_proto, agree), num_images = evaluate.sum_over_split(
      count, sharding.to_local_replicated(variables, sharding.local_mesh()), dom,
      batch_size=_BATCH, normalization=normalization, examples=_eval_examples(dom, max_images))
  same_valid, valid, same_all, total = (int(v) for v in agree)
  return {"domain": dom.name, "num_images": num_images,
          "agreement": same_valid / valid if valid else float("nan"),
          "agreement_all_pixels": same_all / total,
          "head": evaluate.class_summary(cm_head, dom.classes),
          "prototypes": evaluate.class_summary(cm_proto, dom.classes)}


def _domain_index(config: ml_collections.ConfigDict, name: str | None, flag: str) -> int:
  """Index of domain `name` of the config (checked before anything is restored)."""
  names = list(config.domain_names)
  if not name:
    raise config_lib.ConfigError(f"--{flag} is required: one of {names}")
  if name not in names:
    raise config_lib.ConfigError(f"--{flag}={name!r}: not one of this run's domains {names}")
  return names.index(name)


def predict_any(config: ml_collections.ConfigDict, workdir: str, input_path: str, *,
                label_space: str, output: str | None = None, which: str = "best",
                max_images: int = 0) -> dict:
  """Segments every image under `input_path` in `label_space`'s classes via its prototypes.

  Writes `<stem>_mask.png` (class ids), `<stem>_color.png`, `<stem>_overlay.png`,
  `legend.png`, and `agreement.json` (prototypes vs the domain's head on its own
  evaluation split), and returns a summary. The label space and the images are checked
  before the run is restored.
  """
  if int(config.embedding_dim) <= 0:
    raise config_lib.ConfigError("predict_any needs the entropy module: config.embedding_dim "
                                 "is 0")
  index = _domain_index(config, label_space, "label_space")
  images = inference.list_images(input_path)
  model, state, domains, step = restore_state(config, workdir, which)
  dom = domains[index]
  k = int(config.embeddings_per_class)
  embs = domain_label_embeddings(config, workdir, state, domains, index)
  variables = state_lib.model_variables(state)
  output = output or os.path.join(workdir, "visualize", f"predict_any_{dom.name}")
  forward = inference.predictor(model, k, bool(config.normalize_pixels))
  written = []
  for path in images:
    image = load_rgb(path)
    _, protos = forward(variables, _network_input(image, dom, config.normalization),
                        (jnp.asarray(embs),), image.shape[:2])
    stem = os.path.splitext(os.path.basename(path))[0]
    inference.save_prediction(output, stem, image, np.asarray(protos[0])[0], dom.palette)
    written.append(stem)
  inference.save_legend(os.path.join(output, "legend.png"), dom.classes, dom.palette,
                        title=dom.name)
  agreement = prototype_agreement(model, variables, dom, embs, k=k,
                                  normalization=config.normalization,
                                  normalize_pixels=bool(config.normalize_pixels),
                                  max_images=max_images)
  agreement["step"] = step
  files.write_json(os.path.join(output, "agreement.json"), agreement)
  return {"label_space": dom.name, "step": step, "output": output, "images": len(written),
          "classes": list(dom.classes),
          "agreement": agreement["agreement"],
          "head_miou": agreement["head"]["miou"],
          "prototype_miou": agreement["prototypes"]["miou"]}


def _correspondence_markdown(domain_a: str, domain_b: str, similarity_matches,
                             data_matches, pixels: np.ndarray) -> str:
  lines = [f"# Label correspondence: {domain_a} -> {domain_b}", "",
           f"Prototype cosine: label-embedding similarity (-1..1). Co-occurrence: fraction of "
           f"{domain_a} ground-truth pixels of the class that head `{domain_b}` labels as the "
           "match.", "",
           f"| {domain_a} class | pixels | {domain_b} by prototype cosine | cosine "
           f"| {domain_b} by co-occurrence | fraction |",
           "|---|---:|---|---:|---|---:|"]

  def cell(match):
    if match is None or match["class_b"] is None:
      return "-", "-"
    return match["class_b"], f"{match['score']:.3f}"

  for i, data in enumerate(data_matches):
    sim = similarity_matches[i] if similarity_matches else None
    s_name, s_score = cell(sim)
    d_name, d_score = cell(data)
    lines.append(f"| {data['class_a']} | {int(pixels[i])} | {s_name} | {s_score} | "
                 f"{d_name} | {d_score} |")
  return "\n".join(lines) + "\n"


def correspondence(config: ml_collections.ConfigDict, workdir: str, *, domain_a: str,
                   domain_b: str, output: str | None = None, which: str = "best",
                   max_images: int = 0) -> dict:
  """Class alignment of domain A to domain B: heat maps, Markdown and JSON tables.

  (a) cosine similarity of the label embeddings [C_A, C_B] (skipped, with a note,
  when the run has none); (b) A's ground truth vs head B's argmax on A's
  evaluation images, row-normalised [C_A, C_B].
  """
  ia = _domain_index(config, domain_a, "domain_a")
  ib = _domain_index(config, domain_b, "domain_b")
  model, state, domains, step = restore_state(config, workdir, which)
  dom_a, dom_b = domains[ia], domains[ib]
  names_a, names_b = dom_a.classes, dom_b.classes
  output = output or os.path.join(workdir, "visualize", "correspondence")
  tag = f"{dom_a.name}_{dom_b.name}"
  result: dict[str, Any] = {"domain_a": dom_a.name, "domain_b": dom_b.name, "step": step,
                            "classes_a": list(names_a), "classes_b": list(names_b),
                            "files": {}}

  k = int(config.embeddings_per_class)
  similarity_matches = None
  try:
    emb_a = domain_label_embeddings(config, workdir, state, domains, ia)
    emb_b = domain_label_embeddings(config, workdir, state, domains, ib)
  except ValueError as e:
    result["similarity_note"] = str(e)
  else:
    similarity = scores.prototype_similarity(emb_a, emb_b, k, k)
    similarity_matches = scores.best_matches(similarity, names_a, names_b)
    result["similarity"] = similarity.tolist()
    result["similarity_matches"] = similarity_matches
    result["files"]["similarity_png"] = plots.plot_heatmap(
        similarity, names_a, names_b, os.path.join(output, f"similarity_{tag}.png"),
        title=f"Label-embedding cosine: {dom_a.name} vs {dom_b.name}",
        xlabel=f"{dom_b.name} class", ylabel=f"{dom_a.name} class", vmin=-1.0, vmax=1.0,
        cmap="RdBu_r")

  examples = _eval_examples(dom_a, max_images)
  (confusion,), _ = evaluate.sum_over_split(
      functools.partial(_head_counts, model, head=ib, num_classes=len(names_a),
                        num_predicted=len(names_b)),
      sharding.to_local_replicated(state_lib.model_variables(state), sharding.local_mesh()),
      dom_a, batch_size=_BATCH, normalization=config.normalization, examples=examples)
  counts = confusion[:, :len(names_b)]  # (A's ground truth, B's head)
  pixels = counts.sum(axis=1)
  fractions = scores.row_normalize(counts)
  data_matches = scores.best_matches(fractions, names_a, names_b, valid_rows=pixels > 0)
  result.update(num_images=len(examples), cooccurrence_counts=counts.tolist(),
                cooccurrence=fractions.tolist(), cooccurrence_matches=data_matches,
                pixels_per_class_a=pixels.tolist())
  result["files"]["cooccurrence_png"] = plots.plot_heatmap(
      fractions, names_a, names_b, os.path.join(output, f"cooccurrence_{tag}.png"),
      title=f"{dom_a.name} ground truth vs head {dom_b.name} ({len(examples)} images)",
      xlabel=f"{dom_b.name} head prediction", ylabel=f"{dom_a.name} ground truth",
      vmin=0.0, vmax=1.0)
  result["files"]["markdown"] = files.write_text(
      os.path.join(output, f"correspondence_{tag}.md"),
      _correspondence_markdown(dom_a.name, dom_b.name, similarity_matches, data_matches, pixels))
  result["files"]["json"] = os.path.join(output, f"correspondence_{tag}.json")
  files.write_json(result["files"]["json"], result)
  return result


def sample_features(model, variables, domains: Sequence[Domain], *,
                    normalization: str, per_class: int, max_pixels_per_image: int,
                    seed: int, max_images: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Encoder features of up to `per_class` pixels per class and domain (eval images).

  Sampled by the label-embedding stage's own `feature_label_batches` (features at the
  encoder's resolution, labels at the cell centres, at most `max_pixels_per_image` labelled
  cells per image, images at the evaluation resize); then `per_class` per class.
  Returns:
    (features [N, F] float32, domain_ids [N] int32, class_ids [N] int32).
  """
  rng = np.random.default_rng(seed)
  feats, doms, classes = [], [], []
  for d, dom in enumerate(domains):
    rows = list(label_embedding_stage.feature_label_batches(
        model, variables, dom, _eval_examples(dom, max_images), resize_hw=dom.eval_resize_hw,
        normalization=normalization, max_pixels_per_image=max_pixels_per_image, seed=seed + d))
    dom_feats, dom_labels = [r[0] for r in rows], [r[1] for r in rows]
    f, lab = np.concatenate(dom_feats), np.concatenate(dom_labels)
    keep = scores.sample_per_class(lab, per_class, rng)
    feats.append(f[keep])
    classes.append(lab[keep].astype(np.int32))
    doms.append(np.full(len(keep), d, np.int32))
  return np.concatenate(feats), np.concatenate(doms), np.concatenate(classes)


def tsne(config: ml_collections.ConfigDict, workdir: str, *, output: str | None = None,
         compare_workdir: str | None = None, labels: Sequence[str] = (),
         compare_config: ml_collections.ConfigDict | None = None, which: str = "best",
         per_class: int = 200, max_pixels_per_image: int = 512, perplexity: float = 30.0,
         seed: int = 0, max_images: int = 0) -> dict:
  """t-SNE of encoder features per class and domain; one panel per run.

  The second run (`compare_workdir`) is restored with `compare_config`, else its
  own `config.json`, else `config`. Writes the PNG and an .npz of the points.
  """
  runs = [(workdir, config)]
  if compare_workdir:
    modes.require_run(compare_workdir, "--compare_workdir")  # before the first run's work
    runs.append((compare_workdir,
                 compare_config or config_lib.run_config(compare_workdir, config)))
  labels = [s for s in labels if s]
  if labels and len(labels) != len(runs):
    raise config_lib.ConfigError(f"--labels names {len(labels)} panels ({labels}) but there "
                                 f"are {len(runs)} runs")
  output = output or os.path.join(workdir, "visualize", "tsne.png")
  if not output.lower().endswith(".png"):
    output = os.path.join(output, "tsne.png")
  panels, arrays, info = [], {}, []
  for r, (run_dir, run_config) in enumerate(runs):
    model, state, domains, step = restore_state(run_config, run_dir, which)
    feats, dom_ids, cls_ids = sample_features(
        model, state_lib.model_variables(state), domains, normalization=run_config.normalization,
        per_class=per_class, max_pixels_per_image=max_pixels_per_image, seed=seed,
        max_images=max_images)
    points = scores.tsne_points(feats, seed=seed, perplexity=perplexity)
    # The method the run trained with (a --config.method override is not in the file).
    method = config_lib.run_config(run_dir, run_config).get("method", run_config.method)
    title = labels[r] if labels else (
        f"{os.path.basename(os.path.normpath(run_dir))} ({method}, step {step})")
    panels.append(plots.TsnePanel(title, points, dom_ids, cls_ids,
                                  tuple(d.name for d in domains),
                                  tuple(tuple(d.classes) for d in domains)))
    arrays.update({f"points_{r}": points, f"domain_ids_{r}": dom_ids,
                   f"class_ids_{r}": cls_ids})
    info.append({"workdir": os.path.abspath(run_dir), "title": title, "step": step,
                 "method": method, "num_points": int(len(points)),
                 "domains": [d.name for d in domains]})
  plots.plot_tsne(panels, output)
  npz_path = os.path.splitext(output)[0] + ".npz"
  with files.atomic_write(npz_path, "wb") as f:
    np.savez(f, **arrays)
  return {"output": output, "points": npz_path, "panels": info}
