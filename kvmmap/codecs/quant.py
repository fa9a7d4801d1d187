"""Quantize and dequantize float arrays into the storage formats of :mod:`kvmmap.formats`.

Arrays are ``[..., head_dim]``: the last axis is one token's vector for one head. Scales
are float32 and live beside the codes:

========== ======================= =========================================================
format     codes                   side arrays
========== ======================= =========================================================
fp32       float32 ``[..., D]``    none
fp16       float16 ``[..., D]``    none
bf16       uint16 ``[..., D]``     none (bfloat16 bit patterns)
int8       int8 ``[..., D]``       ``scales[...]``: row absmax / 127 (symmetric)
fp8_e4m3   uint8 ``[..., D]``      ``scales[...]``: row absmax / 448
fp8_e5m2   uint8 ``[..., D]``      ``scales[...]``: row absmax / 57344
int4       uint8 ``[..., D/2]``    ``scales``, ``zeros`` (asymmetric, ``x ~ code*scale+zero``)
========== ======================= =========================================================

int4 groups either along the row (``grouping="token"``: ``scales[..., D/G]``, one pair per
``G`` consecutive elements of a token) or along the tokens (``grouping="channel"``, the
KIVI layout for keys: ``scales[..., ceil(T/G), D]``, one pair per channel per ``G``
consecutive rows of axis ``-2``). Two codes share a byte: element ``2k`` in the low nibble.

Non-finite input (NaN, inf) is refused with :class:`~kvmmap.errors.NonFiniteError` in
every format, as is a value that overflows fp16 or bf16, or int4 input with
``|x| >= 2**126`` (a group's range would overflow float32). fp8 saturates by construction:
the per-row scale maps the row's absmax onto the format's largest value.

Scaled formats flush a row (int4: a group) whose absmax (range) is below ``TINY`` =
2**-100 to zero codes with scale 0: its reciprocal scale would overflow float32. The
error this adds is below 2**-100.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DTypeError, FormatError, LayoutError, NonFiniteError, ShapeError, describe
from ..formats import GROUPINGS, Format, get_format
from ..parallel import get_num_threads
from . import _quant

__all__ = ["GROUPINGS", "TINY", "QTensor", "check_storable", "dequantize", "fp8_values", "quantize",
           "quantize_into"]

#: Rows (int4: groups) of scaled formats whose absmax (range) is below this are zeroed.
TINY = _quant.TINY
# side arrays passed to the kernels for formats that have none (never read or written)
_NO_SIDE = np.zeros((1, 1, 1), np.float32)


@dataclass(frozen=True)
class QTensor:
    """A quantized array: codes plus the side arrays its format needs.

    Attributes
    ----------
    codes : numpy.ndarray
        Codes, shape ``shape`` (``shape[:-1] + (D // 2,)`` for int4), dtype of the format.
    scales : numpy.ndarray or None
        float32 scales (see the module docstring for their shape), None when unscaled.
    zeros : numpy.ndarray or None
        float32 zero points, same shape as ``scales`` (int4 only).
    format : str
        Format name, one of :data:`kvmmap.FORMATS`.
    shape : tuple of int
        Shape of the array that was quantized.
    grouping : str
        ``"token"`` or ``"channel"`` (int4 only; always ``"token"`` otherwise).
    group_size : int
        int4 group length; 0 for other formats.
    """

    codes: np.ndarray
    scales: np.ndarray | None
    zeros: np.ndarray | None
    format: str
    shape: tuple
    grouping: str = "token"
    group_size: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by codes and side arrays together."""
        return sum(a.nbytes for a in (self.codes, self.scales, self.zeros) if a is not None)


# ---------------------------------------------------------------------------------
# Geometry checks


def _resolve_grouping(fmt: Format, shape: tuple, grouping: str, group_size: int | None) -> tuple[str, int]:
    # kept for cache.py until it calls Format.resolve_grouping itself
    return fmt.resolve_grouping(shape, grouping, group_size)


def _as_3d(a: np.ndarray, name: str) -> np.ndarray:
    """View ``a`` as [A, T, D] without copying; the last axis must be contiguous."""
    if a.ndim == 0:
        raise ShapeError(f"{name} must have at least one axis, found a scalar")
    if a.shape[-1] > 1 and a.strides[-1] != a.itemsize:
        raise LayoutError(f"{name}: the last axis must be contiguous, found strides {a.strides}")
    return _merge_leading(a, 3, name)


def _merge_leading(a: np.ndarray, ndim: int, name: str) -> np.ndarray:
    """View ``a`` with ``ndim`` axes: leading axes merged into one, or ones prepended; no copy."""
    if a.ndim == ndim:
        return a
    if a.ndim < ndim:
        return a.reshape((1,) * (ndim - a.ndim) + a.shape)
    v = a.view()
    try:
        v.shape = (-1,) + a.shape[a.ndim - ndim + 1:]
    except AttributeError:
        raise LayoutError(f"{name}: the leading axes of {describe(a)} cannot be merged without a copy") from None
    return v


def _as_2d(a: np.ndarray, name: str) -> np.ndarray:
    """View per-row scales [..., T] as [A, T] without copying."""
    return _merge_leading(a, 2, name)


def _check_out(a, name: str, dtype, shape: tuple) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise DTypeError(f"{name} must be a numpy array, found {type(a).__name__}")
    if a.dtype != dtype:
        raise DTypeError(f"{name} must be {np.dtype(dtype)}, found {a.dtype}")
    if a.shape != tuple(shape):
        raise ShapeError(f"{name} must have shape {tuple(shape)}, found {a.shape}")
    if not a.flags.writeable:
        raise LayoutError(f"{name} is read-only")
    return a


def _check_input(x) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype not in (np.float32, np.float16):
        raise DTypeError(f"expected float32 or float16 input, found {x.dtype} (convert with .astype(np.float32))")
    if x.ndim == 0:
        raise ShapeError("expected an array [..., head_dim], found a scalar")
    if x.shape[-1] == 0:
        raise ShapeError(f"head_dim (the last axis) must be at least 1, found shape {x.shape}")
    return x


def _status(status: int, fmt: Format) -> None:
    if status & _quant.NONFINITE:
        raise NonFiniteError(f"cannot store NaN or infinity in {fmt.name}: the input holds non-finite values")
    if status & _quant.OVERFLOW:
        raise NonFiniteError(f"the input holds values beyond {fmt.name}'s range (|x| <= {fmt.overflow_limit})")


# ---------------------------------------------------------------------------------
# Public API


def quantize(x, fmt: str, *, grouping: str = "token", group_size: int | None = None) -> QTensor:
    """Quantize ``x`` into storage format ``fmt``.

    Parameters
    ----------
    x : numpy.ndarray, float32 or float16, shape ``[..., head_dim]``
        Any leading shape. float16 input is widened to float32 first; an input whose last
        axis is not contiguous is copied first.
    fmt : str
        One of :data:`kvmmap.FORMATS`.
    grouping : {"token", "channel"}
        int4 only: group along each row (values) or along axis -2 (keys, KIVI).
    group_size : int, optional
        int4 group length: elements per group along the row (default 32, or head_dim if 32
        does not divide it) or tokens per group along axis -2 (default 32).

    Returns
    -------
    QTensor

    Raises
    ------
    FormatError, DTypeError, ShapeError, NonFiniteError

    Examples
    --------
    >>> import numpy as np, kvmmap as km
    >>> x = np.random.default_rng(0).standard_normal((4, 8, 128), dtype=np.float32)
    >>> q = km.quantize(x, "int8")
    >>> q.codes.shape, q.scales.shape
    ((4, 8, 128), (4, 8))
    >>> float(np.abs(km.dequantize(q) - x).max()) <= float(q.scales.max()) / 2 + 1e-6
    True
    """
    f = get_format(fmt)
    x = _check_input(x)
    grouping, group_size = f.resolve_grouping(x.shape, grouping, group_size)
    x = np.ascontiguousarray(x, dtype=np.float32)
    codes = np.empty(f.code_shape(x.shape), dtype=f.code_dtype)
    side = f.side_shape(x.shape, grouping, group_size)
    scales = np.empty(side, np.float32) if side is not None else None
    zeros = np.empty(side, np.float32) if f.zero_point else None
    q = QTensor(codes, scales, zeros, f.name, tuple(x.shape), grouping, group_size)
    quantize_into_checked_shapes(x, q)
    return q


def quantize_into(x, out: QTensor) -> None:
    """Quantize ``x`` into the preallocated arrays of ``out``, without temporaries.

    ``out`` names the format, grouping and destination arrays, which may be views into a
    pool's pages: only their last axis must be contiguous and their leading axes must merge
    into one without a copy. ``x`` must be float32 with a contiguous last axis.

    Parameters
    ----------
    x : numpy.ndarray, float32, shape ``out.shape``
    out : QTensor
        Destination; its ``codes`` / ``scales`` / ``zeros`` are overwritten.

    Raises
    ------
    DTypeError, ShapeError, LayoutError, NonFiniteError
        On a rejected input nothing is promised about the destination's contents, so
        write into space that is not yet visible (the pool does).
    """
    if not isinstance(out, QTensor):
        raise DTypeError(f"quantize_into writes into a QTensor (see quantize), found {type(out).__name__}")
    f = get_format(out.format)
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise DTypeError(f"quantize_into needs float32 input, found {getattr(x, 'dtype', type(x).__name__)}")
    if x.shape != tuple(out.shape):
        raise ShapeError(f"input shape {x.shape} does not match the destination's {tuple(out.shape)}")
    if x.shape[-1] == 0:
        raise ShapeError("head_dim (the last axis) must be at least 1")
    grouping, group_size = f.resolve_grouping(x.shape, out.grouping, out.group_size or None)
    if group_size != out.group_size:
        raise FormatError(f"{f.name} destination needs an explicit group_size, found {out.group_size}")
    _check_out(out.codes, "codes", f.code_dtype, f.code_shape(x.shape))
    side = f.side_shape(x.shape, grouping, group_size)
    if side is not None:
        _check_out(out.scales, "scales", np.float32, side)
    if f.zero_point:
        _check_out(out.zeros, "zeros", np.float32, side)
    quantize_into_checked_shapes(x, out)


def _side(f: Format, a: np.ndarray | None, name: str) -> np.ndarray:
    """Side data as the kernels take it, [A, rows, width]: per-row scales [..., T] get a
    width of 1, absent side data a [1, 1, 1] placeholder."""
    if a is None:
        return _NO_SIDE
    return _as_3d(a, name) if f.grouped else _as_2d(a, name)[:, :, None]


def quantize_into_checked_shapes(x: np.ndarray, q: QTensor) -> None:
    """:func:`quantize_into` for a caller that knows ``x`` and ``q`` agree in shape and
    dtype (float32, last axis contiguous): only the values are checked (NonFiniteError
    for what the format cannot store, with nothing written)."""
    if x.size == 0:
        return
    f = get_format(q.format)
    n = get_num_threads()
    x3 = _as_3d(x, "x")
    c3 = _as_3d(q.codes, "codes").view(np.uint8)
    if q.grouping == "channel":
        status = _quant.quantize_int4_channel(x3, c3, _as_3d(q.scales, "scales"), _as_3d(q.zeros, "zeros"),
                                              q.group_size, n)
    else:
        status = _quant.quantize_rows(f.format_id, x3, c3, _side(f, q.scales, "scales"),
                                      _side(f, q.zeros, "zeros"), q.group_size, n)
    _status(status, f)


def dequantize(q: QTensor, out: np.ndarray | None = None) -> np.ndarray:
    """Decode a :class:`QTensor` to float32.

    Parameters
    ----------
    q : QTensor
    out : numpy.ndarray, float32, shape ``q.shape``, optional
        Destination with a contiguous last axis (may be a strided view); allocated if None.

    Returns
    -------
    numpy.ndarray, float32, shape ``q.shape``
    """
    if not isinstance(q, QTensor):
        raise DTypeError(f"dequantize expects a QTensor, found {type(q).__name__}")
    f = get_format(q.format)
    shape = tuple(q.shape)
    grouping, group_size = f.resolve_grouping(shape, q.grouping, q.group_size or None)
    if group_size != q.group_size:
        raise FormatError(f"{f.name} QTensor needs an explicit group_size, found {q.group_size}")
    if q.codes.dtype != f.code_dtype or q.codes.shape != f.code_shape(shape):
        raise ShapeError(
            f"{f.name} codes for shape {shape} must be {f.code_dtype}{list(f.code_shape(shape))}, found {describe(q.codes)}"
        )
    side = f.side_shape(shape, grouping, group_size)
    for name in ("scales", "zeros") if f.zero_point else ("scales",) if f.scaled else ():
        a = getattr(q, name)
        if a is None or a.dtype != np.float32 or a.shape != side:
            raise ShapeError(f"{f.name} {name} for shape {shape} must be float32{list(side)}, found {describe(a) if a is not None else None}")
    if out is None:
        out = np.empty(shape, np.float32)
    else:
        _check_out(out, "out", np.float32, shape)
    if out.size == 0:
        return out
    o3 = _as_3d(out, "out")
    c3 = _as_3d(q.codes, "codes").view(np.uint8)
    channel = grouping == "channel"
    _quant.dequantize_rows(f.format_id, c3, _side(f, q.scales, "scales"), _side(f, q.zeros, "zeros"),
                           0 if channel else group_size, group_size if channel else 1, o3, get_num_threads())
    return out


def check_storable(x: np.ndarray, fmt: str) -> None:
    """Raise :class:`NonFiniteError` if quantizing float32 ``x`` into ``fmt`` would fail.

    One read of ``x``; lets a caller refuse bad input before changing anything.
    """
    if x.size == 0:
        return
    f = get_format(fmt)
    worst = _quant.max_abs_bits(_as_3d(x, "x"), get_num_threads())
    if worst >= 0x7F800000:
        _status(_quant.NONFINITE, f)
    if worst >= _quant.refused_abs_bits(f.format_id):
        _status(_quant.OVERFLOW, f)


def fp8_values(fmt: str) -> np.ndarray:
    """The 256 float32 values that an fp8 format's codes stand for (NaN where reserved)."""
    f = get_format(fmt)
    if not f.value_table:
        raise FormatError(f"expected a format with a value table (fp8), found {f.name!r}")
    return np.array(_quant.fp8_table(f.format_id), dtype=np.float32)
