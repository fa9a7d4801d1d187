"""Paged pool: append, open(), cold reads, commit cost, bits on disk, compact(), against baselines in one run.

    python benchmarks/bench_pool.py [--layers 4] [--heads 8] [--head-dim 128]
                                    [--prefill-tokens 4096] [--chunk 512] [--decode-tokens 256]
                                    [--large-gb 2] [--opens 200] [--commit-seqs 1,64,1024,8192]
                                    [--commit-layers 32] [--commit-repeat 15] [--bits-seqs 8]
                                    [--bits-tokens 1024] [--compact-seqs 64] [--compact-tokens 192]
                                    [--skip append,open,read,commit,bits,compact] [--dir DIR]
                                    [--threads N] [--json]

1. Append. A "token" is one position appended to every layer; GB/s counts the float32 K and
   V handed to ``append``. Baselines run the same loop (same chunks, same layer order)
   writing into a preallocated float32 numpy array (touched beforehand, so it is the
   best case: a memcpy) and into a preallocated, freshly created np.memmap (sparse, like a
   new cache file, so it pays the same first-touch page faults). Each writer is made
   fresh (untimed) for every call; the figure is the median of ``--repeat`` calls after
   a warm-up call (benchmarks/_timing.py).
2. open(). Median of ``--opens`` open+close calls, after a warm-up call, of a small
   cache and of a multi-GB one (int8/int8, built here by appending); the file is in the
   page cache; the target is 10 ms whatever the size.
3. Cold read. The large cache is fsynced, its page cache dropped with
   ``posix_fadvise(DONTNEED)`` (checked with mincore), and every K/V of every layer is read
   back with ``PagedKVCache.read``, in the order it was written. The baseline reads a
   plain file of the same size, also cold, with ``readinto`` in 16 MiB blocks, like dd.
   A cold read is ONE timed call, not a median: a warm-up would fill the page cache it
   measures without, and each repeat re-reads the whole file from disk. The warm rows
   that follow are the median of ``--repeat`` calls (the cold read was their warm-up).
4. Commit. Caches of each ``--commit-seqs`` count of sequences x ``--commit-layers``
   layers (int8/int8, 2 kv heads x head_dim 64, page 16; every (sequence, layer) holds 3
   tokens, so every one has a partly filled last page), built with one flush at the end.
   Timed: ``flush()`` after one decode step, one token appended to every layer of ONE
   sequence; the median of ``--commit-repeat`` step+flush calls (only the flush timed)
   after a warm-up one. Baseline: the 1-sequence cache of the same run. Format 2 commits
   what changed, so the target is 1024 sequences within 5x of one. "KiB dirtied" is the
   kernel's ``write_bytes`` of /proc/self/io across the step and across the flush: the
   bytes the flush's fsync has to write, counted in whole page-cache folios.
5. Bits per element on disk. For each format (K and V alike, then int4 keys with int8
   values) at ``create``'s defaults (page 16, 64 with int4 keys), a cache of
   ``--bits-seqs`` sequences x ``--layers`` x ``--heads`` x ``--head-dim`` x
   ``--bits-tokens`` random tokens, committed. "file": the file's blocks x 8 over the K
   and V elements stored; "pages": the pages of tokens only (``stats()["bytes_pages"]``),
   without the 12 KiB header and roots, the metadata pages and the blocks reserved for
   the next commits. Baseline: the format's own code bits. Targets: int4/int4 <= 4.6,
   int8 and fp8 <= 8.3, fp32 / fp16 / bf16 exactly their code bits (pages of tokens).
6. compact(). A file cache of ``--compact-seqs`` sequences x ``--layers`` x ``--heads`` x
   ``--head-dim`` x ``--compact-tokens`` tokens (int8/int8), appended one page at a time
   round-robin over the sequences (so their pages interleave, as in batched decoding),
   committed; 90% of the sequences (random, fixed seed) are freed and the cache flushed;
   then ``compact()`` is ONE timed call (it cannot be repeated on the same state).
   Baseline: the file's blocks before. Targets: blocks after <= 20% of before, and the
   apparent size after <= 2x its blocks.

Everything is written under ``--dir`` (default: the system temp dir) and deleted at exit.
``--skip`` takes a comma list of section names (append, open, read, commit, bits, compact).
``--json`` prints the figures as one JSON object (baselines, rows with their ratios and
targets, and ``"timing"`` on the one-shot rows) instead of the table.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import mmap
import os
import shutil
import tempfile
import time

import numpy as np

import kvmmap as km
from _timing import ONE_SHOT, STATISTIC, add_json_option, emit_json, median_time

APPEND_FORMATS = [("int8", "int8"), ("fp16", "fp16"), ("int8", "int4")]
BLOCK = 16 << 20
SECTIONS = ("append", "open", "read", "commit", "bits", "compact")

# section 4: a small geometry, so that thousands of sequences x 32 layers fit in about a GB
COMMIT_GEOMETRY = {"num_kv_heads": 2, "head_dim": 64, "page_size": 16, "k_format": "int8", "v_format": "int8"}
COMMIT_TOKENS = 3               # per (sequence, layer): every last page is partly filled
COMMIT_TARGET = (1024, 5.0)     # 1024 sequences: flush within 5x of the 1-sequence figure

# section 5: the targets, bits per element of the pages of tokens
EXACT_FORMATS = ("fp32", "fp16", "bf16")
BITS_TARGETS = {("int4", "int4"): 4.6, ("int8", "int8"): 8.3, ("fp8_e4m3", "fp8_e4m3"): 8.3,
                ("fp8_e5m2", "fp8_e5m2"): 8.3}

# section 6
COMPACT_FREED = 0.9             # fraction of the sequences freed before compact()
COMPACT_TARGETS = {"after_vs_before": 0.20, "apparent_vs_blocks": 2.0}


# ---------------------------------------------------------------- helpers

def resident_bytes(path: str) -> int | None:
    """Bytes of ``path`` in the page cache (mincore), or None where that cannot be asked."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mincore = libc.mincore
    except (OSError, AttributeError):
        return None
    pg = mmap.PAGESIZE
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    try:
        addr = np.frombuffer(mm, np.uint8).ctypes.data
        vec = (ctypes.c_ubyte * (-(-size // pg)))()
        if mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            return None
        return int(np.count_nonzero(np.frombuffer(vec, np.uint8) & 1)) * pg
    finally:
        gc.collect()
        mm.close()


def drop_page_cache(path: str) -> str:
    """fsync then POSIX_FADV_DONTNEED; returns a note on how well it worked."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    left = resident_bytes(path)
    if left is None:
        return "cold? (mincore unavailable: cannot check that the page cache was dropped)"
    if left > 0.05 * os.stat(path).st_blocks * 512:
        return f"NOT cold: {left / 2**20:.0f} MiB still cached after fadvise"
    return f"cold ({left / 2**20:.1f} MiB left in page cache)"


def schedule(total: int, chunk: int):
    return [(i, min(i + chunk, total)) for i in range(0, total, chunk)]


# ---------------------------------------------------------------- 1. append

def run_appends(write, k, v, layers: int, spans) -> None:
    for a, b in spans:
        for layer in range(layers):
            write(layer, a, b, k[a:b], v[a:b])


def bench_append(args, workdir: str, show, rows: list, baseline: dict) -> None:
    L, H, D = args.layers, args.heads, args.head_dim
    T = args.prefill_tokens
    rng = np.random.default_rng(0)
    k = rng.standard_normal((T, H, D), dtype=np.float32)
    v = rng.standard_normal((T, H, D), dtype=np.float32)
    bytes_per_token = 2 * L * H * D * 4
    modes = {"prefill": schedule(T, args.chunk), "decode": schedule(min(args.decode_tokens, T), 1)}

    show(f"\n== 1. append: {L} layers x {H} kv heads x head_dim {D}; prefill {T} tokens in chunks of "
         f"{args.chunk}, decode {min(args.decode_tokens, T)} single-token steps; {STATISTIC} (repeat={args.repeat})")
    show(f"{'what':<34}{'tokens/s':>12}{'GB/s in':>10}{'vs numpy':>10}{'vs memmap':>11}")

    def timed(make_writer, spans):
        """Median time of the append loop; each call gets a fresh writer, made and discarded untimed."""
        return median_time(lambda writer: run_appends(writer[0], k, v, L, spans), args.repeat,
                           setup=make_writer, teardown=lambda writer: writer[1]())

    def numpy_writer():
        dk = np.empty((L, T, H, D), np.float32)
        dv = np.empty((L, T, H, D), np.float32)
        dk.fill(0)      # touch every page now, so the timed loop is a plain copy
        dv.fill(0)

        def write(layer, a, b, kk, vv):
            dk[layer, a:b] = kk
            dv[layer, a:b] = vv
        return write, lambda: None

    def memmap_writer():
        path = os.path.join(workdir, "baseline.f32")
        dk = np.memmap(path, np.float32, "w+", shape=(2, L, T, H, D))

        def write(layer, a, b, kk, vv):
            dk[0, layer, a:b] = kk
            dk[1, layer, a:b] = vv

        def done():
            nonlocal dk
            del dk
            gc.collect()
            os.unlink(path)
        return write, done

    def kvmmap_writer(kf, vf):
        path = os.path.join(workdir, f"append-{kf}-{vf}.kvm")
        c = km.PagedKVCache.create(path, num_layers=L, num_kv_heads=H, head_dim=D,
                                   k_format=kf, v_format=vf, overwrite=True)
        s = c.new_sequence()

        def write(layer, a, b, kk, vv):
            c.append(s, layer, kk, vv)

        def done():
            c.close()
            os.unlink(path)
        return write, done

    for mode, spans in modes.items():
        n = spans[-1][1]
        t_np = timed(numpy_writer, spans)
        t_mm = timed(memmap_writer, spans)
        baseline[f"append {mode}"] = {"numpy_tokens_s": n / t_np, "memmap_tokens_s": n / t_mm}

        def row(label, t):
            rows.append({"section": "append", "what": label, "tokens_s": n / t,
                         "gb_s_in": n * bytes_per_token / t / 1e9, "vs_numpy": t_np / t, "vs_memmap": t_mm / t})
            show(f"{label:<34}{n / t:>12,.0f}{n * bytes_per_token / t / 1e9:>10.2f}"
                 f"{t_np / t:>9.2f}x{t_mm / t:>10.2f}x")
        row(f"{mode}: numpy float32 array", t_np)
        row(f"{mode}: np.memmap float32", t_mm)
        for kf, vf in APPEND_FORMATS:
            row(f"{mode}: kvmmap {kf}/{vf}", timed(lambda: kvmmap_writer(kf, vf), spans))
    show("(vs numpy / vs memmap: kvmmap throughput over the baseline's, >1x is faster)")


# ---------------------------------------------------------------- 2. open

def build_cache(path: str, args, target_bytes: int, x: np.ndarray) -> tuple[int, int]:
    """int8/int8 cache of one sequence, grown chunk by chunk until its pages reach target_bytes."""
    L, H, D = args.layers, args.heads, args.head_dim
    with km.PagedKVCache.create(path, num_layers=L, num_kv_heads=H, head_dim=D,
                                k_format="int8", v_format="int8", overwrite=True) as c:
        s = c.new_sequence("bench")
        tokens = 0
        while c.stats()["bytes_pages"] < target_bytes:
            for layer in range(L):
                c.append(s, layer, x, x)
            tokens += len(x)
        c.flush()
        return tokens, c.stats()["bytes_pages"]


def bench_open(args, small: str, large: str, sizes, show, rows: list, baseline: dict) -> None:
    show(f"\n== 2. open(): median of {args.opens} open+close calls after a warm-up call "
         f"(target: under 10 ms, independent of size)")
    show(f"{'cache':<34}{'on disk':>12}{'mode':>6}{'open ms':>10}{'vs 10 ms':>10}")
    baseline["open target ms"] = 10.0
    med = {}
    for label, path in (("small", small), ("large", large)):
        for mode in ("r", "r+"):
            med[label, mode] = median_time(lambda: km.PagedKVCache.open(path, mode=mode).close(), args.opens)
            disk = os.stat(path).st_blocks * 512
            rows.append({"section": "open", "what": f"{label} {sizes[label]}", "mode": mode, "bytes_on_disk": disk,
                         "open_ms": med[label, mode] * 1e3, "vs_10ms": med[label, mode] / 0.010,
                         "vs_small": med[label, mode] / med["small", mode]})
            show(f"{label + ' ' + sizes[label]:<34}{disk / 2**20:>9.0f} MiB"
                 f"{mode:>6}{med[label, mode] * 1e3:>10.3f}{med[label, mode] / 0.010:>9.2f}x")
    for mode in ("r", "r+"):
        show(f"large/small open time, mode {mode}: {med['large', mode] / med['small', mode]:.2f}x")
    show("(vs 10 ms: open time over the 10 ms target, <1x is within it)")


# ---------------------------------------------------------------- 3. cold read

def bench_cold_read(args, large: str, tokens: int, workdir: str, show, rows: list, baseline: dict) -> None:
    L, H, D = args.layers, args.heads, args.head_dim
    disk = os.stat(large).st_blocks * 512
    plain = os.path.join(workdir, "plain.bin")
    block = np.random.default_rng(1).integers(0, 256, BLOCK, np.uint8).tobytes()
    with open(plain, "wb") as f:
        for off in range(0, disk, BLOCK):
            f.write(block[: min(BLOCK, disk - off)])
    buf = bytearray(BLOCK)

    def dd():
        with open(plain, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    def read_cache():
        with km.PagedKVCache.open(large, mode="r") as c:
            s = c.find_sequence("bench")
            for a, b in schedule(tokens, args.chunk):
                for layer in range(L):
                    c.read(s, layer, a, b)

    show(f"\n== 3. read all K/V of {L} layers x {tokens} tokens (int8/int8 cache, {disk / 2**20:.0f} MiB on "
         f"disk) vs dd-style readinto of a {disk / 2**20:.0f} MiB file in 16 MiB blocks")
    show(f"cold: {ONE_SHOT}, right after dropping the page cache; warm: median of {args.repeat} calls "
         f"(the cold read was the warm-up)")
    show(f"{'what':<30}{'s':>8}{'disk GB/s':>11}{'f32 out GB/s':>14}{'vs dd':>8}  page cache")
    t = {}
    for label, path, fn in (("dd", plain, dd), ("kvmmap read", large, read_cache)):
        for state in ("cold", "warm"):
            if state == "cold":
                note = drop_page_cache(path)
                t0 = time.perf_counter()
                fn()
                t[label, state] = time.perf_counter() - t0
            else:
                note = "warm (just read)"
                t[label, state] = median_time(fn, args.repeat, warmup=False)
            if label == "dd":
                baseline[f"dd {state}"] = {"seconds": t[label, state], "disk_gb_s": disk / t[label, state] / 1e9}
            f32_out = None if label == "dd" else tokens * L * H * D * 8 / t[label, state] / 1e9
            rows.append({"section": "read", "what": f"{label}, {state}", "seconds": t[label, state],
                         "disk_gb_s": disk / t[label, state] / 1e9, "f32_out_gb_s": f32_out,
                         "vs_dd": t["dd", state] / t[label, state], "page_cache": note,
                         "timing": ONE_SHOT if state == "cold" else STATISTIC})
            out = "" if f32_out is None else f"{f32_out:.2f}"
            show(f"{label + ', ' + state:<30}{t[label, state]:>8.2f}{disk / t[label, state] / 1e9:>11.2f}"
                 f"{out:>14}{t['dd', state] / t[label, state]:>7.2f}x  {note}")
    os.unlink(plain)
    show("(vs dd: kvmmap's disk bytes/s over dd's on the same size, >1x is faster)")


# ---------------------------------------------------------------- 4. commit

def dirtied_bytes() -> int | None:
    """Bytes this process has dirtied in the page cache so far (/proc/self/io write_bytes:
    whole folios, which is what writeback writes), or None where the kernel does not say."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def commit_cost(path: str, num_seqs: int, layers: int, repeat: int) -> dict:
    """Median flush() time after one decode step of one sequence, in a cache of ``num_seqs``."""
    H, D = COMMIT_GEOMETRY["num_kv_heads"], COMMIT_GEOMETRY["head_dim"]
    t0 = time.perf_counter()
    c = km.PagedKVCache.create(path, num_layers=layers, overwrite=True, **COMMIT_GEOMETRY)
    try:
        seqs = [c.new_sequence() for _ in range(num_seqs)]
        x = np.random.default_rng(3).standard_normal((num_seqs, H, COMMIT_TOKENS, D), dtype=np.float32)
        for layer in range(layers):          # every sequence at once, one layer a call
            c.append_rows(seqs, layer, x, x)
        c.flush()
        build_s = time.perf_counter() - t0
        os.sync()       # writeback left by earlier sections (GBs deleted) would slow these fsyncs
        step = np.ascontiguousarray(x[0, :, :1].transpose(1, 0, 2))      # [1 token, H, D]
        dirtied = {"step": [], "flush": []}

        def decode_step():
            before = dirtied_bytes()
            for layer in range(layers):
                c.append(seqs[0], layer, step, step)
            return before, dirtied_bytes()

        def count(state):
            before, after_step = state
            after_flush = dirtied_bytes()
            if before is not None:
                dirtied["step"].append(after_step - before)
                dirtied["flush"].append(after_flush - after_step)

        seconds = median_time(lambda state: c.flush(), repeat, setup=decode_step, teardown=count)
        stats = c.stats()
    finally:
        c.close()
    blocks = os.stat(path).st_blocks * 512
    os.unlink(path)
    kib = {what: float(np.median(v)) / 1024 if v else None for what, v in dirtied.items()}
    return {"seconds": seconds, "build_s": build_s, "bytes_on_disk": blocks, "pages_meta": stats["pages_meta"],
            "kib_dirtied_step": kib["step"], "kib_dirtied_flush": kib["flush"]}


def bench_commit(args, workdir: str, show, rows: list, baseline: dict) -> None:
    counts = sorted({1, *(int(n) for n in args.commit_seqs.split(",") if n)})
    layers = args.commit_layers
    g = COMMIT_GEOMETRY
    show(f"\n== 4. flush() after one decode step (1 token to each of the {layers} layers of ONE sequence); "
         f"{g['k_format']}/{g['v_format']}, {g['num_kv_heads']} kv heads x head_dim {g['head_dim']}, page "
         f"{g['page_size']}, {COMMIT_TOKENS} tokens per (sequence, layer); {STATISTIC} "
         f"(repeat={args.commit_repeat}, the flush timed)")
    show(f"{'sequences':>10}{'on disk MiB':>13}{'build s':>9}{'flush ms':>10}{'vs 1 seq':>10}"
         f"{'KiB dirtied: step':>19}{'flush':>8}")
    base = None
    for n in counts:
        r = commit_cost(os.path.join(workdir, f"commit-{n}.kvm"), n, layers, args.commit_repeat)
        base = base or r["seconds"]
        ratio = r["seconds"] / base
        if n == 1:
            baseline["commit 1 sequence"] = {"seconds": base, "layers": layers}
            baseline["commit target"] = {"sequences": COMMIT_TARGET[0], "max_vs_1_sequence": COMMIT_TARGET[1]}
        row = {"section": "commit", "what": f"{n} sequences x {layers} layers", "sequences": n, "layers": layers,
               **r, "vs_1_sequence": ratio}
        if n == COMMIT_TARGET[0]:
            row["target_met"] = ratio <= COMMIT_TARGET[1]
        rows.append(row)
        step, flush = ("?" if v is None else f"{v:.0f}" for v in (r["kib_dirtied_step"], r["kib_dirtied_flush"]))
        show(f"{n:>10}{r['bytes_on_disk'] / 2**20:>13.1f}{r['build_s']:>9.1f}{r['seconds'] * 1e3:>10.2f}"
             f"{ratio:>9.2f}x{step:>19}{flush:>8}")
    target = next((r for r in rows if r["section"] == "commit" and r["sequences"] == COMMIT_TARGET[0]), None)
    if target is None:
        show(f"target <= {COMMIT_TARGET[1]:g}x at {COMMIT_TARGET[0]} sequences: not measured (not in --commit-seqs)")
    else:
        show(f"target <= {COMMIT_TARGET[1]:g}x at {COMMIT_TARGET[0]} sequences: {met(target['target_met'])} "
             f"({target['vs_1_sequence']:.2f}x)")
    show("(vs 1 seq: flush time over the 1-sequence cache's; KiB dirtied: /proc/self/io write_bytes across "
         "the step's appends and across the flush, medians)")


# ---------------------------------------------------------------- 5. bits per element

def bits_on_disk(path: str, args, kf: str, vf: str, x: np.ndarray) -> dict:
    L, H, D = args.layers, args.heads, args.head_dim
    with km.PagedKVCache.create(path, num_layers=L, num_kv_heads=H, head_dim=D,
                                k_format=kf, v_format=vf, overwrite=True) as c:
        for _ in range(args.bits_seqs):
            s = c.new_sequence()
            for layer in range(L):
                c.append(s, layer, x, x)
        c.flush()
        st = c.stats()
        page_size = c.page_size
    blocks = os.stat(path).st_blocks * 512
    os.unlink(path)
    elements = 2 * st["tokens"] * H * D          # K and V
    return {"page_size": page_size, "page_bytes": st["page_bytes"], "bytes_on_disk": blocks,
            "bytes_pages": st["bytes_pages"], "overhead_bytes": blocks - st["bytes_pages"],
            "bits_file": 8 * blocks / elements, "bits_pages": 8 * st["bytes_pages"] / elements}


def bench_bits(args, workdir: str, show, rows: list, baseline: dict) -> None:
    L, H, D, T = args.layers, args.heads, args.head_dim, args.bits_tokens
    x = np.random.default_rng(4).standard_normal((T, H, D), dtype=np.float32)
    show(f"\n== 5. bits per element on disk (K and V), create() defaults; {args.bits_seqs} sequences x {L} layers x "
         f"{H} kv heads x head_dim {D} x {T} tokens; baseline: the format's code bits")
    show(f"{'k/v formats':<20}{'page':>6}{'code bits':>10}{'file':>8}{'pages':>8}{'vs code':>9}"
         f"{'overhead KiB':>14}  target (pages)")
    pairs = [(f, f) for f in km.FORMATS] + [("int4", "int8")]
    baseline["bits code"] = {}
    for kf, vf in pairs:
        code = (km.get_format(kf).bits + km.get_format(vf).bits) / 2
        label = f"{kf}/{vf}"
        baseline["bits code"][label] = code
        r = bits_on_disk(os.path.join(workdir, f"bits-{kf}-{vf}.kvm"), args, kf, vf, x)
        row = {"section": "bits", "what": label, "k_format": kf, "v_format": vf, **r, "code_bits": code,
               "vs_code_bits": r["bits_pages"] / code}
        if kf == vf and kf in EXACT_FORMATS:
            row["target"] = f"== {code:g}"
            row["target_met"] = r["bits_pages"] == code
        elif (kf, vf) in BITS_TARGETS:
            row["target"] = f"<= {BITS_TARGETS[kf, vf]:g}"
            row["target_met"] = r["bits_pages"] <= BITS_TARGETS[kf, vf]
        rows.append(row)
        target = f"{row['target']}: {met(row['target_met'])}" if "target" in row else ""
        show(f"{label:<20}{r['page_size']:>6}{code:>10g}{r['bits_file']:>8.3f}{r['bits_pages']:>8.3f}"
             f"{row['vs_code_bits']:>8.3f}x{r['overhead_bytes'] / 1024:>14.0f}  {target}")
    show("(file: blocks of the whole file; pages: pages of tokens only, without the 12 KiB header and roots, "
         "metadata pages and blocks reserved for the next commits (overhead); vs code: pages over code bits)")


# ---------------------------------------------------------------- 6. compact

def bench_compact(args, workdir: str, show, rows: list, baseline: dict) -> None:
    L, H, D, P = args.layers, args.heads, args.head_dim, 16
    n, T = args.compact_seqs, args.compact_tokens
    path = os.path.join(workdir, "compact.kvm")
    x = np.random.default_rng(5).standard_normal((n, H, P, D), dtype=np.float32)
    with km.PagedKVCache.create(path, num_layers=L, num_kv_heads=H, head_dim=D, page_size=P,
                                k_format="int8", v_format="int8", overwrite=True) as c:
        seqs = [c.new_sequence() for _ in range(n)]
        for a in range(0, T, P):                 # one page per sequence and layer at a time
            for layer in range(L):
                c.append_rows(seqs, layer, x[:, :, : min(P, T - a)], x[:, :, : min(P, T - a)])
        c.flush()
        freed = np.random.default_rng(6).choice(n, round(COMPACT_FREED * n), replace=False)
        for i in freed:
            c.free(seqs[i])
        c.flush()
        kept = c.stats()["bytes_pages"]
        st = os.stat(path)
        before, apparent_before = st.st_blocks * 512, st.st_size
        t0 = time.perf_counter()
        result = c.compact()
        seconds = time.perf_counter() - t0
        bad = c.verify()
    st = os.stat(path)
    after, apparent = st.st_blocks * 512, st.st_size
    os.unlink(path)
    if bad:
        raise RuntimeError(f"compact() left {len(bad)} pages that fail their checksum: {bad[:8]}")
    ratio, spread = after / before, apparent / after
    baseline["compact"] = {"bytes_on_disk_before": before, "bytes_pages_kept": kept, **COMPACT_TARGETS}
    rows.append({"section": "compact", "what": f"{n} sequences x {L} layers x {T} tokens, {len(freed)} freed",
                 "seconds": seconds, "timing": ONE_SHOT, "bytes_on_disk_before": before,
                 "bytes_on_disk_after": after, "apparent_before": apparent_before, "apparent_after": apparent,
                 "compact_returned": result, "after_vs_before": ratio, "apparent_vs_blocks": spread,
                 "kept_vs_before": kept / before,
                 "target_met": ratio <= COMPACT_TARGETS["after_vs_before"]
                 and spread <= COMPACT_TARGETS["apparent_vs_blocks"]})
    show(f"\n== 6. compact(): int8/int8, {n} sequences x {L} layers x {H} kv heads x head_dim {D} x {T} tokens, "
         f"pages interleaved; {len(freed)} sequences freed and flushed; {ONE_SHOT}")
    show(f"compact(): {seconds:.2f} s; returned {result}")
    show(f"{'':<22}{'blocks MiB':>12}{'apparent MiB':>14}")
    show(f"{'before':<22}{before / 2**20:>12.1f}{apparent_before / 2**20:>14.1f}")
    show(f"{'after':<22}{after / 2**20:>12.1f}{apparent / 2**20:>14.1f}")
    show(f"{'pages of tokens kept':<22}{kept / 2**20:>12.1f}")
    show(f"blocks after / before: {ratio:.1%} (pages kept / blocks before: {kept / before:.1%}); "
         f"target <= {COMPACT_TARGETS['after_vs_before']:.0%}: {met(ratio <= COMPACT_TARGETS['after_vs_before'])}")
    show(f"apparent size / blocks after: {spread:.2f}x; target <= {COMPACT_TARGETS['apparent_vs_blocks']:g}x: "
         f"{met(spread <= COMPACT_TARGETS['apparent_vs_blocks'])}")


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8, help="kv heads")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens per append)")
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--large-gb", type=float, default=2.0, help="size of the large cache's pages, GB")
    ap.add_argument("--opens", type=int, default=200)
    ap.add_argument("--commit-seqs", default="1,64,1024,8192",
                    help="comma list of sequence counts for the commit section (1 is always added: the baseline)")
    ap.add_argument("--commit-layers", type=int, default=32)
    ap.add_argument("--commit-repeat", type=int, default=15, help="timed flushes per cache")
    ap.add_argument("--bits-seqs", type=int, default=8)
    ap.add_argument("--bits-tokens", type=int, default=1024, help="tokens per (sequence, layer) for bits")
    ap.add_argument("--compact-seqs", type=int, default=64)
    ap.add_argument("--compact-tokens", type=int, default=192, help="tokens per (sequence, layer) for compact")
    ap.add_argument("--dir", default=None, help="where to put the temporary files")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: " + ",".join(SECTIONS))
    ap.add_argument("--threads", type=int, default=None, help="kvmmap kernel threads (default: kvmmap's)")
    add_json_option(ap)
    args = ap.parse_args()
    if args.threads:
        km.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(SECTIONS):
        ap.error(f"--skip: unknown sections {sorted(skip - set(SECTIONS))}; the sections are {','.join(SECTIONS)}")

    show = (lambda *a: None) if args.json else print
    rows, baseline = [], {}
    config = {"kvmmap": km.__version__, "threads": km.get_num_threads()}
    workdir = tempfile.mkdtemp(prefix="bench_pool-", dir=args.dir)
    try:
        show(f"kvmmap {km.__version__}, threads={km.get_num_threads()}, files under {workdir}")
        if "append" not in skip:
            bench_append(args, workdir, show, rows, baseline)
        if not {"open", "read"} <= skip:
            bench_large(args, workdir, skip, show, rows, baseline, config)
        if "commit" not in skip:
            bench_commit(args, workdir, show, rows, baseline)
        if "bits" not in skip:
            bench_bits(args, workdir, show, rows, baseline)
        if "compact" not in skip:
            bench_compact(args, workdir, show, rows, baseline)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        emit_json("bench_pool", args, baseline, rows, config)


def bench_large(args, workdir: str, skip: set, show, rows: list, baseline: dict, config: dict) -> None:
    """Sections 2 and 3, on a small cache and a large one built here."""
    x = np.random.default_rng(2).standard_normal((args.chunk, args.heads, args.head_dim), dtype=np.float32)
    free = shutil.disk_usage(workdir).free
    want = int(args.large_gb * 1e9)
    room = int((free - (1 << 30)) / 2.2)          # the cache and the dd file, plus slack
    if want > room:
        note = (f"only {free / 1e9:.1f} GB free under {workdir}: large cache scaled down from "
                f"{want / 1e9:.1f} GB to {max(room, 0) / 1e9:.2f} GB")
        config["note"] = note
        show(f"\n{note}")
        want = max(room, 64 << 20)
    small, large = os.path.join(workdir, "small.kvm"), os.path.join(workdir, "large.kvm")
    small_tokens, _ = build_cache(small, args, 1, x[:64])
    t0 = time.perf_counter()
    large_tokens, large_bytes = build_cache(large, args, want, x)
    config.update(large_cache_tokens=large_tokens, large_cache_bytes_pages=large_bytes,
                  small_cache_tokens=small_tokens)
    show(f"\nbuilt the large cache: {large_tokens} tokens x {args.layers} layers, "
         f"{large_bytes / 1e9:.2f} GB of pages, in {time.perf_counter() - t0:.1f} s")
    sizes = {"small": f"({small_tokens} tok)", "large": f"({large_tokens} tok)"}
    if "open" not in skip:
        bench_open(args, small, large, sizes, show, rows, baseline)
    if "read" not in skip:
        bench_cold_read(args, large, large_tokens, workdir, show, rows, baseline)


if __name__ == "__main__":
    main()
