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


# --- attention implementations ----------------------------------------------------------

def _attention_masks():
  """name -> (mask for the implementation, the same mask as a dense bool array)."""
  from dalle_jax.models import dalle  # pylint: disable=g-import-not-at-top
  b, t = 2, 128
  key_valid = jnp.arange(t)[None, :] < jnp.array([[t], [77]])  # row 1: 51 padding keys
  causal = layers.causal_mask(t)[None, None]
  pad = key_valid[:, None, None, :]
  out = {
      "causal": (layers.AttentionMask(causal=True), causal),
      "padding": (layers.AttentionMask(key_valid_bs=key_valid), pad),
      "causal+padding": (layers.AttentionMask(key_valid_bs=key_valid, causal=True), causal & pad),
  }
  # DALL·E's sparse layers as dense masks: 64 text tokens + 8x8 codes = 128 positions
  sparse = dalle.attention_masks(64, 8, 8, ("row", "column", "conv"), conv_kernel=3)
  for name, m in zip(("row", "column", "conv"), sparse):
    out[f"dalle_{name}"] = (jnp.asarray(m)[None, None], jnp.asarray(m)[None, None])
  assert all(v[1].shape[-1] == t and v[1].shape[0] in (1, b) for v in out.values())
  return out


MASKS = _attention_masks()


@pytest.mark.parametrize("impl,mask_name", [
    ("dot_product_attention", name) for name in MASKS] + [
    ("splash", name) for name in ("causal", "causal+padding")])
def test_attention_implementations_equal_todays_path(impl, mask_name):
  """Every implementation available on CPU against the xla path (the one the
  models have always used, given the dense mask): outputs and gradients."""
  mask, dense = MASKS[mask_name]
  q, k, v = (_rand(i, (2, 128, 2, 16)) for i in range(3))
  w = _rand(9, (2, 128, 2, 16))
  loss = lambda impl, m: lambda q, k, v: jnp.sum(
      w * layers.dot_product_attention(q, k, v, m, jnp.float32, impl=impl))
  want, want_g = jax.jit(jax.value_and_grad(loss("xla", dense), (0, 1, 2)))(q, k, v)
  got, got_g = jax.jit(jax.value_and_grad(loss(impl, mask), (0, 1, 2)))(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  for g, r in zip(got_g, want_g):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_attention_mask_parts_equal_the_dense_mask_on_the_xla_path():
  mask, dense = MASKS["causal+padding"]
  q, k, v = (_rand(i, (2, 128, 2, 16)) for i in range(3))
  f = lambda m: layers.dot_product_attention(q, k, v, m, jnp.bfloat16, impl="xla")
  np.testing.assert_array_equal(np.asarray(f(mask), np.float32), np.asarray(f(dense), np.float32))


def test_attention_impl_is_chosen_by_config_and_checked():
  from dalle_jax import parallel  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  q = _rand(0, (4, 128, 2, 16))  # 4 rows: split over data x fsdp
  causal = layers.AttentionMask(causal=True)
  jaxpr = lambda: str(jax.make_jaxpr(
      lambda q: layers.dot_product_attention(q, q, q, causal, jnp.float32))(q))
  assert "custom_vjp_call" in jaxpr() and "pallas_call" not in jaxpr()  # CPU default: xla
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  for impl in ("splash", "dot_product_attention"):
    config = ml_collections.ConfigDict(dict(logical_axis_rules=common_rules(),
                                            attention_impl=impl))
    with parallel.mesh_context(mesh, config):
      text = jaxpr()
    if impl == "splash":  # under a mesh the kernel runs per shard: rows x heads
      assert "pallas_call" in text and "shard_map" in text
    else:  # jax's own: plain autodiff, no custom VJP, no kernel
      assert "custom_vjp_call" not in text and "pallas_call" not in text
  with pytest.raises(ValueError, match="attention_impl='flash': choose auto"):
    layers.attention_impl("flash")
  with pytest.raises(ValueError, match="splash attention reads masks as AttentionMask"):
    layers.dot_product_attention(q, q, q, MASKS["dalle_row"][0], jnp.float32, impl="splash")
  with pytest.raises(ValueError, match="lengths divisible by 128, got T=100"):
    layers.dot_product_attention(q[:, :100], q[:, :100], q[:, :100], None, jnp.float32,
                                 impl="splash")
  with pytest.raises(ValueError, match="'cudnn' needs a GPU"):
    layers.dot_product_attention(q, q, q, None, jnp.float32, impl="cudnn")


def common_rules():
  from dalle_jax.configs import common  # pylint: disable=g-import-not-at-top
  return common.DEFAULT_RULES


def test_splash_under_a_mesh_equals_unsharded():
  """Rows over data x fsdp, heads over tensor: the kernel in shard_map per shard."""
  from dalle_jax import parallel  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  q, k, v = (_rand(i, (4, 128, 2, 16)) for i in range(3))
  key_valid = jnp.arange(128)[None, :] < jnp.array([[128], [90], [128], [5]])
  mask = layers.AttentionMask(key_valid_bs=key_valid, causal=True)
  config = ml_collections.ConfigDict(dict(logical_axis_rules=common_rules(),
                                          attention_impl="splash"))
  f = jax.jit(lambda q, k, v: layers.dot_product_attention(q, k, v, mask, jnp.float32))
  with parallel.mesh_context(mesh, config):
    got = f(q, k, v)
  want = layers.dot_product_attention(q, k, v, mask.to_dense(128, 128), jnp.float32, impl="xla")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_attention_module_takes_attention_masks_in_training_and_decoding():
  """An AttentionMask (causal + padding parts) through layers.Attention equals its
  dense form, and KV-cache decoding one token at a time equals the full pass."""
  x = _rand(0, (2, 8, 16))
  key_valid = jnp.arange(8)[None, :] < jnp.array([[8], [5]])
  parts = layers.AttentionMask(key_valid_bs=key_valid, causal=True)
  attn = layers.Attention(2, 8)
  params = attn.init(jax.random.PRNGKey(0), x)
  full = attn.apply(params, x, mask=parts)
  np.testing.assert_allclose(full, attn.apply(params, x, mask=parts.to_dense(8, 8)), rtol=1e-6)
  with layers.attention_impl("dot_product_attention"):
    np.testing.assert_allclose(attn.apply(params, x, mask=parts), full, rtol=1e-5, atol=1e-6)
  dec = layers.Attention(2, 8, decode=True)
  cache = dec.init(jax.random.PRNGKey(0), x)["cache"]
  step = jax.jit(lambda cache, x_b1d: dec.apply({"params": params["params"], "cache": cache},
                                                 x_b1d, mask=parts, mutable=["cache"]))
  steps = []
  for i in range(8):
    y, upd = step(cache, x[:, i:i + 1])
    cache = upd["cache"]
    steps.append(y)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-5, atol=1e-6)
  both = layers.combine_masks(parts, layers.AttentionMask(dense=jnp.eye(8, dtype=bool)))
  assert both.causal and both.key_valid_bs is key_valid
  np.testing.assert_array_equal(both.to_dense(8, 8), parts.to_dense(8, 8) & jnp.eye(8, dtype=bool))
