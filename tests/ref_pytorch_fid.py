"""Runs pytorch-fid itself, inside the reference env (.venv-ref; see tests/reference_env.py).

Not a test module: tests/test_inception.py and benchmarks/bench_evaluate.py call it in a
subprocess of .venv-ref/bin/python, which holds torch + torchvision + pytorch-fid 0.3.0.

  weights  --out W.pth --seed S [--calibrate X.npz]
                                      random FID Inception (pytorch-fid's blocks) saved as a
                                      state dict like pt_inception-*.pth; BatchNorm statistics
                                      are measured on X['arr_0'] (else smooth random images), so
                                      features of such images are O(1)
  features --weights W --images X.npz --out F.npz
                                      pytorch-fid's InceptionV3 on X['arr_0'] (uint8 NHWC):
                                      pool (N, 2048) and fc logits (N, 1008)
  fid      --weights W --dirs A B [--batch_size N]
                                      pytorch-fid's calculate_fid_given_paths; prints 'FID x'
  parity   --out DIR --seed S --images X.npz --dirs A B
                                      weights (calibrated on X) + features of X + FID of A, B in
                                      one process: DIR/weights.pth, features.npz, fid.txt
  bench    --weights W --batch_size B --iters K
                                      images/s of pytorch-fid's InceptionV3 forward at 299 px

pytorch-fid builds its network by loading pt_inception-*.pth from a URL; here that loader is
replaced by one that reads the given local file, so the reference network is exactly
pytorch-fid's code with our random weights.
"""
import argparse
import time

import numpy as np
import torch

import pytorch_fid.inception as pfi


def _use_weights(path):
  pfi.load_state_dict_from_url = lambda *a, **k: torch.load(path, weights_only=True)


def _as_input(images_u8):
  """uint8 NHWC -> what pytorch-fid's network sees after its own resize + normalisation."""
  t = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255.0
  t = torch.nn.functional.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False)
  return 2 * t - 1


def make_weights(out, seed, calibrate=None):
  torch.manual_seed(seed)
  # fid_inception_v3 exactly, minus the download: its loader hands back the freshly
  # initialised network's own state dict.
  holder = {}
  build = pfi._inception_v3  # pylint: disable=protected-access

  def capture(*a, **k):
    holder["net"] = build(*a, **k)
    return holder["net"]
  pfi._inception_v3 = capture  # pylint: disable=protected-access
  pfi.load_state_dict_from_url = lambda *a, **k: holder["net"].state_dict()
  net = pfi.fid_inception_v3()
  # torchvision initialises BN with mean 0 / var 1; calibrate them on random images so the
  # activations stay O(1) through 94 layers, and randomise the affine parts.
  for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.momentum = None  # cumulative average over the calibration batches
      m.reset_running_stats()
      with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
  net.train()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    if calibrate:
      net(_as_input(np.load(calibrate)["arr_0"]))
    else:
      for _ in range(2):  # smooth random images (upsampled 8x8 noise)
        x = torch.rand(8, 3, 8, 8, generator=gen)
        net(torch.nn.functional.interpolate(x, size=(299, 299), mode="bicubic") * 2 - 1)
  net.eval()
  torch.save(net.state_dict(), out)


def _model(weights):
  _use_weights(weights)
  model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
  return model.eval()


def features(weights, images, out):
  model = _model(weights)
  x = np.load(images)["arr_0"]
  sd = torch.load(weights, weights_only=True)
  with torch.no_grad():
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0  # as ToTensor
    pool = model(t)[0].squeeze(-1).squeeze(-1).numpy().astype(np.float64)
  logits = pool @ sd["fc.weight"].double().numpy().T + sd["fc.bias"].double().numpy()
  np.savez(out, pool=pool, logits=logits)


def fid(weights, dirs, batch_size):
  _use_weights(weights)
  from pytorch_fid import fid_score  # pylint: disable=g-import-not-at-top
  value = fid_score.calculate_fid_given_paths(list(dirs), batch_size, "cpu", 2048, num_workers=0)
  print(f"FID {value!r}")


def parity(out, seed, images, dirs, batch_size):
  import os  # pylint: disable=g-import-not-at-top
  weights = os.path.join(out, "weights.pth")
  make_weights(weights, seed, calibrate=images)
  features(weights, images, os.path.join(out, "features.npz"))
  _use_weights(weights)
  from pytorch_fid import fid_score  # pylint: disable=g-import-not-at-top
  value = fid_score.calculate_fid_given_paths(list(dirs), batch_size, "cpu", 2048, num_workers=0)
  with open(os.path.join(out, "fid.txt"), "w") as f:
    f.write(repr(float(value)))


def bench(weights, batch_size, iters):
  model = _model(weights)
  x = torch.rand(batch_size, 3, 299, 299)
  with torch.no_grad():
    model(x)
    best = float("inf")
    for _ in range(iters):
      t0 = time.perf_counter()
      model(x)
      best = min(best, time.perf_counter() - t0)
  print(f"IMAGES_PER_SEC {batch_size / best!r} threads {torch.get_num_threads()}")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("cmd", choices=["weights", "features", "fid", "parity", "bench"])
  p.add_argument("--calibrate")
  p.add_argument("--out")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--weights")
  p.add_argument("--images")
  p.add_argument("--dirs", nargs=2)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--iters", type=int, default=3)
  a = p.parse_args()
  if a.cmd == "weights":
    make_weights(a.out, a.seed, a.calibrate)
  elif a.cmd == "parity":
    parity(a.out, a.seed, a.images, a.dirs, a.batch_size)
  elif a.cmd == "features":
    features(a.weights, a.images, a.out)
  elif a.cmd == "fid":
    fid(a.weights, a.dirs, a.batch_size)
  else:
    bench(a.weights, a.batch_size, a.iters)


if __name__ == "__main__":
  main()
