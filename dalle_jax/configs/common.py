"""Config keys every family shares (same name, same meaning).

Family files (`configs/vqgan.py`, `configs/dalle.py`, ...) start from
`base_config()` and fill `model.*` plus their own task keys. Presets are chosen
with `--config configs/FAMILY.py:PRESET` and any key can be overridden with
`--config.key=value`; the config is locked, so a misspelt key is an error.
"""
import ml_collections

# Logical axis name -> mesh axes. Batch goes over every data-parallel axis
# (data, fsdp); parameters are sharded over fsdp on their "embed"-like dim
# and over tensor on heads / mlp / vocab (MaxText / T5X idiom).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("codebook", None),
    ("codebook_embed", None),
    # Convolutions: shard the output channels over fsdp, keep inputs whole.
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("channels", None),
    ("height", None),
    ("width", None),
    ("layers", None),
    ("norm", None),
)


def base_config():
  c = ml_collections.ConfigDict()
  c.family = ""  # set by the family file; selects dalle_jax.tasks.<family>
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 32  # global, across all devices and processes
  c.grad_accum_steps = 1  # micro-batches per step (batch_size is split)
  c.log_every = 10
  c.eval_every = 200
  c.eval_batches = 4
  # FID / CLIP score of samples of a fixed caption set every `every` steps (0 = off), logged
  # as eval/fid, eval/clip_score: keys documented in dalle_jax/evaluate/periodic.py.
  c.eval_metrics = ml_collections.ConfigDict(dict(
      every=0, num=64, captions="", metrics="fid,clip_score", real_stats="", inception="",
      mode="legacy_pytorch", clip="", batch_size=16, seed=0))
  c.preview_every = 200
  c.checkpoint_every = 200
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.nan_policy = "stop"  # "stop" aborts naming the step; "skip" drops the update
  # Fine-tuning: parameters from a training workdir or an imported checkpoint
  # (tools.convert) start a fresh run (fresh optimizer, step 0). Regexes over
  # parameter paths ("decoder/layers/.*") pick which to load ("" = all / none);
  # the others keep their initialisation.
  c.init_from = ""
  c.init_from_include = ""
  c.init_from_exclude = ""

  # Mesh: ordered axis sizes, one may be -1 (= all remaining devices).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.logical_axis_rules = DEFAULT_RULES
  # An array whose dim a mesh axis does not divide is replicated along that axis
  # only below this many bytes (logged); a larger one is an error naming it.
  c.allow_replication_below = 1 << 20

  # Numerics: f32 params, bf16 compute by default.
  c.dtype = "bfloat16"
  c.param_dtype = "float32"
  c.remat = "none"  # none | full | dots | save_dots (dalle_jax.models.layers.REMAT_POLICIES)
  c.scan_layers = False
  # Full attention: auto | xla | dot_product_attention | cudnn | splash (what runs
  # where: dalle_jax/models/layers.py; auto = splash on TPU, cuDNN on GPU, xla on CPU).
  c.attention_impl = "auto"

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "shapes"  # TFDS name
  c.data.data_dir = "data"  # TFDS data_dir (built with tools.build_dataset)
  c.data.image_size = 64
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.shuffle = True
  c.data.num_workers = 0  # grain worker processes (0 = in-process)
  c.data.read_threads = 4  # batches assembled at once (per process / worker)
  c.data.prefetch = 4  # batches read ahead (per process / worker)
  c.data.prefetch_to_device = 0  # batches the trainer shards onto the mesh ahead (0 = off)
  c.data.image_dtype = "float32"  # float32 | uint8 (the step scales: pipeline.normalize_images)
  c.data.random_crop = False
  # > 0: train on crop_size windows of the image_size images (random per example; centred
  # for eval): super-resolution stages whose U-Nets are convolutional (tasks/diffusion.py)
  c.data.crop_size = 0

  c.optimizer = optimizer_config()
  c.ema_decay = 0.0  # 0 disables the parameter EMA
  c.model = ml_collections.ConfigDict()
  return c


def optimizer_config(name="adamw", lr=3e-4):
  o = ml_collections.ConfigDict()
  o.name = name  # adamw | adafactor | lion | sgd
  o.learning_rate = lr
  o.schedule = "cosine"  # cosine | linear | constant
  o.warmup_steps = 100
  o.end_lr_factor = 0.1  # final lr = learning_rate * end_lr_factor
  o.b1 = 0.9
  o.b2 = 0.99
  o.eps = 1e-8
  o.weight_decay = 0.0
  # Parameter-path regex excluded from weight decay (norms, biases, embeddings).
  o.no_decay = r"(bias|scale|norm|embedding|pos_emb|codebook|logit_scale)"
  o.grad_clip = 1.0  # global-norm clip; 0 disables
  return o


def parse_preset(arg, presets, default):
  """Returns the preset name from `get_config(arg)`'s argument, checked."""
  name = arg or default
  if name not in presets:
    raise ValueError(
        f"unknown preset {name!r}; available presets: {', '.join(sorted(presets))}")
  return name


def text_config(max_len=64, tokenizer="sentencepiece", path="", vocab_size=0):
  """The shared text-tokenizer keys (see dalle_jax.data.tokenizers.get_tokenizer)."""
  t = ml_collections.ConfigDict()
  t.tokenizer = tokenizer  # sentencepiece | hf (local directory of a fast tokenizer)
  t.path = path  # .model file or HF directory; "" = train one on the dataset's captions
  t.vocab_size = vocab_size  # used when a SentencePiece model is trained on the fly
  t.max_len = max_len
  t.lowercase = True
  return t
