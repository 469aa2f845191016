"""VQGAN import: parity with min-dalle's detokenizer, taming / vqgan-jax layouts."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import serialization, traverse_util
import flax.linen as nn

from dalle_jax.configs import vqgan as vqgan_configs
from dalle_jax.convert import vqgan as convert_vqgan
from dalle_jax.models.vqgan import vqgan_from_config

torch = pytest.importorskip("torch")


def _tiny_config():
  c = vqgan_configs.get_config("shapes")
  c.model.attn_resolutions = (16,)  # exercise attention blocks too
  c.model.quantizer.codebook_dim = 0
  c.model.quantizer.l2_normalize = False
  c.dtype = "float32"
  return c


def _random_params(config, seed=0):
  """Random params of the right shapes (no compile: abstract init + numpy)."""
  model = vqgan_from_config(config)
  r = config.model.resolution
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, r, r, 3)))["params"])
  rng = np.random.default_rng(seed)
  return model, jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(np.float32), abstract)


def test_min_dalle_detokenizer_parity(tmp_path):
  from min_dalle.models.vqgan_detokenizer import VQGanDetokenizer
  torch.manual_seed(0)
  ref = VQGanDetokenizer().eval()
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for k, v in ref.state_dict().items():  # random norms/biases too, not just default init
      if "norm" in k and k.endswith("weight"):
        v.copy_(1 + 0.1 * torch.randn(v.shape, generator=g))
      elif k.endswith("bias"):
        v.copy_(0.05 * torch.randn(v.shape, generator=g))
      elif k == "embedding.weight":
        v.copy_(torch.randn(v.shape, generator=g))
  path = tmp_path / "detoker.pt"
  torch.save(ref.state_dict(), path)

  config, variables = convert_vqgan.convert(str(path), "min_dalle")
  m = config.model
  assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions), m.n_embed,
          m.embed_dim, m.z_channels) == (128, (1, 1, 2, 2, 4), 2, (16,), 16384, 256, 256)
  assert m.decoder_only and m.zero_one_range and m.norm_eps == 1e-5

  # min-dalle's forward hard-codes a 16x16 grid; its decoder is convolutional, so
  # run the same modules on a 4x4 grid (the 256px forward takes ~10 s on 2 cores).
  codes = torch.randint(0, 16384, (2, 4, 4), generator=g)
  with torch.no_grad():
    z = ref.embedding(codes).permute(0, 3, 1, 2)
    want = ref.decoder(ref.post_quant_conv(z)).permute(0, 2, 3, 1).numpy()
  model = vqgan_from_config(config)
  got = jax.jit(lambda v, c: model.apply(v, c, method=model.decode_codes))(
      {"params": variables["params"]["vqgan"]}, jnp.asarray(codes.numpy()))
  got01 = (np.asarray(got) + 1) / 2  # our interface is [-1, 1]; DALL·E mini's is [0, 1]
  assert got.shape == (2, 64, 64, 3)
  assert want.std() > 0.1  # a non-trivial signal to compare
  np.testing.assert_allclose(got01, want, atol=1e-4, rtol=0)
  # min-dalle's post-processing: clip to [0, 1] * 255
  assert np.abs(np.clip(got01, 0, 1) * 255 - np.clip(want, 0, 1) * 255).max() < 255e-4


def test_taming_roundtrip_and_errors(tmp_path):
  config = _tiny_config()
  model, params = _random_params(config)
  sd = convert_vqgan.export_taming_state_dict(params)
  assert "encoder.down.0.block.0.conv1.weight" in sd and "decoder.mid.block_1.norm1.weight" in sd
  assert "decoder.up.1.attn.0.q.weight" in sd and "quantize.embedding.weight" in sd
  full = {k: torch.from_numpy(v) for k, v in sd.items()}
  full["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)  # training-only: skipped
  torch.save({"state_dict": full}, tmp_path / "model.ckpt")

  cfg2, variables = convert_vqgan.convert(str(tmp_path / "model.ckpt"), "taming", resolution=32)
  m = cfg2.model
  assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions)) == (32, (1, 2, 2), 1, (16,))
  assert not m.decoder_only and not m.zero_one_range
  cfg2.model.norm_groups = config.model.norm_groups  # not stored in the file
  flat_a = traverse_util.flatten_dict(params)
  flat_b = traverse_util.flatten_dict(variables["params"]["vqgan"])
  assert set(flat_a) == set(flat_b)
  for k in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[k]), flat_b[k])

  # a missing tensor and a stray one are both named
  bad = dict(full)
  del bad["decoder.up.1.block.0.conv2.bias"]
  bad["decoder.extra.weight"] = torch.zeros(3, 3, 3, 3)
  torch.save(bad, tmp_path / "bad.pth")
  with pytest.raises(convert_vqgan.ConversionError) as e:
    convert_vqgan.convert(str(tmp_path / "bad.pth"), "taming", resolution=32)
  assert "decoder/up_1/block_0/conv2/bias" in str(e.value) and "decoder/extra/kernel" in str(e.value)

  # a wrong shape is named too
  bad = dict(full)
  bad["decoder.conv_in.bias"] = torch.zeros(7)
  torch.save(bad, tmp_path / "bad2.pth")
  with pytest.raises(convert_vqgan.ConversionError, match="decoder/conv_in/bias"):
    convert_vqgan.convert(str(tmp_path / "bad2.pth"), "taming", resolution=32)


def test_flax_msgpack_layout(tmp_path):
  """vqgan-jax names: same tree as ours except quantize/embedding/embedding."""
  config = _tiny_config()
  model, params = _random_params(config, seed=1)
  tree = jax.tree.map(np.asarray, params)
  tree["quantize"] = {"embedding": {"embedding": tree["quantize"].pop("codebook")}}
  (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
  cfg2, variables = convert_vqgan.convert(str(tmp_path / "flax_model.msgpack"), "flax", resolution=32)
  assert cfg2.model.zero_one_range  # DALL·E mini's port works on [0, 1]
  np.testing.assert_array_equal(variables["params"]["vqgan"]["quantize"]["codebook"],
                                np.asarray(params["quantize"]["codebook"]))


def test_cli_writes_loadable_checkpoint(tmp_path):
  config = _tiny_config()
  model, params = _random_params(config)
  sd = {k: torch.from_numpy(v) for k, v in convert_vqgan.export_taming_state_dict(params).items()}
  torch.save(sd, tmp_path / "m.pth")
  from dalle_jax.tools import convert as convert_tool
  out = tmp_path / "ckpt"
  convert_tool.main(["vqgan", "--src", str(tmp_path / "m.pth"), "--format", "taming",
                     "--out", str(out), "--resolution", "32"])
  from dalle_jax.train.checkpoint import load_model
  cfg2, variables = load_model(str(out))
  assert cfg2.family == "vqgan"
  np.testing.assert_array_equal(np.asarray(variables["params"]["vqgan"]["decoder"]["conv_out"]["kernel"]),
                                np.asarray(params["decoder"]["conv_out"]["kernel"]))
