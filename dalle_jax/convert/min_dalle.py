"""min-dalle's DALL·E mini / mega files -> a dalle_jax checkpoint for sample.py.

  python -m dalle_jax.tools.convert min_dalle --src MODELS_ROOT --variant mini|mega --out CKPT

MODELS_ROOT is min-dalle's `models_root` layout:
  dalle_bart_{mini,mega}/encoder.pt, decoder.pt, vocab.json, merges.txt
  vqgan/detoker.pt                      (optional: converted by dalle_jax.convert.vqgan)
Weights are read with torch.load(weights_only=True). Every tensor is checked by
name and shape; LayerNorm scales/biases absent from the files are filled with
ones/zeros, which is what min-dalle itself uses (it loads with strict=False and
keeps torch's LayerNorm defaults) — and reported. Anything else missing, or any
unexpected tensor, is an error naming it.

The result is an imported checkpoint (`config.json` + `variables/`) with the
BART tokenizer files in CKPT/tokenizer (config.text.tokenizer = "bart_bpe") and,
when the VQGAN detokenizer was converted, CKPT/vqgan referenced by config.vqgan.
"""
import argparse
import logging
import os
import re
import shutil

import numpy as np

from dalle_jax.configs import dalle_mini as cfg_mod


class ConversionError(ValueError):
  pass


def _ln(prefix):
  return {f"{prefix}.weight": "scale", f"{prefix}.bias": "bias"}


def _attn_map(src, dst):
  return {f"{src}.q_proj.weight": f"{dst}/query/dense/kernel",
          f"{src}.k_proj.weight": f"{dst}/key/dense/kernel",
          f"{src}.v_proj.weight": f"{dst}/value/dense/kernel",
          f"{src}.out_proj.weight": f"{dst}/out/dense/kernel"}


def _glu_map(src, dst):
  m = {f"{src}.fc0.weight": f"{dst}/mlp/wi/kernel",
       f"{src}.fc1.weight": f"{dst}/mlp/wi_gate/kernel",
       f"{src}.fc2.weight": f"{dst}/mlp/wo/kernel"}
  m.update({k: f"{dst}/ln/{v}" for k, v in _ln(f"{src}.ln0").items()})
  m.update({k: f"{dst}/mlp/inner_norm/{v}" for k, v in _ln(f"{src}.ln1").items()})
  return m


def name_map(num_layers):
  """{(tower, torch name): flax path} for both towers (non-scanned layout)."""
  m = {}
  for tower, pre in (("encoder", "enc"), ("decoder", "dec")):
    t = {"embed_tokens.weight": f"{pre}_embed/embedding",
         "embed_positions.weight": f"{pre}_pos/embedding"}
    t.update({k: f"{pre}_ln_embed/{v}" for k, v in _ln("layernorm_embedding").items()})
    t.update({k: f"{pre}_final_ln/{v}" for k, v in _ln("final_ln").items()})
    for i in range(num_layers):
      s, d = f"layers.{i}", f"{pre}_layers/layer_{i}"
      lns = [("pre_self_attn_layer_norm", "pre_self_attn_ln"), ("self_attn_layer_norm", "self_attn_ln")]
      t.update(_attn_map(f"{s}.self_attn", f"{d}/self_attn"))
      if tower == "decoder":
        lns += [("pre_encoder_attn_layer_norm", "pre_cross_attn_ln"),
                ("encoder_attn_layer_norm", "cross_attn_ln")]
        t.update(_attn_map(f"{s}.encoder_attn", f"{d}/cross_attn"))
      for a, b in lns:
        t.update({k: f"{d}/{b}/{v}" for k, v in _ln(f"{s}.{a}").items()})
      t.update(_glu_map(f"{s}.glu", f"{d}/glu"))
    if tower == "decoder":
      t["lm_head.weight"] = "lm_head/kernel"
    m.update({(tower, k): v for k, v in t.items()})
  return m


def _to_flax(torch_name, w, target_shape):
  """Torch layout -> flax layout for one tensor (transposes / head splits)."""
  if torch_name.endswith("_proj.weight"):  # (out, in) Linear
    w = w.T  # (in, out)
    if torch_name.endswith("out_proj.weight"):
      return w.reshape(target_shape)  # (H*K, D) -> (H, K, D)
    return w.reshape(target_shape)  # (D, H*K) -> (D, H, K)
  if torch_name.endswith(("fc0.weight", "fc1.weight", "fc2.weight", "lm_head.weight")):
    return w.T
  return w


def _set(tree, path, value):
  keys = path.split("/")
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    p = f"{prefix}/{k}" if prefix else k
    if isinstance(v, dict):
      out.update(_flatten(v, p))
    else:
      out[p] = v
  return out


def convert_state_dicts(encoder_sd, decoder_sd, model, *, where="", ignore_unexpected=False):
  """min-dalle encoder/decoder state dicts -> (flax params, report lines).

  `model` is a dalle_jax DalleMini (its abstract init gives the expected shapes).
  """
  import jax
  import jax.numpy as jnp
  import flax.linen as nn

  abstract = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.ones((1, model.text_len), jnp.int32),
                         jnp.ones((1, model.text_len), bool),
                         jnp.zeros((1, model.num_codes), jnp.int32)))
  want = {p: tuple(x.shape) for p, x in _flatten(nn.meta.unbox(abstract)["params"]).items()}
  names = name_map(model.num_layers)
  flax_to_torch = {v: k for k, v in names.items()}
  if set(flax_to_torch) != set(want):  # a bug in this file, not in the inputs
    raise AssertionError(f"name map and model disagree: {sorted(set(flax_to_torch) ^ set(want))[:10]}")

  params, filled, problems = {}, [], []
  sds = {"encoder": encoder_sd, "decoder": decoder_sd}
  for tower, sd in sds.items():
    for k in sd:
      if (tower, k) not in names:
        if ignore_unexpected:
          filled.append(f"ignored unexpected {tower} tensor {k} {tuple(sd[k].shape)}")
        else:
          problems.append(f"unexpected {tower} tensor {k} {tuple(sd[k].shape)}")
  for path, shape in sorted(want.items()):
    tower, tname = flax_to_torch[path]
    sd = sds[tower]
    if tname not in sd:
      if re.search(r"(norm|ln\d?|layernorm_embedding|final_ln)\.(weight|bias)$", tname):
        fill = np.ones if tname.endswith("weight") else np.zeros
        _set(params, path, fill(shape, np.float32))
        filled.append(f"filled {tower} {tname} with {'ones' if fill is np.ones else 'zeros'} "
                      f"(absent; min-dalle keeps the LayerNorm default)")
        continue
      problems.append(f"missing {tower} tensor {tname} (needed for {path}, shape {shape})")
      continue
    w = np.asarray(sd[tname], np.float32)
    try:
      w = _to_flax(tname, w, shape)
    except ValueError:
      pass
    if tuple(w.shape) != shape:
      problems.append(f"{tower} tensor {tname}: shape {tuple(np.asarray(sd[tname]).shape)} does "
                      f"not fit {path} {shape}")
      continue
    _set(params, path, w)
  if problems:
    raise ConversionError(f"min-dalle weights {where} do not match the model "
                          f"({len(problems)} problems):\n  " + "\n  ".join(problems[:30]))
  return params, filled


def load_torch(path):
  import torch
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing (expected min-dalle's models_root layout)")
  sd = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(sd, dict):
    raise ConversionError(f"{path}: expected a state dict, found {type(sd).__name__}")
  return {k: v.float().numpy() for k, v in sd.items()}


def model_from_variant(variant):
  from dalle_jax.models import dalle_mini
  config = cfg_mod.get_config(variant)
  return config, dalle_mini.from_config(config.model, dtype=config.dtype,
                                        param_dtype=config.param_dtype)


def convert(src, variant, out, *, ignore_unexpected=False, with_vqgan=True):
  """Converts MODELS_ROOT/dalle_bart_<variant> (+ vqgan) into `out`. Returns report lines."""
  from dalle_jax.train import checkpoint
  config, model = model_from_variant(variant)
  d = os.path.join(src, f"dalle_bart_{variant}")
  enc = load_torch(os.path.join(d, "encoder.pt"))
  dec = load_torch(os.path.join(d, "decoder.pt"))
  params, report = convert_state_dicts(enc, dec, model, where=d, ignore_unexpected=ignore_unexpected)
  os.makedirs(out, exist_ok=True)
  tok_dir = os.path.join(out, "tokenizer")
  os.makedirs(tok_dir, exist_ok=True)
  for f in ("vocab.json", "merges.txt"):
    p = os.path.join(d, f)
    if not os.path.isfile(p):
      raise FileNotFoundError(f"{p}: missing tokenizer file")
    shutil.copy(p, os.path.join(tok_dir, f))
  with config.unlocked():
    config.text.tokenizer = "bart_bpe"
    config.text.path = "tokenizer"
    config.scan_layers = False  # the converted tree is per-layer (layer_0, layer_1, ...)
    config.remat = "none"
  detoker = os.path.join(src, "vqgan", "detoker.pt")
  if with_vqgan and os.path.isfile(detoker):
    vq_out = os.path.join(out, "vqgan")
    from dalle_jax.convert import vqgan as vq_convert
    vq_config, vq_vars = vq_convert.convert(detoker, "min_dalle")
    checkpoint.save_imported(vq_out, vq_config, vq_vars)
    config.vqgan = "vqgan"
    report.append(f"VQGAN: converted {detoker} -> {vq_out} (decoder only)")
  elif with_vqgan:
    report.append(f"VQGAN: {detoker} not found; pass --vqgan to sample.py")
  checkpoint.save_imported(out, config, {"params": params})
  return report


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m dalle_jax.tools.convert min_dalle",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--src", required=True, help="min-dalle models_root directory")
  ap.add_argument("--variant", choices=("mini", "mega"), default="mini")
  ap.add_argument("--out", required=True, help="output checkpoint directory")
  ap.add_argument("--ignore_unexpected", action="store_true",
                  help="skip (and report) tensors the model does not use instead of failing")
  ap.add_argument("--no_vqgan", action="store_true", help="do not convert vqgan/detoker.pt")
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  try:
    report = convert(args.src, args.variant, args.out, ignore_unexpected=args.ignore_unexpected,
                     with_vqgan=not args.no_vqgan)
  except (ConversionError, FileNotFoundError) as e:
    raise SystemExit(f"conversion failed: {e}")
  for line in report:
    print(line)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
