"""unCLIP (DALL·E 2 / Karlo): the diffusion prior (caption -> CLIP image embedding, family
"prior") and the decoder (CLIP image embedding + caption -> image, family "diffusion" with
conditioning "clip_image": the `*_decoder` presets).

The prior trains on CLIP embeddings precomputed once with tools.embed (any CLIP the
project has: a trained workdir or an imported Hugging Face CLIP):

  python train.py --config configs/clip.py:shapes --workdir demo/clip
  python -m dalle_jax.tools.embed --clip demo/clip --dataset shapes/32px_5000 --data_dir data \
      --out data/shapes_clip
  python train.py --config configs/unclip.py:shapes --workdir demo/prior
    (data.dataset = data/shapes_clip: the records directory tools.embed wrote)

Presets:
  shapes  on the `shapes` CLIP's embeddings (E = 64, 16 caption tokens of width 64): a
          4-layer, width-128 prior (0.86M parameters). Measured with a 500-step shapes CLIP:
          1000 steps of 64 pairs took 2.7 CPU-minutes (7.5 min wall on the shared, loaded
          2-core host), loss 0.72 -> 0.04; on the 250 held-out test pairs the prior's
          samples (25 unclip steps, no guidance) have cosine 0.988 to the true image
          embeddings, the captions' text embeddings 0.943, the mean image embedding 0.118
          (guidance 4: 0.955).
  unclip  DALL·E 2's diffusion prior (paper, appendix C): a 24-layer decoder-only
          transformer of width 2048 over the ViT-H/16 CLIP's 1024-d embeddings and its
          77 caption states, cosine schedule over 1000 steps, x0-prediction (about 1.2B
          parameters; checked abstractly in tests/test_prior.py).
  karlo   Karlo's prior (kakaobrain/karlo-v1-alpha prior/config.json): 20 layers, 32 heads
          of 64, over ViT-L/14's 768-d embeddings and 77 caption states (about 1.0B
          parameters); `convert karlo` imports its weights for sampling or fine-tuning
          (init_from).

Decoder presets (dalle_jax/tasks/diffusion.py, conditioning "clip_image"; the frozen CLIP
config.text_encoder.clip embeds each training image and caption inside the step, Karlo's
text projection turns the image embedding into model.clip_tokens extra context tokens
before the caption's projected states and into a time-embedding addition; the caption is
dropped with diffusion.cond_drop_prob = 0.5 and, independently, the image embedding with
diffusion.image_drop_prob = 0.1, as DALL·E 2 section 2.1):
  shapes_decoder  the diffusion family's 16 px shapes U-Net (v-prediction, cosine) on the
          demo CLIP's embeddings, 600 steps of 64 (1.34M parameters):
            python train.py --config configs/unclip.py:shapes_decoder --workdir demo/decoder \
                --config.text_encoder.clip=demo/clip
            python sample.py --method unclip --prior demo/prior --decoder demo/decoder \
                --prompt "a red circle on a blue background" --num_images 8 --out t2i.png
            python sample.py --method unclip --prior demo/prior --decoder demo/decoder \
                --variations red_circle.png --num_images 4 --out var.png
            python sample.py --method unclip --prior demo/prior --decoder demo/decoder \
                --interpolate a.png b.png --frames 5 --out interp.png
            python sample.py --method unclip --prior demo/prior --decoder demo/decoder \
                --text_diff "a red circle" "a green circle" --image a.png \
                --text_diff_strength 0.5 --out diff.png
          (--prior/--decoder: trained stages, no super-resolution; the decoder's CLIP is the
          text encoder and embeds input images.)
          Measured (2026-12-02) on the demo's 1000-step shapes CLIP (demo/clip), the `shapes`
          prior (1000 steps) on its tools.embed records, this decoder at 600 steps (39 min
          wall on the shared, heavily loaded 2-core host; loss 0.79 -> 0.085), scored with
          dalle_jax/data/shapes_check.py (16 px; it reads 90% of real 16 px inputs fully
          right): text -> image on the demo's 6 prompts x 8 (prior 25 steps guidance 4,
          decoder 25 unclip steps guidance 3): colour 100%, background 100%, shape 23%
          (chance 20%; 21% with prior guidance 1; the step-300 decoder 29% / 31%).
          Variations of 10 test images x 4 (4 red circles): colour kept 100%, background
          100%, shape 45%; red circles stay red 16/16 (the CLI's 8 of red_circle.png: 8/8
          red circles on its cyan). Interpolations (DDIM, 5 frames, 7 pairs of different
          colours): first frame A's colour and last B's 7/7, 89% of frames A's or B's
          colour, 4/7 pairs A...A B...B (the others pass a third colour, e.g. red ->
          magenta -> black). Text diffs red -> green circle (4 red circles, 3 frames):
          last frame green 4/4 at --text_diff_strength 0.5, 3/4 at 1.0 (one shapeless).
          The prior on the 250 held-out pairs: cosine to the true image embedding 0.986
          (guidance 1) / 0.961 (guidance 4) vs the caption's text embedding 0.927 and the
          mean image embedding 0.140. Edits (UnclipPipeline.edit, as --edit IMAGE --mask
          MASK --prompt): 8 held-out 32 px test images, the shape's bounding box (+2 px)
          regenerated from the caption with the shape's colour changed, 4 samples each:
          the checker reads the new colour in 32/32, the old in 0/32, background kept 32/32.
  unclip_decoder  DALL·E 2's 64 px decoder: GLIDE's U-Net (512 x (1, 2, 3, 4), 3 blocks,
          attention at 32/16/8 px, 2.3B parameters) with 2048-wide context tokens; the
          caption enters as the frozen CLIP's token states (as Karlo), where the paper keeps
          GLIDE's trainable text transformer.
  karlo_decoder   Karlo's decoder (decoder/config.json: 320 x (1, 2, 3, 4), 3 blocks,
          added-KV attention with 64-wide heads at levels 2-4, 1536-wide context, learned
          variance), over ViT-L/14's 768-d embeddings: diffusers' parameter count exactly
          (tests/test_unclip_decoder.py); its scheduler and Karlo's sampling defaults.

Super-resolution presets (the diffusion task's SR stage, configs/imagen.py's keys, as unCLIP
trains its upsamplers: unconditional, convolution-only ADM U-Nets, the low-res image blurred
(cascade.blur; the 1024 px stage: BSR-degraded, cascade.bsr) in training and not noised, so
the U-Net has no level embedding):
  shapes_sr32   16 -> 32 px on the decoder's output (the shapes U-Net without attention,
          x0-prediction, 1.13M parameters), 300 steps of 32:
            python train.py --config configs/unclip.py:shapes_sr32 --workdir demo/unclip_sr32
            python sample.py --method unclip --prior demo/prior --decoder demo/decoder \
                --super_res demo/unclip_sr32 --prompt "a red circle on a blue background" \
                --num_images 8 --out t2i32.png
          (every mode takes --super_res: variations, interpolations, text diffs and edits
          come out at 32 px; --sr_steps, default the stage's config.sampling.steps = 25;
          it samples with its own sampler, DDIM.)
          Measured (2026-12-02): 300 steps in 5.3 min wall on the shared 2-core host (loss
          0.38 -> 0.0047; 30-40 examples/s). On 64 held-out 32 px test images from their clean 16 px
          versions: 27.67 dB PSNR (25 DDIM steps; 27.48 with 4) against bicubic's 27.03;
          the checker reads its outputs 100% right on all three (bicubic: shape 96.9%).
          Three stages on the demo's 6 prompts x 8 (the prior and decoder measured above,
          seed 0, prior guidance 4, decoder guidance 3): 32 px colour 100%, background 100%,
          shape 29.2%, against the 16 px decoder output's 100% / 100% / 22.9% from the same
          seed; the SR output keeps the decoder's colour and background reading on every
          image and its shape reading on 75%.
  unclip_sr256    DALL·E 2's 64 -> 256 upsampler (Table 3: 320 x (1, 2, 3, 4), depth 3,
          ~700M; here 729.7M), linear schedule, 27 DDIM steps, batch 1024, lr 1.2e-4.
  unclip_sr1024   256 -> 1024 (192 x (1, 1, 2, 2, 4, 4), depth 2, ~300M; here 282.1M),
          15 DDIM steps, batch 512, lr 1e-4. Its low-res input is BSR-degraded in
          training as the paper's (cascade.bsr: random isotropic/anisotropic blurs before
          and after a random-method downsample, Gaussian noise, JPEG at quality 30-95;
          dalle_jax/diffusion/degradation.py) instead of blurred. Measured (2026-12-02) on
          shapes_sr32 with --config.cascade.blur=False --config.cascade.bsr=True (300
          steps, 198 s wall vs 191 s blurred; loss 0.016 vs 0.0047): on 64 held-out images
          from inputs degraded as a weak previous stage's (Gaussian noise 8/255, blur 0.8,
          JPEG q30) 20.84 dB vs the blur-trained stage's 20.06 (bicubic 18.51); from clean
          inputs 24.61 vs 27.67 (bicubic 27.03): the defaults, sized for 256 px inputs,
          are harsh on 16 px ones.
  karlo_sr256     Karlo's super_res_first (config.json: the same layout with the time
          embedding added, no scale-shift): diffusers' UNet2DModel parameter count exactly
          (tests/test_unclip_sr.py); UnCLIPScheduler, 7 steps. Karlo's checkpoint has a
          second copy fine-tuned for the last step (super_res_last), which `convert karlo`
          imports; a stage trained here uses one U-Net for every step.

Keys beyond configs/common.py:
  model.*        PriorTransformer kwargs (dalle_jax/models/prior.py); embed_dim, text_dim
                 and text_len must match the records (checked, naming the key)
  diffusion.*    the scheduler (diffusers' scheduler_config keys) + loss_weighting,
                 min_snr_gamma and cond_drop_prob: the caption dropout for guidance (the
                 dropped rows see the empty caption's features, as sampling's
                 unconditional half does)
  sampling.*     steps / guidance_scale of the eval's prior samples (x0_cosine_sampled)
The clip_mean / clip_std normalisation comes from the records' training embeddings
(tools.embed's meta, or computed from up to data.stats_examples training records).
"""
import ml_collections

from dalle_jax.configs import common
from dalle_jax.configs import diffusion as diffusion_configs
from dalle_jax.configs import imagen as imagen_configs
from dalle_jax.models.unclip import CLIP_EMBED

PRIOR_PRESETS = ("shapes", "unclip", "karlo")
DECODER_PRESETS = ("shapes_decoder", "unclip_decoder", "karlo_decoder")
SR_PRESETS = ("shapes_sr32", "unclip_sr256", "unclip_sr1024", "karlo_sr256")
PRESETS = PRIOR_PRESETS + DECODER_PRESETS + SR_PRESETS

# unCLIP's upsamplers (DALL·E 2 appendix C, Table 3): unconditional ADM U-Nets, convolutions
# only (no attention, so they apply at any size), the low-res image concatenated to x_t.
SHAPES_SR_UNET = dict(diffusion_configs.SHAPES_UNET, attention=("none",) * 3,
                      mid_attention="none", low_res_channels=3)
ADM_SR_UNET = dict(num_res_blocks=3, attention=("none",) * 4, mid_attention="none",
                   resample="resnet", time_cond="scale_shift", norm_groups=32, norm_eps=1e-5,
                   flip_sin_to_cos=True, freq_shift=0.0, downsample_padding=1, dropout=0.0,
                   low_res_channels=3)
# 64 -> 256: 320 x (1, 2, 3, 4), depth 3 (~700M)
UNCLIP_SR256_UNET = dict(ADM_SR_UNET, block_channels=(320, 640, 960, 1280))
# Karlo's super_res_first / _last (config.json): the same, time embedding added (no scale-shift)
KARLO_SR256_UNET = dict(UNCLIP_SR256_UNET, time_cond="add")
# 256 -> 1024: 192 x (1, 1, 2, 2, 4, 4), depth 2 (~300M)
UNCLIP_SR1024_UNET = dict(ADM_SR_UNET, block_channels=(192, 192, 384, 384, 768, 768),
                          num_res_blocks=2, attention=("none",) * 6)


def prior_model_config(embed_dim, text_dim, text_len, num_layers, num_heads, head_dim,
                       norm_in=False, text_embed_norm=False):
  m = ml_collections.ConfigDict()
  m.embed_dim = embed_dim  # E: the CLIP embedding width
  m.text_dim = text_dim  # C: the CLIP text tower's width (its token states)
  m.text_len = text_len  # S: caption tokens (the CLIP's context)
  m.num_layers = num_layers
  m.num_heads = num_heads
  m.head_dim = head_dim
  m.mlp_dim = 0  # 0 = 4 x width
  m.time_dim = 0  # 0 = width
  m.time_act = "silu"
  m.norm_in = norm_in
  m.text_embed_norm = text_embed_norm
  m.ln_epsilon = 1e-5
  return m


def decoder_config(name):
  """The decoder presets: the diffusion family's configs with conditioning 'clip_image'
  (dalle_jax/tasks/diffusion.py, dalle_jax/models/unclip.py)."""
  if name == "shapes_decoder":
    c = diffusion_configs.get_config("shapes")
    c.model.unet = diffusion_configs.unet_config(**dict(
        diffusion_configs.SHAPES_UNET, context_dim=64, extra_embeds=(f"{CLIP_EMBED}:identity",)))
    c.text_encoder.clip = "demo/clip"
    c.total_steps = 600
  else:
    c = diffusion_configs.get_config("glide_base64")
    if name == "unclip_decoder":  # GLIDE's 64 px U-Net, context tokens of GLIDE's text width
      unet = dict(diffusion_configs.GLIDE_BASE64_UNET, context_dim=2048)
      c.text_encoder.clip = "ckpt/clip-vit-huge-14"
    else:  # Karlo's decoder/config.json
      unet = dict(block_channels=(320, 640, 960, 1280), num_res_blocks=3,
                  attention=("none", "added_kv", "added_kv", "added_kv"),
                  mid_attention="added_kv", attn_heads=0, attn_head_dim=64, resample="resnet",
                  time_cond="scale_shift", out_channels=6, norm_groups=32, norm_eps=1e-5,
                  flip_sin_to_cos=True, freq_shift=0.0, downsample_padding=1, dropout=0.0,
                  context_dim=1536)
      c.text_encoder.clip = "ckpt/clip-vit-large-patch14"
      c.diffusion.use_clipped_model_output = False  # UnCLIPScheduler
      c.sampling = diffusion_configs.sampling_config(prompts=c.sampling.prompts,
                                                     guidance_scale=8.0, steps=25)
      c.sampling.sampler = "unclip"
    c.model.unet = diffusion_configs.unet_config(**dict(
        unet, extra_embeds=(f"{CLIP_EMBED}:identity",)))
    c.optimizer.learning_rate = 1.2e-4
    c.ema_decay = 0.9999
  c.model.conditioning = "clip_image"
  c.model.clip_tokens = 4  # N extra context tokens from the image embedding
  del c.model["text"]  # the caption's states come from the frozen CLIP
  # DALL·E 2 section 2.1: the caption dropped 50% of the time, the CLIP embedding 10%
  c.diffusion.cond_drop_prob = 0.5
  c.diffusion.image_drop_prob = 0.1
  return c


def sr_config(name):
  """The super-resolution presets: the diffusion family's SR stage (config.model.low_res_size,
  config.cascade; dalle_jax/tasks/diffusion.py) as unCLIP trains it: no caption (the decoder's
  image carries the content), blur augmentation of the low-res input and no noise
  augmentation, so the U-Net has no level embedding (Karlo's upsamplers take x_t ++ the
  bicubic image and nothing else)."""
  shapes = name == "shapes_sr32"
  c = diffusion_configs.get_config("shapes" if shapes else "glide_base64")
  c.model.conditioning = "none"
  c.model.text.update(dict(width=0, layers=0, heads=1, mlp_dim=0))
  c.text_encoder.t5 = ""
  c.diffusion.cond_drop_prob = 0.0
  c.cascade = imagen_configs.cascade_config(max_noise_level=0, noise_level=0, blur=True,
                                            level_embed="")
  if shapes:
    c.data.image_size = 32
    c.model.low_res_size = 16
    c.model.unet = diffusion_configs.unet_config(**SHAPES_SR_UNET)
    # x0-prediction: the image's own MSE at every level (configs/imagen.py:shapes_sr32)
    c.diffusion.prediction_type = "sample"
    c.batch_size = 32
    c.total_steps = 300
    c.log_every = 25
    c.eval_every = 150
    c.checkpoint_every = 150
    c.sampling = diffusion_configs.sampling_config(prompts=(), guidance_scale=1.0, steps=25)
    return c
  # the paper's (and Karlo's) upsamplers: linear schedule, epsilon, fixed variance
  c.diffusion = diffusion_configs.diffusion_config(cond_drop_prob=0.0)
  c.data.dataset = "laion_images"
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.ema_decay = 0.9999
  if name in ("unclip_sr256", "karlo_sr256"):
    c.data.image_size, c.model.low_res_size = 256, 64
    c.data.crop_size = 64  # trains on 64 px crops (Table 3: crop fraction 0.25)
    c.model.unet = diffusion_configs.unet_config(
        **(KARLO_SR256_UNET if name == "karlo_sr256" else UNCLIP_SR256_UNET))
    c.batch_size = 1024
    c.optimizer.learning_rate = 1.2e-4
    c.sampling = diffusion_configs.sampling_config(prompts=(), guidance_scale=1.0, steps=27)
  else:  # unclip_sr1024
    c.data.image_size, c.model.low_res_size = 1024, 256
    c.data.crop_size = 256  # trains on 256 px crops (Table 3: crop fraction 0.25)
    # appendix C: "a more diverse BSR degradation" for the second upsampler
    c.cascade.blur, c.cascade.bsr = False, True
    c.model.unet = diffusion_configs.unet_config(**UNCLIP_SR1024_UNET)
    c.batch_size = 512
    c.optimizer.learning_rate = 1.0e-4
    c.sampling = diffusion_configs.sampling_config(prompts=(), guidance_scale=1.0, steps=15)
  c.total_steps = 1_000_000
  if name == "karlo_sr256":  # super_res_scheduler: UnCLIPScheduler, 7 steps
    c.diffusion = diffusion_configs.diffusion_config(
        beta_schedule="squaredcos_cap_v2", variance_type="fixed_small_log", cond_drop_prob=0.0)
    c.sampling.update(dict(sampler="unclip", steps=7))
  return c


def get_config(arg=None):
  name = common.parse_preset(arg, PRESETS, "shapes")
  if name in DECODER_PRESETS:
    return decoder_config(name)
  if name in SR_PRESETS:
    return sr_config(name)
  c = common.base_config()
  c.family = "prior"
  # Karlo's prior_scheduler: UnCLIPScheduler (cosine, x0-prediction, sampled clipped to +-5
  # in the normalised space).
  c.diffusion = diffusion_configs.diffusion_config(
      beta_schedule="squaredcos_cap_v2", prediction_type="sample",
      variance_type="fixed_small_log", clip_sample=True, clip_sample_range=5.0)
  c.sampling = ml_collections.ConfigDict(dict(sampler="unclip", steps=25, guidance_scale=4.0,
                                              eval_samples=64))
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.stats_examples = 20000  # records read for clip_mean / clip_std if the meta lacks them
  if name == "shapes":
    c.model = prior_model_config(embed_dim=64, text_dim=64, text_len=16, num_layers=4,
                                 num_heads=4, head_dim=32)
    c.data.dataset = "data/shapes_clip"
    c.data.image_size = 32  # unused (no images); kept equal to the CLIP's
    c.batch_size = 64
    c.total_steps = 1000
    c.log_every = 50
    c.eval_every = 250
    c.eval_batches = 2
    c.preview_every = 0
    c.checkpoint_every = 500
    c.dtype = "float32"  # CPU
    c.optimizer = common.optimizer_config("adamw", lr=1e-3)
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 0.01
    c.ema_decay = 0.0
  else:
    if name == "unclip":
      c.model = prior_model_config(embed_dim=1024, text_dim=1024, text_len=77, num_layers=24,
                                   num_heads=32, head_dim=64)
    else:  # karlo
      c.model = prior_model_config(embed_dim=768, text_dim=768, text_len=77, num_layers=20,
                                   num_heads=32, head_dim=64)
    c.data.dataset = "data/laion_clip"  # tools.embed --dataset output
    c.data.image_size = 224
    c.batch_size = 4096
    c.total_steps = 600_000
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 5000
    c.optimizer = common.optimizer_config("adamw", lr=1.1e-4)
    c.optimizer.warmup_steps = 10_000
    c.optimizer.weight_decay = 6.0e-2
    c.optimizer.b2 = 0.96
    c.optimizer.eps = 1e-6
    c.ema_decay = 0.9999
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.remat = "dots"
  return c
