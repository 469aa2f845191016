"""The diffusion family learns to follow its text: a tiny text-conditional U-Net trained with
caption dropout on 8 px pictures named by their caption ("<colour> on <colour>"), then sampled
with guided DDIM, draws the named colours in the named places far above chance.

This is the fast suite's learning check of the text path (text transformer -> added-KV
attention + pooled embedding -> U-Net, guidance in one batched pass); `make demo` runs the
same family on the shapes dataset at 16 px.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dalle_jax import parallel
from dalle_jax.configs import diffusion as diffusion_cfg
from dalle_jax.tasks import diffusion as diffusion_task

COLOURS = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "white": (1, 1, 1)}
PAIRS = [(a, b) for a, b in itertools.permutations(COLOURS, 2)]  # 12 captions


class WordTokenizer:
  """One id per word (1 = end of text, 0 = padding): the captions' words are all known."""
  vocab_size, pad_id, eos_id = 16, 0, 1
  words = {w: i + 2 for i, w in enumerate(list(COLOURS) + ["on"])}

  def encode(self, texts, max_len):
    ids = np.zeros((len(texts), max_len), np.int32)
    for i, t in enumerate(texts):
      seq = [self.words[w] for w in t.split()] + [1]
      ids[i, :len(seq)] = seq
    return ids, ids != 0


def picture(fg, bg):
  """8x8: a centred 4x4 square of colour fg on background bg, in [-1, 1]."""
  img = np.broadcast_to(np.asarray(COLOURS[bg], np.float32), (8, 8, 3)).copy()
  img[2:6, 2:6] = COLOURS[fg]
  return img


def nearest(rgb):
  names = list(COLOURS)
  return names[int(np.argmin([np.sum((rgb - np.asarray(COLOURS[n])) ** 2) for n in names]))]


def test_guided_samples_follow_their_captions():
  config = diffusion_cfg.get_config("shapes")
  config.data.image_size = 8
  config.model.unet.update(dict(block_channels=(16, 32), attention=("none", "added_kv"),
                                mid_attention="added_kv", attn_head_dim=16, norm_groups=8))
  config.model.text.update(dict(width=32, layers=1, heads=2, mlp_dim=64))
  config.text.max_len = 6
  config.model.text.vocab_size = WordTokenizer.vocab_size
  config.dtype = "float32"
  task = diffusion_task.DiffusionTask(config)
  task._tokenizer = WordTokenizer()
  p_drop = float(config.diffusion.cond_drop_prob)
  assert 0 < p_drop < 0.5  # the preset trains the unconditional model guidance needs

  rs = np.random.RandomState(0)

  def batch_of(idx):
    captions = [f"{PAIRS[i][0]} on {PAIRS[i][1]}" for i in idx]
    ids, mask = task.tokenize(captions)
    images = np.stack([picture(*PAIRS[i]) for i in idx])
    return {"image": images, "text_ids": ids, "text_mask": mask}

  variables = parallel.unbox(task.init(jax.random.PRNGKey(0), batch_of(range(4))))
  params = variables["params"]
  opt = optax.adam(3e-3)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, batch, rng):
    (loss, _), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(params, {}, batch, rng, 0)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for i in range(150):
    batch = batch_of(rs.randint(0, len(PAIRS), 32))
    params, opt_state, loss = step(params, opt_state, batch, jax.random.PRNGKey(i))
    losses.append(float(loss))
  assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:10]), (losses[:10], losses[-20:])

  # two samples of every caption, guided DDIM-20
  idx = np.repeat(np.arange(len(PAIRS)), 2)
  cond = {k: jnp.asarray(v) for k, v in batch_of(idx).items() if k != "image"}
  x_T = jax.random.normal(jax.random.PRNGKey(1), (len(idx), 8, 8, 3))
  sample = jax.jit(lambda p, c, x: task.sample(p, c, x, None, sampler="ddim", steps=20,
                                               guidance_scale=3.0))
  images = np.asarray(sample(params, cond, x_T))
  fg_ok = [nearest(img[3:5, 3:5].mean((0, 1))) == PAIRS[i][0] for img, i in zip(images, idx)]
  bg_ok = [nearest(np.concatenate([img[0], img[-1]]).mean(0)) == PAIRS[i][1]
           for img, i in zip(images, idx)]
  # chance is 25% for each
  assert np.mean(fg_ok) >= 0.8 and np.mean(bg_ok) >= 0.8, (np.mean(fg_ok), np.mean(bg_ok))
