"""unCLIP modules (prior, text projection, decoder) against diffusers' Karlo modules on
tiny random Karlo-like models (f32, CPU): the import from Karlo's diffusers folder
layout, module outputs within 1e-4, every tensor named on failure, and the prior's
trainability (logical axis names, scanned bf16 gradients)."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.configs.common import DEFAULT_RULES
from dalle_jax.convert import diffusers_unet as dconv
from dalle_jax.convert import karlo
from dalle_jax.models import prior as prior_lib
from dalle_jax.models import scan_layout
from dalle_jax.models import unclip as unclip_lib
from dalle_jax.models import unet as unet_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

# Karlo's shapes shrunk: CLIP width E (prior embedding_dim, caption state width),
# S caption tokens, decoder base channels 8 (time embedding 32), context width X.
E, S, X, T_EMB, B = 12, 7, 24, 32, 2
PRIOR = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=E,
             num_embeddings=S, additional_embeddings=4, dropout=0.0)
TEXT_PROJ = dict(clip_extra_context_tokens=4, clip_embeddings_dim=E, time_embed_dim=T_EMB,
                 cross_attention_dim=X)
# Karlo's decoder: ResnetDownsample + SimpleCrossAttn levels (heads of width 64 there),
# scale-shift time conditioning, the identity class embedding, learned-range outputs.
DECODER = dict(
    sample_size=8, in_channels=3, out_channels=6, block_out_channels=(8, 16, 24),
    layers_per_block=2,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                      "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                    "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=X,
    class_embed_type="identity", attention_head_dim=8, resnet_time_scale_shift="scale_shift",
    norm_num_groups=4)
# Karlo's super-resolution stages: resnet blocks only, no attention, x_t ++ low-res in.
SUPER_RES = dict(
    sample_size=8, in_channels=6, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D",) * 2,
    up_block_types=("ResnetUpsampleBlock2D",) * 2,
    add_attention=False, norm_num_groups=4)


def _perturbed(module, seed):
  """Off the default init everywhere (zero query/positions/null embedding, unit norms)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return module.eval()


def _prior(seed=0):
  prior = _perturbed(diffusers.PriorTransformer(**PRIOR), seed)
  with torch.no_grad():  # a fresh prior has clip_std = 0: every output would be clip_mean
    prior.clip_mean.copy_(torch.randn(1, E))
    prior.clip_std.copy_(0.5 + torch.rand(1, E))
  return prior


def _state(module):
  return {k: v.numpy() for k, v in module.state_dict().items()}


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  mask = np.ones((B, S), bool)
  mask[0, 3:] = False  # a short caption: padding tokens must be invisible
  return dict(x_t=f(B, E), text_embed=f(B, E), text=f(B, S, E), mask=mask,
              image_embed=f(B, E), x_img=f(B, 3, 8, 8))


@pytest.fixture(scope="module")
def karlo_dir(tmp_path_factory):
  """Karlo's diffusers layout with tiny random modules (and the modules themselves)."""
  root = str(tmp_path_factory.mktemp("karlo"))
  mods = dict(prior=_prior(0), text_proj=_perturbed(UnCLIPTextProjModel(**TEXT_PROJ), 1),
              decoder=_perturbed(diffusers.UNet2DConditionModel(**DECODER), 2),
              super_res_first=_perturbed(diffusers.UNet2DModel(**SUPER_RES), 3),
              super_res_last=_perturbed(diffusers.UNet2DModel(**SUPER_RES), 4))
  for name, m in mods.items():
    m.save_pretrained(os.path.join(root, name))
  diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                            clip_sample_range=5.0).save_pretrained(
                                os.path.join(root, "prior_scheduler"))
  diffusers.UnCLIPScheduler(variance_type="learned_range").save_pretrained(
      os.path.join(root, "decoder_scheduler"))
  diffusers.UnCLIPScheduler(variance_type="fixed_small_log").save_pretrained(
      os.path.join(root, "super_res_scheduler"))
  converted, schedulers, report = karlo.convert_karlo(root)
  return mods, converted, schedulers, report


def test_prior_matches_diffusers(karlo_dir):
  mods, converted, schedulers, _ = karlo_dir
  kwargs, variables = converted["prior"]
  assert schedulers["prior_scheduler"]["prediction_type"] == "sample"
  inp = _inputs()
  t = np.array([5, 900])
  with torch.no_grad():
    ref = mods["prior"](torch.from_numpy(inp["x_t"]), timestep=torch.from_numpy(t),
                        proj_embedding=torch.from_numpy(inp["text_embed"]),
                        encoder_hidden_states=torch.from_numpy(inp["text"]),
                        attention_mask=torch.from_numpy(inp["mask"])).predicted_image_embedding
    ref_post = mods["prior"].post_process_latents(ref).numpy()
  model = prior_lib.PriorTransformer(**kwargs)
  apply = jax.jit(model.apply)
  out = apply(variables, inp["x_t"], t, inp["text_embed"], inp["text"], inp["mask"])
  np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=1e-4, rtol=0)
  post = prior_lib.denormalize(variables[prior_lib.STATS], out)
  np.testing.assert_allclose(np.asarray(post), ref_post, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(prior_lib.normalize(variables[prior_lib.STATS], post)),
                             np.asarray(out), atol=1e-5)
  # The padding tokens really are hidden: changing them changes nothing; a visible one does.
  text2 = inp["text"].copy()
  text2[0, 5] += 3.0
  out2 = apply(variables, inp["x_t"], t, inp["text_embed"], text2, inp["mask"])
  np.testing.assert_allclose(np.asarray(out2), np.asarray(out), atol=1e-6)
  text2[0, 1] += 3.0
  out3 = apply(variables, inp["x_t"], t, inp["text_embed"], text2, inp["mask"])
  assert np.abs(np.asarray(out3[0]) - np.asarray(out[0])).max() > 1e-3
  # The per-layer import runs as a scanned, rematerialised Stack too.
  scanned = prior_lib.PriorTransformer(**kwargs, scan=True, remat="full")
  like = jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(0),
                                             *prior_lib.example_inputs(scanned)))
  params = scan_layout.to_layout(variables["params"], nn.unbox(like["params"]))
  out_s = jax.jit(scanned.apply)(dict(variables, params=params), inp["x_t"], t, inp["text_embed"],
                        inp["text"], inp["mask"])
  np.testing.assert_allclose(np.asarray(out_s), np.asarray(out), atol=1e-5)


def test_text_projection_matches_diffusers_with_guidance(karlo_dir):
  mods, converted, _, _ = karlo_dir
  dec_kw, dec_vars = converted["decoder"]
  inp = _inputs(1)
  tile = lambda a: np.concatenate([a, a])
  with torch.no_grad():  # diffusers prepends its learned null embedding for the guidance half
    ctx_ref, time_ref = mods["text_proj"](
        image_embeddings=torch.from_numpy(inp["image_embed"]),
        prompt_embeds=torch.from_numpy(tile(inp["text_embed"])),
        text_encoder_hidden_states=torch.from_numpy(tile(inp["text"])),
        do_classifier_free_guidance=True)
  tp = unclip_lib.TextProjection(**dec_kw["text_proj"])
  ctx, ctx_mask, time_add = tp.apply(
      {"params": dec_vars["params"]["text_proj"]}, tile(inp["image_embed"]),
      tile(inp["text_embed"]), tile(inp["text"]), tile(inp["mask"]),
      drop_image_b=np.array([True] * B + [False] * B))
  np.testing.assert_allclose(np.asarray(ctx), ctx_ref.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(time_add), time_ref.numpy(), atol=1e-4, rtol=0)
  # the mask: the 4 image tokens in front, always visible
  np.testing.assert_array_equal(np.asarray(ctx_mask), np.concatenate(
      [np.ones((2 * B, 4), bool), tile(inp["mask"])], axis=1))


def test_decoder_matches_diffusers_pipeline_conditioning(karlo_dir):
  """Text projection -> UNet2DConditionModel as UnCLIPPipeline wires them (class_labels =
  the time addition, attention_mask = caption mask padded with 4 True in front) vs
  UnclipDecoder with the imported variables: all 6 output channels."""
  mods, converted, schedulers, _ = karlo_dir
  dec_kw, dec_vars = converted["decoder"]
  assert dec_kw["unet"]["attention"] == ("none", "added_kv", "added_kv")
  assert schedulers["decoder_scheduler"]["variance_type"] == "learned_range"
  inp = _inputs(2)
  t = np.array([3, 700])
  with torch.no_grad():
    ctx, time_add = mods["text_proj"](
        image_embeddings=torch.from_numpy(inp["image_embed"]),
        prompt_embeds=torch.from_numpy(inp["text_embed"]),
        text_encoder_hidden_states=torch.from_numpy(inp["text"]),
        do_classifier_free_guidance=False)
    mask = torch.nn.functional.pad(torch.from_numpy(inp["mask"]), (4, 0), value=True)
    ref = mods["decoder"](torch.from_numpy(inp["x_img"]), torch.from_numpy(t),
                          encoder_hidden_states=ctx, class_labels=time_add,
                          attention_mask=mask).sample.numpy()
  model = unclip_lib.UnclipDecoder(text_proj=unclip_lib.TextProjection(**dec_kw["text_proj"]),
                                   unet=unet_lib.UNet(**dec_kw["unet"]))
  out = jax.jit(model.apply)(dec_vars, inp["x_img"].transpose(0, 2, 3, 1), t, inp["image_embed"],
                             inp["text_embed"], inp["text"], inp["mask"])
  assert out.shape == (B, 8, 8, 6)
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=1e-4, rtol=0)
  with torch.no_grad():  # the caption mask matters at this tolerance
    unmasked = mods["decoder"](torch.from_numpy(inp["x_img"]), torch.from_numpy(t),
                               encoder_hidden_states=ctx, class_labels=time_add).sample.numpy()
  assert np.abs(unmasked[0] - ref[0]).max() > 1e-3


def test_super_res_stages_match_diffusers(karlo_dir):
  mods, converted, _, report = karlo_dir
  rng = np.random.default_rng(3)
  x = rng.standard_normal((B, 6, 8, 8)).astype(np.float32)  # x_t ++ upsampled low-res
  t = np.array([0, 999])
  for name in ("super_res_first", "super_res_last"):
    kw, variables = converted[name]
    with torch.no_grad():
      ref = mods[name](torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    out = jax.jit(unet_lib.UNet(**kw).apply)(variables, x.transpose(0, 2, 3, 1), t)
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=1e-4, rtol=0)
  assert sum("UNet2DModel" in line for line in report) == 2


def test_prior_options_match_diffusers():
  """PriorTransformer's other switches (norm_in, a normed text embedding, a separate
  time-MLP width, gelu) as Kandinsky-style priors set them."""
  cfg = dict(PRIOR, norm_in_type="layer", embedding_proj_norm_type="layer", time_embed_dim=24,
             time_embed_act_fn="gelu")
  ref = _perturbed(diffusers.PriorTransformer(**cfg), 6)
  with torch.no_grad():
    ref.clip_std.copy_(0.5 + torch.rand(1, E))
  kwargs = karlo.prior_config(dict(ref.config))
  assert kwargs["norm_in"] and kwargs["text_embed_norm"] and kwargs["time_dim"] == 24
  variables = karlo.prior_weights(_state(ref), kwargs)
  inp, t = _inputs(4), np.array([10, 400])
  with torch.no_grad():
    want = ref(torch.from_numpy(inp["x_t"]), timestep=torch.from_numpy(t),
               proj_embedding=torch.from_numpy(inp["text_embed"]),
               encoder_hidden_states=torch.from_numpy(inp["text"]),
               attention_mask=torch.from_numpy(inp["mask"])).predicted_image_embedding.numpy()
  out = jax.jit(prior_lib.PriorTransformer(**kwargs).apply)(
      variables, inp["x_t"], t, inp["text_embed"], inp["text"], inp["mask"])
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-4, rtol=0)


def test_missing_unexpected_misshapen_and_zero_std_are_named():
  prior = _prior(5)
  kwargs = karlo.prior_config(dict(prior.config))
  w = _state(prior)
  w.pop("transformer_blocks.1.attn1.to_k.bias")
  w["transformer_blocks.0.attn2.to_q.weight"] = np.zeros((16, 16), np.float32)
  w["positional_embedding"] = np.zeros((1, S + 3, 16), np.float32)
  w["proj_in.weight"] = w["proj_in.weight"].T.copy()  # same size, wrong orientation
  with pytest.raises(karlo.ConversionError) as e:
    karlo.prior_weights(w, kwargs, where="P")
  msg = str(e.value)
  assert "\n" not in msg
  assert "missing tensors (1): transformer_blocks.1.attn1.to_k.bias" in msg
  assert "unexpected tensors (1): transformer_blocks.0.attn2.to_q.weight" in msg
  assert "positional_embedding (1, 10, 16)" in msg and "pos_embed" in msg
  assert "proj_in.weight (12, 16)" in msg
  fresh = diffusers.PriorTransformer(**PRIOR)
  with pytest.raises(karlo.ConversionError, match="clip_std has 12 zero entries"):
    karlo.prior_weights(_state(fresh), kwargs, where="P")
  tp = UnCLIPTextProjModel(**TEXT_PROJ)
  tp_kw, clip_dim = karlo.text_proj_config(dict(tp.config))
  w = _state(tp)
  w["clip_extra_context_tokens_proj.weight"] = np.zeros((3 * X, E), np.float32)
  with pytest.raises(karlo.ConversionError,
                     match=r"clip_extra_context_tokens_proj.weight \(72, 12\)"):
    karlo.text_proj_weights(w, tp_kw, clip_dim)


def test_unsupported_configs_are_named(tmp_path):
  with pytest.raises(karlo.ConversionError, match="added_emb_type"):
    karlo.prior_config(dict(PRIOR, added_emb_type=None))
  with pytest.raises(karlo.ConversionError, match="additional_embeddings"):
    karlo.prior_config(dict(PRIOR, additional_embeddings=3))
  with pytest.raises(karlo.ConversionError, match="mid_block_type"):
    karlo.decoder_unet_config(dict(DECODER, mid_block_type="UNetMidBlock2DCrossAttn"))
  with pytest.raises(karlo.ConversionError, match="down_block_types.*CrossAttnDownBlock2D"):
    karlo.decoder_unet_config(dict(DECODER, down_block_types=("ResnetDownsampleBlock2D",
                                                               "CrossAttnDownBlock2D",
                                                               "SimpleCrossAttnDownBlock2D")))
  with pytest.raises(karlo.ConversionError, match="does not mirror"):
    karlo.decoder_unet_config(dict(DECODER, up_block_types=("SimpleCrossAttnUpBlock2D",) * 3))
  with pytest.raises(karlo.ConversionError, match="attention_head_dim"):
    karlo.decoder_unet_config(dict(DECODER, attention_head_dim=(8, 8, 4)))
  os.makedirs(tmp_path / "k" / "prior")
  with pytest.raises(karlo.ConversionError, match="missing text_proj/, decoder/"):
    karlo.convert_karlo(str(tmp_path / "k"))
  os.makedirs(tmp_path / "v" / "image_encoder")  # the variation layout has no prior
  with pytest.raises(karlo.ConversionError) as e:
    karlo.convert_karlo(str(tmp_path / "v"))
  assert "missing text_proj/, decoder/" in str(e.value) and "prior" not in str(e.value)
  with open(tmp_path / "k" / "prior" / "config.json", "w") as f:
    json.dump({"_class_name": "UNet2DModel"}, f)
  with pytest.raises(karlo.ConversionError, match="expected 'PriorTransformer'"):
    karlo.convert_prior(str(tmp_path / "k" / "prior"))


def test_prior_is_trainable_sharded_bf16():
  """Logical names on every parameter and statistic (distinct mesh axes per array),
  scanned + remat bf16 gradients finite and non-zero for every parameter, bad shapes named."""
  model = prior_lib.PriorTransformer(embed_dim=12, text_dim=10, text_len=5, num_layers=2,
                                     num_heads=2, head_dim=8, scan=True, remat="full",
                                     dtype=jnp.bfloat16)
  inputs = prior_lib.example_inputs(model, batch=2)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), *inputs)
  rules = dict(DEFAULT_RULES)
  for coll in ("params", prior_lib.STATS):
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        variables[coll], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
      assert isinstance(leaf, nn.Partitioned), (coll, path)
      assert len(leaf.names) == leaf.value.ndim, (coll, path)
      mesh_axes = [rules[n] for n in leaf.names if n is not None and rules[n] is not None]
      assert len(mesh_axes) == len(set(mesh_axes)), (coll, path, leaf.names)
  params = nn.unbox(variables["params"])
  stats = nn.unbox(variables[prior_lib.STATS])
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 12)).astype(np.float32)
  te = rng.standard_normal((2, 12)).astype(np.float32)
  text = rng.standard_normal((2, 5, 10)).astype(np.float32)
  mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], bool)

  def loss(p):
    out = model.apply({"params": p, prior_lib.STATS: stats}, x, np.array([1, 500]), te, text, mask)
    assert out.dtype == jnp.float32
    return jnp.mean((out - 1.0) ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).max() > 0, path
  with pytest.raises(ValueError, match=r"text_bsc has shape \(2, 4, 10\), expected \(2, 5, 10\)"):
    model.apply(variables, x, np.array([1, 2]), te, text[:, :4], mask)


# Karlo's released sizes (diffusers' conversion script): the prior's defaults and the
# decoder below; built on torch's meta device, so nothing is allocated.
KARLO_DECODER = dict(
    DECODER, sample_size=64, layers_per_block=3, block_out_channels=(320, 640, 960, 1280),
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    cross_attention_dim=1536, attention_head_dim=64, norm_num_groups=32)


def test_karlo_sizes_map_name_for_name():
  """At Karlo's real dimensions every diffusers tensor has exactly one parameter of the
  same size here (prior 1.02B, text projection, decoder 885M parameters)."""
  with torch.device("meta"):
    ref_prior = diffusers.PriorTransformer()
    ref_tp = UnCLIPTextProjModel(time_embed_dim=1280, cross_attention_dim=1536)
    ref_dec = diffusers.UNet2DConditionModel(**KARLO_DECODER)
  sizes = lambda m: {k: int(np.prod(v.shape)) for k, v in m.state_dict().items()}

  def ours(model, *inputs):
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs))
    return {c: karlo.param_shapes(v) for c, v in abstract.items()}

  model = prior_lib.PriorTransformer(**karlo.prior_config(dict(ref_prior.config)))
  got = ours(model, *prior_lib.example_inputs(model))
  mine = {karlo.prior_name(p): int(np.prod(s)) for p, s in got["params"].items()}
  mine.update({"clip_" + k[0]: int(np.prod(s)) for k, s in got[prior_lib.STATS].items()})
  assert mine == sizes(ref_prior) and 1.02e9 < sum(mine.values()) < 1.03e9

  tp_kw, clip_dim = karlo.text_proj_config(dict(ref_tp.config))
  tp = unclip_lib.TextProjection(**tp_kw)
  got = ours(tp, np.zeros((1, clip_dim)), np.zeros((1, clip_dim)), np.zeros((1, 77, clip_dim)))
  assert sum(int(np.prod(s)) for s in got["params"].values()) == sum(sizes(ref_tp).values())

  cfg = karlo.decoder_unet_config(dict(ref_dec.config))
  assert cfg["time_embed_dim"] in (0, 1280) and cfg["context_dim"] == 1536
  mine = {dconv.diffusers_name(p, 4): int(np.prod(s))
          for p, s in dconv.expected_shapes(cfg).items()}
  assert mine == sizes(ref_dec) and 885e6 < sum(mine.values()) < 886e6


def test_text_projection_is_trainable():
  """Logical names on every parameter (known to the rules, distinct mesh axes); with image
  dropout the learned null embedding gets the dropped rows' gradient and the input image
  embedding only the kept rows'."""
  tp = unclip_lib.TextProjection(context_dim=X, time_embed_dim=T_EMB, dtype=jnp.bfloat16)
  inp = _inputs(5)
  args = (inp["image_embed"], inp["text_embed"], inp["text"], inp["mask"])
  variables = jax.jit(tp.init)(jax.random.PRNGKey(0), *args)
  rules = dict(DEFAULT_RULES)
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
    assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim, path
    mesh_axes = [rules[n] for n in leaf.names if rules[n] is not None]
    assert len(mesh_axes) == len(set(mesh_axes)), (path, leaf.names)
  params = nn.unbox(variables["params"])

  def loss(p, image_embed, drop):
    ctx, _, time_add = tp.apply({"params": p}, image_embed, *args[1:], drop_image_b=drop)
    assert ctx.shape == (B, 4 + S, X) and time_add.dtype == jnp.float32
    return jnp.sum(ctx.astype(jnp.float32) ** 2) + jnp.sum(time_add ** 2)

  g_p, g_img = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, args[0], np.array([True, False]))
  assert np.abs(np.asarray(g_p["null_image_embed"])).max() > 0
  assert np.abs(np.asarray(g_img[0])).max() == 0 and np.abs(np.asarray(g_img[1])).max() > 0
  for path, g in jax.tree_util.tree_flatten_with_path(g_p)[0]:
    assert np.all(np.isfinite(np.asarray(g))), path
