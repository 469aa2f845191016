"""Imagen-style cascades: a text-conditional base stage and super-resolution stages.

Every preset is a `diffusion`-family config (dalle_jax/tasks/diffusion.py); an SR
stage sets `model.low_res_size` and `config.cascade`, and learns from the dataset's
full-size images alone: the step downsamples each image to low_res_size, upsamples
it back bicubically and noises it at a random level (noise-conditioning
augmentation), the level being the U-Net's extra embedding.

The shapes cascade (16 px base -> 32 px SR; the shapes dataset is rendered at 32 px
and data.image_size resizes it):
  python train.py --config configs/imagen.py:shapes_base16 --workdir demo/imagen_base16
    16 px text-conditional base: the diffusion family's `shapes` preset itself
    (configs/diffusion.py: 1.42M parameters, v-prediction, 600 steps of 64 images).
  python train.py --config configs/imagen.py:shapes_sr32 --workdir demo/imagen_sr32
    16 -> 32 px SR stage conditioned on the caption too: 1.36M parameters, x0-prediction,
    300 steps of 32 images, noise augmentation at levels 0..299 of the cosine schedule
    (sampled at 50).
  python sample.py --method cascade --stages demo/imagen_base16,demo/imagen_sr32 \
      --prompt "a red circle on a blue background" --num_images 4 \
      --steps 25,25 --sampler ddim,ddim --guidance_scale 3,1 --out cascade.png
    writes cascade.png (32 px) and each stage's images under cascade/stage0, cascade/stage1.
  Learning check (tests/test_imagen_sr.py, slow): the same stage reduced to 8 -> 16 px,
  unconditional, a (32, 64) U-Net, 250 steps of 32: on 64 held-out images its 4-step DDIM
  samples from the clean 8 px image reach 24.9 dB PSNR against 24.0 dB for bicubic
  upsampling (x0-prediction; v-prediction was at 21.7 dB after 200 steps).
  shapes_sr32 itself, measured: 300 steps in 7.3 minutes on the shared 2-core host (17-37
  examples/s; at load ~15 it crawled at 5/s), loss 0.39 -> 0.006; on 64 held-out 32 px
  shapes images its DDIM samples from the 16 px image reach 27.29 dB PSNR (25 steps, level
  0; 27.23 at level 50; 27.13 with 4 steps) against 27.03 dB for bicubic upsampling.
  Retrained 2026-12-02 (300 steps, loss 0.39 -> 0.0063) on the demo's data: the same
  27.30 / 27.23 / 27.13 dB against bicubic 27.03 dB (64 held-out images, DDIM from the
  stage's EMA parameters).
  Cascade prompt-following, measured on the base `make demo` trains (configs/diffusion.py:
  shapes, 600 steps) and that SR stage, the demo's six prompts (dalle_jax/tools/demo.py
  PROMPTS) x 8 images, seed 0, read by dalle_jax/data/shapes_check.py as the demo scores
  its samples (it reads real held-out 32 px shapes 100% right on all three, real 16 px
  93.5% on the shape):
    python train.py --config configs/imagen.py:shapes_sr32 --workdir SR \
        --config.data.data_dir=demo/data
    python sample.py --method cascade --stages demo/diffusion,SR --prompt ... (x6) \
        --num_images 8 --seed 0 --sampler ddim,ddim --steps 25,25 --guidance_scale 3,1 \
        --out cascade.png
                                 colour  background  shape (chance 20%)  all three
    16 px base (cascade/stage0)   100%     100%        33.3%              33.3%
    32 px SR output               100%     100%        27.1%              27.1%
    SR guidance 3 (3,3)           100%     100%        27.1%
    SR guidance 3, noise level 200 100%    100%        22.9%
  The SR stage keeps every colour and background and reproduces the base's shape reading
  on 56% of the images (both blob-like: the 16 px base draws the colours right and the
  shapes barely above chance, and the SR stage sharpens the blob it is given, more noise
  augmentation making it drift further, not read the caption's shape). 48 images per
  stage in ~2.5 min on the loaded 2-core host.

The paper sizes, checked abstractly (tests/test_imagen_presets.py; never allocated):
  imagen_base64    configs/diffusion.py:imagen_base64 (2B U-Net + its text transformer)
  imagen_sr256     64 -> 256 px Efficient U-Net (128 x (1, 2, 4, 8) channels, (2, 4, 8, 8)
                   ResBlocks, down-sampling first, 1/sqrt(2) skips; self + cross attention
                   at the lowest level only): 957M parameters (the paper's model is 600M:
                   its U-Blocks take one skip per level, ours one per ResBlock, ADM-style)
  imagen_sr1024    256 -> 1024 px Efficient U-Net: the same without self-attention, 881M
                   (paper: 400M; it trains on 256 px crops: the model is fully convolutional)
  Both condition on frozen T5-XXL states (4096 wide, 128 tokens; `text_encoder.t5`: a
  `tools.convert hf_t5` checkpoint) pooled into the timestep embedding and attended to;
  records must carry pre-encoded text_states / text_mask (the trainer never runs T5).

Frozen T5 states (any preset; the trainer never runs T5): encode the captions once, then
train on the records (their 'empty_caption' split is the blank caption's states, used for
caption dropout and as guidance's unconditional rows; sampling encodes prompts with the
same `text_encoder.t5`):
  python -m dalle_jax.tools.convert hf_t5 --src t5-v1_1-xxl --out ckpt/t5_v1_1_xxl
  python -m dalle_jax.tools.encode_dataset --t5 ckpt/t5_v1_1_xxl --max_len 128 \
      --dataset coco_captions --data_dir data --out data/coco_t5 --states_dtype float16 \
      [--mesh 1,4,2: the encoder's weights split over fsdp x tensor]
  python train.py --config configs/imagen.py:imagen_sr256 --workdir w/sr256 \
      --config.data.dataset=data/coco_t5
  On shapes (any T5; text.max_len and model.unet.context_dim must match the records, else
  a one-line error before compiling): --config.text_encoder.t5=CKPT
      --config.data.dataset=RECORDS --config.text.max_len=L --config.model.unet.context_dim=D
  (tests/test_t5_records.py: records equal `tools.embed --t5`; shapes_sr32 reduced to 8 -> 16
  px trains on them on a 2x2x2 mesh and resumes exactly.) Run by hand with a tiny T5 (2
  layers, d_model 32, max_len 40) on shapes/16px_40: encode_dataset --t5, train.py
  shapes_base16 and shapes_sr32 with those four flags (2 steps each, eval + preview), then
  sample.py --method cascade --stages BASE,SR: every step ran (the T5 encodes the prompts
  and the blank negative prompt at sampling).

Keys beyond configs/diffusion.py:
  model.low_res_size       the SR stage's input size (0 = a base stage)
  cascade.noise_schedule   the augmentation's beta schedule (IF's image_noising_scheduler:
                           squaredcos_cap_v2), cascade.noise_timesteps its length
  cascade.max_noise_level  training levels ~ U{0 .. max_noise_level - 1} (0 = no augmentation)
  cascade.noise_level      the level sampling uses (sample.py --noise_level overrides it)
  cascade.level_embed      the U-Net's extra embedding that receives the level (declared in
                           model.unet.extra_embeds as NAME:timestep); "" = none (then
                           max_noise_level must be 0: unCLIP's blur-only upsamplers)
  cascade.blur             blur the low-res image in training (unCLIP), sigma ~
                           U[cascade.blur_sigma), cascade.blur_size taps
  cascade.bsr              instead of the blur: BSR degradation of the low-res image in
                           training (random blurs, resize method, noise, JPEG; DALL·E 2's
                           256 -> 1024 upsampler; dalle_jax/diffusion/degradation.py)
  data.crop_size           train on crop_size windows (attention-free U-Nets only; the low-res
                           input from the crop; sampling stays at image_size): 0 = whole images
"""
import ml_collections

from dalle_jax.configs import common
from dalle_jax.configs import diffusion as diffusion_configs

PRESETS = ("shapes_base16", "shapes_sr32", "imagen_sr256", "imagen_sr1024")
LEVEL_EMBED = "noise_level"

# 16 -> 32 px: three levels 32 / 16 / 8 px; the caption is attended to at 8 px only
# (the low-res image carries the layout), the level and the pooled caption in temb.
SHAPES_SR32_UNET = dict(
    diffusion_configs.SHAPES_UNET, attention=("none", "none", "added_kv"),
    low_res_channels=3, extra_embeds=(f"{LEVEL_EMBED}:timestep",))
# Imagen's Efficient U-Net (paper appendix F): more ResBlocks at low resolution,
# down-sampling first, scaled skips; text cross-attention at the lowest level only.
EFFICIENT_UNET = dict(
    block_channels=(128, 256, 512, 1024), num_res_blocks=(2, 4, 8, 8),
    attention=("none", "none", "none", "self_cross"), mid_attention="self_cross",
    attn_heads=0, attn_head_dim=64, downsample_first=True, skip_scale=2 ** -0.5,
    time_cond="scale_shift", dropout=0.0, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0.0,
    downsample_padding=1, low_res_channels=3, extra_embeds=(f"{LEVEL_EMBED}:timestep",),
    context_pool="attention", context_pool_heads=8)
T5_XXL_WIDTH = 4096
T5_XXL_CHECKPOINT = "ckpt/t5_v1_1_xxl"  # python -m dalle_jax.tools.convert hf_t5 --out this


def cascade_config(max_noise_level=1000, noise_level=250, blur=False, level_embed=LEVEL_EMBED,
                   bsr=False):
  c = ml_collections.ConfigDict()
  c.noise_schedule = "squaredcos_cap_v2"
  c.noise_timesteps = 1000
  c.max_noise_level = max_noise_level
  c.noise_level = noise_level
  c.level_embed = level_embed
  c.blur = blur
  c.blur_sigma = (0.4, 0.6)
  c.blur_size = 3
  c.bsr = bsr
  return c


def _shapes_sr32(c):
  """The SR stage on top of the diffusion family's shapes preset (its text model, schedule,
  optimizer and clipped-x0 sampling), at 32 px with a 16 px input."""
  c.data.image_size = 32
  c.model.low_res_size = 16
  c.model.unet = diffusion_configs.unet_config(**SHAPES_SR32_UNET)
  # x0-prediction: the loss is the image's own MSE at every level, so the stage learns the
  # regression from the low-res input (what PSNR rewards) first; measured on a reduced stage
  # (8 -> 16 px, 250 steps): 24.9 dB vs bicubic 24.0, where v-prediction gave 21.7 at 200
  c.diffusion.prediction_type = "sample"
  c.cascade = cascade_config(max_noise_level=300, noise_level=50)
  c.batch_size = 32
  c.total_steps = 300
  c.log_every = 25
  c.eval_every = 150
  c.checkpoint_every = 100
  c.sampling.guidance_scale = 1.0


def _paper_sr(c, image_size, low_res_size, unet):
  c.data.image_size = image_size
  c.data.dataset = "coco_captions"
  c.model.low_res_size = low_res_size
  c.model.unet = diffusion_configs.unet_config(**unet, context_dim=T5_XXL_WIDTH)
  c.text_encoder.t5 = T5_XXL_CHECKPOINT
  c.text.max_len = 128
  c.diffusion = diffusion_configs.diffusion_config(**diffusion_configs.IMAGEN_DIFFUSION)
  c.cascade = cascade_config(max_noise_level=1000, noise_level=250)
  c.batch_size = 4096  # Imagen: 4096 for the SR models
  c.total_steps = 2_500_000
  c.optimizer = common.optimizer_config("adamw", lr=1e-4)
  c.optimizer.warmup_steps = 10_000
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.remat = "full"
  c.sampling = diffusion_configs.sampling_config(prompts=("a corgi wearing a red bowtie",),
                                                 guidance_scale=4.0)


def get_config(arg=None):
  name = common.parse_preset(arg, PRESETS, "shapes_base16")
  c = diffusion_configs.get_config("shapes")
  c.model.low_res_size = 0
  c.text_encoder.t5 = ""  # a T5 checkpoint: pre-encoded text_states condition the U-Net
  if name == "shapes_base16":
    pass  # the diffusion family's shapes preset is the 16 px base
  elif name == "shapes_sr32":
    _shapes_sr32(c)
  elif name == "imagen_sr256":
    _paper_sr(c, 256, 64, EFFICIENT_UNET)
  else:  # imagen_sr1024
    _paper_sr(c, 1024, 256, dict(EFFICIENT_UNET, attention=("none", "none", "none", "cross"),
                                 mid_attention="cross"))
  return c
