"""Import public checkpoints: `python -m dalle_jax.tools.convert KIND [args]`.

KIND selects `dalle_jax.convert.<module>.main(argv)`:
  min_dalle   min-dalle's DALL·E mini/mega files  -> checkpoint for sample.py
  vqgan       taming / DALL·E mini VQGAN weights   -> checkpoint for tools.reconstruct
  hf_clip     Hugging Face CLIP directory          -> checkpoint for --clip / --rerank_with
  hf_t5       Hugging Face T5 / UMT5 encoder, or a diffusers pipeline's text_encoder/ +
              tokenizer/                           -> checkpoint for tools.embed --t5
  diffusers_unet  diffusers UNet2DModel folder (+ scheduler_config.json), e.g. the DDPM
              releases                             -> checkpoint for sample.py --method diffusion
  deepfloyd_if  DeepFloyd IF stage I / II diffusers pipeline folder (U-Net, scheduler, T5)
                                           -> diffusion checkpoint (+ its T5 in text_encoder/)
  karlo       Karlo (unCLIP) diffusers pipeline folder: prior, decoder, both super-resolution
              U-Nets, CLIP text encoder, schedulers  -> checkpoint for sample.py --method unclip
Run `python -m dalle_jax.tools.convert KIND --help` for each one's flags.
"""
import importlib
import sys

KINDS = {"diffusers_unet": "diffusers_unet_checkpoint", "deepfloyd_if": "deepfloyd_if", "min_dalle": "min_dalle", "vqgan": "vqgan", "hf_clip": "hf_clip", "hf_t5": "hf_t5",
         "karlo": "karlo_checkpoint"}


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] not in KINDS:
    sys.exit(f"usage: python -m dalle_jax.tools.convert {{{'|'.join(KINDS)}}} [flags]\n{__doc__}")
  module = importlib.import_module(f"dalle_jax.convert.{KINDS[argv[0]]}")
  return module.main(argv[1:])


if __name__ == "__main__":
  main()
