"""Text -> image diffusion model (GLIDE's design): a text transformer feeding a U-Net.

  ids (B, T), mask (B, T) -> token_embed + pos_emb -> pre-LN blocks (bidirectional,
    padding keys masked) -> ln_final -> token states (B, T, D)  [U-Net cross-attention]
                                      -> state at end-of-text (B, D) [added to the
                                         U-Net's timestep embedding, embeds["text"]]
  x_t (B, H, W, C), t (B,) + the above -> U-Net -> ε / x0 / v (optionally + variance)
  [GLIDE-inpaint (model.unet.inpaint): + the masked image and its mask (B, H, W, C + 1),
   extra input channels of the U-Net, `inpaint`]

Conditioning modes (`conditioning`): "text" (the trainable transformer above, or
token states + pooled embedding from a frozen CLIP text tower computed outside and
passed in as `states`/`pooled`), "class" (the U-Net's class embedding table,
`extra_embeds` "class:N+1"; index N = `num_classes` is the null class for guidance), "none" (unconditional).

The text is encoded once per image (`encode`) and the U-Net runs on every step
(`denoise`), so a sampler's compiled loop holds only U-Net passes.

Shapes: B batch, T text length, D text width, H/W image height/width, C image
channels, E pooled-embedding width.
"""
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from dalle_jax.models import layers
from dalle_jax.models import unet as unet_lib

Dtype = Any


class TextTransformer(nn.Module):
  """GLIDE's text encoder: (B, T) ids + mask -> (states (B, T, D), pooled (B, D))."""
  vocab_size: int
  max_len: int
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  remat: str = "none"
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids_bt, mask_bt):
    b, t = ids_bt.shape
    if t > self.max_len:
      raise ValueError(f"text transformer: {t} tokens exceed its context of {self.max_len}")
    d = self.width
    x_btd = layers.Embed(self.vocab_size, d, name="token_embed", std=0.02, dtype=self.dtype,
                         param_dtype=self.param_dtype)(ids_bt)
    pos = layers.param_with_axes(self, "pos_emb", nn.initializers.normal(0.01), (self.max_len, d),
                                 ("length", "embed"), self.param_dtype)
    x_btd = layers.constrain(x_btd + pos[:t].astype(self.dtype)[None], ("batch", "length", "embed"))
    # Every token sees every real token; padding is never attended to (a blank
    # caption keeps at least its end-of-text token, so no row is fully masked).
    mask_b11t = mask_bt.astype(bool)[:, None, None, :]
    x_btd = layers.Stack(
        layers.PreLNBlock,
        dict(num_heads=self.num_heads, head_dim=d // self.num_heads, mlp_dim=self.mlp_dim,
             activation=self.activation, use_bias=True, dtype=self.dtype,
             param_dtype=self.param_dtype),
        self.num_layers, remat=self.remat, scan=self.scan, name="blocks")(x_btd, mask_b11t)
    x_btd = layers.LayerNorm("ln_final", param_dtype=self.param_dtype)(x_btd)
    last_b = jnp.maximum(jnp.sum(mask_bt.astype(jnp.int32), axis=-1) - 1, 0)
    pooled_bd = jnp.take_along_axis(x_btd, last_b[:, None, None], axis=1)[:, 0]
    return x_btd, pooled_bd


class Text2Im(nn.Module):
  """U-Net + its conditioning. `__call__` = `denoise(x, t, **encode(cond))`.

  cond: dict with text_ids/text_mask (own transformer), or text_states/text_pooled
  (frozen CLIP: precomputed), plus text_mask; or label (B,) int; or nothing.
  """
  unet: nn.Module
  text: Optional[nn.Module] = None
  conditioning: str = "text"  # text | class | none

  def encode(self, cond):
    """cond -> dict(context (B, T, D) | None, context_mask (B, T) | None, embeds {name: (B, E)})."""
    if self.conditioning == "none":
      return dict(context=None, context_mask=None, embeds={})
    if self.conditioning == "class":
      # the U-Net's class table (extra_embeds "class:N+1"; index N = the null class)
      return dict(context=None, context_mask=None, embeds={"class": cond["label"]})
    mask_bt = cond["text_mask"].astype(bool)
    if "text_states" in cond:  # frozen encoder, computed outside
      states_btd, pooled_be = cond["text_states"], cond["text_pooled"]
    else:
      if self.text is None:
        raise ValueError("conditioning='text' without a text transformer needs text_states")
      states_btd, pooled_be = self.text(cond["text_ids"], mask_bt)
    return dict(context=states_btd, context_mask=mask_bt, embeds={"text": pooled_be})

  def denoise(self, x_bhwc, t_b, context=None, context_mask=None, embeds=None, train=False,
              low_res=None, inpaint=None):
    """low_res: a super-resolution stage's conditioning image (B, h, w, C); inpaint: the
    masked image ++ mask (B, H, W, C + 1) of an inpainting model (unet.inpaint_input)."""
    return self.unet(x_bhwc, t_b, context_bsd=context, context_mask_bs=context_mask,
                     embeds=embeds or {}, low_res_bhwc=low_res, inpaint_bhwc=inpaint,
                     train=train)

  def __call__(self, x_bhwc, t_b, cond, train=False, low_res=None, embeds=None, inpaint=None):
    enc = self.encode(cond)
    enc["embeds"] = dict(enc["embeds"], **(embeds or {}))
    return self.denoise(x_bhwc, t_b, **enc, train=train, low_res=low_res, inpaint=inpaint)


def unet_kwargs(config, text_width=None):
  """The U-Net's constructor kwargs, its conditioning inputs sized from the mode.

  text: context_dim = the text states' width (model.text.width, or the frozen
  encoder's `text_width`); class: a class table of num_classes + 1 entries.
  """
  m = config.model
  if m.conditioning not in ("text", "class", "none"):
    raise ValueError(f"config.model.conditioning={m.conditioning!r}: choose text|class|none")
  cfg = m.unet.to_dict() if hasattr(m.unet, "to_dict") else dict(m.unet)
  if m.conditioning == "text":
    cfg["context_dim"] = int(text_width or m.text.width)
  elif m.conditioning == "class":
    k = int(m.get("num_classes", 0))
    if k <= 0:
      raise ValueError("config.model.conditioning='class' needs config.model.num_classes > 0")
    if "class" not in unet_lib.parse_extra_embeds(cfg.get("extra_embeds", ())):
      cfg["extra_embeds"] = tuple(cfg.get("extra_embeds", ())) + (f"class:class:{k + 1}",)
  kw = unet_lib.unet_kwargs(cfg)
  return kw


def build(config, dtype=None, text_width=None):
  """Text2Im from a full `diffusion` config (model.*, dtype, remat, scan_layers).

  text_width: the width of externally computed text states (frozen CLIP); None =
  the model's own transformer (model.text.*).
  """
  m = config.model
  dtype = layers.dtype_from_name(dtype or config.dtype)
  param_dtype = layers.dtype_from_name(config.param_dtype)
  text = None
  if m.conditioning == "text" and text_width is None:
    t = m.text
    if not t.vocab_size or t.vocab_size <= 0:
      raise ValueError("config.model.text.vocab_size is unset; it must cover the tokenizer's ids")
    text = TextTransformer(vocab_size=t.vocab_size, max_len=t.max_len, width=t.width,
                           num_layers=t.layers, num_heads=t.heads, mlp_dim=t.mlp_dim,
                           remat=config.remat, scan=config.scan_layers, dtype=dtype,
                           param_dtype=param_dtype)
  unet = unet_lib.UNet(**unet_kwargs(config, text_width), remat=config.remat, dtype=dtype,
                       param_dtype=param_dtype)
  return Text2Im(unet=unet, text=text, conditioning=m.conditioning)
