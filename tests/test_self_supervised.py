"""Dense contrastive pretraining: the loss against NumPy, the views' cell correspondence on a
real image, the hold-out exclusion, the CLI's encoder.npz loading into the segmenter, and the
cached stage before training."""

import copy
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import demo_overrides, final_state_and_results, run_cli, tiny_demo_config
from usss_jax import config as config_lib
from usss_jax import convert, modes
from usss_jax import state as state_lib
from usss_jax.data import registry, splits, strong_augment, transforms
from usss_jax.domains import build_domains
from usss_jax.self_supervised import data as data_lib
from usss_jax.self_supervised import dense_contrastive as dc
from usss_jax.self_supervised import pretrain
from usss_jax.self_supervised import views

ROOT = pathlib.Path(__file__).resolve().parents[1]
OFFSETS = np.array([[1, -2], [0, 0], [-2, 3]], np.int32)


def _unit(rng, shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference(z1, z2, offsets, temperature, radius=0):
  """float64 loops: every cell of view 1 with a counterpart vs all cells of view 2, and back;
  with `radius`, same-image cells within that Chebyshev distance of the positive are skipped."""
  b, h, w, _ = z1.shape

  def one_direction(q, k, sign):
    keys = k.reshape(-1, k.shape[-1])
    losses, hits = [], []
    for n in range(b):
      dy, dx = sign * offsets[n]
      for i in range(h):
        for j in range(w):
          # Cell (i, j) of the query view lies at (i - dy, j - dx) in the key view.
          ti, tj = i - dy, j - dx
          if not (0 <= ti < h and 0 <= tj < w):
            continue
          target = n * h * w + ti * w + tj
          keep = [m for m in range(len(keys))
                  if m == target or not (radius and m // (h * w) == n
                                         and abs(m % (h * w) // w - ti) <= radius
                                         and abs(m % w - tj) <= radius)]
          logits = keys[keep] @ q[n, i, j] / temperature
          position = keep.index(target)
          losses.append(np.log(np.sum(np.exp(logits))) - logits[position])
          hits.append(np.argmax(logits) == position)
    return np.mean(losses), np.mean(hits)

  loss_12, acc_12 = one_direction(z1, z2, 1)
  loss_21, acc_21 = one_direction(z2, z1, -1)
  return 0.5 * (loss_12 + loss_21), 0.5 * (acc_12 + acc_21)


def test_correspondence_names_the_cell_showing_the_same_content():
  targets, valid = dc.cell_correspondence((3, 4), OFFSETS)
  targets, valid = np.asarray(targets), np.asarray(valid)
  # Image 0, dy=1, dx=-2: view-1 cell (a, b) is view-2 cell (a - 1, b + 2).
  assert valid[0].reshape(3, 4).tolist() == [[False] * 4, [True, True, False, False],
                                             [True, True, False, False]]
  assert targets[0][1 * 4 + 0] == 0 * 4 + 2 and targets[0][2 * 4 + 1] == 1 * 4 + 3
  # No offset: every cell is its own positive.
  assert valid[1].all() and targets[1].tolist() == list(range(12))
  # dy=-2, dx=3: view-1 cell (0, 3) is view-2 cell (2, 0), and nothing else overlaps.
  assert valid[2].sum() == 1 and targets[2][3] == 2 * 4 + 0


@pytest.mark.parametrize("temperature, radius", [(0.2, 0), (1.0, 0), (0.2, 1), (0.5, 9)])
def test_loss_matches_float64_reference(temperature, radius):
  rng = np.random.default_rng(0)
  z1, z2 = _unit(rng, (3, 3, 4, 5)), _unit(rng, (3, 3, 4, 5))
  # Make some positives the nearest neighbours so that the accuracy is not trivially 0.
  z2[1] = z1[1] + 0.05 * rng.normal(size=z1[1].shape)
  z2 /= np.linalg.norm(z2, axis=-1, keepdims=True)
  expected_loss, expected_acc = _reference(z1, z2, OFFSETS, temperature, radius)
  with jax.enable_x64(True):
    loss, metrics = jax.jit(dc.dense_contrastive_loss, static_argnums=(3, 4))(
        jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(OFFSETS), temperature, radius)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-12)
    np.testing.assert_allclose(float(metrics["accuracy"]), expected_acc, rtol=1e-12)
    assert 0 < expected_acc < 1
    np.testing.assert_allclose(float(metrics["overlap"]), (4 + 12 + 1) / 36, rtol=1e-6)
  loss32, _ = jax.jit(dc.dense_contrastive_loss, static_argnums=(3, 4))(
      jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), jnp.asarray(OFFSETS),
      temperature, radius)
  np.testing.assert_allclose(float(loss32), expected_loss, rtol=1e-5)


def test_groups_are_one_batch_of_negatives():
  """Per-domain groups give the same loss as one concatenated batch of the same crop size."""
  rng = np.random.default_rng(1)
  z1, z2 = _unit(rng, (3, 3, 4, 5)), _unit(rng, (3, 3, 4, 5))
  loss = jax.jit(dc.dense_contrastive_loss)
  whole, m_whole = loss(z1, z2, OFFSETS)
  grouped, m_grouped = loss([z1[:1], z1[1:]], [z2[:1], z2[1:]],
                                                 [OFFSETS[:1], OFFSETS[1:]])
  np.testing.assert_allclose(float(grouped), float(whole), rtol=1e-6)
  np.testing.assert_allclose(float(m_grouped["accuracy"]), float(m_whole["accuracy"]))


@pytest.mark.parametrize("radius", [0, 1])
def test_gradient_matches_finite_differences(radius):
  rng = np.random.default_rng(2)
  raw1, raw2 = rng.normal(size=(2, 2, 3, 4)), rng.normal(size=(2, 2, 3, 4))
  offsets = np.array([[1, 1], [0, -1]], np.int32)
  with jax.enable_x64(True):
    @jax.jit
    def loss(a, b):
      return dc.dense_contrastive_loss(dc.l2_normalize(a), dc.l2_normalize(b), offsets, 0.3,
                                       radius)[0]
    g1, g2 = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(raw1), jnp.asarray(raw2))
    eps = 1e-6
    for raw, grad, which in ((raw1, g1, 0), (raw2, g2, 1)):
      numeric = np.zeros_like(raw)
      for index in np.ndindex(raw.shape):
        plus, minus = raw.copy(), raw.copy()
        plus[index] += eps
        minus[index] -= eps
        args_p = (plus, raw2) if which == 0 else (raw1, plus)
        args_m = (minus, raw2) if which == 0 else (raw1, minus)
        numeric[index] = (float(loss(*args_p)) - float(loss(*args_m))) / (2 * eps)
      np.testing.assert_allclose(np.asarray(grad), numeric, rtol=1e-6, atol=1e-9)
      assert np.abs(numeric).max() > 1e-3


def _real_image(shared_data_dir):
  path = shared_data_dir / "camvid" / "train" / "0001TP_006690.png"
  if not path.exists():
    pytest.skip(f"SKIPPED LOUDLY: {path} is absent")
  image = np.asarray(Image.open(path).convert("RGB"))
  return transforms.resize(image, None, (180, 240))[0]  # camvid_iddlite's resize


def test_views_agree_on_overlapping_cells_of_a_real_image(shared_data_dir):
  image = _real_image(shared_data_dir)
  cfg = views.ViewConfig(crop_hw=(96, 128), max_shift_cells=(3, 4), scale_range=(0.8, 1.2))
  seen = set()
  for seed in range(12):
    view_1, view_2, (dy, dx) = views.geometric_pair(image, np.random.default_rng(seed), cfg)
    assert view_1.shape == view_2.shape == (96, 128, 3)
    assert abs(dy) <= 3 and abs(dx) <= 4
    seen.add((dy, dx))
    h, w = 12, 16
    for i in range(h):
      for j in range(w):
        a, b = i + dy, j + dx  # view-2 cell (i, j) shows view-1 cell (i + dy, j + dx)
        if 0 <= a < h and 0 <= b < w:
          np.testing.assert_array_equal(view_2[8 * i:8 * i + 8, 8 * j:8 * j + 8],
                                        view_1[8 * a:8 * a + 8, 8 * b:8 * b + 8])
    # The same seed gives the same views; two_views draws the same geometry, then noise.
    noisy_1, noisy_2, offset = views.two_views(image, np.random.default_rng(seed), cfg)
    assert offset == (dy, dx)
    again = views.two_views(image, np.random.default_rng(seed), cfg)
    np.testing.assert_array_equal(again[0], noisy_1)
    np.testing.assert_array_equal(again[1], noisy_2)
  assert len(seen) > 4  # the offsets vary, so positives are not at fixed positions


def test_views_without_noise_are_the_geometric_pair(shared_data_dir):
  image = _real_image(shared_data_dir)
  off = strong_augment.StrongAugmentConfig(color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
  cfg = views.ViewConfig(strong=off)
  noisy = views.two_views(image, np.random.default_rng(5), cfg)
  clean = views.geometric_pair(image, np.random.default_rng(5), cfg)
  for a, b in zip(noisy[:2], clean[:2]):
    np.testing.assert_array_equal(a, b)


def test_view_config_rejects_non_overlapping_or_unaligned_views():
  with pytest.raises(ValueError, match="multiples of 8"):
    views.ViewConfig(crop_hw=(90, 128))
  with pytest.raises(ValueError, match="overlapping"):
    views.ViewConfig(crop_hw=(32, 32), max_shift_cells=(4, 1))


def test_pretraining_images_are_the_pools_without_holdout_or_labels(shared_data_dir, tmp_path):
  config = config_lib.load_config("camvid_iddlite", "validation")
  config.domains.camvid.root = str(shared_data_dir / "camvid")
  config.domains.idd_lite.root = str(shared_data_dir / "idd_lite")
  domains = {d.name: d for d in data_lib.unlabeled_domains(build_domains(config, str(tmp_path)))}
  idd = registry.get_reader("idd_lite", str(shared_data_dir / "idd_lite"))
  held_out, rest = splits.hold_out(idd.list_examples("train"), 200)
  keys = [ex.key for ex in domains["idd_lite"].examples]
  assert keys == sorted(ex.key for ex in rest)
  assert not set(keys) & {ex.key for ex in held_out}
  camvid = domains["camvid"].examples
  assert len(camvid) == 92  # the train subset only, never val or test
  assert all(ex.label_path is None for d in domains.values() for ex in d.examples)
  stream = data_lib.ViewPairStream(list(domains.values()), 2, seed=0, prefetch=0)
  batch = stream.make_batch()
  assert batch["idd_lite"]["view_1"].shape == (2, 96, 128, 3)
  assert batch["camvid"]["offsets"].shape == (2, 2)
  again = data_lib.ViewPairStream(list(domains.values()), 2, seed=0, prefetch=0).make_batch()
  np.testing.assert_array_equal(again["camvid"]["view_2"], batch["camvid"]["view_2"])


def _assert_loads_into_the_segmenter(config, encoder_path):
  """The encoder file replaces the segmenter's encoder variables, BN statistics included."""
  config = copy.deepcopy(config)
  config.pretrained = str(encoder_path)
  state = {"params": {"encoder": {}}, "batch_stats": {"encoder": {}}}
  loaded = state_lib.load_pretrained_encoder(config, state)
  saved = convert.load_state_dict(encoder_path)
  np.testing.assert_array_equal(np.asarray(loaded["params"]["encoder"]["layer0"]["0"]["kernel"]),
                                saved["layer0.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(loaded["batch_stats"]["encoder"]["layer8"]["1"]["var"]),
                                saved["layer8.1.running_var"])
  # Pretraining moved the BN statistics away from their initialisation.
  assert not np.allclose(saved["layer8.1.running_mean"], 0)


@pytest.mark.slow
def test_cli_writes_an_encoder_the_segmenter_loads(demo_root, tmp_path):
  workdir = tmp_path / "ssl"
  done = run_cli(f"--config={ROOT}/configs/demo.py", f"--workdir={workdir}",
                 *demo_overrides(demo_root), "--config.self_supervised.steps=3",
                 "--config.self_supervised.batch_per_domain=2",
                 "--config.self_supervised.log_every=1",
                 "--config.self_supervised.max_shift_cells=(2, 3)",
                 module="usss_jax.self_supervised", timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in lines] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in lines)
  assert json.load(open(workdir / "pretrain.json"))["options"]["max_shift_cells"] == [2, 3]
  _assert_loads_into_the_segmenter(tiny_demo_config(demo_root), workdir / "encoder.npz")


def _pretrain(config, workdir):
  return pretrain.pretrain(config, str(workdir), pretrain.PretrainOptions.from_config(config),
                           build_domains(config, str(workdir)), log=lambda line: None)


@pytest.mark.slow
def test_an_interrupted_pretraining_resumes_to_the_same_encoder(demo_root, tmp_path, monkeypatch):
  config = tiny_demo_config(demo_root, checkpoint_every=2, **{
      "self_supervised.steps": 6, "self_supervised.batch_per_domain": 2,
      "self_supervised.log_every": 1, "self_supervised.max_shift_cells": (2, 3)})
  whole = _pretrain(config, tmp_path / "whole")
  # The data thread fails making the 6th batch, two batches ahead of the last checkpoint (4).
  make_batch, made = data_lib.ViewPairStream.make_batch, []
  def failing(self):
    made.append(1)
    if len(made) == 6:
      raise OSError("disk gone")
    return make_batch(self)
  monkeypatch.setattr(data_lib.ViewPairStream, "make_batch", failing)
  with pytest.raises(OSError, match="disk gone"):
    _pretrain(config, tmp_path / "cut")
  assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["4"]
  assert not (tmp_path / "cut" / "encoder.npz").exists()
  monkeypatch.setattr(data_lib.ViewPairStream, "make_batch", make_batch)
  resumed = _pretrain(config, tmp_path / "cut")
  a, b = np.load(whole["encoder"]), np.load(resumed["encoder"])
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  lines = [json.loads(line) for line in open(tmp_path / "cut" / "metrics.jsonl")]
  reference = [json.loads(line) for line in open(tmp_path / "whole" / "metrics.jsonl")]
  assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]  # step 5 once, from the resumed run
  assert [r["loss"] for r in lines] == [r["loss"] for r in reference]
  # Resuming with other options is one error naming the record and the fix.
  other = copy.deepcopy(config)
  other.self_supervised.steps = 8
  (tmp_path / "cut" / "encoder.npz").unlink()
  with pytest.raises(ValueError, match=r"pretrain\.json: the checkpoint at step 4 was pretrained "
                     r"with other options .* remove"):
    _pretrain(other, tmp_path / "cut")


@pytest.mark.slow
def test_sigterm_stops_the_pretraining_with_a_checkpoint_and_the_command_resumes(
    demo_root, tmp_path):
  workdir = tmp_path / "ssl"
  args = [f"--config={ROOT}/configs/demo.py", f"--workdir={workdir}", *demo_overrides(demo_root),
          "--config.self_supervised.steps=400", "--config.self_supervised.batch_per_domain=2",
          "--config.self_supervised.log_every=1", "--config.checkpoint_every=1000",
          "--config.self_supervised.max_shift_cells=(2, 3)"]
  process = subprocess.Popen([sys.executable, "-m", "usss_jax.self_supervised", *args],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while not ((workdir / "metrics.jsonl").exists() and
             len(open(workdir / "metrics.jsonl").read().splitlines()) >= 3):
    if process.poll() is not None or time.time() > deadline:
      process.kill()
      pytest.fail("the pretraining ended or hung before its third step:\n" +
                  process.communicate()[0][-3000:])
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=300)[0]
  assert process.returncode == 0, output[-3000:]
  step = int(re.search(r"stopped by SIGTERM at step (\d+)", output).group(1))
  assert 3 <= step < 400 and os.listdir(workdir / "checkpoints") == [str(step)]
  assert not (workdir / "encoder.npz").exists()
  done = run_cli(*args, module="usss_jax.self_supervised", timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"resuming the pretraining at step {step}" in done.stderr
  steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
  assert steps == list(range(1, 401))
  assert (workdir / "encoder.npz").exists()


@pytest.mark.slow
def test_stage_pretrains_once_and_the_run_starts_from_its_encoder(demo_root, tmp_path):
  ssl = {"self_supervised.steps": 2, "self_supervised.batch_per_domain": 2,
         "self_supervised.max_shift_cells": (2, 3)}
  config = tiny_demo_config(demo_root, method="basic", total_steps=2, eval_every=2, **ssl)
  workdir = str(tmp_path / "run")
  modes.train(config, workdir)
  encoder = os.path.join(workdir, "self_supervised", "encoder.npz")
  _assert_loads_into_the_segmenter(config, encoder)
  stamp = os.stat(encoder).st_mtime_ns
  # The run started from it: with the same seed, a run without the stage has another encoder.
  plain = str(tmp_path / "plain")
  modes.train(tiny_demo_config(demo_root, method="basic", total_steps=2, eval_every=2), plain)
  with_stage, _ = final_state_and_results(config, workdir)
  without, _ = final_state_and_results(config, plain)
  def kernel(state):
    return np.asarray(state["params"]["encoder"]["layer0"]["0"]["kernel"])
  assert not np.allclose(kernel(with_stage), kernel(without))
  # The finished run evaluates from its own config.json (which names the stage's encoder).
  assert modes.evaluate_checkpoint(config_lib.run_config(workdir), workdir)["step"] == 2
  # Resumed longer: the finished pretraining is reused, not redone.
  longer = tiny_demo_config(demo_root, method="basic", total_steps=4, eval_every=2, **ssl)
  modes.train(longer, workdir)
  assert os.stat(encoder).st_mtime_ns == stamp
  # Other options than the cached pretraining's: one error naming the file and the fix.
  other = tiny_demo_config(demo_root, method="basic", total_steps=4, eval_every=2,
                           **{**ssl, "self_supervised.temperature": 0.5})
  with pytest.raises(ValueError, match=r"pretrain\.json: pretrained with other options.*remove"):
    modes.train(other, workdir)


def test_stage_refuses_a_second_source_of_starting_weights(demo_root, tmp_path):
  config = tiny_demo_config(demo_root, **{"self_supervised.steps": 2,
                                          "pretrained": str(tmp_path / "x.npz")})
  with pytest.raises(ValueError, match="config.pretrained also sets the starting weights"):
    modes.check_config(config)
