"""Quantize and dequantize float arrays into the storage formats of :mod:`kvmmap.formats`.

Arrays are ``[..., head_dim]``: the last axis is one token's vector for one head. Scales
live beside the codes, float32 (what :func:`quantize` makes by default, and format 1.0
pages) or float16 (format 2.0 pages; ``quantize(..., side_dtype=np.float16)``):

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

float16 side data: the scale is computed in float32 and rounded *up* to a float16 value,
an int4 zero point (the group minimum) rounded *down*, and the codes are computed against
the rounded values, so no code clips and every decoded element is within half a step
(the stored scale) of its input, as with float32 side data; the steps are up to 2**-10
coarser (int4: plus the zero point's rounding, at most 2**-10 of the group minimum, spread
over 15 steps). float16 cannot hold a scale above 65504, so such destinations refuse, with
:class:`~kvmmap.errors.NonFiniteError` and nothing written, a row whose absmax exceeds
``65504 * max code`` (int8 8319008, fp8_e4m3 29345792, fp8_e5m2 3756269568) and an int4
group whose minimum is below -65504 or whose range exceeds about ``15 * 65504``. A scale
below float16's smallest step (2**-24, rows of absmax below about 1e-6) rounds up to it:
such rows keep only their larger elements.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..errors import DTypeError, FormatError, LayoutError, NonFiniteError, ShapeError, describe
from ..formats import GROUPINGS, Format, get_format
from ..parallel import get_num_threads
from . import _quant

__all__ = ["GROUPINGS", "SIDE_DTYPES", "TINY", "QTensor", "check_storable", "dequantize", "fp8_values", "quantize",
           "quantize_into"]

#: Rows (int4: groups) of scaled formats whose absmax (range) is below this are zeroed.
TINY = _quant.TINY
#: dtypes of scales and zero points: format 1.0 pages and the default, format 2.0 pages
SIDE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
# side arrays passed to the kernels for formats that have none (never read or written),
# one per side dtype (a kernel takes scales and zeros of one dtype)
_NO_SIDE = {np.dtype(np.float32): np.zeros((1, 1, 1), np.float32),
            np.dtype(np.float16): np.zeros((1, 1, 1), np.uint16)}


@dataclass(frozen=True)
class QTensor:
    """A quantized array: codes plus the side arrays its format needs.

    Attributes
    ----------
    codes : numpy.ndarray
        Codes, shape ``shape`` (``shape[:-1] + (D // 2,)`` for int4), dtype of the format.
    scales : numpy.ndarray or None
        float32 or float16 scales (see the module docstring for their shape), None when
        unscaled.
    zeros : numpy.ndarray or None
        Zero points, same shape and dtype as ``scales`` (int4 only).
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

    @property
    def side_dtype(self) -> np.dtype:
        """dtype of the scales and zeros (float32 when the format has none)."""
        return self.scales.dtype if isinstance(self.scales, np.ndarray) else SIDE_DTYPES[0]


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


def raise_for_status(status: int, fmt: Format) -> None:
    """Raise the kvmmap error a kernel's STATUS_* bits stand for (nothing when 0)."""
    if status & _quant.NO_MEMORY:
        raise MemoryError(f"quantizing into {fmt.name} could not allocate its scratch rows")
    if status & _quant.NONFINITE:
        raise NonFiniteError(f"cannot store NaN or infinity in {fmt.name}: the input holds non-finite values")
    if status & _quant.OVERFLOW:
        raise NonFiniteError(f"the input holds values beyond {fmt.name}'s range (|x| <= {fmt.overflow_limit})")
    if status & _quant.SIDE_OVERFLOW:
        f16max = float(np.finfo(np.float16).max)
        if fmt.zero_point:
            need = (f"every group's minimum >= {-f16max:g} and its range <= about {15 * f16max:g}")
        else:
            need = f"|x| <= {f16max:g} * {fmt.max_code_value:g} = {f16max * fmt.max_code_value:.10g}"
        raise NonFiniteError(f"the input holds values whose {fmt.name} scale or zero point float16 side data "
                             f"cannot represent (it needs {need}); nothing was written")


def _side_dtype(a, name: str) -> np.dtype:
    if not isinstance(a, np.ndarray) or a.dtype not in SIDE_DTYPES:
        raise DTypeError(f"{name} must be a float32 or float16 numpy array, found "
                         f"{describe(a) if isinstance(a, np.ndarray) else type(a).__name__}")
    return a.dtype


# ---------------------------------------------------------------------------------
# Public API


def quantize(x, fmt: str, *, grouping: str = "token", group_size: int | None = None,
             side_dtype=np.float32) -> QTensor:
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
        int4 group length: elements per group along the row (default 64 if it divides
        head_dim, else the largest even divisor of head_dim below 64) or tokens per group
        along axis -2 (default 32).
    side_dtype : numpy.float32 or numpy.float16
        dtype of the scales and zeros (default float32); float16 rounds them as the module
        docstring says and refuses rows whose scale it cannot hold.

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
    sdt = np.dtype(side_dtype)
    if sdt not in SIDE_DTYPES:
        raise DTypeError(f"side_dtype must be float32 or float16, found {sdt}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    codes = np.empty(f.code_shape(x.shape), dtype=f.code_dtype)
    side = f.side_shape(x.shape, grouping, group_size)
    scales = np.empty(side, sdt) if side is not None else None
    zeros = np.empty(side, sdt) if f.zero_point else None
    q = QTensor(codes, scales, zeros, f.name, tuple(x.shape), grouping, group_size)
    quantize_into_checked_shapes(x, q)
    return q


def quantize_into(x, out: QTensor, *, all_or_nothing: bool = True) -> None:
    """Quantize ``x`` into the preallocated arrays of ``out``, without temporaries.

    ``out`` names the format, grouping and destination arrays, which may be views into a
    pool's pages: only their last axis must be contiguous and their leading axes must merge
    into one without a copy. ``x`` must be float32 with a contiguous last axis. Scales and
    zeros are float32 or float16 (both the same).

    Parameters
    ----------
    x : numpy.ndarray, float32, shape ``out.shape``
    out : QTensor
        Destination; its ``codes`` / ``scales`` / ``zeros`` are overwritten.
    all_or_nothing : bool
        With float16 side data, check every row before writing any (an extra pass), so
        that refused input leaves the destination unchanged. False: skip that pass (a
        refusal may leave some rows written), for callers writing where nothing reads
        until the call succeeded (the pool's rows past a sequence's length).

    Raises
    ------
    DTypeError, ShapeError, LayoutError, NonFiniteError
        On a rejected input nothing is promised about the destination's contents with
        float32 side data, so write into space that is not yet visible (the pool does).
        A destination with float16 side data is checked whole before anything is written:
        refused input leaves it unchanged.
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
        sdt = _side_dtype(out.scales, "scales")
        _check_out(out.scales, "scales", sdt, side)
        if f.zero_point:
            _check_out(out.zeros, "zeros", sdt, side)
    quantize_into_checked_shapes(x, out, all_or_nothing)


def _side(f: Format, a: np.ndarray | None, name: str, sdt: np.dtype) -> np.ndarray:
    """Side data as the kernels take it, [A, rows, width] float32 or float16 bits (uint16):
    per-row scales [..., T] get a width of 1, absent side data a [1, 1, 1] placeholder."""
    if a is None:
        return _NO_SIDE[sdt]
    a = _as_3d(a, name) if f.grouped else _as_2d(a, name)[:, :, None]
    return a.view(np.uint16) if sdt == np.float16 else a


def quantize_into_checked_shapes(x: np.ndarray, q: QTensor, all_or_nothing: bool = True) -> None:
    """:func:`quantize_into` for a caller that knows ``x`` and ``q`` agree in shape and
    dtype (float32, last axis contiguous): only the values are checked (NonFiniteError
    for what the format cannot store; with float16 side data, before anything is
    written)."""
    if x.size == 0:
        return
    f = get_format(q.format)
    n = get_num_threads()
    sdt = q.side_dtype
    x3 = _as_3d(x, "x")
    c3 = _as_3d(q.codes, "codes").view(np.uint8)
    sc, zp = _side(f, q.scales, "scales", sdt), _side(f, q.zeros, "zeros", sdt)
    kernel = _quant.quantize_int4_channel if q.grouping == "channel" else \
        functools.partial(_quant.quantize_rows, f.format_id)
    # float16 side data: a refused row must leave the destination as it was. One fast
    # pass for the largest |x| clears most inputs; past that bound, rows (groups) are
    # checked one by one before anything is written.
    if all_or_nothing and sdt == np.float16 and _quant.max_abs_bits(x3, n) > _half_side_safe_bits(f):
        raise_for_status(kernel(x3, c3, sc, zp, q.group_size, n, True), f)
    raise_for_status(kernel(x3, c3, sc, zp, q.group_size, n), f)


@functools.lru_cache(maxsize=None)
def _half_side_safe_bits(f: Format) -> int:
    """abs bits of float32 up to which every row fits float16 side data: |x| <= 65504 *
    the largest code (int8, fp8: exactly the limit), or |x| <= 65504 for int4 (a sufficient
    bound: zero points >= -65504 and scales <= 2 * 65504 / 15)."""
    f16max = float(np.finfo(np.float16).max)
    bound = f16max if f.zero_point else f16max * f.max_code_value
    return int(np.array(bound, np.float32).view(np.uint32))


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
    sdt = q.side_dtype
    for name in ("scales", "zeros") if f.zero_point else ("scales",) if f.scaled else ():
        a = getattr(q, name)
        if a is None or a.dtype != sdt or sdt not in SIDE_DTYPES or a.shape != side:
            raise ShapeError(f"{f.name} {name} for shape {shape} must be float32{list(side)} or "
                             f"float16{list(side)} (both alike), found {describe(a) if a is not None else None}")
    if out is None:
        out = np.empty(shape, np.float32)
    else:
        _check_out(out, "out", np.float32, shape)
    if out.size == 0:
        return out
    o3 = _as_3d(out, "out")
    c3 = _as_3d(q.codes, "codes").view(np.uint8)
    channel = grouping == "channel"
    _quant.dequantize_rows(f.format_id, c3, _side(f, q.scales, "scales", sdt), _side(f, q.zeros, "zeros", sdt),
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
        raise_for_status(_quant.NONFINITE, f)
    if worst >= _quant.refused_abs_bits(f.format_id):
        raise_for_status(_quant.OVERFLOW, f)


def fp8_values(fmt: str) -> np.ndarray:
    """The 256 float32 values that an fp8 format's codes stand for (NaN where reserved)."""
    f = get_format(fmt)
    if not f.value_table:
        raise FormatError(f"expected a format with a value table (fp8), found {f.name!r}")
    return np.array(_quant.fp8_table(f.format_id), dtype=np.float32)
