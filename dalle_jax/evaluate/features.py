"""Inception features of uint8 images, sharded over every device of every process.

    ext = InceptionExtractor(load_inception_params(PTH), mode="legacy_pytorch")
    out = ext(images_u8_nhwc)          # {'pool': (N, 2048) f32, 'logits_unbiased': (N, 1008)}

Resize modes (to the network's 299 x 299):
  legacy_pytorch  pytorch-fid: x / 255, bilinear resize with align_corners=False and no
                  antialiasing (torch's F.interpolate), then 2x - 1
  clean           clean-fid: bicubic resize of the float image in [0, 255] as PIL does it
                  (Keys a = -0.5, kernel widened when downsampling), clipped to [0, 255], then
                  (x - 128) / 128 as the TF graph (clean-fid's torchscript network) normalises
Batches whose images share a size resize on device (jax.image.resize matches both references:
tests/test_evaluate.py); a batch of mixed sizes resizes each image on the host with the
reference maths (numpy bilinear weights / PIL itself).

The network is compiled once per batch size, whatever the source image size: resizing is a
separate, cheap computation. Every process passes its own rows (`local_batch` each); the global
batch is split over the mesh's 'data' axis and each process gets its rows' features back.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from dalle_jax.models import inception

MODES = ("legacy_pytorch", "clean")
SIZE = 299
OUTPUTS = ("pool", "logits_unbiased")


# --------------------------------------------------------------------------- resizing

def resize_device(images_bhwc, mode):
  """uint8/float (B, H, W, 3) in [0, 255] -> float32 (B, 299, 299, 3) network input (jittable)."""
  x = images_bhwc.astype(jnp.float32)
  b = x.shape[0]
  if mode == "legacy_pytorch":
    if x.shape[1:3] != (SIZE, SIZE):
      x = jax.image.resize(x / 255.0, (b, SIZE, SIZE, 3), "bilinear", antialias=False)
    else:
      x = x / 255.0
    return 2.0 * x - 1.0
  if mode == "clean":
    if x.shape[1:3] != (SIZE, SIZE):
      x = jnp.clip(jax.image.resize(x, (b, SIZE, SIZE, 3), "bicubic", antialias=True), 0, 255)
    return (x - 128.0) / 128.0
  raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")


def bilinear_weights(in_size, out_size):
  """(out, in) matrix of torch's bilinear interpolation, align_corners=False, no antialias."""
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = src - i0
  w = np.zeros((out_size, in_size), np.float64)
  np.add.at(w, (np.arange(out_size), i0), 1 - lam)
  np.add.at(w, (np.arange(out_size), i1), lam)
  return w


def resize_host(image_hw3, mode):
  """One uint8 image (H, W, 3) -> float32 (299, 299, 3) network input, with the references' maths."""
  if mode == "legacy_pytorch":
    x = np.asarray(image_hw3, np.float64) / 255.0
    wy, wx = bilinear_weights(x.shape[0], SIZE), bilinear_weights(x.shape[1], SIZE)
    x = np.tensordot(wy, x, axes=(1, 0))                      # (299, W, 3): rows
    x = np.tensordot(x, wx, axes=(1, 1)).transpose(0, 2, 1)   # (299, 299, 3): columns
    return (2 * x - 1).astype(np.float32)
  if mode == "clean":
    x = np.asarray(image_hw3, np.float32)
    if x.shape[:2] != (SIZE, SIZE):
      x = np.stack([np.asarray(Image.fromarray(x[..., c], mode="F").resize((SIZE, SIZE),
                                                                           Image.BICUBIC))
                    for c in range(3)], axis=-1).clip(0, 255)
    return ((x - 128.0) / 128.0).astype(np.float32)
  raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")


# --------------------------------------------------------------------------- the extractor

# Module-level jits (shardings follow the inputs'): every extractor with the same batch size,
# mesh and dtype shares one compiled network.
_resize_jit = jax.jit(resize_device, static_argnames="mode")


@functools.partial(jax.jit, static_argnames="dtype")
def _network_jit(params, x_bhwc, dtype):
  out = inception.InceptionV3(dtype=dtype).apply({"params": params}, x_bhwc)
  return jnp.concatenate([out["pool"], out["logits_unbiased"]], axis=-1)


def data_mesh(devices=None):
  """A 1-D mesh named 'data' over all (global) devices."""
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))


class InceptionExtractor:
  """Sharded InceptionV3 features of uint8 images; the in-memory API `generate` scores with.

  batch_size: global rows per network call (rounded up to a multiple of the device count);
  every process contributes `local_batch` = batch_size / process_count rows per call.
  """

  def __init__(self, params, mode="legacy_pytorch", batch_size=64, mesh=None,
               dtype=jnp.float32):
    if mode not in MODES:
      raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    self.mode = mode
    self.mesh = mesh or data_mesh()
    n_dev = self.mesh.devices.size
    self.batch_size = max(n_dev, -(-batch_size // n_dev) * n_dev)
    self.local_batch = self.batch_size // jax.process_count()
    self._rows = NamedSharding(self.mesh, P("data"))
    self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
    self.dtype = dtype

  def _global(self, local):
    return jax.make_array_from_process_local_data(self._rows, local)

  def preprocess_local(self, images):
    """A list/array of this process's uint8 images (local_batch of them) -> global network input."""
    if len({np.shape(im) for im in images}) == 1:
      batch = np.stack(images) if isinstance(images, list) else np.asarray(images)
      return _resize_jit(self._global(batch), mode=self.mode)
    return self._global(np.stack([resize_host(im, self.mode) for im in images]))

  def run_local(self, images):
    """Exactly local_batch uint8 images of this process -> their (local_batch, 3056) features."""
    from dalle_jax import parallel  # pylint: disable=g-import-not-at-top
    return parallel.host_local(self.apply(self.preprocess_local(images)))

  def apply(self, x_bhwc):
    """Global network input (B, 299, 299, 3) -> global features (B, 2048 + 1008)."""
    return _network_jit(self.params, x_bhwc, dtype=self.dtype)

  def __call__(self, images_u8_nhwc):
    """This process's images (any count) -> {'pool', 'logits_unbiased'} float32 numpy.

    In a multi-process run every process must call this with the same number of images.
    """
    images = np.asarray(images_u8_nhwc)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected uint8 images (N, H, W, 3), got shape {images.shape}")
    n = len(images)
    outs = []
    for s in range(0, n, self.local_batch):
      chunk = images[s:s + self.local_batch]
      m = len(chunk)
      if m < self.local_batch:  # a fixed batch: one compilation
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.local_batch - m, axis=0)])
      outs.append(self.run_local(chunk)[:m])
    feats = np.concatenate(outs) if outs else np.zeros((0, inception.POOL_DIM
                                                        + inception.NUM_CLASSES), np.float32)
    return split_outputs(feats)


def split_outputs(feats):
  return {"pool": feats[:, :inception.POOL_DIM], "logits_unbiased": feats[:, inception.POOL_DIM:]}


def probe_images(n):
  """A fixed, smooth 299 x 299 test pattern (n copies): feature_checksum's input."""
  yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
  img = np.stack([np.sin(6 * xx) * 0.5 + 0.5, np.cos(5 * yy) * 0.5 + 0.5, xx * yy], axis=-1)
  return np.repeat((img * 255).round().astype(np.uint8)[None], n, axis=0)


def feature_checksum(extractor):
  """Sum of the probe pattern's pool features, rounded: names the weights + mode by behaviour."""
  pool = extractor(probe_images(1))["pool"][0]
  return float(np.round(np.float64(pool).sum(), 3))
