"""The demo's prompt-following checker reads real shapes images right and wrong ones wrong."""
import numpy as np

from dalle_jax.data import shapes, shapes_check


def _examples(n, size):
  ex = [shapes.make_example(i, "test", size) for i in range(n)]
  return [e["image"] for e in ex], [e["caption"] for e in ex]


def test_ground_truth_images_follow_their_captions():
  for size in (32, 64):
    images, captions = _examples(60, size)
    assert shapes_check.follow_rates(images, captions)["all"] == 1.0


def test_mismatched_captions_are_caught():
  images, captions = _examples(60, 32)
  rates = shapes_check.follow_rates(images, captions[1:] + captions[:1])
  assert rates["all"] < 0.1


def test_parse_caption_every_template():
  for t in shapes.TEMPLATES:
    assert shapes_check.parse_caption(t.format(c="red", s="triangle", b="blue")) == ("red", "triangle", "blue")


def test_blank_image_has_no_shape():
  img = np.zeros((32, 32, 3), np.uint8) + np.asarray(shapes.COLORS["green"], np.uint8)
  d = shapes_check.describe(img)
  assert d["background"] == "green" and d["shape"] is None
