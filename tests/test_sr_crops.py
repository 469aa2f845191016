"""Super-resolution stages that train on random crops (config.data.crop_size; DALL·E 2's
upsamplers): the input pipeline's windows, the crop's own low-res input in the task, a tiny
stage trained on 8 px crops of 16 px images that then samples at 16 px, and the config errors.

The data are records of random-noise images (every window is unique, so a crop's position
in its image can be recovered exactly), stored at 32 px and read at image_size 16: an
integer downscale, i.e. the mean of each 2x2 block (rounded), which the tests compute
themselves."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dalle_jax import parallel
from dalle_jax.configs import imagen as imagen_cfg
from dalle_jax.data import pipeline
from dalle_jax.data import records
from dalle_jax.tasks import diffusion as diffusion_task

STORED, SIZE, CROP = 32, 16, 8  # stored px, data.image_size, data.crop_size
N_TRAIN, N_TEST = 32, 8


def _stored_images(seed, n):
  return np.random.RandomState(seed).randint(0, 256, (n, STORED, STORED, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("noise") / "noise_records")
  for split, seed, n in (("train", 0, N_TRAIN), ("test", 1, N_TEST)):
    records.write_records(d, split, ({"image": im, "caption": f"noise {i}"}
                                     for i, im in enumerate(_stored_images(seed, n))))
  return d


def _resized(split):
  """The image_size images the windows are cut from: 2x2 block means, rounded half up."""
  x = _stored_images(*{"train": (0, N_TRAIN), "test": (1, N_TEST)}[split]).astype(np.int64)
  s = x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]
  return ((s + 2) // 4).astype(np.uint8)


def _data_cfg(dataset, **kw):
  c = ml_collections.ConfigDict(dict(
      dataset=dataset, data_dir=os.path.dirname(dataset), image_size=SIZE, crop_size=CROP,
      train_split="train", eval_split="test", shuffle=False, random_crop=False,
      image_dtype="uint8"))
  c.update(kw)
  return c


def _iterator(cfg, split="train", seed=3):
  return pipeline.make_iterator(cfg, split, 8, seed=seed, process_index=0, process_count=1)


def _offset(crop, image):
  """The (top, left) of every place `crop` occurs in `image`."""
  n = image.shape[0] - crop.shape[0] + 1
  return [(t, l) for t in range(n) for l in range(n)
          if np.array_equal(image[t:t + crop.shape[0], l:l + crop.shape[1]], crop)]


def test_pipeline_windows_random_in_training_resumable_and_centred_in_eval(data_dir):
  cfg = _data_cfg(data_dir)
  images = _resized("train")
  it = _iterator(cfg)
  batches = [next(it) for _ in range(5)]  # 4 batches an epoch: batch 4 repeats batch 0's images
  offsets = []
  for k, b in enumerate(batches):
    assert b["image"].shape == (8, CROP, CROP, 3) and b["image"].dtype == np.uint8
    for j, crop in enumerate(b["image"]):
      found = _offset(crop, images[(8 * k + j) % N_TRAIN])  # no shuffle: position order
      assert len(found) == 1, (k, j, found)  # a window of the resized image, found once
      offsets.append(found[0])
  assert len(set(offsets[:8])) >= 5  # examples get their own windows
  assert sum(a != b for a, b in zip(offsets[:8], offsets[32:])) >= 6  # and again each epoch
  # a rerun with the same seed cuts the same windows; one resumed from a state too
  again = _iterator(cfg)
  np.testing.assert_array_equal(next(again)["image"], batches[0]["image"])
  resumed = _iterator(cfg)
  state = {**it.get_state(), "position": 3 * 8}
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["image"], batches[3]["image"])
  other = next(_iterator(cfg, seed=4))["image"]
  assert not np.array_equal(other, batches[0]["image"])
  # eval (any split but data.train_split): the centre window, every time
  test = _resized("test")
  lo = (SIZE - CROP) // 2
  for _ in range(2):
    b = next(_iterator(cfg, "test"))
    np.testing.assert_array_equal(b["image"], test[:, lo:lo + CROP, lo:lo + CROP])
  # crop_size 0: the whole image as before
  whole = next(_iterator(_data_cfg(data_dir, crop_size=0)))
  np.testing.assert_array_equal(whole["image"], images[:8])


@pytest.mark.parametrize("crop", [SIZE + 1, -8])
def test_pipeline_rejects_bad_crop_sizes(data_dir, crop):
  with pytest.raises(ValueError, match=rf"^data.crop_size={crop!r} must be 0 .* \(0, "
                                       rf"data.image_size={SIZE}\]$"):
    _iterator(_data_cfg(data_dir, crop_size=crop))


def _sr_config(dataset="", **unet):
  """A tiny SR stage 8 -> 16 px trained on 8 px crops (their low-res input: 4 px)."""
  c = imagen_cfg.get_config("shapes_sr32")
  c.model.conditioning = "none"
  c.data.dataset, c.data.data_dir = dataset, os.path.dirname(dataset)  # caches go there
  c.data.image_size, c.data.crop_size, c.model.low_res_size = SIZE, CROP, 8
  c.model.unet.update(dict(block_channels=(16,), attention=("none",), mid_attention="none",
                           norm_groups=8, **unet))
  c.dtype = "float32"
  return c


@pytest.mark.parametrize("change,message", [
    (lambda c: c.data.update(crop_size=SIZE * 2),
     rf"^config.data.crop_size={SIZE * 2} must be 0 .*data.image_size={SIZE}\]$"),
    (lambda c: c.model.unet.update(block_channels=(16, 32), attention=("none", "self")),
     r"^config.data.crop_size=8 needs a convolution-only U-Net: config.model.unet.attention="
     r"\('none', 'self'\) must be 'none' at every level$"),
    (lambda c: c.model.unet.update(mid_attention="self"),
     r"^config.data.crop_size=8 needs .* config.model.unet.mid_attention='self' must be"),
    (lambda c: c.data.update(crop_size=6),  # 6 x 8 / 16 = 3 px: fine; 5 x 8 / 16 is not
     None),
    (lambda c: c.data.update(crop_size=5),
     r"^config.data.crop_size=5 x config.model.low_res_size=8 must be divisible by "
     r"config.data.image_size=16"),
    (lambda c: c.model.update(low_res_size=0),
     r"^config.data.crop_size=8: only a super-resolution stage"),
])
def test_crop_config_errors_name_the_keys(change, message):
  config = _sr_config()
  change(config)
  if message is None:
    assert diffusion_task.DiffusionTask(config).crop_sr.low_res_size == 3
    return
  with pytest.raises(ValueError, match=message) as e:
    diffusion_task.DiffusionTask(config)
  assert "\n" not in str(e.value)


def test_training_low_res_input_is_the_crops_own_downsampled_version():
  """Without blur and noise: the U-Net sees bicubic_up(bicubic_down(crop, 4 px), 8 px), the
  crop's own low-res version at crop_size * low_res_size / image_size; whole images keep
  low_res_size."""
  config = _sr_config()
  config.cascade.max_noise_level = 0
  task = diffusion_task.DiffusionTask(config)
  assert (task.crop_size, task.crop_sr.low_res_size, task.low_res_size) == (CROP, 4, 8)
  seen = []

  class Spy:  # records the U-Net's low-res input, runs the model
    def apply(self, *args, **kw):
      if kw.get("method") == "denoise":
        seen.append(kw["low_res"])
      return task.model_.apply(*args, **kw)

  crops = np.random.RandomState(0).uniform(-1, 1, (2, CROP, CROP, 3)).astype(np.float32)
  abstract = jax.eval_shape(task.init, jax.random.PRNGKey(0), {"image": crops})
  params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), parallel.unbox(abstract)["params"])
  task.model_, task.model = task.model, Spy()

  @jax.jit
  def low_res_input(batch):  # the U-Net's low-res input in a training step on `batch`
    task._loss(params, batch, jax.random.PRNGKey(1), train=True)
    return seen[-1]

  resize = lambda x, s: jax.image.resize(x, (2, s, s, 3), "bicubic", antialias=True)
  want = resize(resize(jnp.asarray(crops), 4), CROP)
  np.testing.assert_allclose(low_res_input({"image": crops}), want, atol=1e-5)
  assert np.abs(np.asarray(want) - crops).mean() > 0.1  # not the crop itself (8 px "low-res")
  whole = np.random.RandomState(1).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
  np.testing.assert_allclose(low_res_input({"image": whole}),
                             resize(resize(jnp.asarray(whole), 8), SIZE), atol=1e-5)
  with pytest.raises(ValueError, match=r"images of 12 px: this stage takes data.image_size=16 "
                                       r"px images or its crop_size=8 crops"):
    task._loss(params, {"image": np.zeros((2, 12, 12, 3), np.float32)}, jax.random.PRNGKey(1),
               train=True)


def _sample_full_size(task, params):
  """16 px samples from 8 px inputs (the test images' 2x2 block means)."""
  low = jnp.asarray(_resized("test")[:2, ::2, ::2], jnp.float32) / 127.5 - 1
  cond, level = task.sr.sample(low, SIZE, 0, jnp.zeros((2, SIZE, SIZE, 3)))
  x_T = jax.random.normal(jax.random.PRNGKey(0), (2, SIZE, SIZE, 3))
  return jax.jit(lambda p: task.sample(p, {}, x_T, jax.random.PRNGKey(1), steps=2,
                                       low_res=cond, level=level))(params)


def test_stage_trains_on_crops_then_samples_at_full_size(data_dir):
  """The task's own iterator hands it 8 px crops; two gradient steps on them change the
  params; the preview runs on the centred eval crops; FLOPs are counted at the crop size;
  the params then sample 16 px images from 8 px inputs."""
  import optax  # pylint: disable=g-import-not-at-top
  config = _sr_config(data_dir)
  config.cascade.blur = True  # 4 px crops' low-res: the 3-tap blur still fits
  config.sampling.steps = 2
  task = diffusion_task.DiffusionTask(config)
  batch = next(task.make_iterator("train", 8))
  assert batch["image"].shape == (8, CROP, CROP, 3) == task.dummy_batch(8)["image"].shape
  params = parallel.unbox(jax.jit(task.init)(jax.random.key(0, impl="rbg"), batch))["params"]
  opt = optax.sgd(0.1)

  @jax.jit
  def step(p, b, r):
    (loss, _), g = jax.value_and_grad(lambda p: task.loss_fn(p, {}, b, r, 0), has_aux=True)(p)
    return optax.apply_updates(p, opt.update(g, opt.init(p), p)[0]), loss

  trained, loss = step(params, batch, jax.random.PRNGKey(0))
  trained, loss = step(trained, next(task.make_iterator("train", 8)), jax.random.PRNGKey(1))
  assert np.isfinite(float(loss))
  assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0
             for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(params)))
  eval_batch = next(task.make_iterator("test", 8, shuffle=False))  # (eval_fn: the slow test)
  grid = task.preview(trained, {}, eval_batch, jax.random.PRNGKey(3))["samples"]
  assert grid.shape == (2 + 4 * (CROP + 2), 2 + 3 * (CROP + 2), 3)  # 4 rows of 3 crops
  assert task.flops_per_example() > 0
  out = _sample_full_size(task, trained)
  assert out.shape == (2, SIZE, SIZE, 3) and np.isfinite(np.asarray(out)).all()


@pytest.mark.slow  # the trainer end to end (~40 s, mostly compiling); the test above is its
def test_trainer_runs_a_crop_stage_then_it_samples_at_full_size(data_dir, tmp_path):  # core
  """Two steps of the trainer (dummy_batch, sharded step, eval + preview on the centred eval
  crops, a checkpoint), then the trained params sample 16 px images from 8 px inputs."""
  from dalle_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = _sr_config(data_dir)
  config.cascade.blur = True
  config.update(dict(batch_size=8, total_steps=2, log_every=1, eval_every=2, eval_batches=1,
                     preview_every=2, checkpoint_every=2, async_checkpoints=False))
  config.sampling.steps = 2
  config.mesh.data = -1
  workdir = str(tmp_path / "sr")
  state = loop.train(config, workdir)
  assert int(state.step) == 2
  assert any(f.endswith(".png") for _, _, fs in os.walk(workdir) for f in fs)  # the preview
  out = _sample_full_size(diffusion_task.DiffusionTask(config), jax.device_get(state.params))
  assert out.shape == (2, SIZE, SIZE, 3) and np.isfinite(np.asarray(out)).all()
