"""Text -> image with a diffusion checkpoint: the pipeline behind `sample.py --method diffusion`.

  pipe = Pipeline.load("demo/diffusion")           # workdir or imported checkpoint
  images = pipe.generate(["a red circle on a blue background"], num_images=4, seed=0,
                         sampler="ddim", steps=50, guidance_scale=3.0)
  # uint8 (P, num_images, H, W, 3)

The checkpoint's scheduler settings (config.diffusion: schedule, prediction and
variance type, clipping, thresholding, spacing) drive the sampler unless an
argument overrides them. The whole chain of K steps is one compiled loop
(dalle_jax.diffusion.samplers); with a mesh the parameters are placed by their
logical names and the rows split over the batch axes. Guidance runs the
conditional and unconditional rows in one U-Net pass.

`init_noise` (N, H, W, C) float32 fixes each image's x_T: with DDIM at eta=0 or
DPM-Solver++ the images are then fully determined by it.

Edits (`--edit IMAGE --mask MASK`, `generate(edit=(image, mask))`): the kept region (black
in the mask) is imposed at every step, so it comes back exactly, for any model; a model
with GLIDE's inpainting layout (model.unet.inpaint) also sees the masked image and the
mask as its extra input channels.
"""
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import parallel, paths
from dalle_jax.data import images as images_lib
from dalle_jax.sampling import generate
from dalle_jax.tasks import diffusion as diffusion_task

log = logging.getLogger(__name__)

SAMPLERS = ("ddpm", "ddim", "dpmpp")
THRESHOLDING = ("none", "static", "dynamic")
NO_CAP = 1e9  # sample_max_value for Imagen's uncapped dynamic thresholding


class SamplingError(ValueError):
  pass


def scheduler_overrides(sched, thresholding=None, percentile=None):
  """The checkpoint's SchedulerConfig with --thresholding / --threshold_percentile applied.

  none: no clipping of the x0 estimate; static: clip to [-1, 1]; dynamic: Imagen's
  per-sample s = max(1, quantile(|x0|, p)), clip to +-s, divide by s (capped at the
  checkpoint's sample_max_value when it thresholds already, else uncapped).
  percentile: a fraction (0.995) or a percentage (99.5).
  """
  if percentile is not None:
    p = percentile / 100.0 if percentile > 1 else percentile
    if not 0 < p <= 1:
      raise SamplingError(f"--threshold_percentile {percentile}: expected a value in (0, 1] "
                          "(or a percentage in (1, 100])")
    if thresholding not in (None, "dynamic") and not (thresholding is None and sched.thresholding):
      raise SamplingError("--threshold_percentile applies only to --thresholding dynamic")
    sched = sched.replace(dynamic_thresholding_ratio=p)
  if thresholding is None:
    return sched
  if thresholding not in THRESHOLDING:
    raise SamplingError(f"--thresholding {thresholding!r}: choose {'|'.join(THRESHOLDING)}")
  if thresholding == "none":
    return sched.replace(clip_sample=False, thresholding=False)
  if thresholding == "static":
    return sched.replace(clip_sample=True, clip_sample_range=1.0, thresholding=False)
  cap = sched.sample_max_value if sched.thresholding else NO_CAP
  return sched.replace(clip_sample=False, thresholding=True, sample_max_value=cap)


def read_image(path, flag):
  """uint8 (H, W, 3) of an image file, or a one-line SamplingError naming the flag."""
  if not path or not os.path.isfile(path):
    raise SamplingError(f"{flag} {path}: file not found")
  try:
    with open(path, "rb") as f:
      return images_lib.decode(f.read())
  except (OSError, ValueError) as e:
    raise SamplingError(f"{flag} {path}: unreadable image ({e})") from None


def edit_target(image, mask, size):
  """An edit's image uint8 (H, W, 3) and mask (H, W[, C]; white = regenerate, black = keep)
  -> {'x0' (1, size, size, 3) in [-1, 1], 'mask' (1, size, size, 1) 1 = keep} (shorter side
  resized, centre crop)."""
  image, mask = np.asarray(image), np.asarray(mask)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise SamplingError(f"--edit image: expected uint8 (H, W, 3), got {image.dtype} "
                        f"{image.shape}")
  if mask.shape[:2] != image.shape[:2]:
    raise SamplingError(f"--mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                        f"{image.shape[1]}x{image.shape[0]}: they must be the same size")
  m = (mask.reshape(mask.shape[:2] + (-1,)).max(-1) > 127).astype(np.uint8) * 255
  img = images_lib.resize_and_crop(image, size)
  keep = images_lib.resize_and_crop(np.repeat(m[..., None], 3, -1), size)[..., :1] <= 127
  if keep.all():
    raise SamplingError("--mask marks nothing to edit (white = regenerate, black = keep)")
  return {"x0": images_lib.to_float(img[None]).astype(np.float32),
          "mask": keep[None].astype(np.float32)}


class Pipeline:
  """Tokenizer / frozen text encoder + diffusion model + sampler, optionally sharded."""

  def __init__(self, config, variables, mesh=None, task=None):
    self.config = config
    self.task = task or diffusion_task.DiffusionTask(config)
    self.mesh = mesh
    self.params = variables["params"]
    self._compiled = {}

  @classmethod
  def load(cls, path, mesh=None):
    from dalle_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
    path = paths.resolve(path)  # local or gs://
    config = checkpoint.read_config(path)
    if config.get("family") != "diffusion":
      raise SamplingError(f"{path}: config.family={config.get('family')!r}, expected 'diffusion' "
                          "(a diffusion workdir or imported checkpoint)")
    task = diffusion_task.DiffusionTask(config)
    target = None
    if mesh is not None:  # each parameter read straight into its shards
      abstract = jax.eval_shape(task.init, jax.random.PRNGKey(0), task.dummy_batch(1))
      shardings = parallel.logical_shardings(abstract, mesh, parallel.rules_from_config(config))
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            parallel.unbox(abstract)["params"], parallel.unbox(shardings)["params"])
    _, variables = checkpoint.load_model(path, params_target=target)
    return cls(config, variables, mesh=mesh, task=task)

  def _tick(self, *_):
    if getattr(self, "_bar", None) is not None:
      self._bar.update(1)

  @property
  def image_shape(self):
    return (self.task.image_size, self.task.image_size, self.task.channels)

  @property
  def conditional(self):
    return self.task.conditioning != "none"

  # --- conditioning -----------------------------------------------------------------
  def condition(self, prompts, num_images, unconditional=False):
    """Rows' conditioning (P * num_images rows) and the guidance it allows."""
    prompts = list(prompts)
    if self.task.conditioning == "none" or unconditional:
      n = max(1, len(prompts)) * num_images
      return self.task.null_cond(n)
    if self.task.conditioning == "class":
      try:
        labels = np.asarray([int(p) for p in prompts], np.int32)
      except ValueError as e:
        raise SamplingError(f"--prompt: a class-conditional model takes class indices ({e})")
      k = int(self.config.model.num_classes)
      if labels.min() < 0 or labels.max() >= k:
        raise SamplingError(f"--prompt: class indices must lie in [0, {k})")
      return {"label": np.repeat(labels, num_images)}
    for i, p in enumerate(prompts):
      if not p.strip():
        raise SamplingError(f"--prompt {i} is empty; pass --unconditional to sample without text")
    L = self.task.text_len
    for i, seq in enumerate(self.task.tokenizer.tokenize(prompts)):
      if len(seq) > L:
        log.warning("--prompt %d is %d tokens long: truncated to the text encoder's %d (%r)",
                    i, len(seq), L, prompts[i][:60])
    ids, mask = self.task.tokenize(prompts)
    return {"text_ids": np.repeat(ids, num_images, 0), "text_mask": np.repeat(mask, num_images, 0)}

  # --- checks (before anything compiles) ------------------------------------------------
  def check(self, prompts, num_images, sampler, steps, eta, guidance_scale, unconditional, sched):
    if sampler not in SAMPLERS:
      raise SamplingError(f"--sampler {sampler!r}: choose {'|'.join(SAMPLERS)}")
    if not isinstance(steps, int) or not 1 <= steps <= sched.num_train_timesteps:
      raise SamplingError(f"--steps {steps}: must lie in [1, {sched.num_train_timesteps}] "
                          "(the model's number of training timesteps)")
    if eta and sampler != "ddim":
      raise SamplingError(f"--eta {eta}: applies to --sampler ddim only")
    if eta < 0:
      raise SamplingError(f"--eta {eta}: must be >= 0")
    if guidance_scale < 0 or not math.isfinite(guidance_scale):
      raise SamplingError(f"--guidance_scale {guidance_scale}: must be >= 0 (1 = no guidance)")
    if num_images < 1:
      raise SamplingError(f"--num_images {num_images}: must be >= 1")
    if not self.conditional and any(p for p in prompts):
      raise SamplingError("--prompt given, but this model is unconditional "
                          "(config.model.conditioning='none'): use --unconditional")
    if self.conditional and not unconditional and not prompts:
      raise SamplingError("no --prompt given (or pass --unconditional)")

  def noise(self, n, seed, init_noise=None):
    shape = (n,) + self.image_shape
    if init_noise is None:
      return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32))
    x = np.asarray(init_noise)
    if x.shape != shape:
      raise SamplingError(f"--init_noise has shape {x.shape}, expected {shape} "
                          "(prompts x num_images, H, W, C)")
    if not np.issubdtype(x.dtype, np.floating):
      raise SamplingError(f"--init_noise has dtype {x.dtype}, expected float32")
    return x.astype(np.float32)

  # --- sampling ------------------------------------------------------------------------
  def _sample_fn(self, sampler, steps, eta, guidance_scale, sched, n_rows, progress, edit=False):
    key = (sampler, steps, eta, guidance_scale, sched, n_rows, progress is not None, edit)
    if key not in self._compiled:
      fn = lambda p, c, x, r, k: self.task.sample(p, c, x, r, sampler=sampler, steps=steps,
                                                  eta=eta, guidance_scale=guidance_scale,
                                                  sched=sched, progress=progress, known=k)
      if self.mesh is None:
        self._compiled[key] = jax.jit(fn)
      else:
        rows = lambda a: parallel.batch_sharding(self.mesh, np.ndim(a))
        self._compiled[key] = lambda p, c, x, r, k: jax.jit(
            fn, in_shardings=(jax.tree.map(lambda a: a.sharding, p), jax.tree.map(rows, c),
                              rows(x), parallel.replicated(self.mesh), jax.tree.map(rows, k)),
            out_shardings=rows(x))(p, c, x, r, k)
    return self._compiled[key]

  def generate(self, prompts, num_images=1, seed=0, *, sampler="ddim", steps=50, eta=0.0,
               guidance_scale=1.0, thresholding=None, threshold_percentile=None, init_noise=None,
               unconditional=False, progress=False, return_float=False, edit=None):
    """uint8 images (P, num_images, H, W, 3) (P = 1 when unconditional), or float x0 in [-1, 1].
    edit: (image uint8 (H, W, 3), mask (H, W[, C]), white = regenerate): every row inpaints it."""
    prompts = [p for p in prompts if p] if unconditional else list(prompts)
    sched = scheduler_overrides(self.task.sched, thresholding, threshold_percentile)
    self.check(prompts, num_images, sampler, steps, eta, guidance_scale, unconditional, sched)
    n_prompts = 1 if (unconditional or not self.conditional) else len(prompts)
    n = n_prompts * num_images
    known = None
    if edit is not None:
      if self.task.channels != 3:
        raise SamplingError(f"--edit: the model makes {self.task.channels}-channel images, not RGB")
      known = {k: np.repeat(v, n, 0)
               for k, v in edit_target(edit[0], edit[1], self.task.image_size).items()}
    cond = self.condition(prompts, num_images, unconditional)
    x_T = self.noise(n, seed, init_noise)
    if unconditional or not self.conditional:
      guidance_scale = 1.0
    # Rows padded to a multiple of the batch-sharding degree (extra rows discarded).
    pad = 0
    if self.mesh is not None:
      k = parallel.batch_axis_size(self.mesh)
      pad = -n % k
    if pad:
      cond = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in cond.items()}
      x_T = np.concatenate([x_T, np.zeros((pad,) + x_T.shape[1:], x_T.dtype)])
      if known is not None:
        known = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in known.items()}
    bar = None
    if progress:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=steps, desc=f"{sampler} {steps} steps, {n} images", unit="step",
                 disable=jax.process_index() != 0)
    self._bar = bar  # the compiled loop's callback ticks whichever bar is current
    fn = self._sample_fn(sampler, steps, float(eta), float(guidance_scale), sched, len(x_T),
                         self._tick if progress else None, known is not None)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    try:
      ctx = parallel.mesh_context(self.mesh, self.config) if self.mesh is not None else _nullctx()
      with ctx:
        x0 = fn(self.params, cond, x_T, rng, known)
      x0 = parallel.to_host(x0)[:n]
    finally:
      if bar is not None:
        bar.close()
    x0 = x0.reshape((n_prompts, num_images) + x0.shape[1:])
    if return_float:
      return x0
    images = images_lib.to_uint8(x0)
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, -1)
    return images


class _nullctx:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


# --- command line (sample.py --method diffusion) ------------------------------------------

def _parser():
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="sample.py --method diffusion",
                              description="Text -> images with a dalle_jax diffusion model.")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="training workdir (latest checkpoint, EMA params if kept)")
  src.add_argument("--checkpoint", help="imported checkpoint (e.g. convert diffusers_unet)")
  p.add_argument("--prompt", action="append", default=[], help="repeatable")
  p.add_argument("--unconditional", action="store_true", help="sample without text")
  p.add_argument("--num_images", type=int, default=4, help="samples per prompt")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--sampler", default="ddim", help="|".join(SAMPLERS))
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (0 = deterministic)")
  p.add_argument("--guidance_scale", type=float, default=None,
                 help="classifier-free guidance; 1 = off (default: config.sampling.guidance_scale)")
  p.add_argument("--thresholding", default=None,
                 help="none|static|dynamic (default: the checkpoint's scheduler settings)")
  p.add_argument("--threshold_percentile", type=float, default=None,
                 help="dynamic thresholding's percentile of |x0| (0.995 or 99.5)")
  p.add_argument("--init_noise", default=None,
                 help=".npy of x_T, shape (prompts x num_images, H, W, C) float32")
  p.add_argument("--edit", metavar="IMAGE", default=None,
                 help="inpaint IMAGE's --mask region (white = regenerate, black = keep)")
  p.add_argument("--mask", default=None, help="--edit's mask (same size as the image)")
  p.add_argument("--rerank_with", default=None, help="CLIP workdir/checkpoint for reranking")
  p.add_argument("--rerank_top", type=int, default=0, help="keep the K best per prompt")
  p.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                 help="sample sharded over a device mesh, e.g. -1,1,1; default: one device")
  p.add_argument("--coordinator_address", default=None)
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  p.add_argument("--out", default="samples.png", help="grid PNG; images go to OUT_STEM/")
  return p


def diffusion_main(argv=None):
  from dalle_jax import cli  # pylint: disable=g-import-not-at-top
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    if args.rerank_top and not args.rerank_with:
      raise SamplingError("--rerank_top needs --rerank_with CLIP_DIR")
    if args.rerank_top < 0 or args.rerank_top > args.num_images:
      raise SamplingError(f"--rerank_top {args.rerank_top}: must lie in [1, --num_images]")
    if args.unconditional and args.prompt:
      raise SamplingError("--prompt and --unconditional exclude each other")
    if args.sampler not in SAMPLERS:
      raise SamplingError(f"--sampler {args.sampler!r}: choose {'|'.join(SAMPLERS)}")
    if args.thresholding is not None and args.thresholding not in THRESHOLDING:
      raise SamplingError(f"--thresholding {args.thresholding!r}: choose {'|'.join(THRESHOLDING)}")
    if args.guidance_scale is not None and not args.guidance_scale >= 0:
      raise SamplingError(f"--guidance_scale {args.guidance_scale}: must be >= 0 (1 = no guidance)")
    init_noise = None
    if args.init_noise:
      if not os.path.isfile(args.init_noise):
        raise SamplingError(f"--init_noise {args.init_noise}: file not found")
      init_noise = np.load(args.init_noise)
    edit = None
    if (args.edit is None) != (args.mask is None):
      raise SamplingError("--edit needs --mask, and --mask goes with --edit")
    if args.edit is not None:
      edit = (read_image(args.edit, "--edit"), read_image(args.mask, "--mask"))
      (ih, iw), (mh, mw) = edit[0].shape[:2], edit[1].shape[:2]
      if (ih, iw) != (mh, mw):  # before any weights are read
        raise SamplingError(f"--mask {args.mask} is {mw}x{mh} but --edit {args.edit} is "
                            f"{iw}x{ih}: they must be the same size")
    cli.enable_compilation_cache()
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    pipe = Pipeline.load(args.workdir or args.checkpoint, mesh=generate.mesh_from_flag(args.mesh))
    s = pipe.config.get("sampling") or {}
    guidance = args.guidance_scale if args.guidance_scale is not None else float(
        s.get("guidance_scale", 1.0))
    prompts = list(args.prompt)
    images = pipe.generate(prompts, args.num_images, args.seed, sampler=args.sampler,
                           steps=args.steps, eta=args.eta, guidance_scale=guidance,
                           thresholding=args.thresholding,
                           threshold_percentile=args.threshold_percentile,
                           init_noise=init_noise, unconditional=args.unconditional, progress=True,
                           edit=edit)
  except (SamplingError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}")
  if not prompts or args.unconditional or not pipe.conditional:
    prompts = [""]
  scores = None
  if args.rerank_with:
    from dalle_jax.sampling import rerank as rerank_lib  # pylint: disable=g-import-not-at-top
    kept, scores = rerank_lib.rerank(args.rerank_with, prompts, list(images),
                                     args.rerank_top or args.num_images)
    images = np.stack([np.asarray(k) for k in kept])
  if jax.process_index() != 0:  # every process holds all the images; one writes them
    return os.path.abspath(args.out)
  sched = scheduler_overrides(pipe.task.sched, args.thresholding, args.threshold_percentile)
  settings = {
      "method": "diffusion", "model": os.fspath(paths.resolve(args.workdir or args.checkpoint)),
      "seed": args.seed, "num_images": args.num_images, "unconditional": args.unconditional,
      "sampling": {"sampler": args.sampler, "steps": args.steps, "eta": args.eta,
                   "guidance_scale": guidance if pipe.conditional and not args.unconditional else 1.0,
                   "thresholding": args.thresholding, "threshold_percentile": args.threshold_percentile,
                   "init_noise": os.path.abspath(args.init_noise) if args.init_noise else None,
                   "mesh": args.mesh, "rerank_with": args.rerank_with, "rerank_top": args.rerank_top,
                   "edit": os.path.abspath(args.edit) if args.edit else None,
                   "mask": os.path.abspath(args.mask) if args.mask else None},
      "scheduler": sched.to_dict(),
  }
  return generate.write_samples(args.out, prompts, images, settings, scores)
