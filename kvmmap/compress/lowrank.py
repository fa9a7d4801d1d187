"""Low-rank projection of K/V (after PALU): ``method="lowrank"``.

Tokens of a *group* of ``group_heads`` heads are vectors of ``group_heads * head_dim``
elements; their mean is removed and they are projected on the leading ``rank``
eigenvectors of their covariance (the right singular vectors of the centred data), so
that ``x ~ mean + latent @ basis.T`` with ``latent`` of ``rank`` values per token.
``group_heads=1`` is PALU's per-head decomposition, ``group_heads=num_heads`` the joint
one, values between its group-head trade-off. Without ``rank``, the rank is the smallest
that keeps ``energy`` of the centred spectrum in every group, so the relative error is at
most ``sqrt(1 - energy)``. By Eckart-Young no other rank-``r`` affine projection of these
tokens has a smaller error.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .codec import Codec, positive_int
from .container import CompressedTensor


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


def to_groups(x: np.ndarray, group_heads: int) -> np.ndarray:
    """[B, H, S, D] -> [H / g, B * S, g * D] (tokens of a head group as rows)."""
    b, h, s, d = x.shape
    return np.ascontiguousarray(
        x.reshape(b, h // group_heads, group_heads, s, d).transpose(1, 0, 3, 2, 4)
    ).reshape(h // group_heads, b * s, group_heads * d)


def from_groups(y: np.ndarray, shape: tuple, group_heads: int) -> np.ndarray:
    """[H / g, B * S, g * D] -> ``shape`` [B, H, S, D]: the inverse of :func:`to_groups`."""
    b, h, s, d = shape
    return np.ascontiguousarray(
        y.reshape(h // group_heads, b, s, group_heads, d).transpose(1, 0, 3, 2, 4)
    ).reshape(shape)


class LowRankCodec(Codec):
    """Low-rank projection per head group (see the module docstring).

    Parameters
    ----------
    rank : int, optional
        Latent dimensions per head group, ``1 .. group_heads * head_dim``. None: the
        smallest rank that keeps ``energy`` in every group (one rank for all groups of a
        side; K and V get their own).
    energy : float
        Without ``rank``: fraction of the centred spectrum to keep, in (0, 1]. The
        relative error is then at most ``sqrt(1 - energy)``.
    group_heads : int
        Heads decomposed together; must divide the number of heads.
    seed : int
        Accepted like every method's; the projection makes no random choice.

    Raises
    ------
    ConfigError
        A value out of range, or a parameter of another method (e.g. ``codebook_size``).

    Compressed arrays: ``mean`` float32 ``[groups, group_heads * head_dim]``, ``basis``
    float32 ``[groups, group_heads * head_dim, rank]``, ``latent`` float32
    ``[groups, batch * seq, rank]``; params ``rank``, ``group_heads``, ``format`` ("fp32"),
    ``group_size`` (0).
    """

    method = "lowrank"
    PARAMETERS = ("rank", "energy", "group_heads", "seed")

    def __init__(self, rank: int | None = None, *, energy: float = 0.99, group_heads: int = 1, seed: int = 0,
                 **foreign):
        super().__init__(foreign, seed)
        self.rank = None if rank is None else positive_int("rank", rank)
        if not isinstance(energy, (float, int)) or isinstance(energy, bool) or not 0 < energy <= 1:
            raise ConfigError(f"energy must be a fraction in (0, 1], found {energy!r}")
        self.energy = float(energy)
        self.group_heads = positive_int("group_heads", group_heads)

    def check_geometry(self, name: str, shape: tuple) -> None:
        _, h, _, d = shape
        if h % self.group_heads:
            raise ConfigError(f"group_heads={self.group_heads} must divide {name}'s {h} heads")
        width = self.group_heads * d
        if self.rank is not None and self.rank > width:
            raise ConfigError(
                f"rank={self.rank} exceeds the {width} dimensions of a head group of {name} "
                f"(group_heads={self.group_heads} x head_dim={d})"
            )

    def stored_width(self, rank: int) -> int:
        """Latent values stored per token for ``rank``."""
        return rank

    def turn(self, basis: np.ndarray) -> np.ndarray:
        """The basis as stored, float64 ``[groups, width, stored]`` (here: unchanged)."""
        return basis

    def fit_side(self, x: np.ndarray) -> dict:
        g = to_groups(x, self.group_heads)
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
        stored = self.stored_width(rank)
        basis = np.zeros((g.shape[0], width, stored))
        use = min(stored, width)
        basis[:, :, :use] = evecs[:, :, :use]
        basis = self.turn(basis)
        return {"mean": mean.astype(np.float32), "basis": basis.astype(np.float32), "rank": rank,
                "heads": x.shape[1], "head_dim": x.shape[3]}

    def encode_latent(self, latent: np.ndarray) -> tuple[dict, dict]:
        """(arrays, params) that store ``latent`` float32 [groups, tokens, width]."""
        return {"latent": latent}, {}

    @classmethod
    def decode_latent(cls, t: CompressedTensor) -> np.ndarray:
        """The latent [groups, tokens, width] that :meth:`encode_latent` stored in ``t``."""
        return t.arrays["latent"]

    def encode(self, x: np.ndarray, params: dict) -> CompressedTensor:
        g = to_groups(x, self.group_heads)
        latent = (g - params["mean"][:, None, :]) @ params["basis"]
        p = {"rank": params["rank"], "group_heads": self.group_heads, "format": "fp32", "group_size": 0}
        arrays = {"mean": params["mean"], "basis": params["basis"]}
        stored, described = self.encode_latent(latent)
        arrays.update(stored)
        p.update(described)
        return CompressedTensor(self.method, x.shape, arrays, p)

    @classmethod
    def decode_arrays(cls, t: CompressedTensor) -> np.ndarray:
        a = t.arrays
        y = cls.decode_latent(t) @ a["basis"].transpose(0, 2, 1) + a["mean"][:, None, :]
        return from_groups(y, tuple(t.shape), t.params["group_heads"])

    def report_fields(self, k: CompressedTensor, v: CompressedTensor) -> dict:
        return {"k_rank": k.params["rank"], "v_rank": v.params["rank"]}
