"""gs:// workdirs against an in-process stand-in bucket.

The stand-in is an fsspec file system registered for the gs/gcs protocols
(what etils.epath uses for gs:// without TensorFlow), storing objects under a
local directory and refusing what a bucket cannot do (append). Orbax writes
array data through TensorStore's own GCS driver, which fsspec cannot
intercept: the test points that driver at the same directory, and answers
orbax's hierarchical-namespace query (a google-cloud-storage call) with "flat".
A path mangled by os.path (e.g. "gs:/bucket/run" under the working directory)
never reaches the bucket, so the files are looked up there.
"""
import importlib
import json
import os

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils
from PIL import Image

from dalle_jax import paths
from dalle_jax.data import pipeline, records
from dalle_jax.train import checkpoint as ckpt_lib
from dalle_jax.train import loop
from tests import toy_task

# The module (the package attribute of the same name is its read-only view).
_FSSPEC_REGISTRY = importlib.import_module("fsspec.registry")._registry


def _strip(path):
  path = os.fspath(path)
  for prefix in ("gs://", "gcs://"):
    if path.startswith(prefix):
      return path[len(prefix):]
  return path


class _BucketFS(DirFileSystem):
  """gs://BUCKET/KEY -> ROOT/BUCKET/KEY; no append, as on an object store."""
  protocol = ("gs", "gcs")
  cachable = False  # a new root for every test
  root = None

  def __init__(self, *args, **kwargs):
    super().__init__(path=self.root, fs=LocalFileSystem())

  @classmethod
  def _strip_protocol(cls, path):
    return _strip(path)

  def _join(self, path):
    if isinstance(path, (list, tuple)):
      return super()._join([_strip(p) for p in path])
    return super()._join(_strip(path) if isinstance(path, str) else path)

  def open(self, path, mode="rb", *args, **kwargs):
    if "a" in mode:
      raise NotImplementedError(f"{path}: an object store cannot append (mode={mode!r})")
    return super().open(path, mode, *args, **kwargs)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The local directory standing in for gs://; the cwd is a separate empty dir."""
  root = tmp_path / "store"
  root.mkdir()
  monkeypatch.setattr(_BucketFS, "root", str(root))
  for proto in ("gs", "gcs"):  # undone after the test, like every monkeypatch
    monkeypatch.setitem(_FSSPEC_REGISTRY, proto, _BucketFS)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", lambda p: {
      "driver": "file", "path": os.path.join(str(root), _strip(p))})
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield root
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  assert not os.listdir(cwd), f"something wrote a mangled path under the cwd: {os.listdir(cwd)}"


def _losses(text):
  return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines()) if "loss" in r}


def test_paths_resolve_keeps_uris_and_absolutises_local(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.resolve("gs://b/run/")) == "gs://b/run"
  assert os.fspath(paths.resolve("run")) == os.path.join(str(tmp_path), "run")
  assert paths.is_remote("s3://b/x") and not paths.is_remote("/b/x")


def test_train_resume_and_load_from_a_bucket(bucket, tmp_path):
  config = toy_task.get_config()
  config.mesh.data = 8
  config.total_steps = 8
  config.eval_every = 0
  config.preview_every = 4
  loop.train(config, "gs://bucket/run", max_steps=4)  # stopped after the step-4 checkpoint
  run = bucket / "bucket" / "run"
  assert (run / "checkpoints" / "4").is_dir()
  state = loop.train(config, "gs://bucket/run")  # resumes from the bucket
  assert int(state.step) == 8

  local = loop.train(config, str(tmp_path / "local"))  # uninterrupted, on local disk
  remote_losses = _losses((run / "metrics.jsonl").read_text())
  local_losses = _losses((tmp_path / "local" / "metrics.jsonl").read_text())
  assert sorted(remote_losses) == list(range(1, 9))
  np.testing.assert_allclose([remote_losses[s] for s in range(1, 9)],
                             [local_losses[s] for s in range(1, 9)], rtol=1e-6)
  assert json.loads((run / "config.json").read_text())["total_steps"] == 8
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4", "8"]
  assert Image.open(run / "previews" / "pred_000008.png").size == (toy_task.DIM, 8)
  assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())

  # Inference loading reads the bucket too (config + newest checkpoint's params).
  cfg, variables = ckpt_lib.load_model("gs://bucket/run", use_ema=False)
  assert cfg.total_steps == 8
  for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert epath.Path("gs://bucket/run/config.json").exists()


def test_read_config_fetches_a_bucket_tokenizer_to_local_disk(bucket):
  """Tokenizer libraries open local files: a workdir's tokenizer snapshot (a
  file or a Hugging Face directory) is copied out of the bucket."""
  for name, is_dir in (("spm.model", False), ("hf_tok", True)):
    root = epath.Path(f"gs://bucket/imported_{name}")
    src = root / "tokenizer" / name
    payload = os.urandom(64)
    if is_dir:
      (src / "sub").mkdir(parents=True)
      (src / "sub" / "vocab.json").write_bytes(payload)
    else:
      src.parent.mkdir(parents=True)
      src.write_bytes(payload)
    (root / "config.json").write_text(json.dumps({"text": {"path": f"tokenizer/{name}"}}))
    local = ckpt_lib.read_config(os.fspath(root)).text.path
    assert not paths.is_remote(local) and os.path.isabs(local)
    got = os.path.join(local, "sub", "vocab.json") if is_dir else local
    with open(got, "rb") as f:
      assert f.read() == payload


def test_records_written_to_and_read_from_a_bucket(bucket):
  """Encoded records (array_record opens local files only) in a bucket: written
  (staged locally, uploaded), then found through data_dir and read back."""
  examples = [{"codes": np.arange(6, dtype=np.int32) + i, "caption": f"example {i}"}
              for i in range(7)]
  assert records.write_records("gs://bucket/data/codes", "train", examples, num_shards=2) == 7
  names = sorted(os.listdir(bucket / "bucket" / "data" / "codes"))
  assert names == [records.INDEX_FILE, "train.array_record-00000-of-00002",
                   "train.array_record-00001-of-00002"]
  source = pipeline.load_source({"dataset": "codes", "data_dir": "gs://bucket/data"}, "train")
  assert len(source) == 7
  for i in (0, 3, 6):
    np.testing.assert_array_equal(source[i]["codes"], examples[i]["codes"])
    assert source[i]["caption"] == examples[i]["caption"]
  assert [r["caption"] for r in source.__getitems__([5, 1])] == ["example 5", "example 1"]
  # A TFDS dataset cannot be read from a bucket: named before any build starts.
  with pytest.raises(ValueError, match=r"data_dir 'gs://bucket/data' is a bucket.*'shapes'"):
    pipeline.load_source({"dataset": "shapes", "data_dir": "gs://bucket/data"}, "train")


def test_imported_checkpoint_in_a_bucket(bucket):
  """save_imported / load_model / load_params (init_from) on a gs:// directory."""
  config = toy_task.get_config()
  params = {"wi": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4)},
            "wo": {"kernel": np.ones((4, 2), np.float32)}}
  ckpt_lib.save_imported("gs://bucket/imported", config, {"params": params})
  assert (bucket / "bucket" / "imported" / "config.json").is_file()
  cfg, variables = ckpt_lib.load_model("gs://bucket/imported")
  assert cfg.family == "tests.toy_task"
  np.testing.assert_array_equal(np.asarray(variables["params"]["wi"]["kernel"]),
                                params["wi"]["kernel"])
  target = jax.tree.map(lambda x: jax.numpy.full(x.shape, -1.0), params)  # on one device
  got = ckpt_lib.load_params("gs://bucket/imported", target, include="wi")
  np.testing.assert_array_equal(np.asarray(got["wi"]["kernel"]), params["wi"]["kernel"])
  np.testing.assert_array_equal(np.asarray(got["wo"]["kernel"]), -np.ones((4, 2)))


def test_model_loaders_and_tokenizers_read_a_bucket(bucket, tmp_path):
  """models.loader (check/load, one-line errors naming the gs:// path), the diffusion
  Pipeline.load and every tokenizer kind read straight from gs:// paths."""
  import ml_collections
  import transformers
  from dalle_jax.configs import diffusion as diffusion_configs
  from dalle_jax.data import tokenizers as tk
  from dalle_jax.models import loader
  from dalle_jax.sampling import diffusion as diffusion_sampling

  config = toy_task.get_config()
  config.family = "vqgan"
  params = {"wi": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
  ckpt_lib.save_imported("gs://bucket/vq", config, {"params": params})
  assert loader.check("gs://bucket/vq", "vqgan", flag="--vqgan").family == "vqgan"
  _, variables = loader.load("gs://bucket/vq", "vqgan", flag="--vqgan")
  np.testing.assert_array_equal(np.asarray(variables["params"]["wi"]["kernel"]),
                                params["wi"]["kernel"])
  with pytest.raises(loader.ModelNotFoundError, match=r"^--vqgan gs://bucket/nope: no such"):
    loader.check("gs://bucket/nope", "vqgan", flag="--vqgan")
  with pytest.raises(loader.ModelPathError, match=r"^--clip gs://bucket/vq: a 'vqgan' model"):
    loader.check("gs://bucket/vq", "clip", flag="--clip")
  epath.Path("gs://bucket/run/checkpoints").mkdir(parents=True)
  epath.Path("gs://bucket/run/config.json").write_text(config.to_json())
  with pytest.raises(loader.ModelPathError, match="gs://bucket/run: a training workdir without"):
    loader.check("gs://bucket/run", "vqgan")

  dconfig = diffusion_configs.get_config("ddpm_cifar10")  # unconditional: no tokenizer
  unet = {"unet": {"conv_in": {"kernel": np.ones((3, 3, 3, 4), np.float32)}}}
  ckpt_lib.save_imported("gs://bucket/diffusion", dconfig, {"params": unet})
  pipe = diffusion_sampling.Pipeline.load("gs://bucket/diffusion")
  np.testing.assert_array_equal(np.asarray(pipe.params["unet"]["conv_in"]["kernel"]),
                                unet["unet"]["conv_in"]["kernel"])

  # Tokenizers: a local original against the same files read from the bucket.
  vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
  vocab.update((c, len(vocab) + i) for i, c in enumerate("Ġabcdefghijklmnopqrstuvwxyz"))
  merges = [("Ġ", "r"), ("Ġr", "e"), ("Ġre", "d")]
  vocab.update((a + b, len(vocab) + i) for i, (a, b) in enumerate(merges))
  local_hf = str(tmp_path / "hf")
  transformers.BartTokenizer(vocab=vocab, merges=merges).save_pretrained(local_hf)
  local_bpe = tmp_path / "bpe"  # min-dalle's files
  local_bpe.mkdir()
  (local_bpe / "vocab.json").write_text(json.dumps(vocab))
  (local_bpe / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  for name, local in (("hf", local_hf), ("bpe", str(local_bpe))):
    paths.copy(local, f"gs://bucket/{name}")
  captions = [f"a {c} circle on a red background" for c in ("red", "blue", "green")]
  tk.train_sentencepiece(captions * 4, "gs://bucket/t5/spiece.model", vocab_size=40,
                         lowercase=False)
  assert (bucket / "bucket" / "t5" / "spiece.model").is_file()
  paths.copy("gs://bucket/t5", str(tmp_path / "t5"))
  texts = ["a red one", "", "green circle on red"]
  for kind, remote, local in (("hf", "gs://bucket/hf", local_hf),
                              ("bart_bpe", "gs://bucket/bpe", str(local_bpe)),
                              ("t5", "gs://bucket/t5", str(tmp_path / "t5"))):
    cfg = lambda p: ml_collections.ConfigDict(dict(tokenizer=kind, path=p, vocab_size=0,
                                                   max_len=8, lowercase=False))
    want = tk.get_tokenizer(cfg(local)).encode(texts)
    got = tk.get_tokenizer(cfg(remote)).encode(texts)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)
