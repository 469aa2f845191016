"""Import a Hugging Face T5 / T5 v1.1 / mT5 / UMT5 encoder (local directory) into dalle_jax.

  python -m dalle_jax.tools.convert hf_t5 --src DIR --out CKPT

DIR is a model folder (`config.json` with model_type t5 | mt5 | umt5, and
`model.safetensors`, a sharded `model.safetensors.index.json`, or
`pytorch_model.bin` (or its sharded index) read with
`torch.load(weights_only=True)`; failing those, a variant such as diffusers'
`variant="fp16"` files `model.fp16.safetensors` / `model.safetensors.index.fp16.json`;
f16 / bf16 weights are upcast to f32), or a diffusers
pipeline folder (DeepFloyd IF: `text_encoder/` + `tokenizer/`), or its
`text_encoder/` folder with `tokenizer/` beside it. Only the encoder is
imported: the decoder and LM head of a full T5 checkpoint are skipped (counted).
Every encoder tensor is checked by name and shape; missing, unexpected or
misshapen ones fail the import, named. The token embedding is read from
`shared.weight` or `encoder.embed_tokens.weight` (equal when both are stored).

The tokenizer (tokenizer.json or spiece.model) goes to CKPT/tokenizer; a
spiece.model alone is also converted to tokenizer.json with transformers, so
ids equal transformers' T5Tokenizer exactly. `load_hf_t5(DIR)` does the import
in memory: tools accept a Hugging Face directory wherever a T5 checkpoint is
expected. The imported encoder runs in float32 and reproduces
`transformers.T5EncoderModel` / `UMT5EncoderModel` (tests/test_t5.py).
"""
import argparse
import json
import logging
import os
import shutil

import jax
import numpy as np
from flax import traverse_util

from dalle_jax.convert import common
from dalle_jax.models import t5 as t5_lib

log = logging.getLogger(__name__)
ConversionError = common.ConversionError

MODEL_TYPES = ("t5", "mt5", "umt5")  # umt5: a relative position bias in every layer
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
# A full encoder-decoder checkpoint: parts that are not the encoder.
SKIPPED_PREFIXES = ("decoder.", "lm_head.")
IGNORED_SUFFIXES = ("position_ids",)


def _model_type(folder):
  cfg = os.path.join(folder, "config.json")
  if not os.path.isfile(cfg):
    return None
  try:
    with open(cfg) as f:
      return json.load(f).get("model_type")
  except (OSError, ValueError):
    return None


def _has_tokenizer(folder):
  return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "spiece.model"))


def locate(src):
  """(model folder, tokenizer folder or None) of a T5 folder, a diffusers pipeline
  folder, or a pipeline's text_encoder/ folder. Raises ConversionError."""
  src = os.path.abspath(os.path.expanduser(src))
  if not os.path.isdir(src):
    raise ConversionError(f"{src}: not a directory")
  if os.path.isfile(os.path.join(src, "config.json")):
    model_dir = src
    tok = src if _has_tokenizer(src) else os.path.join(os.path.dirname(src), "tokenizer")
  elif os.path.isfile(os.path.join(src, "text_encoder", "config.json")):
    model_dir, tok = os.path.join(src, "text_encoder"), os.path.join(src, "tokenizer")
  else:
    raise ConversionError(f"{src}: no config.json and no text_encoder/config.json (not a "
                          "Hugging Face T5 folder or diffusers pipeline folder)")
  return model_dir, (tok if _has_tokenizer(tok) else None)


def is_hf_t5_dir(path):
  """True if `path` is a Hugging Face T5-family folder or a pipeline holding one."""
  try:
    model_dir, _ = locate(path)
  except ConversionError:
    return False
  return _model_type(model_dir) in MODEL_TYPES


def read_hf_config(model_dir):
  path = os.path.join(model_dir, "config.json")
  cfg = common.load_json(path)
  if cfg.get("model_type") not in MODEL_TYPES:
    raise ConversionError(f"{path}: model_type={cfg.get('model_type')!r}, expected one of "
                          f"{', '.join(MODEL_TYPES)}")
  return cfg


def config_from_hf(hf, tokenizer_dir=None):
  """Our T5 config (dalle_jax.models.t5.get_config layout) for a HF T5Config dict."""
  get = lambda k, default: hf.get(k) if hf.get(k) is not None else default
  d_model = int(get("d_model", 512))
  dims = dict(
      vocab_size=get("vocab_size", 32128), d_model=d_model, d_kv=get("d_kv", 64),
      num_heads=get("num_heads", 8), d_ff=get("d_ff", 2048), num_layers=get("num_layers", 6),
      relative_attention_num_buckets=get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=get("relative_attention_max_distance", 128),
      layer_norm_epsilon=get("layer_norm_epsilon", 1e-6),
      per_layer_position_bias=hf.get("model_type") == "umt5")
  try:
    model = t5_lib.model_config(feed_forward_proj=get("feed_forward_proj", "relu"), **dims)
  except ValueError as e:
    raise ConversionError(f"config.json: {e}") from e
  config = t5_lib.get_config("t5_small")
  with config.unlocked():
    config.model = model
    config.text.vocab_size = model.vocab_size
    config.text.path = os.path.abspath(tokenizer_dir) if tokenizer_dir else ""
  return config


# --- reading weights ----------------------------------------------------------------

def read_weights(model_dir):
  """name -> array (original dtype; safetensors memory-mapped) of a model folder."""
  return common.read_weights(model_dir, common.HF_STEMS)


# --- weights --------------------------------------------------------------------

def conversion_rules(config):
  """(hf name, our param path, transform) for every encoder tensor but the embedding."""
  m = config.model
  d, h, k = m.d_model, m.num_heads, m.d_kv
  qkv = lambda w: w.T.reshape(d, h, k)  # (H*K, D) -> (D, H, K)
  out = lambda w: w.T.reshape(h, k, d)  # (D, H*K) -> (H, K, D)
  bias = "SelfAttention.relative_attention_bias.weight"
  rules = [("encoder.final_layer_norm.weight", "ln_final/scale", None)]
  if not m.per_layer_position_bias:
    rules.append((f"encoder.block.0.layer.0.{bias}", "position_bias/table", None))
  mlp = [("wi_0", "wi"), ("wi_1", "wi_gate")] if m.gated else [("wi", "wi")]
  for i in range(m.num_layers):
    hf, ours = f"encoder.block.{i}.layer", f"blocks/layer_{i}"
    rules += [(f"{hf}.0.SelfAttention.{n}.weight", f"{ours}/attn/{o}/dense/kernel", qkv)
              for n, o in (("q", "query"), ("k", "key"), ("v", "value"))]
    rules += [
        (f"{hf}.0.SelfAttention.o.weight", f"{ours}/attn/out/dense/kernel", out),
        (f"{hf}.0.layer_norm.weight", f"{ours}/ln_attn/scale", None),
        (f"{hf}.1.layer_norm.weight", f"{ours}/ln_mlp/scale", None),
        (f"{hf}.1.DenseReluDense.wo.weight", f"{ours}/mlp/wo/kernel", np.transpose),
    ]
    rules += [(f"{hf}.1.DenseReluDense.{n}.weight", f"{ours}/mlp/{o}/kernel", np.transpose)
              for n, o in mlp]
    if m.per_layer_position_bias:
      rules.append((f"{hf}.0.{bias}", f"{ours}/position_bias/table", None))
  return rules


def expected_shapes(config):
  """Our parameter path -> shape, from an abstract init (nothing allocated)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  model = t5_lib.build_model(config)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               *t5_lib.dummy_inputs(config, 1, 2)))
  params = nn.unbox(abstract["params"])
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _embedding(hf_weights, problems):
  """The token embedding from shared.weight and/or encoder.embed_tokens.weight (tied)."""
  names = [n for n in ("shared.weight", "encoder.embed_tokens.weight") if n in hf_weights]
  if not names:
    problems.append("missing tensors (1): shared.weight (or encoder.embed_tokens.weight)")
    return None, names
  if len(names) == 2 and not (hf_weights[names[0]].shape == hf_weights[names[1]].shape and
                              np.array_equal(hf_weights[names[0]], hf_weights[names[1]])):
    problems.append("shared.weight and encoder.embed_tokens.weight differ (the encoder's "
                    "embedding is tied to shared.weight)")
  return hf_weights[names[0]], names


def convert_weights(hf_weights, config, where="checkpoint"):
  """HF state dict -> our {'params': ...}; every name and shape checked.

  Entries are popped from `hf_weights` as they are converted (an XXL encoder is
  19 GB in f32: it is not held twice).
  """
  expected = expected_shapes(config)
  problems = []
  emb, emb_names = _embedding(hf_weights, problems)
  rules = [(emb_names[0] if emb_names else "shared.weight", "token_embed/embedding", None)]
  rules += conversion_rules(config)
  flat, missing, bad_shape, used = common.apply_rules(hf_weights, rules, expected, consume=True,
                                                      keep=emb_names)
  used.update(emb_names)
  del emb
  skipped = [k for k in hf_weights if k.startswith(SKIPPED_PREFIXES)]
  unexpected = sorted(k for k in hf_weights if k not in used and k not in skipped
                      and not k.endswith(IGNORED_SUFFIXES))
  not_filled = sorted(set(expected) - set(flat) - {o for _, o, _ in rules})
  problems += common.tensor_problems(missing, unexpected, bad_shape)
  if not_filled:
    problems.append(f"model parameters with no source tensor: {', '.join(not_filled)}")
  common.raise_problems(where, "as a T5 encoder", problems)
  if skipped:
    log.info("%s: skipped %d decoder / LM-head tensors (only the encoder is imported)",
             where, len(skipped))
  return {"params": traverse_util.unflatten_dict(flat, sep="/")}


def load_hf_t5(src):
  """(config, variables) of a HF T5-family folder or pipeline folder, in memory (f32)."""
  model_dir, tok_dir = locate(src)
  config = config_from_hf(read_hf_config(model_dir), tok_dir)
  variables = convert_weights(read_weights(model_dir), config, where=model_dir)
  return config, variables


def copy_tokenizer(tok_dir, out_dir):
  """Copies the tokenizer to out_dir/tokenizer (adding tokenizer.json when only
  spiece.model is there); returns the folder, or None without a tokenizer."""
  if not tok_dir:
    return None
  dst = os.path.join(out_dir, "tokenizer")
  os.makedirs(dst, exist_ok=True)
  for f in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(tok_dir, f)):
      shutil.copyfile(os.path.join(tok_dir, f), os.path.join(dst, f))
  if not os.path.isfile(os.path.join(dst, "tokenizer.json")):
    try:  # transformers' own conversion (needs protobuf): its ids are the reference
      import transformers  # pylint: disable=g-import-not-at-top
      transformers.T5Tokenizer.from_pretrained(dst).save_pretrained(dst)
    except Exception as e:  # pylint: disable=broad-except
      log.warning("could not write tokenizer.json from spiece.model (%s): texts containing "
                  "special-token strings such as '</s>' will tokenize differently from "
                  "transformers", e)
  return dst


def convert(src, out):
  from dalle_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  _, tok_dir = locate(src)
  config, variables = load_hf_t5(src)
  os.makedirs(out, exist_ok=True)
  tok = copy_tokenizer(tok_dir, out)
  with config.unlocked():
    config.text.path = "tokenizer" if tok else ""
  if not tok:
    log.warning("%s has no tokenizer (tokenizer.json or spiece.model, also looked in "
                "../tokenizer): set config.text.path before encoding text", src)
  checkpoint.save_imported(out, config, variables)
  m = config.model
  print(f"imported {src} -> {out}: T5 encoder {m.num_layers} layers, d_model {m.d_model}, "
        f"{m.feed_forward_proj}{', per-layer position bias' if m.per_layer_position_bias else ''}"
        f", {t5_lib.param_count(variables['params']) / 1e6:.2f}M parameters, "
        f"{'tokenizer copied' if tok else 'NO tokenizer'}")
  return config, variables


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m dalle_jax.tools.convert hf_t5",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--src", required=True,
                 help="Hugging Face T5 folder, diffusers pipeline folder or its text_encoder/")
  p.add_argument("--out", required=True, help="output checkpoint directory")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  try:
    convert(args.src, args.out)
  except (ConversionError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main()
