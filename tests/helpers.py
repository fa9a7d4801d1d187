"""Helpers shared by several test modules (test modules never import each other)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from reference import parse_cache_file, stored_kv

WORKERS = Path(__file__).resolve().parent / "workers"   # scripts that tests run in subprocesses

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
