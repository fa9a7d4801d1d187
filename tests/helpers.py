"""Helpers shared by several test modules (test modules never import each other)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from reference import (fp8_decode_table, int4_channel_bound, int4_token_bound, int8_roundtrip_bound, parse_cache_file,
                       stored_kv)

WORKERS = Path(__file__).resolve().parent / "workers"   # scripts that tests run in subprocesses

FORMAT_PAIRS = [("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("int8", "int8"),
                ("int4", "int4"), ("fp8_e4m3", "fp8_e5m2"), ("int8", "int4"), ("fp8_e5m2", "fp8_e4m3")]


def requant_step(x, fmt, side, P, G):
    """One quantization step of ``fmt`` around the values ``x`` [n, H, D] of whole pages of
    ``P`` tokens (0 for float formats); int4 keys are grouped per channel over each page, and
    rounded to float16 first; int4 values in groups of ``G`` along head_dim. The bound a value
    decoded from format 1.0 and stored again in format 2 stays within."""
    if fmt in ("fp32", "fp16", "bf16"):
        return np.zeros_like(x)
    if fmt == "int8":
        return 2 * int8_roundtrip_bound(x)
    if fmt.startswith("fp8"):
        table = fp8_decode_table(fmt)
        fmax = np.nanmax(table[np.isfinite(table)])
        mbits = 3 if fmt == "fp8_e4m3" else 2
        scale = np.abs(x).max(axis=-1, keepdims=True) / fmax
        return np.abs(x) * 2.0 ** -mbits + scale * 2.0 ** -(mbits + (6 if fmt == "fp8_e4m3" else 14))
    if side == "v":
        return 2 * int4_token_bound(x, G)
    out = np.zeros_like(x)
    for p0 in range(0, len(x), P):
        out[p0:p0 + P] = 2 * int4_channel_bound(x[p0:p0 + P].transpose(1, 0, 2), P).transpose(1, 0, 2)
    # format 2 keeps the keys of a partly filled page as float16 (1.0: float32)
    return out + np.abs(x) * 2.0 ** -11


# ------------------------------------------------------------------ transformers

# the small random-weight Llama of the transformers tests
LLAMA_CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    pad_token_id=0, bos_token_id=1, eos_token_id=None)


def prompts(batch, n, seed=1, pad=0):
    """Random prompts of LLAMA_CONFIG's vocabulary; row 1 is left-padded by ``pad`` tokens
    (token ids and attention mask, torch int64 [batch, n])."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, LLAMA_CONFIG["vocab_size"], (batch, n), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1 and pad:
        ids[1, :pad] = LLAMA_CONFIG["pad_token_id"]
        mask[1, :pad] = 0
    return ids, mask


# ------------------------------------------------------------------ attention

RTOL = 2e-3


def attention_reference(cache, layer, seqs, q, scale=None, window=None, commit=True):
    """float64 softmax(scale * K q) V per sequence and query head; q [B, Hq, D].

    K and V are decoded from the cache file's bytes after a commit (``commit=False``: the
    file as it is, for a read-only cache)."""
    if commit:
        cache.flush()
    raw = Path(cache.path).read_bytes()
    parsed = parse_cache_file(raw)
    out = np.empty(q.shape, np.float64)
    for b, s in enumerate(seqs):
        k, v = (a.astype(np.float64) for a in stored_kv(parsed, raw, s, layer))
        if window is not None:
            k, v = k[-window:], v[-window:]
        G = q.shape[1] // k.shape[1]
        sc = 1 / np.sqrt(k.shape[2]) if scale is None else scale
        for j in range(q.shape[1]):
            logits = k[:, j // G] @ q[b, j].astype(np.float64) * sc
            p = np.exp(logits - logits.max())
            out[b, j] = (p / p.sum()) @ v[:, j // G]
    return out


def assert_close(got, want):
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err <= RTOL, f"relative error {err:.2e} > {RTOL}"


# ------------------------------------------------------------------ the console script


def run(cwd, *args, script=None):
    cmd = [sys.executable, str(script)] if script else [sys.executable, "-m", "kvmmap"]
    r = subprocess.run(cmd + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def fails(r, code=1, match=""):
    """A clean failure: exit status ``code``, exactly one line on stderr containing ``match``."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and match in lines[0], r.stderr
    return lines[0]


def flip(path, offset, mask=0x04):
    with open(path, "r+b") as fh:          # in place: the file stays sparse
        fh.seek(offset)
        b = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([b ^ mask]))


def assert_bad_attention_call_refused(bad, exc):
    """``bad(cache, seq)`` on a RAM cache of 2 layers x 2 kv heads x 64 (5 tokens in layer
    0, layer 1 empty) raises ``exc`` and leaves the sequence as it was."""
    import pytest

    import kvmmap as km

    c = km.PagedKVCache.create(None, num_layers=2, num_kv_heads=2, head_dim=64)
    s = c.new_sequence()
    x = np.ones((5, 2, 64), np.float32)
    c.append(s, 0, x, x)      # layer 1 stays empty
    with pytest.raises(exc):
        bad(c, s)
    assert c.seq_len(s, 0) == 5
