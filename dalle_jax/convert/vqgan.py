"""Import public VQGAN weights into a dalle_jax checkpoint.

    python -m dalle_jax.tools.convert vqgan --src FILE --format taming|min_dalle|flax --out DIR

Formats:
  taming     taming-transformers / DALL·E mini PyTorch checkpoint (.ckpt/.pth: a state
             dict, or {'state_dict': ...}); keys like encoder.down.0.block.1.conv1.weight,
             quantize.embedding.weight; the training loss ('loss.*': LPIPS and the
             discriminator) is skipped.
  min_dalle  min-dalle's vqgan/detoker.pt: the decoder only (embedding.weight,
             post_quant_conv.*, decoder.*). The result decodes codes but cannot encode.
  flax       vqgan-jax's flax_model.msgpack (DALL·E mini's JAX port): nested
             encoder/down_0/block_0/norm1/{scale,bias}, .../conv1/{kernel,bias},
             quantize/embedding/embedding, quant_conv, post_quant_conv.

The architecture (ch, ch_mult, num_res_blocks, attention levels, z_channels,
embed_dim, n_embed) is read off the tensors; `--resolution` (default 256) fixes
what the attention levels mean. Every tensor is then checked by name and shape
against our model, and any missing or unexpected one is an error naming it.

Our blocks apply attention j right after res block j, as taming (and min-dalle)
do. The vqgan-jax code we read (patil-suraj/vqgan-jax modeling_flax_vqgan.py)
instead runs every attention block of a level after each res block; its weights
are converted taming weights, so we keep taming's order and match taming /
min-dalle outputs, not that port's, at levels with attention.

Numerics per format: taming and vqgan-jax use GroupNorm eps 1e-6; min-dalle's
re-implementation uses PyTorch's default 1e-5, which we copy so that decoding
matches min-dalle. DALL·E mini's VQGAN works on [0, 1] images (min-dalle clips
its output to [0, 1]): min_dalle and flax default to `zero_one_range`, which
our model hides behind its [-1, 1] interface; taming defaults to [-1, 1].
Imported models run in float32.
"""
import argparse
import logging
import re
import sys

import numpy as np

from dalle_jax.configs import vqgan as vqgan_configs

FORMATS = ("taming", "min_dalle", "flax")


class ConversionError(ValueError):
  pass


# --- loading ------------------------------------------------------------------

def load_torch_state_dict(path):
  import torch
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise
  except Exception as e:
    raise ConversionError(f"{path}: not loadable with torch.load(weights_only=True): {e}") from e
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ConversionError(f"{path}: expected a state dict, got {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if hasattr(v, "detach"):
      out[k] = v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
  return out


def load_flax_msgpack(path):
  from flax import serialization
  from flax import traverse_util
  with open(path, "rb") as f:
    try:
      tree = serialization.msgpack_restore(f.read())
    except Exception as e:
      raise ConversionError(f"{path}: not a Flax msgpack file: {e}") from e
  if "params" in tree and len(tree) == 1:
    tree = tree["params"]
  if "model" in tree and len(tree) == 1:  # HF base_model_prefix
    tree = tree["model"]
  return {"/".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(tree).items()}


# --- renaming to our layout ('/'-joined paths under params['vqgan']) ---------------

_INDEXED = re.compile(r"\b(down|up|block|attn)\.(\d+)\b")


def _torch_to_ours(sd, fmt):
  """Renames + transposes a taming-layout torch state dict. Returns (flat, skipped)."""
  flat, skipped = {}, []
  for key, value in sd.items():
    if key.startswith("loss.") or key.endswith("num_batches_tracked"):
      skipped.append(key)
      continue
    name = key
    if name == "embedding.weight":  # min-dalle's name for the codebook
      name = "quantize.embedding.weight"
    if name == "quantize.embedding.weight":
      flat["quantize/codebook"] = value
      continue
    name = _INDEXED.sub(r"\1_\2", name)
    parts = name.split(".")
    leaf = parts[-1]
    if leaf == "weight" and value.ndim == 4:
      parts[-1], value = "kernel", np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    elif leaf == "weight" and value.ndim == 1:
      parts[-1] = "scale"  # GroupNorm weight
    elif leaf not in ("bias", "weight"):
      skipped.append(key)
      continue
    flat["/".join(parts)] = value
  return flat, skipped


def _flax_to_ours(flat_in):
  flat, skipped = {}, []
  for key, value in flat_in.items():
    if key == "quantize/embedding/embedding":
      flat["quantize/codebook"] = value
    elif key.split("/")[-1] in ("kernel", "bias", "scale"):
      flat[key] = value
    else:
      skipped.append(key)
  return flat, skipped


# --- architecture inference ----------------------------------------------------------

def infer_model_config(flat, resolution=256, decoder_only=False):
  """Reads the taming hyper-parameters off the (renamed) tensors."""
  def get(name):
    if name not in flat:
      raise ConversionError(f"missing tensor {name!r}: cannot infer the architecture")
    return flat[name]
  side, level_name = ("decoder", "up") if decoder_only else ("encoder", "down")
  levels = sorted({int(m.group(1)) for k in flat
                   for m in [re.match(rf"{side}/{level_name}_(\d+)/", k)] if m})
  if not levels or levels != list(range(len(levels))):
    raise ConversionError(f"no consecutive {side}/{level_name}_i levels found: {levels}")
  ch = get(f"{side}/conv_in/kernel").shape[-1] if not decoder_only else None
  block_outs = [get(f"{side}/{level_name}_{i}/block_0/conv1/kernel").shape[-1] for i in levels]
  if decoder_only:
    ch = block_outs[0]  # decoder level 0 works at ch * ch_mult[0]; taming uses ch_mult[0] = 1
  ch_mult = [c // ch for c in block_outs]
  nblocks = len({m.group(1) for k in flat
                 for m in [re.match(rf"{side}/{level_name}_0/block_(\d+)/", k)] if m})
  num_res_blocks = nblocks - 1 if decoder_only else nblocks
  attn_res = [resolution // 2 ** i for i in levels
              if any(k.startswith(f"{side}/{level_name}_{i}/attn_") for k in flat)]
  codebook = get("quantize/codebook")
  z_channels = get("post_quant_conv/kernel").shape[-1]
  m = vqgan_configs.model_config(
      ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_res,
      resolution=resolution, z_channels=z_channels, embed_dim=codebook.shape[1],
      n_embed=codebook.shape[0])
  m.in_channels = get("decoder/conv_out/kernel").shape[-1]
  return m


# --- checking ---------------------------------------------------------------------

def expected_shapes(config, decoder_only=False):
  """Flat {path: shape} of our VQGAN's params for `config` (abstract init)."""
  import jax
  import jax.numpy as jnp
  from flax import traverse_util
  from dalle_jax.models.vqgan import vqgan_from_config
  model = vqgan_from_config(config)
  r = config.model.resolution
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, r, r, config.model.in_channels)))
  from dalle_jax.models import layers  # noqa: F401
  import flax.linen as nn
  params = nn.unbox(variables["params"])
  flat = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(params).items()}
  if decoder_only:
    flat = {k: v for k, v in flat.items() if not k.startswith(("encoder/", "quant_conv/"))}
  return flat


def check_against_model(flat, want, src):
  missing = sorted(set(want) - set(flat))
  unexpected = sorted(set(flat) - set(want))
  bad = sorted(f"{k}: file {tuple(flat[k].shape)} vs model {want[k]}"
               for k in set(flat) & set(want) if tuple(flat[k].shape) != want[k])
  if missing or unexpected or bad:
    msg = [f"{src}: tensors do not match the VQGAN architecture inferred from the file"]
    if missing:
      msg.append(f"  missing ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
      msg.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
    if bad:
      msg.append(f"  wrong shape ({len(bad)}): {'; '.join(bad[:20])}")
    raise ConversionError("\n".join(msg))


def export_taming_state_dict(params, min_dalle=False):
  """Our params['vqgan'] -> taming-layout {name: numpy} (inverse of the import;
  `min_dalle` names the codebook 'embedding.weight' as min-dalle's detoker.pt)."""
  from flax import traverse_util
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    name = "/".join(path)
    value = np.asarray(value, np.float32)
    if name == "quantize/codebook":
      out["embedding.weight" if min_dalle else "quantize.embedding.weight"] = value
      continue
    name = re.sub(r"\b(down|up)_(\d+)/(block|attn)_(\d+)", r"\1.\2.\3.\4", name)
    name = re.sub(r"\b(down|up)_(\d+)", r"\1.\2", name)
    parts = name.replace("/", ".").split(".")
    if parts[-1] == "kernel":
      parts[-1], value = "weight", np.transpose(value, (3, 2, 0, 1))  # HWIO -> OIHW
    elif parts[-1] == "scale":
      parts[-1] = "weight"
    out[".".join(parts)] = value
  return out


# --- entry points -----------------------------------------------------------------

def convert(src, fmt, resolution=256, zero_one_range=None):
  """Returns (config, variables) for a file in format `fmt`."""
  from flax import traverse_util
  if fmt not in FORMATS:
    raise ConversionError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
  if fmt == "flax":
    flat, skipped = _flax_to_ours(load_flax_msgpack(src))
  else:
    flat, skipped = _torch_to_ours(load_torch_state_dict(src), fmt)
  decoder_only = fmt == "min_dalle" or not any(k.startswith("encoder/") for k in flat)
  if skipped:
    logging.info("skipped %d tensors not part of the tokenizer (e.g. %s)", len(skipped), skipped[0])

  config = vqgan_configs.get_config("f16_16384")
  config.model = infer_model_config(flat, resolution, decoder_only)
  config.model.norm_eps = 1e-5 if fmt == "min_dalle" else 1e-6
  config.model.zero_one_range = (fmt != "taming") if zero_one_range is None else zero_one_range
  config.model.decoder_only = decoder_only
  config.data.image_size = resolution
  config.dtype = "float32"
  config.loss.perceptual_weight = 0.0
  config.lpips.vgg_path = ""
  check_against_model(flat, expected_shapes(config, decoder_only), src)
  params = traverse_util.unflatten_dict({tuple(k.split("/")): np.asarray(v, np.float32)
                                         for k, v in flat.items()})
  return config, {"params": {"vqgan": params}}


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m dalle_jax.tools.convert vqgan",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--src", required=True, help="checkpoint file")
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--out", required=True, help="output checkpoint directory")
  parser.add_argument("--resolution", type=int, default=256,
                      help="image size the attention levels refer to (taming: 256)")
  parser.add_argument("--zero_one_range", default=None, action=argparse.BooleanOptionalAction,
                      help="network works on [0,1] images (default: yes for min_dalle/flax)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    config, variables = convert(args.src, args.format, args.resolution, args.zero_one_range)
  except (ConversionError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  from dalle_jax.train.checkpoint import save_imported
  save_imported(args.out, config, variables)
  m = config.model
  print(f"wrote {args.out}: ch={m.ch} ch_mult={tuple(m.ch_mult)} res_blocks={m.num_res_blocks} "
        f"attn={tuple(m.attn_resolutions)} z={m.z_channels} codes={m.n_embed}x{m.embed_dim}"
        f"{' (decoder only)' if m.decoder_only else ''}")
  return args.out


if __name__ == "__main__":
  main()
