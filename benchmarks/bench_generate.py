"""generate() with KVMmapCache vs. DynamicCache and transformers' QuantizedCache, in one run.

    python benchmarks/bench_generate.py [--prompt 512] [--new 64] [--batch 1] [--layers 4]
                                        [--hidden 512] [--heads 8] [--kv-heads 2] [--repeat 5] [--ttft-repeat 6]
                                        [--json]
    python benchmarks/bench_generate.py --separate [--prompt 2048] [--chunk 1024] [--new 16]
                                        [--layers 8] [--kv-heads 8] [--json]

A random-weight Llama built from a LlamaConfig (no download), fp32 on the CPU.

Part 1: tokens/s of a whole ``generate()`` call (prefill + ``--new`` greedy steps) for each
cache, as a ratio to DynamicCache measured in the same run; the bytes each cache holds for
the K/V; and the share of generated tokens equal to DynamicCache's. QuantizedCache is tried
with each backend transformers knows (quanto, hqq, fp8); a backend that does not install or
run here is reported with the reason.

Part 2: time to first token when a stored prompt is reopened from its file
(``KVMmapCache.open`` + ``reuse_prefix``, then ``generate``, which computes only the last
prompt token) vs. recomputing the prompt with DynamicCache; with the file in the OS page
cache, and after dropping it from there (fsync, then posix_fadvise DONTNEED, before
every call: each timed call of a "dropped" row starts cold, not only the first).

Timing: the statistic of benchmarks/_timing.py, the median of ``--repeat`` (part 2:
``--ttft-repeat``) timed calls after one warm-up call, but taken round-robin: every
contender runs once per round, in an order rotated from round to round, so drift on a
shared machine hits all of them alike (``_timing.median_time`` times one contender's calls
back to back, so it is not called here). Every call builds its own cache, so calls repeat
in this process; none of the figures is a one-shot. ``--json`` prints the figures as one
JSON object instead of the tables.

``--separate`` (instead of parts 1 and 2): each contender in a process of its own, so
that its peak RSS is its own: DynamicCache with sdpa (the baseline), and KVMmapCache with
``attn_implementation="kvmmap"`` (no float copy: attention reads the int8 / int4 pages in
place). Defaults there: 8 layers, 8 KV heads (head_dim 64), 16 greedy steps. Each process
builds the same random model, warms up on a short prompt, then prefills ``--prompt``
tokens in chunks of ``--chunk`` (``model(chunk, cache=cache)``, timed: "prefill s") and
takes ``--new`` greedy one-token steps (timed: "decode tok/s"); one timed call each, not
a median (a prefill of 8192 tokens is long, and the peak RSS of a process is one figure).
Printed: those, the process's peak RSS (``ru_maxrss``: model, torch and cache together),
the bytes of K/V the cache holds in RAM, ratios to DynamicCache, and the targets: decode
tok/s >= 1.5x DynamicCache's, prefill time <= 1.1x, peak RSS >= 200 MiB below.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, QuantizedCache

from _timing import ONE_SHOT, STATISTIC, add_json_option, emit_json
from kvmmap.integrations.transformers import KVMmapCache

# --separate: contender -> (attention implementation, KVMmapCache format or None for DynamicCache)
SEPARATE = {
    "DynamicCache (baseline)": ("sdpa", None),
    "KVMmapCache int8 + kvmmap attention": ("kvmmap", "int8"),
    "KVMmapCache int4 + kvmmap attention": ("kvmmap", "int4"),
}
TARGETS = {"decode": 1.5, "prefill": 1.1, "rss_mib_below": 200}


class Unavailable(Exception):
    """A contender that cannot run here (e.g. a QuantizedCache backend that is not installed)."""


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from a cache layer's attributes (tuples, lists, dicts)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            # a tensor subclass (quanto's quantized tensors): its own numel() * element_size()
            # describe the dequantized view, so count the tensors it is made of
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x, seen) for x in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def kv_bytes(cache) -> tuple[int, int]:
    """(bytes of the K/V as the cache stores them, bytes of a dequantized copy beside them)."""
    if isinstance(cache, KVMmapCache):
        store = cache.store
        tails = len(store.sequences()) * store.num_layers * store.superblock.layout().tail_bytes  # open pages, in RAM
        s = cache.stats()
        return s["bytes_pages"] + tails, s["bytes_dequantized"]
    return sum(tensor_bytes(layer) for layer in cache.layers), 0


def generate_once(model, ids, cache, new):
    """Wall time of one greedy generate() call of ``new`` tokens, and its output."""
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, cache=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return time.perf_counter() - t0, out


def round_robin(contenders: dict, repeat: int) -> dict:
    """Run each contender once per round, ``repeat + 1`` rounds, the first one a warm-up.

    The order rotates from round to round, so that load arriving from elsewhere during a
    round does not always fall on the same contenders.

    ``contenders[name]()`` returns ``(seconds, result)``. Returns ``{name: (median seconds
    of the timed rounds, last result)}``, or ``{name: Unavailable}`` for a contender that
    raised it (any other exception is a bug of the benchmark and propagates).
    """
    times = {name: [] for name in contenders}
    out = {}
    names = list(contenders)
    for r in range(repeat + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:    # rotated: no contender always first
            if isinstance(out.get(name), Unavailable):
                continue
            try:
                t, result = contenders[name]()
            except Unavailable as e:
                out[name] = e
                continue
            if r:
                times[name].append(t)
            out[name] = (None, result)
    return {name: res if isinstance(res, Unavailable) else (statistics.median(times[name]), res[1])
            for name, res in out.items()}


def fmt_bytes(n: int) -> str:
    return f"{n / 2**20:9.2f} MiB" if n else f"{'-':>13s}"


def drop_page_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)        # DONTNEED leaves dirty pages in the cache
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def build_model(args, attn: str = "sdpa"):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=args.prompt + args.new + 8,
                      pad_token_id=0, eos_token_id=None, attn_implementation=attn)
    return cfg, LlamaForCausalLM(cfg).eval()


def separate_worker(args) -> None:
    """One --separate contender: prefill in chunks, then greedy steps; one JSON line on stdout."""
    attn, fmt = SEPARATE[args.worker]
    cfg, model = build_model(args, attn)
    ids = torch.randint(1, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))

    def new_cache():
        if fmt is None:
            return DynamicCache(config=cfg)
        return KVMmapCache(None, config=model.config, k_format=fmt, v_format=fmt, page_size=args.page_size)

    def run(prompt, steps):
        cache = new_cache()
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, prompt.shape[1], args.chunk):
                logits = model(prompt[:, i:i + args.chunk], cache=cache).logits[:, -1]
            t1 = time.perf_counter()
            out = []
            for _ in range(steps):
                token = logits.argmax(-1, keepdim=True)
                out.append(token)
                logits = model(token, cache=cache).logits[:, -1]
        t2 = time.perf_counter()
        return cache, t1 - t0, t2 - t1, torch.cat(out, 1)

    run(ids[:, :128], 2)            # warm-up: threads, kernels, allocator
    cache, prefill, decode, tokens = run(ids, args.new)
    held = kv_bytes(cache)
    print(json.dumps({"prefill_s": prefill, "decode_tok_s": args.batch * args.new / decode,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "kv_bytes_in_ram": held[0] + held[1], "tokens": tokens.tolist(),
                      "threads": torch.get_num_threads()}))


def separate(args, show) -> tuple[dict, list]:
    """Run every --separate contender in its own process; print the table and the targets."""
    show(f"model: random Llama, {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} KV "
         f"heads (head_dim {args.hidden // args.heads}), fp32 weights, CPU, torch {torch.__version__}")
    show(f"batch {args.batch}, prompt {args.prompt} tokens prefilled in chunks of {args.chunk}, {args.new} greedy "
         f"steps; one process per contender, one timed run after a warm-up on 128 tokens\n")
    forwarded = ["--prompt", args.prompt, "--new", args.new, "--batch", args.batch, "--layers", args.layers,
                 "--hidden", args.hidden, "--heads", args.heads, "--kv-heads", args.kv_heads, "--vocab", args.vocab,
                 "--chunk", args.chunk]
    if args.page_size:
        forwarded += ["--page-size", args.page_size]
    if args.threads:
        forwarded += ["--threads", args.threads]
    results = {}
    for name in SEPARATE:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name, *map(str, forwarded)],
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{name} failed:\n{r.stderr}")
        results[name] = json.loads(r.stdout.strip().splitlines()[-1])
    base = results["DynamicCache (baseline)"]
    show(f"{'cache':38s} {'prefill s':>9s} {'ratio':>6s} {'decode tok/s':>12s} {'ratio':>6s} {'peak RSS':>13s} "
         f"{'vs base':>11s} {'K/V in RAM':>13s} {'same tokens':>11s}")
    rows = []
    mib = 2 ** 20
    for name, r in results.items():
        same = sum(a == b for a, b in zip(sum(r["tokens"], []), sum(base["tokens"], []))) / (args.batch * args.new)
        row = {"part": "separate", "cache": name, "prefill_s": r["prefill_s"], "decode_tokens_s": r["decode_tok_s"],
               "peak_rss_bytes": r["peak_rss"], "kv_bytes_in_ram": r["kv_bytes_in_ram"], "same_tokens": same,
               "prefill_vs_dynamic_cache": r["prefill_s"] / base["prefill_s"],
               "decode_vs_dynamic_cache": r["decode_tok_s"] / base["decode_tok_s"],
               "peak_rss_below_dynamic_cache_mib": (base["peak_rss"] - r["peak_rss"]) / mib, "timing": ONE_SHOT}
        rows.append(row)
        show(f"{name:38s} {r['prefill_s']:9.2f} {row['prefill_vs_dynamic_cache']:6.2f} {r['decode_tok_s']:12.1f} "
             f"{row['decode_vs_dynamic_cache']:6.2f} {r['peak_rss'] / mib:9.1f} MiB "
             f"{-row['peak_rss_below_dynamic_cache_mib']:+7.1f} MiB {fmt_bytes(r['kv_bytes_in_ram'])} {100 * same:10.0f}%")
    show(f"\nratio: prefill time / DynamicCache's (lower is faster), decode tok/s / DynamicCache's (higher is "
         f"faster); vs base: peak RSS minus DynamicCache's. K/V in RAM: DynamicCache's tensors; KVMmapCache's "
         f"pages and open tails (no float copy). threads: {base['threads']}")
    show(f"targets: decode >= {TARGETS['decode']}x, prefill <= {TARGETS['prefill']}x, peak RSS >= "
         f"{TARGETS['rss_mib_below']} MiB below DynamicCache's")
    for row in rows[1:]:
        met = {"decode": row["decode_vs_dynamic_cache"] >= TARGETS["decode"],
               "prefill": row["prefill_vs_dynamic_cache"] <= TARGETS["prefill"],
               "peak RSS": row["peak_rss_below_dynamic_cache_mib"] >= TARGETS["rss_mib_below"]}
        row["targets_met"] = met
        show(f"  {row['cache']:38s} " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items()))
    return {"separate": {"cache": "DynamicCache", **{k: base[k] for k in ("prefill_s", "decode_tok_s", "peak_rss")}}}, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--new", type=int, default=None, help="tokens generated (default 64; --separate: 16)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=None, help="default 4; --separate: 8")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None, help="default 2; --separate: 8")
    ap.add_argument("--separate", action="store_true", help="long prompts, one process per contender (see above)")
    ap.add_argument("--chunk", type=int, default=1024, help="--separate: prefill chunk")
    ap.add_argument("--worker", choices=list(SEPARATE), help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--page-size", type=int, default=None,
                    help="tokens per page (default: kvmmap's for the format, 16, or 64 with int4 keys)")
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds of part 1")
    ap.add_argument("--ttft-repeat", type=int, default=6, help="timed rounds of part 2 (short runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add_json_option(ap)
    args = ap.parse_args()
    long = args.separate or args.worker
    args.new = args.new or (16 if long else 64)
    args.layers = args.layers or (8 if long else 4)
    args.kv_heads = args.kv_heads or (8 if long else 2)
    show = (lambda *a: None) if args.json else print
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        separate_worker(args)
        return
    if args.separate:
        baseline, rows = separate(args, show)
        if args.json:
            emit_json("bench_generate", args, baseline, rows, {"torch": torch.__version__})
        return

    cfg, model = build_model(args)
    ids = torch.randint(1, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    P = args.page_size
    config = {"model": "random-weight LlamaForCausalLM, fp32, CPU", "head_dim": args.hidden // args.heads,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "timing": f"{STATISTIC}, taken round-robin over the contenders"}
    baseline, rows = {}, []
    show(f"model: random Llama, {args.layers} layers, hidden {args.hidden}, {args.heads} heads / "
         f"{args.kv_heads} KV heads (head_dim {args.hidden // args.heads}), fp32 weights, CPU, "
         f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    show(f"generate(): batch {args.batch}, prompt {args.prompt} tokens, {args.new} new tokens (greedy); "
         f"median of {args.repeat} rounds after a warm-up round, round-robin\n")

    with tempfile.TemporaryDirectory() as tmp:
        def kvmmap(fmt, **kw):
            return lambda: KVMmapCache(None, config=cfg, k_format=fmt, v_format=fmt, page_size=P, **kw)

        makers = {"DynamicCache (baseline)": lambda: DynamicCache(config=cfg)}
        for fmt in ("fp16", "int8", "int4"):
            makers[f"KVMmapCache {fmt}"] = kvmmap(fmt)
        makers["KVMmapCache int8, read-through"] = kvmmap("int8", keep_dequantized=False)
        makers["KVMmapCache int8, in a file"] = lambda: KVMmapCache(
            os.path.join(tmp, "gen.kvm"), config=cfg, k_format="int8", v_format="int8", page_size=P,
            overwrite=True)
        for backend, kw in (("quanto", {"nbits": 4}), ("hqq", {"nbits": 4}), ("fp8", {})):
            makers[f"QuantizedCache {backend}"] = lambda b=backend, k=kw: QuantizedCache(b, cfg, **k)

        def run_with(make):
            def run():
                try:
                    cache = make()
                    t, out = generate_once(model, ids, cache, args.new)
                except Exception as e:      # the backends raise what they like; the reason is printed
                    raise Unavailable(f"{type(e).__name__}: {e}") from e
                stored, copy = kv_bytes(cache)
                if isinstance(cache, KVMmapCache):
                    cache.close()
                return t, (out, stored, copy)
            return run

        results = round_robin({name: run_with(make) for name, make in makers.items()}, args.repeat)
        show(f"{'cache':32s} {'tokens/s':>9s} {'ratio':>6s} {'K/V stored':>13s} {'dequant copy':>13s} "
             f"{'same tokens':>12s}")
        base_time, (base_out, base_stored, _) = results["DynamicCache (baseline)"]
        baseline["generate"] = {"cache": "DynamicCache", "seconds": base_time,
                                "tokens_s": args.batch * args.new / base_time, "kv_stored_bytes": base_stored}
        for name, res in results.items():
            if isinstance(res, Unavailable):
                reason = (str(res).strip().splitlines() or [""])[0]
                rows.append({"part": "generate", "cache": name, "unavailable": reason})
                show(f"{name:32s} not available here: {reason[:120]}")
                continue
            t, (out, stored, copy) = res
            same = (out[:, args.prompt:] == base_out[:, args.prompt:]).float().mean().item()
            rows.append({"part": "generate", "cache": name, "seconds": t, "tokens_s": args.batch * args.new / t,
                         "vs_dynamic_cache": base_time / t, "kv_stored_bytes": stored,
                         "dequantized_copy_bytes": copy, "same_tokens": same})
            show(f"{name:32s} {args.batch * args.new / t:9.1f} {base_time / t:6.2f} {fmt_bytes(stored)} "
                 f"{fmt_bytes(copy)} {100 * same:11.0f}%")

        # ---------------------------------------------------------------- time to first token
        files = {}
        for fmt in ("fp16", "int8", "int4"):
            path = files[fmt] = os.path.join(tmp, f"prompt-{fmt}.kvm")
            with KVMmapCache(path, config=cfg, k_format=fmt, v_format=fmt, page_size=P, overwrite=True) as c:
                with torch.no_grad():
                    model(ids, cache=c)
                c.store_prefix(ids)
                c.flush()

        def reopen(path, cold):
            def run():
                if cold:
                    drop_page_cache(path)
                t0 = time.perf_counter()
                c = KVMmapCache.open(path, config=cfg)
                reused = c.reuse_prefix(ids)
                with torch.no_grad():
                    model.generate(ids, cache=c, max_new_tokens=1, do_sample=False)
                t = time.perf_counter() - t0
                c.close()
                return t, reused
            return run

        contenders = {"recompute the prompt (DynamicCache)":
                      lambda: generate_once(model, ids, DynamicCache(config=cfg), 1)}
        for fmt, path in files.items():
            for label, cold in (("page cache warm", False), ("page cache dropped", True)):
                contenders[f"reopen {fmt} file, {label}"] = reopen(path, cold)
        results = round_robin(contenders, args.ttft_repeat)
        show(f"\ntime to first token, prompt of {args.prompt} tokens, batch {args.batch} "
             f"(reopen = KVMmapCache.open + reuse_prefix + generate computing the last token), "
             f"median of {args.ttft_repeat} rounds after a warm-up round:")
        base = results["recompute the prompt (DynamicCache)"][0]
        baseline["time to first token"] = {"what": "recompute the prompt (DynamicCache)", "seconds": base}
        for name, (t, reused) in results.items():
            row = {"part": "time to first token", "what": name, "seconds": t, "vs_dynamic_cache": base / t}
            extra = ""
            if name.startswith("reopen"):
                size = os.stat(files[name.split()[1]]).st_blocks * 512
                row.update(tokens_reused=reused, file_bytes_on_disk=size)
                extra = f"   {reused} tokens reused, file {size / 2**20:.2f} MiB on disk"
            rows.append(row)
            show(f"{name:38s} {1e3 * t:8.1f} ms {base / t:6.2f}{extra}")

    show("\nratio: DynamicCache's time / this time (higher is faster). K/V stored: DynamicCache's "
         "tensors;\nKVMmapCache's sealed pages and open tails; QuantizedCache's quantized and residual "
         "tensors.\ndequant copy: KVMmapCache's per-layer dequantized K/V (keep_dequantized=True; "
         "read-through keeps none).")
    if args.json:
        emit_json("bench_generate", args, baseline, rows, config)


if __name__ == "__main__":
    main()
