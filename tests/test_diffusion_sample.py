"""sample.py --method diffusion end to end: a tiny text-conditional checkpoint (random
weights), the output contract, --init_noise determinism, the one-line errors, sharded
sampling, and an imported diffusers UNet2DModel sampling exactly as diffusers' DDIM loop."""
import json
import logging

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from dalle_jax.configs import diffusion as diffusion_cfg
from dalle_jax.sampling import diffusion as sampling
from dalle_jax.sampling import generate
from dalle_jax.tasks import diffusion as diffusion_task
from dalle_jax.data.images import to_uint8

CAPTIONS = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue")
            for s in ("circle", "square") for b in ("white", "black")]
SIZE = 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  from dalle_jax.data import tokenizers
  from dalle_jax.train import checkpoint as ckpt
  root = tmp_path_factory.mktemp("diffusion_sample")
  tok = tokenizers.train_sentencepiece(CAPTIONS * 20, str(root / "model" / "sp.model"), 64)
  config = diffusion_cfg.get_config("shapes")
  config.data.image_size = SIZE
  config.data.dataset = "/nonexistent"
  config.model.unet.update(dict(block_channels=(16, 32), attention=("none", "added_kv"),
                                mid_attention="added_kv", attn_head_dim=16, norm_groups=8))
  config.model.text.update(dict(width=32, layers=1, heads=2, mlp_dim=64))
  config.text.vocab_size = tok.vocab_size
  config.text.max_len = 8
  config.text.path = "sp.model"
  config.dtype = "float32"
  config.diffusion.num_train_timesteps = 100
  config.sampling.guidance_scale = 2.0
  task = diffusion_task.DiffusionTask(config)
  shapes = nn.meta.unbox(jax.eval_shape(task.init, jax.random.PRNGKey(0), task.dummy_batch(1)))
  # random weights everywhere (the U-Net's zero-initialised output convs would give blank images)
  rng = np.random.RandomState(0)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, s: (np.ones(s.shape, s.dtype) if "scale" in jax.tree_util.keystr(p) else
                    (0.1 * rng.standard_normal(s.shape)).astype(s.dtype)), shapes)
  ckpt.save_imported(str(root / "model"), config, variables)
  return str(root / "model")


def _main(argv):
  return sampling.diffusion_main(argv)


def _strict(constant):
  raise ValueError(f"samples.json is not strict JSON: {constant}")


def _images(out_png):
  stem = out_png.parent / out_png.stem
  meta = json.loads((stem / "samples.json").read_text(), parse_constant=_strict)
  return meta, np.stack([np.asarray(Image.open(stem / r["file"])) for r in meta["images"]])


def test_cli_writes_grid_images_and_settings(checkpoint, tmp_path, caplog):
  out = tmp_path / "grid.png"
  long_prompt = " ".join(["red circle"] * 10)
  with caplog.at_level(logging.WARNING):
    _main(["--checkpoint", checkpoint, "--prompt", CAPTIONS[0], "--prompt", long_prompt,
           "--num_images", "3", "--seed", "1", "--sampler", "ddim", "--steps", "4",
           "--guidance_scale", "2.5", "--thresholding", "dynamic", "--threshold_percentile", "99",
           "--out", str(out)])
  assert any("truncated" in r.getMessage() for r in caplog.records)
  grid = np.asarray(Image.open(out))
  assert grid.shape[0] > 2 * SIZE and grid.shape[1] > 3 * SIZE
  meta, images = _images(out)
  assert images.shape == (6, SIZE, SIZE, 3)
  assert [r["prompt"] for r in meta["images"]] == [CAPTIONS[0]] * 3 + [long_prompt] * 3
  s = meta["sampling"]
  assert (s["sampler"], s["steps"], s["eta"], s["guidance_scale"]) == ("ddim", 4, 0.0, 2.5)
  assert meta["seed"] == 1 and meta["scheduler"]["thresholding"] is True
  assert meta["scheduler"]["dynamic_thresholding_ratio"] == pytest.approx(0.99)
  assert meta["scheduler"]["num_train_timesteps"] == 100  # the checkpoint's settings
  assert meta["scheduler"]["lambda_min_clipped"] == "-inf"  # not -Infinity (_strict)
  assert images.std() > 5  # not blank


def test_init_noise_makes_ddim_deterministic(checkpoint, tmp_path):
  pipe = sampling.Pipeline.load(checkpoint)
  x_T = np.random.RandomState(3).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
  kw = dict(sampler="ddim", steps=5, eta=0.0, guidance_scale=2.0, init_noise=x_T)
  a = pipe.generate([CAPTIONS[1]], 2, seed=0, return_float=True, **kw)
  b = pipe.generate([CAPTIONS[1]], 2, seed=123, return_float=True, **kw)
  np.testing.assert_array_equal(a, b)  # the seed no longer matters
  c = pipe.generate([CAPTIONS[1]], 2, seed=0, return_float=True, **dict(kw, init_noise=-x_T))
  assert np.abs(a - c).max() > 1e-2
  # with eta > 0 the seed drives the fresh noise of every step
  d = pipe.generate([CAPTIONS[1]], 2, seed=0, return_float=True, **dict(kw, eta=1.0))
  e = pipe.generate([CAPTIONS[1]], 2, seed=1, return_float=True, **dict(kw, eta=1.0))
  assert np.abs(d - e).max() > 1e-3
  # the CLI reads the same x_T from an .npy
  np.save(tmp_path / "x.npy", x_T)
  _main(["--checkpoint", checkpoint, "--prompt", CAPTIONS[1], "--num_images", "2", "--steps", "5",
         "--guidance_scale", "2", "--init_noise", str(tmp_path / "x.npy"), "--seed", "9",
         "--out", str(tmp_path / "n.png")])
  _, images = _images(tmp_path / "n.png")
  np.testing.assert_array_equal(images, to_uint8(a[0]))


@pytest.mark.parametrize("flags,message", [
    (["--sampler", "euler"], "--sampler 'euler'"),
    (["--steps", "101"], "--steps 101: must lie in \\[1, 100\\]"),
    (["--guidance_scale", "-1"], "--guidance_scale -1"),
    (["--thresholding", "soft"], "--thresholding 'soft'"),
    (["--init_noise", "WRONG"], "--init_noise has shape \\(1, 4, 4, 3\\), expected \\(2, 16, 16, 3\\)"),
    (["--unconditional"], "--prompt and --unconditional"),
    (["--rerank_top", "1"], "--rerank_top needs --rerank_with"),
])
def test_bad_flags_are_one_line_errors(checkpoint, tmp_path, flags, message):
  if "WRONG" in flags:
    np.save(tmp_path / "bad.npy", np.zeros((1, 4, 4, 3), np.float32))
    flags = [str(tmp_path / "bad.npy") if f == "WRONG" else f for f in flags]
  with pytest.raises(SystemExit, match=message) as e:
    _main(["--checkpoint", checkpoint, "--prompt", CAPTIONS[0], "--num_images", "2",
           "--out", str(tmp_path / "e.png")] + flags)
  assert "\n" not in str(e.value)


def test_sharded_mesh_matches_one_device(checkpoint):
  x_T = np.random.RandomState(4).standard_normal((4, SIZE, SIZE, 3)).astype(np.float32)
  # DDIM with the checkpoint's clipping keeps the random model's x0 in [-1, 1]
  kw = dict(sampler="ddim", steps=4, guidance_scale=3.0, init_noise=x_T, return_float=True)
  one = sampling.Pipeline.load(checkpoint).generate(CAPTIONS[:2], 2, **kw)
  mesh = generate.mesh_from_flag("2,2,2")
  pipe = sampling.Pipeline.load(checkpoint, mesh=mesh)
  kernel = pipe.params["unet"]["conv_in"]["kernel"]
  assert len(kernel.sharding.device_set) == 8
  np.testing.assert_allclose(pipe.generate(CAPTIONS[:2], 2, **kw), one, atol=2e-3)


# --- an imported diffusers UNet2DModel, sampled by both ------------------------------------

def test_converted_unet2d_samples_like_diffusers_ddim(tmp_path):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from dalle_jax.tools import convert
  torch.manual_seed(0)
  src = tmp_path / "ddpm"
  unet = diffusers.UNet2DModel(
      sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(16, 32),
      layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
      up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
      flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6).eval()
  unet.save_pretrained(src)
  diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                          variance_type="fixed_large").save_pretrained(src)
  ckpt_dir = tmp_path / "ckpt"
  convert.main(["diffusers_unet", "--src", str(src), "--out", str(ckpt_dir)])

  x_T = np.random.RandomState(0).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
  np.save(tmp_path / "x.npy", x_T)
  out = tmp_path / "ours.png"
  _main(["--checkpoint", str(ckpt_dir), "--unconditional", "--num_images", "2", "--sampler",
         "ddim", "--eta", "0", "--steps", "10", "--init_noise", str(tmp_path / "x.npy"),
         "--out", str(out)])
  meta, ours = _images(out)
  assert meta["scheduler"]["variance_type"] == "fixed_large" and meta["scheduler"]["clip_sample"]

  sched = diffusers.DDIMScheduler.from_pretrained(src)
  sched.set_timesteps(10)
  x = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    for t in sched.timesteps:
      x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
  ref = to_uint8(x.permute(0, 2, 3, 1).numpy())
  assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
  assert ref.std() > 5
  # the same run without --unconditional is refused (no prompts for this model), as is a prompt
  with pytest.raises(SystemExit, match="unconditional"):
    _main(["--checkpoint", str(ckpt_dir), "--prompt", "a cat", "--out", str(tmp_path / "e.png")])


def test_task_preview_grid_for_fixed_captions(checkpoint):
  """The trainer's preview: guided DDIM samples of config.sampling.prompts, one row each;
  the eval batch (global arrays in the trainer) is not needed."""
  from dalle_jax.train import checkpoint as ckpt
  config, variables = ckpt.load_model(checkpoint)
  config.sampling.update(dict(prompts=CAPTIONS[:2], samples_per_prompt=3, steps=2))
  task = diffusion_task.DiffusionTask(config)
  out = task.preview(variables["params"], {}, task.dummy_batch(2), jax.random.PRNGKey(0))
  grid = out["samples"]
  pad = 2
  assert grid.dtype == np.uint8
  assert grid.shape == (2 * (SIZE + pad) + pad, 3 * (SIZE + pad) + pad, 3)
  assert grid[pad:pad + SIZE, pad:pad + SIZE].std() > 5
