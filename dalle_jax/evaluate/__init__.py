"""Sample-quality evaluation: FID, KID, IS, precision/recall, CLIP score, rFID.

Library API (what `python -m dalle_jax.evaluate` and in-memory scoring use):

  from dalle_jax.evaluate import InceptionExtractor, Statistics, frechet_distance
  ext = InceptionExtractor(load_inception_params(PTH), mode="legacy_pytorch")
  feats = ext(images_u8_nhwc)                # {'pool': (N, 2048), 'logits_unbiased': (N, 1008)}
  s = Statistics.of(feats["pool"])           # float64 Σx, Σxxᵀ, N; .merge(), .allreduce_processes()
  fid = frechet_distance(s.mu, s.sigma, *load_stats("ref.npz")[:2])

Modules: features (resize modes, the sharded extractor), stats (float64 statistics, the Fréchet
distance), metrics (KID, IS, precision/recall, CLIP score), clip_cosines (CLIP score's cosines
sharded over devices and processes), sources (folders, .npz, statistics, TFDS splits; sharded
extraction over devices and processes), generate (sample a caption set with
any family's pipeline and score it in memory), periodic (the trainer's FID / CLIP score hook,
config.eval_metrics), cli (the command line).
"""
from dalle_jax.convert.inception import load_inception_params
from dalle_jax.evaluate.clip_cosines import ClipCosines, CosineSums
from dalle_jax.evaluate.features import InceptionExtractor, MODES, feature_checksum
from dalle_jax.evaluate.metrics import (clip_score, inception_score, kernel_inception_distance,
                                        precision_recall)
from dalle_jax.evaluate.sources import extract, open_source
from dalle_jax.evaluate.stats import Statistics, frechet_distance, load_stats, save_stats
