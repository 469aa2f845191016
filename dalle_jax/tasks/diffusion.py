"""Pixel-space text -> image diffusion task (family `diffusion`): GLIDE-style training.

The model (dalle_jax/models/text2im.py) is a U-Net conditioned on the project's own
trainable text transformer, on a frozen CLIP text tower (`config.text_encoder.clip`
= a CLIP workdir or imported checkpoint; its token states and embedding are
computed inside the step with the CLIP parameters held fixed), on a frozen T5's
token states computed outside (`config.text_encoder.t5` = its checkpoint; the
batch carries `text_states` + `text_mask`, as an imported DeepFloyd IF stage), on
a class label, or on nothing (`config.model.conditioning` = text | class | none).

unCLIP's decoder (`config.model.conditioning = "clip_image"`, dalle_jax/models/unclip.py,
presets in configs/unclip.py): the U-Net conditioned on the frozen CLIP
`config.text_encoder.clip`'s raw image embedding of the training image (computed inside
the step from the batch's `clip_image`, the same example at the CLIP's resolution) and
on its caption's raw text embedding and token states, through Karlo's text projection
(extra context tokens + a time-embedding addition). The caption is dropped with
probability `config.diffusion.cond_drop_prob` and, independently, the image embedding
(swapped for the learned null embedding) with `config.diffusion.image_drop_prob`.
T5 records come from `tools.encode_dataset --t5`; their `empty_caption` split holds the
blank caption's states (`null_text`: caption dropout and guidance), read with the data.

Super-resolution stage (Imagen / IF stage II / unCLIP's upsamplers) when
`config.model.low_res_size` > 0: the U-Net also sees a low-resolution version of
the image, made inside the step from the batch's full-size image (no other data
format): downsampled to low_res_size, optionally blurred (`config.cascade.blur`) or
BSR-degraded (`config.cascade.bsr`: random blurs, resize method, noise, JPEG),
upsampled back bicubically and noised at a random level of the augmentation
schedule (noise-conditioning augmentation, `config.cascade.max_noise_level` > 0);
the level is the U-Net's extra embedding `config.cascade.level_embed` ("" = none:
unCLIP's blur-only upsamplers; dalle_jax/diffusion/cascade.py: LowResConditioning). At
sampling the level is fixed (`config.cascade.noise_level` or the caller's).

Crops (`config.data.crop_size` > 0; DALL·E 2's upsamplers, Imagen's SR1024): the stage
trains and evaluates on crop_size windows of the data.image_size images (the input
pipeline cuts them: random in training, centred in eval), its low-res input made from
the crop at crop_size * low_res_size / image_size px; a convolution-only U-Net (no
attention) computes the same function at any size, so it samples at data.image_size
from a low_res_size input as without crops. Batches of either size are accepted
(init, FLOP counting and dummy_batch use the training crop's).

Objective (dalle_jax/diffusion/gaussian.py): for x0 from the data, t ~ U{0..T-1},
ε ~ N(0, I): the U-Net's prediction (ε, x0 or v, `config.diffusion.prediction_type`)
regressed with plain MSE or min-SNR-γ weighting (`config.diffusion.loss_weighting`),
plus improved DDPM's variational term for learned variance. With probability
`config.diffusion.cond_drop_prob` a caption is replaced by the blank caption (the
tokenizer's encoding of "") or a label by the null class, which trains the
unconditional model classifier-free guidance needs.

Metrics: loss, and loss by quarter of the timestep range (loss_t0 = t < T/4 ...
loss_t3 = t >= 3T/4). Preview: a grid of guided DDIM samples for the fixed
captions in `config.sampling.prompts`; for a super-resolution stage, rows of
(bicubic upsampling, sample, original) for the eval batch's first images.
"""
import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import parallel
from dalle_jax.data import images as images_lib
from dalle_jax.data import pipeline
from dalle_jax.data import records
from dalle_jax.diffusion import cascade as cascade_lib
from dalle_jax.diffusion import degradation as degradation_lib
from dalle_jax.diffusion import gaussian
from dalle_jax.diffusion import guidance as guidance_lib
from dalle_jax.diffusion import inpaint as inpaint_lib
from dalle_jax.diffusion import samplers
from dalle_jax.diffusion import schedule as schedule_lib
from dalle_jax.models import clip as clip_lib
from dalle_jax.models import text2im
from dalle_jax.models import unet as unet_lib
from dalle_jax.models import unclip as unclip_lib
from dalle_jax.tasks import base

log = logging.getLogger(__name__)
T5_EMPTY_SPLIT = "empty_caption"  # records of T5 states: the blank caption's (tools.encode_dataset)


def scheduler_config(diffusion_cfg):
  """SchedulerConfig from `config.diffusion` (its scheduler keys; the loss keys are skipped)."""
  names = {f.name for f in dataclasses.fields(schedule_lib.SchedulerConfig)}
  d = diffusion_cfg.to_dict() if hasattr(diffusion_cfg, "to_dict") else dict(diffusion_cfg)
  return schedule_lib.SchedulerConfig.from_dict({k: v for k, v in d.items() if k in names})


def low_res_conditioning(config):
  """config.model.low_res_size + config.cascade -> LowResConditioning (None: a base stage),
  every key checked before anything is built."""
  size = int(config.model.get("low_res_size", 0) or 0)
  if size <= 0:
    return None
  c = config.get("cascade")
  if c is None:
    raise ValueError("config.model.low_res_size > 0 needs config.cascade (configs/imagen.py)")
  u = config.model.unet
  if int(u.get("low_res_channels", 0)) != int(u.get("in_channels", 3)):
    raise ValueError(f"config.model.low_res_size={size}: set config.model.unet.low_res_channels="
                     f"{u.get('in_channels', 3)} (the low-res image is concatenated to x_t)")
  from dalle_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  kinds = unet_lib.parse_extra_embeds(u.get("extra_embeds", ()))
  if not c.level_embed:  # unCLIP's upsamplers: blur only, the U-Net sees no level
    if int(c.max_noise_level) > 0:
      raise ValueError(f"config.cascade.max_noise_level={c.max_noise_level} needs "
                       "config.cascade.level_embed (the U-Net must see the augmentation's level)")
  elif kinds.get(c.level_embed, ("",))[0] != "timestep":
    raise ValueError(f"config.cascade.level_embed={c.level_embed!r} must be declared in "
                     f"config.model.unet.extra_embeds as '{c.level_embed}:timestep'")
  image_size = int(config.data.image_size)
  if size >= image_size:
    raise ValueError(f"config.model.low_res_size={size} must be below "
                     f"config.data.image_size={image_size}")
  noise = None
  if int(c.max_noise_level) > 0:
    aug = schedule_lib.SchedulerConfig(beta_schedule=c.noise_schedule,
                                       num_train_timesteps=int(c.noise_timesteps))
    noise = cascade_lib.NoiseAugmentation(aug, max_level=int(c.max_noise_level))
  bsr = None
  if c.get("bsr", False):  # DALL·E 2's 256 -> 1024 upsampler
    if c.blur:
      raise ValueError("config.cascade.bsr and config.cascade.blur are alternatives: the BSR "
                       "degradation blurs its input itself")
    bsr = degradation_lib.BsrDegradation()
  sr = cascade_lib.LowResConditioning(size, noise, bool(c.blur), tuple(c.blur_sigma),
                                      int(c.blur_size), bsr)
  _check_blur_fits(sr, size, f"config.model.low_res_size={size}")
  return sr


def _check_blur_fits(sr, low, what):
  """The training blurs' mirrored borders fit a low-res side `low` (`what` names it)."""
  blurs = [(sr.blur_size, f"config.cascade.blur_size={sr.blur_size}")] if sr.blur else []
  if sr.bsr is not None:
    blurs.append((sr.bsr.blur_size, f"config.cascade.bsr's {sr.bsr.blur_size}-tap blur"))
  for taps, key in blurs:
    if low <= taps // 2:
      raise ValueError(f"{what} is too small for {key}")


def crop_conditioning(config, sr):
  """config.data.crop_size -> the LowResConditioning of crop_size training windows (None:
  whole images): `sr`'s, with low_res_size scaled by crop_size / image_size. Every key
  checked before anything is built."""
  try:
    crop = pipeline.crop_size(config.data)
  except ValueError as e:
    raise ValueError(f"config.{e}") from None
  if not crop:
    return None
  if sr is None:
    raise ValueError(f"config.data.crop_size={crop}: only a super-resolution stage trained here "
                     "(config.model.low_res_size > 0 with config.cascade) trains on crops")
  if config.model.get("conditioning") == "clip_image":
    raise ValueError(f"config.data.crop_size={crop}: not with config.model.conditioning="
                     "'clip_image' (the decoder's CLIP embeds the whole image)")
  # attention over a crop's tokens is not what the U-Net computes over the whole image
  u = config.model.unet
  attn = u.get("attention", "none")
  levels = (attn,) if isinstance(attn, str) else tuple(attn)
  if any(a != "none" for a in levels):
    raise ValueError(f"config.data.crop_size={crop} needs a convolution-only U-Net: "
                     f"config.model.unet.attention={levels} must be 'none' at every level")
  mid = u.get("mid_attention", "self")
  if u.get("mid_block", True) and int(u.get("mid_layers", 1)) > 0 and mid != "none":
    raise ValueError(f"config.data.crop_size={crop} needs a convolution-only U-Net: "
                     f"config.model.unet.mid_attention={mid!r} must be 'none'")
  image_size = int(config.data.image_size)
  if (crop * sr.low_res_size) % image_size:
    raise ValueError(f"config.data.crop_size={crop} x config.model.low_res_size="
                     f"{sr.low_res_size} must be divisible by config.data.image_size="
                     f"{image_size} (the crop's low-res side)")
  low = crop * sr.low_res_size // image_size
  _check_blur_fits(sr, low, f"config.data.crop_size={crop}: the crop's low-res side {low}")
  return dataclasses.replace(sr, low_res_size=low)


class FrozenClipText:
  """A CLIP text tower held fixed: ids, mask -> (token states (B, T, D), embedding (B, E),
  unit norm unless normalize=False); `encode_image` is its image tower's raw embedding."""

  def __init__(self, path, dtype="float32"):
    from dalle_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
    self.path = path
    self.config, variables = checkpoint.load_model(path)
    if self.config.get("family") != "clip":
      raise ValueError(f"config.text_encoder.clip={path}: family {self.config.get('family')!r}, "
                       "expected a CLIP workdir or imported checkpoint")
    self.model = clip_lib.build_model(self.config, dtype=dtype)
    self.params = {"params": variables["params"]}
    t = self.config.model.text
    self.width, self.embed_dim, self.max_len = int(t.width), int(self.config.model.embed_dim), int(t.max_len)
    self.image_size = int(self.config.model.vision.image_size)

  def __call__(self, ids_bt, mask_bt, normalize=True):
    emb_be, state = self.model.apply(
        jax.lax.stop_gradient(self.params), ids_bt, mask_bt, normalize,
        method=clip_lib.CLIP.encode_text,
        capture_intermediates=lambda mdl, _: mdl.name == "ln_final")
    states_btd = state["intermediates"]["text"]["ln_final"]["__call__"][0]
    return jax.lax.stop_gradient(states_btd), jax.lax.stop_gradient(emb_be)

  def encode_image(self, images_bhwc):
    """Images (B, S, S, 3) in [-1, 1] at the CLIP's size -> raw embeddings (B, E) f32."""
    emb_be = self.model.apply(jax.lax.stop_gradient(self.params), images_bhwc, False,
                              method=clip_lib.CLIP.encode_image)
    return jax.lax.stop_gradient(emb_be.astype(jnp.float32))


class DiffusionTask(base.Task):
  name = "diffusion"

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    self.conditioning = m.conditioning
    self.image_size = int(config.data.image_size)
    self.channels = int(m.unet.get("in_channels", 3))
    self.sched = scheduler_config(config.diffusion)
    self.diffusion = gaussian.Diffusion(self.sched)
    self.frozen = None
    clip_path = config.get("text_encoder", {}).get("clip", "")
    text_enc = config.get("text_encoder", {})
    self.t5_path = text_enc.get("t5", "") if self.conditioning == "text" else ""
    if_cfg = config.get("deepfloyd_if") or {}
    # conditioned on T5 states: a T5 named, or an IF stage (stage II reuses stage I's states)
    self.t5_states = self.conditioning == "text" and bool(self.t5_path or if_cfg)
    # T5 states: padding positions masked out of the U-Net's attention unless the
    # model attends to them all (IF)
    self.context_mask = bool(if_cfg.get("context_mask", True))
    self.null_text = None  # T5: (states (L, D), mask (L,)) of the blank caption: read_null_text
    self.clip_image_size = None  # clip_image: the CLIP's input size (batch["clip_image"])
    if self.conditioning == "clip_image":  # unCLIP's decoder
      if not clip_path:
        raise ValueError("config.model.conditioning='clip_image' needs config.text_encoder.clip "
                         "(the CLIP whose image embeddings condition the decoder)")
      self.frozen = FrozenClipText(clip_path, dtype=config.dtype)
      self.model = unclip_lib.build_decoder(config)
      self.text_len = self.frozen.max_len
      self.clip_image_size = self.frozen.image_size
    elif self.conditioning == "text" and clip_path:
      self.frozen = FrozenClipText(clip_path, dtype=config.dtype)
      self.model = text2im.build(config, text_width=self.frozen.width)
      self.text_len = self.frozen.max_len
    elif self.t5_states:
      self.text_width = int(m.unet.get("context_dim", 0))
      if self.text_width <= 0:
        raise ValueError("T5 text states need config.model.unet.context_dim = the T5 width")
      self.model = text2im.build(config, text_width=self.text_width)
      self.text_len = int(if_cfg.get("text_len", 0) or config.text.max_len)
      if self.config.text.tokenizer == "sentencepiece" and not self.config.text.path:
        # prompts are T5's to tokenize (text_encoder.t5): no SentencePiece trained on captions
        self.config.text.tokenizer = "t5"
    else:
      self.model = text2im.build(config)
      self.text_len = int(m.text.max_len) if self.conditioning == "text" else 0
    self._tokenizer = None
    # super-resolution: trained here (config.cascade) or IF stage II (conditioned by the sampler)
    self.sr = low_res_conditioning(config)
    self.is_sr = int(m.unet.get("low_res_channels", 0)) > 0
    self.level_embed = None
    if self.sr is not None:
      self.level_embed = config.cascade.level_embed or None
    elif self.is_sr and if_cfg.get("stage") == "II":
      self.level_embed = "class"  # IF's noise level goes in as class_labels
    self.low_res_size = self.sr.low_res_size if self.sr is not None else None
    # training / eval on crops: their own (smaller) low-res input
    self.crop_sr = crop_conditioning(config, self.sr)
    self.crop_size = int(config.data.get("crop_size", 0)) if self.crop_sr is not None else 0
    # GLIDE's inpainting layout: the masked image ++ mask are extra U-Net inputs; training
    # masks are drawn inside the step (config.inpaint, dalle_jax/diffusion/inpaint.py)
    self.inpaint = bool(m.unet.get("inpaint", False))
    self.masks = None
    if self.inpaint:
      if self.conditioning not in ("text", "class", "none"):
        raise ValueError(f"config.model.unet.inpaint: not supported with config.model."
                         f"conditioning={self.conditioning!r} (text | class | none)")
      self.masks = inpaint_lib.MaskConfig.from_config(config.get("inpaint"))

  # --- text ---------------------------------------------------------------------
  @property
  def tokenizer(self):
    if self._tokenizer is None:
      from dalle_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
      if self.frozen is not None:
        c = self.frozen.config
        self._tokenizer = tokenizers.get_tokenizer(c.text, data_cfg=c.get("data"),
                                                   base_dir=self.frozen.path)
      else:
        self._tokenizer = tokenizers.get_tokenizer(self.config.text, data_cfg=self.config.data)
        vocab = int(self.config.model.text.vocab_size)
        if self._tokenizer.vocab_size > vocab:
          raise ValueError(f"tokenizer has {self._tokenizer.vocab_size} ids but "
                           f"model.text.vocab_size={vocab}; raise config.model.text.vocab_size")
    return self._tokenizer

  def tokenize(self, captions):
    """Captions -> (ids int32 (N, L), mask bool (N, L)) at the text encoder's context."""
    return self.tokenizer.encode(list(captions), self.text_len)

  def blank_text(self):
    ids, mask = self.tokenize([""])
    return ids[0], mask[0]

  def null_cond(self, n):
    """The unconditional rows of guidance: blank captions, the negative prompt's T5 states
    (`null_text`) or the null class."""
    if self.t5_states:
      if self.null_text is None:
        raise ValueError("config.text_encoder.t5: guidance and caption dropout need the negative "
                         "prompt's T5 states (task.null_text = (states, mask))")
      states, mask = self.null_text
      return {"text_states": np.repeat(np.asarray(states, np.float32)[None], n, 0),
              "text_mask": np.repeat(np.asarray(mask, bool)[None], n, 0)}
    if self.conditioning in ("text", "clip_image"):
      ids, mask = self.blank_text()
      out = {"text_ids": np.repeat(ids[None], n, 0), "text_mask": np.repeat(mask[None], n, 0)}
      if self.conditioning == "clip_image":  # the learned null image embedding
        out.update(image_embed=np.zeros((n, self.frozen.embed_dim), np.float32),
                   drop_image=np.ones((n,), bool))
      return out
    if self.conditioning == "class":
      return {"label": np.full((n,), int(self.config.model.num_classes), np.int32)}
    return {}

  def cond_of(self, batch):
    """The conditioning entries of a batch (text ids + mask, or label, or none; clip_image:
    the caption's ids + mask and the image embedding, from the frozen CLIP's image tower
    unless the batch brings `image_embed`, plus `drop_image` (B,) bool)."""
    if self.conditioning == "clip_image":
      out = {k: batch[k] for k in ("text_ids", "text_mask")}
      out["image_embed"] = (jnp.asarray(batch["image_embed"], jnp.float32)
                            if "image_embed" in batch else self.frozen.encode_image(
                                pipeline.normalize_images(batch["clip_image"])))
      n = out["image_embed"].shape[0]
      out["drop_image"] = batch.get("drop_image", jnp.zeros((n,), bool))
      return out
    keys = {"text": ("text_ids", "text_mask"), "class": ("label",), "none": ()}[self.conditioning]
    if self.t5_states:
      keys = ("text_states", "text_mask")
    return {k: batch[k] for k in keys}

  def encode(self, params, cond):
    """Batch conditioning -> the U-Net's context / mask / embeds (Text2Im.encode's dict)."""
    if self.t5_states:  # states computed outside; the U-Net pools them itself if it does
      mask = jnp.asarray(cond["text_mask"]).astype(bool)
      return dict(context=jnp.asarray(cond["text_states"]).astype(jnp.float32),
                  context_mask=mask if self.context_mask else None, embeds={})
    return self.model.apply({"params": params}, self.model_cond(cond), method="encode")

  def model_cond(self, cond):
    """Batch conditioning -> the model's: a frozen encoder's states replace the ids."""
    if self.frozen is None or self.conditioning not in ("text", "clip_image"):
      return cond
    if self.conditioning == "clip_image" and "image_embed" not in cond:
      raise ValueError("an unCLIP decoder (conditioning 'clip_image') decodes CLIP image "
                       "embeddings: sample it with `sample.py --method unclip --prior PRIOR "
                       "--decoder WORKDIR`")
    # unCLIP's decoder reads the raw CLIP text embedding (as the prior and Karlo do)
    states, pooled = self.frozen(cond["text_ids"].astype(jnp.int32), cond["text_mask"],
                                 normalize=self.conditioning != "clip_image")
    out = {"text_states": states.astype(jnp.float32), "text_pooled": pooled,
           "text_mask": cond["text_mask"]}
    if self.conditioning == "clip_image":
      out.update(image_embed=cond["image_embed"], drop_image=cond["drop_image"])
    return out

  def drop_cond(self, cond, rng, p):
    """Replaces each row's conditioning by the null one with probability p (clip_image: the
    caption with p and, independently, the image embedding with diffusion.image_drop_prob)."""
    if self.conditioning == "clip_image":
      k_text, k_image = jax.random.split(rng)
      text = self._drop_rows({k: cond[k] for k in ("text_ids", "text_mask")}, k_text, p)
      n = cond["drop_image"].shape[0]
      p_image = float(self.config.diffusion.get("image_drop_prob", 0.0))
      drop_b = jax.random.bernoulli(k_image, p_image, (n,)) if p_image > 0 else False
      return dict(cond, **text, drop_image=jnp.logical_or(cond["drop_image"], drop_b))
    if p <= 0 or self.conditioning == "none":
      return cond
    return self._drop_rows(cond, rng, p)

  def _drop_rows(self, cond, rng, p):
    if p <= 0:
      return cond
    any_leaf = next(iter(cond.values()))
    n = any_leaf.shape[0]
    null = self.null_cond(1)
    drop_b = jax.random.bernoulli(rng, p, (n,))
    out = {}
    for k, v in cond.items():
      d = drop_b.reshape((n,) + (1,) * (v.ndim - 1))
      out[k] = jnp.where(d, jnp.asarray(null[k]).astype(v.dtype), v)
    return out

  # --- data ---------------------------------------------------------------------
  def make_iterator(self, split, batch_size, *, shuffle=True, repeat=True):
    if self.t5_states and self.null_text is None:
      self.null_text = self.read_null_text()  # before anything compiles: the records checked
    if self.conditioning == "clip_image":  # images at the larger of the decoder's and the
      data = self.config.data.copy_and_resolve_references()  # CLIP's sizes: preprocess
      with data.unlocked():  # resizes them to each
        data.image_size = max(self.image_size, self.clip_image_size)
      return pipeline.make_iterator(data, split, batch_size, seed=self.config.seed,
                                    preprocess=self.preprocess, shuffle=shuffle, repeat=repeat)
    return super().make_iterator(split, batch_size, shuffle=shuffle, repeat=repeat)

  def read_null_text(self):
    """(states (L, D), mask (L,)) of the blank caption from the T5 records' empty_caption
    split, after checking the records' states against config.text.max_len / context_dim."""
    d = self.config.data
    source = pipeline.load_source(d, d.train_split)
    how = "write them with `python -m dalle_jax.tools.encode_dataset --t5 T5 ...`"
    if not isinstance(source, records.RecordsSource) or "text_states" not in source.features:
      raise ValueError("config.text_encoder.t5: the dataset holds no pre-encoded text_states; "
                       + how)
    shape = tuple(source.features["text_states"]["shape"])
    if shape != (self.text_len, self.text_width):
      raise ValueError(f"the records' text_states are {shape[0]} tokens x {shape[-1]}; set "
                       f"config.text.max_len={shape[0]} and config.model.unet.context_dim="
                       f"{shape[-1]} (now {self.text_len} and {self.text_width})")
    written, given = source.meta.get("t5"), self.t5_path
    given = given if "://" in given else os.path.abspath(os.path.expanduser(given))
    if written and given and written != given:
      log.warning("records encoded with T5 %s; config.text_encoder.t5=%s encodes prompts at "
                  "sampling: they must be the same encoder", written, self.t5_path)
    try:
      empty = records.RecordsSource(source.out_dir, T5_EMPTY_SPLIT)[0]
    except ValueError:
      raise ValueError(f"no {T5_EMPTY_SPLIT!r} split (the blank caption's T5 states, for "
                       f"caption dropout and guidance); {how}") from None
    return np.asarray(empty["text_states"], np.float32), np.asarray(empty["text_mask"], bool)

  def preprocess(self, example):
    """Keeps image (H, W, C) float32 in [-1, 1] plus text_ids/text_mask or label."""
    image = np.asarray(example["image"])
    if image.dtype != np.uint8:  # uint8 (data.image_dtype) is scaled in the step
      image = image.astype(np.float32)
    clip_image = None
    if self.conditioning == "clip_image":  # read at the larger size (make_iterator)
      clip_image = self._resized(image, self.clip_image_size)
      image = self._resized(image, self.image_size)
    s, c = self.image_size, self.channels
    if image.shape != (s, s, c) and image.shape != (self.crop_size, self.crop_size, c):
      crops = f" (or its crop_size={self.crop_size} crops)" if self.crop_size else ""
      raise ValueError(f"image of shape {image.shape}, model expects ({s}, {s}, {c}){crops}: "
                       f"set config.data.image_size={s}")
    out = {"image": image}
    if clip_image is not None:
      out["clip_image"] = clip_image
    if self.t5_states:  # pre-encoded records
      if "text_states" not in example or "text_mask" not in example:
        raise KeyError(f"config.text_encoder.t5: records need pre-encoded text_states and "
                       f"text_mask; example has fields {sorted(example)}")
      out.update(text_states=np.asarray(example["text_states"], np.float32),
                 text_mask=np.asarray(example["text_mask"], bool))
    elif self.conditioning in ("text", "clip_image"):
      if "caption" not in example:
        raise KeyError(f"conditioning={self.conditioning!r} needs captions; example has fields "
                       f"{sorted(example)}")
      ids, mask = self.tokenize([example["caption"]])
      out.update(text_ids=ids[0], text_mask=mask[0])
    elif self.conditioning == "class":
      if "label" not in example:
        raise KeyError(f"conditioning='class' needs a 'label' field; example has {sorted(example)}")
      out["label"] = np.asarray(example["label"], np.int32)
    example.clear()  # in place as well: a pipeline may keep the dict it passed in
    example.update(out)
    return example

  @staticmethod
  def _resized(image, size):
    """An example's image (H, W, C), uint8 or float in [-1, 1], at size x size (PIL's
    antialiased resize of the uint8 image, as the input pipeline's)."""
    if image.shape[0] == size and image.shape[1] == size:
      return image
    if image.dtype == np.uint8:
      return images_lib.resize_and_crop(image, size)
    return images_lib.to_float(images_lib.resize_and_crop(images_lib.to_uint8(image), size))

  def dummy_batch(self, batch_size):
    s, c = self.crop_size or self.image_size, self.channels  # what training batches hold
    out = {"image": np.zeros((batch_size, s, s, c), np.float32)}
    if self.conditioning == "clip_image":
      k = self.clip_image_size
      out["clip_image"] = np.zeros((batch_size, k, k, 3), np.float32)
    if self.t5_states:
      out.update(text_states=np.zeros((batch_size, self.text_len, self.text_width), np.float32),
                 text_mask=np.ones((batch_size, self.text_len), bool))
    elif self.conditioning in ("text", "clip_image"):
      out.update(text_ids=np.zeros((batch_size, self.text_len), np.int32),
                 text_mask=np.ones((batch_size, self.text_len), bool))
    elif self.conditioning == "class":
      out["label"] = np.zeros((batch_size,), np.int32)
    return out

  # --- model --------------------------------------------------------------------
  def _sr_at(self, size):
    """The low-res conditioning of size x size images: the stage's own at data.image_size,
    the crops' at data.crop_size."""
    if size == self.image_size:
      return self.sr
    if self.crop_sr is not None and size == self.crop_size:
      return self.crop_sr
    crops = f" or its crop_size={self.crop_size} crops" if self.crop_sr is not None else ""
    raise ValueError(f"images of {size} px: this stage takes data.image_size={self.image_size} "
                     f"px images{crops}")

  def _sr_inputs(self, x_bhwc):
    """Placeholder low-res input and level embedding of x's shape (init, FLOP counting)."""
    if not self.is_sr:
      return None, {}
    b, s = x_bhwc.shape[0], self.low_res_size or self.image_size
    if self.crop_sr is not None and x_bhwc.shape[1] == self.crop_size:
      s = self.crop_sr.low_res_size
    low = jnp.zeros((b, s, s, self.channels), jnp.float32)
    return low, {self.level_embed: jnp.zeros((b,), jnp.int32)} if self.level_embed else {}

  def _inpaint_kw(self, x_bhwc, known=None):
    """{'inpaint': masked image ++ mask (B, H, W, C + 1)} for an inpainting model, {} for
    others. known: {'x0', 'mask' (1 = known)}; None = nothing known (init, FLOP counting,
    sampling without an edit)."""
    if not self.inpaint:
      return {}
    if known is None:
      return {"inpaint": jnp.zeros(tuple(x_bhwc.shape[:-1]) + (x_bhwc.shape[-1] + 1,),
                                   jnp.float32)}
    return {"inpaint": unet_lib.inpaint_input(known["x0"], known["mask"])}

  def init(self, rng, batch):
    cond = jax.tree.map(lambda x: x[:1], self.cond_of(batch))
    x = jnp.zeros((1,) + tuple(batch["image"].shape[1:]), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    low, embeds = self._sr_inputs(x)
    rngs = {"params": rng, "dropout": rng}
    if self.t5_states:  # no text module: the U-Net alone
      enc = self.encode(None, cond)
      enc["embeds"] = dict(enc["embeds"], **embeds)
      return self.model.init(rngs, x, t, **enc, low_res=low, method=text2im.Text2Im.denoise,
                             **self._inpaint_kw(x))
    if self.conditioning == "clip_image":
      return self.model.init(rngs, x, t, self.model_cond(cond), low_res=low, embeds=embeds,
                             method="from_cond")
    return self.model.init(rngs, x, t, self.model_cond(cond), low_res=low, embeds=embeds,
                           **self._inpaint_kw(x))

  def _loss(self, params, batch, rng, train):
    k_drop, k_loss, k_dropout = jax.random.split(rng, 3)
    cond = self.cond_of(batch)
    if train:
      cond = self.drop_cond(cond, k_drop, float(self.config.diffusion.cond_drop_prob))
    enc = self.encode(params, cond)
    x0 = pipeline.normalize_images(batch["image"]).astype(jnp.float32)  # uint8 scaled here
    low = None
    if self.sr is not None:  # the low-res input from the image itself, a level per row
      low, level_b = self._sr_at(x0.shape[1]).train(jax.random.fold_in(rng, 1), x0)
      if self.level_embed:
        enc["embeds"] = dict(enc["embeds"], **{self.level_embed: level_b})
    known = None
    if self.inpaint:  # each row shows the model a random part of its image
      keep = inpaint_lib.random_masks(jax.random.fold_in(rng, 2), self.masks, *x0.shape[:3])
      known = {"x0": x0, "mask": keep}
    inpaint = self._inpaint_kw(x0, known)

    def model_fn(x_bhwc, t_b):
      return self.model.apply({"params": params}, x_bhwc, t_b, **enc, train=train, low_res=low,
                              method="denoise", rngs={"dropout": k_dropout}, **inpaint)

    d = self.config.diffusion
    loss_b, t_b = self.diffusion.training_loss(
        model_fn, x0, k_loss, weighting=d.loss_weighting, min_snr_gamma=float(d.min_snr_gamma))
    metrics = gaussian.loss_by_quarter(loss_b, t_b, self.sched.num_train_timesteps)
    return jnp.mean(loss_b), metrics

  def loss_fn(self, params, model_state, batch, rng, step):
    loss, metrics = self._loss(params, batch, rng, train=True)
    return loss, (metrics, model_state)

  def eval_fn(self, params, model_state, batch, rng):
    loss, metrics = self._loss(params, batch, rng, train=False)
    return dict(metrics, loss=loss)

  # --- sampling -----------------------------------------------------------------
  def model_fn(self, params, cond, guidance_scale=1.0, low_res=None, level=None, null=None,
               known=None):
    """(x_t (B, H, W, C), t (B,)) -> model output, guided when guidance_scale != 1.

    cond: the batch conditioning of the B rows; null: the unconditional rows' (default
    null_cond). With guidance, the conditional and unconditional rows go through the
    U-Net in ONE pass of 2B rows. A super-resolution stage also takes its conditioning
    image `low_res` (B, H, W, C) (already upsampled and noised) and its level (B,). An
    inpainting model sees `known` {'x0' (B, H, W, C), 'mask' (B, H, W, 1) 1 = known} as its
    extra channels (None: nothing known).
    """
    extra = {self.level_embed: level} if self.level_embed and level is not None else {}

    def denoise(enc, low, extra, known=known):
      enc = dict(enc, embeds=dict(enc["embeds"], **extra))
      return lambda x, t: self.model.apply({"params": params}, x, t, **enc, low_res=low,
                                           method="denoise", **self._inpaint_kw(x, known))

    if self.conditioning == "none" or guidance_scale == 1.0:
      return denoise(self.encode(params, cond), low_res, extra)
    n = next(iter(cond.values())).shape[0]
    null = jax.tree.map(jnp.asarray, self.null_cond(n) if null is None else null)
    both = {k: jnp.concatenate([jnp.asarray(cond[k]), null[k].astype(jnp.asarray(cond[k]).dtype)])
            for k in cond}
    twice = lambda a: None if a is None else jnp.concatenate([a, a])
    return guidance_lib.classifier_free_guidance(
        denoise(self.encode(params, both), twice(low_res), {k: twice(v) for k, v in extra.items()},
                None if known is None else jax.tree.map(twice, known)),
        guidance_scale,
        learned_variance=self.sched.learned_variance)

  def sample(self, params, cond, x_T, rng, *, sampler="ddim", steps=50, eta=0.0,
             guidance_scale=1.0, sched=None, progress=None, low_res=None, level=None, null=None,
             known=None):
    """x_T (B, H, W, C) + conditioning -> x_0 in [-1, 1] (float32); jittable. An SR stage
    also takes its conditioning image and level (model_fn). known: an edit, {'x0' (B, H, W,
    C), 'mask' (B, H, W, 1) 1 = keep}: the kept region is imposed at every step (any model)
    and an inpainting model also sees it as its extra input channels."""
    fn = self.model_fn(params, cond, guidance_scale, low_res=low_res, level=level, null=null,
                       known=known)
    keep = {} if known is None else {"known_x0": known["x0"], "known_mask": known["mask"]}
    return samplers.sample(fn, sched or self.sched, x_T, sampler=sampler, steps=steps, rng=rng,
                           eta=eta, progress=progress, **keep)

  def preview(self, params, model_state, batch, rng):
    """Guided samples for the fixed captions of config.sampling (one row per caption); an SR
    stage: rows of (bicubic upsampling, sample, original) for the batch's first images;
    unCLIP's decoder: rows of (original, samples from its image embedding and caption)."""
    if self.sr is not None:
      return self._sr_preview(params, batch, rng)
    if self.conditioning == "clip_image":
      return self._clip_image_preview(params, batch, rng)
    s = self.config.sampling
    n = int(s.samples_per_prompt)
    if self.t5_states:  # prompts would need T5 here: the eval batch's own captions instead
      rows = min(len(s.prompts) or 4, batch["text_states"].shape[0])
      cond = jax.jit(lambda b: {k: jnp.repeat(b[k][:rows], n, 0)
                                for k in ("text_states", "text_mask")})(batch)
    elif self.conditioning == "text":
      prompts = list(s.prompts)
      ids, mask = self.tokenize(prompts)
      cond = {"text_ids": np.repeat(ids, n, 0), "text_mask": np.repeat(mask, n, 0)}
      rows = len(prompts)
    elif self.conditioning == "class":
      labels = np.arange(min(int(self.config.model.num_classes), 8), dtype=np.int32)
      cond, rows = {"label": np.repeat(labels, n)}, len(labels)
    else:
      cond, rows = {}, 1
    shape = (rows * n, self.image_size, self.image_size, self.channels)
    k_noise, k_sample = jax.random.split(rng)
    fn = getattr(self, "_preview_fn", None)
    if fn is None:
      fn = self._preview_fn = jax.jit(lambda p, c, x, r: self.sample(
          p, c, x, r, sampler=s.sampler, steps=int(s.steps), eta=float(s.eta),
          guidance_scale=float(s.guidance_scale)))
    x0 = fn(params, cond, jax.random.normal(k_noise, shape, jnp.float32), k_sample)
    images = images_lib.to_uint8(parallel.to_host(x0))
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, -1)
    return {"samples": images_lib.image_grid(images, ncols=n)}

  def _clip_image_preview(self, params, batch, rng, rows=4):
    s = self.config.sampling
    n = int(s.samples_per_prompt)
    inputs = {k: batch[k] for k in ("image", "clip_image", "text_ids", "text_mask")}
    k = min(rows, inputs["image"].shape[0])

    def run(p, b, r):
      b = jax.tree.map(lambda a: jnp.repeat(a[:k], n, 0), b)
      x = pipeline.normalize_images(b["image"]).astype(jnp.float32)
      k_noise, k_sample = jax.random.split(r)
      out = self.sample(p, self.cond_of(b), jax.random.normal(k_noise, x.shape, jnp.float32),
                        k_sample, sampler=s.sampler, steps=int(s.steps), eta=float(s.eta),
                        guidance_scale=float(s.guidance_scale))
      shape = (k, n) + x.shape[1:]
      return jnp.concatenate([x.reshape(shape)[:, :1], out.reshape(shape)], axis=1)

    fn = getattr(self, "_preview_fn", None)
    if fn is None:
      fn = self._preview_fn = jax.jit(run)
    images = images_lib.to_uint8(parallel.to_host(fn(params, inputs, rng)))
    return {"samples": images_lib.image_grid(images.reshape((-1,) + images.shape[2:]),
                                             ncols=n + 1)}

  def _sr_preview(self, params, batch, rng, rows=4):
    s = self.config.sampling
    inputs = dict(self.cond_of(batch), image=batch["image"])
    k = min(rows, inputs["image"].shape[0])

    def run(p, b, r):
      b = jax.tree.map(lambda a: a[:k], b)
      x = pipeline.normalize_images(b["image"]).astype(jnp.float32)
      sr = self._sr_at(x.shape[1])  # eval batches of crops: the crop's low-res input
      low = sr.low_res(x)
      k_aug, k_noise, k_sample = jax.random.split(r, 3)
      cond_img, level = sr.sample(low, x.shape[1:3], int(self.config.cascade.noise_level),
                                  jax.random.normal(k_aug, x.shape, jnp.float32))
      out = self.sample(p, self.cond_of(b), jax.random.normal(k_noise, x.shape, jnp.float32),
                        k_sample, sampler=s.sampler, steps=int(s.steps), eta=float(s.eta),
                        guidance_scale=float(s.guidance_scale), low_res=cond_img, level=level)
      return jnp.stack([cascade_lib.upsample_bicubic(low, x.shape[1:3]), out, x], axis=1)

    fn = getattr(self, "_preview_fn", None)
    if fn is None:
      fn = self._preview_fn = jax.jit(run)
    images = images_lib.to_uint8(parallel.to_host(fn(params, inputs, rng)))
    images = images.reshape((-1,) + images.shape[2:])
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, -1)
    return {"samples": images_lib.image_grid(images, ncols=3)}

  # --- accounting -----------------------------------------------------------------
  def flops_per_example(self):
    """3x the forward FLOPs of one example (text encoder + U-Net), from XLA's cost model."""
    if getattr(self, "_flops", None) is None:
      batch = self.dummy_batch(1)
      abstract = jax.eval_shape(self.init, jax.random.PRNGKey(0), batch)
      params = parallel.unbox(abstract)["params"]

      def fwd(p, b):
        enc = self.encode(p, self.cond_of(b))
        low, embeds = self._sr_inputs(b["image"])
        enc["embeds"] = dict(enc["embeds"], **embeds)
        return self.model.apply({"params": p}, b["image"], jnp.zeros((1,), jnp.int32), **enc,
                                low_res=low, method="denoise", **self._inpaint_kw(b["image"]))

      cost = jax.jit(fwd).lower(params, batch).cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      self._flops = 3.0 * float((cost or {}).get("flops", 0.0)) or None
    return self._flops


TASK = DiffusionTask
