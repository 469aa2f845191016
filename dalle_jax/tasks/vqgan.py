"""VQGAN tokenizer training: the taming-transformers objective as a Task.

    loss = l1 |x - x̂| (+ l2 (x - x̂)²) + w_p LPIPS(x, x̂)        (nll)
         + w_cb (codebook + β commitment)
         + λ · disc_on · G(D(x̂))                                 (generator GAN term)
         + disc_on · D-loss(D(x), D(sg(x̂)))                      (discriminator term)

λ = disc_weight · |∇_W nll| / (|∇_W G| + 1e-4) at the decoder's last conv W
(taming's adaptive weight), computed here with jax.vjp and stop-gradient'ed.
The trainer differentiates this single loss w.r.t. all params, so the GAN term
reads the discriminator through stop_gradient and the discriminator term sees
stop_gradient(x̂): each optimizer group ('generator', 'discriminator') only gets
its own gradients. EMA codebooks ('vq_ema') are updated inside loss_fn and
returned as the new model_state; the frozen LPIPS network lives in model_state
['lpips'] (never in 'params', so no optimizer touches it).

Variables: {'params': {'vqgan': ..., 'discriminator': ...}, 'vq_ema': ..., 'lpips': ...}.

Helpers for other families and tools (models.loader's VQGAN codec, jitted, cached per config):
  encode_images(config, variables, images (B, H, W, 3) in [-1, 1]) -> codes (B, h, w) int32
  decode_codes(config, variables, codes (B, h, w)) -> images (B, H, W, 3) in [-1, 1]
  reconstruct(config, variables, images) -> (images in [-1, 1], codes)
"""
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import parallel
from dalle_jax.data import pipeline
from dalle_jax.models import discriminator as disc_lib
from dalle_jax.models import layers
from dalle_jax.models import loader
from dalle_jax.models.lpips import LPIPS, load_lpips_params
from dalle_jax.models.vqgan import conv2d, vqgan_from_config
from dalle_jax.tasks import base

sg = jax.lax.stop_gradient


# --- metrics --------------------------------------------------------------------

def psnr(x, y):
  """Per-image PSNR in dB of [-1, 1] images (peak = full range)."""
  mse = jnp.mean(((x - y) * 0.5) ** 2, axis=(1, 2, 3))
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def _gaussian_window(size=11, sigma=1.5):
  g = np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2) / sigma) ** 2)
  return (g / g.sum()).astype(np.float32)


def ssim(x, y, size=11, sigma=1.5):
  """Per-image SSIM (Wang et al. 2004; Gaussian 11x11, σ 1.5) of [-1, 1] images."""
  x = (x.astype(jnp.float32) + 1) * 0.5
  y = (y.astype(jnp.float32) + 1) * 0.5
  size = min(size, x.shape[1], x.shape[2])
  g = jnp.asarray(_gaussian_window(size, sigma))
  c = x.shape[-1]

  def blur(a):  # separable depthwise Gaussian, VALID
    kh = jnp.tile(g[:, None, None, None], (1, 1, 1, c))
    kw = jnp.tile(g[None, :, None, None], (1, 1, 1, c))
    dn = ("NHWC", "HWIO", "NHWC")
    a = jax.lax.conv_general_dilated(a, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c)
    return jax.lax.conv_general_dilated(a, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c)

  c1, c2 = 0.01 ** 2, 0.03 ** 2
  mx, my = blur(x), blur(y)
  sxx = blur(x * x) - mx ** 2
  syy = blur(y * y) - my ** 2
  sxy = blur(x * y) - mx * my
  s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def adaptive_weight(grad_nll, grad_gan, max_weight=1e4):
  """taming's λ = |∇nll| / (|∇gan| + 1e-4), clipped to [0, max], no gradient."""
  w = jnp.linalg.norm(grad_nll.reshape(-1)) / (jnp.linalg.norm(grad_gan.reshape(-1)) + 1e-4)
  return sg(jnp.clip(w, 0.0, max_weight))


# --- helpers used by other families / tools -------------------------------------------
# The VQGAN codec lives with the model loader (shared with sampling and the tools);
# these names stay for the task's preview and existing callers.
vqgan_variables = loader.vqgan_variables
encode_images = loader.vqgan_encode
decode_codes = loader.vqgan_decode
reconstruct = loader.vqgan_reconstruct


def batch_images(batch):
  """The batch's images as float32 in [-1, 1]: uint8 ones (data.image_dtype='uint8',
  a quarter of the bytes host -> device) are scaled here, inside the jitted step."""
  return pipeline.normalize_images(jnp.asarray(batch["image"])).astype(jnp.float32)


# --- the task ----------------------------------------------------------------------

class VQGANTask(base.Task):
  name = "vqgan"

  def __init__(self, config):
    super().__init__(config)
    self.model = vqgan_from_config(config)
    lc = config.loss
    self.use_disc = lc.disc_weight > 0
    self.use_lpips = lc.perceptual_weight > 0
    self.use_ema = config.model.quantizer.ema_decay > 0
    if self.use_lpips and not (config.lpips.vgg_path and config.lpips.lin_path):
      raise ValueError(
          f"config.loss.perceptual_weight={lc.perceptual_weight} needs local LPIPS weights: set "
          f"config.lpips.vgg_path (torchvision vgg16 state dict) and config.lpips.lin_path "
          f"(LPIPS lin heads), or --config.loss.perceptual_weight=0")
    if not self.use_lpips:
      logging.info("VQGAN: perceptual (LPIPS) loss off (config.loss.perceptual_weight=0)")
    if lc.disc_loss not in ("hinge", "non_saturating"):
      raise ValueError(f"config.loss.disc_loss={lc.disc_loss!r}: choose hinge or non_saturating")
    dtype = layers.dtype_from_name(config.dtype)
    self.disc = disc_lib.NLayerDiscriminator(
        ndf=config.disc.ndf, n_layers=config.disc.n_layers, norm=config.disc.norm, dtype=dtype)
    self.lpips = LPIPS(dtype=dtype)
    self._preview_fn = None

  # --- data ---
  def dummy_batch(self, batch_size):
    s = self.config.data.image_size
    return {"image": np.zeros((batch_size, s, s, 3), np.float32)}

  # --- model ---
  def init(self, rng, batch):
    k_vq, k_disc = jax.random.split(rng)
    x = jnp.asarray(batch["image"][:1], jnp.float32)
    variables = dict(self.model.init({"params": k_vq}, x))
    params = {"vqgan": variables.pop("params")}
    if self.use_disc:
      params["discriminator"] = self.disc.init(k_disc, x)["params"]
    out = {"params": params, **variables}
    if self.use_lpips:
      out["lpips"] = jax.tree.map(jnp.asarray, load_lpips_params(
          self.config.lpips.vgg_path, self.config.lpips.lin_path))
    return out

  def optimizer_groups(self):
    groups = {"generator": self.config.optimizer}
    if self.use_disc:
      groups["discriminator"] = self.config.disc_optimizer
    return groups

  def param_labels(self, params):
    # Boxed parameters (logical names) are labelled as a whole, so optax's masks
    # replace whole boxes rather than the arrays inside them.
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
    return {k: jax.tree.map(lambda _, k=k: "discriminator" if k == "discriminator" else "generator",
                            v, is_leaf=is_box)
            for k, v in params.items()}

  # --- objective ---
  def _nll(self, x, recon, lpips_params):
    lc = self.config.loss
    rec = jnp.mean(jnp.abs(x - recon)) * lc.l1_weight
    if lc.l2_weight:
      rec = rec + lc.l2_weight * jnp.mean((x - recon) ** 2)
    p_loss = 0.0
    if self.use_lpips:
      p_loss = jnp.mean(self.lpips.apply({"params": lpips_params}, x, recon))
    return rec + lc.perceptual_weight * p_loss, (rec, p_loss)

  def loss_fn(self, params, model_state, batch, rng, step):
    lc = self.config.loss
    x = batch_images(batch)
    variables = {"params": params["vqgan"]}
    if self.use_ema:
      variables["vq_ema"] = model_state["vq_ema"]
      (recon, aux), updated = self.model.apply(
          variables, x, update_codebook=True, return_hidden=True, rngs={"vq": rng},
          mutable=["vq_ema"])
      model_state = dict(model_state, vq_ema=updated["vq_ema"])
    else:
      recon, aux = self.model.apply(variables, x, return_hidden=True)
    lpips_params = model_state.get("lpips")

    nll_fn = lambda r: self._nll(x, r, lpips_params)
    nll, nll_vjp, (rec, p_loss) = jax.vjp(nll_fn, recon, has_aux=True)
    loss = nll + lc.codebook_weight * aux["vq_loss"]
    metrics = {
        "rec_loss": rec, "nll_loss": nll, "vq_loss": aux["vq_loss"],
        "commitment_loss": aux["commitment_loss"], "codebook_usage": aux["codebook_usage"],
        "perplexity": aux["perplexity"], "psnr": jnp.mean(psnr(x, sg(recon))),
    }
    if self.use_lpips:
      metrics["perceptual_loss"] = p_loss

    if self.use_disc:
      disc_on = jnp.asarray(step >= lc.disc_start, jnp.float32)
      d_params = params["discriminator"]
      # Generator term: gradients reach the VQGAN only.
      g_fn = lambda r: disc_lib.generator_loss(self.disc.apply({"params": sg(d_params)}, r), lc.disc_loss)
      g_loss, g_vjp = jax.vjp(g_fn, recon)
      if lc.adaptive_weight:
        w_grads = self.last_layer_grads(params, aux["hidden"], (nll_vjp(1.0)[0], g_vjp(1.0)[0]))
        d_weight = adaptive_weight(*w_grads, lc.adaptive_weight_max) * lc.disc_weight
      else:
        d_weight = jnp.asarray(lc.disc_weight, jnp.float32)
      # Discriminator term: gradients reach the discriminator only.
      logits_real = self.disc.apply({"params": d_params}, x)
      logits_fake = self.disc.apply({"params": d_params}, sg(recon))
      d_loss = disc_lib.discriminator_loss(logits_real, logits_fake, lc.disc_loss)
      loss = loss + disc_on * (d_weight * g_loss + d_loss)
      metrics.update(g_loss=g_loss, d_loss=d_loss, d_weight=d_weight, disc_on=disc_on,
                     logits_real=jnp.mean(logits_real), logits_fake=jnp.mean(logits_fake))
    return loss, (metrics, model_state)

  def last_layer_grads(self, params, hidden, recon_cotangents):
    """∂(loss)/∂W of the decoder's last conv for each d(loss)/d(recon) given.

    recon = conv_out(hidden) (× 2 - 1 for zero_one_range models: the same factor
    scales every gradient, so it cancels in the adaptive weight's ratio).
    """
    kernel = sg(params["vqgan"]["decoder"]["conv_out"]["kernel"]).astype(jnp.float32)
    hidden = sg(hidden).astype(jnp.float32)
    _, conv_vjp = jax.vjp(lambda k: conv2d(hidden, k), kernel)
    return tuple(conv_vjp(sg(c))[0] for c in recon_cotangents)

  def eval_fn(self, params, model_state, batch, rng):
    x = batch_images(batch)
    variables = {"params": params["vqgan"]}
    if self.use_ema:
      variables["vq_ema"] = model_state["vq_ema"]
    recon, aux = self.model.apply(variables, x)
    recon = jnp.clip(recon, -1.0, 1.0)
    nll, (rec, _) = self._nll(x, recon, model_state.get("lpips"))
    return {"loss": nll + self.config.loss.codebook_weight * aux["vq_loss"], "rec_loss": rec,
            "psnr": jnp.mean(psnr(x, recon)), "ssim": jnp.mean(ssim(x, recon)),
            "codebook_usage": aux["codebook_usage"], "perplexity": aux["perplexity"]}

  def preview(self, params, model_state, batch, rng):
    """(image, reconstruction) pairs of the first num_preview eval images; the
    batch and parameters may be sharded over processes, the grid comes back
    whole on every process."""
    n = min(int(self.config.get("num_preview", 8)), batch["image"].shape[0])
    x = batch_images({"image": batch["image"][:n]})
    variables = {"params": params, **({"vq_ema": model_state["vq_ema"]} if self.use_ema else {})}
    recon, _ = reconstruct(self.config, variables, x)
    x, recon = parallel.to_host(x), parallel.to_host(recon)
    pairs = np.stack([base.to_uint8(x), base.to_uint8(recon)], axis=1).reshape((2 * n,) + x.shape[1:])
    return {"reconstructions": base.image_grid(pairs, ncols=2 * min(4, n))}

  def flops_per_example(self):
    """Forward+backward FLOPs of the VQGAN (+ discriminator) from XLA's cost model."""
    s = self.config.data.image_size
    x = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
    try:
      v = jax.eval_shape(self.model.init, jax.random.key(0), x)
      cost = jax.jit(lambda v, x: self.model.apply(v, x)).lower(v, x).cost_analysis()
      flops = float(cost["flops"] if isinstance(cost, dict) else cost[0]["flops"])
      if self.use_disc:
        dv = jax.eval_shape(self.disc.init, jax.random.key(0), x)
        dc = jax.jit(self.disc.apply).lower(dv, x).cost_analysis()
        flops += 3 * float(dc["flops"] if isinstance(dc, dict) else dc[0]["flops"])  # real, fake, G
      return 3.0 * flops  # backward ≈ 2x forward
    except Exception as e:  # cost analysis is best-effort
      logging.info("VQGAN flops estimate unavailable: %s", e)
      return None


TASK = VQGANTask
