"""Cascaded text -> image sampling (Imagen, DeepFloyd IF): a base stage, then SR stages.

  cascade = Cascade.load(["demo/imagen_base16", "demo/imagen_sr32"])   # workdirs / checkpoints
  images = cascade.generate(["a red circle on a blue background"], num_images=4, seed=0,
                            steps=(50, 25), sampler="ddim", guidance_scale=(3.0, 1.0))
  # uint8 (P, num_images, 32, 32, 3); return_stages=True: [uint8 per stage], final last

Each stage is a `diffusion`-family checkpoint (dalle_jax/sampling/diffusion.Pipeline
loads it, sharded when a mesh is given): a stage trained here (configs/imagen.py:
its own text transformer, or T5 states) or an imported DeepFloyd IF stage
(`tools.convert deepfloyd_if`; prompts encoded by the checkpoint's T5, the
negative prompt's states as the unconditional rows; IF's stage II has no T5 and
takes the previous stage's states). Stage k > 0 is conditioned on stage k-1's
output x0 in [-1, 1]: upsampled (bicubic for stages trained here, IF's
align-corners bilinear for IF), noised at the stage's `noise_level` with its
augmentation schedule, the level as the U-Net's extra embedding. Every stage
thresholds its x0 estimate dynamically by default (Imagen; capped at the
checkpoint's sample_max_value when it thresholds already: IF).

Random draws (`stage_keys`): stage k uses split(fold_in(PRNGKey(seed), k), 3) =
(x_T, augmentation noise, sampler) keys, so a stage can be rerun by hand.

Everything about the stages (sizes, flags, noise levels) is checked before any
compilation; a stage whose input size is not the previous stage's output size is
a one-line error naming both.

Shapes: P prompts, N images per prompt, n = P * N rows, S stage size, C channels,
L text tokens, D text width.
"""
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import parallel
from dalle_jax.convert import deepfloyd_if as if_lib
from dalle_jax.data import images as images_lib
from dalle_jax.diffusion import schedule as schedule_lib
from dalle_jax.sampling import diffusion as diffusion_sampling
from dalle_jax.sampling import generate
from dalle_jax.sampling import t5_encoder as t5_lib

log = logging.getLogger(__name__)

SamplingError = diffusion_sampling.SamplingError
SAMPLERS = diffusion_sampling.SAMPLERS


def stage_keys(seed, stage):
  """(x_T key, augmentation-noise key, sampler key) of stage `stage` (0 = base)."""
  return tuple(jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), stage), 3))


class Stage:
  """One stage: its diffusion Pipeline, size, input size and low-res conditioning."""

  def __init__(self, path, pipe, index):
    self.path, self.pipe, self.index = path, pipe, index
    self.task, self.config = pipe.task, pipe.config
    self.name = f"stage {index + 1} ({path})"
    self.if_cfg = self.config.get("deepfloyd_if") or None
    self.size = self.task.image_size
    self.channels = self.task.channels
    self.is_sr = self.task.is_sr
    self.input_size = self.task.low_res_size  # None: IF stage II takes any smaller size
    if self.if_cfg is not None and self.is_sr:
      self.input_size = self.if_cfg.get("low_res_size") or None
      self.noising = schedule_lib.SchedulerConfig.from_dict(self.if_cfg.noising.to_dict())
      self.default_level = int(self.if_cfg.noise_level)
    elif self.is_sr:
      if self.task.sr is None:
        raise SamplingError(f"{self.name}: a U-Net with a low-res input but no "
                            "config.model.low_res_size (nor an IF stage II): cannot condition it")
      self.noising = self.task.sr.noise.diffusion.cfg if self.task.sr.noise else None
      self.default_level = int(self.config.cascade.noise_level)
    self.t5 = None
    t5 = self.task.t5_path
    inside = os.path.join(path, t5) if t5 and "://" not in t5 else ""
    if inside and not os.path.isabs(t5) and os.path.exists(inside):  # an imported IF's own
      t5 = inside
    self.t5_path = t5
    self._compiled = {}

  @property
  def uses_t5(self):
    return self.task.t5_states

  def load_t5(self):
    if self.t5 is None and self.t5_path:
      self.t5 = t5_lib.T5TextEncoder.load(self.t5_path, flag=f"{self.name}: text_encoder.t5",
                                          max_len=self.task.text_len)
    return self.t5

  def sampling_default(self, key, fallback):
    s = self.config.get("sampling") or {}
    return s.get(key, fallback)

  def noise_level_range(self):
    if not self.is_sr or self.noising is None:
      return None
    return self.noising.num_train_timesteps

  # --- the compiled stage ------------------------------------------------------------
  def condition_low_res(self, low_res, level, noise):
    """Previous stage's x0 (n, s, s, C) -> (conditioning image (n, S, S, C), level (n,))."""
    if self.if_cfg is not None:
      z, embeds = if_lib.stage2_condition(low_res, self.size, level, noise, self.noising)
      return z, embeds["class"]
    return self.task.sr.sample(low_res, self.size, level, noise)

  def sample_fn(self, sampler, steps, eta, guidance, sched, level, n_rows, progress, mesh):
    key = (sampler, steps, eta, guidance, sched, level, n_rows, progress is not None)
    if key in self._compiled:
      return self._compiled[key]

    def fn(params, cond, null, x_T, low_res, aug_noise, rng):
      cond_img = lvl = None
      if self.is_sr:
        cond_img, lvl = self.condition_low_res(low_res, level, aug_noise)
      return self.task.sample(params, cond, x_T, rng, sampler=sampler, steps=steps, eta=eta,
                              guidance_scale=guidance, sched=sched, progress=progress,
                              low_res=cond_img, level=lvl, null=null)

    if mesh is None:
      out = jax.jit(fn)
    else:
      rows = lambda a: parallel.batch_sharding(mesh, np.ndim(a))

      def out(p, c, nl, x, lr, an, r):
        return jax.jit(fn, in_shardings=(
            jax.tree.map(lambda a: a.sharding, p), jax.tree.map(rows, c), jax.tree.map(rows, nl),
            rows(x), jax.tree.map(rows, lr), jax.tree.map(rows, an), parallel.replicated(mesh)),
            out_shardings=rows(x))(p, c, nl, x, lr, an, r)
    self._compiled[key] = out
    return out


def _per_stage(name, values, n, default):
  """A flag's comma list -> one value per stage: one value for all, or exactly n."""
  if values is None or (isinstance(values, (list, tuple)) and not values):
    return [default(i) for i in range(n)]
  if not isinstance(values, (list, tuple)):
    values = [values]
  if len(values) == 1:
    return list(values) * n
  if len(values) != n:
    raise SamplingError(f"--{name} has {len(values)} values for {n} stages "
                        "(give one for all or one per stage)")
  return list(values)


class Cascade:
  """Stages run base -> SR -> SR, each with its own sampler settings."""

  def __init__(self, stages, mesh=None):
    self.stages = stages
    self.mesh = mesh
    self.check_stages()

  @classmethod
  def load(cls, paths, mesh=None):
    if not paths:
      raise SamplingError("--stages: give at least one stage (base[,SR[,SR]])")
    stages = []
    for i, path in enumerate(paths):
      full = os.path.abspath(os.path.expanduser(path))
      if not os.path.exists(full) and "://" not in path:
        raise SamplingError(f"--stages: stage {i + 1}: {path} not found")
      stages.append(Stage(full, diffusion_sampling.Pipeline.load(full, mesh=mesh), i))
    return cls(stages, mesh=mesh)

  def check_stages(self):
    """Kinds, sizes and channels of consecutive stages (before anything compiles)."""
    for i, st in enumerate(self.stages):
      if st.task.conditioning == "class":
        raise SamplingError(f"{st.name} is class-conditional; a cascade samples from prompts")
      if i == 0 and st.is_sr:
        raise SamplingError(f"{st.name} is a super-resolution stage: the first stage must be "
                            "a base model")
      if i == 0:
        continue
      prev = self.stages[i - 1]
      if not st.is_sr:
        raise SamplingError(f"{st.name} is not a super-resolution stage (no low-res input) "
                            f"and cannot follow {prev.name}")
      if st.input_size is not None and st.input_size != prev.size:
        raise SamplingError(f"{st.name} takes {st.input_size} px input but {prev.name} makes "
                            f"{prev.size} px images")
      if st.input_size is None and prev.size >= st.size:
        raise SamplingError(f"{st.name} makes {st.size} px images from {prev.name}'s "
                            f"{prev.size} px: nothing to upsample")
      if st.channels != prev.channels:
        raise SamplingError(f"{st.name} takes {st.channels}-channel images but {prev.name} "
                            f"makes {prev.channels}-channel ones")

  @property
  def size(self):
    return self.stages[-1].size

  # --- settings ------------------------------------------------------------------------
  def settings(self, sampler=None, steps=None, eta=None, guidance_scale=None, noise_level=None,
               thresholding="dynamic", threshold_percentile=None):
    """Per-stage settings (dicts), from the arguments or each checkpoint's sampling config;
    every value checked."""
    n = len(self.stages)
    st = self.stages
    samplers_ = _per_stage("sampler", sampler, n,
                           lambda i: st[i].sampling_default("sampler", "ddim"))
    steps_ = _per_stage("steps", steps, n, lambda i: int(st[i].sampling_default("steps", 50)))
    etas = _per_stage("eta", eta, n, lambda i: float(st[i].sampling_default("eta", 0.0)))
    scales = _per_stage("guidance_scale", guidance_scale, n,
                        lambda i: float(st[i].sampling_default("guidance_scale", 1.0)))
    sr = [s for s in st if s.is_sr]
    levels = [None] * n
    if sr:
      per_sr = _per_stage("noise_level", noise_level, len(sr), lambda i: sr[i].default_level)
      for s, lvl in zip(sr, per_sr):
        levels[s.index] = lvl
    elif noise_level not in (None, [], ()):
      raise SamplingError("--noise_level applies to super-resolution stages; there are none")
    out = []
    for i, s in enumerate(st):
      where = f" ({s.name})"
      if samplers_[i] not in SAMPLERS:
        raise SamplingError(f"--sampler {samplers_[i]!r}{where}: choose {'|'.join(SAMPLERS)}")
      try:
        sched = diffusion_sampling.scheduler_overrides(s.task.sched, thresholding,
                                                       threshold_percentile)
        lvl = levels[i]
        if lvl is not None:
          top = s.noise_level_range()
          if top is not None and not (float(lvl) == int(lvl) and 0 <= int(lvl) < top):
            raise SamplingError(f"--noise_level {lvl}: must be an int in [0, {top}) "
                                f"(the augmentation schedule's levels)")
          lvl = int(lvl)
        try:
          k = int(steps_[i])
        except (TypeError, ValueError):
          raise SamplingError(f"--steps {steps_[i]!r}: not an int") from None
        s.pipe.check(["x"] if s.pipe.conditional else [], 1, samplers_[i], k,
                     float(etas[i]), float(scales[i]), False, sched)
      except SamplingError as e:
        raise SamplingError(f"{e}{where}") from None
      out.append(dict(sampler=samplers_[i], steps=k, eta=float(etas[i]),
                      guidance_scale=float(scales[i]), noise_level=lvl, sched=sched))
    return out

  # --- conditioning ------------------------------------------------------------------
  def conditions(self, prompts, num_images):
    """(cond, null) per stage, host numpy, n rows each. T5 states are computed once per
    encoder; a T5 stage without its own encoder reuses the previous T5 stage's states."""
    out, last_t5 = [], None
    for s in self.stages:
      if s.task.conditioning == "none":
        out.append(({}, {}))
        continue
      if not s.uses_t5:
        cond = s.pipe.condition(prompts, num_images)
        out.append((cond, s.task.null_cond(len(prompts) * num_images)))
        continue
      if s.t5_path:
        enc = s.load_t5()
        neg = (s.if_cfg or {}).get("negative_prompt", "") if s.if_cfg else ""
        states, mask = enc.encode_texts(list(prompts) + [neg])
        last_t5 = (states, mask)
      elif last_t5 is None:
        raise SamplingError(f"{s.name} conditions on T5 states but has no text encoder and no "
                            "earlier stage has one")
      states, mask = last_t5
      width, length = s.task.text_width, s.task.text_len
      if states.shape[1:] != (length, width):
        raise SamplingError(f"{s.name} takes T5 states of {length} tokens x {width}; the "
                            f"encoder gives {states.shape[1]} x {states.shape[2]}")
      rep = lambda a: np.repeat(a, num_images, 0)
      cond = {"text_states": rep(states[:-1]), "text_mask": rep(mask[:-1])}
      n = len(prompts) * num_images
      null = {"text_states": np.repeat(states[-1:], n, 0), "text_mask": np.repeat(mask[-1:], n, 0)}
      out.append((cond, null))
    return out

  # --- sampling ------------------------------------------------------------------------
  def generate(self, prompts, num_images=1, seed=0, *, sampler=None, steps=None, eta=None,
               guidance_scale=None, noise_level=None, thresholding="dynamic",
               threshold_percentile=None, progress=False, return_stages=False, return_float=False):
    """uint8 images (P, num_images, S, S, 3) of the last stage (return_stages: a list, one
    per stage; return_float: x0 in [-1, 1] instead of uint8). Per-stage arguments take one
    value for every stage or a list with one per stage (noise_level: one per SR stage)."""
    prompts = list(prompts)
    if not prompts:
      raise SamplingError("no --prompt given")
    for i, p in enumerate(prompts):
      if not p.strip():
        raise SamplingError(f"--prompt {i} is empty")
    if num_images < 1:
      raise SamplingError(f"--num_images {num_images}: must be >= 1")
    settings = self.settings(sampler, steps, eta, guidance_scale, noise_level, thresholding,
                             threshold_percentile)
    self.last_settings = settings
    n = len(prompts) * num_images
    pad = -n % parallel.batch_axis_size(self.mesh) if self.mesh is not None else 0
    padrows = lambda a: np.concatenate([a, np.repeat(a[-1:], pad, 0)]) if pad else a
    conds = self.conditions(prompts, num_images)
    outputs, low_res = [], None
    for s, cfg, (cond, null) in zip(self.stages, settings, conds):
      k_T, k_aug, k_sample = stage_keys(seed, s.index)
      shape = (n, s.size, s.size, s.channels)
      x_T = padrows(np.asarray(jax.random.normal(k_T, shape, jnp.float32)))
      aug = padrows(np.asarray(jax.random.normal(k_aug, shape, jnp.float32))) if s.is_sr else None
      cond = {k: padrows(np.asarray(v)) for k, v in cond.items()}
      null = {k: padrows(np.asarray(v)) for k, v in null.items()}
      guidance = cfg["guidance_scale"] if s.pipe.conditional else 1.0
      bar = None
      if progress:
        from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
        bar = tqdm(total=cfg["steps"], desc=f"stage {s.index + 1}: {cfg['sampler']} "
                   f"{cfg['steps']} steps, {s.size} px, {n} images", unit="step",
                   disable=jax.process_index() != 0)
      tick = (lambda *_: bar.update(1)) if bar is not None else None
      fn = s.sample_fn(cfg["sampler"], cfg["steps"], cfg["eta"], guidance, cfg["sched"],
                       cfg["noise_level"], len(x_T), tick, self.mesh)
      try:
        ctx = (parallel.mesh_context(self.mesh, s.config) if self.mesh is not None
               else _nullctx())
        with ctx:
          x0 = fn(s.pipe.params, cond, null, x_T, None if low_res is None else padrows(low_res),
                  aug, k_sample)
        x0 = parallel.to_host(x0)[:n]
      finally:
        if bar is not None:
          bar.close()
      outputs.append(x0)
      low_res = x0
    shaped = [x.reshape((len(prompts), num_images) + x.shape[1:]) for x in outputs]
    if not return_float:
      shaped = [_to_rgb(images_lib.to_uint8(x)) for x in shaped]
    return shaped if return_stages else shaped[-1]


def _to_rgb(images):
  return np.repeat(images, 3, -1) if images.shape[-1] == 1 else images


class _nullctx:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


# --- command line (sample.py --method cascade) ------------------------------------------

def _list(kind):
  def parse(text):
    try:
      return [kind(v) for v in text.split(",")]
    except ValueError:
      import argparse  # pylint: disable=g-import-not-at-top
      raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {kind.__name__}")
  return parse


def _parser():
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="sample.py --method cascade",
                              description="Text -> images with a cascade of diffusion models.")
  p.add_argument("--stages", required=True, type=_list(str),
                 help="W1,W2[,W3]: base then SR stages (workdirs or checkpoints)")
  p.add_argument("--prompt", action="append", default=[], help="repeatable")
  p.add_argument("--num_images", type=int, default=4, help="samples per prompt")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--sampler", type=_list(str), default=None,
                 help="ddpm|ddim|dpmpp per stage (comma list; default: each stage's config)")
  p.add_argument("--steps", type=_list(int), default=None, help="per stage (comma list)")
  p.add_argument("--eta", type=_list(float), default=None, help="DDIM's eta per stage")
  p.add_argument("--guidance_scale", type=_list(float), default=None,
                 help="classifier-free guidance per stage (1 = off)")
  p.add_argument("--noise_level", type=_list(int), default=None,
                 help="noise-conditioning augmentation level per SR stage (default: its config)")
  p.add_argument("--thresholding", default="dynamic", help="none|static|dynamic, every stage")
  p.add_argument("--threshold_percentile", type=float, default=None,
                 help="dynamic thresholding's percentile of |x0| (default: each stage's)")
  p.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                 help="sample sharded over a device mesh, e.g. -1,1,1; default: one device")
  p.add_argument("--coordinator_address", default=None)
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  p.add_argument("--out", default="samples.png",
                 help="grid PNG of the final images; OUT_STEM/ holds them and stageK/ each stage's")
  return p


def cascade_main(argv=None):
  from dalle_jax import cli  # pylint: disable=g-import-not-at-top
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    if args.thresholding not in diffusion_sampling.THRESHOLDING:
      raise SamplingError(f"--thresholding {args.thresholding!r}: choose "
                          f"{'|'.join(diffusion_sampling.THRESHOLDING)}")
    if not args.prompt:
      raise SamplingError("no --prompt given")
    cli.enable_compilation_cache()
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    cascade = Cascade.load(args.stages, mesh=generate.mesh_from_flag(args.mesh))
    stages = cascade.generate(args.prompt, args.num_images, args.seed, sampler=args.sampler,
                              steps=args.steps, eta=args.eta, guidance_scale=args.guidance_scale,
                              noise_level=args.noise_level, thresholding=args.thresholding,
                              threshold_percentile=args.threshold_percentile, progress=True,
                              return_stages=True)
  except (SamplingError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  if jax.process_index() != 0:  # every process holds all the images; one writes them
    return os.path.abspath(args.out)
  per_stage = [dict(path=s.path, size=s.size, sampler=c["sampler"], steps=c["steps"],
                    eta=c["eta"], guidance_scale=c["guidance_scale"],
                    noise_level=c["noise_level"], scheduler=c["sched"].to_dict())
               for s, c in zip(cascade.stages, cascade.last_settings)]
  settings = {"method": "cascade", "stages": per_stage, "seed": args.seed,
              "num_images": args.num_images, "thresholding": args.thresholding,
              "threshold_percentile": args.threshold_percentile, "mesh": args.mesh}
  out = generate.write_samples(args.out, args.prompt, stages[-1], settings)
  stem = os.path.splitext(out)[0]
  for i, images in enumerate(stages):
    generate.write_samples(os.path.join(stem, f"stage{i}.png"), args.prompt, images,
                           dict(settings, stage=i, stage_settings=per_stage[i]))
  return out
