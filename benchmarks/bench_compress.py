"""Compression ratio and error of KVCacheCompressor vs. plain quantization, in one run.

    python benchmarks/bench_compress.py [--tokens 512] [--layers 4] [--seed 0] [--synthetic]
                                        [--repeat 3] [--json]

K/V come from a small random-weight ``LlamaForCausalLM`` (``LlamaConfig``, seeded with
``torch.manual_seed``), captured in a ``DynamicCache`` after one forward pass over a
random prompt; without torch / transformers, synthetic K/V with a decaying spectrum and
outlier key channels are used instead (``--synthetic`` asks for them), and the output
says so. Random weights give K/V with less structure than a trained model's (their
spectrum is nearly flat, and keys are captured after RoPE), so the low-rank figures here
are a floor.

Every row is measured on the same K/V of an *evaluation* prompt:

* baselines: kvmmap.quantize to fp16, int8 (a scale per token), int4 (default groups: 64
  along head_dim where it divides it) and int4 KIVI-style (keys per channel over groups of
  32 tokens);
* ``self``: the compressor fitted on the evaluation prompt itself; ``ratio`` counts
  every stored byte, basis / codebooks included;
* ``calib``: the compressor fitted once on a *different* prompt of the same model and
  applied to the evaluation prompt; ``ratio`` leaves out the shared basis / codebooks
  (what each further prompt costs).

Ratios are float32 bytes / stored bytes; ``vs int8`` is int8's stored bytes / the row's.
Errors are ``||x - x'|| / ||x||`` over all layers. ``secs`` is the time to compress (for
``self``, fitting included; ``calib`` is fitted beforehand, untimed), summed over layers,
each layer's the median of ``--repeat`` calls after a warm-up call (benchmarks/_timing.py);
``t/int8`` is that time over int8 quantization's, measured the same way in the same run.
Bytes and errors come from one further call (the methods are seeded, so every call gives
the same result). ``--json`` prints the figures as one JSON object instead of the tables.
"""

from __future__ import annotations

import argparse

import numpy as np

import kvmmap as km
from _timing import add_json_option, emit_json, median_time
from kvmmap.compress import KVCacheCompressor


def capture_llama(tokens: int, layers: int, seed: int):
    """([K, V] per layer, [batch, kv_heads, tokens, head_dim] float32) for two prompts, and a description."""
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4 * tokens)
    model = LlamaForCausalLM(config).eval()
    prompts = []
    for _ in range(2):
        ids = torch.randint(config.vocab_size, (1, tokens))
        cache = DynamicCache(config=config)
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True)
        prompts.append([(layer.keys.float().numpy().copy(), layer.values.float().numpy().copy()) for layer in cache.layers])
    head_dim = config.hidden_size // config.num_attention_heads
    what = (f"random-weight LlamaForCausalLM ({layers} layers, {config.num_key_value_heads} kv heads, head_dim "
            f"{head_dim}, torch {torch.__version__}), {tokens}-token random prompts, DynamicCache")
    return prompts, what


def synthetic(tokens: int, layers: int, seed: int, why: str):
    rng = np.random.default_rng(seed)
    heads, d = 4, 64
    prompts = []
    mix = [rng.standard_normal((heads, d, d)) * np.exp(-np.arange(d) / 12)[None, :, None] for _ in range(layers)]
    outliers = [np.where(rng.random(d) < 0.05, 8.0, 0.0) for _ in range(layers)]
    for _ in range(2):
        kv = []
        for layer in range(layers):
            k = np.einsum("bhsd,hde->bhse", rng.standard_normal((1, heads, tokens, d)), mix[layer]) + outliers[layer]
            kv.append((k.astype(np.float32), rng.standard_normal((1, heads, tokens, d)).astype(np.float32)))
        prompts.append(kv)
    return prompts, f"SYNTHETIC data ({why}): keys with a decaying spectrum and outlier channels, Gaussian values"


class Tally:
    """Bytes and squared errors summed over layers."""

    def __init__(self):
        self.stored = self.shared = 0
        self.sq = {"k": [0.0, 0.0], "v": [0.0, 0.0]}
        self.seconds = 0.0

    def add_error(self, side, x, y):
        self.sq[side][0] += float(np.square(x.astype(np.float64) - y).sum())
        self.sq[side][1] += float(np.square(x.astype(np.float64)).sum())

    def err(self, side):
        num, den = self.sq[side]
        return (num / den) ** 0.5


def quant_baseline(kv, fmt: str, repeat: int, kivi: bool = False) -> Tally:
    t = Tally()
    for k, v in kv:
        def quantize(k=k, v=v):
            qk = km.quantize(k, fmt, grouping="channel", group_size=32) if kivi else km.quantize(k, fmt)
            return qk, km.quantize(v, fmt)
        t.seconds += median_time(quantize, repeat)
        qk, qv = quantize()
        t.stored += qk.nbytes + qv.nbytes
        t.add_error("k", k, km.dequantize(qk))
        t.add_error("v", v, km.dequantize(qv))
    return t


def method_run(kv, calib, make, repeat: int) -> tuple[Tally, Tally]:
    """(fitted on kv itself, fitted on calib and applied to kv), summed over layers.

    An unfitted compressor fits each call's K/V afresh, so every ``self`` call pays the fit.
    """
    own, cal = Tally(), Tally()
    for (k, v), (ck, cv) in zip(kv, calib):
        for tally, comp in ((own, make()), (cal, make().fit(ck, cv))):
            tally.seconds += median_time(lambda: comp.compress_kv(k, v), repeat)
            c = comp.compress_kv(k, v)
            k2, v2 = comp.decompress_kv(c)
            tally.stored += c.report["bytes_out"]
            tally.shared += c.report["bytes_shared"]
            tally.add_error("k", k, k2)
            tally.add_error("v", v, v2)
    return own, cal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synthetic", action="store_true", help="use synthetic K/V instead of the Llama model's")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per layer (median), after a warm-up call")
    add_json_option(ap)
    args = ap.parse_args()
    show = (lambda *a: None) if args.json else print
    if args.synthetic:
        (evaluation, calib), what = synthetic(args.tokens, args.layers, args.seed, "--synthetic")
    else:
        try:
            (evaluation, calib), what = capture_llama(args.tokens, args.layers, args.seed)
        except ImportError as e:
            show(f"note: {e}; falling back to synthetic data")
            (evaluation, calib), what = synthetic(args.tokens, args.layers, args.seed,
                                                  "torch/transformers not installed")
    fp32 = sum(k.nbytes + v.nbytes for k, v in evaluation)
    b, h, s, d = evaluation[0][0].shape
    show(f"K/V: {what}")
    show(f"evaluation prompt: {len(evaluation)} layers x [batch {b}, kv heads {h}, tokens {s}, head_dim {d}], "
         f"{fp32 / 2**20:.2f} MiB as float32; calibration prompt: another {s} tokens")
    show(f"secs: compress time summed over layers, each the median of {args.repeat} calls after a warm-up call\n")
    config = {"data": what, "layers": len(evaluation), "batch": b, "kv_heads": h, "tokens": s, "head_dim": d,
              "float32_bytes": fp32}

    base = {"fp16": quant_baseline(evaluation, "fp16", args.repeat),
            "int8": quant_baseline(evaluation, "int8", args.repeat),
            "int4": quant_baseline(evaluation, "int4", args.repeat),
            "int4 KIVI": quant_baseline(evaluation, "int4", args.repeat, kivi=True)}
    int8_bytes, int8_secs = base["int8"].stored, base["int8"].seconds

    def figures(t: Tally, stored: int) -> dict:
        return {"ratio": fp32 / stored, "vs_int8": int8_bytes / stored, "k_err": t.err("k"), "v_err": t.err("v")}

    baseline = {name: {"stored_bytes": t.stored, **figures(t, t.stored), "seconds": t.seconds,
                       "time_vs_int8": t.seconds / int8_secs} for name, t in base.items()}
    rows = []
    head = f"{'method':<34}{'ratio':>7}{'vs int8':>8}{'K err':>9}{'V err':>9}{'secs':>8}{'t/int8':>8}"
    show("baselines (kvmmap.quantize, same K/V)")
    show(head)
    for name, t in base.items():
        show(f"{name:<34}{fp32 / t.stored:>6.2f}x{int8_bytes / t.stored:>7.2f}x{t.err('k'):>9.4f}{t.err('v'):>9.4f}"
             f"{t.seconds:>8.3f}{t.seconds / int8_secs:>7.1f}x")

    methods = {
        "lowrank energy 0.99": lambda: KVCacheCompressor("lowrank", energy=0.99),
        "lowrank energy 0.90": lambda: KVCacheCompressor("lowrank", energy=0.90),
        f"lowrank rank {d // 2}": lambda: KVCacheCompressor("lowrank", rank=d // 2),
        f"lowrank rank {d // 4}": lambda: KVCacheCompressor("lowrank", rank=d // 4),
        f"lowrank joint {h} heads rank {h * d // 4}": lambda: KVCacheCompressor("lowrank", rank=h * d // 4, group_heads=h),
        "vq 256 x 4-dim sub-vectors": lambda: KVCacheCompressor("vq", codebook_size=256, subvector_dim=4),
        "vq 256 x 2-dim sub-vectors": lambda: KVCacheCompressor("vq", codebook_size=256, subvector_dim=2),
        "vq 16 x 2-dim sub-vectors": lambda: KVCacheCompressor("vq", codebook_size=16, subvector_dim=2),
        "hybrid energy 0.99 + int8": lambda: KVCacheCompressor("hybrid", energy=0.99, quant_bits=8),
        "hybrid energy 0.99 + int4": lambda: KVCacheCompressor("hybrid", energy=0.99, quant_bits=4),
        f"hybrid rank {d // 2} + int4": lambda: KVCacheCompressor("hybrid", rank=d // 2, quant_bits=4),
    }
    show("\nKVCacheCompressor: self = fitted on this prompt (all bytes counted); "
         "calib = fitted on the other prompt (basis/codebooks shared, not counted)")
    show(f"{'method':<34}{'ratio':>7}{'vs int8':>8}{'K err':>9}{'V err':>9}{'secs':>8}{'t/int8':>8}   | calib:"
         f"{'ratio':>7}{'vs int8':>8}{'K err':>9}{'V err':>9}{'secs':>8}{'t/int8':>8}")
    for name, make in methods.items():
        own, cal = method_run(evaluation, calib, make, args.repeat)
        payload = cal.stored - cal.shared
        rows.append({"method": name,
                     "self": {"stored_bytes": own.stored, **figures(own, own.stored), "seconds": own.seconds,
                              "time_vs_int8": own.seconds / int8_secs},
                     "calib": {"stored_bytes": payload, "shared_bytes": cal.shared, **figures(cal, payload),
                               "seconds": cal.seconds, "time_vs_int8": cal.seconds / int8_secs}})
        show(f"{name:<34}{fp32 / own.stored:>6.2f}x{int8_bytes / own.stored:>7.2f}x{own.err('k'):>9.4f}"
             f"{own.err('v'):>9.4f}{own.seconds:>8.3f}{own.seconds / int8_secs:>7.1f}x   |       "
             f"{fp32 / payload:>6.2f}x{int8_bytes / payload:>7.2f}x{cal.err('k'):>9.4f}{cal.err('v'):>9.4f}"
             f"{cal.seconds:>8.3f}{cal.seconds / int8_secs:>7.1f}x")
    show("(ratio: float32 bytes / stored; vs int8: int8's stored bytes / the row's, >1x is smaller; "
         "t/int8: compress time / int8 quantize time, >1x is slower)")
    if args.json:
        emit_json("bench_compress", args, baseline, rows, config)


if __name__ == "__main__":
    main()
