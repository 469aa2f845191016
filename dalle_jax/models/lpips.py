"""LPIPS perceptual distance (Zhang et al. 2018) with a VGG16 feature network.

    d(x, y) = sum_l mean_hw( w_l . (norm(f_l(x)) - norm(f_l(y)))^2 )

f_l are VGG16's relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 activations of the
shifted/scaled input, norm is unit length over channels and w_l the learned
non-negative 1x1 "lin" heads. Weights are never downloaded: `load_lpips_params`
reads a torchvision VGG16 state dict (features.{i}.weight/bias) and the LPIPS
heads (lin{l}.model.1.weight, as in the lpips package's / taming's vgg.pth),
each from a local .pth (torch.load weights_only) or .npz with those names.
The VGG and heads are frozen: the task keeps them outside 'params'.
"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# torchvision vgg16.features indices of the 13 convs, grouped by LPIPS slice.
VGG_SLICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG_CHANNELS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def _conv(x, kernel, bias):
  y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + bias.astype(y.dtype)


class LPIPS(nn.Module):
  """(x, y) images (B, H, W, 3) in [-1, 1] -> distance (B,) in f32."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, y):
    p = lambda name, shape: self.param(name, nn.initializers.normal(0.02), shape)
    params = {}
    c_in = 3
    for s, (idxs, chans) in enumerate(zip(VGG_SLICES, VGG_CHANNELS)):
      for i, c in zip(idxs, chans):
        params[f"conv_{i}"] = (p(f"conv_{i}_kernel", (3, 3, c_in, c)), p(f"conv_{i}_bias", (c,)))
        c_in = c
      params[f"lin_{s}"] = p(f"lin_{s}", (chans[-1],))

    def features(img):
      h = ((img.astype(jnp.float32) - SHIFT) / SCALE).astype(self.dtype)
      feats = []
      for s, idxs in enumerate(VGG_SLICES):
        if s:
          h = nn.max_pool(h, (2, 2), strides=(2, 2))
        for i in idxs:
          h = jax.nn.relu(_conv(h, *params[f"conv_{i}"]))
        feats.append(h.astype(jnp.float32))
      return feats

    b = x.shape[0]
    # One pass over both images halves the number of conv launches.
    feats = features(jnp.concatenate([x, y], axis=0))
    total = jnp.zeros((b,), jnp.float32)
    for s, f in enumerate(feats):
      f = f * jax.lax.rsqrt(jnp.sum(f * f, axis=-1, keepdims=True) + 1e-20)  # ~ f / (|f| + 1e-10)
      diff = (f[:b] - f[b:]) ** 2
      total += jnp.mean(jnp.einsum("bhwc,c->bhw", diff, params[f"lin_{s}"]), axis=(1, 2))
    return total


def _load_named_arrays(path, what):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}: no such file {path!r}")
  if path.endswith(".npz"):
    with np.load(path) as f:
      return {k: np.asarray(f[k], np.float32) for k in f.files}
  import torch
  sd = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(sd, dict) and "state_dict" in sd:
    sd = sd["state_dict"]
  return {k: v.detach().float().numpy() for k, v in sd.items() if hasattr(v, "detach")}


def load_lpips_params(vgg_path, lin_path):
  """LPIPS params tree from a VGG16 state dict and the LPIPS lin heads."""
  vgg = _load_named_arrays(vgg_path, "lpips.vgg_path")
  lin = _load_named_arrays(lin_path, "lpips.lin_path")
  # Heads may sit under a prefix (e.g. taming's 'lin0.model.1.weight', lpips' 'net.lin0...').
  out = {}
  missing = []
  for s, (idxs, chans) in enumerate(zip(VGG_SLICES, VGG_CHANNELS)):
    for i in idxs:
      w, b = vgg.get(f"features.{i}.weight"), vgg.get(f"features.{i}.bias")
      if w is None or b is None:
        missing.append(f"features.{i}.weight/bias in {vgg_path}")
        continue
      out[f"conv_{i}_kernel"] = np.transpose(w, (2, 3, 1, 0))
      out[f"conv_{i}_bias"] = b
    key = next((k for k in lin if k.endswith(f"lin{s}.model.1.weight")), None)
    if key is None:
      missing.append(f"lin{s}.model.1.weight in {lin_path}")
      continue
    out[f"lin_{s}"] = lin[key].reshape(-1)
  if missing:
    raise ValueError("LPIPS weights incomplete; missing " + ", ".join(missing))
  want = jax.eval_shape(LPIPS().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                        jnp.zeros((1, 32, 32, 3)))["params"]
  for k, v in want.items():
    if tuple(out[k].shape) != tuple(v.shape):
      raise ValueError(f"LPIPS weight {k}: shape {out[k].shape} in file, expected {v.shape}")
  return out
