"""The storage formats kvmmap knows, in one registry.

A format says how one row of ``head_dim`` floats is stored: the dtype of its codes, how
many code bytes a row takes, and which side arrays (scales, zero points) travel with it.
Every other module asks this registry instead of comparing format names itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import FormatError


@dataclass(frozen=True)
class Format:
    """Description of one storage format.

    Attributes
    ----------
    name : str
        Registry key, e.g. ``"int8"``.
    format_id : int
        Stable small integer stored in cache files; never reused.
    code_dtype : numpy.dtype
        dtype of the stored codes.
    codes_per_element : int
        Elements per code item: 2 for int4 (two nibbles a byte), else 1.
    scaled : bool
        Codes carry a float32 scale (int8, int4, fp8).
    zero_point : bool
        Codes also carry a float32 zero point (int4).
    max_code_value : float
        Largest magnitude the codes represent before scaling (127 for int8, 448 for
        fp8_e4m3, ...), or 0 when the format is unscaled.
    bits : int
        Bits per element of the codes.
    """

    name: str
    format_id: int
    code_dtype: np.dtype
    codes_per_element: int
    scaled: bool
    zero_point: bool
    max_code_value: float
    bits: int

    def code_width(self, head_dim: int) -> int:
        """Number of code items that store one row of ``head_dim`` elements."""
        return head_dim // self.codes_per_element

    def row_nbytes(self, head_dim: int) -> int:
        """Bytes of codes for one row of ``head_dim`` elements (scales not included)."""
        return self.code_width(head_dim) * self.code_dtype.itemsize


_REGISTRY = {
    f.name: f
    for f in (
        Format("fp32", 0, np.dtype(np.float32), 1, False, False, 0.0, 32),
        Format("fp16", 1, np.dtype(np.float16), 1, False, False, 0.0, 16),
        Format("bf16", 2, np.dtype(np.uint16), 1, False, False, 0.0, 16),
        Format("int8", 3, np.dtype(np.int8), 1, True, False, 127.0, 8),
        Format("int4", 4, np.dtype(np.uint8), 2, True, True, 15.0, 4),
        Format("fp8_e4m3", 5, np.dtype(np.uint8), 1, True, False, 448.0, 8),
        Format("fp8_e5m2", 6, np.dtype(np.uint8), 1, True, False, 57344.0, 8),
    )
}

#: Names of every storage format, in format-id order.
FORMATS: tuple[str, ...] = tuple(_REGISTRY)


def get_format(fmt: "str | Format") -> Format:
    """Look up a format by name (or pass a :class:`Format` through).

    Raises
    ------
    FormatError
        If the name is not one of :data:`FORMATS`.
    """
    if isinstance(fmt, Format):
        return fmt
    try:
        return _REGISTRY[fmt]
    except (KeyError, TypeError):
        raise FormatError(
            f"unknown storage format {fmt!r}; expected one of {', '.join(FORMATS)}"
        ) from None


def format_by_id(format_id: int) -> Format:
    """Look up a format by the integer id stored in cache files."""
    for f in _REGISTRY.values():
        if f.format_id == format_id:
            return f
    raise FormatError(f"unknown storage format id {format_id}; expected 0..{len(_REGISTRY) - 1}")
