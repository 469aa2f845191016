"""DALL·E mini / mega: BART-style text encoder + autoregressive image-code decoder.

Same computation as min-dalle's DalleBartEncoder / DalleBartDecoder (the public
port of Boris Dayma's DALL·E mini), so converted weights reproduce its outputs:

* no biases in any projection; LayerNorms (eps 1e-5) with scale and bias;
* NormFormer placement: LN before *and after* each attention, and a GLU
  feed-forward `LN -> gelu(x W0) * (x W1) -> LN -> W2`;
* learned absolute positions, `layernorm_embedding` after the embedding sum and
  a final LN in both towers;
* encoder self-attention and decoder cross-attention mask padded text keys;
  decoder self-attention is causal.

The decoder's vocabulary has `image_embed_size` rows (16384 codes + 1 start
token for mini; mega pads its table to 16416); only the first
`image_vocab_size` logits are codes.

Decoding (`decode=True`) keeps a KV cache for self-attention and caches the
projected encoder keys/values for cross-attention at prefill, so one step costs
one token's work.

Shapes: B batch, L text length, N image codes, D width, S key length.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dalle_jax.models import layers

PRESETS = {
    # Dimensions from min_dalle/min_dalle.py (MinDalle.__init__).
    "mini": dict(num_layers=12, d_model=1024, num_heads=16, glu_dim=2730,
                 text_vocab_size=50264, image_embed_size=16385),
    "mega": dict(num_layers=24, d_model=2048, num_heads=32, glu_dim=4096,
                 text_vocab_size=50272, image_embed_size=16416),
}


class CrossAttention(nn.Module):
  """Attention from decoder states to encoder states; caches encoder K/V.

  In decode mode, a call with `enc_bsd` projects and stores the encoder keys
  and values in the 'cache' collection; a call with `enc_bsd=None` reuses them.
  """
  num_heads: int
  head_dim: int
  decode: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_btd, enc_bsd, mask):
    proj = lambda name, axes, feats, axis=-1: layers.DenseGeneral(
        feats, axes, axis=axis, use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    hk = (self.num_heads, self.head_dim)
    q_bthk = proj("query", ("embed", "heads", "kv"), hk)(x_btd)
    if enc_bsd is not None:
      k_bshk = proj("key", ("embed", "heads", "kv"), hk)(enc_bsd)
      v_bshk = proj("value", ("embed", "heads", "kv"), hk)(enc_bsd)
      if self.decode:  # heads-major, read in place at every step
        self.put_variable("cache", "cross_key", jnp.swapaxes(k_bshk, 1, 2))
        self.put_variable("cache", "cross_value", jnp.swapaxes(v_bshk, 1, 2))
    else:
      if not (self.decode and self.has_variable("cache", "cross_key")):
        raise ValueError("CrossAttention: no encoder states given and none cached "
                         "(prefill with the encoder output first)")
    if self.decode:
      k, v = self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")
      layout = "bhsk"
    else:
      k, v, layout = k_bshk, v_bshk, "bshk"
    out_bthk = layers.dot_product_attention(q_bthk, k, v, mask, self.dtype, layout)
    out_btd = proj("out", ("heads", "kv", "embed"), x_btd.shape[-1], axis=(-2, -1))(out_bthk)
    return layers.constrain(out_btd, ("batch", "length", "embed"))


class _Glu(nn.Module):
  """LN -> GLU MLP with NormFormer inner LN (min-dalle's GLU)."""
  glu_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_btd):
    h = layers.LayerNorm("ln", param_dtype=self.param_dtype)(x_btd).astype(self.dtype)
    return layers.Mlp(self.glu_dim, activation="gelu", glu=True, use_bias=False,
                      inner_norm=True, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="mlp")(h)


class EncoderLayer(nn.Module):
  num_heads: int
  glu_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_btd, mask, _=None):
    ln = lambda name: layers.LayerNorm(name, param_dtype=self.param_dtype)
    d = x_btd.shape[-1]
    h = ln("pre_self_attn_ln")(x_btd).astype(self.dtype)
    h = layers.Attention(self.num_heads, d // self.num_heads, use_bias=False, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="self_attn")(h, mask=mask)
    x_btd = x_btd + ln("self_attn_ln")(h).astype(self.dtype)
    x_btd = x_btd + _Glu(self.glu_dim, self.dtype, self.param_dtype, name="glu")(x_btd)
    return layers.constrain(x_btd, ("batch", "length", "embed")), None


class DecoderLayer(nn.Module):
  num_heads: int
  glu_dim: int
  decode: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_btd, enc_bsd, cross_mask, self_mask, _=None):
    ln = lambda name: layers.LayerNorm(name, param_dtype=self.param_dtype)
    d = x_btd.shape[-1]
    hd = d // self.num_heads
    h = ln("pre_self_attn_ln")(x_btd).astype(self.dtype)
    h = layers.Attention(self.num_heads, hd, use_bias=False, decode=self.decode, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="self_attn")(h, mask=self_mask)
    x_btd = x_btd + ln("self_attn_ln")(h).astype(self.dtype)
    h = ln("pre_cross_attn_ln")(x_btd).astype(self.dtype)
    h = CrossAttention(self.num_heads, hd, decode=self.decode, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="cross_attn")(h, enc_bsd, cross_mask)
    x_btd = x_btd + ln("cross_attn_ln")(h).astype(self.dtype)
    x_btd = x_btd + _Glu(self.glu_dim, self.dtype, self.param_dtype, name="glu")(x_btd)
    return layers.constrain(x_btd, ("batch", "length", "embed")), None


class DalleMini(nn.Module):
  """Encoder-decoder DALL·E mini/mega (see module docstring)."""
  text_vocab_size: int = 50264
  text_len: int = 64
  image_vocab_size: int = 16384  # valid codes (VQGAN codebook)
  image_embed_size: int = 16385  # rows of the decoder table/head (codes + start [+ padding])
  image_grid: int = 16  # image_grid**2 codes
  start_token: int = 16384
  num_layers: int = 12  # per tower
  d_model: int = 1024
  num_heads: int = 16
  glu_dim: int = 2730
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"
  scan: bool = False
  decode: bool = False

  @property
  def num_codes(self):
    return self.image_grid ** 2

  def setup(self):
    d = self.d_model
    if d % self.num_heads:
      raise ValueError(f"model.d_model={d} is not divisible by model.num_heads={self.num_heads}")
    if not 0 <= self.start_token < self.image_embed_size:
      raise ValueError(f"model.start_token={self.start_token} must lie in "
                       f"[0, image_embed_size={self.image_embed_size})")
    emb = lambda n, name: layers.Embed(n, d, name=name, dtype=self.dtype,
                                       param_dtype=self.param_dtype)
    ln = lambda name: layers.LayerNorm(name, param_dtype=self.param_dtype)
    self.enc_embed = emb(self.text_vocab_size, "enc_embed")
    self.enc_pos = emb(self.text_len, "enc_pos")
    self.enc_ln_embed = ln("enc_ln_embed")
    self.enc_layers = layers.Stack(
        EncoderLayer, dict(num_heads=self.num_heads, glu_dim=self.glu_dim, dtype=self.dtype,
                           param_dtype=self.param_dtype),
        num_layers=self.num_layers, remat=self.remat, scan=self.scan, name="enc_layers")
    self.enc_final_ln = ln("enc_final_ln")
    self.dec_embed = emb(self.image_embed_size, "dec_embed")
    self.dec_pos = emb(self.num_codes, "dec_pos")
    self.dec_ln_embed = ln("dec_ln_embed")
    self.dec_layers = layers.Stack(
        DecoderLayer, dict(num_heads=self.num_heads, glu_dim=self.glu_dim, decode=self.decode,
                           dtype=self.dtype, param_dtype=self.param_dtype),
        num_layers=self.num_layers, remat=self.remat, scan=self.scan, name="dec_layers")
    self.dec_final_ln = ln("dec_final_ln")
    self.lm_head = layers.Dense(self.image_embed_size, ("embed", "vocab"), name="lm_head",
                                use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)

  def encode(self, text_bl, text_mask_bl):
    """(B, L) ids + bool mask (False = padding) -> encoder states (B, L, D)."""
    pos = jnp.arange(text_bl.shape[1])
    x = self.enc_embed(text_bl) + self.enc_pos(pos)[None]
    x = layers.constrain(x, ("batch", "length", "embed"))
    x = self.enc_ln_embed(x).astype(self.dtype)
    mask = layers.AttentionMask(key_valid_bs=jnp.asarray(text_mask_bl, bool))
    x = self.enc_layers(x, mask)
    return self.enc_final_ln(x).astype(self.dtype)

  def decoder(self, prev_bt, first, enc_bsd, text_mask_bs):
    """Decoder over input tokens at positions [first, first + t) -> logits (B, t, V) f32.

    Without a cache (decode=False) `first` must be 0 and attention is causal over
    `prev_bt`; with one, keys come from the cache (causal by construction) and
    `enc_bsd=None` reuses the cross-attention keys/values stored at prefill.
    """
    t = prev_bt.shape[1]
    pos = first + jnp.arange(t)
    x = self.dec_embed(prev_bt) + self.dec_pos(pos)[None]
    x = layers.constrain(x, ("batch", "length", "embed"))
    x = self.dec_ln_embed(x).astype(self.dtype)
    # Parts, not dense (B, H, T, S) arrays: fused kernels (attention_impl) read
    # the key padding and the causal flag natively.
    cross_mask = layers.AttentionMask(key_valid_bs=jnp.asarray(text_mask_bs, bool))
    self_mask = None if self.decode else layers.AttentionMask(causal=True)
    x = self.dec_layers(x, enc_bsd, cross_mask, self_mask)
    x = self.dec_final_ln(x).astype(self.dtype)
    return self.lm_head(x).astype(jnp.float32)

  def __call__(self, text_bl, text_mask_bl, codes_bn):
    """Teacher-forced logits (B, N, image_embed_size) for codes given text.

    Decoder input = [start, code_0 .. code_{N-2}]; output n predicts code_n.
    """
    if codes_bn.shape[1] != self.num_codes:
      raise ValueError(f"expected {self.num_codes} image codes per example "
                       f"(model.image_grid={self.image_grid}), got {codes_bn.shape[1]}")
    enc = self.encode(text_bl, text_mask_bl)
    start = jnp.full((codes_bn.shape[0], 1), self.start_token, codes_bn.dtype)
    prev = jnp.concatenate([start, codes_bn[:, :-1]], axis=1)
    return self.decoder(prev, 0, enc, text_mask_bl)

  # --- KV-cache decoding (decode=True) --------------------------------------
  def prefill(self, text_bl, text_mask_bl):
    """Encodes the text, caches cross K/V, feeds the start token: logits for code_0."""
    enc = self.encode(text_bl, text_mask_bl)
    start = jnp.full((text_bl.shape[0], 1), self.start_token, jnp.int32)
    return self.decoder(start, 0, enc, text_mask_bl)[:, -1]

  def step(self, code_b, j, text_mask_bl):
    """Feeds code_j (B,) at decoder position j + 1; logits for code_{j+1} (B, V)."""
    return self.decoder(code_b[:, None], j + 1, None, text_mask_bl)[:, -1]


def from_config(model_cfg, *, decode=False, dtype=None, param_dtype=None, remat=None,
                scan=None):
  m = model_cfg
  return DalleMini(
      text_vocab_size=m.text_vocab_size, text_len=m.text_len,
      image_vocab_size=m.image_vocab_size, image_embed_size=m.image_embed_size,
      image_grid=m.image_grid, start_token=m.start_token, num_layers=m.num_layers,
      d_model=m.d_model, num_heads=m.num_heads, glu_dim=m.glu_dim,
      dtype=layers.dtype_from_name(dtype or "float32"),
      param_dtype=layers.dtype_from_name(param_dtype or "float32"),
      remat=remat or "none", scan=bool(scan), decode=decode)
