"""CLIP reranking of generated images (DALL·E's "sample N, keep the best K").

  kept, scores = rerank("demo/clip", ["a red circle on a blue background"],
                        [images_nhw3], top_k=4)

`clip` is a training workdir, an imported checkpoint, a Hugging Face CLIP
directory, or an already loaded `dalle_jax.sampling.clip_encoder.ClipEncoder` (reused
across calls). Images are uint8 or float in [-1, 1], any size (resized to the
CLIP model's). Used by `sample.py --rerank_with CLIP --rerank_top K`.
"""
import numpy as np

from dalle_jax.sampling.clip_encoder import ClipEncoder

_CACHE = {}


def get_encoder(clip, flag="--rerank_with", **kw):
  """A ClipEncoder for a path (cached per path) or the encoder itself; a bad path
  is a loader.ModelPathError naming `flag`."""
  if isinstance(clip, ClipEncoder):
    return clip
  if clip not in _CACHE:
    _CACHE[clip] = ClipEncoder.load(clip, flag=flag, **kw)
  return _CACHE[clip]


def clip_scores(clip, prompts, images_per_prompt):
  """Cosine similarity of each prompt's images to the prompt: list of (N_i,) arrays."""
  enc = get_encoder(clip)
  if len(prompts) != len(images_per_prompt):
    raise ValueError(f"{len(prompts)} prompts but {len(images_per_prompt)} image groups")
  text_emb = enc.encode_texts(list(prompts))
  counts = [len(g) for g in images_per_prompt]
  if not sum(counts):
    return [np.zeros((0,), np.float32) for _ in prompts]
  groups = [np.asarray(g) for g in images_per_prompt if len(g)]
  dtypes = {g.dtype for g in groups}
  if len(dtypes) > 1:  # mixed uint8 / float groups: bring all to [-1, 1] floats
    groups = [g.astype(np.float32) / 127.5 - 1 if g.dtype == np.uint8 else g for g in groups]
  img_emb = enc.encode_images(np.concatenate(groups))
  out, start = [], 0
  for i, n in enumerate(counts):
    out.append((img_emb[start:start + n] @ text_emb[i]).astype(np.float32))
    start += n
  return out


def rerank(clip, prompts, images_per_prompt, top_k, return_indices=False):
  """Keeps each prompt's `top_k` images by CLIP score, best first.

  Returns (kept images: list of arrays (k, H, W, 3) in the input dtype,
  scores: list of (k,) cosine similarities[, indices into each input group]).
  """
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")
  scores = clip_scores(clip, prompts, images_per_prompt)
  kept, kept_scores, kept_idx = [], [], []
  for images, s in zip(images_per_prompt, scores):
    order = np.argsort(-s, kind="stable")[:top_k]
    kept.append(np.asarray(images)[order])
    kept_scores.append(s[order])
    kept_idx.append(order)
  if return_indices:
    return kept, kept_scores, kept_idx
  return kept, kept_scores
