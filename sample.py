"""Sample images from a text->image model (DALL·E / DALL·E mini).

  python sample.py --workdir demo/dalle --prompt "a red circle on a blue background" \
      --num_images 8 --seed 0 --out demo/samples.png
  python sample.py --checkpoint ckpt/mega --prompt "an avocado armchair" --top_k 256 \
      --guidance_scale 16 --out avocado.png [--rerank_with CLIP_DIR --rerank_top 2]

Writes the grid PNG (one row per prompt) and the individual images plus
samples.json in a folder beside it (OUT without its extension).
Options: --top_k, --top_p, --temperature, --guidance_scale, --vqgan (override the
VQGAN recorded in the model's config), --unconditional, --batch_size.
"""
import sys

from dalle_jax.sampling.generate import sample_main

if __name__ == "__main__":
  sample_main(sys.argv[1:])
