"""Converting parameters between the scanned and per-layer layouts of `layers.Stack`.

A Stack with scan=True holds one subtree `layers` whose leaves carry a leading
(L, ...) layer axis; with scan=False it holds `layer_0` .. `layer_{L-1}`. A model
trained scanned (the big presets) can thus be sampled by a per-layer decoder
and the reverse, e.g. a per-layer import fine-tuned with scan_layers=True:

  params = to_layout(scanned_params, like=per_layer_abstract_params)

Pure jnp: runs under jit, so a conversion can be fused with a cast and placed
straight into shards (`jax.jit(..., out_shardings=...)`).

Shapes: L layers.
"""
from collections.abc import Mapping
import re

import jax
import jax.numpy as jnp

_LAYER = re.compile(r"layer_(\d+)$")


def _per_layer_count(keys):
  """L when `keys` are exactly layer_0 .. layer_{L-1}, else 0."""
  idx = sorted(int(m.group(1)) for m in map(_LAYER.match, keys) if m)
  return len(idx) if idx and len(idx) == len(keys) and idx == list(range(len(idx))) else 0


def _where(path):
  return "/".join(path) or "<root>"


def to_layout(tree, like, path=()):
  """`tree` restructured like `like` (arrays or jax.ShapeDtypeStructs of the
  target model): scanned Stacks unstacked or per-layer Stacks stacked where the
  two differ. Raises ValueError naming the first parameter path whose keys or
  shape do not fit."""
  if not isinstance(like, Mapping):
    if isinstance(tree, Mapping):
      raise ValueError(f"parameters at {_where(path)}: a subtree {sorted(tree)} where the model "
                       f"has one array {tuple(like.shape)}")
    if tuple(tree.shape) != tuple(like.shape):
      raise ValueError(f"parameter {_where(path)}: shape {tuple(tree.shape)}, the model has "
                       f"{tuple(like.shape)}")
    return tree
  if not isinstance(tree, Mapping):
    raise ValueError(f"parameter {_where(path)}: one array {tuple(tree.shape)} where the model has "
                     f"a subtree {sorted(like)}")
  keys, like_keys = set(tree), set(like)
  if keys == like_keys:
    return {k: to_layout(tree[k], like[k], path + (k,)) for k in like}
  n = _per_layer_count(like_keys)
  if keys == {"layers"} and n:  # scanned -> per layer
    stacked = tree["layers"]
    depth = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(stacked)}
    if depth != {n}:
      raise ValueError(f"parameters at {_where(path)}/layers: a layer axis of {sorted(depth, key=str)}"
                       f" where the model has {n} layers")
    return {f"layer_{i}": to_layout(jax.tree.map(lambda x, i=i: x[i], stacked), like[f"layer_{i}"],
                                    path + (f"layer_{i}",)) for i in range(n)}
  m = _per_layer_count(keys)
  if like_keys == {"layers"} and m:  # per layer -> scanned
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[f"layer_{i}"] for i in range(m)])
    return {"layers": to_layout(stacked, like["layers"], path + ("layers",))}
  missing, extra = sorted(like_keys - keys), sorted(keys - like_keys)
  raise ValueError(f"parameters at {_where(path)}: missing {missing}, unexpected {extra}")


def same_layout(tree, like):
  """True when `tree` already has `like`'s structure (no conversion needed)."""
  return jax.tree.structure(tree) == jax.tree.structure(like)
