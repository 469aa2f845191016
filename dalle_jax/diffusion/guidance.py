"""Classifier-free guidance in one batched forward pass, and condition dropout for training.

  out = uncond + scale * (cond - uncond)

The caller's `apply_fn` sees 2B rows — the B conditional rows, then the same B
rows unconditional — so guidance costs one model call per step. With learned
variance only the first C channels (the mean prediction) are guided and the
conditional variance half is kept, as DeepFloyd IF does.

Shapes: B batch, H height, W width, C image channels (2C outputs with learned variance).
"""
import jax
import jax.numpy as jnp


def classifier_free_guidance(apply_fn, scale, *, learned_variance=False):
  """apply_fn(x_2bhwc, t_2b) -> out_2bhwc (cond rows first) => model_fn(x_bhwc, t_b) -> out_bhwc."""
  def model_fn(x_bhwc, t_b):
    out = apply_fn(jnp.concatenate([x_bhwc, x_bhwc], axis=0), jnp.concatenate([t_b, t_b], axis=0))
    cond, uncond = jnp.split(out, 2, axis=0)
    if not learned_variance:
      return uncond + scale * (cond - uncond)
    c = x_bhwc.shape[-1]
    if out.shape[-1] != 2 * c:
      raise ValueError(f"learned_variance guidance expects {2 * c} output channels, got {out.shape[-1]}")
    guided = uncond[..., :c] + scale * (cond[..., :c] - uncond[..., :c])
    return jnp.concatenate([guided, cond[..., c:]], axis=-1)
  return model_fn


def drop_condition(rng, cond_mask_b, prob):
  """Condition dropout for guidance training: each row's condition kept with prob 1 - prob.

  Returns the new bool mask (B,): cond_mask_b and not dropped.
  """
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"cond_drop_prob must be in [0, 1], got {prob}")
  keep = jax.random.uniform(rng, cond_mask_b.shape) >= prob
  return jnp.logical_and(cond_mask_b.astype(bool), keep)
