"""Sampling speed of the autoregressive models (CPU-sized by default).

    python benchmarks/bench_dalle.py [--layers 4 --d_model 256 --batch 4]

Prints:
  1. image tokens/s with the KV cache vs recomputing the whole prefix each step
     (DALL·E layout, 16x16 codes, --dtype compute), and their ratio;
  2. time per batch for 256 -> 1024 codes with the cache, the two sizes timed in
     alternation (target: 1024-code time / 256-code time <= 4.5; the cache grows
     in blocks, so attention reads grow with the filled part only), the decode
     step's cost split into a fixed part and one per cached position, and the
     same for the paper's sparse attention (keys gathered vs dense masks);
  3. ours vs min-dalle (PyTorch, CPU) at identical small DALL·E mini dimensions,
     batch and guidance (the reference loop re-run token by token in Python; its
     first --ref_tokens tokens timed in 32-token chunks, the median chunk x 8 taken
     as its 256-token time: its per-token cost is constant).
  4. the trainer's step for the `dalle` layout (built as dalle_jax.train.loop.train
     builds it: task, optimizer, sharded state, donated jit) at d_model 512 (--train_d_model),
     --train_layers layers, 32 text + 16x16 image tokens, batch 8, in bfloat16 and
     float32: step time, FLOPs/step from the task's flops_per_example() x batch and
     from XLA's cost analysis, and MFU = achieved FLOP/s / the measured bf16 matmul
     peak of this host (dalle_jax.train.metrics.measure_matmul_flops), target >= 50%.
     Both the step and the peak are the best of several runs (the median step too).
  5. the paper's sparse patterns (row, column, conv) at its 256 + 32x32 stream: one
     attention layer's forward + backward, block-sparse vs dense masking.
Sampling timings are the best of --reps runs; all exclude
compilation (one warm-up call each), except eager PyTorch (no warm-up).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from dalle_jax.models import dalle, dalle_mini, layers  # noqa: E402
from dalle_jax.sampling import decode  # noqa: E402


def _timed(fn, repeats=3):
  """Best of `repeats` after one warm-up call (min: robust to a shared host's noise)."""
  return common.timeit(fn, warmup=1, reps=repeats, stat=min)


def _dalle(args, grid, **model_kw):
  model = dalle.DalleTransformer(
      text_vocab_size=1000, text_len=args.text_len, image_vocab_size=8192, image_grid=grid,
      num_layers=args.layers, d_model=args.d_model, num_heads=args.heads,
      dtype=layers.dtype_from_name(args.dtype), **model_kw)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, args.text_len), jnp.int32),
                               jnp.zeros((1, grid * grid), jnp.int32))["params"]
  return decode.DalleDecoder(model), jax.tree.map(lambda x: getattr(x, "value", x), params)


def _sampler(args, grid, **model_kw):
  dec, params = _dalle(args, grid, **model_kw)
  text = np.random.RandomState(0).randint(0, 1000, (args.batch, args.text_len)).astype(np.int32)
  mask = np.ones_like(text, bool)
  sp = decode.SamplingParams(top_k=64)
  n = grid * grid
  run = lambda: decode.generate(dec, params, text, mask, rng=jax.random.PRNGKey(0), sp=sp,
                                chunk=n)
  return dec, params, text, mask, sp, run


def bench_cache(args):
  dec, params, text, mask, sp, cached = _sampler(args, 16)
  t_cached = _timed(cached, args.reps)
  # One warm-up call compiles the (cached) recompute loop; then time one call.
  nocache = common.timeit(lambda: decode.generate_no_cache(dec, params, text, mask,
                                                           rng=jax.random.PRNGKey(0), sp=sp),
                          warmup=1, reps=1)
  n = args.batch * dec.num_codes
  common.ratio_line("[1] sampling 16x16 codes, KV cache vs recomputing the prefix", n / t_cached,
                    n / nocache, ours_label="KV cache", theirs_label="recompute",
                    fmt=lambda v: f"{v:9.1f} image tok/s", lower_is_better=False)


def _interleaved(runs, reps):
  """min seconds per run, the runs timed in alternation after one compiling call
  each: on a shared host slow phases then hit all of them alike."""
  times = {k: [] for k in runs}
  for run in runs.values():
    common.block(run())
  for _ in range(reps):
    for k, run in runs.items():
      t = time.perf_counter()
      common.block(run())
      times[k].append(time.perf_counter() - t)
  return {k: min(v) for k, v in times.items()}


def bench_growth(args):
  """256 vs 1024 codes (min of --reps each, interleaved), full attention; then the
  paper's sparse attention, its decode steps gathering each layer's keys from
  the cache vs applying the masks to the whole cache."""
  t = _interleaved({g: _sampler(args, g)[-1] for g in (16, 32)}, args.reps)
  ratio = t[32] / t[16]
  print(f"[2] 256 codes: {t[16]:.2f}s, 1024 codes: {t[32]:.2f}s per batch of {args.batch}"
        f" (min of {args.reps}) -> time ratio x{ratio:.2f} for x4 tokens", flush=True)
  common.ratio_line("[2] 1024/256-code time ratio vs the <=4.5 target", ratio, 4.5,
                    ours_label="ratio", theirs_label="target", fmt=lambda v: f"{v:.2f}",
                    extra="(met)" if ratio <= 4.5 else "(NOT met)")
  _growth_model(args)
  t = _interleaved({(g, blocks): _sampler(args, g, attention="sparse", sparse_blocks=blocks)[-1]
                    for g in (16, 32) for blocks in (True, False)}, args.reps)
  sparse_ratio = t[(32, True)] / t[(16, True)]
  common.ratio_line("[2] sparse attention (row/column/conv layers), 1024 codes, keys gathered "
                    "from the cache vs dense masks", t[(32, True)], t[(32, False)],
                    ours_label="gathered", theirs_label="dense masks")
  common.ratio_line("[2] sparse attention, 1024/256-code time ratio vs the <=4.5 target",
                    sparse_ratio, 4.5, ours_label="ratio", theirs_label="target",
                    fmt=lambda v: f"{v:.2f}", extra=("(met)" if sparse_ratio <= 4.5 else
                                                     "(NOT met)") + f"; dense masks: "
                    f"{t[(32, False)] / t[(16, False)]:.2f}")


def _step_ms(dec, params, text, mask, sp, length, steps, reps):
  """ms per decode step of the compiled sampling loop with a fixed cache of `length`."""
  prefill, chunk, _ = decode._compiled(dec, sp)  # pylint: disable=protected-access
  params = decode.compute_dtype_params(dec, params)
  text, mask = jnp.asarray(text), jnp.asarray(mask)
  logits, kv = prefill(params, text, mask,
                       dec.init_cache(text.shape[0], length, decode.default_kv_dtype()))
  state = (kv, logits, jnp.zeros((text.shape[0], dec.num_codes), jnp.int32))
  run = lambda: chunk(params, state, mask, jax.random.PRNGKey(0), jnp.int32(0), jnp.int32(steps))
  return 1e3 * _timed(run, reps) / steps


def _growth_model(args):
  """Why the ratio is what it is: a decode step costs a + b * (cache length).
  a (weights, sampling, dispatch) is the same for both sizes; b is the attention
  reading the K/V cache, which grows with every code. Measured on the 32x32 model
  at two fixed cache lengths, then summed over each size's positions as if the
  cache held exactly the filled positions (the lower bound block growth tends to)."""
  dec, params, text, mask, sp, _ = _sampler(args, 32)
  lo, hi = dec.prefix_len + 64, dec.max_cache_len
  c_lo = _step_ms(dec, params, text, mask, sp, lo, 64, args.reps)
  c_hi = _step_ms(dec, params, text, mask, sp, hi, 64, args.reps)
  b = max(c_hi - c_lo, 0.0) / (hi - lo)  # ms per cached position
  a = c_lo - b * lo
  total = lambda n: sum(a + b * (dec.prefix_len + j + 1) for j in range(n - 1))
  bound = total(1024) / total(256)
  kv_bytes = 2 * args.layers * args.batch * args.d_model * jnp.dtype(
      decode.default_kv_dtype() or args.dtype).itemsize
  print(f"[2] decode step = {a:.3f} ms + {1e3 * b:.2f} us x cache length (measured at "
        f"{lo} and {hi} positions: {c_lo:.3f} / {c_hi:.3f} ms); the K/V cache holds "
        f"{kv_bytes / 1024:.0f} KiB per position -> attention streams it at "
        f"{kv_bytes / (b * 1e-3) / 1e9 if b else float('inf'):.1f} GB/s", flush=True)
  print(f"[2] that cost model with exact-length attention gives a 1024/256 ratio of "
        f"{bound:.2f} (a constant per-step cost would give {1023 / 255:.2f}): the ratio "
        f"falls only if b shrinks relative to a", flush=True)


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
  # min-dalle's per-token cost is constant (it attends over a fixed 256-slot state and
  # sorts all 16384 logits every step), so by default only its first --ref_tokens
  # tokens are run, timed per 32-token chunk (its progressive outputs), and the
  # median chunk scaled to 256 tokens: robust to the large swings a 2-thread
  # PyTorch loop shows on a shared CPU.
  ref_tokens = min(256, max(32, args.ref_tokens // 32 * 32))
  chunks = []
  t = time.perf_counter()
  for i, _ in enumerate(md.generate_raw_image_stream("x", seed=1, grid_size=grid_size, top_k=256,
                                                     supercondition_factor=16,
                                                     progressive_outputs=True)):
    chunks.append(time.perf_counter() - t)  # eager PyTorch: no compilation to warm up
    t = time.perf_counter()
    if 32 * (i + 1) >= ref_tokens:
      break
  t_ref = sum(chunks) if ref_tokens == 256 else float(np.median(chunks)) * 8

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
                                          chunk=256), args.reps)
  common.ratio_line(f"[3] DALL·E mini dims (d {d}, {layers}+{layers} layers, {n} images, guidance 16,"
                    f" top-k 256), ours vs min-dalle", t_ours, t_ref, ours_label="dalle_jax",
                    theirs_label="min-dalle", extra="" if ref_tokens == 256 else
                    f"(min-dalle: median of {len(chunks)} 32-token chunks x 8)")


def train_config(args, dtype):
  """configs/dalle.py:shapes scaled up: d --train_d_model (512), 32 text + 16x16 codes
  (8192), batch --train_batch (8)."""
  from dalle_jax.configs import dalle as dalle_configs  # pylint: disable=g-import-not-at-top
  c = dalle_configs.get_config("shapes")
  c.model.update(text_vocab_size=4096, text_len=32, image_vocab_size=8192, image_grid=16,
                 num_layers=args.train_layers, d_model=args.train_d_model,
                 num_heads=args.train_d_model // 64, mlp_dim=4 * args.train_d_model)
  c.text.max_len = 32
  c.blank_caption_prob = 0.0  # caption dropout needs a tokenizer; it costs no FLOPs
  c.data.dataset = ""  # no encoded records: the model dims above stand
  c.batch_size = args.train_batch
  c.dtype = dtype
  return c


def bench_train_mfu(args):
  from dalle_jax.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  peak = metrics_lib.measure_matmul_flops()  # bf16 inputs, f32 accumulation
  peak_f32 = metrics_lib.measure_matmul_flops(dtype="float32")
  rows, mfus = [], {}
  for dtype in ("bfloat16", "float32"):
    c = train_config(args, dtype)
    ts = common.TrainerStep(c)
    # best of N, like the peak it is divided by: a shared host's slow phases
    # inflate single steps by 30% and more; the median is printed beside it
    times = ts.time(warmup=1, reps=args.train_reps, stat=list)  # every timed step
    t, t_med = min(times), statistics.median(times)
    task_flops = ts.task.flops_per_example() * c.batch_size
    xla_flops = ts.xla_flops
    tokens = ts.task.tokens_per_example() * c.batch_size
    mfus[dtype] = mfu = task_flops / t / peak
    rows.append([dtype, common.fmt_seconds(t), common.fmt_seconds(t_med), f"{tokens / t:.0f}", f"{task_flops / 1e9:.1f}",
                 f"{xla_flops / 1e9:.1f}" if xla_flops else "n/a", f"{task_flops / t / 1e9:.1f}",
                 f"{100 * mfu:.1f}%", f"{100 * xla_flops / t / peak:.1f}%" if xla_flops else "n/a",
                 f"{ts.compile_s:.0f} s"])
    ts.release()
  m = train_config(args, "float32").model
  common.print_table(rows, ["dtype", "step (best)", "median", "tokens/s", "task GFLOP", "XLA GFLOP", "GFLOP/s",
                            "MFU", "MFU (XLA)", "compile"],
                     title=f"[4] trainer step, dalle layout: {m.num_layers} layers, d {m.d_model}, "
                           f"{m.text_len}+{m.image_grid}x{m.image_grid} tokens, batch "
                           f"{args.train_batch}; peak = measured bf16 matmul "
                           f"{peak / 1e9:.1f} GFLOP/s (f32: {peak_f32 / 1e9:.1f})")
  pct = lambda v: f"{100 * v:.1f}%"
  for dtype, mfu in mfus.items():
    common.ratio_line(f"[4] dalle train-step MFU ({dtype}) vs the >=50% target", mfu, 0.5,
                      ours_label="MFU", theirs_label="target", fmt=pct, lower_is_better=False,
                      extra="(met)" if mfu >= 0.5 else "(NOT met)")


def bench_sparse(args):
  """[5] the paper's sparse patterns at its stream (256 text + 32x32 codes): one
  attention layer's forward + backward, block-sparse vs dense masking."""
  from dalle_jax.models import dalle as dalle_lib  # pylint: disable=g-import-not-at-top
  text_len, grid, b, h, k = 256, 32, 2, 8, 64
  t = text_len + grid * grid
  pats = ("row", "column", "conv")
  dense = dalle_lib.attention_masks(text_len, grid, grid, pats, 11)
  layouts = dalle_lib.sparse_layouts(text_len, grid, pats, 11)
  key = jax.random.PRNGKey(0)
  q, kk, v = (jax.random.normal(jax.random.fold_in(key, i), (b, t, h, k), jnp.bfloat16)
              for i in range(3))
  w = jax.random.normal(key, (b, t, h, k), jnp.float32)
  grad = lambda mask: jax.jit(jax.grad(lambda q, k, v: jnp.sum(w * layers.dot_product_attention(
      q, k, v, mask, jnp.bfloat16).astype(jnp.float32)), (0, 1, 2)))
  for name, m, lay in zip(pats, dense, layouts):
    t_dense = _timed(lambda f=grad(jnp.asarray(m)): f(q, kk, v), args.reps)
    t_sparse = _timed(lambda f=grad(lay): f(q, kk, v), args.reps)
    common.ratio_line(f"[5] {name} attention fwd+bwd, {text_len}+{grid}x{grid} stream, batch {b}, "
                      f"{h}x{k} heads, block-sparse ({lay.keys_per_query} of {t} keys/query) vs "
                      f"dense mask", t_sparse, t_dense, ours_label="block-sparse",
                      theirs_label="dense")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--text_len", type=int, default=32)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--train_layers", type=int, default=4)
  p.add_argument("--train_batch", type=int, default=8)
  p.add_argument("--train_d_model", type=int, default=512,
                 help="[4] width (heads of 64, MLP 4x); wider models spend more of the step in matmuls")
  p.add_argument("--train_reps", type=int, default=5, help="[4] timed steps (best and median)")
  p.add_argument("--dtype", default="bfloat16",
                 help="compute dtype of the [1]/[2] models (the configs' default: bfloat16)")
  p.add_argument("--reps", type=int, default=3, help="timed runs per sampling measurement (min)")
  p.add_argument("--ref_tokens", type=int, default=96,
                 help="min-dalle tokens timed in [3] (multiple of 32; 256 = the whole image)")
  p.add_argument("--only", default="1,2,3,4,5", help="which sections to run")
  args = p.parse_args()
  print(f"devices: {jax.devices()}")
  only = set(args.only.split(","))
  if "1" in only:
    bench_cache(args)
  if "2" in only:
    bench_growth(args)
  if "3" in only:
    bench_min_dalle(args)
  if "4" in only:
    bench_train_mfu(args)
  if "5" in only:
    bench_sparse(args)


if __name__ == "__main__":
  main()
