"""Prepare a dataset for training (array_record files, no TensorFlow needed).

  python -m dalle_jax.tools.build_dataset shapes --data_dir D [--num_examples N --image_size S]
  python -m dalle_jax.tools.build_dataset image_text_folder --src FOLDER --data_dir D \\
      [--image_size 256 --name NAME --test_fraction 0.01]
  python -m dalle_jax.tools.build_dataset TFDS_NAME --data_dir D   # any installed TFDS builder

Prints the `--config.data.*` flags that select the built dataset.
"""
import argparse
import logging
import os
import sys
import time


def _size(path):
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def _report(builder, dataset, data_dir, start):
  splits = ", ".join(f"{name} {info.num_examples}" for name, info in builder.info.splits.items())
  print(f"{dataset} ready ({time.time() - start:.1f}s): {splits} examples, "
        f"{_size(builder.data_path) / 2**20:.1f} MiB at {builder.data_path}")
  print(f"Train with: --config.data.dataset={dataset} --config.data.data_dir={data_dir}")


def build_shapes(args):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from dalle_jax.data import shapes  # pylint: disable=g-import-not-at-top
  _, _, name = args.dataset.partition("/")
  named = shapes.parse_config_name(name) if name else None  # e.g. shapes/32px_5000
  config = shapes.make_config(
      args.image_size or (named.image_size if named else shapes.DEFAULT_IMAGE_SIZE),
      args.num_examples or (named.num_train if named else shapes.DEFAULT_NUM_TRAIN),
      args.num_test or (named.num_test if named else None))
  builder = shapes.builder(args.data_dir, config)
  dataset = "shapes" if config.name == shapes.Shapes.DEFAULT_CONFIG_NAME else f"shapes/{config.name}"
  if builder.is_prepared():
    print(f"{dataset} is already built at {builder.data_path}")
  else:
    print(f"Rendering {config.num_train} train + {config.num_test} test images of "
          f"{config.image_size} px...")
    tfds.enable_progress_bar()
    builder.download_and_prepare()
  return builder, dataset


def build_folder(args):
  from dalle_jax.data import image_text_folder as itf  # pylint: disable=g-import-not-at-top
  if not args.src:
    sys.exit("image_text_folder needs --src FOLDER (the folder of images and captions)")
  try:
    pairs, skipped = itf.scan_folder(args.src)  # fail early, before tfds makes directories
  except itf.FolderError as e:
    sys.exit(f"error: {e}")
  del skipped  # summarised after decoding, with the unreadable images
  print(f"{args.src}: {len(pairs)} captions of images found")
  builder = itf.builder(args.data_dir, args.name or "", src=args.src,
                        image_size=args.image_size or itf.DEFAULT_IMAGE_SIZE,
                        test_fraction=args.test_fraction, num_workers=args.num_workers)
  dataset = f"image_text_folder/{builder.builder_config.name}"
  if builder.is_prepared():
    print(f"{dataset} is already built at {builder.data_path}; delete it to rebuild")
    return builder, dataset
  try:
    builder.download_and_prepare()
  except itf.FolderError as e:
    config_dir = os.path.dirname(os.fspath(builder.data_path))
    if os.path.isdir(config_dir) and not os.listdir(config_dir):
      os.rmdir(config_dir)
    sys.exit(f"error: {e}")
  skipped = dict(builder.info.metadata.get("skipped", {}))
  if skipped:
    print(f"Skipped {sum(skipped.values())} files: {itf.summarize(skipped)}")
  else:
    print("Skipped no files.")
  return builder, dataset


def build_tfds(args):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(args.dataset, data_dir=args.data_dir, file_format="array_record")
  except Exception as e:  # pylint: disable=broad-except
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    sys.exit(f"error: no TFDS builder {args.dataset!r}: {first_line}\n"
             "Built-in: shapes, image_text_folder; others: see the TFDS catalog.")
  builder.download_and_prepare()
  return builder, args.dataset


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m dalle_jax.tools.build_dataset",
                              description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("dataset", help="shapes | image_text_folder | any installed TFDS name")
  p.add_argument("--data_dir", required=True, help="TFDS data_dir to build into")
  p.add_argument("--image_size", type=int, default=0,
                 help="shapes: image side (default 64); image_text_folder: max shorter side "
                      "(default 256)")
  p.add_argument("--num_examples", type=int, default=0, help="shapes: training examples (20000)")
  p.add_argument("--num_test", type=int, default=0,
                 help="shapes: test examples (default num_examples / 20)")
  p.add_argument("--src", default="", help="image_text_folder: the folder of images")
  p.add_argument("--name", default="", help="image_text_folder: dataset name (folder name)")
  p.add_argument("--test_fraction", type=float, default=0.01,
                 help="image_text_folder: fraction of images held out as 'test'")
  p.add_argument("--num_workers", type=int, default=0,
                 help="image_text_folder: decoding processes (0 = all cores)")
  args = p.parse_args(argv)
  logging.getLogger("absl").setLevel(logging.ERROR)  # "Using custom data configuration" noise
  start = time.time()
  name = args.dataset.split("/")[0]
  if name == "shapes":
    builder, dataset = build_shapes(args)
  elif name == "image_text_folder":
    builder, dataset = build_folder(args)
  else:
    builder, dataset = build_tfds(args)
  _report(builder, dataset, args.data_dir, start)


if __name__ == "__main__":
  main()
