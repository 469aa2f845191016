"""VQGAN tokenizer: quantizer, GAN pieces, shapes of the real presets, learning."""
import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dalle_jax.configs import vqgan as vqgan_configs
from dalle_jax.models import discriminator as disc_lib
from dalle_jax.models.lpips import LPIPS, VGG_CHANNELS, VGG_SLICES, load_lpips_params
from dalle_jax.models.quantizer import VectorQuantizer
from dalle_jax.models.vqgan import vqgan_from_config
from dalle_jax.tasks import vqgan as vqgan_task


def np_init(abstract_boxed, seed=0):
  """Fan-in scaled random params without compiling an init (XLA CPU compiles
  of random initialisers cost seconds each on a loaded 2-core machine)."""
  rng = np.random.default_rng(seed)
  def init(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "bias":
      return np.zeros(a.shape, np.float32)
    if name == "scale":
      return np.ones(a.shape, np.float32)
    if name == "codebook":
      return rng.uniform(-1 / a.shape[0], 1 / a.shape[0], a.shape).astype(np.float32)
    return (rng.normal(0, 1, a.shape) / np.sqrt(np.prod(a.shape[:-1]))).astype(np.float32)
  return jax.tree_util.tree_map_with_path(init, nn.unbox(abstract_boxed))


def task_init(task, batch, seed=0):
  """(params, model_state) for `task` via np_init."""
  v = dict(np_init(jax.eval_shape(task.init, jax.random.key(0), batch), seed))
  return v.pop("params"), v


# --- quantizer ----------------------------------------------------------------------

def _quantizer_vars(q, z, seed=0):
  return q.init(jax.random.key(seed), z)


def test_lookup_matches_brute_force_and_losses():
  q = VectorQuantizer(num_codes=50, embed_dim=6, beta=0.25)
  z = jax.random.normal(jax.random.key(1), (2, 3, 4, 6)) * 0.05
  v = _quantizer_vars(q, z)
  zq, codes, aux = q.apply(v, z)
  cb = np.asarray(nn.unbox(v["params"])["codebook"])
  d = ((np.asarray(z).reshape(-1, 1, 6) - cb[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(np.asarray(codes).reshape(-1), d.argmin(-1))
  np.testing.assert_allclose(np.asarray(zq), cb[np.asarray(codes)], atol=1e-6)
  mse = np.mean((np.asarray(z) - cb[np.asarray(codes)]) ** 2)
  np.testing.assert_allclose(float(aux["commitment_loss"]), mse, rtol=1e-5)
  np.testing.assert_allclose(float(aux["vq_loss"]), 1.25 * mse, rtol=1e-5)
  used = len(np.unique(np.asarray(codes)))
  np.testing.assert_allclose(float(aux["codebook_usage"]), used / 50, rtol=1e-6)
  assert 1.0 <= float(aux["perplexity"]) <= used + 1e-3


def test_straight_through_and_loss_gradients():
  q = VectorQuantizer(num_codes=16, embed_dim=4, beta=0.25)
  z = jax.random.normal(jax.random.key(2), (1, 2, 2, 4)) * 0.05
  v = _quantizer_vars(q, z)
  w = jax.random.normal(jax.random.key(3), z.shape)
  # d/dz sum(w * zq) == w: the quantizer is the identity in the backward pass.
  g = jax.grad(lambda z: jnp.sum(w * q.apply(v, z)[0]))(z)
  np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6)
  # The codebook loss moves codes (not z); the commitment loss moves z (not codes).
  def loss(params, z, key):
    return q.apply({"params": params}, z)[2][key]
  gp = jax.grad(loss)(v["params"], z, "commitment_loss")
  assert float(jnp.abs(nn.unbox(gp)["codebook"]).max()) == 0.0
  gz = jax.grad(loss, argnums=1)(v["params"], z, "codebook_loss")
  assert float(jnp.abs(gz).max()) == 0.0
  gp = jax.grad(loss)(v["params"], z, "codebook_loss")
  assert float(jnp.abs(nn.unbox(gp)["codebook"]).max()) > 0.0


def test_l2_normalised_factorised_lookup():
  q = VectorQuantizer(num_codes=32, embed_dim=16, codebook_dim=4, l2_normalize=True)
  z = jax.random.normal(jax.random.key(4), (2, 4, 4, 16))
  v = _quantizer_vars(q, z)
  params = nn.unbox(v["params"])
  assert params["codebook"].shape == (32, 4) and params["proj_in"]["kernel"].shape == (16, 4)
  zq, codes, _ = q.apply(v, z)
  assert zq.shape == z.shape and codes.shape == (2, 4, 4)
  # nearest by cosine similarity in the 4-d projected space
  low = np.asarray(z) @ np.asarray(params["proj_in"]["kernel"]) + np.asarray(params["proj_in"]["bias"])
  low /= np.linalg.norm(low, axis=-1, keepdims=True)
  cb = np.array(params["codebook"])
  cb /= np.linalg.norm(cb, axis=-1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(codes).reshape(-1), (low.reshape(-1, 4) @ cb.T).argmax(-1))
  decoded = q.apply(v, codes, method=q.embed_codes)
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(zq), atol=1e-5)


def test_ema_update_and_dead_code_restart():
  q = VectorQuantizer(num_codes=8, embed_dim=2, ema_decay=0.5, ema_eps=0.0, dead_code_threshold=2)
  # All latents sit near (5, 5): one code wins, the others are never used.
  z = 5.0 + 0.01 * jax.random.normal(jax.random.key(5), (1, 4, 4, 2))
  v = _quantizer_vars(q, z)
  assert "codebook" not in v.get("params", {})  # EMA codebook is not a parameter
  ema0 = v["vq_ema"]
  _, codes, _ = q.apply(v, z)
  winner = int(np.asarray(codes).reshape(-1)[0])
  _, new = q.apply(v, z, update=True, mutable=["vq_ema"], rngs={"vq": jax.random.key(0)})
  ema1 = new["vq_ema"]
  # the winning code moved halfway (decay 0.5) toward the batch mean, in cluster-size terms
  n = float(np.asarray(codes).size)
  want_sum = 0.5 * np.asarray(ema0["embed_sum"][winner]) + 0.5 * np.asarray(z).reshape(-1, 2).sum(0)
  np.testing.assert_allclose(np.asarray(ema1["embed_sum"][winner]), want_sum, rtol=1e-5)
  np.testing.assert_allclose(float(ema1["cluster_size"][winner]), 0.5 + 0.5 * n, rtol=1e-6)
  assert int(ema1["unused_steps"][winner]) == 0
  assert int(ema1["unused_steps"].sum()) == 7
  # second update: the 7 unused codes reach the threshold and restart from batch latents
  _, new2 = q.apply({"vq_ema": ema1}, z, update=True, mutable=["vq_ema"], rngs={"vq": jax.random.key(1)})
  cb = np.asarray(new2["vq_ema"]["codebook"])
  assert np.all(np.abs(cb - 5.0) < 0.1)  # every code now lives among the latents
  assert int(new2["vq_ema"]["unused_steps"].sum()) == 0
  # without update (eval), nothing changes
  _, same = q.apply({"vq_ema": ema1}, z, mutable=["vq_ema"])
  np.testing.assert_array_equal(np.asarray(same["vq_ema"]["codebook"]), np.asarray(ema1["codebook"]))


# --- real presets (abstract) -------------------------------------------------------------

@pytest.mark.parametrize("preset,grid,n_embed", [("f8_8192", 32, 8192), ("f16_16384", 16, 16384)])
def test_real_preset_shapes(preset, grid, n_embed):
  config = vqgan_configs.get_config(preset)
  model = vqgan_from_config(config)
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  quant, codes, _ = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.encode), variables, x)
  assert codes.shape == (2, grid, grid) and codes.dtype == jnp.int32
  assert quant.shape == (2, grid, grid, 256)
  images = jax.eval_shape(lambda v, c: model.apply(v, c, method=model.decode_codes), variables, codes)
  assert images.shape == (2, 256, 256, 3)
  params = variables["params"]
  assert params["quantize"]["codebook"].value.shape == (n_embed, 256)
  # every parameter carries logical axis names; conv kernels the conv ones
  leaves = jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
  assert all(isinstance(a, nn.LogicallyPartitioned) for a in leaves)
  assert params["decoder"]["conv_out"]["kernel"].names == (
      "conv_height", "conv_width", "conv_in", "conv_out")
  if preset == "f16_16384":  # DALL·E mini: attention only at the 16x16 level
    assert "attn_0" in params["decoder"]["up_4"] and "attn_0" not in params["decoder"]["up_3"]


# --- GAN pieces ------------------------------------------------------------------------

def test_discriminator_losses_and_shapes():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 1.5])
  # hinge: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))
  want = 0.5 * (np.mean([0, 0.5, 2.0]) + np.mean([0, 1.0, 2.5]))
  np.testing.assert_allclose(float(disc_lib.discriminator_loss(real, fake, "hinge")), want, rtol=1e-6)
  sp = lambda a: np.log1p(np.exp(a))
  want = 0.5 * (np.mean(sp(-np.asarray(real))) + np.mean(sp(np.asarray(fake))))
  np.testing.assert_allclose(float(disc_lib.discriminator_loss(real, fake, "non_saturating")), want, rtol=1e-5)
  np.testing.assert_allclose(float(disc_lib.generator_loss(fake, "hinge")), -np.mean(fake), rtol=1e-6)
  for norm in disc_lib.NORMS:
    d = disc_lib.NLayerDiscriminator(ndf=32, n_layers=3, norm=norm)
    x = jnp.zeros((2, 64, 64, 3))
    shape = jax.eval_shape(lambda: d.apply(d.init(jax.random.key(0), x), x)).shape
    assert shape == (2, 6, 6, 1), (norm, shape)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6 (taming's 70x70 patches)
  with pytest.raises(ValueError, match="disc.norm"):
    disc_lib.NLayerDiscriminator(norm="instance").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def _tiny_gan_config():
  c = vqgan_configs.get_config("shapes")
  c.model = vqgan_configs.model_config(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                                       resolution=16, z_channels=8, embed_dim=8, n_embed=32)
  c.model.norm_groups = 4
  c.data.image_size = 16
  c.disc.ndf, c.disc.n_layers, c.disc.norm = 8, 2, "group"
  c.loss.disc_weight = 0.8
  c.loss.disc_start = 0
  return c


def test_adaptive_weight_and_gradient_separation():
  config = _tiny_gan_config()
  config.disc.norm = "none"
  task = vqgan_task.VQGANTask(config)
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  params, v = task_init(task, {"image": x}, seed=1)
  config.loss.disc_start = 3  # (traced) step 5: GAN on; step 1: off
  task = vqgan_task.VQGANTask(config)
  loss_and_grads = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))
  (loss, (metrics, _)), grads = loss_and_grads(params, v, {"image": x}, jax.random.key(2), 5)

  # Brute force: grads of nll and of the generator GAN loss w.r.t. the last conv kernel.
  def recon_with(kernel):
    p = jax.tree.map(lambda a: a, params)
    p["vqgan"]["decoder"]["conv_out"]["kernel"] = kernel
    return task.model.apply({"params": p["vqgan"]}, x)[0]
  kernel = params["vqgan"]["decoder"]["conv_out"]["kernel"]
  def brute(kernel):
    g_nll = jax.grad(lambda k: jnp.mean(jnp.abs(x - recon_with(k))))(kernel)
    g_gan = jax.grad(lambda k: -jnp.mean(
        task.disc.apply({"params": params["discriminator"]}, recon_with(k))))(kernel)
    return g_nll, g_gan
  def d_only(dp):
    recon = jax.lax.stop_gradient(task.model.apply({"params": params["vqgan"]}, x)[0])
    d = lambda im: task.disc.apply({"params": dp}, im)
    return disc_lib.discriminator_loss(d(x), d(recon), "hinge")
  (g_nll, g_gan), want_d = jax.jit(lambda k, dp: (brute(k), jax.grad(d_only)(dp)))(
      kernel, params["discriminator"])
  want = 0.8 * np.linalg.norm(g_nll) / (np.linalg.norm(g_gan) + 1e-4)
  np.testing.assert_allclose(float(metrics["d_weight"]), want, rtol=1e-4)
  np.testing.assert_allclose(float(vqgan_task.adaptive_weight(g_nll, g_gan, 0.5)),
                             min(0.5, want / 0.8), rtol=1e-4)
  # The single loss's gradient splits cleanly: discriminator params only see the
  # discriminator loss (the VQGAN's GAN term reads them through stop_gradient).
  for a, b in zip(jax.tree.leaves(grads["discriminator"]), jax.tree.leaves(want_d)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # Before disc_start the GAN terms vanish from the loss.
  (loss_late, (m_late, _)), _ = loss_and_grads(params, v, {"image": x}, jax.random.key(2), 1)
  np.testing.assert_allclose(float(loss_late), float(m_late["nll_loss"] + m_late["vq_loss"]), rtol=1e-5)
  assert float(m_late["disc_on"]) == 0.0 and float(metrics["disc_on"]) == 1.0
  assert float(loss) != pytest.approx(float(loss_late))
  assert task.optimizer_groups().keys() == {"generator", "discriminator"}
  labels = task.param_labels(params)
  assert set(jax.tree.leaves(labels["discriminator"])) == {"discriminator"}
  assert set(jax.tree.leaves(labels["vqgan"])) == {"generator"}


@pytest.mark.slow
def test_gan_trains_through_the_trainer(tmp_path):
  """disc_weight > 0: two optimizer groups in one step. The discriminator stays
  put until disc_start (zero gradients), then both groups update and the
  adversarial terms are live."""
  import json
  import orbax.checkpoint as ocp
  from dalle_jax.train import loop
  c = _tiny_gan_config()
  c.loss.disc_start = 2  # GAN terms from the third step (step index 2)
  c.disc.norm = "batch"  # the real presets' discriminator
  c.model.attn_resolutions = ()  # fewer ops to compile
  c.data.dataset, c.data.data_dir = "shapes/16px_40", str(tmp_path / "data")
  c.mesh.data = 8
  c.batch_size, c.total_steps, c.log_every = 8, 4, 1
  c.checkpoint_every, c.keep_checkpoints = 1, 4  # the parameters after every step
  c.eval_every = c.preview_every = 0
  c.optimizer.warmup_steps = 0
  loop.train(c, str(tmp_path / "run"))
  params = {s: ocp.PyTreeCheckpointer().restore(str(tmp_path / "run" / "checkpoints" / str(s) / "state"))["params"]
            for s in (1, 2, 3, 4)}

  def changed(a, b, group):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree.leaves(params[a][group]), jax.tree.leaves(params[b][group])))
  assert changed(1, 2, "vqgan") > 0  # the generator learns from the start
  assert changed(1, 2, "discriminator") == 0  # no GAN gradients before disc_start
  assert changed(2, 3, "discriminator") > 0 and changed(3, 4, "discriminator") > 0  # then both
  assert changed(2, 3, "vqgan") > 0 and changed(3, 4, "vqgan") > 0
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    rows = {r["step"]: r for r in map(json.loads, f)}
  assert [rows[s]["disc_on"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
  assert {"learning_rate_generator", "learning_rate_discriminator"} <= set(rows[4])
  for key in ("g_loss", "d_loss", "logits_real", "logits_fake"):  # the adversarial terms move
    assert rows[3][key] != rows[4][key], key
  assert all(np.isfinite(rows[s]["d_weight"]) and rows[s]["d_weight"] > 0 for s in (3, 4))
  # the GAN terms are in the loss from step 3 on
  assert rows[3]["loss"] != pytest.approx(rows[3]["nll_loss"] + rows[3]["vq_loss"], rel=1e-4)


# --- LPIPS -------------------------------------------------------------------------------

def test_lpips_weights_and_config_errors(tmp_path):
  rng = np.random.default_rng(0)
  vgg, lin = {}, {}
  c_in = 3
  for s, (idxs, chans) in enumerate(zip(VGG_SLICES, VGG_CHANNELS)):
    for i, c in zip(idxs, chans):
      vgg[f"features.{i}.weight"] = rng.normal(0, (2 / (9 * c_in)) ** 0.5, (c, c_in, 3, 3)).astype(np.float32)
      vgg[f"features.{i}.bias"] = np.zeros(c, np.float32)
      c_in = c
    lin[f"lin{s}.model.1.weight"] = np.abs(rng.normal(0, 1, (1, chans[-1], 1, 1))).astype(np.float32)
  np.savez(tmp_path / "vgg.npz", **vgg)
  np.savez(tmp_path / "lin.npz", **lin)
  params = load_lpips_params(str(tmp_path / "vgg.npz"), str(tmp_path / "lin.npz"))
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  y = jnp.clip(x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), -1, 1)
  d = jax.jit(LPIPS().apply)({"params": params}, jnp.concatenate([x, x]), jnp.concatenate([x, y]))
  assert d.shape == (4,)
  assert float(jnp.abs(d[:2]).max()) < 1e-6 and float(d[2:].min()) > 1e-3

  del lin["lin3.model.1.weight"]
  np.savez(tmp_path / "lin_bad.npz", **lin)
  with pytest.raises(ValueError, match="lin3.model.1.weight"):
    load_lpips_params(str(tmp_path / "vgg.npz"), str(tmp_path / "lin_bad.npz"))

  config = vqgan_configs.get_config("f16_16384")  # perceptual_weight 1, no weights
  with pytest.raises(ValueError, match="config.lpips.vgg_path"):
    vqgan_task.VQGANTask(config)
  config.loss.perceptual_weight = 0.0
  vqgan_task.VQGANTask(config)  # fine without weights


# --- learning --------------------------------------------------------------------------

def test_learns_to_reconstruct_shapes():
  """200 steps on 16px shapes: L1 error falls several-fold, codes stay in use."""
  from dalle_jax.data import shapes
  images = lambda split, n: np.stack(
      [shapes.make_example(i, split, 16)["image"] for i in range(n)]).astype(np.float32) / 127.5 - 1
  train, test = images("train", 512), images("test", 32)
  c = vqgan_configs.get_config("shapes")
  c.model = vqgan_configs.model_config(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                       resolution=16, z_channels=16, embed_dim=16, n_embed=64)
  c.model.norm_groups = 4
  c.model.quantizer.codebook_dim = 8
  c.model.quantizer.l2_normalize = True
  c.data.image_size = 16
  task = vqgan_task.VQGANTask(c)
  params, v = task_init(task, {"image": train[:1]})
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, 3e-3, 20, 200, 3e-4), b1=0.9, b2=0.99)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, ms, x, i):
    (_, (m, ms)), g = jax.value_and_grad(task.loss_fn, has_aux=True)(
        params, ms, {"image": x}, jax.random.key(i), i)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, ms, m

  evaluate = jax.jit(task.eval_fn)
  before = evaluate(params, v, {"image": test}, jax.random.key(0))
  rng = np.random.default_rng(0)
  for i in range(200):
    params, opt, v, _ = step(params, opt, v, train[rng.integers(0, len(train), 16)], i)
  after = evaluate(params, v, {"image": test}, jax.random.key(0))
  print({k: (round(float(before[k]), 3), round(float(after[k]), 3)) for k in after})
  assert float(after["rec_loss"]) < 0.35 * float(before["rec_loss"])
  assert float(after["psnr"]) > float(before["psnr"]) + 8
  assert float(after["ssim"]) > 0.5
  assert float(after["codebook_usage"]) > 0.2

  # the public helpers (encode_images / decode_codes) reconstruct as well as eval_fn
  cfg_vars = {"params": params}
  codes = vqgan_task.encode_images(c, cfg_vars, test[:8])
  assert codes.shape == (8, 8, 8) and codes.dtype == jnp.int32
  recon = vqgan_task.decode_codes(c, cfg_vars, codes)
  assert recon.shape == (8, 16, 16, 3) and float(jnp.abs(recon).max()) <= 1.0
  helper_psnr = float(jnp.mean(vqgan_task.psnr(jnp.asarray(test[:8]), recon)))
  assert helper_psnr > float(before["psnr"]) + 8
  grid = task.preview(params, v, {"image": test}, jax.random.key(0))["reconstructions"]
  assert grid.dtype == np.uint8 and grid.shape == (2 * 18 + 2, 8 * 18 + 2, 3)  # 8 (input, recon) pairs


# --- tools ---------------------------------------------------------------------------------

def test_reconstruct_and_encode_dataset_tools(tmp_path, capsys):
  from PIL import Image
  from dalle_jax.data import records, shapes
  from dalle_jax.tools import encode_dataset, reconstruct
  from dalle_jax.train.checkpoint import save_imported
  c = _tiny_gan_config()
  c.loss.disc_weight = 0.0
  c.dtype = "float32"
  task = vqgan_task.VQGANTask(c)
  params, state = task_init(task, task.dummy_batch(1))
  save_imported(str(tmp_path / "ckpt"), c, {"params": params, **state})

  src = tmp_path / "in"
  src.mkdir()
  for i in range(3):
    Image.fromarray(shapes.make_example(i, "test", 24)["image"]).save(src / f"im{i}.png")
  (src / "broken.jpg").write_bytes(b"not an image")
  out = reconstruct.main(["--checkpoint", str(tmp_path / "ckpt"), "--input", str(src),
                          "--output", str(tmp_path / "out"), "--batch_size", "2"])
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["im0.png", "im1.png", "im2.png"]
  assert np.asarray(Image.open(tmp_path / "out" / "im0.png")).shape == (16, 16, 3)  # 24px cropped to 16
  assert out["count"] == 3 and out["skipped"] == 1 and 0 < out["codebook_usage"] <= 1
  printed = capsys.readouterr().out
  assert "PSNR" in printed and "SSIM" in printed and "broken.jpg" in printed

  encode_dataset.main(["--vqgan", str(tmp_path / "ckpt"), "--data_dir", str(tmp_path / "data"),
                       "--dataset", "shapes/16px_40", "--out", str(tmp_path / "codes"),
                       "--batch_size", "12"])
  train = records.RecordsSource(str(tmp_path / "codes"), "train")
  assert len(train) == 40 and len(records.RecordsSource(str(tmp_path / "codes"), "test")) == 16
  ex = train[5]
  assert ex["codes"].shape == (8, 8) and ex["codes"].dtype == np.int32 and "caption" in ex
  assert "shape" in ex and "color" in ex
  # deterministic and equal to encoding the same example directly
  direct = vqgan_task.encode_images(c, {"params": params}, train_image(tmp_path, 5))
  np.testing.assert_array_equal(np.asarray(direct)[0], ex["codes"])


def train_image(tmp_path, i):
  from dalle_jax.data import images as img_lib, pipeline
  import ml_collections
  cfg = ml_collections.ConfigDict({"dataset": "shapes/16px_40", "data_dir": str(tmp_path / "data")})
  ex = pipeline.load_source(cfg, "train")[i]
  return img_lib.to_float(img_lib.resize_and_crop(img_lib.decode(ex["image"]), 16))[None]
