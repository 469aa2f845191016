"""The diffusion family: preset sizes (abstract), the task's glue, and sharded training
through the real trainer on 8 fake devices (data x fsdp x tensor), resumed exactly."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

from dalle_jax.configs import diffusion as diffusion_cfg
from dalle_jax import parallel
from dalle_jax.tasks import diffusion as diffusion_task


def _abstract_params(config):
  task = diffusion_task.DiffusionTask(config)
  abstract = jax.eval_shape(task.init, jax.random.PRNGKey(0), task.dummy_batch(1))
  return task, abstract


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _diffusers_ddpm_cifar10_count():
  """Parameters of diffusers' UNet2DModel in google/ddpm-cifar10-32's layout (meta tensors)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  with torch.device("meta"):
    m = diffusers.UNet2DModel(
        sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6, dropout=0.1)
  return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("preset,low,high", [
    ("ddpm_cifar10", 35.7e6, 35.8e6),  # DDPM paper: 35.7M
    ("glide_base64", 3.4e9, 3.7e9),  # GLIDE: ~3.5B (2.3B U-Net + 1.2B text transformer)
    ("imagen_base64", 1.8e9, 2.5e9),  # Imagen: 2B base U-Net (+ the text encoder)
])
def test_presets_abstractly(preset, low, high):
  """Parameter counts against the papers and shardings on a fake 256-chip pod; never allocated."""
  config = diffusion_cfg.get_config(preset)
  task, abstract = _abstract_params(config)
  params = parallel.unbox(abstract)["params"]
  n = _count(params)
  assert low <= n <= high, n
  if preset == "ddpm_cifar10":
    assert n == _diffusers_ddpm_cifar10_count()
    assert task.conditioning == "none" and set(params) == {"unet"}
  if preset == "glide_base64":
    assert 2.2e9 <= _count(params["unet"]) <= 2.4e9  # "roughly 2.3 billion" for the visual part
    assert 1.2e9 <= _count(params["text"]) <= 1.35e9  # 24 blocks of width 2048 + embeddings
    assert task.sched.variance_type == "learned_range"
    assert config.model.unet.out_channels == 6
  if preset == "imagen_base64":
    assert 1.8e9 <= _count(params["unet"]) <= 2.3e9
    assert task.sched.prediction_type == "v_prediction" and task.sched.thresholding
  # FSDP x tensor on an abstract pod: every big kernel split, per-chip bytes a fraction.
  mesh = AbstractMesh((1, 64, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  shardings = parallel.unbox(parallel.logical_shardings(abstract, mesh,
                                                        parallel.rules_from_config(config)))
  per_chip = 0
  for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings["params"])):
    per_chip += int(np.prod(s.shard_shape(x.shape)))
  assert per_chip < n / 16, (per_chip, n)


def test_preset_keys_and_locked_config():
  config = diffusion_cfg.get_config("shapes")
  for key in ("seed", "total_steps", "batch_size", "log_every", "eval_every", "checkpoint_every",
              "keep_checkpoints", "mesh", "optimizer", "model", "data"):
    assert key in config
  assert config.ema_decay > 0  # EMA on by default
  assert config.model.conditioning == "text" and config.text_encoder.clip == ""
  assert config.data.image_size == 16
  with pytest.raises(ValueError, match="unknown preset 'nope'"):
    diffusion_cfg.get_config("nope")
  # data.image_size and the text context are shared references
  config.text.max_len = 12
  assert config.model.text.max_len == 12


def tiny_config(tmp_path):
  config = diffusion_cfg.get_config("shapes")
  config.data.data_dir = str(tmp_path / "data")
  config.data.dataset = "shapes/16px_256"
  config.data.image_size = 16
  config.model.unet.update(dict(block_channels=(16, 32), attention=("none", "added_kv"),
                                mid_attention="added_kv", attn_head_dim=16, norm_groups=8))
  config.model.text.update(dict(width=32, layers=1, heads=2, mlp_dim=64))
  config.text.max_len = 12
  config.batch_size = 16
  config.total_steps = 16
  config.log_every = 1
  config.eval_every = 0
  config.preview_every = 0
  config.checkpoint_every = 8
  config.async_checkpoints = False
  config.dtype = "float32"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 5
  config.diffusion.num_train_timesteps = 100
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  config.lock()
  return config


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f if l.strip()]
  return {r["step"]: r for r in rows if "loss" in r}


def trains_and_resumes(config, tmp_path, split):
  """Trains `config` uninterrupted (workdir tmp_path/full), then stopped after `split` steps
  and resumed (tmp_path/split); asserts the resumed run's losses equal the uninterrupted
  run's step for step. Returns (final state, {step: metrics} of both runs)."""
  from dalle_jax.train import loop
  full = str(tmp_path / "full")
  state = loop.train(config, full)
  rows = _losses(full)
  split_dir = str(tmp_path / "split")
  loop.train(config, split_dir, max_steps=split)
  loop.train(config, split_dir)
  resumed = _losses(split_dir)
  steps = range(split + 1, int(config.total_steps) + 1)
  np.testing.assert_allclose([resumed[s]["loss"] for s in steps],
                             [rows[s]["loss"] for s in steps], rtol=1e-5)
  return state, rows, resumed


@pytest.mark.slow
def test_trains_sharded_resumes_exactly_and_loss_falls(tmp_path):
  config = tiny_config(tmp_path)
  before = config.to_json()
  state, rows, _ = trains_and_resumes(config, tmp_path, split=8)
  assert config.to_json() == before  # the task never mutates the locked config
  # parameters really are split over the mesh
  kernel = state.params["unet"]["conv_in"]["kernel"]
  assert len(kernel.sharding.device_set) == 8
  assert sorted(rows) == list(range(1, 17))
  # the shapes preset's v-prediction loss falls slowly and noisily over 16 steps (measured
  # 0.767 over steps 1-4 -> 0.675 over steps 9-16), so the halves' means are compared; that
  # the model learns is tests/test_diffusion_learning.py's (captions followed)
  first = np.mean([rows[s]["loss"] for s in range(1, 5)])
  last = np.mean([rows[s]["loss"] for s in range(9, 17)])
  assert last < 0.92 * first, (first, last)
  for q in range(4):
    assert np.isfinite(rows[16][f"loss_t{q}"])


def test_loss_by_quarter_caption_dropout_and_eval(tmp_path):
  """loss_t0..3 average the rows whose timestep falls in each quarter; cond_drop_prob=1
  replaces every caption by the blank one; eval_fn gives the same metric keys."""
  config = tiny_config(tmp_path)
  task = diffusion_task.DiffusionTask(config)

  class Tok:  # word-per-token: "" -> [EOS]
    vocab_size, pad_id, eos_id = 40, 0, 1

    def tokenize(self, texts):
      return [[2 + len(w) for w in t.split()] + [1] for t in texts]

    def encode(self, texts, max_len):
      ids = np.zeros((len(texts), max_len), np.int32)
      for i, seq in enumerate(self.tokenize(texts)):
        ids[i, :len(seq)] = seq[:max_len]
      return ids, ids != 0

  task._tokenizer = Tok()
  ids, mask = task.tokenize(["a red circle", "a blue square on green"])
  cond = {"text_ids": jnp.asarray(ids), "text_mask": jnp.asarray(mask)}
  dropped = task.drop_cond(cond, jax.random.PRNGKey(0), 1.0)
  np.testing.assert_array_equal(dropped["text_ids"], [[1] + [0] * 11] * 2)
  np.testing.assert_array_equal(task.drop_cond(cond, jax.random.PRNGKey(0), 0.0)["text_ids"], ids)
  batch = task.dummy_batch(8)
  batch["image"] = np.random.RandomState(0).uniform(-1, 1, batch["image"].shape).astype(np.float32)
  batch["text_ids"], batch["text_mask"] = np.repeat(ids, 4, 0), np.repeat(mask, 4, 0)
  variables = parallel.unbox(task.init(jax.random.PRNGKey(0), batch))  # eager: no compile
  rng = jax.random.PRNGKey(3)
  loss, (metrics, _) = jax.jit(task.loss_fn, static_argnums=4)(variables["params"], {}, batch, rng, 0)
  # recompute the per-row losses with the same rng split as the task and bin them by hand
  _, k_loss, _ = jax.random.split(rng, 3)
  t_b = jax.random.randint(jax.random.split(k_loss)[0], (8,), 0, 100, jnp.int32)
  quarter = np.asarray(t_b) // 25
  assert float(loss) > 0
  present = [q for q in range(4) if (quarter == q).any()]
  weights = np.bincount(quarter, minlength=4) / 8
  np.testing.assert_allclose(sum(weights[q] * float(metrics[f"loss_t{q}"]) for q in present),
                             float(loss), rtol=1e-5)
  for q in set(range(4)) - set(present):
    assert float(metrics[f"loss_t{q}"]) == 0.0
  ev = jax.eval_shape(task.eval_fn, variables["params"], {}, batch, rng)
  assert set(ev) == {"loss", "loss_t0", "loss_t1", "loss_t2", "loss_t3"}


def test_frozen_clip_text_tower(tmp_path):
  """text_encoder.clip: the CLIP tower's token states and embedding condition the U-Net;
  its parameters stay outside the trained tree, and its tokenizer is used."""
  import flax.linen as nn
  from dalle_jax.configs import clip as clip_cfg
  from dalle_jax.data import tokenizers
  from dalle_jax.models import clip as clip_lib
  from dalle_jax.train import checkpoint as ckpt
  captions = [f"a {c} circle on a {b} background" for c in ("red", "blue") for b in ("white", "black")]
  tok = tokenizers.train_sentencepiece(captions * 20, str(tmp_path / "clip" / "sp.model"), 48)
  c = clip_cfg.get_config("shapes")
  c.model.text.vocab_size = c.text.vocab_size = tok.vocab_size
  c.text.path = "sp.model"
  model = clip_lib.build_model(c)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                        *clip_lib.dummy_inputs(c, 1)))
  rng = np.random.RandomState(0)
  clip_vars = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  ckpt.save_imported(str(tmp_path / "clip"), c, clip_vars)

  config = tiny_config(tmp_path)
  config.unlock()
  config.text_encoder.clip = str(tmp_path / "clip")
  task = diffusion_task.DiffusionTask(config)
  assert task.text_len == c.model.text.max_len and task.tokenizer.vocab_size == tok.vocab_size
  ids, mask = task.tokenize(captions[:2])
  cond = task.model_cond({"text_ids": jnp.asarray(ids), "text_mask": jnp.asarray(mask)})
  assert cond["text_states"].shape == (2, c.model.text.max_len, c.model.text.width)
  np.testing.assert_allclose(np.linalg.norm(cond["text_pooled"], axis=-1), 1.0, rtol=1e-5)
  # different captions, different states (the tower really runs)
  assert np.abs(np.asarray(cond["text_states"][0] - cond["text_states"][1])).max() > 1e-4
  abstract = parallel.unbox(jax.eval_shape(task.init, jax.random.PRNGKey(0), task.dummy_batch(2)))
  assert set(abstract["params"]) == {"unet"}  # nothing of CLIP is trained
  assert abstract["params"]["unet"]["embed_text"]["kernel"].shape[0] == c.model.embed_dim
