"""What a commit costs as sequences accumulate, and what each format costs on disk.

    python benchmarks/bench_commit.py [--sequences 1 16 64 256] [--layers 32] [--repeat 5] [--json]

1. Commit cost: caches of N sequences x L layers x 8 KV heads x head_dim 128, int8, page
   16, each sequence 20 tokens a layer (so every (sequence, layer) has an open page). One
   decode step is appended to one sequence (every layer), then ``flush()`` is timed. The
   baseline is the 1-sequence cache of the same run; the ratio is N's time over it. Format
   1.0 rewrites every open page in every commit, so this grows with N (format 2 targets
   at most 5x at 1024 sequences).
2. Bits per element on disk, every format at its default settings: a cache of 8 sequences x
   4 layers x 8 heads x 128 x 512 tokens (whole pages) is committed and its pages' bytes
   (pages used x page bytes: codes and side data) are divided by the elements stored (K
   and V). The baseline is fp16 (16 bits).

Timing: the median of ``--repeat`` flushes after one warm-up flush (benchmarks/_timing.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import STATISTIC, add_json_option, emit_json, median_time  # noqa: E402

import kvmmap as km  # noqa: E402

H, D, P = 8, 128, 16


def commit_cost(workdir: str, n: int, layers: int, repeat: int) -> tuple[float, int]:
    """(median seconds of flush() after one decode step of one sequence, payload bytes)."""
    path = os.path.join(workdir, f"commit-{n}.kvm")
    tail = 2 * H * P * (D + 4)                     # int8 open page of one (sequence, layer), K and V
    slot = -(-(n * layers * (tail + 64) + (1 << 20)) // 4096) * 4096
    c = km.PagedKVCache.create(path, num_layers=layers, num_kv_heads=H, head_dim=D, page_size=P,
                               k_format="int8", v_format="int8", meta_slot_bytes=slot, overwrite=True)
    x = np.random.default_rng(0).standard_normal((20, H, D), dtype=np.float32)
    seqs = [c.new_sequence() for _ in range(n)]
    for s in seqs:
        for layer in range(layers):
            c.append(s, layer, x, x)
    c.flush()
    step = x[:1]

    def one_step():
        for layer in range(layers):
            c.append(seqs[0], layer, step, step)
        c.flush()
    t = median_time(one_step, repeat)
    c.close()
    os.unlink(path)
    return t, n * layers * tail


def bits_per_element(workdir: str) -> list[dict]:
    rows = []
    for fmt in km.FORMATS:
        path = os.path.join(workdir, f"bits-{fmt}.kvm")
        c = km.PagedKVCache.create(path, num_layers=4, num_kv_heads=H, head_dim=D, page_size=P,
                                   k_format=fmt, v_format=fmt, overwrite=True)
        x = np.random.default_rng(1).standard_normal((512, H, D), dtype=np.float32)
        for _ in range(8):
            s = c.new_sequence()
            for layer in range(4):
                c.append(s, layer, x, x)
        c.flush()
        st = c.stats()
        elements = 2 * st["tokens"] * H * D
        rows.append({"format": fmt, "bits_per_element": 8 * st["bytes_pages"] / elements,
                     "page_bytes": st["page_bytes"]})
        c.close()
        os.unlink(path)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dir", default=None, help="where the cache files go (default: a temporary folder)")
    add_json_option(p)
    args = p.parse_args(argv)
    counts = sorted(set([1] + args.sequences))
    with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
        cost = {n: commit_cost(workdir, n, args.layers, args.repeat) for n in counts}
        bits = bits_per_element(workdir)
    base = cost[1][0]
    rows = [{"part": "commit", "sequences": n, "layers": args.layers, "seconds": t, "open_page_bytes": b,
             "vs_1_sequence": t / base} for n, (t, b) in cost.items()]
    fp16 = next(r["bits_per_element"] for r in bits if r["format"] == "fp16")
    rows += [{"part": "bits", **r, "vs_fp16": r["bits_per_element"] / fp16} for r in bits]
    if args.json:
        emit_json("bench_commit", args, {"commit_1_sequence_s": base, "fp16_bits": fp16}, rows,
                  {"threads": km.get_num_threads(), "format_version": "1.0"})
        return
    print(f"kvmmap {km.__version__}, threads={km.get_num_threads()}, {STATISTIC}")
    print(f"== 1. flush() after one decode step of one sequence; int8, {args.layers} layers x {H} kv heads x {D}, "
          f"page {P}; baseline: the 1-sequence cache, {base * 1e3:.2f} ms")
    print(f"{'sequences':>10} {'flush ms':>10} {'open pages MB':>14} {'vs 1 seq':>9}")
    for r in rows:
        if r["part"] == "commit":
            print(f"{r['sequences']:>10} {r['seconds'] * 1e3:>10.2f} {r['open_page_bytes'] / 1e6:>14.1f} "
                  f"{r['vs_1_sequence']:>8.1f}x")
    print("== 2. bits per element of the stored pages (K and V, side data included), default settings; "
          "baseline fp16")
    print(f"{'format':>10} {'bits/elem':>10} {'vs fp16':>8}")
    for r in rows:
        if r["part"] == "bits":
            print(f"{r['format']:>10} {r['bits_per_element']:>10.2f} {r['vs_fp16']:>7.2f}x")


if __name__ == "__main__":
    main()
