"""Frozen T5 outside the training step: `tools.encode_dataset --t5` writes a dataset's captions'
T5 states (and the blank caption's) into records, equal to `tools.embed --t5` on the same
captions; the SR stage (configs/imagen.py:shapes_sr32, reduced) trains on them through the
real trainer on 8 fake devices (data x fsdp x tensor), stopped and resumed exactly."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dalle_jax.configs import imagen as imagen_cfg  # noqa: E402
from dalle_jax.data import pipeline  # noqa: E402  pylint: disable=g-import-not-at-top
from dalle_jax.data import records  # noqa: E402  pylint: disable=g-import-not-at-top
from dalle_jax.tools import convert, embed, encode_dataset  # noqa: E402
from dalle_jax.train import loop  # noqa: E402  pylint: disable=g-import-not-at-top
from tests import test_diffusion_task  # noqa: E402  pylint: disable=g-import-not-at-top
from tests import test_t5  # noqa: E402  pylint: disable=g-import-not-at-top

DATASET = "shapes/16px_40"  # 40 train + 16 test captioned images
MAX_LEN = 40  # the longest caption is 35 tokens of the tiny vocabulary: none truncated


@pytest.fixture(scope="module")
def t5_records(tmp_path_factory):
  """(tiny T5 checkpoint from transformers via convert hf_t5, its torch model + tokenizer,
  data_dir, records written by encode_dataset --t5)."""
  root = tmp_path_factory.mktemp("t5rec")
  spiece = test_t5.write_spiece(str(root / "spiece"))
  tok = transformers.T5Tokenizer.from_pretrained(spiece)
  model = test_t5.tiny_hf("t5", "gated-gelu", len(tok))
  src = test_t5.write_layout(str(root / "hf"), "safetensors", model, spiece, tok)
  ckpt = str(root / "t5")
  convert.main(["hf_t5", "--src", src, "--out", ckpt])
  data_dir, out = str(root / "data"), str(root / "records")
  encode_dataset.main(["--t5", ckpt, "--max_len", str(MAX_LEN), "--data_dir", data_dir,
                       "--dataset", DATASET, "--out", out, "--batch_size", "16"])
  return ckpt, model, tok, data_dir, out


def test_records_equal_embed_and_keep_the_examples(t5_records, tmp_path):
  ckpt, model, tok, data_dir, out = t5_records
  source = pipeline.load_source({"dataset": DATASET, "data_dir": data_dir}, "train")
  written = records.RecordsSource(out, "train")
  assert len(written) == len(source) == 40 and len(records.RecordsSource(out, "test")) == 16
  rows = written.__getitems__(range(40))
  originals = source.__getitems__(range(40))
  captions = [r["caption"] for r in rows]
  assert captions == [str(o["caption"]) for o in originals]
  for r, o in zip(rows, originals):  # the image as stored, the scalar labels kept
    np.testing.assert_array_equal(np.asarray(r["image"]), np.asarray(o["image"]))
    assert r["shape"] == o["shape"] and r["color"] == o["color"]
  texts = tmp_path / "captions.txt"
  texts.write_text("\n".join(captions) + "\n")
  npz = str(tmp_path / "h.npz")
  embed.main(["--t5", ckpt, "--texts", str(texts), "--out", npz, "--max_len", str(MAX_LEN),
              "--batch_size", "16"])  # the same batches: the same program, bit for bit
  ref = np.load(npz)
  states = np.stack([r["text_states"] for r in rows])
  mask = np.stack([r["text_mask"] for r in rows])
  assert states.dtype == np.float32 and states.shape == (40, MAX_LEN, 32)
  np.testing.assert_array_equal(mask, ref["mask"])
  np.testing.assert_array_equal(states, ref["hidden_states"])
  # the blank caption (caption dropout / guidance): transformers' T5 on its tokenizer's ids
  empty = records.RecordsSource(out, "empty_caption")[0]
  enc = tok([""], padding="max_length", max_length=MAX_LEN, return_tensors="pt")
  with torch.no_grad():
    want = model(**enc).last_hidden_state.numpy()[0]
  np.testing.assert_array_equal(empty["text_mask"], enc["attention_mask"].numpy()[0].astype(bool))
  assert empty["caption"] == "" and empty["text_mask"].sum() == 1  # EOS alone
  keep = empty["text_mask"]  # the unpadded positions (as in test_t5's parity)
  np.testing.assert_allclose(empty["text_states"][keep], want[keep], atol=1e-4)
  meta = records.read_index(out)["meta"]
  assert (meta["text_len"], meta["text_dim"], meta["t5"]) == (MAX_LEN, 32, os.path.abspath(ckpt))
  # --states_dtype float16: half the bytes, the same states rounded once
  half = str(tmp_path / "f16")
  encode_dataset.main(["--t5", ckpt, "--max_len", str(MAX_LEN), "--data_dir", data_dir,
                       "--dataset", DATASET, "--out", half, "--batch_size", "16",
                       "--states_dtype", "float16"])
  rows16 = records.RecordsSource(half, "train").__getitems__(range(40))
  states16 = np.stack([r["text_states"] for r in rows16])
  assert states16.dtype == np.float16 and records.read_index(half)["meta"]["states_dtype"] == "float16"
  np.testing.assert_array_equal(states16, ref["hidden_states"].astype(np.float16))
  np.testing.assert_array_equal(np.stack([r["text_mask"] for r in rows16]), ref["mask"])
  with pytest.raises(SystemExit, match="--states_dtype 'int8'"):
    encode_dataset.main(["--t5", ckpt, "--data_dir", data_dir, "--dataset", DATASET,
                         "--out", str(tmp_path / "x"), "--states_dtype", "int8"])


def sr_config(ckpt, data_dir, out):
  """configs/imagen.py:shapes_sr32 at 8 -> 16 px with a 2-level U-Net, conditioned on the
  records' T5 states, on a data x fsdp x tensor mesh of the 8 fake devices."""
  c = imagen_cfg.get_config("shapes_sr32")
  c.data.data_dir, c.data.dataset = data_dir, out
  c.data.image_size, c.model.low_res_size = 16, 8
  c.text_encoder.t5 = ckpt
  c.text.max_len = MAX_LEN
  c.model.unet.update(dict(block_channels=(16, 32), attention=("none", "added_kv"),
                           mid_attention="added_kv", attn_head_dim=16, norm_groups=8,
                           context_dim=32))
  c.diffusion.cond_drop_prob = 0.5  # the blank caption's states replace half the rows
  c.batch_size, c.total_steps = 8, 4
  c.log_every, c.eval_every, c.preview_every, c.checkpoint_every = 1, 0, 0, 2
  c.async_checkpoints = False
  c.dtype = "float32"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  return c


# three trainer runs on 8 fake devices (~145 CPU-s); test_cascade trains SR stages in the fast
# suite and the records themselves are checked above
@pytest.mark.slow
def test_sr_stage_trains_on_t5_records_sharded_and_resumes_exactly(t5_records, tmp_path):
  ckpt, _, _, data_dir, out = t5_records
  config = sr_config(ckpt, data_dir, out)
  config.lock()
  full = str(tmp_path / "full")
  state = loop.train(config, full)
  assert set(state.params) == {"unet"}  # T5 is not part of the trained model
  assert len(state.params["unet"]["conv_in"]["kernel"].sharding.device_set) == 8
  rows = test_diffusion_task._losses(full)  # pylint: disable=protected-access
  assert sorted(rows) == [1, 2, 3, 4] and all(np.isfinite(rows[s]["loss"]) for s in rows)
  with open(os.path.join(full, "config.json")) as f:
    assert json.load(f)["text_encoder"]["t5"] == ckpt
  split = str(tmp_path / "split")
  loop.train(config, split, max_steps=2)
  loop.train(config, split)
  resumed = test_diffusion_task._losses(split)  # pylint: disable=protected-access
  np.testing.assert_allclose([resumed[s]["loss"] for s in (3, 4)],
                             [rows[s]["loss"] for s in (3, 4)], rtol=1e-5)


@pytest.mark.parametrize("change,message", [
    (lambda c: c.text.update(max_len=16),
     r"text_states are 40 tokens x 32; set config.text.max_len=40"),
    (lambda c: c.model.unet.update(context_dim=16),
     r"config.model.unet.context_dim=32 \(now 40 and 16\)"),
    (lambda c: c.data.update(dataset=DATASET), r"holds no pre-encoded text_states"),
])
def test_records_checked_before_compiling(t5_records, tmp_path, change, message):
  ckpt, _, _, data_dir, out = t5_records
  config = sr_config(ckpt, data_dir, out)
  change(config)
  with pytest.raises(loop.ConfigError, match=message):
    loop.train(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "config.json")
