"""Autoregressive text->image task: DALL·E (decoder-only) and DALL·E mini (encoder-decoder).

config.model.layout picks the model; both train on datasets pre-encoded by
tools.encode_dataset (records with 'codes' + 'caption'), tokenising captions
with the shared tokenizer in `preprocess`.

Objective:
  dalle       text_weight * CE(text) + (1 - text_weight) * CE(image codes)
              (paper: 1/8 + 7/8); the text targets include the position-specific pads.
  dalle_mini  CE over image codes only.
Captions are replaced by the blank caption (the tokenizer's encoding of "")
with probability `blank_caption_prob`, which teaches the unconditional model
that classifier-free guidance needs at sampling time.

When config.data.dataset is an encoded records directory, its meta (grid,
codebook size, VQGAN path) fills model.image_grid / model.image_vocab_size /
config.vqgan, so the workdir's config.json says which VQGAN made the codes.
"""
import json
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import parallel
from dalle_jax.data import images as images_lib
from dalle_jax.data import records
from dalle_jax.data import tokenizers
from dalle_jax.models import dalle
from dalle_jax.models import dalle_mini
from dalle_jax.models import loader
from dalle_jax.models import losses
from dalle_jax.sampling import decode
from dalle_jax.sampling import generate
from dalle_jax.tasks import base

log = logging.getLogger(__name__)

_VOCAB_KEYS = ("image_vocab_size", "n_embed", "codebook_size", "num_codes", "vocab_size")


def dataset_meta(data_cfg):
  """(grid, vocab, vqgan) from an encoded records directory; None where unknown."""
  path = data_cfg.dataset
  if not records.is_records_dir(path):
    return None, None, None
  index = records.read_index(path)
  meta = index.get("meta", {})
  grid = meta.get("grid")
  if grid is None:
    shape = index.get("features", {}).get("codes", {}).get("shape")
    if shape and all(s for s in shape):
      grid = list(shape) if len(shape) == 2 else None
      if shape and len(shape) == 1:
        side = int(round(np.sqrt(shape[0])))
        grid = [side, side] if side * side == shape[0] else None
  if isinstance(grid, int):
    grid = [grid, grid]
  vocab = next((meta[k] for k in _VOCAB_KEYS if meta.get(k)), None)
  vqgan = meta.get("vqgan")
  if vocab is None and vqgan:
    cfg_file = os.path.join(vqgan, "config.json")
    if os.path.isfile(cfg_file):
      with open(cfg_file) as f:
        vocab = json.load(f).get("model", {}).get("n_embed")
  return grid, vocab, vqgan


def _mesh_of(tree):
  """The multi-device mesh `tree`'s arrays are placed on, or None (one device)."""
  for x in jax.tree.leaves(tree):
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
      return sharding.mesh
  return None


class DalleTask(base.Task):
  name = "dalle"

  def __init__(self, config):
    super().__init__(config)
    c = self.config  # the task's own copy: what it resolves below lands there
    self.layout = c.model.get("layout", "dalle")
    if self.layout not in ("dalle", "dalle_mini"):
      raise ValueError(f"config.model.layout={self.layout!r}: expected 'dalle' or 'dalle_mini'")
    self._apply_dataset_meta()
    self._tokenizer = None
    if not c.model.text_vocab_size:
      c.model.text_vocab_size = int(self.tokenizer.vocab_size)
      log.info("model.text_vocab_size = %d (from the tokenizer)", c.model.text_vocab_size)
    if c.text.max_len != c.model.text_len:
      raise ValueError(f"config.text.max_len={c.text.max_len} must equal "
                       f"config.model.text_len={c.model.text_len}")
    self.model = self._build(decode=False)
    self.num_codes = int(c.model.image_grid) ** 2
    self.text_len = int(c.model.text_len)

  # --- setup ----------------------------------------------------------------------
  def _apply_dataset_meta(self):
    c = self.config
    try:
      grid, vocab, vqgan = dataset_meta(c.data)
    except (OSError, ValueError) as e:
      log.warning("could not read the encoded dataset's meta (%s)", e)
      return
    if grid is not None:
      if grid[0] != grid[1]:
        raise ValueError(f"{c.data.dataset}: code grid {grid} is not square")
      if grid[0] != c.model.image_grid:
        log.info("model.image_grid = %d (from %s)", grid[0], c.data.dataset)
        c.model.image_grid = int(grid[0])
    if vocab is not None and int(vocab) != c.model.image_vocab_size:
      log.info("model.image_vocab_size = %d (from %s)", vocab, c.data.dataset)
      c.model.image_vocab_size = int(vocab)
      if self.layout == "dalle_mini":  # codes + a start token
        c.model.image_embed_size = max(int(c.model.image_embed_size), int(vocab) + 1)
        c.model.start_token = int(vocab)
    if vqgan and not c.get("vqgan"):
      c.vqgan = os.path.abspath(vqgan)

  def _build(self, decode=False):
    c = self.config
    kw = dict(decode=decode, dtype=c.dtype, param_dtype=c.param_dtype, remat=c.remat,
              scan=c.scan_layers)
    if self.layout == "dalle":
      return dalle.from_config(c.model, **kw)
    return dalle_mini.from_config(c.model, **kw)

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      c = self.config
      self._tokenizer = tokenizers.get_tokenizer(c.text, data_cfg=c.data)
      if c.text.tokenizer == "sentencepiece" and not c.text.path:
        # record the trained model so that sampling finds the same tokenizer
        c.text.path = os.path.abspath(tokenizers.cached_sentencepiece_path(c.text, c.data))
      if self._tokenizer.vocab_size > (c.model.text_vocab_size or np.inf):
        raise ValueError(f"tokenizer has {self._tokenizer.vocab_size} ids but "
                         f"model.text_vocab_size={c.model.text_vocab_size}")
    return self._tokenizer

  def blank_text(self):
    ids, mask = self.tokenizer.encode([""], self.text_len)
    return ids[0], mask[0]

  # --- data -----------------------------------------------------------------------
  def preprocess(self, example):
    caption = example.get("caption", "")
    ids, mask = self.tokenizer.encode([caption], self.text_len)
    codes = np.asarray(example["codes"], np.int32).reshape(-1)
    if codes.shape[0] != self.num_codes:
      raise ValueError(f"example has {codes.shape[0]} codes; model.image_grid="
                       f"{self.config.model.image_grid} expects {self.num_codes}")
    out = {"text": ids[0], "text_mask": mask[0], "codes": codes}
    # in place as well: a pipeline may keep the dict it passed in
    example.clear()
    example.update(out)
    return example

  def dummy_batch(self, batch_size):
    return {"text": np.zeros((batch_size, self.text_len), np.int32),
            "text_mask": np.ones((batch_size, self.text_len), bool),
            "codes": np.zeros((batch_size, self.num_codes), np.int32)}

  # --- model ----------------------------------------------------------------------
  def _forward_args(self, batch):
    text, mask = batch["text"].astype(jnp.int32), batch["text_mask"].astype(bool)
    if self.layout == "dalle":
      return (dalle.pad_text(text, mask, self.config.model.text_vocab_size), batch["codes"])
    return (text, mask, batch["codes"])

  def init(self, rng, batch):
    return self.model.init(rng, *self._forward_args(batch))

  def _drop_captions(self, batch, rng):
    p = float(self.config.blank_caption_prob)
    if p <= 0:
      return batch
    ids, mask = self.blank_text()
    drop_b1 = jax.random.bernoulli(rng, p, (batch["text"].shape[0], 1))
    return dict(batch, text=jnp.where(drop_b1, jnp.asarray(ids)[None], batch["text"]),
                text_mask=jnp.where(drop_b1, jnp.asarray(mask)[None], batch["text_mask"]))

  def _losses(self, params, batch):
    args = self._forward_args(batch)
    codes = batch["codes"]
    metrics = {}
    if self.layout == "dalle":
      text_logits, image_logits = self.model.apply({"params": params}, *args)
      text_ce = losses.softmax_cross_entropy(text_logits, args[0]).mean()
      metrics["text_loss"] = text_ce
    else:
      image_logits = self.model.apply({"params": params}, *args)
      image_logits = image_logits[..., :self.config.model.image_vocab_size]
      text_ce = 0.0
    image_ce = losses.softmax_cross_entropy(image_logits, codes).mean()
    w = float(self.config.loss.text_weight) if self.layout == "dalle" else 0.0
    loss = w * text_ce + (1 - w) * image_ce
    metrics["image_loss"] = image_ce
    metrics["accuracy"] = losses.label_is_top(image_logits, codes).mean()
    return loss, metrics

  def loss_fn(self, params, model_state, batch, rng, step):
    batch = self._drop_captions(batch, jax.random.fold_in(rng, 1))
    loss, metrics = self._losses(params, batch)
    return loss, (metrics, model_state)

  def eval_fn(self, params, model_state, batch, rng):
    loss, metrics = self._losses(params, batch)
    return dict(metrics, loss=loss)

  # --- sampling preview -------------------------------------------------------------
  def preview(self, params, model_state, batch, rng):
    """One row per prompt of the batch: its encoded ground truth, then samples.

    Multi-host: `batch` may hold global arrays and `params` may be sharded over
    a mesh spanning processes. The prompts are gathered to every process, the
    rows decoded over the parameters' mesh (`decode.generate(mesh=)`: scanned
    parameters unstacked for the per-layer decoder, placed by logical names),
    the codes gathered with process_allgather, and every process decodes the
    same images with its local VQGAN (the trainer writes them on process 0).
    """
    c = self.config
    s = c.sampling
    if not c.get("vqgan"):
      log.info("preview skipped: config.vqgan is not set (no decoder for codes)")
      return {}
    if getattr(self, "_preview_vqgan", None) is None:
      try:
        self._preview_vqgan = loader.load_vqgan(c.vqgan, "config.vqgan")
      except (FileNotFoundError, ValueError) as e:
        log.warning("preview skipped: %s", e)
        return {}
    vq_config, vq_vars = self._preview_vqgan
    n_p = min(int(s.num_prompts), batch["text"].shape[0])
    n_s = int(s.samples_per_prompt)
    text = np.repeat(parallel.to_host(batch["text"])[:n_p], n_s, 0)
    mask = np.repeat(parallel.to_host(batch["text_mask"])[:n_p], n_s, 0)
    ids, umask = self.blank_text()
    sp = decode.SamplingParams(float(s.temperature), int(s.top_k), float(s.top_p),
                               float(s.guidance_scale))
    if getattr(self, "_preview_decoder", None) is None:
      self._preview_decoder = decode.make_decoder(c)
    mesh = _mesh_of(params)
    codes = decode.generate(self._preview_decoder, params, text, mask, rng=rng, sp=sp,
                            uncond_text=ids, uncond_mask=umask,
                            chunk=max(int(s.chunk), self.num_codes), mesh=mesh,
                            rules=parallel.rules_from_config(c) if mesh is not None else ())
    grid = int(c.model.image_grid)
    if mesh is not None:  # the VQGAN placed on the mesh once, kept for the next preview
      vq_vars = generate.replicate(vq_vars, mesh)
      self._preview_vqgan = (vq_config, vq_vars)
    to_images = lambda x: generate.codes_to_images(vq_config, vq_vars, x, grid, mesh=mesh)
    images = to_images(parallel.to_host(codes))
    truth = to_images(parallel.to_host(batch["codes"])[:n_p])
    rows = np.concatenate([truth[:, None], images.reshape((n_p, n_s) + images.shape[1:])], 1)
    return {"samples": images_lib.image_grid(rows.reshape((-1,) + rows.shape[2:]), ncols=n_s + 1)}

  # --- accounting -------------------------------------------------------------------
  def _param_counts(self):
    """(total, embedding, {head name: params}) from the abstract parameter tree."""
    abstract = jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0), self.dummy_batch(1)))
    total, embed, heads = 0, 0, {}
    for path, x in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract)["params"])[0]:
      n = int(np.prod(x.shape))
      keys = [str(getattr(k, "key", "")) for k in path]
      total += n
      if any("embed" in k or "pos" in k for k in keys):
        embed += n
      for k in keys:
        if k.endswith("_head"):
          heads[k] = heads.get(k, 0) + n
    return total, embed, heads

  def tokens_per_example(self):
    return self.text_len + self.num_codes

  def flops_per_example(self):
    """6 N T for the matmuls (non-embedding params) + 12 D x the attention scores
    computed (L T^2 dense; block-sparse layers count their blocks).

    The dalle layout's two output heads each see only their own tokens.
    """
    m = self.config.model
    total, embed, heads = self._param_counts()
    n = total - embed
    d, layers = int(m.d_model), int(m.num_layers)
    if self.layout == "dalle":
      t = self.text_len + self.num_codes
      text_head, image_head = heads.get("text_head", 0), heads.get("image_head", 0)
      body = n - text_head - image_head
      heads_flops = 6 * text_head * self.text_len + 6 * image_head * self.num_codes
      return 6 * body * t + heads_flops + 12 * self.model.attention_score_entries() * d
    lt, li = self.text_len, self.num_codes
    # the encoder's params see lt tokens, the decoder's li; split N roughly in half
    matmul = 6 * (n / 2) * lt + 6 * (n / 2) * li
    attn = 12 * layers * d * (lt * lt + li * li + li * lt)
    return int(matmul + attn)


TASK = DalleTask
