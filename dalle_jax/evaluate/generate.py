"""Sample a caption set with any family and score the images in memory (`evaluate generate`).

  sampler = load_sampler("diffusion", "demo/diffusion", {"steps": 50}, mesh=mesh)
  scorer = Scorer(extractor=ext, real=(mu, sigma), clip=ClipCosines(clip_encoder))
  for rows in chunks:                       # every process passes the same rows
    scorer.update(sampler(captions[rows], seed + k), captions[rows])
  scorer.result()   # {'fid': {...}, 'clip_score': {...}}

Images never touch a file between the sampler and the metrics: each chunk's uint8 images go
straight into the sharded Inception extraction (float64 Σx, Σxxᵀ, N merged over devices and
processes, as `fid` does) and the sharded CLIP cosines (float64 N, Σ cos, Σ max(cos, 0) merged
the same way, as `clip_score` does), then are dropped, so a 30k-caption run holds one chunk of
images at a time.

Rows and seeds: image i is row i % B of sampling call k = i // B (B = the sampling batch), and
call k samples with seed `seed + k`; the last call is padded to B rows with its last caption
(one compiled program) and the padding discarded. The captions, seeds, B and every resolved
sampler setting go into the result, so a run can be repeated exactly.

Families: ar (dalle_jax.sampling.generate.Pipeline: AR transformer + VQGAN), diffusion
(dalle_jax.sampling.diffusion.Pipeline), cascade (dalle_jax.sampling.cascade.Cascade; the model
path is the comma-separated stages, base first, and the sampler flags take one value for every
stage or a comma list, one per stage), unclip (dalle_jax.sampling.unclip.UnclipPipeline: an
imported Karlo, or trained stages as the comma list PRIOR,DECODER[,SUPER_RES]).
"""
import math
import os

import numpy as np

from dalle_jax.evaluate import clip_cosines
from dalle_jax.evaluate import sources as src_lib
from dalle_jax.evaluate import stats as stats_lib
from dalle_jax.models import inception

FAMILIES = ("ar", "diffusion", "cascade", "unclip")
SCORES = ("fid", "clip_score")

# Sampler flags per family (the names sample.py uses for that method); None = the checkpoint's
# config.sampling value (or the pipeline's default).
SAMPLER_FLAGS = {
    "ar": {"temperature": float, "top_k": int, "top_p": float, "guidance_scale": float},
    "diffusion": {"sampler": str, "steps": int, "eta": float, "guidance_scale": float,
                  "thresholding": str, "threshold_percentile": float},
    "unclip": {"prior_steps": int, "decoder_steps": int, "sr_steps": int,
               "prior_guidance_scale": float, "decoder_guidance_scale": float,
               "prior_sampler": str, "decoder_sampler": str, "sr_sampler": str},
    "cascade": {"sampler": str, "steps": int, "eta": float, "guidance_scale": float,
                "noise_level": int, "thresholding": str, "threshold_percentile": float},
}
PER_STAGE = ("sampler", "steps", "eta", "guidance_scale", "noise_level")  # cascade comma lists
ALL_SAMPLER_FLAGS = {k: t for flags in SAMPLER_FLAGS.values() for k, t in flags.items()}


class GenerateError(ValueError):
  pass


def parse_sampler_flags(family, raw):
  """Command-line strings -> typed values ({flag: str or None}); a cascade takes a comma list
  (one value per stage, noise_level one per SR stage) where the others take one value."""
  out = {}
  for k, v in raw.items():
    if v is None:
      continue
    typ = ALL_SAMPLER_FLAGS[k]
    parts = [p.strip() for p in str(v).split(",")]
    try:
      vals = [typ(p) for p in parts]
    except ValueError:
      raise GenerateError(f"--{k} {v}: expected {typ.__name__} value(s)") from None
    if len(vals) > 1 and not (family == "cascade" and k in PER_STAGE):
      raise GenerateError(f"--{k} {v}: one value (comma lists are per stage of "
                          "--family cascade)")
    out[k] = vals if len(vals) > 1 else vals[0]
  return out


def check_sampler_flags(family, flags):
  """One-line GenerateError for a flag another family owns or an out-of-range value."""
  if family not in FAMILIES:
    raise GenerateError(f"--family {family!r}: choose {'|'.join(FAMILIES)}")
  for k, v in flags.items():
    if v is not None and k not in SAMPLER_FLAGS[family]:
      owners = [f for f, fl in SAMPLER_FLAGS.items() if k in fl]
      raise GenerateError(f"--{k} applies to --family {'|'.join(owners)}, not {family}")
  v = lambda k: None if isinstance(flags.get(k), list) else flags.get(k)  # stages: Cascade checks
  if v("top_k") is not None and v("top_k") < 0:
    raise GenerateError(f"--top_k {v('top_k')}: must be >= 0 (0 = off, 1 = greedy)")
  if v("top_p") is not None and not 0.0 < v("top_p") <= 1.0:
    raise GenerateError(f"--top_p {v('top_p')}: must be in (0, 1] (1 = off)")
  if v("temperature") is not None and not (math.isfinite(v("temperature"))
                                           and v("temperature") >= 0):
    raise GenerateError(f"--temperature {v('temperature')}: must be >= 0 (0 = greedy)")
  for k in ("guidance_scale", "prior_guidance_scale", "decoder_guidance_scale"):
    if v(k) is not None and not (math.isfinite(v(k)) and v(k) >= 0):
      raise GenerateError(f"--{k} {v(k)}: must be a finite number >= 0 (1 = no guidance)")


class FamilySampler:
  """captions (B,) + seed -> uint8 images (B, H, W, 3) with a family's library pipeline.

  `settings`: every resolved sampler setting (JSON), enough to repeat the run.
  """

  def __init__(self, family, pipeline, settings, call):
    self.family, self.pipeline, self.settings, self._call = family, pipeline, settings, call

  def __call__(self, captions, seed):
    images = np.asarray(self._call(list(captions), int(seed)))
    images = images.reshape((-1,) + images.shape[-3:])
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, -1)
    return images


def _pick(flags, key, config_sampling, default):
  """The flag if given, else the checkpoint's config.sampling value, else `default`."""
  if flags.get(key) is not None:
    return flags[key]
  value = config_sampling.get(key)
  return type(default)(default if value is None else value)


def load_sampler(family, path, flags=None, mesh=None, vqgan=None):
  """A FamilySampler for a workdir / imported checkpoint (`flags`: SAMPLER_FLAGS overrides)."""
  flags = {k: v for k, v in (flags or {}).items() if v is not None}
  check_sampler_flags(family, flags)
  paths = path.split(",") if family in ("cascade", "unclip") else [path]
  for p in paths:
    if not os.path.exists(os.path.expanduser(p)):
      raise FileNotFoundError(f"{p}: no such checkpoint or workdir")
  if family == "ar":
    from dalle_jax.sampling import generate as ar_lib  # pylint: disable=g-import-not-at-top
    return ar_sampler(ar_lib.Pipeline.load(path, vqgan_path=vqgan, mesh=mesh), flags)
  if family == "diffusion":
    from dalle_jax.sampling import diffusion as diff_lib  # pylint: disable=g-import-not-at-top
    return diffusion_sampler(diff_lib.Pipeline.load(path, mesh=mesh), flags)
  if family == "unclip":
    from dalle_jax.sampling import unclip as unclip_lib  # pylint: disable=g-import-not-at-top
    if len(paths) == 1:
      return unclip_sampler(unclip_lib.UnclipPipeline.load(path, mesh=mesh), flags)
    if len(paths) > 3:
      raise GenerateError(f"{path}: unCLIP's trained stages are PRIOR,DECODER[,SUPER_RES], "
                          f"got {len(paths)} paths")
    return unclip_sampler(unclip_lib.UnclipPipeline.from_stages(*paths, mesh=mesh), flags)
  from dalle_jax.sampling import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  return cascade_sampler(cascade_lib.Cascade.load(paths, mesh=mesh), flags)


def ar_sampler(pipe, flags):
  """sampling.generate.Pipeline (AR transformer + VQGAN) -> FamilySampler."""
  from dalle_jax.sampling import decode  # pylint: disable=g-import-not-at-top
  s = pipe.config.get("sampling") or {}
  sp = decode.SamplingParams(temperature=_pick(flags, "temperature", s, 1.0),
                             top_k=_pick(flags, "top_k", s, 0),
                             top_p=_pick(flags, "top_p", s, 1.0),
                             guidance_scale=_pick(flags, "guidance_scale", s, 1.0))
  settings = {"sampling": dict(sp.__dict__), "vqgan": pipe.config.get("vqgan", "")}
  return FamilySampler("ar", pipe, settings, lambda caps, seed: pipe.generate(caps, 1, seed, sp))


def diffusion_sampler(pipe, flags):
  """sampling.diffusion.Pipeline -> FamilySampler (settings checked before any compile)."""
  from dalle_jax.sampling import diffusion as diff_lib  # pylint: disable=g-import-not-at-top
  s = pipe.config.get("sampling") or {}
  sampler = _pick(flags, "sampler", s, "ddim")
  kw = {"sampler": sampler, "steps": _pick(flags, "steps", s, 50),
        # the checkpoint's eta belongs to its own sampler (DDIM)
        "eta": _pick(flags, "eta", s if sampler == "ddim" else {}, 0.0),
        "guidance_scale": _pick(flags, "guidance_scale", s, 1.0),
        "thresholding": flags.get("thresholding"),
        "threshold_percentile": flags.get("threshold_percentile")}
  sched = diff_lib.scheduler_overrides(pipe.task.sched, kw["thresholding"],
                                       kw["threshold_percentile"])
  pipe.check(["x"] if pipe.conditional else [], 1, kw["sampler"], kw["steps"], kw["eta"],
             kw["guidance_scale"], not pipe.conditional, sched)
  settings = {"sampling": kw, "conditional": pipe.conditional, "scheduler": sched.to_dict()}
  if not pipe.conditional:  # captions only count the rows (and pair with CLIP)
    return FamilySampler("diffusion", pipe, settings, lambda caps, seed: pipe.generate(
        [], len(caps), seed, unconditional=True, **kw))
  return FamilySampler("diffusion", pipe, settings,
                       lambda caps, seed: pipe.generate(caps, 1, seed, **kw))


def unclip_sampler(pipe, flags):
  """sampling.unclip.UnclipPipeline -> FamilySampler."""
  from dalle_jax.sampling import unclip as unclip_lib  # pylint: disable=g-import-not-at-top
  s = dict(pipe.config.get("sampling") or {})
  defaults = {"prior_steps": 25, "decoder_steps": 25, "sr_steps": 7,
              "prior_guidance_scale": 4.0, "decoder_guidance_scale": 8.0}
  kw = {k: _pick(flags, k, s, d) for k, d in defaults.items()}
  samplers = {"prior_sampler": flags.get("prior_sampler") or "unclip",
              "decoder_sampler": flags.get("decoder_sampler") or "unclip",
              "sr_sampler": flags.get("sr_sampler")}
  unclip_lib.check_samplers(**samplers)
  kw.update(samplers)
  resolved = dict(kw, sr_sampler=(pipe.sr_sampler(kw["sr_sampler"], kw["decoder_sampler"])
                                  if pipe.has_super_res else None))
  return FamilySampler("unclip", pipe, {"sampling": resolved},
                       lambda caps, seed: pipe.generate(caps, 1, seed, **kw))


def cascade_sampler(pipe, flags):
  """sampling.cascade.Cascade (base + super-resolution stages) -> FamilySampler."""
  kw = {k: flags.get(k) for k in PER_STAGE + ("threshold_percentile",)}
  kw["thresholding"] = flags.get("thresholding", "dynamic")
  stages = pipe.settings(**kw)  # every stage's value resolved and checked
  settings = {"sampling": kw, "stages": [
      dict(path=st.path, size=st.size, sampler=c["sampler"], steps=c["steps"], eta=c["eta"],
           guidance_scale=c["guidance_scale"], noise_level=c["noise_level"],
           scheduler=c["sched"].to_dict()) for st, c in zip(pipe.stages, stages)]}
  return FamilySampler("cascade", pipe, settings,
                       lambda caps, seed: pipe.generate(caps, 1, seed, **kw))


class ArraySource:
  """uint8 images (N, H, W, 3) held in memory, as a `sources.extract` source."""
  kind = "array"

  def __init__(self, images, description="in-memory images"):
    self.images = images
    self.description = f"{description} ({len(images)})"

  def __len__(self):
    return len(self.images)

  def load(self, i):
    return self.images[i]


class Scorer:
  """Streams (images, captions) chunks into FID statistics and CLIP score sums.

  extractor: an InceptionExtractor (FID against `real` = (mu, sigma)); clip: a
  clip_cosines.ClipCosines. Every process passes the same chunks; both shard the rows over
  devices and processes and merge float64 sums (as the `fid` and `clip_score` subcommands).
  """

  def __init__(self, extractor=None, real=None, clip=None):
    if (extractor is None) != (real is None):
      raise ValueError("FID needs both an Inception extractor and real statistics")
    self.extractor, self.real, self.clip = extractor, real, clip
    self.stats = stats_lib.Statistics.zeros(inception.POOL_DIM)
    self.cosines = clip_cosines.CosineSums()

  @property
  def n(self):
    return self.stats.n if self.extractor is not None else self.cosines.n

  def update(self, images_u8, captions):
    images = np.asarray(images_u8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(captions) != len(images):
      raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if self.extractor is not None:
      self.stats = self.stats.merge(src_lib.extract(ArraySource(images), self.extractor).stats)
    if self.clip is not None:
      sums, _ = self.clip.of_source(ArraySource(images), list(captions))
      self.cosines = self.cosines.merge(sums)

  def result(self):
    out = {}
    if self.extractor is not None:
      out["fid"] = {"value": stats_lib.frechet_distance(self.stats.mu, self.stats.sigma,
                                                        *self.real), "n": self.stats.n}
    if self.clip is not None:
      out["clip_score"] = self.cosines.result()
    return out


def row_chunks(num, batch):
  """[(start, stop)] of the sampling calls covering `num` rows, `batch` rows each."""
  return [(s, min(s + batch, num)) for s in range(0, num, batch)]


def sample_and_score(sampler, captions, seed, batch, scorer, keep_images=False, progress=False):
  """Samples captions[i] for every i (call k: rows k*batch.., seed + k) into `scorer`.

  Returns (seeds per call, uint8 images (N, H, W, 3) when keep_images else None).
  """
  import jax  # pylint: disable=g-import-not-at-top
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=len(captions), desc="generate + score", unit=" images")
  seeds, kept = [], []
  for k, (a, b) in enumerate(row_chunks(len(captions), batch)):
    rows = list(captions[a:b])
    rows += [rows[-1]] * (batch - len(rows))  # one program for every call
    images = sampler(rows, seed + k)[:b - a]
    seeds.append(seed + k)
    scorer.update(images, captions[a:b])
    if keep_images:
      kept.append(images)
    if bar is not None:
      bar.update(b - a)
  if bar is not None:
    bar.close()
  return seeds, (np.concatenate(kept) if keep_images else None)
