"""One path type for local directories and buckets (gs://, s3://, ... via etils.epath).

Workdirs, checkpoints and records may live in an object store, where
`os.path.abspath` would turn "gs://b/run" into "/cwd/gs:/b/run" and plain
`open`/`os.replace` do not reach. `resolve` gives an `epath.Path` (local paths
made absolute, URIs kept as they are); everything else here is the little that
differs between a file system and a bucket: no append, no atomic rename (an
object store writes a whole object at once on close instead).

Remote schemes go through fsspec (gcsfs, s3fs, ...) unless TensorFlow is
installed, as etils.epath chooses; nothing here needs TensorFlow.
"""
import json
import math
import os
import shutil
import tempfile

from etils import epath


def is_remote(path):
  """True for a URI such as gs://bucket/dir (anything but the local file system)."""
  return "://" in os.fspath(path)


def resolve(path):
  """epath.Path of `path`: local ones expanded (~) and absolute, URIs untouched."""
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def write_text(path, text):
  """Writes `text` to `path` so that a reader never sees it half written."""
  path = epath.Path(path)
  if is_remote(path):  # an object appears whole when its upload completes
    path.write_text(text)
    return
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def json_text(obj, indent=2):
  """Strict JSON of a result or settings tree: non-finite floats (a scheduler's
  lambda_min_clipped = -inf) become the strings "inf", "-inf", "nan", which Python's
  float() reads back, where json.dumps would write -Infinity that strict parsers reject."""
  def strict(x):
    if isinstance(x, float) and not math.isfinite(x):
      return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
      return {k: strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [strict(v) for v in x]
    return x
  return json.dumps(strict(obj), indent=indent, allow_nan=False)


def copy(src, dst):
  """Copies a file or a directory tree (local or remote, either way) to dst."""
  src, dst = epath.Path(src), epath.Path(dst)
  if not is_remote(src) and not is_remote(dst):
    if src.is_dir():
      shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
      dst.parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(src, str(dst) + ".tmp")
      os.replace(str(dst) + ".tmp", dst)
    return
  if src.is_dir():
    for child in src.iterdir():
      copy(child, dst / child.name)
    return
  dst.parent.mkdir(parents=True, exist_ok=True)
  dst.write_bytes(src.read_bytes())


def local_copy(path):
  """A local file-system path holding `path`'s contents: `path` itself when it
  is local, else a fresh copy (file or directory) in a new temporary directory,
  for readers that open only local files (sentencepiece, tokenizers)."""
  if not is_remote(path):
    return os.fspath(path)
  dst = os.path.join(tempfile.mkdtemp(prefix="dalle_jax_remote_"), epath.Path(path).name)
  copy(path, dst)
  return dst
