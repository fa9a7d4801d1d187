"""Where the arrays of one page sit: K and V codes, scales and zero points (docs/FORMAT.md, Page)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DTypeError
from ..formats import get_format
from ..codecs.quant import QTensor

ALIGN = 64                                      # every page region starts on a 64-byte boundary


def _align(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class Region:
    """One array inside a page: byte offset from the page start, dtype, shape."""

    offset: int
    dtype: np.dtype
    shape: tuple

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


class PageLayout:
    """Where K and V codes, scales and zero points sit inside one page of one layer.

    A page holds ``page_size`` tokens of one layer for every KV head, in this order, each
    region 64-byte aligned::

        K codes [H, P, Dc]  K scales  K zeros  V codes [H, P, Dc]  V scales  V zeros

    Codes are head-major so that one (sequence, kv-head) stream reads ``P * Dc``
    contiguous codes per page. Scales: int8 / fp8 ``[H, P]`` (one per token per head);
    int4 keys ``[H, 1, D]`` (per channel over the page, KIVI); int4 values
    ``[H, P, D / G]``; zero points like the scales (int4 only).

    ``side_dtype`` is the dtype of scales and zero points: float32 (format 1.0) or float16
    (format 2.0); the shapes and the 64-byte alignment of the regions are the same.
    """

    SIDE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))

    def __init__(self, num_kv_heads, head_dim, page_size, k_format, v_format, v_group_size, *,
                 side_dtype=np.float32):
        side_dtype = np.dtype(side_dtype)
        if side_dtype not in self.SIDE_DTYPES:
            raise DTypeError(f"side_dtype must be float32 or float16, found {side_dtype}")
        self.side_dtype = side_dtype
        self.num_kv_heads, self.head_dim, self.page_size = num_kv_heads, head_dim, page_size
        self.formats = {"k": get_format(k_format), "v": get_format(v_format)}
        self.group_size = {"k": page_size if self.formats["k"].grouped else 0,
                           "v": v_group_size if self.formats["v"].grouped else 0}
        self.regions: dict[str, dict[str, Region]] = {}
        off = 0
        H, P, D = num_kv_heads, page_size, head_dim
        for side in ("k", "v"):
            f = self.formats[side]
            regs = {"codes": Region(off, f.code_dtype, (H, P, f.code_width(D)))}
            off = _align(off + regs["codes"].nbytes)
            if f.scaled:
                if not f.grouped:
                    side_shape = (H, P)
                elif side == "k":
                    side_shape = (H, 1, D)
                else:
                    side_shape = (H, P, D // self.group_size["v"])
                for name in ("scales", "zeros") if f.zero_point else ("scales",):
                    regs[name] = Region(off, side_dtype, side_shape)
                    off = _align(off + regs[name].nbytes)
            self.regions[side] = regs
        self.page_bytes = off

    @property
    def tail_bytes(self) -> int:
        """Bytes of one (sequence, layer) tail in the metadata: each side's page regions
        unpadded, or float32 [H, P, D] for an int4 side (docs/FORMAT.md, Payload)."""
        n = 0
        for side, regs in self.regions.items():
            if self.formats[side].grouped:
                n += self.num_kv_heads * self.page_size * self.head_dim * 4
            else:
                n += sum(r.nbytes for r in regs.values())
        return n

    def grouping(self, side: str) -> str:
        return "channel" if side == "k" and self.formats["k"].grouped else "token"

    def arena_views(self, arena: np.ndarray, num_pages: int) -> dict[str, dict[str, np.ndarray]]:
        """Arrays ``[num_pages, *region.shape]`` over a flat uint8 arena, one per region."""
        views = {}
        for side, regs in self.regions.items():
            views[side] = {}
            for name, r in regs.items():
                if num_pages == 0:
                    views[side][name] = np.zeros((0,) + r.shape, r.dtype)
                    continue
                inner = tuple(int(s) for s in np.cumprod((1,) + r.shape[::-1])[:-1][::-1] * r.dtype.itemsize)
                views[side][name] = np.ndarray(
                    (num_pages,) + r.shape, r.dtype, buffer=arena, offset=r.offset,
                    strides=(self.page_bytes,) + inner,
                )
        return views

    def page_qtensor(self, views: dict, side: str, page: int, a: int, b: int) -> QTensor:
        """QTensor over rows ``a .. b - 1`` of one side of a page, given that side's
        :meth:`arena_views` (head-major: shape ``[H, b - a, D]``)."""
        f = self.formats[side]
        shape = (self.num_kv_heads, b - a, self.head_dim)
        codes = views["codes"][page][:, a:b]
        if self.grouping(side) == "channel":
            return QTensor(codes, views["scales"][page], views["zeros"][page], f.name, shape, "channel",
                           self.page_size)
        scales = views["scales"][page][:, a:b] if f.scaled else None
        zeros = views["zeros"][page][:, a:b] if f.zero_point else None
        return QTensor(codes, scales, zeros, f.name, shape, "token", self.group_size[side])

    def side_offsets(self, side: str) -> tuple[int, int, int, int, int, int]:
        """(format id, byte offsets of codes, scales, zeros inside a page, bytes of one
        token's codes for one head, 1 if scales and zeros are float16 else 0) of one side:
        what the page-reading kernels take. Offsets of regions a format lacks are 0."""
        regs, f = self.regions[side], self.formats[side]
        return (f.format_id, regs["codes"].offset, regs["scales"].offset if "scales" in regs else 0,
                regs["zeros"].offset if "zeros" in regs else 0, f.code_width(self.head_dim) * f.code_dtype.itemsize,
                int(self.side_dtype == np.float16))

    def kernel_group(self, side: str) -> int:
        """The group size the page kernels take: int4 values' group along head_dim; 0 for
        keys grouped per channel over the page, and for formats without groups."""
        return self.group_size["v"] if side == "v" else 0
