"""Tests for usss_jax.metric_writers: JSON lines, TensorBoard event files, progress, NaN checks."""

import glob
import io
import json
import os
import pathlib
import struct
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2, plugin_hparams_pb2

from usss_jax.metric_writers import (MetricWriter, NonFiniteLossError,
                                     check_finite, read_records)

# --- A TFRecord / event-file reader written from the format spec, independent of the writer.


def _crc32c_table():
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def _crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path: str) -> list[event_pb2.Event]:
  """Parses TFRecord framing (length, masked CRC, payload, masked CRC) into Events."""
  events = []
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert header_crc == _masked_crc(header), f"bad length CRC at byte {pos}"
    payload = data[pos + 12:pos + 12 + length]
    (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert payload_crc == _masked_crc(payload), f"bad payload CRC at byte {pos}"
    events.append(event_pb2.Event.FromString(payload))
    pos += 16 + length
  assert pos == len(data)
  return events


def _event_file(workdir) -> str:
  files = glob.glob(os.path.join(str(workdir), "tensorboard", "events.out.tfevents.*"))
  assert len(files) == 1, files
  return files[0]


def _scalars(events) -> dict[str, list[tuple[int, float]]]:
  out = {}
  for event in events:
    for value in event.summary.value:
      if value.HasField("simple_value"):
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def _read_jsonl(workdir) -> list[dict]:
  with open(os.path.join(str(workdir), "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_crc32c_reference_vector():
  assert _crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def test_scalars_go_to_jsonl_and_tensorboard(tmp_path):
  with MetricWriter(str(tmp_path)) as writer:
    writer.write_scalars(10, {"loss": np.float32(0.125), "lr": jnp.asarray(0.01),
                              "entropy/cityscapes": 1.5, "num_pixels": np.int64(4096)})
    writer.write_scalars(20, {"loss": 0.0625, "lr": 0.009})
  lines = _read_jsonl(tmp_path)
  assert lines[0] == {"step": 10, "kind": "train", "loss": 0.125,
                      "lr": float(np.float32(0.01)), "entropy/cityscapes": 1.5,
                      "num_pixels": 4096}
  assert isinstance(lines[0]["num_pixels"], int)
  assert lines[1] == {"step": 20, "kind": "train", "loss": 0.0625, "lr": 0.009}

  events = _read_events(_event_file(tmp_path))
  assert events[0].file_version == "brain.Event:2"
  scalars = _scalars(events)
  assert scalars["train/loss"] == [(10, 0.125), (20, 0.0625)]
  assert scalars["train/entropy/cityscapes"] == [(10, 1.5)]
  assert scalars["train/lr"][1][0] == 20
  assert scalars["train/lr"][1][1] == pytest.approx(0.009, rel=1e-6)

  # A second writer (a resumed run) appends to metrics.jsonl.
  with MetricWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write_scalars(30, {"loss": 0.5})
  assert [line["step"] for line in _read_jsonl(tmp_path)] == [10, 20, 30]


def test_each_line_is_on_disk_before_close(tmp_path):
  writer = MetricWriter(str(tmp_path), tensorboard=False)
  writer.write_scalars(1, {"loss": 2.0})
  # Read while the writer is still open: a killed run keeps this line.
  assert _read_jsonl(tmp_path) == [{"step": 1, "kind": "train", "loss": 2.0}]
  writer.close()


def test_torn_last_line_is_skipped_by_readers_and_cut_on_resume(tmp_path):
  """A kill mid-write leaves an unterminated line; the resumed run must not glue onto it."""
  with MetricWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write_scalars(1, {"loss": 2.0})
  path = os.path.join(str(tmp_path), "metrics.jsonl")
  whole = open(path, "rb").read()
  with open(path, "ab") as f:
    f.write(b'{"step": 2, "kind": "train", "lo')  # what a SIGKILL mid-write leaves
  assert read_records(path) == [{"step": 1, "kind": "train", "loss": 2.0}]
  assert read_records(path, offset=len(whole)) == []
  with MetricWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write_scalars(2, {"loss": 1.5})
  assert _read_jsonl(tmp_path) == [{"step": 1, "kind": "train", "loss": 2.0},
                                   {"step": 2, "kind": "train", "loss": 1.5}]


def test_eval_results_nested(tmp_path):
  results = {"mean_miou": np.float64(0.4),
             "cityscapes": {"miou": 0.5, "iou": np.array([0.25, np.nan, 0.75]),
                            "class_names": ["road", "sky", "car"], "num_images": 3},
             "idd": {"miou": jnp.float32(0.3)}}
  with MetricWriter(str(tmp_path)) as writer:
    writer.write_eval(100, results)
  (line,) = _read_jsonl(tmp_path)
  assert line == {"step": 100, "kind": "eval", "mean_miou": 0.4,
                  "cityscapes": {"miou": 0.5, "iou": [0.25, None, 0.75],
                                 "class_names": ["road", "sky", "car"], "num_images": 3},
                  "idd": {"miou": float(np.float32(0.3))}}
  scalars = _scalars(_read_events(_event_file(tmp_path)))
  assert set(scalars) == {"eval/mean_miou", "eval/cityscapes/miou",
                          "eval/cityscapes/num_images", "eval/idd/miou"}
  assert scalars["eval/cityscapes/miou"] == [(100, 0.5)]
  assert scalars["eval/idd/miou"][0][1] == pytest.approx(0.3, rel=1e-6)


def test_images_read_back_exactly(tmp_path):
  rng = np.random.default_rng(0)
  single = rng.integers(0, 256, size=(6, 10, 3), dtype=np.uint8)
  batch = rng.integers(0, 256, size=(2, 4, 5, 3), dtype=np.uint8)
  with MetricWriter(str(tmp_path)) as writer:
    writer.write_images(7, {"pred": single, "samples": batch})
    with pytest.raises(ValueError, match=r"image 'bad': expected uint8 .* got float32 \(4, 4, 3\)"):
      writer.write_images(7, {"bad": np.zeros((4, 4, 3), np.float32)})
  decoded = {}
  for event in _read_events(_event_file(tmp_path)):
    for value in event.summary.value:
      if value.HasField("image"):
        assert event.step == 7
        image = Image.open(io.BytesIO(value.image.encoded_image_string))
        decoded[value.tag] = np.asarray(image.convert("RGB"))
  assert set(decoded) == {"pred", "samples/0", "samples/1"}
  np.testing.assert_array_equal(decoded["pred"], single)
  np.testing.assert_array_equal(decoded["samples/0"], batch[0])
  np.testing.assert_array_equal(decoded["samples/1"], batch[1])


def test_hparams_flattened(tmp_path):
  config = {"optim": {"base_lr": 0.01, "momentum": 0.9}, "model": "drn_d_22",
            "datasets": ("cityscapes", "idd"), "use_entropy": True, "batch_size": 8}
  with MetricWriter(str(tmp_path)) as writer:
    writer.write_hparams(config)
  (line,) = _read_jsonl(tmp_path)
  assert line == {"kind": "hparams", "hparams": {
      "optim/base_lr": 0.01, "optim/momentum": 0.9, "model": "drn_d_22",
      "datasets": "('cityscapes', 'idd')", "use_entropy": True, "batch_size": 8}}
  starts = [value for event in _read_events(_event_file(tmp_path))
            for value in event.summary.value if value.tag == "_hparams_/session_start_info"]
  assert len(starts) == 1
  plugin = plugin_hparams_pb2.HParamsPluginData.FromString(
      starts[0].metadata.plugin_data.content)
  hparams = plugin.session_start_info.hparams
  assert hparams["optim/base_lr"].number_value == 0.01
  assert hparams["model"].string_value == "drn_d_22"
  assert hparams["use_entropy"].bool_value is True


def test_disabled_writer_creates_nothing(tmp_path):
  workdir = tmp_path / "process1"
  with MetricWriter(str(workdir), enabled=False) as writer:
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_eval(1, {"miou": 0.5})
    writer.write_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
    writer.write_hparams({"a": 1})
    writer.flush()
  assert not workdir.exists()


def test_tensorboard_off_and_bad_values(tmp_path):
  with MetricWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write_scalars(1, {"loss": float("nan")})
    with pytest.raises(ValueError, match="reserved"):
      writer.write_scalars(2, {"step": 3})
    with pytest.raises(ValueError, match=r"metric 'iou': expected a number.*shape \(3,\)"):
      writer.write_scalars(2, {"iou": np.zeros(3)})
  assert not (tmp_path / "tensorboard").exists()
  # Strict JSON: NaN becomes null.
  assert _read_jsonl(tmp_path) == [{"step": 1, "kind": "train", "loss": None}]


def test_check_finite():
  check_finite(5, {"loss": 1.0, "aux": jnp.asarray(2.0), "count": np.int32(3)})
  with pytest.raises(NonFiniteLossError, match="non-finite loss_entropy=nan at step 1234") as e:
    check_finite(1234, {"loss": 1.0, "loss_entropy": jnp.asarray(jnp.nan)})
  assert (e.value.step, e.value.name) == (1234, "loss_entropy")
  assert np.isnan(e.value.value)
  with pytest.raises(NonFiniteLossError, match="at step 7") as e:
    check_finite(7, {"loss": np.float32(-np.inf)})
  assert e.value.value == -np.inf


def test_resume_drops_the_records_of_replayed_steps_and_purges_their_events(tmp_path):
  """A run resumed at step 2 runs steps 3.. again: each step ends up once in metrics.jsonl,
  and TensorBoard is told to hide the first pass's events from step 3 on."""
  with MetricWriter(str(tmp_path)) as writer:
    writer.write_hparams({"lr": 0.1})
    for step in (1, 2, 3, 4):
      writer.write_scalars(step, {"loss": float(step)})
    writer.write_eval(4, {"mean_miou": 0.5})
  first_events = _event_file(tmp_path)
  with MetricWriter(str(tmp_path), resume_step=2) as writer:
    assert writer.eval_steps == set()
    writer.write_scalars(3, {"loss": 30.0})
  records = _read_jsonl(tmp_path)
  assert [(r.get("kind"), r.get("step")) for r in records] == [
      ("hparams", None), ("train", 1), ("train", 2), ("train", 3)]
  assert records[-1]["loss"] == 30.0
  second = [f for f in glob.glob(os.path.join(str(tmp_path), "tensorboard", "events.*"))
            if f != first_events]
  assert len(second) == 1
  starts = [e for e in _read_events(second[0]) if e.HasField("session_log")]
  assert [(e.step, e.session_log.status) for e in starts] == [(3, event_pb2.SessionLog.START)]
  # Resuming at 0 drops everything, hparams included (the new start writes them again).
  with MetricWriter(str(tmp_path), tensorboard=False, resume_step=0):
    pass
  assert _read_jsonl(tmp_path) == []


def test_unreadable_lines_are_dropped_with_one_warning(tmp_path, caplog):
  with MetricWriter(str(tmp_path), tensorboard=False) as writer:
    for step in (1, 2, 3):
      writer.write_scalars(step, {"loss": float(step)})
    writer.write_eval(3, {"mean_miou": 0.5})
  path = os.path.join(str(tmp_path), "metrics.jsonl")
  lines = open(path, "rb").read().split(b"\n")
  lines[1] = b"\0" * len(lines[1])  # a damaged block inside the file
  with open(path, "wb") as f:
    f.write(b"\n".join(lines) + b'{"step": 4, "ki')  # and a torn tail
  with MetricWriter(str(tmp_path), tensorboard=False, resume_step=3) as writer:
    assert writer.eval_steps == {3}
    assert writer.eval_record(3)["mean_miou"] == 0.5
  assert [r["step"] for r in _read_jsonl(tmp_path)] == [1, 3, 3]
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and path in warnings[0] and "1 line(s) that do not read" in warnings[0]


def test_a_full_disk_is_one_error_naming_metrics_jsonl(tmp_path):
  """RLIMIT_FSIZE in a child process: the append that crosses the limit fails (EFBIG)."""
  code = f"""
import resource, sys
sys.path.insert(0, {str(pathlib.Path(__file__).resolve().parents[1])!r})
from usss_jax import files
from usss_jax.metric_writers import MetricWriter
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
with MetricWriter({str(tmp_path)!r}, tensorboard=False) as writer:
  try:
    for step in range(1, 1000):
      writer.write_scalars(step, {{"loss": 1.0}})
  except files.WriteError as e:
    print(e)
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  lines = out.stdout.strip().splitlines()
  assert out.returncode == 0 and len(lines) == 2, out.stdout + out.stderr
  assert lines[0] == f"{tmp_path}/metrics.jsonl: cannot write (File too large)"
  assert "free space" in lines[1] and "run the same command again" in lines[1]
  # What was written before stays readable; the torn line is cut when the run resumes.
  with MetricWriter(str(tmp_path), tensorboard=False, resume_step=10**6):
    pass
  steps = [r["step"] for r in _read_jsonl(tmp_path)]
  assert steps == list(range(1, len(steps) + 1)) and len(steps) > 10
