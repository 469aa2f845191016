"""DALL·E (Ramesh et al., 2021): one decoder-only transformer over text + image codes.

The stream is `[start, text_0 .. text_{L-1}, img_0 .. img_{N-2}]` (length L + N),
and the output at index q predicts `text_q` for q < L and `img_{q-L}` for q >= L,
so every text token and every image code is a target. Text and image codes have
separate vocabularies, embeddings and output heads: the image head has exactly
`image_vocab_size` outputs, so only valid codes can ever be predicted at image
positions. Padding is position-specific (paper, §2.2): the pad at text position
i is token `text_vocab_size + i` (see `pad_text`).

Positions: a learned table for text; row + column tables for the image grid.

Attention is causal. With `attention="sparse"` layer i (1-based) of n uses, as in
the paper (App. B.1): column attention when (i - 2) % 4 == 0, row attention
otherwise, and convolutional attention in the last layer. Image queries always
see every text position. In training the sparse layers are computed block-sparsely
(`GridSparseLayout`: only the text blocks and a band of recent rows/columns are
scored, equal to dense masking); a KV-cache decoding step gathers just the text
and the pattern's image keys from the cache (`CacheKeys`).

Shapes: B batch, L text length, N image codes, T = L + N stream length, D width,
V vocabulary, P number of distinct mask patterns.
"""
import functools
from typing import Any

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.models import layers

PATTERNS = ("full", "row", "column", "conv")


def layer_patterns(num_layers, attention="full"):
  """Per-layer pattern names: all 'full', or the paper's sparse cycle."""
  if attention == "full":
    return ["full"] * num_layers
  if attention != "sparse":
    raise ValueError(f"model.attention={attention!r}: expected 'full' or 'sparse'")
  pats = []
  for i in range(1, num_layers + 1):
    if i == num_layers:
      pats.append("conv")
    elif (i - 2) % 4 == 0:
      pats.append("column")
    else:
      pats.append("row")
  return pats


def pattern_table(num_layers, attention="full"):
  """(the distinct patterns in PATTERNS order, each layer's index into them)."""
  pats = layer_patterns(num_layers, attention)
  patterns = tuple(p for p in PATTERNS if p in pats)
  return patterns, np.array([patterns.index(p) for p in pats], np.int32)


def attention_masks(text_len, grid_h, grid_w, patterns=PATTERNS, conv_kernel=11):
  """(P, T, T) bool numpy masks over the stream, True = query may attend key.

  All are causal. Text queries (and the start) attend causally to everything.
  Image queries attend to every text position; among image keys the pattern
  decides, in terms of the *input* codes at query/key (code j at (r, c) sits at
  stream index L + 1 + j):
    row:    the previous grid_w codes and itself (a window spanning one row)
    column: codes in the same column
    conv:   codes within a conv_kernel x conv_kernel window around itself
  """
  t = text_len + grid_h * grid_w
  pos = np.arange(t)
  causal = pos[None, :] <= pos[:, None]
  code = pos - text_len - 1  # index of the input code at each position (< 0: not a code)
  is_code = code >= 0
  row, col = code // grid_w, code % grid_w
  both = is_code[:, None] & is_code[None, :]
  dq_k = code[:, None] - code[None, :]
  half = conv_kernel // 2
  rules = {
      "full": np.ones((t, t), bool),
      "row": dq_k <= grid_w,
      "column": (dq_k % grid_w) == 0,
      "conv": (np.abs(row[:, None] - row[None, :]) <= half) &
              (np.abs(col[:, None] - col[None, :]) <= half),
  }
  return np.stack([causal & (~both | rules[p]) for p in patterns])


class GridSparseLayout:
  """One sparse pattern computed block-sparsely over the training stream.

  The stream is cut into blocks of one grid row: the start + text positions
  padded to `prefix_blocks` blocks, then the codes row by row (column by column
  for column attention, so each column is one block). Every image query then
  needs the text blocks plus a band of recent blocks (row: its row and the one
  before; column: its own; conv: the kernel's rows up to its own), and text
  queries only the text: scores are computed for those blocks alone
  (`layers.banded_block_attention`), e.g. 352 of 1280 keys per query for row
  attention at the paper's 256 + 32x32 stream. Built from the dense mask and
  checked to cover exactly its allowed keys, so results equal dense masking.
  """

  def __init__(self, dense_tt, text_len, grid, transpose):
    t = dense_tt.shape[0]
    self.t, self.lead, self.grid, self.transpose = t, text_len + 1, grid, transpose
    self.bs = grid
    self.prefix_blocks = -(-self.lead // self.bs)
    n_codes = t - self.lead
    text = np.arange(self.prefix_blocks * self.bs)
    text = np.where(text < self.lead, text, -1).reshape(self.prefix_blocks, self.bs)
    img = np.arange(grid * grid)
    img = np.where(img < n_codes, self.lead + img, -1).reshape(grid, grid)
    img = (img.T if transpose else img).reshape(grid, self.bs)
    slots = np.concatenate([text, img])  # (Q, bs): stream position of each slot, -1 = pad
    q_blocks = len(slots)
    keyed = lambda i, j: dense_tt[np.ix_(np.maximum(slots[i], 0), np.maximum(slots[j], 0))] & \
        (slots[i][:, None] >= 0) & (slots[j][None, :] >= 0)
    self.offsets = tuple(sorted({i - j for i in range(self.prefix_blocks, q_blocks)
                                 for j in range(self.prefix_blocks, i + 1) if keyed(i, j).any()}))
    masks = []
    for i in range(q_blocks):
      parts = [keyed(i, j) for j in range(self.prefix_blocks)]
      for o in self.offsets:  # band blocks that are text (already above) or absent: off
        j = i - o
        parts.append(keyed(i, j) if j >= self.prefix_blocks else np.zeros((self.bs,) * 2, bool))
      masks.append(np.concatenate(parts, axis=1))
    self.mask = np.stack(masks)  # (Q, bs, M)
    covered = self.mask.sum(-1)[slots >= 0]
    if not np.array_equal(covered, dense_tt.sum(-1)[slots[slots >= 0]]):
      raise ValueError("sparse pattern does not fit the text-prefix + band block layout")

  @property
  def keys_per_query(self):
    return self.mask.shape[-1]

  def _blocks(self, x_bthk):
    b, _, h, k = x_bthk.shape
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    text = pad(x_bthk[:, :self.lead], self.prefix_blocks * self.bs)
    img = pad(x_bthk[:, self.lead:], self.grid * self.grid).reshape(b, self.grid, self.grid, h, k)
    if self.transpose:
      img = jnp.swapaxes(img, 1, 2)
    return jnp.concatenate([text.reshape(b, -1, self.bs, h, k), img], axis=1)  # (B, Q, bs, H, K)

  def _stream(self, x_bqthk):
    b, _, _, h, k = x_bqthk.shape
    text = x_bqthk[:, :self.prefix_blocks].reshape(b, -1, h, k)[:, :self.lead]
    img = x_bqthk[:, self.prefix_blocks:]
    if self.transpose:
      img = jnp.swapaxes(img, 1, 2)
    img = img.reshape(b, -1, h, k)[:, :self.t - self.lead]
    return jnp.concatenate([text, img], axis=1)

  def attend(self, q_bthk, k_bshk, v_bshk, dtype):
    out = layers.banded_block_attention(
        self._blocks(q_bthk), self._blocks(k_bshk), self._blocks(v_bshk), self.prefix_blocks,
        self.offsets, jnp.asarray(self.mask), dtype)
    return self._stream(out)


@functools.lru_cache(maxsize=8)
def sparse_layouts(text_len, grid, patterns, conv_kernel):
  """GridSparseLayout per pattern name for the training stream (cached)."""
  dense = attention_masks(text_len, grid, grid, patterns, conv_kernel)
  return tuple(GridSparseLayout(m, text_len, grid, transpose=(p == "column"))
               for p, m in zip(patterns, dense))


@functools.lru_cache(maxsize=8)
def decode_key_tables(text_len, grid, patterns, conv_kernel):
  """For KV-cache decoding of sparse layers: the image keys each stream position
  may see, per pattern, padded to one width. (idx (P, T, J) int32, valid (P, T, J)
  bool); the start + text positions (seen by every image query) are not listed."""
  dense = attention_masks(text_len, grid, grid, patterns, conv_kernel)
  lead = text_len + 1
  keys = [[np.nonzero(m[q, lead:])[0] + lead for q in range(m.shape[0])] for m in dense]
  width = max(len(k) for per in keys for k in per)
  idx = np.zeros(dense.shape[:2] + (width,), np.int32)
  valid = np.zeros(dense.shape[:2] + (width,), bool)
  for p, per in enumerate(keys):
    for q, k in enumerate(per):
      idx[p, q, :len(k)], valid[p, q, :len(k)] = k, True
  return idx, valid


@struct.dataclass
class CacheKeys:
  """A sparse layer's keys for one decode step: the text prefix plus `idx`
  (valid where `valid`) gathered from the cache, so the step reads those
  positions only instead of the whole cache."""
  idx: jax.Array  # (J,) int32 cache positions
  valid: jax.Array  # (J,) bool
  lead: int = struct.field(pytree_node=False)  # start + text positions

  def select_keys(self, k_bhsk, v_bhsk):
    pick = lambda x: jnp.concatenate([x[:, :, :self.lead], jnp.take(x, self.idx, axis=2)], axis=2)
    mask = jnp.concatenate([jnp.ones((self.lead,), bool), self.valid])
    return pick(k_bhsk), pick(v_bhsk), mask[None, None, None, :]


class _PatternAttention:
  """The `mask` a sparse layer passes down: its pattern id picks the layout
  (lax.switch: the id is traced when layers are scanned)."""

  def __init__(self, layouts, pattern_id):
    self.layouts, self.pattern_id = layouts, pattern_id

  def attend(self, q_bthk, k_bshk, v_bshk, dtype):
    fns = [functools.partial(lay.attend, dtype=dtype) for lay in self.layouts]
    if len(fns) == 1:
      return fns[0](q_bthk, k_bshk, v_bshk)
    return jax.lax.switch(self.pattern_id, fns, q_bthk, k_bshk, v_bshk)


def pad_text(ids, mask, text_vocab_size):
  """Replaces padding (mask False) with position-specific pad ids V + i."""
  ids = jnp.asarray(ids)
  pads = text_vocab_size + jnp.arange(ids.shape[-1], dtype=ids.dtype)
  return jnp.where(jnp.asarray(mask, bool), ids, pads)


class SparseBlock(nn.Module):
  """A PreLNBlock that picks its own attention pattern by pattern id.

  (x, mask_table, pattern_id ()) -> (x, None): scan-friendly, each layer receives
  only an int, the table is broadcast. mask_table: dense (P, T, S) masks,
  CacheKeys with a leading P axis (sparse decode steps), a layers.AttentionMask
  (every layer causal: no per-pattern leaves, fused kernels read it), or None; with
  `sparse_layouts` (block-sparse training) the id picks a GridSparseLayout.
  """
  num_heads: int
  head_dim: int
  mlp_dim: int
  activation: str = "gelu"
  use_bias: bool = True
  decode: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  sparse_layouts: Any = None  # GridSparseLayout per pattern id: block-sparse training

  @nn.compact
  def __call__(self, x_btd, mask_table, pattern_id):
    if self.sparse_layouts is not None:
      mask = _PatternAttention(self.sparse_layouts, pattern_id)
    else:  # a dense (P, T, S) table, or CacheKeys with a leading P axis
      mask = None if mask_table is None else jax.tree.map(lambda a: a[pattern_id], mask_table)
    block = layers.PreLNBlock(
        self.num_heads, self.head_dim, self.mlp_dim, activation=self.activation,
        use_bias=self.use_bias, decode=self.decode, dtype=self.dtype,
        param_dtype=self.param_dtype, name="block")
    return block(x_btd, None, mask)


class DalleTransformer(nn.Module):
  """Decoder-only text->image transformer (see module docstring)."""
  text_vocab_size: int = 16384
  text_len: int = 256
  image_vocab_size: int = 8192
  image_grid: int = 32  # square grid: image_grid**2 codes
  num_layers: int = 64
  d_model: int = 3968
  num_heads: int = 62
  mlp_dim: int = 0  # 0 = 4 * d_model
  attention: str = "full"  # full | sparse
  conv_kernel: int = 11
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  remat: str = "none"
  scan: bool = False
  decode: bool = False
  # sparse layers: block-sparse in training, keys gathered from the cache when
  # decoding (False: dense masks everywhere; same results, full-attention cost)
  sparse_blocks: bool = True

  @property
  def num_codes(self):
    return self.image_grid ** 2

  @property
  def seq_len(self):
    return self.text_len + self.num_codes

  def attention_score_entries(self):
    """Attention scores computed per training example, summed over layers (the
    block-sparse layers count only their blocks): for the FLOP estimate."""
    t = self.seq_len
    if self.attention != "sparse" or not self.sparse_blocks:
      return self.num_layers * t * t
    patterns, ids = pattern_table(self.num_layers, self.attention)
    layouts = sparse_layouts(self.text_len, self.image_grid, patterns, self.conv_kernel)
    return sum(layouts[i].mask.size for i in ids)

  def setup(self):
    d = self.d_model
    if d % self.num_heads:
      raise ValueError(f"model.d_model={d} is not divisible by model.num_heads={self.num_heads}")
    emb = lambda n, name: layers.Embed(n, d, name=name, dtype=self.dtype,
                                       param_dtype=self.param_dtype)
    table = lambda name, n: layers.param_with_axes(
        self, name, nn.initializers.normal(0.02), (n, d), ("length", "embed"), self.param_dtype)
    self.text_embed = emb(self.text_vocab_size + self.text_len, "text_embed")
    self.image_embed = emb(self.image_vocab_size, "image_embed")
    self.start = layers.param_with_axes(self, "start", nn.initializers.normal(0.02), (d,),
                                        ("embed",), self.param_dtype)
    self.text_pos = table("text_pos", self.text_len)
    self.row_pos = table("row_pos", self.image_grid)
    self.col_pos = table("col_pos", self.image_grid)
    self._patterns, self._pattern_ids = pattern_table(self.num_layers, self.attention)
    self._sparse_layouts = None
    if self.attention == "sparse" and self.sparse_blocks and not self.decode:
      self._sparse_layouts = sparse_layouts(self.text_len, self.image_grid, self._patterns,
                                            self.conv_kernel)
    self.stack = layers.Stack(
        SparseBlock,
        dict(num_heads=self.num_heads, head_dim=d // self.num_heads,
             mlp_dim=self.mlp_dim or 4 * d, decode=self.decode, dtype=self.dtype,
             param_dtype=self.param_dtype, sparse_layouts=self._sparse_layouts),
        num_layers=self.num_layers, remat=self.remat, scan=self.scan, name="layers")
    self.final_ln = layers.LayerNorm("final_ln", param_dtype=self.param_dtype)
    head = lambda n, name: layers.Dense(n, ("embed", "vocab"), name=name, use_bias=False,
                                        dtype=self.dtype, param_dtype=self.param_dtype,
                                        kernel_init=nn.initializers.normal(0.02),
                                        out_dtype=jnp.float32)
    self.text_head = head(self.text_vocab_size + self.text_len, "text_head")
    self.image_head = head(self.image_vocab_size, "image_head")

  # --- embeddings ------------------------------------------------------------
  def _embed_text(self, text_bl):
    x = self.text_embed(text_bl) + self.text_pos[:text_bl.shape[1]].astype(self.dtype)
    start = jnp.broadcast_to(self.start.astype(self.dtype), (text_bl.shape[0], 1, self.d_model))
    return jnp.concatenate([start, x.astype(self.dtype)], axis=1)  # (B, 1 + L, D)

  def _embed_codes(self, codes_bn, first):
    j = first + jnp.arange(codes_bn.shape[1])
    # each table in the compute dtype first: matrices may arrive pre-cast
    # (sampling.decode.compute_dtype_params) and must give the same sum
    pos = (self.row_pos[j // self.image_grid].astype(self.dtype) +
           self.col_pos[j % self.image_grid].astype(self.dtype))
    return (self.image_embed(codes_bn) + pos).astype(self.dtype)

  def _run(self, x_btd, first_pos, use_mask):
    """Transformer body over stream positions [first_pos, first_pos + t)."""
    t = x_btd.shape[1]
    x_btd = layers.constrain(x_btd, ("batch", "length", "embed"))
    table = None
    if use_mask and self.decode and t == 1 and self.attention == "sparse" and self.sparse_blocks:
      idx, valid = decode_key_tables(self.text_len, self.image_grid, self._patterns,
                                     self.conv_kernel)
      row = lambda a: jax.lax.dynamic_index_in_dim(jnp.asarray(a), first_pos, 1, keepdims=False)
      table = CacheKeys(row(idx), row(valid), self.text_len + 1)  # leaves (P, J)
    elif use_mask and not self.decode and self._patterns == ("full",):
      table = layers.AttentionMask(causal=True)  # fused kernels skip the masked blocks
    elif use_mask and self._sparse_layouts is None:
      full = jnp.asarray(attention_masks(self.text_len, self.image_grid, self.image_grid,
                                         self._patterns, self.conv_kernel))
      table = jax.lax.dynamic_slice_in_dim(full, first_pos, t, axis=1)  # (P, t, T)
      if not self.decode:
        table = table[:, :, :t]
    h = self.stack(x_btd, table, layer_args=jnp.asarray(self._pattern_ids))
    return self.final_ln(h)

  # --- training / teacher forcing -------------------------------------------
  def __call__(self, text_bl, codes_bn):
    """Logits for every target: text (B, L, Vt + L) and image (B, N, Vi), f32.

    text_bl must already carry position-specific pads (`pad_text`).
    """
    if codes_bn.shape[1] != self.num_codes:
      raise ValueError(f"expected {self.num_codes} image codes per example "
                       f"(model.image_grid={self.image_grid}), got {codes_bn.shape[1]}")
    x = jnp.concatenate([self._embed_text(text_bl), self._embed_codes(codes_bn[:, :-1], 0)], 1)
    # In decode mode this call only sizes the caches; the stream's own causal
    # mask then comes from the cache, so only sparse patterns need a table.
    h = self._run(x, 0, use_mask=not self.decode or self.attention != "full")
    L = self.text_len
    text_logits = self.text_head(h[:, :L]).astype(jnp.float32)
    image_logits = self.image_head(h[:, L:]).astype(jnp.float32)
    return text_logits, image_logits

  # --- KV-cache decoding (decode=True) --------------------------------------
  def prefill(self, text_bl):
    """Runs start + text through the cache; returns logits for img_0 (B, Vi)."""
    h = self._run(self._embed_text(text_bl), 0, use_mask=self.attention != "full")
    return self.image_head(h[:, -1]).astype(jnp.float32)

  def step(self, code_b, j):
    """Feeds code img_j (B,) at stream index L + 1 + j; logits for img_{j+1}."""
    x = self._embed_codes(code_b[:, None], j)
    h = self._run(x, self.text_len + 1 + j, use_mask=self.attention != "full")
    return self.image_head(h[:, -1]).astype(jnp.float32)


def from_config(model_cfg, *, decode=False, dtype=None, param_dtype=None, remat=None,
                scan=None):
  """Builds a DalleTransformer from config.model (+ top-level numerics)."""
  m = model_cfg
  return DalleTransformer(
      text_vocab_size=m.text_vocab_size, text_len=m.text_len,
      image_vocab_size=m.image_vocab_size, image_grid=m.image_grid,
      num_layers=m.num_layers, d_model=m.d_model, num_heads=m.num_heads,
      mlp_dim=m.get("mlp_dim", 0), attention=m.get("attention", "full"),
      conv_kernel=m.get("conv_kernel", 11), sparse_blocks=m.get("sparse_blocks", True),
      dtype=layers.dtype_from_name(dtype or "bfloat16"),
      param_dtype=layers.dtype_from_name(param_dtype or "float32"),
      remat=remat or "none", scan=bool(scan), decode=decode)
