"""The cost of `evaluate generate` + FID for 1k samples of each `shapes` model.

  python -m benchmarks.bench_generate [--num 1000] [--families ar,diffusion,cascade]
      [--dalle W --diffusion W --cascade W1,W2] [--sample_batch_size 64]

What `python -m dalle_jax.evaluate generate --score fid` runs, through the same library calls
(evaluate.generate: load_sampler, Scorer, sample_and_score): --num shapes test captions sampled
in calls of --sample_batch_size (seed + k), each chunk's uint8 images streamed into the
sharded Inception extraction (float64 sums), then the Fréchet distance to reference statistics.

Models: the `shapes` presets at their full size — ar: configs/dalle.py:shapes + its VQGAN
(configs/vqgan.py:shapes), diffusion: configs/diffusion.py:shapes (16 px, DDIM 25 steps,
guidance 3, its config.sampling), cascade: configs/imagen.py shapes_base16 -> shapes_sr32
(16 -> 32 px). Trained workdirs when given (--dalle, --diffusion, --cascade), otherwise random
weights at the presets' shapes: the cost does not depend on training. Inception: random
weights at pytorch-fid's shapes (the network's cost, not its values, is measured); the
reference statistics are random too.

Per family: the load, the first call (compilation of the sampler and of Inception at this
batch), then the timed run of --num samples split into sampling and FID-feature seconds;
prints images/s and seconds per 1k samples (the run's own, and the steady state scaled to 1k).
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  pylint: disable=g-import-not-at-top

FAMILIES = ("ar", "diffusion", "cascade")


def shapes_captions(num, split="test"):
  from dalle_jax.data import shapes  # pylint: disable=g-import-not-at-top
  return [shapes.make_example(i, split, 32)["caption"] for i in range(num)]


def _random(init, dummy, scale, seed=0):
  """Random weights (ones for norm scales) at a model's abstract shapes: no init compile."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  shapes = nn.meta.unbox(jax.eval_shape(init, jax.random.PRNGKey(0), dummy))
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, s: (np.ones(s.shape, s.dtype) if "scale" in jax.tree_util.keystr(p) else
                    (scale * rng.standard_normal(s.shape)).astype(s.dtype)), shapes)


def _tokenizer(path, vocab_size):
  from dalle_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  return tokenizers.train_sentencepiece(shapes_captions(2000, "train"),
                                        os.path.join(path, "sp.model"), vocab_size)


def random_ar(root):
  """A random configs/dalle.py:shapes checkpoint (and its random shapes VQGAN)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dalle_jax.configs import dalle as dalle_cfg  # pylint: disable=g-import-not-at-top
  from dalle_jax.configs import vqgan as vqgan_cfg  # pylint: disable=g-import-not-at-top
  from dalle_jax.models import dalle  # pylint: disable=g-import-not-at-top
  from dalle_jax.tasks import vqgan as vq_task  # pylint: disable=g-import-not-at-top
  from dalle_jax.train import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  vq_config = vqgan_cfg.get_config("shapes")
  vq_config.loss.disc_weight = 0.0  # the VQGAN alone (no discriminator to initialise)
  vq = vq_task.VQGANTask(vq_config)
  ckpt.save_imported(f"{root}/vqgan", vq_config, _random(vq.init, vq.dummy_batch(1), 0.05))
  path = f"{root}/ar"
  tok = _tokenizer(path, 128)
  config = dalle_cfg.get_config("shapes")
  config.model.text_vocab_size = tok.vocab_size
  config.text.path = "sp.model"
  config.vqgan = f"{root}/vqgan"
  model = dalle.from_config(config.model, dtype=config.dtype)
  t, n = config.model.text_len, config.model.image_grid ** 2
  variables = _random(lambda rng, x: model.init(rng, *x),
                      (jnp.zeros((1, t), jnp.int32), jnp.zeros((1, n), jnp.int32)), 0.02)
  ckpt.save_imported(path, config, variables)
  return path


def _random_diffusion(path, config, seed=0):
  from dalle_jax.tasks import diffusion as diffusion_task  # pylint: disable=g-import-not-at-top
  from dalle_jax.train import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  tok = _tokenizer(path, 128)
  config.text.update(vocab_size=tok.vocab_size, path="sp.model")
  task = diffusion_task.DiffusionTask(config)
  ckpt.save_imported(path, config, _random(task.init, task.dummy_batch(1), 0.05, seed))
  return path


def random_diffusion(root):
  from dalle_jax.configs import diffusion as diffusion_cfg  # pylint: disable=g-import-not-at-top
  return _random_diffusion(f"{root}/diffusion", diffusion_cfg.get_config("shapes"))


def random_cascade(root):
  from dalle_jax.configs import imagen as imagen_cfg  # pylint: disable=g-import-not-at-top
  return ",".join(_random_diffusion(f"{root}/{name}", imagen_cfg.get_config(name), seed)
                  for seed, name in enumerate(("shapes_base16", "shapes_sr32")))


def random_inception_params(seed=0):
  """Random weights at pytorch-fid's FID Inception shapes (He-scaled convs, unit BatchNorm)."""
  import flax  # pylint: disable=g-import-not-at-top
  from dalle_jax.convert import inception as conv  # pylint: disable=g-import-not-at-top
  flat = conv.random_weights(seed)
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


class TimedScorer:
  """evaluate.generate.Scorer with the seconds of its updates (Inception features) counted."""

  def __init__(self, scorer):
    self.scorer, self.seconds = scorer, 0.0

  def update(self, images, captions):
    t = time.perf_counter()
    self.scorer.update(images, captions)
    self.seconds += time.perf_counter() - t


class TimedSampler:
  def __init__(self, sampler):
    self.sampler, self.seconds = sampler, 0.0

  def __call__(self, captions, seed):
    t = time.perf_counter()
    out = self.sampler(captions, seed)  # numpy: the call has finished
    self.seconds += time.perf_counter() - t
    return out


def bench_family(family, path, captions, batch, extractor, real, mesh):
  from dalle_jax.evaluate import generate as gen_lib  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  sampler = gen_lib.load_sampler(family, path, mesh=mesh)
  load_s = time.perf_counter() - t
  t = time.perf_counter()  # first call: compiles the sampler (and Inception at this batch)
  warm = gen_lib.Scorer(extractor, real)
  gen_lib.sample_and_score(sampler, captions[:batch], 10_000, batch, warm)
  first_s = time.perf_counter() - t
  timed_sampler = TimedSampler(sampler)
  scorer = TimedScorer(gen_lib.Scorer(extractor, real))
  t = time.perf_counter()
  gen_lib.sample_and_score(timed_sampler, captions, 0, batch, scorer)
  fid = scorer.scorer.result()["fid"]
  total_s = time.perf_counter() - t
  fd_s = total_s - timed_sampler.seconds - scorer.seconds  # padding, Fréchet distance
  n = len(captions)
  assert fid["n"] == n and np.isfinite(fid["value"])
  return dict(family=family, n=n, load_s=load_s, first_call_s=first_s,
              sample_s=timed_sampler.seconds, fid_features_s=scorer.seconds, other_s=fd_s,
              total_s=total_s)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--num", type=int, default=1000, help="samples per family (captions)")
  p.add_argument("--families", default=",".join(FAMILIES))
  p.add_argument("--sample_batch_size", type=int, default=64)
  p.add_argument("--inception_batch_size", type=int, default=64)
  p.add_argument("--dalle", default=None, help="trained DALL-E workdir (default: random)")
  p.add_argument("--diffusion", default=None, help="trained diffusion workdir")
  p.add_argument("--cascade", default=None, help="trained stages W1,W2 (base first)")
  args = p.parse_args(argv)
  families = [f.strip() for f in args.families.split(",") if f.strip()]
  bad = [f for f in families if f not in FAMILIES]
  if bad or args.num < 1 or args.sample_batch_size < 1:
    sys.exit(f"error: --families {args.families} (choose from {','.join(FAMILIES)}), "
             f"--num {args.num}, --sample_batch_size {args.sample_batch_size} (>= 1)")
  import jax  # pylint: disable=g-import-not-at-top
  from dalle_jax.evaluate import features as feat_lib  # pylint: disable=g-import-not-at-top
  from dalle_jax.models import inception  # pylint: disable=g-import-not-at-top
  from dalle_jax.sampling import generate as ar_lib  # pylint: disable=g-import-not-at-top
  mesh = ar_lib.mesh_from_flag("-1,1,1")
  captions = shapes_captions(args.num)
  extractor = feat_lib.InceptionExtractor(random_inception_params(), "legacy_pytorch",
                                          args.inception_batch_size)
  a = np.random.default_rng(0).normal(size=(inception.POOL_DIM, 64))
  real = (a[:, 0], a @ a.T / 64)
  given = {"ar": args.dalle, "diffusion": args.diffusion, "cascade": args.cascade}
  makers = {"ar": random_ar, "diffusion": random_diffusion, "cascade": random_cascade}
  print(f"{args.num} shapes test captions per family, sampling batch {args.sample_batch_size}, "
        f"Inception batch {extractor.batch_size}, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), {os.cpu_count()} cores", flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for family in families:
      path = given[family] or makers[family](tmp)
      r = bench_family(family, path, captions, args.sample_batch_size, extractor, real, mesh)
      r["weights"] = "trained" if given[family] else "random"
      rows.append(r)
      steady = r["sample_s"] + r["fid_features_s"]
      print(f"{family}: generate + FID of {r['n']} samples ({r['weights']} weights): "
            f"{r['n'] / r['total_s']:.2f} images/s, {1000 * r['total_s'] / r['n']:.1f} s per 1k "
            f"(sampling {1000 * r['sample_s'] / r['n']:.1f} s + FID features "
            f"{1000 * r['fid_features_s'] / r['n']:.1f} s per 1k; steady {steady:.1f} s); "
            f"load {r['load_s']:.1f} s, first call (compiles) {r['first_call_s']:.1f} s",
            flush=True)
  common.print_table(
      [(r["family"], r["weights"], r["n"], r["n"] / r["total_s"], 1000 * r["total_s"] / r["n"],
        1000 * r["sample_s"] / r["n"], 1000 * r["fid_features_s"] / r["n"], r["first_call_s"])
       for r in rows],
      ["family", "weights", "N", "images/s", "s per 1k", "sampling s/1k", "FID feat. s/1k",
       "compile s"], title="\ngenerate + FID (evaluate.generate's library path)")


if __name__ == "__main__":
  main()
