"""CLIP score's (image, caption) cosines, sharded over every device of every process.

    cosines = ClipCosines(rerank.get_encoder("demo/clip"), batch_size=64)
    sums = cosines.of_source(source, captions)    # CosineSums, merged over every process
    sums.result()                                 # both CLIP score definitions (metrics.py)

Rows as `sources.extract`: global batch b covers rows [b*G, (b+1)*G) and process p embeds its
contiguous slice of images and captions; one program runs both CLIP towers over the global
mesh (rows on 'data') and returns each row's cosine. Every process sums its valid rows in
float64 (N, Σ cos, Σ max(cos, 0): all that either definition needs) and the sums are added
over processes (stats.sum_over_processes), so the score equals one pass over all pairs
whatever the device or process count.

Images of any size are brought to the CLIP's input by the encoder's own preprocessing
(shorter side to S, antialiased, centre crop), batched when a process's rows share a size and
image by image otherwise: the same maths either way, so the split cannot change a score.

Shapes: B global rows, S the CLIP's image size, T its text length, E its embedding width.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from dalle_jax import parallel
from dalle_jax.evaluate import features as feat_lib
from dalle_jax.evaluate import metrics
from dalle_jax.evaluate import sources as src_lib
from dalle_jax.evaluate import stats as stats_lib
from dalle_jax.models import clip as clip_lib


# Module level (the Linen model is a static, hashable argument): every ClipCosines of the same
# CLIP, batch and mesh shares one compiled program.
@functools.partial(jax.jit, static_argnums=0)
def _cosines_jit(model, variables, images_bssc, ids_bt, mask_bt):
  img_be = model.apply(variables, images_bssc, False, method=clip_lib.CLIP.encode_image)
  txt_be = model.apply(variables, ids_bt, mask_bt, False, method=clip_lib.CLIP.encode_text)
  img_be = img_be / jnp.linalg.norm(img_be, axis=-1, keepdims=True)
  txt_be = txt_be / jnp.linalg.norm(txt_be, axis=-1, keepdims=True)
  return jnp.sum(img_be * txt_be, axis=-1)  # (B,) float32


@dataclasses.dataclass
class CosineSums:
  """Running float64 sums over (image, caption) pairs: n, Σ cos, Σ max(cos, 0)."""
  n: int = 0
  sum_cos: float = 0.0
  sum_pos_cos: float = 0.0

  def update(self, cos):
    cos = np.asarray(cos, np.float64)
    self.n += int(cos.size)
    self.sum_cos += float(cos.sum())
    self.sum_pos_cos += float(np.maximum(cos, 0.0).sum())
    return self

  def merge(self, other):
    return CosineSums(self.n + other.n, self.sum_cos + other.sum_cos,
                      self.sum_pos_cos + other.sum_pos_cos)

  def allreduce_processes(self):
    """The sums over every JAX process (identity in a single-process run)."""
    n, s, pos = stats_lib.sum_over_processes([self.n, self.sum_cos, self.sum_pos_cos])
    return CosineSums(int(round(n)), float(s), float(pos))

  def result(self):
    return metrics.clip_score_from_sums(self.n, self.sum_cos, self.sum_pos_cos)


class ClipCosines:
  """Per-row cosines of a ClipEncoder's (image, caption) pairs over a global 'data' mesh.

  batch_size: global rows per call (rounded up to a multiple of the device count); every
  process contributes `local_batch` = batch_size / process_count rows.
  """

  def __init__(self, encoder, batch_size=64, mesh=None):
    self.encoder = encoder
    self.mesh = mesh or feat_lib.data_mesh()
    n_dev = self.mesh.devices.size
    self.batch_size = max(n_dev, -(-batch_size // n_dev) * n_dev)
    self.local_batch = self.batch_size // jax.process_count()
    self._rows = NamedSharding(self.mesh, P("data"))
    variables = encoder.variables  # replicated over this process's devices
    if jax.process_count() > 1:  # host copies, the same on every process, to the global mesh
      variables = jax.tree.map(np.asarray, variables)
    self.variables = jax.device_put(variables, NamedSharding(self.mesh, P()))
    self.model = encoder.model

  def prepare_local(self, images):
    """This process's uint8 images (a list, any sizes) -> float32 (n, S, S, 3) CLIP input."""
    if len({np.shape(im) for im in images}) == 1:
      return self.encoder.prepare_images(np.stack(images))
    return np.concatenate([self.encoder.prepare_images(im[None]) for im in images])

  def run_local(self, images, captions):
    """Exactly local_batch images and captions of this process -> their (local_batch,) cosines."""
    if len(images) != self.local_batch or len(captions) != self.local_batch:
      raise ValueError(f"run_local takes {self.local_batch} rows, got {len(images)} images "
                       f"and {len(captions)} captions")
    ids, mask = self.encoder.tokenizer.encode(list(captions), self.encoder.max_len)
    put = lambda a: jax.make_array_from_process_local_data(self._rows, np.asarray(a))
    cos = _cosines_jit(self.model, self.variables, put(self.prepare_local(images)), put(ids),
                       put(mask))
    return parallel.host_local(cos)

  def of_source(self, source, captions, progress=None):
    """CosineSums of every readable image of `source` with its caption, merged over processes
    (every process passes the same source and captions; each reads only its rows).

    Returns (sums, number of unreadable images skipped)."""
    if len(captions) != len(source):
      raise ValueError(f"{len(source)} images but {len(captions)} captions")
    sums, skipped = CosineSums(), 0
    for rows, images, valid in src_lib.local_batches(source, self.batch_size, self.local_batch,
                                                     progress):
      skipped += len(rows) - int(valid[:len(rows)].sum())
      caps = [captions[i] for i in rows] + [captions[0]] * (self.local_batch - len(rows))
      sums.update(self.run_local(images, caps)[valid])
    return sums.allreduce_processes(), src_lib.sum_processes(skipped)
