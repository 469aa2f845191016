"""unCLIP's super-resolution stages trained here (configs/unclip.py SR presets): the presets'
sizes (Karlo's against diffusers' UNet2DModel), blur-only conditioning without a level
embedding, `sample.py --method unclip --prior P --decoder D --super_res S` end to end, and
the one-line errors about the stages."""
import json
import os

import jax
import numpy as np
import pytest

from dalle_jax import parallel
from dalle_jax.configs import unclip as unclip_configs
from dalle_jax.sampling import unclip as unclip_sampling
from dalle_jax.tasks import diffusion as diffusion_task
from tests.test_unclip_decoder import tiny_clip, train_prior_and_decoder  # pylint: disable=unused-import

count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _params(config):
  task = diffusion_task.DiffusionTask(config)
  abstract = jax.eval_shape(task.init, jax.random.PRNGKey(0), task.dummy_batch(1))
  return parallel.unbox(abstract)["params"]


def _karlo_super_res_count():
  """Karlo's super_res_first/config.json as diffusers builds it (on the meta device)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  with torch.device("meta"):
    unet = diffusers.UNet2DModel(
        sample_size=256, in_channels=6, out_channels=3, layers_per_block=3,
        block_out_channels=(320, 640, 960, 1280),
        down_block_types=("ResnetDownsampleBlock2D",) * 4,
        up_block_types=("ResnetUpsampleBlock2D",) * 4, add_attention=False,
        resnet_time_scale_shift="default", norm_num_groups=32, norm_eps=1e-5,
        flip_sin_to_cos=True, freq_shift=0)
  return sum(p.numel() for p in unet.parameters())


def test_sr_presets_abstractly():
  """Karlo's 64 -> 256 stage has exactly diffusers' parameter count; DALL·E 2's two
  upsamplers (Table 3: ~700M and ~300M) are near the paper's sizes. All are unconditional,
  convolution-only, blur-augmented (the 1024 px stage: BSR-degraded, appendix C) and without
  a level embedding."""
  sizes = {}
  for name in unclip_configs.SR_PRESETS:
    c = unclip_configs.get_config(name)
    assert c.family == "diffusion" and c.model.conditioning == "none"
    assert c.cascade.max_noise_level == 0 and c.cascade.level_embed == ""
    assert (c.cascade.bsr, c.cascade.blur) == ((True, False) if name == "unclip_sr1024"
                                               else (False, True))
    u = c.model.unet
    assert set(u.attention) == {"none"} and u.mid_attention == "none"
    assert not u.extra_embeds and u.low_res_channels == 3
    sizes[name] = (c.model.low_res_size, c.data.image_size)
    params = _params(c)
    names = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert not [n for n in names if "noise_level" in n or "attn" in n]
    if name == "unclip_sr256":
      assert 0.65e9 <= count(params) <= 0.75e9
    elif name == "unclip_sr1024":
      assert 0.25e9 <= count(params) <= 0.32e9
    if name == "karlo_sr256":
      assert count(params) == _karlo_super_res_count()
  assert sizes == {"shapes_sr32": (16, 32), "unclip_sr256": (64, 256),
                   "unclip_sr1024": (256, 1024), "karlo_sr256": (64, 256)}


def test_blur_only_conditioning_and_its_errors():
  """Without noise augmentation the stage's input is the blurred, bicubically upsampled
  low-res image (level 0 for every row); noise augmentation without a level embedding to
  receive it is a one-line error naming the keys."""
  c = unclip_configs.get_config("shapes_sr32")
  task = diffusion_task.DiffusionTask(c)
  assert task.level_embed is None and task.sr.noise is None and task.sr.blur
  x = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  up, level = task.sr.train(jax.random.PRNGKey(0), x)
  assert up.shape == x.shape and not np.asarray(level).any()
  c.cascade.max_noise_level = 100
  with pytest.raises(ValueError, match=r"config.cascade.max_noise_level=100 needs "
                                       r"config.cascade.level_embed"):
    diffusion_task.DiffusionTask(c)


def _write_config(path, config):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config.to_dict(), f)
  return str(path)


def test_cli_super_res_errors_are_one_line(tmp_path):
  """Checked from the stages' config.json files before any weights are read."""
  prior = _write_config(tmp_path / "prior", unclip_configs.get_config("shapes"))
  decoder = _write_config(tmp_path / "decoder", unclip_configs.get_config("shapes_decoder"))
  sr = _write_config(tmp_path / "sr", unclip_configs.get_config("shapes_sr32"))
  wrong_size = unclip_configs.get_config("shapes_sr32")
  wrong_size.model.low_res_size = 8
  wrong_size = _write_config(tmp_path / "sr8", wrong_size)
  from dalle_jax.configs import imagen as imagen_configs
  captioned = _write_config(tmp_path / "sr_text", imagen_configs.get_config("shapes_sr32"))
  out = ["--prompt", "x", "--out", str(tmp_path / "x.png")]
  stages = ["--prior", prior, "--decoder", decoder]
  cases = [
      (["--checkpoint", str(tmp_path / "k"), "--super_res", sr],
       r"--super_res goes with --prior and --decoder"),
      (stages + ["--super_res", decoder],
       r"--super_res .*decoder: family 'diffusion', conditioning 'clip_image', "
       r"model.low_res_size 0; expected configs/unclip.py:shapes_sr32's"),
      (stages + ["--super_res", captioned],
       r"--super_res .*sr_text: family 'diffusion', conditioning 'text', model.low_res_size 16"),
      (stages + ["--super_res", wrong_size],
       r"--super_res .*sr8 takes 8 px input but the decoder makes 16 px images"),
      (stages + ["--super_res", str(tmp_path / "nothing")], r"--super_res .*: no config.json"),
      (["--prior", decoder, "--decoder", decoder], r"--prior .*: family 'diffusion'"),
  ]
  for argv, msg in cases:
    with pytest.raises(SystemExit, match=msg):
      unclip_sampling.unclip_main(argv + out)
  assert not (tmp_path / "x.png").exists()


# three trainings (decoder, prior, SR stage) before sampling: the fast tests above cover the
# stage checks, tests/test_imagen_sr.py the SR step
@pytest.mark.slow
def test_three_trained_stages_through_the_cli(tiny_clip, tmp_path):
  """prior + decoder + a blur-only SR stage trained a few steps run as `sample.py --method
  unclip --prior P --decoder D --super_res S`: text -> image and variations come out at the
  SR stage's 32 px, and an edit keeps its kept region exactly at 32 px."""
  from PIL import Image
  from dalle_jax.train import loop
  dconfig = train_prior_and_decoder(tiny_clip, tmp_path)
  sconfig = unclip_configs.get_config("shapes_sr32")
  sconfig.data.update(dict(data_dir=dconfig.data.data_dir, dataset=dconfig.data.dataset))
  sconfig.model.unet.update(dict(block_channels=(16, 32), attention=("none", "none"),
                                 norm_groups=8))
  sconfig.update(dict(total_steps=2, checkpoint_every=2, eval_every=0, log_every=1,
                      batch_size=16, async_checkpoints=False))
  loop.train(sconfig, str(tmp_path / "sr"))

  stages = ["--prior", str(tmp_path / "prior"), "--decoder", str(tmp_path / "decoder"),
            "--super_res", str(tmp_path / "sr"), "--prior_steps", "3", "--decoder_steps", "3",
            "--sr_steps", "3", "--seed", "1"]
  frames = lambda name: [np.asarray(Image.open(tmp_path / name / f))
                         for f in sorted(os.listdir(tmp_path / name)) if f.endswith(".png")]
  unclip_sampling.unclip_main(stages + ["--prompt", "a red circle on a white background",
                                        "--num_images", "2", "--out", str(tmp_path / "t.png")])
  assert [f.shape for f in frames("t")] == [(32, 32, 3)] * 2
  with open(tmp_path / "t" / "samples.json") as f:
    meta = json.load(f)
  assert meta["model"]["super_res"] == str(tmp_path / "sr")
  assert meta["sampling"]["sr_steps"] == 3
  img = np.zeros((32, 32, 3), np.uint8) + np.asarray([220, 30, 30], np.uint8)
  img[8:24, 8:24] = (30, 30, 220)
  Image.fromarray(img).save(tmp_path / "a.png")
  unclip_sampling.unclip_main(stages + ["--variations", str(tmp_path / "a.png"),
                                        "--num_images", "2", "--out", str(tmp_path / "v.png")])
  assert [f.shape for f in frames("v")] == [(32, 32, 3)] * 2
  mask = np.zeros((32, 32), np.uint8)
  mask[8:24, 8:24] = 255  # white: regenerate the square, keep the rest
  Image.fromarray(mask).save(tmp_path / "m.png")
  unclip_sampling.unclip_main(stages + ["--edit", str(tmp_path / "a.png"), "--mask",
                                        str(tmp_path / "m.png"), "--prompt", "a green square",
                                        "--num_images", "2", "--out", str(tmp_path / "e.png")])
  for out in frames("e"):
    keep = mask == 0
    assert np.abs(out[keep].astype(int) - img[keep].astype(int)).max() <= 1
  # `evaluate generate --family unclip --workdir PRIOR,DECODER,SUPER_RES` samples the same way
  from dalle_jax.evaluate import generate as gen_lib
  sampler = gen_lib.load_sampler(
      "unclip", ",".join(str(tmp_path / s) for s in ("prior", "decoder", "sr")),
      {"prior_steps": 3, "decoder_steps": 3, "sr_steps": 3})
  assert sampler(["a red circle", "a blue square"], 0).shape == (2, 32, 32, 3)
  assert sampler.settings["sampling"]["sr_steps"] == 3
