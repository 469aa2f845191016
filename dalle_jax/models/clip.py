"""CLIP: a ViT image tower and a causal text tower in one joint embedding space.

Layout follows OpenAI CLIP (and Hugging Face `CLIPModel`, so its checkpoints
import one-to-one, see dalle_jax/convert/hf_clip.py):

  image (B, H, W, 3) in [-1, 1] -> pixel normalisation (model.image_mean/std)
    -> patch conv (no bias) -> [class token; patches] + pos_emb -> ln_pre
    -> pre-LN blocks -> ln_post(class token) -> proj (no bias)       (B, E)
  ids (B, T) -> token_embed + pos_emb -> causal pre-LN blocks -> ln_final
    -> the end-of-text position (see `pool`) -> proj (no bias)        (B, E)

A learned temperature `logit_scale` (log space, clamped at ln 100) scales
cosine similarities; the SigLIP variant (`loss="sigmoid"`) adds `logit_bias`.
The model only embeds; the objectives live in dalle_jax/tasks/clip.py.

Shapes: B batch, T text length, N patches (+1 class token), D tower width,
E joint embedding width, P patch size.
"""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.models import layers

Dtype = Any

# OpenAI CLIP's pixel statistics (images in [0, 1]); our own models use 0.5/0.5,
# which makes the [-1, 1] pipeline images pass through unchanged.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LOGIT_SCALE = math.log(100.0)


def l2_normalize(x, axis=-1, eps=1e-12):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def _tower_blocks(width, heads, mlp_dim, activation, ln_epsilon, dtype, param_dtype):
  return dict(num_heads=heads, head_dim=width // heads, mlp_dim=mlp_dim, activation=activation,
              use_bias=True, ln_epsilon=ln_epsilon, dtype=dtype, param_dtype=param_dtype)


class VisionTower(nn.Module):
  """ViT in OpenAI CLIP's layout: (B, H, W, 3) in [-1, 1] -> (B, E) unnormalised."""
  image_size: int
  patch_size: int
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  embed_dim: int
  activation: str = "quick_gelu"
  ln_epsilon: float = 1e-5
  image_mean: Sequence[float] = (0.5, 0.5, 0.5)
  image_std: Sequence[float] = (0.5, 0.5, 0.5)
  remat: str = "none"
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images_bhwc):
    b, h, w, c = images_bhwc.shape
    if h != self.image_size or w != self.image_size or c != 3:
      raise ValueError(f"CLIP image tower expects (B, {self.image_size}, {self.image_size}, 3) "
                       f"images, got {images_bhwc.shape}")
    mean = jnp.asarray(self.image_mean, jnp.float32)
    std = jnp.asarray(self.image_std, jnp.float32)
    x = ((images_bhwc.astype(jnp.float32) + 1.0) * 0.5 - mean) / std
    p, d = self.patch_size, self.width
    x = nn.Conv(
        d, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype, name="patch_embed",
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("conv_height", "conv_width", "conv_in", "embed")),
    )(x.astype(self.dtype))
    x_bnd = x.reshape(b, -1, d)  # row-major over the (H/P, W/P) grid
    cls = layers.param_with_axes(self, "cls", nn.initializers.normal(d ** -0.5), (d,), ("embed",),
                                 self.param_dtype)
    x_bnd = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), x_bnd], axis=1)
    n = x_bnd.shape[1]
    pos = layers.param_with_axes(self, "pos_emb", nn.initializers.normal(0.02), (n, d),
                                 ("length", "embed"), self.param_dtype)
    x_bnd = x_bnd + pos.astype(self.dtype)[None]
    x_bnd = layers.LayerNorm("ln_pre", epsilon=self.ln_epsilon,
                             param_dtype=self.param_dtype)(x_bnd).astype(self.dtype)
    x_bnd = layers.constrain(x_bnd, ("batch", "length", "embed"))
    x_bnd = layers.Stack(
        layers.PreLNBlock,
        _tower_blocks(d, self.num_heads, self.mlp_dim, self.activation, self.ln_epsilon,
                      self.dtype, self.param_dtype),
        self.num_layers, remat=self.remat, scan=self.scan, name="blocks")(x_bnd, None)
    pooled_bd = layers.LayerNorm("ln_post", epsilon=self.ln_epsilon,
                                 param_dtype=self.param_dtype)(x_bnd[:, 0])
    return layers.Dense(self.embed_dim, ("embed", "mlp"), name="proj", use_bias=False,
                        dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=nn.initializers.normal(d ** -0.5))(pooled_bd.astype(self.dtype))


def pool_index(ids_bt, mask_bt, pool, eos_id):
  """Index (B,) of the token whose state represents the text.

  pool='eos': first position holding `eos_id` (HF CLIP with a real eos id);
  'argmax': position of the largest id (OpenAI / legacy HF: end-of-text has the
  largest id); 'last': last position where `mask_bt` is True (our tokenizers).
  """
  if pool == "eos":
    return jnp.argmax((ids_bt == eos_id).astype(jnp.int32), axis=-1)
  if pool == "argmax":
    return jnp.argmax(ids_bt, axis=-1)
  if pool == "last":
    if mask_bt is None:
      raise ValueError("text pool='last' needs the token mask (ids, mask)")
    return jnp.maximum(jnp.sum(mask_bt.astype(jnp.int32), axis=-1) - 1, 0)
  raise ValueError(f"unknown text pool {pool!r}; choose eos|argmax|last")


class TextTower(nn.Module):
  """Causal transformer over tokens, pooled at end-of-text: (B, T) -> (B, E)."""
  vocab_size: int
  max_len: int
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  embed_dim: int
  activation: str = "quick_gelu"
  ln_epsilon: float = 1e-5
  pool: str = "last"
  eos_id: int = -1
  remat: str = "none"
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids_bt, mask_bt=None):
    b, t = ids_bt.shape
    if t > self.max_len:
      raise ValueError(f"CLIP text tower: {t} tokens exceed its context of {self.max_len}")
    d = self.width
    x_btd = layers.Embed(self.vocab_size, d, name="token_embed", std=0.02, dtype=self.dtype,
                         param_dtype=self.param_dtype)(ids_bt)
    pos = layers.param_with_axes(self, "pos_emb", nn.initializers.normal(0.01), (self.max_len, d),
                                 ("length", "embed"), self.param_dtype)
    x_btd = x_btd + pos[:t].astype(self.dtype)[None]
    x_btd = layers.constrain(x_btd, ("batch", "length", "embed"))
    # Causal mask only: padding sits after end-of-text, which never attends to it.
    mask = layers.AttentionMask(causal=True)  # read natively by fused kernels
    x_btd = layers.Stack(
        layers.PreLNBlock,
        _tower_blocks(d, self.num_heads, self.mlp_dim, self.activation, self.ln_epsilon,
                      self.dtype, self.param_dtype),
        self.num_layers, remat=self.remat, scan=self.scan, name="blocks")(x_btd, mask)
    x_btd = layers.LayerNorm("ln_final", epsilon=self.ln_epsilon,
                             param_dtype=self.param_dtype)(x_btd)
    idx_b = pool_index(ids_bt, mask_bt, self.pool, self.eos_id)
    pooled_bd = jnp.take_along_axis(x_btd, idx_b[:, None, None], axis=1)[:, 0]
    return layers.Dense(self.embed_dim, ("embed", "mlp"), name="proj", use_bias=False,
                        dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=nn.initializers.normal(d ** -0.5))(pooled_bd.astype(self.dtype))


class CLIP(nn.Module):
  """Both towers plus the learned temperature (and SigLIP's bias).

  `__call__(images, ids, mask)` -> dict(image (B, E), text (B, E) L2-normalised
  f32, logit_scale (exp'd, clamped at 100), logit_bias (0 for softmax CLIP)).
  """
  vision: VisionTower
  text: TextTower
  loss: str = "softmax"  # softmax (CLIP) | sigmoid (SigLIP)
  logit_scale_init: float = math.log(1 / 0.07)
  logit_bias_init: float = -10.0

  def setup(self):
    self.logit_scale = layers.param_with_axes(
        self, "logit_scale", nn.initializers.constant(self.logit_scale_init), (), ())
    if self.loss == "sigmoid":
      self.logit_bias = layers.param_with_axes(
          self, "logit_bias", nn.initializers.constant(self.logit_bias_init), (), ())

  def encode_image(self, images_bhwc, normalize=True):
    emb = self.vision(images_bhwc)
    return l2_normalize(emb) if normalize else emb.astype(jnp.float32)

  def encode_text(self, ids_bt, mask_bt=None, normalize=True):
    emb = self.text(ids_bt, mask_bt)
    return l2_normalize(emb) if normalize else emb.astype(jnp.float32)

  def temperature(self):
    """(scale, bias): exp(logit_scale) clamped at 100, and the SigLIP bias (or 0)."""
    scale = jnp.exp(jnp.minimum(self.logit_scale.astype(jnp.float32), MAX_LOGIT_SCALE))
    bias = self.logit_bias.astype(jnp.float32) if self.loss == "sigmoid" else jnp.zeros((), jnp.float32)
    return scale, bias

  def __call__(self, images_bhwc, ids_bt, mask_bt=None):
    scale, bias = self.temperature()
    return dict(image=self.encode_image(images_bhwc), text=self.encode_text(ids_bt, mask_bt),
                logit_scale=scale, logit_bias=bias)


def build_model(config, dtype=None, vocab_size=None):
  """CLIP module from a full config (`config.model`, `config.dtype`, remat/scan)."""
  m = config.model
  dtype = layers.dtype_from_name(dtype or config.dtype)
  param_dtype = layers.dtype_from_name(config.param_dtype)
  common = dict(embed_dim=m.embed_dim, activation=m.activation, ln_epsilon=m.ln_epsilon,
                remat=config.remat, scan=config.scan_layers, dtype=dtype, param_dtype=param_dtype)
  v, t = m.vision, m.text
  vision = VisionTower(image_size=v.image_size, patch_size=v.patch_size, width=v.width,
                       num_layers=v.layers, num_heads=v.heads, mlp_dim=v.mlp_dim,
                       image_mean=tuple(m.image_mean), image_std=tuple(m.image_std), **common)
  vocab = vocab_size or t.vocab_size
  if not vocab or vocab <= 0:
    raise ValueError("config.model.text.vocab_size is unset; it must equal the tokenizer's vocab size")
  text = TextTower(vocab_size=vocab, max_len=t.max_len, width=t.width, num_layers=t.layers,
                   num_heads=t.heads, mlp_dim=t.mlp_dim, pool=t.pool, eos_id=t.eos_id, **common)
  return CLIP(vision=vision, text=text, loss=m.loss, logit_scale_init=m.logit_scale_init,
              logit_bias_init=m.logit_bias_init)


def dummy_inputs(config, batch_size=1):
  """Zero inputs of the model's shapes (for init / eval_shape)."""
  s = config.model.vision.image_size
  t = config.model.text.max_len
  return (np.zeros((batch_size, s, s, 3), np.float32), np.zeros((batch_size, t), np.int32),
          np.ones((batch_size, t), bool))


def param_count(params):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
