"""`shapes`: a synthetic, deterministic image–caption dataset made locally.

One shape (circle, square, triangle, diamond, cross) of a named colour on a
background of another named colour, at a random position and size, captioned
with one of several templates ("a red circle on a blue background", "a blue
background with a red circle", ...) so that a model must actually read the text
(word order alone does not tell shape colour from background colour).

Build (also done automatically by the input pipeline the first time):
  python -m dalle_jax.tools.build_dataset shapes --data_dir data
Reading: `dataset = "shapes"` (default config "64px_20000": 20000 train, 1000
test, 64 px) or `"shapes/<S>px_<N>"` for a build with other
`--image_size S --num_examples N`.
"""
import dataclasses
import logging
import re

import numpy as np
import tensorflow_datasets as tfds

from dalle_jax.data import images as img_lib

# Name -> RGB. Saturated and far apart so a colour is never ambiguous.
COLORS = {
    "red": (230, 25, 25),
    "green": (30, 190, 40),
    "blue": (30, 60, 230),
    "yellow": (250, 225, 20),
    "magenta": (225, 30, 210),
    "cyan": (30, 220, 230),
    "white": (250, 250, 250),
    "black": (12, 12, 12),
}
COLOR_NAMES = list(COLORS)
SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
# {c}: shape colour, {s}: shape, {b}: background colour.
TEMPLATES = [
    "a {c} {s} on a {b} background",
    "a {b} background with a {c} {s}",
    "a {c} {s} over {b}",
    "{c} {s} on {b}",
    "a {s} in {c} on a {b} background",
    "an image of a {c} {s} on a {b} background",
]
SPLIT_IDS = {"train": 0, "test": 1}
DEFAULT_IMAGE_SIZE = 64
DEFAULT_NUM_TRAIN = 20000
SUPERSAMPLE = 4  # antialiasing: coverage from a 4×4 subpixel grid


def default_num_test(num_train):
  return max(16, num_train // 20)


def config_name(image_size, num_train, num_test=None):
  """e.g. "64px_20000"; the test count is only named when not the default."""
  name = f"{image_size}px_{num_train}"
  if num_test is not None and num_test != default_num_test(num_train):
    name += f"_{num_test}"
  return name


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  image_size: int = DEFAULT_IMAGE_SIZE
  num_train: int = DEFAULT_NUM_TRAIN
  num_test: int = 0  # 0 = default_num_test(num_train)
  seed: int = 0


def make_config(image_size=DEFAULT_IMAGE_SIZE, num_train=DEFAULT_NUM_TRAIN, num_test=None):
  if image_size < 16:
    raise ValueError(f"shapes: image_size must be >= 16, got {image_size}")
  if num_train < 1:
    raise ValueError(f"shapes: num_examples must be >= 1, got {num_train}")
  num_test = default_num_test(num_train) if not num_test else num_test
  return ShapesConfig(name=config_name(image_size, num_train, num_test),
                      image_size=image_size, num_train=num_train, num_test=num_test,
                      description=f"{num_train} train / {num_test} test images, {image_size} px")


def parse_config_name(name):
  """"32px_5000" or "32px_5000_100" -> ShapesConfig; a clear error otherwise."""
  m = re.fullmatch(r"(\d+)px_(\d+)(?:_(\d+))?", name)
  if not m:
    raise ValueError(f"shapes: bad config name {name!r}; expected '<S>px_<N>' such as "
                     f"'64px_20000' (image size S, N training examples)")
  return make_config(int(m[1]), int(m[2]), int(m[3]) if m[3] else None)


def _shape_inside(shape, x, y, cx, cy, r):
  """Bool mask of points (x, y) inside `shape` centred at (cx, cy) with half-extent r."""
  dx, dy = np.abs(x - cx), np.abs(y - cy)
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    h = 0.85 * r  # about the circle's area
    return (dx <= h) & (dy <= h)
  if shape == "triangle":
    # Apex up at (cx, cy - r); base at cy + r, half-width r.
    return (y >= cy - r) & (y <= cy + r) & (dx <= (y - cy + r) * 0.5)
  if shape == "diamond":
    return dx + dy <= 1.1 * r
  if shape == "cross":
    a = 0.34 * r
    return ((dx <= a) & (dy <= r)) | ((dy <= a) & (dx <= r))
  raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _coverage_box(shape, cx, cy, r, size, ss):
  """(coverage float32 (h, w) in [0, 1], y0, x0): the shape's box of pixels only."""
  # Every shape fits in the square of half-side 1.1 r: only supersample there.
  ext = 1.1 * r
  y0, x0 = max(0, int(cy - ext)), max(0, int(cx - ext))
  y1, x1 = min(size, int(np.ceil(cy + ext)) + 1), min(size, int(np.ceil(cx + ext)) + 1)
  y0, x0 = min(y0, max(y1, 0)), min(x0, max(x1, 0))  # a shape wholly outside: empty box
  y1, x1 = max(y1, y0), max(x1, x0)
  x = (np.arange(x0 * ss, x1 * ss, dtype=np.float32) + 0.5)[None, :] / ss
  y = (np.arange(y0 * ss, y1 * ss, dtype=np.float32) + 0.5)[:, None] / ss
  inside = _shape_inside(shape, x, y, cx, cy, r)
  # Count hits per pixel with strided adds (much faster than a 4-d sum in numpy).
  cols = inside.view(np.uint8).reshape((y1 - y0) * ss, x1 - x0, ss)
  cols = sum(cols[:, :, k] for k in range(ss)).reshape(y1 - y0, ss, x1 - x0)
  hits = sum(cols[:, k] for k in range(ss))
  return hits * np.float32(1.0 / (ss * ss)), y0, x0


def shape_mask(shape, cx, cy, r, size, ss=SUPERSAMPLE):
  """Coverage in [0, 1], float32 (size, size), of `shape` centred at (cx, cy), half-extent r."""
  cov, y0, x0 = _coverage_box(shape, cx, cy, r, size, ss)
  out = np.zeros((size, size), np.float32)
  out[y0:y0 + cov.shape[0], x0:x0 + cov.shape[1]] = cov
  return out


def render(shape, color, background, cx, cy, r, size):
  """uint8 (size, size, 3): `shape` in colour `color` over `background` (names)."""
  cov, y0, x0 = _coverage_box(shape, cx, cy, r, size, SUPERSAMPLE)
  fg = np.asarray(COLORS[color], np.float32)
  bg = np.asarray(COLORS[background], np.float32)
  image = np.empty((size, size, 3), np.uint8)
  image[:] = COLORS[background]
  box = np.round(bg + (fg - bg) * cov[..., None]).astype(np.uint8)
  image[y0:y0 + box.shape[0], x0:x0 + box.shape[1]] = box
  return image


def make_example(index, split="train", image_size=DEFAULT_IMAGE_SIZE, seed=0):
  """The `index`-th example of `split`: a pure function of its arguments.

  Returns dict(image=uint8 (S, S, 3), caption=str, shape/color/background=int,
  plus the geometry cx, cy, r in pixels).
  """
  rng = np.random.default_rng([seed, SPLIT_IDS.get(split, 2), index])
  shape = int(rng.integers(len(SHAPES)))
  color = int(rng.integers(len(COLOR_NAMES)))
  background = int(rng.integers(len(COLOR_NAMES) - 1))
  background += background >= color  # any colour but the shape's
  r = float(rng.uniform(0.2, 0.35)) * image_size  # spans 40%–70% of the side
  cx, cy = rng.uniform(r + 1, image_size - r - 1, size=2)
  c, b, s = COLOR_NAMES[color], COLOR_NAMES[background], SHAPES[shape]
  caption = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(c=c, s=s, b=b)
  image = render(s, c, b, float(cx), float(cy), r, image_size)
  return dict(image=image, caption=caption, shape=shape, color=color, background=background,
              cx=float(cx), cy=float(cy), r=r)


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Synthetic shapes with captions (see module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  # Made locally: no download checksums to look up next to this module (tfds's
  # lookup needs importlib_resources, which Python >= 3.9 installs do not have).
  code_path = None
  BUILDER_CONFIGS = [make_config(), make_config(image_size=32)]
  DEFAULT_CONFIG_NAME = config_name(DEFAULT_IMAGE_SIZE, DEFAULT_NUM_TRAIN)

  def _info(self):
    # Images are stored as PNG bytes in a plain object tensor: tfds's Image
    # feature would need TensorFlow to encode.
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "caption": tfds.features.Text(),
            "shape": tfds.features.ClassLabel(names=SHAPES),
            "color": tfds.features.ClassLabel(names=COLOR_NAMES),
            "background": tfds.features.ClassLabel(names=COLOR_NAMES),
        }),
        disable_shuffling=True,  # record i == make_example(i); the pipeline shuffles
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    return {"train": self._generate_examples("train", c.num_train),
            "test": self._generate_examples("test", c.num_test)}

  def _generate_examples(self, split, num):
    c = self.builder_config
    for i in range(num):
      ex = make_example(i, split, c.image_size, c.seed)
      yield i, {"image": img_lib.encode(ex["image"], "PNG"), "caption": ex["caption"],
                "shape": ex["shape"], "color": ex["color"], "background": ex["background"]}


class _DropCustomConfigWarning(logging.Filter):
  """tfds warns on every builder made from a config object; ours are intended."""

  def filter(self, record):
    return not str(record.msg).startswith("Using custom data configuration")


def quiet_custom_config_warning():
  log = logging.getLogger("absl")
  if not any(isinstance(f, _DropCustomConfigWarning) for f in log.filters):
    log.addFilter(_DropCustomConfigWarning())


def builder(data_dir, config="", **kwargs):
  """The Shapes builder for a config name ("" = default) or a ShapesConfig."""
  if isinstance(config, str):
    config = parse_config_name(config) if config else make_config()
  if config.name in Shapes.builder_configs:  # tfds wants the registered ones by name
    config = config.name
  quiet_custom_config_warning()
  return Shapes(data_dir=data_dir, config=config, file_format="array_record", **kwargs)
