"""Karlo's image-variation layout (diffusers' UnCLIPImageVariationPipeline: image_encoder/ +
feature_extractor/, no prior) on tiny random weights: `convert karlo` tells it apart by
model_index.json, the imported CLIP vision tower (after the processor's resize + crop)
gives the pipeline's image embeddings, and variations from the same noises (decoder and
super-resolution x_T and per-step draws) equal UnCLIPImageVariationPipeline's images within
1e-3; `sample.py --method unclip --variations` runs the checkpoint without --clip; a missing
folder, a foreign model_index.json and text -> image without a prior are one-line errors."""
import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from dalle_jax.convert import karlo
from dalle_jax.data import images as images_lib
from dalle_jax.sampling import unclip as unclip_sampling
from dalle_jax.tools import convert as convert_tool

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from diffusers.schedulers import scheduling_unclip  # noqa: E402
from tests import test_unclip_pipeline as karlo_fixture  # noqa: E402

E, SMALL, BIG = karlo_fixture.E, karlo_fixture.SMALL, karlo_fixture.BIG
CROP = 16  # the image tower's input size; the processor resizes the shorter side to it
STEPS = dict(decoder=3, super_res=3)
N_IMAGES, SEED, GUIDANCE = 2, 4, 3.0


def _write_variation(root):
  """The text -> image fixture's modules re-packed as UnCLIPImageVariationPipeline with a
  tiny CLIPVisionModelWithProjection and its CLIPImageProcessor."""
  t2i = karlo_fixture._write_karlo(root)  # pylint: disable=protected-access
  torch.manual_seed(7)
  vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
      image_size=CROP, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
      num_attention_heads=2, projection_dim=E))
  vision = karlo_fixture._perturbed(vision, 8)  # pylint: disable=protected-access
  processor = transformers.CLIPImageProcessor(size={"shortest_edge": CROP},
                                              crop_size={"height": CROP, "width": CROP})
  pipe = diffusers.UnCLIPImageVariationPipeline(
      decoder=t2i.decoder, text_encoder=t2i.text_encoder, tokenizer=t2i.tokenizer,
      text_proj=t2i.text_proj, feature_extractor=processor, image_encoder=vision,
      super_res_first=t2i.super_res_first, super_res_last=t2i.super_res_last,
      decoder_scheduler=t2i.decoder_scheduler, super_res_scheduler=t2i.super_res_scheduler)
  pipe.save_pretrained(os.path.join(root, "variation"))
  return pipe


def _image():
  """A non-square image (the processor resizes 23 x 30 -> 16 x 20 and crops the middle)."""
  y, x = np.mgrid[0:23, 0:30]
  img = np.stack([120 + 100 * np.sin(x / 5.0), 60 + 5 * y, 200 - 4 * x], -1)
  return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def variation(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("karlo_variation"))
  ref = _write_variation(root)
  ckpt = os.path.join(root, "ckpt")
  convert_tool.main(["karlo", "--src", os.path.join(root, "variation"), "--out", ckpt])
  Image.fromarray(_image()).save(os.path.join(root, "input.png"))
  return ref, ckpt, root


def _step_noises(n):
  """Our per-step draws (decoder, then super-resolution: every step but the last), NCHW, in
  the order the variation pipeline's scheduler asks for them."""
  keys = unclip_sampling.stage_keys(SEED)
  shapes = {"decoder": (n, SMALL, SMALL, 3), "super_res": (n, BIG, BIG, 3)}
  return [np.asarray(jax.random.normal(jax.random.fold_in(keys[s][1], i), shapes[s]))
          .transpose(0, 3, 1, 2) for s in ("decoder", "super_res") for i in range(STEPS[s] - 1)]


_OURS = {}


def _ours(ckpt):
  """(pipeline, float variations (N_IMAGES, BIG, BIG, 3)) of the input image, computed once
  per process (progress=True: the CLI test reuses the compiled stages)."""
  if ckpt not in _OURS:
    pipe = unclip_sampling.UnclipPipeline.load(ckpt)
    _OURS[ckpt] = pipe, pipe.variations(
        _image(), N_IMAGES, seed=SEED, decoder_steps=STEPS["decoder"],
        sr_steps=STEPS["super_res"], decoder_guidance_scale=GUIDANCE, progress=True)
  return _OURS[ckpt]


def test_variations_match_diffusers(variation, monkeypatch):
  ref, ckpt, _ = variation
  with open(os.path.join(ckpt, "config.json")) as f:
    cfg = json.load(f)
  assert "prior" not in cfg["model"] and sorted(cfg["schedulers"]) == ["decoder", "super_res"]
  assert cfg["model"]["image_processor"] == {"shortest_edge": CROP, "crop_size": CROP}
  pipe, ours = _ours(ckpt)
  image = _image()
  # the vision tower after the processor: the pipeline's own image embedding
  with torch.no_grad():
    pixels = ref.feature_extractor(images=Image.fromarray(image), return_tensors="pt").pixel_values
    want_emb = ref.image_encoder(pixels).image_embeds.numpy()
  assert pixels.shape == (1, 3, CROP, CROP)
  emb = pipe.embed_images(image[None])
  np.testing.assert_allclose(emb, want_emb, atol=1e-5, rtol=0)
  assert np.abs(want_emb).max() > 0.1

  noise = pipe.initial_noise(SEED, N_IMAGES)
  queue = _step_noises(N_IMAGES)

  def fake_randn(shape, **kw):
    z = queue.pop(0)
    assert tuple(shape) == z.shape, (shape, z.shape)
    return torch.from_numpy(np.array(z)).to(kw.get("dtype") or torch.float32)
  monkeypatch.setattr(scheduling_unclip, "randn_tensor", fake_randn)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  want = ref(image=Image.fromarray(image), num_images_per_prompt=N_IMAGES,
             decoder_num_inference_steps=STEPS["decoder"],
             super_res_num_inference_steps=STEPS["super_res"],
             decoder_latents=nchw(noise["decoder"]), super_res_latents=nchw(noise["super_res"]),
             decoder_guidance_scale=GUIDANCE, output_type="np").images
  assert not queue  # every step noise consumed, in order
  assert want.shape == (N_IMAGES, BIG, BIG, 3) and np.std(want) > 0.05
  got = np.clip(ours * 0.5 + 0.5, 0, 1)
  print(f"variations vs UnCLIPImageVariationPipeline: image embedding max |diff| "
        f"{np.abs(emb - want_emb).max():.1e}, images {np.abs(got - want).max():.1e}")
  np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
  assert np.abs(ours[0] - ours[1]).max() > 1e-2  # two x_T, two different variations


def test_cli_variations_and_errors(variation, tmp_path, monkeypatch):
  """The CLI without --clip writes the library's variations (same seed and settings; the
  parity test's loaded pipeline is reused so that nothing compiles twice)."""
  import sample  # pylint: disable=g-import-not-at-top
  _, ckpt, root = variation
  os.environ["DALLE_JAX_CACHE_DIR"] = ""
  pipe, ours = _ours(ckpt)
  # sharded loading reads into the abstract tree (prior-less, with the vision tower)
  abstract = nn.unbox(pipe.abstract_variables())["params"]
  assert jax.tree.structure(abstract) == jax.tree.structure(pipe.params)
  assert jax.tree.map(np.shape, abstract) == jax.tree.map(np.shape, pipe.params)
  monkeypatch.setattr(unclip_sampling.UnclipPipeline, "load",
                      classmethod(lambda cls, path, mesh=None: pipe))
  out = str(tmp_path / "var.png")
  sample.main(["--method", "unclip", "--checkpoint", ckpt, "--variations",
               os.path.join(root, "input.png"), "--num_images", str(N_IMAGES), "--seed",
               str(SEED), "--decoder_steps", str(STEPS["decoder"]), "--sr_steps",
               str(STEPS["super_res"]), "--decoder_guidance_scale", str(GUIDANCE), "--out", out])
  with open(tmp_path / "var" / "samples.json") as f:
    meta = json.load(f)
  assert meta["mode"] == "variations" and "clip" not in meta
  imgs = np.stack([np.asarray(Image.open(tmp_path / "var" / r["file"]))
                   for r in meta["images"]])
  want = images_lib.to_uint8(ours)
  assert imgs.shape == want.shape == (N_IMAGES, BIG, BIG, 3)
  assert np.abs(imgs.astype(int) - want).max() <= 1  # PNG of the same floats
  monkeypatch.undo()

  with pytest.raises(SystemExit, match=r"text -> image needs a prior.*image-variation layout"):
    sample.main(["--method", "unclip", "--checkpoint", ckpt, "--prompt", "a cat", "--out", out])
  src = os.path.join(root, "variation")
  for folder in ("feature_extractor", "image_encoder"):
    broken = str(tmp_path / f"no_{folder}")
    shutil.copytree(src, broken, ignore=shutil.ignore_patterns(folder))
    with pytest.raises(SystemExit) as e:
      convert_tool.main(["karlo", "--src", broken, "--out", str(tmp_path / "x")])
    msg = str(e.value)
    assert "\n" not in msg and f"missing {folder}/" in msg and "UnCLIPImageVariationPipeline" in msg
  with open(os.path.join(broken, "model_index.json")) as f:
    index = json.load(f)
  with open(os.path.join(broken, "model_index.json"), "w") as f:
    json.dump(dict(index, _class_name="StableDiffusionPipeline"), f)
  with pytest.raises(karlo.ConversionError, match=r"model_index.json: _class_name="
                                                  r"'StableDiffusionPipeline'"):
    karlo.convert_karlo(broken)
  assert not os.path.exists(tmp_path / "x")
