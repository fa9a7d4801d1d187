"""Quantize / dequantize throughput: kvmmap vs. plain numpy vs. memcpy, in one run.

    python benchmarks/bench_quant.py [--tokens 32768] [--heads 8] [--head-dim 128] [--repeat 5]

Throughput is float32 bytes processed per second (the input of quantize, the output of
dequantize), so every row compares like with like against a memcpy of those same bytes.
Each figure is the median of ``--repeat`` calls after a warm-up call (benchmarks/_timing.py).
"""

from __future__ import annotations

import argparse

import numpy as np

import kvmmap as km
from _timing import add_json_option, emit_json, median_time


def numpy_int8_quantize(x):
    scale = np.abs(x).max(axis=-1, keepdims=True) / 127.0
    codes = np.round(x / np.where(scale > 0, scale, 1.0)).astype(np.int8)
    return codes, scale[..., 0]


def numpy_int8_dequantize(codes, scale):
    return codes.astype(np.float32) * scale[..., None]


def numpy_int4_quantize(x, group):
    g = x.reshape(-1, group)
    lo = g.min(axis=1, keepdims=True)
    hi = g.max(axis=1, keepdims=True)
    scale = (hi - lo) / 15.0
    codes = np.clip(np.round((g - lo) / np.where(scale > 0, scale, 1.0)), 0, 15).astype(np.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), scale, lo


def numpy_int4_dequantize(packed, scale, lo, shape):
    codes = np.empty((packed.shape[0], packed.shape[1] * 2), np.float32)
    codes[:, 0::2] = packed & 15
    codes[:, 1::2] = packed >> 4
    return (codes * scale + lo).reshape(shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    add_json_option(ap)
    args = ap.parse_args()
    show = (lambda *a: None) if args.json else print
    rows = []

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.tokens, args.heads, args.head_dim), dtype=np.float32)
    gb = x.nbytes / 1e9
    dst = np.empty_like(x)
    t_memcpy = median_time(lambda: np.copyto(dst, x), args.repeat)
    bw = gb / t_memcpy
    show(f"array float32{list(x.shape)} = {x.nbytes / 2**20:.0f} MiB, threads={km.get_num_threads()}")
    show(f"baseline memcpy (np.copyto): {bw:6.2f} GB/s")
    show(f"{'op':<22}{'kvmmap GB/s':>12}{'numpy GB/s':>12}{'vs numpy':>10}{'vs memcpy':>11}")

    def row(op, t_km, t_np):
        rows.append({"op": op, "kvmmap_gb_s": gb / t_km, "numpy_gb_s": gb / t_np, "vs_numpy": t_np / t_km,
                     "vs_memcpy": (gb / t_km) / bw})
        show(f"{op:<22}{gb / t_km:>12.2f}{gb / t_np:>12.2f}{t_np / t_km:>9.1f}x{(gb / t_km) / bw:>10.2f}x")

    for fmt in ("int8", "int4"):
        q = km.quantize(x, fmt)
        if fmt == "int8":
            ref_q = lambda: numpy_int8_quantize(x)
            c, s = numpy_int8_quantize(x)
            ref_dq = lambda: numpy_int8_dequantize(c, s)
        else:
            group = km.get_format("int4").default_group_size(x.shape[-1])    # what km.quantize uses
            ref_q = lambda: numpy_int4_quantize(x, group)
            p, s, lo = numpy_int4_quantize(x, group)
            ref_dq = lambda: numpy_int4_dequantize(p, s, lo, x.shape)
        t_np_q = median_time(ref_q, args.repeat)
        t_np_dq = median_time(ref_dq, args.repeat)
        row(f"{fmt} quantize", median_time(lambda: km.quantize(x, fmt), args.repeat), t_np_q)
        row(f"{fmt} quantize_into", median_time(lambda: km.quantize_into(x, q), args.repeat), t_np_q)
        row(f"{fmt} dequantize", median_time(lambda: km.dequantize(q), args.repeat), t_np_dq)
        row(f"{fmt} dequantize(out=)", median_time(lambda: km.dequantize(q, out=dst), args.repeat), t_np_dq)
    if args.json:
        emit_json("bench_quant", args, {"memcpy_gb_s": bw, "threads": km.get_num_threads()}, rows)


if __name__ == "__main__":
    main()
