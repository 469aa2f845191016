"""Trained and imported models for inference: one loader for every family.

  config = loader.check(path, "vqgan", flag="--vqgan")   # reads config.json only
  vq_config, vq_vars = loader.load_vqgan(path)           # checked, VQGAN-only variables
  images = loader.vqgan_decode(vq_config, vq_vars, codes_bhw)   # f32 [-1, 1]

A model path is a training workdir (its latest readable checkpoint, EMA
parameters when kept), an imported checkpoint directory (`dalle_jax.convert`),
or — for CLIP — a Hugging Face CLIP directory. `check` validates a path and its
family from config.json alone, so command lines can reject a wrong path with a
one-line error naming the flag before any weights are read or any program is
compiled; `load` then reads the weights.

The VQGAN codec (`vqgan_encode` / `vqgan_decode`) lives here too: the task that
trains a VQGAN, the AR sampler, VQGAN+CLIP and the tools all run the same
jitted encode/decode of a loaded VQGAN.

Shapes: B batch, H/W image size, h/w code grid (H/f, W/f for a VQGAN of factor f).
"""
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dalle_jax import paths
from dalle_jax.convert import hf_clip
from dalle_jax.models.vqgan import vqgan_from_config
from dalle_jax.train import checkpoint

# what a path of each family should be, for the error messages
_WHAT = {"vqgan": "a VQGAN training workdir or imported checkpoint",
         "dalle": "an autoregressive text->image (DALL·E / DALL·E mini) workdir or imported "
                  "checkpoint",
         "clip": "a CLIP training workdir, imported checkpoint or Hugging Face CLIP directory"}


class ModelPathError(ValueError):
  """A model path that does not hold the expected model (one line, names the flag)."""


class ModelNotFoundError(ModelPathError, FileNotFoundError):
  """A model path that does not exist."""


def _fail(flag, path, why, cls=ModelPathError):
  raise cls(f"{flag} {path}: {why}" if flag else f"{path}: {why}")


def check(path, family, flag=""):
  """The model config at `path` after checking that it holds a `family` model.

  Reads config.json only (and lists the checkpoint directory). Raises
  ModelPathError naming `flag` and the path: missing path, no config.json,
  another family, or a training workdir without checkpoints. For a Hugging Face
  CLIP directory the returned config is the one its import will build.
  """
  what = _WHAT.get(family, f"a {family} model")
  if not path:
    _fail(flag, "''", f"empty path (expected {what})")
  path = paths.resolve(path)  # local or gs:// (never mangled by os.path)
  if not path.exists():
    _fail(flag, path, f"no such directory (expected {what})", ModelNotFoundError)
  if not path.is_dir():
    _fail(flag, path, f"not a directory (expected {what})")
  if family == "clip" and _is_hf_clip_dir(path):
    try:
      return hf_clip.config_from_hf(hf_clip.read_hf_config(str(path)), str(path))
    except (OSError, ValueError, KeyError) as e:
      _fail(flag, path, f"unreadable Hugging Face CLIP config ({e})")
  try:
    config = checkpoint.read_config(path)
  except FileNotFoundError:
    _fail(flag, path, f"no config.json (expected {what})")
  except ValueError as e:  # malformed JSON
    _fail(flag, path, f"unreadable config.json ({e})")
  found = config.get("family")
  if found != family:
    _fail(flag, path, f"a {found!r} model (config.family), expected {what}")
  if not (path / "variables").is_dir():
    ckpts = path / "checkpoints"
    steps = [d.name for d in ckpts.iterdir() if d.name.isdigit()] if ckpts.is_dir() else []
    if not steps:
      _fail(flag, path, "a training workdir without checkpoints (train it first, or pass an "
                        "imported checkpoint directory)")
  return config


def load(path, family, flag="", params_target=None):
  """(config, variables) of a checked `family` model (see `checkpoint.load_model`;
  params_target restores straight into shards)."""
  check(path, family, flag)
  path = paths.resolve(path)
  if family == "clip" and _is_hf_clip_dir(path):
    return hf_clip.load_hf_clip(str(path))
  return checkpoint.load_model(path, params_target=params_target)


def _is_hf_clip_dir(path):
  # Hugging Face directories are read from local disk only (their readers open files).
  return not paths.is_remote(path) and hf_clip.is_hf_clip_dir(str(path))


# --- VQGAN ---------------------------------------------------------------------------

def vqgan_variables(variables):
  """The VQGAN's own variables from a VQGAN task's variables (the discriminator
  and LPIPS dropped), or the tree itself when it holds only the VQGAN."""
  params = variables["params"]
  out = {"params": params["vqgan"] if "vqgan" in params else params}
  if "vq_ema" in variables:
    out["vq_ema"] = variables["vq_ema"]
  return out


def check_vqgan_variables(variables, where, need_encoder=False):
  """Raises ModelPathError when the VQGAN parts a use needs are missing."""
  params = variables["params"]
  missing = [k for k in ("decoder", "post_quant_conv") if k not in params]
  if "codebook" not in params.get("quantize", {}) and "vq_ema" not in variables:
    missing.append("quantize/codebook")
  if need_encoder:
    missing += [k for k in ("encoder", "quant_conv") if k not in params]
  if missing:
    raise ModelPathError(f"{where}: the VQGAN variables lack {', '.join(missing)} "
                         f"(have: {sorted(params)})")


def load_vqgan(path, flag="--vqgan"):
  """(config, VQGAN-only variables) of a VQGAN workdir or imported checkpoint."""
  config, variables = load(path, "vqgan", flag)
  variables = vqgan_variables(nn.unbox(variables))
  check_vqgan_variables(variables, f"{flag} {path}" if flag else path)
  return config, variables


@functools.lru_cache(maxsize=8)
def _codec(config_json):
  config = ml_collections.ConfigDict(json.loads(config_json))
  model = vqgan_from_config(config)

  @jax.jit
  def encode(v, images_bhw3):
    return model.apply(v, images_bhw3, method=model.encode)[1]

  @jax.jit
  def decode(v, codes_bhw):
    return jnp.clip(model.apply(v, codes_bhw, method=model.decode_codes), -1.0, 1.0)

  return encode, decode


def _key(config):
  return config.to_json_best_effort(sort_keys=True)


def vqgan_encode(config, variables, images_bhw3):
  """Images (B, H, W, 3) in [-1, 1] -> codes (B, h, w) int32."""
  if config.model.get("decoder_only", False):
    raise ValueError("this VQGAN checkpoint holds only a decoder (imported from min-dalle's "
                     "detoker.pt): it can decode codes but not encode images")
  return _codec(_key(config))[0](vqgan_variables(variables),
                                 jnp.asarray(images_bhw3, jnp.float32))


def vqgan_decode(config, variables, codes_bhw):
  """Codes (B, h, w) int -> images (B, h*f, w*f, 3) f32 in [-1, 1]."""
  return _codec(_key(config))[1](vqgan_variables(variables), jnp.asarray(codes_bhw, jnp.int32))


def vqgan_reconstruct(config, variables, images_bhw3):
  """Images -> (reconstructions in [-1, 1], codes (B, h, w) int32): decode(encode(x))."""
  codes = vqgan_encode(config, variables, images_bhw3)
  return vqgan_decode(config, variables, codes), codes
