"""`python -m dalle_jax.tools.convert diffusers_unet --src DIR --out CKPT`

A diffusers `UNet2DModel` folder (config.json + diffusion_pytorch_model.safetensors
or .bin, with scheduler_config.json beside it or in ../scheduler/; e.g. the DDPM
CIFAR-10 / CelebA-HQ / LSUN releases) becomes a `diffusion`-family checkpoint:
CKPT/config.json (configs/diffusion.py's keys: the U-Net in model.unet, the source's
scheduler settings in config.diffusion, unconditional, f32) + CKPT/variables/.

  python sample.py --method diffusion --checkpoint CKPT --unconditional \
      --sampler ddim --steps 50 --num_images 16 --out samples.png

samples with the source's scheduler (schedule, prediction/variance type, clipping,
spacing). The tensors are mapped and checked by dalle_jax/convert/diffusers_unet.py.
"""
import argparse
import json
import os

from dalle_jax.configs import diffusion as diffusion_configs
from dalle_jax.convert import diffusers_unet
from dalle_jax.diffusion import schedule as schedule_lib
from dalle_jax.train import checkpoint


def import_config(model_cfg, scheduler, sample_size):
  """The full family config of an imported U-Net (unconditional unless it embeds classes)."""
  declared = diffusers_unet.unet_lib.parse_extra_embeds(model_cfg.get("extra_embeds", ()))
  if "class" in declared:
    raise diffusers_unet.ConversionError(
        "class-conditional UNet2DModel (class_embed_type / num_class_embeds): sampling it "
        "needs labels, which sample.py --method diffusion does not take yet")
  sched = schedule_lib.SchedulerConfig.from_dict(scheduler or {})  # validates, names bad keys
  return diffusion_configs.imported_config(model_cfg, sched.to_dict(), sample_size)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m dalle_jax.tools.convert diffusers_unet",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--src", required=True, help="diffusers UNet2DModel folder")
  p.add_argument("--out", required=True, help="checkpoint directory to write")
  p.add_argument("--image_size", type=int, default=0,
                 help="sampling resolution (default: config.json's sample_size)")
  args = p.parse_args(argv)
  try:
    model_cfg, variables, scheduler, report = diffusers_unet.convert_unet2d(args.src)
    size = args.image_size
    if not size:
      with open(os.path.join(os.path.abspath(args.src), "config.json")) as f:
        size = json.load(f).get("sample_size")
      size = size[0] if isinstance(size, (list, tuple)) else size
    if not size:
      raise diffusers_unet.ConversionError(
          f"{args.src}/config.json has no sample_size: pass --image_size")
    if scheduler is None:
      report.append("scheduler: diffusers' DDPMScheduler defaults (linear 1e-4..0.02, 1000 steps)")
    config = import_config(model_cfg, scheduler, int(size))
  except (ValueError, OSError) as e:
    raise SystemExit(f"error: {e}")
  # the family's model (dalle_jax/models/text2im.py) holds the U-Net under "unet"
  variables = dict(variables, params={"unet": variables["params"]})
  checkpoint.save_imported(args.out, config, variables)
  for line in report:
    print(line)
  print(f"wrote {os.path.abspath(args.out)} (sample with: python sample.py --method diffusion "
        f"--checkpoint {args.out} --unconditional)")
  return args.out
