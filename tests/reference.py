"""Plain-numpy reference implementations that the kernels are tested against.

Written independently of kvmmap's kernels: rounding is done by searching the set of
representable values, not by bit tricks, so a shared mistake is unlikely.
"""

from __future__ import annotations

import numpy as np

FP8 = {  # name: (exponent bits, mantissa bits, bias, has inf)
    "fp8_e4m3": (4, 3, 7, False),
    "fp8_e5m2": (5, 2, 15, True),
}


def fp8_decode_table(fmt: str) -> np.ndarray:
    """float64 value of each of the 256 codes (NaN / inf where the format reserves them)."""
    ebits, mbits, bias, has_inf = FP8[fmt]
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    e = (codes >> mbits) & ((1 << ebits) - 1)
    m = codes & ((1 << mbits) - 1)
    val = np.where(e == 0, np.ldexp(m.astype(float), 1 - bias - mbits),
                   np.ldexp(1.0 + m / 2.0**mbits, e - bias))
    emax = (1 << ebits) - 1
    if has_inf:
        val = np.where(e == emax, np.where(m == 0, np.inf, np.nan), val)
    else:
        val = np.where((e == emax) & (m == (1 << mbits) - 1), np.nan, val)
    return sign * val


def nearest_code(y: np.ndarray, values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Round each y to the nearest of ``values`` (sorted, ascending), ties to the even code."""
    y = np.asarray(y, np.float64)
    hi = np.clip(np.searchsorted(values, y), 1, len(values) - 1)
    lo = hi - 1
    d_lo = y - values[lo]
    d_hi = values[hi] - y
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (codes[hi] % 2 == 0))
    return np.where(pick_hi, codes[hi], codes[lo])


def fp8_quantize(x: np.ndarray, fmt: str):
    """Per-row scaled fp8: returns (codes uint8, scales float32)."""
    table = fp8_decode_table(fmt)
    fmax = np.nanmax(table[np.isfinite(table)])
    amax = np.abs(x).max(axis=-1).astype(np.float32)
    safe = np.where(amax > 0, amax, 1).astype(np.float64)
    inv = np.where(amax > 0, (fmax / safe).astype(np.float32), np.float32(0))
    y = np.clip(x * inv[..., None], -fmax, fmax)            # float32 multiply, like the kernel
    finite = np.isfinite(table) & ~((np.arange(256) & 0x80).astype(bool) & (table == 0))
    codes = np.arange(256)[finite]
    order = np.argsort(table[finite], kind="stable")
    out = nearest_code(y, table[finite][order], codes[order]).astype(np.uint8)
    return out, (amax / np.float32(fmax)).astype(np.float32)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (as float32), ties to even, by comparing the two neighbours."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    down = (u & 0xFFFF0000).astype(np.uint32)
    up = (down.astype(np.uint64) + 0x10000).astype(np.uint32)
    fd = down.view(np.float32).astype(np.float64)
    fu = up.view(np.float32).astype(np.float64)
    xd = x.astype(np.float64)
    take_up = (np.abs(fu - xd) < np.abs(xd - fd)) | (
        (np.abs(fu - xd) == np.abs(xd - fd)) & (((up >> 16) & 1) == 0)
    )
    return np.where(take_up, up, down).view(np.float32)


def int8_roundtrip_bound(x: np.ndarray) -> np.ndarray:
    """Per-element error bound of int8: half a step of the row's absmax / 127."""
    return (np.abs(x).max(axis=-1, keepdims=True) / 127.0) / 2


def int4_token_bound(x: np.ndarray, group: int) -> np.ndarray:
    g = x.reshape(x.shape[:-1] + (x.shape[-1] // group, group))
    step = (g.max(-1, keepdims=True) - g.min(-1, keepdims=True)) / 15.0
    return np.broadcast_to(step / 2, g.shape).reshape(x.shape)


def int4_channel_bound(x: np.ndarray, group: int) -> np.ndarray:
    T = x.shape[-2]
    out = np.empty_like(x)
    for t0 in range(0, T, group):
        blk = x[..., t0:t0 + group, :]
        step = (blk.max(-2, keepdims=True) - blk.min(-2, keepdims=True)) / 15.0
        out[..., t0:t0 + group, :] = step / 2
    return out
