"""Sample-quality metrics on Inception / CLIP features, defined as the reference evaluators do.

  kernel_inception_distance   KID: unbiased MMD² with the cubic polynomial kernel
                              k(x, y) = (x·y / d + 1)³, averaged over random subsets
                              (clean-fid's kernel_distance, torch-fidelity's kid; 100 subsets of
                              min(1000, N_real, N_fake) rows by default)
  inception_score             IS: exp(E_x KL(p(y|x) || p(y))) per split, p from the softmax of the
                              1008-class head without its bias (the original TF code's
                              'softmax/logits/MatMul', torch-fidelity's logits_unbiased)
  precision_recall            improved precision / recall (Kynkäänniemi et al.) as guided-diffusion's
                              evaluator computes it: k = 3, squared Euclidean distances, a sample is
                              on the reference manifold when within the k-th-neighbour radius of
                              some reference point (and vice versa for recall)
  clip_score                  both definitions from unit-norm CLIP embeddings:
                              torchmetrics: 100 · max(mean cos, 0) (clamp after the mean);
                              Hessel et al. 2021 (CLIP-S): mean of 2.5 · max(cos, 0) (per pair)
"""
import numpy as np


def _subset_mmd2(x, y):
  d = x.shape[1]
  m = x.shape[0]
  kxx = (x @ x.T / d + 1) ** 3
  kyy = (y @ y.T / d + 1) ** 3
  kxy = (x @ y.T / d + 1) ** 3
  off_diag = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
  return off_diag - 2 * kxy.sum() / (m * m)


def kernel_inception_distance(real_nd, fake_nd, num_subsets=100, subset_size=1000, seed=0):
  """{'kid_mean', 'kid_std', 'subset_size', 'num_subsets'} in float64."""
  real = np.asarray(real_nd, np.float64)
  fake = np.asarray(fake_nd, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"KID needs (N, D) features of equal D, got {real.shape} and {fake.shape}")
  m = min(len(real), len(fake), subset_size)
  if m < 2:
    raise ValueError(f"KID needs at least 2 samples per side, got {len(real)} and {len(fake)}")
  rng = np.random.default_rng(seed)
  values = np.array([
      _subset_mmd2(real[rng.choice(len(real), m, replace=False)],
                   fake[rng.choice(len(fake), m, replace=False)])
      for _ in range(num_subsets)])
  return {"kid_mean": float(values.mean()), "kid_std": float(values.std()),
          "subset_size": int(m), "num_subsets": int(num_subsets)}


def inception_score(logits_nk, splits=10):
  """{'is_mean', 'is_std', 'splits'} from unbiased 1008-class logits (contiguous splits)."""
  logits = np.asarray(logits_nk, np.float64)
  if logits.ndim != 2 or len(logits) < splits:
    raise ValueError(f"IS needs (N, K) logits with N >= splits={splits}, got {logits.shape}")
  logits = logits - logits.max(axis=1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  p = np.exp(log_p)
  n = len(p)
  scores = []
  for k in range(splits):
    part_p, part_log_p = p[k * n // splits:(k + 1) * n // splits], log_p[k * n // splits:(k + 1) * n // splits]
    log_py = np.log(part_p.mean(axis=0))
    kl = (part_p * (part_log_p - log_py)).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return {"is_mean": float(np.mean(scores)), "is_std": float(np.std(scores)), "splits": splits}


def _sq_distances(a, b):
  """Squared Euclidean distances (len(a), len(b)) in float32, clipped at 0."""
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  d = (a * a).sum(1)[:, None] - 2 * (a @ b.T) + (b * b).sum(1)[None, :]
  return np.maximum(d, 0)


def manifold_radii(features_nd, k=3, block=1024):
  """Squared distance of each row to its k-th nearest other row (self is at index 0)."""
  f = np.asarray(features_nd, np.float32)
  if len(f) <= k:
    raise ValueError(f"precision/recall with k={k} needs more than {k} samples per side, "
                     f"got {len(f)}")
  out = np.empty(len(f), np.float32)
  for s in range(0, len(f), block):
    d = _sq_distances(f[s:s + block], f)
    out[s:s + block] = np.partition(d, k, axis=1)[:, k]
  return out


def _covered(points, ref, ref_radii, block=1024):
  """For each point: is it within some reference point's radius?"""
  out = np.zeros(len(points), bool)
  for s in range(0, len(points), block):
    out[s:s + block] = (_sq_distances(points[s:s + block], ref) <= ref_radii[None, :]).any(axis=1)
  return out


def precision_recall(real_nd, fake_nd, k=3):
  """{'precision', 'recall', 'k'}: precision = fake on the real manifold, recall vice versa."""
  real = np.asarray(real_nd, np.float32)
  fake = np.asarray(fake_nd, np.float32)
  real_radii, fake_radii = manifold_radii(real, k), manifold_radii(fake, k)
  return {"precision": float(_covered(fake, real, real_radii).mean()),
          "recall": float(_covered(real, fake, fake_radii).mean()), "k": k}


def clip_score(image_emb_ne, text_emb_ne):
  """Both CLIP score definitions from paired unit-norm embeddings (row i with row i)."""
  img = np.asarray(image_emb_ne, np.float64)
  txt = np.asarray(text_emb_ne, np.float64)
  if img.shape != txt.shape or img.ndim != 2:
    raise ValueError(f"CLIP score needs paired (N, E) embeddings, got {img.shape} and {txt.shape}")
  img = img / np.linalg.norm(img, axis=1, keepdims=True)
  txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
  cos = (img * txt).sum(axis=1)
  return clip_score_from_sums(len(cos), cos.sum(), np.maximum(cos, 0.0).sum())


def clip_score_from_sums(n, sum_cos, sum_pos_cos):
  """Both CLIP score definitions from N pairs' Σ cos and Σ max(cos, 0): what a sharded
  evaluation merges over devices and processes (evaluate/clip_cosines.py)."""
  if n < 1:
    raise ValueError("CLIP score needs at least one (image, caption) pair")
  mean = float(sum_cos) / n
  return {"clip_score_torchmetrics": float(100 * max(mean, 0.0)),
          "clip_score_hessel": float(2.5 * sum_pos_cos / n),
          "mean_cosine": mean, "num_pairs": int(n)}
