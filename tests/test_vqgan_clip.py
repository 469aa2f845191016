"""VQGAN+CLIP on a tiny random VQGAN (32 px, 4x4 codes) and a tiny random CLIP."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

STEPS = 20
PROMPT = "a red circle on a blue background"
CAPTIONS = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue", "yellow")
            for s in ("circle", "square", "triangle") for b in ("white", "black", "blue")]


def tiny_vqgan_config(codebook_dim=4, l2_normalize=True):
  from dalle_jax.configs import vqgan as vqgan_configs
  c = vqgan_configs.get_config("shapes")
  c.model = vqgan_configs.model_config(ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=0,
                                       attn_resolutions=(), resolution=32, z_channels=8,
                                       embed_dim=8, n_embed=32)  # f8: 32 px <-> 4x4 codes
  c.model.norm_groups = 4
  c.model.quantizer.codebook_dim = codebook_dim
  c.model.quantizer.l2_normalize = l2_normalize
  c.data.image_size = 32
  c.dtype = "float32"
  return c


def random_variables(init_fn, *args, seed=0):
  """Random variables of a model's shapes, drawn with numpy: traces the init
  abstractly instead of compiling it (much faster on a busy 2-core CPU)."""
  rng = np.random.default_rng(seed)
  abstract = nn.unbox(jax.eval_shape(init_fn, jax.random.key(0), *args))

  def fill(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      return np.ones(x.shape, np.float32)
    if name == "bias":
      return np.zeros(x.shape, np.float32)
    if name == "logit_scale":
      return np.full(x.shape, np.log(1 / 0.07), np.float32)
    fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) >= 2 else 2500
    return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def init_vqgan(config, seed=0):
  from dalle_jax.models.vqgan import vqgan_from_config
  model = vqgan_from_config(config)
  v = random_variables(model.init, np.zeros((1, 32, 32, 3), np.float32), seed=seed)
  return {"params": {"vqgan": v["params"]}}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  from dalle_jax.configs import clip as clip_configs
  from dalle_jax.data.tokenizers import train_sentencepiece
  from dalle_jax.models import clip as clip_lib
  from dalle_jax.train.checkpoint import save_imported
  root = tmp_path_factory.mktemp("vqgan_clip")

  vq_config = tiny_vqgan_config()
  save_imported(str(root / "vqgan"), vq_config, init_vqgan(vq_config))

  c = clip_configs.get_config("shapes")
  m = c.model
  m.embed_dim = 32
  for tower in (m.vision, m.text):
    tower.width, tower.layers, tower.heads, tower.mlp_dim = 32, 1, 2, 64
  clip_dir = root / "clip"
  train_sentencepiece(CAPTIONS, str(clip_dir / "tokenizer" / "spm.model"), vocab_size=64)
  c.text.path = "tokenizer/spm.model"  # relative: resolved against the checkpoint dir
  variables = random_variables(clip_lib.build_model(c).init, *clip_lib.dummy_inputs(c), seed=1)
  save_imported(str(clip_dir), c, variables)
  return str(root / "vqgan"), str(clip_dir)


@pytest.fixture(scope="module")
def gen(ckpts):
  from dalle_jax.sampling.vqgan_clip import VQGANCLIP
  return VQGANCLIP(*ckpts)


def test_similarity_rises_and_outputs(gen, tmp_path):
  frames = tmp_path / "frames"
  out = gen.generate(PROMPT, steps=STEPS, num_cutouts=4, seed=0, save_every=10,
                     frames_dir=str(frames), progress=False)
  assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.uint8
  assert out["codes"].shape == (4, 4) and out["codes"].dtype == np.int32
  assert out["codes"].min() >= 0 and out["codes"].max() < 32
  hist = [h["similarity"] for h in out["history"]]
  assert len(hist) == STEPS
  # Gradient ascent on the CLIP similarity: the final image scores higher than the start.
  assert out["similarity"] > out["initial_similarity"] + 1e-3, (out["initial_similarity"],
                                                                out["similarity"], hist)
  assert np.mean(hist[-5:]) > np.mean(hist[:5])
  assert sorted(os.listdir(frames)) == ["frame_00000.png", "frame_00010.png", "frame_00020.png"]
  # The final codes decode to the returned image.
  from dalle_jax.models.loader import vqgan_decode as decode_codes
  from dalle_jax.data.images import to_uint8
  recon = to_uint8(decode_codes(gen.vq_config, gen.vq_vars, out["codes"][None]))[0]
  assert np.abs(recon.astype(int) - out["image"].astype(int)).max() <= 1


def test_deterministic_per_seed(gen):
  a = gen.generate(PROMPT, steps=5, num_cutouts=4, seed=3, progress=False)
  b = gen.generate(PROMPT, steps=5, num_cutouts=4, seed=3, progress=False)
  c = gen.generate(PROMPT, steps=5, num_cutouts=4, seed=4, progress=False)
  np.testing.assert_array_equal(a["codes"], b["codes"])
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["history"] == b["history"]
  assert not np.array_equal(a["codes"], c["codes"])
  d = gen.generate(PROMPT, steps=5, num_cutouts=4, seed=3, lr=0.02, progress=False)
  assert d["history"][0] == a["history"][0] and d["history"][1:] != a["history"][1:]
  # One compilation of the step serves every seed, prompt and learning rate.
  from dalle_jax.sampling.vqgan_clip import Settings
  assert gen._fns(Settings(num_cutouts=4)).step._cache_size() == 1


def test_init_image_and_errors(gen, ckpts, tmp_path):
  from dalle_jax.sampling import vqgan_clip
  rng = np.random.default_rng(0)
  init = rng.integers(0, 255, (40, 48, 3), np.uint8)  # resized + cropped to 32 px
  out = gen.generate(PROMPT, steps=0, seed=0, init_image=init, progress=False)
  from dalle_jax.models.loader import vqgan_encode as encode_images
  x = vqgan_clip._read_init_image(init, 32, 32)
  np.testing.assert_array_equal(out["codes"], np.asarray(encode_images(gen.vq_config, gen.vq_vars, x))[0])
  with pytest.raises(ValueError, match="prompt is empty"):
    gen.generate("  ", steps=1, progress=False)
  with pytest.raises(FileNotFoundError, match="--vqgan .*missing: no such directory"):
    vqgan_clip.VQGANCLIP(str(tmp_path / "missing"), ckpts[1])
  with pytest.raises(FileNotFoundError, match="--clip .*missing_clip: no such directory"):
    vqgan_clip.VQGANCLIP(ckpts[0], str(tmp_path / "missing_clip"))
  with pytest.raises(ValueError, match="--clip .*'vqgan' model .*expected a CLIP"):
    vqgan_clip.VQGANCLIP(ckpts[0], ckpts[0])
  with pytest.raises(ValueError, match="--vqgan .*'clip' model .*expected a VQGAN"):
    vqgan_clip.VQGANCLIP(ckpts[1], ckpts[1])


def test_decoder_only_vqgan(gen, ckpts):
  """A decoder-only import (min-dalle style: no encoder/quant_conv) generates the
  same image as the full VQGAN: only the quantizer and decoder take part."""
  from dalle_jax.sampling import vqgan_clip
  config = tiny_vqgan_config()
  config.model.decoder_only = True
  params = {k: v for k, v in gen.vq_vars["params"].items() if k not in ("encoder", "quant_conv")}
  dec = vqgan_clip.VQGANCLIP((config, {"params": {"vqgan": params}}), ckpts[1])
  a = dec.generate(PROMPT, steps=3, num_cutouts=4, seed=5, progress=False)
  b = gen.generate(PROMPT, steps=3, num_cutouts=4, seed=5, progress=False)
  np.testing.assert_array_equal(a["codes"], b["codes"])
  with pytest.raises(ValueError, match="only a decoder"):
    dec.generate(PROMPT, steps=1, init_image=np.zeros((32, 32, 3), np.uint8), progress=False)
  bad = {"params": {k: v for k, v in params.items() if k != "decoder"}}
  with pytest.raises(ValueError, match="lack decoder"):
    vqgan_clip.VQGANCLIP((config, bad), ckpts[1])


def test_plain_quantizer_and_grid(ckpts):
  """taming's plain codebook (no l2 / factorisation), any latent grid."""
  from dalle_jax.sampling import vqgan_clip
  config = tiny_vqgan_config(codebook_dim=0, l2_normalize=False)
  variables = init_vqgan(config, seed=2)
  g = vqgan_clip.VQGANCLIP((config, variables), ckpts[1])
  out = g.generate(PROMPT, steps=0, grid=(2, 3), seed=1, progress=False)
  assert out["image"].shape == (16, 24, 3) and out["codes"].shape == (2, 3)
  codes = np.asarray(jax.random.randint(jax.random.split(jax.random.key(1))[0], (1, 2, 3), 0, 32))
  np.testing.assert_array_equal(out["codes"], codes[0])  # random codes snap back to themselves


def test_main_writes_pngs(ckpts, tmp_path):
  from dalle_jax.sampling.vqgan_clip import vqgan_clip_main
  vq, clip = ckpts
  out = tmp_path / "vc.png"
  vqgan_clip_main(["--method", "vqgan_clip", "--vqgan", vq, "--clip", clip, "--prompt", PROMPT,
                   "--prompt", "a green square on a white background", "--steps", "4",
                   "--num_cutouts", "4", "--seed", "1", "--save_every", "2", "--out", str(out),
                   "--no_progress"])
  assert out.is_file()
  stem = tmp_path / "vc"
  assert (stem / "p00.png").is_file() and (stem / "p01.png").is_file()
  assert sorted(os.listdir(stem / "p01_frames")) == [
      "frame_00000.png", "frame_00002.png", "frame_00004.png"]
  meta = json.loads((stem / "samples.json").read_text())
  assert [r["prompt_index"] for r in meta["images"]] == [0, 1]
  assert np.load(stem / "codes.npy").shape == (2, 4, 4)
  with pytest.raises(SystemExit, match="at least one --prompt"):
    vqgan_clip_main(["--vqgan", vq, "--clip", clip, "--out", str(out)])
  with pytest.raises(SystemExit, match="is empty"):
    vqgan_clip_main(["--vqgan", vq, "--clip", clip, "--prompt", "", "--out", str(out)])
  with pytest.raises(SystemExit, match="no such directory"):
    vqgan_clip_main(["--vqgan", str(tmp_path / "nope"), "--clip", clip, "--prompt", "x",
                     "--out", str(out)])
