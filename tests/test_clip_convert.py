"""HF CLIP import: parity with transformers' PyTorch CLIPModel (random tiny weights)."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = ["a", "photo", "of", "red", "blue", "green", "circle", "square", "cat", "dog", "on",
         "background", "the"]


def _bytes_to_unicode():
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for c in cs]


def write_tiny_clip_tokenizer(path):
  """A CLIP BPE vocabulary over a handful of words (byte alphabet + merges), saved by HF."""
  chars = _bytes_to_unicode()
  vocab = {}
  for c in chars:
    vocab[c] = len(vocab)
  for c in chars:
    vocab[c + "</w>"] = len(vocab)
  merges = []
  for w in WORDS:  # merge each word left to right into one token
    parts = list(w[:-1]) + [w[-1] + "</w>"]
    while len(parts) > 1:
      pair = (parts[0], parts[1])
      if " ".join(pair) not in merges:
        merges.append(" ".join(pair))
      parts = [parts[0] + parts[1]] + parts[2:]
      vocab.setdefault(parts[0], len(vocab))
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  raw = os.path.join(path, "raw")
  os.makedirs(raw, exist_ok=True)
  with open(os.path.join(raw, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(raw, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  tok = transformers.CLIPTokenizer.from_pretrained(raw, model_max_length=16)
  tok.save_pretrained(path)
  return tok, len(vocab)


def write_tiny_hf_clip(path, legacy_eos=False, act="quick_gelu"):
  tok, vocab_size = write_tiny_clip_tokenizer(path)
  torch.manual_seed(0)
  eos = tok.eos_token_id
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                       hidden_act=act, bos_token_id=tok.bos_token_id,
                       eos_token_id=2 if legacy_eos else eos, pad_token_id=eos),
      vision_config=dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, hidden_act=act),
      projection_dim=24)
  model = transformers.CLIPModel(cfg).eval()
  with torch.no_grad():  # make layer norms and biases non-trivial
    for name, p in model.named_parameters():
      if "layer_norm" in name or "layrnorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
    model.logit_scale.fill_(3.0)
  model.save_pretrained(path)
  return model, tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("hf_clip"))
  model, tok = write_tiny_hf_clip(path)
  return path, model, tok


TEXTS = ["a photo of a cat", "a red circle on the blue background", "dog", "", "the cat, the dog!"]


def _our_pixels(pixel_values, mean, std):
  """HF's normalised NCHW pixels -> our [-1, 1] NHWC input."""
  x = pixel_values.numpy().transpose(0, 2, 3, 1)
  return ((x * np.asarray(std) + np.asarray(mean)) * 2 - 1).astype(np.float32)


def test_parity_with_transformers(hf_dir):
  import jax
  from dalle_jax.convert import hf_clip
  from dalle_jax.data.tokenizers import get_tokenizer
  from dalle_jax.models import clip
  path, model, tok = hf_dir
  config, variables = hf_clip.load_hf_clip(path)
  assert config.model.text.pool == "eos" and config.model.text.eos_id == tok.eos_token_id
  ours = clip.build_model(config)

  # Tokenizer: our HFTokenizer gives HF's ids exactly.
  hf_ids = tok(TEXTS, padding="max_length", max_length=16, truncation=True,
               return_tensors="pt")
  our_tok = get_tokenizer(config.text)
  ids, mask = our_tok.encode(TEXTS, config.text.max_len)
  np.testing.assert_array_equal(ids, hf_ids["input_ids"].numpy())
  np.testing.assert_array_equal(mask, hf_ids["attention_mask"].numpy().astype(bool))

  rng = np.random.default_rng(0)
  pixel_values = torch.tensor(rng.normal(size=(3, 3, 32, 32)).astype(np.float32))
  with torch.no_grad():
    ref_img = model.get_image_features(pixel_values=pixel_values).pooler_output.numpy()
    ref_txt = model.get_text_features(**hf_ids).pooler_output.numpy()
    ref = model(input_ids=hf_ids["input_ids"][:3], attention_mask=hf_ids["attention_mask"][:3],
                pixel_values=pixel_values)
  images = _our_pixels(pixel_values, config.model.image_mean, config.model.image_std)
  img = jax.jit(lambda v, x: ours.apply(v, x, normalize=False, method=clip.CLIP.encode_image))(
      variables, images)
  txt = jax.jit(lambda v, i, m: ours.apply(v, i, m, normalize=False, method=clip.CLIP.encode_text))(
      variables, ids, mask)
  assert np.abs(np.asarray(img) - ref_img).max() <= 1e-4, np.abs(np.asarray(img) - ref_img).max()
  assert np.abs(np.asarray(txt) - ref_txt).max() <= 1e-4, np.abs(np.asarray(txt) - ref_txt).max()
  # Full forward: normalised embeddings and logits.
  out = ours.apply(variables, images, ids[:3], mask[:3])
  logits = out["logit_scale"] * np.asarray(out["image"]) @ np.asarray(out["text"]).T
  np.testing.assert_allclose(logits, ref.logits_per_image.numpy(), atol=1e-4)


def test_legacy_argmax_pooling_and_gelu(tmp_path):
  """eos_token_id == 2 (OpenAI's exports) pools at the largest id; exact gelu."""
  import jax
  from dalle_jax.convert import hf_clip
  from dalle_jax.models import clip
  model, tok = write_tiny_hf_clip(str(tmp_path), legacy_eos=True, act="gelu")
  config, variables = hf_clip.load_hf_clip(str(tmp_path))
  assert config.model.text.pool == "argmax" and config.model.activation == "gelu"
  ids = tok(TEXTS[:3], padding="max_length", max_length=16, return_tensors="pt")
  with torch.no_grad():
    ref = model.get_text_features(**ids).pooler_output.numpy()
  ours = clip.build_model(config)
  got = ours.apply(variables, ids["input_ids"].numpy(), None, normalize=False,
                   method=clip.CLIP.encode_text)
  assert np.abs(np.asarray(got) - ref).max() <= 1e-4


def test_convert_cli_and_checkpoint_roundtrip(hf_dir, tmp_path):
  from dalle_jax.convert import hf_clip
  from dalle_jax.tools import convert
  path, _, _ = hf_dir
  out = str(tmp_path / "ckpt")
  convert.main(["hf_clip", "--src", path, "--out", out])
  assert os.path.isfile(os.path.join(out, "tokenizer", "tokenizer.json"))
  from dalle_jax.train.checkpoint import load_model
  config, variables = load_model(out)
  assert config.text.tokenizer == "hf" and os.path.isdir(config.text.path)
  _, direct = hf_clip.load_hf_clip(path)
  a = variables["params"]["vision"]["blocks"]["layer_1"]["attn"]["query"]["dense"]["kernel"]
  b = direct["params"]["vision"]["blocks"]["layer_1"]["attn"]["query"]["dense"]["kernel"]
  np.testing.assert_array_equal(np.asarray(a), b)


def test_missing_and_unexpected_tensors_are_named(hf_dir, tmp_path):
  from safetensors.numpy import load_file, save_file
  from dalle_jax.convert import hf_clip
  path, _, _ = hf_dir
  bad = tmp_path / "bad"
  bad.mkdir()
  with open(os.path.join(path, "config.json")) as f:
    (bad / "config.json").write_text(f.read())
  w = load_file(os.path.join(path, "model.safetensors"))
  del w["text_model.final_layer_norm.weight"]
  w["extra.weight"] = np.zeros(3, np.float32)
  w["visual_projection.weight"] = np.zeros((5, 48), np.float32)
  save_file(w, str(bad / "model.safetensors"))
  with pytest.raises(hf_clip.ConversionError) as e:
    hf_clip.load_hf_clip(str(bad))
  msg = str(e.value)
  assert "text_model.final_layer_norm.weight" in msg
  assert "extra.weight" in msg
  assert "visual_projection.weight" in msg and "(5, 48)" in msg


def test_pytorch_bin_is_read_with_weights_only(hf_dir, tmp_path):
  from dalle_jax.convert import hf_clip
  path, model, _ = hf_dir
  d = tmp_path / "bin"
  d.mkdir()
  with open(os.path.join(path, "config.json")) as f:
    (d / "config.json").write_text(f.read())
  torch.save(model.state_dict(), str(d / "pytorch_model.bin"))
  _, v = hf_clip.load_hf_clip(str(d))
  np.testing.assert_allclose(np.asarray(v["params"]["logit_scale"]), 3.0)
