"""Segmenting images with a trained run: `Segmenter.from_workdir(run).predict(image, domain=...)`.

Everything comes from the run directory: the config it trained with (`config.json`), the
label spaces (`label_spaces.json`: classes, palettes, input sizes) and a checkpoint; no
dataset needs to be on disk. Images of one size share one compiled forward (per domain).
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import jax.numpy as jnp
import numpy as np

from usss_jax import config as config_lib
from usss_jax import inference, sharding
from usss_jax import state as state_lib
from usss_jax.data.base import load_rgb
from usss_jax.domains import LabelSpace, load_label_spaces

Image = Union[np.ndarray, str, os.PathLike]


class Segmenter:
  """A trained universal model: one head per training domain, and the prototypes.

  Attributes:
    workdir: the run directory.
    step: the checkpoint's training step.
    config: the run's config.
  """

  def __init__(self, workdir: str, config, label_spaces: Sequence[LabelSpace], model, state,
               step: int):
    self.workdir, self.config, self.step = workdir, config, step
    self._spaces = {s.name: s for s in label_spaces}
    self._names = tuple(s.name for s in label_spaces)
    self._model = model
    self._variables = state_lib.model_variables(state)
    self._label_embeddings = tuple(jnp.asarray(e) for e in state["label_embeddings"])
    self._predictor = inference.predictor(model, int(config.embeddings_per_class),
                                          bool(config.normalize_pixels))

  @classmethod
  def from_workdir(cls, workdir: str, checkpoint: str = "best") -> Segmenter:
    """Loads a run directory's config, label spaces and its best (or latest) checkpoint.

    Args:
      workdir: a run directory written by training (launch.py --workdir).
      checkpoint: "best" (by mean validation mIoU; the latest when there is none) or
        "latest".
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = config_lib.run_config(workdir)
    spaces = load_label_spaces(workdir)
    model, state, step = state_lib.restore(
        config, workdir, [s.num_classes for s in spaces], spaces[0].crop_hw, which=checkpoint,
        placement=sharding.replicated(sharding.single_device_mesh()))
    return cls(workdir, config, spaces, model, state, step)

  @property
  def domains(self) -> tuple[str, ...]:
    """The training domains, in head order."""
    return self._names

  def _space(self, domain: str) -> LabelSpace:
    if domain not in self._spaces:
      raise ValueError(f"domain {domain!r} is not one of this run's domains {self._names}")
    return self._spaces[domain]

  def classes(self, domain: str) -> tuple[str, ...]:
    """Class names of `domain`, index = class id."""
    return self._space(domain).classes

  def palette(self, domain: str) -> np.ndarray:
    """[C, 3] uint8 colours of `domain`'s classes."""
    return self._space(domain).palette_array()

  def colorize(self, mask: np.ndarray, domain: str) -> np.ndarray:
    """[H, W] class ids of `domain` -> [H, W, 3] uint8 colours."""
    return inference.colorize(mask, self.palette(domain))

  def _batch(self, images: Image | Sequence[Image], space: LabelSpace):
    single = isinstance(images, (str, os.PathLike)) or (isinstance(images, np.ndarray) and
                                                        images.ndim == 3)
    items = [images] if single else list(images)
    arrays = [load_rgb(os.fspath(x)) if isinstance(x, (str, os.PathLike)) else np.asarray(x)
              for x in items]
    for a in arrays:
      if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected [H, W, 3] uint8 images, got {a.dtype} {a.shape}")
    if len({a.shape for a in arrays}) != 1:
      raise ValueError("images of one call must have one size, got "
                       f"{sorted({a.shape for a in arrays})}")
    x = np.stack([inference.preprocess(a, resize_hw=space.eval_resize_hw,
                                       normalization=self.config.normalization)
                  for a in arrays])
    return single, x, arrays[0].shape[:2]

  def predict(self, images: Image | Sequence[Image], domain: str) -> np.ndarray:
    """Segments images in `domain`'s label space with its head.

    Args:
      images: an [H, W, 3] uint8 array or an image path, or a sequence of them (one size).
      domain: a training domain (its classes, `classes(domain)`).
    Returns:
      [H, W] uint8 class ids at the image's own size ([N, H, W] for a sequence).
    """
    space = self._space(domain)
    single, x, hw = self._batch(images, space)
    heads, _ = self._predictor(self._variables, x, (), hw)
    masks = np.asarray(heads[self._names.index(domain)]).astype(np.uint8)
    return masks[0] if single else masks

  def predict_any(self, images: Image | Sequence[Image], label_space: str) -> np.ndarray:
    """Segments images in `label_space`'s classes through its prototypes (no head of its own
    is needed: the pixel embedding is scored against that domain's label embeddings).

    Args:
      images: as `predict` (preprocessed as `label_space`'s evaluation images).
      label_space: a training domain whose classes to predict.
    Returns:
      [H, W] uint8 class ids ([N, H, W] for a sequence).
    """
    if int(self.config.embedding_dim) <= 0:
      raise ValueError("predict_any needs the entropy module: the run's embedding_dim is 0")
    space = self._space(label_space)
    single, x, hw = self._batch(images, space)
    _, protos = self._predictor(self._variables, x,
                                (self._label_embeddings[self._names.index(label_space)],), hw)
    masks = np.asarray(protos[0]).astype(np.uint8)
    return masks[0] if single else masks
