"""unCLIP text -> image end to end against diffusers' UnCLIPPipeline on a tiny random
Karlo-like pipeline (CLIP text encoder + tokenizer, prior with nonzero clip_std, text
projection, decoder, two super-resolution U-Nets, three UnCLIPSchedulers): saved as a
folder, imported with `convert karlo`, then run from the same initial noises AND the
same per-step noises (diffusers' scheduler draws are replaced by ours); then
`sample.py --method unclip` on the checkpoint and its one-line errors."""
import json
import os

import jax
import numpy as np
import pytest

from dalle_jax.data import images as images_lib
from dalle_jax.sampling import unclip as unclip_sampling
from dalle_jax.tools import convert as convert_tool
from tests.test_clip_convert import write_tiny_clip_tokenizer

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from diffusers.schedulers import scheduling_unclip

E, S, X = 12, 16, 24  # CLIP width (= caption state width), caption tokens, context width
SMALL, BIG = 8, 16  # decoder and super-resolution sizes
PROMPTS = ["a red circle on the blue background", "a photo of a cat"]
N_IMAGES, SEED = 2, 3
STEPS = dict(prior=3, decoder=3, super_res=3)
# Guidance > 1 in both stages (so both run the batched unconditional rows), kept moderate:
# with random tiny models a large scale amplifies f32 rounding (e.g. the t ~ 999 sinusoid
# differs by ~1e-4 between torch and XLA) chaotically through the stages.
PRIOR_G, DECODER_G = 2.0, 3.0


def _perturbed(module, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return module.eval()


def _write_karlo(root):
  tok, vocab = write_tiny_clip_tokenizer(os.path.join(root, "tokenizer_src"))
  assert tok.model_max_length == S
  torch.manual_seed(0)
  text_encoder = _perturbed(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=E, intermediate_size=24, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=S, projection_dim=E,
      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
      pad_token_id=tok.eos_token_id)), 0)
  prior = _perturbed(diffusers.PriorTransformer(
      num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=E,
      num_embeddings=S, additional_embeddings=4, dropout=0.0), 1)
  with torch.no_grad():  # a fresh prior has clip_std = 0
    prior.clip_mean.copy_(0.3 * torch.randn(1, E))
    prior.clip_std.copy_(0.5 + torch.rand(1, E))
  text_proj = _perturbed(UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=E,
                                             time_embed_dim=32, cross_attention_dim=X), 2)
  decoder = _perturbed(diffusers.UNet2DConditionModel(
      sample_size=SMALL, in_channels=3, out_channels=6, block_out_channels=(8, 16),
      layers_per_block=1,
      down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
      up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
      mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=X,
      class_embed_type="identity", attention_head_dim=8, resnet_time_scale_shift="scale_shift",
      norm_num_groups=4), 3)
  sr = lambda seed: _perturbed(diffusers.UNet2DModel(
      sample_size=BIG, in_channels=6, out_channels=3, block_out_channels=(8, 16),
      layers_per_block=1, down_block_types=("ResnetDownsampleBlock2D",) * 2,
      up_block_types=("ResnetUpsampleBlock2D",) * 2, add_attention=False, norm_num_groups=4), seed)
  pipe = diffusers.UnCLIPPipeline(
      prior=prior, decoder=decoder, text_encoder=text_encoder, tokenizer=tok, text_proj=text_proj,
      super_res_first=sr(4), super_res_last=sr(5),
      prior_scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log",
                                                prediction_type="sample", clip_sample_range=5.0),
      decoder_scheduler=diffusers.UnCLIPScheduler(variance_type="learned_range"),
      super_res_scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log"))
  pipe.save_pretrained(os.path.join(root, "karlo"))
  return pipe


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("unclip"))
  ref = _write_karlo(root)
  ckpt = os.path.join(root, "ckpt")
  convert_tool.main(["karlo", "--src", os.path.join(root, "karlo"), "--out", ckpt])
  return ref, ckpt, root


def _step_noises(pipe, seed, n):
  """Our sampler's per-step noises in the order UnCLIPPipeline's scheduler draws them
  (every step but the last, stage by stage), NCHW for the image stages."""
  keys = unclip_sampling.stage_keys(seed)
  shapes = {"prior": (n, E), "decoder": (n, SMALL, SMALL, 3), "super_res": (n, BIG, BIG, 3)}
  out = []
  for stage in unclip_sampling.STAGES:
    for i in range(STEPS[stage] - 1):
      z = np.asarray(jax.random.normal(jax.random.fold_in(keys[stage][1], i), shapes[stage]))
      out.append(z if z.ndim == 2 else z.transpose(0, 3, 1, 2))
  return out


_OURS = {}


def _ours(ckpt):
  """The single-device pipeline's float images (P, N, H, W, 3) for PROMPTS (computed once)."""
  if ckpt not in _OURS:
    pipe = unclip_sampling.UnclipPipeline.load(ckpt)
    _OURS[ckpt] = (pipe, pipe.generate(
        PROMPTS, N_IMAGES, SEED, prior_steps=STEPS["prior"], decoder_steps=STEPS["decoder"],
        sr_steps=STEPS["super_res"], prior_guidance_scale=PRIOR_G,
        decoder_guidance_scale=DECODER_G, return_float=True))
  return _OURS[ckpt][1]


def test_text_to_image_matches_diffusers(karlo, monkeypatch):
  ref, ckpt, _ = karlo
  ours = _ours(ckpt)
  pipe = _OURS[ckpt][0]
  n = len(PROMPTS) * N_IMAGES
  assert ours.shape == (len(PROMPTS), N_IMAGES, BIG, BIG, 3)
  noise = pipe.initial_noise(SEED, n)  # what generate drew from the seed
  queue = _step_noises(pipe, SEED, n)

  def fake_randn(shape, **kw):
    z = queue.pop(0)
    assert tuple(shape) == z.shape, (shape, z.shape)
    return torch.from_numpy(z).to(kw.get("dtype") or torch.float32)
  monkeypatch.setattr(scheduling_unclip, "randn_tensor", fake_randn)
  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  out = ref(PROMPTS, num_images_per_prompt=N_IMAGES, prior_num_inference_steps=STEPS["prior"],
            decoder_num_inference_steps=STEPS["decoder"],
            super_res_num_inference_steps=STEPS["super_res"], prior_latents=t(noise["prior"]),
            decoder_latents=t(noise["decoder"].transpose(0, 3, 1, 2)),
            super_res_latents=t(noise["super_res"].transpose(0, 3, 1, 2)),
            prior_guidance_scale=PRIOR_G, decoder_guidance_scale=DECODER_G,
            output_type="np").images
  assert not queue  # every step noise consumed, in order
  got = np.clip(ours.reshape(out.shape) * 0.5 + 0.5, 0, 1)
  assert np.std(out) > 0.05  # not a saturated / constant image
  np.testing.assert_allclose(got, out, atol=1e-3, rtol=0)


def test_sample_cli_sharded_equals_single_device(karlo):
  """sample.py --method unclip on an 8-device mesh (4 rows padded to 8): the grid, the
  images and samples.json, each image the single-device pipeline's (same seed), and
  one-line errors for bad flags before anything compiles."""
  import sample  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  _, ckpt, root = karlo
  out = os.path.join(root, "grid.png")
  os.environ["DALLE_JAX_CACHE_DIR"] = ""
  flags = ["--prior_steps", "3", "--decoder_steps", "3", "--sr_steps", "3",
           "--prior_guidance_scale", str(PRIOR_G), "--decoder_guidance_scale", str(DECODER_G)]
  sample.main(["--method", "unclip", "--checkpoint", ckpt, "--prompt", PROMPTS[0], "--prompt",
               PROMPTS[1], "--num_images", str(N_IMAGES), "--seed", str(SEED), "--mesh=-1,1,1",
               "--out", out] + flags)
  stem = os.path.join(root, "grid")
  with open(os.path.join(stem, "samples.json")) as f:
    meta = json.load(f)
  assert meta["method"] == "unclip" and meta["sampling"]["prior_steps"] == 3
  assert meta["schedulers"]["prior"]["prediction_type"] == "sample"
  assert [r["file"] for r in meta["images"]] == ["p00_000.png", "p00_001.png", "p01_000.png",
                                                 "p01_001.png"]
  assert os.path.isfile(out)
  expected = images_lib.to_uint8(_ours(ckpt))
  for r in meta["images"]:
    img = np.asarray(Image.open(os.path.join(stem, r["file"])))
    want = expected[r["prompt_index"], r["sample"]]
    assert img.shape == want.shape == (BIG, BIG, 3)
    assert np.abs(img.astype(int) - want).max() <= 1  # rounding at a .5 boundary at most
  for argv, needle in ((["--sr_steps", "1"], "--sr_steps 1"),
                       (["--prior_guidance_scale", "-1"], "--prior_guidance_scale -1"),
                       (["--num_images", "0"], "--num_images 0"),
                       (["--init_noise", os.path.join(root, "none.npz")], "none.npz")):
    with pytest.raises(SystemExit) as e:
      sample.main(["--method", "unclip", "--checkpoint", ckpt, "--prompt", "a cat",
                   "--out", out] + argv)
    assert needle in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(SystemExit) as e:
    sample.main(["--method", "unclip", "--checkpoint", root, "--prompt", "a cat"])
  assert "config.json" in str(e.value)
