"""unCLIP's diffusion prior (family `prior`): caption features -> CLIP image embedding.

Trains dalle_jax/models/prior.py on CLIP embeddings precomputed by
`python -m dalle_jax.tools.embed --clip CLIP --dataset D --out RECORDS` (a records
directory, read by the ordinary pipeline with `data.dataset = RECORDS`):

  batch: text_embed (B, E), text_states (B, S, C), text_mask (B, S) bool, image_embed (B, E)
         (raw CLIP embeddings, unnormalised)

  x0  = (image_embed - clip_mean) / clip_std           the prior's diffusion space
  loss = E_t,eps |prior(x_t, t, caption) - x0|^2       x0-prediction (Karlo), config.diffusion
Caption dropout: with probability diffusion.cond_drop_prob a row's caption features become
the empty caption's (the records' `empty_caption` split), the unconditional input that
classifier-free guidance feeds at sampling time (sampling/unclip.py).

clip_mean / clip_std are the per-dimension statistics of the training image embeddings
(tools.embed's meta; else computed from up to data.stats_examples training records); they
live in the model's non-trainable 'clip_stats' collection, so a checkpoint carries them.

Metrics: loss, loss by quarter of the timestep range, and x0_cosine: the cosine between the
denormalised x0 prediction (at the batch's random t) and the true image embedding.

Shapes: B batch, E CLIP embedding width, S caption tokens, C caption state width.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.data import pipeline
from dalle_jax.data import records
from dalle_jax.diffusion import gaussian
from dalle_jax.diffusion import guidance as guidance_lib
from dalle_jax.models import layers
from dalle_jax.models import prior as prior_lib
from dalle_jax.tasks import diffusion as diffusion_task
from dalle_jax.tasks import base

EMPTY_SPLIT = "empty_caption"
FEATURES = ("text_embed", "text_states", "text_mask", "image_embed")


def build_prior(config):
  """PriorTransformer from a full config (config.model, dtype, remat, scan_layers)."""
  kw = config.model.to_dict()
  return prior_lib.PriorTransformer(
      **kw, remat=config.remat, scan=config.scan_layers,
      dtype=layers.dtype_from_name(config.dtype),
      param_dtype=layers.dtype_from_name(config.param_dtype))


def _records_dir(data_cfg):
  """The records directory data.dataset names (as pipeline.load_source resolves it)."""
  dataset, data_dir = str(data_cfg.dataset), os.path.expanduser(str(data_cfg.data_dir))
  for path in (dataset, os.path.join(data_dir, dataset)):
    if records.is_records_dir(path):
      return path
  raise ValueError(f"config.data.dataset={dataset!r} is not a records directory of CLIP "
                   "embeddings; write one with `python -m dalle_jax.tools.embed --clip CLIP "
                   f"--dataset DATASET --out {dataset}`")


def embedding_stats(source, meta, max_examples):
  """(mean (E,), std (E,)) float32 of the image embeddings: the meta's, else computed."""
  if "image_embed_mean" in meta and "image_embed_std" in meta:
    mean = np.asarray(meta["image_embed_mean"], np.float64)
    std = np.asarray(meta["image_embed_std"], np.float64)
  else:
    n = min(len(source), int(max_examples))
    e = np.stack([r["image_embed"] for start in range(0, n, 1024)
                  for r in source.__getitems__(range(start, min(n, start + 1024)))])
    mean, std = e.astype(np.float64).mean(0), e.astype(np.float64).std(0)
  # a dimension constant over the data would divide by zero
  return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


class PriorTask(base.Task):
  name = "prior"

  def __init__(self, config):
    super().__init__(config)
    self.model = build_prior(self.config)
    self.sched = diffusion_task.scheduler_config(self.config.diffusion)
    self.diffusion = gaussian.Diffusion(self.sched)
    self._data = None

  # --- data ----------------------------------------------------------------
  def data(self):
    """{'mean', 'std', 'empty'} from the records directory (read once, checked against the
    model: each mismatch names the config key)."""
    if self._data is not None:
      return self._data
    d, m = self.config.data, self.config.model
    path = _records_dir(d)
    train = records.RecordsSource(path, d.train_split)
    missing = [f for f in FEATURES if f not in train.features]
    if missing:
      raise ValueError(f"{path}: records lack {', '.join(missing)} (write them with "
                       "`tools.embed --clip CLIP --dataset ...`)")
    first = train[0]
    e, (s, c) = first["image_embed"].shape[0], first["text_states"].shape
    for key, want, have in (("embed_dim", m.embed_dim, e), ("text_len", m.text_len, s),
                            ("text_dim", m.text_dim or m.embed_dim, c)):
      if want != have:
        raise ValueError(f"config.model.{key}={want} but the CLIP embeddings in {path} give "
                         f"{have} (the prior must match the CLIP it learns from)")
    try:
      empty = records.RecordsSource(path, EMPTY_SPLIT)[0]
    except ValueError:
      raise ValueError(f"{path}: no {EMPTY_SPLIT!r} split (the unconditional caption for "
                       "caption dropout); rewrite the records with tools.embed") from None
    mean, std = embedding_stats(train, train.meta, d.get("stats_examples", 20000))
    self._data = {"mean": mean, "std": std,
                  "empty": {k: np.asarray(empty[k]) for k in FEATURES[:3]}}
    return self._data

  def preprocess(self, example):
    missing = [f for f in FEATURES if f not in example]
    if missing:
      raise KeyError(f"the prior trains on CLIP embeddings (tools.embed --dataset); example "
                     f"has fields {sorted(example)}, lacks {missing}")
    return {k: example[k] for k in FEATURES}

  def make_iterator(self, split, batch_size, *, shuffle=True, repeat=True):
    self.data()  # the records checked before any batch is read
    return pipeline.make_iterator(self.config.data, split, batch_size, seed=self.config.seed,
                                  preprocess=self.preprocess, shuffle=shuffle, repeat=repeat)

  def dummy_batch(self, batch_size):
    m = self.config.model
    e, s, c = m.embed_dim, m.text_len, m.text_dim or m.embed_dim
    return {"text_embed": np.zeros((batch_size, e), np.float32),
            "text_states": np.zeros((batch_size, s, c), np.float32),
            "text_mask": np.ones((batch_size, s), bool),
            "image_embed": np.zeros((batch_size, e), np.float32)}

  # --- model ---------------------------------------------------------------
  def init(self, rng, batch):
    variables = self.model.init({"params": rng}, *prior_lib.example_inputs(self.model))
    data = self.data()
    stats = dict(variables[prior_lib.STATS])
    for k in ("mean", "std"):  # the boxes keep their logical names
      stats[k] = stats[k].replace_boxed(jnp.asarray(data[k]))
    return dict(variables, **{prior_lib.STATS: stats})

  def _caption(self, batch, rng, train):
    """The batch's caption features, each row swapped for the empty caption's with
    probability cond_drop_prob when training."""
    cap = {k: batch[k] for k in FEATURES[:3]}
    p = float(self.config.diffusion.cond_drop_prob)
    if not train or p <= 0:
      return cap
    b = batch["image_embed"].shape[0]
    keep_b = guidance_lib.drop_condition(rng, jnp.ones((b,), bool), p)
    empty = self.data()["empty"]

    def swap(k):
      keep = keep_b.reshape((b,) + (1,) * (cap[k].ndim - 1))
      return jnp.where(keep, cap[k], jnp.asarray(empty[k], cap[k].dtype)[None])
    return {k: swap(k) for k in cap}

  def _loss(self, params, model_state, batch, rng, train):
    k_drop, k_loss = jax.random.split(rng)
    stats = model_state[prior_lib.STATS]
    variables = {"params": params, prior_lib.STATS: stats}
    cap = self._caption(batch, k_drop, train)
    x0 = prior_lib.normalize(stats, batch["image_embed"])
    seen = []  # the one model call's (x_t, output), for the x0 metric

    def model_fn(x_t, t_b):
      out = self.model.apply(variables, x_t, t_b, cap["text_embed"], cap["text_states"],
                             cap["text_mask"])
      seen.append((x_t, out))
      return out
    d = self.config.diffusion
    loss_b, t_b = self.diffusion.training_loss(model_fn, x0, k_loss, weighting=d.loss_weighting,
                                               min_snr_gamma=float(d.min_snr_gamma))
    x_t, out = seen[0]
    x0_pred = self.diffusion.model_output_to_eps_x0(out, x_t, t_b)[1]
    pred_e = prior_lib.denormalize(stats, x0_pred)
    true_e = batch["image_embed"].astype(jnp.float32)
    cos_b = jnp.sum(pred_e * true_e, -1) / jnp.maximum(
        jnp.linalg.norm(pred_e, axis=-1) * jnp.linalg.norm(true_e, axis=-1), 1e-12)
    metrics = {"x0_cosine": jnp.mean(jax.lax.stop_gradient(cos_b))}
    metrics.update(gaussian.loss_by_quarter(loss_b, t_b, self.sched.num_train_timesteps))
    return jnp.mean(loss_b), metrics

  def loss_fn(self, params, model_state, batch, rng, step):
    loss, metrics = self._loss(params, model_state, batch, rng, train=True)
    return loss, (metrics, model_state)

  def eval_fn(self, params, model_state, batch, rng):
    loss, metrics = self._loss(params, model_state, batch, rng, train=False)
    return dict(metrics, loss=loss)

  def flops_per_example(self):
    """Training FLOPs (3x forward) of one caption: the stream's matmuls and attention."""
    m = self.config.model
    d = m.num_heads * m.head_dim
    n = m.text_len + prior_lib.NUM_EXTRA_TOKENS
    mlp = m.mlp_dim or 4 * d
    per_layer = 2 * n * (4 * d * d + 2 * d * mlp) + 4 * n * n * d
    return 3 * (m.num_layers * per_layer + 2 * n * d * (m.text_dim or m.embed_dim))


TASK = PriorTask
