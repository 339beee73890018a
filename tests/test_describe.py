"""`python -m usss_jax.data describe|demo`."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from usss_jax.data import __main__ as cli

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*args):
  env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
  return subprocess.run([sys.executable, "-m", "usss_jax.data", *args], capture_output=True,
                        text=True, env=env, cwd=PROJECT_ROOT, timeout=120)


def test_describe_camvid_val(shared_data_dir):
  result = run_cli("describe", "--dataset", "camvid", "--root", str(shared_data_dir / "camvid"),
                   "--split", "val", "--option", "list_suffix=.subset")
  assert result.returncode == 0, result.stderr
  out = json.loads(result.stdout)
  assert {"dataset", "split", "num_examples", "classes", "label_histogram", "image_sizes",
          "skipped"} <= set(out)
  assert (out["dataset"], out["split"], out["num_examples"]) == ("camvid", "val", 26)
  assert out["classes"][0] == "Sky" and len(out["classes"]) == 11
  histogram = out["label_histogram"]
  assert sorted(histogram, key=int) == [str(i) for i in range(11)] + ["255"]
  assert sum(histogram.values()) == 26 * 480 * 360
  assert out["image_sizes"] == {"480x360": 26}
  assert out["skipped"] == 0
  # PROVENANCE.md val fractions: sky .091, building .260, void .017.
  fractions = np.array([histogram["0"], histogram["1"], histogram["255"]]) / (26 * 480 * 360)
  np.testing.assert_allclose(fractions, [0.091, 0.260, 0.017], atol=6e-4)


def test_describe_missing_root_exits_2(tmp_path):
  missing = tmp_path / "no_such_dataset"
  result = run_cli("describe", "--dataset", "camvid", "--root", str(missing), "--split", "val")
  assert result.returncode == 2
  assert result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]


def make_folder_dataset(root):
  root.mkdir()
  (root / "classes.txt").write_text("a 255 0 0\nb\nc\n")
  for key, values in (("x", [0, 1, 255]), ("sub/y", [2])):
    for kind, array in (("images", np.zeros((4, 5, 3), np.uint8)),
                        ("labels", np.resize(np.asarray(values, np.uint8), (4, 5)))):
      path = root / kind / "train" / f"{key}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(array).save(path)
  lonely = root / "images" / "train" / "z.png"
  Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(lonely)
  return lonely


def test_describe_reports_skipped(tmp_path, capsys):
  root = tmp_path / "d"
  lonely = make_folder_dataset(root)
  assert cli.main(["describe", "--dataset", "folder", "--root", str(root), "--split",
                   "train"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and f"{lonely}: image has no label" in err

  assert cli.main(["describe", "--dataset", "folder", "--root", str(root), "--split", "train",
                   "--option", "skip_unpaired=true"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["num_examples"] == 2 and out["skipped"] == 1
  assert out["skipped_files"] == [str(lonely)]
  # x: [0, 1, 255] cycled over 20 px -> 7, 7, 6; sub/y: 20 px of class 2.
  assert out["label_histogram"] == {"0": 7, "1": 7, "2": 20, "255": 6}
  assert out["image_sizes"] == {"5x4": 2}
  assert out["classes"] == ["a", "b", "c"]


def test_describe_bad_option_and_split(tmp_path, capsys):
  root = tmp_path / "d"
  make_folder_dataset(root)
  assert cli.main(["describe", "--dataset", "folder", "--root", str(root), "--split", "val"]) == 2
  assert f"{root}/images/val: missing folder" in capsys.readouterr().err
  assert cli.main(["describe", "--dataset", "folder", "--root", str(root), "--split", "train",
                   "--option", "list_suffix=.subset"]) == 2
  assert "no option(s) ['list_suffix']" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [
    ("list_suffix=.subset", ("list_suffix", ".subset")),
    ("list_suffix=", ("list_suffix", "")),
    ("list_suffix=None", ("list_suffix", None)),
    ("skip_unpaired=true", ("skip_unpaired", True)),
    ("skip_unpaired=False", ("skip_unpaired", False)),
    ("label_type=labelIds", ("label_type", "labelIds")),
])
def test_parse_option(text, expected):
  assert cli.parse_option(text) == expected


def test_demo_command(tmp_path, capsys):
  root = tmp_path / "demo"
  assert cli.main(["demo", "--root", str(root), "--num-train", "2", "--num-val", "1",
                   "--height", "40", "--width", "48"]) == 0
  paths = json.loads(capsys.readouterr().out)
  assert paths == {"street": str(root / "street"), "indoor": str(root / "indoor")}
  assert cli.main(["describe", "--dataset", "folder", "--root", paths["indoor"],
                   "--split", "val"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["num_examples"] == 1 and out["image_sizes"] == {"48x40": 1}
  assert sum(out["label_histogram"].values()) == 40 * 48
