"""Vectorised k-means over many independent problems (the codebooks of product VQ).

k-means++ seeding, then Lloyd iterations, for ``problems`` point sets at once; distances
are computed in blocks that keep temporaries under ``WORK_BYTES``.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

WORK_BYTES = 32 << 20          # temporaries of k-means distance blocks stay under this


def _block_rows(p: int, n: int, k: int) -> int:
    """Rows per block so that a [p, rows, k] float32 distance block stays small."""
    return max(1, min(n, WORK_BYTES // max(1, 4 * p * k)))


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid of every point, for many problems at once.

    Parameters
    ----------
    x : numpy.ndarray, float32, shape ``[problems, n, d]``
    centroids : numpy.ndarray, float32, shape ``[problems, k, d]``

    Returns
    -------
    numpy.ndarray, int64, shape ``[problems, n]``
    """
    p, n, _ = x.shape
    k = centroids.shape[1]
    codes = np.empty((p, n), np.int64)
    half_sq = 0.5 * np.einsum("pkd,pkd->pk", centroids, centroids)[:, None, :]
    ct = centroids.transpose(0, 2, 1)
    step = _block_rows(p, n, k)
    for a in range(0, n, step):
        # |x - c|^2 / 2 - |x|^2 / 2: the same order of centroids, without the |x|^2 term
        codes[:, a:a + step] = (half_sq - x[:, a:a + step] @ ct).argmin(axis=2)
    return codes


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, max_iter: int = 25, tol: float = 1e-3,
           max_train: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised k-means over many independent problems: k-means++ seeding, then Lloyd.

    Parameters
    ----------
    x : numpy.ndarray, float32, shape ``[problems, n, d]``
        ``problems`` independent sets of ``n`` points each.
    k : int
        Centroids per problem, ``1 <= k <= n``.
    seed : int
        Seed of the random choices (seeding, training subsample): equal inputs give
        equal outputs.
    max_iter : int
        Lloyd iterations at most.
    tol : float
        Stop once an iteration changes the assignment of at most this fraction of the
        training points (0: only at a fixed point).
    max_train : int, optional
        Train on a random subset of at most this many points per problem (default
        ``256 * k``, as faiss does); the returned codes cover all points.

    Returns
    -------
    centroids : numpy.ndarray, float32, shape ``[problems, k, d]``
    codes : numpy.ndarray, int64, shape ``[problems, n]``
        Index of the nearest centroid of every point.

    Notes
    -----
    A cluster left empty by an iteration keeps its previous centroid.
    """
    p, n, d = x.shape
    if not 1 <= k <= n:
        raise ConfigError(f"k-means needs 1 <= k <= n points, found k={k}, n={n}")
    rng = np.random.default_rng(seed)
    max_train = 256 * k if max_train is None else max_train
    train = x
    if n > max_train:
        train = x[:, np.sort(rng.choice(n, max_train, replace=False))]
    m = train.shape[1]
    rows = np.arange(p)

    # k-means++: each new centroid is a point drawn with probability ~ squared distance
    # to the nearest centroid so far.
    centroids = np.empty((p, k, d), np.float32)
    centroids[:, 0] = train[rows, rng.integers(m, size=p)]
    dist2 = ((train - centroids[:, :1]) ** 2).sum(axis=2)
    for j in range(1, k):
        cum = np.cumsum(dist2, axis=1, dtype=np.float64)
        total = cum[:, -1]
        u = rng.random(p) * total
        pick = np.minimum((cum < u[:, None]).sum(axis=1), m - 1)
        flat = total <= 0                            # every point already is a centroid
        pick[flat] = rng.integers(m, size=int(flat.sum()))
        centroids[:, j] = train[rows, pick]
        dist2 = np.minimum(dist2, ((train - centroids[:, j:j + 1]) ** 2).sum(axis=2))

    offsets = (rows * k)[:, None]
    codes = nearest_centroid(train, centroids)
    for _ in range(max_iter):
        flat = (codes + offsets).ravel()
        counts = np.bincount(flat, minlength=p * k).reshape(p, k)
        filled = counts > 0
        for j in range(d):
            sums = np.bincount(flat, weights=train[:, :, j].ravel(), minlength=p * k).reshape(p, k)
            centroids[:, :, j][filled] = (sums[filled] / counts[filled]).astype(np.float32)
        new = nearest_centroid(train, centroids)
        changed = np.count_nonzero(new != codes)
        codes = new
        if changed <= tol * codes.size:
            break
    return centroids, (codes if train is x else nearest_centroid(x, centroids))
