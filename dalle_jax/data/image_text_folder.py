"""`image_text_folder`: a user's own folder of images with captions, as a TFDS dataset.

Captions come from, in this order of precedence:
  * `captions.jsonl` at the folder root: one JSON object per line with the
    image path relative to the folder in `image` (or `file`) and the caption in
    `caption` (or `text`); an image listed several times gives several examples;
  * `captions.csv` at the root, with the same column names and a header row;
  * a sidecar `NAME.txt` next to `NAME.jpg` (any image extension), whose whole
    text (whitespace collapsed) is the caption.
Subfolders are searched. Images without a caption, unreadable, truncated or
non-image files are skipped and counted; the build prints a summary by reason
(also saved in the dataset's metadata.json). Images are downscaled at build
time so the shorter side is at most `image_size` (default 256) and stored
encoded (JPEG for JPEG/WebP sources, PNG otherwise). A few images are held out
as the `test` split (`test_fraction`, by image, deterministic).

  python -m dalle_jax.tools.build_dataset image_text_folder --src FOLDER --data_dir D
then train with `--config.data.dataset=image_text_folder/NAME --config.data.data_dir=D`
(NAME: the folder's name, or --name; plain `image_text_folder` works when D
holds only one such dataset).
"""
import collections
import csv
import dataclasses
import json
import multiprocessing
import os
import re
import shutil
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from dalle_jax.data import images as img_lib
from dalle_jax.data import records
from dalle_jax.data import shapes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
INDEX_FILES = ("captions.jsonl", "captions.csv")
DEFAULT_IMAGE_SIZE = 256
MIN_SIDE = 8  # smaller images are skipped as "too small"


class FolderError(ValueError):
  """The folder cannot give a dataset (missing, empty, no captions, nothing usable)."""


def _norm_caption(text):
  return " ".join(str(text).split())


def _read_index(src):
  """Captions from captions.jsonl / captions.csv: {relpath: [captions]}, or None."""
  for name in INDEX_FILES:
    path = os.path.join(src, name)
    if not os.path.exists(path):
      continue
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
      if name.endswith(".jsonl"):
        for n, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            rows.append((n, json.loads(line)))
          except json.JSONDecodeError as e:
            raise FolderError(f"{path}:{n}: not valid JSON ({e})") from None
      else:
        rows = list(enumerate(csv.DictReader(f), 2))
    index = collections.defaultdict(list)
    for n, row in rows:
      if not isinstance(row, dict):
        raise FolderError(f"{path}:{n}: expected an object with 'image' and 'caption'")
      image = row.get("image", row.get("file"))
      caption = row.get("caption", row.get("text"))
      if image is None or caption is None:
        raise FolderError(f"{path}:{n}: needs fields 'image' (or 'file') and 'caption' "
                          f"(or 'text'); got {sorted(row)}")
      index[os.path.normpath(str(image))].append(_norm_caption(caption))
    return index
  return None


def scan_folder(src):
  """Lists (relpath, caption) pairs of `src` without decoding any image.

  Returns (pairs sorted by path, Counter of skipped files by reason).
  Raises FolderError when the folder is missing, empty or has no captions.
  """
  if not os.path.isdir(src):
    raise FolderError(f"image folder {src!r} does not exist or is not a directory")
  skipped = collections.Counter()
  image_files, text_files = [], set()
  for root, dirs, files in os.walk(src):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in sorted(files):
      if name.startswith("."):
        continue
      rel = os.path.normpath(os.path.relpath(os.path.join(root, name), src))
      ext = os.path.splitext(name)[1].lower()
      if rel in INDEX_FILES:
        continue
      if ext in IMAGE_EXTENSIONS:
        image_files.append(rel)
      elif ext == ".txt":
        text_files.add(rel)
      else:
        skipped["not an image"] += 1
  index = _read_index(src)
  if not image_files:
    raise FolderError(f"no images found in {src!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
  if index is None and not text_files:
    raise FolderError(f"no captions found in {src!r}: put a NAME.txt next to each image, or "
                      f"a captions.jsonl / captions.csv index at the folder root")
  pairs = []
  image_set = set(image_files)
  if index is not None:
    for rel in sorted(index):
      if rel not in image_set:
        skipped["listed in index but missing"] += len(index[rel])
  used_txt = set()
  for rel in image_files:
    if index is not None and rel in index:
      captions = index[rel]
    else:
      txt = os.path.splitext(rel)[0] + ".txt"
      if txt not in text_files:
        skipped["no caption"] += 1
        continue
      used_txt.add(txt)
      with open(os.path.join(src, txt), encoding="utf-8", errors="replace") as f:
        captions = [_norm_caption(f.read())]
    for caption in captions:
      if caption:
        pairs.append((rel, caption))
      else:
        skipped["empty caption"] += 1
  if index is None:
    skipped["caption without image"] += len(text_files - used_txt)
  if not pairs:
    raise FolderError(f"no captioned images in {src!r}: {summarize(skipped) or 'nothing found'}")
  return pairs, +skipped  # (+ drops zero counts)


def summarize(counter):
  return ", ".join(f"{n} {reason}" for reason, n in sorted(counter.items()) if n)


def load_image(path, image_size):
  """File -> (encoded bytes, (h, w)) with shorter side <= image_size; raises ImageError."""
  with open(path, "rb") as f:
    data = f.read()
  img, fmt = img_lib.open_image(data, draft_size=image_size)
  w, h = img.size
  if min(w, h) < MIN_SIDE:
    raise img_lib.ImageError("too small", f"{w}x{h}")
  if min(w, h) > image_size:
    scale = image_size / min(w, h)
    img = img.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))),
                     img_lib.Image.BICUBIC)
  out_fmt = "JPEG" if fmt in ("JPEG", "WEBP", "MPO") else "PNG"
  return img_lib.encode(img, out_fmt), (img.size[1], img.size[0])


def _load_job(args):
  path, image_size = args
  try:
    return load_image(path, image_size)[0], None
  except img_lib.ImageError as e:
    return None, e.reason
  except OSError:
    return None, "unreadable"


def split_pairs(pairs, test_fraction):
  """Deterministic hold-out by image (all captions of an image stay together).

  Returns (train pairs, test pairs); test is empty with fewer than 2 images.
  """
  names = sorted({rel for rel, _ in pairs})
  n_test = 0
  if test_fraction > 0 and len(names) >= 2:
    n_test = min(len(names) - 1, max(1, round(len(names) * test_fraction)))
  test_names = set(names[int(i)] for i in np.linspace(0, len(names) - 1, n_test).round()) \
      if n_test else set()
  train = [p for p in pairs if p[0] not in test_names]
  test = [p for p in pairs if p[0] in test_names]
  return train, test


def config_name_for(src):
  name = re.sub(r"[^A-Za-z0-9_]+", "_", os.path.basename(os.path.normpath(src))).strip("_")
  return (name or "folder").lower()


@dataclasses.dataclass(eq=False)
class ImageTextFolderConfig(tfds.core.BuilderConfig):
  src: str = ""
  image_size: int = DEFAULT_IMAGE_SIZE
  test_fraction: float = 0.01
  num_workers: int = 0  # image decoding processes at build time; 0 = cpu count


class ImageTextFolder(tfds.core.GeneratorBasedBuilder):
  """A folder of captioned images (see module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # nothing downloaded: no checksums file (see shapes.Shapes)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes
            "caption": tfds.features.Text(),
            "filename": tfds.features.Text(),
        }),
        disable_shuffling=True,  # the pipeline shuffles
        metadata=tfds.core.MetadataDict(),
    )

  def download_and_prepare(self, **kwargs):  # pylint: disable=arguments-differ
    try:
      super().download_and_prepare(**kwargs)
    finally:
      tmp = getattr(self, "_tmp_dir", None)
      if tmp and os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)

  def _decode_all(self, paths):
    """Decodes + resizes every image once (in parallel), into a temporary records file.

    Returns ({relpath: index in the temporary records}, Counter of failures).
    """
    c = self.builder_config
    root = os.path.dirname(os.fspath(self.data_path))  # data_dir/image_text_folder/NAME
    self._tmp_dir = tempfile.mkdtemp(prefix=".decoded-", dir=os.path.dirname(root))
    jobs = [(os.path.join(c.src, rel), c.image_size) for rel in paths]
    workers = c.num_workers or os.cpu_count() or 1
    pool = (multiprocessing.get_context("spawn").Pool(min(workers, 16))
            if workers > 1 and len(jobs) > 64 else None)
    skipped, position = collections.Counter(), {}

    def valid():
      results = pool.imap(_load_job, jobs, chunksize=8) if pool else map(_load_job, jobs)
      for rel, (data, reason) in zip(
          paths, tqdm(results, total=len(jobs), desc="decoding images", unit=" img")):
        if data is None:
          skipped[reason] += 1
        else:
          position[rel] = len(position)
          yield {"image": data}

    try:
      records.write_records(self._tmp_dir, "decoded", valid())
    except ValueError:  # no examples at all
      pass
    finally:
      if pool:
        pool.close()
        pool.join()
    return position, skipped

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    if not c.src:
      raise FolderError("image_text_folder: no source folder given (--src FOLDER)")
    pairs, skipped = scan_folder(c.src)
    position, failed = self._decode_all(sorted({rel for rel, _ in pairs}))
    skipped.update(failed)
    self.info.metadata["src"] = os.path.abspath(c.src)
    self.info.metadata["skipped"] = dict(skipped)
    if not position:
      raise FolderError(f"no readable images in {c.src!r}: skipped {summarize(skipped)}")
    train, test = split_pairs([p for p in pairs if p[0] in position], c.test_fraction)
    self.info.metadata["num_images"] = len(position)
    splits = {"train": self._generate_examples(train, position)}
    if test:
      splits["test"] = self._generate_examples(test, position)
    return splits

  def _generate_examples(self, pairs, position):
    decoded = records.RecordsSource(self._tmp_dir, "decoded")
    for key, (rel, caption) in enumerate(pairs):
      yield key, {"image": decoded[position[rel]]["image"], "caption": caption, "filename": rel}


def builder(data_dir, config="", src=None, image_size=DEFAULT_IMAGE_SIZE, test_fraction=0.01,
            num_workers=0, **kwargs):
  """Builder to build from `src` (config name defaults to the folder's name), or to read.

  For reading (src None) an empty `config` picks the only dataset built in
  data_dir; an error lists them when there are several.
  """
  if src is not None:
    config = ImageTextFolderConfig(name=config or config_name_for(src), src=src,
                                   image_size=image_size, test_fraction=test_fraction,
                                   num_workers=num_workers)
  else:
    if not config:
      root = os.path.join(data_dir, "image_text_folder")
      built = sorted(d for d in os.listdir(root) if not d.startswith(".") and any(
          os.path.exists(os.path.join(root, d, v, "dataset_info.json"))
          for v in os.listdir(os.path.join(root, d)))) if os.path.isdir(root) else []
      if len(built) != 1:
        raise FolderError(
            f"dataset 'image_text_folder' in {data_dir}: "
            + (f"several were built ({', '.join(built)}); name one as "
               f"'image_text_folder/NAME'" if built else
               "nothing built there yet; run python -m dalle_jax.tools.build_dataset "
               f"image_text_folder --src FOLDER --data_dir {data_dir}"))
      config = built[0]
    config = ImageTextFolderConfig(name=config)
  shapes.quiet_custom_config_warning()
  return ImageTextFolder(data_dir=data_dir, config=config, file_format="array_record", **kwargs)
