"""generate() with KVMmapCache vs. DynamicCache and transformers' QuantizedCache, in one run.

    python benchmarks/bench_generate.py [--prompt 512] [--new 64] [--batch 1] [--layers 4]
                                        [--hidden 512] [--heads 8] [--kv-heads 2] [--repeat 5] [--ttft-repeat 6]
                                        [--json]

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
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, QuantizedCache

from _timing import STATISTIC, add_json_option, emit_json
from kvmmap.integrations.transformers import KVMmapCache


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="tokens generated")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds of part 1")
    ap.add_argument("--ttft-repeat", type=int, default=6, help="timed rounds of part 2 (short runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add_json_option(ap)
    args = ap.parse_args()
    show = (lambda *a: None) if args.json else print
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=args.prompt + args.new + 8,
                      pad_token_id=0, eos_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
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
