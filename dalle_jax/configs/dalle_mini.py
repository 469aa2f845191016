"""DALL·E mini / mega: BART-style text encoder + image-code decoder (family "dalle").

Imported weights (min-dalle's files; no downloads at run time):

    python -m dalle_jax.tools.convert min_dalle --src MODELS_ROOT --variant mega --out ckpt/mega
    python sample.py --checkpoint ckpt/mega --prompt "a comfy chair shaped like an avocado" \
        --num_images 4 --top_k 256 --guidance_scale 16 --out avocado.png

Training from scratch on codes from tools.encode_dataset works like configs/dalle.py:

    python train.py --config configs/dalle_mini.py:shapes --workdir demo/dalle_mini

Presets (dimensions as min_dalle/min_dalle.py):
  mini    12+12 layers, d 1024, 16 heads, GLU 2730, text vocab 50264, 64 text tokens,
          16x16 codes from 16384 (+1 start token), f32 (imported models match the
          reference token for token).
  mega    24+24 layers, d 2048, 32 heads, GLU 4096, text vocab 50272, decoder table 16416.
  Both shard their parameters over every device ('fsdp' = -1: d_model divides up to
  1024 / 2048 of them); set batch_size to at least the device count on a pod.
  shapes  2+2 layers, d 128 on the shapes codes (VQGAN shapes preset); minutes on CPU.

The decoder starts from token `model.start_token` = 16384 (= image_vocab_size,
the start token DALL·E mini was trained with). min-dalle's own loop starts from
2**14 - 1 = 16383 (a code); set --config.model.start_token=16383 to reproduce
its samples exactly.
"""
import ml_collections

from dalle_jax.configs import common
from dalle_jax.configs import dalle as dalle_cfg
from dalle_jax import parallel


def model_config(**kw):
  m = ml_collections.ConfigDict()
  m.layout = "dalle_mini"
  m.text_vocab_size = 50264  # 0 = the tokenizer's vocabulary size
  m.text_len = 64
  m.image_vocab_size = 16384  # valid codes
  m.image_embed_size = 16385  # decoder table / head rows: codes + start (+ padding)
  m.image_grid = 16
  m.start_token = 16384
  m.num_layers = 12
  m.d_model = 1024
  m.num_heads = 16
  m.glu_dim = 2730
  m.update(kw)
  return m


def get_config(arg=None):
  preset = common.parse_preset(arg, ("mini", "mega", "shapes"), "mini")
  c = common.base_config()
  dalle_cfg.task_keys(c)
  c.loss.text_weight = 0.0  # encoder-decoder: image-only cross-entropy
  if preset in ("mini", "mega"):
    from dalle_jax.models.dalle_mini import PRESETS  # pylint: disable=g-import-not-at-top
    c.model = model_config(**PRESETS[preset])
    c.text = common.text_config(max_len=64, tokenizer="bart_bpe")
    c.text.lowercase = True
    c.dtype = "float32"
    c.data.dataset = "data/coco_codes_f16"
    c.data.image_size = 256
    c.batch_size = 64
    c.total_steps = 200_000
    c.optimizer = common.optimizer_config("adafactor", 1e-4)
    c.sampling.top_k = 256
    c.sampling.guidance_scale = 16.0
    c.sampling.chunk = 32
    c.mesh.data = 1
    c.mesh.fsdp = -1
    # layer-norm scales too (stacked per layer: ~30% of a device's share at 512)
    c.logical_axis_rules = parallel.replace_rule(common.DEFAULT_RULES, "norm", "fsdp")
    if preset == "mega":
      c.remat = "full"
      c.scan_layers = True
  elif preset == "shapes":
    c.model = model_config(text_vocab_size=0, text_len=16, image_vocab_size=128,
                           image_embed_size=129, image_grid=8, start_token=128, num_layers=2,
                           d_model=128, num_heads=4, glu_dim=256)
    c.text = common.text_config(max_len=16, vocab_size=256)
    c.data.image_size = 32
    c.dtype = "float32"
    c.batch_size = 32
    c.total_steps = 2000
    c.log_every = 50
    c.eval_every = 500
    c.preview_every = 1000
    c.checkpoint_every = 500
    c.optimizer = common.optimizer_config("adamw", 1e-3)
    c.optimizer.warmup_steps = 100
    c.sampling.guidance_scale = 3.0
    c.sampling.chunk = 16
  c.text.max_len = c.model.text_len
  return c
