"""Our own array_record datasets for derived data (e.g. VQGAN codes + captions).

Layout of a records directory:
  records.json                          format, features, splits (count, files), user meta
  <split>.array_record-00000-of-0000N   one msgpack-encoded example per record

Examples are flat dicts of str / bytes / int / float / numpy arrays. They are
serialised with msgpack (numpy arrays as an extension type: dtype, shape, raw
bytes) — never pickle. Shards are written round-robin (example i goes to shard
i % N), and `RecordsSource` undoes that so index i is the i-th example written.

  write_records(out_dir, "train", ({"codes": c, "caption": t} for ...),
                meta={"vqgan": path, "grid": [16, 16]})
  src = RecordsSource(out_dir, "train"); len(src); src[0] -> dict
A data config whose `dataset` is such a directory is read by the same pipeline
(dalle_jax.data.pipeline).
"""
import json
import os
import shutil
import tempfile

import msgpack
import numpy as np

from dalle_jax import paths

FORMAT = "dalle_jax.records"
VERSION = 1
INDEX_FILE = "records.json"
_ND_EXT = 1  # msgpack extension code for numpy arrays


def _default(obj):
  if isinstance(obj, np.generic):
    obj = np.asarray(obj)
  if isinstance(obj, np.ndarray):
    if obj.dtype.kind not in "biuf":
      raise TypeError(f"cannot serialise a numpy array of dtype {obj.dtype}; only "
                      "bool/int/uint/float arrays (use str for text)")
    arr = np.ascontiguousarray(obj)
    return msgpack.ExtType(_ND_EXT, msgpack.packb(
        [arr.dtype.str, list(arr.shape), arr.tobytes()], use_bin_type=True))
  raise TypeError(f"cannot serialise a value of type {type(obj).__name__}")


def _ext_hook(code, data):
  if code != _ND_EXT:
    return msgpack.ExtType(code, data)
  dtype, shape, raw = msgpack.unpackb(data, raw=False)
  return np.frombuffer(bytearray(raw), dtype=np.dtype(dtype)).reshape(shape)


def serialize(example):
  if not isinstance(example, dict):
    raise TypeError(f"an example must be a dict of features, got {type(example).__name__}")
  return msgpack.packb(example, default=_default, use_bin_type=True)


def deserialize(data):
  return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def _feature_spec(value):
  if isinstance(value, str):
    return {"dtype": "str", "shape": []}
  if isinstance(value, (bytes, bytearray)):
    return {"dtype": "bytes", "shape": []}
  if isinstance(value, bool):
    return {"dtype": "bool", "shape": []}
  if isinstance(value, int):
    return {"dtype": "int64", "shape": []}
  if isinstance(value, float):
    return {"dtype": "float64", "shape": []}
  arr = np.asarray(value)
  return {"dtype": str(arr.dtype), "shape": list(arr.shape)}


def _merge_spec(spec, new, key, index):
  if spec["dtype"] != new["dtype"] or len(spec["shape"]) != len(new["shape"]):
    raise ValueError(f"feature {key!r} of example {index} is {new['dtype']}{new['shape']}, "
                     f"but earlier examples had {spec['dtype']}{spec['shape']}")
  # A dimension that varies between examples is recorded as None.
  spec["shape"] = [a if a == b else None for a, b in zip(spec["shape"], new["shape"])]


def read_index(out_dir):
  path = paths.resolve(out_dir) / INDEX_FILE
  if not path.exists():
    raise FileNotFoundError(f"{out_dir} is not a records directory: no {INDEX_FILE}")
  index = json.loads(path.read_text())
  if index.get("format") != FORMAT:
    raise ValueError(f"{path}: not a {FORMAT} index (format={index.get('format')!r})")
  return index


def is_records_dir(path):
  return bool(path) and (paths.resolve(path) / INDEX_FILE).is_file()


def write_records(out_dir, split, examples, num_shards=1, meta=None, progress=False):
  """Writes `examples` (an iterable of flat dicts) as split `split` of `out_dir`.

  All examples must have the same keys and per-key dtype/rank. Shard files are
  written under temporary names and renamed when complete (in a bucket: staged
  locally, then uploaded), then `records.json` is replaced atomically (other
  splits already there are kept; `meta` is merged
  into the directory's meta). Write different splits of one directory one after
  another, not concurrently. Returns the number of examples written.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  out = paths.resolve(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  index = (read_index(out) if is_records_dir(out) else
           {"format": FORMAT, "version": VERSION, "features": {}, "splits": {}, "meta": {}})
  names = [f"{split}.array_record-{k:05d}-of-{num_shards:05d}" for k in range(num_shards)]
  # array_record writes local files only: a bucket's shards are staged locally.
  stage = tempfile.mkdtemp(prefix="dalle_jax_records_") if paths.is_remote(out) else None
  tmp_paths = [os.path.join(stage or out, f"{n}.tmp-{os.getpid()}") for n in names]
  writers = [array_record_module.ArrayRecordWriter(p, "group_size:1") for p in tmp_paths]
  features, count = None, 0
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    examples = tqdm(examples, desc=f"writing {split}", unit=" examples",
                    total=len(examples) if hasattr(examples, "__len__") else None)
  try:
    for i, ex in enumerate(examples):
      specs = {k: _feature_spec(v) for k, v in ex.items()}
      if features is None:
        features = specs
      elif specs.keys() != features.keys():
        raise ValueError(f"example {i} has features {sorted(specs)}, but earlier examples "
                         f"had {sorted(features)}")
      else:
        for k, s in specs.items():
          _merge_spec(features[k], s, k, i)
      writers[i % num_shards].write(serialize(ex))
      count += 1
  except BaseException:
    for w, p in zip(writers, tmp_paths):
      w.close()
      os.remove(p)
    if stage:
      shutil.rmtree(stage, ignore_errors=True)
    raise
  for w in writers:
    w.close()
  if count == 0:
    for p in tmp_paths:
      os.remove(p)
    if stage:
      shutil.rmtree(stage, ignore_errors=True)
    raise ValueError(f"write_records({out_dir!r}, {split!r}): no examples to write")
  old_files = index["splits"].get(split, {}).get("files", [])
  for tmp, name in zip(tmp_paths, names):
    if stage:
      paths.copy(tmp, out / name)
    else:
      os.replace(tmp, out / name)
  if stage:
    shutil.rmtree(stage, ignore_errors=True)
  for name in old_files:
    if name not in names and (out / name).exists():
      (out / name).unlink()
  for k, s in features.items():
    if k in index["features"]:
      _merge_spec(index["features"][k], s, k, f"(split {split})")
    else:
      index["features"][k] = s
  index["splits"][split] = {"num_examples": count, "files": names}
  index["meta"].update(meta or {})
  paths.write_text(out / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True))
  return count


class RecordsSource:
  """Random access to split `split` of a records directory: len(), [i], __getitems__."""

  def __init__(self, out_dir, split):
    self.out_dir = out_dir
    self.split = split
    index = read_index(out_dir)
    if split not in index["splits"]:
      raise ValueError(f"records directory {out_dir} has no split {split!r}; it has "
                       f"{sorted(index['splits'])}")
    info = index["splits"][split]
    self.features = index["features"]
    self.meta = index["meta"]
    files = [paths.resolve(out_dir) / f for f in info["files"]]
    for f in files:
      if not f.exists():
        raise FileNotFoundError(f"records file {f} listed in {INDEX_FILE} is missing")
    # array_record reads local files only: a bucket's shards are fetched once, here
    # (not in _open, which grain workers repeat after unpickling).
    self.files = [paths.local_copy(f) for f in files]
    self._len = int(info["num_examples"])
    self._source = None  # opened lazily (and again after pickling, for grain workers)

  def _open(self):
    if self._source is None:
      from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
      self._source = array_record_data_source.ArrayRecordDataSource(self.files)
      n = len(self._source)
      if n != self._len:
        raise ValueError(f"{self.out_dir}: split {self.split!r} has {n} records on disk but "
                         f"{INDEX_FILE} says {self._len}")
      # Round-robin shards: example i is at position i // S of shard i % S.
      sizes = [(self._len - k + len(self.files) - 1) // len(self.files)
               for k in range(len(self.files))]
      self._offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return self._source

  def _keys(self, indices):
    s = len(self.files)
    return [int(self._offsets[i % s] + i // s) for i in indices]

  def __len__(self):
    return self._len

  def _check(self, i):
    i = int(i)
    if i < 0:
      i += self._len
    if not 0 <= i < self._len:
      raise IndexError(f"index {i} out of range for {self.out_dir}:{self.split} "
                       f"({self._len} examples)")
    return i

  def __getitem__(self, i):
    src = self._open()
    return deserialize(src[self._keys([self._check(i)])[0]])

  def __getitems__(self, indices):
    src = self._open()
    keys = self._keys([self._check(i) for i in indices])
    return [deserialize(r) for r in src.__getitems__(keys)]

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __repr__(self):
    return f"RecordsSource({self.out_dir!r}, {self.split!r}, num_examples={self._len})"
