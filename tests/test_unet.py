"""Diffusion U-Net: diffusers UNet2DModel import parity (tiny random weights, f32, CPU),
the conditioning forms, logical axis names, bf16 gradients, config validation."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.configs.common import DEFAULT_RULES
from dalle_jax.convert import diffusers_unet as conv_lib
from dalle_jax.models import unet as unet_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# The DDPM CIFAR-10 release's layout, shrunk: sin-first sinusoid shifted by 1, pad-0
# down-sampling, eps 1e-6, one head of all channels, attention at the middle level.
DDPM_LAYOUT = dict(
    sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32),
    layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), flip_sin_to_cos=False,
    freq_shift=1, downsample_padding=0, norm_eps=1e-6, norm_num_groups=8,
    attention_head_dim=None)
# Karlo's super-resolution U-Nets: resnet up/down-sampling, scale-shift time
# conditioning (its mid attention then has no norm), here with attention heads of
# dim 8, a learned class embedding and a mid scale factor, learned-variance outputs.
RESNET_LAYOUT = dict(
    sample_size=8, in_channels=6, out_channels=6, block_out_channels=(16, 32, 32),
    layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"),
    up_block_types=("ResnetUpsampleBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
    downsample_type="resnet", upsample_type="resnet", resnet_time_scale_shift="scale_shift",
    norm_num_groups=8, attention_head_dim=8, num_class_embeds=5, mid_block_scale_factor=1.5)


def _save_diffusers_unet(path, layout, seed=0):
  torch.manual_seed(seed)
  model = diffusers.UNet2DModel(**layout).eval()
  with torch.no_grad():  # off the default init (unit norms, zero biases) everywhere
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


def _parity(model, src, class_labels=None):
  rng = np.random.default_rng(0)
  c = model.config.in_channels
  x = rng.standard_normal((2, c, 8, 8)).astype(np.float32)
  t = np.array([3, 700])
  kw = {} if class_labels is None else {"class_labels": torch.tensor(class_labels)}
  with torch.no_grad():
    ref = model(torch.from_numpy(x), torch.from_numpy(t), **kw).sample.numpy()
  model_cfg, variables, scheduler, report = conv_lib.convert_unet2d(src)
  ours = unet_lib.UNet(**model_cfg)
  embeds = {} if class_labels is None else {"class": jnp.asarray(class_labels)}
  out = jax.jit(lambda v, x, t: ours.apply(v, x, t, embeds=embeds))(
      variables, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=1e-4, rtol=0)
  return model_cfg, scheduler, report


def test_ddpm_cifar_layout_matches_diffusers(tmp_path):
  src = str(tmp_path / "ddpm")
  model = _save_diffusers_unet(src, DDPM_LAYOUT)
  diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_large",
                          clip_sample=True).save_pretrained(src)
  cfg, scheduler, report = _parity(model, src)
  assert cfg["attention"] == ("none", "self", "none") and cfg["downsample_padding"] == 0
  assert scheduler["_class_name"] == "DDPMScheduler"
  assert scheduler["variance_type"] == "fixed_large"
  assert any("scheduler_config.json" in line for line in report)


def test_resnet_resampling_scale_shift_layout_matches_diffusers(tmp_path):
  # a pipeline folder: the scheduler lives in ../scheduler/
  src = str(tmp_path / "pipe" / "unet")
  model = _save_diffusers_unet(src, RESNET_LAYOUT, seed=1)
  diffusers.DDIMScheduler(prediction_type="v_prediction").save_pretrained(
      str(tmp_path / "pipe" / "scheduler"))
  cfg, scheduler, _ = _parity(model, src, class_labels=[1, 4])
  assert cfg["resample"] == ("resnet",) * 3 and cfg["time_cond"] == "scale_shift"
  assert cfg["mid_attn_norm_groups"] == 0
  assert scheduler["prediction_type"] == "v_prediction"


def test_deepfloyd_if_blocks_map_tensor_for_tensor():
  """IF stage II's UNet2DConditionModel blocks (resnet resampling, added-KV attention
  with a group-normed projected context and a padding mask, attention-pooled text and
  a noise-level embedding in the time embedding, gelu, scale-shift, skip_time_act,
  sqrt(2) output scales) are this U-Net with the right settings: every tensor maps
  by name and the outputs agree. (Reading IF's config is the IF importer's job.)"""
  torch.manual_seed(0)
  ref = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=6, out_channels=6, block_out_channels=(16, 32, 32),
      layers_per_block=(1, 2, 1),
      down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                        "SimpleCrossAttnDownBlock2D"),
      up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                      "ResnetUpsampleBlock2D"),
      mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=32, encoder_hid_dim=12,
      encoder_hid_dim_type="text_proj", addition_embed_type="text",
      addition_embed_type_num_heads=2, cross_attention_norm="group_norm", act_fn="gelu",
      resnet_time_scale_shift="scale_shift", class_embed_type="timestep",
      resnet_skip_time_act=True, resnet_out_scale_factor=1.414, mid_block_scale_factor=1.414,
      time_embedding_act_fn="gelu", attention_head_dim=8, norm_num_groups=8).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model_cfg = unet_lib.unet_kwargs(dict(
      in_channels=6, out_channels=6, block_channels=(16, 32, 32), num_res_blocks=(1, 2, 1),
      attention=("none", "added_kv", "added_kv"), resample="resnet", mid_attention="added_kv",
      attn_heads=0, attn_head_dim=8, attn_norm_eps=1e-5, norm_groups=8, norm_eps=1e-5, act="gelu",
      time_cond="scale_shift", skip_time_act=True, res_out_scale=1.414, mid_out_scale=1.414,
      time_embed_out_act="gelu", flip_sin_to_cos=True, freq_shift=0.0, context_dim=12,
      context_proj_dim=32, context_norm="group_norm", context_norm_groups=32,
      context_pool="attention", context_pool_heads=2, extra_embeds=("class:timestep",),
      dropout=0.0))
  variables = conv_lib.convert_weights({k: v.numpy() for k, v in ref.state_dict().items()},
                                       model_cfg)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 8, 8)).astype(np.float32)
  t, noise_level = np.array([3, 700]), np.array([50, 250])
  ctx = rng.standard_normal((2, 5, 12)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  with torch.no_grad():
    want = ref(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx),
               class_labels=torch.from_numpy(noise_level),
               encoder_attention_mask=torch.from_numpy(mask)).sample.numpy()
  model = unet_lib.UNet(**model_cfg)
  out = jax.jit(lambda v: model.apply(
      v, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), context_bsd=jnp.asarray(ctx),
      context_mask_bs=jnp.asarray(mask, bool), embeds={"class": jnp.asarray(noise_level)}))(
          variables)
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), want, atol=1e-4, rtol=0)


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
  src = str(tmp_path / "ddpm")
  _save_diffusers_unet(src, DDPM_LAYOUT)
  model_cfg = conv_lib.model_config(conv_lib.read_config(src))
  weights = conv_lib.read_weights(src)
  weights.pop("down_blocks.1.attentions.0.to_q.weight")
  weights["mid_block.attentions.0.to_k.lora.weight"] = np.zeros((4, 4), np.float32)
  weights["conv_out.bias"] = np.zeros((5,), np.float32)
  with pytest.raises(conv_lib.ConversionError) as e:
    conv_lib.convert_weights(weights, model_cfg, where=src)
  msg = str(e.value)
  assert "\n" not in msg
  assert "missing tensors (1): down_blocks.1.attentions.0.to_q.weight" in msg
  assert "unexpected tensors (1): mid_block.attentions.0.to_k.lora.weight" in msg
  assert "conv_out.bias (5,)" in msg


def test_torch_bin_weights_read_like_safetensors(tmp_path):
  model = _save_diffusers_unet(str(tmp_path / "st"), DDPM_LAYOUT)
  model.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
  assert os.path.isfile(tmp_path / "bin" / "diffusion_pytorch_model.bin")
  st, binw = (conv_lib.read_weights(str(tmp_path / d)) for d in ("st", "bin"))
  assert sorted(st) == sorted(binw) and len(st) == 182
  for k in st:
    np.testing.assert_array_equal(st[k], binw[k])
  os.remove(tmp_path / "bin" / "diffusion_pytorch_model.bin")
  with pytest.raises(conv_lib.ConversionError, match="none of diffusion_pytorch_model"):
    conv_lib.read_weights(str(tmp_path / "bin"))


def test_unsupported_diffusers_config_is_named(tmp_path):
  cfg = dict(DDPM_LAYOUT, _class_name="UNet2DModel")
  cfg["up_block_types"] = ("UpBlock2D", "UpBlock2D", "UpBlock2D")
  with pytest.raises(conv_lib.ConversionError, match="up_block_types.*does not mirror"):
    conv_lib.model_config(cfg)
  cfg = dict(DDPM_LAYOUT, _class_name="UNet2DModel", time_embedding_type="fourier")
  with pytest.raises(conv_lib.ConversionError, match="time_embedding_type"):
    conv_lib.model_config(cfg)
  os.makedirs(tmp_path / "m")
  with open(tmp_path / "m" / "config.json", "w") as f:
    json.dump({"_class_name": "UNet2DConditionModel"}, f)
  with pytest.raises(conv_lib.ConversionError, match="_class_name"):
    conv_lib.convert_unet2d(str(tmp_path / "m"))


def test_default_config_is_ddpm_cifar10():
  """The defaults build diffusers' DDPM CIFAR-10 U-Net: the same 35.7M parameters."""
  ref = diffusers.UNet2DModel(
      sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
      down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
      flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6,
      attention_head_dim=None)
  n_ref = sum(p.numel() for p in ref.parameters())
  model = unet_lib.UNet(**unet_lib.unet_kwargs(unet_lib.default_model_config()))
  x, t, kw = unet_lib.example_inputs(model)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, **kw))["params"]
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.unbox(shapes)))
  assert n == n_ref and 35.7e6 < n < 35.8e6


# --- the model's own features ------------------------------------------------------

# Every conditioning form at once: added-KV attention (normed, projected context),
# self + cross attention, attention pooling of the context, declared and undeclared
# extra embeddings, a low-res input, scale-shift, resnet resampling, Efficient U-Net.
FULL = dict(
    in_channels=3, out_channels=6, block_channels=(16, 32, 32), num_res_blocks=(1, 2, 1),
    attention=("added_kv", "self_cross", "cross"), mid_attention="added_kv", attn_heads=0,
    attn_head_dim=8, norm_groups=8, resample=("resnet", "conv", "resnet"),
    downsample_first=True, skip_scale=2 ** -0.5, time_cond="scale_shift", skip_time_act=True,
    res_out_scale=2 ** 0.5, context_dim=12, context_proj_dim=16, context_norm="group_norm",
    context_norm_groups=4, context_pool="attention", context_pool_heads=2,
    extra_embeds=("label:class:3", "aug:timestep", "image:mlp:6", "clip:identity"),
    low_res_channels=3, time_embed_out_act="silu", act="gelu", dropout=0.1)


def _full_inputs(b=2):
  rng = np.random.default_rng(0)
  kw = dict(context_bsd=jnp.asarray(rng.standard_normal((b, 5, 12)), jnp.float32),
            context_mask_bs=jnp.asarray([[1, 1, 1, 0, 0]] * b, bool),
            embeds={"label": jnp.arange(b) % 3, "aug": jnp.full((b,), 250.0),
                    "image": jnp.ones((b, 6)), "clip": jnp.ones((b, 64)),
                    "text": jnp.ones((b, 10))},  # undeclared: a learned linear projection
            low_res_bhwc=jnp.ones((b, 4, 4, 3)))  # resized to 8x8
  return jnp.asarray(rng.standard_normal((b, 8, 8, 3)), jnp.float32), jnp.array([10, 900]), kw


def _abstract_init(model, x, t, kw):
  return jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, x, t, **kw))


def test_every_conditioning_form_shapes_and_structure():
  model = unet_lib.UNet(**unet_lib.unet_kwargs(FULL))
  x, t, kw = _full_inputs()
  out = jax.eval_shape(lambda v: model.apply(v, x, t, **kw), _abstract_init(model, x, t, kw))
  assert out.shape == (2, 8, 8, 6) and out.dtype == jnp.float32
  p = nn.unbox(_abstract_init(model, x, t, kw)["params"])
  # Efficient U-Net: levels 1.. open with a down-sample to their own channels; the up
  # path has num_res_blocks + 1 blocks per level
  assert "downsample" not in p["down_0"] and "downsample" in p["down_1"]
  assert p["down_1"]["downsample"]["conv"]["kernel"].shape == (3, 3, 16, 32)
  assert "time_proj" in p["down_2"]["downsample"]  # a resnet down-sample, 32 -> 32
  assert "shortcut" not in p["down_2"]["downsample"]
  assert sorted(k for k in p["up_1"] if k.startswith("res_")) == ["res_0", "res_1", "res_2"]
  assert {"attn_0", "xattn_0", "attn_1", "xattn_1"} <= set(p["down_1"])
  assert set(p["down_1"]["xattn_0"]) == {"norm", "query", "add_key", "add_value", "out",
                                         "context_norm"}
  assert {"key", "add_key"} <= set(p["mid_attn_0"])
  assert p["conv_in"]["kernel"].shape == (3, 3, 6, 16)  # x ++ low_res
  assert p["embed_label"]["embedding"].shape == (3, 64)
  assert "embed_clip" not in p and p["embed_text"]["kernel"].shape == (10, 64)
  assert p["context_pool"]["proj"]["kernel"].shape == (12, 64)  # pools the raw context
  assert p["down_0"]["attn_0"]["add_key"]["dense"]["kernel"].shape == (16, 2, 8)


def test_every_param_has_logical_axis_names_that_map_to_distinct_mesh_axes():
  model = unet_lib.UNet(**unet_lib.unet_kwargs(FULL))
  x, t, kw = _full_inputs()
  boxed = _abstract_init(model, x, t, kw)["params"]
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert len(leaves) > 100
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.Partitioned), f"{name} has no logical axis names"
    assert len(leaf.names) == leaf.value.ndim and all(leaf.names), name
    mesh_axes = [a for a in nn.logical_to_mesh_axes(leaf.names, DEFAULT_RULES) if a is not None]
    assert len(mesh_axes) == len(set(mesh_axes)), f"{name}: {leaf.names} -> {mesh_axes}"


# Context attention in all three forms, small enough to compile in seconds.
SMALL_CTX = dict(
    in_channels=3, out_channels=3, block_channels=(8, 16), num_res_blocks=1, resample="conv",
    attention=("added_kv", "self_cross"), mid_attention="cross", attn_heads=0, attn_head_dim=4,
    norm_groups=4, context_dim=6, extra_embeds=("label:class:3",), dropout=0.1)


def _random_variables(model, x, t, kw, scale=0.1):
  """Random values everywhere, drawn on the host from the abstract init (no init
  compilation; ADM zero-inits output layers, which would hide paths)."""
  rng = np.random.default_rng(1)
  abstract = nn.unbox(_abstract_init(model, x, t, kw))
  return jax.tree.map(lambda a: jnp.asarray(
      (1.0 if len(a.shape) == 1 else 0.0) + scale * rng.standard_normal(a.shape), a.dtype),
                      abstract)


def _small_inputs(b=2):
  rng = np.random.default_rng(0)
  kw = dict(context_bsd=jnp.asarray(rng.standard_normal((b, 5, 6)), jnp.float32),
            context_mask_bs=jnp.asarray([[1, 1, 1, 0, 0]] * b, bool),
            embeds={"label": jnp.arange(b) % 3})
  return jnp.asarray(rng.standard_normal((b, 4, 4, 3)), jnp.float32), jnp.array([10, 900]), kw


def test_context_mask_hides_padding_tokens():
  """Context tokens behind the mask do not change the output; visible ones do
  (added-KV, self + cross and cross-only attention)."""
  x, t, kw = _small_inputs()
  model = unet_lib.UNet(**unet_lib.unet_kwargs(SMALL_CTX))
  variables = _random_variables(model, x, t, kw)
  ctx = kw["context_bsd"]
  run = jax.jit(lambda ctx: model.apply(variables, x, t, **dict(kw, context_bsd=ctx)))
  base = run(ctx)
  np.testing.assert_allclose(run(ctx.at[:, 3:].add(5.0)), base, atol=1e-5)
  assert float(jnp.abs(run(ctx.at[:, 1].add(5.0)) - base).max()) > 1e-2


def test_bf16_remat_dropout_gradients_are_finite_f32_and_reach_every_param():
  x, t, kw = _small_inputs()
  model = unet_lib.UNet(**unet_lib.unet_kwargs(SMALL_CTX), dtype=jnp.bfloat16, remat="full")
  params = _random_variables(model, x, t, kw)["params"]

  def loss(params):
    out = model.apply({"params": params}, x, t, train=True,
                      rngs={"dropout": jax.random.PRNGKey(2)}, **kw)
    assert out.dtype == jnp.float32
    return jnp.mean(out ** 2)

  grads = jax.device_get(jax.jit(jax.grad(loss))(params))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    name = jax.tree_util.keystr(path)
    assert g.dtype == np.float32, name
    assert np.all(np.isfinite(g)), name
    assert np.abs(g).max() > 0, f"{name}: no gradient"


def test_timestep_sinusoid_matches_diffusers():
  from diffusers.models.embeddings import get_timestep_embedding
  t = np.array([0.0, 1.0, 37.5, 999.0], np.float32)
  for flip, shift, dim in ((False, 1, 16), (True, 0, 15)):
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip,
                                 downscale_freq_shift=shift).numpy()
    ours = unet_lib.timestep_sinusoid(jnp.asarray(t), dim, flip, shift)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)  # f32 args up to ~1000 rad


@pytest.mark.parametrize("override, key", [
    ({"colour": 1}, "model.colour"),
    ({"attention": ("self", "bogus", "none", "none")}, "attention"),
    ({"num_res_blocks": (2, 2)}, "model.num_res_blocks has 2 entries"),
    ({"attn_heads": 2, "attn_head_dim": 8}, "model.attn_heads"),
    ({"norm_groups": 24}, "model.norm_groups=24"),
    ({"attention": "added_kv"}, "model.context_dim"),
    ({"extra_embeds": ("label:class",)}, "model.extra_embeds entry 'label:class'"),
    ({"time_cond": "film"}, "model.time_cond"),
])
def test_bad_model_config_is_a_one_line_error_naming_the_key(override, key):
  with pytest.raises(ValueError) as e:
    unet_lib.unet_kwargs(dict(unet_lib.default_model_config(), **override))
  assert key in str(e.value) and "\n" not in str(e.value)


def test_bad_call_inputs_are_named():
  model = unet_lib.UNet(**unet_lib.unet_kwargs(FULL))
  x, t, kw = _full_inputs()
  variables = _abstract_init(model, x, t, kw)
  apply = lambda **over: jax.eval_shape(lambda v: model.apply(v, x, t, **dict(kw, **over)),
                                        variables)
  with pytest.raises(ValueError, match=r"embeds\['aug'\] is missing"):
    apply(embeds={k: v for k, v in kw["embeds"].items() if k != "aug"})
  with pytest.raises(ValueError, match=r"context_bsd has shape \(2, 5, 7\)"):
    apply(context_bsd=jnp.zeros((2, 5, 7)))
  with pytest.raises(ValueError, match="low_res_bhwc is required"):
    apply(low_res_bhwc=None)
  with pytest.raises(ValueError, match="not divisible by 2"):
    jax.eval_shape(lambda v: model.apply(v, x[:, :6, :6], t, **kw), variables)
