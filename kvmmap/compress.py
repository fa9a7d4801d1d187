"""Offline compression of K/V: low-rank projection, product vector quantization, hybrid.

:class:`KVCacheCompressor` turns a K/V pair into a :class:`CompressedKV` (arrays that can
be saved to ``.npz``) and back, and reports the compression ratio and the relative error
it achieved. :func:`compress_cache` re-encodes every sequence of a cache file into a new
file, optionally through a compressor.

Methods
-------
``"lowrank"`` (after PALU)
    Tokens of a *group* of ``group_heads`` heads are vectors of ``group_heads * head_dim``
    elements; their mean is removed and they are projected on the leading ``rank``
    eigenvectors of their covariance (the right singular vectors of the centred data),
    so that ``x ~ mean + latent @ basis.T`` with ``latent`` of ``rank`` values per token.
    ``group_heads=1`` is PALU's per-head decomposition, ``group_heads=num_heads`` the
    joint one, values between its group-head trade-off. Without ``rank``, the rank is the
    smallest that keeps ``energy`` of the centred spectrum in every group, so the
    relative error is at most ``sqrt(1 - energy)``. By Eckart-Young no other rank-``r``
    affine projection of these tokens has a smaller error.
``"vq"`` (product quantization)
    Each head's token vectors are cut into sub-vectors of ``subvector_dim`` elements and
    each (head, sub-vector position) gets a k-means codebook of ``codebook_size``
    centroids (k-means++ seeding, Lloyd iterations, a fixed seed); a token stores one code
    per sub-vector: ``log2(codebook_size) / subvector_dim`` bits per element. Whole-vector
    VQ would need ``2 ** (bits * head_dim)`` centroids for the same rate; sub-vectors
    make the rate a free choice and the codebooks small.
``"hybrid"``
    ``"lowrank"``, then the latent is quantized with :func:`kvmmap.quantize`, per token
    (int8: a scale; int4: a scale and a zero point). The basis is first turned by a seeded
    random rotation (PALU rotates its latents by a Hadamard transform for the same
    reason): it spreads the variance of the leading components over all latent
    dimensions, so that a per-token scale suits all of them. The rotation is folded into
    the basis and costs nothing at decompression.

Basis, mean and codebooks are *parameters*: fitted on the data passed to
:meth:`KVCacheCompressor.compress_kv`, or once by :meth:`KVCacheCompressor.fit` on
calibration data and then shared by every later call (PALU's projections and VQ
codebooks are calibrated offline in the same way). ``ratio`` counts every byte of a
:class:`CompressedKV`, parameters included; ``ratio_shared`` leaves the parameters out:
what each further sequence costs once they are shared.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .codecs import quant
from .errors import CacheFileError, ConfigError, DTypeError, FormatError, NonFiniteError, ShapeError, describe

METHODS = ("lowrank", "vq", "hybrid")
_QUANT_FORMAT = {8: "int8", 4: "int4"}
_WORK_BYTES = 32 << 20          # temporaries of k-means distance blocks stay under this
_NPZ_VERSION = 1


# ---------------------------------------------------------------------------------- results


@dataclass
class CompressedTensor:
    """One side (K or V) in compressed form.

    Attributes
    ----------
    method : str
        ``"lowrank"``, ``"vq"`` or ``"hybrid"``.
    shape : tuple of int
        ``(batch, heads, seq, head_dim)`` of the input (a 3-D input has batch 1).
    arrays : dict of str to numpy.ndarray
        lowrank: ``mean`` float32 ``[groups, group_heads * head_dim]``, ``basis`` float32
        ``[groups, group_heads * head_dim, rank]``, ``latent`` float32
        ``[groups, batch * seq, rank]``. hybrid: ``mean``, ``basis``, and the quantized
        latent as ``codes``, ``scales`` (and ``zeros`` for int4) in the layout of
        :func:`kvmmap.quantize` for ``[groups, batch * seq, rank]``. vq: ``codebooks``
        float32 ``[heads, head_dim // subvector_dim, codebook_size, subvector_dim]``,
        ``codes`` uint8 or uint16 ``[batch, heads, seq, head_dim // subvector_dim]``.
    params : dict
        Scalars that describe the arrays: ``rank``, ``group_heads``, ``format``,
        ``group_size`` (lowrank / hybrid), ``codebook_size``, ``subvector_dim`` (vq).
    """

    method: str
    shape: tuple
    arrays: dict
    params: dict

    _SHARED = ("mean", "basis", "codebooks")

    @property
    def nbytes(self) -> int:
        """Bytes of every array, parameters included."""
        return sum(a.nbytes for a in self.arrays.values())

    @property
    def nbytes_shared(self) -> int:
        """Bytes of the parameters (mean, basis, codebooks), which sequences may share."""
        return sum(a.nbytes for n, a in self.arrays.items() if n in self._SHARED)


@dataclass
class CompressedKV:
    """K and V in compressed form, as returned by :meth:`KVCacheCompressor.compress_kv`.

    Attributes
    ----------
    k, v : CompressedTensor
    ndim : int
        3 or 4: the rank of the arrays that were compressed (decompression returns it).
    dtype : str
        dtype of the input (decompression returns it).
    report : dict
        ``method``; ``ratio`` = input bytes / :attr:`nbytes`; ``ratio_shared`` = input
        bytes / (:attr:`nbytes` - parameter bytes); ``bytes_in``, ``bytes_out``,
        ``bytes_shared``; ``k_rel_error``, ``v_rel_error`` = ``||x - x'|| / ||x||``
        (Frobenius); ``k_max_abs_error``, ``v_max_abs_error``; ``k_rank``, ``v_rank``
        (lowrank, hybrid) or ``codebook_size`` (vq).
    """

    k: CompressedTensor
    v: CompressedTensor
    ndim: int
    dtype: str
    report: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def save(self, path) -> None:
        """Write to ``path`` in ``.npz`` form (an uncompressed zip of arrays, nothing pickled).

        The arrays are named ``k.<name>`` / ``v.<name>`` after :attr:`CompressedTensor.arrays`,
        plus ``__header__``: UTF-8 JSON with the version, shapes, params and report.

        Parameters
        ----------
        path : str or os.PathLike
            Written under exactly this name (no ``.npz`` is appended); an existing file
            is replaced.

        Raises
        ------
        OSError
            The file cannot be written.
        TypeError
            The report holds a value that JSON cannot encode.
        """
        head = {"version": _NPZ_VERSION, "ndim": self.ndim, "dtype": self.dtype, "report": self.report}
        arrays = {}
        for side in ("k", "v"):
            t = getattr(self, side)
            head[side] = {"method": t.method, "shape": list(t.shape), "params": t.params}
            for name, a in t.arrays.items():
                arrays[f"{side}.{name}"] = a
        with open(path, "wb") as f:       # a file object: numpy would append ".npz" to a bare name
            np.savez(f, __header__=np.frombuffer(json.dumps(head).encode(), np.uint8), **arrays)

    @classmethod
    def load(cls, path) -> "CompressedKV":
        """Read a file written by :meth:`save`.

        Parameters
        ----------
        path : str or os.PathLike

        Returns
        -------
        CompressedKV
            The arrays as saved (dtypes and shapes of :attr:`CompressedTensor.arrays`),
            with ``ndim``, ``dtype`` and ``report``.

        Raises
        ------
        CacheFileError
            The file is missing or unreadable, is not a zip of arrays written by
            :meth:`save`, or has another version. Its message names the path.
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                head = json.loads(bytes(z["__header__"]).decode())
                if head.get("version") != _NPZ_VERSION:
                    raise CacheFileError(f"{path}: compressed K/V version {head.get('version')!r}, expected {_NPZ_VERSION}")
                sides = {}
                for side in ("k", "v"):
                    h = head[side]
                    prefix = f"{side}."
                    arrays = {n[len(prefix):]: z[n] for n in z.files if n.startswith(prefix)}
                    sides[side] = CompressedTensor(h["method"], tuple(h["shape"]), arrays, h["params"])
                return cls(sides["k"], sides["v"], head["ndim"], head["dtype"], head["report"])
        except CacheFileError:
            raise
        except OSError as e:        # missing, a directory, unreadable
            raise CacheFileError(f"cannot read {path}: {e.strerror or e}") from None
        except (KeyError, ValueError, TypeError, AttributeError, EOFError, zipfile.BadZipFile) as e:
            raise CacheFileError(f"{path}: not a compressed K/V file written by CompressedKV.save "
                                 f"({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------- k-means


def _block_rows(p: int, n: int, k: int) -> int:
    """Rows per block so that a [p, rows, k] float32 distance block stays small."""
    return max(1, min(n, _WORK_BYTES // max(1, 4 * p * k)))


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


# ---------------------------------------------------------------------------------- helpers


def _as_float(x, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(the input as an array, its float32 copy viewed as [B, H, S, D]), checked."""
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as e:
            raise DTypeError(f"{name} must be a numpy array (or convertible to one), found {type(x).__name__}: {e}") from None
    if x.dtype not in (np.float16, np.float32, np.float64):
        raise DTypeError(f"{name} must be float16, float32 or float64, found {x.dtype}")
    if x.ndim not in (3, 4):
        raise ShapeError(f"{name} must be [batch, heads, seq, head_dim] or [heads, seq, head_dim], found {describe(x)}")
    if 0 in x.shape:
        raise ShapeError(f"{name} must have at least one element on every axis, found {describe(x)}")
    if not np.isfinite(x).all():
        raise NonFiniteError(f"{name} holds NaN or infinity; only finite values can be compressed")
    with np.errstate(over="ignore"):
        x32 = np.asarray(x, np.float32)
    if not np.isfinite(x32).all():
        raise NonFiniteError(f"{name} holds values beyond float32's range (|x| <= 3.4e38)")
    return x, (x32 if x32.ndim == 4 else x32[None])


def _rel_error(x: np.ndarray, y: np.ndarray) -> float:
    num = float(np.linalg.norm((x - y).ravel()))
    den = float(np.linalg.norm(x.ravel()))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _to_groups(x: np.ndarray, group_heads: int) -> np.ndarray:
    """[B, H, S, D] -> [H / g, B * S, g * D] (tokens of a head group as rows)."""
    b, h, s, d = x.shape
    return np.ascontiguousarray(
        x.reshape(b, h // group_heads, group_heads, s, d).transpose(1, 0, 3, 2, 4)
    ).reshape(h // group_heads, b * s, group_heads * d)


def _from_groups(y: np.ndarray, shape: tuple, group_heads: int) -> np.ndarray:
    b, h, s, d = shape
    return np.ascontiguousarray(
        y.reshape(h // group_heads, b, s, group_heads, d).transpose(1, 0, 3, 2, 4)
    ).reshape(shape)


def energy_rank(singular_values: np.ndarray, energy: float) -> int:
    """Smallest ``r`` whose leading singular values keep ``energy`` of ``sum(s ** 2)``.

    Parameters
    ----------
    singular_values : numpy.ndarray, shape ``[n]``, in descending order
    energy : float, in (0, 1]

    Returns
    -------
    int, at least 1
    """
    e = np.asarray(singular_values, np.float64) ** 2
    total = e.sum()
    if total <= 0:
        return 1
    kept = np.cumsum(e) / total
    # a relative tolerance keeps energy=1.0 reachable despite rounding of the cumsum
    return int(min(np.searchsorted(kept, energy * (1 - 1e-12)) + 1, len(e)))


def _int4_width(rank: int) -> int:
    """Latent width stored for int4: even (two codes a byte) and, past 256, a multiple of 128."""
    return rank + rank % 2 if rank <= 256 else -(-rank // 128) * 128


def _int4_group(width: int) -> int:
    """int4 group along a latent row: the whole row (one scale and zero per token) up to 256."""
    return width if width <= 256 else (256 if width % 256 == 0 else 128)


def _random_rotation(r: int, seed: int) -> np.ndarray:
    q, rr = np.linalg.qr(np.random.default_rng(seed).standard_normal((r, r)))
    return q * np.sign(np.diag(rr))          # Haar-distributed orthogonal matrix


# ---------------------------------------------------------------------------------- compressor


class KVCacheCompressor:
    """Compress K/V arrays by low-rank projection, product VQ, or low rank + quantization.

    Parameters
    ----------
    method : {"lowrank", "vq", "hybrid"}
        See the module docstring.
    rank : int, optional
        lowrank / hybrid: latent dimensions per head group, ``1 .. group_heads *
        head_dim``. None: the smallest rank that keeps ``energy`` in every group (one rank
        for all groups of a side; K and V get their own).
    codebook_size : int
        vq: centroids per codebook, 2 .. 65536 (codes are uint8 up to 256, else uint16).
        Inputs with fewer tokens (batch * seq) use that many centroids instead.
    quant_bits : {8, 4}
        hybrid: int8 (a scale per token per head group) or int4 (a scale and a zero point
        per token per head group, over up to 256 latent values; the stored latent width is
        the rank rounded up to even, and past 256 to a multiple of 128).
    energy : float
        lowrank / hybrid without ``rank``: fraction of the centred spectrum to keep, in
        (0, 1]. The relative error of lowrank is then at most ``sqrt(1 - energy)``.
    group_heads : int
        lowrank / hybrid: heads decomposed together; must divide the number of heads.
    subvector_dim : int
        vq: elements per sub-vector; must divide head_dim.
    max_iter : int
        vq: Lloyd iterations at most.
    seed : int
        Seed of every random choice (k-means, the hybrid rotation).

    Examples
    --------
    >>> import numpy as np, kvmmap as km
    >>> rng = np.random.default_rng(0)
    >>> k = rng.standard_normal((1, 4, 256, 64)).astype(np.float32)
    >>> v = rng.standard_normal((1, 4, 256, 64)).astype(np.float32)
    >>> comp = km.KVCacheCompressor("lowrank", rank=64)
    >>> c = comp.compress_kv(k, v)
    >>> k2, v2 = comp.decompress_kv(c)
    >>> bool(np.allclose(k2, k, atol=1e-4)), c.report["k_rank"]
    (True, 64)
    """

    def __init__(self, method: str = "lowrank", rank: int | None = None, codebook_size: int = 256,
                 quant_bits: int = 8, *, energy: float = 0.99, group_heads: int = 1,
                 subvector_dim: int = 4, max_iter: int = 25, seed: int = 0):
        if method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, found {method!r}")

        def positive_int(name, v, hi=None):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1 or (hi and v > hi):
                raise ConfigError(f"{name} must be an integer in 1..{hi or 'inf'}, found {v!r}")
            return int(v)

        self.method = method
        self.rank = None if rank is None else positive_int("rank", rank)
        self.codebook_size = positive_int("codebook_size", codebook_size, 65536)
        if self.codebook_size < 2:
            raise ConfigError(f"codebook_size must be at least 2, found {codebook_size}")
        if quant_bits not in _QUANT_FORMAT:
            raise ConfigError(f"quant_bits must be 8 or 4, found {quant_bits!r}")
        self.quant_bits = int(quant_bits)
        if not isinstance(energy, (float, int)) or isinstance(energy, bool) or not 0 < energy <= 1:
            raise ConfigError(f"energy must be a fraction in (0, 1], found {energy!r}")
        self.energy = float(energy)
        self.group_heads = positive_int("group_heads", group_heads)
        self.subvector_dim = positive_int("subvector_dim", subvector_dim)
        self.max_iter = positive_int("max_iter", max_iter)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, found {seed!r}")
        self.seed = int(seed)
        self._fitted: dict | None = None

    def __repr__(self) -> str:
        opts = {"lowrank": ("rank", "energy", "group_heads"), "hybrid": ("rank", "energy", "group_heads", "quant_bits"),
                "vq": ("codebook_size", "subvector_dim")}[self.method]
        args = ", ".join(f"{o}={getattr(self, o)!r}" for o in opts)
        return f"KVCacheCompressor({self.method!r}, {args}{', fitted' if self._fitted else ''})"

    # ------------------------------------------------------------------ checks

    def _check_pair(self, k, v) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(k, v as given but as arrays, k, v as float32 [B, H, S, D]), checked."""
        k, k4 = _as_float(k, "k")
        v, v4 = _as_float(v, "v")
        if k.ndim != v.ndim or k.shape[:-1] != v.shape[:-1]:
            raise ShapeError(f"k and v must share batch, heads and seq, found {describe(k)} and {describe(v)}")
        for name, x in (("k", k4), ("v", v4)):
            self._check_geometry(name, x.shape)
        return k, v, k4, v4

    def _check_geometry(self, name: str, shape: tuple) -> None:
        _, h, _, d = shape
        if self.method == "vq":
            if d % self.subvector_dim:
                raise ConfigError(f"subvector_dim={self.subvector_dim} must divide {name}'s head_dim={d}")
            return
        if h % self.group_heads:
            raise ConfigError(f"group_heads={self.group_heads} must divide {name}'s {h} heads")
        width = self.group_heads * d
        if self.rank is not None and self.rank > width:
            raise ConfigError(
                f"rank={self.rank} exceeds the {width} dimensions of a head group of {name} "
                f"(group_heads={self.group_heads} x head_dim={d})"
            )

    # ------------------------------------------------------------------ fitting

    def fit(self, k, v) -> "KVCacheCompressor":
        """Learn the parameters (basis and mean, or codebooks) once, from calibration K/V.

        Later :meth:`compress_kv` calls reuse them instead of fitting on their own input;
        their inputs must have the same heads and head_dim.

        Parameters
        ----------
        k, v : numpy.ndarray, float, shape ``[batch, heads, seq, head_dim]`` or ``[heads, seq, head_dim]``

        Returns
        -------
        self
        """
        _, _, k4, v4 = self._check_pair(k, v)
        self._fitted = {"k": self._fit_side(k4), "v": self._fit_side(v4)}
        return self

    def _fit_side(self, x: np.ndarray) -> dict:
        if self.method == "vq":
            return self._fit_vq(x)
        return self._fit_lowrank(x)

    def _fit_lowrank(self, x: np.ndarray) -> dict:
        g = _to_groups(x, self.group_heads)
        mean = g.mean(axis=1, dtype=np.float64)
        centred = g - mean[:, None, :]
        gram = centred.transpose(0, 2, 1) @ centred              # [G, W, W], float64
        evals, evecs = np.linalg.eigh(gram)
        evals, evecs = evals[:, ::-1], evecs[:, :, ::-1]          # descending
        width = g.shape[2]
        if self.rank is not None:
            rank = self.rank
        else:
            sv = np.sqrt(np.maximum(evals, 0.0))
            rank = max(energy_rank(s, self.energy) for s in sv)
        stored = _int4_width(rank) if self.method == "hybrid" and self.quant_bits == 4 else rank
        basis = np.zeros((g.shape[0], width, stored))
        use = min(stored, width)
        basis[:, :, :use] = evecs[:, :, :use]
        if self.method == "hybrid":
            basis = basis @ _random_rotation(stored, self.seed)
        return {"mean": mean.astype(np.float32), "basis": basis.astype(np.float32), "rank": rank,
                "heads": x.shape[1], "head_dim": x.shape[3]}

    def _fit_vq(self, x: np.ndarray) -> dict:
        b, h, s, d = x.shape
        m = d // self.subvector_dim
        k = min(self.codebook_size, b * s)
        sub = self._subvectors(x)
        centroids, _ = kmeans(sub, k, seed=self.seed, max_iter=self.max_iter)
        return {"codebooks": centroids.reshape(h, m, k, self.subvector_dim), "heads": h, "head_dim": d}

    def _subvectors(self, x: np.ndarray) -> np.ndarray:
        """[B, H, S, D] -> [H * m, B * S, subvector_dim] (one k-means problem per row)."""
        b, h, s, d = x.shape
        m = d // self.subvector_dim
        return np.ascontiguousarray(
            x.reshape(b, h, s, m, self.subvector_dim).transpose(1, 3, 0, 2, 4)
        ).reshape(h * m, b * s, self.subvector_dim)

    # ------------------------------------------------------------------ compress

    def compress_kv(self, k, v) -> CompressedKV:
        """Compress K and V.

        Parameters
        ----------
        k, v : numpy.ndarray (or array-like, e.g. a CPU torch tensor), float16, float32 or float64
            Shape ``[batch, heads, seq, head_dim]`` or ``[heads, seq, head_dim]``; K and V
            share batch, heads and seq (head_dim may differ). Every value must be finite.

        Returns
        -------
        CompressedKV
            Its ``report`` holds the ratio and the relative error achieved.

        Raises
        ------
        DTypeError, ShapeError, NonFiniteError, ConfigError
        """
        k, v, k4, v4 = self._check_pair(k, v)
        sides, errors = {}, {}
        for name, x in (("k", k4), ("v", v4)):
            params = self._fitted[name] if self._fitted else self._fit_side(x)
            if self._fitted and (params["heads"], params["head_dim"]) != (x.shape[1], x.shape[3]):
                raise ShapeError(
                    f"this compressor was fitted on {params['heads']} heads of head_dim {params['head_dim']}, "
                    f"{name} has {x.shape[1]} heads of head_dim {x.shape[3]}"
                )
            t = self._encode(x, params)
            sides[name] = t
            y = _decode(t)
            errors[name] = (_rel_error(x, y), float(np.abs(x - y).max()))
        bytes_in = k.nbytes + v.nbytes
        out = sides["k"].nbytes + sides["v"].nbytes
        shared = sides["k"].nbytes_shared + sides["v"].nbytes_shared
        report = {
            "method": self.method,
            "ratio": bytes_in / out,
            "ratio_shared": bytes_in / max(out - shared, 1),
            "bytes_in": int(bytes_in),
            "bytes_out": int(out),
            "bytes_shared": int(shared),
            "k_rel_error": errors["k"][0],
            "v_rel_error": errors["v"][0],
            "k_max_abs_error": errors["k"][1],
            "v_max_abs_error": errors["v"][1],
        }
        if self.method == "vq":
            report["codebook_size"] = sides["k"].params["codebook_size"]
        else:
            report["k_rank"] = sides["k"].params["rank"]
            report["v_rank"] = sides["v"].params["rank"]
        return CompressedKV(sides["k"], sides["v"], k.ndim, str(k.dtype), report)

    def _encode(self, x: np.ndarray, params: dict) -> CompressedTensor:
        if self.method == "vq":
            b, h, s, _ = x.shape
            books = params["codebooks"]
            _, m, kk, dd = books.shape
            codes = nearest_centroid(self._subvectors(x), books.reshape(h * m, kk, dd))
            codes = codes.reshape(h, m, b, s).transpose(2, 0, 3, 1)
            dtype = np.uint8 if kk <= 256 else np.uint16
            return CompressedTensor("vq", x.shape, {"codebooks": books, "codes": np.ascontiguousarray(codes, dtype)},
                                    {"codebook_size": kk, "subvector_dim": dd})
        g = _to_groups(x, self.group_heads)
        latent = (g - params["mean"][:, None, :]) @ params["basis"]
        p = {"rank": params["rank"], "group_heads": self.group_heads, "format": "fp32", "group_size": 0}
        arrays = {"mean": params["mean"], "basis": params["basis"]}
        if self.method == "lowrank":
            arrays["latent"] = latent
        else:
            fmt = _QUANT_FORMAT[self.quant_bits]
            group = _int4_group(latent.shape[2]) if fmt == "int4" else None
            q = quant.quantize(latent, fmt, group_size=group)
            arrays.update(codes=q.codes, scales=q.scales)
            if q.zeros is not None:
                arrays["zeros"] = q.zeros
            p.update(format=fmt, group_size=q.group_size)
        return CompressedTensor(self.method, x.shape, arrays, p)

    # ------------------------------------------------------------------ decompress

    def decompress_kv(self, c: CompressedKV) -> tuple[np.ndarray, np.ndarray]:
        """Reconstruct K and V from :meth:`compress_kv`'s output.

        Parameters
        ----------
        c : CompressedKV

        Returns
        -------
        k, v : numpy.ndarray, the input's dtype and shape
        """
        return decompress_kv(c)


def decompress_kv(c: CompressedKV) -> tuple[np.ndarray, np.ndarray]:
    """Reconstruct K and V from a :class:`CompressedKV` (no compressor needed).

    Returns
    -------
    k, v : numpy.ndarray, the dtype and shape (3-D or 4-D) that were compressed
    """
    if not isinstance(c, CompressedKV):
        raise DTypeError(f"decompress_kv expects a CompressedKV, found {type(c).__name__}")
    out = []
    for t in (c.k, c.v):
        y = _decode(t)
        out.append((y if c.ndim == 4 else y[0]).astype(c.dtype, copy=False))
    return out[0], out[1]


def _decode(t: CompressedTensor) -> np.ndarray:
    """[B, H, S, D] float32 from one compressed side."""
    a = t.arrays
    try:
        if t.method == "vq":
            b, h, s, d = t.shape
            books = a["codebooks"]
            m = books.shape[1]
            codes = a["codes"]                                          # [B, H, S, m]
            heads = np.arange(h)[None, :, None, None]
            subs = np.arange(m)[None, None, None, :]
            return books[heads, subs, codes].reshape(b, h, s, d)        # [B, H, S, m, d] gathered
        if t.method == "lowrank":
            latent = a["latent"]
        else:
            groups, tokens, width = len(a["basis"]), t.shape[0] * t.shape[2], a["basis"].shape[2]
            latent = quant.dequantize(quant.QTensor(a["codes"], a.get("scales"), a.get("zeros"), t.params["format"],
                                                    (groups, tokens, width), "token", t.params["group_size"]))
        y = latent @ a["basis"].transpose(0, 2, 1) + a["mean"][:, None, :]
        return _from_groups(y, tuple(t.shape), t.params["group_heads"])
    except (KeyError, ValueError, IndexError) as e:
        raise FormatError(f"inconsistent compressed {t.method} tensor for shape {tuple(t.shape)}: {e}") from None


# ---------------------------------------------------------------------------------- cache files


def meta_slot_bytes_for(num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, k_format: str,
                        v_format: str, num_sequences: int, num_pages: int, name_bytes: int = 0) -> int:
    """A metadata slot capacity that holds a cache of this size (see docs/FORMAT.md).

    The payload holds, per (sequence, layer), the open tail of a page in the side's own
    format (int4: float32), which dominates for many sequences; the result is twice the
    payload, at least the default 64 MiB, rounded to 4096 (slots are sparse: the unused
    part costs no disk).

    Parameters
    ----------
    num_sequences, num_pages : int
        Sequences and sealed pages (summed over block tables) the cache will hold.
    name_bytes : int
        UTF-8 bytes of all sequence names together.
    """
    from .formats import get_format

    tail = 0
    for fmt in (k_format, v_format):
        f = get_format(fmt)
        if f.name == "int4":
            tail += num_kv_heads * page_size * head_dim * 4
        else:
            tail += num_kv_heads * page_size * f.row_nbytes(head_dim) + (num_kv_heads * page_size * 4 if f.scaled else 0)
    payload = (24 + 4 * num_pages + num_sequences * (12 + num_layers * (16 + tail))
               + name_bytes + 4 * num_pages)
    return max(64 << 20, -(-2 * payload // 4096) * 4096)


def _shared_pages(a: list, b: list) -> int:
    """Leading pages that two sequences share in every layer (0 if either was shifted)."""
    n = None
    for (pa, _, fa), (pb, _, fb) in zip(a, b):
        if fa or fb:
            return 0
        m = min(len(pa), len(pb))
        same = np.flatnonzero(pa[:m] != pb[:m])
        n = min(n if n is not None else m, int(same[0]) if len(same) else m)
    return n or 0


def compress_cache(src, dst, *, k_format: str | None = None, v_format: str | None = None,
                   compressor: KVCacheCompressor | None = None, overwrite: bool = False,
                   progress: bool | None = None) -> dict:
    """Re-encode every sequence of a cache file into a new file.

    Each (sequence, layer) is read from ``src`` (dequantized), passed through
    ``compressor`` if one is given (compressed, then decompressed: the file format
    stores K/V in its page formats, which is what every reader of the file needs), and
    appended to ``dst`` in ``k_format`` / ``v_format``. Names, page size and fingerprint
    are kept. Sequences that share leading pages in ``src`` (forks) share them in ``dst``.
    ``src`` is only read. ``dst`` is built as ``.NAME.partial-PID`` in its directory,
    committed (synced), then renamed to ``dst``: at ``dst`` there is only ever no file, the
    file that was there, or the complete result. A failure removes the partial file; a
    process killed leaves it, and the next call for the same ``dst`` deletes it
    (:func:`kvmmap.storage.remove_stale_partials`: partial files whose writer lock is free).

    Parameters
    ----------
    src, dst : str or os.PathLike
    k_format, v_format : str, optional
        Formats of ``dst`` (default: those of ``src``).
    compressor : KVCacheCompressor, optional
        Fitted per (sequence, layer) on that data unless it was :meth:`~KVCacheCompressor.fit`.
    overwrite : bool
        Replace an existing ``dst``. Refused while another process has ``dst`` open for
        writing (its writer lock is held); the lock is then held until the rename.
    progress : bool, optional
        Progress bar over (sequence, layer) pairs (None: only when stderr is a terminal).

    Returns
    -------
    dict
        ``sequences``, ``tokens`` (summed over layers), ``shared_pages`` (pages reused by
        forks), formats before and after, ``bytes_on_disk_before`` / ``_after``
        (allocated blocks), ``apparent_bytes_before`` / ``_after``, ``k_rel_error`` and
        ``v_rel_error`` (``||src - dst|| / ||src||`` over all tokens of all layers,
        measured on what ``dst`` returns), and with a compressor ``method``,
        ``method_ratio`` and ``method_ratio_shared`` (what its compressed representation
        achieves, summed over every call).

    Raises
    ------
    CacheFileError, FormatError, NonFiniteError, ConfigError, OSError
    """
    from .cache import PagedKVCache
    from .fileinfo import check_regular_file

    src, dst = os.fspath(src), os.fspath(dst)
    check_regular_file(src)
    if os.path.lexists(dst):
        if os.path.exists(dst) and os.path.samefile(src, dst):
            raise CacheFileError(f"{dst} is the input file; write the compressed cache elsewhere")
        if not overwrite:
            raise CacheFileError(f"{dst} exists; pass overwrite=True (kvmmap compress --overwrite) to replace it")
        check_regular_file(dst)     # locking it opens it: a FIFO would block
    # The old dst's writer lock is held until the rename, as create(overwrite=True) does: a
    # writer that has dst open is refused instead of having its file replaced under it, and
    # no writer can open it meanwhile.
    old_fd = PagedKVCache._lock_existing(dst) if overwrite else None
    try:
        return _compress_into(src, dst, k_format, v_format, compressor, progress)
    finally:
        if old_fd is not None:
            os.close(old_fd)


def _compress_into(src: str, dst: str, k_format, v_format, compressor, progress) -> dict:
    """compress_cache's work, once ``dst`` may be replaced."""
    from .cache import PagedKVCache
    from .fileinfo import ChangedByWriterError, check_pages, disk_usage, layer_tables, open_read_only
    from .storage import newest_generation, partial_path, remove_stale_partials

    def changed(what: str) -> ChangedByWriterError:
        return ChangedByWriterError(f"{src}: {what} since compress started (a writer is committing): rerun; "
                                    "nothing is known to be damaged")

    before = disk_usage(src)
    remove_stale_partials(dst)
    tmp = partial_path(dst)
    sums = {"k": [0.0, 0.0], "v": [0.0, 0.0]}          # ||x - y||^2, ||x||^2
    method_in = method_out = method_shared = 0
    tokens = shared_total = 0
    with open_read_only(src) as s:
        used = sorted({int(p) for sid in s.sequences() for pages, _, _ in layer_tables(s, sid) for p in pages})
        damaged, reused = check_pages(s, used)
        if damaged:
            raise CacheFileError(f"{src}: {len(damaged)} damaged page(s) (ids {', '.join(map(str, damaged[:8]))}); "
                                 f"run `kvmmap verify {src}`")
        if reused:
            raise changed(f"{len(reused)} page(s) (ids {', '.join(map(str, reused[:8]))}) changed")
        kf_before, vf_before = s.k_format, s.v_format
        kf, vf = k_format or kf_before, v_format or vf_before
        names = s.sequences()
        tables = {sid: layer_tables(s, sid) for sid in names}
        slot = meta_slot_bytes_for(s.num_layers, s.num_kv_heads, s.head_dim, s.page_size, kf, vf, len(names),
                                   sum(len(p) for t in tables.values() for p, _, _ in t),
                                   sum(len((n or "").encode()) + 3 for n in names.values()))
        d = PagedKVCache.create(tmp, num_layers=s.num_layers, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                                page_size=s.page_size, k_format=kf, v_format=vf, fingerprint=s.fingerprint,
                                meta_slot_bytes=slot, overwrite=True)
        try:
            done: dict[int, int] = {}
            bar = tqdm(total=len(names) * s.num_layers, desc="compress", unit="layer",
                       disable=None if progress is None else not progress)
            with bar:
                for sid, name in names.items():
                    base, shared = None, 0
                    for prev in done:
                        n = _shared_pages(tables[prev], tables[sid])
                        if n > shared:
                            base, shared = prev, n
                    if base is None:
                        out = d.new_sequence(name)
                    else:
                        out = d.fork(done[base], name)
                        d.truncate(out, shared * s.page_size)
                    shared_total += shared * s.num_layers
                    start = shared * s.page_size
                    for layer in range(s.num_layers):
                        try:
                            k, v = s.read(sid, layer)
                        except CacheFileError:
                            # read() refuses pages that fail their checksum once a newer
                            # commit exists: reused by the writer (they passed above)
                            if newest_generation(s._fd, s._sb) != s._generation:
                                raise changed(f"sequence {sid} layer {layer} changed") from None
                            raise
                        k2, v2 = k, v
                        if compressor is not None and len(k) > start:
                            c = compressor.compress_kv(k.transpose(1, 0, 2), v.transpose(1, 0, 2))
                            method_in += c.report["bytes_in"]
                            method_out += c.report["bytes_out"]
                            method_shared += c.report["bytes_shared"]
                            hk, hv = decompress_kv(c)
                            k2, v2 = hk.transpose(1, 0, 2), hv.transpose(1, 0, 2)
                        d.append(out, layer, k2[start:], v2[start:])
                        for side, x, y in zip("kv", (k, v), d.read(out, layer)):
                            sums[side][0] += float(np.square(x - y, dtype=np.float64).sum())
                            sums[side][1] += float(np.square(x, dtype=np.float64).sum())
                        tokens += len(k)
                        bar.update()
                    done[sid] = out
            d.flush()
            # renamed while still open: its writer lock marks the complete partial file as
            # live, so a concurrent call's cleanup leaves it alone
            os.replace(tmp, dst)
            dfd = os.open(os.path.dirname(os.path.abspath(dst)), os.O_RDONLY)
            try:                        # the new name survives a power loss too
                os.fsync(dfd)
            finally:
                os.close(dfd)
            d.close()
        except BaseException:
            d.close()
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    after = disk_usage(dst)

    def rel(side):
        err, ref = sums[side]
        return math.sqrt(err / ref) if ref else (0.0 if err == 0 else math.inf)

    report = {
        "src": src, "dst": dst, "sequences": len(names), "tokens": tokens, "shared_pages": shared_total,
        "k_format_before": kf_before, "v_format_before": vf_before, "k_format": kf, "v_format": vf,
        "bytes_on_disk_before": before["bytes_on_disk"], "bytes_on_disk_after": after["bytes_on_disk"],
        "apparent_bytes_before": before["apparent_bytes"], "apparent_bytes_after": after["apparent_bytes"],
        "k_rel_error": rel("k"), "v_rel_error": rel("v"),
    }
    if compressor is not None:
        report.update(method=compressor.method,
                      method_ratio=method_in / method_out if method_out else None,
                      method_ratio_shared=method_in / max(method_out - method_shared, 1) if method_out else None)
    return report
