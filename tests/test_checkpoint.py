"""Tests for usss_jax.checkpoint (Orbax v0 wrapper) on 8 fake CPU devices."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import tmpfs_disk
from usss_jax import sharding
from usss_jax.checkpoint import (Checkpointer, CheckpointError, CheckpointWriteError,
                                 UnreadableCheckpointError)


def _make_state(seed: int = 0) -> dict:
  """Tiny training state: conv params, BN stats, SGD-momentum opt_state after one update."""
  rng = np.random.default_rng(seed)
  params = {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)},
            "head": {"kernel": jnp.asarray(rng.normal(size=(1, 1, 8, 5)), jnp.float32),
                     "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}}
  tx = optax.sgd(0.1, momentum=0.9)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5 + seed), params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return {
      "params": params,
      "batch_stats": {"bn": {"mean": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
                             "var": jnp.asarray(rng.uniform(1, 2, size=(8,)), jnp.float32)}},
      "opt_state": opt_state,
      "step": jnp.asarray(7 + seed, jnp.int32),
      "label_embeddings": {"cityscapes": jnp.asarray(rng.normal(size=(5, 16)), jnp.float32),
                           "idd": jnp.asarray(rng.normal(size=(6, 16)), jnp.float32)},
  }


def _extra(step: int) -> dict:
  return {"data_iter": {"labeled": {"epoch": 3, "index": 17 + step, "order": [4, 0, 2]},
                        "unlabeled": {"epoch": 1, "index": 2}},
          "config": {"optim": {"base_lr": 0.01, "momentum": 0.9}, "model": "drn_d_22"},
          "seed": 42, "metrics": {"loss": 0.25}}


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert np.asarray(a).dtype == np.asarray(e).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def _zeros_like(state):
  return jax.tree.map(jnp.zeros_like, state)


def test_round_trip_is_exact(tmp_path):
  state = _make_state()
  # The momentum trace must be non-trivial for the round trip to mean something.
  assert float(jnp.abs(state["opt_state"][0].trace["conv"]["kernel"]).sum()) > 0
  with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state, extra=_extra(7))
    assert ckpt.latest_step() == 7
    restored, extra = ckpt.restore(_zeros_like(state))
  _assert_trees_equal(restored, state)
  assert isinstance(restored["opt_state"][0], optax.TraceState)
  assert extra == _extra(7)

  # A fresh Checkpointer (a resumed run) with an abstract target.
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    assert ckpt.latest_step() == 7
    restored, extra = ckpt.restore(abstract, step=7)
  _assert_trees_equal(restored, state)
  assert extra["data_iter"]["labeled"] == {"epoch": 3, "index": 24, "order": [4, 0, 2]}


def test_python_and_numpy_leaves_and_numpy_extra(tmp_path):
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": 12, "host": np.arange(4, dtype=np.int64)}
  with Checkpointer(str(tmp_path), keep_best=False) as ckpt:
    ckpt.save(12, state, extra={"rng": np.uint32(123), "counts": np.array([1, 2])})
    restored, extra = ckpt.restore({"w": jnp.zeros((2, 3)), "step": 0,
                                    "host": np.zeros(4, np.int64)})
  assert restored["step"] == 12 and isinstance(restored["step"], int)
  assert isinstance(restored["host"], np.ndarray)
  np.testing.assert_array_equal(restored["host"], np.arange(4))
  np.testing.assert_array_equal(restored["w"], np.arange(6.0).reshape(2, 3))
  assert extra == {"rng": 123, "counts": [1, 2]}


def test_async_save_then_restore(tmp_path):
  state = _make_state(1)
  with Checkpointer(str(tmp_path), async_save=True) as ckpt:
    ckpt.save(3, state, extra=_extra(3))
    ckpt.wait()
    assert (tmp_path / "3" / "commit_success.txt").exists()
    restored, extra = ckpt.restore(_zeros_like(state))
  _assert_trees_equal(restored, state)
  assert extra == _extra(3)


def test_max_to_keep(tmp_path):
  states = {s: _make_state(s) for s in (1, 2, 3)}
  with Checkpointer(str(tmp_path), max_to_keep=2) as ckpt:
    for s, state in states.items():
      ckpt.save(s, state, extra=_extra(s))
    assert ckpt.all_steps() == [2, 3]
    assert ckpt.latest_step() == 3
    restored, extra = ckpt.restore(_zeros_like(states[2]), step=2)
    _assert_trees_equal(restored, states[2])
    assert extra == _extra(2)
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 1; have \[2, 3\]"):
      ckpt.restore(_zeros_like(states[1]), step=1)
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "3"]


def test_save_skips_old_step_unless_forced(tmp_path):
  state = _make_state()
  with Checkpointer(str(tmp_path), max_to_keep=3) as ckpt:
    assert ckpt.save(5, state, extra={})
    assert not ckpt.save(4, state, extra={})  # below the latest: Orbax skips it
    assert ckpt.save(4, state, extra={}, force=True)
    assert ckpt.all_steps() == [4, 5]


def test_best_is_kept_by_metric(tmp_path):
  states = {s: _make_state(s) for s in (10, 20, 30, 40)}
  with Checkpointer(str(tmp_path), max_to_keep=1, best_metric="mean_miou") as ckpt:
    assert ckpt.best_value is None
    assert ckpt.save_best(10, states[10], extra={"mean_miou": 0.3}, metric_value=0.3)
    assert not ckpt.save_best(20, states[20], extra={"mean_miou": 0.2}, metric_value=0.2)
    assert not ckpt.save_best(25, states[20], extra={}, metric_value=0.3)  # ties do not replace
    assert not ckpt.save_best(26, states[20], extra={}, metric_value=float("nan"))
    assert ckpt.all_steps(best=True) == [10]
    assert ckpt.best_value == pytest.approx(0.3)
    assert ckpt.save_best(30, states[30], extra={"mean_miou": 0.5}, metric_value=np.float32(0.5))
    assert ckpt.all_steps(best=True) == [30]
    ckpt.save(40, states[40], extra={})
    restored, extra = ckpt.restore(_zeros_like(states[30]), best=True)
    _assert_trees_equal(restored, states[30])
    assert extra == {"mean_miou": 0.5}
    # The regular checkpoints are separate from the best one.
    assert ckpt.all_steps() == [40]
  assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["30"]

  # A resumed run knows the best value and does not overwrite it with a worse one.
  with Checkpointer(str(tmp_path), max_to_keep=1) as ckpt:
    assert ckpt.best_value == pytest.approx(0.5)
    assert not ckpt.save_best(50, states[40], extra={}, metric_value=0.45)
    assert ckpt.save_best(60, states[40], extra={}, metric_value=0.55)
    assert ckpt.all_steps(best=True) == [60]


def test_best_mode_min_and_disabled(tmp_path):
  state = _make_state()
  with Checkpointer(str(tmp_path / "a"), best_metric="loss", best_mode="min") as ckpt:
    assert ckpt.save_best(1, state, extra={}, metric_value=2.0)
    assert not ckpt.save_best(2, state, extra={}, metric_value=3.0)
    assert ckpt.save_best(3, state, extra={}, metric_value=1.0)
    assert ckpt.all_steps(best=True) == [3]
  with Checkpointer(str(tmp_path / "b"), keep_best=False) as ckpt:
    assert not ckpt.save_best(1, state, extra={}, metric_value=2.0)
    with pytest.raises(CheckpointError, match="keep_best=False"):
      ckpt.restore(state, best=True)
  assert not (tmp_path / "b" / "best").exists()


def test_restore_onto_mesh_shardings(tmp_path):
  devices = jax.devices()
  assert len(devices) == 8
  mesh = sharding.make_mesh()
  replicated, by_rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  rng = np.random.default_rng(0)
  host = {"w": rng.normal(size=(16, 4)).astype(np.float32),
          "b": rng.normal(size=(8,)).astype(np.float32),
          "step": np.int32(9)}
  # Saved with w sharded over rows and b replicated ...
  state = {"w": jax.device_put(host["w"], by_rows), "b": jax.device_put(host["b"], replicated),
           "step": jax.device_put(host["step"], replicated)}
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(9, state, extra={"note": "sharded"})
    # ... restored the other way round.
    target = {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=replicated),
              "b": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=by_rows),
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
    restored, extra = ckpt.restore(target)
    # A concrete sharded target keeps its shardings too.
    restored_like, _ = ckpt.restore(jax.tree.map(jnp.zeros_like, state))
  assert extra == {"note": "sharded"}
  for name in host:
    np.testing.assert_array_equal(np.asarray(restored[name]), host[name])
    assert restored[name].sharding == target[name].sharding
    assert restored_like[name].sharding == state[name].sharding
  assert {s.data.shape for s in restored["b"].addressable_shards} == {(1,)}
  assert {s.data.shape for s in restored["w"].addressable_shards} == {(16, 4)}
  assert {s.data.shape for s in restored_like["w"].addressable_shards} == {(2, 4)}


def test_interrupted_saves_are_ignored(tmp_path):
  states = {s: _make_state(s) for s in (1, 2)}
  with Checkpointer(str(tmp_path), max_to_keep=5) as ckpt:
    for s, state in states.items():
      ckpt.save(s, state, extra=_extra(s))
  # A save killed before its rename: an Orbax temporary directory.
  tmp_dir = tmp_path / "3.orbax-checkpoint-tmp-1795506042149"
  (tmp_dir / "state").mkdir(parents=True)
  (tmp_dir / "state" / "manifest.ocdbt").write_bytes(b"\0" * 10)
  # A step directory whose commit marker was never written (non-atomic filesystem).
  step4 = tmp_path / "4"
  (step4 / "state").mkdir(parents=True)
  (step4 / "_CHECKPOINT_METADATA").write_text(json.dumps({"init_timestamp_nsecs": 1}))
  # An interrupted best save too.
  (tmp_path / "best" / "9" / "state").mkdir(parents=True)

  with Checkpointer(str(tmp_path), max_to_keep=5) as ckpt:
    assert ckpt.latest_step() == 2
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.all_steps(best=True) == []
    restored, extra = ckpt.restore(_zeros_like(states[2]))
    _assert_trees_equal(restored, states[2])
    assert extra == _extra(2)
    # The leftovers do not block saving those steps again.
    assert ckpt.save(3, states[1], extra={})
    assert ckpt.save(4, states[1], extra={})
    assert ckpt.all_steps() == [1, 2, 3, 4]
  assert not tmp_dir.exists()
  assert (tmp_path / "4" / "commit_success.txt").exists()
  assert not (tmp_path / "best" / "9").exists()


def test_non_checkpoint_directory_is_rejected(tmp_path):
  unrelated = tmp_path / "run"
  unrelated.mkdir()
  (unrelated / "notes.txt").write_text("hello")
  (unrelated / "2019").mkdir()
  (unrelated / "2019" / "photo.jpg").write_bytes(b"jpg")
  with pytest.raises(CheckpointError, match=r"not a checkpoint directory.*2019, notes\.txt") as e:
    Checkpointer(str(unrelated))
  assert str(unrelated) in str(e.value)
  assert isinstance(e.value, ValueError)
  # Nothing of the user's was touched.
  assert (unrelated / "2019" / "photo.jpg").read_bytes() == b"jpg"

  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(CheckpointError, match=f"{a_file}: exists and is not a directory"):
    Checkpointer(str(a_file))

  # A finished checkpoint that lacks our items (e.g. another program's Orbax checkpoint).
  foreign = tmp_path / "foreign"
  (foreign / "5" / "default").mkdir(parents=True)
  (foreign / "5" / "commit_success.txt").write_text("ok")
  with pytest.raises(CheckpointError,
                     match=r"step directory 5/ lacks item\(s\) \['state', 'extra'\]"):
    Checkpointer(str(foreign))


def test_mismatched_tree_names_directory_and_keys(tmp_path):
  state = _make_state()
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, state, extra={})
    other = _zeros_like(state)
    other["params"]["conv2"] = other["params"].pop("conv")
    del other["label_embeddings"]["idd"]
    with pytest.raises(CheckpointError) as e:
      ckpt.restore(other)
    message = str(e.value)
    assert str(tmp_path / "1") in message
    assert "missing keys (in target, not in checkpoint): params/conv2/kernel" in message
    assert ("unexpected keys (in checkpoint, not in target): label_embeddings/idd, "
            "params/conv/kernel") in message

    wider = _zeros_like(state)
    wider["params"]["conv"]["kernel"] = jnp.zeros((3, 3, 4, 16))
    with pytest.raises(CheckpointError, match=r"shape mismatch at params/conv/kernel: "
                       r"checkpoint \(3, 3, 4, 8\) vs target \(3, 3, 4, 16\)"):
      ckpt.restore(wider)
    # Momentum trace mirrors the params: its shape is checked as well.
    wider_opt = _zeros_like(state)
    wider_opt["opt_state"][0].trace["head"]["bias"] = jnp.zeros((6,))
    with pytest.raises(CheckpointError, match=r"opt_state/0/trace/head/bias: checkpoint \(5,\)"):
      ckpt.restore(wider_opt)


def test_restore_without_checkpoint_and_bad_extra(tmp_path):
  with Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(CheckpointError, match=f"{tmp_path}: no committed checkpoint"):
      ckpt.restore({"w": jnp.zeros(3)})
    with pytest.raises(TypeError, match="extra/data_iter/sampler: object is not JSON"):
      ckpt.save(1, {"w": jnp.zeros(3)}, extra={"data_iter": {"sampler": object()}})
    with pytest.raises(TypeError, match="extra: dict key 3 is int"):
      ckpt.save(1, {"w": jnp.zeros(3)}, extra={3: "x"})
    assert ckpt.latest_step() is None


def test_read_only_skips_interrupted_saves_and_deletes_nothing(tmp_path):
  """What eval / predict see of a run still training: its half-written steps stay in place."""
  states = {s: _make_state(s) for s in (1, 2)}
  with Checkpointer(str(tmp_path), max_to_keep=5, keep_best=False) as ckpt:
    for s, state in states.items():
      ckpt.save(s, state, extra=_extra(s))
  tmp_dir = tmp_path / "3.orbax-checkpoint-tmp-1795506042149"
  (tmp_dir / "state").mkdir(parents=True)
  step4 = tmp_path / "4"
  (step4 / "state").mkdir(parents=True)
  (step4 / "_CHECKPOINT_METADATA").write_text(json.dumps({"init_timestamp_nsecs": 1}))
  before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))

  with Checkpointer(str(tmp_path), max_to_keep=2, read_only=True) as ckpt:
    assert ckpt.latest_step() == 2
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.all_steps(best=True) == []  # no best/ folder, and none is made
    restored, extra = ckpt.restore(_zeros_like(states[2]))
    _assert_trees_equal(restored, states[2])
    assert extra == _extra(2)
    with pytest.raises(CheckpointError, match="read-only"):
      ckpt.save(5, states[1], extra={})
  assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


# Damage and replays (docs/FAULTS.md): nothing readable is ever deleted.

def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_a_better_best_of_the_same_step_replaces_it(tmp_path):
  """A replay after a fallback evaluates a step whose best checkpoint the first pass saved."""
  first, replay = _make_state(1), _make_state(2)
  with Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.save_best(40, first, extra={"pass": 1}, metric_value=0.3)
  with Checkpointer(str(tmp_path)) as ckpt:
    assert not ckpt.save_best(40, replay, extra={"pass": 2}, metric_value=0.3)  # not better
    assert ckpt.save_best(40, replay, extra={"pass": 2}, metric_value=0.4)
    assert ckpt.all_steps(best=True) == [40] and ckpt.best_value == pytest.approx(0.4)
    restored, extra = ckpt.restore(_zeros_like(first), best=True)
  _assert_trees_equal(restored, replay)
  assert extra == {"pass": 2}
  assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["40"]


@pytest.mark.parametrize("new_committed", [True, False])
def test_an_interrupted_best_replacement_is_finished_or_undone(tmp_path, new_committed):
  first, replay = _make_state(1), _make_state(2)
  run, other = tmp_path / "run", tmp_path / "other"
  with Checkpointer(str(run)) as ckpt:
    ckpt.save_best(40, first, extra={"pass": 1}, metric_value=0.3)
  (run / "best" / "40").rename(run / "best" / ".replaced-40")  # killed here ...
  if new_committed:  # ... or here, once the replacement was written
    with Checkpointer(str(other)) as ckpt:
      ckpt.save_best(40, replay, extra={"pass": 2}, metric_value=0.4)
    (other / "best" / "40").rename(run / "best" / "40")
  with Checkpointer(str(run)) as ckpt:
    restored, extra = ckpt.restore(_zeros_like(first), best=True)
    assert ckpt.best_value == pytest.approx(0.4 if new_committed else 0.3)
  assert extra == {"pass": 2 if new_committed else 1}
  assert sorted(p.name for p in (run / "best").iterdir()) == ["40"]


def test_damage_is_repaired_on_open_and_nothing_readable_is_deleted(tmp_path, caplog):
  states = {s: _make_state(s) for s in (1, 2, 3)}
  with Checkpointer(str(tmp_path), max_to_keep=5) as ckpt:
    for s, state in states.items():
      ckpt.save(s, state, extra=_extra(s))
    ckpt.save_best(3, states[3], extra={}, metric_value=0.5)
  (tmp_path / "3" / "commit_success.txt").unlink()          # lost marker, items all there
  (tmp_path / "2" / "_CHECKPOINT_METADATA").write_bytes(b"\0" * 40)  # zeroed step metadata
  (tmp_path / "best" / "3" / "metrics" / "metrics").write_text("{")  # best metric unreadable
  with Checkpointer(str(tmp_path), max_to_keep=5) as ckpt:
    assert ckpt.all_steps() == [1, 2, 3]
    for s, state in states.items():
      _assert_trees_equal(ckpt.restore(_zeros_like(state), s)[0], state)
    assert ckpt.all_steps(best=True) == [] and ckpt.best_value is None
  warnings = _warnings(caplog)
  assert len(warnings) == 3, warnings
  assert any(f"{tmp_path}/3 had lost its commit_success.txt" in w for w in warnings)
  assert any(f"{tmp_path}/2/_CHECKPOINT_METADATA was missing or unreadable" in w
             for w in warnings)
  assert any(f"best checkpoint {tmp_path}/best/3" in w and "unreadable/best-3" in w
             for w in warnings)
  assert (tmp_path / "unreadable" / "best-3" / "state").is_dir()


def test_unreadable_best_is_set_aside_when_checked(tmp_path, caplog):
  state = _make_state(1)
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save_best(4, state, extra={}, metric_value=0.5)
  for path in (tmp_path / "best" / "4" / "state").rglob("manifest.ocdbt"):
    path.write_bytes(b"\0" * path.stat().st_size)
  with Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.best_value == pytest.approx(0.5)
    ckpt.check_best(_zeros_like(state))
    assert ckpt.all_steps(best=True) == [] and ckpt.best_value is None
    assert ckpt.save_best(6, state, extra={}, metric_value=0.1)  # a new best is chosen
  warnings = _warnings(caplog)
  assert len(warnings) == 1 and "unreadable best checkpoint" in warnings[0], warnings
  assert (tmp_path / "unreadable" / "best-4").is_dir()


def test_deleted_state_metadata_makes_the_checkpoint_unreadable_not_foreign(tmp_path):
  state = _make_state(1)
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(5, state, extra={})
  (tmp_path / "5" / "state" / "_METADATA").unlink()
  with Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(UnreadableCheckpointError, match="no state metadata"):
      ckpt.restore(_zeros_like(state))


def test_a_save_on_a_full_disk_is_one_error_and_keeps_the_older_checkpoints(tmp_path):
  """A real full disk (a 1 MiB tmpfs; needs root), not a simulated error."""
  with tmpfs_disk(tmp_path / "disk", "1m") as disk:
    state = {"w": jnp.arange(64 * 1024, dtype=jnp.float32)}  # 256 KiB per checkpoint
    with Checkpointer(str(disk / "ckpt")) as ckpt:
      ckpt.save(1, state, extra={})
      stat = os.statvfs(disk)
      (disk / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 100_000))
      with pytest.raises(CheckpointWriteError) as failure:
        ckpt.save(2, state, extra={})
    message = str(failure.value)
    assert "No space left on device" in message.splitlines()[0]
    assert "newest: step" in message and "run the same command again" in message
    assert not list((disk / "ckpt").glob("*orbax-checkpoint-tmp*"))  # the failed save's
    with Checkpointer(str(disk / "ckpt")) as ckpt:
      for step in ckpt.all_steps():
        _assert_trees_equal(ckpt.restore(_zeros_like(state), step)[0], state)


def test_abandoned_orbax_io_is_quiet_from_the_moment_a_checkpointer_opens(tmp_path):
  """A failed save's writer threads can report "Event loop is closed" (an unraisable exception
  with no object) before the save's own error reaches the Checkpointer, so the filter must be in
  place from the start; other unraisable exceptions still print."""
  script = (
      "import gc, sys\n"
      "from usss_jax.checkpoint import Checkpointer\n"
      "class Abandoned:\n"
      "  def __init__(self, message): self.message = message\n"
      "  def __del__(self): raise RuntimeError(self.message)\n"
      f"ckpt = Checkpointer({str(tmp_path / 'ckpt')!r})\n"
      "Abandoned('Event loop is closed'); Abandoned('a real bug'); gc.collect()\n"
      "ckpt.close(); print('done')\n")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300, check=False)
  assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr[-2000:]
  assert "a real bug" in out.stderr and "Event loop is closed" not in out.stderr, out.stderr
