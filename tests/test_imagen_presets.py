"""configs/imagen.py: the paper-size SR stages abstractly (parameter counts, shardings on a fake
pod; never allocated), the shapes stages' keys, the SR task's config errors and its training
input (the batch's own image, downsampled, upsampled back, noised at a per-row level)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

from dalle_jax.configs import imagen as imagen_cfg
from dalle_jax import parallel
from dalle_jax.diffusion import cascade as cascade_lib
from dalle_jax.tasks import diffusion as diffusion_task


def _abstract(config):
  task = diffusion_task.DiffusionTask(config)
  abstract = jax.eval_shape(task.init, jax.random.PRNGKey(0), task.dummy_batch(1))
  return task, abstract


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_efficient_unet_sr_presets_abstractly():
  """imagen_sr256: Efficient U-Net 128 x (1, 2, 4, 8), (2, 4, 8, 8) blocks, self + cross
  attention at the lowest level; imagen_sr1024 the same without self-attention. The paper's
  models are 600M / 400M with one skip per level; ours concatenate a skip into every up
  ResBlock (ADM / diffusers layout), so the counts are larger: checked here against the
  hand count of what self-attention adds."""
  counts = {}
  for name in ("imagen_sr256", "imagen_sr1024"):
    config = imagen_cfg.get_config(name)
    task, abstract = _abstract(config)
    params = parallel.unbox(abstract)["params"]
    counts[name] = _count(params)
    assert set(params) == {"unet"}  # frozen T5 states: no text module is trained
    assert task.t5_states and task.text_width == 4096 and task.text_len == 128
    assert task.sr.low_res_size == {"imagen_sr256": 64, "imagen_sr1024": 256}[name]
    assert task.image_size == {"imagen_sr256": 256, "imagen_sr1024": 1024}[name]
    assert params["unet"]["conv_in"]["kernel"].shape[2] == 6  # x_t ++ the low-res image
    # FSDP x tensor on an abstract pod: per-chip bytes a fraction of the whole
    mesh = AbstractMesh((1, 64, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    shardings = parallel.unbox(parallel.logical_shardings(abstract, mesh,
                                                          parallel.rules_from_config(config)))
    per_chip = sum(int(np.prod(s.shard_shape(x.shape))) for x, s in
                   zip(jax.tree.leaves(params), jax.tree.leaves(shardings["params"])))
    assert per_chip < counts[name] / 16, (name, per_chip)
  # one self-attention block at 1024 channels: GroupNorm (2 x 1024) + q, k, v, out (1024^2 +
  # 1024 each); the lowest level has 8 down + 9 up blocks + the middle one = 18 of them
  self_attn = 2 * 1024 + 4 * (1024 * 1024 + 1024)
  assert counts["imagen_sr256"] - counts["imagen_sr1024"] == 18 * self_attn
  assert 0.85e9 < counts["imagen_sr256"] < 1.0e9, counts


def test_shapes_presets_and_locked_keys():
  base, sr = imagen_cfg.get_config("shapes_base16"), imagen_cfg.get_config("shapes_sr32")
  assert (base.data.image_size, base.model.low_res_size) == (16, 0)
  assert (sr.data.image_size, sr.model.low_res_size) == (32, 16)
  assert base.data.dataset == sr.data.dataset == "shapes/32px_5000"  # 32 px, resized
  assert sr.model.unet.low_res_channels == 3
  assert "noise_level:timestep" in sr.model.unet.extra_embeds
  assert base.family == sr.family == "diffusion"
  sr.text.max_len = 12  # the text context stays one shared reference
  assert sr.model.text.max_len == 12
  with pytest.raises(ValueError, match="unknown preset 'nope'"):
    imagen_cfg.get_config("nope")


@pytest.mark.parametrize("change,message", [
    (lambda c: c.model.unet.update(low_res_channels=0),
     r"low_res_size=16: set config.model.unet.low_res_channels=3"),
    (lambda c: c.model.unet.update(extra_embeds=()),
     r"level_embed='noise_level' must be declared in config.model.unet.extra_embeds"),
    (lambda c: c.model.update(low_res_size=32), r"low_res_size=32 must be below .*image_size=32"),
])
def test_sr_config_errors_name_the_key(change, message):
  config = imagen_cfg.get_config("shapes_sr32")
  change(config)
  with pytest.raises(ValueError, match=message):
    diffusion_task.low_res_conditioning(config)


def test_training_input_is_the_images_own_low_res_version():
  """Without noise: bicubic(antialiased downsample(x)); with noise: each row at its own level,
  z = sqrt(abar) up + sqrt(1 - abar) eps (mean and spread over a constant image); blur changes
  the input only when switched on."""
  torch = pytest.importorskip("torch")
  x = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  plain = cascade_lib.LowResConditioning(8)
  up, level = jax.jit(plain.train)(jax.random.PRNGKey(0), jnp.asarray(x))
  # torch's bicubic, antialiased down then back up (as PIL resizes)
  t = torch.from_numpy(x.transpose(0, 3, 1, 2))
  down = torch.nn.functional.interpolate(t, (8, 8), mode="bicubic", antialias=True,
                                         align_corners=False)
  want = torch.nn.functional.interpolate(down, (16, 16), mode="bicubic", antialias=True,
                                         align_corners=False).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(up), want, atol=1e-4)
  np.testing.assert_array_equal(level, [0, 0])
  blurred, _ = jax.jit(cascade_lib.LowResConditioning(8, blur=True).train)(
      jax.random.PRNGKey(0), x)
  assert 1e-3 < np.abs(np.asarray(blurred) - np.asarray(up)).max()

  aug = cascade_lib.NoiseAugmentation(cascade_lib.IF_NOISING, max_level=300)
  c = np.full((64, 16, 16, 3), 0.5, np.float32)
  z, level = jax.jit(cascade_lib.LowResConditioning(8, noise=aug).train)(
      jax.random.PRNGKey(1), c)
  level = np.asarray(level)
  assert level.min() >= 0 and level.max() < 300 and len(np.unique(level)) > 30
  abar = np.asarray(aug.diffusion.alphas_cumprod)[level]
  z = np.asarray(z)
  np.testing.assert_allclose(z.mean((1, 2, 3)), 0.5 * np.sqrt(abar), atol=5 * 1 / np.sqrt(768))
  np.testing.assert_allclose(z.std((1, 2, 3)), np.sqrt(1 - abar), atol=0.05 + 5 / np.sqrt(1536))
  with pytest.raises(ValueError, match=r"low-res image of size \(4, 4\); this stage takes 8x8"):
    plain.sample(jnp.zeros((1, 4, 4, 3)), 16, 0, jnp.zeros((1, 16, 16, 3)))


# a training run (54 s); test_cascade trains and samples SR stages in the fast suite
@pytest.mark.slow
def test_sr_stage_on_pre_encoded_t5_states():
  """text_encoder.t5: records carry text_states / text_mask (the trainer never runs T5); the
  U-Net attends to and pools them; caption dropout swaps in the negative prompt's states."""
  c = imagen_cfg.get_config("shapes_sr32")
  c.data.image_size, c.model.low_res_size = 16, 8
  c.text_encoder.t5 = "/nonexistent/t5"  # never opened: the states come with the batch
  c.model.unet.update(dict(block_channels=(16, 32), attention=("none", "added_kv"),
                           mid_attention="added_kv", attn_head_dim=16, norm_groups=8,
                           context_dim=12, context_pool="attention", context_pool_heads=2))
  c.text.max_len = 5
  c.diffusion.cond_drop_prob = 0.5
  task = diffusion_task.DiffusionTask(c)
  assert task.t5_states and (task.text_len, task.text_width) == (5, 12)
  rng = np.random.RandomState(0)
  ex = task.preprocess({"image": rng.uniform(-1, 1, (16, 16, 3)).astype(np.float32),
                        "text_states": rng.randn(5, 12), "text_mask": np.ones(5, bool)})
  assert ex["text_states"].dtype == np.float32 and set(ex) == {"image", "text_states", "text_mask"}
  with pytest.raises(KeyError, match="pre-encoded text_states and text_mask; example has fields "
                                     r"\['caption', 'image'\]"):
    task.preprocess({"image": np.zeros((16, 16, 3), np.float32), "caption": "a red circle"})
  batch = {k: np.stack([v] * 4) for k, v in ex.items()}
  params = parallel.unbox(task.init(jax.random.PRNGKey(0), batch))["params"]
  assert set(params) == {"unet"} and "context_pool" in params["unet"]
  with pytest.raises(ValueError, match="negative prompt's T5 states"):
    task.loss_fn(params, {}, batch, jax.random.PRNGKey(1), 0)
  task.null_text = (np.zeros((5, 12), np.float32), np.ones(5, bool))
  loss, (metrics, _) = jax.jit(task.loss_fn, static_argnums=4)(params, {}, batch,
                                                               jax.random.PRNGKey(1), 0)
  assert np.isfinite(float(loss)) and float(loss) > 0 and set(metrics) >= {"loss_t0"}
