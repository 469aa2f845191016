"""The unCLIP decoder's conditioning: a CLIP image embedding (and the caption) -> the
U-Net's context tokens and time-embedding addition (DALL·E 2 section 2.1, Karlo).

    image_embed (B, E) --Linear--> N extra context tokens (B, N, X)  --+
    text_bsc (B, S, C) --Linear--> LayerNorm -------------> (B, S, X)  +-> context (B, N+S, X)
    image_embed --Linear--> (B, T) + text_embed (B, E) --Linear--> (B, T) -> added to the
                                                                    U-Net's time embedding
    context mask = [N ones ; caption mask]

`TextProjection` is Karlo's `UnCLIPTextProjModel` tensor for tensor (see
dalle_jax/convert/karlo.py); `drop_image_b` swaps in a learned "null" image embedding
per example: the unconditional half of classifier-free guidance at sampling time,
image-embedding dropout at training time. `UnclipDecoder` wires it to the U-Net
(dalle_jax/models/unet.py, whose config declares the extra embedding
`"clip:identity"` and `context_dim` = X). Its `encode` / `denoise` split is Text2Im's
(dalle_jax/models/text2im.py), so the diffusion task trains it
(`config.model.conditioning = "clip_image"`, built by `build_decoder`) and a sampler's
loop holds only U-Net passes.

Shapes: B batch, E CLIP embedding width, S caption tokens, C caption state width,
N extra context tokens, X context width, T the U-Net's time-embedding width,
H/W/Ch image height/width/channels.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dalle_jax.models import layers
from dalle_jax.models import unet as unet_lib

Dtype = Any
CLIP_EMBED = "clip"  # the U-Net extra embedding (kind identity) fed the time addition


class TextProjection(nn.Module):
  """(image_embed_be, text_embed_be, text_bsc, text_mask_bs, drop_image_b)
  -> (context_bsx (B, N+S, X), context_mask_bs (B, N+S) bool, time_add_bt (B, T) f32)."""
  context_dim: int  # X: the U-Net's cross-attention width (Karlo: 1536)
  time_embed_dim: int  # T: the U-Net's time-embedding width (Karlo: 4 x 320)
  num_tokens: int = 4  # N extra context tokens from the image embedding
  ln_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_embed_be, text_embed_be, text_bsc, text_mask_bs=None,
               drop_image_b=None):
    b, e = image_embed_be.shape
    if text_embed_be.shape[0] != b or text_bsc.ndim != 3 or text_bsc.shape[0] != b:
      raise ValueError(f"TextProjection: image_embed {tuple(image_embed_be.shape)}, text_embed "
                       f"{tuple(text_embed_be.shape)} and text states {tuple(text_bsc.shape)} "
                       "disagree on the batch (expected (B, E), (B, E'), (B, S, C))")
    s = text_bsc.shape[1]
    if text_mask_bs is not None and tuple(text_mask_bs.shape) != (b, s):
      raise ValueError(f"TextProjection: text_mask has shape {tuple(text_mask_bs.shape)}, "
                       f"expected {(b, s)}")
    null_e = layers.param_with_axes(self, "null_image_embed", nn.initializers.zeros, (e,),
                                    ("channels",), self.param_dtype)
    img = jnp.asarray(image_embed_be, jnp.float32)
    if drop_image_b is not None:
      drop_b1 = jnp.asarray(drop_image_b, bool).reshape(b, 1)
      img = jnp.where(drop_b1, null_e.astype(jnp.float32)[None], img)
    img = img.astype(self.dtype)
    dense = lambda feats, name: layers.Dense(feats, ("channels", "embed"), dtype=self.dtype,
                                             param_dtype=self.param_dtype, name=name)
    time_add_bt = (dense(self.time_embed_dim, "image_to_time")(img).astype(jnp.float32)
                   + dense(self.time_embed_dim, "text_to_time")(
                       jnp.asarray(text_embed_be).astype(self.dtype)).astype(jnp.float32))
    tokens_bnx = layers.DenseGeneral((self.num_tokens, self.context_dim),
                                     ("channels", "length", "embed"), use_bias=True,
                                     dtype=self.dtype, param_dtype=self.param_dtype,
                                     name="image_to_tokens")(img)
    text_bsx = dense(self.context_dim, "text_proj")(jnp.asarray(text_bsc).astype(self.dtype))
    text_bsx = layers.LayerNorm("text_norm", epsilon=self.ln_epsilon,
                                param_dtype=self.param_dtype)(text_bsx.astype(jnp.float32))
    context_bsx = jnp.concatenate([tokens_bnx.astype(self.dtype), text_bsx.astype(self.dtype)],
                                  axis=1)
    keep_bs = jnp.ones((b, s), bool) if text_mask_bs is None else text_mask_bs.astype(bool)
    mask_bs = jnp.concatenate([jnp.ones((b, self.num_tokens), bool), keep_bs], axis=1)
    return (layers.constrain(context_bsx, ("batch", "length", "embed")), mask_bs,
            layers.constrain(time_add_bt, ("batch", "embed")))


class UnclipDecoder(nn.Module):
  """The unCLIP decoder: TextProjection -> U-Net (a GLIDE-style U-Net with added-KV
  attention; Karlo: 64 px, learned-range variance in 2 x 3 output channels).

  __call__(x_bhwc, t_b, image_embed_be, text_embed_be, text_bsc, text_mask_bs=None, *,
           drop_image_b=None, train=False) -> (B, H, W, out_channels) f32.
  encode(cond) -> dict(context, context_mask, embeds) and denoise(x, t, **that): the same
  computation split as Text2Im's (cond: image_embed (B, E), text_pooled (B, E') the
  caption's CLIP text embedding, text_states (B, S, C), text_mask (B, S), optionally
  drop_image (B,) bool); from_cond(x, t, cond) = denoise(x, t, **encode(cond)).
  Parameters: {'text_proj': ..., 'unet': ...}.
  """
  text_proj: TextProjection
  unet: unet_lib.UNet

  def _check(self):
    declared = unet_lib.parse_extra_embeds(self.unet.extra_embeds)
    if declared.get(CLIP_EMBED, (None,))[0] != "identity" or len(declared) != 1:
      raise ValueError(f"UnclipDecoder: the U-Net's extra_embeds must be "
                       f"('{CLIP_EMBED}:identity',), got {tuple(self.unet.extra_embeds)}")
    if self.unet.context_dim != self.text_proj.context_dim:
      raise ValueError(f"UnclipDecoder: U-Net context_dim={self.unet.context_dim} but the text "
                       f"projection makes {self.text_proj.context_dim}-wide tokens")

  def encode(self, cond):
    self._check()
    ctx, ctx_mask, time_add = self.text_proj(cond["image_embed"], cond["text_pooled"],
                                             cond["text_states"], cond.get("text_mask"),
                                             cond.get("drop_image"))
    return dict(context=ctx, context_mask=ctx_mask, embeds={CLIP_EMBED: time_add})

  def denoise(self, x_bhwc, t_b, context=None, context_mask=None, embeds=None, train=False,
              low_res=None):
    self._check()
    return self.unet(x_bhwc, t_b, context_bsd=context, context_mask_bs=context_mask,
                     embeds=embeds or {}, low_res_bhwc=low_res, train=train)

  def from_cond(self, x_bhwc, t_b, cond, train=False, low_res=None, embeds=None):
    enc = self.encode(cond)
    enc["embeds"] = dict(enc["embeds"], **(embeds or {}))
    return self.denoise(x_bhwc, t_b, **enc, train=train, low_res=low_res)

  def __call__(self, x_bhwc, t_b, image_embed_be, text_embed_be, text_bsc, text_mask_bs=None, *,
               drop_image_b=None, train=False):
    cond = dict(image_embed=image_embed_be, text_pooled=text_embed_be, text_states=text_bsc,
                text_mask=text_mask_bs, drop_image=drop_image_b)
    return self.from_cond(x_bhwc, t_b, cond, train=train)


def decoder_kwargs(config):
  """{'text_proj': TextProjection kwargs, 'unet': UNet kwargs} of a `clip_image` diffusion
  config (the layout `convert karlo` records as model.decoder): X = model.unet.context_dim,
  T the U-Net's time-embedding width, N = model.clip_tokens; the U-Net's extra embedding
  'clip:identity' is declared here when the config leaves it out."""
  m = config.model
  cfg = m.unet.to_dict() if hasattr(m.unet, "to_dict") else dict(m.unet)
  embeds = tuple(cfg.get("extra_embeds", ()) or ())
  if not embeds:
    cfg["extra_embeds"] = (f"{CLIP_EMBED}:identity",)
  elif tuple(embeds) != (f"{CLIP_EMBED}:identity",):
    raise ValueError(f"config.model.unet.extra_embeds={embeds}: the unCLIP decoder's U-Net takes "
                     f"only ('{CLIP_EMBED}:identity',) (the text projection's time addition)")
  if int(cfg.get("context_dim", 0) or 0) <= 0:
    raise ValueError("config.model.unet.context_dim must be > 0: the width of the decoder's "
                     "context tokens (the projected image embedding and caption states)")
  unet_kw = unet_lib.unet_kwargs(cfg)
  tokens = int(m.get("clip_tokens", 4))
  if tokens < 1:
    raise ValueError(f"config.model.clip_tokens={tokens} must be >= 1")
  temb = int(unet_kw["time_embed_dim"]) or 4 * int(unet_kw["block_channels"][0])
  return {"text_proj": dict(context_dim=int(unet_kw["context_dim"]), time_embed_dim=temb,
                            num_tokens=tokens),
          "unet": unet_kw}


def build_decoder(config, dtype=None):
  """UnclipDecoder from a full `clip_image` diffusion config (model.*, dtype, remat)."""
  kw = decoder_kwargs(config)
  dtype = layers.dtype_from_name(dtype or config.dtype)
  param_dtype = layers.dtype_from_name(config.param_dtype)
  return UnclipDecoder(
      text_proj=TextProjection(**kw["text_proj"], dtype=dtype, param_dtype=param_dtype),
      unet=unet_lib.UNet(**kw["unet"], remat=config.remat, dtype=dtype, param_dtype=param_dtype))
