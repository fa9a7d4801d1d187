"""What every compression method implements, and the checks the methods share.

A codec is one method (:class:`~kvmmap.compress.lowrank.LowRankCodec`,
:class:`~kvmmap.compress.vq.VQCodec`, :class:`~kvmmap.compress.hybrid.HybridCodec`): it
validates its own parameters and refuses those of other methods, fits its parameters
(basis, codebooks) to one side, encodes a side into a :class:`CompressedTensor` and decodes
it. :class:`Codec` holds what they share: the checks of K/V, fitting once, the report.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError, DTypeError, FormatError, NonFiniteError, ShapeError, describe
from .container import CompressedKV, CompressedTensor


def positive_int(name: str, value, hi: int | None = None) -> int:
    """``value`` as an int in ``1..hi``, or ConfigError naming ``name``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1 or (hi and value > hi):
        raise ConfigError(f"{name} must be an integer in 1..{hi or 'inf'}, found {value!r}")
    return int(value)


def as_float(x, name: str) -> tuple[np.ndarray, np.ndarray]:
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


def rel_error(x: np.ndarray, y: np.ndarray) -> float:
    """``||x - y|| / ||x||`` (Frobenius); 0 for two zero arrays, inf for a zero ``x`` only."""
    num = float(np.linalg.norm((x - y).ravel()))
    den = float(np.linalg.norm(x.ravel()))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


class Codec:
    """One compression method: its parameters, and fitting, encoding and decoding one side.

    Subclasses set :attr:`method` and :attr:`PARAMETERS` (the names their constructor
    takes, all keyword arguments), pass every other keyword to ``Codec.__init__`` (which
    refuses it) and implement :meth:`check_geometry`, :meth:`fit_side`, :meth:`encode`,
    :meth:`decode_arrays` and :meth:`report_fields`.

    Parameters
    ----------
    foreign : dict
        Keywords the subclass does not take: any raises ConfigError.
    seed : int
        Seed of every random choice, >= 0 (a method that makes none accepts it too, so one
        seed can be passed to any method).
    """

    method = ""
    PARAMETERS: tuple = ()

    def __init__(self, foreign: dict, seed) -> None:
        if foreign:
            names = ", ".join(repr(n) for n in sorted(foreign))
            raise ConfigError(f"{self.method} takes no parameter {names} "
                              f"(its parameters: {', '.join(self.PARAMETERS)})")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, found {seed!r}")
        self.seed = int(seed)
        self._fitted: dict | None = None

    # ------------------------------------------------------------------ configuration

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` learnt parameters that every later call reuses."""
        return self._fitted is not None

    def get_config(self) -> dict:
        """``method`` and every parameter (JSON-encodable); fitted arrays are not included."""
        return {"method": self.method, **{n: getattr(self, n) for n in self.PARAMETERS}}

    @classmethod
    def from_config(cls, config: dict) -> "Codec":
        """A codec with the settings of :meth:`get_config`'s result (``method`` may be left out).

        Raises
        ------
        ConfigError
            ``config`` is not a dict, names another method, or holds a parameter this
            method does not take or a value it refuses.
        """
        if not isinstance(config, dict):
            raise ConfigError(f"a codec config is a dict as get_config returns, found {type(config).__name__}")
        params = dict(config)
        method = params.pop("method", cls.method)
        if method != cls.method:
            raise ConfigError(f"{cls.__name__} reads {cls.method!r} configs, found method {method!r}")
        return cls(**params)

    def __repr__(self) -> str:
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.PARAMETERS)
        return f"{type(self).__name__}({args}{', fitted' if self.fitted else ''})"

    # ------------------------------------------------------------------ what a method implements

    def check_geometry(self, name: str, shape: tuple) -> None:
        """Raise ConfigError if the parameters do not fit a side of ``shape`` [B, H, S, D]."""
        raise NotImplementedError

    def fit_side(self, x: np.ndarray) -> dict:
        """Parameters fitted to one side, float32 [B, H, S, D]; with ``heads`` and ``head_dim``."""
        raise NotImplementedError

    def encode(self, x: np.ndarray, params: dict) -> CompressedTensor:
        """One side, float32 [B, H, S, D], encoded with ``params`` from :meth:`fit_side`."""
        raise NotImplementedError

    @classmethod
    def decode_arrays(cls, t: CompressedTensor) -> np.ndarray:
        """float32 [B, H, S, D] from the arrays of ``t`` (may raise KeyError, ValueError, IndexError)."""
        raise NotImplementedError

    def report_fields(self, k: CompressedTensor, v: CompressedTensor) -> dict:
        """The method's own entries of :attr:`CompressedKV.report`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    @classmethod
    def decode(cls, t: CompressedTensor) -> np.ndarray:
        """float32 [B, H, S, D] from one compressed side of this method.

        Raises
        ------
        FormatError
            ``t`` is of another method, or its arrays do not fit its shape and params.
        """
        if t.method != cls.method:
            raise FormatError(f"{cls.__name__} decodes {cls.method!r} tensors, found {t.method!r}")
        try:
            return cls.decode_arrays(t)
        except (KeyError, ValueError, IndexError) as e:
            raise FormatError(f"inconsistent compressed {t.method} tensor for shape {tuple(t.shape)}: {e}") from None

    def check_pair(self, k, v) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(k, v as given but as arrays, k, v as float32 [B, H, S, D]), checked."""
        k, k4 = as_float(k, "k")
        v, v4 = as_float(v, "v")
        if k.ndim != v.ndim or k.shape[:-1] != v.shape[:-1]:
            raise ShapeError(f"k and v must share batch, heads and seq, found {describe(k)} and {describe(v)}")
        for name, x in (("k", k4), ("v", v4)):
            self.check_geometry(name, x.shape)
        return k, v, k4, v4

    def fit(self, k, v) -> "Codec":
        """Learn the parameters once from calibration K/V; later :meth:`compress_kv` calls reuse them.

        Parameters
        ----------
        k, v : numpy.ndarray, float, shape ``[batch, heads, seq, head_dim]`` or ``[heads, seq, head_dim]``

        Returns
        -------
        self
        """
        _, _, k4, v4 = self.check_pair(k, v)
        self._fitted = {"k": self.fit_side(k4), "v": self.fit_side(v4)}
        return self

    def compress_kv(self, k, v) -> CompressedKV:
        """Compress K and V (see :meth:`kvmmap.KVCacheCompressor.compress_kv`)."""
        k, v, k4, v4 = self.check_pair(k, v)
        sides, errors = {}, {}
        for name, x in (("k", k4), ("v", v4)):
            params = self._fitted[name] if self._fitted else self.fit_side(x)
            if self._fitted and (params["heads"], params["head_dim"]) != (x.shape[1], x.shape[3]):
                raise ShapeError(
                    f"this compressor was fitted on {params['heads']} heads of head_dim {params['head_dim']}, "
                    f"{name} has {x.shape[1]} heads of head_dim {x.shape[3]}"
                )
            t = self.encode(x, params)
            sides[name] = t
            y = self.decode(t)
            errors[name] = (rel_error(x, y), float(np.abs(x - y).max()))
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
        report.update(self.report_fields(sides["k"], sides["v"]))
        return CompressedKV(sides["k"], sides["v"], k.ndim, str(k.dtype), report)
