"""unCLIP text -> image end to end: dalle_jax's UnclipPipeline vs diffusers' UnCLIPPipeline.

  python -m benchmarks.bench_unclip [--prompts 2] [--num_images 2] [--reps 3]

One small random Karlo-layout pipeline, built with diffusers (CLIP text encoder 2 x 64, 32
caption tokens; prior 4 layers of width 128 over 64-d embeddings; text projection; decoder
U-Net 32 px, channels 64/128 with added-KV attention at the second level, learned-range
variance; two super-resolution U-Nets 64 px, channels 32/64; three UnCLIPSchedulers), saved,
then imported with `convert karlo`: the SAME weights on both sides. Both run the whole
pipeline (text encoder, prior with guidance 4, decoder with guidance 8, super-resolution;
10 / 10 / 5 steps) in f32 on this CPU; images/s (the best of --reps runs after a warm-up
run; ours excludes compilation). The outputs are compared from the same initial noises
(the per-step noises differ: each side draws its own), so only their ranges are checked.
Ratio = ours / diffusers images/s (> 1: ours is faster; target >= 1.5).
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  pylint: disable=g-import-not-at-top

E, S, SMALL, BIG = 64, 32, 32, 64
STEPS = dict(prior=10, decoder=10, super_res=5)
PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a yellow triangle on a black background", "a cyan diamond on a red background"]


def _write_tokenizer(path):
  """A character-level CLIP BPE tokenizer (bytes alphabet, no merges), saved by HF."""
  import transformers  # pylint: disable=g-import-not-at-top
  # byte-level BPE's alphabet: printable Latin-1 bytes stand for themselves, the other
  # bytes for code points from 256 up
  keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
  extra = [b for b in range(256) if b not in keep]
  chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]
  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  raw = os.path.join(path, "raw")
  os.makedirs(raw, exist_ok=True)
  with open(os.path.join(raw, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(raw, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  tok = transformers.CLIPTokenizer.from_pretrained(raw, model_max_length=S)
  return tok, len(vocab)


def build_reference(root):
  """The diffusers UnCLIPPipeline (random weights, nonzero clip_std), saved under root/karlo."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
  tok, vocab = _write_tokenizer(os.path.join(root, "tok"))
  torch.manual_seed(0)
  text_encoder = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=E, intermediate_size=4 * E, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=S, projection_dim=E,
      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
      pad_token_id=tok.eos_token_id)).eval()
  prior = diffusers.PriorTransformer(num_attention_heads=4, attention_head_dim=32, num_layers=4,
                                     embedding_dim=E, num_embeddings=S, additional_embeddings=4,
                                     dropout=0.0).eval()
  with torch.no_grad():
    prior.clip_mean.copy_(0.1 * torch.randn(1, E))
    prior.clip_std.copy_(0.5 + torch.rand(1, E))
  text_proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=E,
                                  time_embed_dim=256, cross_attention_dim=128).eval()
  decoder = diffusers.UNet2DConditionModel(
      sample_size=SMALL, in_channels=3, out_channels=6, block_out_channels=(64, 128),
      layers_per_block=1,
      down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
      up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
      mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=128,
      class_embed_type="identity", attention_head_dim=32, resnet_time_scale_shift="scale_shift",
      norm_num_groups=16).eval()
  sr = lambda: diffusers.UNet2DModel(
      sample_size=BIG, in_channels=6, out_channels=3, block_out_channels=(32, 64),
      layers_per_block=1, down_block_types=("ResnetDownsampleBlock2D",) * 2,
      up_block_types=("ResnetUpsampleBlock2D",) * 2, add_attention=False,
      norm_num_groups=16).eval()
  pipe = diffusers.UnCLIPPipeline(
      prior=prior, decoder=decoder, text_encoder=text_encoder, tokenizer=tok, text_proj=text_proj,
      super_res_first=sr(), super_res_last=sr(),
      prior_scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log",
                                                prediction_type="sample", clip_sample_range=5.0),
      decoder_scheduler=diffusers.UnCLIPScheduler(variance_type="learned_range"),
      super_res_scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log"))
  pipe.set_progress_bar_config(disable=True)
  pipe.save_pretrained(os.path.join(root, "karlo"))
  return pipe


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--prompts", type=int, default=2)
  p.add_argument("--num_images", type=int, default=2)
  p.add_argument("--reps", type=int, default=3)
  args = p.parse_args(argv)
  import torch  # pylint: disable=g-import-not-at-top
  from dalle_jax.convert import karlo_checkpoint  # pylint: disable=g-import-not-at-top
  from dalle_jax.sampling import unclip  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  prompts = PROMPTS[:args.prompts]
  n = len(prompts) * args.num_images
  with tempfile.TemporaryDirectory() as tmp:
    ref = build_reference(tmp)
    karlo_checkpoint.write_checkpoint(os.path.join(tmp, "karlo"), os.path.join(tmp, "ckpt"))
    ours = unclip.UnclipPipeline.load(os.path.join(tmp, "ckpt"))
    ours.tokenizer  # pylint: disable=pointless-statement  (read before the folder goes)
  noise = ours.initial_noise(0, n)
  kw = dict(prior_steps=STEPS["prior"], decoder_steps=STEPS["decoder"],
            sr_steps=STEPS["super_res"], prior_guidance_scale=4.0, decoder_guidance_scale=8.0)

  def run_ours():
    return ours.generate(prompts, args.num_images, 0, latents=noise, return_float=True, **kw)

  def run_ref():
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
      return ref(prompts, num_images_per_prompt=args.num_images,
                 prior_num_inference_steps=STEPS["prior"],
                 decoder_num_inference_steps=STEPS["decoder"],
                 super_res_num_inference_steps=STEPS["super_res"], generator=gen,
                 prior_latents=torch.from_numpy(noise["prior"].copy()),
                 decoder_latents=torch.from_numpy(noise["decoder"].transpose(0, 3, 1, 2).copy()),
                 super_res_latents=torch.from_numpy(
                     noise["super_res"].transpose(0, 3, 1, 2).copy()),
                 output_type="np").images

  t_ours, out_ours = common.timeit_with_output(run_ours, reps=args.reps, stat=min)
  t_ref, out_ref = common.timeit_with_output(run_ref, reps=args.reps, stat=min)
  out_ours = np.asarray(out_ours).reshape((n, BIG, BIG, 3))
  assert out_ours.shape == np.asarray(out_ref).shape, (out_ours.shape, np.shape(out_ref))
  assert np.isfinite(out_ours).all()
  print(f"unCLIP {len(prompts)} prompts x {args.num_images} images, steps "
        f"{STEPS['prior']}/{STEPS['decoder']}/{STEPS['super_res']}, {SMALL} -> {BIG} px, "
        f"best of {args.reps}")
  common.ratio_line("unCLIP text->image images/s", n / t_ours, n / t_ref,
                    theirs_label="diffusers", fmt=lambda v: f"{v:.2f} img/s",
                    lower_is_better=False, extra="(target >= 1.5x)")


if __name__ == "__main__":
  main()
