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
Trained stages (`from_stages`: sample.py --method unclip --prior P --decoder D
[--super_res S]) run the same way; an SR stage trained here (configs/unclip.py:shapes_sr32)
is one U-Net conditioned as the diffusion task trains it (bicubic upsampling, plus its
noise augmentation at config.cascade.noise_level if it has one) and samples with its own
config.sampling.sampler (DDIM wherever the other stages do); without S the decoder's
images are the output.
Each stage is one compiled loop of dalle_jax.diffusion.samplers' "unclip" sampler (the
UnCLIPScheduler), jitted with the rows split over the mesh's batch axes.

Randomness: for seed s, stage k in (prior, decoder, super_res) draws its x_T from
fold_in(PRNGKey(s), k) and its step noise from fold_in(PRNGKey(s), 3 + k) (the sampler
folds in the step index): see `stage_keys`; a trained SR stage splits its step key into
(augmentation noise, step noise). `latents=` fixes any stage's x_T.

`decode_from_image_embeddings` (stages 3-4) is the entry point the image modes reuse with
image embeddings of their own (raw CLIP image embeddings from `attach_image_encoder`'s CLIP:
Karlo's text -> image checkpoint has no image tower, so `--clip` names one, e.g. the HF
ViT-L/14; Karlo's image-variation checkpoint brings its own, and no prior):
  variations(image, N)         the image's embedding decoded N times (empty caption)
  interpolate(a, b, frames)    slerp(z_a, z_b, t), t = 0..1, x_T of every stage fixed, DDIM:
                               frame 0 / the last are a's / b's DDIM variations
  text_diff(image, from, to)   slerp(z_i, z_d, t), t = 0..0.5, z_d = z_t(to) - z_t(from)
                               scaled to |z_i| (DALL·E 2 section 3.3), x_T fixed, DDIM
  edit(image, mask, prompt)    the prompt's prior sample decoded with the kept region
                               (black mask) imposed at every step of both stages
                               (samplers.sample's known_x0 / known_mask): it comes back exactly

Shapes: P prompts, N images per prompt, B = P * N rows, E CLIP embedding width,
S caption tokens, C caption state width, h/w the decoder's size, H/W the super-resolution size.
"""
import contextlib
import dataclasses
import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dalle_jax import parallel
from dalle_jax.data import images as images_lib
from dalle_jax.data.tokenizers import get_tokenizer
from dalle_jax.diffusion import cascade
from dalle_jax.diffusion import guidance as guidance_lib
from dalle_jax.diffusion import interpolation
from dalle_jax.diffusion import samplers
from dalle_jax.diffusion import schedule as schedule_lib
from dalle_jax.models import clip as clip_lib
from dalle_jax.models import prior as prior_lib
from dalle_jax.models import unclip as unclip_lib
from dalle_jax.models import unet as unet_lib
from dalle_jax.tasks import diffusion as diffusion_task
from dalle_jax.sampling import clip_encoder
from dalle_jax.sampling import diffusion as diffusion_sampling
from dalle_jax.sampling import generate
from dalle_jax.sampling import rerank

log = logging.getLogger(__name__)

FAMILY = "unclip"
STAGES = ("prior", "decoder", "super_res")
SAMPLERS = ("unclip", "ddim")  # every stage's: Karlo's ancestral UnCLIPScheduler, or DDIM
SamplingError = diffusion_sampling.SamplingError


def _tuples(tree):
  """JSON lists -> tuples (hashable Linen attributes)."""
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return tuple(_tuples(v) for v in tree)
  return tree


_STAGE_PRESETS = {"prior": "shapes", "decoder": "shapes_decoder", "super_res": "shapes_sr32"}


def _check_stage(flag, path, stage, config):
  """A trained stage's config: the family (and kind) from_stages expects for `stage`."""
  family, m = config.get("family"), config.get("model") or {}
  if stage == "prior":
    ok, want = family == "prior", "family 'prior'"
  elif stage == "decoder":
    ok, want = (family == "diffusion" and m.get("conditioning") == "clip_image",
                "family 'diffusion', conditioning clip_image")
  else:  # unCLIP's upsamplers see the decoder's image only
    ok = (family == "diffusion" and int(m.get("low_res_size", 0) or 0) > 0
          and m.get("conditioning") == "none")
    want = "family 'diffusion', model.low_res_size > 0, conditioning none"
  if not ok:
    what = f"family {family!r}" + (f", conditioning {m.get('conditioning')!r}"
                                   if family == "diffusion" else "")
    if stage == "super_res" and family == "diffusion":
      what += f", model.low_res_size {m.get('low_res_size', 0)}"
    raise SamplingError(f"{flag} {path}: {what}; expected configs/unclip.py:"
                        f"{_STAGE_PRESETS[stage]}'s ({want})")


def _plain(cfg):
  return _tuples(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))


def stage_keys(seed):
  """{stage: (x_T key, step-noise rng)} for a seed (see the module docstring)."""
  root = jax.random.PRNGKey(seed)
  return {s: (jax.random.fold_in(root, k), jax.random.fold_in(root, 3 + k))
          for k, s in enumerate(STAGES)}


def _known_kwargs(known):
  return {} if known is None else {"known_x0": known["x0"], "known_mask": known["mask"]}


def known_at_size(known, size):
  """An inpainting target at another resolution: the image resized (antialiased), the mask
  kept only where every covered pixel is kept (nearest would leak the edited region)."""
  x0, mask = np.asarray(known["x0"], np.float32), np.asarray(known["mask"], np.float32)
  if x0.shape[1] == size:
    return {"x0": x0, "mask": mask}
  x0 = np.asarray(images_lib.resize_and_crop_float(x0, size, size))
  b, h, w, _ = mask.shape
  if h % size or w % size:
    raise SamplingError(f"the edit's size {h}x{w} is not a multiple of the decoder's {size}")
  m = mask.reshape(b, size, h // size, size, w // size, 1).min(axis=(2, 4))
  return {"x0": x0, "mask": m}


def prior_sampler(prior, sched, steps, guidance_scale=4.0, sampler="unclip", progress=None):
  """fn(variables, cond, uncond, x_T (B, E), rng) -> CLIP image embeddings (B, E), jittable.

  variables: the prior's {'params', 'clip_stats'}; cond / uncond: {'embed' (B, E), 'states'
  (B, S, C), 'mask' (B, S)} of the captions and of the empty caption (guidance's
  unconditional half; unused when guidance_scale is 1). The sampler runs in the prior's
  normalised space (x0-predictions processed as `sched` says: Karlo clips to +-5) and the
  result is denormalised with the variables' clip_stats. Shared by the pipeline and by
  whoever samples a trained prior (tests/test_prior.py's learning check)."""
  guided = guidance_scale != 1.0

  def fn(variables, cond, uncond, x, rng):
    def apply(x_b, t_b):
      c = (jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond, uncond) if guided
           else cond)
      return prior.apply(variables, x_b, t_b, c["embed"], c["states"], c["mask"])
    model_fn = (guidance_lib.classifier_free_guidance(apply, guidance_scale) if guided
                else apply)
    x0 = samplers.sample(model_fn, sched, x, sampler=sampler, steps=steps, rng=rng,
                         progress=progress)
    return prior_lib.denormalize(variables[prior_lib.STATS], x0)
  return fn


class UnclipPipeline:
  """CLIP text tower + prior + decoder + super-resolution (Karlo's two U-Nets or a stage
  trained here), optionally sharded."""

  def __init__(self, config, variables, mesh=None):
    if config.get("family") != FAMILY:
      raise SamplingError(f"config.family={config.get('family')!r}, expected {FAMILY!r} "
                          "(a checkpoint from `convert karlo`)")
    self.config = config
    self.mesh = mesh
    m = config.model
    # Karlo's image-variation layout has no prior but a CLIP image tower of its own
    self.prior = prior_lib.PriorTransformer(**_plain(m.prior)) if "prior" in m else None
    self.embed_dim = self.prior.embed_dim if self.prior is not None else int(m.embed_dim)
    dec = _plain(m.decoder)
    self.decoder = unclip_lib.UnclipDecoder(text_proj=unclip_lib.TextProjection(**dec["text_proj"]),
                                            unet=unet_lib.UNet(**dec["unet"]))
    # trained stages (from_stages) may end at the decoder (its size is then the output's) or
    # go on to a super-resolution stage trained here (a diffusion task: model.super_res_stage)
    has_sr = m.get("super_res_first") is not None
    self.sr_first = unet_lib.UNet(**_plain(m.super_res_first)) if has_sr else None
    self.sr_last = unet_lib.UNet(**_plain(m.super_res_last)) if has_sr else None
    self.sr_task = None
    if m.get("super_res_stage") is not None:
      self.sr_task = diffusion_task.DiffusionTask(
          ml_collections.ConfigDict(m.super_res_stage.to_dict()))
    self.text_encoder = clip_lib.TextTower(**_plain(m.text_encoder))
    self.decoder_size = int(m.decoder_size)
    self.sr_size = (int(m.super_res_size) if has_sr else
                    self.sr_task.image_size if self.sr_task is not None else self.decoder_size)
    self.channels = int(dec["unet"]["in_channels"])
    self.scheds = {s: schedule_lib.SchedulerConfig.from_dict(dict(config.schedulers[s]))
                   for s in STAGES if s in config.schedulers}
    self.text_len = int(self.prior.text_len if self.prior is not None else config.text.max_len)
    self.params = variables["params"]
    self.clip_stats = variables.get(prior_lib.STATS)
    if mesh is not None and self.clip_stats is not None:
      self.clip_stats = jax.device_put(self.clip_stats, parallel.replicated(mesh))
    self._tokenizer = None
    self.image_encoder = None  # attach_image_encoder: image inputs
    self.vision = None  # the checkpoint's own CLIP image tower (image-variation layout)
    if "image_encoder" in m:
      self.vision = clip_lib.VisionTower(**_plain(m.image_encoder))
      self.image_processor = _plain(m.image_processor)
    self._compiled = {}
    self._bar = None

  # --- loading ------------------------------------------------------------------------
  def abstract_variables(self):
    """The boxed abstract {'params': {prior, decoder, super_res_first, super_res_last |
    super_res, text_encoder}} (logical names: shardings for loading onto a mesh)."""
    key = jax.random.PRNGKey(0)
    e, s = self.embed_dim, self.text_len
    c = int(self.text_encoder.width)
    z = lambda *shape: jnp.zeros(shape, jnp.float32)
    d = self.decoder_size

    def init():
      dec_v = self.decoder.init(key, z(1, d, d, self.channels), jnp.zeros((1,), jnp.int32),
                                z(1, e), z(1, e), z(1, s, c), jnp.ones((1, s), bool))
      out = {"decoder": dec_v["params"]}
      if self.prior is not None:
        out["prior"] = self.prior.init(key, *prior_lib.example_inputs(self.prior))["params"]
      if self.vision is not None:
        size = self.vision.image_size
        out["image_encoder"] = self.vision.init(key, z(1, size, size, 3))["params"]
      for name, unet in (("super_res_first", self.sr_first), ("super_res_last", self.sr_last)):
        if unet is None:
          continue
        x, t, kw = unet_lib.example_inputs(unet)
        out[name] = unet.init(key, x, t, **kw)["params"]
      if self.sr_task is not None:
        out["super_res"] = self.sr_task.init(key, self.sr_task.dummy_batch(1))["params"]
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

  @classmethod
  def from_stages(cls, prior, decoder, super_res=None, mesh=None):
    """The pipeline of trained stages: a `prior` workdir (configs/unclip.py:shapes), a
    `clip_image` decoder workdir (configs/unclip.py:shapes_decoder) and optionally an
    unconditional super-resolution workdir taking the decoder's size
    (configs/unclip.py:shapes_sr32); without one the decoder's images are the output.
    The decoder's frozen CLIP (config.text_encoder.clip) gives the text tower, the
    tokenizer and the image tower for image inputs; the prior must read that CLIP's
    features. Everything is checked before any weights are read."""
    from dalle_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
    wanted = [("--prior", prior, "prior"), ("--decoder", decoder, "decoder")]
    if super_res is not None:
      wanted.append(("--super_res", super_res, "super_res"))
    configs = {}
    for flag, path, stage in wanted:
      path = os.path.abspath(os.path.expanduser(path))
      if not os.path.isfile(os.path.join(path, "config.json")):
        raise SamplingError(f"{flag} {path}: no config.json there (a training workdir)")
      configs[stage] = (path, checkpoint.read_config(path))
      _check_stage(flag, path, stage, configs[stage][1])
    if super_res is not None:
      (_, dc), (s_path, sc) = configs["decoder"], configs["super_res"]
      d_size, s_in = int(dc.data.image_size), int(sc.model.low_res_size)
      if s_in != d_size:
        raise SamplingError(f"--super_res {s_path} takes {s_in} px input but the decoder "
                            f"makes {d_size} px images (model.low_res_size)")
      d_ch, s_ch = (int(c.model.unet.get("in_channels", 3)) for c in (dc, sc))
      if d_ch != s_ch:
        raise SamplingError(f"--super_res {s_path} takes {s_ch}-channel images but the "
                            f"decoder makes {d_ch}-channel ones")
    stages = {k: (path,) + tuple(checkpoint.load_model(path)) for k, (path, _) in configs.items()}
    (p_path, p_cfg, p_vars), (d_path, d_cfg, d_vars) = stages["prior"], stages["decoder"]
    clip_path = str(d_cfg.text_encoder.clip)
    c_cfg, c_vars = clip_encoder.load_clip(clip_path, flag=f"--decoder {d_path}: its CLIP")
    tower = clip_lib.build_model(c_cfg, dtype="float32").text
    te_kw = {f.name: getattr(tower, f.name) for f in dataclasses.fields(tower)
             if f.name not in ("parent", "name", "dtype", "param_dtype")}
    pm = p_cfg.model
    for key, want, have in (("embed_dim", int(c_cfg.model.embed_dim), int(pm.embed_dim)),
                            ("text_len", tower.max_len, int(pm.text_len)),
                            ("text_dim", tower.width, int(pm.text_dim or pm.embed_dim))):
      if want != have:
        raise SamplingError(f"--prior {p_path}: model.{key}={have} but the decoder's CLIP "
                            f"{clip_path} gives {want} (train the prior on that CLIP's embeddings)")
    sched = lambda cfg: diffusion_task.scheduler_config(cfg.diffusion).to_dict()
    ps, ds = p_cfg.get("sampling") or {}, d_cfg.sampling
    config = ml_collections.ConfigDict(dict(
        family=FAMILY, dtype="float32", param_dtype="float32",
        logical_axis_rules=d_cfg.logical_axis_rules,
        allow_replication_below=d_cfg.get("allow_replication_below", 1 << 20),
        model=dict(prior=pm.to_dict(), decoder=unclip_lib.decoder_kwargs(d_cfg),
                   super_res_first=None, super_res_last=None, super_res_stage=None,
                   text_encoder=te_kw, decoder_size=int(d_cfg.data.image_size),
                   super_res_size=0),
        schedulers=dict(prior=sched(p_cfg), decoder=sched(d_cfg)),
        text=c_cfg.text.to_dict(),
        sampling=dict(prior_steps=int(ps.get("steps", 25)),
                      prior_guidance_scale=float(ps.get("guidance_scale", 4.0)),
                      decoder_steps=int(ds.steps), decoder_guidance_scale=float(ds.guidance_scale),
                      sr_steps=None),
        stages=dict(prior=p_path, decoder=d_path, clip=clip_path)))
    params = {"prior": p_vars["params"], "decoder": d_vars["params"],
              "text_encoder": c_vars["params"]["text"]}
    if super_res is not None:
      s_path, s_cfg, s_vars = stages["super_res"]
      config.model.super_res_stage = s_cfg.to_dict()
      config.model.super_res_size = int(s_cfg.data.image_size)
      config.schedulers.super_res = sched(s_cfg)
      config.sampling.sr_steps = int(s_cfg.sampling.steps)
      config.stages.super_res = s_path
      params["super_res"] = s_vars["params"]
    if mesh is not None:  # each stage's parameters split over the mesh by their logical names
      shell = cls(config, {"params": None, prior_lib.STATS: None})
      abstract = shell.abstract_variables()
      with parallel.mesh_context(mesh, config):
        shardings = parallel.logical_shardings(abstract, mesh, parallel.rules_from_config(config))
      params = jax.device_put(params, parallel.unbox(shardings)["params"])
    pipe = cls(config, {"params": params, prior_lib.STATS: p_vars[prior_lib.STATS]}, mesh=mesh)
    pipe._tokenizer = get_tokenizer(c_cfg.text, data_cfg=c_cfg.get("data"), base_dir=clip_path)
    pipe.clip_path = clip_path
    return pipe

  @property
  def has_super_res(self):
    return self.sr_first is not None or self.sr_task is not None

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
  def need_prior(self, what):
    """A one-line error for modes that sample the prior when this checkpoint has none."""
    if self.prior is None:
      raise SamplingError(f"{what} needs a prior, and this checkpoint is Karlo's image-variation "
                          "layout (no prior/): use --variations, --interpolate or --text_diff")

  def check(self, prompts, num_images, steps, guidance):
    self.need_prior("text -> image")
    if not prompts:
      raise SamplingError("no --prompt given")
    for i, p in enumerate(prompts):
      if not isinstance(p, str) or not p.strip():
        raise SamplingError(f"--prompt {i} is empty")
    if not isinstance(num_images, int) or num_images < 1:
      raise SamplingError(f"--num_images {num_images}: must be >= 1")
    self.check_steps(steps, guidance)

  def check_steps(self, steps, guidance):
    """Per-stage steps {prior, decoder, super_res} and guidance {prior, decoder}, checked."""
    for stage, flag in zip(STAGES, ("--prior_steps", "--decoder_steps", "--sr_steps")):
      if stage not in self.scheds:  # no prior (the image-variation layout)
        continue
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
    e = self.embed_dim
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
  def sample_prior(self, cond, uncond, x_T, rng, steps=25, guidance_scale=4.0, progress=False,
                   sampler="unclip"):
    """CLIP image embeddings (B, E) (denormalised) for the captions' rows."""
    sched, n = self.scheds["prior"], len(x_T)
    fn = prior_sampler(self.prior, sched, steps, guidance_scale, sampler=sampler,
                       progress=self._tick if progress else None)
    key = ("prior", steps, float(guidance_scale), progress, sampler)
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
             progress=False, sampler="unclip", known=None):
    """The decoder stage: (B, h, w, C) in [-1, 1] from image embeddings (B, E).
    sampler: "unclip" (Karlo's ancestral) or "ddim" (eta 0: deterministic in x_T).
    known: None or {'x0' (B, h, w, C), 'mask' (B, h, w, 1) 1 = keep}: inpainting."""
    sched, n = self.scheds["decoder"], len(x_T)
    guided = guidance_scale != 1.0
    decoder = self.decoder

    def fn(params, image_embed, cond, uncond, known, x, rng):
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
      out = samplers.sample(model_fn, sched, x, sampler=sampler, steps=steps, rng=rng,
                            progress=self._tick if progress else None,
                            **_known_kwargs(known))
      return jnp.clip(out, -1.0, 1.0)

    key = ("decoder", steps, float(guidance_scale), progress, sampler, known is None)
    call = self._jit(key, fn, 5)
    image_embed, cond, uncond, known, x_T = self._pad(
        (np.asarray(image_embed, np.float32), cond, uncond, known, x_T), n)
    if progress:
      self._progress(steps, f"decoder {steps} steps, {n} images")
    try:
      with self._ctx():
        out = call(self.params["decoder"], image_embed, cond, uncond, known, x_T, rng)
      return parallel.to_host(out)[:n]
    finally:
      self._close_bar()

  def sr_sampler(self, sampler=None, decoder_sampler="unclip"):
    """The super-resolution stage's sampler: `sampler` if given, else DDIM after a DDIM
    decoder (the image modes that hold x_T fixed), else the stage's own: Karlo's "unclip",
    or a trained stage's config.sampling.sampler."""
    if sampler is not None:
      return sampler
    if decoder_sampler == "ddim":
      return "ddim"
    return str(self.sr_task.config.sampling.sampler) if self.sr_task is not None else "unclip"

  def super_resolve(self, small, x_T, rng, steps=7, progress=False, sampler=None, known=None):
    """The super-resolution stage: (B, H, W, C) from the decoder's (B, h, w, C) in [-1, 1]
    (known as for `decode`, at this stage's size; sampler None: `sr_sampler`'s default)."""
    sampler = self.sr_sampler(sampler)
    sched, n = self.scheds["super_res"], len(x_T)
    first, last, size = self.sr_first, self.sr_last, self.sr_size
    tick = self._tick if progress else None

    def fn(params, small, known, x, rng):
      up = cascade.upsample_bicubic(small, size)

      def model_fn(x_b, t_b):
        inp = jnp.concatenate([x_b, up], axis=-1)
        # UnCLIPPipeline's last step (always t = 0 with this sampler) uses super_res_last.
        return jax.lax.cond(t_b[0] == 0,
                            lambda: last.apply({"params": params["super_res_last"]}, inp, t_b),
                            lambda: first.apply({"params": params["super_res_first"]}, inp, t_b))
      return samplers.sample(model_fn, sched, x, sampler=sampler, steps=steps, rng=rng,
                             progress=tick, **_known_kwargs(known))

    if self.sr_task is not None:  # a stage trained here: its own conditioning and sampler
      task = self.sr_task
      level = int(task.config.cascade.noise_level)

      def fn(params, small, known, x, rng):  # pylint: disable=function-redefined
        k_aug, k_steps = jax.random.split(rng)
        low, lvl = task.sr.sample(small, size, level,
                                  jax.random.normal(k_aug, x.shape, jnp.float32))
        return task.sample(params["super_res"], {}, x, k_steps, sampler=sampler, steps=steps,
                           sched=sched, progress=tick, low_res=low, level=lvl, known=known)

    key = ("super_res", steps, progress, sampler, known is None)
    call = self._jit(key, fn, 3)
    names = ("super_res",) if self.sr_task is not None else ("super_res_first", "super_res_last")
    params = {k: self.params[k] for k in names}
    small, known, x_T = self._pad((np.asarray(small, np.float32), known, x_T), n)
    if progress:
      self._progress(steps, f"super-resolution {steps} steps, {n} images")
    try:
      with self._ctx():
        out = call(params, small, known, x_T, rng)
      return parallel.to_host(out)[:n]
    finally:
      self._close_bar()

  def decode_from_image_embeddings(self, image_embed, cond, uncond, noise, rngs, *,
                                   decoder_steps=25, sr_steps=7, decoder_guidance_scale=8.0,
                                   progress=False, sampler="unclip", sr_sampler=None,
                                   known=None):
    """Stages 3-4 from CLIP image embeddings (B, E): float images (B, H, W, C) in about
    [-1, 1]. noise: {'decoder', 'super_res'} x_T; rngs: {'decoder', 'super_res'} step rngs.
    sampler: the decoder's ("unclip" | "ddim"), sr_sampler the SR stage's (None: see
    `sr_sampler`); known: None or {'x0' (B, H, W, C) at the super-resolution size, 'mask'
    (B, H, W, 1) 1 = keep}: inpainting at both stages.
    (Variations, interpolations, text diffs and edits enter here with embeddings of their own.)"""
    small = self.decode(image_embed, cond, uncond, noise["decoder"], rngs["decoder"],
                        decoder_steps, decoder_guidance_scale, progress, sampler,
                        None if known is None else known_at_size(known, self.decoder_size))
    if not self.has_super_res:  # the decoder's images are the output
      return small
    return self.super_resolve(small, noise["super_res"], rngs["super_res"], sr_steps, progress,
                              self.sr_sampler(sr_sampler, sampler), known)

  def generate(self, prompts, num_images=1, seed=0, *, prior_steps=25, decoder_steps=25,
               sr_steps=7, prior_guidance_scale=4.0, decoder_guidance_scale=8.0, latents=None,
               progress=False, return_float=False, prior_sampler="unclip",
               decoder_sampler="unclip", sr_sampler=None):
    """uint8 images (P, num_images, H, W, 3), or the float results (about [-1, 1]).
    Each stage samples with its own sampler (SAMPLERS; sr_sampler None: `sr_sampler`)."""
    prompts = list(prompts)
    steps = {"prior": prior_steps, "decoder": decoder_steps, "super_res": sr_steps}
    self.check(prompts, num_images, steps,
               {"prior": prior_guidance_scale, "decoder": decoder_guidance_scale})
    check_samplers(prior_sampler=prior_sampler, decoder_sampler=decoder_sampler,
                   sr_sampler=sr_sampler)
    n = len(prompts) * num_images
    noise = self.initial_noise(seed, n, latents)
    rngs = {s: k[1] for s, k in stage_keys(seed).items()}
    cond, uncond = self.condition(prompts, num_images)
    image_embed = self.sample_prior(cond, uncond, noise["prior"], rngs["prior"], prior_steps,
                                    float(prior_guidance_scale), progress, prior_sampler)
    x = self.decode_from_image_embeddings(image_embed, cond, uncond, noise, rngs,
                                          decoder_steps=decoder_steps, sr_steps=sr_steps,
                                          decoder_guidance_scale=float(decoder_guidance_scale),
                                          progress=progress, sampler=decoder_sampler,
                                          sr_sampler=sr_sampler)
    x = x.reshape((len(prompts), num_images) + x.shape[1:])
    return x if return_float else images_lib.to_uint8(x)


  # --- image inputs: variations, interpolations, text diffs, edits ----------------------
  def attach_image_encoder(self, clip, flag="--clip"):
    """The CLIP whose image tower embeds input images (Karlo's checkpoint has none: its
    ViT-L/14, e.g. an imported HF CLIP). Its embedding width must be the prior's."""
    enc = rerank.get_encoder(clip, flag=flag)
    e = int(enc.config.model.embed_dim)
    if e != self.embed_dim:
      raise SamplingError(f"{flag} {clip}: its CLIP embeddings are {e}-d but this unCLIP's prior "
                          f"and decoder use {self.embed_dim}-d ones")
    self.image_encoder = enc
    return enc

  def embed_images(self, images):
    """Raw (unnormalised) CLIP image embeddings (N, E) of uint8 / [-1, 1] images, any size:
    from --clip's tower, else from the checkpoint's own (preprocessed as its processor)."""
    if self.image_encoder is None and self.vision is not None:
      return self._embed_own(images)
    if self.image_encoder is None:
      raise SamplingError("image inputs need a CLIP image tower: pass --clip (the CLIP the "
                          "unCLIP was trained with, e.g. Karlo's ViT-L/14)")
    return self.image_encoder.encode_images(images, normalize=False)

  def _embed_own(self, images):
    """The checkpoint's CLIP image tower on images preprocessed as its CLIPImageProcessor
    does (karlo_checkpoint: PIL bicubic resize of the shorter side, centre crop)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise SamplingError(f"expected images of shape (N, H, W, 3), got {images.shape}")
    if images.dtype != np.uint8:
      images = images_lib.to_uint8(images)
    p = self.image_processor
    crops = np.stack([images_lib.clip_processor_crop(im, int(p["shortest_edge"]),
                                                     int(p["crop_size"])) for im in images])
    if "vision" not in self._compiled:
      self._compiled["vision"] = jax.jit(
          lambda params, x: self.vision.apply({"params": params}, x).astype(jnp.float32))
    out = self._compiled["vision"](self.params["image_encoder"], images_lib.to_float(crops))
    return np.asarray(out, np.float32)

  def empty_condition(self, n):
    """The empty caption's rows (n of them): the decoder's caption input when it decodes an
    image embedding alone (as UnCLIPImageVariationPipeline does), both halves of guidance."""
    ids, mask = self.tokenize([""])
    emb, states = self.encode_text(ids, mask)
    return {"embed": np.repeat(emb, n, 0), "states": np.repeat(states, n, 0),
            "mask": np.repeat(mask, n, 0)}

  def _from_embeddings(self, image_embed, noise, seed, settings, cond=None, known=None):
    rngs = {s: k[1] for s, k in stage_keys(seed).items()}
    n = len(image_embed)
    uncond = self.empty_condition(n)
    x = self.decode_from_image_embeddings(
        image_embed, uncond if cond is None else cond, uncond, noise, rngs,
        decoder_steps=settings["decoder_steps"], sr_steps=settings["sr_steps"],
        decoder_guidance_scale=float(settings["decoder_guidance_scale"]),
        progress=settings.get("progress", False), sampler=settings["decoder_sampler"],
        sr_sampler=settings["sr_sampler"], known=known)
    return x

  def _settings(self, kw):
    s = dict(self.config.get("sampling") or {})
    out = {k: kw.get(k) if kw.get(k) is not None else s.get(k, d)
           for k, d in (("decoder_steps", 25), ("sr_steps", 7), ("decoder_guidance_scale", 8.0),
                        ("prior_steps", 25), ("prior_guidance_scale", 4.0))}
    # `sampler` (the mode's: DDIM where x_T is held fixed) is the decoder's unless
    # decoder_sampler says otherwise; the SR stage follows (`sr_sampler`)
    out["prior_sampler"] = kw.get("prior_sampler") or "unclip"
    out["decoder_sampler"] = kw.get("decoder_sampler") or kw.get("sampler") or "unclip"
    out["sr_sampler"] = kw.get("sr_sampler")
    out["progress"] = kw.get("progress", False)
    check_samplers(**{k: out[k] for k in ("prior_sampler", "decoder_sampler", "sr_sampler")})
    self.check_steps({"prior": out["prior_steps"], "decoder": out["decoder_steps"],
                      "super_res": out["sr_steps"]},
                     {"prior": out["prior_guidance_scale"],
                      "decoder": out["decoder_guidance_scale"]})
    return out

  def _noise(self, seed, n, latents, shared):
    """Stage x_T for n rows; shared: one draw (the seed's first row) for every row."""
    if not shared:
      return self.initial_noise(seed, n, latents)
    one = self.initial_noise(seed, 1, latents)
    return {k: np.repeat(v, n, 0) for k, v in one.items()}

  def variations(self, image, num_images=4, seed=0, latents=None, **kw):
    """Decodes an image's CLIP embedding num_images times: float (num_images, H, W, 3)."""
    settings = self._settings(kw)
    emb = self.embed_images(_batch_of_one(image))
    return self._from_embeddings(np.repeat(emb, num_images, 0),
                                 self.initial_noise(seed, num_images, latents), seed, settings)

  def interpolate(self, image_a, image_b, frames=5, seed=0, latents=None, **kw):
    """Frames decoded from slerp(embedding A, embedding B, t), t = 0 .. 1, with every stage's
    x_T held fixed and DDIM (deterministic): float (frames, H, W, 3). Frame 0 is A's
    variation, the last B's (from the same x_T)."""
    _check_frames(frames)
    kw = dict(kw, sampler=kw.get("sampler") or "ddim")
    settings = self._settings(kw)
    ea, eb = self.embed_images(np.concatenate([_batch_of_one(image_a), _batch_of_one(image_b)]))
    t = np.linspace(0.0, 1.0, frames, dtype=np.float32)[:, None]
    emb = np.asarray(interpolation.slerp(ea[None], eb[None], t))
    return self._from_embeddings(emb, self._noise(seed, frames, latents, True), seed, settings)

  def text_diff(self, image, from_caption, to_caption, frames=5, seed=0, max_angle=0.5,
                latents=None, **kw):
    """DALL·E 2's text diffs: the image's embedding z_i rotated towards the text difference
    z_d = z_t(to) - z_t(from) (scaled to |z_i|): frames at slerp(z_i, z_d, a) for a = 0 ..
    max_angle (in (0, 1]: --text_diff_strength), x_T held fixed, DDIM. Frame 0 is the image's
    variation. (frames, H, W, 3)."""
    _check_frames(frames)
    _check_strength(max_angle)
    for flag, c in (("from", from_caption), ("to", to_caption)):
      if not isinstance(c, str) or not c.strip():
        raise SamplingError(f"--text_diff: the {flag} caption is empty")
    kw = dict(kw, sampler=kw.get("sampler") or "ddim")
    settings = self._settings(kw)
    z_i = self.embed_images(_batch_of_one(image))[0]
    ids, mask = self.tokenize([from_caption, to_caption])
    z_t, _ = self.encode_text(ids, mask)
    z_d = z_t[1] - z_t[0]
    if not np.linalg.norm(z_d) > 0:
      raise SamplingError("--text_diff: both captions have the same CLIP embedding")
    z_d = z_d * (np.linalg.norm(z_i) / np.linalg.norm(z_d))
    a = np.linspace(0.0, max_angle, frames, dtype=np.float32)[:, None]
    emb = np.asarray(interpolation.slerp(z_i[None], z_d[None], a))
    return self._from_embeddings(emb, self._noise(seed, frames, latents, True), seed, settings)

  def edit(self, image, mask, prompt, num_images=4, seed=0, latents=None, **kw):
    """DALL·E 2's edits: the prompt's prior embedding decoded with the image's kept region
    (mask 0 / black) imposed at every step of both stages, so it comes back exactly; the
    masked region (nonzero / white) is generated. image uint8 (H, W, 3), mask (H, W) or
    (H, W, C) of the same size. Float (num_images, H', W', 3) at the output size."""
    self.need_prior("--edit")
    settings = self._settings(kw)
    known = self.edit_target(image, mask)
    cond, uncond = self.condition([prompt], num_images)
    noise = self.initial_noise(seed, num_images, latents)
    rngs = {s: k[1] for s, k in stage_keys(seed).items()}
    emb = self.sample_prior(cond, uncond, noise["prior"], rngs["prior"], settings["prior_steps"],
                            float(settings["prior_guidance_scale"]), settings["progress"],
                            settings["prior_sampler"])
    known = {k: np.repeat(v, num_images, 0) for k, v in known.items()}
    return self._from_embeddings(emb, noise, seed, settings, cond=cond, known=known)

  def edit_target(self, image, mask):
    """{'x0' (1, H, W, 3) in [-1, 1], 'mask' (1, H, W, 1) 1 = keep} at the output size."""
    return diffusion_sampling.edit_target(image, mask, self.sr_size)


def check_samplers(**samplers):
  """{flag name: sampler or None (the default)}: a one-line error for any other value."""
  for flag, value in samplers.items():
    if value is not None and value not in SAMPLERS:
      raise SamplingError(f"--{flag} {value!r}: choose {'|'.join(SAMPLERS)}")


def _batch_of_one(image):
  image = np.asarray(image)
  return image[None] if image.ndim == 3 else image


def _check_strength(strength):
  if not isinstance(strength, (int, float, np.floating)) or not 0 < strength <= 1:
    raise SamplingError(f"--text_diff_strength {strength}: must be in (0, 1] (the fraction of "
                        "the way from the image's embedding to the text difference)")


def _strength(args):
  return 0.5 if args.text_diff_strength is None else float(args.text_diff_strength)


def _check_frames(frames):
  if not isinstance(frames, (int, np.integer)) or frames < 2:
    raise SamplingError(f"--frames {frames}: must be an integer >= 2")


read_image = diffusion_sampling.read_image


# --- command line (sample.py --method unclip) -------------------------------------------

def _parser():
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="sample.py --method unclip",
                              description="Text -> images with unCLIP (an imported Karlo), and "
                                          "its image modes: variations, interpolations, text "
                                          "diffs, edits.")
  p.add_argument("--checkpoint", default=None, help="checkpoint from `convert karlo`")
  p.add_argument("--prior", default=None,
                 help="trained stages instead of --checkpoint: a prior workdir "
                      "(configs/unclip.py:shapes), with --decoder")
  p.add_argument("--decoder", default=None,
                 help="a clip_image decoder workdir (configs/unclip.py:shapes_decoder); its CLIP "
                      "is the text encoder and the default --clip")
  p.add_argument("--super_res", default=None,
                 help="with --prior/--decoder: an unconditional super-resolution workdir taking "
                      "the decoder's size (configs/unclip.py:shapes_sr32); default: none, the "
                      "decoder's images are the output")
  p.add_argument("--prompt", action="append", default=[], help="repeatable (text -> image, --edit)")
  p.add_argument("--num_images", type=int, default=4, help="samples per prompt / variations")
  p.add_argument("--seed", type=int, default=0)
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--variations", metavar="IMAGE", default=None,
                    help="decode the image's CLIP image embedding --num_images times")
  mode.add_argument("--interpolate", nargs=2, metavar=("IMAGE_A", "IMAGE_B"), default=None,
                    help="--frames images along the slerp of the two images' embeddings")
  mode.add_argument("--text_diff", nargs=2, metavar=("FROM", "TO"), default=None,
                    help="move --image along the CLIP text difference FROM -> TO (--frames)")
  mode.add_argument("--edit", metavar="IMAGE", default=None,
                    help="inpaint IMAGE's --mask region (white = regenerate) from --prompt")
  p.add_argument("--image", default=None, help="--text_diff's image")
  p.add_argument("--mask", default=None, help="--edit's mask (same size as the image)")
  p.add_argument("--frames", type=int, default=5, help="--interpolate / --text_diff frames")
  p.add_argument("--text_diff_strength", type=float, default=None,
                 help="--text_diff's last frame: this fraction of the way (slerp) from the "
                      "image's embedding to the text difference, in (0, 1] (default 0.5)")
  p.add_argument("--clip", default=None,
                 help="CLIP with the image tower that embeds input images (the one the unCLIP "
                      "was trained with: workdir, imported checkpoint or HF dir)")
  p.add_argument("--rerank_with", default=None, help="CLIP to rerank text -> image / edits")
  p.add_argument("--rerank_top", type=int, default=0, help="keep the K best per prompt")
  for flag, what in (("prior_steps", "prior"), ("decoder_steps", "decoder"),
                     ("sr_steps", "super-resolution")):
    p.add_argument(f"--{flag}", type=int, default=None,
                   help=f"{what} steps (default: config.sampling.{flag})")
  p.add_argument("--prior_guidance_scale", type=float, default=None)
  p.add_argument("--decoder_guidance_scale", type=float, default=None)
  for flag, what in (("prior_sampler", "prior"), ("decoder_sampler", "decoder"),
                     ("sr_sampler", "super-resolution")):
    p.add_argument(f"--{flag}", default=None, choices=SAMPLERS,
                   help=f"the {what} stage's sampler (default: unclip; DDIM for the decoder and "
                        "super-resolution of --interpolate / --text_diff, which hold x_T fixed; "
                        "a trained super-resolution stage's own config.sampling.sampler)")
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


def _mode(args):
  for m in ("variations", "interpolate", "text_diff", "edit"):
    if getattr(args, m) is not None:
      return m
  return "text"


def _has_image_encoder(checkpoint):
  """True if the checkpoint's config.json names its own CLIP image tower (Karlo's
  image-variation layout): image modes then need no --clip."""
  path = os.path.join(os.path.expanduser(checkpoint), "config.json")
  try:
    with open(path) as f:
      return "image_encoder" in (json.load(f).get("model") or {})
  except (OSError, ValueError):
    return False


def _check_cli(args, mode):
  """Every flag checked before any weights are read; returns the input images."""
  stages = args.prior is not None or args.decoder is not None
  if stages == (args.checkpoint is not None):
    raise SamplingError("give --checkpoint (an imported Karlo) or --prior and --decoder "
                        "(trained stages), not both")
  if stages and (args.prior is None or args.decoder is None):
    raise SamplingError(f"--{'decoder' if args.decoder is None else 'prior'} is missing: trained "
                        "stages need --prior and --decoder")
  if args.super_res is not None and not stages:
    raise SamplingError("--super_res goes with --prior and --decoder (an imported Karlo brings "
                        "its own super-resolution stages)")
  if args.text_diff_strength is not None:
    if mode != "text_diff":
      raise SamplingError("--text_diff_strength goes with --text_diff")
    _check_strength(args.text_diff_strength)
  if mode in ("text", "edit") and not args.prompt:
    raise SamplingError("no --prompt given" + (" (the edit's text)" if mode == "edit" else ""))
  if mode not in ("text", "edit") and args.prompt:
    raise SamplingError(f"--prompt does not apply to --{mode}")
  if mode == "edit" and len(args.prompt) != 1:
    raise SamplingError(f"--edit takes one --prompt, got {len(args.prompt)}")
  if args.num_images < 1:
    raise SamplingError(f"--num_images {args.num_images}: must be >= 1")
  if mode in ("interpolate", "text_diff"):
    _check_frames(args.frames)
  if (args.image is not None) != (mode == "text_diff"):
    raise SamplingError("--image goes with --text_diff (the image to move)")
  if (args.mask is not None) != (mode == "edit"):
    raise SamplingError("--edit needs --mask, and --mask goes with --edit")
  if (mode in ("variations", "interpolate", "text_diff") and not args.clip and not stages
      and not _has_image_encoder(args.checkpoint)):
    raise SamplingError(f"--{mode} needs --clip (the CLIP image tower that embeds the image; "
                        "only Karlo's image-variation checkpoint has one of its own)")
  if args.rerank_top and not args.rerank_with:
    raise SamplingError("--rerank_top needs --rerank_with CLIP")
  if args.rerank_with and mode not in ("text", "edit"):
    raise SamplingError(f"--rerank_with ranks images against prompts: not with --{mode}")
  if not 0 <= args.rerank_top <= args.num_images:
    raise SamplingError(f"--rerank_top {args.rerank_top}: must be in [0, --num_images "
                        f"{args.num_images}] (0 = keep all)")
  images = {}
  if mode == "variations":
    images["a"] = read_image(args.variations, "--variations")
  elif mode == "interpolate":
    images["a"] = read_image(args.interpolate[0], "--interpolate")
    images["b"] = read_image(args.interpolate[1], "--interpolate")
  elif mode == "text_diff":
    images["a"] = read_image(args.image, "--image")
  elif mode == "edit":
    images["a"] = read_image(args.edit, "--edit")
    images["mask"] = read_image(args.mask, "--mask")
    if images["mask"].shape[:2] != images["a"].shape[:2]:
      m, a = images["mask"].shape, images["a"].shape
      raise SamplingError(f"--mask {args.mask} is {m[1]}x{m[0]} but --edit {args.edit} is "
                          f"{a[1]}x{a[0]}: they must be the same size")
  return images


def unclip_main(argv=None):
  from dalle_jax import cli  # pylint: disable=g-import-not-at-top
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  mode = _mode(args)
  try:
    inputs = _check_cli(args, mode)
    latents = None
    if args.init_noise:
      if not os.path.isfile(args.init_noise):
        raise SamplingError(f"--init_noise {args.init_noise}: file not found")
      with np.load(args.init_noise) as z:
        latents = {k: z[k] for k in z.files}
    if args.checkpoint is not None and not os.path.isfile(
        os.path.join(os.path.expanduser(args.checkpoint), "config.json")):
      raise SamplingError(f"--checkpoint {args.checkpoint}: no config.json there")
    cli.enable_compilation_cache()
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    mesh = generate.mesh_from_flag(args.mesh)
    if args.checkpoint is None:
      pipe = UnclipPipeline.from_stages(args.prior, args.decoder, args.super_res, mesh=mesh)
    else:
      pipe = UnclipPipeline.load(args.checkpoint, mesh=mesh)
    if args.clip:
      pipe.attach_image_encoder(args.clip)
    elif args.checkpoint is None and mode in ("variations", "interpolate", "text_diff"):
      pipe.attach_image_encoder(pipe.clip_path, flag=f"--decoder {args.decoder}'s CLIP")
    if args.rerank_with:
      rerank.get_encoder(args.rerank_with)  # a bad path fails before sampling
    s = dict(pipe.config.get("sampling") or {})
    pick = lambda flag: getattr(args, flag) if getattr(args, flag) is not None else s.get(flag)
    settings = {k: pick(k) for k in ("prior_steps", "decoder_steps", "sr_steps",
                                     "prior_guidance_scale", "decoder_guidance_scale")}
    settings.update({k: getattr(args, k) for k in ("prior_sampler", "decoder_sampler",
                                                   "sr_sampler")})
    common = dict(seed=args.seed, latents=latents, progress=True, **settings)
    scores = None
    if mode == "text":
      labels = list(args.prompt)
      images = pipe.generate(args.prompt, args.num_images, args.seed, latents=latents,
                             progress=True, **{k: v for k, v in settings.items() if v is not None})
      sampler = "unclip"
    else:
      if mode == "variations":
        x = pipe.variations(inputs["a"], args.num_images, **common)
        labels, sampler = [f"variations of {args.variations}"], "unclip"
      elif mode == "interpolate":
        x = pipe.interpolate(inputs["a"], inputs["b"], args.frames, **common)
        labels, sampler = [f"{args.interpolate[0]} -> {args.interpolate[1]}"], "ddim"
      elif mode == "text_diff":
        x = pipe.text_diff(inputs["a"], args.text_diff[0], args.text_diff[1], args.frames,
                           max_angle=_strength(args), **common)
        labels, sampler = [f"{args.image}: {args.text_diff[0]!r} -> {args.text_diff[1]!r}"], "ddim"
      else:
        x = pipe.edit(inputs["a"], inputs["mask"], args.prompt[0], args.num_images, **common)
        labels, sampler = list(args.prompt), "unclip"
      images = images_lib.to_uint8(x)[None]
    if args.rerank_with and args.rerank_top:
      kept, kept_scores = rerank.rerank(args.rerank_with, labels, list(images), args.rerank_top)
      images, scores = np.stack(kept), np.stack(kept_scores)
  except (SamplingError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}")
  if jax.process_index() != 0:
    return os.path.abspath(args.out)
  init_noise = os.path.abspath(args.init_noise) if args.init_noise else None
  inputs_meta = {k: (os.path.abspath(v) if isinstance(v, str) else [os.path.abspath(p) for p in v])
                 for k, v in (("variations", args.variations), ("interpolate", args.interpolate),
                              ("image", args.image), ("edit", args.edit), ("mask", args.mask),
                              ("clip", args.clip), ("rerank_with", args.rerank_with))
                 if v is not None}
  model = (os.path.abspath(args.checkpoint) if args.checkpoint is not None else
           {k: os.path.abspath(v) for k, v in (("prior", args.prior), ("decoder", args.decoder),
                                               ("super_res", args.super_res)) if v is not None})
  # the samplers each stage ran ("sampler": the decoder's, as before per-stage flags)
  decoder_sampler = args.decoder_sampler or sampler
  ran = dict(prior_sampler=(args.prior_sampler or "unclip") if mode in ("text", "edit") else None,
             decoder_sampler=decoder_sampler,
             sr_sampler=(pipe.sr_sampler(args.sr_sampler, decoder_sampler)
                         if pipe.has_super_res else None))
  meta = {"method": "unclip", "mode": mode, "model": model,
          "seed": args.seed, "num_images": args.num_images, **inputs_meta,
          "sampling": dict(settings, **ran, sampler=decoder_sampler, mesh=args.mesh,
                           init_noise=init_noise, rerank_top=args.rerank_top),
          "schedulers": {k: v.to_dict() for k, v in pipe.scheds.items()}}
  if mode in ("interpolate", "text_diff"):
    meta["frames"] = args.frames
  if mode == "text_diff":
    meta["text_diff"] = list(args.text_diff)
    meta["text_diff_strength"] = _strength(args)
  return generate.write_samples(args.out, labels, images, meta, scores=scores)
