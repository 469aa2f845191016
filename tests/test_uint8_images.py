"""data.image_dtype='uint8' (bytes host -> device, scaled in the jitted step) and
data.prefetch_to_device, through every image-reading task and the trainer."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.configs import clip as clip_configs
from dalle_jax.configs.common import base_config
from dalle_jax.configs import diffusion as diffusion_configs
from dalle_jax.configs import vqgan as vqgan_configs
from dalle_jax import parallel
from dalle_jax.data import pipeline
from dalle_jax.models import layers
from dalle_jax.tasks.base import Task, get_task
from dalle_jax.train import loop

DATASET = "shapes/16px_40"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def _vqgan(data_dir):
  c = vqgan_configs.get_config("shapes")
  c.model = vqgan_configs.model_config(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                       resolution=16, z_channels=4, embed_dim=4, n_embed=16)
  c.model.norm_groups = 4
  c.loss.perceptual_weight = c.loss.disc_weight = 0.0
  return c


def _clip(data_dir):
  c = clip_configs.get_config("shapes")
  c.model.vision.update(dict(image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp_dim=32))
  c.model.text.update(dict(width=16, layers=1, heads=2, mlp_dim=32))
  return c


def _diffusion(data_dir):
  c = diffusion_configs.get_config("shapes")
  c.model.unet.update(dict(block_channels=(8, 16), attention=("none", "none"),
                           mid_attention="none", norm_groups=4))
  c.model.conditioning = "none"
  c.diffusion.num_train_timesteps = 50
  return c


def _config(make, data_dir, image_dtype):
  c = make(data_dir)
  c.data.dataset, c.data.data_dir, c.data.image_size = DATASET, data_dir, 16
  c.data.image_dtype = image_dtype
  c.dtype = "float32"
  c.batch_size = 8
  return c


@pytest.mark.parametrize("make", [_vqgan, _clip, _diffusion], ids=["vqgan", "clip", "diffusion"])
def test_task_loss_is_the_same_for_uint8_and_float_batches(make, data_dir):
  tasks = {d: get_task(_config(make, data_dir, d)) for d in ("float32", "uint8")}
  batches = {d: next(t.make_iterator("train", 8, shuffle=False)) for d, t in tasks.items()}
  assert batches["uint8"]["image"].dtype == np.uint8
  assert batches["float32"]["image"].dtype == np.float32
  # the same pixels: the float pipeline's [-1, 1] values are the bytes scaled
  np.testing.assert_array_equal(pipeline.normalize_images(batches["uint8"]["image"]),
                                batches["float32"]["image"])
  task = tasks["float32"]
  # Random values in the init's shapes (compiling the initialisers costs more than the test).
  rng = np.random.default_rng(0)
  abstract = parallel.unbox(jax.eval_shape(task.init, jax.random.PRNGKey(0), task.dummy_batch(2)))
  variables = jax.tree.map(lambda a: (0.02 + 0.1 * np.abs(rng.standard_normal(a.shape))).astype(
      a.dtype), abstract)
  params, model_state = variables.pop("params"), variables
  numeric = lambda b: {k: v for k, v in b.items() if v.dtype != object}
  losses = {}
  for d, t in tasks.items():
    loss, (metrics, _) = jax.jit(t.loss_fn)(params, model_state, numeric(batches[d]),
                                          jax.random.PRNGKey(1), 0)
    losses[d] = float(loss)
  assert np.isfinite(losses["float32"])
  # 0..255 taken as [-1, 1] images would give a loss orders of magnitude away
  np.testing.assert_allclose(losses["uint8"], losses["float32"], rtol=1e-5)


class PixelTask(Task):
  """Predicts each image's mean colour linearly from its pixels: the trainer's
  image input path (pipeline -> device -> step) at the cost of one matmul."""
  name = "pixels"

  def dummy_batch(self, batch_size):
    s = self.config.data.image_size
    return {"image": np.zeros((batch_size, s, s, 3), np.float32)}

  def _model(self):
    return layers.Dense(3, ("embed", "mlp"), use_bias=False)

  def init(self, rng, batch):
    return self._model().init(rng, jnp.zeros((1, int(np.prod(batch["image"].shape[1:])))))

  def loss_fn(self, params, model_state, batch, rng, step):
    x = pipeline.normalize_images(batch["image"]).astype(jnp.float32)
    pred = self._model().apply({"params": params}, x.reshape(x.shape[0], -1))
    return jnp.mean(jnp.square(pred - x.mean((1, 2)))), ({}, model_state)


TASK = PixelTask


def test_trainer_ships_uint8_to_the_device_and_trains_the_same(tmp_path, data_dir, monkeypatch):
  seen_dtypes, prefetched = [], []
  make_step = loop.make_train_step

  def spy_step(*args):
    step = make_step(*args)
    def train_step(state, batch):
      seen_dtypes.append(batch["image"].dtype)  # at trace time: what the jitted step receives
      return step(state, batch)
    return train_step

  wrap = pipeline.prefetch_to_device
  monkeypatch.setattr(loop, "make_train_step", spy_step)
  monkeypatch.setattr(pipeline, "prefetch_to_device",
                      lambda *a, **k: prefetched.append(k) or wrap(*a, **k))

  def run(image_dtype, ahead, name=None, max_steps=None):
    c = base_config()
    c.family = __name__
    c.data.dataset, c.data.data_dir, c.data.image_size = DATASET, data_dir, 16
    c.data.image_dtype, c.data.prefetch_to_device = image_dtype, ahead
    c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 8, 4, 1, 4
    c.eval_every = c.preview_every = 0
    c.dtype, c.async_checkpoints = "float32", False
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-3, 0
    workdir = tmp_path / (name or image_dtype)
    loop.train(c, str(workdir), max_steps=max_steps)
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]

  reference = run("float32", 0)
  assert seen_dtypes == [jnp.float32] and not prefetched
  shipped = run("uint8", 2)
  assert seen_dtypes[1:] == [jnp.uint8] and prefetched == [{"size": 2}]
  assert len(shipped) == 4 and len(set(shipped)) == 4  # it trains: the loss moves each step
  np.testing.assert_allclose(shipped, reference, rtol=1e-5)
  # Stopped after 2 steps (2 more batches already on the device) and resumed: the
  # checkpoint holds the consumed position, so the losses are the same.
  run("uint8", 2, "split", max_steps=2)
  np.testing.assert_allclose(run("uint8", 2, "split"), shipped, rtol=1e-6)


def test_bad_prefetch_to_device_is_named_before_reading(tmp_path):
  c = base_config()
  c.family = __name__
  c.data.dataset, c.data.data_dir = "image_text_folder/none", str(tmp_path)  # never opened
  c.data.prefetch_to_device = -1
  c.batch_size = 8
  with pytest.raises(loop.ConfigError,
                     match=r"^config.data.prefetch_to_device=-1; must be an integer >= 0$"):
    loop.train(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
