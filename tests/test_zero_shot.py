"""tools.zero_shot's metrics against hand-computed answers: ground-truth labels
(never the argmax of the scores being graded) and text embeddings that differ
from the image embeddings, so a wrong ranking, ensembling or tie rule fails."""
import numpy as np
import pytest

from dalle_jax.tools import zero_shot


def unit(v):
  v = np.asarray(v, np.float32)
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


class TableEncoder:
  """Text encoder with a fixed embedding per prompt (the prompts' geometry is the test)."""

  def __init__(self, table, logit_scale=10.0):
    self.table = {k: unit(v) for k, v in table.items()}
    self.logit_scale = logit_scale
    self.calls = []

  def encode_texts(self, texts):
    self.calls.append(list(texts))
    return np.stack([self.table[t] for t in texts])


def test_topk_accuracy_counts_ground_truth_labels():
  scores = np.array([[0.9, 0.1, 0.0],   # label 0: top-1
                     [0.2, 0.3, 0.5],   # label 1: 2nd
                     [0.6, 0.3, 0.1],   # label 2: 3rd
                     [0.1, 0.8, 0.4]])  # label 1: top-1
  acc = zero_shot.topk_accuracy(scores, [0, 1, 2, 1], ks=(1, 2, 5))
  assert acc == {"top1": 0.5, "top2": 0.75, "top5": 1.0}  # k beyond the classes: all


def test_retrieval_recall_ranks_partners_both_ways():
  # sim = image_emb @ text_emb.T = S with image_emb the identity.
  s = np.array([[0.9, 0.1, 0.0],
                [0.8, 0.5, 0.2],
                [0.1, 0.7, 0.3]], np.float32)
  r = zero_shot.retrieval_recall(np.eye(3, dtype=np.float32), s.T, ks=(1, 2))
  # image->text ranks of the true text: 0, 1 (0.8 > 0.5), 1 (0.7 > 0.3)
  assert r["image_to_text_R@1"] == pytest.approx(1 / 3)
  assert r["image_to_text_R@2"] == 1.0
  # text->image ranks of the true image: 0, 1 (0.7 > 0.5), 0
  assert r["text_to_image_R@1"] == pytest.approx(2 / 3)
  assert r["text_to_image_R@2"] == 1.0
  assert r["num_pairs"] == 3


def test_retrieval_recall_of_shuffled_texts():
  rng = np.random.default_rng(0)
  img = unit(rng.normal(size=(8, 16)))
  perm = np.array([1, 0, 2, 3, 5, 4, 6, 7])  # pairs 0/1 and 4/5 swapped
  txt = img[perm] + 0.01 * rng.normal(size=(8, 16)).astype(np.float32)
  r = zero_shot.retrieval_recall(img, unit(txt), ks=(1, 8))
  assert r["image_to_text_R@1"] == r["text_to_image_R@1"] == 0.5  # 4 of 8 pairs swapped
  assert r["image_to_text_R@8"] == r["text_to_image_R@8"] == 1.0


def _cat_dog_encoder():
  # Two classes, two templates; template "b" spells a nuisance factor that
  # pulls its prompts toward axis 2.
  return TableEncoder({
      "a cat": [1, 0, 0], "a dog": [0, 1, 0],
      "b cat": [1, 0, 3], "b dog": [0, 1, 0.2],
  })


def test_mean_ensembling_is_the_cosine_to_the_mean_prompt():
  enc = _cat_dog_encoder()
  images = unit([[1, 0, 0], [0, 1, 0], [0.1, 0.1, 1]])
  s = zero_shot.class_scores(enc, images, ["cat", "dog"], ["a {}", "b {}"], ensemble="mean")
  cat = unit(unit([1, 0, 0]) + unit([1, 0, 3]))
  dog = unit(unit([0, 1, 0]) + unit([0, 1, 0.2]))
  np.testing.assert_allclose(s, images @ np.stack([cat, dog]).T, rtol=1e-6)
  assert sorted(enc.calls[0]) == ["a cat", "a dog", "b cat", "b dog"]


def test_logsumexp_ensembling_marginalises_templates():
  enc = _cat_dog_encoder()
  images = unit([[0.1, 0.1, 1]])
  s = zero_shot.class_scores(enc, images, ["cat", "dog"], ["a {}", "b {}"],
                             ensemble="logsumexp")
  cos = lambda p: float(images[0] @ enc.table[p])
  expected = [np.log(np.exp(10 * cos(f"a {c}")) + np.exp(10 * cos(f"b {c}"))) for c in ("cat", "dog")]
  np.testing.assert_allclose(s[0], expected, rtol=1e-5)
  with pytest.raises(ValueError, match="unknown ensemble"):
    zero_shot.class_scores(enc, images, ["cat"], ["a {}"], ensemble="max")


def test_zero_shot_grades_against_the_given_labels():
  enc = _cat_dog_encoder()
  # Three cat photos, three dog photos; the last dog looks like a cat.
  images = unit([[1, 0.1, 0], [0.9, 0, 0.1], [1, 0.2, 0.1],
                 [0.1, 1, 0], [0, 0.9, 0.1], [0.8, 0.1, 0]])
  labels = [0, 0, 0, 1, 1, 1]
  res = zero_shot.zero_shot(enc, images, labels, ["cat", "dog"], ["a {}", "b {}"])
  assert res["top1"] == pytest.approx(5 / 6) and res["top5"] == 1.0
  assert res["num_classes"] == 2 and res["chance_top1"] == 0.5
  flipped = zero_shot.zero_shot(enc, images, [1 - l for l in labels], ["cat", "dog"], ["a {}"])
  assert flipped["top1"] == pytest.approx(1 / 6)
