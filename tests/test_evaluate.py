"""dalle_jax.evaluate: statistics, Fréchet distance, KID/IS/PR/CLIP score, resize modes, sharded
extraction over devices and processes, and the command line.

Heavy parts stay small: sharding tests use a cheap stand-in network behind the real extractor
(preprocessing, batching, padding, masks, merges); the real Inception runs in
tests/test_inception.py (parity with pytorch-fid) and in one CLI test here.
"""
import json
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from dalle_jax.evaluate import features as feat_lib
from dalle_jax.evaluate import metrics
from dalle_jax.evaluate import sources as src_lib
from dalle_jax.evaluate import stats as stats_lib
from dalle_jax.models import inception

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- statistics / FID

def test_statistics_chunks_and_merge_equal_numpy_mean_cov():
  x = np.random.default_rng(0).normal(3.0, 2.0, (50, 7))
  parts = [stats_lib.Statistics.of(x[:13]), stats_lib.Statistics.of(x[13:14]),
           stats_lib.Statistics.zeros(7).update(x[14:40]).update(x[40:])]
  s = parts[0].merge(parts[1]).merge(parts[2])
  assert s.n == 50
  np.testing.assert_allclose(s.mu, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(s.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_fid_of_identical_statistics_is_zero_even_when_singular():
  # N = 40 < D = 64: rank-deficient covariances, where a general sqrtm struggles.
  x = np.random.default_rng(1).normal(size=(40, 64))
  s = stats_lib.Statistics.of(x)
  assert abs(stats_lib.frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-9 * np.trace(s.sigma)


def test_fid_closed_form_for_two_known_gaussians():
  rng = np.random.default_rng(2)
  d = 6
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  # Commuting (diagonal) covariances: tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt a - sqrt b)^2.
  a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = stats_lib.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  np.testing.assert_allclose(got, expected, rtol=1e-12)
  # Same spectra in a shared rotated basis give the same distance.
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  got = stats_lib.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
  np.testing.assert_allclose(got, expected, rtol=1e-10)
  # Non-commuting, full rank: against scipy's general sqrtm.
  m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
  s1, s2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)
  ref = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
         - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
  np.testing.assert_allclose(stats_lib.frechet_distance(mu1, s1, mu2, s2), ref, rtol=1e-9)


def test_stats_file_roundtrip_in_pytorch_fid_format(tmp_path):
  s = stats_lib.Statistics.of(np.random.default_rng(3).normal(size=(10, 4)))
  s.save(tmp_path / "s.npz")
  with np.load(tmp_path / "s.npz") as f:
    assert f["mu"].dtype == np.float64 and f["sigma"].shape == (4, 4)
  mu, sigma, n = stats_lib.load_stats(str(tmp_path / "s.npz"))
  np.testing.assert_array_equal(mu, s.mu)
  np.testing.assert_array_equal(sigma, s.sigma)
  assert n == 10


# --------------------------------------------------------------------------- KID / IS / PR / CLIP

def test_kid_equals_direct_numpy_formula():
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(30, 5)), rng.normal(0.5, 1, size=(25, 5))
  got = metrics.kernel_inception_distance(x, y, num_subsets=3, subset_size=20, seed=7)
  # The same subsets (same generator calls), then the unbiased MMD² written out as sums.
  pick = np.random.default_rng(7)
  vals = []
  for _ in range(3):
    xs, ys = x[pick.choice(30, 20, replace=False)], y[pick.choice(25, 20, replace=False)]
    k = lambda u, v: (np.dot(u, v) / 5 + 1) ** 3
    m = 20
    sxx = sum(k(xs[i], xs[j]) for i in range(m) for j in range(m) if i != j)
    syy = sum(k(ys[i], ys[j]) for i in range(m) for j in range(m) if i != j)
    sxy = sum(k(xs[i], ys[j]) for i in range(m) for j in range(m))
    vals.append((sxx + syy) / (m * (m - 1)) - 2 * sxy / m ** 2)
  np.testing.assert_allclose(got["kid_mean"], np.mean(vals), rtol=1e-10)
  np.testing.assert_allclose(got["kid_std"], np.std(vals), rtol=1e-8)
  assert got["subset_size"] == 20
  # Same distribution: KID near 0, unlike the shifted one.
  same = metrics.kernel_inception_distance(x[:15], x[15:], num_subsets=10, subset_size=15)
  assert abs(same["kid_mean"]) < got["kid_mean"]


def test_inception_score_definition():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(20, 8)) * 3
  got = metrics.inception_score(logits, splits=2)
  scores = []
  for part in (logits[:10], logits[10:]):
    p = np.exp(part) / np.exp(part).sum(1, keepdims=True)
    py = p.mean(0)
    scores.append(np.exp(np.mean([np.sum(pi * np.log(pi / py)) for pi in p])))
  np.testing.assert_allclose([got["is_mean"], got["is_std"]], [np.mean(scores), np.std(scores)],
                             rtol=1e-10)
  # One-hot confident predictions over 4 equally used classes: IS = 4.
  one_hot = np.eye(8)[np.arange(40) % 4] * 100
  np.testing.assert_allclose(metrics.inception_score(one_hot, splits=1)["is_mean"], 4, rtol=1e-6)


def test_precision_recall_matches_brute_force_knn():
  rng = np.random.default_rng(6)
  real, fake = rng.normal(size=(40, 3)), rng.normal(0.7, 1.3, size=(30, 3))

  def radii(f):  # distance to the 3rd nearest other point (squared)
    return np.array([np.sort([np.sum((a - b) ** 2) for j, b in enumerate(f) if j != i])[2]
                     for i, a in enumerate(f)])

  def covered(pts, ref):
    r = radii(ref)
    return np.mean([any(np.sum((p - q) ** 2) <= r[j] for j, q in enumerate(ref)) for p in pts])

  got = metrics.precision_recall(real, fake, k=3)
  assert got["precision"] == pytest.approx(covered(fake, real))
  assert got["recall"] == pytest.approx(covered(real, fake))
  same = metrics.precision_recall(real, real, k=3)
  assert same["precision"] == same["recall"] == 1.0


def test_clip_score_both_definitions():
  e = np.eye(4)
  # Cosines 1, 0.6, -0.8 and 0 by construction.
  img = np.stack([e[0], e[1], e[2], e[3]])
  txt = np.stack([e[0] * 2, 0.6 * e[1] + 0.8 * e[0], -0.8 * e[2] + 0.6 * e[3], e[0]])
  got = metrics.clip_score(img, txt)
  assert got["mean_cosine"] == pytest.approx((1 + 0.6 - 0.8 + 0) / 4)
  assert got["clip_score_torchmetrics"] == pytest.approx(100 * 0.8 / 4)  # clamp after the mean
  assert got["clip_score_hessel"] == pytest.approx(2.5 * (1 + 0.6) / 4)  # clamp per pair
  assert metrics.clip_score(img, -img)["clip_score_torchmetrics"] == 0.0


# --------------------------------------------------------------------------- resize modes

@pytest.mark.parametrize("hw", [(64, 48), (400, 320)])  # up- and down-sampling
def test_legacy_resize_matches_torch_bilinear(hw):
  import torch  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(7).integers(0, 256, (2, *hw, 3), dtype=np.uint8)
  t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
  resize = lambda t: (2 * torch.nn.functional.interpolate(
      t, size=(299, 299), mode="bilinear", align_corners=False) - 1).permute(0, 2, 3, 1).numpy()
  dev = np.asarray(jax.jit(feat_lib.resize_device, static_argnames="mode")(x, mode="legacy_pytorch"))
  np.testing.assert_allclose(dev, resize(t), atol=1e-6)  # float32 both
  # The host path computes in float64 (torch's float32 result is itself ~4e-6 off it).
  host = np.stack([feat_lib.resize_host(im, "legacy_pytorch") for im in x])
  np.testing.assert_allclose(host, resize(t.double()), atol=1e-6)


@pytest.mark.parametrize("hw", [(64, 48), (400, 320)])
def test_clean_resize_matches_pil_bicubic_on_floats(hw):
  x = np.random.default_rng(8).integers(0, 256, (2, *hw, 3), dtype=np.uint8)
  # clean-fid: each channel as a PIL 'F' image, bicubic to 299, clipped to [0, 255].
  ref = np.stack([np.stack([np.asarray(Image.fromarray(im[..., c].astype(np.float32), mode="F")
                                       .resize((299, 299), Image.BICUBIC)) for c in range(3)], -1)
                  for im in x]).clip(0, 255)
  ref = (ref - 128) / 128
  dev = np.asarray(jax.jit(feat_lib.resize_device, static_argnames="mode")(x, mode="clean"))
  np.testing.assert_allclose(dev, ref, atol=1e-4)  # float32 sums over up to ~20 taps: 0.013 grey levels
  host = np.stack([feat_lib.resize_host(im, "clean") for im in x])
  np.testing.assert_allclose(host, ref, atol=1e-6)


# --------------------------------------------------------------------------- sharded extraction

class CheapExtractor(feat_lib.InceptionExtractor):
  """The real extractor (resize, sharding, host gathering) with a cheap network behind it."""

  def __init__(self, mesh, batch_size):
    w = np.random.default_rng(0).normal(size=(13 * 13 * 3, 3056)).astype(np.float32) / 20
    super().__init__({"w": w}, "legacy_pytorch", batch_size, mesh)

  def apply(self, x_bhwc):
    return _cheap_net(self.params["w"], x_bhwc)


@jax.jit
def _cheap_net(w, x_bhwc):
  feats = x_bhwc[:, ::23, ::23, :].reshape(x_bhwc.shape[0], -1)
  return jnp.tanh(feats @ w) + 1


def _images(n, seed=0, size=24):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_sharded_extraction_equals_one_pass():
  """8 devices, a batch that does not divide N (padding masked), one unreadable image skipped:
  the merged float64 sums equal one pass over the valid images on one device."""
  imgs = _images(21)
  src = src_lib.NpzSource("x.npz", imgs)
  bad = src_lib.NpzSource("x.npz", imgs)
  bad.load = lambda i: None if i == 5 else imgs[i]
  ext8 = CheapExtractor(feat_lib.data_mesh(jax.devices()), 8)
  ext1 = CheapExtractor(feat_lib.data_mesh(jax.devices()[:1]), 3)
  one = ext1(imgs)["pool"].astype(np.float64)
  got = src_lib.extract(src, ext8, keep_features=True)
  assert got.n == 21 and got.skipped == 0
  np.testing.assert_allclose(got.features["pool"], one, rtol=1e-6, atol=1e-6)
  ref = stats_lib.Statistics.of(got.features["pool"])
  np.testing.assert_allclose(got.stats.sum_outer, ref.sum_outer, rtol=1e-12)
  np.testing.assert_allclose(got.stats.sigma, np.cov(one, rowvar=False), rtol=1e-5, atol=1e-7)
  skipped = src_lib.extract(bad, ext8, keep_features=True)
  assert skipped.n == 20 and skipped.skipped == 1
  np.testing.assert_allclose(skipped.features["pool"], np.delete(got.features["pool"], 5, 0))


_WORKER = r"""
import sys, numpy as np, jax
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
jax.distributed.initialize("127.0.0.1:{port}", num_processes=2, process_id=int(sys.argv[1]))
from test_evaluate import CheapExtractor, _images, _pair_captions
from dalle_jax.evaluate import clip_cosines, features as feat_lib, sources as src_lib
from dalle_jax.sampling import rerank
ext = CheapExtractor(feat_lib.data_mesh(), 8)
got = src_lib.extract(src_lib.NpzSource("x.npz", _images(21)), ext, keep_features=True)
cos, skipped = clip_cosines.ClipCosines(rerank.get_encoder({clip!r}), 8).of_source(
    src_lib.NpzSource("x.npz", _images(21)), _pair_captions(21))
if jax.process_index() == 0:
  np.savez({out!r}, n=got.n, sum=got.stats.sum, sum_outer=got.stats.sum_outer,
           pool=got.features["pool"], clip_n=cos.n, clip_skipped=skipped,
           clip_sums=[cos.sum_cos, cos.sum_pos_cos])
"""


def _pair_captions(n):
  return [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]


def test_two_processes_merge_sums_not_covariances(tmp_path):
  """Two processes of 4 devices (one JAX cluster on loopback) each read their rows; Σx, Σxxᵀ
  and N merged across processes equal one 8-device process, and so do the gathered features.
  CLIP score the same way: each process embeds its rows' (image, caption) pairs on the global
  mesh and the float64 sums of cosines are merged; both equal the numpy definition on the
  embeddings of a plain single-process ClipEncoder (so does one process with an unreadable
  image skipped)."""
  from dalle_jax.evaluate import clip_cosines  # pylint: disable=g-import-not-at-top
  from dalle_jax.sampling import rerank  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out, clip = str(tmp_path / "two.npz"), _save_clip(str(tmp_path / "clip"))
  code = _WORKER.format(root=ROOT, tests=os.path.join(ROOT, "tests"), port=port, out=out,
                        clip=clip)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  logs = [p.communicate(timeout=600)[0].decode() for p in procs]
  assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
  one = src_lib.extract(src_lib.NpzSource("x.npz", _images(21)),
                        CheapExtractor(feat_lib.data_mesh(), 8), keep_features=True)
  with np.load(out) as two:
    assert int(two["n"]) == one.n == 21
    np.testing.assert_allclose(two["pool"], one.features["pool"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(two["sum"], one.stats.sum, rtol=1e-9)
    np.testing.assert_allclose(two["sum_outer"], one.stats.sum_outer, rtol=1e-9)
    two_clip = clip_cosines.CosineSums(int(two["clip_n"]), *two["clip_sums"]).result()
    assert int(two["clip_skipped"]) == 0
  enc = rerank.get_encoder(clip)
  images, captions = _images(21), _pair_captions(21)
  ref = metrics.clip_score(enc.encode_images(images), enc.encode_texts(captions))
  assert ref["num_pairs"] == two_clip["num_pairs"] == 21
  for k in ("clip_score_torchmetrics", "clip_score_hessel", "mean_cosine"):
    assert two_clip[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6)
  bad = src_lib.NpzSource("x.npz", images)
  bad.load = lambda i: None if i == 5 else images[i]
  sums, skipped = clip_cosines.ClipCosines(enc, 8).of_source(bad, captions)
  keep = [i for i in range(21) if i != 5]
  ref = metrics.clip_score(enc.encode_images(images[keep]),
                           enc.encode_texts([captions[i] for i in keep]))
  assert skipped == 1 and sums.n == 20
  for k, v in sums.result().items():
    assert v == pytest.approx(ref[k], rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------- sources / CLI

def test_sources_reject_bad_inputs_with_one_line(tmp_path):
  np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
  np.savez(tmp_path / "s.npz", mu=np.zeros(2048), sigma=np.eye(2048))
  np.savez(tmp_path / "o.npz", other=np.zeros(3))
  (tmp_path / "empty").mkdir()
  cases = {str(tmp_path / "f.npz"): "arr_0 must be uint8 (N, H, W, 3)",
           str(tmp_path / "o.npz"): "needs arr_0 (images) or mu + sigma",
           str(tmp_path / "empty"): "no images",
           str(tmp_path / "missing"): "no such file or folder"}
  for spec, msg in cases.items():
    with pytest.raises(src_lib.SourceError, match=re.escape(msg)):
      src_lib.open_source(spec, "--fake")
  with pytest.raises(src_lib.SourceError, match="this metric needs images"):
    src_lib.open_source(str(tmp_path / "s.npz"), "--real", allow_stats=False)
  assert src_lib.open_source(str(tmp_path / "s.npz"), "--real").kind == "stats"


def _random_inception_pth(path):
  """Random Inception weights (He-scaled convs, unit BatchNorm) under pytorch-fid's names."""
  import torch  # pylint: disable=g-import-not-at-top
  from dalle_jax.convert import inception as conv  # pylint: disable=g-import-not-at-top
  from tests.test_inception import flax_to_torch  # pylint: disable=g-import-not-at-top
  params = {}
  for name, v in conv.random_weights(0).items():
    node = params
    for part in name.split("/")[:-1]:
      node = node.setdefault(part, {})
    node[name.rsplit("/", 1)[1]] = v
  torch.save(flax_to_torch(params), path)


def test_cli_stats_fid_and_errors(inception_pth, tmp_path, capsys):
  """stats of a folder and of an .npz batch, then fid of the statistics file against the
  batch: the printed last line, the JSON/Markdown outputs, and FID equal to the Fréchet
  distance of the two written statistics files."""
  from dalle_jax.evaluate import cli  # pylint: disable=g-import-not-at-top
  pth = inception_pth
  real = tmp_path / "real"
  real.mkdir()
  for i, im in enumerate(_images(6, seed=1, size=32)):
    Image.fromarray(im).save(real / f"{i}.png")
  np.savez(tmp_path / "fake.npz", arr_0=_images(5, seed=2, size=32))
  common = ["--inception", pth, "--batch_size", "8"]
  cli.main(["stats", "--real", str(real), *common, "--out", str(tmp_path / "ref.npz")])
  cli.main(["stats", "--real", str(tmp_path / "fake.npz"), *common,
            "--out", str(tmp_path / "fake_stats.npz")])
  res = cli.main(["fid", "--real", str(tmp_path / "ref.npz"), "--fake", str(tmp_path / "fake.npz"),
                  *common, "--out", str(tmp_path / "fid.json")])
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last == f"FID {res['value']:.6f}" and res["value"] > 0
  ref, fake = stats_lib.load_stats(str(tmp_path / "ref.npz")), stats_lib.load_stats(
      str(tmp_path / "fake_stats.npz"))
  assert ref[2] == 6 and fake[2] == 5
  assert res["value"] == pytest.approx(stats_lib.frechet_distance(*ref[:2], *fake[:2]), rel=1e-9)
  saved = json.loads((tmp_path / "fid.json").read_text())
  assert saved["real"]["kind"] == "stats" and saved["fake"]["n"] == 5
  assert saved["mode"] == "legacy_pytorch" and len(saved["inception"]["sha256"]) == 16
  assert isinstance(saved["inception"]["feature_checksum"], float)
  assert "| value |" in (tmp_path / "fid.md").read_text()
  # KID needs images on both sides: a statistics file is refused before any model loads.
  with pytest.raises(SystemExit, match="this metric needs images"):
    cli.main(["kid", "--real", str(tmp_path / "ref.npz"), "--fake", str(real), *common])
  with pytest.raises(SystemExit, match="--inception .*no such file"):
    cli.main(["fid", "--real", str(real), "--fake", str(real), "--inception", "nope.pth"])


# --------------------------------------------------------------------------- generate / rfid

CAPTIONS = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue")
            for s in ("circle", "square") for b in ("white", "black")]


def _random_variables(task_init, dummy, scale):
  """Random weights (ones for norm scales) at a model's abstract shapes: no init compile."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  shapes = nn.meta.unbox(jax.eval_shape(task_init, jax.random.PRNGKey(0), dummy))
  rng = np.random.RandomState(0)
  return jax.tree_util.tree_map_with_path(
      lambda p, s: (np.ones(s.shape, s.dtype) if "scale" in jax.tree_util.keystr(p) else
                    (scale * rng.standard_normal(s.shape)).astype(s.dtype)), shapes)


def _save_vqgan(path):
  from dalle_jax.configs import vqgan as vqgan_cfg  # pylint: disable=g-import-not-at-top
  from dalle_jax.tasks import vqgan as vq_task  # pylint: disable=g-import-not-at-top
  from dalle_jax.train import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  vq_config = vqgan_cfg.get_config("shapes")  # 32 px -> 8 x 8 codes
  vq_config.loss.disc_weight = 0.0
  vq = vq_task.VQGANTask(vq_config)
  ckpt.save_imported(path, vq_config, _random_variables(vq.init, vq.dummy_batch(1), 0.05))


def _save_ar(path, vqgan):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from dalle_jax.configs import dalle as dalle_cfg  # pylint: disable=g-import-not-at-top
  from dalle_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from dalle_jax.models import dalle  # pylint: disable=g-import-not-at-top
  from dalle_jax.train import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  tok = tokenizers.train_sentencepiece(CAPTIONS * 20, os.path.join(path, "sp.model"), 64)
  config = dalle_cfg.get_config("shapes")
  config.model.update(dict(text_vocab_size=tok.vocab_size, text_len=8, num_layers=2,
                           d_model=32, num_heads=4, mlp_dim=64))
  config.text.update(max_len=8, path="sp.model")
  config.dtype = "float32"
  config.vqgan = vqgan
  config.sampling.guidance_scale = 2.0
  model = dalle.from_config(config.model, dtype="float32")
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32),
                               jnp.zeros((1, 64), jnp.int32))
  ckpt.save_imported(path, config, nn.meta.unbox(params))


def _save_clip(path):
  """A tiny random CLIP (shapes preset shrunk, its own SentencePiece): loads without torch."""
  from dalle_jax.configs import clip as clip_cfg  # pylint: disable=g-import-not-at-top
  from dalle_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from dalle_jax.tasks import clip as clip_task  # pylint: disable=g-import-not-at-top
  from dalle_jax.train import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  tok = tokenizers.train_sentencepiece(CAPTIONS * 20, os.path.join(path, "sp.model"), 64)
  config = clip_cfg.get_config("shapes")
  config.model.update(embed_dim=16)
  config.model.text.update(dict(width=32, layers=1, heads=2, mlp_dim=64, max_len=8,
                                vocab_size=tok.vocab_size))
  config.model.vision.update(dict(width=32, layers=1, heads=2, mlp_dim=64, image_size=16))
  config.text.update(vocab_size=tok.vocab_size, max_len=8, path="sp.model")
  config.dtype = "float32"
  task = clip_task.ClipTask(config)
  ckpt.save_imported(path, config, _random_variables(task.init, task.dummy_batch(1), 0.2))
  return path


def _save_diffusion(path):
  from dalle_jax.configs import diffusion as diffusion_cfg  # pylint: disable=g-import-not-at-top
  from dalle_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from dalle_jax.tasks import diffusion as diffusion_task  # pylint: disable=g-import-not-at-top
  from dalle_jax.train import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  tok = tokenizers.train_sentencepiece(CAPTIONS * 20, os.path.join(path, "sp.model"), 64)
  config = diffusion_cfg.get_config("shapes")
  config.data.update(image_size=16, dataset="/nonexistent")
  config.model.unet.update(dict(block_channels=(16, 32), attention=("none", "added_kv"),
                                mid_attention="added_kv", attn_head_dim=16, norm_groups=8))
  config.model.text.update(dict(width=32, layers=1, heads=2, mlp_dim=64))
  config.text.update(vocab_size=tok.vocab_size, max_len=8, path="sp.model")
  config.dtype = "float32"
  config.diffusion.num_train_timesteps = 100
  task = diffusion_task.DiffusionTask(config)
  ckpt.save_imported(path, config, _random_variables(task.init, task.dummy_batch(1), 0.1))


def _random_reference_stats(path):
  """Random rank-64 reference statistics (mu, sigma) of Inception's width."""
  a = np.random.default_rng(9).normal(size=(inception.POOL_DIM, 64))
  stats_lib.save_stats(path, a[:, 0], a @ a.T / 64, 64)


@pytest.fixture(scope="module")
def inception_pth(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inception") / "pt_inception.pth")
  _random_inception_pth(path)
  return path


def test_generate_scores_equal_fid_and_clip_score_subcommands(inception_pth, tmp_path, capsys):
  """generate with the AR (+ VQGAN), diffusion and cascade families: 5 cycled captions in 2
  sampling calls (4 rows + 1 padded), scored in memory; the JSON records captions, seeds and
  settings, and its FID / CLIP score equal the fid / clip_score subcommands' on the same (lossless)
  images. Tiny random models; FID against random rank-64 reference statistics."""
  from dalle_jax.evaluate import cli  # pylint: disable=g-import-not-at-top
  from tests.test_clip_convert import write_tiny_hf_clip  # pylint: disable=g-import-not-at-top
  m = str(tmp_path)
  _save_vqgan(f"{m}/vqgan")
  _save_ar(f"{m}/ar", f"{m}/vqgan")
  _save_diffusion(f"{m}/diffusion")
  write_tiny_hf_clip(f"{m}/clip")
  _random_reference_stats(f"{m}/ref.npz")
  (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS[:3]) + "\n\n")
  common = ["--inception", inception_pth, "--batch_size", "8"]
  fid_flags = ["--real", f"{m}/ref.npz", *common]
  for family, model, flags in (
      ("ar", "ar", ["--top_k", "5", "--temperature", "0.9", "--score", "fid,clip_score",
                    *fid_flags]),
      ("diffusion", "diffusion", ["--sampler", "ddim", "--steps", "3", "--guidance_scale", "3",
                                  "--score", "fid,clip_score", *fid_flags]),
      # a one-stage cascade (the base alone) through sampling.cascade.Cascade
      ("cascade", "diffusion", ["--steps", "2", "--thresholding", "static",
                                "--score", "clip_score"])):
    out = tmp_path / f"{family}.json"
    samples = f"{m}/{family}_samples.npz"
    cli.main(["generate", "--family", family, "--checkpoint", f"{m}/{model}",
              "--captions", f"{m}/captions.txt", "--num", "5", "--seed", "3",
              "--sample_batch_size", "4", *flags, "--clip", f"{m}/clip",
              "--save_samples", samples, "--out", str(out)])
    saved = json.loads(out.read_text(), parse_constant=_not_strict_json)
    assert saved["captions"] == [CAPTIONS[i % 3] for i in range(5)]
    assert saved["seeds"] == [3, 4] and saved["sample_batch_size"] == 4
    assert saved["family"] == family and saved["model_flag"] == "--checkpoint"
    assert saved["command"].startswith("python -m dalle_jax.evaluate generate --family " + family)
    sampling = saved["settings"]["sampling"]
    if family == "ar":  # flags given, the rest from the checkpoint's config.sampling
      assert sampling["top_k"] == 5 and sampling["temperature"] == 0.9
      assert sampling["guidance_scale"] == 2.0 and sampling["top_p"] == 1.0
    elif family == "diffusion":
      assert sampling["steps"] == 3 and sampling["guidance_scale"] == 3.0
      assert saved["settings"]["scheduler"]["num_train_timesteps"] == 100
      assert saved["settings"]["scheduler"]["lambda_min_clipped"] == "-inf"  # strict JSON
    else:
      stage, = saved["settings"]["stages"]
      assert stage["steps"] == 2 and stage["path"] == f"{m}/diffusion"
      assert stage["scheduler"]["clip_sample"] and not stage["scheduler"]["thresholding"]
    with np.load(samples) as z:
      images = z["arr_0"]
    size = 32 if family == "ar" else 16
    assert images.shape == (5, size, size, 3) and images.dtype == np.uint8
    assert images.std() > 1  # not blank
    _check_scores_against_subcommands(saved, samples, family != "cascade", tmp_path,
                                      capsys.readouterr().out, common)



def _not_strict_json(constant):
  raise ValueError(f"the result is not strict JSON: {constant}")


def test_generate_unclip_scores_equal_fid_and_clip_score_subcommands(inception_pth, tmp_path,
                                                                     capsys):
  """generate --family unclip on test_unclip_pipeline's tiny random Karlo-layout pipeline
  (imported with `convert karlo`): prior -> decoder -> two super-resolution stages, 3 cycled
  captions in 2 sampling calls (2 rows + 1 padded); the flags given and the checkpoint's
  defaults are recorded, and FID / CLIP score equal the subcommands' on the saved images."""
  from dalle_jax.evaluate import cli  # pylint: disable=g-import-not-at-top
  from dalle_jax.tools import convert as convert_tool  # pylint: disable=g-import-not-at-top
  from tests import test_unclip_pipeline as karlo_fixture  # pylint: disable=g-import-not-at-top
  from tests.test_clip_convert import write_tiny_hf_clip  # pylint: disable=g-import-not-at-top
  m = str(tmp_path)
  karlo_fixture._write_karlo(m)  # pylint: disable=protected-access
  convert_tool.main(["karlo", "--src", f"{m}/karlo", "--out", f"{m}/unclip"])
  write_tiny_hf_clip(f"{m}/clip")
  _random_reference_stats(f"{m}/ref.npz")
  (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS[:2]) + "\n")
  common = ["--inception", inception_pth, "--batch_size", "8"]
  samples, out = f"{m}/unclip_samples.npz", tmp_path / "unclip.json"
  cli.main(["generate", "--family", "unclip", "--checkpoint", f"{m}/unclip",
            "--captions", f"{m}/captions.txt", "--num", "3", "--seed", "5",
            "--sample_batch_size", "2", "--prior_steps", "2", "--decoder_steps", "2",
            "--sr_steps", "2", "--decoder_guidance_scale", "3", "--score", "fid,clip_score",
            "--real", f"{m}/ref.npz", *common, "--clip", f"{m}/clip",
            "--save_samples", samples, "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["captions"] == [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]]
  assert saved["seeds"] == [5, 6] and saved["family"] == "unclip"
  assert saved["settings"]["sampling"] == {
      "prior_steps": 2, "decoder_steps": 2, "sr_steps": 2, "decoder_guidance_scale": 3.0,
      "prior_guidance_scale": 4.0,  # the one number not given: the pipeline's default
      "prior_sampler": "unclip", "decoder_sampler": "unclip", "sr_sampler": "unclip"}
  with np.load(samples) as z:
    images = z["arr_0"]
  big = karlo_fixture.BIG  # the last super-resolution stage's size
  assert images.shape == (3, big, big, 3) and images.dtype == np.uint8 and images.std() > 1
  _check_scores_against_subcommands(saved, samples, True, tmp_path, capsys.readouterr().out,
                                    common)

def _check_scores_against_subcommands(saved, samples, fid, tmp_path, stdout, common):
  """generate's in-memory FID / CLIP score equal the fid / clip_score subcommands run on the
  lossless samples it saved (the same captions, the same CLIP, the same Inception)."""
  from dalle_jax.evaluate import cli  # pylint: disable=g-import-not-at-top
  m, family = str(tmp_path), saved["family"]
  n = len(saved["captions"])
  lines = stdout.strip().splitlines()
  if fid:
    fid = saved["scores"]["fid"]
    assert fid["n"] == n and fid["real"]["kind"] == "stats" and fid["value"] > 0
    assert lines[-1].startswith(f"FID {fid['value']:.6f} CLIP score ")
    assert "| scores.fid.value |" in (tmp_path / f"{family}.md").read_text()
    ref = cli.main(["fid", "--real", f"{m}/ref.npz", "--fake", samples, *common,
                    "--out", f"{m}/fid.json"])
    assert fid["value"] == pytest.approx(ref["value"], rel=1e-6)
  else:
    assert "fid" not in saved["scores"] and lines[-1].startswith("CLIP score ")
  (tmp_path / "used.txt").write_text("\n".join(saved["captions"]) + "\n")
  ref = cli.main(["clip_score", "--fake", samples, "--clip", f"{m}/clip",
                  "--captions", f"{m}/used.txt", "--out", f"{m}/cs.json"])
  got = saved["scores"]["clip_score"]
  assert ref["fake"]["n"] == got["num_pairs"] == n
  for k in ("clip_score_torchmetrics", "clip_score_hessel", "mean_cosine"):
    assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6)
  assert got["clip"] == ref["clip"]


def test_generate_rejects_bad_inputs_before_loading(tmp_path):
  from dalle_jax.evaluate import cli  # pylint: disable=g-import-not-at-top
  m = str(tmp_path)
  for d in ("model", "clip"):  # nothing is loaded before these errors
    (tmp_path / d).mkdir()
  (tmp_path / "captions.txt").write_text("a red circle\n")
  base = ["generate", "--checkpoint", f"{m}/model", "--captions", f"{m}/captions.txt",
          "--num", "2", "--score", "clip_score", "--clip", f"{m}/clip"]
  cases = [(["--family", "diffusion", "--top_k", "3"], "--top_k applies to --family ar, not"),
           (["--family", "ar", "--top_p", "1.5"], r"--top_p 1.5: must be in \(0, 1\]"),
           (["--family", "diffusion", "--score", "fid"], "--score fid needs --real"),
           (["--family", "diffusion", "--score", "fid,lpips"], "--score fid,lpips: choose"),
           (["--family", "ar", "--num", "0"], "--num 0: must be >= 1"),
           (["--family", "diffusion", "--captions", f"{m}/none.txt"], "--captions .*no such file"),
           (["--family", "unclip", "--vqgan", m], "--vqgan applies to --family ar")]
  cases += [(["--family", "diffusion", "--steps", "3,2"], "--steps 3,2: one value"),
            (["--family", "cascade", "--eta", "x"], "--eta x: expected float"),
            (["--family", "cascade", "--checkpoint", f"{m}/model,{m}/sr"],
             "--checkpoint .*sr: no such directory")]
  for extra, msg in cases:
    with pytest.raises(SystemExit, match=msg):
      cli.main(base + extra + ["--out", f"{m}/x.json"])
  assert not (tmp_path / "x.json").exists()


def test_rfid_equals_fid_of_inputs_and_reconstructions(inception_pth, tmp_path, capsys):
  """rfid of a folder (40 px images cropped to the VQGAN's 32) equals fid between the crops
  and their reconstructions made here with the VQGAN codec."""
  from dalle_jax.data import images as img_lib  # pylint: disable=g-import-not-at-top
  from dalle_jax.evaluate import cli  # pylint: disable=g-import-not-at-top
  from dalle_jax.models import loader  # pylint: disable=g-import-not-at-top
  m = str(tmp_path)
  _save_vqgan(f"{m}/vqgan")
  real = tmp_path / "real"
  real.mkdir()
  for i, im in enumerate(_images(6, seed=4, size=40)):
    Image.fromarray(im).save(real / f"{i}.png")
  common = ["--inception", inception_pth, "--batch_size", "8"]
  res = cli.main(["rfid", "--real", str(real), "--vqgan", f"{m}/vqgan", *common,
                  "--out", str(tmp_path / "rfid.json")])
  assert capsys.readouterr().out.strip().splitlines()[-1] == f"rFID {res['value']:.6f}"
  assert res["image_size"] == 32 and res["real"]["n"] == 6 and res["value"] > 0
  crops = np.stack([img_lib.resize_and_crop(im, 32) for im in _images(6, seed=4, size=40)])
  config, variables = loader.load_vqgan(f"{m}/vqgan")
  recon, _ = loader.vqgan_reconstruct(config, variables, img_lib.to_float(crops))
  np.savez(tmp_path / "in.npz", arr_0=crops)
  np.savez(tmp_path / "rec.npz", arr_0=img_lib.to_uint8(np.asarray(recon)))
  ref = cli.main(["fid", "--real", str(tmp_path / "in.npz"), "--fake", str(tmp_path / "rec.npz"),
                  *common, "--out", str(tmp_path / "fid.json")])
  assert res["value"] == pytest.approx(ref["value"], rel=1e-6)
  with pytest.raises(SystemExit, match="--vqgan .*"):
    cli.main(["rfid", "--real", str(real), "--vqgan", f"{m}/none", *common])
