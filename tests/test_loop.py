"""The training program end to end on the demo data: resume, eval/predict modes, errors, logs."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from PIL import Image

from helpers import (ROOT, TINY_RUN, assert_same_params, build_train_step, demo_overrides,
                     run_cli, tiny_demo_config)
from usss_jax import checkpoint as ckpt_lib
from usss_jax import label_embedding_stage, metric_writers, modes, train
from usss_jax import Segmenter
from usss_jax.domains import build_domains
from usss_jax.label_embeddings import store


def test_run_writes_checkpoints_logs_and_evaluates(tiny_run):
  workdir, state, results = tiny_run.workdir, tiny_run.state, tiny_run.results
  assert int(state["step"]) == 12
  assert set(results) >= {"street", "indoor", "mean_miou"}
  assert 0.0 <= results["street"]["miou"] <= 1.0
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_lines = [l for l in lines if l.get("kind") == "train"]
  assert [l["step"] for l in train_lines] == list(range(1, 13))
  assert all(np.isfinite(l["loss"]) for l in train_lines)
  expected = {"supervised/street", "within/indoor", "cross/street", "learning_rate",
              "cross_domain_entropy/street", "cross_entropy/street"}  # the old name, kept
  assert expected <= set(train_lines[0])
  evals = [l for l in lines if l.get("kind") == "eval"]
  assert evals and "miou" in evals[-1]["street"] and "miou" in evals[-1]["indoor"]
  events = list(pathlib.Path(workdir, "tensorboard").rglob("events.out.tfevents*"))
  assert events and events[0].stat().st_size > 0
  steps = sorted(int(p.name) for p in pathlib.Path(workdir, "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps == [10, 12]  # keep_checkpoints = 2
  assert (pathlib.Path(workdir, "checkpoints", "best")).is_dir()
  for name in ("street", "indoor"):
    assert len(open(os.path.join(workdir, "splits", f"{name}.labeled.txt")).read().split()) == 4
  # Every file of the run directory is readable by others (splits and embeddings included).
  modes_seen = {oct(p.stat().st_mode & 0o777) for p in pathlib.Path(workdir).rglob("*")
                if p.is_file()}
  assert modes_seen == {"0o644"}, modes_seen


@pytest.mark.slow
def test_same_config_and_seed_give_same_numbers(tiny_run, demo_root, tmp_path):
  state_b, results_b, _ = modes.embed_and_train(tiny_demo_config(demo_root, **TINY_RUN),
                                                str(tmp_path))
  assert_same_params(tiny_run.state, state_b)
  assert tiny_run.results["mean_miou"] == results_b["mean_miou"]


_CHILD = """
import sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from helpers import tiny_demo_config
from usss_jax import modes
modes.embed_and_train(tiny_demo_config({data!r}, **{run!r}), {workdir!r})
"""


@pytest.mark.slow
def test_killed_run_resumes_to_identical_parameters(tiny_run, demo_root, tmp_path):
  workdir = tmp_path / "run_b"
  code = _CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"), data=demo_root, run=TINY_RUN,
                       workdir=str(workdir))
  child = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONUNBUFFERED="1"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  # Kill (SIGKILL: no clean-up at all) once step 5 is logged, i.e. mid-way after checkpoint 4.
  while time.time() < deadline and child.poll() is None:
    if metrics.exists() and any(r.get("step", 0) >= 5 and r.get("kind") == "train"
                                for r in metric_writers.read_records(str(metrics))):
      break
    time.sleep(0.05)
  assert child.poll() is None, child.stderr.read().decode()[-2000:]
  child.send_signal(signal.SIGKILL)
  child.wait()
  done = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert done and max(done) < 12
  state_b, results_b, _ = modes.embed_and_train(tiny_demo_config(demo_root, **TINY_RUN),
                                                str(workdir))
  assert int(state_b["step"]) == 12
  assert_same_params(tiny_run.state, state_b)
  assert tiny_run.results["mean_miou"] == results_b["mean_miou"]


@pytest.mark.slow
def test_launch_eval_and_predict_modes(tiny_run, demo_root, tmp_path):
  # No --config: eval and predict read the run's own config.json.
  workdir = tmp_path / "run"
  shutil.copytree(tiny_run.workdir, workdir)
  results = tiny_run.results
  out = run_cli(f"--workdir={workdir}", "--mode=eval", "--checkpoint=latest")
  assert out.returncode == 0, out.stderr[-3000:]
  # stdout is the per-class table; the numbers are written to eval_latest_step<N>.json.
  assert re.search(r"^street: mIoU [0-9.]+ %$", out.stdout, re.M), out.stdout
  assert "| road |" in out.stdout and "(checkpoint step 12)" in out.stdout
  with open(os.path.join(workdir, "eval_latest_step12.json")) as f:
    got = json.load(f)
  assert got["step"] == 12
  np.testing.assert_allclose(got["street"]["miou"], results["street"]["miou"], rtol=1e-6)
  images = os.path.join(demo_root, "indoor", "images", "val")
  pred_dir = tmp_path / "pred"
  out = run_cli(f"--workdir={workdir}", "--mode=predict", f"--input={images}",
                "--domain=indoor", f"--output={pred_dir}")
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout)
  assert got["images"] == 16 and got["domain"] == "indoor"
  mask = np.asarray(Image.open(next(pred_dir.glob("*_mask.png"))))
  assert mask.shape == (96, 128) and mask.max() < 5
  assert len(list(pred_dir.glob("*_overlay.png"))) == 16


@pytest.mark.slow
def test_segmenter_and_predict_mode_need_no_data(tiny_run, demo_root, tmp_path):
  # A run directory alone serves predictions: its datasets can be gone.
  workdir = tmp_path / "run"
  shutil.copytree(tiny_run.workdir, workdir)
  gone = tmp_path / "gone"
  config = json.loads((workdir / "config.json").read_text())
  for name in ("street", "indoor"):
    config["domains"][name]["root"] = str(gone / name)
  (workdir / "config.json").write_text(json.dumps(config))
  inputs = tmp_path / "inputs"
  shutil.copytree(os.path.join(demo_root, "street", "images", "val"), inputs)
  segmenter = Segmenter.from_workdir(str(workdir))
  image = np.asarray(Image.open(sorted(inputs.iterdir())[0]).convert("RGB"))
  for name in ("street", "indoor"):
    mask = segmenter.predict(image, domain=name)
    assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
    assert mask.max() < len(segmenter.classes(name))
  out = run_cli(f"--workdir={workdir}", "--mode=predict", f"--input={inputs}",
                "--domain=street", f"--output={tmp_path / 'pred'}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert len(list((tmp_path / "pred").glob("*_mask.png"))) == len(list(inputs.iterdir()))
  assert not gone.exists()  # nothing regenerated the demo data


@pytest.mark.slow
def test_launch_eval_refuses_a_contradicting_config(tiny_run, demo_root):
  out = run_cli("--config=configs/demo.py", f"--workdir={tiny_run.workdir}",
                *demo_overrides(demo_root),
                "--mode=eval", "--checkpoint=latest")
  assert out.returncode != 0
  assert "contradicts" in out.stderr and "eval_every" in out.stderr
  assert "config.json" in out.stderr


@pytest.mark.slow
def test_launch_rejects_config_typo_and_bad_values(tmp_path):
  out = run_cli("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.alhpa=2")
  assert out.returncode != 0 and "alhpa" in out.stderr
  out = run_cli("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.method=fancy")
  assert out.returncode != 0 and "config.method" in out.stderr


def test_bad_checkpoint_directory_is_a_clear_error(demo_root, tmp_path):
  ckpt_dir = tmp_path / "checkpoints"
  ckpt_dir.mkdir()
  (ckpt_dir / "notes.txt").write_text("not a checkpoint")
  with pytest.raises(ckpt_lib.CheckpointError, match=str(ckpt_dir)):
    modes.embed_and_train(tiny_demo_config(demo_root, total_steps=2), str(tmp_path))


def test_checkpoint_of_another_model_is_a_clear_error(tiny_run, demo_root, tmp_path):
  workdir = tiny_run.workdir
  shutil.copytree(os.path.join(workdir, "checkpoints"), tmp_path / "checkpoints")
  shutil.copytree(os.path.join(workdir, "splits"), tmp_path / "splits")
  config = tiny_demo_config(demo_root, embedding_dim=4)
  with pytest.raises(ckpt_lib.CheckpointError, match="shape mismatch"):
    modes.embed_and_train(config, str(tmp_path))


def test_nan_loss_stops_with_the_step(demo_root, tmp_path):
  config = tiny_demo_config(demo_root, learning_rate=1e12, total_steps=6, checkpoint_every=6,
                            log_every=6, method="basic")
  with pytest.raises(metric_writers.NonFiniteLossError, match=r"step [1-6]\b"):
    train.run_training(config, str(tmp_path), build_domains(config, str(tmp_path)))
  # Nothing non-finite was checkpointed.
  assert not any(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())


def test_embedding_stage_matches_numpy_pca_and_centroids(demo_root, tmp_path):
  config = tiny_demo_config(demo_root)
  domains = build_domains(config, str(tmp_path))
  model, _, state, _ = build_train_step(config, [d.num_classes for d in domains], (32, 48),
                                        seed=1)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  dom = domains[0]
  got = label_embedding_stage.compute_from_model(model, variables, dom, k=1, dim=6,
                                                 normalization="imagenet",
                                                 max_pixels_per_image=10**9, seed=0)
  # NumPy float64 reference: every labeled cell-centre pixel, full PCA, class means.
  feats, labels = [], []
  for f, l in label_embedding_stage.feature_label_batches(
      model, variables, dom, resize_hw=dom.resize_hw, normalization="imagenet",
      max_pixels_per_image=10**9, seed=0):
    feats.append(f)
    labels.append(l)
  x = np.concatenate(feats).astype(np.float64)
  y = np.concatenate(labels)
  mean = x.mean(0)
  evals, evecs = np.linalg.eigh(np.cov(x, rowvar=False))
  comps = evecs[:, ::-1][:, :6].T
  z = (x - mean) @ comps.T
  ref = np.stack([z[y == c].mean(0) for c in range(dom.num_classes)])
  # Components are defined up to sign: align each with the stage's convention.
  signs = np.sign(np.sum(got.pca_components * comps, axis=1))
  np.testing.assert_allclose(got.embeddings, ref * signs, rtol=1e-4, atol=1e-4)
  # Saved and reloaded exactly.
  path = tmp_path / "e.npz"
  got.save(str(path))
  np.testing.assert_array_equal(store.LabelEmbeddings.load(str(path)).embeddings, got.embeddings)


@pytest.mark.slow
def test_pretrain_label_embedding_stage_runs_and_is_reused(demo_root, tmp_path):
  config = tiny_demo_config(demo_root, total_steps=2, checkpoint_every=2, eval_every=2)
  config.label_embeddings.source = "pretrain"
  config.label_embeddings.pretrain_steps = 2
  domains = build_domains(config, str(tmp_path))
  embs = label_embedding_stage.prepare(config, str(tmp_path), domains)
  assert [e.shape for e in embs] == [(5, 8), (5, 8)]
  files = sorted(p.name for p in (tmp_path / "label_embeddings").glob("*.npz"))
  assert files == ["indoor.npz", "street.npz"]
  mtime = (tmp_path / "label_embeddings" / "street.npz").stat().st_mtime_ns
  again = label_embedding_stage.prepare(config, str(tmp_path), domains)
  np.testing.assert_array_equal(again[0], embs[0])
  assert (tmp_path / "label_embeddings" / "street.npz").stat().st_mtime_ns == mtime


def test_a_run_directory_of_release_0_2_0_still_segments(tmp_path):
  """tests/data/run_v0_2_0: a consistency run (EMA teacher) written before the restructuring
  (config.json and label_spaces.json of that release, an orbax checkpoint of step 2)."""
  workdir = tmp_path / "run"
  shutil.copytree(ROOT / "tests" / "data" / "run_v0_2_0", workdir)
  segmenter = Segmenter.from_workdir(str(workdir), "latest")
  assert segmenter.step == 2 and segmenter.domains == ("street", "indoor")
  image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
  mask = segmenter.predict(image, domain="indoor")
  assert mask.shape == (40, 56) and mask.max() < len(segmenter.classes("indoor"))
