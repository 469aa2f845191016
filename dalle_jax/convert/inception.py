"""pytorch-fid's FID Inception weights (`pt_inception-2015-12-05-*.pth`) -> Flax params.

    params = load_inception_params("pt_inception-2015-12-05-6726825d.pth")
    InceptionV3().apply({"params": params}, x_bhwc)

The file is a torch state dict of torchvision's Inception3 layout with pytorch-fid's FID blocks
(Conv2d_1a_3x3.conv.weight, Mixed_6b.branch7x7_2.bn.running_var, ..., fc.weight), read with
torch.load(weights_only=True) and never downloaded. Every tensor is renamed, transposed (conv
OIHW -> HWIO, fc (out, in) -> (in, out)) and checked by name and shape against our model; a
missing or unexpected tensor is an error naming it. Only BatchNorm's `num_batches_tracked`
counters and torchvision's auxiliary classifier (`AuxLogits.*`, unused by FID) are skipped.
"""
import hashlib
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.models import inception

_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


class ConversionError(ValueError):
  pass


def expected_shapes():
  """{'Mixed_5b/branch1x1/conv/kernel': shape, ...} of our model's params."""
  abstract = jax.eval_shape(inception.InceptionV3().init, jax.random.key(0),
                            jnp.zeros((1, 299, 299, 3), jnp.float32))
  flat = flax.traverse_util.flatten_dict(flax.linen.meta.unbox(abstract["params"]), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def random_weights(seed=0):
  """{name: array} at expected_shapes(): He-scaled random kernels, unit BatchNorm, zero
  biases. No FID can be compared with published ones on these; benchmarks and tests use
  them where pytorch-fid's file is absent."""
  rng = np.random.default_rng(seed)
  flat = {}
  for name, shape in expected_shapes().items():
    leaf = name.rsplit("/", 1)[1]
    if leaf == "kernel":
      flat[name] = rng.standard_normal(shape, np.float32) * np.sqrt(2 / np.prod(shape[:-1]))
    else:
      flat[name] = np.full(shape, 1.0 if leaf in ("scale", "var") else 0.0, np.float32)
  return flat


def torch_to_flat(state_dict):
  """Torch names/layouts -> ({our '/'-joined name: array}, [skipped torch names])."""
  flat, skipped = {}, []
  for key, value in state_dict.items():
    parts = key.split(".")
    if parts[0] == "AuxLogits" or parts[-1] == "num_batches_tracked":
      skipped.append(key)
      continue
    value = np.asarray(value, np.float32)
    if key in ("fc.weight", "fc.bias"):
      flat["fc/" + ("kernel" if parts[-1] == "weight" else "bias")] = (
          value.T if value.ndim == 2 else value)
    elif len(parts) >= 3 and parts[-2] == "conv" and parts[-1] == "weight" and value.ndim == 4:
      flat["/".join(parts[:-1] + ["kernel"])] = np.transpose(value, (2, 3, 1, 0))
    elif len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in _BN:
      flat["/".join(parts[:-1] + [_BN[parts[-1]]])] = value
    else:
      flat[key] = value  # reported below as unexpected, under its torch name
  return flat, skipped


def flat_to_params(flat, source="state dict"):
  """Checks every name and shape against the model; returns the nested params tree."""
  want = expected_shapes()
  missing = sorted(set(want) - set(flat))
  unexpected = sorted(set(flat) - set(want))
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:6])}"
                   + (" ..." if len(missing) > 6 else ""))
    if unexpected:
      parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:6])}"
                   + (" ..." if len(unexpected) > 6 else ""))
    raise ConversionError(f"{source} is not pytorch-fid's FID Inception: " + "; ".join(parts))
  for name, shape in want.items():
    if tuple(flat[name].shape) != shape:
      raise ConversionError(f"{source}: {name} has shape {tuple(flat[name].shape)}, "
                            f"the FID Inception expects {shape}")
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v)
                                            for k, v in flat.items()})


def read_state_dict(path):
  """A .pth state dict as {name: float32 numpy}; one-line errors for missing/odd files."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--inception {path!r}: no such file (pytorch-fid's "
                            "pt_inception-2015-12-05-6726825d.pth, given as a local path)")
  import torch  # pylint: disable=g-import-not-at-top  (torch is only needed to read .pth files)
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"--inception {path!r}: not readable by torch.load(weights_only=True): "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ConversionError(f"--inception {path!r}: expected a state dict, got {type(obj).__name__}")
  return {k: v.detach().to(torch.float32).numpy() for k, v in obj.items() if hasattr(v, "detach")}


def load_inception_params(path):
  """pytorch-fid's FID Inception .pth -> params for models.inception.InceptionV3."""
  flat, _ = torch_to_flat(read_state_dict(path))
  return flat_to_params(flat, source=repr(path))


def file_sha256(path, length=16):
  """The first `length` hex digits of the file's SHA-256 (names the weights in results)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()[:length]
