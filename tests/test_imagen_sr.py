"""Learning check of the super-resolution stage (configs/imagen.py:shapes_sr32 reduced to
8 -> 16 px and a 2-level U-Net, unconditional, trained through DiffusionTask.loss_fn): on
held-out shapes images its samples from the 8 px version reconstruct the 16 px image with a
higher PSNR than bicubic upsampling of the same 8 px image (measured: 24.9 vs 24.0 dB after
250 steps; 23.6 after 200 steps on 512 images sampled at level 50). The full preset's
numbers (16 -> 32 px) are in configs/imagen.py's docstring."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dalle_jax.configs import imagen as imagen_cfg
from dalle_jax import parallel
from dalle_jax.data import shapes
from dalle_jax.diffusion import cascade as cascade_lib
from dalle_jax.tasks import diffusion as diffusion_task

SIZE, LOW = 16, 8
STEPS = int(os.environ.get("DALLE_JAX_SR_STEPS", 250))


def _images(split, n):
  return np.stack([shapes.make_example(i, split, SIZE)["image"] for i in range(n)]
                  ).astype(np.float32) / 127.5 - 1


def psnr(x, ref):
  """Mean over images of 10 log10(peak^2 / MSE) on [-1, 1] images (peak-to-peak 2)."""
  mse = np.mean((np.clip(np.asarray(x), -1, 1) - ref) ** 2, axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(4.0 / mse)))


@pytest.mark.slow  # ~250 training steps: minutes on two cores
def test_sr_stage_beats_bicubic_on_held_out_shapes():
  c = imagen_cfg.get_config("shapes_sr32")
  c.model.conditioning = "none"
  c.data.image_size = SIZE
  c.model.low_res_size = LOW
  c.model.unet.update(dict(block_channels=(32, 64), attention=("none", "none"),
                           mid_attention="none"))
  task = diffusion_task.DiffusionTask(c)
  train, test = _images("train", 1024), _images("test", 64)
  params = parallel.unbox(task.init(jax.random.PRNGKey(0), {"image": train[:1]}))["params"]
  opt = optax.adam(optax.warmup_cosine_decay_schedule(0, 3e-3, 20, STEPS, 3e-4))

  @jax.jit
  def step(p, s, x, r):
    (loss, _), g = jax.value_and_grad(lambda p: task.loss_fn(p, {}, {"image": x}, r, 0),
                                      has_aux=True)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state, rng, losses = opt.init(params), np.random.RandomState(0), []
  for i in range(STEPS):
    params, state, loss = step(params, state, train[rng.randint(0, len(train), 32)],
                               jax.random.PRNGKey(i))
    losses.append(float(loss))

  low = task.sr.low_res(jnp.asarray(test))
  level = 0  # the clean low-res image: what bicubic upsampling gets too
  cond_img, lv = task.sr.sample(low, SIZE, level, jax.random.normal(jax.random.PRNGKey(1),
                                                                     test.shape))
  x_T = jax.random.normal(jax.random.PRNGKey(2), test.shape)
  out = jax.jit(lambda p, x, ci, l: task.sample(p, {}, x, None, sampler="ddim", steps=4,
                                                low_res=ci, level=l))(params, x_T, cond_img, lv)
  sr, bicubic = psnr(out, test), psnr(cascade_lib.upsample_bicubic(low, SIZE), test)
  print(f"SR stage {STEPS} steps: PSNR {sr:.2f} dB vs bicubic {bicubic:.2f} dB "
        f"(loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f})")
  assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10])
  assert sr > bicubic + 0.3, (sr, bicubic)
