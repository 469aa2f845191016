"""Import a diffusers `UNet2DModel` folder (DDPM CIFAR-10 / CelebA-HQ / LSUN, Karlo's
super-resolution U-Nets) into dalle_jax's U-Net (dalle_jax/models/unet.py).

  convert_unet2d(SRC) -> (model_cfg, {'params': ...}, scheduler, report)

SRC holds `config.json` and `diffusion_pytorch_model.safetensors` (or a sharded
`.safetensors.index.json`, or `diffusion_pytorch_model.bin`, read with
`torch.load(weights_only=True)`); the scheduler settings come from
`scheduler_config.json` beside it or from `../scheduler/scheduler_config.json`
(a pipeline folder's `unet/`), as the raw diffusers dict, or None.

Block types per level (down i <-> up n-1-i must mirror each other):
  DownBlock2D / UpBlock2D                    attention none, conv resampling
  AttnDownBlock2D / AttnUpBlock2D            self-attention, conv or resnet resampling
                                             (downsample_type / upsample_type)
  ResnetDownsampleBlock2D / ResnetUpsampleBlock2D   no attention, resnet resampling
Mid block UNetMidBlock2D (with or without attention) or none; positional time
embedding; class_embed_type None (num_class_embeds) / timestep / identity becomes
the extra embedding "class" (pass embeds={"class": labels}).
Every tensor is checked by name and shape against our model; anything missing,
unexpected or misshapen fails the import with one line naming the tensors.
The imported model runs in f32 and reproduces diffusers' output
(tests/test_unet.py).
"""
import os

import numpy as np
from flax import traverse_util

from dalle_jax.convert import common
from dalle_jax.models import unet as unet_lib


ConversionError = common.ConversionError

_DOWN = {"DownBlock2D": ("none", "conv"), "AttnDownBlock2D": ("self", None),
         "ResnetDownsampleBlock2D": ("none", "resnet")}
_UP = {"UpBlock2D": ("none", "conv"), "AttnUpBlock2D": ("self", None),
       "ResnetUpsampleBlock2D": ("none", "resnet")}


# --- reading --------------------------------------------------------------------

def read_config(src):
  return common.read_diffusers_config(src, ("UNet2DModel",))


def read_weights(src):
  """diffusers tensor name -> float32 numpy array (safetensors single, sharded or a variant
  such as diffusion_pytorch_model.fp16.safetensors, or a torch .bin)."""
  return common.read_weights(src, common.DIFFUSERS_STEMS, dtype=np.float32)


def read_scheduler(src):
  """(scheduler config dict, its path) from beside SRC or ../scheduler/, or (None, None)."""
  for path in (os.path.join(src, "scheduler_config.json"),
               os.path.join(os.path.dirname(os.path.abspath(src)), "scheduler",
                            "scheduler_config.json")):
    if os.path.isfile(path):
      return common.load_json(path), path
  return None, None


# --- config ---------------------------------------------------------------------

def model_config(cfg, where="config.json"):
  """Our model config dict (unet.default_model_config() keys) for a UNet2DModel config."""
  get = lambda k, default: cfg.get(k) if cfg.get(k) is not None else default
  bad = lambda key, why: ConversionError(f"{where}: {key}={cfg.get(key)!r}: {why}")
  chans = tuple(int(c) for c in get("block_out_channels", (224, 448, 672, 896)))
  n = len(chans)
  down = list(get("down_block_types", ()))
  up = list(get("up_block_types", ()))
  if len(down) != n or len(up) != n:
    raise bad("down_block_types", f"need {n} down and {n} up block types (block_out_channels)")
  down_type = get("downsample_type", "conv")
  up_type = get("upsample_type", "conv")
  attention, resample = [], []
  for i in range(n):
    d, u = down[i], up[n - 1 - i]
    if d not in _DOWN:
      raise bad("down_block_types", f"{d} is not supported (choose {', '.join(_DOWN)})")
    if u not in _UP:
      raise bad("up_block_types", f"{u} is not supported (choose {', '.join(_UP)})")
    (a_d, r_d), (a_u, r_u) = _DOWN[d], _UP[u]
    r_d = r_d or down_type
    r_u = r_u or up_type
    if a_d != a_u:
      raise bad("up_block_types", f"{u} at level {i} does not mirror {d} (attention differs)")
    uses_down, uses_up = i < n - 1, i > 0
    if uses_down and uses_up and r_d != r_u:
      raise bad("up_block_types", f"level {i} down-samples with {r_d} but up-samples with {r_u}")
    r = r_d if uses_down else r_u
    if r not in unet_lib.RESAMPLE_KINDS:
      raise bad("downsample_type", f"{r!r} is not supported (conv | resnet)")
    attention.append(a_d)
    resample.append(r)
  if get("time_embedding_type", "positional") != "positional":
    raise bad("time_embedding_type", "only 'positional' is supported")
  shift = get("resnet_time_scale_shift", "default")
  if shift not in ("default", "scale_shift"):
    raise bad("resnet_time_scale_shift", "only 'default' and 'scale_shift' are supported")
  norm_groups = int(get("norm_num_groups", 32))
  mid_type = cfg.get("mid_block_type", "UNetMidBlock2D")
  if mid_type not in (None, "UNetMidBlock2D"):
    raise bad("mid_block_type", "only UNetMidBlock2D or null is supported")
  attn_groups = cfg.get("attn_norm_num_groups")
  if attn_groups is None:  # diffusers: a norm only with the additive time conditioning
    attn_groups = norm_groups if shift == "default" else 0
  head_dim = cfg.get("attention_head_dim", 8)
  act = get("act_fn", "silu")
  if act not in ("silu", "swish", "gelu", "relu"):
    raise bad("act_fn", "choose silu | gelu | relu")
  embeds = ()
  class_type = cfg.get("class_embed_type")
  if class_type is None and cfg.get("num_class_embeds") is not None:
    embeds = (f"class:class:{int(cfg['num_class_embeds'])}",)
  elif class_type in ("timestep", "identity"):
    embeds = (f"class:{class_type}",)
  elif class_type is not None:
    raise bad("class_embed_type", "choose null | timestep | identity")
  layers_per_block = get("layers_per_block", 2)
  out = unet_lib.default_model_config()
  out.update(
      in_channels=int(get("in_channels", 3)), out_channels=int(get("out_channels", 3)),
      block_channels=chans,
      num_res_blocks=(tuple(int(x) for x in layers_per_block)
                      if isinstance(layers_per_block, (list, tuple)) else int(layers_per_block)),
      attention=tuple(attention), resample=tuple(resample),
      mid_block=mid_type is not None,
      mid_attention="self" if get("add_attention", True) else "none", mid_layers=1,
      attn_heads=0 if head_dim else 1, attn_head_dim=int(head_dim) if head_dim else 0,
      attn_norm_eps=None, mid_attn_norm_groups=int(attn_groups),
      downsample_padding=int(get("downsample_padding", 1)), downsample_first=False,
      skip_scale=1.0, time_embed_dim=int(get("time_embedding_dim", 0) or 0),
      time_sinusoid_dim=chans[0], flip_sin_to_cos=bool(get("flip_sin_to_cos", True)),
      freq_shift=float(get("freq_shift", 0)), time_embed_out_act="none", act=act,
      norm_groups=norm_groups, norm_eps=float(get("norm_eps", 1e-5)),
      time_cond="add" if shift == "default" else "scale_shift", skip_time_act=False,
      res_out_scale=1.0, mid_out_scale=float(get("mid_block_scale_factor", 1.0)),
      dropout=float(get("dropout", 0.0)), extra_embeds=embeds,
      center_input=bool(get("center_input_sample", False)), conv_in_kernel=3, conv_out_kernel=3)
  try:
    return unet_lib.unet_kwargs(out)
  except ValueError as e:
    raise ConversionError(f"{where}: {e}") from e


# --- weights --------------------------------------------------------------------

_MODULES = {"time_proj": "time_emb_proj", "shortcut": "conv_shortcut", "norm": "group_norm",
            "query": "to_q", "key": "to_k", "value": "to_v", "out": "to_out.0",
            "add_key": "add_k_proj", "add_value": "add_v_proj", "context_norm": "norm_cross"}
_BLOCKS = {"res": "resnets", "attn": "attentions"}  # (no diffusers block has two attentions)
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias",
           "pos_emb": "positional_embedding"}
_POOL = {"norm_in": "norm1", "norm_out": "norm2", "proj": "proj", "query": "pool.q_proj",
         "key": "pool.k_proj", "value": "pool.v_proj"}


def diffusers_name(path, n_levels):
  """Our parameter path (tuple of names) -> the diffusers state-dict name."""
  parts = [p for p in path if p != "dense"]  # DenseGeneral's inner module
  leaf = _LEAVES[parts[-1]]
  top, rest = parts[0], parts[1:-1]
  if top in ("conv_in", "conv_out"):
    prefix = top
  elif top == "norm_out":
    prefix = "conv_norm_out"
  elif top == "time_embed":
    prefix = "time_embedding." + ".".join(rest)
    rest = []
  elif top == "context_proj":  # UNet2DConditionModel's text projection
    prefix = "encoder_hid_proj"
  elif top == "context_pool":  # UNet2DConditionModel's addition_embed_type="text"
    prefix = "add_embedding." + ".".join(_POOL[r] for r in rest) if rest else "add_embedding"
    if parts[-1] == "pos_emb":
      return "add_embedding.pool.positional_embedding"
    rest = []
  elif top == "embed_class":  # diffusers' class embedding (class_labels)
    prefix = "class_embedding" + "".join("." + r for r in rest)
    rest = []
  elif top.startswith("mid_"):
    kind, j = top[len("mid_"):].rsplit("_", 1)
    prefix = f"mid_block.{_BLOCKS[kind]}.{j}"
  elif top.startswith(("down_", "up_")):
    direction, level = top.split("_")
    block = int(level) if direction == "down" else n_levels - 1 - int(level)
    prefix = f"{direction}_blocks.{block}"
    sub, rest = rest[0], rest[1:]
    if sub in ("downsample", "upsample"):
      prefix += f".{sub}rs.0"
    else:
      kind, j = sub.rsplit("_", 1)
      prefix += f".{_BLOCKS[kind]}.{j}"
  else:
    raise KeyError(f"no diffusers name for {'/'.join(path)}")
  names = [prefix] + [_MODULES.get(r, r) for r in rest] + [leaf]
  return ".".join(names)


def _to_ours(w, shape, path):
  """A torch-layout tensor -> our layout of `shape`, or None if it does not fit."""
  leaf = path[-1]
  if leaf == "kernel" and len(shape) == 4 and w.ndim == 4:  # conv (O, I, kh, kw) -> (kh, kw, I, O)
    w = np.transpose(w, (2, 3, 1, 0))
  elif leaf == "kernel" and w.ndim == 2:  # Linear (out, in) -> (in, out)
    w = w.T
    if len(shape) == 3:  # heads split: (C, N*K) -> (C, N, K); out: (N*K, C) -> (N, K, C)
      merged = ((shape[0] * shape[1], shape[2]) if "out" in path
                else (shape[0], shape[1] * shape[2]))
      if tuple(w.shape) != merged:
        return None
      w = w.reshape(shape)
  elif leaf == "bias" and len(shape) == 2 and w.shape == (shape[0] * shape[1],):
    w = w.reshape(shape)
  return w if tuple(w.shape) == tuple(shape) else None


def expected_shapes(model_cfg):
  """Our parameter path -> shape, from an abstract init (nothing allocated)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  model = unet_lib.UNet(**unet_lib.unet_kwargs(model_cfg))
  x, t, kw = unet_lib.example_inputs(model)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, **kw))
  params = nn.unbox(abstract["params"])
  return {p: tuple(a.shape) for p, a in traverse_util.flatten_dict(params).items()}


def convert_weights(weights, model_cfg, where="checkpoint"):
  """diffusers state dict -> our {'params': ...}; every name and shape checked."""
  want = expected_shapes(model_cfg)
  n = len(model_cfg["block_channels"])

  def name_of(path):
    try:
      return diffusers_name(path, n)
    except KeyError:
      raise ConversionError(f"{where}: the model's parameter {'/'.join(path)} has no diffusers "
                            "counterpart (a setting diffusers' U-Nets do not have)") from None

  flat = common.assign(weights, want, name_of, _to_ours, where, "the diffusers U-Net")
  return {"params": traverse_util.unflatten_dict(flat)}


def convert_unet2d(src_dir):
  """A diffusers UNet2DModel folder -> (model_cfg dict, {'params'}, scheduler dict | None,
  report lines)."""
  src = os.path.abspath(os.path.expanduser(src_dir))
  if not os.path.isdir(src):
    raise ConversionError(f"{src_dir}: not a directory")
  cfg = read_config(src)
  model_cfg = model_config(cfg, where=os.path.join(src, "config.json"))
  weights = read_weights(src)
  variables = convert_weights(weights, model_cfg, where=src)
  scheduler, sched_path = read_scheduler(src)
  n_params = sum(int(np.prod(v.shape)) for v in weights.values())
  report = [
      f"{src}: UNet2DModel, {len(weights)} tensors ({n_params / 1e6:.2f}M parameters) converted",
      f"levels {list(model_cfg['block_channels'])}, attention {list(model_cfg['attention'])}, "
      f"resample {list(model_cfg['resample'])}, sample_size {cfg.get('sample_size')}",
      f"scheduler: {sched_path}" if scheduler is not None else
      "scheduler: none found (scheduler_config.json beside the model or in ../scheduler/)",
  ]
  return model_cfg, variables, scheduler, report
