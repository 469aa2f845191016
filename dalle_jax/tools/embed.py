"""Embed texts or images with a CLIP model: L2-normalised embeddings to .npz.

  python -m dalle_jax.tools.embed --clip (CKPT|HF_DIR|WORKDIR) --texts prompts.txt --out t.npz
  python -m dalle_jax.tools.embed --clip demo/clip --images photos/ --out i.npz
  python -m dalle_jax.tools.embed --t5 (CKPT|HF_DIR) --texts prompts.txt --out h.npz [--max_len 77]
  python -m dalle_jax.tools.embed --clip demo/clip --dataset shapes/32px_5000 --data_dir data \
      --out data/shapes_clip [--splits train,test]

--texts: one text per line. --images: every image file in the folder (sorted;
unreadable files are skipped and listed). The .npz holds `embeddings` float32
(N, E), and `texts` or `files` in the same order. With --t5 (texts only) it
holds the encoder's `hidden_states` float32 (N, L, D), `mask` bool (N, L) and
`texts` (dalle_jax.sampling.t5_encoder). Batches are split over all local devices.

--dataset (image-caption pairs, for unCLIP's prior: configs/unclip.py) writes a records
directory (dalle_jax/data/records.py) instead, one record per pair with the raw
(unnormalised) CLIP embeddings the prior trains on: `caption`, `text_embed` (E,),
`text_states` (T, D) (the text tower's final LayerNorm output), `text_mask` (T,) bool,
`image_embed` (E,); a split `empty_caption` with the empty caption's text features (the
unconditional input of guidance), and in the meta `image_embed_mean` / `image_embed_std`
(per dimension, over the first split: the prior's clip_mean / clip_std), `embed_dim`,
`text_len`, `text_dim` and the CLIP path.

The encoder itself is the library's `dalle_jax.sampling.clip_encoder.ClipEncoder`.
"""
import argparse
import logging
import os

import numpy as np

from dalle_jax.data import images as img_lib
from dalle_jax.data import pipeline
from dalle_jax.data import records
from dalle_jax.sampling.clip_encoder import ClipEncoder

log = logging.getLogger(__name__)


def read_image_folder(folder, size):
  """(uint8 (N, size, size, 3), kept file names, skipped [(name, reason)]) of a folder."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"--images {folder}: not a directory")
  names = sorted(f for f in os.listdir(folder) if f.lower().endswith(img_lib.IMAGE_EXTS))
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
  src.add_argument("--dataset", help="image-caption dataset (TFDS name or records dir): "
                                     "records of paired CLIP embeddings (--clip only)")
  p.add_argument("--splits", default="train,test",
                 help="--dataset: splits to embed (the first gives the statistics)")
  p.add_argument("--out", required=True, help="output .npz (--dataset: records directory)")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--data_dir", default=None,
                 help="where a SentencePiece tokenizer trained on the fly was cached "
                      "(if the checkpoint's config.data.data_dir is relative to another cwd)")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  if args.t5:
    return _embed_t5(args)
  if args.dataset:
    return _embed_dataset(args)
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


def embed_pairs(enc, source, batch_size=256):
  """Yields one record per example of `source` (image + caption): raw CLIP embeddings of both,
  the caption's token states and mask (see the module docstring)."""
  for start in range(0, len(source), batch_size):
    rows = source.__getitems__(range(start, min(len(source), start + batch_size)))
    missing = [k for k in ("image", "caption") if k not in rows[0]]
    if missing:
      raise ValueError(f"--dataset: examples have no {' or '.join(missing)} "
                       f"(fields {sorted(rows[0])}); image-caption pairs needed")
    images = np.stack([img_lib.resize_and_crop(img_lib.decode(r["image"]), enc.image_size)
                       for r in rows])
    captions = [str(r["caption"]) for r in rows]
    pad = batch_size - len(rows)  # every batch one shape: one compilation per tower
    text_emb, states, mask = enc.encode_texts(captions + captions[-1:] * pad, normalize=False,
                                              states=True)
    image_emb = enc.encode_images(np.concatenate([images, np.repeat(images[-1:], pad, 0)]),
                                  normalize=False)
    for i, c in enumerate(captions):
      yield {"caption": c, "text_embed": text_emb[i], "text_states": states[i],
             "text_mask": mask[i], "image_embed": image_emb[i]}


def _embed_dataset(args):
  try:
    if not args.clip:
      raise ValueError("--dataset needs --clip (the CLIP whose embeddings the prior learns)")
    splits = [s for s in args.splits.split(",") if s]
    if not splits:
      raise ValueError("--splits is empty")
    enc = ClipEncoder.load(args.clip, data_dir=args.data_dir, batch_size=args.batch_size)
    data_cfg = {"dataset": args.dataset, "data_dir": args.data_dir or "data"}
    sources = {s: pipeline.load_source(data_cfg, s) for s in splits}  # every split checked first
    stats = None
    for split in splits:
      image_embs = []

      def rows(split=split, image_embs=image_embs):
        for r in embed_pairs(enc, sources[split], enc.batch_size):
          image_embs.append(r["image_embed"])
          yield r
      n = records.write_records(args.out, split, rows(), progress=True)
      if stats is None:
        e = np.stack(image_embs).astype(np.float64)
        stats = (e.mean(0), e.std(0))
      print(f"{split}: {n} pairs")
    text_emb, states, mask = enc.encode_texts([""] * enc.batch_size, normalize=False,
                                              states=True)
    records.write_records(args.out, "empty_caption", [
        {"caption": "", "text_embed": text_emb[0], "text_states": states[0], "text_mask": mask[0],
         "image_embed": np.zeros_like(text_emb[0])}],
        meta={"clip": os.path.abspath(args.clip), "dataset": args.dataset,
              "embed_dim": int(text_emb.shape[1]), "text_len": int(states.shape[1]),
              "text_dim": int(states.shape[2]), "stats_split": splits[0],
              "image_embed_mean": [float(x) for x in stats[0]],
              "image_embed_std": [float(x) for x in stats[1]]})
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote CLIP embeddings of {args.dataset} ({', '.join(splits)}) -> {args.out}")
  return args.out


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
