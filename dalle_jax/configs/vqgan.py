"""VQGAN image tokenizer configs.

    python train.py --config configs/vqgan.py:shapes --workdir demo/vqgan

Presets:
  shapes     32px shapes dataset, f4 -> 8x8 codes, 128 codes looked up in 8 dims
             (l2-normalised, ViT-VQGAN style), no GAN / perceptual loss. 400 steps
             of batch 32, ~4-5 min on a 2-core CPU (~55 examples/s). Measured: held-out
             PSNR 21.7 dB at step 200, 23.6 dB / SSIM 0.87 at step 400 with 90% of the
             codes in use (perplexity 77); --config.total_steps=1000 reaches 27.9 dB /
             0.95. Shapes and colours come back intact (previews/ in the workdir).
  f8_8192    256px -> 32x32 codes, 8192 codes (DALL·E's grid; taming's f8 layout).
  f16_16384  256px -> 16x16 codes, 16384 codes (DALL·E mini's VQGAN dimensions).

The real presets use L1 + LPIPS + PatchGAN hinge loss with taming's adaptive
weight; LPIPS needs local weights:
    --config.lpips.vgg_path=vgg16.pth --config.lpips.lin_path=lpips_vgg.pth
(torchvision vgg16 state dict and the LPIPS linear heads, .pth or .npz), or
--config.loss.perceptual_weight=0 to train without it.
"""
import ml_collections

from dalle_jax.configs import common


def model_config(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                 resolution=256, z_channels=256, embed_dim=256, n_embed=16384):
  m = ml_collections.ConfigDict()
  m.ch = ch
  m.ch_mult = tuple(ch_mult)  # len(ch_mult) - 1 stride-2 downsamples
  m.num_res_blocks = num_res_blocks
  m.attn_resolutions = tuple(attn_resolutions)  # feature-map sizes with self-attention
  m.resolution = resolution  # image size the architecture is laid out for
  m.in_channels = 3
  m.z_channels = z_channels
  m.embed_dim = embed_dim
  m.n_embed = n_embed
  m.norm_groups = 32
  m.norm_eps = 1e-6
  m.zero_one_range = False  # True: the network itself works on [0, 1] images (DALL·E mini)
  m.decoder_only = False  # imported decoder-only weights (min-dalle): decode, no encode
  q = m.quantizer = ml_collections.ConfigDict()
  q.beta = 0.25  # commitment weight
  q.codebook_dim = 0  # >0: factorised lookup in this many dims (ViT-VQGAN)
  q.l2_normalize = False  # cosine-similarity lookup on unit vectors
  q.ema_decay = 0.0  # >0: EMA codebook (collection 'vq_ema') instead of gradients
  q.dead_code_threshold = 0  # EMA only: restart codes unused for this many steps
  return m


def get_config(arg=None):
  preset = common.parse_preset(arg, ("shapes", "f8_8192", "f16_16384"), "shapes")
  c = common.base_config()
  c.family = "vqgan"

  c.loss = ml_collections.ConfigDict()
  c.loss.l1_weight = 1.0
  c.loss.l2_weight = 0.0
  c.loss.perceptual_weight = 1.0  # LPIPS; needs lpips.vgg_path + lpips.lin_path
  c.loss.codebook_weight = 1.0
  c.loss.disc_weight = 0.8  # 0 removes the discriminator entirely
  c.loss.disc_start = 10000  # generator adversarial + discriminator loss from this step
  c.loss.disc_loss = "hinge"  # hinge | non_saturating
  c.loss.adaptive_weight = True  # scale GAN loss by |grad rec| / |grad gan| at the last layer
  c.loss.adaptive_weight_max = 1e4

  c.disc = ml_collections.ConfigDict()
  c.disc.n_layers = 3
  c.disc.ndf = 64
  c.disc.norm = "batch"  # batch (batch statistics) | group | layer | none

  c.lpips = ml_collections.ConfigDict()
  c.lpips.vgg_path = ""
  c.lpips.lin_path = ""

  c.optimizer = common.optimizer_config("adamw", 1e-4)
  c.optimizer.b1, c.optimizer.b2 = 0.5, 0.9  # taming's Adam betas
  c.optimizer.warmup_steps = 500
  c.optimizer.schedule = "constant"
  c.disc_optimizer = common.optimizer_config("adamw", 1e-4)
  c.disc_optimizer.b1, c.disc_optimizer.b2 = 0.5, 0.9
  c.disc_optimizer.warmup_steps = 0
  c.disc_optimizer.schedule = "constant"
  c.num_preview = 8

  if preset == "f8_8192":
    c.model = model_config(ch_mult=(1, 1, 2, 4), attn_resolutions=(32,), n_embed=8192)
  elif preset == "f16_16384":
    c.model = model_config()
  if preset in ("f8_8192", "f16_16384"):
    c.data.dataset = "coco_captions"
    c.data.image_size = 256
    c.data.random_crop = True
    c.batch_size = 64
    c.total_steps = 500_000
    c.eval_every = 5000
    c.preview_every = 5000
    c.checkpoint_every = 5000

  if preset == "shapes":
    c.model = model_config(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                           resolution=32, z_channels=32, embed_dim=32, n_embed=128)
    c.model.norm_groups = 8
    c.model.quantizer.codebook_dim = 8
    c.model.quantizer.l2_normalize = True
    c.data.image_size = 32
    c.dtype = "float32"  # CPU: bf16 is slower than f32
    c.batch_size = 32
    c.total_steps = 400
    c.log_every = 50
    c.eval_every = 200
    c.preview_every = 200
    c.checkpoint_every = 200
    c.optimizer = common.optimizer_config("adamw", 2e-3)
    c.optimizer.warmup_steps = 50
    c.optimizer.b2 = 0.99
    c.loss.perceptual_weight = 0.0
    c.loss.disc_weight = 0.0
  return c
