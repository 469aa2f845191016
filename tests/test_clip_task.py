"""CLIP model shapes, the sharded contrastive loss (8 fake devices), the task glue."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dalle_jax.configs import clip as clip_configs
from dalle_jax.models import clip as clip_lib
from dalle_jax.tasks import clip as clip_task


@pytest.mark.parametrize("preset,expected", [
    ("vit_b32", 151_277_313),  # == transformers CLIPModel(CLIPConfig()) (OpenAI ViT-B/32)
    ("vit_b16", 149_620_737),
    ("vit_l14", 427_616_513),
])
def test_published_sizes_abstractly(preset, expected):
  config = clip_configs.get_config(preset)
  model = clip_lib.build_model(config)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               *clip_lib.dummy_inputs(config, 2)))
  assert clip_lib.param_count(abstract["params"]) == expected
  out = jax.eval_shape(lambda v: model.apply(v, *clip_lib.dummy_inputs(config, 2)), abstract)
  assert out["image"].shape == (2, config.model.embed_dim)


@pytest.fixture(scope="module")
def shapes_setup():
  config = clip_configs.get_config("shapes")
  model = clip_lib.build_model(config)
  x = clip_lib.dummy_inputs(config, 3)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), *x)
  return config, model, variables


def test_shapes_model_forward_and_temperature(shapes_setup):
  config, model, v = shapes_setup
  x = clip_lib.dummy_inputs(config, 3)
  apply = jax.jit(model.apply)
  out = apply(v, *x)
  np.testing.assert_allclose(np.linalg.norm(out["image"], axis=-1), 1, rtol=1e-5)
  np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
  # Clamped at 100 however large the parameter grows.
  params = dict(v["params"], logit_scale=jnp.asarray(10.0))
  assert float(apply({"params": params}, *x)["logit_scale"]) == pytest.approx(100.0)
  # SigLIP: same towers plus a bias, t' = log 10, b = -10.
  m2 = clip_lib.build_model(clip_configs.get_config("shapes_siglip"))
  v2 = jax.eval_shape(m2.init, jax.random.PRNGKey(0), *x)
  assert set(v2["params"]) == set(v["params"]) | {"logit_bias"}
  init_t = jax.jit(lambda: m2.init({"params": jax.random.PRNGKey(0)},
                                    method=clip_lib.CLIP.temperature))
  scale, bias = jax.jit(lambda v: m2.apply(v, method=clip_lib.CLIP.temperature))(init_t())
  assert float(scale) == pytest.approx(10.0, rel=1e-5) and float(bias) == pytest.approx(-10.0)


def _reference_loss(img, txt, scale, bias, kind):
  logits = scale * img @ txt.T
  n = len(img)
  if kind == "softmax":
    ce = lambda l: jnp.mean(jax.nn.logsumexp(l, 1) - jnp.diag(l))
    return (ce(logits) + ce(logits.T)) / 2
  z = 2 * jnp.eye(n) - 1
  return -jnp.sum(jax.nn.log_sigmoid(z * (logits + bias))) / n


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_sharded_loss_and_grads_equal_unsharded(kind):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  B, E = 32, 8
  rng = np.random.default_rng(0)
  raw_img = rng.normal(size=(B, E)).astype(np.float32)
  raw_txt = (raw_img + rng.normal(size=(B, E))).astype(np.float32)  # correlated pairs
  scale, bias = np.float32(5.0), np.float32(-2.0)

  def loss(img, txt, s, b, m):
    img, txt = clip_lib.l2_normalize(img), clip_lib.l2_normalize(txt)
    return clip_task.contrastive_loss(img, txt, s, b, kind, mesh=m)

  ref = lambda i, t, s, b: _reference_loss(clip_lib.l2_normalize(i), clip_lib.l2_normalize(t),
                                           s, b, kind)
  ref_val, ref_grads = jax.value_and_grad(ref, argnums=(0, 1, 2, 3))(raw_img, raw_txt, scale, bias)

  row = NamedSharding(mesh, P(("data", "fsdp")))
  img_s, txt_s = jax.device_put(raw_img, row), jax.device_put(raw_txt, row)
  f = jax.jit(jax.value_and_grad(lambda *a: loss(*a, mesh), argnums=(0, 1, 2, 3), has_aux=True))
  (val, metrics), grads = f(img_s, txt_s, scale, bias)
  np.testing.assert_allclose(val, ref_val, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
  # Metrics against the dense computation.
  logits = scale * np.asarray(clip_lib.l2_normalize(raw_img) @ clip_lib.l2_normalize(raw_txt).T)
  assert float(metrics["i2t_accuracy"]) == pytest.approx(np.mean(logits.argmax(1) == np.arange(B)))
  assert float(metrics["t2i_accuracy"]) == pytest.approx(np.mean(logits.argmax(0) == np.arange(B)))
  # Unsharded path (no mesh) agrees too.
  np.testing.assert_allclose(loss(raw_img, raw_txt, scale, bias, None)[0], ref_val, rtol=1e-5)
  # No device materialises the global B x B logits: only (B/8) x B blocks.
  hlo = f.lower(img_s, txt_s, scale, bias).compile().as_text()
  assert f"f32[{B},{B}]" not in hlo and f"f32[{B // 8},{B}]" in hlo


def test_random_resized_crop():
  imgs = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
  same = clip_task.random_resized_crop(jax.random.PRNGKey(0), imgs, (1.0, 1.0), (1.0, 1.0))
  np.testing.assert_allclose(same, imgs, atol=1e-5)
  out = clip_task.random_resized_crop(jax.random.PRNGKey(1), imgs, (0.3, 0.6), flip=True)
  assert out.shape == imgs.shape and float(jnp.abs(out - imgs).mean()) > 0.05
  assert float(out.min()) >= -1.001 and float(out.max()) <= 1.001


def test_task_step_under_mesh_and_flops(shapes_setup):
  from dalle_jax import parallel
  config, _, variables = shapes_setup
  task = clip_task.TASK(config)
  mesh = parallel.make_mesh(config.mesh)
  batch = task.dummy_batch(16)
  batch["text_ids"] = np.tile(np.arange(16, dtype=np.int32)[:, None] % 7 + 4, (1, 16))
  batch["image"] = np.random.default_rng(0).uniform(-1, 1, batch["image"].shape).astype(np.float32)
  params = jax.device_put(parallel.unbox(variables["params"]), parallel.replicated(mesh))
  with parallel.mesh_context(mesh, config):
    sharded = parallel.shard_batch(batch, mesh)
    grad_fn = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))
    (loss, (metrics, _)), grads = grad_fn(params, {}, sharded, jax.random.PRNGKey(1), 0)
    # The mesh the trainer enters is picked up: the loss runs sharded.
    hlo = grad_fn.lower(params, {}, sharded, jax.random.PRNGKey(1), 0).compile().as_text()
  assert "f32[16,16]" not in hlo and "f32[2,16]" in hlo
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert set(metrics) >= {"i2t_accuracy", "t2i_accuracy", "logit_scale"}
  assert float(jnp.abs(grads["logit_scale"])) > 0
  m = jax.jit(task.eval_fn)(params, {}, batch, jax.random.PRNGKey(0))
  assert "loss" in m
  assert task.flops_per_example() > 0
