"""Low rank, then the latent quantized: ``method="hybrid"``.

The projection of :mod:`kvmmap.compress.lowrank`, then the latent is quantized with
:func:`kvmmap.quantize`, per token (int8: a scale; int4: a scale and a zero point). The
basis is first turned by a seeded random rotation (PALU rotates its latents by a Hadamard
transform for the same reason): it spreads the variance of the leading components over all
latent dimensions, so that a per-token scale suits all of them. The rotation is folded
into the basis and costs nothing at decompression.
"""

from __future__ import annotations

import numpy as np

from ..codecs import quant
from ..errors import ConfigError
from .container import CompressedTensor
from .lowrank import LowRankCodec

QUANT_FORMAT = {8: "int8", 4: "int4"}


def int4_width(rank: int) -> int:
    """Latent width stored for int4: even (two codes a byte) and, past 256, a multiple of 128."""
    return rank + rank % 2 if rank <= 256 else -(-rank // 128) * 128


def int4_group(width: int) -> int:
    """int4 group along a latent row: the whole row (one scale and zero per token) up to 256."""
    return width if width <= 256 else (256 if width % 256 == 0 else 128)


def random_rotation(r: int, seed: int) -> np.ndarray:
    """A Haar-distributed orthogonal ``[r, r]`` matrix, float64, from ``seed``."""
    q, rr = np.linalg.qr(np.random.default_rng(seed).standard_normal((r, r)))
    return q * np.sign(np.diag(rr))


class HybridCodec(LowRankCodec):
    """Low-rank projection with a quantized latent (see the module docstring).

    Parameters
    ----------
    rank, energy, group_heads
        As for :class:`~kvmmap.compress.lowrank.LowRankCodec`.
    quant_bits : {8, 4}
        int8 (a scale per token per head group) or int4 (a scale and a zero point per token
        per head group, over up to 256 latent values; the stored latent width is the rank
        rounded up to even, and past 256 to a multiple of 128).
    seed : int
        Seed of the rotation.

    Raises
    ------
    ConfigError
        A value out of range, or a parameter of another method (e.g. ``codebook_size``).

    Compressed arrays: ``mean``, ``basis`` as for lowrank, and the quantized latent as
    ``codes``, ``scales`` (and ``zeros`` for int4) in the layout of :func:`kvmmap.quantize`
    for ``[groups, batch * seq, width]``; params ``rank``, ``group_heads``, ``format``
    ("int8" / "int4"), ``group_size``.
    """

    method = "hybrid"
    PARAMETERS = ("rank", "energy", "group_heads", "quant_bits", "seed")

    def __init__(self, rank: int | None = None, *, quant_bits: int = 8, energy: float = 0.99, group_heads: int = 1,
                 seed: int = 0, **foreign):
        super().__init__(rank, energy=energy, group_heads=group_heads, seed=seed, **foreign)
        if isinstance(quant_bits, bool) or quant_bits not in (8, 4):
            raise ConfigError(f"quant_bits must be 8 or 4, found {quant_bits!r}")
        self.quant_bits = int(quant_bits)

    def stored_width(self, rank: int) -> int:
        return int4_width(rank) if self.quant_bits == 4 else rank

    def turn(self, basis: np.ndarray) -> np.ndarray:
        return basis @ random_rotation(basis.shape[2], self.seed)

    def encode_latent(self, latent: np.ndarray) -> tuple[dict, dict]:
        fmt = QUANT_FORMAT[self.quant_bits]
        group = int4_group(latent.shape[2]) if fmt == "int4" else None
        q = quant.quantize(latent, fmt, group_size=group)
        arrays = {"codes": q.codes, "scales": q.scales}
        if q.zeros is not None:
            arrays["zeros"] = q.zeros
        return arrays, {"format": fmt, "group_size": q.group_size}

    @classmethod
    def decode_latent(cls, t: CompressedTensor) -> np.ndarray:
        a = t.arrays
        groups, tokens, width = len(a["basis"]), t.shape[0] * t.shape[2], a["basis"].shape[2]
        return quant.dequantize(quant.QTensor(a["codes"], a.get("scales"), a.get("zeros"), t.params["format"],
                                              (groups, tokens, width), "token", t.params["group_size"]))
