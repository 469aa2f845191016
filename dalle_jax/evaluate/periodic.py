"""FID / CLIP score of samples during training: the trainer's generative-metrics hook.

  hook = PeriodicMetrics.from_config(task, mesh)     # None unless config.eval_metrics.every > 0
  if hook and hook.due(step, end_step):
    metrics = hook(eval_params, step)                # {'eval/fid': .., 'eval/clip_score': ..}

config.eval_metrics (configs/common.py):
  every        sample and score every N steps (and at the last step); 0 = off
  num          images per evaluation, one per caption (captions cycled)
  captions     a caption file, one per line (default: the config's sampling.prompts)
  metrics      "fid,clip_score" (either or both)
  real_stats   FID reference statistics .npz (mu, sigma: `evaluate stats`, pytorch-fid, clean-fid)
  inception    pytorch-fid's pt_inception-2015-12-05-*.pth (FID); mode: legacy_pytorch | clean
  clip         CLIP workdir / imported checkpoint / HF dir (CLIP score)
  batch_size   images per sampling call; seed: call k samples with seed + k

The trainer stays family-agnostic: it hands over its (EMA) parameters; the family's library
pipeline (dalle_jax.sampling, as `evaluate generate` uses) is built once around them on the
trainer's mesh and gets the new parameters at each evaluation (no recompilation). Families:
dalle (AR transformer + the VQGAN in config.vqgan) and diffusion. Every input is checked when
the hook is built, before the first step compiles. Logged like the other eval metrics
(metrics.jsonl, TensorBoard): eval/fid, eval/clip_score (torchmetrics' definition),
eval/clip_score_hessel.
"""
import os

from dalle_jax.evaluate import clip_cosines
from dalle_jax.evaluate import features as feat_lib
from dalle_jax.evaluate import generate as gen_lib
from dalle_jax.evaluate import stats as stats_lib

FAMILIES = {"dalle": "ar", "diffusion": "diffusion"}


class EvalMetricsError(ValueError):
  pass


def _fail(key, why):
  raise EvalMetricsError(f"config.eval_metrics.{key}: {why}")


class PeriodicMetrics:
  """Samples the fixed caption set with the current parameters and scores it."""

  def __init__(self, task, mesh):
    config = task.config
    c = config.eval_metrics
    self.task, self.mesh, self.every = task, mesh, int(c.every)
    self.family = FAMILIES.get(config.family)
    if self.family is None:
      _fail("every", f"config.family={config.family!r} cannot sample images; periodic FID / "
            f"CLIP score supports {', '.join(FAMILIES)}")
    self.metrics = [m.strip() for m in c.metrics.split(",") if m.strip()]
    if not self.metrics or any(m not in gen_lib.SCORES for m in self.metrics):
      _fail("metrics", f"{c.metrics!r}: choose from {','.join(gen_lib.SCORES)}")
    if int(c.num) < 2:
      _fail("num", f"{c.num}: at least 2 images (FID needs a covariance)")
    if int(c.batch_size) < 1:
      _fail("batch_size", f"{c.batch_size}: must be >= 1")
    if c.captions:
      if not os.path.isfile(c.captions):
        _fail("captions", f"{c.captions}: no such file")
      with open(c.captions, encoding="utf-8") as f:
        captions = [line.strip() for line in f if line.strip()]
    else:
      captions = list((config.get("sampling") or {}).get("prompts", []))
    if not captions:
      _fail("captions", "no captions (give a caption file, or set sampling.prompts)")
    self.captions = [captions[i % len(captions)] for i in range(int(c.num))]
    self.batch_size, self.seed = int(c.batch_size), int(c.seed)
    self.extractor = self.real = self.clip = None
    if "fid" in self.metrics:
      for key in ("inception", "real_stats"):
        if not c[key] or not os.path.isfile(c[key]):
          _fail(key, f"{c[key]!r}: no such file (needed for FID)")
      if c.mode not in feat_lib.MODES:
        _fail("mode", f"{c.mode!r}: choose {'|'.join(feat_lib.MODES)}")
      self.real = stats_lib.load_stats(c.real_stats)[:2]
      if self.real[0].shape[0] != 2048:
        _fail("real_stats", f"statistics of dimension {self.real[0].shape[0]}, not 2048")
      self._inception = (c.inception, c.mode)
    if "clip_score" in self.metrics and not (c.clip and os.path.exists(c.clip)):
      _fail("clip", f"{c.clip!r}: no such CLIP workdir / checkpoint (needed for CLIP score)")
    self._clip_path = c.clip
    self._sampler = None

  @classmethod
  def from_config(cls, task, mesh):
    c = task.config.get("eval_metrics")
    if c is None or not int(c.get("every", 0)):
      return None
    return cls(task, mesh)

  def due(self, step, end_step):
    return step % self.every == 0 or step == end_step

  def _build(self, params):
    """The family's pipeline around `params` (first call), else the parameters swapped in."""
    if self._sampler is not None:
      pipe = self._sampler.pipeline
      pipe.params = (pipe.decoder.shard_params(params, self.mesh, pipe.rules)
                     if self.family == "ar" else params)
      return self._sampler
    config = self.task.config
    if self.family == "ar":
      from dalle_jax.models import loader  # pylint: disable=g-import-not-at-top
      from dalle_jax.sampling import generate  # pylint: disable=g-import-not-at-top
      if not config.get("vqgan"):
        _fail("every", "the AR config records no VQGAN (config.vqgan) to decode samples")
      pipe = generate.Pipeline(config, {"params": params}, tokenizer=self.task.tokenizer,
                               vqgan=loader.load_vqgan(config.vqgan, "config.vqgan"),
                               mesh=self.mesh)
      self._sampler = gen_lib.ar_sampler(pipe, {})
    else:
      from dalle_jax.sampling import diffusion  # pylint: disable=g-import-not-at-top
      pipe = diffusion.Pipeline(config, {"params": params}, mesh=self.mesh, task=self.task)
      self._sampler = gen_lib.diffusion_sampler(pipe, {})
    if "fid" in self.metrics:
      from dalle_jax.convert import inception  # pylint: disable=g-import-not-at-top
      path, mode = self._inception
      self.extractor = feat_lib.InceptionExtractor(inception.load_inception_params(path), mode,
                                                   batch_size=self.batch_size)
    if "clip_score" in self.metrics:
      from dalle_jax.sampling import rerank  # pylint: disable=g-import-not-at-top
      self.clip = clip_cosines.ClipCosines(
          rerank.get_encoder(self._clip_path, flag="config.eval_metrics.clip"), self.batch_size)
    return self._sampler

  def __call__(self, params, step=None):
    """{'eval/fid', 'eval/clip_score', 'eval/clip_score_hessel'} for the current parameters."""
    sampler = self._build(params)
    scorer = gen_lib.Scorer(self.extractor, self.real, self.clip)
    gen_lib.sample_and_score(sampler, self.captions, self.seed, self.batch_size, scorer)
    got = scorer.result()
    out = {}
    if "fid" in got:
      out["eval/fid"] = got["fid"]["value"]
    if "clip_score" in got:
      out["eval/clip_score"] = got["clip_score"]["clip_score_torchmetrics"]
      out["eval/clip_score_hessel"] = got["clip_score"]["clip_score_hessel"]
    return out
