"""tools.embed / tools.zero_shot / sampling.rerank on a tiny imported HF CLIP."""
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  from tests.test_clip_convert import write_tiny_hf_clip
  hf = str(tmp_path_factory.mktemp("hf"))
  write_tiny_hf_clip(hf)
  return hf


def test_embed_cli_texts_and_images(ckpt, tmp_path):
  from dalle_jax.tools import embed
  texts = tmp_path / "t.txt"
  texts.write_text("a photo of a cat\n\na red circle\nthe dog\n")
  embed.main(["--clip", ckpt, "--texts", str(texts), "--out", str(tmp_path / "t.npz"),
              "--batch_size", "8"])
  z = np.load(tmp_path / "t.npz")
  assert list(z["texts"]) == ["a photo of a cat", "a red circle", "the dog"]
  np.testing.assert_allclose(np.linalg.norm(z["embeddings"], axis=1), 1, rtol=1e-5)
  folder = tmp_path / "imgs"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):  # sizes differ from the model's 32 px: resized
    Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), np.uint8)).save(folder / f"{i}.png")
  (folder / "broken.jpg").write_bytes(b"not an image")
  embed.main(["--clip", ckpt, "--images", str(folder), "--out", str(tmp_path / "i.npz")])
  z = np.load(tmp_path / "i.npz")
  assert list(z["files"]) == ["0.png", "1.png", "2.png"] and z["embeddings"].shape[0] == 3
  with pytest.raises(SystemExit, match="no such file"):
    embed.main(["--clip", str(tmp_path / "nope"), "--texts", str(texts), "--out", "x.npz"])


def test_zero_shot_and_rerank_consistent(ckpt):
  from dalle_jax.sampling import rerank
  from dalle_jax.tools import zero_shot
  enc = rerank.get_encoder(ckpt)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 255, (6, 32, 32, 3), np.uint8)
  prompts = ["a red circle", "a blue square"]
  kept, scores, idx = rerank.rerank(enc, prompts, [images, images[:4]], top_k=2,
                                    return_indices=True)
  direct = enc.encode_images(images) @ enc.encode_texts(prompts).T
  np.testing.assert_allclose(scores[0], np.sort(direct[:, 0])[::-1][:2], atol=1e-5)
  np.testing.assert_array_equal(kept[1], images[:4][idx[1]])
  # Zero-shot scores: mean-embedding ensembling equals the cosine to the mean prompt.
  img_emb = enc.encode_images(images)
  s = zero_shot.class_scores(enc, img_emb, ["cat", "dog"], ["a photo of a {}", "the {}"])
  assert s.shape == (6, 2)
  acc = zero_shot.topk_accuracy(s, np.argmax(s, 1))
  assert acc["top1"] == 1.0
  r = zero_shot.retrieval_recall(img_emb, img_emb)
  assert r["image_to_text_R@1"] == 1.0
