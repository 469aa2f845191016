"""DALL·E: decoder-only transformer over text tokens + VQGAN codes (family "dalle").

Trains on a dataset pre-encoded to VQGAN codes (records with 'codes' + 'caption'):

    python train.py --config configs/vqgan.py:shapes --workdir demo/vqgan
    python -m dalle_jax.tools.encode_dataset --vqgan demo/vqgan --data_dir data --dataset shapes --out data/shapes_codes
    python train.py --config configs/dalle.py:shapes --workdir demo/dalle
    python sample.py --workdir demo/dalle --prompt "a red circle on a blue background" \
        --num_images 8 --out demo/samples.png

The encoded dataset's records.json meta (grid, codebook size, vqgan path) sets
model.image_grid / model.image_vocab_size / vqgan when present, so the AR
workdir's config.json records which VQGAN produced its codes.

Presets:
  shapes  4 layers, d 192, 16 text + 8x8 codes (VQGAN shapes preset, 128 codes), bf16;
          2000 steps (~4 steps/s on 2 free cores: ~8.5 minutes, 12 in the demo beside the
          diffusion stage): image_loss falls from ln(128)=4.85 to ~0.67. Measured on the
          demo prompts (24 kept samples): colour and background followed 100%, shape 62.5%
          (2500 steps: 67-71%; 3000 steps: 69-73%). Raise --config.total_steps for cleaner
          shapes.
  small   12 layers, d 768, 64 text + 16x16 codes (f16_16384 VQGAN), full attention.
  paper   DALL·E's 12B layout: 64 layers, d 3968, 62 heads, 256 BPE text + 32x32
          codes (8192), row/column/conv sparse attention (block-sparse in training:
          each query scores 320-480 of the 1280 keys), bf16, scan + remat, 2-D FSDP:
          d_model 3968 = 2^7 * 31 caps 'fsdp' at 128, so the mesh is fsdp 64 x data
          (all other devices) and the weights' head-dim / MLP / vocabulary dims are
          split over 'data' too (parallel.fsdp_2d_rules): parameters and Adam state
          are divided by every device, from 64 up to 4096 of them (head dim 64).
          'tensor' may be 2 (62 heads); on fewer than 64 devices set mesh.fsdp.
"""
import ml_collections

from dalle_jax.configs import common
from dalle_jax import parallel


def model_config(**kw):
  m = ml_collections.ConfigDict()
  m.layout = "dalle"  # dalle (decoder-only) | dalle_mini (encoder-decoder)
  m.text_vocab_size = 16384  # 0 = the tokenizer's vocabulary size
  m.text_len = 256
  m.image_vocab_size = 8192  # VQGAN codebook size
  m.image_grid = 32  # codes per side
  m.num_layers = 64
  m.d_model = 3968
  m.num_heads = 62
  m.mlp_dim = 0  # 0 = 4 * d_model
  m.attention = "full"  # full | sparse (paper's row/column/conv cycle)
  m.conv_kernel = 11  # conv attention window (codes per side)
  m.update(kw)
  return m


def sampling_config():
  s = ml_collections.ConfigDict()
  s.temperature = 1.0
  s.top_k = 0  # 0 = off
  s.top_p = 1.0  # 1 = off
  s.guidance_scale = 1.0  # classifier-free ("super-condition") scale; 1 = off
  s.num_prompts = 4  # preview: prompts from the eval batch
  s.samples_per_prompt = 4
  s.chunk = 64  # tokens per compiled decode chunk (progress-bar granularity)
  return s


def task_keys(c):
  """Keys shared by both layouts (the one task module reads them)."""
  c.family = "dalle"
  c.vqgan = ""  # VQGAN workdir/checkpoint that produced the codes (from records.json meta)
  c.blank_caption_prob = 0.1  # caption dropout, enables classifier-free guidance
  c.loss = ml_collections.ConfigDict()
  c.loss.text_weight = 1 / 8  # dalle layout: 1/8 text + 7/8 image (paper)
  c.sampling = sampling_config()
  c.data.dataset = "data/shapes_codes"  # directory written by tools.encode_dataset


def get_config(arg=None):
  preset = common.parse_preset(arg, ("shapes", "small", "paper"), "shapes")
  c = common.base_config()
  task_keys(c)
  if preset == "shapes":
    c.model = model_config(text_vocab_size=0, text_len=16, image_vocab_size=128, image_grid=8,
                           num_layers=4, d_model=192, num_heads=6, mlp_dim=768)
    c.text = common.text_config(max_len=16, vocab_size=256)
    c.data.image_size = 32
    c.dtype = "bfloat16"  # 1.5x faster than f32 on CPU too (mixed-precision matmuls)
    c.batch_size = 32
    c.total_steps = 2000
    c.log_every = 50
    c.eval_every = 1000
    c.preview_every = 1000
    c.checkpoint_every = 500
    c.optimizer = common.optimizer_config("adamw", 2e-3)
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 0.01
    c.sampling.guidance_scale = 3.0
    c.sampling.chunk = 16
  elif preset == "small":
    c.model = model_config(text_len=64, image_vocab_size=16384, image_grid=16, num_layers=12,
                           d_model=768, num_heads=12)
    c.text = common.text_config(max_len=64, vocab_size=16384)
    c.data.dataset = "data/coco_codes"
    c.data.image_size = 256
    c.batch_size = 128
    c.total_steps = 200_000
    c.optimizer = common.optimizer_config("adamw", 3e-4)
    c.optimizer.warmup_steps = 2000
    c.optimizer.weight_decay = 0.01
    c.sampling.top_k = 256
    c.sampling.guidance_scale = 3.0
  elif preset == "paper":
    c.model = model_config(attention="sparse")
    c.text = common.text_config(max_len=256, vocab_size=16384)
    c.data.dataset = "data/coco_codes"
    c.data.image_size = 256
    c.batch_size = 1024
    c.total_steps = 430_000
    c.dtype = "bfloat16"
    c.remat = "full"
    c.scan_layers = True
    c.mesh.data = -1
    c.mesh.fsdp = 64
    c.logical_axis_rules = parallel.fsdp_2d_rules(
        parallel.replace_rule(common.DEFAULT_RULES, "norm", "fsdp"))
    c.optimizer = common.optimizer_config("adamw", 4.5e-4)
    c.optimizer.b1, c.optimizer.b2 = 0.9, 0.96
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 4.5e-2
    c.optimizer.warmup_steps = 5000
    c.sampling.top_k = 0
    c.sampling.guidance_scale = 1.0
  c.text.max_len = c.model.text_len
  return c
