"""T5 encoder: parity with transformers' PyTorch T5EncoderModel / UMT5EncoderModel (tiny random
weights, every checkpoint layout), T5 tokenizer ids, the hf_t5 import and `tools.embed --t5`,
and the XXL encoder's sharding on an 8-device mesh."""
import io
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import sentencepiece as spm  # noqa: E402  pylint: disable=g-import-not-at-top
from safetensors.numpy import load_file, save_file  # noqa: E402  pylint: disable=g-import-not-at-top

from dalle_jax.convert import hf_t5  # noqa: E402  pylint: disable=g-import-not-at-top
from dalle_jax.data.tokenizers import get_tokenizer, t5_tokenizer  # noqa: E402  pylint: disable=g-import-not-at-top
from dalle_jax.models import t5  # noqa: E402  pylint: disable=g-import-not-at-top

WORDS = "a photo of red blue green circle square cat dog on the background corgi wearing bowtie".split()
TEXTS = ["a red circle on the blue background", "", "  a  corgi   wearing a bowtie ",
         "A Dog, on the grass!", "xyz éà 猫\tcat", "the cat " * 12]
MAX_LEN = 24
TINY = dict(d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=12)


def write_spiece(folder):
  """A SentencePiece unigram model with T5's ids (pad 0, eos 1, unk 2, no bos)."""
  rng = np.random.default_rng(0)
  corpus = [" ".join(rng.choice(WORDS, 6)) for _ in range(300)]
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=buf, vocab_size=60, model_type="unigram",
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, num_threads=1,
      minloglevel=2)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "spiece.model"), "wb") as f:
    f.write(buf.getvalue())
  return folder


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
  return write_spiece(str(tmp_path_factory.mktemp("spiece")))


@pytest.fixture(scope="module")
def ref_tok(spiece_dir):
  """The reference: transformers' T5Tokenizer built from spiece.model (needs protobuf)."""
  return transformers.T5Tokenizer.from_pretrained(spiece_dir)


def tiny_hf(kind, ff, vocab_size):
  torch.manual_seed({"relu": 0, "gated-gelu": 1}[ff] + 2 * (kind == "umt5"))
  cls, cfg = ((transformers.UMT5EncoderModel, transformers.UMT5Config) if kind == "umt5" else
              (transformers.T5EncoderModel, transformers.T5Config))
  model = cls(cfg(vocab_size=vocab_size, feed_forward_proj=ff, **TINY)).eval()
  with torch.no_grad():  # RMS norm scales start at one: make them matter
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.add_(0.2 * torch.randn_like(p))
  return model


def reference(model, tok, texts=TEXTS):
  enc = tok(texts, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
  with torch.no_grad():
    hidden = model(**enc).last_hidden_state.numpy()
  return enc["input_ids"].numpy(), enc["attention_mask"].numpy().astype(bool), hidden


def write_layout(root, layout, model, spiece_dir, ref_tok):
  """Saves `model` + tokenizer in one of the layouts users point the importer at."""
  if layout == "pipeline":  # diffusers: text_encoder/ (sharded) + tokenizer/ (spiece only)
    model.save_pretrained(os.path.join(root, "text_encoder"), max_shard_size="20KB")
    assert os.path.isfile(os.path.join(root, "text_encoder", "model.safetensors.index.json"))
    os.makedirs(os.path.join(root, "tokenizer"))
    with open(os.path.join(spiece_dir, "spiece.model"), "rb") as f:
      (open(os.path.join(root, "tokenizer", "spiece.model"), "wb")).write(f.read())
    with open(os.path.join(root, "model_index.json"), "w") as f:
      json.dump({"_class_name": "IFPipeline"}, f)
  elif layout == "bin":  # pytorch_model.bin + tokenizer.json
    model.config.save_pretrained(root)
    torch.save(model.state_dict(), os.path.join(root, "pytorch_model.bin"))
    ref_tok.save_pretrained(root)
  else:  # model.safetensors + spiece.model
    model.save_pretrained(root)
    with open(os.path.join(spiece_dir, "spiece.model"), "rb") as f:
      (open(os.path.join(root, "spiece.model"), "wb")).write(f.read())
  return root


def test_relative_position_buckets_match_transformers():
  from transformers.models.t5.modeling_t5 import T5Attention
  rel = torch.arange(0, 1500)
  for nb, md in ((32, 128), (8, 12), (64, 256)):
    for bidirectional in (True, False):
      ours_after = t5.relative_position_buckets(1, 1500, nb, md, bidirectional)[0]
      ours_before = t5.relative_position_buckets(1500, 1, nb, md, bidirectional)[:, 0]
      bucket = lambda r: T5Attention._relative_position_bucket(  # pylint: disable=protected-access
          r, bidirectional=bidirectional, num_buckets=nb, max_distance=md).numpy()
      np.testing.assert_array_equal(ours_after, bucket(rel))
      np.testing.assert_array_equal(ours_before, bucket(-rel))


def test_tokenizer_ids_match_transformers(spiece_dir, ref_tok, tmp_path):
  ref = ref_tok(TEXTS, padding="max_length", max_length=MAX_LEN, truncation=True)
  ref_ids, ref_mask = np.asarray(ref["input_ids"]), np.asarray(ref["attention_mask"]).astype(bool)
  assert ref_ids[1, 0] == 1 and ref_ids[0, 0] != 1  # "" is just EOS; no BOS anywhere
  assert (ref_ids[-1] != 0).all() and ref_ids[-1, -1] == 1  # truncated, EOS kept
  ref_tok.save_pretrained(str(tmp_path))  # tokenizer.json
  assert not os.path.isfile(str(tmp_path / "spiece.model"))
  for path in (spiece_dir, os.path.join(spiece_dir, "spiece.model"), str(tmp_path)):
    tok = t5_tokenizer(path)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, None), path
    ids, mask = tok.encode(TEXTS, MAX_LEN)
    np.testing.assert_array_equal(ids, ref_ids, err_msg=path)
    np.testing.assert_array_equal(mask, ref_mask, err_msg=path)
  with pytest.raises(FileNotFoundError, match="no tokenizer.json or spiece.model"):
    t5_tokenizer(str(tmp_path / "nothing"))


@pytest.mark.parametrize("kind,ff,layout", [("t5", "relu", "safetensors"),
                                            ("t5", "gated-gelu", "pipeline"),
                                            ("umt5", "gated-gelu", "bin")])
def test_parity_with_transformers(kind, ff, layout, spiece_dir, ref_tok, tmp_path):
  """Hidden states within 1e-4 on the real tokens, ids equal to transformers' tokenizer."""
  model = tiny_hf(kind, ff, len(ref_tok) + 28)  # an embedding wider than the vocab, like T5's
  ref_ids, ref_mask, ref_hidden = reference(model, ref_tok)
  src = write_layout(str(tmp_path), layout, model, spiece_dir, ref_tok)
  assert hf_t5.is_hf_t5_dir(src)
  config, variables = hf_t5.load_hf_t5(src)
  m = config.model
  assert (m.gated, m.per_layer_position_bias) == (ff != "relu", kind == "umt5")
  assert m.activation == ("relu" if ff == "relu" else "gelu_tanh")
  ids, mask = get_tokenizer(config.text).encode(TEXTS, MAX_LEN)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(mask, ref_mask)
  hidden = np.asarray(jax.jit(t5.build_model(config).apply)(variables, ids, mask))
  assert hidden.dtype == np.float32 and hidden.shape == ref_hidden.shape
  err = np.abs(hidden - ref_hidden)[mask].max()
  assert err <= 1e-4, err
  # The padded tail is what makes the mask matter: without it the outputs move.
  unmasked = np.asarray(jax.jit(t5.build_model(config).apply)(variables, ids, None))
  assert np.abs(unmasked - ref_hidden)[mask].max() > 1e-3


def test_convert_cli_and_embed_cli(spiece_dir, ref_tok, tmp_path):
  """convert hf_t5 on a pipeline folder, then tools.embed --t5 on the checkpoint and the folder."""
  from dalle_jax.tools import convert, embed
  from dalle_jax.train.checkpoint import load_model
  model = tiny_hf("t5", "gated-gelu", len(ref_tok))
  ref_ids, ref_mask, ref_hidden = reference(model, ref_tok)
  src = write_layout(str(tmp_path / "pipe"), "pipeline", model, spiece_dir, ref_tok)
  out = str(tmp_path / "ckpt")
  convert.main(["hf_t5", "--src", src, "--out", out])
  # spiece.model alone was also converted to transformers' tokenizer.json
  assert os.path.isfile(os.path.join(out, "tokenizer", "tokenizer.json"))
  config, variables = load_model(out)
  assert config.family == "t5" and config.text.tokenizer == "t5"
  _, direct = hf_t5.load_hf_t5(src)
  np.testing.assert_array_equal(
      np.asarray(variables["params"]["blocks"]["layer_1"]["mlp"]["wi_gate"]["kernel"]),
      direct["params"]["blocks"]["layer_1"]["mlp"]["wi_gate"]["kernel"])
  texts_file = tmp_path / "texts.txt"
  texts_file.write_text("\n".join(t for t in TEXTS if t.strip()) + "\n")
  keep = [i for i, t in enumerate(TEXTS) if t.strip()]
  for model_path in (out, src):
    npz = str(tmp_path / "h.npz")
    embed.main(["--t5", model_path, "--texts", str(texts_file), "--out", npz,
                "--max_len", str(MAX_LEN), "--batch_size", "3"])
    got = np.load(npz)
    assert list(got["texts"]) == [TEXTS[i].rstrip("\n") for i in keep]
    np.testing.assert_array_equal(got["mask"], ref_mask[keep])
    assert got["hidden_states"].dtype == np.float32
    err = np.abs(got["hidden_states"] - ref_hidden[keep])[ref_mask[keep]].max()
    assert err <= 1e-4, (model_path, err)
  # The same encoder with its weights split over fsdp and tensor (8 fake devices).
  from jax.sharding import PartitionSpec as P
  from dalle_jax import parallel
  from dalle_jax.sampling.t5_encoder import T5TextEncoder
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  enc = T5TextEncoder(config, variables, max_len=MAX_LEN, mesh=mesh)
  wi = enc.variables["params"]["blocks"]["layer_0"]["mlp"]["wi"]["kernel"]
  assert wi.sharding.spec == P("fsdp", "tensor")
  hidden, mask = enc.encode_texts(TEXTS)
  np.testing.assert_array_equal(mask, ref_mask)
  assert np.abs(hidden - ref_hidden)[ref_mask].max() <= 1e-4
  with pytest.raises(SystemExit, match="--t5 encodes --texts only"):
    embed.main(["--t5", out, "--images", str(tmp_path), "--out", npz])
  with pytest.raises(SystemExit, match="no such directory"):
    embed.main(["--t5", str(tmp_path / "missing"), "--texts", str(texts_file), "--out", npz])


def test_state_dict_checks_are_named(ref_tok, tmp_path):
  """Missing / unexpected / misshapen tensors are named; the embedding may be stored as
  encoder.embed_tokens.weight; a full T5 checkpoint's decoder and LM head are skipped."""
  model = tiny_hf("t5", "relu", len(ref_tok))
  model.save_pretrained(str(tmp_path / "ok"))
  weights = load_file(str(tmp_path / "ok" / "model.safetensors"))
  config = hf_t5.config_from_hf(hf_t5.read_hf_config(str(tmp_path / "ok")))

  renamed = dict(weights)
  renamed["encoder.embed_tokens.weight"] = renamed.pop("shared.weight")
  renamed["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((32, 32), np.float32)
  renamed["lm_head.weight"] = np.zeros((3, 32), np.float32)
  v = hf_t5.convert_weights(renamed, config)
  np.testing.assert_array_equal(v["params"]["token_embed"]["embedding"], weights["shared.weight"])

  tied = dict(weights, **{"encoder.embed_tokens.weight": weights["shared.weight"] + 1})
  with pytest.raises(hf_t5.ConversionError, match="differ"):
    hf_t5.convert_weights(tied, config)

  bad = dict(weights)
  del bad["encoder.block.1.layer.0.layer_norm.weight"]
  bad["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"] = np.zeros((48, 32), np.float32)
  bad["encoder.block.0.layer.0.SelfAttention.o.weight"] = np.zeros((32, 16), np.float32)
  with pytest.raises(hf_t5.ConversionError) as e:
    hf_t5.convert_weights(bad, config, where="bad")
  msg = str(e.value)
  assert "missing tensors (1): encoder.block.1.layer.0.layer_norm.weight" in msg
  assert "unexpected tensors (1): encoder.block.1.layer.1.DenseReluDense.wi_0.weight" in msg
  assert "encoder.block.0.layer.0.SelfAttention.o.weight (32, 16)" in msg

  with open(tmp_path / "ok" / "config.json") as f:
    cfg = json.load(f)
  for key, value, what in (("model_type", "bert", "model_type='bert'"),
                           ("feed_forward_proj", "gated-tanhx", "unsupported activation")):
    d = tmp_path / key
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(cfg, **{key: value})))
    save_file(weights, str(d / "model.safetensors"))
    with pytest.raises(hf_t5.ConversionError, match=what):
      hf_t5.load_hf_t5(str(d))


def test_weight_variants_and_sharded_bins(tmp_path):
  """diffusers-style variants (model.fp16.safetensors, a sharded bf16 index), a sharded
  pytorch_model.bin index, upcast to f32; a variant never beats the full-precision file."""
  model = tiny_hf("t5", "gated-gelu", 64)
  sd = {k: v.detach() for k, v in model.state_dict().items()}
  want = lambda dtype: sd["shared.weight"].to(dtype).float().numpy()
  embedding = lambda folder: hf_t5.load_hf_t5(str(folder))[1]["params"]["token_embed"]["embedding"]

  model.save_pretrained(str(tmp_path / "mixed"))  # f32 beside a bf16 variant (below)
  fresh = lambda dtype: tiny_hf("t5", "gated-gelu", 64).to(dtype)  # same seed, same weights
  fresh(torch.float16).save_pretrained(str(tmp_path / "fp16"), variant="fp16")
  assert os.path.isfile(tmp_path / "fp16" / "model.fp16.safetensors")
  np.testing.assert_array_equal(embedding(tmp_path / "fp16"), want(torch.float16))

  for folder in ("bf16", "mixed"):
    fresh(torch.bfloat16).save_pretrained(str(tmp_path / folder), variant="bf16",
                                          max_shard_size="20KB")
  assert os.path.isfile(tmp_path / "bf16" / "model.safetensors.index.bf16.json")
  got = embedding(tmp_path / "bf16")
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want(torch.bfloat16))
  np.testing.assert_array_equal(embedding(tmp_path / "mixed"), want(torch.float32))

  d = tmp_path / "bins"
  d.mkdir()
  model.config.save_pretrained(str(d))
  names = sorted(sd)
  weight_map = {}
  for i, part in enumerate((names[::2], names[1::2])):
    torch.save({k: sd[k] for k in part}, str(d / f"pytorch_model-0000{i + 1}-of-00002.bin"))
    weight_map.update({k: f"pytorch_model-0000{i + 1}-of-00002.bin" for k in part})
  (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
  np.testing.assert_array_equal(embedding(d), want(torch.float32))
  os.remove(d / "pytorch_model-00002-of-00002.bin")
  with pytest.raises(hf_t5.ConversionError, match="pytorch_model-00002-of-00002.bin: listed"):
    hf_t5.load_hf_t5(str(d))


def test_scan_and_bf16_match_per_layer(ref_tok):
  """scan_layers=True (parameters stacked by scan_layout) gives the per-layer outputs;
  bf16 compute stays close; every parameter carries logical names."""
  import flax.linen as nn
  from dalle_jax.models import scan_layout
  config = t5.get_config("t5_small", vocab_size=64, feed_forward_proj="gated-gelu",
                         per_layer_position_bias=True, **TINY)
  model = t5.build_model(config)
  ids = np.random.default_rng(0).integers(3, 64, (2, 10)).astype(np.int32)
  mask = np.arange(10)[None] < np.array([[10], [6]])
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, mask)
  names = jax.tree.leaves(jax.tree.map(lambda x: x.names, boxed["params"],
                                       is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)))
  assert all(isinstance(n, str) for n in names)
  rng = np.random.default_rng(0)  # random values: a jitted init compiles for seconds
  params = jax.tree.map(lambda a: (0.1 * rng.normal(size=a.shape) + (a.ndim == 1)).astype(np.float32),
                        nn.unbox(boxed)["params"])
  ref = jax.jit(model.apply)({"params": params}, ids, mask)
  with config.unlocked():
    config.scan_layers = True
  scanned_model = t5.build_model(config)
  like = nn.unbox(jax.eval_shape(lambda: scanned_model.init(jax.random.PRNGKey(0), ids, mask)))
  scanned = scan_layout.to_layout(params, like=like["params"])
  got = jax.jit(scanned_model.apply)({"params": scanned}, ids, mask)
  np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(ref)[mask], atol=1e-5)
  bf16 = jax.jit(t5.build_model(config, dtype="bfloat16").apply)({"params": scanned}, ids, mask)
  assert bf16.dtype == np.float32
  err = np.abs(np.asarray(bf16) - np.asarray(ref))[mask]
  assert 0 < err.max() < 0.05 * np.abs(np.asarray(ref)[mask]).max(), err.max()


@pytest.mark.parametrize("scan", [False, True])
def test_xxl_encoder_shards_over_fsdp_and_tensor(scan):
  """T5 v1.1 XXL (4.76B parameters) on an 8-device fsdp 4 x tensor 2 mesh: no replication
  error, every large weight split 8 ways (abstract: nothing allocated)."""
  from jax.sharding import AbstractMesh, AxisType
  from dalle_jax import parallel
  config = t5.get_config("t5_v1_1_xxl")
  with config.unlocked():
    config.scan_layers = scan
  model = t5.build_model(config)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               *t5.dummy_inputs(config, 1, 4)))
  mesh = AbstractMesh((4, 2), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
  shardings = parallel.logical_shardings(abstract, mesh, parallel.rules_from_config(config))
  plain = parallel.unbox(abstract)
  total = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(plain))
  assert 4.7e9 * 4 < total < 4.8e9 * 4
  per_device = parallel.per_device_bytes(shardings, plain)
  # Only the RMS-norm scales and the position-bias table (< 1 MiB) stay whole.
  assert per_device <= total / 8 + (1 << 20), (per_device, total / 8)
  leaves = dict(jax.tree_util.tree_flatten_with_path(plain)[0])
  for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]:
    leaf = leaves[path]
    if leaf.size * 4 >= (1 << 20):
      assert int(np.prod(s.shard_shape(leaf.shape))) * 8 == leaf.size, jax.tree_util.keystr(path)
