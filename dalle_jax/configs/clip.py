"""CLIP / SigLIP: contrastive image–text pre-training (family `clip`).

  python train.py --config configs/clip.py:shapes --workdir demo/clip
    tiny ViT + text transformer (0.23M params) on the synthetic shapes dataset
    (32 px), about 2 minutes on a 2-core CPU: loss ~4.2 -> ~0.55, in-batch
    image->text accuracy 1/64 -> ~0.7 (identical colour pairs in a batch cap it).
    Then `python -m dalle_jax.tools.zero_shot --clip demo/clip --data_dir data
    --dataset shapes/32px_5000 --ensemble logsumexp` names the shape colour of
    held-out images with ~98% top-1 (shape: ~33%, chance 20%).
  python train.py --config configs/clip.py:vit_b32 --workdir W --config.data.dataset=coco_captions
    ViT-B/32 at OpenAI CLIP's published sizes (also vit_b16, vit_l14). Parameters
    are sharded over every device ('fsdp' = -1) up to 256 of them (widths 768 =
    2^8 * 3); beyond, 2-D FSDP splits the weights' other dim over 'data' too:
    --config.mesh.fsdp=256 --config.mesh.data=-1 (parallel.fsdp_2d_rules).

Append `_siglip` to any preset (e.g. `shapes_siglip`) for the sigmoid loss with a
learned bias (SigLIP: t' = log 10, b = -10). Imported Hugging Face checkpoints
(`python -m dalle_jax.tools.convert hf_clip`) carry their own config.
"""
import math

import ml_collections

from dalle_jax.configs import common
from dalle_jax import parallel

# name: (vision image/patch/width/layers/heads, text width/layers/heads, embed dim)
VIT_PRESETS = {
    "vit_b32": dict(image=224, patch=32, vw=768, vl=12, vh=12, tw=512, tl=12, th=8, embed=512),
    "vit_b16": dict(image=224, patch=16, vw=768, vl=12, vh=12, tw=512, tl=12, th=8, embed=512),
    "vit_l14": dict(image=224, patch=14, vw=1024, vl=24, vh=16, tw=768, tl=12, th=12, embed=768),
}
PRESETS = ("shapes",) + tuple(VIT_PRESETS)


def model_config(image_size, patch, vw, vl, vh, tw, tl, th, embed, vocab_size, max_len,
                 activation="quick_gelu"):
  m = ml_collections.ConfigDict()
  m.embed_dim = embed
  m.activation = activation  # quick_gelu (OpenAI CLIP) | gelu
  m.ln_epsilon = 1e-5
  m.loss = "softmax"  # softmax (CLIP) | sigmoid (SigLIP)
  m.logit_scale_init = math.log(1 / 0.07)  # temperature, log space; clamped at ln 100
  m.logit_bias_init = -10.0  # SigLIP only
  # Pixel statistics the tower normalises with (inputs arrive in [-1, 1]);
  # 0.5/0.5 leaves them as they are, imported OpenAI models use theirs.
  m.image_mean = (0.5, 0.5, 0.5)
  m.image_std = (0.5, 0.5, 0.5)
  m.vision = ml_collections.ConfigDict(dict(
      image_size=image_size, patch_size=patch, width=vw, layers=vl, heads=vh, mlp_dim=4 * vw))
  m.text = ml_collections.ConfigDict(dict(
      vocab_size=vocab_size, max_len=max_len, width=tw, layers=tl, heads=th, mlp_dim=4 * tw,
      pool="last",  # last (our tokenizers, uses the mask) | eos | argmax (HF imports)
      eos_id=-1))  # for pool="eos"
  return m


def get_config(arg=None):
  arg = arg or "shapes"
  siglip = arg.endswith("_siglip")
  name = common.parse_preset(arg[:-len("_siglip")] if siglip else arg, PRESETS, "shapes")
  c = common.base_config()
  c.family = "clip"

  # Image size, vocab and context are shared between the data/tokenizer keys
  # and the model: one override changes both.
  image_size = ml_collections.FieldReference(224, field_type=int)
  vocab = ml_collections.FieldReference(49408, field_type=int)
  max_len = ml_collections.FieldReference(77, field_type=int)

  # Random resized crop (+ optional flip), done on device inside the train step.
  c.augment = ml_collections.ConfigDict()
  c.augment.enabled = True
  c.augment.crop_scale = (0.5, 1.0)  # fraction of the image area kept
  c.augment.crop_ratio = (3 / 4, 4 / 3)
  c.augment.flip = False

  if name == "shapes":
    image_size.set(32)
    vocab.set(128)  # the captions' ~25 words fit whole (<= 11 tokens with EOS)
    max_len.set(16)
    c.model = model_config(image_size, patch=8, vw=64, vl=2, vh=4, tw=64, tl=2, th=4, embed=64,
                           vocab_size=vocab, max_len=max_len)
    c.data.dataset = "shapes/32px_5000"
    c.batch_size = 64
    c.total_steps = 1000
    c.log_every = 50
    c.eval_every = 200
    c.preview_every = 200
    c.checkpoint_every = 200
    c.dtype = "float32"  # CPU: bf16 is slower there
    c.optimizer = common.optimizer_config("adamw", lr=3e-3)
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 0.05
    # Shapes are already randomly placed and sized, and a crop can cut the
    # shape out of view (its caption then lies): no crops here.
    c.augment.enabled = False
  else:
    p = VIT_PRESETS[name]
    c.model = model_config(image_size, p["patch"], p["vw"], p["vl"], p["vh"], p["tw"], p["tl"],
                           p["th"], p["embed"], vocab_size=vocab, max_len=max_len)
    c.data.dataset = "coco_captions"
    c.batch_size = 4096
    c.total_steps = 100_000
    c.log_every = 100
    c.eval_every = 2000
    c.checkpoint_every = 2000
    c.preview_every = 0
    c.optimizer = common.optimizer_config("adamw", lr=5e-4)
    c.optimizer.warmup_steps = 2000
    c.optimizer.b2 = 0.98
    c.optimizer.eps = 1e-6
    c.optimizer.weight_decay = 0.2
    c.mesh.data = 1
    c.mesh.fsdp = -1  # big contrastive batches: shard parameters, batch over all devices
    c.logical_axis_rules = parallel.fsdp_2d_rules(
        parallel.replace_rule(common.DEFAULT_RULES, "norm", "fsdp"))
    c.remat = "dots"

  c.data.image_size = image_size
  c.text = common.text_config(max_len=max_len, tokenizer="sentencepiece", path="", vocab_size=vocab)
  c.text.lowercase = True

  if siglip:
    c.model.loss = "sigmoid"
    c.model.logit_scale_init = math.log(10.0)
    c.model.logit_bias_init = -10.0
  return c
