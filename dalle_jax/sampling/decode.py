"""Autoregressive image-code decoding with a KV cache, as compiled loops.

One `Decoder` per layout wraps the Flax model's cache-mode methods:
  prefill(params, cache, text, mask) -> (logits (B, V), cache)   text in, logits for code 0
  step(params, cache, code, j, mask) -> (logits (B, V), cache)   code j in, logits for code j+1
`generate` then runs all steps inside `lax.fori_loop`s — one compiled loop per
chunk of tokens (the chunks only exist to drive a progress bar; the result
does not depend on them). Batched over prompts x samples.

Classifier-free ("super-condition") guidance runs the conditional and the
unconditional streams as ONE batch of 2B rows: logits = u + s (c - u).
Only the first `valid_vocab` logits (real codes) can be sampled. Sampling is a
pure function of the seed: token j uses fold_in(rng, j).

Shapes: B batch (rows that get distinct samples), L text length, N codes, V logits.
"""
import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  temperature: float = 1.0  # <= 0: greedy
  top_k: int = 0  # 0 = off; 1 = greedy
  top_p: float = 1.0  # nucleus mass; 1 = off
  guidance_scale: float = 1.0  # 1 = no unconditional stream

  @property
  def greedy(self):
    return self.top_k == 1 or self.temperature <= 0

  @property
  def guided(self):
    return self.guidance_scale != 1.0


def guide(logits_2bv, scale):
  """[cond; uncond] rows (2B, V) -> uncond + scale * (cond - uncond), (B, V)."""
  cond, uncond = jnp.split(logits_2bv, 2, axis=0)
  return uncond + scale * (cond - uncond)


def filter_logits(logits_bv, *, top_k=0, top_p=1.0, valid_vocab=None):
  """-inf outside the valid vocabulary, the top-k, and the top-p nucleus."""
  v = logits_bv.shape[-1]
  logits_bv = logits_bv.astype(jnp.float32)
  if valid_vocab is not None and valid_vocab < v:
    logits_bv = jnp.where(jnp.arange(v) < valid_vocab, logits_bv, -jnp.inf)
  if top_k and top_k < v:
    kth_b1 = jax.lax.top_k(logits_bv, top_k)[0][..., -1:]
    logits_bv = jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)
  if top_p < 1.0:
    sorted_bv = jnp.sort(logits_bv, axis=-1)[..., ::-1]
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
    before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    n_keep_b1 = jnp.sum(before_bv < top_p, axis=-1, keepdims=True)
    thresh_b1 = jnp.take_along_axis(sorted_bv, n_keep_b1 - 1, axis=-1)
    logits_bv = jnp.where(logits_bv < thresh_b1, -jnp.inf, logits_bv)
  return logits_bv


def sample_logits(rng, logits_bv, sp: SamplingParams, valid_vocab=None):
  """One token per row (B,) int32."""
  if sp.greedy:
    return filter_logits(logits_bv, valid_vocab=valid_vocab).argmax(-1).astype(jnp.int32)
  logits_bv = filter_logits(logits_bv / sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
                            valid_vocab=valid_vocab)
  return jax.random.categorical(rng, logits_bv, axis=-1).astype(jnp.int32)


# --- layout adapters -----------------------------------------------------------

class Decoder:
  """Cache-mode interface over one layout's Flax model."""
  num_codes: int
  valid_vocab: int
  text_len: int

  def __init__(self, model):
    self.model = model  # decode=False (teacher forcing)
    self.cached = model.clone(decode=True)

  def _init_args(self, b):
    raise NotImplementedError

  def init_cache(self, batch):
    shapes = jax.eval_shape(lambda: self.cached.init(jax.random.PRNGKey(0), *self._init_args(batch)))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(shapes["cache"]))

  def prefill(self, params, cache, text, mask):
    raise NotImplementedError

  def step(self, params, cache, code_b, j, mask):
    raise NotImplementedError

  def image_logits(self, params, text, mask, codes):
    """Teacher-forced logits (B, N, V) for every code (no cache)."""
    raise NotImplementedError


class DalleDecoder(Decoder):
  """models.dalle.DalleTransformer (decoder-only)."""

  def __init__(self, model):
    super().__init__(model)
    self.num_codes = model.image_grid ** 2
    self.valid_vocab = model.image_vocab_size
    self.text_len = model.text_len

  def _text(self, text, mask):
    from dalle_jax.models.dalle import pad_text
    return pad_text(text, mask, self.model.text_vocab_size)

  def _init_args(self, b):
    return (jnp.zeros((b, self.text_len), jnp.int32), jnp.zeros((b, self.num_codes), jnp.int32))

  def prefill(self, params, cache, text, mask):
    logits, upd = self.cached.apply({"params": params, "cache": cache}, self._text(text, mask),
                                    method="prefill", mutable=["cache"])
    return logits, upd["cache"]

  def step(self, params, cache, code_b, j, mask):
    logits, upd = self.cached.apply({"params": params, "cache": cache}, code_b, j,
                                    method="step", mutable=["cache"])
    return logits, upd["cache"]

  def image_logits(self, params, text, mask, codes):
    return self.model.apply({"params": params}, self._text(text, mask), codes)[1]


class DalleMiniDecoder(Decoder):
  """models.dalle_mini.DalleMini (encoder-decoder)."""

  def __init__(self, model):
    super().__init__(model)
    self.num_codes = model.image_grid ** 2
    self.valid_vocab = model.image_vocab_size
    self.text_len = model.text_len

  def _init_args(self, b):
    return (jnp.zeros((b, self.text_len), jnp.int32), jnp.ones((b, self.text_len), bool),
            jnp.zeros((b, self.num_codes), jnp.int32))

  def prefill(self, params, cache, text, mask):
    logits, upd = self.cached.apply({"params": params, "cache": cache}, text, mask,
                                    method="prefill", mutable=["cache"])
    return logits, upd["cache"]

  def step(self, params, cache, code_b, j, mask):
    logits, upd = self.cached.apply({"params": params, "cache": cache}, code_b, j, mask,
                                    method="step", mutable=["cache"])
    return logits, upd["cache"]

  def image_logits(self, params, text, mask, codes):
    return self.model.apply({"params": params}, text, mask, codes)


def make_decoder(config):
  """Decoder adapter for config.model.layout (imported or trained config).

  Cached per model config, so that its compiled sampling loops are reused.
  """
  import json  # pylint: disable=g-import-not-at-top
  key = json.dumps({"model": config.model.to_dict(), "dtype": config.get("dtype"),
                    "param_dtype": config.get("param_dtype")}, sort_keys=True, default=str)
  return _make_decoder(key)


@functools.lru_cache(maxsize=8)
def _make_decoder(key):
  import json  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  spec = json.loads(key)
  model_cfg = ml_collections.ConfigDict(spec["model"])
  layout = model_cfg.get("layout", "dalle")
  kw = dict(dtype=spec["dtype"], param_dtype=spec["param_dtype"])
  if layout == "dalle":
    from dalle_jax.models import dalle
    return DalleDecoder(dalle.from_config(model_cfg, **kw))
  if layout == "dalle_mini":
    from dalle_jax.models import dalle_mini
    return DalleMiniDecoder(dalle_mini.from_config(model_cfg, **kw))
  raise ValueError(f"config.model.layout={layout!r}: expected 'dalle' or 'dalle_mini'")


# --- the sampling loop ------------------------------------------------------------

def _with_uncond(text, mask, uncond_text, uncond_mask):
  """[cond; uncond] rows: (2B, L)."""
  ut = jnp.broadcast_to(jnp.asarray(uncond_text, text.dtype).reshape(-1, text.shape[1])[:1], text.shape)
  um = jnp.broadcast_to(jnp.asarray(uncond_mask, bool).reshape(-1, text.shape[1])[:1], mask.shape)
  return jnp.concatenate([text, ut], 0), jnp.concatenate([mask, um], 0)


def _compiled(decoder, sp):
  """jitted (prefill, chunk, last) for one decoder and sampling setting (cached)."""
  key = sp
  cache = decoder.__dict__.setdefault("_compiled", {})
  if key in cache:
    return cache[key]
  n = decoder.num_codes

  def pick(logits, rng, j):
    if sp.guided:
      logits = guide(logits, sp.guidance_scale)
    return sample_logits(jax.random.fold_in(rng, j), logits, sp, decoder.valid_vocab)

  @jax.jit
  def prefill(params, text, mask, cache0):
    return decoder.prefill(params, cache0, text, mask)

  @jax.jit
  def chunk(params, state, mask, rng, start, stop):
    def body(j, st):
      kv, logits, codes = st
      tok_b = pick(logits, rng, j)
      codes = jax.lax.dynamic_update_slice(codes, tok_b[:, None], (0, j))
      feed = jnp.concatenate([tok_b, tok_b]) if sp.guided else tok_b
      logits, kv = decoder.step(params, kv, feed, j, mask)
      return kv, logits, codes
    return jax.lax.fori_loop(start, stop, body, state)

  @jax.jit
  def last(state, rng):
    _, logits, codes = state
    return codes.at[:, n - 1].set(pick(logits, rng, n - 1))

  cache[key] = (prefill, chunk, last)
  return cache[key]


def generate(decoder, params, text, mask, *, rng, sp: SamplingParams = SamplingParams(),
             uncond_text=None, uncond_mask=None, chunk=64, progress=False, desc="decoding"):
  """Samples codes (B, N) int32 for B text rows (repeat a prompt for several samples).

  uncond_text/uncond_mask: one (L,) row, the blank caption (needed when guided).
  """
  text = jnp.asarray(text, jnp.int32)
  mask = jnp.asarray(mask, bool)
  b, n = text.shape[0], decoder.num_codes
  if sp.guided:
    if uncond_text is None:
      raise ValueError("guidance_scale != 1 needs the unconditional (blank caption) text")
    text, mask = _with_uncond(text, mask, uncond_text, uncond_mask)
  prefill_fn, chunk_fn, last_fn = _compiled(decoder, sp)
  logits, kv = prefill_fn(params, text, mask, decoder.init_cache(text.shape[0]))
  state = (kv, logits, jnp.zeros((b, n), jnp.int32))
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=n, desc=desc, unit="tok")
  chunk = max(1, int(chunk))
  for start in range(0, n - 1, chunk):
    stop = min(start + chunk, n - 1)
    state = chunk_fn(params, state, mask, rng, jnp.int32(start), jnp.int32(stop))
    if bar is not None:
      jax.block_until_ready(state[1])
      bar.update(stop - start)
  codes = last_fn(state, rng)
  if bar is not None:
    jax.block_until_ready(codes)
    bar.update(1)
    bar.close()
  return codes


def _compiled_no_cache(decoder, sp):
  """jitted full-recompute loop for one decoder and sampling setting (cached)."""
  cache = decoder.__dict__.setdefault("_compiled_no_cache", {})
  if sp in cache:
    return cache[sp]
  n = decoder.num_codes

  @jax.jit
  def run(params, text, mask, rng):
    b = text.shape[0] // 2 if sp.guided else text.shape[0]
    def body(j, codes):
      full = jnp.concatenate([codes, codes]) if sp.guided else codes
      logits = jax.lax.dynamic_index_in_dim(decoder.image_logits(params, text, mask, full), j,
                                            axis=1, keepdims=False)
      if sp.guided:
        logits = guide(logits, sp.guidance_scale)
      tok = sample_logits(jax.random.fold_in(rng, j), logits, sp, decoder.valid_vocab)
      return codes.at[:, j].set(tok)
    return jax.lax.fori_loop(0, n, body, jnp.zeros((b, n), jnp.int32))

  cache[sp] = run
  return run


def generate_no_cache(decoder, params, text, mask, *, rng, sp: SamplingParams = SamplingParams(),
                      uncond_text=None, uncond_mask=None):
  """Reference/baseline: recomputes the whole prefix at every step (no KV cache).

  Same sampling rule and RNG use as `generate`, so it returns the same codes.
  """
  text = jnp.asarray(text, jnp.int32)
  mask = jnp.asarray(mask, bool)
  if sp.guided:
    text, mask = _with_uncond(text, mask, uncond_text, uncond_mask)
  return _compiled_no_cache(decoder, sp)(params, text, mask, rng)
