"""Image helpers shared by the dataset builders and the input pipeline.

Images travel as uint8 (H, W, 3) RGB numpy arrays; datasets store them
encoded (PNG/JPEG bytes) so no TensorFlow is needed to write or read them.
"""
import io

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

# file names the tools read as images
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Decoding never silently pads a truncated file: such files are rejected.
Image.MAX_IMAGE_PIXELS = 20000 * 20000


class ImageError(ValueError):
  """An image that cannot be decoded; `reason` is a short category."""

  def __init__(self, reason, detail=""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


def to_rgb(img):
  """PIL image -> RGB PIL image; transparency is composited on white."""
  if img.mode == "RGB":
    return img
  if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
    img = img.convert("RGBA")
    background = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, img).convert("RGB")
  return img.convert("RGB")


def open_image(data, draft_size=None):
  """Bytes (or a path) -> (RGB PIL image, original format e.g. "JPEG"), fully decoded.

  `draft_size`: lets JPEG decode at a reduced scale whose shorter side is still
  >= draft_size (much faster for large photos that will be downscaled).
  Raises ImageError with reason "not an image", "truncated" or "unreadable".
  """
  try:
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with Image.open(src) as img:
      if draft_size and img.format == "JPEG":
        w, h = img.size
        scale = draft_size / min(w, h)
        if scale < 1:
          img.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
      img.load()  # Force the full decode so truncation is caught here.
      fmt = img.format
      img = to_rgb(img)
  except Image.UnidentifiedImageError as e:
    raise ImageError("not an image", str(e)) from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    msg = str(e)
    reason = "truncated" if ("truncated" in msg or "broken data" in msg) else "unreadable"
    raise ImageError(reason, msg) from None
  return img, fmt


def decode(data):
  """Encoded bytes (or an already decoded array) -> uint8 (H, W, 3)."""
  if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3:
    if data.shape[-1] == 1:
      return np.repeat(data, 3, axis=-1)
    return data[..., :3]
  if isinstance(data, np.ndarray):  # 0-d object array holding bytes.
    data = data.item()
  return np.asarray(open_image(data)[0])


def encode(img_hw3, fmt="PNG", quality=95):
  """uint8 (H, W, 3) array or PIL image -> PNG/JPEG bytes."""
  img = Image.fromarray(img_hw3) if isinstance(img_hw3, np.ndarray) else img_hw3
  buf = io.BytesIO()
  if fmt.upper() in ("JPG", "JPEG"):
    img.save(buf, format="JPEG", quality=quality)
  else:
    img.save(buf, format="PNG", compress_level=6)
  return buf.getvalue()


def resize_shorter_side(img_hw3, size, *, upscale=True):
  """Resizes so the shorter side is `size` (aspect kept); uint8 in and out."""
  h, w = img_hw3.shape[:2]
  short = min(h, w)
  if short == size or (short < size and not upscale):
    return img_hw3
  if h % size == 0 and w % size == 0 and h // size == w // size and short > size:
    # Integer downscale of a square grid: a box filter is exact and fast.
    f = h // size
    acc = np.zeros((h // f, w // f, img_hw3.shape[2]), np.uint32)
    for i in range(f):  # strided adds: much faster than a multi-axis mean
      for j in range(f):
        acc += img_hw3[i::f, j::f]
    return ((acc + (f * f) // 2) // (f * f)).astype(np.uint8)
  scale = size / short
  new_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
  img = Image.fromarray(img_hw3).resize((new_hw[1], new_hw[0]), Image.BICUBIC,
                                        reducing_gap=None if scale > 0.5 else 2.0)
  return np.asarray(img)


def center_crop(img_hw3, size):
  h, w = img_hw3.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return img_hw3[top:top + size, left:left + size]


def random_crop(img_hw3, size, rng):
  h, w = img_hw3.shape[:2]
  top = int(rng.integers(0, h - size + 1))
  left = int(rng.integers(0, w - size + 1))
  return img_hw3[top:top + size, left:left + size]


def resize_and_crop(img_hw3, size, rng=None):
  """Shorter side -> size, then a size×size crop (random when rng is given)."""
  img_hw3 = resize_shorter_side(img_hw3, size)
  if img_hw3.shape[0] == size and img_hw3.shape[1] == size:
    return img_hw3
  return random_crop(img_hw3, size, rng) if rng is not None else center_crop(img_hw3, size)


def to_float(images_u8):
  """uint8 [0, 255] -> float32 [-1, 1] (any leading shape)."""
  return images_u8.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def to_uint8(images_f):
  """float [-1, 1] -> uint8 [0, 255] (any leading shape); inverse of to_float."""
  x = (np.asarray(images_f, np.float32) + 1.0) * 127.5
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def image_grid(images_nhwc, ncols=None, pad=2):
  """uint8 grid of N images (N, H, W, 3), `ncols` per row, separated by white lines."""
  images = np.asarray(images_nhwc)
  n, h, w, c = images.shape
  ncols = ncols or int(np.ceil(np.sqrt(n)))
  nrows = int(np.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    grid[top:top + h, left:left + w] = img
  return grid


def resize_and_crop_float(images_nhwc, height, width):
  """Float images (N, H, W, C) -> (N, height, width, C): the shorter side scaled to
  fit (bicubic, antialiased), then a centre crop; the float twin of `resize_and_crop`."""
  images = jnp.asarray(images_nhwc, jnp.float32)
  n, h, w, c = images.shape
  k = max(height / h, width / w)
  nh, nw = max(height, round(h * k)), max(width, round(w * k))
  if (nh, nw) != (h, w):
    images = jax.image.resize(images, (n, nh, nw, c), "bicubic", antialias=True)
  top, left = (nh - height) // 2, (nw - width) // 2
  return images[:, top:top + height, left:left + width]


def clip_processor_crop(img_hw3, shortest_edge, crop_size):
  """uint8 (H, W, 3) -> (crop_size, crop_size, 3) with the geometry of transformers'
  CLIPImageProcessor (PIL backend): the shorter side to `shortest_edge` and the longer one
  truncated (int), PIL bicubic without reducing_gap, then a centre crop at floored offsets
  (zero-padded where the image is smaller). Imported image towers see what they saw."""
  h, w = img_hw3.shape[:2]
  short, long = min(h, w), max(h, w)
  new_short, new_long = shortest_edge, int(shortest_edge * long / short)
  nh, nw = (new_short, new_long) if h <= w else (new_long, new_short)
  if (nh, nw) != (h, w):
    img_hw3 = np.asarray(Image.fromarray(img_hw3).resize((nw, nh), Image.BICUBIC,
                                                         reducing_gap=None))
  ph, pw = max(crop_size, nh), max(crop_size, nw)
  if (ph, pw) != (nh, nw):
    top, left = -(-(ph - nh) // 2), -(-(pw - nw) // 2)
    padded = np.zeros((ph, pw, img_hw3.shape[2]), img_hw3.dtype)
    padded[top:top + nh, left:left + nw] = img_hw3
    img_hw3 = padded
  top, left = (ph - crop_size) // 2, (pw - crop_size) // 2
  return img_hw3[top:top + crop_size, left:left + crop_size]
