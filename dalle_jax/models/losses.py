"""Token-level classification losses shared by the autoregressive tasks.

`softmax_cross_entropy` is optax's `softmax_cross_entropy_with_integer_labels`
(same values and gradients) with a hand-written backward pass: over a large
vocabulary (B, N, V) the autodiff version materialises log-softmax, a one-hot
and their product as separate full-size f32 tensors; here the forward keeps
only the log-normaliser (B, N) and the backward is ONE elementwise pass,
softmax - one_hot, which XLA fuses. On XLA:CPU, where such passes cost about as
much as the vocabulary matmul itself, that is ~10% of a DALL·E train step.
"""
import jax
import jax.numpy as jnp


def _lse_and_label_logit(logits, labels):
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return lse, label_logit


@jax.custom_vjp
def softmax_cross_entropy(logits, labels):
  """-log softmax(logits)[label]: logits (..., V) any float dtype, labels (...) int."""
  lse, label_logit = _lse_and_label_logit(logits, labels)
  return lse - label_logit


def _xent_fwd(logits, labels):
  lse, label_logit = _lse_and_label_logit(logits, labels)
  return lse - label_logit, (logits, labels, lse)


def _xent_bwd(res, g):
  logits, labels, lse = res
  vocab = jnp.arange(logits.shape[-1], dtype=labels.dtype)
  probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
  one_hot = (vocab == labels[..., None]).astype(jnp.float32)
  dlogits = ((probs - one_hot) * g[..., None]).astype(logits.dtype)
  return dlogits, None


softmax_cross_entropy.defvjp(_xent_fwd, _xent_bwd)


def label_is_top(logits, labels):
  """(...) bool: the label's logit is the maximum (top-1 accuracy; ties count).

  A max-reduction plus a gather: much cheaper than argmax's (value, index)
  reduction over a large vocabulary.
  """
  logits = jax.lax.stop_gradient(logits)
  label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return label_logit >= jnp.max(logits, axis=-1)
