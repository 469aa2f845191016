"""Embed texts or images with a CLIP model: L2-normalised embeddings to .npz.

  python -m dalle_jax.tools.embed --clip (CKPT|HF_DIR|WORKDIR) --texts prompts.txt --out t.npz
  python -m dalle_jax.tools.embed --clip demo/clip --images photos/ --out i.npz
  python -m dalle_jax.tools.embed --t5 (CKPT|HF_DIR) --texts prompts.txt --out h.npz [--max_len 77]

--texts: one text per line. --images: every image file in the folder (sorted;
unreadable files are skipped and listed). The .npz holds `embeddings` float32
(N, E), and `texts` or `files` in the same order. With --t5 (texts only) it
holds the encoder's `hidden_states` float32 (N, L, D), `mask` bool (N, L) and
`texts` (dalle_jax.sampling.t5_encoder). Batches are split over all local devices.

Python API (used by tools.zero_shot and sampling.rerank):
  enc = ClipEncoder.load(path)             # training workdir, imported checkpoint or HF dir
  enc.encode_texts(["a red circle"])       # (N, E) float32, unit norm
  enc.encode_images(images_f32_nhwc)       # images in [-1, 1], any size (resized)
"""
import argparse
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_clip(path, data_dir=None):
  """(config, variables) from a training workdir, an imported checkpoint or a HF CLIP dir."""
  from dalle_jax.convert import hf_clip  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"--clip {path}: no such file or directory")
  if hf_clip.is_hf_clip_dir(path):
    config, variables = hf_clip.load_hf_clip(path)
  else:
    from dalle_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
    config, variables = checkpoint.load_model(path)
  if config.get("family") != "clip":
    raise ValueError(f"{path}: a {config.get('family')!r} model, not a CLIP model")
  if data_dir:
    with config.unlocked():
      config.data.data_dir = data_dir
  return config, variables


class ClipEncoder:
  """Batched, device-sharded CLIP embedding of texts and images (float32, unit norm)."""

  def __init__(self, config, variables, batch_size=256, tokenizer=None, show_progress=False):
    from dalle_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
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

    @jax.jit
    def _img(v, images):
      return model.apply(v, images, method=clip_lib.CLIP.encode_image)

    @jax.jit
    def _txt(v, ids, mask):
      return model.apply(v, ids, mask, method=clip_lib.CLIP.encode_text)

    @jax.jit
    def _temp(v):
      return model.apply(v, method=clip_lib.CLIP.temperature)

    self._img, self._txt = _img, _txt
    self.logit_scale, self.logit_bias = (float(x) for x in _temp(self.variables))

  @classmethod
  def load(cls, path, data_dir=None, **kw):
    config, variables = load_clip(path, data_dir=data_dir)
    return cls(config, variables, **kw)

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      from dalle_jax.data.tokenizers import get_tokenizer  # pylint: disable=g-import-not-at-top
      self._tokenizer = get_tokenizer(self.config.text, data_cfg=self.config.data)
    return self._tokenizer

  def _batches(self, n, desc):
    starts = range(0, n, self.batch_size)
    if self.show_progress and n > self.batch_size:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      starts = tqdm(starts, desc=desc, unit="batch", file=sys.stderr)
    return starts

  def _run(self, fn, arrays, n, desc):
    out = []
    for s in self._batches(n, desc):
      chunk = [a[s:s + self.batch_size] for a in arrays]
      m = len(chunk[0])
      pad = (-m) % self.n_dev  # every device gets the same number of rows
      if pad:
        chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) for c in chunk]
      emb = fn(self.variables, *[jax.device_put(c, self._rows) for c in chunk])
      out.append(np.asarray(emb)[:m])
    if not out:
      return np.zeros((0, self.config.model.embed_dim), np.float32)
    return np.concatenate(out).astype(np.float32)

  def encode_texts(self, texts):
    texts = list(texts)
    ids, mask = self.tokenizer.encode(texts, self.max_len) if texts else (
        np.zeros((0, self.max_len), np.int32), np.zeros((0, self.max_len), bool))
    return self._run(self._txt, [ids, mask], len(texts), "texts")

  def prepare_images(self, images):
    """float [-1, 1] or uint8 (N, H, W, 3) -> float32 (N, S, S, 3) at the model's size."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected images of shape (N, H, W, 3), got {images.shape}")
    if images.dtype == np.uint8:
      images = images.astype(np.float32) / 127.5 - 1.0
    s = self.image_size
    if images.shape[1:3] != (s, s):
      # Shorter side to S (antialiased), then a centre crop, as for the data.
      n, h, w, _ = images.shape
      k = s / min(h, w)
      nh, nw = max(s, round(h * k)), max(s, round(w * k))
      images = np.asarray(jax.image.resize(jnp.asarray(images, jnp.float32), (n, nh, nw, 3),
                                           "bicubic", antialias=True))
      top, left = (nh - s) // 2, (nw - s) // 2
      images = np.clip(images[:, top:top + s, left:left + s], -1, 1)
    return images.astype(np.float32)

  def encode_images(self, images):
    images = self.prepare_images(images)
    return self._run(self._img, [images], len(images), "images")

  def similarity(self, image_emb, text_emb):
    """Cosine similarities (N_image, N_text)."""
    return np.asarray(image_emb) @ np.asarray(text_emb).T


def read_image_folder(folder, size):
  """(uint8 (N, size, size, 3), kept file names, skipped [(name, reason)]) of a folder."""
  from dalle_jax.data import images as img_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"--images {folder}: not a directory")
  names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
  images, kept, skipped = [], [], []
  for name in names:
    try:
      with open(os.path.join(folder, name), "rb") as f:
        img = img_lib.decode(f.read())
    except (OSError, ValueError) as e:
      skipped.append((name, str(e)))
      continue
    images.append(img_lib.resize_and_crop(img, size))
    kept.append(name)
  arr = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
  return arr, kept, skipped


def read_texts(path):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--texts {path}: no such file")
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f if line.strip()]


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m dalle_jax.tools.embed", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  model = p.add_mutually_exclusive_group(required=True)
  model.add_argument("--clip", help="CLIP training workdir, imported checkpoint or HF dir")
  model.add_argument("--t5", help="T5 encoder: imported checkpoint (convert hf_t5), Hugging Face "
                                  "T5 folder or diffusers pipeline folder")
  p.add_argument("--max_len", type=int, default=None,
                 help="--t5: tokens per text (default: the checkpoint's text.max_len)")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--texts", help="text file, one text per line")
  src.add_argument("--images", help="folder of images")
  p.add_argument("--out", required=True, help="output .npz")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--data_dir", default=None,
                 help="where a SentencePiece tokenizer trained on the fly was cached "
                      "(if the checkpoint's config.data.data_dir is relative to another cwd)")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  if args.t5:
    return _embed_t5(args)
  try:
    enc = ClipEncoder.load(args.clip, data_dir=args.data_dir, batch_size=args.batch_size,
                           show_progress=True)
    if args.texts:
      texts = read_texts(args.texts)
      emb = enc.encode_texts(texts)
      extra = {"texts": np.asarray(texts, dtype=object).astype(str)}
    else:
      images, files, skipped = read_image_folder(args.images, enc.image_size)
      for name, why in skipped:
        log.warning("skipped %s: %s", name, why)
      if not files:
        raise ValueError(f"--images {args.images}: no readable images")
      emb = enc.encode_images(images)
      extra = {"files": np.asarray(files).astype(str)}
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise SystemExit(f"error: {e}") from None
  out_dir = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(out_dir, exist_ok=True)
  np.savez(args.out, embeddings=emb, **extra)
  print(f"wrote {emb.shape[0]} embeddings of dim {emb.shape[1]} -> {args.out}")


def _embed_t5(args):
  from dalle_jax.sampling import t5_encoder  # pylint: disable=g-import-not-at-top
  try:
    if not args.texts:
      raise ValueError("--t5 encodes --texts only (T5 is a text encoder)")
    texts = read_texts(args.texts)
    enc = t5_encoder.T5TextEncoder.load(args.t5, batch_size=args.batch_size,
                                        max_len=args.max_len, show_progress=True)
    hidden, mask = enc.encode_texts(texts)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise SystemExit(f"error: {e}") from None
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez(args.out, hidden_states=hidden, mask=mask, texts=np.asarray(texts).astype(str))
  print(f"wrote {hidden.shape[0]} x {hidden.shape[1]} T5 hidden states of dim {hidden.shape[2]} "
        f"-> {args.out}")


if __name__ == "__main__":
  main()
