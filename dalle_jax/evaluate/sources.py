"""REAL / FAKE inputs of the evaluation commands, checked before any computation.

A source spec is one of:
  DIR                   a folder of images (data.images.IMAGE_EXTS, sorted by name, not recursive)
  FILE.npz with arr_0   a sample batch, uint8 (N, H, W, 3) (guided-diffusion's format)
  FILE.npz with mu      reference statistics (mu, sigma) as pytorch-fid / clean-fid / TTUR write
  DATASET:SPLIT         a TFDS dataset by name in --data_dir (e.g. shapes:test, coco_captions:val)

`extract` runs a source through an InceptionExtractor, every process reading only its rows of
each global batch (`local_batches`, which CLIP score's cosines share), and returns float64
Statistics merged over all processes (and, when asked, every row's features gathered in source
order).
"""
import os
import sys

import numpy as np

from dalle_jax.data import images as img_lib
from dalle_jax.evaluate import features as feat_lib
from dalle_jax.evaluate import stats as stats_lib
from dalle_jax.models import inception


class SourceError(ValueError):
  pass


class FolderSource:
  kind = "folder"

  def __init__(self, path, names):
    self.path, self.names = path, names
    self.description = f"folder {path} ({len(names)} images)"

  def __len__(self):
    return len(self.names)

  def load(self, i):
    """uint8 (H, W, 3), or None for an unreadable file (skipped and counted)."""
    try:
      img, _ = img_lib.open_image(os.path.join(self.path, self.names[i]))
    except (img_lib.ImageError, OSError):
      return None
    return np.asarray(img)


class NpzSource:
  kind = "npz"

  def __init__(self, path, array):
    self.path, self.array = path, array
    self.description = f"sample batch {path} ({array.shape[0]}x{array.shape[1]}x{array.shape[2]})"

  def __len__(self):
    return len(self.array)

  def load(self, i):
    return self.array[i]


class DatasetSource:
  kind = "tfds"

  def __init__(self, name, split, source):
    self.name, self.split, self.source = name, split, source
    self.description = f"dataset {name}:{split} ({len(source)} examples)"

  def __len__(self):
    return len(self.source)

  def load(self, i):
    try:
      return img_lib.decode(self.source[i]["image"])
    except img_lib.ImageError:
      return None

  def captions(self, n):
    return [str(self.source[i].get("caption", "")) for i in range(n)]


class StatsSource:
  kind = "stats"

  def __init__(self, path, mu, sigma, n):
    self.path, self.mu, self.sigma, self.n = path, mu, sigma, n
    self.description = f"statistics {path} (D={mu.shape[0]}" + (f", N={n})" if n else ")")

  def __len__(self):
    return self.n or 0


class Limited:
  """The first `n` items of a source."""

  def __init__(self, source, n):
    self.source, self.n = source, min(n, len(source))
    self.kind = source.kind
    self.description = f"{source.description}, first {self.n}"

  def __len__(self):
    return self.n

  def load(self, i):
    return self.source.load(i)

  def __getattr__(self, name):
    return getattr(self.source, name)


def open_source(spec, flag="--real", data_dir="data", allow_stats=True, limit=None):
  """A source from its spec; one-line SourceError/FileNotFoundError naming `flag` otherwise."""
  spec = os.path.expanduser(spec)
  if os.path.isdir(spec):
    names = sorted(f for f in os.listdir(spec) if f.lower().endswith(img_lib.IMAGE_EXTS))
    if not names:
      raise SourceError(f"{flag} {spec}: no images ({', '.join(img_lib.IMAGE_EXTS)}) "
                        "in this folder")
    src = FolderSource(spec, names)
  elif os.path.isfile(spec):
    if not spec.endswith(".npz"):
      raise SourceError(f"{flag} {spec}: expected a folder, an .npz or DATASET:SPLIT")
    try:
      f = np.load(spec)
      keys = f.files
    except Exception as e:  # pylint: disable=broad-except
      raise SourceError(f"{flag} {spec}: not a readable .npz ({e})") from None
    if "mu" in keys and "sigma" in keys:
      if not allow_stats:
        raise SourceError(f"{flag} {spec} holds statistics (mu, sigma); this metric needs images")
      mu, sigma, n = stats_lib.load_stats(spec)
      if mu.shape[0] != inception.POOL_DIM:
        raise SourceError(f"{flag} {spec}: statistics of dimension {mu.shape[0]}, "
                          f"not Inception's {inception.POOL_DIM}")
      return StatsSource(spec, mu, sigma, n)
    if "arr_0" not in keys:
      raise SourceError(f"{flag} {spec}: an .npz needs arr_0 (images) or mu + sigma; has {keys}")
    arr = f["arr_0"]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or not len(arr):
      raise SourceError(f"{flag} {spec}: arr_0 must be uint8 (N, H, W, 3), got "
                        f"{arr.dtype} {arr.shape}")
    src = NpzSource(spec, arr)
  elif ":" in spec:
    name, _, split = spec.rpartition(":")
    from dalle_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TFDS is heavy)
    try:
      src = DatasetSource(name, split, pipeline.load_source(
          {"dataset": name, "data_dir": data_dir}, split))
    except (ValueError, FileNotFoundError) as e:
      raise SourceError(f"{flag} {spec}: {str(e).splitlines()[0]}") from None
  else:
    raise SourceError(f"{flag} {spec}: no such file or folder, and not DATASET:SPLIT")
  return Limited(src, limit) if limit else src


class Extracted:
  """What `extract` returns: merged statistics, skipped count, optional features (source order)."""

  def __init__(self, stats, skipped, features=None):
    self.stats, self.skipped = stats, skipped
    self.features = features  # {'pool': (N, 2048), 'logits_unbiased': (N, 1008)} or None

  @property
  def n(self):
    return self.stats.n


def local_batches(source, global_batch, local_batch, progress=None):
  """This process's rows of every global batch of `source`: yields (rows, images, valid).

  Global batch b covers rows [b*G, (b+1)*G); process p reads its contiguous `local_batch`
  slice. `rows` are the slice's source indices (fewer than local_batch past the end);
  `images` always holds local_batch uint8 images, padding rows (past the end, unreadable
  files) repeating one readable image; `valid` (local_batch,) marks the real ones.
  """
  import jax  # pylint: disable=g-import-not-at-top
  n, g, loc, p = len(source), global_batch, local_batch, jax.process_index()
  bar = None
  if progress and p == 0:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=n, desc=progress, unit=" images", file=sys.stderr)
  filler = next((im for im in map(source.load, range(n)) if im is not None), None)
  if filler is None:
    raise SourceError(f"{source.description}: no readable image")
  for b in range(-(-n // g)):
    rows = list(range(b * g + p * loc, min(b * g + (p + 1) * loc, n)))
    images = [source.load(i) for i in rows]
    valid = np.array([im is not None for im in images] + [False] * (loc - len(images)))
    yield rows, [im if im is not None else filler for im in images] + [filler] * (
        loc - len(images)), valid
    if bar is not None:
      bar.update(min(g, n - b * g))
  if bar is not None:
    bar.close()


def extract(source, extractor, keep_features=False, progress=None, transform=None):
  """Statistics (and features) of every image of `source`, sharded over devices and processes.

  Rows as `local_batches`; padding rows and unreadable images are excluded from the sums.
  `transform` maps each local batch (a list of uint8 images) before the network, e.g. a crop
  or a VQGAN reconstruction.
  """
  import jax  # pylint: disable=g-import-not-at-top
  n = len(source)
  loc = extractor.local_batch
  num_batches = -(-n // extractor.batch_size)
  stats = stats_lib.Statistics.zeros(inception.POOL_DIM)
  kept, masks, skipped = [], [], 0
  for rows, batch, valid in local_batches(source, extractor.batch_size, loc, progress):
    skipped += len(rows) - int(valid[:len(rows)].sum())
    feats = extractor.run_local(transform(batch) if transform else batch)
    stats.update(feats[valid, :inception.POOL_DIM])
    if keep_features:
      kept.append(feats)
      masks.append(valid)
  stats = stats.allreduce_processes()
  skipped = sum_processes(skipped)
  if not keep_features:
    return Extracted(stats, skipped)
  feats = np.concatenate(kept) if kept else np.zeros((0, inception.POOL_DIM + inception.NUM_CLASSES))
  mask = np.concatenate(masks) if masks else np.zeros((0,), bool)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    # (P, batches*loc, F) -> global order: batch-major, then process, then row.
    all_f = multihost_utils.process_allgather(feats.astype(np.float32))
    all_m = multihost_utils.process_allgather(mask)
    nproc = all_f.shape[0]
    feats = all_f.reshape(nproc, num_batches, loc, -1).transpose(1, 0, 2, 3).reshape(
        -1, all_f.shape[-1])
    mask = all_m.reshape(nproc, num_batches, loc).transpose(1, 0, 2).reshape(-1)
  return Extracted(stats, skipped, feat_lib.split_outputs(feats[mask]))


def sum_processes(value):
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.sum(multihost_utils.process_allgather(np.int32(value))))
