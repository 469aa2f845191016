"""Import Karlo (kakaobrain's unCLIP) from its diffusers layout, module by module.

  convert_prior(SRC/prior)          diffusers PriorTransformer -> models/prior.py
  convert_text_proj(SRC/text_proj)  UnCLIPTextProjModel        -> models/unclip.py TextProjection
  convert_decoder_unet(SRC/decoder) UNet2DConditionModel       -> models/unet.py UNet
  convert_super_res(SRC/super_res_first | super_res_last)  UNet2DModel -> UNet
                                    (convert/diffusers_unet.py)
  convert_karlo(SRC)                all of the above + the scheduler configs (text-to-image
                                    layout, or the image-variation one with image_encoder/
                                    and no prior)

Each `convert_*` returns (model kwargs, variables, report lines); the `*_config` /
`*_weights` halves work on an in-memory config dict / state dict. Every tensor is
checked by name and shape against an abstract init of our model; anything missing,
unexpected or misshapen fails the import with one line naming the tensors.
The text encoder (CLIP ViT-L/14 with projection, `text_encoder/` + `tokenizer/`) is
dalle_jax/convert/hf_clip.py's.

Reference behaviour (diffusers' UnCLIPPipeline) the imported modules reproduce:
  * the prior sees [caption states ; text embedding ; timestep ; x_t ; query] with a
    causal mask and the caption's padding mask (diffusers applies the causal mask
    only when a text mask is passed; the pipeline always passes one), and predicts
    x0 in the space normalised by `clip_mean` / `clip_std` (our 'clip_stats');
  * the decoder's context is [4 image tokens ; LayerNorm(Linear(caption states))],
    its mask the caption mask with 4 ones in front, and Linear(image embedding) +
    Linear(text embedding) is added to the time embedding (class_embed_type
    "identity", our extra embedding "clip:identity").

Shapes: E CLIP embedding width, N extra context tokens, X context width.
"""
import os

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from dalle_jax.convert import common
from dalle_jax.convert import diffusers_unet as dconv
from dalle_jax.models import prior as prior_lib
from dalle_jax.models import unclip as unclip_lib
from dalle_jax.models import unet as unet_lib

ConversionError = common.ConversionError

COMPONENTS = ("prior", "text_proj", "decoder", "super_res_first", "super_res_last")
SCHEDULERS = ("prior_scheduler", "decoder_scheduler", "super_res_scheduler")
# The two pipelines (model_index.json's _class_name) and the folders each one needs here
# (the CLIP text encoder and tokenizer are karlo_checkpoint's). The image-variation layout
# (UnCLIPImageVariationPipeline) has no prior: it decodes an image's CLIP embedding from its
# own vision tower (`image_encoder/` + the `feature_extractor/` that preprocesses images).
TEXT_TO_IMAGE, VARIATION = "UnCLIPPipeline", "UnCLIPImageVariationPipeline"
LAYOUTS = {
    TEXT_TO_IMAGE: COMPONENTS + SCHEDULERS,
    VARIATION: ("text_proj", "decoder", "super_res_first", "super_res_last",
                "decoder_scheduler", "super_res_scheduler", "image_encoder",
                "feature_extractor"),
}


# --- reading ----------------------------------------------------------------------

read_config = common.read_diffusers_config
_unflatten = traverse_util.unflatten_dict


def _linear(w, shape, path):
  """A torch tensor -> ours of `shape`, or None if it does not fit exactly: Linear weights
  (out, in) -> kernels (in, out) or attention's head-split (D, H, K) / (H, K, D); biases
  (H*K,) -> (H, K); other tensors ((1, E) statistics, (1, L, D) positional tables, (1, 1, D)
  query) lose leading 1s."""
  shape = tuple(shape)
  if path[-1] == "kernel":
    if w.ndim != 2:
      return None
    w = w.T
    if len(shape) == 3:
      merged = ((shape[0] * shape[1], shape[2]) if path[-3] == "out"
                else (shape[0], shape[1] * shape[2]))
      return w.reshape(shape) if w.shape == merged else None
    return w if w.shape == shape else None
  if path[-1] == "bias":
    return w.reshape(shape) if w.ndim == 1 and w.size == int(np.prod(shape)) else None
  squeezed = lambda dims: tuple(s for s in dims if s != 1)
  if squeezed(w.shape) != squeezed(shape) or w.ndim < len(shape):
    return None
  return w.reshape(shape)


def _assign(weights, want, name_of, where, what, fit=_linear):
  """Our path -> array for every expected path; one error naming every problem."""
  return common.assign(weights, want, name_of, fit, where, f"the {what}")


def param_shapes(tree):
  """A (boxed or abstract) variable tree -> {path tuple: shape}."""
  return {p: tuple(a.shape) for p, a in traverse_util.flatten_dict(nn.unbox(tree)).items()}


# --- prior ------------------------------------------------------------------------

_PRIOR_TOP = {"time_1": "time_embedding.linear_1", "time_2": "time_embedding.linear_2",
              "x_proj": "proj_in", "text_embed_proj": "embedding_proj",
              "text_proj": "encoder_hidden_states_proj", "text_embed_norm": "embedding_proj_norm",
              "norm_in": "norm_in", "norm_out": "norm_out", "out_proj": "proj_to_clip_embeddings",
              "query": "prd_embedding", "pos_embed": "positional_embedding"}
_BLOCK = {"ln_attn": "norm1", "ln_mlp": "norm3", "attn": "attn1", "query": "to_q", "key": "to_k",
          "value": "to_v", "out": "to_out.0", "mlp": "ff", "wi": "net.0.proj", "wo": "net.2"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def prior_config(cfg, where="config.json"):
  """PriorTransformer kwargs (models/prior.py) for a diffusers PriorTransformer config."""
  get = lambda k, default: cfg.get(k) if cfg.get(k) is not None else default
  bad = lambda key, why: ConversionError(f"{where}: {key}={cfg.get(key)!r}: {why}")
  e = int(get("embedding_dim", 768))
  if int(get("additional_embeddings", 4)) != prior_lib.NUM_EXTRA_TOKENS:
    raise bad("additional_embeddings", f"only {prior_lib.NUM_EXTRA_TOKENS} (text embedding, "
              "timestep, x_t, query) is supported")
  if cfg.get("added_emb_type", "prd") != "prd":
    raise bad("added_emb_type", "only 'prd' (a learned query token) is supported")
  if cfg.get("encoder_hid_proj_type", "linear") != "linear":
    raise bad("encoder_hid_proj_type", "only 'linear' (caption token states) is supported")
  for key in ("norm_in_type", "embedding_proj_norm_type"):
    if cfg.get(key) not in (None, "layer"):
      raise bad(key, "choose null | layer")
  if int(get("embedding_proj_dim", e)) != e or int(get("clip_embed_dim", e)) != e:
    raise bad("clip_embed_dim", f"embedding_proj_dim and clip_embed_dim must equal "
              f"embedding_dim={e}")
  act = get("time_embed_act_fn", "silu")
  if act not in prior_lib.TIME_ACTS:
    raise bad("time_embed_act_fn", f"choose {'|'.join(prior_lib.TIME_ACTS)}")
  heads, head_dim = int(get("num_attention_heads", 32)), int(get("attention_head_dim", 64))
  width = heads * head_dim
  return dict(embed_dim=e, text_dim=e, text_len=int(get("num_embeddings", 77)),
              num_layers=int(get("num_layers", 20)), num_heads=heads, head_dim=head_dim,
              mlp_dim=4 * width, time_dim=int(get("time_embed_dim", width)), time_act=act,
              norm_in=cfg.get("norm_in_type") == "layer",
              text_embed_norm=cfg.get("embedding_proj_norm_type") == "layer")


def prior_name(path):
  """Our prior parameter path -> the diffusers state-dict name."""
  parts = [p for p in path if p != "dense"]
  if parts[0] == "blocks":  # blocks/layer_i/<ln|attn|mlp>/[sub]/leaf
    i = parts[1][len("layer_"):]
    mods = [_BLOCK[p] for p in parts[2:-1]]
    return ".".join([f"transformer_blocks.{i}"] + mods + [_LEAF[parts[-1]]])
  if len(parts) == 1:  # raw parameters
    return _PRIOR_TOP[parts[0]]
  return f"{_PRIOR_TOP[parts[0]]}.{_LEAF[parts[-1]]}"


def prior_weights(weights, kwargs, where="checkpoint"):
  """diffusers PriorTransformer state dict -> {'params', 'clip_stats'} (per-layer blocks;
  dalle_jax.models.scan_layout.to_layout turns them into a scanned Stack)."""
  model = prior_lib.PriorTransformer(**kwargs)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               *prior_lib.example_inputs(model)))
  want = {("params",) + p: s for p, s in param_shapes(abstract["params"]).items()}
  stats = param_shapes(abstract[prior_lib.STATS])
  want.update({(prior_lib.STATS, k): s for (k,), s in stats.items()})
  stats_names = {"mean": "clip_mean", "std": "clip_std"}
  name_of = lambda p: stats_names[p[1]] if p[0] == prior_lib.STATS else prior_name(p[1:])
  flat = _assign(weights, want, name_of, where, "diffusers PriorTransformer")
  std = flat[(prior_lib.STATS, "std")]
  if not np.all(np.abs(std) > 0):
    raise ConversionError(f"{where}: clip_std has {int(np.sum(std == 0))} zero entries (an "
                          "untrained PriorTransformer's default): the prior's outputs would all "
                          "be clip_mean")
  return _unflatten(flat)


def convert_prior(src):
  src = os.path.abspath(src)
  cfg = read_config(src, ("PriorTransformer",))
  kwargs = prior_config(cfg, where=os.path.join(src, "config.json"))
  weights = dconv.read_weights(src)
  variables = prior_weights(weights, kwargs, where=src)
  return kwargs, variables, [
      f"{src}: PriorTransformer, {len(weights)} tensors ({_count(weights)}) converted: "
      f"{kwargs['num_layers']} layers, width {kwargs['num_heads'] * kwargs['head_dim']}, "
      f"embedding {kwargs['embed_dim']}, {kwargs['text_len']} caption tokens"]


# --- text projection --------------------------------------------------------------

_TEXT_PROJ = {"null_image_embed": "learned_classifier_free_guidance_embeddings",
              "image_to_time": "clip_image_embeddings_project_to_time_embeddings",
              "text_to_time": "embedding_proj", "image_to_tokens": "clip_extra_context_tokens_proj",
              "text_proj": "encoder_hidden_states_proj",
              "text_norm": "text_encoder_hidden_states_norm"}


def text_proj_config(cfg, where="config.json"):
  """TextProjection kwargs for a diffusers UnCLIPTextProjModel config, plus the CLIP
  embedding width (returned separately: the module infers it from its input)."""
  for key in ("time_embed_dim", "cross_attention_dim"):
    if cfg.get(key) is None:
      raise ConversionError(f"{where}: {key} is missing")
  kwargs = dict(context_dim=int(cfg["cross_attention_dim"]),
                time_embed_dim=int(cfg["time_embed_dim"]),
                num_tokens=int(cfg.get("clip_extra_context_tokens", 4)))
  return kwargs, int(cfg.get("clip_embeddings_dim", 768))


def _fit_text_proj(w, shape, path):
  if path[1] == "image_to_tokens":
    # diffusers reshapes its (X * N) outputs to (B, X, N) and permutes to (B, N, X):
    # output unit x * N + j is channel x of token j.
    n, x = (shape[1], shape[2]) if path[-1] == "kernel" else shape
    if path[-1] == "kernel":
      if w.shape != (x * n, shape[0]):
        return None
      return w.reshape(x, n, shape[0]).transpose(2, 1, 0)
    return w.reshape(x, n).T if w.shape == (x * n,) else None
  return _linear(w, shape, path)


def text_proj_weights(weights, kwargs, clip_dim, text_dim=None, where="checkpoint"):
  """diffusers UnCLIPTextProjModel state dict -> {'params'}. text_dim: the caption
  states' width (diffusers: the CLIP embedding width)."""
  model = unclip_lib.TextProjection(**kwargs)
  b = 1
  inputs = (np.zeros((b, clip_dim), np.float32), np.zeros((b, clip_dim), np.float32),
            np.zeros((b, 2, text_dim or clip_dim), np.float32))
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs))
  want = {("params",) + p: s for p, s in param_shapes(abstract["params"]).items()}

  def name_of(p):
    parts = [q for q in p[1:] if q != "dense"]
    base = _TEXT_PROJ[parts[0]]
    return base if len(parts) == 1 else f"{base}.{_LEAF[parts[-1]]}"

  return _unflatten(_assign(weights, want, name_of, where, "diffusers UnCLIPTextProjModel",
                            fit=lambda w, s, p: _fit_text_proj(w, s, tuple(q for q in p
                                                                          if q != "dense"))))


def convert_text_proj(src):
  src = os.path.abspath(src)
  cfg = read_config(src, ("UnCLIPTextProjModel",))
  kwargs, clip_dim = text_proj_config(cfg, where=os.path.join(src, "config.json"))
  weights = dconv.read_weights(src)
  variables = text_proj_weights(weights, kwargs, clip_dim, where=src)
  return kwargs, variables, [
      f"{src}: UnCLIPTextProjModel, {len(weights)} tensors converted: {kwargs['num_tokens']} "
      f"context tokens of width {kwargs['context_dim']}, time embedding {kwargs['time_embed_dim']}"]


# --- decoder U-Net ----------------------------------------------------------------

_COND_DOWN = {"ResnetDownsampleBlock2D": "none", "SimpleCrossAttnDownBlock2D": "added_kv"}
_COND_UP = {"ResnetUpsampleBlock2D": "none", "SimpleCrossAttnUpBlock2D": "added_kv"}


def decoder_unet_config(cfg, where="config.json"):
  """UNet kwargs (models/unet.py) for a diffusers UNet2DConditionModel built from the
  ADM-style blocks Karlo's decoder (and DeepFloyd IF) use: ResnetDownsampleBlock2D /
  SimpleCrossAttnDownBlock2D, UNetMidBlock2DSimpleCrossAttn, their up blocks."""
  get = lambda k, default: cfg.get(k) if cfg.get(k) is not None else default
  bad = lambda key, why: ConversionError(f"{where}: {key}={cfg.get(key)!r}: {why}")
  chans = tuple(int(c) for c in get("block_out_channels", (320, 640, 1280, 1280)))
  n = len(chans)
  down, up = list(get("down_block_types", ())), list(get("up_block_types", ()))
  if len(down) != n or len(up) != n:
    raise bad("down_block_types", f"need {n} down and {n} up block types (block_out_channels)")
  only_cross = get("only_cross_attention", False)
  if not isinstance(only_cross, bool):
    raise bad("only_cross_attention", "a per-block list is not supported")
  attention = []
  for i in range(n):
    d, u = down[i], up[n - 1 - i]
    if d not in _COND_DOWN:
      raise bad("down_block_types", f"{d} is not supported (choose {', '.join(_COND_DOWN)})")
    if u not in _COND_UP:
      raise bad("up_block_types", f"{u} is not supported (choose {', '.join(_COND_UP)})")
    if _COND_DOWN[d] != _COND_UP[u]:
      raise bad("up_block_types", f"{u} at level {i} does not mirror {d} (attention differs)")
    kind = _COND_DOWN[d]
    attention.append("cross" if kind == "added_kv" and only_cross else kind)
  mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
  if mid_type not in (None, "UNetMidBlock2DSimpleCrossAttn"):
    raise bad("mid_block_type", "only UNetMidBlock2DSimpleCrossAttn or null is supported")
  mid_only_cross = cfg.get("mid_block_only_cross_attention")
  mid_only_cross = only_cross if mid_only_cross is None else bool(mid_only_cross)
  for key, ok in (("time_embedding_type", (None, "positional")), ("time_cond_proj_dim", (None,)),
                  ("timestep_post_act", (None,)), ("class_embeddings_concat", (None, False)),
                  ("dual_cross_attention", (None, False)), ("addition_embed_type", (None, "text")),
                  ("encoder_hid_dim_type", (None, "text_proj")),
                  ("cross_attention_norm", (None, "group_norm")),
                  ("resnet_time_scale_shift", (None, "default", "scale_shift")),
                  ("class_embed_type", (None, "identity", "timestep")),
                  ("num_class_embeds", (None,))):
    if cfg.get(key) not in ok:
      raise bad(key, f"supported: {', '.join(map(str, ok))}")
  heads = get("attention_head_dim", 8)  # SimpleCrossAttn blocks: the per-head width
  heads = heads if isinstance(heads, (list, tuple)) else [heads] * n
  used = {int(heads[i]) for i in range(n) if attention[i] != "none"}
  if mid_type is not None:
    used.add(int(heads[-1]))
  if len(used) > 1:
    raise bad("attention_head_dim", "one head width for every attention block is supported")
  head_dim = used.pop() if used else 64
  act = get("act_fn", "silu")
  if act not in ("silu", "swish", "gelu", "relu"):
    raise bad("act_fn", "choose silu | gelu | relu")
  embeds = {"identity": (f"{unclip_lib.CLIP_EMBED}:identity",), "timestep": ("class:timestep",),
            None: ()}[cfg.get("class_embed_type")]
  hid_dim = cfg.get("encoder_hid_dim")
  cross_dim = int(get("cross_attention_dim", 1280))
  layers_per_block = get("layers_per_block", 2)
  out = unet_lib.default_model_config()
  out.update(
      in_channels=int(get("in_channels", 4)), out_channels=int(get("out_channels", 4)),
      block_channels=chans,
      num_res_blocks=(tuple(int(x) for x in layers_per_block)
                      if isinstance(layers_per_block, (list, tuple))
                      else (int(layers_per_block),) * n),
      attention=tuple(attention), resample=("resnet",) * n, mid_block=mid_type is not None,
      mid_attention="cross" if mid_only_cross else "added_kv", mid_layers=1,
      attn_heads=0, attn_head_dim=head_dim, attn_norm_eps=1e-5, mid_attn_norm_groups=None,
      downsample_padding=1, downsample_first=False, skip_scale=1.0,
      time_embed_dim=int(get("time_embedding_dim", 0) or 0), time_sinusoid_dim=chans[0],
      flip_sin_to_cos=bool(get("flip_sin_to_cos", True)), freq_shift=float(get("freq_shift", 0)),
      time_embed_out_act=get("time_embedding_act_fn", "none"), act=act,
      norm_groups=int(get("norm_num_groups", 32)), norm_eps=float(get("norm_eps", 1e-5)),
      time_cond="scale_shift" if cfg.get("resnet_time_scale_shift") == "scale_shift" else "add",
      skip_time_act=bool(get("resnet_skip_time_act", False)),
      res_out_scale=float(get("resnet_out_scale_factor", 1.0)),
      mid_out_scale=float(get("mid_block_scale_factor", 1.0)), dropout=float(get("dropout", 0.0)),
      context_dim=int(hid_dim) if hid_dim is not None else cross_dim,
      context_proj_dim=cross_dim if hid_dim is not None else 0,
      context_norm="group_norm" if cfg.get("cross_attention_norm") == "group_norm" else "none",
      context_norm_groups=int(get("cross_attention_norm_num_groups", 32)),
      context_pool="attention" if cfg.get("addition_embed_type") == "text" else "none",
      context_pool_heads=int(get("addition_embed_type_num_heads", 64)), extra_embeds=embeds,
      center_input=bool(get("center_input_sample", False)),
      conv_in_kernel=int(get("conv_in_kernel", 3)), conv_out_kernel=int(get("conv_out_kernel", 3)))
  try:
    return unet_lib.unet_kwargs(out)
  except ValueError as e:
    raise ConversionError(f"{where}: {e}") from e


def convert_decoder_unet(src):
  src = os.path.abspath(src)
  cfg = read_config(src, ("UNet2DConditionModel",))
  model_cfg = decoder_unet_config(cfg, where=os.path.join(src, "config.json"))
  weights = dconv.read_weights(src)
  variables = dconv.convert_weights(weights, model_cfg, where=src)
  return model_cfg, variables, [
      f"{src}: UNet2DConditionModel, {len(weights)} tensors ({_count(weights)}) converted: "
      f"levels {list(model_cfg['block_channels'])}, attention {list(model_cfg['attention'])}, "
      f"context width {model_cfg['context_dim']}, {model_cfg['out_channels']} output channels"]


def convert_super_res(src):
  """A Karlo super-resolution UNet2DModel folder (6 input channels: x_t and the
  bicubically upsampled low-res image, concatenated by the pipeline)."""
  model_cfg, variables, _, report = dconv.convert_unet2d(src)
  return model_cfg, variables, report


# --- the whole pipeline folder ----------------------------------------------------

def read_scheduler_config(path):
  cfg_path = os.path.join(path, "scheduler_config.json")
  if not os.path.isfile(cfg_path):
    raise ConversionError(f"{path}: no scheduler_config.json")
  return common.load_json(cfg_path)


def pipeline_layout(src):
  """TEXT_TO_IMAGE or VARIATION: model_index.json's _class_name (diffusers'
  save_pretrained writes it); without the file, the folders decide (image_encoder/ =
  the variation layout)."""
  path = os.path.join(src, "model_index.json")
  if not os.path.isfile(path):
    return VARIATION if os.path.isdir(os.path.join(src, "image_encoder")) else TEXT_TO_IMAGE
  name = common.load_json(path).get("_class_name")
  if name not in LAYOUTS:
    raise ConversionError(f"{path}: _class_name={name!r}, expected "
                          f"{' or '.join(map(repr, LAYOUTS))} (Karlo's diffusers layouts)")
  return name


def convert_karlo(src):
  """Karlo's diffusers folder -> {component: (kwargs, variables)}, {scheduler: config},
  report lines. Components: prior (absent from the image-variation layout, whose vision
  tower karlo_checkpoint converts), decoder,
  super_res_first, super_res_last. The decoder comes back as UnclipDecoder's variables
  {'params': {'text_proj': ..., 'unet': ...}} with kwargs {'text_proj', 'unet'}."""
  src = os.path.abspath(os.path.expanduser(src))
  if not os.path.isdir(src):
    raise ConversionError(f"{src}: not a directory")
  layout = pipeline_layout(src)
  absent = [c for c in LAYOUTS[layout] if not os.path.isdir(os.path.join(src, c))]
  if absent:
    raise ConversionError(f"{src}: not Karlo's diffusers layout ({layout}), missing "
                          f"{', '.join(a + '/' for a in absent)}")
  report, out = [], {}
  if layout == TEXT_TO_IMAGE:
    prior_kw, prior_vars, r = convert_prior(os.path.join(src, "prior"))
    out["prior"] = (prior_kw, prior_vars)
    report += r
  tp_kw, tp_vars, r = convert_text_proj(os.path.join(src, "text_proj"))
  report += r
  dec_kw, dec_vars, r = convert_decoder_unet(os.path.join(src, "decoder"))
  report += r
  if unclip_lib.CLIP_EMBED + ":identity" not in dec_kw["extra_embeds"]:
    raise ConversionError(f"{src}/decoder/config.json: class_embed_type must be 'identity' "
                          "(the text projection's time embedding goes there)")
  if dec_kw["context_dim"] != tp_kw["context_dim"]:
    raise ConversionError(f"{src}: text_proj makes {tp_kw['context_dim']}-wide tokens but the "
                          f"decoder's cross_attention_dim is {dec_kw['context_dim']}")
  t_dim = dec_kw["time_embed_dim"] or 4 * dec_kw["block_channels"][0]
  if tp_kw["time_embed_dim"] != t_dim:
    raise ConversionError(f"{src}: text_proj's time_embed_dim={tp_kw['time_embed_dim']} but the "
                          f"decoder's time embedding is {t_dim} wide")
  out["decoder"] = ({"text_proj": tp_kw, "unet": dec_kw},
                    {"params": {"text_proj": tp_vars["params"], "unet": dec_vars["params"]}})
  for name in ("super_res_first", "super_res_last"):
    kw, variables, r = convert_super_res(os.path.join(src, name))
    out[name] = (kw, variables)
    report += r
  schedulers = {name: read_scheduler_config(os.path.join(src, name)) for name in SCHEDULERS
                if os.path.isdir(os.path.join(src, name))}
  return out, schedulers, report


def _count(weights):
  return f"{sum(int(np.prod(np.shape(v))) for v in weights.values()) / 1e6:.2f}M parameters"
