"""The shared numerics: mixed-precision contractions and the fused cross-entropy."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dalle_jax.models import layers, losses


def _rand(key, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(key), shape, dtype)


SPECS = [
    ("btd,dhk->bthk", (2, 5, 8), (8, 2, 4)),     # q/k/v projections
    ("bthk,hkd->btd", (2, 5, 2, 4), (2, 4, 8)),  # attention output projection
    ("bthk,bshk->bhts", (2, 5, 2, 4), (2, 6, 2, 4)),  # attention logits
    ("bhts,bshk->bthk", (2, 2, 5, 6), (2, 6, 2, 4)),  # probabilities x values
]


@pytest.mark.parametrize("spec,sa,sb", SPECS)
def test_mixed_einsum_f32_equals_einsum_with_gradients(spec, sa, sb):
  a, b = _rand(0, sa), _rand(1, sb)
  bias = _rand(2, (_out_shape(spec, a, b)[-1],))
  ref = lambda a, b, c: jnp.sum(jnp.sin(jnp.einsum(spec, a, b) + c))
  ours = lambda a, b, c: jnp.sum(jnp.sin(layers.mixed_einsum(spec, a, b, jnp.float32, bias=c)))
  np.testing.assert_allclose(ours(a, b, bias), ref(a, b, bias), rtol=1e-5)
  for g_ours, g_ref in zip(jax.grad(ours, (0, 1, 2))(a, b, bias), jax.grad(ref, (0, 1, 2))(a, b, bias)):
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-5)


def _out_shape(spec, a, b):
  return jax.eval_shape(lambda a, b: jnp.einsum(spec, a, b), a, b).shape


@pytest.mark.parametrize("spec,sa,sb", SPECS)
def test_mixed_einsum_bf16_runs_and_keeps_input_dtypes(spec, sa, sb):
  """bf16 compute: every backward contraction compiles on CPU (operand order), the
  gradients come back in the inputs' dtypes (f32 params stay f32) and are close
  to the f32 ones."""
  a, b = _rand(0, sa), _rand(1, sb)
  f = lambda dt: lambda a, b: jnp.sum(
      jnp.sin(layers.mixed_einsum(spec, a, b, dt).astype(jnp.float32)))
  y16, y32 = jax.jit(f(jnp.bfloat16))(a, b), f(jnp.float32)(a, b)
  np.testing.assert_allclose(y16, y32, rtol=0.05, atol=0.05)
  g16 = jax.jit(jax.grad(f(jnp.bfloat16), (0, 1)))(a, b)
  g32 = jax.grad(f(jnp.float32), (0, 1))(a, b)
  for x16, x32 in zip(g16, g32):
    assert x16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(x16 - x32) / jnp.linalg.norm(x32))
    assert rel < 0.02, rel


def test_mixed_einsum_rejects_single_operand_sums():
  with pytest.raises(ValueError, match="summed within one operand"):
    layers.mixed_einsum("ab,bc->c", jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.float32)


def _reference_attention(q, k, v, mask):
  logits = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(mask, logits, layers.NEG_INF)
  return jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(logits, -1), v)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 0.03)])
def test_attention_hand_written_backward_matches_autodiff(dtype, tol):
  """The training attention's own VJP (probabilities kept in the compute dtype)
  against autodiff of plain f32 attention, causal mask with a fully masked
  stretch; inputs' dtypes come back."""
  q, k, v = (_rand(i, (2, 7, 3, 4)) for i in range(3))
  mask = (jnp.arange(7)[None, :] <= jnp.arange(7)[:, None])[None, None]
  mask = mask & (jnp.arange(7) != 2)  # key 2 hidden from everyone
  w = _rand(9, (2, 7, 3, 4))
  ours = lambda q, k, v: jnp.sum(
      w * layers.dot_product_attention(q, k, v, mask, dtype).astype(jnp.float32))
  ref = lambda q, k, v: jnp.sum(w * _reference_attention(q, k, v, mask))
  np.testing.assert_allclose(jax.jit(ours)(q, k, v), ref(q, k, v), rtol=tol, atol=tol)
  for g, r in zip(jax.jit(jax.grad(ours, (0, 1, 2)))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v)):
    assert g.dtype == jnp.float32
    rel = float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
    assert rel < tol, rel


def test_dense_keeps_flax_parameter_layout():
  """Checkpoints and converters rely on nn.Dense's names and shapes."""
  x = _rand(0, (3, 7))
  ours = layers.Dense(5, ("embed", "mlp"))
  p_ours = nn.meta.unbox(ours.init(jax.random.PRNGKey(0), x))
  p_ref = nn.Dense(5).init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, p_ours) == jax.tree.map(jnp.shape, p_ref)
  np.testing.assert_allclose(ours.apply(p_ours, x), nn.Dense(5).apply(p_ours, x), rtol=1e-6)


def test_cross_entropy_matches_optax_values_and_gradients():
  logits = 3 * _rand(0, (4, 6, 50))
  labels = jax.random.randint(jax.random.PRNGKey(1), (4, 6), 0, 50)
  w = _rand(2, (4, 6))
  ours = lambda x: jnp.sum(w * losses.softmax_cross_entropy(x, labels))
  ref = lambda x: jnp.sum(w * optax.softmax_cross_entropy_with_integer_labels(x, labels))
  np.testing.assert_allclose(ours(logits), ref(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(ref)(logits), atol=1e-6)
  top = losses.label_is_top(logits, labels)
  np.testing.assert_array_equal(top, jnp.argmax(logits, -1) == labels)
