"""End-to-end demo on built-in random data: ``kvmmap demo`` or ``python -m kvmmap.demo``."""

from __future__ import annotations

import sys
import time

import numpy as np

from . import FORMATS, dequantize, quantize


def run(workdir: str | None = None) -> int:
    rng = np.random.default_rng(0)
    tokens, heads, head_dim = 4096, 8, 128
    k = rng.standard_normal((tokens, heads, head_dim), dtype=np.float32)
    print(f"kvmmap demo: K of {tokens} tokens x {heads} heads x {head_dim} dims ({k.nbytes / 2**20:.0f} MiB float32)")
    print(f"{'format':>9} {'bytes':>10} {'ratio':>6} {'max err':>9} {'quantize':>9}")
    for fmt in FORMATS:
        t0 = time.perf_counter()
        q = quantize(k, fmt)
        dt = time.perf_counter() - t0
        err = float(np.abs(dequantize(q) - k).max())
        print(f"{fmt:>9} {q.nbytes:>10} {k.nbytes / q.nbytes:>5.1f}x {err:>9.2e} {dt * 1e3:>7.1f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1] if len(sys.argv) > 1 else None))
