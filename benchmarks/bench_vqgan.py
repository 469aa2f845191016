"""VQGAN throughput: encode/decode images/s (f8_8192, f16_16384) and decoding vs min-dalle.

  python -m benchmarks.bench_vqgan [--batch_size 4] [--reps 1] [--presets f8_8192,f16_16384]

Random weights at the presets' real dims, 256px, f32, on the local default
device. For f16_16384 the decoder is also timed against min-dalle's PyTorch
VQGanDetokenizer (CPU) with the SAME random weights (saved as detoker.pt and
imported with dalle_jax.convert.vqgan), printing the ratio and max |diff|.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(fn, reps):
  fn()  # warm-up / compile
  t = time.perf_counter()
  for _ in range(reps):
    out = fn()
  return (time.perf_counter() - t) / reps, out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch_size", type=int, default=4, help="a square number (min-dalle tiles its batch into a square grid)")
  p.add_argument("--reps", type=int, default=1)
  p.add_argument("--presets", default="f8_8192,f16_16384")
  p.add_argument("--no_torch", action="store_true", help="skip the min-dalle comparison")
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from configs import vqgan as vqgan_configs  # pylint: disable=g-import-not-at-top
  from dalle_jax.models.vqgan import vqgan_from_config  # pylint: disable=g-import-not-at-top

  b = args.batch_size
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, batch {b}, 256px, f32")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (b, 256, 256, 3)).astype(np.float32))
  for preset in args.presets.split(","):
    config = vqgan_configs.get_config(preset)
    config.dtype = "float32"
    model = vqgan_from_config(config)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), x[:1]))
    enc = jax.jit(lambda v, x: model.apply(v, x, method=model.encode)[1])
    dec = jax.jit(lambda v, c: model.apply(v, c, method=model.decode_codes))
    t_enc, codes = timed(lambda: jax.block_until_ready(enc(variables, x)), args.reps)
    t_dec, _ = timed(lambda: jax.block_until_ready(dec(variables, codes)), args.reps)
    g = codes.shape[1]
    print(f"{preset}: encode {b / t_enc:7.2f} images/s   decode {b / t_dec:7.2f} images/s   "
          f"({g}x{g} codes)")

  if args.no_torch or "f16_16384" not in args.presets:
    return
  import torch  # pylint: disable=g-import-not-at-top
  from min_dalle.models.vqgan_detokenizer import VQGanDetokenizer  # pylint: disable=g-import-not-at-top
  from dalle_jax.convert import vqgan as convert_vqgan  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  ref = VQGanDetokenizer().eval()
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "detoker.pt")
    torch.save(ref.state_dict(), path)
    config, variables = convert_vqgan.convert(path, "min_dalle")
  model = vqgan_from_config(config)
  variables = {"params": variables["params"]["vqgan"]}
  dec = jax.jit(lambda v, c: model.apply(v, c, method=model.decode_codes))
  codes = rng.integers(0, 16384, (b, 16, 16))
  t_ours, ours = timed(lambda: jax.block_until_ready(dec(variables, jnp.asarray(codes, jnp.int32))), args.reps)
  with torch.inference_mode():
    t_ref, want = timed(lambda: ref.forward(False, torch.from_numpy(codes.reshape(b, 256))), args.reps)
  # min-dalle returns the batch tiled as a uint8-range grid; compare in its own terms
  ours01 = np.clip((np.asarray(ours) + 1) / 2, 0, 1) * 255
  grid = int(np.sqrt(b)) if int(np.sqrt(b)) ** 2 == b else None
  diff = ""
  if grid:
    ours_grid = ours01.reshape(grid, grid, 256, 256, 3).transpose(0, 2, 1, 3, 4).reshape(grid * 256, grid * 256, 3)
    diff = f"   max|diff| {np.abs(ours_grid - want.numpy()).max():.1e} (0-255 scale)"
  print(f"f16_16384 decode vs min-dalle (torch {torch.__version__} CPU, {torch.get_num_threads()} threads): "
        f"dalle_jax {b / t_ours:7.2f} images/s   min-dalle {b / t_ref:7.2f} images/s   "
        f"ratio {t_ref / t_ours:.2f}x{diff}")


if __name__ == "__main__":
  main()
