"""DALL·E / DALL·E mini models and the sampler: masks, shapes, KV cache, guidance, sampling."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.configs import dalle as dalle_cfg
from dalle_jax.configs import dalle_mini as dalle_mini_cfg
from dalle_jax.models import dalle, dalle_mini
from dalle_jax.sampling import decode

L, G = 6, 4  # tiny text length, 4x4 code grid


def tiny_dalle(**kw):
  args = dict(text_vocab_size=40, text_len=L, image_vocab_size=24, image_grid=G, num_layers=5,
              d_model=32, num_heads=4, attention="sparse", conv_kernel=3, dtype=jnp.float32)
  args.update(kw)
  return dalle.DalleTransformer(**args)


def tiny_mini(**kw):
  args = dict(text_vocab_size=40, text_len=L, image_vocab_size=24, image_embed_size=30,
              image_grid=G, start_token=24, num_layers=2, d_model=32, num_heads=4, glu_dim=40)
  args.update(kw)
  return dalle_mini.DalleMini(**args)


def _text(b, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, 40, size=(b, L)).astype(np.int32)
  mask = np.arange(L)[None] < rng.randint(2, L + 1, size=(b, 1))
  return np.where(mask, ids, 0), mask


_PARAMS = {}


def _init(model, b=2):
  """Parameters for `model`, initialised once per distinct module (compiles are slow)."""
  key = repr(model)
  if key not in _PARAMS:
    _PARAMS[key] = _init_uncached(model, b)
  return dict(_PARAMS[key])


def _init_uncached(model, b):
  text, mask = _text(b)
  codes = jnp.zeros((b, G * G), jnp.int32)
  if isinstance(model, dalle.DalleTransformer):
    v = jax.jit(model.init)(jax.random.PRNGKey(0), dalle.pad_text(text, mask, 40), codes)
  else:
    v = jax.jit(model.init)(jax.random.PRNGKey(0), text, mask, codes)
  return nn.meta.unbox(v)["params"]


# --- masks ---------------------------------------------------------------------------

def test_sparse_layer_cycle_matches_paper():
  pats = dalle.layer_patterns(64, "sparse")
  assert pats[-1] == "conv"
  assert pats[1] == "column" and pats[5] == "column" and pats[0] == "row" and pats[2] == "row"
  assert pats.count("column") == 16 and pats.count("conv") == 1
  assert dalle.layer_patterns(3, "full") == ["full"] * 3


def test_masks_causal_and_structured():
  text_len, g = 5, 4
  masks = dalle.attention_masks(text_len, g, g, dalle.PATTERNS, conv_kernel=3)
  t = text_len + g * g
  assert masks.shape == (4, t, t)
  causal = np.tril(np.ones((t, t), bool))
  for m in masks:
    assert not (m & ~causal).any(), "a mask lets a query see the future"
    # every query sees the start + all earlier text; text queries are plain causal
    assert m[:, :text_len + 1][np.tril(np.ones((t, text_len + 1), bool))].all()
  np.testing.assert_array_equal(masks[0], causal)
  row, col, conv = masks[1], masks[2], masks[3]
  code_pos = lambda j: text_len + 1 + j  # stream index of input code j
  j = 9  # (row 2, col 1)
  q = code_pos(j)
  seen = lambda m: [i for i in range(g * g - 1) if m[q, code_pos(i)]]
  assert seen(row) == list(range(j - g, j + 1))  # previous row's span + itself
  assert seen(col) == [1, 5, 9]  # same column
  assert seen(conv) == [4, 5, 6, 8, 9]  # 3x3 window, causal
  assert m[q, :text_len + 1].all()


@pytest.mark.parametrize("scan", [False, True])
def test_block_sparse_training_equals_dense_masks(scan):
  """Sparse layers computed block-sparsely (row, column via the transposed grid,
  conv) give the dense-masked logits and gradients; scanned layers pick their
  pattern with lax.switch. bf16 compiles on CPU and stays close."""
  blocks, dense = tiny_dalle(scan=scan), tiny_dalle(scan=scan, sparse_blocks=False)
  text = dalle.pad_text(*_text(2), 40)
  codes = jax.random.randint(jax.random.PRNGKey(3), (2, G * G), 0, 24)
  params = {"params": _init(blocks)}
  loss = lambda m: lambda p: sum(jnp.sum(jnp.sin(x)) for x in m.apply(p, text, codes))
  run = lambda m: jax.jit(jax.value_and_grad(loss(m)))(params)
  (v_blocks, g_blocks), (v_dense, g_dense) = run(blocks), run(dense)
  np.testing.assert_allclose(v_blocks, v_dense, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_blocks), jax.tree.leaves(g_dense)):
    assert float(jnp.linalg.norm(a - b)) <= 1e-5 * float(jnp.linalg.norm(b)) + 1e-6
  v16, g16 = run(tiny_dalle(scan=scan, dtype=jnp.bfloat16))
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(g16))
  np.testing.assert_allclose(v16, v_dense, rtol=0.02)


def test_paper_sparse_layouts_score_a_fraction_of_the_keys():
  """At the paper's 256 text + 32x32 codes each image query scores the text
  blocks plus a band: row 2 rows, column its column, conv the 6 kernel rows."""
  lays = dalle.sparse_layouts(256, 32, ("row", "column", "conv"), 11)
  assert [lay.offsets for lay in lays] == [(0, 1), (0,), (0, 1, 2, 3, 4, 5)]
  assert [lay.keys_per_query for lay in lays] == [288 + 64, 288 + 32, 288 + 192]  # of 1280
  m = dalle.DalleTransformer(attention="sparse")  # paper dims: 64 layers
  assert m.attention_score_entries() < 0.3 * 64 * 1280 ** 2


# --- abstract paper-size model ----------------------------------------------------------

def test_paper_preset_shapes_and_shardings():
  config = dalle_cfg.get_config("paper")
  m = config.model
  assert (m.num_layers, m.d_model, m.num_heads, m.text_len, m.image_grid ** 2) == (64, 3968, 62, 256, 1024)
  model = dalle.from_config(m, dtype=config.dtype, scan=config.scan_layers, remat=config.remat)
  b = 2
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((b, 256), jnp.int32), jnp.zeros((b, 1024), jnp.int32)))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(abstract)))
  assert 11.5e9 < n < 12.5e9, n  # DALL·E is 12B parameters
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((b, 256), jnp.int32),
                                             jnp.zeros((b, 1024), jnp.int32)), abstract)
  assert out[0].shape == (b, 256, 16384 + 256) and out[1].shape == (b, 1024, 8192)
  specs = nn.get_partition_spec(abstract)["params"]
  mlp = specs["layers"]["layers"]["block"]["mlp"]["wi"]["kernel"]
  assert tuple(mlp) == ("layers", "embed", "mlp")
  mesh = jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  shard = nn.logical_to_mesh_sharding(specs, mesh, config.logical_axis_rules)
  # 2-D FSDP (parallel.fsdp_2d_rules): the second dim over tensor x data
  assert tuple(shard["layers"]["layers"]["block"]["mlp"]["wi"]["kernel"].spec) == (
      None, "fsdp", ("tensor", "data"))
  assert tuple(shard["image_head"]["kernel"].spec) == ("fsdp", ("tensor", "data"))


def test_mini_and_mega_presets_match_min_dalle():
  for name, (layers, d, heads, glu, tv, emb) in {
      "mini": (12, 1024, 16, 2730, 50264, 16385), "mega": (24, 2048, 32, 4096, 50272, 16416)}.items():
    m = dalle_mini_cfg.get_config(name).model
    assert (m.num_layers, m.d_model, m.num_heads, m.glu_dim, m.text_vocab_size,
            m.image_embed_size, m.image_vocab_size, m.text_len, m.image_grid) == (
                layers, d, heads, glu, tv, emb, 16384, 64, 16)


# --- KV cache == full forward ------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_dalle, lambda: tiny_dalle(scan=True),
                                  lambda: tiny_dalle(attention="full", scan=True), tiny_mini])
def test_kv_cache_decode_equals_full_forward(make):
  """Step-by-step decoding equals teacher forcing: sparse layers (block-sparse in
  training, keys gathered from the cache when decoding; scanned: lax.switch and a
  per-pattern key table), full attention, and the encoder-decoder."""
  model = make()
  params = _init(model)
  dec = (decode.DalleDecoder if isinstance(model, dalle.DalleTransformer)
         else decode.DalleMiniDecoder)(model)
  text, mask = _text(2, seed=1)
  codes = jnp.asarray(np.random.RandomState(2).randint(0, 24, size=(2, G * G)), jnp.int32)
  full = np.asarray(jax.jit(dec.image_logits)(params, text, mask, codes))  # (B, N, V)
  cache = dec.init_cache(2)
  logits, cache = jax.jit(dec.prefill)(params, cache, jnp.asarray(text), jnp.asarray(mask))
  steps = [logits]
  step = jax.jit(dec.step)
  for j in range(G * G - 1):
    logits, cache = step(params, cache, codes[:, j], jnp.int32(j), jnp.asarray(mask))
    steps.append(logits)
  np.testing.assert_allclose(np.stack(steps, 1), full, atol=2e-5, rtol=1e-5)


# --- guidance and sampling --------------------------------------------------------------

@pytest.mark.parametrize("top_k", [5])
def test_guidance_one_pass_equals_two_passes(top_k):
  model = tiny_dalle()
  params = _init(model)
  dec = decode.DalleDecoder(model)
  text, mask = _text(3, seed=3)
  blank_ids, blank_mask = np.zeros(L, np.int32), np.zeros(L, bool)
  sp = decode.SamplingParams(temperature=0.9, top_k=top_k, guidance_scale=3.0)
  rng = jax.random.PRNGKey(7)
  ours = np.asarray(decode.generate(dec, params, text, mask, rng=rng, sp=sp, uncond_text=blank_ids,
                                    uncond_mask=blank_mask, chunk=5))
  # reference: conditional and unconditional as two separate forward passes per token
  logits_fn = jax.jit(lambda t, m, c: dec.image_logits(params, t, m, c))
  ut, um = np.repeat(blank_ids[None], 3, 0), np.repeat(blank_mask[None], 3, 0)
  codes = np.zeros((3, G * G), np.int32)
  for j in range(G * G):
    c = np.asarray(logits_fn(text, mask, codes))[:, j]
    u = np.asarray(logits_fn(ut, um, codes))[:, j]
    guided = u + 3.0 * (c - u)
    codes[:, j] = np.asarray(decode.sample_logits(jax.random.fold_in(rng, j), jnp.asarray(guided),
                                                  sp, dec.valid_vocab))
  np.testing.assert_array_equal(ours, codes)


def test_sampling_deterministic_and_only_valid_codes():
  model = tiny_mini()
  params = _init(model)
  # make the non-code rows (start token + padding) dominate every logit
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, 24:].add(5.0)
  dec = decode.DalleMiniDecoder(model)
  text, mask = _text(4, seed=4)
  blank = (np.zeros(L, np.int32), np.arange(L) < 2)
  run = lambda seed, **kw: np.asarray(decode.generate(
      dec, params, text, mask, rng=jax.random.PRNGKey(seed), uncond_text=blank[0],
      uncond_mask=blank[1], sp=decode.SamplingParams(guidance_scale=2.0, **kw), chunk=7))
  a, b, c = run(0), run(0), run(1)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert a.max() < 24 and c.max() < 24 and a.min() >= 0
  # no-cache baseline draws the same codes
  ref = decode.generate_no_cache(dec, params, text, mask, rng=jax.random.PRNGKey(0),
                                 uncond_text=blank[0], uncond_mask=blank[1],
                                 sp=decode.SamplingParams(guidance_scale=2.0))
  np.testing.assert_array_equal(a, np.asarray(ref))
  # chunking does not change the result
  np.testing.assert_array_equal(a, np.asarray(decode.generate(
      dec, params, text, mask, rng=jax.random.PRNGKey(0), uncond_text=blank[0],
      uncond_mask=blank[1], sp=decode.SamplingParams(guidance_scale=2.0), chunk=100)))


def test_filter_logits_top_k_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]]))
  keep = lambda **kw: np.isfinite(np.asarray(decode.filter_logits(logits, **kw)))[0].tolist()
  assert keep(top_k=2) == [True, True, False, False, False]
  assert keep(top_p=0.7) == [True, True, False, False, False]
  assert keep(top_p=0.85) == [True, True, True, False, False]
  assert keep(top_p=0.1) == [True, False, False, False, False]
  assert keep(valid_vocab=3) == [True, True, True, False, False]


def _sort_filter(logits_bv, top_k=0, top_p=1.0):
  """Reference top-k / top-p via a full sort (what filter_logits replaces)."""
  x = np.asarray(logits_bv, np.float64)
  out = x.copy()
  for r in range(x.shape[0]):
    desc = np.sort(x[r])[::-1]
    if top_k:
      out[r][x[r] < desc[top_k - 1]] = -np.inf
    if top_p < 1.0:
      desc = np.sort(out[r])[::-1]
      p = np.exp(desc - desc.max())
      p /= p.sum()
      n_keep = np.sum(np.cumsum(p) - p < top_p)
      out[r][out[r] < desc[n_keep - 1]] = -np.inf
  return np.isfinite(out)


def test_filter_logits_bisection_matches_sort():
  """The sort-free thresholds keep exactly what a sort would, ties and -inf included."""
  rs = np.random.RandomState(0)
  for trial in range(6):
    x = rs.randn(4, 200).astype(np.float32) * [0.1, 1.0, 10.0][trial % 3]
    if trial % 2:
      x = np.round(x, 1)  # many ties
      x[:, :30] = -np.inf
    for k, p in [(1, 1.0), (5, 1.0), (64, 1.0), (0, 0.3), (0, 0.9), (20, 0.8)]:
      got = np.isfinite(np.asarray(decode.filter_logits(jnp.asarray(x), top_k=k, top_p=p)))
      np.testing.assert_array_equal(got, _sort_filter(x, k, p), err_msg=f"top_k={k} top_p={p}")


@pytest.mark.parametrize("make", [tiny_dalle, tiny_mini])
def test_growing_cache_gives_the_same_codes(make):
  """The cache allocated in blocks and padded as decoding advances (and an f32
  cache for an f32 model) samples exactly what one full-size cache samples."""
  model = make()
  params = _init(model)
  dec = (decode.DalleDecoder if isinstance(model, dalle.DalleTransformer)
         else decode.DalleMiniDecoder)(model)
  text, mask = _text(3, seed=5)
  sp = decode.SamplingParams(temperature=1.0, top_k=8)
  run = lambda **kw: np.asarray(decode.generate(dec, params, text, mask,
                                                rng=jax.random.PRNGKey(3), sp=sp, chunk=5, **kw))
  fixed = run(kv_block=10_000, kv_dtype=None)
  np.testing.assert_array_equal(run(kv_block=4), fixed)  # cache sizes 4, 8, ... (several loops)
  np.testing.assert_array_equal(run(kv_block=3, kv_dtype=jnp.float32), fixed)


@pytest.mark.parametrize("make", [tiny_dalle, tiny_mini])
def test_bf16_weights_cast_once_change_no_logit(make):
  model = make(dtype=jnp.bfloat16)
  params = _init(model)
  dec = (decode.DalleDecoder if isinstance(model, dalle.DalleTransformer)
         else decode.DalleMiniDecoder)(model)
  cast = decode.compute_dtype_params(dec, params)
  leaves = jax.tree.leaves(cast)
  assert any(x.dtype == jnp.bfloat16 for x in leaves)
  assert all(x.dtype == (jnp.bfloat16 if x.ndim >= 2 else jnp.float32) for x in leaves)
  text, mask = _text(2, seed=6)
  codes = jnp.asarray(np.random.RandomState(7).randint(0, 24, size=(2, G * G)), jnp.int32)
  logits = jax.jit(dec.image_logits)
  np.testing.assert_array_equal(np.asarray(logits(cast, text, mask, codes)),
                                np.asarray(logits(params, text, mask, codes)))


@pytest.mark.parametrize("make", [tiny_dalle, tiny_mini])
def test_sharded_sampling_equals_single_device(make):
  """data x fsdp x tensor = 2 x 2 x 2: parameters and KV cache really split, same codes."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from dalle_jax.configs import common  # pylint: disable=g-import-not-at-top
  from dalle_jax import parallel  # pylint: disable=g-import-not-at-top
  model = make()
  params = _init(model)
  dec = (decode.DalleDecoder if isinstance(model, dalle.DalleTransformer)
         else decode.DalleMiniDecoder)(model)
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  rules = common.DEFAULT_RULES
  text, mask = _text(4, seed=8)
  blank = (np.zeros(L, np.int32), np.arange(L) < 2)
  sp = decode.SamplingParams(top_k=1, guidance_scale=2.0)
  run = lambda **kw: np.asarray(decode.generate(dec, params, text, mask, rng=jax.random.PRNGKey(0),
                                                sp=sp, uncond_text=blank[0], uncond_mask=blank[1],
                                                chunk=6, **kw))
  np.testing.assert_array_equal(run(mesh=mesh, rules=rules), run())
  sharded = dec.shard_params(params, mesh, rules)
  specs = [x.sharding.spec for x in jax.tree.leaves(sharded)]
  assert any("tensor" in str(s) for s in specs) and any("fsdp" in str(s) for s in specs)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    cache = dec.init_cache(8, kv_dtype=jnp.float32, mesh=mesh, rules=rules)
  kv = [x for p, x in jax.tree_util.tree_leaves_with_path(cache) if "cached_key" in str(p)]
  assert kv and all(x.addressable_shards[0].data.size * 8 == x.size for x in kv)  # rows 4 x heads 2
