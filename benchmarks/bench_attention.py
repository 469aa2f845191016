"""Attention implementations on this machine: forward + backward time per call.

    python -m benchmarks.bench_attention [--lengths 256,1024] [--dtypes bfloat16,float32]

For each length T and compute dtype: causal self-attention, batch 4, 8 heads of
64 (a small DALL·E layer's geometry), loss = sum(w * attention(q, k, v)) and its
gradients, jitted; every implementation that runs here (see dalle_jax.models.layers:
xla = ours with the hand-written backward pass, dot_product_attention = jax.nn's
XLA implementation; cudnn on a GPU, splash on a TPU). The ratio line is xla's
speed over dot_product_attention's (> 1: ours faster, as the CPU default).
"""
import argparse
import statistics

from benchmarks import common


def main(argv=None):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dalle_jax.models import layers  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="256,1024")
  parser.add_argument("--dtypes", default="bfloat16,float32")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--reps", type=int, default=3)
  args = parser.parse_args(argv)

  impls = ["xla", "dot_product_attention"]
  backend = jax.default_backend()
  if backend == "gpu":
    impls.append("cudnn")
  if backend == "tpu":
    impls.append("splash")
  print(f"[attention] backend {backend}, batch {args.batch}, {args.heads} heads x "
        f"{args.head_dim}, causal, forward + backward (min of {args.reps})")
  ratios = []
  for t in [int(x) for x in args.lengths.split(",")]:
    for dt in args.dtypes.split(","):
      dtype = jnp.dtype(dt)
      shape = (args.batch, t, args.heads, args.head_dim)
      q, k, v, w = (jax.random.normal(jax.random.PRNGKey(i), shape) for i in range(4))
      mask = layers.AttentionMask(causal=True)
      times = {}
      for impl in impls:
        loss = lambda q, k, v, impl=impl: jnp.sum(
            w * layers.dot_product_attention(q, k, v, mask, dtype, impl=impl).astype(jnp.float32))
        step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
        times[impl] = common.timeit(step, q, k, v, reps=args.reps, stat=min)
      logits_mib = args.batch * args.heads * t * t * 4 / 2**20
      print(f"  T={t:5d} {dt:8s} " + "  ".join(f"{i}: {1e3 * s:8.1f} ms" for i, s in times.items())
            + f"   (f32 logits: {logits_mib:.0f} MiB)")
      ratios.append(times["dot_product_attention"] / times["xla"])
  print(f"[attention] ratio xla / dot_product_attention speed: "
        f"{statistics.geometric_mean(ratios):.2f} (geometric mean; > 1: the CPU default is faster)")


if __name__ == "__main__":
  main()
