"""Pixel-space diffusion: text / class / unconditional U-Net models (family "diffusion").

  python train.py --config configs/diffusion.py:shapes --workdir demo/diffusion
    text-conditional 16 px model (GLIDE's design at toy size: a 2-layer text
    transformer feeding a small U-Net through cross-attention and the timestep
    embedding) on the synthetic shapes dataset (rendered at 32 px, resized to 16):
    1.42M parameters, v-prediction on the cosine schedule, 600 steps of 64 images
    (~8.5 minutes in the demo beside the DALL·E chain). Measured: the v-loss falls from
    ~1.0 to ~0.09; guided DDIM samples (25 steps, guidance 3) of the demo prompts follow
    the caption's colour 98% and background 100% of the time, its shape 29% (chance 20%;
    800 steps: 100% / 100% / 35%; the pixel checker reads 86-90% of real 16 px shapes right).
  python sample.py --method diffusion --workdir demo/diffusion \
      --prompt "a red circle on a blue background" --num_images 8 --sampler ddim --steps 50 \
      --guidance_scale 3 --out diffusion.png
  python -m dalle_jax.tools.convert diffusers_unet --src ddpm-cifar10-32 --out ckpt/ddpm_cifar10
  python sample.py --method diffusion --checkpoint ckpt/ddpm_cifar10 --unconditional \
      --sampler ddim --steps 50 --num_images 16 --out cifar.png

Presets:
  shapes         text-conditional, 16 px, trains on a 2-core CPU within the demo budget.
  ddpm_cifar10   the DDPM paper's unconditional CIFAR-10 model (35.7M parameters: channels
                 128 x (1, 2, 2, 2), 2 residual blocks per level, attention at 16 px,
                 dropout 0.1, linear betas 1e-4..0.02 over 1000 steps, eps, fixed_large).
  glide_base64   GLIDE's 64 px base: U-Net 192 x (1, 2, 3, 4), 3 blocks, attention at
                 32/16/8 px with 64-channel heads, scale-shift norm, residual up/down-sampling,
                 learned-range variance (hybrid loss), cosine schedule; text transformer of
                 16 layers, width 2048, 128 tokens, its states attended to as added keys/values.
  imagen_base64  Imagen's 64 px base in the Efficient U-Net layout: 512 x (1, 2, 3, 4),
                 3 blocks per level, attention at 32/16/8 px, cross-attention to the text,
                 scaled skips, down-sampling first, cosine schedule, v-prediction, dynamic
                 thresholding at p = 0.995 for sampling.

Keys beyond configs/common.py:
  model.conditioning    text | class | none
  model.unet.*          the U-Net (dalle_jax/models/unet.py: default_model_config())
  model.text.*          the trainable text transformer (text conditioning)
  model.num_classes     class conditioning (index num_classes = the null class)
  text_encoder.clip     a CLIP workdir / imported checkpoint: its text tower, frozen, replaces
                        model.text (and its tokenizer replaces config.text)
  diffusion.*           the scheduler settings the checkpoint carries (diffusers'
                        scheduler_config keys, dalle_jax/diffusion/schedule.py) plus
                        loss_weighting (mse | min_snr), min_snr_gamma and cond_drop_prob
  inpaint.*             training masks of GLIDE's inpainting layout (model.unet.inpaint=True:
                        masked image + mask as extra U-Net inputs): masks rectangle | half |
                        mixed, min_size / max_size (rectangle sides, fractions of the image),
                        blank_prob (rows shown nothing); dalle_jax/diffusion/inpaint.py
  sampling.*            the preview's prompts, sampler, steps, eta and guidance scale
                        (sample.py's --guidance_scale defaults to sampling.guidance_scale)
EMA of the parameters is on by default (ema_decay); sampling uses the EMA parameters.
"""
import dataclasses

import ml_collections

from dalle_jax.configs import common
from dalle_jax.diffusion import inpaint as inpaint_lib
from dalle_jax.models import unet as unet_lib

PRESETS = ("shapes", "ddpm_cifar10", "glide_base64", "imagen_base64")

SHAPES_PROMPTS = (
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a green triangle on a white background",
    "a cyan diamond on a red background",
)


def diffusion_config(**kw):
  """config.diffusion: SchedulerConfig keys + the training loss settings."""
  d = ml_collections.ConfigDict()
  d.num_train_timesteps = 1000
  d.beta_schedule = "linear"  # linear | scaled_linear | squaredcos_cap_v2 | sigmoid
  d.beta_start = 1e-4
  d.beta_end = 0.02
  d.prediction_type = "epsilon"  # epsilon | sample | v_prediction
  d.variance_type = "fixed_small"  # fixed_small | fixed_large | learned_range (+ _log forms)
  d.clip_sample = True
  d.clip_sample_range = 1.0
  d.thresholding = False
  d.dynamic_thresholding_ratio = 0.995
  d.sample_max_value = 1.0
  d.timestep_spacing = "leading"  # leading | trailing | linspace
  d.steps_offset = 0
  d.set_alpha_to_one = True
  # DPM-Solver++ (diffusers' DPMSolverMultistepScheduler defaults)
  d.lower_order_final = True
  d.euler_at_final = False
  d.final_sigmas_type = "zero"
  d.lambda_min_clipped = float("-inf")
  # DDIM re-derives eps from the clipped x0 and DPM-Solver++ clips too (GLIDE); off = diffusers
  d.use_clipped_model_output = False
  # training
  d.loss_weighting = "mse"  # mse | min_snr
  d.min_snr_gamma = 5.0
  d.cond_drop_prob = 0.1  # caption / label dropout (classifier-free guidance)
  d.update(kw)
  return d


def text_model_config(vocab_size, max_len, width, layers, heads):
  t = ml_collections.ConfigDict()
  t.vocab_size = vocab_size
  t.max_len = max_len
  t.width = width
  t.layers = layers
  t.heads = heads
  t.mlp_dim = 4 * width
  return t


def sampling_config(prompts=SHAPES_PROMPTS, guidance_scale=3.0, steps=50):
  s = ml_collections.ConfigDict()
  s.prompts = list(prompts)
  s.samples_per_prompt = 4
  s.sampler = "ddim"
  s.steps = steps
  s.eta = 0.0
  s.guidance_scale = guidance_scale
  return s


def unet_config(**kw):
  """model.unet: the U-Net keys (dalle_jax/models/unet.py), DDPM CIFAR-10 defaults + kw."""
  u = unet_lib.default_model_config()
  unknown = set(kw) - set(u)
  if unknown:
    raise ValueError(f"unknown U-Net key(s) {sorted(unknown)}")
  u.update(kw)
  return ml_collections.ConfigDict(u)


# U-Net layouts. context_dim is set from the text encoder's width by the model builder.
SHAPES_UNET = dict(
    block_channels=(32, 64, 64), num_res_blocks=1, resample="conv",
    attention=("none", "added_kv", "added_kv"),
    mid_attention="added_kv", attn_heads=0, attn_head_dim=32, norm_groups=8, norm_eps=1e-5,
    dropout=0.0, flip_sin_to_cos=True, freq_shift=0.0, downsample_padding=1,
    time_cond="scale_shift")
DDPM_CIFAR10_UNET = dict()  # default_model_config() is DDPM's CIFAR-10 U-Net
GLIDE_BASE64_UNET = dict(
    block_channels=(512, 1024, 1536, 2048), num_res_blocks=3,
    attention=("none", "added_kv", "added_kv", "added_kv"), mid_attention="added_kv",
    attn_heads=0, attn_head_dim=64, resample="resnet", time_cond="scale_shift", out_channels=6,
    dropout=0.1, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0.0, downsample_padding=1)
IMAGEN_BASE64_UNET = dict(
    block_channels=(512, 1024, 1536, 2048), num_res_blocks=3,
    attention=("none", "self_cross", "self_cross", "self_cross"), mid_attention="self_cross",
    attn_heads=0, attn_head_dim=64, downsample_first=True, skip_scale=2 ** -0.5,
    time_cond="scale_shift", dropout=0.0, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0.0,
    downsample_padding=1)


# Imagen's diffusion: cosine schedule, v-prediction, dynamic thresholding (p 99.5, uncapped)
IMAGEN_DIFFUSION = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                        clip_sample=False, thresholding=True, dynamic_thresholding_ratio=0.995,
                        sample_max_value=1e9, cond_drop_prob=0.1)


def get_config(arg=None):
  name = common.parse_preset(arg, PRESETS, "shapes")
  c = common.base_config()
  c.family = "diffusion"
  c.ema_decay = 0.9999
  image_size = ml_collections.FieldReference(32, field_type=int)
  vocab = ml_collections.FieldReference(128, field_type=int)
  max_len = ml_collections.FieldReference(16, field_type=int)

  c.model = ml_collections.ConfigDict()
  c.model.conditioning = "text"
  c.model.num_classes = 0
  c.text_encoder = ml_collections.ConfigDict()
  c.text_encoder.clip = ""  # path of a CLIP workdir / checkpoint: frozen text tower
  c.sampling = sampling_config()
  # read only when model.unet.inpaint (GLIDE-inpaint): the masks drawn in each training step
  c.inpaint = ml_collections.ConfigDict(dataclasses.asdict(inpaint_lib.MaskConfig()))

  if name == "shapes":
    image_size.set(16)  # 4x cheaper than 32 px; colour, background and shape still legible
    c.model.unet = unet_config(**SHAPES_UNET)
    c.model.text = text_model_config(vocab, max_len, width=64, layers=2, heads=4)
    # v-prediction: the loss weights the clean image at high noise levels, where the caption
    # decides colours and layout (an eps model's loss barely sees them: 300 steps of it did
    # not learn to read the caption); samplers stay consistent under clipping and guidance.
    c.diffusion = diffusion_config(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing",
                                   prediction_type="v_prediction", use_clipped_model_output=True,
                                   cond_drop_prob=0.1)
    c.data.dataset = "shapes/32px_5000"
    c.batch_size = 64
    c.total_steps = 600
    c.log_every = 50
    c.eval_every = 300
    c.eval_batches = 2
    c.preview_every = 0
    c.checkpoint_every = 300
    c.dtype = "float32"  # CPU: bf16 convolutions are no faster there (measured)
    c.ema_decay = 0.99  # a short run: the average must follow within ~100 steps
    c.optimizer = common.optimizer_config("adamw", lr=2e-3)
    c.optimizer.warmup_steps = 50
    c.sampling = sampling_config(guidance_scale=3.0, steps=25)
  elif name == "ddpm_cifar10":
    image_size.set(32)
    c.model.conditioning = "none"
    c.model.unet = unet_config(**DDPM_CIFAR10_UNET)
    c.model.text = text_model_config(vocab, max_len, width=0, layers=0, heads=1)
    c.diffusion = diffusion_config(variance_type="fixed_large", cond_drop_prob=0.0)
    c.data.dataset = "cifar10"
    c.batch_size = 128
    c.total_steps = 800_000
    c.optimizer = common.optimizer_config("adamw", lr=2e-4)  # DDPM: Adam, no weight decay
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 5000
    c.ema_decay = 0.9999
    c.sampling = sampling_config(prompts=(), guidance_scale=1.0)
  elif name == "glide_base64":
    image_size.set(64)
    vocab.set(50304)  # GPT-2 BPE's 50257 ids, padded to a multiple of 128 (shards evenly)
    max_len.set(128)
    c.model.unet = unet_config(**GLIDE_BASE64_UNET)
    c.model.text = text_model_config(vocab, max_len, width=2048, layers=24, heads=32)
    c.diffusion = diffusion_config(beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                                   use_clipped_model_output=True, cond_drop_prob=0.2)
    c.data.dataset = "coco_captions"
    c.batch_size = 2048
    c.total_steps = 2_500_000
    c.optimizer = common.optimizer_config("adamw", lr=1.2e-4)
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.remat = "full"
    c.sampling = sampling_config(prompts=("a corgi wearing a red bowtie",), guidance_scale=3.0)
  else:  # imagen_base64
    image_size.set(64)
    vocab.set(32128)
    max_len.set(128)
    c.model.unet = unet_config(**IMAGEN_BASE64_UNET)
    c.model.text = text_model_config(vocab, max_len, width=1024, layers=12, heads=16)
    c.diffusion = diffusion_config(**IMAGEN_DIFFUSION)
    c.data.dataset = "coco_captions"
    c.batch_size = 2048
    c.total_steps = 2_500_000
    c.optimizer = common.optimizer_config("adamw", lr=1e-4)
    c.optimizer.warmup_steps = 10_000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.remat = "full"
    c.sampling = sampling_config(prompts=("a corgi wearing a red bowtie",), guidance_scale=7.0)

  c.data.image_size = image_size
  c.text = common.text_config(max_len=max_len, tokenizer="sentencepiece", path="", vocab_size=vocab)
  if name in ("glide_base64",):
    c.text.tokenizer = "hf"  # GPT-2's BPE (50257 ids), from a local tokenizer directory
  if name == "imagen_base64":
    c.text.tokenizer = "hf"  # T5's SentencePiece vocabulary (32128 ids)
  return c


def imported_config(unet_cfg, scheduler, image_size, conditioning="none"):
  """The full family config of an imported U-Net (convert diffusers_unet)."""
  c = get_config("ddpm_cifar10")
  c.model.conditioning = conditioning
  c.model.unet = ml_collections.ConfigDict(dict(unet_cfg))
  c.data.image_size = int(image_size)
  unknown = set(scheduler) - set(c.diffusion)
  if unknown:
    raise ValueError(f"scheduler settings {sorted(unknown)} have no config.diffusion key")
  c.diffusion.update(dict(scheduler))
  c.diffusion.cond_drop_prob = 0.0
  c.dtype = "float32"  # imported models run in f32 (parity with the reference)
  c.ema_decay = 0.0
  return c
