"""Fine-tuning (`config.init_from`): a converted min-dalle model trains on shapes codes.

The imported parameters go straight into their shards of a fresh run (fresh
optimizer, step 0): the run's first loss is the imported model's loss on that
batch. Include/exclude patterns pick parameters; a shape mismatch is named.
"""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
min_dalle_models = pytest.importorskip("min_dalle.models")
torch.set_num_threads(1)

import jax  # noqa: E402

from dalle_jax.configs import dalle_mini as cfg_mod  # noqa: E402
from dalle_jax.convert import min_dalle as conv  # noqa: E402
from dalle_jax import parallel  # noqa: E402
from dalle_jax.data import records, shapes  # noqa: E402
from dalle_jax.models import dalle_mini  # noqa: E402
from dalle_jax.tasks.base import get_task  # noqa: E402
from dalle_jax.train import checkpoint as ckpt_lib  # noqa: E402
from dalle_jax.train import loop  # noqa: E402
from dalle_jax.train.optimizers import make_optimizer  # noqa: E402

LAYERS, D, HEADS, GLU, TEXT_VOCAB, TEXT_LEN = 2, 32, 4, 48, 120, 64


def _min_dalle_checkpoint(root):
  """Tiny random min-dalle weights -> dalle_jax.convert's imported checkpoint."""
  torch.manual_seed(0)
  enc = min_dalle_models.DalleBartEncoder(
      layer_count=LAYERS, embed_count=D, attention_head_count=HEADS, text_vocab_count=TEXT_VOCAB,
      text_token_count=TEXT_LEN, glu_embed_count=GLU, device="cpu")
  dec = min_dalle_models.DalleBartDecoder(
      image_vocab_count=16384, embed_count=D, attention_head_count=HEADS, glu_embed_count=GLU,
      layer_count=LAYERS, device="cpu")
  src = root / "models" / "dalle_bart_mini"
  src.mkdir(parents=True)
  torch.save(enc.state_dict(), src / "encoder.pt")
  torch.save(dec.state_dict(), src / "decoder.pt")
  (src / "vocab.json").write_text(json.dumps({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4,
                                              "red": 5, "circle": 6, "on": 7, "blue": 8}))
  (src / "merges.txt").write_text("#version: 0.2\n")

  def small_variant(variant):
    config = cfg_mod.get_config(variant)
    config.model.update(dict(num_layers=LAYERS, d_model=D, num_heads=HEADS, glu_dim=GLU,
                             text_vocab_size=TEXT_VOCAB, text_len=TEXT_LEN))
    config.text.max_len = TEXT_LEN
    return config, dalle_mini.from_config(config.model, dtype="float32")
  real = conv.model_from_variant
  conv.model_from_variant = small_variant
  try:
    conv.convert(str(root / "models"), "mini", str(root / "imported"), with_vqgan=False)
  finally:
    conv.model_from_variant = real
  return root / "imported"


def _shapes_codes(out_dir, n=24):
  """The shapes dataset as 16x16 code grids: each 2x2 pixel block's colour,
  quantised to 4 levels per channel (a stand-in tokenizer with DALL·E mini's
  grid and vocabulary)."""
  def example(i, split):
    ex = shapes.make_example(i, split, 32)
    blocks = np.asarray(ex["image"], np.int32).reshape(16, 2, 16, 2, 3).mean((1, 3)) // 64
    codes = (blocks[..., 0] * 16 + blocks[..., 1] * 4 + blocks[..., 2]).astype(np.int32)
    return {"caption": ex["caption"], "codes": codes}
  for split, count in (("train", n), ("test", 8)):
    records.write_records(str(out_dir), split, [example(i, split) for i in range(count)],
                          meta={"grid": [16, 16], "image_vocab_size": 16384})
  return out_dir


def _config(imported, data, **kw):
  c = cfg_mod.get_config("mini")
  c.model.update(dict(num_layers=LAYERS, d_model=D, num_heads=HEADS, glu_dim=GLU,
                      text_vocab_size=TEXT_VOCAB, text_len=TEXT_LEN))
  c.text.max_len = TEXT_LEN
  c.text.path = str(imported / "tokenizer")
  c.data.dataset = str(data)
  c.mesh.data, c.mesh.fsdp = 2, -1  # parameters split 4 ways
  c.batch_size, c.total_steps, c.log_every = 8, 3, 1
  c.eval_every = c.preview_every = 0
  c.blank_caption_prob = 0.0
  c.init_from = str(imported)
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("finetune")
  return _min_dalle_checkpoint(root), _shapes_codes(root / "codes")


def test_finetune_starts_at_the_imported_models_loss(setup, tmp_path):
  imported, data = setup
  config = _config(imported, data)
  state = loop.train(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    losses = {r["step"]: r["loss"] for r in map(json.loads, f)}

  # The imported model (loaded on its own, one device) on the run's first batch.
  task = get_task(config)
  _, variables = ckpt_lib.load_model(str(imported))
  batch = next(task.make_iterator(config.data.train_split, config.batch_size,
                                  shuffle=config.data.shuffle))
  batch = {k: v for k, v in batch.items() if k in ("text", "text_mask", "codes")}
  want = jax.jit(task.eval_fn)(variables["params"], {}, batch, jax.random.PRNGKey(0))["loss"]
  np.testing.assert_allclose(losses[1], float(want), rtol=1e-5)
  kernel = state.params["lm_head"]["kernel"]
  assert len(kernel.sharding.device_set) == 8 and kernel.addressable_shards[0].data.size < kernel.size
  assert not np.array_equal(np.asarray(kernel), variables["params"]["lm_head"]["kernel"])  # trained


def test_include_exclude_and_shape_mismatch(setup, tmp_path):
  imported, data = setup
  _, variables = ckpt_lib.load_model(str(imported))
  config = _config(imported, data)
  task = get_task(config)
  mesh = parallel.make_mesh(config.mesh)
  tx, _ = make_optimizer(task.optimizer_groups(), task.param_labels, config.total_steps)
  abstract, _ = loop.abstract_state(task, tx, task.config, mesh, task.dummy_batch(config.batch_size))
  # What the trainer loads before its fresh init fills the rest (nothing compiles here).
  loaded = ckpt_lib.load_params(str(imported), abstract.params, include="^(enc|dec)_",
                                exclude="embed")
  flat = lambda t: {ckpt_lib._keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  got, imp = flat(loaded), flat(variables["params"])
  assert set(got) == set(imp)
  picked = [k for k in got if k.startswith(("enc_", "dec_")) and "embed" not in k]
  assert picked and len(picked) < len(got)
  for k, x in got.items():
    if k in picked:
      assert x.sharding == flat(abstract.params)[k].sharding, k
      np.testing.assert_array_equal(np.asarray(x), imp[k], err_msg=k)
    else:
      assert isinstance(x, jax.ShapeDtypeStruct), k  # left to the fresh init

  bad = _config(imported, data)
  bad.model.glu_dim = 64  # named before the fresh model is compiled
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"glu.*\(32, 48\).*\(32, 64\)"):
    loop.train(bad, str(tmp_path / "bad"), max_steps=0)
  assert not os.path.exists(tmp_path / "bad" / "config.json")


def _abstract_params(config):
  task = get_task(config)
  mesh = parallel.make_mesh(config.mesh)
  tx, _ = make_optimizer(task.optimizer_groups(), task.param_labels, config.total_steps)
  abstract, _ = loop.abstract_state(task, tx, task.config, mesh, task.dummy_batch(config.batch_size))
  return task, abstract.params, mesh


def test_init_from_across_scanned_and_per_layer_layouts(setup, tmp_path):
  """What the trainer loads (loop._init_from) when the checkpoint's layer Stacks have
  the other layout: the per-layer import into a scan_layers=True model (each
  layer's arrays stacked on the leading axis) and a scanned checkpoint into a
  per-layer model, each straight into the run's shards; include/exclude match the
  run's own names."""
  imported, data = setup
  _, variables = ckpt_lib.load_model(str(imported))
  flat = lambda t: {ckpt_lib._keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  imp = flat(variables["params"])
  assert any("/layer_1/" in k for k in imp)  # the converter writes per-layer Stacks

  scanned = _config(imported, data, scan_layers=True)
  _, target_s, mesh_s = _abstract_params(scanned)
  tree_s = loop._init_from(scanned, target_s, mesh_s)
  loaded_s, shardings_s = flat(tree_s), flat(target_s)
  assert set(loaded_s) == set(shardings_s) and any("/layers/" in k for k in loaded_s)
  for k, x in loaded_s.items():
    assert x.sharding == shardings_s[k].sharding, k
    if "/layers/" in k:
      for i in range(LAYERS):
        np.testing.assert_array_equal(np.asarray(x)[i], imp[k.replace("/layers/", f"/layer_{i}/")])
    else:
      np.testing.assert_array_equal(np.asarray(x), imp[k], err_msg=k)

  ckpt_lib.save_imported(str(tmp_path / "scanned_ckpt"), scanned,
                         {"params": jax.tree.map(np.asarray, tree_s)})
  per_layer = _config(tmp_path / "scanned_ckpt", data, init_from_exclude="layer_1/")
  _, target, mesh = _abstract_params(per_layer)
  got, want_shardings = flat(loop._init_from(per_layer, target, mesh)), flat(target)
  assert set(got) == set(imp)
  for k, x in got.items():
    if "layer_1/" in k:
      assert isinstance(x, jax.ShapeDtypeStruct), k  # excluded: left to the fresh init
    else:
      assert x.sharding == want_shardings[k].sharding, k
      np.testing.assert_array_equal(np.asarray(x), imp[k], err_msg=k)
  nothing = _config(tmp_path / "scanned_ckpt", data, init_from_include="no_such_parameter")
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="no model parameter matches"):
    loop._init_from(nothing, target, mesh)
