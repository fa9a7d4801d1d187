"""The public facade: :class:`KVCacheCompressor` picks a codec by method name; :func:`decompress_kv`.

``CODECS`` (method name -> codec class) is the one place that maps a method string to its
code: the compressor's constructor and the decoder of saved tensors both look it up.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DTypeError, FormatError
from .codec import Codec
from .container import CompressedKV
from .hybrid import HybridCodec
from .lowrank import LowRankCodec
from .vq import VQCodec

CODECS: dict[str, type[Codec]] = {c.method: c for c in (LowRankCodec, VQCodec, HybridCodec)}
METHODS = tuple(CODECS)


def codec_class(method) -> type[Codec]:
    """The codec class of ``method`` ("lowrank", "vq" or "hybrid"), or ConfigError."""
    if not isinstance(method, str) or method not in CODECS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, found {method!r}")
    return CODECS[method]


class KVCacheCompressor:
    """Compress K/V arrays by low-rank projection, product VQ, or low rank + quantization.

    A facade over one codec (:attr:`codec`): the parameters given are passed to the codec
    class of ``method``, which refuses those it does not take (e.g. ``rank`` with "vq");
    parameters left out take the codec's defaults.

    Parameters
    ----------
    method : {"lowrank", "vq", "hybrid"} or Codec
        See :mod:`kvmmap.compress`; or a codec instance to wrap (then no other parameter).
    rank : int, optional
        lowrank / hybrid: latent dimensions per head group, ``1 .. group_heads *
        head_dim``. None: the smallest rank that keeps ``energy`` in every group (one rank
        for all groups of a side; K and V get their own).
    codebook_size : int, optional
        vq: centroids per codebook, 2 .. 65536 (default 256; codes are uint8 up to 256,
        else uint16). Inputs with fewer tokens (batch * seq) use that many centroids instead.
    quant_bits : {8, 4}, optional
        hybrid: int8 (default: a scale per token per head group) or int4 (a scale and a zero
        point per token per head group, over up to 256 latent values; the stored latent
        width is the rank rounded up to even, and past 256 to a multiple of 128).
    energy : float, optional
        lowrank / hybrid without ``rank``: fraction of the centred spectrum to keep, in
        (0, 1] (default 0.99). The relative error of lowrank is then at most ``sqrt(1 - energy)``.
    group_heads : int, optional
        lowrank / hybrid: heads decomposed together (default 1); must divide the number of heads.
    subvector_dim : int, optional
        vq: elements per sub-vector (default 4); must divide head_dim.
    max_iter : int, optional
        vq: Lloyd iterations at most (default 25).
    seed : int, optional
        Seed of every random choice (k-means, the hybrid rotation; default 0). Every method
        accepts it.

    Raises
    ------
    ConfigError
        An unknown method, a value out of range, or a parameter the method does not take.

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
    >>> km.KVCacheCompressor.from_config(comp.get_config()).get_config() == comp.get_config()
    True
    """

    def __init__(self, method: str | Codec = "lowrank", rank: int | None = None, codebook_size: int | None = None,
                 quant_bits: int | None = None, *, energy: float | None = None, group_heads: int | None = None,
                 subvector_dim: int | None = None, max_iter: int | None = None, seed: int | None = None):
        given = {name: value for name, value in (
            ("rank", rank), ("codebook_size", codebook_size), ("quant_bits", quant_bits), ("energy", energy),
            ("group_heads", group_heads), ("subvector_dim", subvector_dim), ("max_iter", max_iter), ("seed", seed),
        ) if value is not None}
        if isinstance(method, Codec):
            if given:
                raise ConfigError(f"pass either a codec or parameters, found a codec and {', '.join(given)}")
            self.codec = method
        else:
            self.codec = codec_class(method)(**given)

    @property
    def method(self) -> str:
        """``"lowrank"``, ``"vq"`` or ``"hybrid"``."""
        return self.codec.method

    def get_config(self) -> dict:
        """``method`` and every parameter of the codec (JSON-encodable; not the fitted arrays)."""
        return self.codec.get_config()

    @classmethod
    def from_config(cls, config: dict) -> "KVCacheCompressor":
        """A compressor with the settings of :meth:`get_config`'s result.

        Raises
        ------
        ConfigError
            ``config`` is not a dict, has no known ``method``, or holds a parameter that
            method does not take or a value it refuses.
        """
        if not isinstance(config, dict):
            raise ConfigError(f"config must be a dict as get_config returns, found {type(config).__name__}")
        return cls(codec_class(config.get("method")).from_config(config))

    def __repr__(self) -> str:
        config = self.get_config()
        args = ", ".join(f"{n}={v!r}" for n, v in config.items() if n != "method")
        return f"KVCacheCompressor({self.method!r}, {args}{', fitted' if self.codec.fitted else ''})"

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
        self.codec.fit(k, v)
        return self

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
        return self.codec.compress_kv(k, v)

    def decompress_kv(self, c: CompressedKV) -> tuple[np.ndarray, np.ndarray]:
        """Reconstruct K and V from :meth:`compress_kv`'s output (of any method).

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

    Raises
    ------
    DTypeError
        ``c`` is not a CompressedKV.
    FormatError
        A side names an unknown method, or its arrays do not fit its shape and params.
    """
    if not isinstance(c, CompressedKV):
        raise DTypeError(f"decompress_kv expects a CompressedKV, found {type(c).__name__}")
    out = []
    for t in (c.k, c.v):
        if not isinstance(t.method, str) or t.method not in CODECS:
            raise FormatError(f"compressed tensor of unknown method {t.method!r}, expected one of {', '.join(METHODS)}")
        y = CODECS[t.method].decode(t)
        out.append((y if c.ndim == 4 else y[0]).astype(c.dtype, copy=False))
    return out[0], out[1]
