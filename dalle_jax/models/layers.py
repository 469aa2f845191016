"""Shared transformer building blocks (attention, MLP, norms, embeddings, stacks).

Every parameter carries logical axis names (`embed`, `heads`, `kv`, `mlp`,
`vocab`, `norm`, `layers`) so that `dalle_jax.parallel` can map them onto a
mesh; key activations are constrained with `batch`/`length`/`embed` names.
Used by the autoregressive models (DALL·E, DALL·E mini) and CLIP alike.

Attention implementations (`attention_impl(name)` context, set from
`config.attention_impl` by `parallel.mesh_context`; or `impl=` per call):

  xla                    ours: (B, H, T, S) logits in f32, probabilities kept in the
                         compute dtype, hand-written backward pass. Any mask. The
                         default on CPU (fastest there, see benchmarks/bench_attention.py)
                         and for KV-cache decoding everywhere.
  dot_product_attention  jax.nn.dot_product_attention, XLA implementation: same
                         maths, jax's autodiff. Any mask.
  cudnn                  jax.nn.dot_product_attention(implementation="cudnn"): cuDNN
                         flash attention on NVIDIA GPUs (bf16/f16, head dim <= 128):
                         no (B, H, T, S) logits; causal masks skip their upper
                         triangle; other masks become an additive (.., T, S) bias.
  splash                 the Pallas splash-attention kernel on TPU (blocks of 128-512
                         queries/keys, so T and S must be multiples of 128; causal
                         and key-padding masks only, given as an AttentionMask); in
                         shard_map over the batch / heads axes under a mesh. Off TPU
                         it runs in Pallas interpret mode (tests only: slow).
  auto                   TPU: splash where it applies, GPU: cudnn where cuDNN accepts
                         the call, else xla.

Fused kernels read `AttentionMask(causal=..., key_valid_bs=...)` without a dense
(T, S) array; a plain bool mask works everywhere but splash. Block-sparse
patterns (objects with `attend`) keep their own kernel.

Shapes: B batch, T query length, S key length, D model width, H heads,
K head dim, F MLP width, L layers.
"""
import functools
import logging
from typing import Any, Callable, Optional, Sequence

from flax import struct
import flax.linen as nn
from flax.linen import dtypes as flax_dtypes
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
NEG_INF = -1e10


def dtype_from_name(name):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name] if isinstance(name, str) else name


def constrain(x, names):
  """Logical sharding constraint on an activation (no-op outside a mesh)."""
  return nn.with_logical_constraint(x, names)


# --- mixed-precision contractions ------------------------------------------------
#
# Every matmul of the models goes through `mixed_einsum`: inputs are cast to the
# compute dtype (bf16) and products accumulate and come out in f32, in the forward
# pass AND in both backward matmuls. Plain autodiff of a bf16 einsum does not do
# this: it asks the backend for bf16 *outputs* (on XLA:CPU that path runs at
# about half the bf16->f32 rate) or, with preferred_element_type=f32 in the
# forward, contracts an f32 cotangent with a bf16 operand (an f32 matmul). The
# weight gradient also stays f32, so parameters see no extra rounding.

def _einsum_f32(spec, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5))
def _mixed_einsum(spec, a, b, bias, dtype, out_dtype):
  return _mixed_einsum_fwd(spec, a, b, bias, dtype, out_dtype)[0]


def _mixed_einsum_fwd(spec, a, b, bias, dtype, out_dtype):
  a_c, b_c = a.astype(dtype), b.astype(dtype)
  y = _einsum_f32(spec, a_c, b_c)
  if bias is not None:  # added in f32, before the output is rounded
    y = y + bias.astype(jnp.float32)
  # Residuals in the compute dtype; zero-size arrays carry the inputs' dtypes
  # (and the bias's rank).
  like = lambda v: None if v is None else jnp.zeros((0,) * max(v.ndim, 1), v.dtype)
  return y.astype(out_dtype), (a_c, b_c, like(a), like(b), like(bias))


def _split_spec(spec):
  """'ab,bc->ac' -> ('ab', 'bc', 'ac')."""
  ins, out = spec.replace(" ", "").split("->")
  sa, sb = ins.split(",")
  return sa, sb, out


def _mixed_einsum_bwd(spec, dtype, out_dtype, res, g):
  a_c, b_c, a_dt, b_dt, bias_dt = res
  sa, sb, out = _split_spec(spec)
  g = g.astype(dtype)
  da = _ordered_einsum_f32(out, sb, sa, g, b_c).astype(a_dt.dtype)
  db = _ordered_einsum_f32(sa, out, sb, a_c, g).astype(b_dt.dtype)
  dbias = None
  if bias_dt is not None:  # the bias spans the trailing output dims
    lead = tuple(range(g.ndim - bias_dt.ndim))
    dbias = jnp.sum(g, axis=lead, dtype=jnp.float32).astype(bias_dt.dtype)
  return da, db, dbias


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def _ordered_einsum_f32(sx, sy, so, x, y):
  # XLA:CPU has no generic bf16 x bf16 -> f32 dot: some operand orders of a
  # batched contraction fail with "Unsupported element type for DotThunk". The
  # larger operand first maps onto its fast path in every form the models use.
  if y.size > x.size:
    sx, sy, x, y = sy, sx, y, x
  return _einsum_f32(f"{sx},{sy}->{so}", x, y)


def mixed_einsum(spec, a, b, dtype, out_dtype=None, bias=None):
  """einsum(spec, a, b) [+ bias] computed in `dtype` with f32 accumulation (see
  above), returned in `out_dtype` (default `dtype`). `bias` is added in f32 and
  broadcasts against the output's trailing dims.

  Two operands, explicit output, and no index summed within one operand alone
  (so each input's gradient is itself a two-operand einsum).
  """
  sa, sb, out = _split_spec(spec)
  for own, other in ((sa, sb), (sb, sa)):
    if any(i not in out and i not in other for i in own):
      raise ValueError(f"mixed_einsum({spec!r}): an index is summed within one operand")
  return _mixed_einsum(f"{sa},{sb}->{out}", a, b, bias, jnp.dtype(dtype),
                       jnp.dtype(out_dtype or dtype))


def dense_init(std=None):
  return nn.initializers.normal(std) if std else nn.initializers.lecun_normal()


class DenseGeneral(nn.Module):
  """nn.DenseGeneral with logical axis names on kernel and bias."""
  features: Any
  kernel_axes: Sequence[str]
  axis: Any = -1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    features = self.features if isinstance(self.features, tuple) else (self.features,)
    n_out = len(features)
    bias_axes = tuple(self.kernel_axes[-n_out:])
    return _DenseGeneralKernel(
        features=features, axis=self.axis, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=self.kernel_init,
        kernel_axes=tuple(self.kernel_axes), bias_axes=bias_axes, name="dense")(x)


class _DenseGeneralKernel(nn.Module):
  """The 'dense' child of DenseGeneral: same parameters as nn.DenseGeneral
  (kernel (*in, *out), bias (*out)), but the kernel is created in its final
  shape so that its logical-axis constraint also holds at init under a mesh
  (nn.DenseGeneral constrains a flat (in, out) kernel with the N-d names).
  Initialised as the flat 2-D kernel reshaped, like nn.DenseGeneral (fan-in =
  all input features)."""
  features: Any
  axis: Any
  use_bias: bool
  dtype: Dtype
  param_dtype: Dtype
  kernel_init: Callable
  kernel_axes: Sequence[str]
  bias_axes: Sequence[str]

  @nn.compact
  def __call__(self, x):
    axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
    axes = tuple(a % x.ndim for a in axes)
    in_shape = tuple(x.shape[a] for a in axes)
    n_in = int(np.prod(in_shape))
    n_out = int(np.prod(self.features))
    init = self.kernel_init

    def flat_init(key, shape, dtype):
      return jnp.reshape(init(key, (n_in, n_out), dtype), shape)

    kernel = self.param("kernel", nn.with_logical_partitioning(flat_init, tuple(self.kernel_axes)),
                        in_shape + tuple(self.features), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.bias_axes)),
                        tuple(self.features), self.param_dtype)
    return mixed_einsum(_dense_spec(x.ndim, axes, len(self.features)), x, kernel,
                        flax_dtypes.canonicalize_dtype(x, kernel, dtype=self.dtype), bias=bias)


def _dense_spec(ndim, axes, n_out):
  """einsum spec contracting x's `axes` with a kernel's leading dims ('abc,cd->abd')."""
  letters = "abcdefghijklmnopqrstuvwxyz"
  x = letters[:ndim]
  outs = letters[ndim:ndim + n_out]
  kept = "".join(l for i, l in enumerate(x) if i not in axes)
  return f"{x},{''.join(x[a] for a in axes)}{outs}->{kept}{outs}"


class Dense(nn.Module):
  """2-D dense layer (same parameters as nn.Dense: kernel (in, out), bias (out,)),
  kernel named by `kernel_axes`, matmul through `mixed_einsum`."""
  features: int
  kernel_axes: Sequence[str]
  use_bias: bool = True
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  out_dtype: Optional[Dtype] = None  # e.g. f32 logits straight from the accumulator

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init,
                                                               tuple(self.kernel_axes)),
                        (x.shape[-1], self.features), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             (self.kernel_axes[-1],)),
                        (self.features,), self.param_dtype)
    return mixed_einsum(_dense_spec(x.ndim, (x.ndim - 1,), 1), x, kernel,
                        flax_dtypes.canonicalize_dtype(x, kernel, dtype=self.dtype),
                        out_dtype=self.out_dtype, bias=bias)


def LayerNorm(name=None, use_bias=True, use_scale=True, epsilon=1e-5, dtype=jnp.float32,
              param_dtype=jnp.float32):
  """LayerNorm computed in f32 for stability; parameters named ('norm',)."""
  return nn.LayerNorm(
      epsilon=epsilon, use_bias=use_bias, use_scale=use_scale, dtype=dtype,
      param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def Embed(num_embeddings, features, name=None, std=0.02, dtype=jnp.float32,
          param_dtype=jnp.float32, axes=("vocab", "embed")):
  return nn.Embed(
      num_embeddings, features, dtype=dtype, param_dtype=param_dtype, name=name,
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes))


def param_with_axes(module, name, init, shape, axes, dtype=jnp.float32):
  """A raw parameter with logical names (positional tables, class tokens...)."""
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), shape, dtype)


ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "swish": nn.swish,
    "relu": nn.relu,
}


def causal_mask(t, s=None):
  """(T, S) bool: query i may attend key j <= i (+ offset when S > T)."""
  s = t if s is None else s
  return jnp.arange(s)[None, :] <= (jnp.arange(t)[:, None] + (s - t))


def _attention_heads_major(q_bthk, k_bshk, v_bshk, mask, dtype):
  # Without gradients, heads-major contractions (plain batched matmuls over (B, H)):
  # left to XLA:CPU, the (B, T, H, K) forms made a forward-only U-Net program
  # (sampling) 5x slower at 8 heads of 8 channels. Training keeps the forms below,
  # whose steps measured the same or faster.
  q, k, v = (jnp.swapaxes(a.astype(dtype), 1, 2) for a in (q_bthk, k_bshk, v_bshk))
  logits_bhts = _einsum_f32("bhtk,bhsk->bhts", q, k)
  if mask is not None:
    logits_bhts = jnp.where(mask, logits_bhts, NEG_INF)
  e_bhts = jnp.exp(logits_bhts - jnp.max(logits_bhts, -1, keepdims=True))
  probs_bhts = (e_bhts * (1.0 / jnp.sum(e_bhts, -1, keepdims=True))).astype(dtype)
  return jnp.swapaxes(_einsum_f32("bhts,bhsk->bhtk", probs_bhts, v), 1, 2).astype(dtype)


def _attention_core_fwd(q_bthk, k_bshk, v_bshk, mask, dtype):
  q, k, v = q_bthk.astype(dtype), k_bshk.astype(dtype), v_bshk.astype(dtype)
  logits_bhts = _einsum_f32("bthk,bshk->bhts", q, k)
  if mask is not None:
    logits_bhts = jnp.where(mask, logits_bhts, NEG_INF)
  e_bhts = jnp.exp(logits_bhts - jnp.max(logits_bhts, -1, keepdims=True))
  probs_bhts = (e_bhts * (1.0 / jnp.sum(e_bhts, -1, keepdims=True))).astype(dtype)
  out_bthk = _einsum_f32("bhts,bshk->bthk", probs_bhts, v).astype(dtype)
  like = lambda x: jnp.zeros((0,), x.dtype)
  return out_bthk, (q, k, v, probs_bhts, like(q_bthk), like(k_bshk), like(v_bshk))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_core(q_bthk, k_bshk, v_bshk, mask, dtype):
  return _attention_heads_major(q_bthk, k_bshk, v_bshk, mask, dtype)


def _attention_core_bwd(dtype, res, g_bthk):
  # Softmax backward from the probabilities kept in the compute dtype (the
  # rounding the forward's probs @ v already used): one f32 pass, where
  # autodiff kept f32 probabilities plus a materialised broadcast of 1/sum.
  q, k, v, probs_bhts, q_dt, k_dt, v_dt = res
  g = g_bthk.astype(dtype)
  dv = _einsum_f32("bhts,bthk->bshk", probs_bhts, g)
  dprobs_bhts = _einsum_f32("bthk,bshk->bhts", g, v)
  p = probs_bhts.astype(jnp.float32)
  dlogits_bhts = (p * (dprobs_bhts - jnp.sum(dprobs_bhts * p, -1, keepdims=True))).astype(dtype)
  dq = _einsum_f32("bhts,bshk->bthk", dlogits_bhts, k)
  dk = _einsum_f32("bhts,bthk->bshk", dlogits_bhts, q)
  return dq.astype(q_dt.dtype), dk.astype(k_dt.dtype), dv.astype(v_dt.dtype), None


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def _shift_blocks(x_bq, offset):
  """x[:, i - offset] at block i (zeros where i < offset): (B, Q, ...) -> same."""
  if offset == 0:
    return x_bq
  pad = jnp.zeros(x_bq.shape[:1] + (offset,) + x_bq.shape[2:], x_bq.dtype)
  return jnp.concatenate([pad, x_bq[:, :-offset]], axis=1)


def banded_block_attention(q_bqthk, k_bqshk, v_bqshk, prefix_blocks, offsets, mask_qtm, dtype):
  """Block-sparse attention over a blocked stream, without gathers.

  The stream is cut into Q blocks of `bs` positions. Query block i attends to
  the first `prefix_blocks` key blocks (shared by every query: e.g. the text)
  and to key blocks i - o for o in `offsets` (a band: e.g. the previous row),
  so scores are computed for (prefix_blocks + len(offsets)) x bs keys per query
  instead of the whole stream; the bands are static shifts, so the backward
  pass needs no scatter.
  q, k, v: (B, Q, bs, H, K); mask_qtm: (Q, bs, M) bool with M = (prefix_blocks
  + len(offsets)) * bs, True = may attend, covering each allowed key exactly
  once. Returns (B, Q, bs, H, K).
  """
  scale = jnp.asarray(q_bqthk.shape[-1] ** -0.5, q_bqthk.dtype)
  q_bqthk = q_bqthk * scale
  kp_bpshk, vp_bpshk = k_bqshk[:, :prefix_blocks], v_bqshk[:, :prefix_blocks]
  band = lambda x: jnp.stack([_shift_blocks(x, o) for o in offsets], axis=2)  # (B, Q, O, bs, H, K)
  kb_bqoshk, vb_bqoshk = band(k_bqshk), band(v_bqshk)
  lp_bhqtps = mixed_einsum("bqthk,bpshk->bhqtps", q_bqthk, kp_bpshk, dtype, jnp.float32)
  lb_bhqtos = mixed_einsum("bqthk,bqoshk->bhqtos", q_bqthk, kb_bqoshk, dtype, jnp.float32)
  b, h, nq, bs = lp_bhqtps.shape[:4]
  logits_bhqtm = jnp.concatenate([lp_bhqtps.reshape(b, h, nq, bs, -1),
                                  lb_bhqtos.reshape(b, h, nq, bs, -1)], axis=-1)
  logits_bhqtm = jnp.where(mask_qtm, logits_bhqtm, NEG_INF)
  probs_bhqtm = jax.nn.softmax(logits_bhqtm, axis=-1)
  n_prefix = prefix_blocks * bs
  pp = probs_bhqtm[..., :n_prefix].reshape(lp_bhqtps.shape)
  pb = probs_bhqtm[..., n_prefix:].reshape(lb_bhqtos.shape)
  out_f32 = (mixed_einsum("bhqtps,bpshk->bqthk", pp, vp_bpshk, dtype, jnp.float32) +
             mixed_einsum("bhqtos,bqoshk->bqthk", pb, vb_bqoshk, dtype, jnp.float32))
  return out_f32.astype(dtype)


# --- attention implementations -----------------------------------------------------

ATTENTION_IMPLS = ("auto", "xla", "dot_product_attention", "cudnn", "splash")
_attention_impls = ["auto"]  # innermost attention_impl context last


def check_attention_impl(name):
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={name!r}: choose {' | '.join(ATTENTION_IMPLS)}")
  return name


class attention_impl:
  """`with attention_impl("cudnn"):` — the implementation full attention uses while
  tracing inside (see the module docstring); contexts nest."""

  def __init__(self, name):
    self.name = check_attention_impl(name)

  def __enter__(self):
    _attention_impls.append(self.name)
    return self

  def __exit__(self, *exc):
    _attention_impls.pop()


@struct.dataclass
class AttentionMask:
  """A mask in the parts fused kernels read natively, ANDed together:
  `causal` (key j <= query i + S - T), `key_valid_bs` (B, S) bool (False =
  padding key) and `dense`, any bool array broadcastable to (B, H, T, S)."""
  key_valid_bs: Any = None
  dense: Any = None
  causal: bool = struct.field(pytree_node=False, default=False)

  def to_dense(self, t, s):
    """The whole mask as one bool array broadcastable to (B, H, T, S), or None."""
    causal = causal_mask(t, s)[None, None] if self.causal else None
    keys = None if self.key_valid_bs is None else self.key_valid_bs[:, None, None, :]
    return _and(_and(causal, keys), self.dense)

  def without_causal(self):
    """The non-causal parts (a KV cache supplies causality itself), dense, or None."""
    return AttentionMask(self.key_valid_bs, self.dense).to_dense(1, 1)


def _and(a, b):
  return b if a is None else a if b is None else jnp.logical_and(a, b)


def combine_masks(a, b):
  """a AND b for bool arrays / AttentionMasks / None (AttentionMasks stay parts)."""
  if not isinstance(a, AttentionMask):
    a, b = b, a
  if isinstance(a, AttentionMask):
    if isinstance(b, AttentionMask):
      return AttentionMask(_and(a.key_valid_bs, b.key_valid_bs), _and(a.dense, b.dense),
                           causal=a.causal or b.causal)
    return a.replace(dense=_and(a.dense, b))
  return _and(a, b)


def _dense_mask(mask, t, s):
  return mask.to_dense(t, s) if isinstance(mask, AttentionMask) else mask


_logged_fallbacks = set()


def _log_once(msg):
  if msg not in _logged_fallbacks:
    _logged_fallbacks.add(msg)
    logging.info(msg)


def _jax_attention(q_bthk, k_bshk, v_bshk, mask, dtype, implementation):
  """jax.nn.dot_product_attention in `dtype` (inputs pre-scaled: scale=1)."""
  t, s = q_bthk.shape[1], k_bshk.shape[1]
  causal, dense = False, mask
  if isinstance(mask, AttentionMask):
    causal, dense = mask.causal, AttentionMask(mask.key_valid_bs, mask.dense).to_dense(t, s)
    if causal and t != s:  # jax's is_causal is the T == S triangle: spell the offset out
      causal, dense = False, mask.to_dense(t, s)
  if dense is not None:
    dense = jnp.broadcast_to(dense, jnp.broadcast_shapes(dense.shape, (1, 1, t, s)))
  cast = lambda x: x.astype(dtype)
  return jax.nn.dot_product_attention(
      cast(q_bthk), cast(k_bshk), cast(v_bshk), mask=dense, scale=1.0, is_causal=causal,
      implementation=implementation).astype(dtype)


def _splash_blocks(t, s):
  """Splash block sizes for lengths t, s (multiples of 128), or None."""
  pick = lambda n: next((b for b in (512, 256, 128) if n % b == 0), None)
  bq, bkv = pick(t), pick(s)
  if bq is None or bkv is None:
    return None
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # pylint: disable=g-import-not-at-top
  return sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                       block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                       block_kv_dq=bkv)


def _splash_refusal(t, s, mask):
  """Why splash cannot run this call (a sentence), or None."""
  if mask is not None and not (isinstance(mask, AttentionMask) and mask.dense is None):
    return ("splash attention reads masks as AttentionMask(causal=..., key_valid_bs=...) "
            "only; this layer passes a dense mask")
  if _splash_blocks(t, s) is None:
    return f"splash attention needs lengths divisible by 128, got T={t}, S={s}"
  return None


def _splash_attention(q_bthk, k_bshk, v_bshk, mask, dtype):
  """The Pallas TPU splash kernel (interpret mode off TPU), per example and head;
  inside shard_map over the batch / heads mesh axes when a mesh is active."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # pylint: disable=g-import-not-at-top
  t, s = q_bthk.shape[1], k_bshk.shape[1]
  refusal = _splash_refusal(t, s, mask)
  if refusal:
    raise ValueError(f"attention_impl='splash': {refusal}")
  causal = mask is not None and mask.causal
  key_valid = None if mask is None else mask.key_valid_bs
  interpret = jax.default_backend() != "tpu"

  def local(q_bthk, k_bshk, v_bshk, key_valid_bs):
    h = q_bthk.shape[2]
    base = sm.CausalMask((t, s), offset=s - t) if causal else sm.FullMask((t, s))
    kernel = sk.make_splash_mha(sm.MultiHeadMask([base] * h), head_shards=1, q_seq_shards=1,
                                block_sizes=_splash_blocks(t, s), interpret=interpret)
    heads = lambda x: jnp.swapaxes(x.astype(dtype), 1, 2)  # (B, H, T, K)
    if key_valid_bs is None:
      out = jax.vmap(kernel)(heads(q_bthk), heads(k_bshk), heads(v_bshk))
    else:  # padding keys in segment 0, every query in segment 1
      seg = jax.vmap(lambda kv: sk.SegmentIds(q=jnp.ones((t,), jnp.int32), kv=kv))(
          key_valid_bs.astype(jnp.int32))
      out = jax.vmap(kernel)(heads(q_bthk), heads(k_bshk), heads(v_bshk), segment_ids=seg)
    return jnp.swapaxes(out, 1, 2).astype(dtype)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or all(n == 1 for n in mesh.shape.values()):
    return local(q_bthk, k_bshk, v_bshk, key_valid)
  # A Pallas call is not partitioned by XLA: split it by hand, rows over the batch
  # axes and heads over 'tensor' (the activations' own logical layout).
  spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
  present = lambda axes: (None if axes is None else tuple(
      a for a in (axes if isinstance(axes, tuple) else (axes,)) if a in mesh.shape) or None)
  b_axes, h_axes = present(spec[0]), present(spec[2])
  qkv = jax.sharding.PartitionSpec(b_axes, None, h_axes, None)
  kvm = jax.sharding.PartitionSpec(b_axes, None)
  # check_vma off: the kernel's pallas_calls do not declare how outputs vary over the mesh
  if key_valid is None:
    fn = lambda q, k, v: local(q, k, v, None)
    return jax.shard_map(fn, in_specs=(qkv,) * 3, out_specs=qkv, check_vma=False)(
        q_bthk, k_bshk, v_bshk)
  return jax.shard_map(local, in_specs=(qkv,) * 3 + (kvm,), out_specs=qkv, check_vma=False)(
      q_bthk, k_bshk, v_bshk, key_valid)


def _resolve_impl(impl, q_bthk, k_bshk, mask, dtype):
  """(implementation, whether it was asked for by name) for one call."""
  backend = jax.default_backend()
  if impl != "auto":
    if impl == "cudnn" and backend != "gpu":
      raise ValueError(f"attention_impl='cudnn' needs a GPU; the backend is {backend}")
    return impl, True
  if backend == "tpu":
    refusal = _splash_refusal(q_bthk.shape[1], k_bshk.shape[1], mask)
    if refusal is None:
      return "splash", False
    _log_once(f"attention_impl=auto: xla attention ({refusal})")
  if backend == "gpu":
    if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and q_bthk.shape[-1] <= 128:
      return "cudnn", False  # xla if cuDNN refuses the call's shapes
    _log_once(f"attention_impl=auto: xla attention (cuDNN needs bf16/f16 and head dim <= 128, "
              f"got {jnp.dtype(dtype).name}, {q_bthk.shape[-1]})")
  return "xla", False


def dot_product_attention(q_bthk, k, v, mask, dtype, kv_layout="bshk", impl=None):
  """softmax(q k^T / sqrt(K)) v per head -> (B, T, H, K); logits, softmax in f32.

  k, v: (B, S, H, K) ("bshk", training) or heads-major (B, H, S, K) ("bhsk", the
  decode cache's layout: each step's contractions then read the cache in place,
  where a (B, S, H, K) cache would be transposed, i.e. copied whole, per step
  and layer). Training keeps "bshk": its backward contractions are the forms
  XLA:CPU runs fast in bf16 (some mixed-layout ones have no bf16 -> f32 kernel),
  and its hand-written backward pass keeps the probabilities in `dtype`.
  mask: bool broadcastable to (B, H, T, S), True = may attend, an AttentionMask,
  or None; or an object with `attend(q, k, v, dtype)` (a block-sparse pattern,
  training layout). impl: one of ATTENTION_IMPLS (None: the innermost
  attention_impl context, "auto" outside any); "bhsk" always runs "xla".
  """
  if kv_layout not in ("bshk", "bhsk"):
    raise ValueError(f"kv_layout={kv_layout!r}: expected 'bshk' or 'bhsk'")
  if hasattr(mask, "attend"):  # a structured sparse pattern computes only its blocks
    return mask.attend(q_bthk, k, v, jnp.dtype(dtype))
  q_bthk = q_bthk * jnp.asarray(q_bthk.shape[-1] ** -0.5, q_bthk.dtype)
  t, s = q_bthk.shape[1], k.shape[1 if kv_layout == "bshk" else 2]
  if kv_layout == "bhsk":
    mask = _dense_mask(mask, t, s)
    logits_bhts = mixed_einsum("bthk,bhsk->bhts", q_bthk, k, dtype, jnp.float32)
    if mask is not None:
      logits_bhts = jnp.where(mask, logits_bhts, NEG_INF)
    probs_bhts = jax.nn.softmax(logits_bhts, axis=-1)
    return mixed_einsum("bhts,bhsk->bthk", probs_bhts, v, dtype)
  impl, named = _resolve_impl(check_attention_impl(impl or _attention_impls[-1]), q_bthk, k, mask,
                              dtype)
  if impl == "cudnn":
    try:
      return _jax_attention(q_bthk, k, v, mask, jnp.dtype(dtype), "cudnn")
    except (NotImplementedError, ValueError, RuntimeError) as e:  # cuDNN refuses the call
      if named:
        raise
      _log_once(f"attention_impl=auto: xla attention (cuDNN refused: {e})")
      impl = "xla"
  if impl == "dot_product_attention":
    return _jax_attention(q_bthk, k, v, mask, jnp.dtype(dtype), "xla")
  if impl == "splash":
    return _splash_attention(q_bthk, k, v, mask, jnp.dtype(dtype))
  return _attention_core(q_bthk, k, v, _dense_mask(mask, t, s), jnp.dtype(dtype))


class Attention(nn.Module):
  """Multi-head dot-product attention with an optional autoregressive KV cache.

  mask: bool, broadcastable to (B, H, T, S); True = may attend.
  With `decode=True` the keys/values of each call are written into a 'cache'
  collection at `cache_index` and the queries attend to everything cached so
  far (key position <= query position), so a prompt can be prefilled in one
  call and then extended one token at a time inside a compiled loop.
  """
  num_heads: int
  head_dim: int
  out_features: Optional[int] = None
  use_bias: bool = False
  decode: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x_btd, kv_bsd=None, mask=None):
    kv_bsd = x_btd if kv_bsd is None else kv_bsd
    d_out = self.out_features or x_btd.shape[-1]
    proj = lambda name, axes, feats, axis=-1: DenseGeneral(
        feats, axes, axis=axis, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=self.kernel_init, name=name)
    hk = (self.num_heads, self.head_dim)
    q_bthk = proj("query", ("embed", "heads", "kv"), hk)(x_btd)
    k_bshk = proj("key", ("embed", "heads", "kv"), hk)(kv_bsd)
    v_bshk = proj("value", ("embed", "heads", "kv"), hk)(kv_bsd)
    q_bthk = constrain(q_bthk, ("batch", "length", "heads", "kv"))
    k_bshk = constrain(k_bshk, ("batch", "length", "heads", "kv"))
    v_bshk = constrain(v_bshk, ("batch", "length", "heads", "kv"))
    k, v, kv_layout = k_bshk, v_bshk, "bshk"

    if self.decode:
      heads_major = lambda x: constrain(jnp.swapaxes(x, 1, 2), ("batch", "heads", "length", "kv"))
      k, v, cache_mask = self._update_cache(heads_major(k_bshk), heads_major(v_bshk))
      kv_layout = "bhsk"
      if hasattr(mask, "select_keys"):  # a sparse pattern's keys gathered from the cache
        k, v, mask = mask.select_keys(k, v)
      elif cache_mask is not None:
        if isinstance(mask, AttentionMask):  # the cache mask below is the causal part
          mask = mask.without_causal()
        if mask is not None:  # a pattern over the whole stream; the cache may hold less
          mask = jnp.logical_and(mask[..., :cache_mask.shape[-1]], cache_mask)
        else:
          mask = cache_mask

    # A decode cache may be kept wider than the compute dtype (f32 on CPU, whose
    # bf16 matrix-vector kernels are several times slower): attend in its dtype.
    attn_dtype = k.dtype if self.decode else self.dtype
    out_bthk = dot_product_attention(q_bthk, k, v, mask, attn_dtype, kv_layout).astype(self.dtype)
    out_btd = DenseGeneral(d_out, ("heads", "kv", "embed"), axis=(-2, -1),
                           use_bias=self.use_bias, dtype=self.dtype,
                           param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                           name="out")(out_bthk)
    return constrain(out_btd, ("batch", "length", "embed"))

  def _update_cache(self, k_bhtk, v_bhtk):
    """Writes new keys/values at cache_index; returns full cache + causal mask.

    The cache's length is whatever the caller allocated (init sizes it from the
    full input); a sampler may start short and pad it as decoding advances
    (see sampling.decode), so early steps read only the filled part.
    """
    initialized = self.has_variable("cache", "cached_key")
    ck = self.variable("cache", "cached_key", jnp.zeros, k_bhtk.shape, k_bhtk.dtype)
    cv = self.variable("cache", "cached_value", jnp.zeros, v_bhtk.shape, v_bhtk.dtype)
    ci = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:  # init call: sizes the cache from the full-length input
      return k_bhtk, v_bhtk, None
    t = k_bhtk.shape[2]
    s = ck.value.shape[2]
    idx = ci.value
    ck.value = jax.lax.dynamic_update_slice(ck.value, k_bhtk.astype(ck.value.dtype), (0, 0, idx, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v_bhtk.astype(cv.value.dtype), (0, 0, idx, 0))
    ci.value = idx + t
    # query i (absolute position idx + i) sees keys at positions <= idx + i
    mask_ts = jnp.arange(s)[None, :] <= (idx + jnp.arange(t))[:, None]
    return ck.value, cv.value, mask_ts[None, None]


class Mlp(nn.Module):
  """Feed-forward: act(x W1) W2, or GLU act(x W1) * (x W1') W2 (DALL·E mini).

  `inner_norm` adds the NormFormer LayerNorm after the activation.
  """
  hidden: int
  out_features: Optional[int] = None
  activation: str = "gelu"
  glu: bool = False
  use_bias: bool = True
  inner_norm: bool = False
  norm_use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd):
    d_out = self.out_features or x_btd.shape[-1]
    dense = lambda feats, axes, name: Dense(feats, axes, name=name, use_bias=self.use_bias,
                                            dtype=self.dtype, param_dtype=self.param_dtype)
    act = ACTIVATIONS[self.activation]
    h_btf = act(dense(self.hidden, ("embed", "mlp"), "wi")(x_btd))
    if self.glu:
      h_btf = h_btf * dense(self.hidden, ("embed", "mlp"), "wi_gate")(x_btd)
    h_btf = constrain(h_btf, ("batch", "length", "mlp"))
    if self.inner_norm:
      h_btf = LayerNorm("inner_norm", use_bias=self.norm_use_bias,
                        param_dtype=self.param_dtype)(h_btf).astype(self.dtype)
    return dense(d_out, ("mlp", "embed"), "wo")(h_btf)


class PreLNBlock(nn.Module):
  """x + Attn(LN(x)); x + MLP(LN(x)) — GPT-2 / CLIP / DALL·E transformer block.

  Call signature is scan-friendly: (x, mask, layer_mask) -> (x, None), where
  `layer_mask` is this layer's own attention mask (DALL·E sparse patterns) or None.
  """
  num_heads: int
  head_dim: int
  mlp_dim: int
  activation: str = "gelu"
  use_bias: bool = True
  decode: bool = False
  ln_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd, mask=None, layer_mask=None):
    mask = combine_masks(mask, layer_mask)
    ln = lambda name: LayerNorm(name, epsilon=self.ln_epsilon, param_dtype=self.param_dtype)
    h = ln("ln_attn")(x_btd).astype(self.dtype)
    x_btd = x_btd + Attention(self.num_heads, self.head_dim, use_bias=self.use_bias,
                              decode=self.decode, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="attn")(h, mask=mask)
    h = ln("ln_mlp")(x_btd).astype(self.dtype)
    x_btd = x_btd + Mlp(self.mlp_dim, activation=self.activation, use_bias=self.use_bias,
                        dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(h)
    return constrain(x_btd, ("batch", "length", "embed")), None


REMAT_POLICIES = {
    "full": None,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_dots": jax.checkpoint_policies.dots_saveable,
}


class Stack(nn.Module):
  """`num_layers` copies of `block_cls`, optionally rematerialised and scanned.

  block(x, *broadcast_args, layer_arg) -> (x, None). `layer_args` (a pytree with a
  leading L axis, or None) gives each layer its own input, e.g. its sparse mask.
  With `scan=True` parameters get a leading 'layers' axis.
  """
  block_cls: Any
  block_kwargs: Any
  num_layers: int
  remat: str = "none"
  scan: bool = False

  @nn.compact
  def __call__(self, x, *broadcast_args, layer_args=None):
    block = self.block_cls
    if self.remat != "none":
      if self.remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {self.remat!r}; choose none|{'|'.join(REMAT_POLICIES)}")
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
    if self.scan:
      n_bcast = len(broadcast_args)
      scanned = nn.scan(
          block, variable_axes={"params": 0, "cache": 0, "intermediates": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast,) * n_bcast + (0 if layer_args is not None else nn.broadcast,),
          length=self.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(**self.block_kwargs, name="layers")(x, *broadcast_args, layer_args)
      return x
    for i in range(self.num_layers):
      la = None if layer_args is None else jax.tree.map(lambda a: a[i], layer_args)
      x, _ = block(**self.block_kwargs, name=f"layer_{i}")(x, *broadcast_args, la)
    return x
