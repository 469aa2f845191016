"""Inception feature extraction (FID's network at 299 px): dalle_jax vs pytorch-fid, images/s.

  python -m benchmarks.bench_evaluate [--batch_size 16] [--reps 3]

Both sides run the SAME random FID Inception (pytorch-fid's own blocks, made in the reference
env and imported with dalle_jax.convert.inception), float32, at the same batch, on this machine's
CPU (pytorch-fid in its isolated env .venv-ref: `make ref-env`; see tests/reference_env.py).
Ours is timed on one device — the JAX default device, the same silicon torch uses — including
the resize from 64 px and the device->host copy of the features; pytorch-fid's forward on an
already-resized batch. Best of --reps after a warm-up; prints images/s each and the ratio
(ours / pytorch-fid; > 1 means ours is faster).
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--reps", type=int, default=3)
  args = p.parse_args(argv)
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import reference_env  # pylint: disable=g-import-not-at-top
  reason = reference_env.usable()
  if reason:
    print(f"skipped: pytorch-fid reference env unavailable: {reason}")
    return
  import jax  # pylint: disable=g-import-not-at-top
  from dalle_jax.convert import inception as conv  # pylint: disable=g-import-not-at-top
  from dalle_jax.evaluate import features as feat_lib  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    pth = os.path.join(tmp, "w.pth")
    script = os.path.join(ROOT, "tests", "ref_pytorch_fid.py")
    py = str(reference_env.python())
    subprocess.run([py, script, "weights", "--out", pth], check=True)
    ref = subprocess.run([py, script, "bench", "--weights", pth, "--batch_size",
                          str(args.batch_size), "--iters", str(args.reps)],
                         check=True, capture_output=True, text=True).stdout
    theirs = float(ref.split("IMAGES_PER_SEC")[1].split()[0])
    ext = feat_lib.InceptionExtractor(conv.load_inception_params(pth), "legacy_pytorch",
                                      args.batch_size, mesh=feat_lib.data_mesh(jax.devices()[:1]))
  images = np.random.default_rng(0).integers(0, 256, (args.batch_size, 64, 64, 3), np.uint8)
  seconds = common.timeit(ext, images, warmup=1, reps=args.reps, stat=min)
  ours = args.batch_size / seconds
  print(f"batch {args.batch_size}, {jax.devices()[0].platform} ({os.cpu_count()} cores); "
        f"pytorch-fid: {ref.strip()}")
  common.ratio_line("Inception features (images/s)", ours, theirs, theirs_label="pytorch-fid",
                    fmt=lambda v: f"{v:.2f} img/s", lower_is_better=False)


if __name__ == "__main__":
  main()
