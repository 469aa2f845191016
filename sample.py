"""Sample images from a text->image model.

Autoregressive (DALL·E / DALL·E mini), the default `--method ar`:
  python sample.py --workdir demo/dalle --prompt "a red circle on a blue background" \
      --num_images 8 --seed 0 --out demo/samples.png [--rerank_with demo/clip --rerank_top 4]
  python sample.py --checkpoint ckpt/mega --prompt "an avocado armchair" --top_k 256 \
      --guidance_scale 16 --out avocado.png
Writes the grid PNG (one row per prompt) and the individual images plus
samples.json in a folder beside it (OUT without its extension).
Options: --top_k, --top_p, --temperature, --guidance_scale, --vqgan (override the
VQGAN recorded in the model's config), --unconditional, --batch_size, --mesh
DATA,FSDP,TENSOR (sharded; on several hosts add --coordinator_address,
--num_processes, --process_id). Compiled programs are cached in
DALLE_JAX_CACHE_DIR (default ~/.cache/dalle_jax/xla; empty = off).

VQGAN+CLIP (optimises a VQGAN latent grid towards the prompt under CLIP):
  python sample.py --method vqgan_clip --vqgan demo/vqgan --clip demo/clip \
      --prompt "a red circle on a blue background" --steps 200 --out vqclip.png [--save_every 20]

Diffusion (GLIDE-style text->image, or an imported diffusers U-Net):
  python sample.py --method diffusion (--workdir W | --checkpoint C) --prompt "..." \
      --num_images N --seed S --sampler ddpm|ddim|dpmpp --steps K [--eta E] --guidance_scale G \
      [--thresholding none|static|dynamic --threshold_percentile P] [--init_noise x_T.npy] \
      [--rerank_with CLIP --rerank_top K] [--mesh D,F,T] --out grid.png
  (--unconditional and no --prompt for an unconditional model; the checkpoint's
  scheduler settings are used unless a flag overrides them)

Cascade (Imagen-style base -> super-resolution stages; trained with configs/imagen.py,
or DeepFloyd IF imported with `python -m dalle_jax.tools.convert deepfloyd_if`):
  python sample.py --method cascade --stages W1,W2[,W3] --prompt "..." --num_images N \
      --seed S [--steps 50,25 --sampler ddim,ddpm --guidance_scale 7,4 --eta 0,0 \
      --noise_level 250] [--thresholding dynamic --threshold_percentile P] [--mesh D,F,T] \
      --out grid.png
  (per-stage flags take one value for every stage or a comma list with one per stage,
  --noise_level one per SR stage; defaults come from each stage's config; dynamic
  thresholding in every stage unless --thresholding says otherwise; writes the final
  grid and images, and each stage's under OUT_STEM/stageK/)

unCLIP (DALL·E 2; Karlo imported with `python -m dalle_jax.tools.convert karlo`):
  python sample.py --method unclip --checkpoint C --prompt "..." --num_images N --seed S \
      [--prior_steps 25 --decoder_steps 25 --sr_steps 7 --prior_guidance_scale 4 \
       --decoder_guidance_scale 8] [--init_noise x_T.npz] [--mesh D,F,T] \
      [--rerank_with CLIP --rerank_top K] --out grid.png
  from images, with an image tower --clip CLIP (convert karlo keeps only the text tower):
  python sample.py --method unclip --checkpoint C --clip CLIP --variations IMAGE --num_images N --out v.png
  python sample.py --method unclip --checkpoint C --clip CLIP --interpolate A B --frames N --out i.png
  python sample.py --method unclip --checkpoint C --clip CLIP --text_diff "from" "to" --image IMAGE \
      --frames N --out d.png
  python sample.py --method unclip --checkpoint C --clip CLIP --edit IMAGE --mask MASK --prompt "..." \
      --out e.png      (mask: white = regenerate, black = keep)
  trained stages instead of --checkpoint (configs/unclip.py: a prior and a clip_image decoder;
  the decoder's CLIP encodes the text and embeds input images, no super-resolution):
  python sample.py --method unclip --prior demo/prior --decoder demo/decoder --prompt "..." \
      [--variations IMAGE | --interpolate A B | --text_diff "from" "to" --image IMAGE \
       --text_diff_strength 0.5] --out u.png
"""
import argparse
import sys


def main(argv):
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--method", default="ar", choices=["ar", "vqgan_clip", "diffusion", "cascade",
                                                      "unclip"])
  known, rest = pre.parse_known_args(argv)
  if known.method == "diffusion":
    from dalle_jax.sampling.diffusion import diffusion_main
    return diffusion_main(rest)
  if known.method == "cascade":
    from dalle_jax.sampling.cascade import cascade_main
    return cascade_main(rest)
  if known.method == "unclip":
    from dalle_jax.sampling.unclip import unclip_main
    return unclip_main(rest)
  if known.method == "vqgan_clip":
    from dalle_jax.sampling.vqgan_clip import vqgan_clip_main
    return vqgan_clip_main(rest)
  from dalle_jax.sampling.generate import sample_main
  return sample_main(rest)


if __name__ == "__main__":
  main(sys.argv[1:])
