"""Reconstruct a folder of images through a VQGAN (encode -> codes -> decode).

    python -m dalle_jax.tools.reconstruct --workdir demo/vqgan --input photos/ --output recon/
    python -m dalle_jax.tools.reconstruct --checkpoint ckpt/vqgan_f16 --input photos/ --output recon/

Each readable image is resized (shorter side) and centre-cropped to the model's
image size (`--image_size` overrides), and its reconstruction is written under
the same file name in --output. Prints PSNR / SSIM against the cropped input and
the fraction of the codebook the whole folder used. Unreadable files are
skipped and counted.
"""
import argparse
import os
import sys

import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from dalle_jax.data import images as img_lib
from dalle_jax.models import loader
from dalle_jax.tasks import vqgan as vqgan_task


def list_images(folder):
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"--input {folder!r} is not a directory")
  return sorted(f for f in os.listdir(folder) if f.lower().endswith(img_lib.IMAGE_EXTS))


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m dalle_jax.tools.reconstruct",
                                   description=__doc__.split("\n\n")[0])
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="training workdir (latest checkpoint)")
  src.add_argument("--checkpoint", help="imported checkpoint directory")
  parser.add_argument("--input", required=True, help="folder of images")
  parser.add_argument("--output", required=True, help="folder for the reconstructions")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--image_size", type=int, default=0, help="default: the model's data.image_size")
  args = parser.parse_args(argv)

  try:
    config, variables = loader.load_vqgan(args.workdir or args.checkpoint,
                                          "--workdir" if args.workdir else "--checkpoint")
    names = list_images(args.input)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  if config.model.get("decoder_only", False):
    sys.exit(f"error: {args.workdir or args.checkpoint} holds only a VQGAN decoder "
             "(min-dalle's detoker.pt): it cannot encode images")
  if not names:
    sys.exit(f"error: no images ({', '.join(IMAGE_EXTS)}) in {args.input!r}")
  size = args.image_size or int(config.data.image_size)
  f = 2 ** (len(config.model.ch_mult) - 1)
  if size % f:
    sys.exit(f"error: image size {size} is not a multiple of the VQGAN's downsampling factor {f}")
  os.makedirs(args.output, exist_ok=True)

  counts = np.zeros(int(config.model.n_embed), np.int64)
  psnrs, ssims, skipped = [], [], []
  bs = args.batch_size
  bar = tqdm(total=len(names), desc="reconstructing", unit=" images")
  for start in range(0, len(names), bs):
    batch_names, batch = [], []
    for name in names[start:start + bs]:
      try:
        img, _ = img_lib.open_image(os.path.join(args.input, name))
      except (img_lib.ImageError, OSError) as e:
        skipped.append(f"{name} ({e})")
        continue
      batch.append(img_lib.resize_and_crop(np.asarray(img), size))
      batch_names.append(name)
    bar.update(len(names[start:start + bs]))
    if not batch:
      continue
    x = img_lib.to_float(np.stack(batch))
    n = len(x)
    if n < bs:  # pad to a fixed batch: one compilation for the whole folder
      x = np.concatenate([x, np.repeat(x[-1:], bs - n, axis=0)])
    recon, codes = loader.vqgan_reconstruct(config, variables, x)
    psnrs += list(np.asarray(vqgan_task.psnr(jnp.asarray(x), recon))[:n])
    ssims += list(np.asarray(vqgan_task.ssim(jnp.asarray(x), recon))[:n])
    np.add.at(counts, np.asarray(codes)[:n].reshape(-1), 1)
    out = img_lib.to_uint8(np.asarray(recon)[:n])
    for name, im in zip(batch_names, out):
      Image.fromarray(im).save(os.path.join(args.output, name))
  bar.close()

  done = len(psnrs)
  usage = float((counts > 0).mean())
  print(f"reconstructed {done} images into {args.output} ({size}px, "
        f"{size // f}x{size // f} codes each)")
  if done:
    print(f"PSNR {np.mean(psnrs):.2f} dB | SSIM {np.mean(ssims):.4f} | "
          f"codebook usage {usage:.4f} ({int((counts > 0).sum())}/{len(counts)} codes)")
  if skipped:
    print(f"skipped {len(skipped)} unreadable files: " + "; ".join(skipped[:5])
          + (" ..." if len(skipped) > 5 else ""))
  return {"psnr": float(np.mean(psnrs)) if done else None,
          "ssim": float(np.mean(ssims)) if done else None,
          "codebook_usage": usage, "count": done, "skipped": len(skipped)}


if __name__ == "__main__":
  main()
