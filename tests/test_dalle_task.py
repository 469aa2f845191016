"""The dalle task: learning on a tiny synthetic text->codes problem, dataset meta, preprocess."""
import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest

from dalle_jax.configs import dalle as dalle_cfg
from dalle_jax.configs import dalle_mini as dalle_mini_cfg
from dalle_jax.tasks import dalle as dalle_task

L, G, V = 6, 4, 16  # text length, code grid, codebook


class FakeTokenizer:
  """Word-per-token tokenizer over 'w3'..'w39' with BOS=1, EOS=2, pad=0."""
  vocab_size, pad_id, bos_id, eos_id = 40, 0, 1, 2

  def tokenize(self, texts):
    texts = [t.decode() if isinstance(t, bytes) else str(t) for t in texts]
    return [[1] + [int(w[1:]) for w in t.split()] + [2] for t in texts]

  def encode(self, texts, max_len):
    ids = np.zeros((len(texts), max_len), np.int32)
    for i, seq in enumerate(self.tokenize(texts)):
      seq = seq[:max_len]
      ids[i, :len(seq)] = seq
    return ids, ids != 0


def tiny_config(layout, dataset="/nonexistent"):
  if layout == "dalle":
    c = dalle_cfg.get_config("shapes")
    c.model.update(dict(text_vocab_size=40, text_len=L, image_vocab_size=V, image_grid=G,
                        num_layers=2, d_model=64, num_heads=4, mlp_dim=128))
  else:
    c = dalle_mini_cfg.get_config("shapes")
    c.model.update(dict(text_vocab_size=40, text_len=L, image_vocab_size=V, image_embed_size=V + 1,
                        start_token=V, image_grid=G, num_layers=1, d_model=64, num_heads=4,
                        glu_dim=128))
  c.text.max_len = L
  c.data.dataset = dataset
  c.blank_caption_prob = 0.1
  return c


def make_task(layout, **kw):
  task = dalle_task.TASK(tiny_config(layout, **kw))
  task._tokenizer = FakeTokenizer()
  return task


def synthetic_batch(task, rng, b=32):
  """Caption 'w<t>' (t in 3..10) fully determines the 16 codes."""
  t = rng.randint(3, 11, size=b)
  ids, mask = task.tokenizer.encode([f"w{k}" for k in t], L)
  codes = (t[:, None] * 5 + np.arange(G * G)[None] * 3) % V
  return {"text": ids, "text_mask": mask, "codes": codes.astype(np.int32)}


@pytest.mark.parametrize("layout", ["dalle", "dalle_mini"])
def test_learns_text_to_codes(layout):
  task = make_task(layout)
  rng = np.random.RandomState(0)
  params = jax.jit(task.init)(jax.random.PRNGKey(0), task.dummy_batch(2))
  params = jax.tree.map(lambda x: x, __import__("flax").linen.meta.unbox(params))["params"]
  tx = optax.adam(5e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch, i):
    (loss, (metrics, _)), g = jax.value_and_grad(task.loss_fn, has_aux=True)(
        params, {}, batch, jax.random.fold_in(jax.random.PRNGKey(1), i), i)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, metrics

  first = None
  for i in range(80):
    params, opt, metrics = step(params, opt, synthetic_batch(task, rng), i)
    if first is None:
      first = float(metrics["image_loss"])
  ev = jax.jit(task.eval_fn)(params, {}, synthetic_batch(task, rng, 64), jax.random.PRNGKey(2))
  assert abs(first - np.log(V)) < 0.7, first  # starts near chance
  assert float(ev["image_loss"]) < 0.25 * np.log(V), ev
  assert float(ev["accuracy"]) > 0.8, ev
  if layout == "dalle":
    assert "text_loss" in ev and np.isfinite(float(ev["text_loss"]))
  assert task.flops_per_example() > 6 * 1e4 * (L + G * G)
  assert task.tokens_per_example() == L + G * G


def test_dataset_meta_sets_grid_vocab_and_vqgan(tmp_path):
  from dalle_jax.data import records
  out = tmp_path / "codes"
  ex = [{"codes": np.zeros((3, 3), np.int32), "caption": "w3"} for _ in range(2)]
  records.write_records(str(out), "train", ex, meta={"grid": [3, 3], "n_embed": 12,
                                                    "vqgan": str(tmp_path / "vq")})
  task = make_task("dalle_mini", dataset=str(out))
  m = task.config.model
  assert (m.image_grid, m.image_vocab_size, m.image_embed_size, m.start_token) == (3, 12, V + 1, 12)
  assert task.config.vqgan == str(tmp_path / "vq")
  pre = task.preprocess({"codes": np.arange(9).reshape(3, 3), "caption": b"w5 w7"})
  assert pre["codes"].tolist() == list(range(9))
  assert pre["text"][:4].tolist() == [1, 5, 7, 2] and pre["text_mask"].sum() == 4
  with pytest.raises(ValueError, match="codes"):
    task.preprocess({"codes": np.zeros(5), "caption": "w3"})


def test_blank_caption_dropout():
  task = make_task("dalle")
  batch = jax.tree.map(jnp.asarray, synthetic_batch(task, np.random.RandomState(0), 256))
  dropped = task._drop_captions(batch, jax.random.PRNGKey(0))
  blank = np.asarray(dropped["text"])[:, 1] == 2  # BOS, EOS: the empty caption
  assert 0.03 < blank.mean() < 0.2
  assert not np.asarray(dropped["text_mask"])[blank][:, 2:].any()
