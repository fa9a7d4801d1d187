"""End-to-end demo on built-in random data: ``kvmmap demo``.

Creates a cache file, appends a prompt and a few decode steps, flushes, reopens the file
in a new process, checks that the reloaded K/V match what this process reads, and runs a
decode-attention step over them (CPU, and OpenCL when a device is usable) against numpy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from ..cache import PagedKVCache
from ..formats import FORMATS
from ..codecs.quant import dequantize, quantize

LAYERS, HEADS, HEAD_DIM, PROMPT, STEPS = 4, 8, 128, 1000, 24

_CHILD = """
import sys, time, numpy as np, kvmmap as km
from kvmmap import opencl
t0 = time.perf_counter()
c = km.PagedKVCache.open(sys.argv[1], mode="r")
t_open = time.perf_counter() - t0
s = c.find_sequence("demo-prompt")
layer = c.num_layers - 1
k, v = c.read(s, layer)
np.save(sys.argv[2], np.stack([k, v]))
print(f"   [new process] open() {t_open * 1e3:.2f} ms; sequence 'demo-prompt' has {c.seq_len(s)} tokens; "
      f"checksums of {len(set(c.block_table(s)))} pages verified: {'ok' if not c.verify() else 'DAMAGED'}")
# one decode step of a 32-query-head model (GQA 4) over the reloaded layer, vs numpy in float64
q = np.random.default_rng(1).standard_normal((4 * c.num_kv_heads, c.head_dim), dtype=np.float32)
kk, vv, qq = k.astype(np.float64), v.astype(np.float64), q.astype(np.float64)
logits = np.einsum("thd,hgd->hgt", kk, qq.reshape(c.num_kv_heads, 4, -1)) / np.sqrt(c.head_dim)
p = np.exp(logits - logits.max(-1, keepdims=True))
want = np.einsum("hgt,thd->hgd", p / p.sum(-1, keepdims=True), vv).reshape(q.shape)
backends = ["cpu"] + (["opencl"] if opencl.available() else [])
for backend in backends:
    c.decode_attention(s, layer, q, backend=backend)
    t0 = time.perf_counter()
    out = c.decode_attention(s, layer, q, backend=backend)
    dt = time.perf_counter() - t0
    err = np.abs(out - want).max() / np.abs(want).max()
    where = opencl.context()[0].devices[0].name.strip() if backend == "opencl" else f"{km.get_num_threads()} threads"
    print(f"   [new process] decode_attention(backend={backend!r}, {where}): 32 query heads over "
          f"{c.seq_len(s)} tokens in {dt * 1e3:.2f} ms, relative error vs numpy {err:.1e}")
    if err > 2e-3:
        sys.exit(f"decode attention disagrees with numpy on {backend}")
if len(backends) == 1:
    print(f"   [new process] OpenCL skipped: {opencl.unavailable_reason()}")
"""


def _formats_table(rng) -> None:
    k = rng.standard_normal((4096, HEADS, HEAD_DIM), dtype=np.float32)
    print(f"1) formats on K of {k.shape[0]} tokens x {HEADS} heads x {HEAD_DIM} dims:")
    print(f"   {'format':>9} {'bytes':>10} {'ratio':>6} {'max err':>9}")
    for fmt in FORMATS:
        q = quantize(k, fmt)
        err = float(np.abs(dequantize(q) - k).max())
        print(f"   {fmt:>9} {q.nbytes:>10} {k.nbytes / q.nbytes:>5.1f}x {err:>9.2e}")


def run(workdir: str | None = None) -> int:
    rng = np.random.default_rng(0)
    _formats_table(rng)
    with tempfile.TemporaryDirectory() as tmp:
        folder = workdir or tmp
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "demo.kvm")
        print(f"2) cache file {path}: {LAYERS} layers, {HEADS} KV heads, head_dim {HEAD_DIM}, K int8, V int4")
        c = PagedKVCache.create(path, num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD_DIM,
                                k_format="int8", v_format="int4", fingerprint="kvmmap-demo", overwrite=True)
        s = c.new_sequence("demo-prompt")
        t0 = time.perf_counter()
        for layer in range(LAYERS):
            kv = rng.standard_normal((2, PROMPT, HEADS, HEAD_DIM), dtype=np.float32)
            c.append(s, layer, kv[0], kv[1])
        for _ in range(STEPS):
            for layer in range(LAYERS):
                kv = rng.standard_normal((2, 1, HEADS, HEAD_DIM), dtype=np.float32)
                c.append(s, layer, kv[0], kv[1])
        t_append = time.perf_counter() - t0
        t0 = time.perf_counter()
        c.flush()
        t_flush = time.perf_counter() - t0
        st = c.stats()
        print(f"   appended a {PROMPT}-token prompt and {STEPS} decode steps to every layer in "
              f"{t_append * 1e3:.0f} ms; flush() {t_flush * 1e3:.1f} ms")
        print(f"   {st['pages_used']} pages of {st['page_bytes']} bytes; {st['bytes_on_disk'] / 2**20:.1f} MiB on disk "
              f"for {st['tokens']} layer-tokens ({st['tokens'] * 2 * HEADS * HEAD_DIM * 4 / 2**20:.1f} MiB as float32)")
        print("3) reopening it in a new process and attending over it:")
        out = os.path.join(folder, "reloaded.npy")
        subprocess.run([sys.executable, "-c", _CHILD, path, out], check=True, cwd=folder)
        k, v = c.read(s, LAYERS - 1)
        same = np.array_equal(np.load(out), np.stack([k, v]))
        print(f"   K/V read back by the new process {'match' if same else 'DIFFER from'} this process's read "
              f"({k.shape[0]} tokens of layer {LAYERS - 1})")
        c.close()
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(run(sys.argv[1] if len(sys.argv) > 1 else None))
