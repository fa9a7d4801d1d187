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

from . import _quant
from .errors import DTypeError, FormatError, LayoutError, NonFiniteError, ShapeError, describe
from .formats import Format, get_format
from .parallel import get_num_threads

GROUPINGS = ("token", "channel")
#: Rows (int4: groups) of scaled formats whose absmax (range) is below this are zeroed.
TINY = _quant.TINY
_FP8_KIND = {"fp8_e4m3": _quant.FP8_E4M3, "fp8_e5m2": _quant.FP8_E5M2}


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
    if grouping not in GROUPINGS:
        raise FormatError(f"grouping must be one of {GROUPINGS}, found {grouping!r}")
    if fmt.name != "int4":
        if grouping != "token":
            raise FormatError(f"grouping={grouping!r} is only available for int4, not {fmt.name}")
        if group_size not in (None, 0):
            raise FormatError(f"group_size is only used by int4, not {fmt.name}")
        return "token", 0
    head_dim = shape[-1]
    if head_dim % 2:
        raise ShapeError(f"int4 packs two codes a byte and needs an even head_dim, found {head_dim}")
    if grouping == "token":
        if group_size is None:
            group_size = 32 if head_dim % 32 == 0 else min(head_dim, 256)
        if group_size < 2 or group_size % 2 or head_dim % group_size or group_size > 256:
            raise FormatError(
                f"int4 token group_size must be even, at most 256 and divide head_dim={head_dim}, "
                f"found {group_size}"
            )
    else:
        if len(shape) < 2:
            raise ShapeError(f"channel grouping needs a token axis: expected [..., tokens, head_dim], found {len(shape)}-D")
        if group_size is None:
            group_size = 32
        if group_size < 1:
            raise FormatError(f"int4 channel group_size must be >= 1, found {group_size}")
    return grouping, int(group_size)


def _side_shape(fmt: Format, shape: tuple, grouping: str, group_size: int) -> tuple | None:
    """Shape of scales / zeros for an input of ``shape``, or None if the format has none."""
    if not fmt.scaled:
        return None
    if fmt.name != "int4":
        return shape[:-1]
    if grouping == "token":
        return shape[:-1] + (shape[-1] // group_size,)
    return shape[:-2] + (-(-shape[-2] // group_size), shape[-1])


def _code_shape(fmt: Format, shape: tuple) -> tuple:
    return shape[:-1] + (fmt.code_width(shape[-1]),)


def _as_3d(a: np.ndarray, name: str) -> np.ndarray:
    """View ``a`` as [A, T, D] without copying; the last axis must be contiguous."""
    if a.ndim == 0:
        raise ShapeError(f"{name} must have at least one axis, found a scalar")
    if a.shape[-1] > 1 and a.strides[-1] != a.itemsize:
        raise LayoutError(f"{name}: the last axis must be contiguous, found strides {a.strides}")
    if a.ndim == 3:
        return a
    if a.ndim < 3:
        return a.reshape((1,) * (3 - a.ndim) + a.shape)
    v = a.view()
    try:
        v.shape = (-1,) + a.shape[-2:]
    except AttributeError:
        raise LayoutError(
            f"{name}: the leading axes of {describe(a)} cannot be merged without a copy"
        ) from None
    return v


def _as_2d(a: np.ndarray, name: str) -> np.ndarray:
    """View per-row scales [..., T] as [A, T] without copying."""
    if a.ndim == 2:
        return a
    if a.ndim < 2:
        return a.reshape((1,) * (2 - a.ndim) + a.shape)
    v = a.view()
    try:
        v.shape = (-1, a.shape[-1])
    except AttributeError:
        raise LayoutError(f"{name}: the leading axes of {describe(a)} cannot be merged without a copy") from None
    return v


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
        limit = {"fp16": "65504", "bf16": "3.39e38", "int4": "8.5e37"}[fmt.name]
        raise NonFiniteError(f"the input holds values beyond {fmt.name}'s range (|x| <= {limit})")


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
    grouping, group_size = _resolve_grouping(f, x.shape, grouping, group_size)
    x = np.ascontiguousarray(x, dtype=np.float32)
    codes = np.empty(_code_shape(f, x.shape), dtype=f.code_dtype)
    side = _side_shape(f, x.shape, grouping, group_size)
    scales = np.empty(side, np.float32) if side is not None else None
    zeros = np.empty(side, np.float32) if f.zero_point else None
    q = QTensor(codes, scales, zeros, f.name, tuple(x.shape), grouping, group_size)
    _quantize_unchecked(x, q)
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
    grouping, group_size = _resolve_grouping(f, x.shape, out.grouping, out.group_size or None)
    if f.name == "int4" and group_size != out.group_size:
        raise FormatError(f"int4 destination needs an explicit group_size, found {out.group_size}")
    _check_out(out.codes, "codes", f.code_dtype, _code_shape(f, x.shape))
    side = _side_shape(f, x.shape, grouping, group_size)
    if side is not None:
        _check_out(out.scales, "scales", np.float32, side)
    if f.zero_point:
        _check_out(out.zeros, "zeros", np.float32, side)
    _quantize_unchecked(x, out)


def _quantize_unchecked(x: np.ndarray, q: QTensor) -> None:
    if x.size == 0:
        return
    n = get_num_threads()
    x3 = _as_3d(x, "x")
    c3 = _as_3d(q.codes, "codes")
    name = q.format
    if name == "fp32":
        status = _quant.quantize_fp32(x3, c3, n)
    elif name == "fp16":
        status = _quant.quantize_fp16(x3, c3.view(np.uint16), n)
    elif name == "bf16":
        status = _quant.quantize_bf16(x3, c3, n)
    elif name == "int8":
        status = _quant.quantize_int8(x3, c3, _as_2d(q.scales, "scales"), n)
    elif name in _FP8_KIND:
        status = _quant.quantize_fp8(x3, c3, _as_2d(q.scales, "scales"), _FP8_KIND[name], n)
    elif q.grouping == "token":
        status = _quant.quantize_int4_token(
            x3, c3, _as_3d(q.scales, "scales"), _as_3d(q.zeros, "zeros"), q.group_size, n
        )
    else:
        status = _quant.quantize_int4_channel(
            x3, c3, _as_3d(q.scales, "scales"), _as_3d(q.zeros, "zeros"), q.group_size, n
        )
    _status(status, get_format(name))


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
    grouping, group_size = _resolve_grouping(f, shape, q.grouping, q.group_size or None)
    if f.name == "int4" and group_size != q.group_size:
        raise FormatError(f"int4 QTensor needs an explicit group_size, found {q.group_size}")
    if q.codes.dtype != f.code_dtype or q.codes.shape != _code_shape(f, shape):
        raise ShapeError(
            f"{f.name} codes for shape {shape} must be {f.code_dtype}{list(_code_shape(f, shape))}, found {describe(q.codes)}"
        )
    side = _side_shape(f, shape, grouping, group_size)
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
    n = get_num_threads()
    o3 = _as_3d(out, "out")
    c3 = _as_3d(q.codes, "codes")
    if f.name == "fp32":
        o3[...] = c3
    elif f.name == "fp16":
        _quant.dequantize_fp16(c3.view(np.uint16), o3, n)
    elif f.name == "bf16":
        _quant.dequantize_bf16(c3, o3, n)
    elif f.name == "int8":
        _quant.dequantize_int8(c3, _as_2d(q.scales, "scales"), o3, n)
    elif f.name in _FP8_KIND:
        _quant.dequantize_fp8(c3, _as_2d(q.scales, "scales"), o3, _FP8_KIND[f.name], n)
    elif grouping == "token":
        _quant.dequantize_int4_token(c3, _as_3d(q.scales, "scales"), _as_3d(q.zeros, "zeros"), o3, group_size, n)
    else:
        _quant.dequantize_int4_channel(c3, _as_3d(q.scales, "scales"), _as_3d(q.zeros, "zeros"), o3, group_size, n)
    return out


_LIMITS = {"fp16": 0x477FF000, "bf16": 0x7F7F8000, "int4": 0x7E800000}


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
    if worst >= _LIMITS.get(f.name, 0x7F800000):
        _status(_quant.OVERFLOW, f)


def fp8_values(fmt: str) -> np.ndarray:
    """The 256 float32 values that an fp8 format's codes stand for (NaN where reserved)."""
    if fmt not in _FP8_KIND:
        raise FormatError(f"expected fp8_e4m3 or fp8_e5m2, found {fmt!r}")
    return np.array(_quant.fp8_table(_FP8_KIND[fmt]), dtype=np.float32)
