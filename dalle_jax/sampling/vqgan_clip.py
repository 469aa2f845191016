"""VQGAN+CLIP: text -> image by optimising a VQGAN latent grid against CLIP.

  out = generate("demo/vqgan", "demo/clip", "a red circle on a blue background", steps=200)
  out["image"]       # uint8 (H, W, 3)
  out["codes"]       # int32 (h, w), entries of the VQGAN codebook
  out["similarity"]  # CLIP cosine(final image, prompt); out["history"]: per-step values

  python sample.py --method vqgan_clip --vqgan demo/vqgan --clip demo/clip \
      --prompt "a red circle on a blue background" --steps 200 --seed 0 --out vc.png \
      [--save_every 20] [--init_image photo.png] [--lr 0.1 --num_cutouts 16 --cut_pow 1]

The recipe (Crowson's VQGAN+CLIP):
  z (1, h, w, D) latents in the quantizer's lookup space (D = embed_dim for
  taming / DALL·E mini VQGANs; the small lookup space of factorised ones),
  initialised from the codebook entries of random codes (or of an init image's codes);
  each step:  z_q = z + stop_gradient(codebook[nearest(z)] - z)   (straight-through)
              image = decoder(post_quant_conv(z_q))
              views = num_cutouts random square crops (side in [cut_min, 1] of the
                      image, skewed small by cut_pow), resized to CLIP's input,
                      randomly flipped, plus Gaussian noise; view 0 is the whole image
              loss = -mean_views cos(CLIP_image(view), CLIP_text(prompt))
              z <- Adam(lr) step, clamped to the codebook's per-dimension range.
  The step is one jitted function (cached per model configs and settings, so
  prompts and seeds reuse the compilation); augmentations draw from
  fold_in(key(seed), step): the same seed gives the same codes.
  At the end z snaps to its nearest codes, which are decoded.

Inputs: a VQGAN training workdir / imported checkpoint directory (or
(config, variables)); decoder-only imports (min-dalle's detoker) work, except
with --init_image, which needs the encoder. CLIP: a CLIP workdir, imported
checkpoint or Hugging Face CLIP directory (or a loaded ClipEncoder).
"""
import argparse
import dataclasses
import functools
import json
import logging
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image
from tqdm import tqdm

from dalle_jax.data import images as images_lib
from dalle_jax.models import clip as clip_lib
from dalle_jax.models import loader
from dalle_jax.models import quantizer as quant_lib
from dalle_jax.models.vqgan import vqgan_from_config
from dalle_jax.sampling import rerank
from dalle_jax.sampling.clip_encoder import ClipEncoder

log = logging.getLogger(__name__)
sg = jax.lax.stop_gradient
DECODE_PARAMS = ("quantize", "post_quant_conv", "decoder")


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the compiled step depends on (besides the model configs and shapes)."""
  num_cutouts: int = 16
  cut_pow: float = 1.0
  cut_min: float = 0.5  # smallest crop side, as a fraction of the image's shorter side
  noise: float = 0.1  # per-view noise std drawn from U(0, noise), images in [-1, 1]


# --- differentiable pieces ---------------------------------------------------------------

@jax.custom_vjp
def clamp_with_grad(x):
  """clip(x, -1, 1) whose gradient still flows where it pulls x back into range."""
  return jnp.clip(x, -1.0, 1.0)


def _clamp_fwd(x):
  return jnp.clip(x, -1.0, 1.0), x


def _clamp_bwd(x, g):
  # Descent moves x along -g: pass g inside the range, or outside when -g points inward.
  ok = ((x >= -1.0) & (x <= 1.0)) | ((x > 1.0) & (g > 0)) | ((x < -1.0) & (g < 0))
  return (jnp.where(ok, g, 0.0),)


clamp_with_grad.defvjp(_clamp_fwd, _clamp_bwd)


def _resample(img_hw3, size, side, y0, x0):
  """The (side x side) square at (y0, x0) of an image, resized to (size, size), antialiased."""
  s = size / side  # output = input * s + t
  scale = jnp.stack([s, s])
  trans = -jnp.stack([y0, x0]) * s
  return jax.image.scale_and_translate(img_hw3, (size, size, img_hw3.shape[-1]), (0, 1),
                                       scale, trans, method="linear", antialias=True)


def full_view(img_hw3, size):
  """The centre square of the image at CLIP's input size (no augmentation)."""
  h, w, _ = img_hw3.shape
  side = min(h, w)
  f = lambda v: jnp.asarray(v, jnp.float32)
  return _resample(img_hw3.astype(jnp.float32), size, f(side), f((h - side) / 2), f((w - side) / 2))


def make_cutouts(key, img_hw3, size, settings):
  """(num_cutouts, size, size, 3) random views of one image; view 0 is the whole image.

  Crop side = side_min + (side - side_min) * u ** cut_pow with u ~ U(0, 1)
  (cut_pow > 1 favours small crops), position uniform, then a random
  horizontal flip and Gaussian noise of std ~ U(0, noise).
  """
  n = settings.num_cutouts
  h, w, c = img_hw3.shape
  side = float(min(h, w))
  k_size, k_y, k_x, k_flip, k_std, k_noise = jax.random.split(key, 6)
  frac = settings.cut_min + (1.0 - settings.cut_min) * (
      jax.random.uniform(k_size, (n,)) ** settings.cut_pow)
  frac = frac.at[0].set(1.0)
  side_n = frac * side
  y0_n = jax.random.uniform(k_y, (n,)) * (h - side_n)
  x0_n = jax.random.uniform(k_x, (n,)) * (w - side_n)
  y0_n = y0_n.at[0].set((h - side) / 2)  # view 0: the centre square (whole image if square)
  x0_n = x0_n.at[0].set((w - side) / 2)
  views_nssc = jax.vmap(lambda s, y, x: _resample(img_hw3.astype(jnp.float32), size, s, y, x))(
      side_n, y0_n, x0_n)
  flip_n = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
  views_nssc = jnp.where(flip_n, views_nssc[:, :, ::-1], views_nssc)
  std_n = jax.random.uniform(k_std, (n, 1, 1, 1)) * settings.noise
  return views_nssc + std_n * jax.random.normal(k_noise, views_nssc.shape)


# --- compiled functions (cached per model configs + settings) -------------------------------

class _Fns:
  """Jitted latent <-> image <-> CLIP functions for one (VQGAN, CLIP, settings)."""

  def __init__(self, vq_config, clip_config, settings):
    vq = vqgan_from_config(vq_config)
    clip = clip_lib.build_model(clip_config)
    clip_size = int(clip_config.model.vision.image_size)
    l2 = bool(vq_config.model.quantizer.get("l2_normalize", False))
    # The learning rate lives in the optimizer state: changing it does not recompile.
    self.optimizer = opt = optax.inject_hyperparams(optax.adam)(learning_rate=0.1)

    def codebook(vq_vars):  # (K, D) f32 in lookup space (unit rows when l2_normalize)
      return vq.apply(vq_vars, method=lambda m: m.quantize.codebook())

    def snap(z_bhwd, cb_kd):
      """Nearest codes (B, h, w) and the straight-through quantized latents."""
      zn = quant_lib.l2_normalize(z_bhwd) if l2 else z_bhwd.astype(jnp.float32)
      b, h, w, d = zn.shape
      codes = quant_lib.nearest_code(zn.reshape(-1, d), cb_kd).reshape(b, h, w)
      zq = jnp.take(cb_kd, codes, axis=0)
      return codes, zn + sg(zq - zn)

    def decode(vq_vars, zq_bhwd):  # lookup space -> images (B, H, W, 3), unclipped
      return vq.apply(vq_vars, zq_bhwd,
                      method=lambda m, z: m.decode(m.quantize._from_lookup(z).astype(m.dtype)))  # pylint: disable=protected-access

    def clip_image(clip_vars, views_nssc):  # (N, E) unit rows
      return clip.apply(clip_vars, views_nssc, method=clip_lib.CLIP.encode_image)

    @jax.jit
    def init_from_codes(vq_vars, codes_bhw):
      cb = codebook(vq_vars)
      return jnp.take(cb, codes_bhw, axis=0), jnp.min(cb, axis=0), jnp.max(cb, axis=0)

    @jax.jit
    def encode(vq_vars, images_bhwc):
      return vq.apply(vq_vars, images_bhwc, method=vq.encode)[1]

    @jax.jit
    def render(vq_vars, z_bhwd):
      codes, zq = snap(z_bhwd, codebook(vq_vars))
      return codes, jnp.clip(decode(vq_vars, zq), -1.0, 1.0)

    @jax.jit
    def score(clip_vars, img_hw3, text_e):
      return jnp.dot(clip_image(clip_vars, full_view(img_hw3, clip_size)[None])[0], text_e)

    @jax.jit
    def step(vq_vars, clip_vars, z_bhwd, opt_state, text_e, key, i, lo_d, hi_d):
      """One Adam step on z. Returns (z, opt_state, mean view similarity, image of the input z)."""
      cb = codebook(vq_vars)

      def loss_fn(z):
        _, zq = snap(z, cb)
        img = decode(vq_vars, zq)[0]
        views = make_cutouts(jax.random.fold_in(key, i), clamp_with_grad(img), clip_size, settings)
        sim = jnp.mean(clip_image(clip_vars, views) @ text_e)
        return -sim, (sim, jnp.clip(img, -1.0, 1.0))

      grads, (sim, img) = jax.grad(loss_fn, has_aux=True)(z_bhwd)
      updates, opt_state = opt.update(grads, opt_state, z_bhwd)
      z = jnp.clip(optax.apply_updates(z_bhwd, updates), lo_d, hi_d)
      return z, opt_state, sim, img

    self.init_from_codes, self.encode, self.render, self.score, self.step = (
        init_from_codes, encode, render, score, step)


@functools.lru_cache(maxsize=8)
def _fns_cached(vq_json, clip_json, settings):
  return _Fns(ml_collections.ConfigDict(json.loads(vq_json)),
              ml_collections.ConfigDict(json.loads(clip_json)), settings)


def _cfg_key(config):
  return config.to_json_best_effort(sort_keys=True)


# --- loading ---------------------------------------------------------------------------

def _load_vqgan(vqgan):
  """(config, VQGAN-only variables) from a path or (config, variables)."""
  if isinstance(vqgan, (str, os.PathLike)):
    return loader.load_vqgan(os.fspath(vqgan), "--vqgan")
  if not (isinstance(vqgan, (tuple, list)) and len(vqgan) == 2):
    raise TypeError(f"vqgan must be a path or (config, variables), got {type(vqgan).__name__}")
  config, variables = vqgan
  if config.get("family") != "vqgan":
    raise ValueError(f"the given VQGAN: a {config.get('family')!r} model, not a VQGAN "
                     "(config.family must be 'vqgan')")
  variables = loader.vqgan_variables(nn.unbox(variables))
  loader.check_vqgan_variables(variables, "the given VQGAN")
  return config, variables


def _load_clip(clip):
  """A ClipEncoder from a path (cached, shared with reranking), (config, variables) or itself."""
  if isinstance(clip, ClipEncoder):
    return clip
  if isinstance(clip, (str, os.PathLike)):
    return rerank.get_encoder(os.path.abspath(os.path.expanduser(os.fspath(clip))), flag="--clip")
  if isinstance(clip, (tuple, list)) and len(clip) == 2:
    config, variables = clip
    if config.get("family") != "clip":
      raise ValueError(f"a {config.get('family')!r} model was given as CLIP")
    return ClipEncoder(config, nn.unbox(variables))
  raise TypeError(f"clip must be a path, (config, variables) or a ClipEncoder, "
                  f"got {type(clip).__name__}")


def _parse_grid(grid, default):
  if grid is None or grid == 0:
    return default
  if isinstance(grid, str):
    parts = grid.lower().replace(",", "x").split("x")
    try:
      grid = tuple(int(p) for p in parts)
    except ValueError:
      raise ValueError(f"grid {grid!r}: expected N or HxW") from None
  if isinstance(grid, int):
    grid = (grid, grid)
  grid = tuple(int(g) for g in grid)
  if len(grid) == 1:
    grid = grid * 2
  if len(grid) != 2 or min(grid) < 1:
    raise ValueError(f"grid {grid}: expected a positive N or (h, w)")
  return grid


def _read_init_image(init_image, height, width):
  """A path / PIL image / array (uint8 or [-1, 1] float) -> f32 (1, H, W, 3) in [-1, 1]."""
  if isinstance(init_image, (str, os.PathLike)):
    path = os.fspath(init_image)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"init image {path}: no such file")
    try:
      img = np.asarray(images_lib.open_image(path)[0])
    except images_lib.ImageError as e:
      raise ValueError(f"init image {path}: {e}") from None
  elif hasattr(init_image, "convert"):  # PIL
    img = np.asarray(init_image.convert("RGB"))
  else:
    img = np.asarray(init_image)
  if img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f"init image: expected (H, W, 3), got shape {img.shape}")
  x = img.astype(np.float32) / 127.5 - 1.0 if img.dtype == np.uint8 else img.astype(np.float32)
  # shorter side to fit, then a centre crop to (height, width)
  return jnp.clip(images_lib.resize_and_crop_float(x[None], height, width), -1.0, 1.0)


# --- the generator -------------------------------------------------------------------------

class VQGANCLIP:
  """A VQGAN and a CLIP model loaded once; `generate(prompt, ...)` per image."""

  def __init__(self, vqgan, clip):
    self.vq_config, vq_vars = _load_vqgan(vqgan)
    self.clip = _load_clip(clip)
    # One image at a time: everything on the first local device.
    self.device = dev = jax.local_devices()[0]
    self.vq_vars = jax.device_put(jax.tree.map(jnp.asarray, vq_vars), dev)
    # What decoding needs: the same tree for full and decoder-only checkpoints,
    # so both share one compilation of the step.
    self.dec_vars = dict(self.vq_vars, params={
        k: v for k, v in self.vq_vars["params"].items() if k in DECODE_PARAMS})
    self.clip_vars = jax.device_put({"params": self.clip.variables["params"]}, dev)
    m = self.vq_config.model
    self.factor = 2 ** (len(m.ch_mult) - 1)
    self.n_embed = int(m.n_embed)
    self.decoder_only = bool(m.get("decoder_only", False))
    self.default_grid = (int(m.resolution) // self.factor,) * 2

  def _fns(self, settings):
    vq_config = ml_collections.ConfigDict(self.vq_config.to_dict())
    vq_config.model.decoder_only = False  # the same network either way
    return _fns_cached(_cfg_key(vq_config), _cfg_key(self.clip.config), settings)

  def text_embedding(self, prompt):
    if not isinstance(prompt, str) or not prompt.strip():
      raise ValueError("the prompt is empty: VQGAN+CLIP needs a text to optimise towards")
    n_tok = len(self.clip.tokenizer.tokenize([prompt])[0])
    if n_tok > self.clip.max_len:
      log.warning("prompt is %d tokens long: truncated to CLIP's %d (%r)", n_tok,
                  self.clip.max_len, prompt[:60])
    return jnp.asarray(self.clip.encode_texts([prompt])[0])

  def generate(self, prompt, *, steps=200, lr=0.1, num_cutouts=16, cut_pow=1.0, cut_min=0.5,
               noise=0.1, seed=0, init_image=None, grid=None, save_every=0, frames_dir=None,
               progress=True):
    """Optimises one image for `prompt`; see the module docstring and `generate`."""
    if steps < 0:
      raise ValueError(f"steps must be >= 0, got {steps}")
    if num_cutouts < 1:
      raise ValueError(f"num_cutouts must be >= 1, got {num_cutouts}")
    if not 0.0 < cut_min <= 1.0:
      raise ValueError(f"cut_min must be in (0, 1], got {cut_min}")
    if save_every and not frames_dir:
      raise ValueError("save_every > 0 needs frames_dir (where the PNG frames go)")
    text_e = self.text_embedding(prompt)
    fns = self._fns(Settings(int(num_cutouts), float(cut_pow), float(cut_min), float(noise)))
    h, w = _parse_grid(grid, self.default_grid)
    key_init, key_steps = jax.random.split(jax.random.key(int(seed)))

    if init_image is not None:
      if self.decoder_only:
        raise ValueError("init_image needs the VQGAN's encoder, but this checkpoint holds only "
                         "a decoder (e.g. min-dalle's detoker): start from random codes instead")
      x = _read_init_image(init_image, h * self.factor, w * self.factor)
      codes0 = fns.encode(self.vq_vars, x)
    else:
      codes0 = jax.random.randint(key_init, (1, h, w), 0, self.n_embed, jnp.int32)
    z, lo_d, hi_d = fns.init_from_codes(self.dec_vars, codes0)
    # Committed like the step's outputs, so the 2nd step hits the 1st step's compilation.
    opt_state = fns.optimizer.init(z)
    opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    z, opt_state = jax.device_put((z, opt_state), self.device)

    _, img0 = fns.render(self.dec_vars, z)
    initial_similarity = float(fns.score(self.clip_vars, img0[0], text_e))

    frames = []
    if save_every:
      os.makedirs(frames_dir, exist_ok=True)

    def save_frame(i, img):
      path = os.path.join(frames_dir, f"frame_{i:05d}.png")
      Image.fromarray(images_lib.to_uint8(img)).save(path)
      frames.append(path)

    bar = tqdm(range(steps), desc="VQGAN+CLIP", unit="step", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    history = []
    for i in bar:
      z, opt_state, sim, img = fns.step(self.dec_vars, self.clip_vars, z, opt_state, text_e,
                                        key_steps, jnp.int32(i), lo_d, hi_d)
      sim = float(sim)  # the image of z before this step (i updates so far)
      history.append({"step": i, "similarity": sim})
      bar.set_postfix(similarity=f"{sim:.4f}")
      if save_every and i % save_every == 0:
        save_frame(i, np.asarray(img[0]))
    bar.close()

    codes, img = fns.render(self.dec_vars, z)
    img = img[0]
    similarity = float(fns.score(self.clip_vars, img, text_e))
    if save_every and steps % save_every == 0:
      save_frame(steps, np.asarray(img))
    return {"image": images_lib.to_uint8(img), "codes": np.asarray(codes[0], np.int32),
            "similarity": similarity, "initial_similarity": initial_similarity,
            "history": history, "frames": frames}


def generate(vqgan, clip, prompt, *, steps=200, lr=0.1, num_cutouts=16, cut_pow=1.0, seed=0,
             init_image=None, grid=None, save_every=0, frames_dir=None, progress=True, **kw):
  """VQGAN+CLIP for one prompt.

  Args:
    vqgan: VQGAN workdir / imported checkpoint path, or (config, variables).
    clip: CLIP workdir / imported checkpoint / HF CLIP dir, (config, variables) or ClipEncoder.
    prompt: the text.
    steps, lr: Adam steps and learning rate on the latent.
    num_cutouts, cut_pow: augmented CLIP views per step; crop size skew (> 1: smaller).
    seed: initial codes and augmentations (same seed -> same result).
    init_image: optional path / PIL image / (H, W, 3) array to start from (needs an encoder).
    grid: latent grid N or (h, w); default the VQGAN's resolution / downsampling factor.
    save_every, frames_dir: write frame_{step:05d}.png every `save_every` steps (and the last).
    progress: tqdm bar with the current similarity.
    **kw: cut_min (smallest crop side fraction, 0.5), noise (max view noise std, 0.1).

  Returns:
    dict(image=uint8 (H, W, 3), codes=int32 (h, w), similarity=float (CLIP cosine of
    the final image and the prompt), initial_similarity=float (of the initial image),
    history=[{step, similarity (mean over the step's views)}], frames=[paths]).
  """
  return VQGANCLIP(vqgan, clip).generate(
      prompt, steps=steps, lr=lr, num_cutouts=num_cutouts, cut_pow=cut_pow, seed=seed,
      init_image=init_image, grid=grid, save_every=save_every, frames_dir=frames_dir,
      progress=progress, **kw)


# --- command line (sample.py --method vqgan_clip) --------------------------------------------

def _parser():
  p = argparse.ArgumentParser(
      prog="sample.py --method vqgan_clip",
      description="VQGAN+CLIP: optimise a VQGAN latent so CLIP matches the prompt "
                  "(one image per --prompt).")
  p.add_argument("--method", choices=["vqgan_clip"], default="vqgan_clip", help=argparse.SUPPRESS)
  p.add_argument("--vqgan", required=True, help="VQGAN training workdir or imported checkpoint")
  p.add_argument("--clip", required=True, help="CLIP workdir, imported checkpoint or HF CLIP dir")
  p.add_argument("--prompt", action="append", default=[], help="repeatable: one image per prompt")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate on the latent")
  p.add_argument("--num_cutouts", type=int, default=16, help="augmented CLIP views per step")
  p.add_argument("--cut_pow", type=float, default=1.0, help="> 1 favours smaller crops")
  p.add_argument("--cut_min", type=float, default=0.5,
                 help="smallest crop side as a fraction of the image's shorter side")
  p.add_argument("--noise", type=float, default=0.1, help="max std of the noise added to views")
  p.add_argument("--grid", default=None,
                 help="latent grid N or HxW (default: the VQGAN's resolution / factor)")
  p.add_argument("--init_image", default=None, help="start from this image's codes")
  p.add_argument("--save_every", type=int, default=0,
                 help="write a PNG frame every K steps (OUT_STEM/pNN_frames/)")
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--out", default="vqgan_clip.png",
                 help="grid PNG; the images, frames and samples.json go to OUT_STEM/")
  return p


def vqgan_clip_main(argv=None):
  """sample.py --method vqgan_clip entry point; returns the grid PNG's path."""
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if not args.prompt:
    raise SystemExit("error: give at least one --prompt TEXT")
  for i, prompt in enumerate(args.prompt):
    if not prompt.strip():
      raise SystemExit(f"error: --prompt number {i + 1} is empty")
  if args.save_every < 0 or args.steps < 0:
    raise SystemExit("error: --steps and --save_every must be >= 0")
  out = os.path.abspath(args.out)
  stem = os.path.splitext(out)[0]
  try:
    gen = VQGANCLIP(args.vqgan, args.clip)
    os.makedirs(stem, exist_ok=True)
    results = []
    for p, prompt in enumerate(args.prompt):
      log.info("prompt %d/%d: %r", p + 1, len(args.prompt), prompt)
      results.append(gen.generate(
          prompt, steps=args.steps, lr=args.lr, num_cutouts=args.num_cutouts,
          cut_pow=args.cut_pow, cut_min=args.cut_min, noise=args.noise, seed=args.seed,
          init_image=args.init_image, grid=args.grid, save_every=args.save_every,
          frames_dir=os.path.join(stem, f"p{p:02d}_frames") if args.save_every else None,
          progress=not args.no_progress))
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise SystemExit(f"error: {e}") from None
  rows = []
  for p, (prompt, r) in enumerate(zip(args.prompt, results)):
    name = f"p{p:02d}.png"
    Image.fromarray(r["image"]).save(os.path.join(stem, name))
    rows.append({"file": name, "prompt": prompt, "prompt_index": p,
                 "clip_similarity": r["similarity"],
                 "initial_clip_similarity": r["initial_similarity"],
                 "frames": [os.path.relpath(f, stem) for f in r["frames"]]})
  np.save(os.path.join(stem, "codes.npy"), np.stack([r["codes"] for r in results]))
  settings = {k: getattr(args, k) for k in ("steps", "seed", "lr", "num_cutouts", "cut_pow",
                                            "cut_min", "noise", "grid", "init_image")}
  with open(os.path.join(stem, "samples.json"), "w") as f:
    json.dump({"method": "vqgan_clip", "vqgan": args.vqgan, "clip": args.clip, "images": rows,
               **settings}, f, indent=2)
  images = np.stack([r["image"] for r in results])
  Image.fromarray(images_lib.image_grid(images, ncols=min(len(images), 8))).save(out)
  for row in rows:
    print(f"{row['file']}: CLIP similarity {row['initial_clip_similarity']:.4f} -> "
          f"{row['clip_similarity']:.4f}  ({row['prompt']!r})")
  print(f"wrote {out} ({len(rows)} images) and the images in {stem}/")
  return out


if __name__ == "__main__":
  vqgan_clip_main(sys.argv[1:])
