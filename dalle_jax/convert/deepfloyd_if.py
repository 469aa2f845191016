"""Import DeepFloyd IF stage I / stage II from diffusers' pipeline layout.

  python -m dalle_jax.tools.convert deepfloyd_if --src IF-I-XL-v1.0 --out ckpt/if_stage1
  python -m dalle_jax.tools.convert deepfloyd_if --src IF-II-L-v1.0 --out ckpt/if_stage2

SRC holds `model_index.json` (IFPipeline: stage I; IFSuperResolutionPipeline:
stage II), `unet/` (UNet2DConditionModel), `scheduler/`, for stage II
`image_noising_scheduler/`, and `text_encoder/` + `tokenizer/` (T5 v1.1; IF's
stage II releases ship without them and reuse stage I's prompt states).
`safety_checker/`, `feature_extractor/` and `watermarker/` are not read.

  convert_if(SRC) -> IFImport (the U-Net's model config and variables, the
                     scheduler settings, stage II's noising schedule, the T5 encoder)

The U-Net config is read by dalle_jax/convert/karlo.py's `decoder_unet_config` (the
same ADM-style UNet2DConditionModel blocks: ResnetDownsampleBlock2D /
SimpleCrossAttnDownBlock2D / UNetMidBlock2DSimpleCrossAttn, attention_head_dim =
the per-head width there) and its tensors are mapped name for name and shape for
shape by dalle_jax/convert/diffusers_unet.py; the T5 encoder by convert/hf_t5.py.

How IF's pipelines use the modules, which a sampler has to reproduce:
  * prompts are T5-encoded with padding to 77 tokens; the unconditional rows are
    the encoding of "" (also padded to 77); the U-Net gets NO attention mask: it
    attends to all 77 token states, padding included, and pools all of them
    (`addition_embed_type="text"`) into its time embedding;
  * guidance splits the 6 output channels 3 + 3, guides the eps half and keeps the
    conditional variance half (diffusion.guidance, learned_variance=True);
  * stage II: the low-res image (in [-1, 1]) is upsampled to the output size with
    bilinear interpolation, align_corners=True (`upsample_low_res`), noised at
    `noise_level` (250 by default) with the image-noising schedule, concatenated
    after x_t (our U-Net's low_res input at full size), and the level is the class
    embedding (embeds={"class": level}) — `stage2_condition` does all of it.
The checkpoint written by `main` is a `diffusion`-family checkpoint (see
`family_config` for the keys) with the T5 encoder as an hf_t5 checkpoint in
CKPT/text_encoder/.

Shapes: B batch, H/W output height/width, h/w low-res height/width, C channels.
"""
import argparse
import dataclasses
import os
from typing import Any, Optional

import jax.numpy as jnp
import ml_collections
import numpy as np

from dalle_jax.configs import diffusion as diffusion_configs
from dalle_jax.convert import common
from dalle_jax.convert import diffusers_unet as dconv
from dalle_jax.convert import hf_t5
from dalle_jax.convert import karlo
from dalle_jax.diffusion import cascade
from dalle_jax.diffusion import schedule as schedule_lib

ConversionError = common.ConversionError

STAGE_PIPELINES = {"IFPipeline": "I", "IFImg2ImgPipeline": "I", "IFInpaintingPipeline": "I",
                   "IFSuperResolutionPipeline": "II",
                   "IFImg2ImgSuperResolutionPipeline": "II",
                   "IFInpaintingSuperResolutionPipeline": "II"}
IGNORED_PARTS = ("safety_checker", "feature_extractor", "watermarker")
TEXT_LEN = 77  # IF's prompt length (tokenizer max_length in encode_prompt)
NOISE_LEVEL = 250  # IFSuperResolutionPipeline's default noise_level
GUIDANCE = {"I": 7.0, "II": 4.0}  # the pipelines' default guidance_scale
STEPS = {"I": 100, "II": 50}  # ... and num_inference_steps
CHECKPOINT_T5 = "text_encoder"  # the T5 checkpoint's folder inside an imported IF checkpoint


@dataclasses.dataclass
class IFImport:
  stage: str  # "I" | "II"
  unet_config: dict  # models/unet.py keys
  unet_variables: dict  # {'params': ...}
  scheduler: schedule_lib.SchedulerConfig
  noising_scheduler: Optional[schedule_lib.SchedulerConfig]  # stage II
  sample_size: int
  t5_config: Optional[Any]  # ml_collections.ConfigDict (models/t5.py) or None
  t5_variables: Optional[dict]
  tokenizer_dir: Optional[str]
  report: list


def _read_json(path):
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: not found")
  return common.load_json(path)


def read_stage(src):
  """'I' or 'II' from SRC/model_index.json's _class_name."""
  index = _read_json(os.path.join(src, "model_index.json"))
  name = index.get("_class_name")
  if name not in STAGE_PIPELINES:
    raise ConversionError(f"{src}/model_index.json: _class_name={name!r} is not a DeepFloyd IF "
                          f"pipeline (expected one of {', '.join(STAGE_PIPELINES)})")
  return STAGE_PIPELINES[name]


def read_scheduler(folder):
  """SchedulerConfig of FOLDER/scheduler_config.json (one-line errors naming the file)."""
  path = os.path.join(folder, "scheduler_config.json")
  cfg = _read_json(path)
  try:
    return schedule_lib.SchedulerConfig.from_dict(cfg)
  except (ValueError, TypeError) as e:
    raise ConversionError(f"{path}: {e}") from e


def unet_config(cfg, stage, learned_variance, where="unet/config.json"):
  """Our U-Net model config for IF's UNet2DConditionModel config dict. Stage II's
  6 input channels become 3 image channels + a 3-channel low_res input (the same
  conv_in kernel: x_t first, then the upsampled noised low-res image)."""
  model_cfg = karlo.decoder_unet_config(cfg, where=where)
  bad = lambda key, why: ConversionError(f"{where}: {key}={cfg.get(key)!r}: {why}")
  out_ch = model_cfg["out_channels"]
  if learned_variance and out_ch % 2:
    raise bad("out_channels", "learned_range variance needs an even number (mean + variance)")
  image_ch = out_ch // 2 if learned_variance else out_ch
  embeds = tuple(model_cfg["extra_embeds"])
  if stage == "I":
    if model_cfg["in_channels"] != image_ch:
      raise bad("in_channels", f"stage I takes the {image_ch}-channel x_t only "
                f"(out_channels={out_ch})")
    if embeds:
      raise bad("class_embed_type", "stage I has no class embedding (null)")
  else:
    if model_cfg["in_channels"] != 2 * image_ch:
      raise bad("in_channels", f"stage II takes x_t and the upsampled low-res image, "
                f"{2 * image_ch} channels (out_channels={out_ch})")
    if embeds != ("class:timestep",):
      raise bad("class_embed_type", "stage II embeds its noise level: expected 'timestep'")
    model_cfg = dict(model_cfg, in_channels=image_ch, low_res_channels=image_ch)
  if not model_cfg["context_dim"]:
    raise bad("encoder_hid_dim", "IF's U-Net attends to T5 states")
  return model_cfg


def read_unet_config(unet_dir, stage, learned_variance):
  """(our model config, sample_size) from SRC/unet/config.json."""
  cfg = karlo.read_config(unet_dir, ("UNet2DConditionModel",))
  where = os.path.join(unet_dir, "config.json")
  model_cfg = unet_config(cfg, stage, learned_variance, where=where)
  size = cfg.get("sample_size")
  size = size[0] if isinstance(size, (list, tuple)) else size
  if not size:
    raise ConversionError(f"{where}: no sample_size")
  return model_cfg, int(size)


def convert_unet_weights(unet_dir, model_cfg, stage):
  """(variables, report lines) of SRC/unet's tensors, every one checked by name and shape."""
  weights = dconv.read_weights(unet_dir)
  variables = dconv.convert_weights(weights, model_cfg, where=unet_dir)
  n = sum(int(np.prod(v.shape)) for v in weights.values())
  heads = [c // model_cfg["attn_head_dim"] for c, a in zip(model_cfg["block_channels"],
                                                           model_cfg["attention"]) if a != "none"]
  return variables, [
      f"{unet_dir}: UNet2DConditionModel (IF stage {stage}), {len(weights)} tensors "
      f"({n / 1e6:.2f}M parameters) converted: levels {list(model_cfg['block_channels'])}, "
      f"blocks {list(model_cfg['num_res_blocks'])}, attention {list(model_cfg['attention'])} "
      f"(heads {heads} of {model_cfg['attn_head_dim']}), T5 width {model_cfg['context_dim']} -> "
      f"{model_cfg['context_proj_dim']}, {model_cfg['out_channels']} output channels"]


def convert_if(src_dir, with_t5=True):
  """A DeepFloyd IF stage I / II pipeline folder -> IFImport. with_t5=False skips
  reading the T5 weights (the CLI has hf_t5 write them straight to their checkpoint)."""
  src = os.path.abspath(os.path.expanduser(src_dir))
  if not os.path.isdir(src):
    raise ConversionError(f"{src_dir}: not a directory")
  stage = read_stage(src)
  needed = ["unet", "scheduler"] + (["image_noising_scheduler"] if stage == "II" else [])
  absent = [p + "/" for p in needed if not os.path.isdir(os.path.join(src, p))]
  if absent:
    raise ConversionError(f"{src}: not a DeepFloyd IF stage {stage} folder, missing "
                          f"{', '.join(absent)}")
  sched = read_scheduler(os.path.join(src, "scheduler"))
  noising = (read_scheduler(os.path.join(src, "image_noising_scheduler")) if stage == "II"
             else None)
  unet_dir = os.path.join(src, "unet")
  model_cfg, size = read_unet_config(unet_dir, stage, sched.learned_variance)
  t5_dir = tok_dir = None
  if os.path.isdir(os.path.join(src, "text_encoder")):  # checked before any weight is read
    t5_dir, tok_dir = hf_t5.locate(src)
    width = hf_t5.read_hf_config(t5_dir).get("d_model")
    if width != model_cfg["context_dim"]:
      raise ConversionError(f"{t5_dir}/config.json: the T5 encoder is {width} wide but the "
                            f"U-Net's encoder_hid_dim is {model_cfg['context_dim']}")
  variables, report = convert_unet_weights(unet_dir, model_cfg, stage)
  report.append(f"sample size {size} px; scheduler: {sched.beta_schedule}, "
                f"{sched.prediction_type}, {sched.variance_type}, thresholding="
                f"{sched.thresholding} (ratio {sched.dynamic_thresholding_ratio}, max "
                f"{sched.sample_max_value})")
  if noising is not None:
    report.append(f"image_noising_scheduler: {noising.beta_schedule}, "
                  f"{noising.num_train_timesteps} levels")
  t5_cfg = t5_vars = None
  if t5_dir is not None:
    if with_t5:
      t5_cfg, t5_vars = hf_t5.load_hf_t5(src)
    report.append(f"text_encoder: T5 from {t5_dir}" + ("" if tok_dir else " (NO tokenizer found)"))
  else:
    report.append("text_encoder: none in this folder (IF stage II releases reuse stage I's "
                  "prompt states)")
  return IFImport(stage=stage, unet_config=model_cfg, unet_variables=variables, scheduler=sched,
                  noising_scheduler=noising, sample_size=size, t5_config=t5_cfg,
                  t5_variables=t5_vars, tokenizer_dir=tok_dir, report=report)


# --- stage II conditioning, as IFSuperResolutionPipeline builds it -----------------

def _align_corners_matrix(n_in, n_out):
  """(n_out, n_in) bilinear interpolation weights with align_corners=True."""
  if n_in == 1 or n_out == 1:
    m = np.zeros((n_out, n_in))
    m[:, 0] = 1.0
    return m
  pos = np.arange(n_out) * (n_in - 1) / (n_out - 1)
  lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
  frac = pos - lo
  m = np.zeros((n_out, n_in))
  m[np.arange(n_out), lo] = 1.0 - frac
  m[np.arange(n_out), lo + 1] += frac
  return m


def upsample_low_res(low_res_bhwc, size):
  """torch's interpolate(mode='bilinear', align_corners=True) to (size, size) (IF's
  stage II resize; the U-Net's own low-res resize is align_corners=False)."""
  _, h, w, _ = low_res_bhwc.shape
  size_h, size_w = (size, size) if isinstance(size, int) else size
  rows = jnp.asarray(_align_corners_matrix(h, size_h), jnp.float32)
  cols = jnp.asarray(_align_corners_matrix(w, size_w), jnp.float32)
  x = jnp.einsum("Hh,bhwc->bHwc", rows, low_res_bhwc.astype(jnp.float32), precision="highest")
  return jnp.einsum("Ww,bhwc->bhWc", cols, x, precision="highest")


def stage2_condition(low_res_bhwc, size, noise_level, noise_bhwc, noising=cascade.IF_NOISING):
  """The stage II U-Net's low-res input and noise-level embedding: the low-res image
  upsampled to size (align_corners=True), then noised at `noise_level` of the
  image-noising schedule -> (low_res at (B, H, W, C), embeds {'class': level (B,)})."""
  up = upsample_low_res(low_res_bhwc, size)
  if noise_bhwc.shape != up.shape:
    raise ValueError(f"stage II noise has shape {noise_bhwc.shape}; the upsampled low-res image "
                     f"is {up.shape}")
  z, level_b = cascade.NoiseAugmentation(noising).at_level(up, noise_level, noise_bhwc)
  return z, {"class": level_b}


# --- checkpoint -----------------------------------------------------------------

def family_config(imp: IFImport, t5_path=""):
  """The `diffusion`-family config of an imported stage (configs/diffusion.py's keys:
  model.unet, model.conditioning = text, config.diffusion = the scheduler; the frozen
  T5 at text_encoder.t5). IF specifics not in configs/diffusion.py live in
  config.deepfloyd_if: stage, text_len (77), context_mask (False: the U-Net attends to
  padding states), negative_prompt (""), and for stage II noise_level, the
  noising schedule and the low-res upsampling."""
  try:
    c = diffusion_configs.imported_config(imp.unet_config, imp.scheduler.to_dict(),
                                          imp.sample_size, conditioning="text")
  except ValueError as e:
    raise ConversionError(f"IF stage {imp.stage}: {e}") from e
  c.text_encoder.t5 = t5_path  # a T5 checkpoint (relative: inside this checkpoint)
  c.sampling.prompts = []
  c.sampling.sampler = "ddpm"  # IF's own scheduler
  c.sampling.steps = STEPS[imp.stage]
  c.sampling.guidance_scale = GUIDANCE[imp.stage]
  d = ml_collections.ConfigDict()
  d.stage = imp.stage
  d.text_len = TEXT_LEN
  d.context_mask = False
  d.negative_prompt = ""
  if imp.stage == "II":
    d.noise_level = NOISE_LEVEL
    d.noising = imp.noising_scheduler.to_dict()
    d.low_res_upsample = "bilinear_align_corners"
  c.deepfloyd_if = d
  return c


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m dalle_jax.tools.convert deepfloyd_if",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--src", required=True, help="DeepFloyd IF stage I or II pipeline folder")
  p.add_argument("--out", required=True, help="checkpoint directory to write")
  args = p.parse_args(argv)
  from dalle_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  try:
    imp = convert_if(args.src, with_t5=False)
    has_t5 = os.path.isdir(os.path.join(os.path.abspath(args.src), "text_encoder"))
    config = family_config(imp, CHECKPOINT_T5 if has_t5 else "")
    if has_t5:  # hf_t5's own checkpoint (config, variables, tokenizer) inside ours
      hf_t5.convert(args.src, os.path.join(args.out, CHECKPOINT_T5))
  except (ValueError, OSError) as e:
    raise SystemExit(f"error: {e}") from None
  # the family's model (dalle_jax/models/text2im.py) holds the U-Net under "unet"
  checkpoint.save_imported(args.out, config, {"params": {"unet": imp.unet_variables["params"]}})
  for line in imp.report:
    print(line)
  print(f"wrote {os.path.abspath(args.out)} (DeepFloyd IF stage {imp.stage}"
        + (f", T5 in {CHECKPOINT_T5}/" if has_t5 else ", no T5: use stage I's") + ")")
  return args.out


if __name__ == "__main__":
  main()
