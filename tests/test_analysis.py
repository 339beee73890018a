"""Beyond-the-paper tools: prototype prediction, label correspondence, t-SNE, and their CLI."""

import importlib.util
import json
import os

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import TINY
from usss_jax import checkpoint as ckpt_lib
from usss_jax import inference, metrics, objectives, sharding
from usss_jax import state as state_lib
from usss_jax.analysis import __main__ as cli
from usss_jax.analysis import commands, plots, scores
from usss_jax.data import demo, registry
from usss_jax.domains import Domain, build_domains
from usss_jax.label_embeddings import stats, store
from usss_jax.models import universal

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_side=50):
  assert os.path.getsize(path) > 0, path
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE, path
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    assert im.format == "PNG" and min(im.size) >= min_side, (path, im.size)


def numpy_prototype_scores(pixels, prototypes, k):
  """Float64 reference: dot with L2-normalised prototypes, best of each class's K."""
  p = np.asarray(prototypes, np.float64)
  p = p / np.linalg.norm(p, axis=1, keepdims=True)
  scores = np.asarray(pixels, np.float64) @ p.T
  return scores.reshape(*scores.shape[:-1], -1, k).max(-1)


def random_tree(shapes, seed=0):
  """Concrete values for a tree of ShapeDtypeStructs without running (and compiling) an init.

  Conv kernels ~ N(0, 2 / fan_in), BN scales and running variances 1, the rest 0.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in), leaf.dtype)
    if name in ("scale", "var"):
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.zeros(leaf.shape, leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


# ---------------------------------------------------------------------------- pure maths

@pytest.mark.parametrize("k", [1, 3])
def test_prototype_logits_matches_float64_reference(k):
  rng = np.random.default_rng(k)
  pixels = rng.normal(size=(2, 5, 7, 6)).astype(np.float32) * 4.0
  prototypes = rng.normal(size=(4 * k, 6)).astype(np.float32) * rng.uniform(0.2, 5, (4 * k, 1))
  got = np.asarray(jax.jit(inference.prototype_scores, static_argnums=2)(
      jnp.asarray(pixels), jnp.asarray(prototypes), k))
  assert got.shape == (2, 5, 7, 4) and got.dtype == np.float32
  np.testing.assert_allclose(got, numpy_prototype_scores(pixels, prototypes, k),
                             rtol=1e-5, atol=1e-5)
  # Cosine mode: scores are the reference's divided by each pixel's norm.
  cos = np.asarray(inference.prototype_scores(jnp.asarray(pixels), jnp.asarray(prototypes), k,
                                              normalize_pixels=True))
  norms = np.linalg.norm(pixels.astype(np.float64), axis=-1, keepdims=True)
  np.testing.assert_allclose(cos, numpy_prototype_scores(pixels, prototypes, k) / norms,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_prototype_argmax_is_nearest_prototype_by_cosine(k):
  rng = np.random.default_rng(10 + k)
  pixels = rng.normal(size=(1, 9, 11, 5))
  pixels /= np.linalg.norm(pixels, axis=-1, keepdims=True)
  prototypes = rng.normal(size=(6 * k, 5)) * rng.uniform(0.5, 3, (6 * k, 1))
  pred = np.asarray(jnp.argmax(inference.prototype_scores(
      jnp.asarray(pixels, jnp.float32), jnp.asarray(prototypes, jnp.float32), k), -1))
  # Nearest-neighbour search in Euclidean distance among unit vectors = best cosine.
  unit = prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True)
  dist = np.linalg.norm(pixels[..., None, :] - unit, axis=-1)  # [1, H, W, C*K]
  nearest_class = np.argmin(dist, axis=-1) // k
  np.testing.assert_array_equal(pred, nearest_class)
  # Not a constant map: the check above could not pass by accident.
  assert len(np.unique(pred)) >= 3


def test_prototype_logits_rejects_bad_shapes():
  with pytest.raises(ValueError, match="match the pixel embedding"):
    inference.prototype_scores(jnp.zeros((1, 2, 2, 4)), jnp.ones((3, 5)))
  with pytest.raises(ValueError, match="not a multiple of k=2"):
    inference.prototype_scores(jnp.zeros((1, 2, 2, 4)), jnp.ones((3, 4)), 2)


def test_prototype_similarity_hand_built():
  # A: two classes with K=2; B: three classes with K=1, in 2-D.
  a = np.array([[1, 0], [0, 3],        # class 0: x axis and y axis
                [-1, 0], [-1, -1]])    # class 1: -x and the -x-y diagonal
  b = np.array([[2, 0], [0, -1], [1, 1]])
  got = scores.prototype_similarity(a, b, k_a=2, k_b=1)
  s = 1 / np.sqrt(2)
  want = np.array([[1.0, 0.0, s],           # best of (x, y) vs each of B
                   [-s, s, -s]])            # best of (-x, -diag): x gets -s, not -1
  np.testing.assert_allclose(got, want, atol=1e-12)
  with pytest.raises(ValueError, match="same D"):
    scores.prototype_similarity(a, np.ones((2, 3)))


def test_cooccurrence_and_row_normalize_hand_built():
  labels = np.array([[0, 0, 1, 255], [2, 1, 1, 0]])
  preds = np.array([[1, 1, 0, 2], [0, 2, 0, 0]])
  # A's ground truth against B's predictions: the confusion matrix of two label spaces.
  confusion = np.asarray(metrics.confusion_matrix(jnp.asarray(preds), jnp.asarray(labels), 4,
                                                  num_predicted=3))
  assert confusion.shape == (4, 4) and confusion[:, 3].sum() == 0
  counts = confusion[:, :3]
  want = np.array([[1, 2, 0],    # class 0: predicted 1, 1, 0
                   [2, 0, 1],    # class 1: predicted 0, 2, 0
                   [1, 0, 0],    # class 2: predicted 0
                   [0, 0, 0]])   # class 3 absent; the 255 pixel does not count
  np.testing.assert_array_equal(counts, want)
  fractions = scores.row_normalize(counts)
  np.testing.assert_allclose(fractions, want / np.maximum(want.sum(1, keepdims=True), 1))
  np.testing.assert_array_equal(fractions[3], 0.0)
  matches = scores.best_matches(fractions, ["a0", "a1", "a2", "a3"], ["b0", "b1", "b2"],
                                   valid_rows=counts.sum(1) > 0)
  assert [(m["class_b"], m["score"]) for m in matches] == [
      ("b1", pytest.approx(2 / 3)), ("b0", pytest.approx(2 / 3)), ("b0", 1.0), (None, None)]
  assert matches[0]["runner_up"] == "b0"
  # Predictions outside B's classes land in the last column.
  shifted = np.asarray(metrics.confusion_matrix(jnp.asarray(preds + 1), jnp.asarray(labels), 4,
                                                num_predicted=3))
  assert shifted[:, 3].sum() == np.sum((preds + 1 == 3) & (labels != 255))


def test_cell_centre_labels():
  label = np.arange(36 * 50).reshape(36, 50) % 7
  got = np.asarray(stats.cell_centre_labels(label, (5, 7)))  # ceil(36/8), ceil(50/8)
  assert got.shape == (5, 7)
  for i in range(5):
    for j in range(7):
      y, x = 4 + 8 * i, 4 + 8 * j
      assert got[i, j] == (label[y, x] if y < 36 and x < 50 else 255), (i, j)
  assert got[4, 0] == 255 and got[0, 6] == 255  # centres 36 and 52 lie outside


def test_sample_per_class_caps_each_class():
  labels = np.array([0] * 10 + [1] * 3 + [255] * 5 + [4] * 7)
  idx = scores.sample_per_class(labels, 4, np.random.default_rng(0))
  picked = labels[idx]
  assert np.all(np.diff(idx) > 0)
  assert {c: int(np.sum(picked == c)) for c in (0, 1, 4, 255)} == {0: 4, 1: 3, 4: 4, 255: 0}


# ---------------------------------------------------------------------------- figures

def test_heatmap_and_tsne_write_valid_pngs(tmp_path):
  heat = plots.plot_heatmap(np.array([[0.1, 0.9, 0.0], [0.5, 0.25, 0.25]]),
                                ["sky", "road"], ["ceiling", "floor", "wall"],
                                str(tmp_path / "sub" / "heat.png"), title="t", xlabel="B",
                                ylabel="A", vmin=0, vmax=1)
  assert_png(heat)
  with pytest.raises(ValueError, match="does not fit"):
    plots.plot_heatmap(np.zeros((2, 2)), ["a"], ["b", "c"], str(tmp_path / "x.png"),
                           title="", xlabel="", ylabel="")

  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 8)) * 10
  classes = np.repeat([0, 1, 0, 1], 15)
  domains = np.repeat([0, 0, 1, 1], 15)
  feats = centres[np.repeat(np.arange(4), 15)] + rng.normal(size=(60, 8))
  points = scores.tsne_points(feats, seed=3)
  assert points.shape == (60, 2) and np.all(np.isfinite(points))
  np.testing.assert_array_equal(points, scores.tsne_points(feats, seed=3))
  # Well separated clusters stay separated: each point's nearest neighbour is in its cluster.
  d = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.eye(60) * 1e9
  cluster = np.repeat(np.arange(4), 15)
  assert np.mean(cluster[np.argmin(d, 1)] == cluster) > 0.95
  panel = plots.TsnePanel("run", points, domains, classes, ("street", "indoor"),
                              (("road", "sky"), ("floor", "wall")))
  path = plots.plot_tsne([panel, panel], str(tmp_path / "tsne.png"))
  assert_png(path)
  with Image.open(path) as im:
    assert im.size[0] > 1.25 * im.size[1]  # two panels side by side (the legend below them)


# ---------------------------------------------------------------------------- model level

@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  demo.ensure_demo_data(str(root), num_train=8, num_val=2, size=(40, 56))
  return str(root)


def test_agreement_is_one_when_head_is_the_folded_prototype_classifier(small_demo):
  """A head equal to embedding-conv @ normalised prototypes predicts exactly the prototypes."""
  reader = registry.get_reader("folder", os.path.join(small_demo, "indoor"))
  dom = Domain("indoor", reader, labeled=[], eval_examples=reader.list_examples("val"), index=1)
  c = reader.spec.num_classes
  # The same model as the CLI test's config builds, so both share one compilation.
  model = universal.UniversalSegmenter(encoder_channels=TINY, num_classes=(5, c),
                                       embedding_dim=6)
  variables = random_tree(jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 40, 56, 3)), train=False)))
  prototypes = np.random.default_rng(1).normal(size=(c, 6)).astype(np.float32)
  unit = prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True)

  random_head = commands.prototype_agreement(model, variables, dom, prototypes, k=1,
                                             normalization="imagenet")
  params = jax.tree.map(np.asarray, variables["params"])
  emb = params["embedding"]
  params["head_1"] = {"kernel": np.einsum("abfd,cd->abfc", emb["kernel"], unit),
                      "bias": emb["bias"] @ unit.T}
  folded = commands.prototype_agreement(model, {**variables, "params": params}, dom,
                                        prototypes, k=1, normalization="imagenet")
  assert folded["num_images"] == 2
  assert folded["agreement"] > 0.999
  assert folded["prototypes"]["miou"] == pytest.approx(folded["head"]["miou"], abs=2e-3)
  # The prototype side does not depend on the head; the random head disagrees.
  assert folded["prototypes"]["miou"] == pytest.approx(random_head["prototypes"]["miou"])
  assert random_head["agreement"] < 0.9


# ---------------------------------------------------------------------------- CLI end to end

CONFIG_TEMPLATE = """
import sys
sys.path.insert(0, {tests!r})
from helpers import tiny_demo_config

def get_config():
  return tiny_demo_config({root!r}, embedding_dim=6, total_steps=4, checkpoint_every=4,
                          log_every=4, eval_max_examples=2,
                          **{{"domains.street.generate_demo": False,
                              "domains.indoor.generate_demo": False}})
"""


@pytest.fixture(scope="module")
def analysis_run(small_demo, tmp_path_factory):
  """A run directory as training leaves it: config file, checkpoint at step 4.

  The state has the tree of `state.initial_state`, random weights and the label
  embeddings of source "random"; it is not trained, because compiling a train
  step (or even an init) would dominate the test time. Restoring goes through
  the same state tree and checkpoint layout as for a trained run.
  Returns (config file, workdir, config).
  """
  base = tmp_path_factory.mktemp("vis_run")
  config_path = base / "tiny_config.py"
  config_path.write_text(CONFIG_TEMPLATE.format(root=small_demo,
                                                tests=os.path.dirname(__file__)))
  spec = importlib.util.spec_from_file_location("tiny_vis_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  workdir = str(base / "run")
  domains = build_domains(config, workdir)
  num_classes = [d.num_classes for d in domains]
  model = state_lib.make_model(config, num_classes)
  tx, _ = state_lib.make_optimizer(config)
  embs = [store.random_embeddings(d.num_classes, 1, config.embedding_dim, config.seed + i)
          for i, d in enumerate(domains)]
  state = random_tree(state_lib.abstract_state(
      config, model, tx, objectives.method_spec(config), tuple(config.domains.street.crop),
      num_classes, sharding.replicated(sharding.single_device_mesh())), seed=3)
  state["label_embeddings"] = tuple(jnp.asarray(e) for e in embs)
  state["step"] = jnp.asarray(4, jnp.int32)
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as checkpointer:
    checkpointer.save(4, state, extra={"data": {}})  # no best: "best" falls back to latest
  return str(config_path), workdir, config


def run_analysis(command, config_path, workdir, *extra):
  fv = flags.FlagValues()
  cli.define_flags(fv)
  rest = fv(["analysis", command, f"--config={config_path}", f"--workdir={workdir}", *extra])
  assert rest[1:] == [command]
  return cli.run_command(command, fv)


def test_cli_end_to_end(analysis_run, small_demo, tmp_path):
  config_path, workdir, config = analysis_run
  model, state, domains, step = commands.restore_state(config, workdir)
  assert step == 4

  # predict_any: indoor's label space on street images.
  images = os.path.join(small_demo, "street", "images", "val")
  out = run_analysis("predict_any", config_path, workdir, f"--input={images}",
                "--label_space=indoor", f"--output={tmp_path / 'any'}")
  assert out["images"] == 2 and out["label_space"] == "indoor" and out["step"] == 4
  agreement = json.loads((tmp_path / "any" / "agreement.json").read_text())
  assert 0 <= agreement["agreement"] <= 1 and agreement["num_images"] == 2
  assert_png(str(tmp_path / "any" / "legend.png"))
  # The mask is the argmax of the float64 prototype scores of the restored model.
  stem = sorted(os.listdir(images))[0][:-4]
  mask = np.asarray(Image.open(tmp_path / "any" / f"{stem}_mask.png"))
  image = np.asarray(Image.open(os.path.join(images, f"{stem}.png")).convert("RGB"))
  x = commands._network_input(image, domains[1], config.normalization)
  embed = jax.jit(lambda v, x: model.apply(v, x, train=False, logits=False, embedding=True))
  pixel = np.asarray(embed(state_lib.model_variables(state), x)["embedding"])
  want = np.argmax(numpy_prototype_scores(pixel, state["label_embeddings"][1], 1), -1)[0]
  assert mask.shape == image.shape[:2]
  assert np.mean(mask == want) > 0.999

  # correspondence: street rows, indoor columns.
  out = run_analysis("correspondence", config_path, workdir, "--domain_a=street",
                "--domain_b=indoor", f"--output={tmp_path / 'corr'}")
  for key in ("similarity_png", "cooccurrence_png"):
    assert_png(out["files"][key])
  random_embs = [store.random_embeddings(5, 1, 6, config.seed + i) for i in (0, 1)]
  np.testing.assert_allclose(out["similarity"], numpy_cosine(*random_embs), atol=1e-6)
  counts = np.asarray(out["cooccurrence_counts"])
  labelled = sum(int(np.sum(domains[0].reader.load_example(ex)["label"] != 255))
                 for ex in domains[0].eval_examples)
  assert counts.sum() == labelled
  rows = np.asarray(out["cooccurrence"])
  np.testing.assert_allclose(rows.sum(1)[counts.sum(1) > 0], 1.0)
  table = open(out["files"]["markdown"]).read()
  assert all(f"| {name} |" in table for name in domains[0].reader.spec.classes)
  saved = json.load(open(out["files"]["json"]))
  assert saved["cooccurrence_counts"] == out["cooccurrence_counts"]

  # tsne: the run against itself gives two identical panels.
  png = tmp_path / "tsne" / "tsne.png"
  out = run_analysis("tsne", config_path, workdir, f"--output={png}",
                     f"--compare_workdir={workdir}",
                "--labels=first,second", "--per_class=8", "--max_pixels_per_image=32")
  assert_png(str(png))
  points = np.load(out["points"])
  assert points["points_0"].shape[1] == 2 and len(points["points_0"]) >= 20
  np.testing.assert_array_equal(points["points_0"], points["points_1"])
  counts = np.bincount(points["domain_ids_0"] * 5 + points["class_ids_0"])
  assert counts.max() <= 8
  assert [p["title"] for p in out["panels"]] == ["first", "second"]


def numpy_cosine(a, b):
  a = a / np.linalg.norm(a, axis=1, keepdims=True)
  b = b / np.linalg.norm(b, axis=1, keepdims=True)
  return a.astype(np.float64) @ b.T.astype(np.float64)


def test_cli_errors_name_the_problem(analysis_run):
  config_path, workdir, _ = analysis_run
  with pytest.raises(ValueError, match="--label_space='kitchen'"):
    run_analysis("predict_any", config_path, workdir, f"--input={workdir}", "--label_space=kitchen")
  with pytest.raises(ValueError, match="--labels names 2 panels"):
    run_analysis("tsne", config_path, workdir, "--labels=a,b")
  with pytest.raises(Exception, match="unknown command"):
    run_analysis("nonsense", config_path, workdir)
  with pytest.raises(Exception, match="no such run directory"):
    run_analysis("correspondence", config_path, os.path.join(workdir, "missing"),
            "--domain_a=street", "--domain_b=indoor")
