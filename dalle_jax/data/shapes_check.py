"""A pixel-statistics checker for `shapes` images: does an image follow its prompt?

`describe(image)` reads the background colour (the border's median), the shape
colour (the median of pixels far from the background) and the shape (the
candidate whose rendered mask best overlaps the foreground, by IoU). Used by the
demo to measure how often generated samples follow their prompts.
"""
import re

import numpy as np

from dalle_jax.data import shapes

_RGB = np.asarray([shapes.COLORS[c] for c in shapes.COLOR_NAMES], np.float32)


def nearest_color(rgb):
  return shapes.COLOR_NAMES[int(np.argmin(np.sum((_RGB - np.asarray(rgb, np.float32)) ** 2, -1)))]


def parse_caption(caption):
  """(colour, shape, background) named in a shapes caption, or None if it names none."""
  words = re.findall(r"[a-z]+", caption.lower())
  shape = next((w for w in words if w in shapes.SHAPES), None)
  colors = [w for w in words if w in shapes.COLORS]
  if shape is None or len(colors) < 2:
    return None
  # The background is the colour next to "background" or after "on"/"over".
  text = " ".join(words)
  m = re.search(r"(\w+) background", text) or re.search(r"(?:over|on) (\w+)$", text)
  background = m.group(1) if m and m.group(1) in shapes.COLORS else colors[-1]
  color = next(c for c in colors if c != background) if any(c != background for c in colors) else colors[0]
  return color, shape, background


def describe(image):
  """uint8 (H, W, 3) -> dict(color, shape, background, coverage)."""
  img = np.asarray(image, np.float32)
  h, w, _ = img.shape
  border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
  bg_rgb = np.median(border, axis=0)
  dist = np.sqrt(np.sum((img - bg_rgb) ** 2, -1))
  fg = dist > 80.0  # named colours are >100 apart; blur/noise stays under this
  out = dict(background=nearest_color(bg_rgb), coverage=float(fg.mean()))
  if fg.sum() < max(4, 0.01 * h * w):
    return dict(out, color=None, shape=None)
  out["color"] = nearest_color(np.median(img[fg], axis=0))
  ys, xs = np.nonzero(fg)
  cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
  half = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / 2
  best, best_iou = None, -1.0
  for name in shapes.SHAPES:
    for scale in (0.85, 0.95, 1.0, 1.1, 1.2):
      mask = shapes.shape_mask(name, cx, cy, half * scale, max(h, w))[:h, :w] > 0.5
      iou = (mask & fg).sum() / max((mask | fg).sum(), 1)
      if iou > best_iou:
        best, best_iou = name, iou
  return dict(out, shape=best, iou=float(best_iou))


def follows(image, caption):
  """dict of booleans: colour / shape / background correct, and all three."""
  want = parse_caption(caption)
  if want is None:
    raise ValueError(f"caption {caption!r} names no shapes colour/shape/background")
  got = describe(image)
  res = dict(color=got["color"] == want[0], shape=got["shape"] == want[1],
             background=got["background"] == want[2])
  res["all"] = all(res.values())
  return res


def follow_rates(images, captions):
  """Fraction of images whose colour, shape, background (and all) match their captions."""
  rows = [follows(im, c) for im, c in zip(images, captions)]
  return {k: float(np.mean([r[k] for r in rows])) for k in ("color", "shape", "background", "all")}
