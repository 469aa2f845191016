"""train.py on two processes (4 CPU devices each, one JAX cluster on loopback) with
the `paper` DALL·E layout at tiny dims: scanned sparse row/column/conv layers, remat,
2-D FSDP rules, parameters split over both processes. It trains, checkpoints and
writes a preview (decoded through a VQGAN on the training mesh) from process 0.
(One process on 8 devices: test_dalle_sample.test_scanned_sparse_dalle_trains_...)"""
import json
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from dalle_jax.configs import vqgan as vqgan_cfg
from dalle_jax.data import records, tokenizers
from dalle_jax.tasks import vqgan as vq_task
from dalle_jax.train import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue")
            for s in ("circle", "square") for b in ("white", "black")]


def _inputs(root):
  """A random-weight VQGAN (32 px -> 8x8 of 128 codes), a SentencePiece model and
  records of random codes naming that VQGAN, as tools.encode_dataset writes them."""
  vq_config = vqgan_cfg.get_config("shapes")
  vq_config.loss.disc_weight = 0.0
  vq = vq_task.VQGANTask(vq_config)
  shapes = nn.meta.unbox(jax.eval_shape(vq.init, jax.random.PRNGKey(0), vq.dummy_batch(1)))
  rng = np.random.RandomState(0)
  vq_vars = jax.tree_util.tree_map_with_path(
      lambda p, s: (np.ones(s.shape, s.dtype) if "scale" in jax.tree_util.keystr(p) else
                    (0.05 * rng.standard_normal(s.shape)).astype(s.dtype)), shapes)
  ckpt_lib.save_imported(str(root / "vqgan"), vq_config, vq_vars)
  tokenizers.train_sentencepiece(CAPTIONS * 20, str(root / "sp.model"), 64)
  meta = {"vqgan": str(root / "vqgan"), "grid": [8, 8], "n_embed": 128}
  for split, count in (("train", 32), ("test", 16)):
    examples = [{"codes": rng.randint(0, 128, (8, 8)).astype(np.int32),
                 "caption": CAPTIONS[i % len(CAPTIONS)]} for i in range(count)]
    records.write_records(str(root / "codes"), split, examples, meta=meta)


@pytest.mark.slow
def test_scanned_sparse_paper_dalle_trains_previews_and_samples_on_two_processes(tmp_path):
  _inputs(tmp_path)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workdir = tmp_path / "run"
  overrides = dict(
      model__text_vocab_size=0, model__text_len=8, model__image_vocab_size=128,
      model__image_grid=8, model__num_layers=5, model__d_model=32, model__num_heads=4,
      model__mlp_dim=64, text__tokenizer="sentencepiece", text__path=tmp_path / "sp.model",
      text__max_len=8, text__vocab_size=64, data__dataset=tmp_path / "codes",
      data__data_dir=tmp_path, dtype="float32", batch_size=8, total_steps=4, log_every=2,
      checkpoint_every=4, eval_every=0, preview_every=4, sampling__num_prompts=2,
      sampling__samples_per_prompt=2, mesh__data=2, mesh__fsdp=-1,
      allow_replication_below=1 << 30)  # tiny dims: most weights do not divide 8 ways
  args = [f"--config.{k.replace('__', '.')}={v}" for k, v in overrides.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
             DALLE_JAX_CACHE_DIR="")
  procs = [subprocess.Popen(
      [sys.executable, "train.py", "--config", "configs/dalle.py:paper", "--workdir", str(workdir),
       *args, "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
       "--process_id", str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT) for i in range(2)]
  outs = [p.communicate(timeout=900)[0].decode() for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]

  config = json.loads((workdir / "config.json").read_text())
  assert config["scan_layers"] and config["model"]["attention"] == "sparse"
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
  assert sorted(losses) == [2, 4] and all(np.isfinite(v) for v in losses.values())
  assert (workdir / "checkpoints" / "4").is_dir()
  previews = sorted((workdir / "previews").rglob("*.png"))
  assert previews, outs[0][-3000:]
  grid = np.asarray(Image.open(previews[-1]))  # 2 prompts x (truth + 2 samples) of 32 px
  assert grid.shape[0] > 2 * 32 and grid.shape[1] > 3 * 32

  # sample.py --workdir on the same two processes (each restores its shards of the scanned
  # weights) writes, from process 0 alone, the images one process over 8 devices writes
  sample = [sys.executable, "sample.py", "--workdir", str(workdir), "--prompt", CAPTIONS[0],
            "--num_images", "2", "--top_k", "1", "--mesh", "2,4,1", "--seed", "0"]
  one = subprocess.run(
      sample + ["--out", str(tmp_path / "one.png")], cwd=ROOT, capture_output=True, text=True,
      env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8"), timeout=900)
  assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      sample + ["--out", str(tmp_path / "two.png"), "--coordinator_address", f"127.0.0.1:{port}",
                "--num_processes", "2", "--process_id", str(i)], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  outs = [p.communicate(timeout=900)[0].decode() for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "two.png")),
                                np.asarray(Image.open(tmp_path / "one.png")))
