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
`"clip:identity"` and `context_dim` = X).

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
  Parameters: {'text_proj': ..., 'unet': ...}.
  """
  text_proj: TextProjection
  unet: unet_lib.UNet

  def __call__(self, x_bhwc, t_b, image_embed_be, text_embed_be, text_bsc, text_mask_bs=None, *,
               drop_image_b=None, train=False):
    declared = unet_lib.parse_extra_embeds(self.unet.extra_embeds)
    if declared.get(CLIP_EMBED, (None,))[0] != "identity" or len(declared) != 1:
      raise ValueError(f"UnclipDecoder: the U-Net's extra_embeds must be "
                       f"('{CLIP_EMBED}:identity',), got {tuple(self.unet.extra_embeds)}")
    if self.unet.context_dim != self.text_proj.context_dim:
      raise ValueError(f"UnclipDecoder: U-Net context_dim={self.unet.context_dim} but the text "
                       f"projection makes {self.text_proj.context_dim}-wide tokens")
    ctx, ctx_mask, time_add = self.text_proj(image_embed_be, text_embed_be, text_bsc, text_mask_bs,
                                             drop_image_b)
    return self.unet(x_bhwc, t_b, context_bsd=ctx, context_mask_bs=ctx_mask,
                     embeds={CLIP_EMBED: time_add}, train=train)
