"""unCLIP's prior: tools.embed --dataset (records of paired CLIP features, parity with
transformers), the `prior` task trained sharded on them, the learning check on held-out
pairs, caption dropout, the presets' sizes against diffusers' PriorTransformer, and the
one-line errors."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from dalle_jax.configs import unclip as unclip_configs
from dalle_jax.data import images as img_lib
from dalle_jax.data import pipeline
from dalle_jax.data import records
from dalle_jax.models import prior as prior_lib
from dalle_jax.sampling import unclip as unclip_sampling
from dalle_jax.tasks import base
from dalle_jax.tasks import prior as prior_task

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

OPENAI_MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], np.float32)  # CLIPImageProcessor's
OPENAI_STD = np.asarray([0.26862954, 0.26130258, 0.27577711], np.float32)
DATASET = "shapes/32px_800"  # 800 train / 40 held-out test pairs
STEPS = 600


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
  """(tiny random HF CLIP dir, its torch model, records dir of the shapes pairs)."""
  from tests.test_clip_convert import write_tiny_hf_clip
  from dalle_jax.tools import embed
  root = tmp_path_factory.mktemp("prior")
  hf = str(root / "hf_clip")
  model, _ = write_tiny_hf_clip(hf)
  out = str(root / "shapes_clip")
  embed.main(["--clip", hf, "--dataset", DATASET, "--data_dir", str(root / "data"),
              "--out", out, "--batch_size", "256"])
  return hf, model, out, str(root / "data")


def _cos(a, b):
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return np.sum(a * b, -1)


def test_embed_dataset_records_match_transformers(embedded):
  hf, model, out, data_dir = embedded
  with open(os.path.join(out, records.INDEX_FILE)) as f:
    index = json.load(f)
  assert {k: v["num_examples"] for k, v in index["splits"].items()} == {
      "train": 800, "test": 40, "empty_caption": 1}
  src = records.RecordsSource(out, "test")
  rows = src.__getitems__(range(3))
  tok = transformers.AutoTokenizer.from_pretrained(hf)
  captions = [r["caption"] for r in rows] + [""]
  enc = tok(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
  with torch.no_grad():
    text = model.text_model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    text_embeds = model.text_projection(text.pooler_output).numpy()
  empty = records.RecordsSource(out, "empty_caption")[0]
  for i, r in enumerate(rows + [empty]):
    m = r["text_mask"]
    np.testing.assert_array_equal(m, enc.attention_mask[i].numpy().astype(bool))
    # the states the prior reads (the final LayerNorm's output) at the caption's tokens
    np.testing.assert_allclose(r["text_states"][m], text.last_hidden_state[i].numpy()[m],
                               atol=1e-4)
    np.testing.assert_allclose(r["text_embed"], text_embeds[i], atol=1e-4)  # unnormalised
  # the image embedding is CLIP's raw projection of the (resized) image
  ex = pipeline.load_source({"dataset": DATASET, "data_dir": data_dir}, "test")[0]
  assert ex["caption"] == rows[0]["caption"]
  img = img_lib.resize_and_crop(img_lib.decode(ex["image"]), 32).astype(np.float32) / 255.0
  px = (img - OPENAI_MEAN) / OPENAI_STD
  with torch.no_grad():
    want = model.get_image_features(pixel_values=torch.from_numpy(
        px.transpose(2, 0, 1)[None].astype(np.float32)))
  want = getattr(want, "pooler_output", want).numpy()[0]
  np.testing.assert_allclose(rows[0]["image_embed"], want, atol=1e-4)
  assert abs(np.linalg.norm(want) - 1) > 1e-3  # raw, not unit norm
  e = np.stack([r["image_embed"] for r in records.RecordsSource(out, "train").__getitems__(
      range(800))]).astype(np.float64)
  np.testing.assert_allclose(index["meta"]["image_embed_mean"], e.mean(0), atol=1e-5)
  np.testing.assert_allclose(index["meta"]["image_embed_std"], e.std(0), atol=1e-5)


def _config(records_dir, workdir_steps=300):
  c = unclip_configs.get_config("shapes")
  c.data.dataset = records_dir
  c.model.embed_dim, c.model.text_dim, c.model.text_len = 24, 32, 16  # the tiny HF CLIP
  c.model.num_layers, c.model.num_heads, c.model.head_dim = 2, 4, 16
  c.batch_size = 32
  c.total_steps = workdir_steps
  c.log_every = 100
  c.eval_every = 0
  c.checkpoint_every = workdir_steps
  c.async_checkpoints = False
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 20
  return c


def _fit(loss_fn, params, opt_cfg, steps, batches):
  """Adam(W) on loss_fn(params, batch, rng, i) -> (loss, aux), jitted on one device."""
  from dalle_jax.train import optimizers
  tx = optimizers.make_optimizer({"model": opt_cfg}, None, steps)[0]
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch, i):
    (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch,
                                                             jax.random.PRNGKey(i), i)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss
  losses = []
  for i in range(steps):
    params, opt, loss = step(params, opt, batches(i), i)
    losses.append(float(loss))
  return params, losses


def _trained_clip(hf, data_dir, out, steps=300):
  """The tiny HF CLIP trained contrastively on the shapes pairs (the prior needs a CLIP whose
  image embeddings follow the captions: a random one's are one direction plus noise)."""
  from dalle_jax.configs import common
  from dalle_jax.sampling.clip_encoder import ClipEncoder
  from dalle_jax.tasks import clip as clip_task
  from dalle_jax.train import checkpoint
  enc = ClipEncoder.load(hf)
  src = pipeline.load_source({"dataset": DATASET, "data_dir": data_dir}, "train")
  rows = src.__getitems__(range(len(src)))
  images = enc.prepare_images(np.stack([img_lib.resize_and_crop(img_lib.decode(r["image"]), 32)
                                        for r in rows]))
  ids, mask = enc.tokenizer.encode([r["caption"] for r in rows], enc.max_len)
  model = enc.model

  def loss_fn(params, batch, rng, i):
    o = model.apply({"params": params}, *batch)
    return clip_task.contrastive_loss(o["image"], o["text"], o["logit_scale"], o["logit_bias"],
                                      mesh=None)
  order = np.random.default_rng(0).permutation(len(rows))
  batches = lambda i: tuple(a[np.take(order, range(i * 64, i * 64 + 64), mode="wrap")]
                            for a in (images, ids, mask))
  opt = common.optimizer_config("adamw", lr=3e-3)
  opt.warmup_steps = 20
  params, losses = _fit(loss_fn, jax.device_get(enc.variables["params"]), opt, steps, batches)
  assert losses[-1] < 0.5 * losses[0], losses[::50]
  checkpoint.save_imported(out, enc.config, {"params": params})
  return out


def test_prior_learns_on_held_out_pairs(embedded, tmp_path):
  """With a (quickly trained) CLIP's embeddings of the shapes pairs, the prior's sampled image
  embeddings for the held-out pairs' captions are closer (cosine) to the true image
  embeddings than the captions' text embeddings and than the mean training image embedding."""
  from dalle_jax.tools import embed
  hf, _, _, data_dir = embedded
  clip = _trained_clip(hf, data_dir, str(tmp_path / "clip"))
  out = str(tmp_path / "shapes_clip")
  embed.main(["--clip", clip, "--dataset", DATASET, "--data_dir", data_dir, "--out", out])
  task = base.get_task(_config(out))
  train = records.RecordsSource(out, "train").__getitems__(range(800))
  arrays = {k: np.stack([r[k] for r in train]) for k in prior_task.FEATURES}
  variables = jax.tree.map(np.asarray, nn.unbox(task.init(jax.random.PRNGKey(0),
                                                          task.dummy_batch(1))))
  params = variables.pop("params")
  order = np.random.default_rng(0).permutation(800)
  batches = lambda i: {k: a[np.take(order, range(i * 32, i * 32 + 32), mode="wrap")]
                       for k, a in arrays.items()}
  params, losses = _fit(lambda p, b, r, i: task.loss_fn(p, variables, b, r, i), params,
                        task.config.optimizer, STEPS, batches)
  # x0 is unit-variance per dimension: predicting the mean (0) scores an MSE of 1
  assert np.mean(losses[-50:]) < 0.5, losses[::50]
  variables = {"params": params, **variables}
  meta = records.read_index(out)["meta"]
  model, sched = task.model, task.sched
  rows = records.RecordsSource(out, "test").__getitems__(range(40))
  empty = records.RecordsSource(out, "empty_caption")[0]
  stack = lambda k: np.stack([r[k] for r in rows])
  cond = {"embed": stack("text_embed"), "states": stack("text_states"), "mask": stack("text_mask")}
  uncond = {"embed": np.repeat(empty["text_embed"][None], 40, 0),
            "states": np.repeat(empty["text_states"][None], 40, 0),
            "mask": np.repeat(empty["text_mask"][None], 40, 0)}
  true = stack("image_embed")
  fn = jax.jit(unclip_sampling.prior_sampler(model, sched, steps=25, guidance_scale=1.0))
  pred = np.asarray(fn(variables, cond, uncond, np.asarray(
      jax.random.normal(jax.random.PRNGKey(0), true.shape)), jax.random.PRNGKey(1)))
  prior_cos = _cos(pred, true).mean()
  text_cos = _cos(cond["embed"], true).mean()
  mean_cos = _cos(np.asarray(meta["image_embed_mean"])[None], true).mean()
  print(f"\nheld-out cosine to the true image embedding: prior {prior_cos:.4f}, caption's "
        f"text embedding {text_cos:.4f}, mean image embedding {mean_cos:.4f}")
  assert prior_cos > text_cos and prior_cos > mean_cos


def test_caption_dropout_swaps_in_the_empty_caption(embedded):
  _, _, out, _ = embedded
  config = _config(out)
  config.diffusion.cond_drop_prob = 0.5
  task = base.get_task(config)
  assert isinstance(task, prior_task.PriorTask)
  batch = {k: np.stack([r[k] for r in records.RecordsSource(out, "train").__getitems__(
      range(64))]) for k in prior_task.FEATURES}
  cap = jax.jit(lambda b, r: task._caption(b, r, train=True))(batch, jax.random.PRNGKey(0))
  empty = task.data()["empty"]
  dropped = np.all(np.asarray(cap["text_embed"]) == empty["text_embed"], axis=1)
  kept = np.all(np.asarray(cap["text_embed"]) == batch["text_embed"], axis=1)
  assert np.all(dropped | kept) and 16 < dropped.sum() < 48
  for k in ("text_states", "text_mask"):  # whole rows swap together
    np.testing.assert_array_equal(np.asarray(cap[k])[dropped],
                                  np.broadcast_to(empty[k], cap[k][dropped].shape))
    np.testing.assert_array_equal(np.asarray(cap[k])[kept], batch[k][kept])
  same = task._caption(batch, jax.random.PRNGKey(0), train=False)
  assert all(same[k] is batch[k] for k in same)


def test_records_that_do_not_fit_the_prior_are_named(embedded, tmp_path):
  _, _, out, _ = embedded
  config = _config(out)
  config.model.embed_dim = 64
  with pytest.raises(ValueError, match=r"config.model.embed_dim=64 .* give 24"):
    base.get_task(config).make_iterator("train", 8)
  config = _config(str(tmp_path / "nothing"))
  with pytest.raises(ValueError, match="not a records directory of CLIP embeddings"):
    base.get_task(config).make_iterator("train", 8)


@pytest.mark.parametrize("preset,ref_kw", [
    ("karlo", {}),  # diffusers' defaults are Karlo's prior
    ("unclip", dict(embedding_dim=1024, num_layers=24)),
])
def test_presets_have_the_reference_sizes(preset, ref_kw):
  """The unclip / karlo presets' parameter counts (abstract init) equal diffusers'
  PriorTransformer at those dimensions (built on the meta device), clip statistics aside."""
  config = unclip_configs.get_config(preset)
  task = base.get_task(config)
  abstract = jax.eval_shape(lambda: task.model.init(jax.random.PRNGKey(0),
                                                    *prior_lib.example_inputs(task.model)))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
  with torch.device("meta"):
    ref = diffusers.PriorTransformer(**ref_kw)
  want = sum(int(np.prod(v.shape)) for k, v in ref.state_dict().items()
             if not k.startswith("clip_") and k != "causal_attention_mask")
  assert n == want, (n, want)
  assert (1.0e9 < n < 1.1e9) if preset == "karlo" else (1.2e9 < n < 1.4e9), n


def test_prior_trains_sharded_in_the_trainer(embedded, tmp_path):
  """train.py's loop over the 8 devices: the checkpoint carries the records' clip_stats."""
  from dalle_jax.train import checkpoint
  from dalle_jax.train import loop
  _, _, out, _ = embedded
  config = _config(out)
  config.total_steps = config.checkpoint_every = 4
  config.log_every = 2
  loop.train(config, str(tmp_path / "prior"))
  _, variables = checkpoint.load_model(str(tmp_path / "prior"))
  meta = records.read_index(out)["meta"]
  np.testing.assert_allclose(variables["clip_stats"]["mean"], meta["image_embed_mean"], rtol=1e-6)
  np.testing.assert_allclose(variables["clip_stats"]["std"], meta["image_embed_std"], rtol=1e-6)
  with open(tmp_path / "prior" / "metrics.jsonl") as f:
    rows = [json.loads(l) for l in f]
  assert [r["step"] for r in rows if "loss" in r] == [2, 4]
  assert all(np.isfinite(r["loss"]) and -1 <= r["x0_cosine"] <= 1 for r in rows if "loss" in r)


@pytest.mark.slow
def test_prior_trains_on_a_data_fsdp_tensor_mesh_and_resumes_exactly(embedded, tmp_path):
  """The prior over 8 devices as 2 (data) x 2 (fsdp) x 2 (tensor): its weights are split, and
  a run stopped after 3 steps and resumed logs the uninterrupted run's losses."""
  from tests.test_diffusion_task import trains_and_resumes
  _, _, out, _ = embedded
  config = _config(out, workdir_steps=6)
  config.checkpoint_every = 3
  config.log_every = 1
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  state, rows, _ = trains_and_resumes(config, tmp_path, split=3)
  assert sorted(rows) == list(range(1, 7))
  split_over = {len(x.sharding.device_set) for x in jax.tree.leaves(state.params)}
  assert 8 in split_over, split_over
