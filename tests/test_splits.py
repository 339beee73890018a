"""Seeded labeled/unlabeled splits and their key-list files."""

import os

import numpy as np
import pytest

from usss_jax.data.base import DataError, Example
from usss_jax.data import splits


def _examples(n=20):
  return [Example(key=f"city/k{i:02d}", image_path=f"/img/{i}.png", label_path=f"/lab/{i}.png")
          for i in range(n)]


def _keys(exs):
  return [ex.key for ex in exs]


def test_same_seed_same_keys_independent_of_input_order():
  exs = _examples()
  a = splits.make_split(exs, 5, seed=3)
  shuffled = [exs[i] for i in np.random.default_rng(0).permutation(len(exs))]
  b = splits.make_split(shuffled, 5, seed=3)
  assert _keys(a.labeled) == _keys(b.labeled)
  assert _keys(a.unlabeled) == _keys(b.unlabeled)
  assert len(a.labeled) == 5 and len(a.unlabeled) == 15
  assert _keys(a.labeled) == sorted(_keys(a.labeled))
  assert not set(_keys(a.labeled)) & set(_keys(a.unlabeled))
  assert sorted(_keys(a.labeled) + _keys(a.unlabeled)) == _keys(exs)
  # The draw is a seeded permutation of the key-sorted list (not the first N).
  perm = np.random.default_rng(3).permutation(20)[:5]
  assert _keys(a.labeled) == sorted(f"city/k{i:02d}" for i in perm)


def test_different_seed_different_keys():
  exs = _examples()
  draws = {tuple(_keys(splits.make_split(exs, 5, seed=s).labeled)) for s in range(4)}
  assert len(draws) == 4


@pytest.mark.parametrize("num_labeled", [0, -1, 20, 50])
def test_all_labeled(num_labeled):
  s = splits.make_split(_examples(), num_labeled, seed=0)
  assert _keys(s.labeled) == _keys(_examples()) and s.unlabeled == []


def test_unlabeled_includes_labeled():
  s = splits.make_split(_examples(), 4, seed=1, unlabeled_includes_labeled=True)
  assert len(s.labeled) == 4 and _keys(s.unlabeled) == _keys(_examples())


def test_labeled_keys_and_unknown_key():
  s = splits.make_split(_examples(), 0, seed=0, labeled_keys=["city/k07", "city/k02"])
  assert _keys(s.labeled) == ["city/k02", "city/k07"] and len(s.unlabeled) == 18
  with pytest.raises(DataError, match="city/nope"):
    splits.make_split(_examples(), 0, seed=0, labeled_keys=["city/k01", "city/nope"])


def test_duplicate_keys_rejected():
  exs = _examples(3) + [Example(key="city/k01", image_path="/other.png")]
  with pytest.raises(DataError, match="duplicate.*city/k01"):
    splits.make_split(exs, 1, seed=0)


def test_write_and_read(tmp_path):
  s = splits.make_split(_examples(), 6, seed=2)
  lab, unl = splits.write_split(s, str(tmp_path / "w"), "camvid")
  assert os.path.basename(lab) == "camvid.labeled.txt"
  assert os.path.basename(unl) == "camvid.unlabeled.txt"
  assert splits.read_keys(lab) == _keys(s.labeled)
  assert splits.read_keys(unl) == _keys(s.unlabeled)
  with open(lab) as f:
    assert f.read() == "".join(k + "\n" for k in _keys(s.labeled))
  assert sorted(os.listdir(tmp_path / "w")) == ["camvid.labeled.txt", "camvid.unlabeled.txt"]


def test_load_or_make_reuses_files(tmp_path):
  d = str(tmp_path)
  first = splits.load_or_make_split(_examples(), d, "cs", 5, seed=0)
  assert os.path.exists(tmp_path / "cs.labeled.txt")
  # A different seed (or listing order) must not change a run that already has lists.
  again = splits.load_or_make_split(_examples()[::-1], d, "cs", 5, seed=99)
  assert _keys(again.labeled) == _keys(first.labeled)
  assert _keys(again.unlabeled) == _keys(first.unlabeled)
  assert again.labeled[0] == first.labeled[0]  # full Example objects come back
  # Hand-edited lists are honoured once the record of the drawn split is deleted.
  (tmp_path / "cs.labeled.txt").write_text("city/k03\ncity/k01\n\n")
  (tmp_path / "cs.unlabeled.txt").write_text("city/k00\n")
  with pytest.raises(DataError, match=r"(?s)cs\.labeled\.txt: differs from the split this run "
                     r"recorded in .*cs\.json.*delete .*cs\.json to keep the edit"):
    splits.load_or_make_split(_examples(), d, "cs", 2, seed=0)
  os.remove(tmp_path / "cs.json")
  s = splits.load_or_make_split(_examples(), d, "cs", 2, seed=0)
  assert _keys(s.labeled) == ["city/k01", "city/k03"] and _keys(s.unlabeled) == ["city/k00"]


def test_load_or_make_mismatch_errors(tmp_path):
  d = str(tmp_path)
  splits.load_or_make_split(_examples(), d, "cs", 5, seed=0)
  lab = str(tmp_path / "cs.labeled.txt")
  with pytest.raises(DataError, match=r"cs\.labeled\.txt.*5 labeled keys.*num_labeled=7"):
    splits.load_or_make_split(_examples(), d, "cs", 7, seed=0)
  with pytest.raises(DataError, match=r"cs\.unlabeled\.txt.*excludes labeled"):
    splits.load_or_make_split(_examples(), d, "cs", 5, seed=0, unlabeled_includes_labeled=True)
  with pytest.raises(DataError, match="cs.labeled.txt.*not in the dataset"):
    splits.load_or_make_split(_examples(3), d, "cs", 5, seed=0)
  os.remove(str(tmp_path / "cs.unlabeled.txt"))
  os.remove(str(tmp_path / "cs.json"))
  with pytest.raises(DataError, match=r"(?s)cs\.unlabeled\.txt: is missing, and .*cs\.json.*"
                     r"delete the split lists"):
    splits.load_or_make_split(_examples(), d, "cs", 5, seed=0)
  with open(lab, "a") as f:
    f.write("city/k00\ncity/k00\n")
  with pytest.raises(DataError, match="duplicate"):
    splits.read_keys(lab)


@pytest.mark.parametrize("damage", ["delete", "truncate", "zero"])
@pytest.mark.parametrize("kind", ["labeled", "unlabeled"])
def test_damaged_list_is_drawn_again_when_it_matches_the_record(tmp_path, caplog, damage, kind):
  d = str(tmp_path)
  first = splits.load_or_make_split(_examples(), d, "cs", 5, seed=3)
  assert sorted(os.listdir(d)) == ["cs.json", "cs.labeled.txt", "cs.unlabeled.txt"]
  path = tmp_path / f"cs.{kind}.txt"
  whole = path.read_bytes()
  if damage == "delete":
    path.unlink()
  else:
    path.write_bytes(whole[:len(whole) // 3 + 1] if damage == "truncate" else b"\0" * len(whole))
  again = splits.load_or_make_split(_examples(), d, "cs", 5, seed=3)
  assert _keys(again.labeled) == _keys(first.labeled)
  assert _keys(again.unlabeled) == _keys(first.unlabeled)
  assert path.read_bytes() == whole
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and str(path) in warnings[0] and "drew it again" in warnings[0]
  # Drawn again from a dataset that changed since, it no longer matches: an error naming it.
  path.unlink()
  with pytest.raises(DataError, match=rf"cs\.{kind}\.txt: is missing, and drawn again from "
                     r"the seed it differs .*dataset"):
    splits.load_or_make_split(_examples(25), d, "cs", 5, seed=3)


def test_damaged_or_missing_record_is_rewritten_from_the_lists(tmp_path, caplog):
  d = str(tmp_path)
  splits.load_or_make_split(_examples(), d, "cs", 5, seed=3)
  record = (tmp_path / "cs.json").read_bytes()
  for damage in (b"", b"\0" * len(record), None):
    if damage is None:
      (tmp_path / "cs.json").unlink()
    else:
      (tmp_path / "cs.json").write_bytes(damage)
    caplog.clear()
    splits.load_or_make_split(_examples(), d, "cs", 5, seed=3)
    assert (tmp_path / "cs.json").read_bytes() == record
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cs.json" in warnings[0], warnings


def test_a_reader_writes_nothing(tmp_path):
  s = splits.load_or_make_split(_examples(), str(tmp_path / "w"), "cs", 5, seed=3, write=False)
  assert len(s.labeled) == 5 and not (tmp_path / "w").exists()
