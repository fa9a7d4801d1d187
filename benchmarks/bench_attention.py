"""Decode attention on the CPU (and OpenCL when asked) vs. torch SDPA on the same context.

For each context length the script fills one layer of a cache file with random K/V,
then times one decode step (one query token, all heads) with kvmmap and with
``torch.nn.functional.scaled_dot_product_attention`` on the dequantized K/V held as
float32 and float16 tensors. It also reports the bytes of stored K/V read per second
against this machine's memcpy bandwidth measured in the same run. Every time is the
median of ``--repeat`` calls after a warm-up (benchmarks/_timing.py); ``--json`` prints
the figures as one JSON object.

A second section times prefill: ``--q-tokens`` query tokens (the last ones of each
sequence, causal) with :func:`kvmmap.paged_attention` over ``--prefill-contexts``, against
SDPA in float32 with the same causal mask on the same stored data (``--q-tokens`` with no
value skips it). Its JSON rows carry ``"section": "prefill"``; the decode rows
``"section": "decode"``.

    python benchmarks/bench_attention.py                       # 4k and 64k tokens
    python benchmarks/bench_attention.py --contexts 4096 131072 --batch 4 --backend opencl
    python benchmarks/bench_attention.py --contexts --q-tokens 256 1024 --prefill-contexts 2048 8192
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

import kvmmap as km
from _timing import add_json_option, emit_json, median_time


def memcpy_gbps() -> float:
    a = np.ones(256 << 20, np.uint8)
    b = np.empty_like(a)
    t = median_time(lambda: np.copyto(b, a), 5)
    return a.nbytes / t / 1e9


def device_copy_gbps() -> float:
    """Bytes read per second by a device-to-device copy of 256 MiB (the device's read bandwidth)."""
    import pyopencl as cl
    from kvmmap import opencl

    ctx, queue = opencl.context()
    n = 256 << 20
    a, b = cl.Buffer(ctx, cl.mem_flags.READ_WRITE, n), cl.Buffer(ctx, cl.mem_flags.READ_WRITE, n)
    cl.enqueue_fill_buffer(queue, a, np.uint8(1), 0, n)

    def run():
        cl.enqueue_copy(queue, b, a)
        queue.finish()
    return n / median_time(run, 10) / 1e9


def fill(path, fmt, n, H, D, batch, rng):
    c = km.PagedKVCache.create(path, num_layers=1, num_kv_heads=H, head_dim=D, page_size=16,
                               k_format=fmt, v_format=fmt, overwrite=True)
    seqs = []
    chunk = 4096
    for _ in range(batch):
        s = c.new_sequence()
        for i in range(0, n, chunk):
            m = min(chunk, n - i)
            c.append(s, 0, rng.standard_normal((m, H, D), dtype=np.float32),
                     rng.standard_normal((m, H, D), dtype=np.float32))
        seqs.append(s)
    c.flush()
    return c, seqs


def prefill(args, torch, rng, show) -> list[dict]:
    """The prefill section: causal attention of the last T tokens over contexts of n."""
    H, Hq, D, B = args.kv_heads, args.q_heads, args.head_dim, args.batch
    rows = []
    show(f"\nprefill attention (causal, last q_tokens positions): batch={B}, q_heads={Hq}, kv_heads={H}, "
         f"head_dim={D}, threads={args.threads}, backend={args.backend}")
    show(f"{'context':>8} {'q_tokens':>8} {'format':>6} {'kvmmap ms':>10} {'GFLOP/s':>8} "
         f"{'sdpa32 ms':>10} {'vs sdpa32':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.prefill_contexts:
            for fmt in args.formats:
                c, seqs = fill(os.path.join(tmp, f"{fmt}.kvm"), fmt, n, H, D, B, rng)
                for T in args.q_tokens:
                    if T > n:
                        continue
                    q = rng.standard_normal((B, T, Hq, D), dtype=np.float32)
                    run = lambda: km.paged_attention(c, 0, seqs, q, backend=args.backend)
                    t = median_time(run, max(3, args.repeat // 3))
                    flops = 4 * B * T * n * Hq * D
                    rec = {"section": "prefill", "context": n, "q_tokens": T, "format": fmt, "kvmmap_s": t,
                           "gflop_s": flops / t / 1e9}
                    row = f"{n:>8} {T:>8} {fmt:>6} {t * 1e3:>10.2f} {flops / t / 1e9:>8.1f}"
                    if torch is not None:
                        import torch.nn.functional as F
                        # SDPA on this format's stored (dequantized) data, float32, same mask
                        tk = torch.from_numpy(np.stack([c.read(s, 0)[0] for s in seqs])).transpose(1, 2)
                        tv = torch.from_numpy(np.stack([c.read(s, 0)[1] for s in seqs])).transpose(1, 2)
                        tq = torch.from_numpy(q).transpose(1, 2)
                        mask = torch.ones(T, n, dtype=torch.bool).tril(n - T)
                        sdpa = lambda: F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask, enable_gqa=True)
                        with torch.inference_mode():
                            ts = median_time(sdpa, max(3, args.repeat // 3))
                            ref = sdpa().transpose(1, 2).numpy()
                        err = np.abs(run() - ref).max() / np.abs(ref).max()
                        if err > 2e-3:
                            print(f"!! kvmmap and SDPA disagree: relative error {err:.2e}", file=sys.stderr)
                        rec.update(sdpa32_s=ts, vs_sdpa32=ts / t)
                        row += f" {ts * 1e3:>10.2f} {ts / t:>8.2f}x"
                    rows.append(rec)
                    show(row, flush=True)
                c.close()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="*", default=[4096, 65536])
    ap.add_argument("--q-tokens", type=int, nargs="*", default=[256, 1024], help="prefill query tokens")
    ap.add_argument("--prefill-contexts", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--formats", nargs="+", default=["int8", "fp16", "int4"])
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--backend", default="cpu", choices=["cpu", "opencl"])
    ap.add_argument("--threads", type=int, default=km.get_num_threads())
    add_json_option(ap)
    args = ap.parse_args(argv)
    show = (lambda *a, **k: None) if args.json else print

    try:
        import torch
        import torch.nn.functional as F
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    km.set_num_threads(args.threads)
    H, Hq, D, B = args.kv_heads, args.q_heads, args.head_dim, args.batch
    rng = np.random.default_rng(0)
    bw = memcpy_gbps()
    baseline = {"memcpy_gb_s": bw, "threads": args.threads, "backend": args.backend}
    rows = []
    show(f"decode attention: batch={B}, q_heads={Hq}, kv_heads={H}, head_dim={D}, "
          f"threads={args.threads}, backend={args.backend}")
    show(f"baseline memcpy (np.copyto, 256 MiB): {bw:.2f} GB/s")
    if args.backend == "opencl":
        from kvmmap import opencl
        bw = device_copy_gbps()
        device = opencl.context()[0].devices[0].name.strip()
        baseline.update(device=device, device_copy_gb_s=bw)
        show(f"baseline device copy on {device} (256 MiB): {bw:.2f} GB/s read; "
              "'vs memcpy' below is against this")
    if torch is None:
        show("torch is not installed: the SDPA columns are skipped (pip install torch==2.13.0)")
    show(f"{'context':>8} {'format':>6} {'kvmmap ms':>10} {'KV GB/s':>8} {'vs memcpy':>9} "
          f"{'sdpa32 ms':>10} {'vs sdpa32':>9} {'sdpa16 ms':>10} {'vs sdpa16':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.contexts:
            sdpa = {}
            for fmt in args.formats:
                c, seqs = fill(os.path.join(tmp, f"{fmt}.kvm"), fmt, n, H, D, B, rng)
                q = rng.standard_normal((B, Hq, D), dtype=np.float32)
                run = lambda: km.paged_decode_attention(c, 0, seqs, q, backend=args.backend)
                t = median_time(run, args.repeat)
                pages = sum(len(c.block_table(s, 0)) for s in seqs)
                kv_bytes = pages * c.superblock.page_bytes
                rec = {"section": "decode", "context": n, "format": fmt, "kvmmap_s": t, "kv_gb_s": kv_bytes / t / 1e9,
                       "vs_memcpy": kv_bytes / t / 1e9 / bw}
                row = f"{n:>8} {fmt:>6} {t * 1e3:>10.3f} {kv_bytes / t / 1e9:>8.2f} {kv_bytes / t / 1e9 / bw:>8.2f}x"
                if torch is not None:
                    if not sdpa:   # SDPA on the stored (dequantized) data of the first format
                        kk = np.stack([c.read(s, 0)[0] for s in seqs]).transpose(0, 2, 1, 3)
                        vv = np.stack([c.read(s, 0)[1] for s in seqs]).transpose(0, 2, 1, 3)
                        tq = torch.from_numpy(q)[:, :, None, :]
                        for name, dt in (("sdpa32", torch.float32), ("sdpa16", torch.float16)):
                            tk = torch.from_numpy(np.ascontiguousarray(kk)).to(dt)
                            tv = torch.from_numpy(np.ascontiguousarray(vv)).to(dt)
                            tqq = tq.to(dt)
                            with torch.inference_mode():
                                sdpa[name] = median_time(
                                    lambda: F.scaled_dot_product_attention(tqq, tk, tv, enable_gqa=True),
                                    max(3, args.repeat // 3))
                            del tk, tv
                        ref = F.scaled_dot_product_attention(tq, torch.from_numpy(np.ascontiguousarray(kk)),
                                                             torch.from_numpy(np.ascontiguousarray(vv)),
                                                             enable_gqa=True)[:, :, 0].numpy()
                        err = np.abs(run() - ref).max() / np.abs(ref).max()
                        if err > 2e-3:
                            print(f"!! kvmmap and SDPA disagree: relative error {err:.2e}", file=sys.stderr)
                    rec.update(sdpa32_s=sdpa["sdpa32"], vs_sdpa32=sdpa["sdpa32"] / t,
                               sdpa16_s=sdpa["sdpa16"], vs_sdpa16=sdpa["sdpa16"] / t)
                    row += (f" {sdpa['sdpa32'] * 1e3:>10.3f} {sdpa['sdpa32'] / t:>8.2f}x"
                            f" {sdpa['sdpa16'] * 1e3:>10.3f} {sdpa['sdpa16'] / t:>8.2f}x")
                rows.append(rec)
                show(row, flush=True)
                c.close()
    if args.q_tokens:
        rows += prefill(args, torch, rng, show)
    if args.json:
        emit_json("bench_attention", args, baseline, rows)
        return 0
    print("prefill: 'GFLOP/s' counts 4 * q_tokens * visible keys * q_heads * head_dim per call (the causal "
          "mask's skipped half of the last block included); 'vs sdpa32' is SDPA time / kvmmap time.")
    print("KV GB/s counts the stored pages (codes + scales) read per decode step; "
          "'vs sdpaXX' is SDPA time / kvmmap time on the same context (SDPA reads the dequantized K/V "
          "of the first format as float32 / float16).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
