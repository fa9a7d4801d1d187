"""What the writer of tests/test_concurrency.py commits, step by step, and the plain-numpy
model of it: shared by the writer, the readers and the test."""

from __future__ import annotations

import numpy as np

GEO = dict(num_layers=2, num_kv_heads=2, head_dim=32, page_size=4, k_format="fp32", v_format="fp16")
NSTEPS = 150


def chunk(step: int):
    """K and V appended to "log" at ``step`` (both layers), [n, H, D] float32."""
    n = 1 + (step * 7) % 13
    x = np.random.default_rng(step).standard_normal((2, 2, n, GEO["num_kv_heads"], GEO["head_dim"]),
                                                    dtype=np.float32)
    return x            # [layer, k/v, n, H, D]


def shift_at(step: int) -> int:
    return 5 + step % 7 if step % 4 == 3 else 0


def model(step: int):
    """Plain-numpy contents of "log" after ``step``: per layer (k, v as fp16-rounded float32)."""
    xs = [chunk(i) for i in range(step + 1)]
    out = []
    for layer in range(2):
        k = np.zeros((0, GEO["num_kv_heads"], GEO["head_dim"]), np.float32)
        v = k
        for i, x in enumerate(xs):
            k = np.concatenate([k, x[layer, 0]])
            v = np.concatenate([v, x[layer, 1]])
            k, v = k[shift_at(i):], v[shift_at(i):]
        out.append((k, v.astype(np.float16).astype(np.float32)))
    return out
