"""unCLIP's image modes on a tiny random Karlo-layout checkpoint (test_unclip_pipeline's
fixture) with a tiny HF CLIP as the image tower: variations, interpolations (x_T fixed,
DDIM: the end frames are the end images' variations), text diffs (frame 0 is the image's
variation), edits (the kept region comes back exactly), CLIP reranking, the CLI's outputs
and its one-line errors."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from dalle_jax.sampling import unclip as unclip_sampling

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from tests import test_unclip_pipeline as karlo_fixture  # noqa: E402
from tests.test_clip_convert import write_tiny_clip_tokenizer  # noqa: E402

STEPS = dict(prior_steps=2, decoder_steps=3, sr_steps=2)
BIG = karlo_fixture.BIG


def _write_clip(path, projection_dim):
  """A tiny HF CLIP (both towers) whose embeddings are projection_dim wide."""
  tok, vocab = write_tiny_clip_tokenizer(path)
  torch.manual_seed(1)
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.eos_token_id),
      vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2),
      projection_dim=projection_dim)
  transformers.CLIPModel(cfg).eval().save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from dalle_jax.tools import convert as convert_tool
  root = tmp_path_factory.mktemp("unclip_modes")
  karlo_fixture._write_karlo(str(root))  # pylint: disable=protected-access
  ckpt = str(root / "ckpt")
  convert_tool.main(["karlo", "--src", str(root / "karlo"), "--out", ckpt])
  clip = _write_clip(str(root / "clip"), karlo_fixture.E)
  rng = np.random.default_rng(0)
  images = {}
  for name, color in (("a", (220, 30, 30)), ("b", (30, 30, 220))):
    img = np.zeros((BIG, BIG, 3), np.uint8) + np.asarray(color, np.uint8)
    img[4:12, 4:12] = rng.integers(0, 255, (8, 8, 3))
    Image.fromarray(img).save(root / f"{name}.png")
    images[name] = img
  pipe = unclip_sampling.UnclipPipeline.load(ckpt)
  pipe.attach_image_encoder(clip)
  return pipe, ckpt, clip, images, root


# 32 s; the CLI test runs interpolation and its frames in the fast suite
@pytest.mark.slow
def test_interpolation_ends_are_the_end_images_variations(setup):
  pipe, _, _, images, _ = setup
  frames = pipe.interpolate(images["a"], images["b"], frames=3, seed=5, **STEPS)
  assert frames.shape == (3, BIG, BIG, 3) and np.isfinite(frames).all()
  var_a = pipe.variations(images["a"], 1, seed=5, sampler="ddim", **STEPS)
  var_b = pipe.variations(images["b"], 1, seed=5, sampler="ddim", **STEPS)
  np.testing.assert_allclose(frames[0], var_a[0], atol=1e-4)  # batch 3 vs 1 rounding
  np.testing.assert_allclose(frames[-1], var_b[0], atol=1e-4)
  assert np.abs(frames[1] - frames[0]).max() > 1e-3  # the middle frame moved
  assert np.abs(frames[-1] - frames[0]).max() > 1e-3

  diff = pipe.text_diff(images["a"], "a red circle", "a blue square", frames=3, seed=5, **STEPS)
  assert diff.shape == (3, BIG, BIG, 3)
  np.testing.assert_allclose(diff[0], var_a[0], atol=1e-4)
  assert np.abs(diff[-1] - diff[0]).max() > 1e-3

  # variations with the default (ancestral) sampler: one x_T per image, different images
  var = pipe.variations(images["a"], 2, seed=5, **STEPS)
  assert var.shape == (2, BIG, BIG, 3) and np.abs(var[0] - var[1]).max() > 1e-3


def test_each_stage_runs_its_own_sampler(setup):
  """Per-stage samplers: with every x_T fixed and DDIM at all three stages the seed (the
  step noise of any stage left ancestral) no longer matters."""
  pipe = setup[0]
  kw = dict(STEPS, latents=pipe.initial_noise(0, 1), return_float=True)
  ddim = dict(prior_sampler="ddim", decoder_sampler="ddim", sr_sampler="ddim")
  a = pipe.generate(["a red circle"], 1, seed=0, **kw, **ddim)
  b = pipe.generate(["a red circle"], 1, seed=9, **kw, **ddim)
  np.testing.assert_array_equal(a, b)
  with pytest.raises(unclip_sampling.SamplingError, match=r"--prior_sampler 'euler': choose "
                                                          r"unclip\|ddim"):
    pipe.generate(["x"], 1, prior_sampler="euler", **STEPS)


def test_edit_keeps_the_known_region_exactly(setup):
  from dalle_jax.data import images as images_lib
  pipe, _, _, images, _ = setup
  mask = np.zeros((BIG, BIG), np.uint8)
  mask[:, BIG // 2:] = 255  # regenerate the right half
  out = images_lib.to_uint8(pipe.edit(images["a"], mask, "a red circle", num_images=2, seed=1,
                                      **STEPS))
  assert out.shape == (2, BIG, BIG, 3)
  np.testing.assert_array_equal(out[:, :, :BIG // 2], np.broadcast_to(
      images["a"][:, :BIG // 2], out[:, :, :BIG // 2].shape))
  assert np.abs(out[:, :, BIG // 2:].astype(int) - images["a"][:, BIG // 2:]).max() > 10
  # the decoder's known region is where every covered output pixel is kept
  known = unclip_sampling.known_at_size(pipe.edit_target(images["a"], mask), karlo_fixture.SMALL)
  assert known["mask"][0, :, :, 0].tolist() == [[1.0] * 4 + [0.0] * 4] * 8


def test_cli_modes_write_frames_strip_and_rerank(setup, tmp_path):
  _, ckpt, clip, _, root = setup
  steps = ["--prior_steps", "2", "--decoder_steps", "3", "--sr_steps", "2"]
  base = ["--checkpoint", ckpt, "--clip", clip, "--seed", "2"] + steps
  out = str(tmp_path / "interp.png")
  unclip_sampling.unclip_main(base + ["--interpolate", str(root / "a.png"), str(root / "b.png"),
                                      "--frames", "3", "--out", out])
  strip = np.asarray(Image.open(out))
  frames = sorted(os.listdir(tmp_path / "interp"))
  assert frames == ["p00_000.png", "p00_001.png", "p00_002.png", "samples.json"]
  assert strip.shape[0] < strip.shape[1] and strip.shape[1] >= 3 * BIG  # one row of 3 frames
  with open(tmp_path / "interp" / "samples.json") as f:
    meta = json.load(f)
  assert meta["mode"] == "interpolate" and meta["frames"] == 3
  assert meta["sampling"]["sampler"] == "ddim"
  assert (meta["sampling"]["decoder_sampler"], meta["sampling"]["sr_sampler"]) == ("ddim", "ddim")

  out = str(tmp_path / "ranked.png")
  unclip_sampling.unclip_main(["--checkpoint", ckpt, "--prompt", "a red circle",
                               "--num_images", "3", "--rerank_with", clip, "--rerank_top", "2",
                               "--prior_sampler", "ddim", "--out", out] + steps)
  with open(tmp_path / "ranked" / "samples.json") as f:
    meta = json.load(f)
  rows = meta["images"]
  assert [meta["sampling"][f"{s}_sampler"] for s in ("prior", "decoder", "sr")] == [
      "ddim", "unclip", "unclip"]
  assert len(rows) == 2 and rows[0]["clip_score"] >= rows[1]["clip_score"]


def test_cli_errors_are_one_line(setup, tmp_path):
  _, ckpt, clip, _, root = setup
  a, b = str(root / "a.png"), str(root / "b.png")
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "small_mask.png")
  (tmp_path / "broken.png").write_bytes(b"not a png")
  other_clip = _write_clip(str(tmp_path / "clip24"), 24)
  base = ["--checkpoint", ckpt, "--clip", clip, "--out", str(tmp_path / "x.png")]
  cases = [
      (["--interpolate", a, b, "--frames", "1"], r"--frames 1: must be an integer >= 2"),
      (["--variations", str(tmp_path / "nope.png")], r"--variations .*nope.png: file not found"),
      (["--variations", str(tmp_path / "broken.png")], r"--variations .*broken.png: unreadable"),
      (["--edit", a, "--mask", str(tmp_path / "small_mask.png"), "--prompt", "x"],
       r"--mask .*small_mask.png is 8x8 but --edit .*a.png is 16x16"),
      (["--text_diff", "a", "b"], r"--image goes with --text_diff"),
      (["--interpolate", a, b, "--prompt", "x"], r"--prompt does not apply to --interpolate"),
  ]
  for extra, msg in cases:
    with pytest.raises(SystemExit, match=msg):
      unclip_sampling.unclip_main(base + extra)
  with pytest.raises(SystemExit, match=r"--clip .*clip24: its CLIP embeddings are 24-d but "
                                       r"this unCLIP's prior and decoder use 12-d"):
    unclip_sampling.unclip_main(["--checkpoint", ckpt, "--clip", other_clip, "--variations", a,
                                 "--out", str(tmp_path / "x.png")])
  with pytest.raises(SystemExit, match=r"--variations needs --clip"):
    unclip_sampling.unclip_main(["--checkpoint", ckpt, "--variations", a,
                                 "--out", str(tmp_path / "x.png")])
  assert not (tmp_path / "x.png").exists()
