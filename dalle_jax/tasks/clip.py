"""CLIP / SigLIP task: contrastive image–text training over the global batch.

The loss is computed with `jax.shard_map` over the batch mesh axes
('data', 'fsdp'): each shard all-gathers the other modality's embeddings and
scores only its own rows against every column (B_local x B_global logits, both
directions), so no device ever holds the B x B matrix; partial sums are
psum'd, and the gradients equal the unsharded loss's (tests/test_clip_task.py).

  softmax (CLIP):   (CE(image->text) + CE(text->image)) / 2, mean over B
  sigmoid (SigLIP): -sum_ij log sigmoid(z_ij (t x_i.y_j + b)) / B,  z = +1 on pairs, -1 else
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dalle_jax import parallel
from dalle_jax.data import pipeline
from dalle_jax.models import clip as clip_lib
from dalle_jax.tasks import base

BATCH_AXES = ("data", "fsdp")


# --- loss ----------------------------------------------------------------------

def _context_mesh():
  """The mesh the step runs under: `jax.set_mesh` (abstract) or legacy `with mesh:`."""
  m = jax.sharding.get_abstract_mesh()
  if m is not None and not m.empty:
    return m
  try:
    from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    pm = mesh_lib.thread_resources.env.physical_mesh
    return None if pm.empty else pm
  except (ImportError, AttributeError):
    return None


def _partial_sums(img_l, txt_l, img_all, txt_all, scale, bias, offset, kind):
  """This shard's rows against all columns -> (loss sum, i2t correct, t2i correct).

  img_l/txt_l (b, E) local rows whose global indices start at `offset`;
  img_all/txt_all (B, E) every row. Logits in f32.
  """
  b = img_l.shape[0]
  labels_b = offset + jnp.arange(b)
  logits_i2t_bB = scale * jnp.einsum("ie,je->ij", img_l, txt_all, preferred_element_type=jnp.float32)
  logits_t2i_bB = scale * jnp.einsum("ie,je->ij", txt_l, img_all, preferred_element_type=jnp.float32)
  if kind == "softmax":
    def nll(logits):
      pos = jnp.take_along_axis(logits, labels_b[:, None], axis=1)[:, 0]
      return jnp.sum(jax.nn.logsumexp(logits, axis=1) - pos)
    loss = nll(logits_i2t_bB) + nll(logits_t2i_bB)
  elif kind == "sigmoid":
    # Each (image, text) pair once: image rows against all texts.
    z_bB = jnp.where(jnp.arange(txt_all.shape[0])[None, :] == labels_b[:, None], 1.0, -1.0)
    loss = -jnp.sum(jax.nn.log_sigmoid(z_bB * (logits_i2t_bB + bias)))
    logits_t2i_bB = jax.lax.stop_gradient(logits_t2i_bB)  # metrics only
  else:
    raise ValueError(f"unknown CLIP loss {kind!r}; choose softmax|sigmoid")
  correct_i2t = jnp.sum(jnp.argmax(logits_i2t_bB, axis=1) == labels_b)
  correct_t2i = jnp.sum(jnp.argmax(logits_t2i_bB, axis=1) == labels_b)
  return loss, correct_i2t.astype(jnp.float32), correct_t2i.astype(jnp.float32)


def _finish(sums, batch, kind):
  loss, c_i2t, c_t2i = sums
  denom = 2.0 * batch if kind == "softmax" else float(batch)
  return loss / denom, dict(i2t_accuracy=c_i2t / batch, t2i_accuracy=c_t2i / batch)


def contrastive_loss(img_bE, txt_bE, scale, bias, kind="softmax", mesh="auto"):
  """Global-batch contrastive loss of L2-normalised embeddings -> (loss, metrics).

  With a mesh whose ('data', 'fsdp') axes split the batch (the one the step
  runs under when mesh="auto"), runs sharded: per device B_local x B_global
  logits; otherwise the plain B x B computation.
  """
  B = img_bE.shape[0]
  mesh = _context_mesh() if mesh == "auto" else mesh
  axes = ()
  if mesh is not None:
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
  if n == 1 or B % n:
    sums = _partial_sums(img_bE, txt_bE, img_bE, txt_bE, scale, bias, 0, kind)
    return _finish(sums, B, kind)

  def shard_fn(img_l, txt_l, scale, bias):
    # Gathers are differentiable: their transpose reduce-scatters the column
    # gradients back to the shard that owns each row.
    img_all = jax.lax.all_gather(img_l, axes, axis=0, tiled=True)
    txt_all = jax.lax.all_gather(txt_l, axes, axis=0, tiled=True)
    offset = jax.lax.axis_index(axes) * img_l.shape[0]
    sums = _partial_sums(img_l, txt_l, img_all, txt_all, scale, bias, offset, kind)
    return jax.tree.map(lambda s: jax.lax.psum(s, axes), sums)

  spec = P(axes)
  sums = jax.shard_map(shard_fn, mesh=mesh, in_specs=(spec, spec, P(), P()),
                       out_specs=(P(), P(), P()))(img_bE.astype(jnp.float32),
                                                  txt_bE.astype(jnp.float32),
                                                  jnp.asarray(scale, jnp.float32),
                                                  jnp.asarray(bias, jnp.float32))
  return _finish(sums, B, kind)


# --- augmentation ----------------------------------------------------------------

def random_resized_crop(rng, images_bhwc, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), flip=False):
  """Per-example random resized crop (+ horizontal flip), resampled back to (H, W).

  Crop area ~ U(scale) of the image, aspect ratio log-uniform in `ratio`,
  position uniform; bilinear with antialiasing. Runs on device inside the
  step (deterministic from the step's rng, so resumption reproduces it).
  """
  b, h, w, c = images_bhwc.shape
  k_area, k_ratio, k_y, k_x, k_flip = jax.random.split(rng, 5)
  area = jax.random.uniform(k_area, (b,), minval=scale[0], maxval=scale[1])
  log_r = jax.random.uniform(k_ratio, (b,), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
  r = jnp.exp(log_r)
  ch = jnp.minimum(jnp.sqrt(area / r), 1.0) * h  # crop size in pixels
  cw = jnp.minimum(jnp.sqrt(area * r), 1.0) * w
  y0 = jax.random.uniform(k_y, (b,)) * (h - ch)
  x0 = jax.random.uniform(k_x, (b,)) * (w - cw)

  def crop(img, ch, cw, y0, x0):
    s = jnp.stack([h / ch, w / cw])  # output = input * s + t
    t = -jnp.stack([y0, x0]) * s
    return jax.image.scale_and_translate(img, (h, w, c), (0, 1), s, t, method="linear",
                                         antialias=True)

  out = jax.vmap(crop)(images_bhwc.astype(jnp.float32), ch, cw, y0, x0)
  if flip:
    do = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
    out = jnp.where(do, out[:, :, ::-1], out)
  return out.astype(images_bhwc.dtype)


# --- task ------------------------------------------------------------------------

def tower_flops(tokens, width, layers, mlp_dim):
  """Forward FLOPs of one pre-LN transformer tower over `tokens` positions."""
  per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp_dim) + 4 * tokens * tokens * width
  return layers * per_layer


class ClipTask(base.Task):
  name = "clip"

  def __init__(self, config):
    super().__init__(config)
    self.model = clip_lib.build_model(config)
    self._tokenizer = None

  # --- data ----------------------------------------------------------------
  @property
  def tokenizer(self):
    if self._tokenizer is None:
      from dalle_jax.data.tokenizers import get_tokenizer  # pylint: disable=g-import-not-at-top
      self._tokenizer = get_tokenizer(self.config.text, data_cfg=self.config.data)
      vocab = self.config.model.text.vocab_size
      if self._tokenizer.vocab_size > vocab:
        raise ValueError(f"tokenizer has {self._tokenizer.vocab_size} ids but "
                         f"model.text.vocab_size={vocab}; raise config.text.vocab_size")
    return self._tokenizer

  def tokenize(self, captions):
    """Captions -> (ids int32 (N, L), mask bool (N, L)) at the model's context."""
    return self.tokenizer.encode(captions, self.config.model.text.max_len)

  def preprocess(self, example):
    """Tokenises the caption; keeps exactly image, text_ids, text_mask, caption."""
    if "caption" not in example:
      raise KeyError(f"CLIP needs image–caption data; example has fields {sorted(example)}")
    ids, mask = self.tokenize([example["caption"]])
    image = np.asarray(example["image"])
    if image.dtype != np.uint8:  # uint8 (data.image_dtype) is scaled in the step
      image = image.astype(np.float32)
    s = self.config.model.vision.image_size
    if image.shape != (s, s, 3):
      raise ValueError(f"image of shape {image.shape}, model expects ({s}, {s}, 3): "
                       f"set config.data.image_size={s}")
    # Updated in place as well as returned, so a caller that keeps its own
    # reference to the dict sees the same example.
    caption = example["caption"]
    example.clear()
    example.update(image=image, text_ids=ids[0], text_mask=mask[0], caption=caption)
    return example

  def dummy_batch(self, batch_size):
    s = self.config.model.vision.image_size
    t = self.config.model.text.max_len
    return {"image": np.zeros((batch_size, s, s, 3), np.float32),
            "text_ids": np.zeros((batch_size, t), np.int32),
            "text_mask": np.ones((batch_size, t), bool)}

  def make_iterator(self, split, batch_size, shuffle=True, seed=None):
    return pipeline.make_iterator(self.config.data, split, batch_size,
                                  seed=self.config.seed if seed is None else seed,
                                  preprocess=self.preprocess, shuffle=shuffle)

  # --- model ---------------------------------------------------------------
  def init(self, rng, batch):
    return self.model.init({"params": rng}, batch["image"][:1], batch["text_ids"][:1],
                           batch["text_mask"][:1])

  def _forward(self, params, batch, rng, train):
    images = pipeline.normalize_images(batch["image"])  # uint8 -> [-1, 1] on device
    aug = self.config.get("augment")
    if train and aug is not None and aug.enabled:
      images = random_resized_crop(rng, images, tuple(aug.crop_scale), tuple(aug.crop_ratio),
                                   aug.flip)
    out = self.model.apply({"params": params}, images, batch["text_ids"], batch["text_mask"])
    loss, metrics = contrastive_loss(out["image"], out["text"], out["logit_scale"],
                                     out["logit_bias"], self.config.model.loss)
    metrics["logit_scale"] = out["logit_scale"]
    if self.config.model.loss == "sigmoid":
      metrics["logit_bias"] = out["logit_bias"]
    return loss, metrics

  def loss_fn(self, params, model_state, batch, rng, step):
    loss, metrics = self._forward(params, batch, rng, train=True)
    return loss, (metrics, model_state)

  def eval_fn(self, params, model_state, batch, rng):
    loss, metrics = self._forward(params, batch, rng, train=False)
    return dict(metrics, loss=loss)

  @functools.cached_property
  def _similarity(self):
    """jitted (params, image, text_ids, text_mask) -> (n, n) cosine similarities
    of the first n = min(16, B) pairs."""
    def similarity(params, image, text_ids, text_mask):
      n = min(16, image.shape[0])
      image = pipeline.normalize_images(image[:n])
      out = self.model.apply({"params": params}, image, text_ids[:n], text_mask[:n])
      return jnp.einsum("ie,je->ij", out["image"], out["text"], preferred_element_type=jnp.float32)
    return jax.jit(similarity)

  def preview(self, params, model_state, batch, rng):
    """Cosine-similarity matrix of up to 16 eval pairs (diagonal bright = aligned);
    the batch and parameters may be sharded over processes."""
    sim = parallel.to_host(self._similarity(params, batch["image"], batch["text_ids"],
                                            batch["text_mask"]))  # (n, n) in [-1, 1]
    n = sim.shape[0]
    heat = np.clip((sim + 1) * 127.5, 0, 255).astype(np.uint8)
    cell = max(1, 256 // n)
    heat = np.repeat(np.repeat(heat, cell, 0), cell, 1)
    return {"similarity": np.stack([heat] * 3, -1)}

  def flops_per_example(self):
    """Training FLOPs (3x forward) of one image–text pair."""
    m = self.config.model
    v, t = m.vision, m.text
    n_img = (v.image_size // v.patch_size) ** 2 + 1
    fwd = (2 * (n_img - 1) * v.patch_size ** 2 * 3 * v.width
           + tower_flops(n_img, v.width, v.layers, v.mlp_dim) + 2 * v.width * m.embed_dim
           + tower_flops(t.max_len, t.width, t.layers, t.mlp_dim) + 2 * t.width * m.embed_dim
           + 4 * self.config.batch_size * m.embed_dim)  # this pair's share of the logits
    return 3 * fwd


TASK = ClipTask
