"""The open page of a (sequence, layer): tokens written since its last full page.

The open page (the *tail*) lives in RAM and is saved with each commit. It is stored in
its side's own format, except int4, whose open page stays float32 until it fills and is
quantized as a whole (keys per channel over the page's rows: KIVI's residual window).
A tail is ``{side: {region name: array}}`` with each region's page shape ``[H, P, ...]``.
"""

from __future__ import annotations

import numpy as np

from ..codecs import quant
from ..codecs.quant import QTensor
from .layout import PageLayout

SIDES = ("k", "v")


def make_tail(layout: PageLayout) -> dict:
    """An empty open page: zeros in every region (float32 ``[H, P, D]`` for int4 sides)."""
    tail = {}
    H, P, D = layout.num_kv_heads, layout.page_size, layout.head_dim
    for side in SIDES:
        if layout.formats[side].grouped:
            tail[side] = {"codes": np.zeros((H, P, D), np.float32)}
        else:
            tail[side] = {n: np.zeros(r.shape, r.dtype) for n, r in layout.regions[side].items()}
    return tail


def copy_tail(tail: dict) -> dict:
    return {side: {n: a.copy() for n, a in tail[side].items()} for side in SIDES}


def tail_q(layout: PageLayout, side: str, tail: dict, a: int, b: int) -> QTensor:
    """QTensor over rows ``a .. b - 1`` of an open page (head-major ``[H, b - a, D]``)."""
    f = layout.formats[side]
    t = tail[side]
    shape = (layout.num_kv_heads, b - a, layout.head_dim)
    if f.grouped:
        return QTensor(t["codes"][:, a:b], None, None, "fp32", shape)
    return QTensor(t["codes"][:, a:b], t["scales"][:, a:b] if f.scaled else None, None, f.name, shape)


def write_rows(layout: PageLayout, tail: dict, row: int, k: np.ndarray, v: np.ndarray) -> tuple[QTensor, QTensor]:
    """Quantize head-major ``k``, ``v`` ``[H, tokens, D]`` into rows ``row ..`` of an open page.

    Rows past the page's length are not visible, so a refusal (NonFiniteError) changes
    nothing visible; the caller moves the length after both sides succeeded. The
    quantizers refuse non-finite input; int4's range is checked here, since its open page
    is float32. Returns the rows written to.
    """
    for x, side in ((k, "k"), (v, "v")):
        if layout.formats[side].grouped:
            quant.check_storable(x, layout.formats[side].name)
    stop = row + k.shape[1]
    qk, qv = tail_q(layout, "k", tail, row, stop), tail_q(layout, "v", tail, row, stop)
    quant.quantize_into_checked_shapes(k, qk)
    quant.quantize_into_checked_shapes(v, qv)
    return qk, qv


def seal_into(layout: PageLayout, tail: dict, page_q) -> None:
    """Write a full open page into an arena page; ``page_q(side)`` gives its QTensor."""
    for side in SIDES:
        dst = page_q(side)
        if layout.formats[side].grouped:
            quant.quantize_into(tail[side]["codes"], dst)
        else:
            for name, arr in tail[side].items():
                getattr(dst, name)[...] = arr
