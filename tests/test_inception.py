"""The FID Inception: converter checks, and parity with pytorch-fid itself on random weights.

The parity tests run pytorch-fid 0.3.0 in the isolated reference env (.venv-ref, built by
`make ref-env`: pytorch-fid needs torchvision, whose wheels cannot load beside .venv's CPU
torch). One subprocess makes a random FID Inception with pytorch-fid's own blocks (BatchNorm
statistics measured on the test images, so features are O(1)), computes its pool features and
logits of the images, and pytorch-fid's FID of two image folders. We convert the same state
dict and compare. They are skipped, with the reason, only when the reference env is absent.
"""
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
from PIL import Image

from dalle_jax.convert import inception as conv
from dalle_jax.evaluate import features as feat_lib
from dalle_jax.evaluate import sources as src_lib
from dalle_jax.evaluate import stats as stats_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import reference_env  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def flax_to_torch(params):
  """Our params -> a torch state dict with pytorch-fid's names (the converter's inverse)."""
  import torch  # pylint: disable=g-import-not-at-top
  inv_bn = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
  out = {}
  for path, v in flax.traverse_util.flatten_dict(flax.linen.meta.unbox(params)).items():
    v = np.asarray(v)
    if path[0] == "fc":
      out["fc." + ("weight" if path[-1] == "kernel" else "bias")] = v.T if v.ndim == 2 else v
    elif path[-2] == "conv":
      out[".".join(path[:-1]) + ".weight"] = np.transpose(v, (3, 2, 0, 1))
    else:
      out[".".join(path[:-1]) + "." + inv_bn[path[-1]]] = v
  return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


@pytest.fixture(scope="module")
def random_state_dict():
  from dalle_jax.models import inception  # pylint: disable=g-import-not-at-top
  abstract = conv.expected_shapes()
  rng = np.random.default_rng(0)
  params = flax.traverse_util.unflatten_dict(
      {tuple(k.split("/")): rng.normal(size=s).astype(np.float32) for k, s in abstract.items()})
  assert inception.NUM_CLASSES == 1008
  return flax_to_torch(params)


def test_converter_round_trip_and_skips(random_state_dict):
  import torch  # pylint: disable=g-import-not-at-top
  sd = dict(random_state_dict)
  sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)
  sd["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
  flat, skipped = conv.torch_to_flat({k: v.numpy() for k, v in sd.items()})
  assert sorted(skipped) == ["AuxLogits.fc.weight", "Conv2d_1a_3x3.bn.num_batches_tracked"]
  params = conv.flat_to_params(flat)
  back = flax_to_torch(params)
  assert set(back) == set(random_state_dict)
  for k, v in random_state_dict.items():
    np.testing.assert_array_equal(back[k].numpy(), v.numpy(), err_msg=k)


def test_converter_names_missing_unexpected_and_misshapen_tensors(random_state_dict, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  sd = {k: v.numpy() for k, v in random_state_dict.items()}
  missing = dict(sd)
  del missing["Mixed_6b.branch7x7_2.bn.running_var"]
  with pytest.raises(conv.ConversionError, match="missing 1 tensor.*Mixed_6b/branch7x7_2/bn/var"):
    conv.flat_to_params(conv.torch_to_flat(missing)[0])
  extra = dict(sd, **{"Mixed_9z.branch1x1.conv.weight": np.zeros((1, 1, 1, 1), np.float32)})
  with pytest.raises(conv.ConversionError, match="unexpected 1: Mixed_9z/branch1x1/conv/kernel"):
    conv.flat_to_params(conv.torch_to_flat(extra)[0])
  bad = dict(sd, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
  with pytest.raises(conv.ConversionError, match=r"fc/kernel has shape \(2048, 1000\)"):
    conv.flat_to_params(conv.torch_to_flat(bad)[0])
  torch.save({"not": "tensors"}, tmp_path / "odd.pth")
  with pytest.raises(conv.ConversionError, match="not pytorch-fid's FID Inception"):
    conv.load_inception_params(str(tmp_path / "odd.pth"))


# --------------------------------------------------------------------------- pytorch-fid parity

def _smooth_images(rng, n, size=64, shift=0.0):
  """Upsampled 8x8 noise: smooth, image-like inputs (the reference net is calibrated on them)."""
  low = np.clip(rng.random((n, 8, 8, 3)) + shift, 0, 1)
  return np.stack([np.asarray(Image.fromarray((x * 255).astype(np.uint8)).resize(
      (size, size), Image.BICUBIC)) for x in low])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  reason = reference_env.usable()
  if reason:
    pytest.skip(f"pytorch-fid reference env unavailable: {reason}")
  d = tmp_path_factory.mktemp("pytorch_fid")
  rng = np.random.default_rng(0)
  folders = {}
  for name, shift in (("a", 0.0), ("b", 0.15)):
    (d / name).mkdir()
    folders[name] = _smooth_images(rng, 8, shift=shift)
    for i, im in enumerate(folders[name]):
      Image.fromarray(im).save(d / name / f"{i:02d}.png")
  # Folder a's images double as the feature-parity batch and the BatchNorm calibration set.
  np.savez(d / "images.npz", arr_0=folders["a"])
  subprocess.run([str(reference_env.python()), os.path.join(ROOT, "tests", "ref_pytorch_fid.py"),
                  "parity", "--out", str(d), "--seed", "0", "--images", str(d / "images.npz"),
                  "--dirs", str(d / "a"), str(d / "b"), "--batch_size", "8"],
                 check=True, capture_output=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
  params = conv.load_inception_params(str(d / "weights.pth"))
  ext = feat_lib.InceptionExtractor(params, "legacy_pytorch", batch_size=8)
  a = src_lib.extract(src_lib.open_source(str(d / "a")), ext, keep_features=True)
  b = src_lib.extract(src_lib.open_source(str(d / "b")), ext)
  return d, a, b


def test_pool_features_and_logits_match_pytorch_fid(reference):
  """Sharded over 8 devices, 64 px PNGs through our legacy resize, against pytorch-fid."""
  d, a, _ = reference
  ref = np.load(d / "features.npz")
  ours = a.features
  assert jax.device_count() == 8
  assert 0.1 < np.abs(ref["pool"]).mean() < 10  # O(1) features: 1e-4 is a real tolerance
  # Two float32 implementations of 94 random layers: torch's own float32 result is ~1.6e-4 off
  # its float64 result on such weights, so allow 1e-4 + 1e-4 * |x|; the mean error is ~1e-5.
  np.testing.assert_allclose(ours["pool"], ref["pool"], atol=1e-4, rtol=1e-4)
  assert np.abs(ours["pool"] - ref["pool"]).mean() < 3e-5
  bias = conv.read_state_dict(str(d / "weights.pth"))["fc.bias"]
  np.testing.assert_allclose(ours["logits_unbiased"] + bias, ref["logits"], atol=1e-4, rtol=1e-4)


def test_fid_of_two_folders_matches_pytorch_fid(reference):
  d, a, b = reference
  ref = float((d / "fid.txt").read_text())
  ours = stats_lib.frechet_distance(a.stats.mu, a.stats.sigma, b.stats.mu, b.stats.sigma)
  assert ref > 1.0  # the shift makes the two folders differ
  np.testing.assert_allclose(ours, ref, rtol=1e-3)
