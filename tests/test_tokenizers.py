"""Text tokenizers: SentencePiece training, HF parity (CLIP / BART), min-dalle parity."""
import json
import logging
import os
import pickle
import sys
import types

import min_dalle.text_tokenizer as min_tok
import ml_collections
import numpy as np
import pytest
import transformers

from dalle_jax.data import tokenizers as tk

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COLORS = "red green blue yellow purple orange white black".split()
SHAPES = "circle square triangle star hexagon".split()
CAPTIONS = [f"a {c} {s} on a {b} background" for c in COLORS for s in SHAPES for b in COLORS
            if b != c]


# ---------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("sp") / "shapes.model")
  return tk.train_sentencepiece(CAPTIONS, path, vocab_size=100)


def test_sp_train_is_deterministic_and_caps_vocab(tmp_path, sp_model):
  again = tk.train_sentencepiece(CAPTIONS, str(tmp_path / "again.model"), vocab_size=100)
  with open(sp_model.model_path, "rb") as f, open(again.model_path, "rb") as g:
    assert f.read() == g.read()
  assert sp_model.vocab_size == 100
  assert (sp_model.pad_id, sp_model.eos_id, sp_model.bos_id) == (0, 3, None)
  # The shapes captions cannot fill 5000 pieces: the model gets what they support.
  big = tk.train_sentencepiece(CAPTIONS, str(tmp_path / "big.model"), vocab_size=5000)
  assert 100 < big.vocab_size < 5000


def test_sp_roundtrip_padding_mask(sp_model):
  texts = CAPTIONS[:5] + ["a red circle"]
  ids, mask = sp_model.encode(texts, max_len=16)
  assert ids.shape == mask.shape == (6, 16) and ids.dtype == np.int32 and mask.dtype == bool
  assert sp_model.decode(ids) == texts
  for row, m in zip(ids, mask):
    n = int(m.sum())
    assert m[:n].all() and not m[n:].any()  # mask is a prefix
    assert row[n - 1] == sp_model.eos_id and (row[n:] == sp_model.pad_id).all()
    assert sp_model.unk_id not in row[:n]
  assert mask[-1].sum() < mask[0].sum()  # shorter caption, more padding
  assert sp_model.decode(ids[0]) == texts[:1]  # a single (L,) row
  # Picklable, for grain worker processes.
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(sp_model)).encode(texts, 16)[0], ids)


def test_sp_small_and_large_calls_give_the_same_ids(sp_model):
  # Small lists are encoded text by text (no per-call thread pool), large ones
  # in one SentencePiece call: the ids must not depend on the path taken.
  texts = (CAPTIONS * 4)[:tk._SP_BATCH_FROM + 5]
  ids, mask = sp_model.encode(texts, max_len=16)
  for i in (0, 7, len(texts) - 1):
    one_ids, one_mask = sp_model.encode([texts[i]], max_len=16)
    np.testing.assert_array_equal(one_ids[0], ids[i])
    np.testing.assert_array_equal(one_mask[0], mask[i])
  ref = sp_model.sp.encode(texts[:3], out_type=int, add_eos=True)
  assert [list(r[m]) for r, m in zip(ids[:3], mask[:3])] == ref


def test_sp_lowercase_and_whitespace(sp_model, tmp_path):
  a, _ = sp_model.encode(["A  RED Circle\n on a Blue background "], max_len=16)
  b, _ = sp_model.encode(["a red circle on a blue background"], max_len=16)
  np.testing.assert_array_equal(a, b)
  cased = tk.SentencePieceTokenizer(sp_model.model_path, lowercase=False)
  c, _ = cased.encode(["A RED circle"], max_len=16)
  assert cased.unk_id in c[0]  # upper case never seen in training


def test_sp_empty_text_and_bos(sp_model):
  ids, mask = sp_model.encode(["", "   "], max_len=8)
  np.testing.assert_array_equal(ids[:, 0], [sp_model.eos_id] * 2)
  np.testing.assert_array_equal(mask.sum(1), [1, 1])
  assert sp_model.decode(ids) == ["", ""]
  both = tk.SentencePieceTokenizer(sp_model.model_path, add_bos=True, add_eos=True)
  ids, mask = both.encode(["", "a red star"], max_len=8)
  assert ids[0, :2].tolist() == [both.bos_id, both.eos_id] and mask[0].sum() == 2
  assert both.decode(ids) == ["", "a red star"]
  none = tk.SentencePieceTokenizer(sp_model.model_path, add_eos=False)
  ids, mask = none.encode([""], max_len=4)
  assert not mask.any() and (ids == none.pad_id).all()


def test_sp_truncation_counted_and_warned(sp_model, caplog):
  long_text = " ".join(CAPTIONS[:4])
  with caplog.at_level(logging.WARNING, logger=tk.__name__):
    ids, mask = sp_model.encode([long_text, "a red star", long_text], max_len=10)
  assert mask.all(axis=1)[[0, 2]].all()
  assert ids[0, -1] == sp_model.eos_id and ids[2, -1] == sp_model.eos_id  # EOS kept
  full = sp_model.tokenize([long_text])[0]
  assert ids[0, :-1].tolist() == full[:9]
  assert sp_model.num_truncated == 2
  msg = " ".join(r.getMessage() for r in caplog.records)
  assert "truncated 2 of 3" in msg and "max_len=10" in msg
  with pytest.raises(ValueError, match="max_len"):
    sp_model.encode(["x"], max_len=0)


def test_sp_missing_or_bad_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tk.SentencePieceTokenizer(str(tmp_path / "nope.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="bad.model"):
    tk.SentencePieceTokenizer(str(bad))


def _text_cfg(**kw):
  t = ml_collections.ConfigDict(dict(tokenizer="sentencepiece", path="", vocab_size=90,
                                     max_len=12, lowercase=True))
  t.update(kw)
  return t


@pytest.fixture
def fake_pipeline(monkeypatch):
  """Stands in for dalle_jax.data.pipeline.load_source; records the splits read."""
  calls = []

  class Source:
    def __init__(self, split):
      self.captions = CAPTIONS if split == "train" else []
    def __len__(self):
      return len(self.captions)
    def __getitem__(self, i):
      return {"image": np.zeros((2, 2, 3)), "caption": self.captions[i].upper().encode()}

  def load_source(data_cfg, split):
    calls.append(split)
    return Source(split)

  fake = types.ModuleType("dalle_jax.data.pipeline")
  fake.load_source = load_source
  import dalle_jax.data  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, "dalle_jax.data.pipeline", fake)
  monkeypatch.setattr(dalle_jax.data, "pipeline", fake, raising=False)
  return calls


def test_get_tokenizer_trains_and_caches(tmp_path, fake_pipeline):
  calls = fake_pipeline
  data_cfg = ml_collections.ConfigDict(dict(dataset="shapes", data_dir=str(tmp_path),
                                            train_split="train"))
  tok = tk.get_tokenizer(_text_cfg(), data_cfg)
  path = tk.cached_sentencepiece_path(_text_cfg(), data_cfg)
  assert calls == ["train"] and os.path.exists(path)
  assert "shapes" in os.path.basename(path) and "90" in os.path.basename(path)
  assert tok.vocab_size == 90 and tok.max_len == 12
  ids, _ = tok.encode(["a red circle on a blue background"])  # max_len from config
  assert ids.shape == (1, 12)
  assert tok.decode(ids) == ["a red circle on a blue background"]
  with open(path, "rb") as f:
    first = f.read()
  tok2 = tk.get_tokenizer(_text_cfg(), data_cfg)  # cached: no second pass over the data
  assert calls == ["train"]
  np.testing.assert_array_equal(tok2.encode(CAPTIONS[:4], 12)[0], tok.encode(CAPTIONS[:4], 12)[0])
  os.remove(path)
  tk.get_tokenizer(_text_cfg(), data_cfg)  # retrained: byte-identical
  with open(path, "rb") as f:
    assert f.read() == first
  # Explicit path (relative to base_dir) loads it; a missing one names the path.
  tok3 = tk.get_tokenizer(_text_cfg(path=os.path.basename(path)), base_dir=str(tmp_path))
  assert tok3.vocab_size == 90
  with pytest.raises(FileNotFoundError, match="missing.model"):
    tk.get_tokenizer(_text_cfg(path=str(tmp_path / "missing.model")))
  with pytest.raises(ValueError, match="unknown text.tokenizer"):
    tk.get_tokenizer(_text_cfg(tokenizer="wordpiece", path="x"))
  with pytest.raises(ValueError, match="is empty"):
    tk.get_tokenizer(_text_cfg(), ml_collections.ConfigDict(dict(
        dataset="shapes", data_dir=str(tmp_path / "other"), train_split="test")))


def test_train_tokenizer_cli(tmp_path, fake_pipeline, capsys):
  from dalle_jax.tools import train_tokenizer  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "cli.model")
  train_tokenizer.main(["--data_dir", str(tmp_path), "--dataset", "shapes", "--out", out,
                        "--vocab_size", "80", "--max_len", "8"])
  assert fake_pipeline == ["train"]
  tok = tk.SentencePieceTokenizer(out)
  assert tok.vocab_size == 80
  printed = capsys.readouterr().out
  assert "80 pieces" in printed and f"of {len(CAPTIONS)} longer than max_len=8" in printed


# ---------------------------------------------------------------------------
# Hugging Face (tiny CLIP / BART directories built offline)
# ---------------------------------------------------------------------------

CLIP_MERGES = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("cir", "c"),
               ("circ", "l"), ("circl", "e</w>"), ("o", "n</w>"), ("s", "t"), ("st", "a")]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  chars = list("abcdefghijklmnopqrstuvwxyz0123456789,.!'")
  vocab = {}
  for suffix in ("", "</w>"):
    for c in chars:
      vocab[c + suffix] = len(vocab)
  for a, b in CLIP_MERGES:
    vocab[a + b] = len(vocab)
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  # transformers 5 ignores vocab_file=/merges_file= here: pass the contents.
  hf = transformers.CLIPTokenizer(vocab=vocab, merges=CLIP_MERGES)
  assert len(hf) == len(vocab)  # really our vocabulary, not a placeholder
  assert hf.convert_ids_to_tokens(hf("red circle")["input_ids"]) == [
      "<|startoftext|>", "red</w>", "circle</w>", "<|endoftext|>"]
  d = str(tmp_path_factory.mktemp("clip"))
  hf.save_pretrained(d)
  return d


HF_TEXTS = ["a red circle on a blue background", "", "A RED  circle,\n on star!",
            "abc " * 30, "x"]


def test_hf_clip_ids_match_hf(clip_dir, caplog):
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  hf = AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)
  tok = tk.HFTokenizer(clip_dir)
  assert tok.vocab_size == len(hf)
  assert tok.bos_id == hf.convert_tokens_to_ids("<|startoftext|>")
  assert tok.eos_id == hf.convert_tokens_to_ids("<|endoftext|>") == tok.pad_id  # CLIP pads with EOS
  for max_len in (16, 77):
    with caplog.at_level(logging.WARNING, logger=tk.__name__):
      ids, mask = tok.encode(HF_TEXTS, max_len=max_len)
    ref = hf(HF_TEXTS, padding="max_length", truncation=True, max_length=max_len)
    np.testing.assert_array_equal(ids, np.array(ref["input_ids"]))
    np.testing.assert_array_equal(mask, np.array(ref["attention_mask"], bool))
  assert "truncated 1 of 5" in caplog.text
  assert mask[1].sum() == 2  # empty text: <|startoftext|> <|endoftext|>
  dec = tok.decode(ids)
  assert dec[0] == HF_TEXTS[0] and dec[1] == ""
  assert dec[2] == hf.decode(ref["input_ids"][2], skip_special_tokens=True)  # "a red circle , on star !"
  with pytest.raises(FileNotFoundError, match="no_such_dir"):
    tk.HFTokenizer(os.path.join(clip_dir, "no_such_dir"))


def test_hf_bart_ids_match_hf(tmp_path):
  vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
  for c in "Ġabcdefghijklmnopqrstuvwxyz":
    vocab[c] = len(vocab)
  merges = [("Ġ", "r"), ("Ġr", "e"), ("Ġre", "d"), ("Ġ", "a"), ("o", "n")]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  vocab["<mask>"] = len(vocab)
  transformers.BartTokenizer(vocab=vocab, merges=merges).save_pretrained(str(tmp_path))
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
  assert len(hf) == len(vocab)
  cfg = _text_cfg(tokenizer="hf", path=str(tmp_path), vocab_size=len(vocab), max_len=8)
  tok = tk.get_tokenizer(cfg)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 2, 1)
  texts = ["a red one", "", "red red red red red red red red"]
  ids, mask = tok.encode(texts)
  ref = hf(texts, padding="max_length", truncation=True, max_length=8)
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, np.array(ref["attention_mask"], bool))
  assert tok.decode(ids)[:2] == ["a red one", ""]


# ---------------------------------------------------------------------------
# min-dalle's BART BPE
# ---------------------------------------------------------------------------


def _synthetic_bart_files(d, seed=0):
  """A random BPE: merges over 'Ġ'+'abcdefg', some merged pieces left out of the vocab."""
  rng = np.random.default_rng(seed)
  vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
  symbols = ["Ġ"] + list("abcdefg")
  for s in symbols:
    vocab[s] = len(vocab)
  merges = []
  while len(merges) < 60:
    # Mostly short pieces, so that the merges fire on random words.
    a = symbols[rng.integers(0, 8 if rng.random() < 0.5 else len(symbols))]
    b = symbols[rng.integers(1, 8 if rng.random() < 0.7 else len(symbols))]
    if b.startswith("Ġ") or (a, b) in merges:
      continue
    merges.append((a, b))
    symbols.append(a + b)
    if rng.random() < 0.8:  # the rest become <unk> when a word ends on them
      vocab.setdefault(a + b, len(vocab))
  vocab["<mask>"] = len(vocab)
  vocab_json, merges_txt = os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")
  with open(vocab_json, "w", encoding="utf-8") as f:
    json.dump(vocab, f)
  with open(merges_txt, "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return vocab_json, merges_txt


def _random_texts(seed=1, n=200):
  rng = np.random.default_rng(seed)
  letters = list("abcdefgABCxyz") + ["é", "\t", "🙂"]
  texts = ["", " ", "abc", "ABC  gfe", "café bad", "a\tb cab", "🙂 face", "ba" * 40]
  for _ in range(n):
    words = ["".join(rng.choice(letters, rng.integers(1, 9))) for _ in range(rng.integers(0, 6))]
    texts.append((" " * int(rng.integers(1, 3))).join(words))
  return texts


def test_bart_bpe_matches_min_dalle(tmp_path):
  vocab_json, merges_txt = _synthetic_bart_files(str(tmp_path))
  with open(vocab_json, encoding="utf8") as f:
    vocab = json.load(f)
  with open(merges_txt, encoding="utf8") as f:
    merges = f.read().split("\n")[1:-1]  # exactly as min_dalle.MinDalle.init_tokenizer
  ref = min_tok.TextTokenizer(vocab, merges)
  tok = tk.BartBPETokenizer.from_files(vocab_json, merges_txt)
  texts = _random_texts()
  ours = tok.tokenize(texts)
  theirs = [ref.tokenize(t) for t in texts]
  assert ours == theirs
  flat = [i for s in theirs for i in s]
  merged = {i for s in theirs for i in s if len(tok.inverse[i]) > 1 and i > 3}
  assert tok.unk_id in flat and len(merged) > 20  # exercised unknown words and many merges

  # encode: pad 1, EOS kept when truncating (min-dalle would drop it).
  ids, mask = tok.encode(texts[:8], max_len=12)
  assert ids[0, :2].tolist() == [0, 2] and (ids[0, 2:] == 1).all() and mask[0].sum() == 2
  assert ids[7, 0] == 0 and ids[7, -1] == 2 and ids[7, 1:-1].tolist() == theirs[7][1:11]
  assert tok.decode(ids)[2] == "abc"
  assert pickle.loads(pickle.dumps(tok)).tokenize(texts) == theirs


def test_get_tokenizer_bart_bpe(tmp_path):
  _synthetic_bart_files(str(tmp_path))
  tok = tk.get_tokenizer(_text_cfg(tokenizer="bart_bpe", path=str(tmp_path), vocab_size=0,
                                   max_len=6))
  assert isinstance(tok, tk.BartBPETokenizer) and tok.max_len == 6
  assert tok.encode(["gab"])[0].shape == (1, 6)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    tk.get_tokenizer(_text_cfg(tokenizer="bart_bpe", path=str(tmp_path / "nowhere")))
