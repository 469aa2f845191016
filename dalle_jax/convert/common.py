"""What every public-weight converter in dalle_jax/convert/ shares: the error type,
reading JSON configs and weight folders, and checking converted tensors by name and shape.

Weight folders (Hugging Face `model.*` / `pytorch_model.*`, diffusers
`diffusion_pytorch_model.*`): a single safetensors file, a sharded
`*.safetensors.index.json`, a torch `.bin` (or its sharded index) read with
`torch.load(weights_only=True)`, or failing those a variant such as diffusers'
`variant="fp16"` files (`model.fp16.safetensors`, `model.safetensors.index.bf16.json`).
safetensors files are memory-mapped in their own dtype (bf16 included).

Checks: every converter collects missing, unexpected and misshapen tensor names and
raises ONE line naming them (`raise_problems`).
"""
import json
import logging
import os
import re
import struct

import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

# (safetensors stem, torch .bin stem) of a folder's weight files
HF_STEMS = ("model", "pytorch_model")
DIFFUSERS_STEMS = ("diffusion_pytorch_model", "diffusion_pytorch_model")
NAMES_SHOWN = 12  # tensor names listed per kind of problem


class ConversionError(ValueError):
  pass


def load_json(path):
  """The parsed JSON file at `path`; a one-line ConversionError if it is not valid JSON."""
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"{path}: not valid JSON ({e})") from e


def read_diffusers_config(src, class_names):
  """config.json of a diffusers model folder whose _class_name is one of `class_names`."""
  path = os.path.join(src, "config.json")
  if not os.path.isfile(path):
    raise ConversionError(f"{src}: no config.json (not a diffusers model folder)")
  cfg = load_json(path)
  if cfg.get("_class_name") not in class_names:
    raise ConversionError(f"{path}: _class_name={cfg.get('_class_name')!r}, expected "
                          f"{' or '.join(map(repr, class_names))}")
  return cfg


# --- weight files ------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": jnp.bfloat16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path):
  """name -> array of a .safetensors file, memory-mapped in its own dtype (bf16 included)."""
  try:
    with open(path, "rb") as f:
      n = struct.unpack("<Q", f.read(8))[0]
      header = json.loads(f.read(n))
    data = np.memmap(path, np.uint8, "r", offset=8 + n)
  except (OSError, ValueError, struct.error) as e:
    raise ConversionError(f"{path}: unreadable safetensors file ({e})") from e
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
    if dtype is None:
      raise ConversionError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
    start, end = info["data_offsets"]
    out[name] = data[start:end].view(dtype).reshape(info["shape"])
  return out


def read_torch_bin(path):
  """name -> numpy array of a torch state dict file (floating tensors as f32: numpy has no bf16
  conversion from torch)."""
  import torch  # pylint: disable=g-import-not-at-top  (only .bin folders need torch)
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"{path}: could not be loaded with weights_only=True ({e})") from e
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in sd.items()}


def weight_files(folder, stems=HF_STEMS):
  """The weight files of a model folder, preferring safetensors, then unsuffixed
  (full-precision) files over variants; a sharded index gives its shards."""
  names = set(os.listdir(folder))

  def shards(index):
    try:
      return sorted(set(load_json(os.path.join(folder, index))["weight_map"].values()))
    except (KeyError, AttributeError) as e:
      raise ConversionError(f"{folder}/{index}: not a weight index ({e})") from e

  for fmt, stem in zip(("safetensors", "bin"), stems):
    if f"{stem}.{fmt}" in names:
      return [f"{stem}.{fmt}"]
    if f"{stem}.{fmt}.index.json" in names:
      return shards(f"{stem}.{fmt}.index.json")
    variants = sorted(n for n in names if re.fullmatch(rf"{stem}\.\w+\.{fmt}", n) or
                      re.fullmatch(rf"{stem}\.{fmt}\.index\.\w+\.json", n))
    if variants:
      if len(variants) > 1:
        log.info("%s: several weight variants %s; reading %s", folder, variants, variants[0])
      return shards(variants[0]) if variants[0].endswith(".json") else [variants[0]]
  st, binf = stems
  raise ConversionError(f"{folder}: none of {st}.safetensors, {st}.safetensors.index.json, "
                        f"{binf}.bin (or its index), nor a variant such as {st}.fp16.safetensors")


def read_weights(folder, stems=HF_STEMS, dtype=None):
  """name -> array of a model folder's weights. dtype None: each tensor in its stored dtype
  (safetensors memory-mapped); np.float32: in memory, floating tensors (f16 / bf16 too) as f32."""
  out = {}
  for name in weight_files(folder, stems):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise ConversionError(f"{path}: listed in the weight index but missing")
    out.update(read_safetensors(path) if name.endswith(".safetensors") else read_torch_bin(path))
  if dtype is not None:
    is_float = lambda d: d.kind == "f" or d == jnp.bfloat16
    out = {k: np.array(v, dtype if is_float(v.dtype) else None) for k, v in out.items()}
  return out


# --- checking converted tensors -------------------------------------------------------

def apply_rules(weights, rules, expected, consume=False, keep=()):
  """Converts `weights` by (source name, our path, transform or None) rules, checking each
  result against expected[our path] (a shape). Returns (flat {our path: f32 array}, missing
  names, misshapen descriptions, used names). consume: delete each converted tensor from
  `weights` (but those in `keep`) so that a large model is not held twice."""
  flat, missing, misshapen, used = {}, [], [], set()
  for name, ours, fn in rules:
    if name not in weights:
      missing.append(name)
      continue
    used.add(name)
    x = weights[name]
    try:
      y = np.asarray(fn(x) if fn is not None else x, np.float32)
    except ValueError as e:
      misshapen.append(f"{name} {tuple(x.shape)} (cannot map onto {ours}: {e})")
      continue
    want = expected.get(ours)
    if want is None:
      raise ConversionError(f"internal: rule targets unknown parameter {ours}")
    if tuple(y.shape) != tuple(want):
      misshapen.append(f"{name} {tuple(x.shape)} -> {ours} {tuple(y.shape)}, model expects "
                       f"{tuple(want)}")
      continue
    flat[ours] = y
    if consume and name not in keep:
      del weights[name]
  return flat, missing, misshapen, used


def assign(weights, want, name_of, fit, where, what):
  """Our path -> f32 array for every path of `want` ({path tuple: shape}): name_of(path) is
  the source tensor's name, fit(w, shape, path) our layout of it or None if it does not
  fit. Every problem named in one error."""
  flat, missing, misshapen, used = {}, [], [], set()
  for path, shape in sorted(want.items()):
    name = name_of(path)
    if name not in weights:
      missing.append(name)
      continue
    used.add(name)
    y = fit(np.asarray(weights[name], np.float32), shape, path)
    if y is None:
      misshapen.append(f"{name} {tuple(weights[name].shape)} (model expects {'/'.join(path)} "
                       f"{tuple(shape)})")
      continue
    flat[path] = np.asarray(y, np.float32)
  unexpected = sorted(set(weights) - used)
  raise_problems(where, what, tensor_problems(missing, unexpected, misshapen))
  return flat


def tensor_problems(missing=(), unexpected=(), misshapen=()):
  """'missing tensors (n): a, b, ...' style descriptions of the non-empty lists."""
  out = []
  for kind, names in (("missing tensors", missing), ("unexpected tensors", unexpected),
                      ("shape mismatches", misshapen)):
    if names:
      out.append(f"{kind} ({len(names)}): {', '.join(names[:NAMES_SHOWN])}"
                 + (" ..." if len(names) > NAMES_SHOWN else ""))
  return out


def raise_problems(where, what, problems):
  """One-line ConversionError `where: cannot import <what>: p1; p2` if there are problems."""
  if problems:
    raise ConversionError(f"{where}: cannot import {what}: " + "; ".join(problems))
