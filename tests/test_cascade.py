"""sample.py --method cascade on stages built with configs/imagen.py (random weights): the
output contract (final + per-stage images, settings), the SR stage's input = the base
stage's output as the stage's own conditioning makes it, sharded = one device, and the
one-line errors raised before any compilation."""
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from dalle_jax.configs import imagen as imagen_cfg
from dalle_jax.data.images import to_uint8
from dalle_jax.diffusion import cascade as cascade_lib
from dalle_jax.sampling import cascade as cascade_sampling
from dalle_jax.sampling import generate
from dalle_jax.tasks import diffusion as diffusion_task
from dalle_jax.train import checkpoint as ckpt

CAPTIONS = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue")
            for s in ("circle", "square") for b in ("white", "black")]
TINY_UNET = dict(block_channels=(16, 32), attention=("none", "added_kv"), mid_attention="added_kv",
                 attn_head_dim=16, norm_groups=8)


def _stage_config(preset, size, low_res_size=0):
  config = imagen_cfg.get_config(preset)
  config.data.image_size = size
  config.data.dataset = "/nonexistent"
  config.model.unet.update(TINY_UNET)
  config.model.text.update(dict(width=32, layers=1, heads=2, mlp_dim=64))
  config.text.max_len = 8
  config.text.path = "sp.model"
  config.diffusion.num_train_timesteps = 100
  if low_res_size:
    config.model.low_res_size = low_res_size
  return config


def _save_random(root, config, vocab_size, seed):
  config.text.vocab_size = vocab_size
  task = diffusion_task.DiffusionTask(config)
  shapes = nn.meta.unbox(jax.eval_shape(task.init, jax.random.PRNGKey(0), task.dummy_batch(1)))
  rng = np.random.RandomState(seed)
  # random weights everywhere (zero-initialised output convs would give blank images)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, s: (np.ones(s.shape, s.dtype) if "scale" in jax.tree_util.keystr(p) else
                    (0.1 * rng.standard_normal(s.shape)).astype(s.dtype)), shapes)
  ckpt.save_imported(str(root), config, variables)
  return str(root)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
  from dalle_jax.data import tokenizers
  root = tmp_path_factory.mktemp("cascade")
  paths = {}
  for name, preset, size, low in (("base", "shapes_base16", 8, 0), ("sr", "shapes_sr32", 16, 8),
                                  ("sr_from4", "shapes_sr32", 16, 4)):
    tok = tokenizers.train_sentencepiece(CAPTIONS * 20, str(root / name / "sp.model"), 64)
    paths[name] = _save_random(root / name, _stage_config(preset, size, low), tok.vocab_size,
                               seed=len(paths))
  return paths


def _images(out_png):
  stem = out_png.parent / out_png.stem
  meta = json.loads((stem / "samples.json").read_text())
  return meta, np.stack([np.asarray(Image.open(stem / r["file"])) for r in meta["images"]])


KW = dict(steps=(4, 3), sampler="ddim", guidance_scale=(2.0, 1.5), noise_level=20)
PROMPTS = [CAPTIONS[0], CAPTIONS[5]]


@pytest.fixture(scope="module")
def one_device(stages):
  """The cascade on one device and its float outputs (base, SR), compiled once."""
  cascade = cascade_sampling.Cascade.load([stages["base"], stages["sr"]])
  x_base, x_sr = cascade.generate(PROMPTS, 2, seed=3, return_stages=True, return_float=True,
                                  progress=True, **KW)
  return cascade, x_base, x_sr


def test_cli_writes_final_and_stage_images_sr_follows_base(stages, one_device, tmp_path):
  cascade, x_base, x_sr = one_device
  out = tmp_path / "grid.png"
  with pytest.MonkeyPatch.context() as m:  # the loaded stages reused: nothing recompiles
    m.setattr(cascade_sampling.Cascade, "load", classmethod(lambda cls, paths, mesh=None: cascade))
    cascade_sampling.cascade_main([
        "--stages", f"{stages['base']},{stages['sr']}", "--prompt", PROMPTS[0], "--prompt",
        PROMPTS[1], "--num_images", "2", "--seed", "3", "--steps", "4,3", "--sampler", "ddim",
        "--guidance_scale", "2,1.5", "--noise_level", "20", "--out", str(out)])
  meta, final = _images(out)
  assert final.shape == (4, 16, 16, 3) and final.std() > 5
  assert [r["prompt"] for r in meta["images"]] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
  s0, s1 = meta["stages"]
  assert (s0["size"], s0["steps"], s0["guidance_scale"], s0["noise_level"]) == (8, 4, 2.0, None)
  assert (s1["size"], s1["steps"], s1["guidance_scale"], s1["noise_level"]) == (16, 3, 1.5, 20)
  assert s0["scheduler"]["thresholding"] and s1["scheduler"]["thresholding"]  # dynamic everywhere
  np.testing.assert_array_equal(to_uint8(x_sr).reshape(final.shape), final)
  _, base = _images(tmp_path / "grid" / "stage0.png")
  _, last = _images(tmp_path / "grid" / "stage1.png")
  np.testing.assert_array_equal(to_uint8(x_base).reshape(base.shape), base)
  np.testing.assert_array_equal(last, final)

  # the SR stage by hand: the base stage's x0, conditioned as the SR task conditions it
  # (bicubic up, noise at level 20 with stage 2's augmentation draw), sampled with its keys
  sr = cascade.stages[1]
  task = sr.task
  k_T, k_aug, k_sample = cascade_sampling.stage_keys(3, 1)
  up = cascade_lib.upsample_bicubic(x_base.reshape(4, 8, 8, 3), 16)
  noise = jax.random.normal(k_aug, up.shape)
  abar = np.asarray(task.sr.noise.diffusion.alphas_cumprod)[20]
  cond_img = np.sqrt(abar) * np.asarray(up) + np.sqrt(1 - abar) * np.asarray(noise)
  other, _ = task.sr.sample(x_base.reshape(4, 8, 8, 3), 16, 90, noise)
  assert np.abs(np.asarray(other) - cond_img).max() > 0.1  # the level matters
  cond = sr.pipe.condition(PROMPTS, 2)
  sched = cascade.last_settings[1]["sched"]
  want = jax.jit(lambda p, c, x, lr, r: task.sample(
      p, c, x, r, sampler="ddim", steps=3, guidance_scale=1.5, sched=sched, low_res=lr,
      level=np.full((4,), 20, np.int32)))(sr.pipe.params, cond, jax.random.normal(k_T, up.shape),
                                           cond_img, k_sample)
  np.testing.assert_allclose(x_sr.reshape(4, 16, 16, 3), np.asarray(want), atol=1e-5)


def test_sharded_cascade_matches_one_device(stages, one_device):
  _, x_base, x_sr = one_device
  sharded = cascade_sampling.Cascade.load([stages["base"], stages["sr"]],
                                          mesh=generate.mesh_from_flag("2,4,1"))
  kernel = sharded.stages[1].pipe.params["unet"]["conv_in"]["kernel"]
  assert len(kernel.sharding.device_set) == 8
  # 4 rows padded to the mesh's 8 batch shards (data x fsdp)
  got_base, got_sr = sharded.generate(PROMPTS, 2, seed=3, return_stages=True, return_float=True,
                                      **KW)
  np.testing.assert_allclose(got_base, x_base, atol=2e-3)
  np.testing.assert_allclose(got_sr, x_sr, atol=2e-3)


@pytest.mark.parametrize("stage_names,flags,message", [
    (("base", "sr_from4"), [], r"stage 2 \(.*sr_from4\) takes 4 px input but stage 1 \(.*base\) "
                               r"makes 8 px images"),
    (("sr", "base"), [], r"stage 1 .* is a super-resolution stage: the first stage must be"),
    (("base", "base"), [], r"stage 2 .* is not a super-resolution stage"),
    (("base", "sr"), ["--steps", "1,2,3"], "--steps has 3 values for 2 stages"),
    (("base", "sr"), ["--sampler", "ddim,euler"], r"--sampler 'euler' \(stage 2"),
    (("base", "sr"), ["--noise_level", "1000"],
     r"--noise_level 1000: must be an int in \[0, 1000\)"),
    (("base", "sr"), ["--steps", "4,101"], r"--steps 101: must lie in \[1, 100\].*\(stage 2"),
    (("base", "nope"), [], "stage 2: .*nope not found"),
])
def test_bad_stages_and_flags_are_one_line_errors(stages, tmp_path, stage_names, flags, message,
                                                  monkeypatch):
  def no_compile(*a, **k):
    raise AssertionError("compiled before the error")
  monkeypatch.setattr(cascade_sampling.Stage, "sample_fn", no_compile)
  paths = [stages.get(n, str(tmp_path / n)) for n in stage_names]
  with pytest.raises(SystemExit, match=message) as e:
    cascade_sampling.cascade_main(["--stages", ",".join(paths), "--prompt", CAPTIONS[0],
                                   "--out", str(tmp_path / "e.png")] + flags)
  assert "\n" not in str(e.value)
