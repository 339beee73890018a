"""The pure train step: loss composition per method, sharded == unsharded, determinism."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import TINY, build_train_step, tiny_synthetic_config
from usss_jax import config as config_lib
from usss_jax import convert, losses, modes, objectives, sharding, train_step
from usss_jax import state as state_lib
from usss_jax.models import drn

NAMES = ("a", "b")
CLASSES = (3, 4)
HW = (16, 24)


def tiny_config(method="full", **overrides) -> ml_collections.ConfigDict:
  return tiny_synthetic_config(NAMES, HW, method, **overrides)


def make_batch(seed=0, b=8):
  rng = np.random.default_rng(seed)
  batch = {}
  for n, c in zip(NAMES, CLASSES):
    label = rng.integers(0, c, size=(b, *HW)).astype(np.int32)
    label[:, :2] = 255
    box = np.zeros((b, *HW), bool)
    box[:, 3:9, 4:14] = True
    batch[n] = {"labeled": {"image": rng.normal(size=(b, *HW, 3)).astype(np.float32),
                            "label": label},
                "unlabeled": {"image": rng.normal(size=(b, *HW, 3)).astype(np.float32),
                              "strong": rng.normal(size=(b, *HW, 3)).astype(np.float32),
                              "cutmix_mask": box, "valid": np.ones((b, *HW), bool)}}
  return batch


def build(config, seed=0):
  model, _, state, step = build_train_step(config, CLASSES, HW, seed=seed)
  return model, state, step


def copy_tree(tree):
  return jax.tree.map(lambda x: jnp.array(np.asarray(x)), tree)


@pytest.mark.parametrize("method", list(objectives.METHODS))
def test_loss_composition(method):
  config = tiny_config(method, alpha=2.0, beta=3.0, ser_weight=0.5)
  model, state, step = build(config)
  batch = make_batch()
  _, m = jax.jit(step)(copy_tree(state), batch)
  m = jax.device_get(m)
  sup = m["supervised/a"] + m["supervised/b"]
  has = lambda term: any(k.startswith(term + "/") for k in m)
  if method in ("single", "basic"):
    assert not has("within") and not has("cross") and not has("ser")
    np.testing.assert_allclose(m["loss"], sup, rtol=1e-6)
  elif method == "cross":
    assert has("cross") and not has("within") and not has("ser")
    np.testing.assert_allclose(m["loss"], sup + 2.0 * (m["cross/a"] + m["cross/b"]), rtol=1e-6)
  elif method == "full":
    assert has("cross") and has("within")
    want = sup + 2.0 * (m["cross/a"] + m["cross/b"]) + 3.0 * (m["within/a"] + m["within/b"])
    np.testing.assert_allclose(m["loss"], want, rtol=1e-6)
    # The entropy terms are those of the loss functions on the model's embeddings.
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    emb = model.apply(variables, jnp.asarray(batch["a"]["unlabeled"]["image"]), train=True,
                      head=0, logits=False, embedding=True, mutable=["batch_stats"])[0]
    assert np.isfinite(float(losses.within_domain_entropy(emb["embedding"],
                                                          state["label_embeddings"], 0)))
  elif method == "ser":
    assert has("ser") and not has("cross") and not has("within")
    np.testing.assert_allclose(m["loss"], sup + 0.5 * (m["ser/a"] + m["ser/b"]), rtol=1e-6)
  elif method == "consistency":
    assert has("consistency") and not has("cross") and not has("within") and not has("ser")
    np.testing.assert_allclose(m["loss"], sup + m["consistency/a"] + m["consistency/b"],
                               rtol=1e-6)
  else:  # universal: the terms of full plus consistency
    assert method == "universal" and has("consistency") and has("cross") and has("within")
    want = (sup + 2.0 * (m["cross/a"] + m["cross/b"]) + 3.0 * (m["within/a"] + m["within/b"])
            + m["consistency/a"] + m["consistency/b"])
    np.testing.assert_allclose(m["loss"], want, rtol=1e-6)


def test_single_freezes_encoder_for_other_domains():
  config = tiny_config("single", single_domain="a")
  model, state, step = build(config)
  batch = make_batch()
  # Gradient w.r.t. the encoder must come from domain "a" alone: changing b's labels
  # must not change the encoder update, but must change head_1.
  s1, _ = jax.jit(step)(copy_tree(state), batch)
  batch2 = make_batch()
  batch2["b"]["labeled"]["label"] = (batch2["b"]["labeled"]["label"] + 1) % 4
  s2, _ = jax.jit(step)(copy_tree(state), batch2)
  enc1, enc2 = s1["params"]["encoder"], s2["params"]["encoder"]
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), enc1, enc2)
  assert not np.allclose(s1["params"]["head_1"]["kernel"], s2["params"]["head_1"]["kernel"])
  # Frozen domains run in eval mode: batch stats change only through domain "a".
  s3, _ = jax.jit(step)(copy_tree(state), {**batch, "b": make_batch(5)["b"]})
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y),
               s1["batch_stats"], s3["batch_stats"])


def test_sharded_step_equals_single_device():
  assert jax.device_count() == 8
  config = tiny_config("full")
  model, state, step = build(config)
  mesh = sharding.make_mesh()
  sharded_step = train_step.jit_train_step(step, mesh)
  single_step = jax.jit(step)
  s_state = jax.device_put(copy_tree(state), sharding.replicated(mesh))

  def rel_diff(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-12))

  # Each step starts both versions from the same state: one step agrees to float32
  # reduction-order noise, which later steps would amplify through near-zero BN biases.
  for i in range(3):
    b = make_batch(i)
    start = copy_tree(s_state)
    s_state, s_m = sharded_step(s_state, jax.device_put(b, sharding.batch_sharded(mesh)))
    u_state, u_m = single_step(jax.device_put(start, jax.devices()[0]),
                               jax.device_put(b, jax.devices()[0]))
    for k in u_m:
      np.testing.assert_allclose(s_m[k], u_m[k], rtol=1e-5, err_msg=f"step {i}: {k}")
    diffs = jax.tree.map(rel_diff, (s_state["params"], s_state["batch_stats"]),
                         (u_state["params"], u_state["batch_stats"]))
    assert max(jax.tree.leaves(diffs)) < 1e-4, i
  assert s_state["params"]["head_0"]["kernel"].sharding.is_fully_replicated
  assert len(s_state["params"]["head_0"]["kernel"].sharding.device_set) == 8


def test_step_is_deterministic_and_learns():
  config = tiny_config("full", learning_rate=0.01)
  model, state, step = build(config)
  jstep = jax.jit(step)
  batch = make_batch()
  a, ma = jstep(copy_tree(state), batch)
  b, mb = jstep(copy_tree(state), batch)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a["params"], b["params"])
  # Repeating one batch must drive the supervised loss down.
  s = copy_tree(state)
  first = None
  for _ in range(15):
    s, m = jstep(s, batch)
    first = first if first is not None else float(m["supervised/a"])
  assert float(m["supervised/a"]) < 0.8 * first
  assert int(s["step"]) == 15


def test_ema_updates_label_embeddings():
  config = tiny_config("full")
  config.label_embeddings.ema_theta = 0.9
  model, state, step = build(config)
  new, _ = jax.jit(step)(copy_tree(state), make_batch())
  for old, upd in zip(state["label_embeddings"], new["label_embeddings"]):
    assert old.shape == upd.shape and not np.allclose(old, upd)
  config.label_embeddings.ema_theta = 0.0
  _, state, step = build(config)
  new, _ = jax.jit(step)(copy_tree(state), make_batch())
  for old, upd in zip(state["label_embeddings"], new["label_embeddings"]):
    np.testing.assert_array_equal(old, upd)


@pytest.mark.parametrize("key,value,match", [
    ("method", "fancy", "config.method"),
    ("domain_names", ("a", "zzz"), "zzz"),
    ("labeled_batch", 3, "labeled_batch"),
    ("dtype", "float16", "config.dtype"),
    ("single_domain", "nope", "single_domain"),
])
def test_bad_config_values(key, value, match):
  config = tiny_config("single" if key == "single_domain" else "full")
  config[key] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    modes.check_config(config)


def test_unknown_config_key_is_an_error():
  config = tiny_config()
  config.lock()
  with pytest.raises(AttributeError):
    config.alhpa = 1.0


def test_poly_schedule_matches_optax_and_stays_finite_past_the_end():
  import optax
  ours = jax.jit(state_lib.poly_schedule(0.01, 0.9, 100))
  ref = optax.polynomial_schedule(0.01, 0.0, 0.9, 100)
  for t in (0, 1, 37, 99):
    np.testing.assert_allclose(ours(t), ref(t), rtol=1e-5)
  # jit(optax's schedule)(100) is NaN on XLA:CPU (0.0 ** 0.9); ours is 0.
  assert float(ours(100)) == 0.0 and float(ours(150)) == 0.0


def test_pretrained_encoder_weights_are_loaded(tmp_path):
  config = tiny_config("basic")
  model, state, _ = build(config)
  encoder = drn.make_encoder(config.encoder, TINY)
  # An "ImageNet" checkpoint in the reference's torch layout, with the reference's prefix.
  source = jax.tree.map(lambda x: np.asarray(x) + 0.5, {
      "params": state["params"]["encoder"], "batch_stats": state["batch_stats"]["encoder"]})
  torch_sd = {f"module.{k}": v for k, v in convert.drn_variables_to_torch(source, encoder).items()}
  path = tmp_path / "drn_tiny.npz"
  np.savez(path, **torch_sd)
  config.pretrained = str(path)
  loaded = state_lib.load_pretrained_encoder(config, state)
  np.testing.assert_array_equal(loaded["params"]["encoder"]["layer0"]["0"]["kernel"],
                                source["params"]["layer0"]["0"]["kernel"])
  np.testing.assert_array_equal(loaded["batch_stats"]["encoder"]["layer8"]["1"]["var"],
                                source["batch_stats"]["layer8"]["1"]["var"])
  # Heads and the entropy module are untouched.
  np.testing.assert_array_equal(loaded["params"]["head_0"]["kernel"],
                                state["params"]["head_0"]["kernel"])
