"""Sampling speed of the autoregressive models (CPU-sized by default).

    python benchmarks/bench_dalle.py [--layers 4 --d_model 256 --batch 4]

Prints:
  1. image tokens/s with the KV cache vs recomputing the whole prefix each step
     (DALL·E layout, 16x16 codes), and their ratio;
  2. time per image for 256 -> 1024 codes with the cache (quadratic attention
     work + linear MLP work: expect ~4-6x for 4x the tokens, vs ~16x+ without cache);
  3. ours vs min-dalle (PyTorch, CPU) at identical small DALL·E mini dimensions,
     batch and guidance (the reference loop re-run token by token in Python).
Timings exclude compilation (one warm-up call each).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dalle_jax.models import dalle, dalle_mini  # noqa: E402
from dalle_jax.sampling import decode  # noqa: E402


def _timed(fn, repeats=2):
  jax.block_until_ready(fn())  # warm-up / compile
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best


def _dalle(args, grid):
  model = dalle.DalleTransformer(
      text_vocab_size=1000, text_len=args.text_len, image_vocab_size=8192, image_grid=grid,
      num_layers=args.layers, d_model=args.d_model, num_heads=args.heads, dtype=jnp.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, args.text_len), jnp.int32),
                               jnp.zeros((1, grid * grid), jnp.int32))["params"]
  return decode.DalleDecoder(model), jax.tree.map(lambda x: getattr(x, "value", x), params)


def bench_cache(args):
  dec, params = _dalle(args, 16)
  text = np.random.RandomState(0).randint(0, 1000, (args.batch, args.text_len)).astype(np.int32)
  mask = np.ones_like(text, bool)
  sp = decode.SamplingParams(top_k=64)
  rng = jax.random.PRNGKey(0)
  cached = _timed(lambda: decode.generate(dec, params, text, mask, rng=rng, sp=sp, chunk=256))
  nocache = _timed(lambda: decode.generate_no_cache(dec, params, text, mask, rng=rng, sp=sp), 1)
  n = args.batch * dec.num_codes
  print(f"[1] KV cache: {n / cached:9.1f} image tok/s | recompute prefix: {n / nocache:9.1f} tok/s"
        f" | speed-up x{nocache / cached:.1f}")
  return cached


def bench_growth(args, t256):
  dec, params = _dalle(args, 32)
  text = np.zeros((args.batch, args.text_len), np.int32)
  mask = np.ones_like(text, bool)
  sp = decode.SamplingParams(top_k=64)
  t1024 = _timed(lambda: decode.generate(dec, params, text, mask, rng=jax.random.PRNGKey(0),
                                         sp=sp, chunk=1024), 1)
  print(f"[2] 256 codes: {t256:.2f}s, 1024 codes: {t1024:.2f}s per batch of {args.batch}"
        f" -> x{t1024 / t256:.1f} time for x4 tokens")


def bench_min_dalle(args):
  try:
    import torch
    from min_dalle import models as md_models
    from min_dalle.min_dalle import MinDalle
  except ImportError as e:
    print(f"[3] skipped: min-dalle/torch not importable ({e})")
    return
  torch.set_num_threads(os.cpu_count() or 1)
  from dalle_jax.convert import min_dalle as conv
  d, h, glu, layers, tv = args.d_model, args.heads, 2 * args.d_model, args.layers, 1000
  enc = md_models.DalleBartEncoder(layer_count=layers, embed_count=d, attention_head_count=h,
                                   text_vocab_count=tv, text_token_count=64, glu_embed_count=glu,
                                   device="cpu").eval()
  decm = md_models.DalleBartDecoder(image_vocab_count=16384, embed_count=d, attention_head_count=h,
                                    glu_embed_count=glu, layer_count=layers, device="cpu").eval()
  tokens = [0, 5, 17, 99, 2]
  grid_size = int(round(np.sqrt(args.batch)))
  md = MinDalle.__new__(MinDalle)
  md.device, md.dtype, md.is_reusable, md.is_verbose = "cpu", torch.float32, True, False
  md.text_token_count, md.layer_count, md.embed_count = 64, layers, d
  md.tokenizer = type("T", (), {"tokenize": lambda self, text, is_verbose=False: list(tokens)})()
  md.encoder, md.decoder = enc, decm
  md.image_grid_from_tokens = lambda image_tokens, is_seamless, is_verbose=False: image_tokens
  import warnings
  warnings.simplefilter("ignore")
  run_ref = lambda: list(md.generate_raw_image_stream("x", seed=1, grid_size=grid_size,
                                                      top_k=256, supercondition_factor=16))
  run_ref()
  t = time.perf_counter()
  run_ref()
  t_ref = time.perf_counter() - t

  model = dalle_mini.DalleMini(text_vocab_size=tv, text_len=64, image_vocab_size=16384,
                               image_embed_size=16385, image_grid=16, start_token=16383,
                               num_layers=layers, d_model=d, num_heads=h, glu_dim=glu)
  params, _ = conv.convert_state_dicts({k: v.numpy() for k, v in enc.state_dict().items()},
                                       {k: v.numpy() for k, v in decm.state_dict().items()}, model)
  dec = decode.DalleMiniDecoder(model)
  n = grid_size ** 2
  text = np.ones((n, 64), np.int32)
  text[:, :len(tokens)] = tokens
  blank = np.ones(64, np.int32)
  blank[:2] = [0, 2]
  sp = decode.SamplingParams(top_k=256, guidance_scale=16.0)
  t_ours = _timed(lambda: decode.generate(dec, params, text, text != 1, rng=jax.random.PRNGKey(1),
                                          sp=sp, uncond_text=blank, uncond_mask=blank != 1,
                                          chunk=256), 1)
  print(f"[3] DALL·E mini dims (d {d}, {layers}+{layers} layers, {n} images, guidance 16, top-k 256):"
        f" min-dalle {t_ref:.2f}s, ours {t_ours:.2f}s -> x{t_ref / t_ours:.1f}")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--text_len", type=int, default=32)
  p.add_argument("--batch", type=int, default=4)
  args = p.parse_args()
  print(f"devices: {jax.devices()}")
  t256 = bench_cache(args)
  bench_growth(args, t256)
  bench_min_dalle(args)


if __name__ == "__main__":
  main()
