"""Text -> image with unCLIP (DALL·E 2 / Karlo): the pipeline behind `sample.py --method unclip`.

  pipe = UnclipPipeline.load("ckpt/karlo")     # convert karlo's checkpoint
  images = pipe.generate(["a red circle"], num_images=4, seed=0)   # uint8 (P, N, H, W, 3)

The stages, as diffusers' UnCLIPPipeline runs them:
  1. CLIP text tower: caption -> unnormalised text embedding (B, E) + token states (B, S, C)
     (the final LayerNorm's output); the empty caption gives the unconditional rows.
  2. prior (x0-prediction, clipped to the scheduler's range, guided by the empty caption)
     -> normalised image embedding -> x * clip_std + clip_mean.
  3. decoder: text projection (4 context tokens from the image embedding in front of the
     projected caption states; mask = 4 ones + caption mask; image and text embeddings
     added to the time embedding) -> U-Net with learned-range variance; guidance swaps in
     the learned null image embedding and the empty caption, guides the 3 mean channels
     and keeps the conditional variance. The result is clamped to [-1, 1].
  4. super-resolution: x_t ++ bicubic(64 px result) -> super_res_first at every step but
     the last (t = 0), which runs super_res_last. No guidance.
Each stage is one compiled loop of dalle_jax.diffusion.samplers' "unclip" sampler (the
UnCLIPScheduler), jitted with the rows split over the mesh's batch axes.

Randomness: for seed s, stage k in (prior, decoder, super_res) draws its x_T from
fold_in(PRNGKey(s), k) and its step noise from fold_in(PRNGKey(s), 3 + k) (the sampler
folds in the step index): see `stage_keys`. `latents=` fixes any stage's x_T.

`decode_from_image_embeddings` (stages 3-4) is the entry point variations, interpolations
and text diffs reuse with image embeddings of their own.

Shapes: P prompts, N images per prompt, B = P * N rows, E CLIP embedding width,
S caption tokens, C caption state width, h/w the decoder's size, H/W the super-resolution size.
"""
import contextlib
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import parallel
from dalle_jax.data import images as images_lib
from dalle_jax.data.tokenizers import get_tokenizer
from dalle_jax.diffusion import cascade
from dalle_jax.diffusion import guidance as guidance_lib
from dalle_jax.diffusion import samplers
from dalle_jax.diffusion import schedule as schedule_lib
from dalle_jax.models import clip as clip_lib
from dalle_jax.models import prior as prior_lib
from dalle_jax.models import unclip as unclip_lib
from dalle_jax.models import unet as unet_lib
from dalle_jax.sampling import diffusion as diffusion_sampling
from dalle_jax.sampling import generate

log = logging.getLogger(__name__)

FAMILY = "unclip"
STAGES = ("prior", "decoder", "super_res")
SamplingError = diffusion_sampling.SamplingError


def _tuples(tree):
  """JSON lists -> tuples (hashable Linen attributes)."""
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return tuple(_tuples(v) for v in tree)
  return tree


def _plain(cfg):
  return _tuples(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))


def stage_keys(seed):
  """{stage: (x_T key, step-noise rng)} for a seed (see the module docstring)."""
  root = jax.random.PRNGKey(seed)
  return {s: (jax.random.fold_in(root, k), jax.random.fold_in(root, 3 + k))
          for k, s in enumerate(STAGES)}


class UnclipPipeline:
  """CLIP text tower + prior + decoder + two super-resolution U-Nets, optionally sharded."""

  def __init__(self, config, variables, mesh=None):
    if config.get("family") != FAMILY:
      raise SamplingError(f"config.family={config.get('family')!r}, expected {FAMILY!r} "
                          "(a checkpoint from `convert karlo`)")
    self.config = config
    self.mesh = mesh
    m = config.model
    self.prior = prior_lib.PriorTransformer(**_plain(m.prior))
    dec = _plain(m.decoder)
    self.decoder = unclip_lib.UnclipDecoder(text_proj=unclip_lib.TextProjection(**dec["text_proj"]),
                                            unet=unet_lib.UNet(**dec["unet"]))
    self.sr_first = unet_lib.UNet(**_plain(m.super_res_first))
    self.sr_last = unet_lib.UNet(**_plain(m.super_res_last))
    self.text_encoder = clip_lib.TextTower(**_plain(m.text_encoder))
    self.decoder_size, self.sr_size = int(m.decoder_size), int(m.super_res_size)
    self.channels = int(dec["unet"]["in_channels"])
    self.scheds = {s: schedule_lib.SchedulerConfig.from_dict(dict(config.schedulers[s]))
                   for s in STAGES}
    self.text_len = int(self.prior.text_len)
    self.params = variables["params"]
    self.clip_stats = variables[prior_lib.STATS]
    if mesh is not None:
      self.clip_stats = jax.device_put(self.clip_stats, parallel.replicated(mesh))
    self._tokenizer = None
    self._compiled = {}
    self._bar = None

  # --- loading ------------------------------------------------------------------------
  def abstract_variables(self):
    """The boxed abstract {'params': {prior, decoder, super_res_first, super_res_last,
    text_encoder}} (logical names: shardings for loading onto a mesh)."""
    key = jax.random.PRNGKey(0)
    e, s = self.prior.embed_dim, self.text_len
    c = self.prior.text_dim or e
    z = lambda *shape: jnp.zeros(shape, jnp.float32)
    d = self.decoder_size

    def init():
      prior_v = self.prior.init(key, *prior_lib.example_inputs(self.prior))
      dec_v = self.decoder.init(key, z(1, d, d, self.channels), jnp.zeros((1,), jnp.int32),
                                z(1, e), z(1, e), z(1, s, c), jnp.ones((1, s), bool))
      out = {"prior": prior_v["params"], "decoder": dec_v["params"]}
      for name, unet in (("super_res_first", self.sr_first), ("super_res_last", self.sr_last)):
        x, t, kw = unet_lib.example_inputs(unet)
        out[name] = unet.init(key, x, t, **kw)["params"]
      out["text_encoder"] = self.text_encoder.init(
          key, jnp.zeros((1, s), jnp.int32), jnp.ones((1, s), bool))["params"]
      return {"params": out}
    return jax.eval_shape(init)

  @classmethod
  def load(cls, path, mesh=None):
    from dalle_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
    path = os.path.abspath(os.path.expanduser(path))
    config = checkpoint.read_config(path)
    if config.get("family") != FAMILY:
      raise SamplingError(f"{path}: config.family={config.get('family')!r}, expected {FAMILY!r} "
                          "(write one with `python -m dalle_jax.tools.convert karlo`)")
    target = None
    if mesh is not None:  # each parameter read straight into its shards
      shell = cls(config, {"params": None, prior_lib.STATS: None})
      abstract = shell.abstract_variables()
      with parallel.mesh_context(mesh, config):
        shardings = parallel.logical_shardings(abstract, mesh, parallel.rules_from_config(config))
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            parallel.unbox(abstract)["params"], parallel.unbox(shardings)["params"])
    _, variables = checkpoint.load_model(path, params_target=target)
    return cls(config, variables, mesh=mesh)

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      self._tokenizer = get_tokenizer(self.config.text)
    return self._tokenizer

  # --- jitting ----------------------------------------------------------------------
  def _ctx(self):
    if self.mesh is None:
      return contextlib.nullcontext()
    return parallel.mesh_context(self.mesh, self.config)

  def _jit(self, key, fn, num_rows):
    """fn(params, *rows, rng) jitted once per key; with a mesh the rows' arrays (any trees)
    are split over the batch axes and the parameters keep their shardings."""
    if key not in self._compiled:
      if self.mesh is None:
        self._compiled[key] = jax.jit(fn)
      else:
        rows = lambda a: parallel.batch_sharding(self.mesh, np.ndim(a))

        def call(params, *args):
          row_args, rng = args[:num_rows], args[num_rows:]
          shard = (jax.tree.map(lambda a: a.sharding, params),
                   *[jax.tree.map(rows, r) for r in row_args],
                   *[parallel.replicated(self.mesh)] * len(rng))
          out_like = row_args[-1]
          return jax.jit(fn, in_shardings=shard, out_shardings=rows(out_like))(params, *args)
        self._compiled[key] = call
    return self._compiled[key]

  def _progress(self, total, desc):
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    self._bar = tqdm(total=total, desc=desc, unit="step", disable=jax.process_index() != 0)

  def _tick(self, *_):
    if self._bar is not None:
      self._bar.update(1)

  def _close_bar(self):
    if self._bar is not None:
      self._bar.close()
    self._bar = None

  # --- 1. text ----------------------------------------------------------------------
  def tokenize(self, prompts):
    """(ids int32 (N, S), mask bool (N, S)), padded to the prior's caption length."""
    for i, seq in enumerate(self.tokenizer.tokenize(list(prompts))):
      if len(seq) > self.text_len:
        log.warning("--prompt %d is %d tokens long: truncated to %d (%r)", i, len(seq),
                    self.text_len, prompts[i][:60])
    return self.tokenizer.encode(list(prompts), self.text_len)

  def encode_text(self, ids, mask):
    """CLIP text tower -> (embedding (N, E) unnormalised, token states (N, S, C)) as numpy."""
    def fn(params, ids, mask):
      emb, state = self.text_encoder.apply(
          {"params": params}, ids, mask,
          capture_intermediates=lambda mdl, _: mdl.name == "ln_final")
      return emb.astype(jnp.float32), state["intermediates"]["ln_final"]["__call__"][0]
    if "text" not in self._compiled:
      self._compiled["text"] = jax.jit(fn)
    emb, states = self._compiled["text"](self.params["text_encoder"], ids, mask)
    return np.asarray(emb, np.float32), np.asarray(states, np.float32)

  def condition(self, prompts, num_images):
    """(cond, uncond) rows {'embed', 'states', 'mask'} (P * num_images each): the captions,
    and the empty caption (guidance's unconditional half)."""
    ids, mask = self.tokenize(prompts)
    null_ids, null_mask = self.tokenize([""])
    emb, states = self.encode_text(np.concatenate([ids, null_ids]),
                                   np.concatenate([mask, null_mask]))
    p, n = len(prompts), len(prompts) * num_images
    rep = lambda a: np.repeat(a[:p], num_images, 0)
    cond = {"embed": rep(emb), "states": rep(states), "mask": rep(mask)}
    uncond = {"embed": np.repeat(emb[p:], n, 0), "states": np.repeat(states[p:], n, 0),
              "mask": np.repeat(null_mask, n, 0)}
    return cond, uncond

  # --- checks (before anything compiles) ----------------------------------------------
  def check(self, prompts, num_images, steps, guidance):
    if not prompts:
      raise SamplingError("no --prompt given")
    for i, p in enumerate(prompts):
      if not isinstance(p, str) or not p.strip():
        raise SamplingError(f"--prompt {i} is empty")
    if not isinstance(num_images, int) or num_images < 1:
      raise SamplingError(f"--num_images {num_images}: must be >= 1")
    for stage, flag in zip(STAGES, ("--prior_steps", "--decoder_steps", "--sr_steps")):
      n = self.scheds[stage].num_train_timesteps
      k = steps[stage]
      if not isinstance(k, (int, np.integer)) or not 2 <= k <= n:
        raise SamplingError(f"{flag} {k}: must lie in [2, {n}] (the unclip sampler spans "
                            f"timesteps {n - 1} .. 0)")
    for stage, flag in (("prior", "--prior_guidance_scale"),
                        ("decoder", "--decoder_guidance_scale")):
      g = guidance[stage]
      if not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
        raise SamplingError(f"{flag} {g}: must be a finite number >= 0 (1 = no guidance)")

  def initial_noise(self, seed, n, latents=None):
    """{stage: x_T} for n rows: drawn from the seed unless `latents` gives it (checked)."""
    e = self.prior.embed_dim
    shapes = {"prior": (n, e),
              "decoder": (n, self.decoder_size, self.decoder_size, self.channels),
              "super_res": (n, self.sr_size, self.sr_size, self.channels)}
    latents = dict(latents or {})
    unknown = sorted(set(latents) - set(STAGES))
    if unknown:
      raise SamplingError(f"latents: unknown stage(s) {unknown}; choose {', '.join(STAGES)}")
    keys = stage_keys(seed)
    out = {}
    for s in STAGES:
      if latents.get(s) is None:
        out[s] = np.asarray(jax.random.normal(keys[s][0], shapes[s], jnp.float32))
        continue
      x = np.asarray(latents[s])
      if x.shape != shapes[s]:
        raise SamplingError(f"{s} latents have shape {x.shape}, expected {shapes[s]} "
                            "(prompts x num_images first)")
      if not np.issubdtype(x.dtype, np.floating):
        raise SamplingError(f"{s} latents have dtype {x.dtype}, expected float32")
      out[s] = x.astype(np.float32)
    return out

  # --- padding rows to the mesh ---------------------------------------------------------
  def _pad(self, tree, n):
    pad = -n % parallel.batch_axis_size(self.mesh) if self.mesh is not None else 0
    if not pad:
      return tree
    return jax.tree.map(lambda a: np.concatenate([a, np.repeat(np.asarray(a)[-1:], pad, 0)]),
                        tree)

  # --- 2. prior -----------------------------------------------------------------------
  def sample_prior(self, cond, uncond, x_T, rng, steps=25, guidance_scale=4.0, progress=False):
    """CLIP image embeddings (B, E) (denormalised) for the captions' rows."""
    sched, n = self.scheds["prior"], len(x_T)
    guided = guidance_scale != 1.0
    prior = self.prior

    def fn(variables, cond, uncond, x, rng):
      def apply(x_b, t_b):
        c = (jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond, uncond) if guided
             else cond)
        return prior.apply(variables, x_b, t_b, c["embed"], c["states"], c["mask"])
      model_fn = (guidance_lib.classifier_free_guidance(apply, guidance_scale) if guided
                  else apply)
      x0 = samplers.sample(model_fn, sched, x, sampler="unclip", steps=steps, rng=rng,
                           progress=self._tick if progress else None)
      return prior_lib.denormalize(variables[prior_lib.STATS], x0)

    key = ("prior", steps, float(guidance_scale), progress)
    call = self._jit(key, fn, 3)
    variables = {"params": self.params["prior"], prior_lib.STATS: self.clip_stats}
    cond, uncond, x_T = self._pad((cond, uncond, x_T), n)
    if progress:
      self._progress(steps, f"prior {steps} steps, {n} images")
    try:
      with self._ctx():
        out = call(variables, cond, uncond, x_T, rng)
      return parallel.to_host(out)[:n]
    finally:
      self._close_bar()

  # --- 3-4. decoder + super-resolution ----------------------------------------------------
  def decode(self, image_embed, cond, uncond, x_T, rng, steps=25, guidance_scale=8.0,
             progress=False):
    """The decoder stage: (B, h, w, C) in [-1, 1] from image embeddings (B, E)."""
    sched, n = self.scheds["decoder"], len(x_T)
    guided = guidance_scale != 1.0
    decoder = self.decoder

    def fn(params, image_embed, cond, uncond, x, rng):
      b = image_embed.shape[0]
      if guided:
        c = jax.tree.map(lambda a, u: jnp.concatenate([a, u]), cond, uncond)
        img = jnp.concatenate([image_embed, image_embed])
        drop = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])
      else:
        c, img, drop = cond, image_embed, None

      def apply(x_b, t_b):
        return decoder.apply({"params": params}, x_b, t_b, img, c["embed"], c["states"], c["mask"],
                             drop_image_b=drop)
      model_fn = (guidance_lib.classifier_free_guidance(apply, guidance_scale,
                                                        learned_variance=sched.learned_variance)
                  if guided else apply)
      out = samplers.sample(model_fn, sched, x, sampler="unclip", steps=steps, rng=rng,
                            progress=self._tick if progress else None)
      return jnp.clip(out, -1.0, 1.0)

    key = ("decoder", steps, float(guidance_scale), progress)
    call = self._jit(key, fn, 4)
    image_embed, cond, uncond, x_T = self._pad((np.asarray(image_embed, np.float32), cond, uncond,
                                                x_T), n)
    if progress:
      self._progress(steps, f"decoder {steps} steps, {n} images")
    try:
      with self._ctx():
        out = call(self.params["decoder"], image_embed, cond, uncond, x_T, rng)
      return parallel.to_host(out)[:n]
    finally:
      self._close_bar()

  def super_resolve(self, small, x_T, rng, steps=7, progress=False):
    """The super-resolution stage: (B, H, W, C) from the decoder's (B, h, w, C) in [-1, 1]."""
    sched, n = self.scheds["super_res"], len(x_T)
    first, last, size = self.sr_first, self.sr_last, self.sr_size

    def fn(params, small, x, rng):
      up = cascade.upsample_bicubic(small, size)

      def model_fn(x_b, t_b):
        inp = jnp.concatenate([x_b, up], axis=-1)
        # UnCLIPPipeline's last step (always t = 0 with this sampler) uses super_res_last.
        return jax.lax.cond(t_b[0] == 0,
                            lambda: last.apply({"params": params["super_res_last"]}, inp, t_b),
                            lambda: first.apply({"params": params["super_res_first"]}, inp, t_b))
      return samplers.sample(model_fn, sched, x, sampler="unclip", steps=steps, rng=rng,
                             progress=self._tick if progress else None)

    key = ("super_res", steps, progress)
    call = self._jit(key, fn, 2)
    params = {k: self.params[k] for k in ("super_res_first", "super_res_last")}
    small, x_T = self._pad((np.asarray(small, np.float32), x_T), n)
    if progress:
      self._progress(steps, f"super-resolution {steps} steps, {n} images")
    try:
      with self._ctx():
        out = call(params, small, x_T, rng)
      return parallel.to_host(out)[:n]
    finally:
      self._close_bar()

  def decode_from_image_embeddings(self, image_embed, cond, uncond, noise, rngs, *,
                                   decoder_steps=25, sr_steps=7, decoder_guidance_scale=8.0,
                                   progress=False):
    """Stages 3-4 from CLIP image embeddings (B, E): float images (B, H, W, C) in about
    [-1, 1]. noise: {'decoder', 'super_res'} x_T; rngs: {'decoder', 'super_res'} step rngs.
    (Variations, interpolations and text diffs enter here with embeddings of their own.)"""
    small = self.decode(image_embed, cond, uncond, noise["decoder"], rngs["decoder"],
                        decoder_steps, decoder_guidance_scale, progress)
    return self.super_resolve(small, noise["super_res"], rngs["super_res"], sr_steps, progress)

  def generate(self, prompts, num_images=1, seed=0, *, prior_steps=25, decoder_steps=25,
               sr_steps=7, prior_guidance_scale=4.0, decoder_guidance_scale=8.0, latents=None,
               progress=False, return_float=False):
    """uint8 images (P, num_images, H, W, 3), or the float results (about [-1, 1])."""
    prompts = list(prompts)
    steps = {"prior": prior_steps, "decoder": decoder_steps, "super_res": sr_steps}
    self.check(prompts, num_images, steps,
               {"prior": prior_guidance_scale, "decoder": decoder_guidance_scale})
    n = len(prompts) * num_images
    noise = self.initial_noise(seed, n, latents)
    rngs = {s: k[1] for s, k in stage_keys(seed).items()}
    cond, uncond = self.condition(prompts, num_images)
    image_embed = self.sample_prior(cond, uncond, noise["prior"], rngs["prior"], prior_steps,
                                    float(prior_guidance_scale), progress)
    x = self.decode_from_image_embeddings(image_embed, cond, uncond, noise, rngs,
                                          decoder_steps=decoder_steps, sr_steps=sr_steps,
                                          decoder_guidance_scale=float(decoder_guidance_scale),
                                          progress=progress)
    x = x.reshape((len(prompts), num_images) + x.shape[1:])
    return x if return_float else images_lib.to_uint8(x)


# --- command line (sample.py --method unclip) -------------------------------------------

def _parser():
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="sample.py --method unclip",
                              description="Text -> images with unCLIP (an imported Karlo).")
  p.add_argument("--checkpoint", required=True, help="checkpoint from `convert karlo`")
  p.add_argument("--prompt", action="append", default=[], help="repeatable")
  p.add_argument("--num_images", type=int, default=4, help="samples per prompt")
  p.add_argument("--seed", type=int, default=0)
  for flag, what in (("prior_steps", "prior"), ("decoder_steps", "decoder"),
                     ("sr_steps", "super-resolution")):
    p.add_argument(f"--{flag}", type=int, default=None,
                   help=f"{what} steps (default: config.sampling.{flag})")
  p.add_argument("--prior_guidance_scale", type=float, default=None)
  p.add_argument("--decoder_guidance_scale", type=float, default=None)
  p.add_argument("--init_noise", default=None,
                 help=".npz with any of prior (B, E), decoder (B, h, w, 3), super_res "
                      "(B, H, W, 3) float32 x_T (B = prompts x num_images)")
  p.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                 help="sample sharded over a device mesh, e.g. -1,1,1; default: one device")
  p.add_argument("--coordinator_address", default=None)
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  p.add_argument("--out", default="samples.png", help="grid PNG; images go to OUT_STEM/")
  return p


def unclip_main(argv=None):
  from dalle_jax import cli  # pylint: disable=g-import-not-at-top
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    if not args.prompt:
      raise SamplingError("no --prompt given")
    latents = None
    if args.init_noise:
      if not os.path.isfile(args.init_noise):
        raise SamplingError(f"--init_noise {args.init_noise}: file not found")
      with np.load(args.init_noise) as z:
        latents = {k: z[k] for k in z.files}
    if not os.path.isfile(os.path.join(os.path.expanduser(args.checkpoint), "config.json")):
      raise SamplingError(f"--checkpoint {args.checkpoint}: no config.json there")
    cli.enable_compilation_cache()
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    pipe = UnclipPipeline.load(args.checkpoint, mesh=generate.mesh_from_flag(args.mesh))
    s = dict(pipe.config.get("sampling") or {})
    pick = lambda flag: getattr(args, flag) if getattr(args, flag) is not None else s.get(flag)
    settings = {k: pick(k) for k in ("prior_steps", "decoder_steps", "sr_steps",
                                     "prior_guidance_scale", "decoder_guidance_scale")}
    images = pipe.generate(args.prompt, args.num_images, args.seed, latents=latents,
                           progress=True, **settings)
  except (SamplingError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}")
  if jax.process_index() != 0:
    return os.path.abspath(args.out)
  init_noise = os.path.abspath(args.init_noise) if args.init_noise else None
  meta = {"method": "unclip", "model": os.path.abspath(args.checkpoint), "seed": args.seed,
          "num_images": args.num_images,
          "sampling": dict(settings, sampler="unclip", mesh=args.mesh,
                           init_noise=init_noise),
          "schedulers": {k: v.to_dict() for k, v in pipe.scheds.items()}}
  return generate.write_samples(args.out, args.prompt, images, meta)
