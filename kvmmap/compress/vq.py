"""Product vector quantization of K/V: ``method="vq"``.

Each head's token vectors are cut into sub-vectors of ``subvector_dim`` elements and each
(head, sub-vector position) gets a k-means codebook of ``codebook_size`` centroids
(k-means++ seeding, Lloyd iterations, a fixed seed); a token stores one code per
sub-vector: ``log2(codebook_size) / subvector_dim`` bits per element. Whole-vector VQ would
need ``2 ** (bits * head_dim)`` centroids for the same rate; sub-vectors make the rate a
free choice and the codebooks small.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .codec import Codec, positive_int
from .container import CompressedTensor
from .kmeans import kmeans, nearest_centroid


class VQCodec(Codec):
    """Product VQ per head (see the module docstring).

    Parameters
    ----------
    codebook_size : int
        Centroids per codebook, 2 .. 65536 (codes are uint8 up to 256, else uint16). Inputs
        with fewer tokens (batch * seq) use that many centroids instead.
    subvector_dim : int
        Elements per sub-vector; must divide head_dim.
    max_iter : int
        Lloyd iterations at most.
    seed : int
        Seed of k-means (seeding and training subsample).

    Raises
    ------
    ConfigError
        A value out of range, or a parameter of another method (e.g. ``rank``).

    Compressed arrays: ``codebooks`` float32 ``[heads, head_dim // subvector_dim,
    codebook_size, subvector_dim]``, ``codes`` uint8 or uint16 ``[batch, heads, seq,
    head_dim // subvector_dim]``; params ``codebook_size``, ``subvector_dim``.
    """

    method = "vq"
    PARAMETERS = ("codebook_size", "subvector_dim", "max_iter", "seed")

    def __init__(self, codebook_size: int = 256, *, subvector_dim: int = 4, max_iter: int = 25, seed: int = 0,
                 **foreign):
        super().__init__(foreign, seed)
        self.codebook_size = positive_int("codebook_size", codebook_size, 65536)
        if self.codebook_size < 2:
            raise ConfigError(f"codebook_size must be at least 2, found {codebook_size}")
        self.subvector_dim = positive_int("subvector_dim", subvector_dim)
        self.max_iter = positive_int("max_iter", max_iter)

    def check_geometry(self, name: str, shape: tuple) -> None:
        d = shape[3]
        if d % self.subvector_dim:
            raise ConfigError(f"subvector_dim={self.subvector_dim} must divide {name}'s head_dim={d}")

    def subvectors(self, x: np.ndarray) -> np.ndarray:
        """[B, H, S, D] -> [H * m, B * S, subvector_dim] (one k-means problem per row)."""
        b, h, s, d = x.shape
        m = d // self.subvector_dim
        return np.ascontiguousarray(
            x.reshape(b, h, s, m, self.subvector_dim).transpose(1, 3, 0, 2, 4)
        ).reshape(h * m, b * s, self.subvector_dim)

    def fit_side(self, x: np.ndarray) -> dict:
        b, h, s, d = x.shape
        m = d // self.subvector_dim
        k = min(self.codebook_size, b * s)
        centroids, _ = kmeans(self.subvectors(x), k, seed=self.seed, max_iter=self.max_iter)
        return {"codebooks": centroids.reshape(h, m, k, self.subvector_dim), "heads": h, "head_dim": d}

    def encode(self, x: np.ndarray, params: dict) -> CompressedTensor:
        b, h, s, _ = x.shape
        books = params["codebooks"]
        _, m, kk, dd = books.shape
        codes = nearest_centroid(self.subvectors(x), books.reshape(h * m, kk, dd))
        codes = codes.reshape(h, m, b, s).transpose(2, 0, 3, 1)
        dtype = np.uint8 if kk <= 256 else np.uint16
        return CompressedTensor(self.method, x.shape, {"codebooks": books, "codes": np.ascontiguousarray(codes, dtype)},
                                {"codebook_size": kk, "subvector_dim": dd})

    @classmethod
    def decode_arrays(cls, t: CompressedTensor) -> np.ndarray:
        b, h, s, d = t.shape
        books = t.arrays["codebooks"]
        m = books.shape[1]
        codes = t.arrays["codes"]                                   # [B, H, S, m]
        heads = np.arange(h)[None, :, None, None]
        subs = np.arange(m)[None, None, None, :]
        return books[heads, subs, codes].reshape(b, h, s, d)        # [B, H, S, m, d] gathered

    def report_fields(self, k: CompressedTensor, v: CompressedTensor) -> dict:
        return {"codebook_size": k.params["codebook_size"]}
