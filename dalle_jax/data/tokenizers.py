"""Text tokenizers: one interface for every model family.

  tok = get_tokenizer(config.text, data_cfg=config.data)
  ids, mask = tok.encode(["a red circle on a blue background", ""], max_len=64)
  # ids int32 (N, L) padded with tok.pad_id; mask bool (N, L), True on real tokens
  texts = tok.decode(ids)  # stops at EOS / padding, drops BOS

Backends:
  SentencePieceTokenizer  BPE trained on the dataset's captions (`train_sentencepiece`,
                          `python -m dalle_jax.tools.train_tokenizer`), DALL·E style.
  HFTokenizer             a Hugging Face fast tokenizer from a LOCAL directory (CLIP's BPE,
                          BART's byte-level BPE for DALL·E mini); ids equal HF's own.
  BartBPETokenizer        min-dalle's vocab.json + merges.txt, reproducing
                          `min_dalle.text_tokenizer.TextTokenizer.tokenize` exactly.
  t5_tokenizer            T5's SentencePiece (tokenizer.json or spiece.model) with
                          T5's ids through one of the first two.

The empty text is valid (the unconditional input of classifier-free guidance):
it encodes to just the special tokens (or all padding). Over-long texts are
truncated, keeping the EOS at the end when the backend appends one, and counted:
each call that truncates logs a warning with the counts.
"""
import json
import logging
import os
import re
import threading

import numpy as np
from etils import epath

from dalle_jax import paths

log = logging.getLogger(__name__)

DEFAULT_SP_VOCAB = 16384  # DALL·E's text vocabulary; small corpora give fewer pieces
SP_SPECIALS = dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3)


def _as_text(x):
  """A caption as str (accepts str, bytes, numpy scalars)."""
  if isinstance(x, np.ndarray) and x.ndim == 0:
    x = x.item()
  if isinstance(x, bytes):
    return x.decode("utf-8", errors="replace")
  if isinstance(x, str):
    return str(x)
  raise TypeError(f"expected a text (str or bytes), got {type(x).__name__}: {x!r:.80}")


def _as_text_list(texts):
  if isinstance(texts, (str, bytes)):
    return [_as_text(texts)]
  if isinstance(texts, np.ndarray):
    texts = texts.reshape(-1).tolist()
  return [_as_text(t) for t in texts]


class Tokenizer:
  """Common interface. Subclasses implement `_tokenize` and `_detokenize`.

  Attributes:
    vocab_size: number of ids (embedding rows a model needs).
    pad_id: id used for padding (may equal eos_id, as in HF CLIP).
    bos_id / eos_id: the ids this tokenizer inserts at the start / end of every
      text, None when it inserts none.
    max_len: default `max_len` of `encode` (set by `get_tokenizer`), or None.
    num_encoded / num_truncated: running totals over all `encode` calls.
  """
  vocab_size: int
  pad_id: int
  bos_id = None
  eos_id = None
  unk_id = None

  def __init__(self, *, lowercase=False, collapse_whitespace=False, strip=False, max_len=None):
    self.lowercase = lowercase
    self.collapse_whitespace = collapse_whitespace
    self.strip = strip
    self.max_len = max_len
    self.num_encoded = 0
    self.num_truncated = 0

  # -- backend hooks ---------------------------------------------------------
  def _tokenize(self, texts):
    """Normalised texts -> list of id lists, special tokens included, untruncated."""
    raise NotImplementedError

  def _detokenize(self, ids):
    """Ids without specials/padding -> text."""
    raise NotImplementedError

  # -- public ----------------------------------------------------------------
  def normalize(self, text):
    if self.collapse_whitespace:
      text = " ".join(text.split())
    elif self.strip:
      text = text.strip()
    if self.lowercase:
      text = text.lower()
    return text

  @property
  def num_special_tokens(self):
    return (self.bos_id is not None) + (self.eos_id is not None)

  def tokenize(self, texts):
    """Texts -> list of id lists (specials included, no truncation or padding)."""
    return self._tokenize([self.normalize(t) for t in _as_text_list(texts)])

  def encode(self, texts, max_len=None):
    """Texts (str, list or array of str/bytes) -> (ids int32 (N, L), mask bool (N, L))."""
    max_len = self.max_len if max_len is None else max_len
    if max_len is None:
      raise ValueError("encode() needs max_len (or a tokenizer built with max_len)")
    if max_len < max(1, self.num_special_tokens):
      raise ValueError(f"max_len={max_len} is too small: {type(self).__name__} adds "
                       f"{self.num_special_tokens} special tokens to every text")
    seqs = self.tokenize(texts)
    ids_nl = np.full((len(seqs), max_len), self.pad_id, np.int32)
    mask_nl = np.zeros((len(seqs), max_len), bool)
    truncated, longest = 0, 0
    for i, seq in enumerate(seqs):
      longest = max(longest, len(seq))
      if len(seq) > max_len:
        truncated += 1
        # Keep the EOS: models pool on it (CLIP) or expect it to close the text.
        keep_eos = self.eos_id is not None and seq[-1] == self.eos_id
        seq = seq[:max_len - 1] + [seq[-1]] if keep_eos else seq[:max_len]
      ids_nl[i, :len(seq)] = seq
      mask_nl[i, :len(seq)] = True
    self.num_encoded += len(seqs)
    self.num_truncated += truncated
    if truncated:
      log.warning(
          "%s: truncated %d of %d texts to max_len=%d tokens (longest: %d tokens; "
          "%d of %d so far)", type(self).__name__, truncated, len(seqs), max_len, longest,
          self.num_truncated, self.num_encoded)
    return ids_nl, mask_nl

  def decode(self, ids):
    """Ids (N, L) or (L,) -> list of texts; stops at EOS or padding, drops BOS."""
    rows = np.asarray(ids)
    if rows.ndim == 1:
      rows = rows[None]
    if rows.ndim != 2:
      raise ValueError(f"decode expects ids of shape (N, L) or (L,), got {rows.shape}")
    stops = {self.pad_id} | ({self.eos_id} if self.eos_id is not None else set())
    out = []
    for row in rows.tolist():
      if self.bos_id is not None and row and row[0] == self.bos_id:
        row = row[1:]
      kept = []
      for t in row:
        if t in stops:
          break
        kept.append(t)
      out.append(self._detokenize(kept))
    return out

  def __repr__(self):
    return (f"{type(self).__name__}(vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id})")


# ---------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------


_SP_BATCH_FROM = 1024  # texts per call from which SentencePiece's list call pays off


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model (e.g. BPE trained by `train_sentencepiece`)."""

  def __init__(self, model_path, lowercase=True, add_bos=False, add_eos=True,
               collapse_whitespace=True, max_len=None, model_proto=None):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    super().__init__(lowercase=lowercase, collapse_whitespace=collapse_whitespace,
                     strip=True, max_len=max_len)
    self.model_path = model_path
    if model_proto is None:
      model_proto = _read_bytes(model_path, what="SentencePiece model")
    try:
      self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except Exception as e:  # sentencepiece raises bare RuntimeError/OSError
      raise ValueError(f"{model_path}: not a valid SentencePiece model ({e})") from e
    self.add_bos, self.add_eos = add_bos, add_eos
    self.vocab_size = self.sp.get_piece_size()
    self.unk_id = self.sp.unk_id()
    for flag, name, i in ((add_bos, "bos", self.sp.bos_id()), (add_eos, "eos", self.sp.eos_id())):
      if flag and i < 0:
        raise ValueError(f"{model_path}: add_{name}=True but the model has no {name} piece")
    self.bos_id = self.sp.bos_id() if add_bos else None
    self.eos_id = self.sp.eos_id() if add_eos else None
    if self.sp.pad_id() >= 0:
      self.pad_id = self.sp.pad_id()
    else:  # models trained elsewhere may lack a pad piece: pad with EOS (masked anyway)
      self.pad_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else 0

  def _tokenize(self, texts):
    if not texts:
      return []
    kw = dict(out_type=int, add_bos=self.add_bos, add_eos=self.add_eos)
    if len(texts) >= _SP_BATCH_FROM:
      return self.sp.encode(texts, **kw)
    # A list call costs ~50 us (far more on a busy host) before any work, a
    # caption ~3 us: pipelines tokenise one example at a time.
    return [self.sp.encode(t, **kw) for t in texts]

  def _detokenize(self, ids):
    return self.sp.decode(ids)


def _read_bytes(path, what):
  if not path:
    raise ValueError(f"no {what} path given")
  p = epath.Path(path)  # local or gs:// (paths)
  if not p.exists():
    raise FileNotFoundError(f"{what} not found: {path}")
  return p.read_bytes()


def _write_bytes_atomic(path, data):
  p = epath.Path(path)
  if paths.is_remote(p):  # an object appears whole when its upload completes
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return
  p.parent.mkdir(parents=True, exist_ok=True)
  # Unique temp name + rename: concurrent processes (or the pipeline's read
  # threads) training the same deterministic model never see a half-written file.
  tmp = p.parent / f".{p.name}.tmp{os.getpid()}-{threading.get_ident()}"
  tmp.write_bytes(data)
  tmp.replace(p)


def train_sentencepiece(texts, out_path, vocab_size, *, lowercase=True, model_type="bpe",
                        character_coverage=1.0, max_sentences=2_000_000, byte_fallback=False,
                        num_threads=1):
  """Trains a SentencePiece model on `texts` and writes it to `out_path`.

  Ids: pad 0, unk 1, bos 2, eos 3. Deterministic: no sampling or shuffling
  inside SentencePiece (a corpus larger than `max_sentences` is subsampled at
  an even stride here) and a fixed thread count. When the corpus cannot fill
  `vocab_size` pieces (e.g. the synthetic shapes captions) the model gets as
  many as the corpus supports. Texts are normalised as SentencePieceTokenizer
  does (whitespace collapsed, lowercased when `lowercase`); empty ones skipped.

  Returns the SentencePieceTokenizer of the written model.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  norm = Tokenizer(lowercase=lowercase, collapse_whitespace=True)
  corpus = [t for t in (norm.normalize(_as_text(x)) for x in texts) if t]
  if not corpus:
    raise ValueError(f"no non-empty texts to train a tokenizer for {out_path}")
  if len(corpus) > max_sentences:
    corpus = [corpus[i] for i in np.linspace(0, len(corpus) - 1, max_sentences).astype(int)]
  writer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=writer, vocab_size=int(vocab_size),
        model_type=model_type, character_coverage=character_coverage,
        input_sentence_size=0, shuffle_input_sentence=False, hard_vocab_limit=False,
        byte_fallback=byte_fallback, num_threads=num_threads, minloglevel=2,
        **SP_SPECIALS)
  except RuntimeError as e:
    raise ValueError(f"SentencePiece training for {out_path} failed "
                     f"(vocab_size={vocab_size}, {len(corpus)} texts): {e}") from e
  proto = writer.getvalue()
  _write_bytes_atomic(out_path, proto)
  tok = SentencePieceTokenizer(out_path, lowercase=lowercase, model_proto=proto)
  log.info("trained SentencePiece %s on %d texts: %d pieces (asked %d) -> %s",
           model_type, len(corpus), tok.vocab_size, vocab_size, out_path)
  return tok


# ---------------------------------------------------------------------------
# Hugging Face (offline, local directory)
# ---------------------------------------------------------------------------


class HFTokenizer(Tokenizer):
  """A Hugging Face tokenizer loaded offline from a local directory.

  Ids equal `hf_tokenizer(texts, truncation=True, max_length=L,
  padding="max_length")["input_ids"]`; padding uses the pad token configured
  in the directory (for OpenAI CLIP that is <|endoftext|>, i.e. pad_id ==
  eos_id: use the mask, not `ids != pad_id`, to find real tokens). Normalisation
  is off by default since the HF tokenizer carries its own normaliser.
  """

  def __init__(self, local_dir, lowercase=False, collapse_whitespace=False, max_len=None):
    super().__init__(lowercase=lowercase, collapse_whitespace=collapse_whitespace,
                     max_len=max_len)
    if not epath.Path(local_dir).is_dir():
      raise FileNotFoundError(f"Hugging Face tokenizer directory not found: {local_dir}")
    local_dir = paths.local_copy(local_dir)  # transformers reads local files only
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    try:
      self.hf = AutoTokenizer.from_pretrained(local_dir, local_files_only=True)
    except Exception as e:
      raise ValueError(f"could not load a Hugging Face tokenizer from {local_dir} "
                       f"(need tokenizer.json or vocab/merges + tokenizer_config.json): {e}") from e
    self.local_dir = local_dir
    self.vocab_size = len(self.hf)
    self.unk_id = self.hf.unk_token_id
    # Which specials does it actually insert? Look at an encoded probe.
    probe = self.hf("a", add_special_tokens=True)["input_ids"]
    bos, eos = self.hf.bos_token_id, self.hf.eos_token_id
    if bos is None or eos is None:  # e.g. BERT-style [CLS] ... [SEP]
      bos = bos if bos is not None else self.hf.cls_token_id
      eos = eos if eos is not None else self.hf.sep_token_id
    self.bos_id = bos if bos is not None and probe and probe[0] == bos else None
    self.eos_id = eos if eos is not None and probe and probe[-1] == eos else None
    pad = self.hf.pad_token_id
    if pad is None:
      pad = eos if eos is not None else 0
      log.warning("%s has no pad token: padding with id %d (masked)", local_dir, pad)
    self.pad_id = pad

  def _tokenize(self, texts):
    if not texts:
      return []
    # Untruncated, so over-long texts can be counted; `encode` then truncates
    # exactly as HF does (content cut, specials kept).
    return self.hf(texts, add_special_tokens=True, truncation=False, padding=False,
                   verbose=False)["input_ids"]

  def _detokenize(self, ids):
    return self.hf.decode(ids, skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------
# min-dalle's BART byte-level BPE
# ---------------------------------------------------------------------------


def _bytes_to_unicode():
  """GPT-2's reversible byte -> printable unicode char table (space -> 'Ġ')."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
               list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


_WORD_START = chr(ord(" ") + 256)  # 'Ġ', the byte-level char of the space before a word


class BartBPETokenizer(Tokenizer):
  """min-dalle's text tokenizer (DALL·E mini / mega), ids identical to
  `min_dalle.text_tokenizer.TextTokenizer.tokenize`:

  emojis -> their names, lowercase, non-ASCII dropped, words split on single
  spaces, each word BPE-merged from ['Ġ', *chars] (lowest-rank pair first, its
  first occurrence), unknown subwords -> <unk>, then [<s>] + ids + [</s>].
  (min-dalle cuts over-long texts to 64 tokens, dropping </s>; `encode` keeps it.)
  Whitespace collapsing is off by default to keep that parity (min-dalle maps a
  tab or newline inside a word to <unk>).
  """

  def __init__(self, vocab, merges, collapse_whitespace=False, max_len=None):
    super().__init__(lowercase=True, collapse_whitespace=collapse_whitespace, max_len=max_len)
    self.vocab = dict(vocab)
    missing = [t for t in ("<s>", "</s>", "<unk>") if t not in self.vocab]
    if missing:
      raise ValueError(f"BART vocab lacks the special tokens {missing}")
    self.rank = {}
    for i, m in enumerate(merges):
      pair = tuple(m.split()) if isinstance(m, str) else tuple(m)
      if len(pair) != 2:
        raise ValueError(f"bad BPE merge #{i}: {m!r} (expected two symbols)")
      self.rank[pair] = i  # a repeated pair keeps its last rank, as in min-dalle
    self.bos_id, self.eos_id = self.vocab["<s>"], self.vocab["</s>"]
    self.unk_id = self.vocab["<unk>"]
    self.pad_id = self.vocab.get("<pad>", 1)
    self.vocab_size = max(self.vocab.values()) + 1
    self.inverse = {i: s for s, i in self.vocab.items()}
    self.specials = {self.bos_id, self.eos_id, self.pad_id, self.unk_id,
                     self.vocab.get("<mask>", -1)}
    self.byte_of_char = {c: b for b, c in _bytes_to_unicode().items()}
    self._cache = {}
    try:
      import emoji  # pylint: disable=g-import-not-at-top,unused-import
      self._has_emoji = True
    except ImportError:
      self._has_emoji = False
      log.warning("the `emoji` package is missing: emojis are dropped instead of named "
                  "(min-dalle parity needs `pip install emoji`)")

  @classmethod
  def from_files(cls, vocab_json, merges_txt, **kw):
    """Reads min-dalle's / BART's vocab.json and merges.txt."""
    for p in (vocab_json, merges_txt):
      if not epath.Path(p).is_file():
        raise FileNotFoundError(f"BART BPE file not found: {p}")
    try:
      vocab = json.loads(epath.Path(vocab_json).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
      raise ValueError(f"{vocab_json}: not valid JSON ({e})") from e
    lines = epath.Path(merges_txt).read_text(encoding="utf-8").split("\n")
    # A '#version' header and blank lines are not merges.
    merges = [l for i, l in enumerate(lines) if l and not (i == 0 and l.startswith("#version"))]
    return cls(vocab, merges, **kw)

  @classmethod
  def from_dir(cls, path, **kw):
    path = epath.Path(path)
    return cls.from_files(path / "vocab.json", path / "merges.txt", **kw)

  def _bpe(self, word):
    cached = self._cache.get(word)
    if cached is not None:
      return cached
    parts = [_WORD_START] + list(word)
    inf = len(self.rank)
    while len(parts) > 1:
      ranks = [self.rank.get(p, inf) for p in zip(parts[:-1], parts[1:])]
      best = min(ranks)
      if best == inf:
        break
      i = ranks.index(best)  # first occurrence of the best pair
      parts[i:i + 2] = [parts[i] + parts[i + 1]]
    ids = [self.vocab.get(p, self.unk_id) for p in parts]
    if len(self._cache) > 100_000:
      self._cache.clear()
    self._cache[word] = ids
    return ids

  def normalize(self, text):
    text = super().normalize(text)
    if self._has_emoji:
      from emoji import demojize  # pylint: disable=g-import-not-at-top
      text = demojize(text, delimiters=("", ""))
    return text.lower().encode("ascii", errors="ignore").decode()

  def _tokenize(self, texts):
    out = []
    for text in texts:
      ids = [self.bos_id]
      for word in text.split(" "):
        if word:
          ids.extend(self._bpe(word))
      ids.append(self.eos_id)
      out.append(ids)
    return out

  def _detokenize(self, ids):
    chars = "".join(self.inverse.get(i, "") for i in ids if i not in self.specials)
    data = bytearray()
    for c in chars:
      b = self.byte_of_char.get(c)
      data.extend([b] if b is not None else c.encode("utf-8"))
    return data.decode("utf-8", errors="replace").strip()


# ---------------------------------------------------------------------------
# T5 (SentencePiece unigram with pad 0, eos 1, unk 2, no bos)
# ---------------------------------------------------------------------------


def t5_tokenizer(path, max_len=None):
  """T5's tokenizer from a directory (or a .model file): EOS appended, no BOS, pad 0.

  tokenizer.json (what transformers saves) -> HFTokenizer, ids equal to
  transformers' T5Tokenizer; else spiece.model -> SentencePieceTokenizer, equal
  too except that special-token strings written inside a text ("</s>",
  "<extra_id_0>") are spelled out instead of mapped to their ids.
  """
  p = epath.Path(path)  # local or gs://
  model = p if p.is_file() else p / "spiece.model"
  if p.is_dir() and (p / "tokenizer.json").is_file():
    tok = HFTokenizer(path, lowercase=False, max_len=max_len)
  elif model.is_file():
    tok = SentencePieceTokenizer(os.fspath(model), lowercase=False, add_bos=False, add_eos=True,
                                 collapse_whitespace=False, max_len=max_len)
  else:
    raise FileNotFoundError(f"T5 tokenizer {path}: no tokenizer.json or spiece.model")
  if tok.eos_id is None or tok.bos_id is not None:
    raise ValueError(f"T5 tokenizer {path}: expected EOS appended and no BOS, got "
                     f"bos_id={tok.bos_id}, eos_id={tok.eos_id}")
  return tok


# ---------------------------------------------------------------------------
# From config
# ---------------------------------------------------------------------------


def _safe_name(s):
  return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("_.") or "dataset"


def cached_sentencepiece_path(text_cfg, data_cfg):
  """Where `get_tokenizer` caches the SentencePiece model trained on a dataset."""
  vocab = int(text_cfg.vocab_size) or DEFAULT_SP_VOCAB
  split = data_cfg.get("train_split", "train")
  lc = "_lc" if text_cfg.get("lowercase", True) else ""
  name = f"spm_{_safe_name(data_cfg.dataset)}_{_safe_name(split)}_bpe{vocab}{lc}.model"
  return os.path.join(str(data_cfg.data_dir), name)


def dataset_captions(data_cfg, split=None, max_examples=None):
  """All captions of a split via `dalle_jax.data.pipeline.load_source` (field 'caption').

  A caption field holding several captions (list / array) contributes all of them.
  With `max_examples`, examples are taken at an even stride (deterministic).
  """
  from dalle_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  split = split or data_cfg.get("train_split", "train")
  source = pipeline.load_source(data_cfg, split)
  n = len(source)
  if n == 0:
    raise ValueError(f"dataset {data_cfg.dataset!r} split {split!r} in {data_cfg.data_dir} is empty")
  index = range(n)
  if max_examples and n > max_examples:
    index = np.linspace(0, n - 1, max_examples).astype(int).tolist()
  captions = []
  for i in index:
    example = source[i]
    if "caption" not in example:
      raise KeyError(f"dataset {data_cfg.dataset!r} has no 'caption' field "
                     f"(fields: {sorted(example)})")
    c = example["caption"]
    if isinstance(c, np.ndarray) and c.ndim > 0 or isinstance(c, (list, tuple)):
      captions.extend(_as_text(x) for x in np.asarray(c, dtype=object).reshape(-1))
    else:
      captions.append(_as_text(c))
  return captions


def get_tokenizer(text_cfg, data_cfg=None, base_dir=None):
  """Builds the tokenizer described by `configs.common.text_config()` keys.

  Args:
    text_cfg: keys tokenizer ("sentencepiece" | "hf" | "bart_bpe" | "t5"), path,
      vocab_size, max_len, lowercase (optional: collapse_whitespace).
    data_cfg: the data config; needed when tokenizer="sentencepiece" and path is
      empty: a model is then trained on data_cfg's training captions and cached
      in data_cfg.data_dir (see `cached_sentencepiece_path`), reused next time.
    base_dir: relative paths are resolved against it (e.g. a checkpoint dir).
  """
  kind = text_cfg.tokenizer
  path = text_cfg.get("path", "") or ""
  if path and base_dir and not os.path.isabs(path) and "://" not in path:
    path = os.path.join(base_dir, path)
  lowercase = bool(text_cfg.get("lowercase", True))
  max_len = int(text_cfg.max_len) if text_cfg.get("max_len") else None
  ws = {}
  if text_cfg.get("collapse_whitespace") is not None:
    ws = dict(collapse_whitespace=bool(text_cfg.collapse_whitespace))

  if kind == "sentencepiece":
    if path:
      tok = SentencePieceTokenizer(path, lowercase=lowercase, max_len=max_len, **ws)
    else:
      if data_cfg is None:
        raise ValueError("text.path is empty and no data config was given to train a "
                         "SentencePiece tokenizer on; set config.text.path")
      path = cached_sentencepiece_path(text_cfg, data_cfg)
      if epath.Path(path).exists():
        log.info("using cached SentencePiece tokenizer %s", path)
        tok = SentencePieceTokenizer(path, lowercase=lowercase, max_len=max_len, **ws)
      else:
        log.info("training a SentencePiece tokenizer on %s captions -> %s",
                 data_cfg.dataset, path)
        tok = train_sentencepiece(dataset_captions(data_cfg), path,
                                  int(text_cfg.vocab_size) or DEFAULT_SP_VOCAB,
                                  lowercase=lowercase)
        tok.max_len = max_len
        if ws:
          tok.collapse_whitespace = ws["collapse_whitespace"]
  elif kind == "hf":
    if not path:
      raise ValueError("text.tokenizer='hf' needs text.path: a local tokenizer directory")
    tok = HFTokenizer(path, lowercase=lowercase, max_len=max_len, **ws)
  elif kind == "t5":
    if not path:
      raise ValueError("text.tokenizer='t5' needs text.path: a directory with tokenizer.json "
                       "or spiece.model")
    tok = t5_tokenizer(path, max_len=max_len)
  elif kind == "bart_bpe":
    if not path:
      raise ValueError("text.tokenizer='bart_bpe' needs text.path: a directory with "
                       "vocab.json and merges.txt")
    if epath.Path(path).is_file():  # path to vocab.json: merges.txt beside it
      path = os.fspath(epath.Path(path).parent)
    if not epath.Path(path).is_dir():
      raise FileNotFoundError(f"BART BPE tokenizer directory not found: {path}")
    tok = BartBPETokenizer.from_dir(path, max_len=max_len, **ws)
  else:
    raise ValueError(f"unknown text.tokenizer {kind!r}; expected sentencepiece | hf | bart_bpe | t5")

  model_vocab = int(text_cfg.get("vocab_size", 0) or 0)
  if model_vocab and tok.vocab_size > model_vocab:
    log.warning("tokenizer %s has %d ids but text.vocab_size=%d: ids >= %d would be out "
                "of the model's embedding range", path, tok.vocab_size, model_vocab, model_vocab)
  return tok
