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
  with pytest.raises(SystemExit, match="--clip .*nope: no such directory"):
    embed.main(["--clip", str(tmp_path / "nope"), "--texts", str(texts), "--out", "x.npz"])


def test_rerank_and_zero_shot_scores(ckpt):
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
  np.testing.assert_array_equal(idx[1], np.argsort(-direct[:4, 1], kind="stable")[:2])
  # mean-embedding ensembling: the cosine to the normalised mean of each class's
  # normalised template embeddings, built here from single-text embeddings
  img_emb = enc.encode_images(images)
  classes, templates = ["cat", "dog"], ["a photo of a {}", "the {}"]
  s = zero_shot.class_scores(enc, img_emb, classes, templates)
  mean = np.stack([np.mean([enc.encode_texts([t.format(c)])[0] for t in templates], 0)
                   for c in classes])
  np.testing.assert_allclose(s, img_emb @ (mean / np.linalg.norm(mean, axis=1, keepdims=True)).T,
                             atol=1e-5)


def test_topk_accuracy_and_retrieval_recall_by_hand():
  from dalle_jax.tools import zero_shot
  scores = np.array([[.9, .1, .0], [.2, .5, .3], [.1, .2, .7], [.6, .3, .1]])
  # rows 0 and 2 right at top-1; rows 1 and 3 have their label second
  assert zero_shot.topk_accuracy(scores, [0, 2, 2, 1], ks=(1, 2)) == {"top1": 0.5, "top2": 1.0}
  # texts 0-2 nearest their own image; text 3 nearest image 0, its own image third
  img = np.eye(4)
  txt = np.array([[1., 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [.9, .3, 0, .2]])
  r = zero_shot.retrieval_recall(img, txt, ks=(1, 2, 3))
  # image->text: image 3's best text is 3 (0.2 beats 0); text->image: text 3 ranks image 3 third
  assert (r["image_to_text_R@1"], r["text_to_image_R@1"], r["text_to_image_R@2"],
          r["text_to_image_R@3"]) == (1.0, 0.75, 0.75, 1.0)
