"""Batched, device-sharded T5 text encoding (a frozen encoder's hidden states).

  enc = T5TextEncoder.load(path)          # imported checkpoint, HF T5 folder or pipeline folder
  hidden_nld, mask_nl = enc.encode_texts(["a corgi wearing a red bowtie"])

Texts are tokenized with the checkpoint's T5 tokenizer (EOS appended, padded
with id 0 to `max_len`), split into batches over the local devices, and
encoded by one jitted program per batch shape. Parameters are placed by their
logical axis names under `config.logical_axis_rules` on the encoder's mesh
(`mesh=`, with axes data / fsdp / tensor; default: every local device on
'data', i.e. replicated weights), so
an XXL encoder can be split over 'fsdp' / 'tensor' by passing such a mesh.

Shapes: N texts, L tokens per text (max_len), D model width.
"""
import os
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dalle_jax import parallel
from dalle_jax.convert import hf_t5
from dalle_jax.models import loader
from dalle_jax.models import t5 as t5_lib


def load_t5(path, flag="--t5"):
  """(config, variables) from an imported T5 checkpoint or a Hugging Face T5 /
  diffusers pipeline folder (converted in memory)."""
  full = os.path.abspath(os.path.expanduser(os.fspath(path))) if path else path
  if full and os.path.isdir(full) and hf_t5.is_hf_t5_dir(full):
    return hf_t5.load_hf_t5(full)
  return loader.load(path, "t5", flag)


class T5TextEncoder:
  """Texts -> (hidden states (N, L, D) float32, mask (N, L) bool)."""

  def __init__(self, config, variables, batch_size=64, max_len=None, tokenizer=None,
               show_progress=False, mesh=None):
    self.config = config
    self.model = t5_lib.build_model(config)
    self.max_len = int(max_len or config.text.max_len)
    if self.max_len < 1:
      raise ValueError(f"max_len={self.max_len}: must be positive")
    self.show_progress = show_progress
    self._tokenizer = tokenizer
    if mesh is None:
      mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())
    self.mesh = mesh
    self.n_rows = parallel.batch_axis_size(mesh)
    self.batch_size = max(self.n_rows, batch_size // self.n_rows * self.n_rows)
    rules = parallel.rules_from_config(config)
    model = self.model
    with parallel.mesh_context(mesh, config):
      abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                   *t5_lib.dummy_inputs(config, 1, 2)))
      shardings = parallel.logical_shardings({"params": abstract["params"]}, mesh, rules)
    self.variables = jax.device_put({"params": parallel.unbox(variables)["params"]}, shardings)
    self._rows = parallel.batch_sharding(mesh, 2)
    self._out = NamedSharding(mesh, P(self._rows.spec[0], None, None))

    def encode(v, ids_bt, mask_bt):
      return model.apply(v, ids_bt, mask_bt)

    self._encode = jax.jit(encode, out_shardings=self._out)

  @classmethod
  def load(cls, path, flag="--t5", **kw):
    config, variables = load_t5(path, flag)
    return cls(config, variables, **kw)

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      from dalle_jax.data.tokenizers import get_tokenizer  # pylint: disable=g-import-not-at-top
      if not self.config.text.get("path"):
        raise ValueError("this T5 checkpoint has no tokenizer (config.text.path is empty)")
      self._tokenizer = get_tokenizer(self.config.text)
    return self._tokenizer

  def _batches(self, n, desc):
    starts = range(0, n, self.batch_size)
    if self.show_progress and n > self.batch_size:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      starts = tqdm(starts, desc=desc, unit="batch", file=sys.stderr)
    return starts

  def encode_ids(self, ids_nl, mask_nl):
    """Token ids and mask (N, L) -> hidden states (N, L, D) float32 (numpy)."""
    ids_nl, mask_nl = np.asarray(ids_nl, np.int32), np.asarray(mask_nl, bool)
    if ids_nl.ndim != 2 or ids_nl.shape != mask_nl.shape:
      raise ValueError(f"ids and mask must both be (N, L), got {ids_nl.shape} and {mask_nl.shape}")
    out = []
    with parallel.mesh_context(self.mesh, self.config):
      for s in self._batches(len(ids_nl), "texts"):
        ids, mask = ids_nl[s:s + self.batch_size], mask_nl[s:s + self.batch_size]
        m = len(ids)
        # Every device gets the same number of rows; a short last batch is padded to
        # the others' size (one compiled program: an XXL compile outlasts the padding).
        pad = self.batch_size - m if len(ids_nl) > self.batch_size else (-m) % self.n_rows
        if pad:
          ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])
          mask = np.concatenate([mask, np.repeat(mask[-1:], pad, 0)])
        put = lambda x: jax.device_put(x, self._rows)
        out.append(np.asarray(self._encode(self.variables, put(ids), put(mask)))[:m])
    if not out:
      return np.zeros((0, ids_nl.shape[1], self.config.model.d_model), np.float32)
    return np.concatenate(out).astype(np.float32)

  def encode_texts(self, texts):
    """Texts -> (hidden states (N, L, D) float32, mask (N, L) bool)."""
    texts = list(texts)
    if texts:
      ids, mask = self.tokenizer.encode(texts, self.max_len)
    else:
      ids, mask = np.zeros((0, self.max_len), np.int32), np.zeros((0, self.max_len), bool)
    return self.encode_ids(ids, mask), mask
