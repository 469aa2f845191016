"""CLIP embedding throughput: dalle_jax vs transformers' PyTorch CLIPModel.

  python benchmarks/bench_clip.py [--preset vit_b32] [--image_batch 32] [--text_batch 128]

Both sides run the SAME random weights (a transformers CLIPModel at the
preset's published dims, saved and imported with dalle_jax.convert.hf_clip),
f32, on the local default device (PyTorch on CPU). Median of --reps timed runs
after a warm-up; prints images/s and texts/s for each and the ratio (ours / torch),
and checks the two agree.
"""
import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  pylint: disable=g-import-not-at-top


def hf_config(preset):
  import transformers  # pylint: disable=g-import-not-at-top
  from dalle_jax.configs import clip as clip_configs  # pylint: disable=g-import-not-at-top
  m = clip_configs.get_config(preset).model
  v, t = m.vision, m.text
  return transformers.CLIPConfig(
      text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                       num_hidden_layers=t.layers, num_attention_heads=t.heads,
                       max_position_embeddings=t.max_len),
      vision_config=dict(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.width,
                         intermediate_size=v.mlp_dim, num_hidden_layers=v.layers,
                         num_attention_heads=v.heads),
      projection_dim=m.embed_dim)


def timed(fn, reps):
  return common.timeit_with_output(fn, warmup=1, reps=reps)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="vit_b32")
  p.add_argument("--image_batch", type=int, default=32)
  p.add_argument("--text_batch", type=int, default=128)
  p.add_argument("--reps", type=int, default=1)
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from dalle_jax.convert import hf_clip  # pylint: disable=g-import-not-at-top
  from dalle_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  ref = transformers.CLIPModel(hf_config(args.preset)).eval()
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    config, variables = hf_clip.load_hf_clip(d)
  model = clip_lib.build_model(config)
  variables = jax.device_put(variables)
  s, tl = config.model.vision.image_size, config.model.text.max_len
  rng = np.random.default_rng(0)
  pix = rng.normal(size=(args.image_batch, 3, s, s)).astype(np.float32)
  ids = rng.integers(0, config.model.text.vocab_size - 1, (args.text_batch, tl)).astype(np.int64)
  ids[:, -1] = config.model.text.eos_id if config.model.text.pool == "eos" else ids.max() + 1
  mean, std = np.asarray(config.model.image_mean), np.asarray(config.model.image_std)
  images = ((pix.transpose(0, 2, 3, 1) * std + mean) * 2 - 1).astype(np.float32)

  img_fn = jax.jit(lambda v, x: model.apply(v, x, normalize=False, method=clip_lib.CLIP.encode_image))
  txt_fn = jax.jit(lambda v, i: model.apply(v, i, None, normalize=False, method=clip_lib.CLIP.encode_text))
  with torch.inference_mode():
    t_img_torch, ref_img = timed(lambda: ref.get_image_features(pixel_values=torch.from_numpy(pix)).pooler_output, args.reps)
    t_txt_torch, ref_txt = timed(lambda: ref.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output, args.reps)
  x, i32 = jax.device_put(images), jax.device_put(ids.astype(np.int32))
  t_img, our_img = timed(lambda: img_fn(variables, x), args.reps)
  t_txt, our_txt = timed(lambda: txt_fn(variables, i32), args.reps)
  err_img = float(np.abs(np.asarray(our_img) - ref_img.numpy()).max())
  err_txt = float(np.abs(np.asarray(our_txt) - ref_txt.numpy()).max())

  print(f"{args.preset}: {clip_lib.param_count(variables['params']) / 1e6:.1f}M params, "
        f"jax on {jax.devices()[0].device_kind}, torch {torch.__version__} CPU "
        f"({torch.get_num_threads()} threads)")
  rate = lambda v: f"{v:8.1f}/s"
  common.ratio_line(f"images ({args.image_batch}x{s}px)", args.image_batch / t_img,
                    args.image_batch / t_img_torch, ours_label="dalle_jax", theirs_label="torch",
                    fmt=rate, lower_is_better=False, extra=f"max|diff| {err_img:.1e}")
  common.ratio_line(f"texts  ({args.text_batch}x{tl} tok)", args.text_batch / t_txt,
                    args.text_batch / t_txt_torch, ours_label="dalle_jax", theirs_label="torch",
                    fmt=rate, lower_is_better=False, extra=f"max|diff| {err_txt:.1e}")


if __name__ == "__main__":
  main()
