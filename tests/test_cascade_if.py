"""sample.py --method cascade on DeepFloyd IF stages imported with `tools.convert deepfloyd_if`
(tiny random IF-like stage I 8 px + stage II 8 -> 16 px, built with diffusers): the cascade
equals running the two stages by hand with diffusers as IF's pipelines do (T5 states from
transformers, guided DDIM with the learned-variance split and dynamic thresholding, stage
II's align-corners upsampling and add_noise at the noise level, the level as class_labels),
from the same x_T and augmentation noise (sampling.cascade.stage_keys)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from dalle_jax.convert import deepfloyd_if as if_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from dalle_jax.data.images import to_uint8  # noqa: E402  pylint: disable=g-import-not-at-top
from dalle_jax.sampling import cascade as cascade_sampling  # noqa: E402
from dalle_jax.tools import convert  # noqa: E402  pylint: disable=g-import-not-at-top
from tests import test_deepfloyd_if as tif  # noqa: E402  pylint: disable=g-import-not-at-top

STEPS = 6
LEVEL = 100
SCALES = (tif.GUIDANCE, 1.0)  # stage II unguided: its random U-Net's guided trajectory is
# chaotic (float32 differences of 1e-7 in its input grow to 1e-4)
PROMPTS = ["a red circle on the blue background", "a green square"]


def test_if_cascade_equals_the_two_stages_by_hand(tmp_path):
  root1, root2 = str(tmp_path / "IF-I"), str(tmp_path / "IF-II")
  unet1 = tif._tiny_unet(tif.STAGE1, 0)
  t5 = tif._write_pipeline(root1, "I", unet1, with_t5=True)
  unet2 = tif._tiny_unet(dict(tif.STAGE2, sample_size=16), 1)
  tif._write_pipeline(root2, "II", unet2, with_t5=False)  # IF's stage II: no T5 of its own
  ck1, ck2 = str(tmp_path / "if1"), str(tmp_path / "if2")
  convert.main(["deepfloyd_if", "--src", root1, "--out", ck1])
  convert.main(["deepfloyd_if", "--src", root2, "--out", ck2])

  out = tmp_path / "if.png"
  cascade = cascade_sampling.Cascade.load([ck1, ck2])
  got1, got2 = cascade.generate(PROMPTS, 1, seed=5, sampler="ddim", steps=STEPS,
                                guidance_scale=SCALES, noise_level=LEVEL, progress=True,
                                return_stages=True, return_float=True)
  assert got1.shape == (2, 1, 8, 8, 3) and got2.shape == (2, 1, 16, 16, 3)

  # by hand: the prompts and IF's negative prompt "" through transformers' T5 on 77 tokens
  tok = transformers.T5Tokenizer.from_pretrained(os.path.join(root1, "tokenizer"))
  enc = tok(PROMPTS + [""], padding="max_length", max_length=77, truncation=True,
            return_tensors="pt")
  with torch.no_grad():
    want_states = t5(**enc).last_hidden_state.numpy()
  # the cascade's T5 (the stage I checkpoint's) gives transformers' states; the stages below
  # start from the cascade's own, as float32 differences grow along a guided trajectory
  states, _ = cascade.stages[0].t5.encode_texts(PROMPTS + [""])
  np.testing.assert_allclose(states, want_states, atol=1e-4, rtol=0)
  pos, neg = states[:2], np.repeat(states[2:], 2, 0)
  k_T1 = cascade_sampling.stage_keys(5, 0)[0]
  k_T2, k_aug2, _ = cascade_sampling.stage_keys(5, 1)
  x_T1 = np.asarray(jax.random.normal(k_T1, (2, 8, 8, 3)))
  tif.STEPS, steps_before = STEPS, tif.STEPS
  try:
    want1 = tif._diffusers_ddim(unet1, tif._sched_config(root1), x_T1, pos, neg)
    # stage II from the cascade's stage I output (the stages are compared one at a time)
    up = torch.nn.functional.interpolate(tif._nchw(got1[:, 0]), (16, 16), mode="bilinear",
                                         align_corners=True)
    noising = diffusers.DDPMScheduler.from_pretrained(
        os.path.join(root2, "image_noising_scheduler"))
    aug = tif._nchw(np.asarray(jax.random.normal(k_aug2, (2, 16, 16, 3))))
    z = noising.add_noise(up, aug, torch.tensor([LEVEL, LEVEL]))
    x_T2 = np.asarray(jax.random.normal(k_T2, (2, 16, 16, 3)))
    want2 = tif._diffusers_ddim(unet2, tif._sched_config(root2), x_T2, pos, neg, cond_input=z,
                                model_extra={"class_labels": torch.tensor([LEVEL] * 4)},
                                scale=SCALES[1])
  finally:
    tif.STEPS = steps_before
  # exactly our own stage functions run one after the other (converted U-Nets, IF's
  # guidance split, the imported schedulers, stage2_condition at the level)
  imp1 = if_lib.convert_if(root1, with_t5=False)
  imp2 = if_lib.convert_if(root2)
  tif.STEPS = STEPS
  try:
    mine1 = tif._our_guided_ddim(imp1, x_T1, pos, neg)
    z2, embeds = if_lib.stage2_condition(jnp.asarray(mine1), 16, LEVEL,
                                         jax.random.normal(k_aug2, (2, 16, 16, 3)),
                                         imp2.noising_scheduler)
    tif.GUIDANCE = SCALES[1]
    mine2 = tif._our_guided_ddim(imp2, x_T2, pos, neg, low_res=z2, embeds=embeds)
  finally:
    tif.STEPS, tif.GUIDANCE = steps_before, SCALES[0]
  np.testing.assert_allclose(got1[:, 0], mine1, atol=1e-5, rtol=0)
  np.testing.assert_allclose(got2[:, 0], mine2, atol=1e-5, rtol=0)

  # diffusers' stages from the same draws (measured: 8.1e-4 after the guided stage I, whose
  # float32 differences grow along its trajectory on 77 real T5 tokens; 4.5e-6 after stage
  # II from the same stage I image; ours by hand: 8e-6 and 6e-6)
  np.testing.assert_allclose(got1[:, 0], want1, atol=2e-3, rtol=0)
  np.testing.assert_allclose(got2[:, 0], want2, atol=1e-4, rtol=0)
  assert np.abs(want2).max() > 0.1  # not a blank image

  # the CLI with the same settings (the loaded stages reused: nothing recompiles) writes
  # the final images and each stage's
  with pytest.MonkeyPatch.context() as m:
    m.setattr(cascade_sampling.Cascade, "load", classmethod(lambda cls, paths, mesh=None: cascade))
    cascade_sampling.cascade_main([
        "--stages", f"{ck1},{ck2}", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
        "--num_images", "1", "--seed", "5", "--steps", str(STEPS), "--sampler", "ddim",
        "--guidance_scale", f"{SCALES[0]},{SCALES[1]}", "--noise_level", str(LEVEL),
        "--out", str(out)])
  final = np.asarray(Image.open(tmp_path / "if" / "p01_000.png"))
  np.testing.assert_array_equal(final, to_uint8(got2[1, 0]))
  base = np.asarray(Image.open(tmp_path / "if" / "stage0" / "p00_000.png"))
  np.testing.assert_array_equal(base, to_uint8(got1[0, 0]))
