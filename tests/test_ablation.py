"""The ablation runner wires single-source runs, their label embeddings and the universal runs."""

import json
import os
import shutil

import numpy as np
import pytest

from helpers import tiny_demo_config
from usss_jax import ablation
from usss_jax import config as config_lib
from usss_jax.analysis import ablation_tables
from usss_jax.label_embeddings import store


@pytest.mark.slow
def test_ablation_single_and_full(demo_root, tmp_path):
  config = tiny_demo_config(demo_root, total_steps=2, checkpoint_every=2, eval_every=2)
  config.label_embeddings.source = "pretrain"
  out = ablation.run_ablation(config, str(tmp_path), seeds=[0], methods=["single", "full"])
  results = json.load(open(tmp_path / "results.json"))
  assert results == out["results"]
  assert set(results) == {"single", "full"}
  for method in ("single", "full"):
    assert set(results[method]["0"]) == {"street", "indoor"}
    assert all(0 <= v <= 1 for v in results[method]["0"].values())
  # full used the embeddings computed from the single-source encoders (copied, not recomputed).
  for name in ("street", "indoor"):
    shared = store.LabelEmbeddings.load(
        str(tmp_path / "seed0" / "label_embeddings" / f"{name}.npz"))
    used = store.LabelEmbeddings.load(
        str(tmp_path / "seed0" / "full" / "label_embeddings" / f"{name}.npz"))
    np.testing.assert_array_equal(shared.embeddings, used.embeddings)
    assert "single-source run" in shared.source
  md = open(tmp_path / "results.md").read()
  assert "| single |" in md and "| full |" in md and "per-class IoU" in md
  assert open(tmp_path / "results.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert out["details"]["runs"]["seed0/full"]["machine"] == ablation.machine()  # per run
  # A second call finds every run finished and only rewrites the tables, also where a run
  # keeps only its records (a study's committed files: no checkpoint, no TensorBoard file).
  for kept_out in ("checkpoints", "tensorboard"):
    shutil.rmtree(tmp_path / "seed0" / "full" / kept_out)
  mtime = os.stat(tmp_path / "seed0" / "full" / "final_eval.json").st_mtime_ns
  again = ablation.run_ablation(config, str(tmp_path), seeds=[0], methods=["single", "full"])
  assert again["results"] == out["results"]
  assert os.stat(tmp_path / "seed0" / "full" / "final_eval.json").st_mtime_ns == mtime


@pytest.mark.slow
def test_the_recommended_recipe_runs_its_stages_and_the_supervised_rows_skip_them(
    demo_root, tmp_path):
  config = config_lib.recommended_recipe(tiny_demo_config(demo_root), length=6)
  config.self_supervised.batch_per_domain = 2
  assert (config.self_supervised.steps, config.warm_start.steps, config.total_steps,
          config.consistency.ema_decay_rampup) == (2, 3, 3, 3)
  out = ablation.run_ablation(config, str(tmp_path), seeds=[0], methods=["basic", "consistency"],
                              recommended="consistency")
  assert out["results"]["recommended"] == "consistency"
  seed_dir = tmp_path / "seed0"
  # basic: the whole length on the labeled images, from scratch (no stage, no starting weights).
  basic = json.load(open(seed_dir / "basic" / "config.json"))
  assert (basic["total_steps"], basic["warm_start"]["steps"], basic["self_supervised"]["steps"],
          basic["pretrained"], basic["init_from"]) == (6, 0, 0, "", "")
  assert not (seed_dir / "basic" / "self_supervised").exists()
  assert not (seed_dir / "basic" / "warm_start").exists()
  # consistency: the encoder pretrained on the unlabeled images, the warm start from it, then
  # the semi-supervised run from the warm start's model.
  stage = seed_dir / "consistency"
  assert json.load(open(stage / "self_supervised" / "pretrain.json"))["options"]["steps"] == 2
  warm = json.load(open(stage / "warm_start" / "config.json"))
  assert (warm["method"], warm["total_steps"]) == ("basic", 3)
  assert warm["pretrained"] == str(stage / "self_supervised" / "encoder.npz")
  run = json.load(open(stage / "config.json"))
  assert (run["method"], run["total_steps"], run["init_from"]) == (
      "consistency", 3, str(stage / "warm_start"))
  assert json.load(open(stage / "final_eval.json"))["steps"] == 3
  md = open(tmp_path / "results.md").read()
  assert "## consistency, street: class shares of the confident pseudo-labels (%)" in md
  assert "## basic, street: class shares" not in md
  # The encoder's share: basic for the whole length from the same encoder, copied, not redone.
  again = ablation.run_ablation(config, str(tmp_path), seeds=[0], methods=["basic", "consistency"],
                                basic_from_encoder=True)
  row = seed_dir / "basic_from_encoder"
  np.testing.assert_array_equal(
      np.load(row / "self_supervised" / "encoder.npz")["layer0.0.weight"],
      np.load(stage / "self_supervised" / "encoder.npz")["layer0.0.weight"])
  assert not (row / "self_supervised" / "checkpoints").exists()
  ran = json.load(open(row / "config.json"))
  assert (ran["method"], ran["total_steps"], ran["warm_start"]["steps"], ran["pretrained"]) == (
      "basic", 6, 0, str(row / "self_supervised" / "encoder.npz"))
  assert set(again["results"]["basic_from_encoder"]["0"]) == {"street", "indoor"}
  assert again["results"]["basic"] == out["results"]["basic"]


def test_pseudo_label_share_table_averages_seeds_at_steps_spread_over_training(tmp_path):
  shares = {0: {10: [0.5, 0.5, 0.0], 20: [0.6, 0.3, 0.1], 30: [0.4, 0.4, 0.2]},
            1: {10: [0.7, 0.3, 0.0], 20: [0.2, 0.5, 0.3], 30: [0.2, 0.2, 0.6]}}
  for seed, by_step in shares.items():
    run = tmp_path / f"seed{seed}" / "consistency"
    run.mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as f:
      f.write(json.dumps({"step": 0, "kind": "eval", "mean_miou": 0.1}) + "\n")
      for step, values in by_step.items():
        record = {"step": step, "kind": "train", "loss": 1.0}
        record.update({f"pseudo_label_share/a/{c}": v for c, v in enumerate(values)})
        record.update({f"labeled_share/a/{c}": (0.2, 0.3, 0.5)[c] for c in range(3)})
        f.write(json.dumps(record) + "\n")
    (tmp_path / f"seed{seed}" / "basic").mkdir()
    with open(tmp_path / f"seed{seed}" / "basic" / "metrics.jsonl", "w") as f:
      f.write(json.dumps({"step": 10, "kind": "train", "loss": 1.0}) + "\n")
  md = ablation_tables.pseudo_label_share_table(str(tmp_path), ["a"], {"a": ["road", "sky", "car"]},
                                         points=3)
  lines = md.splitlines()
  assert lines[0] == ("## consistency, a: class shares of the confident pseudo-labels (%), "
                      "mean over 2 seeds")
  assert lines[2:] == ["| | road | sky | car |", "|---|---|---|---|",
                       "| step 10 | 60.0 | 40.0 | 0.0 |", "| step 20 | 40.0 | 40.0 | 20.0 |",
                       "| step 30 | 30.0 | 30.0 | 40.0 |", "| labeled pixels | 20.0 | 30.0 | 50.0 |"]
  assert "basic" not in md
  assert ablation_tables.pseudo_label_share_table(str(tmp_path), ["b"], {}) == ""


def test_paired_differences_and_interval_by_hand():
  results = {"basic": {"0": {"a": 0.30, "b": 0.40}, "1": {"a": 0.32, "b": 0.38},
                       "2": {"a": 0.28, "b": 0.42}},
             "consistency": {"0": {"a": 0.36, "b": 0.44}, "1": {"a": 0.35, "b": 0.41},
                             "2": {"a": 0.33, "b": 0.47}},
             "recommended": "consistency"}
  d = ablation_tables.paired_differences(results, ["a", "b"])["consistency"]
  diffs = np.array([5.0, 3.0, 5.0])  # average of the two domains, in points
  np.testing.assert_allclose(list(d["per_seed"].values()), diffs, atol=1e-9)
  half = 4.302652729911275 * diffs.std(ddof=1) / np.sqrt(3)  # t(0.975, 2)
  np.testing.assert_allclose([d["mean"], d["low"], d["high"]],
                             [diffs.mean(), diffs.mean() - half, diffs.mean() + half])
  assert d["positive"] == 3 and d["n"] == 3
  md = ablation_tables.markdown_table(results, {"runs": {}, "classes": {}}, ["a", "b"])
  assert "| consistency (recommended) |" in md and "| consistency | +4.3 |" in md
