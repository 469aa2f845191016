"""Import a Hugging Face CLIP checkpoint (local directory) into dalle_jax.

  python -m dalle_jax.tools.convert hf_clip --src DIR --out CKPT

DIR holds `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`, or `pytorch_model.bin`, loaded with
`torch.load(weights_only=True)`, or a variant such as `model.fp16.safetensors`;
f16 / bf16 tensors are upcast to f32), plus the tokenizer files, which are copied
to CKPT/tokenizer (config.text.tokenizer = "hf"). Every tensor is checked by
name and shape against our model; missing or unexpected ones fail the import,
named. `load_hf_clip(DIR)` does the same in memory, so tools accept a HF
directory wherever a CLIP checkpoint is expected.

The imported model runs in float32 and reproduces `transformers.CLIPModel`'s
`get_image_features` / `get_text_features` (tests/test_clip_convert.py).
"""
import argparse
import json
import logging
import os
import shutil

import jax
import numpy as np
from flax import traverse_util

from dalle_jax.configs import clip as clip_configs
from dalle_jax.convert import common

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json")
# Non-persistent buffers some exports still contain: ignored, not "unexpected".
IGNORED_SUFFIXES = ("position_ids",)


ConversionError = common.ConversionError


def is_hf_clip_dir(path):
  """True if `path` looks like a Hugging Face CLIP directory (not one of our checkpoints)."""
  cfg = os.path.join(path, "config.json")
  if not os.path.isfile(cfg):
    return False
  try:
    with open(cfg) as f:
      return json.load(f).get("model_type") == "clip"
  except (OSError, ValueError):
    return False


# --- reading --------------------------------------------------------------------

def read_hf_config(src):
  path = os.path.join(src, "config.json")
  if not os.path.isfile(path):
    raise ConversionError(f"{src}: no config.json (not a Hugging Face model directory)")
  cfg = common.load_json(path)
  if cfg.get("model_type") != "clip":
    raise ConversionError(f"{path}: model_type={cfg.get('model_type')!r}, expected 'clip' "
                          "(a CLIPModel with both towers)")
  for key in ("text_config", "vision_config"):
    if not isinstance(cfg.get(key), dict):
      raise ConversionError(f"{path}: missing {key!r}")
  return cfg


def read_hf_weights(src):
  """name -> array of a HF model folder (safetensors single, sharded or a variant, or a torch
  .bin); floating tensors (f16 / bf16 too) upcast to f32: imported models run in f32."""
  return common.read_weights(src, common.HF_STEMS, dtype=np.float32)


# --- config ---------------------------------------------------------------------

def config_from_hf(hf, src=None):
  """Our CLIP config (configs/clip.py layout) for a HF CLIPConfig dict."""
  tc, vc = hf["text_config"], hf["vision_config"]
  get = lambda d, k, default: d.get(k, default) if d.get(k) is not None else default
  acts = {get(tc, "hidden_act", "quick_gelu"), get(vc, "hidden_act", "quick_gelu")}
  if len(acts) != 1:
    raise ConversionError(f"towers use different activations {sorted(acts)}; not supported")
  act = acts.pop()
  act = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh",
         "gelu_pytorch_tanh": "gelu_tanh"}.get(act)
  if act is None:
    raise ConversionError(f"unsupported hidden_act {acts}")
  eps = {get(tc, "layer_norm_eps", 1e-5), get(vc, "layer_norm_eps", 1e-5)}
  if len(eps) != 1:
    raise ConversionError(f"towers use different layer_norm_eps {sorted(eps)}; not supported")
  proj = get(hf, "projection_dim", 512)  # CLIPModel uses the top-level value only

  c = clip_configs.get_config("vit_b32")
  with c.unlocked():
    c.dtype = "float32"
    c.param_dtype = "float32"
    c.remat = "none"
    c.scan_layers = False
    m = c.model
    m.embed_dim = int(proj)
    m.activation = act
    m.ln_epsilon = float(eps.pop())
    m.loss = "softmax"
    m.logit_scale_init = float(get(hf, "logit_scale_init_value", 2.6592))
    v = m.vision
    v.image_size = int(get(vc, "image_size", 224))
    v.patch_size = int(get(vc, "patch_size", 32))
    v.width = int(get(vc, "hidden_size", 768))
    v.layers = int(get(vc, "num_hidden_layers", 12))
    v.heads = int(get(vc, "num_attention_heads", 12))
    v.mlp_dim = int(get(vc, "intermediate_size", 3072))
    if int(get(vc, "num_channels", 3)) != 3:
      raise ConversionError(f"vision_config.num_channels={vc.get('num_channels')}: only RGB supported")
    t = m.text
    t.vocab_size = int(get(tc, "vocab_size", 49408))
    t.max_len = int(get(tc, "max_position_embeddings", 77))
    t.width = int(get(tc, "hidden_size", 512))
    t.layers = int(get(tc, "num_hidden_layers", 12))
    t.heads = int(get(tc, "num_attention_heads", 8))
    t.mlp_dim = int(get(tc, "intermediate_size", 2048))
    # transformers' CLIPTextTransformer: eos_token_id == 2 marks legacy configs,
    # pooled at the largest id; otherwise at the first eos_token_id.
    eos = get(tc, "eos_token_id", 49407)
    if isinstance(eos, (list, tuple)):
      eos = eos[0]
    t.pool = "argmax" if eos == 2 else "eos"
    t.eos_id = int(eos)
    for tower, d in (("vision", v), ("text", t)):
      if d.width % d.heads:
        raise ConversionError(f"{tower} hidden_size {d.width} not divisible by {d.heads} heads")
    mean, std = _pixel_stats(src)
    m.image_mean, m.image_std = mean, std
    c.data.image_size = v.image_size
    c.text.tokenizer = "hf"
    c.text.path = os.path.abspath(src) if src else ""
    c.text.max_len = t.max_len
    c.text.vocab_size = t.vocab_size
    c.text.lowercase = False  # the HF tokenizer normalises itself
  return c


def _pixel_stats(src):
  from dalle_jax.models.clip import OPENAI_MEAN, OPENAI_STD  # pylint: disable=g-import-not-at-top
  path = os.path.join(src, "preprocessor_config.json") if src else ""
  if path and os.path.isfile(path):
    with open(path) as f:
      p = json.load(f)
    mean, std = p.get("image_mean", OPENAI_MEAN), p.get("image_std", OPENAI_STD)
    if len(mean) == 3 and len(std) == 3:
      return tuple(float(x) for x in mean), tuple(float(x) for x in std)
  return OPENAI_MEAN, OPENAI_STD


# --- weights --------------------------------------------------------------------

def _layer_rules(hf_prefix, our_prefix, width, heads):
  """(hf name, our path, transform) for one encoder layer."""
  k = width // heads
  qkv = lambda w: w.T.reshape(width, heads, k)  # (out, in) -> (D, H, K)
  rules = []
  for hf_name, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
    rules.append((f"{hf_prefix}.self_attn.{hf_name}.weight", f"{our_prefix}/attn/{ours}/dense/kernel", qkv))
    rules.append((f"{hf_prefix}.self_attn.{hf_name}.bias", f"{our_prefix}/attn/{ours}/dense/bias",
                  lambda b: b.reshape(heads, k)))
  rules += [
      (f"{hf_prefix}.self_attn.out_proj.weight", f"{our_prefix}/attn/out/dense/kernel",
       lambda w: w.T.reshape(heads, k, width)),
      (f"{hf_prefix}.self_attn.out_proj.bias", f"{our_prefix}/attn/out/dense/bias", None),
      (f"{hf_prefix}.mlp.fc1.weight", f"{our_prefix}/mlp/wi/kernel", np.transpose),
      (f"{hf_prefix}.mlp.fc1.bias", f"{our_prefix}/mlp/wi/bias", None),
      (f"{hf_prefix}.mlp.fc2.weight", f"{our_prefix}/mlp/wo/kernel", np.transpose),
      (f"{hf_prefix}.mlp.fc2.bias", f"{our_prefix}/mlp/wo/bias", None),
  ]
  rules += _ln(f"{hf_prefix}.layer_norm1", f"{our_prefix}/ln_attn")
  rules += _ln(f"{hf_prefix}.layer_norm2", f"{our_prefix}/ln_mlp")
  return rules


def _ln(hf, ours):
  return [(f"{hf}.weight", f"{ours}/scale", None), (f"{hf}.bias", f"{ours}/bias", None)]


def conversion_rules(config):
  """Every (hf name, our param path, transform) of a CLIPModel state dict."""
  m = config.model
  v, t = m.vision, m.text
  rules = [
      ("logit_scale", "logit_scale", lambda x: np.reshape(x, ())),
      ("visual_projection.weight", "vision/proj/kernel", np.transpose),
      ("text_projection.weight", "text/proj/kernel", np.transpose),
      ("vision_model.embeddings.class_embedding", "vision/cls", None),
      ("vision_model.embeddings.patch_embedding.weight", "vision/patch_embed/kernel",
       lambda w: np.transpose(w, (2, 3, 1, 0))),  # (D, 3, P, P) -> (P, P, 3, D)
      ("vision_model.embeddings.position_embedding.weight", "vision/pos_emb", None),
      ("text_model.embeddings.token_embedding.weight", "text/token_embed/embedding", None),
      ("text_model.embeddings.position_embedding.weight", "text/pos_emb", None),
  ]
  rules += _ln("vision_model.pre_layrnorm", "vision/ln_pre")
  rules += _ln("vision_model.post_layernorm", "vision/ln_post")
  rules += _ln("text_model.final_layer_norm", "text/ln_final")
  for i in range(v.layers):
    rules += _layer_rules(f"vision_model.encoder.layers.{i}", f"vision/blocks/layer_{i}",
                          v.width, v.heads)
  for i in range(t.layers):
    rules += _layer_rules(f"text_model.encoder.layers.{i}", f"text/blocks/layer_{i}",
                          t.width, t.heads)
  return rules


def expected_shapes(config):
  """Our parameter path -> shape, from an abstract init (no allocation)."""
  from dalle_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  model = clip_lib.build_model(config)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *clip_lib.dummy_inputs(config)))
  params = nn.unbox(abstract["params"])
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def convert_weights(hf_weights, config, where="checkpoint"):
  """HF state dict -> our {'params': ...}; every name and shape checked."""
  expected = expected_shapes(config)
  rules = conversion_rules(config)
  flat, missing, bad_shape, used = common.apply_rules(hf_weights, rules, expected)
  unexpected = sorted(k for k in hf_weights
                      if k not in used and not k.endswith(IGNORED_SUFFIXES))
  not_filled = sorted(set(expected) - set(flat) - {o for _, o, _ in rules})
  problems = common.tensor_problems(missing, unexpected, bad_shape)
  if not_filled:
    problems.append(f"model parameters with no source tensor: {', '.join(not_filled)}")
  common.raise_problems(where, "as CLIP", problems)
  return {"params": traverse_util.unflatten_dict(flat, sep="/")}


def load_hf_clip(src):
  """(config, variables) of a HF CLIP directory, in memory (f32)."""
  src = os.path.abspath(os.path.expanduser(src))
  if not os.path.isdir(src):
    raise ConversionError(f"{src}: not a directory")
  config = config_from_hf(read_hf_config(src), src)
  variables = convert_weights(read_hf_weights(src), config, where=src)
  return config, variables


def copy_tokenizer(src, out_dir):
  """Copies the tokenizer files of `src` to out_dir/tokenizer; returns how many."""
  files = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
  if not any(f in files for f in ("tokenizer.json", "vocab.json")):
    return 0
  dst = os.path.join(out_dir, "tokenizer")
  os.makedirs(dst, exist_ok=True)
  for f in files:
    shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
  return len(files)


def convert(src, out):
  from dalle_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  config, variables = load_hf_clip(src)
  os.makedirs(out, exist_ok=True)
  n_tok = copy_tokenizer(os.path.abspath(src), out)
  with config.unlocked():
    config.text.path = "tokenizer" if n_tok else ""
  if not n_tok:
    log.warning("%s has no tokenizer files (tokenizer.json or vocab.json + merges.txt): "
                "set config.text.path to a CLIP tokenizer directory before encoding text", src)
  checkpoint.save_imported(out, config, variables)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))
  print(f"imported {src} -> {out}: {n / 1e6:.2f}M parameters, "
        f"{'tokenizer copied' if n_tok else 'NO tokenizer'}")
  return config, variables


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m dalle_jax.tools.convert hf_clip",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--src", required=True, help="local Hugging Face CLIP directory")
  p.add_argument("--out", required=True, help="output checkpoint directory")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  try:
    convert(args.src, args.out)
  except (ConversionError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main()
