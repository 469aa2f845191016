"""DeepFloyd IF import: tiny random IF-like stage I / stage II pipelines built with diffusers
(UNet2DConditionModel + IF's schedulers + a tiny T5 v1.1 text encoder and tokenizer, saved in
the pipeline layout) convert and reproduce diffusers: the U-Nets within 1e-4, a guided 8-step
DDIM loop per stage run the way IF's pipelines guide (learned variance split 3 + 3, dynamic
thresholding), stage II from the same low-res image, noise level and x_T, and stage I's own
DDPM sampler (learned-range variance) with diffusers' noise draws; the converted checkpoint's
T5 reproduces the tiny T5's states. ~65 CPU-s."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from dalle_jax.convert import deepfloyd_if as if_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from dalle_jax.diffusion import guidance, samplers  # noqa: E402  pylint: disable=g-import-not-at-top
from dalle_jax.models import text2im  # noqa: E402  pylint: disable=g-import-not-at-top
from dalle_jax.models import unet as unet_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from dalle_jax.train import checkpoint  # noqa: E402  pylint: disable=g-import-not-at-top
from tests.test_t5 import write_spiece  # noqa: E402  pylint: disable=g-import-not-at-top

T5_WIDTH = 16
TEXT_LEN = 6  # IF pads to 77; the states are random here, so a short context keeps it cheap
GUIDANCE = 3.0
STEPS = 8

# IF's U-Net blocks at toy size. attention_head_dim is the per-head WIDTH for the
# SimpleCrossAttn blocks: 32 channels / 8 = 4 heads (read as a head count it would be 8
# heads of 4 with the same tensor shapes; only the outputs tell).
COMMON = dict(
    sample_size=8, out_channels=6, mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    cross_attention_dim=32, encoder_hid_dim=T5_WIDTH, encoder_hid_dim_type="text_proj",
    addition_embed_type="text", addition_embed_type_num_heads=2,
    cross_attention_norm="group_norm", act_fn="gelu", resnet_time_scale_shift="scale_shift",
    attention_head_dim=8, norm_num_groups=8)
STAGE1 = dict(
    COMMON, in_channels=3, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"))
STAGE2 = dict(
    COMMON, in_channels=6, block_out_channels=(16, 32, 32), layers_per_block=(1, 2, 1),
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                      "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                    "ResnetUpsampleBlock2D"),
    class_embed_type="timestep", resnet_skip_time_act=True, resnet_out_scale_factor=1.414,
    mid_block_scale_factor=1.414, time_embedding_act_fn="gelu")
# IF's scheduler/scheduler_config.json (diffusers' conversion script: stage II thresholds
# with sample_max_value 1.0)
IF_SCHEDULER = dict(beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                    thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5,
                    clip_sample=True, prediction_type="epsilon")
SAMPLE_MAX = {"I": 1.5, "II": 1.0}


def _tiny_unet(layout, seed):
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(**layout).eval()
  with torch.no_grad():  # off the default init (unit norms, zero biases) everywhere
    for p in unet.parameters():
      p.add_(0.05 * torch.randn_like(p))
    # eps of about unit size, as a trained model's: the raw random U-Net's is ~3x larger,
    # and under guidance its 8-step trajectory is chaotic (measured: float32 differences of
    # 1e-5 per step end 5e-4 apart at scale 5; 6e-6 with this scaling at scale 3)
    unet.conv_out.weight.mul_(0.3)
    unet.conv_out.bias.mul_(0.3)
  return unet


def _write_pipeline(root, stage, unet, with_t5):
  """The pipeline layout by hand: each part's save_pretrained + model_index.json."""
  unet.save_pretrained(os.path.join(root, "unet"))
  diffusers.DDPMScheduler(**dict(IF_SCHEDULER, sample_max_value=SAMPLE_MAX[stage])).save_pretrained(
      os.path.join(root, "scheduler"))
  index = {"_class_name": "IFPipeline" if stage == "I" else "IFSuperResolutionPipeline",
           "unet": ["diffusers", "UNet2DConditionModel"],
           "scheduler": ["diffusers", "DDPMScheduler"],
           "safety_checker": [None, None], "watermarker": [None, None]}
  if stage == "II":
    diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(
        os.path.join(root, "image_noising_scheduler"))
    index["image_noising_scheduler"] = ["diffusers", "DDPMScheduler"]
  t5 = None
  if with_t5:
    write_spiece(os.path.join(root, "tokenizer"))
    torch.manual_seed(7)
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=60, d_model=T5_WIDTH, d_kv=4, num_heads=4, d_ff=24, num_layers=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=12,
        feed_forward_proj="gated-gelu")).eval()
    with torch.no_grad():
      for name, p in t5.named_parameters():
        if "layer_norm" in name:
          p.add_(0.2 * torch.randn_like(p))
    t5.save_pretrained(os.path.join(root, "text_encoder"))
    index.update(text_encoder=["transformers", "T5EncoderModel"],
                 tokenizer=["transformers", "T5Tokenizer"])
  with open(os.path.join(root, "model_index.json"), "w") as f:
    json.dump(index, f)
  return t5


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("if_stage1"))
  unet = _tiny_unet(STAGE1, 0)
  t5 = _write_pipeline(root, "I", unet, with_t5=True)
  return root, unet, t5


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("if_stage2"))
  unet = _tiny_unet(STAGE2, 1)
  _write_pipeline(root, "II", unet, with_t5=False)  # as IF's stage II releases
  return root, unet


def _prompt_states(b=2):
  """Random (cond, uncond) encoder states, the same for both sides."""
  rng = np.random.default_rng(3)
  return (rng.standard_normal((b, TEXT_LEN, T5_WIDTH)).astype(np.float32),
          rng.standard_normal((b, TEXT_LEN, T5_WIDTH)).astype(np.float32))


def _nchw(x_bhwc):
  return torch.from_numpy(np.asarray(x_bhwc).transpose(0, 3, 1, 2).copy())


def _bhwc(x_nchw):
  return x_nchw.numpy().transpose(0, 2, 3, 1)


def _sched_config(root):
  return diffusers.DDPMScheduler.from_pretrained(os.path.join(root, "scheduler")).config


def _diffusers_ddim(unet, sched_config, x_T, pos, neg, model_extra=None, cond_input=None,
                    thresholding=True, scale=GUIDANCE):
  """IF's denoising loop with a DDIM scheduler built from IF's config, by hand as
  IFPipeline / IFSuperResolutionPipeline do: [uncond; cond] rows, the 6 output channels
  split 3 + 3, the eps half guided; DDIM takes only the eps half."""
  sched = diffusers.DDIMScheduler.from_config(sched_config, thresholding=thresholding)
  sched.set_timesteps(STEPS)
  x = _nchw(x_T)
  ctx = torch.from_numpy(np.concatenate([neg, pos]))
  c = x.shape[1]
  with torch.no_grad():
    for t in sched.timesteps:
      inp = x if cond_input is None else torch.cat([x, cond_input], dim=1)
      out = unet(torch.cat([inp, inp]), t, encoder_hidden_states=ctx, **(model_extra or {})).sample
      uncond, cond = out.chunk(2)
      eps = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
      x = sched.step(eps, t, x).prev_sample
  return _bhwc(x)


def _check_unet_parity(imp, unet, low_res=None, noise_level=None):
  """U-Net outputs on 4 rows (the [cond; uncond] states of a guided pass); returns our
  jitted apply(x, t, context) (stage I), compiled for those shapes."""
  rng = np.random.default_rng(0)
  ctx = np.concatenate(_prompt_states())
  x = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
  t = np.array([3, 700, 250, 999], np.int32)
  extra, kw = {}, {}
  inp = _nchw(x)
  if low_res is not None:
    inp = torch.cat([inp, _nchw(low_res)], dim=1)
    extra = {"class_labels": torch.from_numpy(noise_level)}
    kw = dict(low_res_bhwc=jnp.asarray(low_res), embeds={"class": jnp.asarray(noise_level)})
  with torch.no_grad():
    want = _bhwc(unet(inp, torch.from_numpy(t).long(), encoder_hidden_states=torch.from_numpy(ctx),
                      **extra).sample)
  model = unet_lib.UNet(**imp.unet_config)
  apply = jax.jit(lambda x, t, ctx: model.apply(imp.unet_variables, x, t, context_bsd=ctx, **kw))
  got = apply(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
  return apply


def _our_guided_ddim(imp, x_T, pos, neg, low_res=None, embeds=None):
  """Our side: the converted U-Net through guidance.classifier_free_guidance (cond rows
  first) and samplers.sample under the imported scheduler settings."""
  model = unet_lib.UNet(**imp.unet_config)
  ctx = jnp.concatenate([jnp.asarray(pos), jnp.asarray(neg)])
  twice = lambda a: None if a is None else jnp.concatenate([a, a])

  def run(variables, x_T):
    def apply_fn(x2, t2):
      return model.apply(variables, x2, t2, context_bsd=ctx, low_res_bhwc=twice(low_res),
                         embeds={k: twice(v) for k, v in (embeds or {}).items()})
    model_fn = guidance.classifier_free_guidance(apply_fn, GUIDANCE, learned_variance=True)
    return samplers.sample(model_fn, imp.scheduler, x_T, sampler="ddim", steps=STEPS)

  return np.asarray(jax.jit(run)(imp.unet_variables, jnp.asarray(x_T)))


def test_stage1_unet_guided_ddim_and_ddpm_loops_match_diffusers(stage1):
  root, unet, _ = stage1
  imp = if_lib.convert_if(root)
  cfg = imp.unet_config
  assert imp.stage == "I" and imp.sample_size == 8
  assert (cfg["attn_heads"], cfg["attn_head_dim"]) == (0, 8)  # 32 channels: 4 heads of 8
  assert cfg["attention"] == ("none", "added_kv") and cfg["mid_attention"] == "added_kv"
  assert (cfg["context_dim"], cfg["context_proj_dim"], cfg["context_pool"]) == (
      T5_WIDTH, 32, "attention")
  assert (cfg["in_channels"], cfg["low_res_channels"], cfg["out_channels"]) == (3, 0, 6)
  s = imp.scheduler
  assert (s.beta_schedule, s.variance_type, s.thresholding, s.dynamic_thresholding_ratio,
          s.sample_max_value) == ("squaredcos_cap_v2", "learned_range", True, 0.95, 1.5)
  apply = _check_unet_parity(imp, unet)

  pos, neg = _prompt_states()
  x_T = np.random.default_rng(5).standard_normal((2, 8, 8, 3)).astype(np.float32)
  want = _diffusers_ddim(unet, _sched_config(root), x_T, pos, neg)
  got = _our_guided_ddim(imp, x_T, pos, neg)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # the loop exercised guidance and dynamic thresholding: without either diffusers ends elsewhere
  plain = _diffusers_ddim(unet, _sched_config(root), x_T, pos, neg, thresholding=False)
  unguided = _diffusers_ddim(unet, _sched_config(root), x_T, pos, neg, scale=1.0)
  assert np.abs(plain - want).max() > 0.1 and np.abs(unguided - want).max() > 0.1

  # IF's own sampler, DDPM with the learned-range variance (the kept conditional half) and
  # thresholding: diffusers' DDPMScheduler.step draws its noise from a torch generator; our
  # ddpm_step gets the same draws
  sched = diffusers.DDPMScheduler.from_config(_sched_config(root))
  sched.set_timesteps(STEPS)
  plan = samplers.make_plan(imp.scheduler, "ddpm", STEPS)
  np.testing.assert_array_equal(np.asarray(plan["t"]), sched.timesteps.numpy())
  ctx = jnp.concatenate([jnp.asarray(pos), jnp.asarray(neg)])
  model_fn = guidance.classifier_free_guidance(lambda x2, t2: apply(x2, t2, ctx), GUIDANCE,
                                               learned_variance=True)
  step = jax.jit(lambda p, x, out, noise: samplers.ddpm_step(imp.scheduler, p, x, out, noise)[0])
  x_ref, x = _nchw(x_T), jnp.asarray(x_T)
  g_ref, g_ours = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
  for i, t in enumerate(sched.timesteps):
    with torch.no_grad():
      uncond, cond = unet(torch.cat([x_ref, x_ref]), t,
                          encoder_hidden_states=torch.from_numpy(np.concatenate([neg, pos]))
                          ).sample.chunk(2)
    out_ref = torch.cat([uncond[:, :3] + GUIDANCE * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], 1)
    x_ref = sched.step(out_ref, t, x_ref, generator=g_ref).prev_sample
    noise = torch.randn(x_ref.shape, generator=g_ours) if int(t) > 0 else torch.zeros(x_ref.shape)
    x = step({k: v[i] for k, v in plan.items()}, x, model_fn(x, jnp.full((2,), int(t), jnp.int32)),
             jnp.asarray(_bhwc(noise)))
  np.testing.assert_allclose(np.asarray(x), _bhwc(x_ref), atol=1e-4, rtol=0)


def test_stage2_unet_and_guided_ddim_loop_match_diffusers(stage2):
  root, unet = stage2
  imp = if_lib.convert_if(root)
  cfg = imp.unet_config
  assert imp.stage == "II" and imp.t5_config is None
  assert (cfg["in_channels"], cfg["low_res_channels"], cfg["out_channels"]) == (3, 3, 6)
  assert cfg["num_res_blocks"] == (1, 2, 1) and cfg["extra_embeds"] == ("class:timestep",)
  assert (cfg["skip_time_act"], cfg["res_out_scale"], cfg["mid_out_scale"],
          cfg["time_embed_out_act"]) == (True, 1.414, 1.414, "gelu")
  rng = np.random.default_rng(1)
  low_res = rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
  noise = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
  # the pipeline's conditioning: upsample (align_corners=True), then add_noise at the level
  up_ref = torch.nn.functional.interpolate(_nchw(low_res), (8, 8), mode="bilinear",
                                           align_corners=True)
  noising = diffusers.DDPMScheduler.from_pretrained(os.path.join(root, "image_noising_scheduler"))
  level = 250
  z_ref = noising.add_noise(up_ref, _nchw(noise), torch.tensor([level, level]))
  z, embeds = if_lib.stage2_condition(jnp.asarray(low_res), 8, level, jnp.asarray(noise),
                                      imp.noising_scheduler)
  np.testing.assert_allclose(np.asarray(z), _bhwc(z_ref), atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(embeds["class"]), [level, level])
  _check_unet_parity(imp, unet, low_res=np.concatenate([_bhwc(z_ref)] * 2),
                     noise_level=np.array([level, 40, level, 900]))

  pos, neg = _prompt_states()
  x_T = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
  want = _diffusers_ddim(unet, _sched_config(root), x_T, pos, neg, cond_input=z_ref,
                         model_extra={"class_labels": torch.tensor([level] * 4)})
  got = _our_guided_ddim(imp, x_T, pos, neg, low_res=z, embeds=embeds)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_cli_checkpoint_config_weights_and_t5(stage1, stage2, tmp_path):
  from dalle_jax.sampling.t5_encoder import T5TextEncoder  # pylint: disable=g-import-not-at-top
  from dalle_jax.tools import convert  # pylint: disable=g-import-not-at-top
  root, _, t5 = stage1
  out = str(tmp_path / "if1")
  convert.main(["deepfloyd_if", "--src", root, "--out", out])
  config, variables = checkpoint.load_model(out)
  assert config.family == "diffusion" and config.model.conditioning == "text"
  assert config.text_encoder.t5 == if_lib.CHECKPOINT_T5
  d = config.diffusion
  assert (d.beta_schedule, d.variance_type, d.thresholding, d.dynamic_thresholding_ratio,
          d.sample_max_value) == ("squaredcos_cap_v2", "learned_range", True, 0.95, 1.5)
  assert config.deepfloyd_if.to_dict() == dict(stage="I", text_len=77, context_mask=False,
                                               negative_prompt="")
  imp = if_lib.convert_if(root, with_t5=False)
  # the family's model builder gives back the imported U-Net, its weights under "unet"
  assert text2im.unet_kwargs(config, text_width=T5_WIDTH) == unet_lib.unet_kwargs(
      imp.unet_config)
  want = jax.tree_util.tree_leaves_with_path(imp.unet_variables["params"])
  got = dict(jax.tree_util.tree_leaves_with_path(variables["params"]["unet"]))
  assert len(got) == len(want)
  for path, leaf in want:
    np.testing.assert_array_equal(np.asarray(got[path]), leaf)

  # the checkpoint's T5 (CKPT/text_encoder, with the tokenizer) = the tiny T5 on IF's 77
  # tokens, padding positions included (IF's U-Net attends to all of them)
  texts = ["a red circle on the blue background", ""]
  tok = transformers.T5Tokenizer.from_pretrained(os.path.join(root, "tokenizer"))
  enc = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
  with torch.no_grad():
    want_states = t5(**enc).last_hidden_state.numpy()
  encoder = T5TextEncoder.load(os.path.join(out, config.text_encoder.t5),
                               max_len=config.deepfloyd_if.text_len)
  ids, mask = encoder.tokenizer.encode(texts, 77)
  np.testing.assert_array_equal(ids, enc["input_ids"].numpy())
  states, _ = encoder.encode_texts(texts)
  np.testing.assert_allclose(states, want_states, atol=1e-4, rtol=0)

  root2, _ = stage2
  out2 = str(tmp_path / "if2")
  convert.main(["deepfloyd_if", "--src", root2, "--out", out2])
  config2 = checkpoint.read_config(out2)
  assert config2.text_encoder.t5 == "" and config2.deepfloyd_if.stage == "II"
  assert config2.deepfloyd_if.noise_level == 250
  assert config2.deepfloyd_if.noising.beta_schedule == "squaredcos_cap_v2"
  assert config2.diffusion.sample_max_value == 1.0 and config2.diffusion.thresholding
  assert config2.model.unet.low_res_channels == 3 and not os.path.exists(
      os.path.join(out2, if_lib.CHECKPOINT_T5))


def test_bad_folders_and_configs_are_one_line_errors(tmp_path):
  with pytest.raises(if_lib.ConversionError, match="model_index.json: not found"):
    if_lib.convert_if(str(tmp_path))
  with pytest.raises(SystemExit, match=r"^error: .*model_index.json: not found$"):
    if_lib.main(["--src", str(tmp_path), "--out", str(tmp_path / "ckpt")])
  assert not os.path.exists(tmp_path / "ckpt")
  with open(tmp_path / "model_index.json", "w") as f:
    json.dump({"_class_name": "StableDiffusionPipeline"}, f)
  with pytest.raises(if_lib.ConversionError, match="not a DeepFloyd IF pipeline"):
    if_lib.convert_if(str(tmp_path))
  with open(tmp_path / "model_index.json", "w") as f:
    json.dump({"_class_name": "IFSuperResolutionPipeline"}, f)
  with pytest.raises(if_lib.ConversionError,
                     match="missing unet/, scheduler/, image_noising_scheduler/"):
    if_lib.convert_if(str(tmp_path))
  # a stage I folder whose T5 is narrower than encoder_hid_dim (caught before any weight
  # is read), then a scheduler setting the samplers do not have
  bad = tmp_path / "bad_stage1"
  for part, cfg in (("unet", dict(STAGE1, _class_name="UNet2DConditionModel")),
                    ("scheduler", dict(IF_SCHEDULER, _class_name="DDPMScheduler")),
                    ("text_encoder", {"model_type": "t5", "d_model": 8})):
    os.makedirs(bad / part)
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    with open(bad / part / name, "w") as f:
      json.dump(cfg, f)
  with open(bad / "model_index.json", "w") as f:
    json.dump({"_class_name": "IFPipeline"}, f)
  with pytest.raises(if_lib.ConversionError, match="T5 encoder is 8 wide.*encoder_hid_dim is 16"):
    if_lib.convert_if(str(bad))
  with open(bad / "scheduler" / "scheduler_config.json", "w") as f:
    json.dump(dict(IF_SCHEDULER, use_karras_sigmas=True), f)
  with pytest.raises(if_lib.ConversionError, match="scheduler_config.json: .*use_karras_sigmas"):
    if_lib.convert_if(str(bad))
  cfg = dict(STAGE2, _class_name="UNet2DConditionModel")
  with pytest.raises(if_lib.ConversionError, match="class_embed_type.*noise level"):
    if_lib.unet_config(dict(cfg, class_embed_type=None), "II", True)
  with pytest.raises(if_lib.ConversionError, match="in_channels=6.*stage I"):
    if_lib.unet_config(dict(cfg, class_embed_type=None), "I", True)
  with pytest.raises(if_lib.ConversionError, match="in_channels=3.*stage II"):
    if_lib.unet_config(dict(cfg, in_channels=3), "II", True)
  with pytest.raises(if_lib.ConversionError, match="mid_block_type"):
    if_lib.unet_config(dict(cfg, mid_block_type="UNetMidBlock2DCrossAttn"), "II", True)
  with pytest.raises(ValueError, match="noise has shape"):
    if_lib.stage2_condition(jnp.zeros((1, 4, 4, 3)), 8, 250, jnp.zeros((1, 4, 4, 3)))
