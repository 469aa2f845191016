"""VQGAN: encode/decode images/s, decoding vs min-dalle, and the trainer's step with/without remat.

  python -m benchmarks.bench_vqgan [--batch_size 4] [--reps 1] [--presets f8_8192,f16_16384]
                                   [--train_batch 2 --train_ch 32 --train_reps 2] [--no_train]

1. Throughput: random weights at the presets' real dims, 256px, f32, on the
   local default device.
2. For f16_16384 the decoder is also timed against min-dalle's PyTorch
   VQGanDetokenizer (CPU) with the SAME random weights (saved as detoker.pt and
   imported with dalle_jax.convert.vqgan), printing the ratio and max |diff|.
3. The trainer's step (`dalle_jax.train.loop.make_train_step`, jitted with
   shardings and donation as `loop.train` does) for the f16_16384 layout
   (ch_mult 1,1,2,2,4, 2 res blocks, attention at 16x16, 16384 codes, PatchGAN
   + adaptive weight; LPIPS off: it needs local weights) at 256px with the base
   width cut to --train_ch (default 32 instead of 128, so a step takes seconds on
   a CPU while activations, not parameters, still dominate memory), with
   config.remat "none" vs "full" (the task builds the model with
   remat = config.remat != "none", which wraps every ResnetBlock in nn.remat).
   Reports step time, XLA's peak temporary memory of the compiled step
   (`memory_analysis().temp_size_in_bytes`) and the activations JAX saves for the
   backward pass (residuals of jax.vjp of the task's loss).
   Note: XLA:CPU expands the optimization barriers that jax.checkpoint relies on
   and then schedules freely, so on CPU the compiled peak barely moves while the
   saved residuals shrink ~5x; the GPU/TPU compilers keep the barriers.
"""
import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  pylint: disable=g-import-not-at-top


def images_per_s(v):
  return f"{v:7.2f} images/s"


def bench_throughput(args, x):
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from dalle_jax.configs import vqgan as vqgan_configs  # pylint: disable=g-import-not-at-top
  from dalle_jax.models.vqgan import vqgan_from_config  # pylint: disable=g-import-not-at-top

  b = args.batch_size
  rows = []
  for preset in args.presets.split(","):
    config = vqgan_configs.get_config(preset)
    config.dtype = "float32"
    model = vqgan_from_config(config)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), x[:1]))
    enc = jax.jit(lambda v, x: model.apply(v, x, method=model.encode)[1])
    dec = jax.jit(lambda v, c: model.apply(v, c, method=model.decode_codes))
    t_enc, codes = common.timeit_with_output(enc, variables, x, reps=args.reps)
    t_dec = common.timeit(dec, variables, codes, reps=args.reps)
    g = codes.shape[1]
    rows.append([preset, f"{b / t_enc:.2f}", f"{b / t_dec:.2f}", f"{g}x{g}"])
  common.print_table(rows, ["preset", "encode images/s", "decode images/s", "codes"])


def bench_min_dalle(args):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from min_dalle.models.vqgan_detokenizer import VQGanDetokenizer  # pylint: disable=g-import-not-at-top
  from dalle_jax.convert import vqgan as convert_vqgan  # pylint: disable=g-import-not-at-top
  from dalle_jax.models.vqgan import vqgan_from_config  # pylint: disable=g-import-not-at-top

  b = args.batch_size
  torch.manual_seed(0)
  ref = VQGanDetokenizer().eval()
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "detoker.pt")
    torch.save(ref.state_dict(), path)
    config, variables = convert_vqgan.convert(path, "min_dalle")
  model = vqgan_from_config(config)
  variables = {"params": variables["params"]["vqgan"]}
  dec = jax.jit(lambda v, c: model.apply(v, c, method=model.decode_codes))
  codes = np.random.default_rng(0).integers(0, 16384, (b, 16, 16))
  t_ours, ours = common.timeit_with_output(dec, variables, jnp.asarray(codes, jnp.int32), reps=args.reps)
  with torch.inference_mode():
    t_ref, want = common.timeit_with_output(
        lambda: ref.forward(False, torch.from_numpy(codes.reshape(b, 256))), reps=args.reps)
  # min-dalle returns the batch tiled as a uint8-range grid; compare in its own terms
  ours01 = np.clip((np.asarray(ours) + 1) / 2, 0, 1) * 255
  grid = int(np.sqrt(b)) if int(np.sqrt(b)) ** 2 == b else None
  diff = ""
  if grid:
    # min-dalle tiles image a * grid + b at grid row b, column a
    ours_grid = ours01.reshape(grid, grid, 256, 256, 3).transpose(1, 2, 0, 3, 4).reshape(grid * 256, grid * 256, 3)
    diff = f"max|diff| {np.abs(ours_grid - want.numpy()).max():.1e} (0-255 scale)"
  common.ratio_line(
      f"f16_16384 decode vs min-dalle (torch {torch.__version__} CPU, {torch.get_num_threads()} threads)",
      b / t_ours, b / t_ref, ours_label="dalle_jax", theirs_label="min-dalle", fmt=images_per_s,
      lower_is_better=False, extra=diff)


def train_config(args, remat):
  """f16_16384's layout at --train_ch base width, 256px, batch --train_batch."""
  from dalle_jax.configs import vqgan as vqgan_configs  # pylint: disable=g-import-not-at-top
  c = vqgan_configs.get_config("f16_16384")
  c.model.ch = args.train_ch
  c.batch_size = args.train_batch
  c.dtype = "float32"  # CPU: bf16 convolutions are slower than f32
  c.loss.perceptual_weight = 0.0  # LPIPS needs local VGG weights
  c.loss.disc_start = 0  # the GAN terms are computed every step anyway (traced switch)
  c.remat = remat
  return c


def residual_bytes(ts):
  """Bytes JAX keeps for the backward pass of the task's loss (jax.vjp residuals)."""
  import jax  # pylint: disable=g-import-not-at-top
  st = ts.abstract
  rng = jax.random.key(0)
  fn = lambda p: ts.task.loss_fn(p, st.model_state, ts.batch, rng, 0)
  res = jax.eval_shape(lambda p: jax.vjp(fn, p, has_aux=True)[1], st.params)
  return sum(int(np.prod(l.shape)) * np.dtype(l.dtype).itemsize for l in jax.tree.leaves(res))


def bench_train_remat(args):
  results = {}
  for remat in ("none", "full"):
    ts = common.TrainerStep(train_config(args, remat))
    resid = residual_bytes(ts)
    t = ts.time(warmup=1, reps=args.train_reps)
    results[remat] = dict(time=t, temp=ts.temp_bytes, resid=resid, compile=ts.compile_s,
                          flops=ts.xla_flops)
    ts.release()
  c = train_config(args, "none")
  print(f"trainer step, f16_16384 layout with ch={c.model.ch}, {c.data.image_size}px, "
        f"batch {c.batch_size}, {c.dtype}, PatchGAN on, LPIPS off")
  common.print_table(
      [[k, common.fmt_seconds(r["time"]), common.fmt_bytes(r["temp"]), common.fmt_bytes(r["resid"]),
        f"{r['flops'] / 1e9:.0f}" if r["flops"] else "n/a", f"{r['compile']:.0f} s"]
       for k, r in results.items()],
      ["config.remat", "step time", "XLA peak temp", "saved residuals", "XLA GFLOP/step", "compile"])
  none, full = results["none"], results["full"]
  common.ratio_line("trainer step time, remat full vs none (<1: remat slower)",
                    full["time"], none["time"], ours_label="remat", theirs_label="no remat")
  common.ratio_line("trainer peak temp memory (XLA:CPU), remat full vs none (>1: remat saves)",
                    full["temp"], none["temp"], ours_label="remat", theirs_label="no remat",
                    fmt=common.fmt_bytes)
  common.ratio_line("trainer saved activations (jax residuals), remat full vs none (>1: remat saves)",
                    full["resid"], none["resid"], ours_label="remat", theirs_label="no remat",
                    fmt=common.fmt_bytes)
  if none["temp"] and full["temp"] and full["temp"] > 0.9 * none["temp"]:
    print("  note: XLA:CPU drops jax.checkpoint's optimization barriers, so its compiled peak "
          "ignores remat; the residual bytes are what GPU/TPU buffer assignment sees.")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch_size", type=int, default=4, help="a square number (min-dalle tiles its batch into a square grid)")
  p.add_argument("--reps", type=int, default=1)
  p.add_argument("--presets", default="f8_8192,f16_16384")
  p.add_argument("--no_torch", action="store_true", help="skip the min-dalle comparison")
  p.add_argument("--no_train", action="store_true", help="skip the trainer remat comparison")
  p.add_argument("--train_batch", type=int, default=2)
  p.add_argument("--train_ch", type=int, default=32, help="base width (f16_16384: 128)")
  p.add_argument("--train_reps", type=int, default=1, help="timed steps after one warm-up step")
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  b = args.batch_size
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, batch {b}, 256px, f32, "
        f"median of {args.reps} after a warm-up", flush=True)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (b, 256, 256, 3)).astype(np.float32))
  bench_throughput(args, x)
  if not args.no_torch and "f16_16384" in args.presets:
    bench_min_dalle(args)
  if not args.no_train:
    bench_train_remat(args)


if __name__ == "__main__":
  main()
