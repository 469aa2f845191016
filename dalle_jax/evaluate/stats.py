"""Feature statistics in float64 and the Fréchet distance between two Gaussians.

    s = Statistics.zeros(2048)
    for batch in ...: s.update(pool_bd)           # this process's valid rows
    s = s.allreduce_processes()                    # Σx, Σxxᵀ, N summed over every process
    fid = frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma)

Sharded extraction never forms per-device or per-host covariances: every process adds its rows
into Σx, Σxxᵀ and N (float64 sums) and the sums are merged, so the result equals one pass over
all rows whatever the device or process count (up to float64 rounding). `sigma` is the unbiased
covariance (ddof 1), as np.cov in pytorch-fid / clean-fid / TTUR.

The matrix square root: FID needs tr((Σ1 Σ2)^{1/2}). Σ1 Σ2 is not symmetric, and with N < D
samples (N < 2048) both covariances are singular, where a general sqrtm (scipy's Schur method,
pytorch-fid) can return complex or inaccurate values. We factor one covariance as Σ = F Fᵀ
(F: D x r, r its numerical rank, by pivoted Cholesky); then Σ1 Σ2 = Σ_o F Fᵀ shares its
non-zero eigenvalues with the symmetric PSD r x r matrix M = Fᵀ Σ_o F, and
tr((Σ1 Σ2)^{1/2}) = Σ_i sqrt(λ_i(M)), from eigvalsh clipped at 0, all in float64: no complex
arithmetic, no regularising offset, exact for rank-deficient covariances, and the lower-rank
side is the one factored (a 5-sample covariance costs a 4 x 4 eigenproblem, not a 2048 one).

Files: `.npz` with `mu` (D,) and `sigma` (D, D), as pytorch-fid, clean-fid and TTUR write them;
ours also store `num_samples` (ignored by the others).
"""
import dataclasses
import os

import numpy as np
import scipy.linalg


@dataclasses.dataclass
class Statistics:
  """Running float64 sums of features: n rows, Σx (D,), Σxxᵀ (D, D)."""
  n: int
  sum: np.ndarray
  sum_outer: np.ndarray

  @classmethod
  def zeros(cls, dim):
    return cls(0, np.zeros((dim,), np.float64), np.zeros((dim, dim), np.float64))

  @classmethod
  def of(cls, features_nd):
    s = cls.zeros(np.shape(features_nd)[-1])
    s.update(features_nd)
    return s

  @property
  def dim(self):
    return self.sum.shape[0]

  def update(self, features_nd):
    x = np.asarray(features_nd, np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f"features of shape {x.shape}; expected (N, {self.dim})")
    self.n += x.shape[0]
    self.sum += x.sum(axis=0)
    self.sum_outer += x.T @ x
    return self

  def merge(self, other):
    if other.dim != self.dim:
      raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
    return Statistics(self.n + other.n, self.sum + other.sum, self.sum_outer + other.sum_outer)

  def allreduce_processes(self):
    """The sums over every JAX process (identity in a single-process run)."""
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() == 1:
      return self
    total = sum_over_processes(np.concatenate([[float(self.n)], self.sum,
                                               self.sum_outer.reshape(-1)]))
    d = self.dim
    return Statistics(int(round(total[0])), total[1:1 + d], total[1 + d:].reshape(d, d))

  @property
  def mu(self):
    return self.sum / self.n

  @property
  def sigma(self):
    if self.n < 2:
      raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
    mu = self.mu
    cov = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
    return (cov + cov.T) / 2

  def save(self, path):
    save_stats(path, self.mu, self.sigma, self.n)


def sum_over_processes(values):
  """float64 values (1-D) summed over every JAX process, returned on every process.

  JAX arrays are float32 here (no x64), so each float64 value travels as a float32 pair
  hi + lo, which carries ~48 of float64's 53 mantissa bits; the pairs are summed in float64.
  """
  import jax  # pylint: disable=g-import-not-at-top
  flat = np.asarray(values, np.float64)
  if jax.process_count() == 1:
    return flat
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  hi = flat.astype(np.float32)
  lo = (flat - hi.astype(np.float64)).astype(np.float32)
  gathered = multihost_utils.process_allgather(np.stack([hi, lo]))  # (P, 2, len(values))
  return gathered.astype(np.float64).sum(axis=(0, 1))


def save_stats(path, mu, sigma, num_samples=None):
  extra = {} if num_samples is None else {"num_samples": np.int64(num_samples)}
  np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)


def load_stats(path):
  """(mu, sigma, num_samples or None) from a pytorch-fid / clean-fid / TTUR statistics .npz."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path!r}: no such statistics file")
  with np.load(path) as f:
    if "mu" not in f.files or "sigma" not in f.files:
      raise ValueError(f"{path!r}: a statistics .npz holds 'mu' and 'sigma'; it has {f.files}")
    mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    n = int(f["num_samples"]) if "num_samples" in f.files else None
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{path!r}: mu {mu.shape} and sigma {sigma.shape} do not match (D,), (D, D)")
  return mu, sigma, n


def psd_factor(sigma):
  """F (D, r) with F Fᵀ = Σ for a symmetric PSD Σ of numerical rank r: LAPACK's pivoted
  Cholesky (dpstrf), which stops at the rank: O(D r²) for the rank-deficient covariances of
  N < D samples, D³/3 at full rank."""
  a = np.array((sigma + sigma.T) / 2, np.float64, order="F")
  c, piv, rank, info = scipy.linalg.lapack.dpstrf(a, lower=1)
  if info < 0:
    raise ValueError(f"pivoted Cholesky failed (LAPACK info {info})")
  factor = np.zeros((a.shape[0], rank), np.float64)
  factor[piv - 1] = np.tril(c)[:, :rank]  # Pᵀ Σ P = L Lᵀ  ->  Σ = (P L)(P L)ᵀ
  return factor


def trace_sqrt_product(sigma1, sigma2):
  """tr((Σ1 Σ2)^{1/2}) for symmetric PSD Σ1, Σ2 (see the module docstring)."""
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  f1, f2 = psd_factor(sigma1), psd_factor(sigma2)
  f, other = (f1, sigma2) if f1.shape[1] <= f2.shape[1] else (f2, sigma1)
  if not f.shape[1]:
    return 0.0
  m = f.T @ other @ f  # (r, r): its eigenvalues are Σ1 Σ2's non-zero ones
  lam = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2):
  """||μ1 - μ2||² + tr(Σ1) + tr(Σ2) - 2 tr((Σ1 Σ2)^{1/2}), in float64."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {sigma1.shape} vs {sigma2.shape}")
  for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{name} holds non-finite values")
  diff = mu1 - mu2
  value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
  return float(max(value, 0.0))  # rounding can leave -1e-12 for identical statistics
