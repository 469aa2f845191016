"""sample.py end to end on a tiny imported checkpoint + tiny VQGAN (random weights)."""
import json
import logging
import os

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
from PIL import Image

from dalle_jax.configs import dalle as dalle_cfg
from dalle_jax.configs import vqgan as vqgan_cfg
from dalle_jax.models import dalle
from dalle_jax.sampling import generate

CAPTIONS = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue")
            for s in ("circle", "square") for b in ("white", "black")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  from dalle_jax.data import tokenizers
  from dalle_jax.tasks import vqgan as vq_task
  from dalle_jax.train import checkpoint as ckpt
  root = tmp_path_factory.mktemp("sample")
  # tiny VQGAN (shapes preset layout: 32px -> 8x8 codes, 128 codes)
  vq_config = vqgan_cfg.get_config("shapes")
  vq_config.loss.disc_weight = 0.0
  vq = vq_task.VQGANTask(vq_config)
  # abstract init + numpy fill: compiling the VQGAN's init costs more than this whole test
  shapes = nn.meta.unbox(jax.eval_shape(vq.init, jax.random.PRNGKey(0), vq.dummy_batch(1)))
  rng = np.random.RandomState(0)
  vq_vars = jax.tree_util.tree_map_with_path(
      lambda p, s: (np.ones(s.shape, s.dtype) if "scale" in jax.tree_util.keystr(p) else
                    (0.05 * rng.standard_normal(s.shape)).astype(s.dtype)), shapes)
  ckpt.save_imported(str(root / "vqgan"), vq_config, vq_vars)
  # tiny DALL·E over those codes with a SentencePiece tokenizer trained on a few captions
  tok = tokenizers.train_sentencepiece(CAPTIONS * 20, str(root / "ar" / "sp.model"), 64)
  config = dalle_cfg.get_config("shapes")
  config.model.update(dict(text_vocab_size=tok.vocab_size, text_len=8, num_layers=2,
                           d_model=32, num_heads=4, mlp_dim=64))
  config.text.max_len = 8
  config.text.path = "sp.model"
  # f32: greedy codes from near-flat random logits must not hinge on bf16 rounding
  # (sharded vs one-device sampling sums in different orders)
  config.dtype = "float32"
  config.vqgan = str(root / "vqgan")
  model = dalle.from_config(config.model, dtype="float32")
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32),
                               jnp.zeros((1, 64), jnp.int32))
  ckpt.save_imported(str(root / "ar"), config, nn.meta.unbox(params))
  return root


def _fake_model_dir(path, config):
  """A directory that passes the path checks (config.json + variables/) without weights."""
  os.makedirs(path / "variables", exist_ok=True)
  (path / "config.json").write_text(json.dumps(config))
  return str(path)


def test_sample_cli_writes_grid_and_images(checkpoint, tmp_path, caplog):
  out = tmp_path / "grid.png"
  long_prompt = " ".join(["red circle"] * 10)
  with caplog.at_level(logging.WARNING):
    generate.sample_main(["--checkpoint", str(checkpoint / "ar"), "--prompt", CAPTIONS[0],
                          "--prompt", long_prompt, "--num_images", "3", "--seed", "1",
                          "--top_k", "20", "--guidance_scale", "2", "--out", str(out)])
  assert any("truncated" in r.getMessage() for r in caplog.records)
  grid = np.asarray(Image.open(out))
  assert grid.shape[0] > 64 and grid.shape[1] > 3 * 32
  meta = json.loads((tmp_path / "grid" / "samples.json").read_text())
  assert len(meta["images"]) == 6 and meta["images"][0]["prompt"] == CAPTIONS[0]
  img = np.asarray(Image.open(tmp_path / "grid" / meta["images"][0]["file"]))
  assert img.shape == (32, 32, 3)


def test_sample_is_deterministic_and_rejects_empty_prompt(checkpoint):
  pipe = generate.Pipeline.load(str(checkpoint / "ar"))
  sp = generate.SamplingParams(top_k=10, guidance_scale=3.0)
  a = pipe.generate_codes([CAPTIONS[1]], 2, seed=5, sp=sp)
  assert a.shape == (1, 2, 64) and a.max() < 128
  np.testing.assert_array_equal(a, pipe.generate_codes([CAPTIONS[1]], 2, seed=5, sp=sp))
  with pytest.raises(generate.PromptError, match="empty"):
    pipe.generate_codes(["  "], 1, sp=sp)
  assert pipe.generate_codes([""], 1, sp=sp, unconditional=True).shape == (1, 1, 64)
  with pytest.raises(SystemExit, match="prompt"):
    generate.sample_main(["--checkpoint", str(checkpoint / "ar"), "--out", "x.png"])


def test_task_preview_samples_from_eval_batch(checkpoint):
  from dalle_jax.tasks import dalle as dalle_task
  from dalle_jax.train import checkpoint as ckpt
  config, variables = ckpt.load_model(str(checkpoint / "ar"))
  config = dalle_cfg.get_config("shapes")
  config.model.update(dict(text_vocab_size=variables["params"]["text_embed"]["embedding"].shape[0] - 8,
                           text_len=8, num_layers=2, d_model=32, num_heads=4, mlp_dim=64))
  config.text.max_len = 8
  config.text.path = str(checkpoint / "ar" / "sp.model")
  config.vqgan = str(checkpoint / "vqgan")
  config.data.dataset = "/nonexistent"
  config.sampling.num_prompts, config.sampling.samples_per_prompt = 2, 2
  task = dalle_task.TASK(config)
  batch = task.dummy_batch(3)
  batch["text"], batch["text_mask"] = task.tokenizer.encode(CAPTIONS[:3], 8)
  out = task.preview(variables["params"], {}, batch, jax.random.PRNGKey(0))
  grid = out["samples"]
  assert grid.dtype == np.uint8 and grid.shape[0] > 2 * 32 and grid.shape[1] > 3 * 32


def test_sample_cli_rerank_keeps_top(checkpoint, tmp_path, monkeypatch):
  from dalle_jax.sampling import rerank as rerank_lib
  calls = {}

  def fake_rerank(clip, prompts, groups, top_k):
    calls.update(clip=clip, n=[len(g) for g in groups], top_k=top_k)
    return [g[:top_k] for g in groups], [np.arange(top_k, 0, -1.0) for _ in groups]
  monkeypatch.setattr(rerank_lib, "rerank", fake_rerank)
  out = tmp_path / "r.png"
  clip_dir = _fake_model_dir(tmp_path / "clip", {"family": "clip"})  # checked, never loaded here
  # same shapes and settings as the first CLI test: reuses its compiled loops
  generate.sample_main(["--checkpoint", str(checkpoint / "ar"), "--prompt", CAPTIONS[2],
                        "--prompt", CAPTIONS[3], "--num_images", "3", "--seed", "1", "--top_k", "20", "--guidance_scale", "2",
                        "--rerank_with", clip_dir, "--rerank_top", "2", "--out", str(out)])
  assert calls == {"clip": clip_dir, "n": [3, 3], "top_k": 2}
  meta = json.loads((tmp_path / "r" / "samples.json").read_text())
  assert [r["clip_score"] for r in meta["images"]] == [2.0, 1.0, 2.0, 1.0]


def test_sample_cli_sharded_mesh_matches_one_device(checkpoint, tmp_path):
  """--mesh 2,2,2 (8 fake devices) writes the same greedy images as one device."""
  args = ["--checkpoint", str(checkpoint / "ar"), "--prompt", CAPTIONS[0], "--num_images", "2",
          "--top_k", "1", "--guidance_scale", "2"]
  generate.sample_main(args + ["--out", str(tmp_path / "one.png")])
  generate.sample_main(args + ["--mesh", "2,2,2", "--out", str(tmp_path / "mesh.png")])
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "mesh.png")),
                                np.asarray(Image.open(tmp_path / "one.png")))
  # Pipeline.load(mesh=) reads each parameter straight into its shards
  mesh = generate.mesh_from_flag("2,2,2")
  pipe = generate.Pipeline.load(str(checkpoint / "ar"), mesh=mesh)
  one = generate.Pipeline.load(str(checkpoint / "ar"))
  head = pipe.params["image_head"]["kernel"]
  assert len(head.sharding.device_set) == 8 and head.addressable_shards[0].data.size < head.size
  np.testing.assert_array_equal(np.asarray(head), np.asarray(one.params["image_head"]["kernel"]))
  with pytest.raises(SystemExit, match="DATA,FSDP,TENSOR"):
    generate.sample_main(args + ["--mesh", "2,4", "--out", str(tmp_path / "bad.png")])


def test_sample_cli_two_processes_match_one(checkpoint, tmp_path):
  """sample.py --mesh 2,2,2 as two processes of 4 CPU devices (one JAX cluster on
  loopback): each restores only its parameter shards, the codes are gathered, and
  process 0 writes the same images as one process over 8 devices."""
  import socket
  import subprocess
  import sys
  args = ["--checkpoint", str(checkpoint / "ar"), "--prompt", CAPTIONS[4], "--num_images", "2",
          "--top_k", "1", "--guidance_scale", "2", "--mesh", "2,2,2"]
  generate.sample_main(args + ["--out", str(tmp_path / "one.png")])
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen(
      [sys.executable, "sample.py", *args, "--out", str(tmp_path / "two.png"),
       "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
       "--process_id", str(i)], cwd=root, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT) for i in range(2)]
  outs = [p.communicate(timeout=600)[0].decode() for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "two.png")),
                                np.asarray(Image.open(tmp_path / "one.png")))
  assert "wrote" in outs[0] and "wrote" not in outs[1]  # process 0 alone writes


def test_sample_cli_reuses_persistent_compilation_cache(checkpoint, tmp_path):
  """sample.py keeps its compiled programs in DALLE_JAX_CACHE_DIR: a second run
  reads the sampling loop back instead of compiling it, and writes the same image."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cache = tmp_path / "xla"
  env = dict(os.environ, DALLE_JAX_CACHE_DIR=str(cache), JAX_PLATFORMS="cpu", XLA_FLAGS="",
             JAX_LOG_COMPILES="1")  # cache hits are then logged as warnings
  logs = []
  for run in ("a", "b"):
    logs.append(subprocess.run(
        [sys.executable, "sample.py", "--checkpoint", str(checkpoint / "ar"), "--prompt",
         CAPTIONS[5], "--num_images", "2", "--top_k", "8", "--seed", "3",
         "--out", str(tmp_path / f"{run}.png")], cwd=root, env=env, check=True,
        capture_output=True, text=True).stderr)
  hit = "Persistent compilation cache hit for 'jit_chunk'"
  assert any(cache.iterdir()) and hit not in logs[0] and hit in logs[1], logs[1][-2000:]
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")),
                                np.asarray(Image.open(tmp_path / "b.png")))


def test_sample_cli_rejects_bad_inputs_before_loading(checkpoint, tmp_path, monkeypatch, capsys):
  """Every bad flag is a one-line error naming it, raised before any weights are
  read or any decoding is compiled (both made to fail here if reached)."""
  from dalle_jax.train import checkpoint as ckpt

  def reached(*a, **k):
    raise AssertionError("weights loaded / decoding started before the inputs were checked")
  monkeypatch.setattr(ckpt, "load_model", reached)
  monkeypatch.setattr(generate.decode, "generate", reached)
  ar, vq = str(checkpoint / "ar"), str(checkpoint / "vqgan")
  ar_config = json.loads((checkpoint / "ar" / "config.json").read_text())
  # an AR model whose recorded VQGAN is gone, and a VQGAN with another codebook size
  moved = _fake_model_dir(tmp_path / "moved", dict(ar_config, vqgan=str(tmp_path / "gone")))
  vq_config = json.loads((checkpoint / "vqgan" / "config.json").read_text())
  vq_config["model"]["n_embed"] = 64
  small_vq = _fake_model_dir(tmp_path / "vq64", vq_config)
  base = ["--checkpoint", ar, "--prompt", CAPTIONS[0], "--out", str(tmp_path / "x.png")]
  cases = [
      (["--rerank_with", str(tmp_path / "no_clip")], r"--rerank_with .*no_clip: no such directory"),
      (["--rerank_with", vq], r"--rerank_with .*'vqgan' model"),
      (["--vqgan", ar], r"--vqgan .*'dalle' model \(config.family\), expected a VQGAN"),
      (["--vqgan", small_vq], r"--vqgan: the VQGAN has 64 codes .* trained on 128"),
      (["--num_images", "0"], r"--num_images 0: must be >= 1"),
      (["--top_p", "1.5"], r"--top_p 1.5"),
      (["--top_k", "-1"], r"--top_k -1"),
      (["--temperature", "-1"], r"--temperature -1"),
      (["--batch_size", "-2"], r"--batch_size -2"),
      (["--num_images", "2", "--rerank_top", "3", "--rerank_with", vq], r"--rerank_top 3"),
      (["--rerank_top", "1"], r"--rerank_top needs --rerank_with"),
      (["--prompt", " "], r"--prompt number 2 is empty"),
      (["--out", str(tmp_path / "x.txt")], r"--out .*x.txt: unknown image extension"),
      (["--mesh", "2,0,1"], r"--mesh '2,0,1'"),
      (["--mesh", "3,1,1"], r"--mesh 3,1,1: .*has 3 devices but 8"),
  ]
  for extra, message in cases:
    with pytest.raises(SystemExit, match=message):
      generate.sample_main(base + extra)
  for argv, message in [
      (["--checkpoint", str(tmp_path / "none")], r"--checkpoint .*none: no such directory"),
      (["--workdir", vq], r"--workdir .*'vqgan' model \(config.family\)"),
      (["--workdir", str(tmp_path)], r"--workdir .*: no config.json"),
      (["--checkpoint", moved], r"config.vqgan .*gone: no such directory .*override with --vqgan")]:
    with pytest.raises(SystemExit, match=message):
      generate.sample_main(argv + base[2:])


def test_sample_py_bad_input_is_one_line_on_stderr(checkpoint, tmp_path):
  """The public command: exit status 1, one line on stderr, no traceback."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run(
      [sys.executable, "sample.py", "--checkpoint", str(checkpoint / "ar"), "--prompt", "x",
       "--vqgan", str(checkpoint / "ar"), "--out", str(tmp_path / "x.png")],
      cwd=root, env=dict(os.environ, DALLE_JAX_CACHE_DIR="", JAX_PLATFORMS="cpu"),
      capture_output=True, text=True)
  assert run.returncode == 1 and run.stdout == ""
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: --vqgan "), run.stderr
  assert not (tmp_path / "x.png").exists()


# --- scanned models: train (scan_layers=True) -> preview -> sample.py ---------------------

def _codes_dataset(root, vqgan, grid, n_embed, n=64):
  """Records of random codes + captions, as tools.encode_dataset writes them."""
  from dalle_jax.data import records
  rng = np.random.RandomState(0)
  meta = {"vqgan": vqgan, "grid": [grid, grid], "n_embed": n_embed}
  for split, count in (("train", n), ("test", 16)):
    examples = [{"codes": rng.randint(0, n_embed, (grid, grid)).astype(np.int32),
                 "caption": CAPTIONS[i % len(CAPTIONS)]} for i in range(count)]
    records.write_records(str(root), split, examples, meta=meta)
  return str(root)


def _train_scanned(config, checkpoint, workdir):
  """A few steps of the trainer (what train.py runs) with scanned layers and a
  preview through the VQGAN at the last step."""
  from dalle_jax.train import loop
  config.scan_layers = True
  config.remat = "full"
  config.text.path = str(checkpoint / "ar" / "sp.model")
  config.data.dataset = _codes_dataset(workdir.parent / (workdir.name + "_codes"),
                                       str(checkpoint / "vqgan"), 8, 128)
  config.data.data_dir = str(workdir.parent)
  config.dtype = "float32"
  config.batch_size, config.total_steps = 8, 4
  config.log_every, config.checkpoint_every, config.eval_every, config.preview_every = 2, 4, 0, 4
  config.eval_batches = 1
  config.sampling.num_prompts, config.sampling.samples_per_prompt = 2, 2
  loop.train(config, str(workdir))
  previews = sorted((workdir / "previews").rglob("*.png"))
  assert previews, "no preview written"
  grid = np.asarray(Image.open(previews[-1]))  # 2 prompts x (truth + 2 samples) of 32 px
  assert grid.shape[0] > 2 * 32 and grid.shape[1] > 3 * 32
  return json.loads((workdir / "config.json").read_text())


def _sample_greedy(workdir, out, *extra):
  generate.sample_main(["--workdir", str(workdir), "--prompt", CAPTIONS[0], "--prompt", CAPTIONS[3],
                        "--num_images", "2", "--top_k", "1", "--guidance_scale", "2",
                        "--out", str(out), *extra])
  return np.asarray(Image.open(out))


def test_scanned_sparse_dalle_trains_previews_and_samples_on_8_devices(checkpoint, tmp_path):
  """The `paper` layout (sparse row/column/conv layers, scanned, remat, 2-D mesh
  over 8 devices) at tiny dims: trains, previews through the VQGAN on the
  training mesh, and sample.py --workdir --mesh samples it sharded; the
  sampler's per-layer parameters are the trained stack's slices."""
  from dalle_jax.train import checkpoint as ckpt
  config = dalle_cfg.get_config("paper")
  config.model.update(dict(text_vocab_size=0, text_len=8, image_vocab_size=128, image_grid=8,
                           num_layers=5, d_model=32, num_heads=4, mlp_dim=64))  # row, col, row, row, conv
  config.text = dalle_cfg.get_config("shapes").text
  config.text.max_len = 8
  config.mesh.data, config.mesh.fsdp = 2, -1
  config.allow_replication_below = 1 << 30  # tiny dims: most weights do not divide 8 ways
  saved = _train_scanned(config, checkpoint, tmp_path / "paper")
  assert saved["scan_layers"] and saved["model"]["attention"] == "sparse"
  images = _sample_greedy(tmp_path / "paper", tmp_path / "mesh.png", "--mesh", "1,4,2")
  assert images.shape[0] > 2 * 32 and images.shape[1] > 2 * 32
  mesh = generate.mesh_from_flag("1,4,2")
  pipe = generate.Pipeline.load(str(tmp_path / "paper"), mesh=mesh)  # scanned, into shards
  _, variables = ckpt.load_model(str(tmp_path / "paper"))
  stacked = variables["params"]["layers"]["layers"]["block"]
  per_layer = pipe.params["layers"]
  assert sorted(per_layer) == [f"layer_{i}" for i in range(5)]
  for i in range(5):
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[i], stacked)),
                    jax.tree.leaves(per_layer[f"layer_{i}"]["block"])):
      assert len(b.sharding.device_set) == 8
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# train + preview + sample (48 s); the scanned paper-layout test covers the same path
@pytest.mark.slow
def test_scanned_dalle_mini_trains_previews_and_samples(checkpoint, tmp_path):
  from dalle_jax.configs import dalle_mini as dalle_mini_cfg
  config = dalle_mini_cfg.get_config("shapes")
  config.model.update(dict(text_vocab_size=0, text_len=8, num_layers=2, d_model=32, num_heads=4,
                           glu_dim=64))
  config.text.max_len = 8
  _train_scanned(config, checkpoint, tmp_path / "mini")
  images = _sample_greedy(tmp_path / "mini", tmp_path / "mini.png")
  assert images.shape[0] > 2 * 32


def test_scanned_layout_checkpoint_samples_like_per_layer(checkpoint, tmp_path):
  """The fixture's per-layer import restacked into the scanned layout (what a
  scan_layers=True run saves; models.scan_layout) samples exactly the same codes,
  and a tree that fits neither layout is named."""
  from dalle_jax.models import scan_layout
  from dalle_jax.sampling import decode
  from dalle_jax.train import checkpoint as ckpt
  config, variables = ckpt.load_model(str(checkpoint / "ar"))
  dec = decode.make_decoder(config)
  scanned_like = jax.tree.map(lambda x: x, decode._strip_boxes(dec._boxed_params(scan=True)))
  stacked = scan_layout.to_layout(variables["params"], scanned_like)
  assert stacked["layers"]["layers"]["block"]["mlp"]["wi"]["kernel"].shape[0] == 2
  with config.unlocked():
    config.scan_layers = True
    config.vqgan = str(checkpoint / "vqgan")
  ckpt.save_imported(str(tmp_path / "scanned"), config, {"params": stacked})
  (tmp_path / "scanned" / "sp.model").write_bytes((checkpoint / "ar" / "sp.model").read_bytes())
  sp = generate.SamplingParams(top_k=10, guidance_scale=3.0)
  per_layer = generate.Pipeline.load(str(checkpoint / "ar")).generate_codes([CAPTIONS[1]], 2, 5, sp)
  scanned = generate.Pipeline.load(str(tmp_path / "scanned")).generate_codes([CAPTIONS[1]], 2, 5, sp)
  np.testing.assert_array_equal(scanned, per_layer)
  block = stacked["layers"]["layers"]["block"]
  broken = dict(stacked, layers={"layers": {"block": {k: v for k, v in block.items() if k != "mlp"}}})
  with pytest.raises(ValueError, match=r"parameters at layers/layer_0/block: missing \['mlp'\]"):
    scan_layout.to_layout(broken, decode._strip_boxes(dec._boxed_params()))
