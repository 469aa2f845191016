"""Input pipeline: random-access sources and a checkpointable grain iterator.

  source = load_source(config.data, "train")         # len(source), source[i] -> dict
  it = make_iterator(config.data, "train", config.batch_size, seed=config.seed)
  batch = next(it)   # {'image': f32 (B, S, S, 3) in [-1, 1], 'caption': (B,) str, ...}
                     # S = data.image_size, or data.crop_size when that is set
  state = it.get_state()  # small JSON dict; it.set_state(state) resumes exactly
  it = prefetch_to_device(it, mesh)  # global jax.Arrays, placed ahead by a thread

Throughput (config.data): `read_threads` batches are assembled concurrently
(decoding and resizing release the GIL), up to `prefetch` batches ahead (so
at most min(read_threads, prefetch) at once); `num_workers` > 0 moves that
into worker processes, each with those threads and that buffer. With `image_dtype =
"uint8"` images stay uint8 (a quarter of the bytes to copy and transfer) and
the jitted step scales them with `normalize_images`; `prefetch_to_device` > 0
makes the trainer place that many batches on the mesh ahead of the step (a
thread: DevicePrefetch). None of these changes
which examples a batch holds, nor (once normalised) its values.

Ordering: the whole dataset is one stream of positions 0, 1, 2, ... (epoch e
covers [e*N, (e+1)*N), each epoch a fresh seeded permutation). Global batch k is
positions [k*G, (k+1)*G); process p takes the p-th contiguous slice of B = G/P.
So the global batch does not depend on the process count, and the iterator's
state is just the next position.

`data_cfg.dataset` is a TFDS name ("shapes", "shapes/32px_5000",
"image_text_folder/NAME", any installed TFDS dataset built in data_dir) or a
directory written by dalle_jax.data.records.write_records (e.g. VQGAN codes).
"""
import os
import queue
import sys
import threading
import warnings

import grain
import numpy as np

from dalle_jax import paths
from dalle_jax.data import images as img_lib
from dalle_jax.data import records

_BUILD_CMD = "python -m dalle_jax.tools.build_dataset"
IMAGE_DTYPES = ("float32", "uint8")
# data.<key>: (default when the config lacks it, smallest valid value)
_COUNT_KEYS = {"read_threads": (4, 1), "prefetch": (4, 1), "num_workers": (0, 0),
               "prefetch_to_device": (0, 0)}  # the trainer's DevicePrefetch size (0 = off)


def _cfg(data_cfg, key, default):
  try:
    return data_cfg.get(key, default)
  except AttributeError:
    return getattr(data_cfg, key, default)


# --------------------------------------------------------------------------- sources

def _to_str(v):
  if isinstance(v, bytes):
    return v.decode("utf-8", errors="replace")
  if isinstance(v, np.ndarray) and v.dtype == object and v.ndim == 0:
    return _to_str(v.item())
  return v


def _first_caption(v):
  """A caption from the usual TFDS layouts: str/bytes, a list, or {'text': [...]}."""
  if isinstance(v, dict):
    v = v.get("text", v.get("caption"))
  if isinstance(v, (list, tuple, np.ndarray)) and not (isinstance(v, np.ndarray) and v.ndim == 0):
    v = v[0] if len(v) else ""
  return _to_str(v)


class TfdsSource:
  """Wraps a tfds data source so examples are flat dicts with str captions.

  Keeps 'image' (encoded bytes or uint8 array), 'caption' (from caption/text/
  captions), and the other scalar or array features; nested dicts are dropped.
  """

  def __init__(self, source, name):
    self._source = source
    self.name = name

  def __len__(self):
    return len(self._source)

  @staticmethod
  def _normalize(ex):
    out = {}
    for k, v in ex.items():
      if k in ("caption", "text", "captions"):
        out["caption"] = _first_caption(v)
      elif k == "image":
        out[k] = v
      elif isinstance(v, dict):
        continue
      else:
        out[k] = _to_str(v)
    return out

  def __getitem__(self, i):
    return self._normalize(self._source[int(i)])

  def __getitems__(self, indices):
    return [self._normalize(ex) for ex in self._source.__getitems__([int(i) for i in indices])]

  def __repr__(self):
    return f"TfdsSource({self.name}, num_examples={len(self)})"


def _builder(dataset, data_dir):
  """(builder, auto_build) for a TFDS dataset name, with our builders' config syntax."""
  name, _, config = dataset.partition("/")
  if name == "shapes":
    from dalle_jax.data import shapes  # pylint: disable=g-import-not-at-top
    return shapes.builder(data_dir, config), True
  if name == "image_text_folder":
    from dalle_jax.data import image_text_folder  # pylint: disable=g-import-not-at-top
    return image_text_folder.builder(data_dir, config), False
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(dataset, data_dir=data_dir, file_format="array_record"), False
  except Exception as e:  # pylint: disable=broad-except
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"unknown dataset {dataset!r} (data_dir {data_dir!r}): {first_line}\n"
                     f"Use 'shapes', 'image_text_folder/NAME', an installed TFDS dataset, or "
                     f"a records directory (dalle_jax.data.records).") from None


def build_shapes(builder):
  """Prepares the synthetic shapes dataset (seconds); used on first use."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  print(f"Building the synthetic 'shapes' dataset ({builder.builder_config.name}) in "
        f"{builder.data_path} (first use; takes seconds)...", flush=True)
  tfds.disable_progress_bar()
  try:
    builder.download_and_prepare()
  except Exception:  # pylint: disable=broad-except
    if not builder.is_prepared():  # else another process built it at the same time
      raise
  finally:
    tfds.enable_progress_bar()


def load_source(data_cfg, split):
  """Random-access source of `split` (len, [i], __getitems__) -> flat example dicts.

  'shapes' is built into data_dir the first time; other TFDS datasets must be
  built with tools.build_dataset (the error says how).
  """
  dataset = str(_cfg(data_cfg, "dataset", "shapes"))
  data_dir = os.path.expanduser(str(_cfg(data_cfg, "data_dir", "data")))
  for path in (dataset, os.path.join(data_dir, dataset)):
    if records.is_records_dir(path):
      return records.RecordsSource(path, split)
  if dataset.startswith(("/", ".", "~")) or dataset.count("/") > 1 or os.path.isdir(dataset):
    raise ValueError(f"dataset {dataset!r} looks like a path but is not a records directory "
                     f"(no {records.INDEX_FILE} there)")
  if paths.is_remote(data_dir):  # array_record (under TFDS) opens local files only
    raise ValueError(f"data_dir {data_dir!r} is a bucket: only records directories "
                     f"(tools.encode_dataset) are read from one; build TFDS dataset {dataset!r} "
                     f"on local disk (or a gcsfuse mount)")
  builder, auto_build = _builder(dataset, data_dir)
  if not builder.is_prepared():
    if auto_build:
      build_shapes(builder)
      builder, _ = _builder(dataset, data_dir)  # re-read the info written by the build
    else:
      name, _, config = dataset.partition("/")
      how = (f"{_BUILD_CMD} image_text_folder --src FOLDER --data_dir {data_dir}"
             + (f" --name {config}" if config else "")
             if name == "image_text_folder" else f"{_BUILD_CMD} {dataset} --data_dir {data_dir}")
      raise FileNotFoundError(f"dataset {dataset!r} is not built in {data_dir!r} "
                              f"(looked in {builder.data_path}). Build it with:\n  {how}")
  base_split = split.split("[")[0]
  if base_split not in builder.info.splits:
    raise ValueError(f"dataset {dataset!r} has no split {base_split!r}; it has "
                     f"{sorted(builder.info.splits)}")
  return TfdsSource(builder.as_data_source(split), f"{dataset}:{split}")


def captions(data_cfg, split, max_examples=None):
  """The captions of `split` (e.g. to train a tokenizer), in dataset order."""
  source = load_source(data_cfg, split)
  n = len(source) if max_examples is None else min(len(source), max_examples)
  out = []
  for start in range(0, n, 1024):
    out += [str(ex["caption"]) for ex in source.__getitems__(range(start, min(n, start + 1024)))]
  return out


# --------------------------------------------------------------------------- batching

def normalize_images(x):
  """Batch images as the pipeline ships them -> float32 in [-1, 1].

  uint8 images (data.image_dtype="uint8") are scaled as images.to_float does;
  float images are already in [-1, 1] and come back unchanged. Works on numpy
  and on jax arrays, traced or not: call it inside the jitted step so the host
  ships bytes and the device does the arithmetic.
  """
  if np.issubdtype(x.dtype, np.integer):
    return img_lib.to_float(x)
  return x


def _stack(key, values):
  v0 = values[0]
  if isinstance(v0, (str, bytes)):
    out = np.empty(len(values), dtype=object)
    out[:] = [_to_str(v) for v in values]
    return out
  try:
    arr = np.stack([np.asarray(v) for v in values])
  except ValueError as e:
    raise ValueError(f"cannot batch feature {key!r}: shapes differ between examples "
                     f"({[np.shape(v) for v in values[:4]]}...); pass a `preprocess` that "
                     f"makes them equal") from e
  if arr.dtype == np.int64:
    arr = arr.astype(np.int32)
  elif arr.dtype == np.float64:
    arr = arr.astype(np.float32)
  return arr


class _BatchLoader:
  """step -> this process's slice of global batch `step` (a picklable grain map)."""

  def __init__(self, source, order, start, global_batch, process_index, process_count,
               image_size, random_crop, seed, preprocess, image_dtype, crop_size=0,
               random_window=False):
    self.source = source
    self.order = order
    self.start = start
    self.global_batch = global_batch
    self.local_batch = global_batch // process_count
    self.process_index = process_index
    self.image_size = image_size
    self.random_crop = random_crop
    self.seed = seed
    self.preprocess = preprocess
    self.uint8 = image_dtype == "uint8"
    self.crop_size = crop_size
    self.random_window = random_window

  def positions(self, step):
    first = self.start + step * self.global_batch + self.process_index * self.local_batch
    return range(first, first + self.local_batch)

  def __call__(self, step):
    positions = self.positions(step)
    indices = [int(self.order[p]) for p in positions]
    if hasattr(self.source, "__getitems__"):
      examples = self.source.__getitems__(indices)
    else:
      examples = [self.source[i] for i in indices]
    examples = [dict(ex) for ex in examples]
    for j, (p, ex) in enumerate(zip(positions, examples)):
      if "image" in ex:
        rng = np.random.default_rng([self.seed, p]) if self.random_crop else None
        try:
          image = img_lib.decode(ex["image"])
        except img_lib.ImageError as e:
          raise ValueError(f"example {self.order[p]} of {self.source!r}: bad image ({e})") from None
        image = img_lib.resize_and_crop(image, self.image_size, rng)
        if self.crop_size and self.random_window:  # its own stream: random_crop's unchanged
          window_rng = np.random.default_rng([self.seed, p, 1])
          image = img_lib.random_crop(image, self.crop_size, window_rng)
        elif self.crop_size:
          image = img_lib.center_crop(image, self.crop_size)
        ex["image"] = image
      if self.preprocess is not None:
        if "image" in ex and not self.uint8:
          ex["image"] = img_lib.to_float(ex["image"])
        examples[j] = self.preprocess(ex)
    batch = {k: _stack(k, [ex[k] for ex in examples]) for k in examples[0]}
    if "image" in batch:
      if self.uint8 and batch["image"].dtype != np.uint8:
        # A preprocess that casts would hand normalize_images [0, 255] floats.
        raise ValueError(f"data.image_dtype='uint8' but `preprocess` returned "
                         f"{batch['image'].dtype} images; keep them uint8 (the step "
                         f"normalises them with pipeline.normalize_images)")
      if self.preprocess is None and not self.uint8:
        batch["image"] = img_lib.to_float(batch["image"])
    return batch


class DataIterator:
  """Iterator of process-local batches (dicts of numpy arrays), checkpointable.

  get_state() -> {"position": next global position, "seed", "num_examples", ...};
  set_state(state) makes the next batches those an uninterrupted run would give.
  """

  def __init__(self, source, *, global_batch_size, seed, shuffle, repeat, process_index,
               process_count, image_size, random_crop, preprocess, num_workers=0,
               read_threads=4, prefetch=4, image_dtype="float32", crop_size=0,
               random_window=False, name=""):
    self.source = source
    self.name = name
    self.num_examples = len(source)
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = int(seed) % 2**32
    self.shuffle = shuffle
    self.repeat = repeat
    self.process_index = process_index
    self.process_count = process_count
    self.image_size = image_size
    self.random_crop = random_crop
    self.preprocess = preprocess
    self.num_workers = num_workers
    self.read_threads = read_threads
    self.prefetch = prefetch
    self.image_dtype = image_dtype
    self.crop_size = crop_size
    self.random_window = random_window
    self.position = 0  # global position of the next batch's first example
    self._it = None
    if not repeat and self.num_examples < global_batch_size:
      raise ValueError(f"{name}: {self.num_examples} examples, fewer than one global batch "
                       f"of {global_batch_size} (batches drop the remainder)")

  @property
  def steps_per_epoch(self):
    return self.num_examples // self.global_batch_size

  def _make(self):
    order = grain.MapDataset.range(self.num_examples)
    if self.shuffle:
      order = order.shuffle(seed=self.seed)  # reseeded every epoch once repeated
    if self.repeat:
      order = order.repeat()
      num_steps = sys.maxsize // (2 * self.global_batch_size)
    else:
      num_steps = max(0, (self.num_examples - self.position) // self.global_batch_size)
    loader = _BatchLoader(self.source, order, self.position, self.global_batch_size,
                          self.process_index, self.process_count, self.image_size,
                          self.random_crop, self.seed, self.preprocess, self.image_dtype,
                          self.crop_size, self.random_window)
    ds = grain.MapDataset.range(num_steps).map(loader)
    # Each element is a whole batch, a pure function of its step: threads
    # assemble several at once and grain hands them out in step order.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.read_threads,
                                              prefetch_buffer_size=self.prefetch))
    if self.num_workers > 0:
      from absl import flags  # pylint: disable=g-import-not-at-top
      if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (outside absl.app)
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
    return iter(ds)

  def __iter__(self):
    return self

  def __next__(self):
    if self._it is None:
      self._it = self._make()
    batch = next(self._it)
    self.position += self.global_batch_size
    return batch

  def get_state(self):
    return {"position": int(self.position), "seed": int(self.seed),
            "num_examples": int(self.num_examples), "shuffle": bool(self.shuffle)}

  def set_state(self, state):
    if int(state.get("num_examples", self.num_examples)) != self.num_examples:
      warnings.warn(f"{self.name}: resuming a data iterator saved with "
                    f"{state['num_examples']} examples on a dataset of {self.num_examples}; "
                    "the order will differ from the original run")
    self.close()
    self.position = int(state["position"])
    self.seed = int(state.get("seed", self.seed))
    self.shuffle = bool(state.get("shuffle", self.shuffle))

  def close(self):
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def crop_size(data_cfg):
  """data.crop_size, checked: 0 (whole images) or the side of the window taken from each
  data.image_size image, in (0, data.image_size]."""
  v, size = _cfg(data_cfg, "crop_size", 0), int(_cfg(data_cfg, "image_size", 64))
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= size:
    raise ValueError(f"data.crop_size={v!r} must be 0 (whole images) or a window side in "
                     f"(0, data.image_size={size}]")
  return int(v)


def make_iterator(data_cfg, split, global_batch_size, *, seed, preprocess=None, shuffle=True,
                  repeat=True, process_index=None, process_count=None, random_window=None):
  """Process-local batches of `split`: see the module docstring for the order.

  Images are decoded, resized (shorter side) to data_cfg.image_size, center- or
  (data_cfg.random_crop) randomly cropped and scaled to float32 [-1, 1], or
  left uint8 with data_cfg.image_dtype="uint8" (see normalize_images);
  `preprocess(example) -> example` then runs per example, on the image in that
  dtype. Captions come out as an object array of str; int64/float64 features
  as int32/float32. data_cfg.read_threads / prefetch / num_workers: see the
  module docstring.

  data_cfg.crop_size > 0 (super-resolution stages that train on crops) then keeps
  only a crop_size x crop_size window of each image_size image: a random one per
  example (seeded by (seed, position), so a resumed run gets the same windows)
  when `random_window`, else the centre one. random_window=None: random for
  data_cfg.train_split, centred for any other split (evaluation).
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of "
                     f"the process count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  image_dtype = str(_cfg(data_cfg, "image_dtype", "float32"))
  if image_dtype not in IMAGE_DTYPES:
    raise ValueError(f"data.image_dtype={image_dtype!r}; valid: {'|'.join(IMAGE_DTYPES)}")
  counts = {}
  for key, (default, low) in _COUNT_KEYS.items():
    v = counts[key] = _cfg(data_cfg, key, default)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
      raise ValueError(f"data.{key}={v!r}; must be an integer >= {low}")
  crop = crop_size(data_cfg)
  if random_window is None:
    random_window = split == str(_cfg(data_cfg, "train_split", "train"))
  source = load_source(data_cfg, split)
  if len(source) == 0:
    raise ValueError(f"{_cfg(data_cfg, 'dataset', '')}:{split} is empty")
  return DataIterator(
      source, global_batch_size=global_batch_size, seed=seed,
      shuffle=bool(shuffle and _cfg(data_cfg, "shuffle", True)), repeat=repeat,
      process_index=process_index, process_count=process_count,
      image_size=int(_cfg(data_cfg, "image_size", 64)),
      random_crop=bool(_cfg(data_cfg, "random_crop", False)), preprocess=preprocess,
      num_workers=int(counts["num_workers"]), read_threads=int(counts["read_threads"]),
      prefetch=int(counts["prefetch"]), image_dtype=image_dtype, crop_size=crop,
      random_window=bool(random_window), name=f"{_cfg(data_cfg, 'dataset', '')}:{split}")


# --------------------------------------------------------------------------- device prefetch

_DONE = object()  # the wrapped iterator ended


class DevicePrefetch:
  """Batches put on the mesh ahead of time by a background thread; checkpointable.

  next() -> dict of global jax.Arrays (parallel.shard_batch: the numeric
  fields, split over the batch axes), with up to `size` more already placed
  while the step computes. get_state() is the wrapped iterator's state after
  the batches handed out so far (the buffered ones are read again after a
  restore), so a checkpoint resumes exactly; set_state() drops the buffer.
  """

  def __init__(self, iterator, mesh, size=2):
    if size < 1:
      raise ValueError(f"device prefetch size must be >= 1, got {size}")
    self.iterator = iterator
    self.mesh = mesh
    self.size = size
    self._state = iterator.get_state()
    self._thread = self._queue = self._slots = self._stop = None

  def _fill(self, q, slots, stop):
    # Imported here: jax/flax stay out of grain's worker processes, which
    # import this module to unpickle the batch loader.
    from dalle_jax import parallel  # pylint: disable=g-import-not-at-top
    try:
      while True:
        while not slots.acquire(timeout=0.1):  # at most `size` batches ahead
          if stop.is_set():
            return
        if stop.is_set():
          return
        try:
          batch = next(self.iterator)
        except StopIteration:
          return q.put((_DONE, None))
        q.put((parallel.shard_batch(batch, self.mesh), self.iterator.get_state()))
    except BaseException as e:  # pylint: disable=broad-except
      q.put((e, None))  # raised by the consumer's next()

  def _start(self):
    self._stop = threading.Event()
    self._slots = threading.Semaphore(self.size)
    self._queue = queue.Queue()
    self._thread = threading.Thread(target=self._fill,
                                    args=(self._queue, self._slots, self._stop),
                                    name="device-prefetch", daemon=True)
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._thread is None:
      self._start()
    batch, state = self._queue.get()
    self._slots.release()
    if batch is _DONE:
      self._queue.put((_DONE, None))  # later calls end too
      raise StopIteration
    if isinstance(batch, BaseException):
      self._halt()
      raise batch
    self._state = state
    return batch

  def get_state(self):
    return dict(self._state)

  def set_state(self, state):
    self._halt()
    self.iterator.set_state(state)
    self._state = self.iterator.get_state()

  def _halt(self):
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
    self._thread = self._queue = None

  def close(self):
    self._halt()
    self.iterator.close()

  @property
  def steps_per_epoch(self):
    return self.iterator.steps_per_epoch


def prefetch_to_device(iterator, mesh, size=2):
  """Wraps a DataIterator so its batches arrive as sharded jax.Arrays (see DevicePrefetch)."""
  return DevicePrefetch(iterator, mesh, size)
