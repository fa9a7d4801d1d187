"""The storage formats kvmmap knows, in one registry.

A format says how one row of ``head_dim`` floats is stored: the dtype of its codes, how
many code bytes a row takes, and which side arrays (scales, zero points) travel with it.
Every other module asks this registry instead of comparing format names itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import FormatError, ShapeError

#: int4 groupings: along each row (values) or along the tokens, per channel (KIVI keys).
GROUPINGS = ("token", "channel")
#: Default int4 group length along a row (values), when it divides head_dim (else the
#: largest even divisor of head_dim below it): the default of ``quantize`` and of
#: ``PagedKVCache.create(v_group_size=None)``. 64 rather than 32: with float16 side data
#: (format 2) a group of 64 costs 0.5 bit per element, as 32 did with float32.
DEFAULT_TOKEN_GROUP = 64
#: Default int4 group length along the tokens for ``quantize(grouping="channel")`` (a
#: cache's key group is its page).
DEFAULT_CHANNEL_GROUP = 32
#: Largest int4 group along a row (the encoder's scratch row in codecs/_rows.pxd).
MAX_TOKEN_GROUP = 256


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
    groupings : tuple of str
        Groupings of the side data that the format offers; the first is the default.
    value_table : bool
        Codes stand for the 256 entries of a value table (fp8).
    overflow_limit : str or None
        Largest magnitude the format accepts on input, as printed in errors, when it is
        below float32's (every format refuses NaN and inf).
    """

    name: str
    format_id: int
    code_dtype: np.dtype
    codes_per_element: int
    scaled: bool
    zero_point: bool
    max_code_value: float
    bits: int
    groupings: tuple = ("token",)
    value_table: bool = False
    overflow_limit: str | None = None

    @property
    def grouped(self) -> bool:
        """Side data per group of elements (int4), with a group size to choose."""
        return len(self.groupings) > 1

    def code_width(self, head_dim: int) -> int:
        """Number of code items that store one row of ``head_dim`` elements."""
        return head_dim // self.codes_per_element

    def row_nbytes(self, head_dim: int) -> int:
        """Bytes of codes for one row of ``head_dim`` elements (scales not included)."""
        return self.code_width(head_dim) * self.code_dtype.itemsize

    def code_shape(self, shape: tuple) -> tuple:
        """Shape of the codes of an array of ``shape`` ``[..., head_dim]``."""
        return tuple(shape[:-1]) + (self.code_width(shape[-1]),)

    def side_shape(self, shape: tuple, grouping: str = "token", group_size: int = 0) -> tuple | None:
        """Shape of the scales (and zeros) of an array of ``shape``, or None if unscaled.

        Per-row formats: ``shape[:-1]``. Grouped, token grouping: ``shape[:-1] + (D / G,)``;
        channel grouping: ``shape[:-2] + (ceil(T / G), D)`` (``T = shape[-2]``).
        """
        shape = tuple(shape)
        if not self.scaled:
            return None
        if not self.grouped:
            return shape[:-1]
        if grouping == "token":
            return shape[:-1] + (shape[-1] // group_size,)
        return shape[:-2] + (-(-shape[-2] // group_size), shape[-1])

    def default_group_size(self, head_dim: int, grouping: str = "token") -> int:
        """The group length used when none is given (0 for formats without groups).

        Token grouping: :data:`DEFAULT_TOKEN_GROUP` if it divides ``head_dim``, else the
        largest even divisor of ``head_dim`` below it (96 -> 48, 40 -> 40, 100 -> 50).

        Raises
        ------
        ShapeError
            Token grouping of an odd ``head_dim`` (no even group divides it).
        """
        if not self.grouped:
            return 0
        if grouping == "channel":
            return DEFAULT_CHANNEL_GROUP
        if head_dim % 2:
            raise ShapeError(f"{self.name} groups along a row need an even head_dim, found {head_dim}")
        return max(g for g in range(2, min(DEFAULT_TOKEN_GROUP, head_dim) + 1, 2) if head_dim % g == 0)

    def resolve_grouping(self, shape: tuple, grouping: str = "token",
                         group_size: int | None = None) -> tuple[str, int]:
        """Check a grouping for an array of ``shape`` and fill in the default group size.

        Returns ``(grouping, group_size)``; group_size is 0 for formats without groups.

        Raises
        ------
        FormatError
            An unknown grouping, a grouping or group_size the format does not have, or an
            int4 token group_size that is not even, at most 256 and a divisor of head_dim,
            or a channel group_size below 1.
        ShapeError
            An odd head_dim for a format that packs two codes a byte, or channel grouping
            of a 1-D array.
        """
        if grouping not in GROUPINGS:
            raise FormatError(f"grouping must be one of {GROUPINGS}, found {grouping!r}")
        if not self.grouped:
            if grouping == "token" and group_size in (None, 0):
                return "token", 0
            grouped = ", ".join(f.name for f in _REGISTRY.values() if f.grouped)
            if grouping != "token":
                raise FormatError(f"grouping={grouping!r} is only available for {grouped}, not {self.name}")
            if group_size not in (None, 0):
                raise FormatError(f"group_size is only used by {grouped}, not {self.name}")
            return "token", 0
        head_dim = shape[-1]
        if head_dim % self.codes_per_element:
            raise ShapeError(f"{self.name} packs {self.codes_per_element} codes a byte and needs "
                             f"an even head_dim, found {head_dim}")
        if group_size is None:
            group_size = self.default_group_size(head_dim, grouping)
        if grouping == "token":
            if group_size < 2 or group_size % 2 or head_dim % group_size or group_size > MAX_TOKEN_GROUP:
                raise FormatError(
                    f"{self.name} token group_size must be even, at most {MAX_TOKEN_GROUP} and divide "
                    f"head_dim={head_dim}, found {group_size}"
                )
        else:
            if len(shape) < 2:
                raise ShapeError(f"channel grouping needs a token axis: expected [..., tokens, head_dim], "
                                 f"found {len(shape)}-D")
            if group_size < 1:
                raise FormatError(f"{self.name} channel group_size must be >= 1, found {group_size}")
        return grouping, int(group_size)


_REGISTRY = {
    f.name: f
    for f in (
        Format("fp32", 0, np.dtype(np.float32), 1, False, False, 0.0, 32),
        Format("fp16", 1, np.dtype(np.float16), 1, False, False, 0.0, 16, overflow_limit="65504"),
        Format("bf16", 2, np.dtype(np.uint16), 1, False, False, 0.0, 16, overflow_limit="3.39e38"),
        Format("int8", 3, np.dtype(np.int8), 1, True, False, 127.0, 8),
        # int4: |x| < 2**126, so that a group's max - min stays finite in float32
        Format("int4", 4, np.dtype(np.uint8), 2, True, True, 15.0, 4, groupings=GROUPINGS,
               overflow_limit="8.5e37"),
        Format("fp8_e4m3", 5, np.dtype(np.uint8), 1, True, False, 448.0, 8, value_table=True),
        Format("fp8_e5m2", 6, np.dtype(np.uint8), 1, True, False, 57344.0, 8, value_table=True),
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
