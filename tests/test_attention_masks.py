"""The models hand attention its masks as layers.AttentionMask parts (causal flag,
key padding), never as materialised (B, H, T, S) arrays, so the fused kernels
behind config.attention_impl (TPU splash, cuDNN) can engage. Abstract only
(jax.eval_shape): nothing compiles. Outputs on the XLA path are covered by the
parity tests (test_dalle, test_dalle_mini_parity, test_clip_convert)."""
import jax
import numpy as np
import pytest

from dalle_jax.configs import clip as clip_configs
from dalle_jax.configs import dalle as dalle_configs
from dalle_jax.configs import dalle_mini as dalle_mini_configs
from dalle_jax.models import clip as clip_lib
from dalle_jax.models import dalle
from dalle_jax.models import dalle_mini
from dalle_jax.models import layers


@pytest.fixture
def masks(monkeypatch):
  """Every mask the models pass to layers.dot_product_attention (abstract calls)."""
  seen = []
  real = layers.dot_product_attention

  def spy(q, k, v, mask, *args, **kwargs):
    seen.append((q.shape[1], k.shape[1], mask))
    return real(q, k, v, mask, *args, **kwargs)
  monkeypatch.setattr(layers, "dot_product_attention", spy)
  return seen


def _parts(seen):
  """(causal, has key padding) per call; fails on any dense mask."""
  out = []
  for _, _, m in seen:
    assert isinstance(m, layers.AttentionMask) and m.dense is None, m
    out.append((m.causal, m.key_valid_bs is not None))
  return out


def test_clip_text_tower_is_causal_and_vision_unmasked(masks):
  config = clip_configs.get_config("shapes")
  model = clip_lib.build_model(config)
  jax.eval_shape(model.init, jax.random.PRNGKey(0), *clip_lib.dummy_inputs(config, 2))
  text = [s for s in masks if s[2] is not None]
  assert len(text) == config.model.text.layers and len(masks) == len(text) + config.model.vision.layers
  assert set(_parts(text)) == {(True, False)}
  # what TPU splash needs (lengths aside): read natively, nothing dense
  assert layers._splash_refusal(128, 128, text[0][2]) is None


def test_dalle_full_attention_passes_a_causal_flag(masks):
  c = dalle_configs.get_config("shapes").model
  c.text_vocab_size = 50
  model = dalle.from_config(c, dtype="float32")
  text = np.zeros((2, c.text_len), np.int32)
  codes = np.zeros((2, c.image_grid ** 2), np.int32)
  jax.eval_shape(model.init, jax.random.PRNGKey(0), text, codes)
  assert len(masks) == c.num_layers and set(_parts(masks)) == {(True, False)}
  assert all(t == s == c.text_len + c.image_grid ** 2 for t, s, _ in masks)


@pytest.mark.parametrize("scan", [False, True])
def test_dalle_mini_padding_and_causal_parts(masks, scan):
  c = dalle_mini_configs.get_config("mini").model
  c.update(dict(num_layers=2, d_model=32, num_heads=4, glu_dim=48, text_vocab_size=60,
                text_len=8, image_grid=4))
  model = dalle_mini.from_config(c, dtype="float32", scan=scan)
  text, mask = np.zeros((2, 8), np.int32), np.arange(8)[None].repeat(2, 0) < np.array([[3], [8]])
  jax.eval_shape(model.init, jax.random.PRNGKey(0), text, mask, np.zeros((2, 16), np.int32))
  parts = _parts(masks)
  causal = parts.count((True, False))  # decoder self-attention (a scan traces per trace pass)
  assert causal == c.num_layers or (scan and causal >= 1)
  assert parts.count((False, True)) == 2 * causal  # encoder self + decoder cross: padding
  assert len(parts) == 3 * causal
