"""Batched, device-sharded CLIP embeddings of texts and images: the library
behind reranking (sampling.rerank), VQGAN+CLIP's prompt, tools.embed and
tools.zero_shot.

  enc = ClipEncoder.load(path)             # training workdir, imported checkpoint or HF dir
  enc.encode_texts(["a red circle"])       # (N, E) float32, unit norm
  enc.encode_images(images_nhw3)           # uint8, or float in [-1, 1]; any size (resized)
  enc.encode_texts(texts, normalize=False, states=True)  # (N, E) raw, (N, T, D), mask (N, T)
  enc.encode_images(images, normalize=False)              # (N, E) raw (unCLIP's embeddings)

Unnormalised embeddings and the text tower's token states (its final LayerNorm's output)
are what unCLIP's prior and decoder condition on (dalle_jax/tools/embed.py --dataset).

Shapes: N items, E embedding width, S the model's image size, T text length, D text width.
"""
import functools
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
from tqdm import tqdm

from dalle_jax.data import images as images_lib
from dalle_jax.data.tokenizers import get_tokenizer
from dalle_jax.models import clip as clip_lib
from dalle_jax.models import loader


def load_clip(path, data_dir=None, flag="--clip"):
  """(config, variables) from a training workdir, an imported checkpoint or a HF
  CLIP dir (`loader.load`: the path and family checked first, naming `flag`)."""
  config, variables = loader.load(path, "clip", flag)
  if data_dir:
    with config.unlocked():
      config.data.data_dir = data_dir
  return config, variables


class ClipEncoder:
  """Batched, device-sharded CLIP embedding of texts and images (float32, unit norm)."""

  def __init__(self, config, variables, batch_size=256, tokenizer=None, show_progress=False):
    self.config = config
    self.model = clip_lib.build_model(config)
    self.image_size = int(config.model.vision.image_size)
    self.max_len = int(config.model.text.max_len)
    self.show_progress = show_progress
    devices = jax.local_devices()
    self.mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    self.n_dev = len(devices)
    self.batch_size = max(self.n_dev, batch_size // self.n_dev * self.n_dev)
    self._rows = NamedSharding(self.mesh, P("data"))
    self.variables = jax.device_put({"params": variables["params"]},
                                    NamedSharding(self.mesh, P()))
    self._tokenizer = tokenizer
    model = self.model

    @functools.partial(jax.jit, static_argnames="normalize")
    def _img(v, images, normalize=True):
      return model.apply(v, images, normalize, method=clip_lib.CLIP.encode_image)

    @functools.partial(jax.jit, static_argnames="normalize")
    def _txt(v, ids, mask, normalize=True):
      return model.apply(v, ids, mask, normalize, method=clip_lib.CLIP.encode_text)

    @jax.jit
    def _txt_states(v, ids, mask):
      emb, state = model.apply(v, ids, mask, False, method=clip_lib.CLIP.encode_text,
                               capture_intermediates=lambda mdl, _: mdl.name == "ln_final")
      return emb, state["intermediates"]["text"]["ln_final"]["__call__"][0].astype(jnp.float32)

    @jax.jit
    def _temp(v):
      return model.apply(v, method=clip_lib.CLIP.temperature)

    self._img, self._txt, self._txt_states = _img, _txt, _txt_states
    self.logit_scale, self.logit_bias = (float(x) for x in _temp(self.variables))

  @classmethod
  def load(cls, path, data_dir=None, flag="--clip", **kw):
    config, variables = load_clip(path, data_dir=data_dir, flag=flag)
    return cls(config, variables, **kw)

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      self._tokenizer = get_tokenizer(self.config.text, data_cfg=self.config.data)
    return self._tokenizer

  def _batches(self, n, desc):
    starts = range(0, n, self.batch_size)
    if self.show_progress and n > self.batch_size:
      starts = tqdm(starts, desc=desc, unit="batch", file=sys.stderr)
    return starts

  def _run(self, fn, arrays, n, desc):
    """fn(variables, *row chunks) -> an array or a tuple of arrays, batched over rows."""
    out = []
    for s in self._batches(n, desc):
      chunk = [a[s:s + self.batch_size] for a in arrays]
      m = len(chunk[0])
      pad = (-m) % self.n_dev  # every device gets the same number of rows
      if pad:
        chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) for c in chunk]
      res = fn(self.variables, *[jax.device_put(c, self._rows) for c in chunk])
      out.append(tuple(np.asarray(r)[:m] for r in (res if isinstance(res, tuple) else (res,))))
    if not out:
      return np.zeros((0, self.config.model.embed_dim), np.float32)
    cat = tuple(np.concatenate(parts).astype(np.float32) for parts in zip(*out))
    return cat if len(cat) > 1 else cat[0]

  def encode_texts(self, texts, normalize=True, states=False):
    """(N, E) embeddings (unit norm unless normalize=False); with states=True also the token
    states (N, T, D) float32 and the token mask (N, T) bool: (emb, states, mask)."""
    texts = list(texts)
    ids, mask = self.tokenizer.encode(texts, self.max_len) if texts else (
        np.zeros((0, self.max_len), np.int32), np.zeros((0, self.max_len), bool))
    if not states:
      return self._run(functools.partial(self._txt, normalize=normalize), [ids, mask],
                       len(texts), "texts")
    if normalize:
      raise ValueError("encode_texts(states=True) returns the raw embeddings: pass "
                       "normalize=False")
    if not texts:
      w = int(self.config.model.text.width)
      return (np.zeros((0, self.config.model.embed_dim), np.float32),
              np.zeros((0, self.max_len, w), np.float32), mask)
    emb, st = self._run(self._txt_states, [ids, mask], len(texts), "texts")
    return emb, st, np.asarray(mask, bool)

  def prepare_images(self, images):
    """float [-1, 1] or uint8 (N, H, W, 3) -> float32 (N, S, S, 3) at the model's size."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected images of shape (N, H, W, 3), got {images.shape}")
    if images.dtype == np.uint8:
      images = images.astype(np.float32) / 127.5 - 1.0
    s = self.image_size
    if images.shape[1:3] != (s, s):  # shorter side to S (antialiased), centre crop
      images = np.asarray(jnp.clip(images_lib.resize_and_crop_float(images, s, s), -1, 1))
    return images.astype(np.float32)

  def encode_images(self, images, normalize=True):
    images = self.prepare_images(images)
    return self._run(functools.partial(self._img, normalize=normalize), [images], len(images),
                     "images")

  def similarity(self, image_emb, text_emb):
    """Cosine similarities (N_image, N_text)."""
    return np.asarray(image_emb) @ np.asarray(text_emb).T
