"""Pre-encode an image–caption dataset with a frozen model, so training never runs it:
VQGAN codes (autoregressive models) or T5 text states (Imagen-style diffusion).

    python -m dalle_jax.tools.encode_dataset --vqgan demo/vqgan --data_dir data \\
        --dataset shapes --out data/shapes_codes [--splits train,test]
    python -m dalle_jax.tools.encode_dataset --t5 ckpt/t5 --max_len 16 --data_dir data \\
        --dataset shapes/32px_5000 --out data/shapes_t5 [--states_dtype float16]

Writes a records directory (dalle_jax.data.records) with, per example, 'codes'
int32 (h, w), 'caption' str and the dataset's other scalar labels (e.g. shapes'
'shape', 'color', 'background'); meta records the VQGAN, grid and codebook size.
Use it with `--config.data.dataset=OUT` in an autoregressive config.

Images are decoded, resized (shorter side) and centre-cropped to the VQGAN's
image size, then encoded in fixed-size batches sharded over all local devices
(a data-parallel mesh; parameters replicated). Example order is the dataset's
order, so the output is deterministic. `--vqgan` takes a training workdir or an
imported checkpoint directory.

With `--t5` (an imported checkpoint, `tools.convert hf_t5`, or a Hugging Face T5 /
diffusers pipeline folder) each record keeps the example's 'image' as the dataset
stores it (encoded bytes or uint8 array: the pipeline resizes it to data.image_size),
its 'caption' and scalar labels, and adds the caption's T5 encoder output
'text_states' (max_len, D) (float32, or --states_dtype float16 to halve the bytes)
and 'text_mask' (max_len,) bool: exactly what `tools.embed --t5` gives for the same
captions (dalle_jax.sampling.t5_encoder). A split 'empty_caption' holds the blank
caption's states, the unconditional input of caption dropout and guidance (the
negative prompt a cascade samples with); meta records the T5, max_len and width.
Train on them with `--config.data.dataset=OUT --config.text_encoder.t5=T5
--config.text.max_len=MAX_LEN --config.model.unet.context_dim=D` (configs/imagen.py);
`--mesh DATA,FSDP,TENSOR` splits a large encoder's weights over the local devices.
"""
import argparse
import os
import sys

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from dalle_jax import parallel
from dalle_jax.data import images as img_lib
from dalle_jax.data import pipeline
from dalle_jax.data import records
from dalle_jax.models import loader
from dalle_jax.sampling import t5_encoder
from dalle_jax.tasks import diffusion as diffusion_task

STATES_DTYPES = ("float32", "float16")


def _examples(source, indices, size):
  for i in indices:
    ex = source[i]
    img = img_lib.resize_and_crop(img_lib.decode(ex["image"]), size)
    labels = {k: v for k, v in ex.items() if k not in ("image", "caption")
              and np.ndim(v) == 0 and isinstance(v, (int, float, np.integer, np.floating))}
    yield img, str(ex.get("caption", "")), labels


def encode_split(config, variables, source, size, batch_size, mesh, progress=True):
  """Yields {'codes': int32 (h, w), 'caption': str, **labels} for every example of source."""

  n = len(source)
  bar = tqdm(total=n, desc="encoding", unit=" images", disable=not progress)
  gen = _examples(source, range(n), size)
  done = 0
  while done < n:
    chunk = [next(gen) for _ in range(min(batch_size, n - done))]
    x = img_lib.to_float(np.stack([c[0] for c in chunk]))
    k = len(x)
    if k < batch_size:  # fixed shape: one compilation per split
      x = np.concatenate([x, np.zeros((batch_size - k,) + x.shape[1:], x.dtype)])
    with parallel.mesh_context(mesh):
      codes = loader.vqgan_encode(config, variables, parallel.shard_batch({"x": x}, mesh)["x"])
    codes = np.asarray(jax.device_get(codes))[:k].astype(np.int32)
    for (_, caption, labels), c in zip(chunk, codes):
      yield {"codes": c, "caption": caption, **labels}
    done += k
    bar.update(k)
  bar.close()


def _image(value):
  """The dataset's image as records store it: encoded bytes or a uint8 array."""
  if isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 0:
    value = value.item()
  return bytes(value) if isinstance(value, (bytes, bytearray)) else np.asarray(value)


def encode_captions(encoder, source, states_dtype=np.float32, progress=True):
  """Yields {'image', 'caption', **labels, 'text_states' (L, D), 'text_mask' (L,)} for every
  example of source, the captions T5-encoded in fixed-size batches (one compilation)."""
  n, b = len(source), encoder.batch_size
  bar = tqdm(total=n, desc="encoding", unit=" captions", disable=not progress)
  for start in range(0, n, b):
    rows = source.__getitems__(range(start, min(n, start + b)))
    if "caption" not in rows[0]:
      raise ValueError(f"--t5: examples have no caption (fields {sorted(rows[0])})")
    captions = [str(r["caption"]) for r in rows]
    states, mask = encoder.encode_texts(captions + captions[-1:] * (b - len(rows)))
    for i, r in enumerate(rows):
      labels = {k: v for k, v in r.items() if k not in ("image", "caption") and np.ndim(v) == 0
                and isinstance(v, (int, float, np.integer, np.floating))}
      image = {"image": _image(r["image"])} if "image" in r else {}
      yield {**image, "caption": captions[i], **labels,
             "text_states": states[i].astype(states_dtype), "text_mask": mask[i]}
    bar.update(len(rows))
  bar.close()


def _main_t5(args):
  """--t5: the records of pre-encoded caption states (module docstring)."""
  try:
    if args.states_dtype not in STATES_DTYPES:
      raise ValueError(f"--states_dtype {args.states_dtype!r}: one of {STATES_DTYPES}")
    try:
      sizes = [int(x) for x in args.mesh.split(",")]
      if len(sizes) != 3:
        raise ValueError
    except ValueError:
      raise ValueError(f"--mesh {args.mesh!r}: three sizes DATA,FSDP,TENSOR "
                       "(one may be -1)") from None
    mesh = parallel.make_mesh(dict(zip(("data", "fsdp", "tensor"), sizes)), jax.local_devices())
    data_cfg = ml_collections.ConfigDict({"dataset": args.dataset, "data_dir": args.data_dir})
    splits = [s for s in args.splits.split(",") if s]
    if not splits:
      raise ValueError("--splits is empty")
    sources = {s: pipeline.load_source(data_cfg, s) for s in splits}  # all checked first
    encoder = t5_encoder.T5TextEncoder.load(args.t5, batch_size=args.batch_size,
                                            max_len=args.max_len or None, mesh=mesh)
  except (FileNotFoundError, ValueError, KeyError) as e:
    sys.exit(f"error: {e}")
  dtype = np.dtype(args.states_dtype)
  width = int(encoder.config.model.d_model)
  meta = {"t5": os.path.abspath(args.t5), "text_len": encoder.max_len, "text_dim": width,
          "states_dtype": args.states_dtype, "source": args.dataset}
  for split in splits:
    try:
      count = records.write_records(args.out, split,
                                    encode_captions(encoder, sources[split], dtype),
                                    num_shards=args.num_shards, meta=meta)
    except ValueError as e:
      sys.exit(f"error: {e}")
    print(f"{split}: wrote {count} captions' T5 states ({encoder.max_len} x {width}) "
          f"to {args.out}")
  states, mask = encoder.encode_texts([""])
  records.write_records(args.out, diffusion_task.T5_EMPTY_SPLIT, [
      {"caption": "", "text_states": states[0].astype(dtype), "text_mask": mask[0]}], meta=meta)
  return args.out


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m dalle_jax.tools.encode_dataset",
                                   description=__doc__.split("\n\n")[0])
  model = parser.add_mutually_exclusive_group(required=True)
  model.add_argument("--vqgan", help="VQGAN training workdir or imported checkpoint: image codes")
  model.add_argument("--t5", help="T5 encoder (imported checkpoint, Hugging Face T5 or diffusers "
                                  "pipeline folder): the captions' hidden states")
  parser.add_argument("--data_dir", default="data")
  parser.add_argument("--dataset", default="shapes")
  parser.add_argument("--out", required=True, help="output records directory")
  parser.add_argument("--splits", default="train,test")
  parser.add_argument("--batch_size", type=int, default=64, help="global batch (rounded up to a multiple of the device count)")
  parser.add_argument("--image_size", type=int, default=0, help="default: the VQGAN's data.image_size")
  parser.add_argument("--num_shards", type=int, default=1)
  parser.add_argument("--max_len", type=int, default=0,
                      help="--t5: tokens per caption (default: the checkpoint's text.max_len); "
                           "the diffusion config's text.max_len must equal it")
  parser.add_argument("--states_dtype", default="float32", help="--t5: float32 | float16")
  parser.add_argument("--mesh", default="-1,1,1",
                      help="--t5: DATA,FSDP,TENSOR sizes over the local devices (weights split "
                           "over fsdp / tensor, captions over data)")
  args = parser.parse_args(argv)
  if args.t5:
    return _main_t5(args)

  try:
    config, variables = loader.load_vqgan(args.vqgan, "--vqgan")
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  if config.model.get("decoder_only", False):
    sys.exit(f"error: {args.vqgan} holds only a VQGAN decoder: it cannot encode images")
  size = args.image_size or int(config.data.image_size)
  f = 2 ** (len(config.model.ch_mult) - 1)
  if size % f:
    sys.exit(f"error: image size {size} is not a multiple of the VQGAN's downsampling factor {f}")

  mesh_cfg = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  mesh = parallel.make_mesh(mesh_cfg)
  ndev = parallel.batch_axis_size(mesh)
  batch_size = -(-args.batch_size // ndev) * ndev
  variables = jax.device_put(variables, parallel.replicated(mesh))
  data_cfg = ml_collections.ConfigDict({"dataset": args.dataset, "data_dir": args.data_dir,
                                        "image_size": size})
  meta = {"vqgan": os.path.abspath(args.vqgan), "grid": [size // f, size // f],
          "n_embed": int(config.model.n_embed), "image_size": size, "source": args.dataset}
  for split in [s for s in args.splits.split(",") if s]:
    try:
      source = pipeline.load_source(data_cfg, split)
    except (FileNotFoundError, ValueError) as e:
      sys.exit(f"error: {e}")
    count = records.write_records(
        args.out, split, encode_split(config, variables, source, size, batch_size, mesh),
        num_shards=args.num_shards, meta=meta)
    print(f"{split}: wrote {count} examples of {size // f}x{size // f} codes to {args.out}")
  return args.out


if __name__ == "__main__":
  main()
