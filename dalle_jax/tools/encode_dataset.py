"""Pre-encode an image–caption dataset to VQGAN codes (so AR training never runs the VQGAN).

    python -m dalle_jax.tools.encode_dataset --vqgan demo/vqgan --data_dir data \\
        --dataset shapes --out data/shapes_codes [--splits train,test]

Writes a records directory (dalle_jax.data.records) with, per example, 'codes'
int32 (h, w), 'caption' str and the dataset's other scalar labels (e.g. shapes'
'shape', 'color', 'background'); meta records the VQGAN, grid and codebook size.
Use it with `--config.data.dataset=OUT` in an autoregressive config.

Images are decoded, resized (shorter side) and centre-cropped to the VQGAN's
image size, then encoded in fixed-size batches sharded over all local devices
(a data-parallel mesh; parameters replicated). Example order is the dataset's
order, so the output is deterministic. `--vqgan` takes a training workdir or an
imported checkpoint directory.
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


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m dalle_jax.tools.encode_dataset",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--vqgan", required=True, help="VQGAN training workdir or imported checkpoint")
  parser.add_argument("--data_dir", default="data")
  parser.add_argument("--dataset", default="shapes")
  parser.add_argument("--out", required=True, help="output records directory")
  parser.add_argument("--splits", default="train,test")
  parser.add_argument("--batch_size", type=int, default=64, help="global batch (rounded up to a multiple of the device count)")
  parser.add_argument("--image_size", type=int, default=0, help="default: the VQGAN's data.image_size")
  parser.add_argument("--num_shards", type=int, default=1)
  args = parser.parse_args(argv)


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
