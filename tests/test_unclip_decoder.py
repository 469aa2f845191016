"""unCLIP's trainable decoder (configs/unclip.py decoder presets: the diffusion task with
conditioning 'clip_image'): sharded training on 8 devices resumed exactly, the in-step
CLIP features equal the records tools.embed writes for the prior, independent caption /
image-embedding dropout, the presets' sizes against diffusers, trained stages through
`sample.py --method unclip --prior --decoder`, and the one-line errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax import parallel
from dalle_jax.configs import unclip as unclip_configs
from dalle_jax.data import shapes
from dalle_jax.sampling import unclip as unclip_sampling
from dalle_jax.tasks import diffusion as diffusion_task
from tests.test_diffusion_task import tiny_config, trains_and_resumes

CLIP_SIZE = 8  # the tiny CLIP's input: the decoder's 16 px images are resized down for it
CAPTIONS = [f"a {c} {s} on a {b} background" for c in shapes.COLOR_NAMES
            for s in shapes.SHAPES for b in shapes.COLOR_NAMES if b != c]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
  """A random-weight CLIP workdir-like checkpoint (both towers, 24-d embeddings)."""
  import flax.linen as nn
  from dalle_jax.configs import clip as clip_cfg
  from dalle_jax.data import tokenizers
  from dalle_jax.models import clip as clip_lib
  from dalle_jax.train import checkpoint
  root = tmp_path_factory.mktemp("unclip_decoder")
  path = str(root / "clip")
  tok = tokenizers.train_sentencepiece(CAPTIONS * 20, os.path.join(path, "sp.model"), 48)
  c = clip_cfg.get_config("shapes")
  c.model.text.vocab_size = c.text.vocab_size = tok.vocab_size
  c.text.path = os.path.join(path, "sp.model")
  c.model.embed_dim = 24
  c.model.vision.update(dict(image_size=CLIP_SIZE, patch_size=4, width=32, layers=1, heads=2,
                             mlp_dim=64))
  c.model.text.update(dict(width=32, layers=1, heads=2, mlp_dim=64))
  c.data.image_size = CLIP_SIZE
  model = clip_lib.build_model(c)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                        *clip_lib.dummy_inputs(c, 1)))
  rng = np.random.RandomState(0)
  variables = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  checkpoint.save_imported(path, c, variables)
  return path


def decoder_config(tmp_path, clip):
  """test_diffusion_task's tiny 16 px setup (data x fsdp x tensor = 2 x 2 x 2) as a decoder."""
  config = tiny_config(tmp_path)
  config.unlock()
  config.model.conditioning = "clip_image"
  config.model.clip_tokens = 2
  config.model.unet.context_dim = 32
  config.text_encoder.clip = clip
  config.diffusion.cond_drop_prob = 0.5
  config.diffusion.image_drop_prob = 0.1
  config.total_steps = 4
  config.checkpoint_every = 2
  config.lock()
  return config


def train_prior_and_decoder(clip, tmp_path):
  """A decoder (decoder_config, 4 steps) in tmp_path/decoder and a 1-layer prior (2 steps) in
  tmp_path/prior on the CLIP's tools.embed records of the same data; -> the decoder config."""
  from dalle_jax.tools import embed
  from dalle_jax.train import loop
  dconfig = decoder_config(tmp_path, clip)
  loop.train(dconfig, str(tmp_path / "decoder"))
  out = str(tmp_path / "shapes_clip")
  embed.main(["--clip", clip, "--dataset", dconfig.data.dataset, "--data_dir",
              dconfig.data.data_dir, "--out", out])
  pconfig = unclip_configs.get_config("shapes")
  pconfig.data.dataset = out
  pconfig.model.update(dict(embed_dim=24, text_dim=32, num_layers=1, num_heads=2, head_dim=16))
  pconfig.update(dict(total_steps=2, checkpoint_every=2, eval_every=0, log_every=1,
                      batch_size=16, async_checkpoints=False))
  loop.train(pconfig, str(tmp_path / "prior"))
  return dconfig


# three short trainings (uninterrupted, stopped, resumed): a whole multi-run training, as
# test_diffusion_task's; the fast suite covers the decoder's step through the other tests
@pytest.mark.slow
def test_decoder_trains_sharded_and_resumes_exactly(tiny_clip, tmp_path):
  config = decoder_config(tmp_path, tiny_clip)
  state, _, _ = trains_and_resumes(config, tmp_path, split=2)
  # parameters split over the 8 devices; only the text projection and the U-Net train
  assert set(state.params) == {"text_proj", "unet"}
  assert len(state.params["unet"]["conv_in"]["kernel"].sharding.device_set) == 8
  null = np.asarray(state.params["text_proj"]["null_image_embed"])
  assert null.shape == (24,) and np.abs(null).max() > 0  # the dropped rows trained it


def test_in_step_features_are_the_priors_records(tiny_clip, tmp_path):
  """The decoder's CLIP image embedding (from the example at the CLIP's size) and caption
  features are tools.embed's records for the prior: the two stages see one CLIP space."""
  from dalle_jax.data import records
  from dalle_jax.tools import embed
  config = decoder_config(tmp_path, tiny_clip)
  task = diffusion_task.DiffusionTask(config)
  assert task.clip_image_size == CLIP_SIZE and task.text_len == 16
  batch = next(iter(task.make_iterator("train", 8, shuffle=False, repeat=False)))
  assert batch["image"].shape == (8, 16, 16, 3)
  assert batch["clip_image"].shape == (8, CLIP_SIZE, CLIP_SIZE, 3)
  cond = jax.jit(lambda b: task.model_cond(task.cond_of(b)))(
      {k: batch[k] for k in ("clip_image", "text_ids", "text_mask")})
  out = str(tmp_path / "shapes_clip")
  embed.main(["--clip", tiny_clip, "--dataset", config.data.dataset, "--data_dir",
              config.data.data_dir, "--out", out, "--splits", "train"])
  rows = records.RecordsSource(out, "train").__getitems__(range(8))
  want = lambda k: np.stack([r[k] for r in rows])
  np.testing.assert_allclose(cond["image_embed"], want("image_embed"), atol=1e-5)
  np.testing.assert_allclose(cond["text_pooled"], want("text_embed"), atol=1e-5)  # raw
  np.testing.assert_array_equal(cond["text_mask"], want("text_mask"))
  m = want("text_mask")
  np.testing.assert_allclose(np.asarray(cond["text_states"])[m], want("text_states")[m],
                             atol=1e-5)
  assert not np.asarray(cond["drop_image"]).any()


def test_caption_and_image_dropout_are_independent(tiny_clip, tmp_path):
  config = decoder_config(tmp_path, tiny_clip)
  config.unlock()
  config.diffusion.image_drop_prob = 0.5
  task = diffusion_task.DiffusionTask(config)
  n = 512
  ids, mask = task.tokenize(CAPTIONS)
  cond = {"text_ids": jnp.asarray(np.resize(ids, (n, ids.shape[1]))),
          "text_mask": jnp.asarray(np.resize(mask, (n, mask.shape[1]))),
          "image_embed": jnp.ones((n, 24)), "drop_image": jnp.zeros((n,), bool)}
  out = task.drop_cond(cond, jax.random.PRNGKey(0), 0.5)
  blank_ids, _ = task.blank_text()
  text_dropped = np.all(np.asarray(out["text_ids"]) == blank_ids, axis=1)
  image_dropped = np.asarray(out["drop_image"])
  for rate in (text_dropped.mean(), image_dropped.mean()):
    assert 0.4 < rate < 0.6
  # independent: every combination occurs about a quarter of the time
  for a in (True, False):
    for b in (True, False):
      assert 0.18 < np.mean((text_dropped == a) & (image_dropped == b)) < 0.32
  np.testing.assert_array_equal(out["image_embed"], cond["image_embed"])  # flagged, not zeroed
  null = task.null_cond(3)  # guidance's unconditional rows: both dropped
  assert null["drop_image"].all() and (null["text_ids"] == blank_ids).all()


def _karlo_reference_counts():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
  with torch.device("meta"):
    unet = diffusers.UNet2DConditionModel(
        sample_size=64, in_channels=3, out_channels=6, layers_per_block=3,
        block_out_channels=(320, 640, 960, 1280),
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
        up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=1536,
        class_embed_type="identity", attention_head_dim=64,
        resnet_time_scale_shift="scale_shift", norm_num_groups=32)
    proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=768,
                               time_embed_dim=1280, cross_attention_dim=1536)
  count = lambda m: sum(p.numel() for p in m.parameters())
  return count(unet), count(proj)


@pytest.mark.parametrize("preset", ["karlo_decoder", "unclip_decoder"])
def test_decoder_presets_abstractly(preset):
  """Karlo's decoder: exactly diffusers' U-Net + text projection at Karlo's dimensions
  (ViT-L/14: 768-d embeddings and caption states); DALL·E 2's: GLIDE's 64 px U-Net."""
  from dalle_jax.models import unclip as unclip_lib
  config = unclip_configs.get_config(preset)
  assert config.family == "diffusion" and config.model.conditioning == "clip_image"
  assert (config.diffusion.cond_drop_prob, config.diffusion.image_drop_prob) == (0.5, 0.1)
  model = unclip_lib.build_decoder(config)
  e, c = (768, 768) if preset == "karlo_decoder" else (1024, 1024)
  z = lambda *s: jnp.zeros(s, jnp.float32)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), z(1, 64, 64, 3), jnp.zeros((1,), jnp.int32), z(1, e), z(1, e),
      z(1, 77, c), jnp.ones((1, 77), bool)))
  params = parallel.unbox(abstract)["params"]
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
  if preset == "karlo_decoder":
    assert (count(params["unet"]), count(params["text_proj"])) == _karlo_reference_counts()
  else:
    assert 2.2e9 <= count(params["unet"]) <= 2.4e9  # GLIDE's ~2.3B visual part


def test_cli_stage_and_strength_errors_are_one_line(tmp_path):
  """Checked before any weights are read (the paths need not exist)."""
  p, d, c = str(tmp_path / "prior"), str(tmp_path / "decoder"), str(tmp_path / "ckpt")
  out = ["--out", str(tmp_path / "x.png")]
  diff = ["--text_diff", "a red circle", "a blue circle", "--image", str(tmp_path / "a.png")]
  cases = [
      (["--checkpoint", c, "--prior", p, "--decoder", d, "--prompt", "x"], r"not both"),
      (["--prior", p, "--prompt", "x"], r"--decoder is missing"),
      (["--prompt", "x"], r"give --checkpoint .* or --prior and --decoder"),
      (["--prior", p, "--decoder", d] + diff + ["--text_diff_strength", "0"],
       r"--text_diff_strength 0.0: must be in \(0, 1\]"),
      (["--prior", p, "--decoder", d] + diff + ["--text_diff_strength", "1.5"],
       r"--text_diff_strength 1.5: must be in \(0, 1\]"),
      (["--prior", p, "--decoder", d, "--variations", "v.png", "--text_diff_strength", "0.3"],
       r"--text_diff_strength goes with --text_diff"),
  ]
  for argv, msg in cases:
    with pytest.raises(SystemExit, match=msg):
      unclip_sampling.unclip_main(argv + out)
  with pytest.raises(SystemExit, match=r"--prior .*prior: no config.json there"):
    unclip_sampling.unclip_main(["--prior", p, "--decoder", d, "--prompt", "x"] + out)
  assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_trained_stages_through_the_cli(tiny_clip, tmp_path):
  """A prior and a decoder trained a few steps on the tiny CLIP's features run as
  `sample.py --method unclip --prior P --decoder D`: text -> image, variations (the
  decoder's CLIP embeds the input), interpolations and text diffs; --text_diff_strength s
  moves the last frame to slerp(z_i, z_d, s): 2 frames at strength 0.25 end on the middle
  frame of 3 at 0.5 (same embedding, same x_T)."""
  from PIL import Image
  train_prior_and_decoder(tiny_clip, tmp_path)
  stages = ["--prior", str(tmp_path / "prior"), "--decoder", str(tmp_path / "decoder"),
            "--prior_steps", "3", "--decoder_steps", "3", "--seed", "1"]
  img = np.zeros((16, 16, 3), np.uint8) + np.asarray([220, 30, 30], np.uint8)
  Image.fromarray(img).save(tmp_path / "red.png")
  Image.fromarray(img[..., ::-1].copy()).save(tmp_path / "blue.png")
  frames = lambda name: [np.asarray(Image.open(tmp_path / name / f))
                         for f in sorted(os.listdir(tmp_path / name)) if f.endswith(".png")]

  unclip_sampling.unclip_main(stages + ["--prompt", "a red circle on a white background",
                                        "--num_images", "2", "--out", str(tmp_path / "t.png")])
  assert [f.shape for f in frames("t")] == [(16, 16, 3)] * 2
  with open(tmp_path / "t" / "samples.json") as f:
    assert json.load(f)["model"]["decoder"] == str(tmp_path / "decoder")
  unclip_sampling.unclip_main(stages + ["--variations", str(tmp_path / "red.png"),
                                        "--num_images", "2", "--out", str(tmp_path / "v.png")])
  assert len(frames("v")) == 2
  unclip_sampling.unclip_main(stages + ["--interpolate", str(tmp_path / "red.png"),
                                        str(tmp_path / "blue.png"), "--frames", "3",
                                        "--out", str(tmp_path / "i.png")])
  assert len(frames("i")) == 3
  diff = stages + ["--text_diff", "a red circle", "a blue square", "--image",
                   str(tmp_path / "red.png")]
  unclip_sampling.unclip_main(diff + ["--frames", "3", "--out", str(tmp_path / "d3.png")])
  unclip_sampling.unclip_main(diff + ["--frames", "2", "--text_diff_strength", "0.25",
                                      "--out", str(tmp_path / "d2.png")])
  d3, d2 = frames("d3"), frames("d2")
  np.testing.assert_array_equal(d2[0], d3[0])
  assert np.abs(d2[1].astype(int) - d3[1].astype(int)).max() <= 1  # batch 2 vs 3 rounding
  # (that the frames move is the trained shapes models' measurement: configs/unclip.py)
  with open(tmp_path / "d2" / "samples.json") as f:
    assert json.load(f)["text_diff_strength"] == 0.25
  # the decoder alone is no text -> image model: the diffusion sampler says where to go
  from dalle_jax.sampling import diffusion as diffusion_sampling
  with pytest.raises(SystemExit, match=r"sample it with `sample.py --method unclip --prior"):
    diffusion_sampling.diffusion_main(["--workdir", str(tmp_path / "decoder"), "--prompt", "x",
                                       "--steps", "2", "--out", str(tmp_path / "x.png")])
