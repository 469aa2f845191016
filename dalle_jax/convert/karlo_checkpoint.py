"""`python -m dalle_jax.tools.convert karlo --src DIR --out CKPT`

Karlo's diffusers folder (UnCLIPPipeline: prior/, text_proj/, decoder/, super_res_first/,
super_res_last/, text_encoder/ = CLIPTextModelWithProjection, tokenizer/, prior_scheduler/,
decoder_scheduler/, super_res_scheduler/) becomes ONE `unclip`-family checkpoint:

  CKPT/config.json   family "unclip";
                     model.prior            PriorTransformer kwargs (models/prior.py)
                     model.decoder          {text_proj: TextProjection kwargs, unet: UNet kwargs}
                     model.super_res_first, model.super_res_last   UNet kwargs
                     model.text_encoder     clip.TextTower kwargs (CLIP's text tower)
                     model.decoder_size, model.super_res_size      image sizes (pixels)
                     schedulers.{prior, decoder, super_res}        SchedulerConfig dicts
                     text                   the HF tokenizer (path "tokenizer", max_len = the
                                            prior's caption length)
                     sampling               Karlo's defaults (steps 25/25/7, guidance 4/8)
  CKPT/variables/    {'params': {prior, decoder {text_proj, unet}, super_res_first,
                                 super_res_last, text_encoder},
                      'clip_stats': {mean, std}}   (the prior's embedding statistics)
  CKPT/tokenizer/    the source's tokenizer files

Karlo's image-variation folder (UnCLIPImageVariationPipeline, told apart by model_index.json:
no prior/ nor prior_scheduler/; image_encoder/ = CLIPVisionModelWithProjection and
feature_extractor/ = its CLIPImageProcessor) becomes the same checkpoint without the prior
and its clip_stats, plus

                     model.image_encoder    clip.VisionTower kwargs (pixel mean / std included)
                     model.image_processor  {shortest_edge, crop_size}: the processor's PIL
                                            bicubic resize + centre crop
                     model.embed_dim        the CLIP embedding width
  CKPT/variables/    params.image_encoder

so that `sample.py --method unclip --checkpoint CKPT --variations IMAGE` (and --interpolate,
--text_diff) embed images with it; text -> image and edits need a prior.

`dalle_jax.sampling.unclip.UnclipPipeline.load(CKPT)` reads it in one call. The modules
are mapped and checked by dalle_jax/convert/karlo.py; the CLIP text tower's tensors by
dalle_jax/convert/hf_clip.py's rules (text half).
"""
import argparse
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from dalle_jax.configs.common import DEFAULT_RULES
from dalle_jax.convert import common
from dalle_jax.convert import hf_clip
from dalle_jax.convert import karlo
from dalle_jax.diffusion import schedule as schedule_lib
from dalle_jax.models import clip as clip_lib

ConversionError = karlo.ConversionError
FAMILY = "unclip"
# UnCLIPPipeline's defaults
SAMPLING_DEFAULTS = dict(prior_steps=25, decoder_steps=25, sr_steps=7, prior_guidance_scale=4.0,
                         decoder_guidance_scale=8.0)
TOKENIZER_DIR = "tokenizer"


# --- the CLIP text encoder (CLIPTextModelWithProjection) ----------------------------

def _tower_json(src, model_type, cls, projection):
  """`src`/config.json of one CLIP tower with its projection, checked (one-line errors)."""
  path = os.path.join(src, "config.json")
  if not os.path.isfile(path):
    raise ConversionError(f"{src}: no config.json (not a Hugging Face model folder)")
  cfg = common.load_json(path)
  if cfg.get("model_type") != model_type:
    raise ConversionError(f"{path}: model_type={cfg.get('model_type')!r}, expected "
                          f"'{model_type}' ({cls})")
  if cfg.get("projection_dim") is None:
    raise ConversionError(f"{path}: projection_dim is missing (need the {projection})")
  return cfg


def text_encoder_config(src):
  """TextTower kwargs for `src`'s CLIPTextModelWithProjection config.json (via hf_clip's
  config reader, given the text tower alone)."""
  tc = _tower_json(src, "clip_text_model", "CLIPTextModelWithProjection", "text projection")
  # hf_clip reads CLIPModel configs; the vision half is never built from it here.
  act = tc.get("hidden_act", "quick_gelu")
  eps = tc.get("layer_norm_eps", 1e-5)
  vision = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                image_size=8, patch_size=8, hidden_act=act, layer_norm_eps=eps)
  c = hf_clip.config_from_hf(dict(model_type="clip", text_config=tc, vision_config=vision,
                                  projection_dim=tc["projection_dim"]), None)
  t, m = c.model.text, c.model
  return c, dict(vocab_size=int(t.vocab_size), max_len=int(t.max_len), width=int(t.width),
                 num_layers=int(t.layers), num_heads=int(t.heads), mlp_dim=int(t.mlp_dim),
                 embed_dim=int(m.embed_dim), activation=m.activation,
                 ln_epsilon=float(m.ln_epsilon), pool=t.pool, eos_id=int(t.eos_id))


def convert_text_encoder(src):
  """(TextTower kwargs, params) of a CLIPTextModelWithProjection folder; every tensor checked."""
  src = os.path.abspath(src)
  clip_cfg, kwargs = text_encoder_config(src)
  return kwargs, _convert_tower(src, clip_cfg, "text", "the CLIP text encoder")


def _convert_tower(src, clip_cfg, tower, what):
  """One tower ('text' | 'vision') of a CLIP folder with hf_clip's rules, every tensor checked;
  its params tree without the tower prefix."""
  weights = hf_clip.read_hf_weights(src)
  prefix = tower + "/"
  expected = {k[len(prefix):]: v for k, v in hf_clip.expected_shapes(clip_cfg).items()
              if k.startswith(prefix)}
  rules = [(h, o[len(prefix):], fn) for h, o, fn in hf_clip.conversion_rules(clip_cfg)
           if o.startswith(prefix)]
  flat, missing, bad, used = common.apply_rules(weights, rules, expected)
  unexpected = sorted(k for k in weights if k not in used
                      and not k.endswith(hf_clip.IGNORED_SUFFIXES))
  common.raise_problems(src, what, common.tensor_problems(missing, unexpected, bad))
  return traverse_util.unflatten_dict(flat, sep="/")


# --- the CLIP image encoder (CLIPVisionModelWithProjection) + its image processor -----

def image_encoder_config(src, processor):
  """(our CLIP config, VisionTower kwargs) for `src`'s CLIPVisionModelWithProjection
  config.json; pixel statistics from the processor settings."""
  vc = _tower_json(src, "clip_vision_model", "CLIPVisionModelWithProjection",
                   "visual projection")
  # hf_clip reads CLIPModel configs; the text half is never built from it here.
  text = dict(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
              intermediate_size=8, max_position_embeddings=8,
              hidden_act=vc.get("hidden_act", "quick_gelu"),
              layer_norm_eps=vc.get("layer_norm_eps", 1e-5))
  c = hf_clip.config_from_hf(dict(model_type="clip", text_config=text, vision_config=vc,
                                  projection_dim=vc["projection_dim"]), None)
  v, m = c.model.vision, c.model
  return c, dict(image_size=int(v.image_size), patch_size=int(v.patch_size), width=int(v.width),
                 num_layers=int(v.layers), num_heads=int(v.heads), mlp_dim=int(v.mlp_dim),
                 embed_dim=int(m.embed_dim), activation=m.activation,
                 ln_epsilon=float(m.ln_epsilon), image_mean=tuple(processor["image_mean"]),
                 image_std=tuple(processor["image_std"]))


def convert_image_encoder(src, processor):
  """(VisionTower kwargs, params) of a CLIPVisionModelWithProjection folder; every tensor
  checked (its `vision_model.*` and `visual_projection` names are CLIPModel's)."""
  src = os.path.abspath(src)
  clip_cfg, kwargs = image_encoder_config(src, processor)
  return kwargs, _convert_tower(src, clip_cfg, "vision", "the CLIP image encoder")


def _size(d, keys, where, key):
  """An int from a processor size entry (an int, or a dict with one of `keys`)."""
  if isinstance(d, int):
    return d
  for k in keys:
    if isinstance(d, dict) and d.get(k):
      return int(d[k])
  raise ConversionError(f"{where}: {key}={d!r}: expected an int or {{{keys[0]}: N}}")


def image_processor_config(src):
  """The CLIPImageProcessor settings of `src`/preprocessor_config.json this project
  reproduces: bicubic resize of the shorter side, centre crop, rescale + normalise."""
  path = os.path.join(src, "preprocessor_config.json")
  if not os.path.isfile(path):
    raise ConversionError(f"{src}: no preprocessor_config.json (the image encoder's "
                          "CLIPImageProcessor)")
  p = common.load_json(path)
  for key, want in (("do_resize", True), ("do_center_crop", True), ("do_rescale", True),
                    ("do_normalize", True), ("resample", 3)):
    if p.get(key, want) != want:
      raise ConversionError(f"{path}: {key}={p.get(key)!r}: only {want!r} is supported "
                            "(CLIP's preprocessing: bicubic resize, centre crop, normalise)")
  if abs(float(p.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
    raise ConversionError(f"{path}: rescale_factor={p.get('rescale_factor')!r}: only 1/255")
  size = p.get("size", {"shortest_edge": 224})
  if isinstance(size, dict) and "shortest_edge" not in size:
    raise ConversionError(f"{path}: size={size!r}: only {{shortest_edge: N}} is supported")
  crop = p.get("crop_size", 224)
  if isinstance(crop, dict) and crop.get("height") != crop.get("width"):
    raise ConversionError(f"{path}: crop_size={crop!r}: only square crops are supported")
  out = dict(shortest_edge=_size(size, ("shortest_edge",), path, "size"),
             crop_size=_size(crop, ("height", "width"), path, "crop_size"),
             image_mean=[float(x) for x in p.get("image_mean", clip_lib.OPENAI_MEAN)],
             image_std=[float(x) for x in p.get("image_std", clip_lib.OPENAI_STD)])
  if len(out["image_mean"]) != 3 or len(out["image_std"]) != 3:
    raise ConversionError(f"{path}: image_mean / image_std need 3 entries (RGB)")
  return out


# --- the whole folder ---------------------------------------------------------------

def _sample_size(folder):
  with open(os.path.join(folder, "config.json")) as f:
    size = json.load(f).get("sample_size")
  size = size[0] if isinstance(size, (list, tuple)) else size
  if not size:
    raise ConversionError(f"{folder}/config.json: no sample_size (the stage's resolution)")
  return int(size)


def _lists(tree):
  """Tuples -> lists (JSON)."""
  if isinstance(tree, dict):
    return {k: _lists(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_lists(v) for v in tree]
  return tree


def _text_len(src, te_kw):
  """The caption length the variation pipeline pads to: its tokenizer's model_max_length
  (the text encoder's context when the tokenizer leaves it unset)."""
  path = os.path.join(src, TOKENIZER_DIR, "tokenizer_config.json")
  n = common.load_json(path).get("model_max_length") if os.path.isfile(path) else None
  if not isinstance(n, int) or n > te_kw["max_len"]:
    return te_kw["max_len"]
  return n


def import_karlo(src):
  """Karlo's diffusers folder (either layout) -> (config, variables, report lines)."""
  src = os.path.abspath(os.path.expanduser(src))
  converted, schedulers, report = karlo.convert_karlo(src)
  variation = "prior" not in converted
  for name in ("text_encoder", "tokenizer"):
    if not os.path.isdir(os.path.join(src, name)):
      raise ConversionError(f"{src}: not Karlo's diffusers layout, missing {name}/")
  te_kw, te_params = convert_text_encoder(os.path.join(src, "text_encoder"))
  model = {}
  if variation:
    processor = image_processor_config(os.path.join(src, "feature_extractor"))
    ie_kw, ie_params = convert_image_encoder(os.path.join(src, "image_encoder"), processor)
    if ie_kw["image_size"] != processor["crop_size"]:
      raise ConversionError(
          f"{src}: feature_extractor/ crops {processor['crop_size']} px images but image_encoder/ "
          f"reads {ie_kw['image_size']} px ones")
    if ie_kw["embed_dim"] != te_kw["embed_dim"]:
      raise ConversionError(
          f"{src}: image_encoder/ gives {ie_kw['embed_dim']}-d embeddings, text_encoder/ "
          f"{te_kw['embed_dim']}-d ones: the decoder reads both in one space")
    text_len = _text_len(src, te_kw)
    model.update(image_encoder=ie_kw, embed_dim=ie_kw["embed_dim"],
                 image_processor={k: processor[k] for k in ("shortest_edge", "crop_size")})
    params = {"image_encoder": ie_params}
    stats, stages = None, ("decoder", "super_res")
    report.append(f"{src}/image_encoder: CLIP vision tower, {ie_kw['num_layers']} layers, width "
                  f"{ie_kw['width']}, {ie_kw['image_size']} px, embedding {ie_kw['embed_dim']}")
  else:
    prior_kw, prior_vars = converted["prior"]
    if te_kw["embed_dim"] != prior_kw["embed_dim"] or te_kw["width"] != prior_kw["text_dim"]:
      raise ConversionError(
          f"{src}: the text encoder gives {te_kw['embed_dim']}-d embeddings and {te_kw['width']}-d "
          f"token states; the prior expects {prior_kw['embed_dim']} and {prior_kw['text_dim']}")
    if te_kw["max_len"] < prior_kw["text_len"]:
      raise ConversionError(f"{src}: the prior reads {prior_kw['text_len']} caption tokens; the "
                            f"text encoder has only {te_kw['max_len']} positions")
    text_len = int(prior_kw["text_len"])
    model.update(prior=prior_kw)
    params = {"prior": prior_vars["params"]}
    stats, stages = prior_vars["clip_stats"], ("prior", "decoder", "super_res")
  # the decoder reads the image embedding and the text encoder's embedding
  image_dim, text_dim = _text_proj_widths(converted)
  for what, have, want in (("text_encoder/", te_kw["embed_dim"], text_dim),
                           ("image_encoder/" if variation else "prior/",
                            model.get("embed_dim") or model["prior"]["embed_dim"], image_dim)):
    if have != want:
      raise ConversionError(f"{src}: {what} gives {have}-d embeddings but text_proj/ reads "
                            f"{want}-d ones")
  scheds = {}
  for key in stages:
    folder = f"{key}_scheduler"
    try:
      scheds[key] = schedule_lib.SchedulerConfig.from_dict(schedulers[folder]).to_dict()
    except ValueError as e:
      raise ConversionError(f"{src}/{folder}/scheduler_config.json: {e}") from e
  dec_size = _sample_size(os.path.join(src, "decoder"))
  sr_size = _sample_size(os.path.join(src, "super_res_first"))
  if _sample_size(os.path.join(src, "super_res_last")) != sr_size:
    raise ConversionError(f"{src}: super_res_first and super_res_last have different sample_size")
  vocab = te_kw["vocab_size"]
  model.update(decoder=converted["decoder"][0], super_res_first=converted["super_res_first"][0],
               super_res_last=converted["super_res_last"][0], text_encoder=te_kw,
               decoder_size=dec_size, super_res_size=sr_size)
  sampling = {k: v for k, v in SAMPLING_DEFAULTS.items() if not (variation and "prior" in k)}
  config = ml_collections.ConfigDict(dict(
      family=FAMILY, dtype="float32", param_dtype="float32",
      logical_axis_rules=_lists(DEFAULT_RULES), allow_replication_below=1 << 20,
      model=_lists(model), schedulers=scheds,
      text=dict(tokenizer="hf", path=TOKENIZER_DIR, vocab_size=vocab, max_len=int(text_len),
                lowercase=False),
      sampling=sampling, source=src))
  params.update(decoder=converted["decoder"][1]["params"],
                super_res_first=converted["super_res_first"][1]["params"],
                super_res_last=converted["super_res_last"][1]["params"], text_encoder=te_params)
  variables = {"params": params}
  if stats is not None:
    variables["clip_stats"] = stats
  n = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
  report = report + [f"{src}/text_encoder: CLIP text tower, {te_kw['num_layers']} layers, width "
                     f"{te_kw['width']}, embedding {te_kw['embed_dim']}",
                     f"total {n / 1e6:.2f}M parameters; decoder {dec_size} px, "
                     f"super-resolution {sr_size} px"
                     + ("; image-variation layout (no prior)" if variation else "")]
  return config, variables, report


def _text_proj_widths(converted):
  """(image embedding width, text embedding width) the converted text projection reads."""
  flat = traverse_util.flatten_dict(converted["decoder"][1]["params"]["text_proj"])
  image = next(np.shape(v)[0] for k, v in flat.items() if k[0] == "null_image_embed")
  text = next(np.shape(v)[0] for k, v in flat.items() if k[0] == "text_to_time"
              and k[-1] == "kernel")
  return int(image), int(text)


def write_checkpoint(src, out):
  from dalle_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  config, variables, report = import_karlo(src)
  out = os.path.abspath(out)
  tok_src = os.path.join(os.path.abspath(os.path.expanduser(src)), "tokenizer")
  files = [f for f in hf_clip.TOKENIZER_FILES if os.path.isfile(os.path.join(tok_src, f))]
  if not any(f in files for f in ("tokenizer.json", "vocab.json")):
    raise ConversionError(f"{tok_src}: no tokenizer.json or vocab.json + merges.txt")
  dst = os.path.join(out, TOKENIZER_DIR)
  os.makedirs(dst, exist_ok=True)
  for f in files:
    shutil.copyfile(os.path.join(tok_src, f), os.path.join(dst, f))
  checkpoint.save_imported(out, config, variables)
  return config, report


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m dalle_jax.tools.convert karlo", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--src", required=True, help="Karlo's diffusers pipeline folder")
  p.add_argument("--out", required=True, help="checkpoint directory to write")
  args = p.parse_args(argv)
  try:
    config, report = write_checkpoint(args.src, args.out)
  except (ValueError, OSError) as e:
    raise SystemExit(f"error: {e}")
  for line in report:
    print(line)
  mode = "--prompt ..." if "prior" in config.model else "--variations IMAGE"
  print(f"wrote {os.path.abspath(args.out)} (sample with: python sample.py --method unclip "
        f"--checkpoint {args.out} {mode})")
  return args.out
