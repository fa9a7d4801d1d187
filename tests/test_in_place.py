"""Decode steps written in place and int4 pages read in place.

* A decode step's rows are encoded straight into the page (codecs/_pages.write_rows
  through Arena.write_rows): wrong shapes, strides and dtypes handed to the unchecked
  ``append_rows`` are refused with kvmmap errors and change nothing (the kernel trusts its
  arguments; unchecked, they wrote into other sequences' pages).
* With one query head per KV head, the CPU decode kernel reads full int4 pages as codes:
  random geometries (head_dim, page size, value groups, lengths around page boundaries,
  windows) and histories (truncate, fork, shift_left) against the float64 reference.

Stored values are checked against the file's bytes as tests/reference.py decodes them
(sharing no code with the kernels); attention against helpers.attention_reference.
"""

import itertools
from pathlib import Path

import numpy as np
import pytest

import kvmmap as km
from helpers import RTOL, attention_reference as reference
from reference import parse_cache_file, stored_kv

_names = itertools.count()


def stored(c, seq, layer=0):
    """K, V float32 [length, H, D] of ``seq`` decoded from the committed file."""
    c.flush()
    raw = Path(c.path).read_bytes()
    return stored_kv(parse_cache_file(raw), raw, seq, layer)


def two_sequences(tmp_path, kf="int8", vf="int8", H=2, D=16, P=8):
    """A file cache with two sequences of 3 tokens each (so the next single-token append of
    either goes through SequenceTable._write_in_place)."""
    c = km.PagedKVCache.create(tmp_path / f"r{next(_names)}.kvm", num_layers=1, num_kv_heads=H, head_dim=D,
                               page_size=P, k_format=kf, v_format=vf)
    rng = np.random.default_rng(0)
    a, b = c.new_sequence(), c.new_sequence()
    for s in (a, b):
        x = rng.standard_normal((3, H, D), dtype=np.float32)
        c.append(s, 0, x, x)
    return c, a, b, rng


# ---------------------------------------------------------------------------------
# The row kernel trusts the shape, the strides and the dtype it is given. Unchecked, a
# mis-shaped decode step was written past its rows: into other heads' rows, the side
# data, the next pages (other sequences), or past the arena (a RAM cache with 4096 heads
# aborted the process: "corrupted size vs. prev_size"). Arena.write_rows checks them.


@pytest.mark.parametrize("heads,dim", [(8, 16), (2, 256), (2, 8)])
def test_append_rows_in_place_refuses_a_wrong_shape(tmp_path, heads, dim):
    c, a, b, rng = two_sequences(tmp_path)
    before_a, before_b = stored(c, a), stored(c, b)
    x = rng.standard_normal((1, heads, 1, dim), dtype=np.float32)       # [B, H, tokens, D], H=2, D=16 wanted
    try:
        c.append_rows([a], 0, x, x)
        refused = False
    except km.ShapeError:
        refused = True
    for want, got in zip(before_b, stored(c, b)):       # the other sequence's page
        np.testing.assert_array_equal(got, want, err_msg="another sequence's stored K/V changed")
    assert refused, f"a [1, {heads}, 1, {dim}] step was accepted by a cache of 2 heads x 16"
    assert c.seq_len(a, 0) == 3
    for want, got in zip(before_a, stored(c, a)):
        np.testing.assert_array_equal(got, want)


def test_append_rows_in_place_reads_a_strided_last_axis_as_strided(tmp_path):
    """A last axis that is not contiguous: stored as given, or refused (LayoutError, as
    before the change). Now the kernel reads D contiguous floats from the first element:
    every other value of the row, silently."""
    c, a, _b, rng = two_sequences(tmp_path, kf="fp16", vf="fp16")
    wide = rng.standard_normal((1, 2, 1, 32), dtype=np.float32)
    x = wide[..., ::2]
    try:
        c.append_rows([a], 0, x, x)
    except km.LayoutError:
        return
    k, v = stored(c, a)
    want = x[0, :, 0].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(k[3], want)
    np.testing.assert_array_equal(v[3], want)


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_append_rows_in_place_wrong_dtype_is_a_kvmmap_error(tmp_path, dtype):
    """Before: DTypeError (a KVMmapError); now Cython's bare ValueError ("Buffer dtype
    mismatch"), which ``except km.KVMmapError`` does not catch."""
    c, a, _b, rng = two_sequences(tmp_path)
    x = rng.standard_normal((1, 2, 1, 16)).astype(dtype)
    with pytest.raises(km.DTypeError):
        c.append_rows([a], 0, x, x)
    assert c.seq_len(a, 0) == 3


# ---------------------------------------------------------------------------------
# Randomized geometry of the int4 in-place decode path (G == 1), against the reference:
# these pass; kept as regression sweeps.


def _random_case(rng):
    H = int(rng.integers(1, 4))
    D = int(rng.choice([2, 4, 6, 8, 12, 16, 24, 32, 64, 96, 128, 160, 256, 320]))
    P = int(rng.choice([1, 2, 3, 4, 5, 7, 8, 16, 17, 32, 64, 100, 128]))
    kf, vf = [("int4", "int4"), ("int4", "int8"), ("int8", "int4")][int(rng.integers(0, 3))]
    vg = int(rng.choice([g for g in range(2, min(D, 256) + 1, 2) if D % g == 0])) if vf == "int4" else None
    return H, D, P, kf, vf, vg


@pytest.mark.parametrize("seed", range(24))
def test_int4_in_place_random_geometry(tmp_path, seed):
    rng = np.random.default_rng(seed)
    H, D, P, kf, vf, vg = _random_case(rng)
    c = km.PagedKVCache.create(tmp_path / "s.kvm", num_layers=1, num_kv_heads=H, head_dim=D, page_size=P,
                               k_format=kf, v_format=vf, v_group_size=vg)
    lengths = [max(1, int(rng.integers(0, 6)) * P + int(rng.integers(-2, 3))) for _ in range(3)]
    lengths[-1] = int(rng.integers(1, 40 * P + 2))
    seqs = []
    for n in lengths:
        s = c.new_sequence()
        done = 0
        while done < n:      # prefill pieces, whole pages and decode steps
            m = min(n - done, int(rng.choice([1, 1, 3, P, 2 * P + 1, 50])))
            c.append(s, 0, rng.standard_normal((m, H, D), dtype=np.float32) * 3 + 1,
                     rng.standard_normal((m, H, D), dtype=np.float32) - 0.5)
            done += m
        seqs.append(s)
    q = rng.standard_normal((len(seqs), H, D), dtype=np.float32)
    for window in (None, int(rng.integers(1, max(lengths) + 1))):
        got = km.paged_decode_attention(c, 0, seqs, q, window=window, backend="cpu")
        want = reference(c, 0, seqs, q, window=window)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= RTOL, (H, D, P, kf, vf, vg, lengths, window, err)


@pytest.mark.parametrize("seed", range(16))
def test_int4_in_place_after_truncate_fork_shift(tmp_path, seed):
    """Pages cut short by truncate (int4 keys quantized over the whole page), shared by
    fork, dropped by shift_left, then appended to again: the in-place path only for full
    pages."""
    rng = np.random.default_rng(1000 + seed)
    H, D, P, kf, vf, vg = _random_case(rng)
    D = min(D, 128)
    vg = None if vf != "int4" else int(rng.choice([g for g in range(2, min(D, 256) + 1, 2) if D % g == 0]))
    c = km.PagedKVCache.create(tmp_path / "o.kvm", num_layers=1, num_kv_heads=H, head_dim=D, page_size=P,
                               k_format=kf, v_format=vf, v_group_size=vg)
    seqs = [c.new_sequence()]
    for _ in range(12):
        op = rng.choice(["app", "app", "app1", "app1", "trunc", "fork", "shift"])
        s = seqs[int(rng.integers(0, len(seqs)))]
        n = c.seq_len(s, 0)
        if op in ("app", "app1"):
            m = 1 if op == "app1" else int(rng.integers(1, 3 * P + 3))
            c.append(s, 0, rng.standard_normal((m, H, D), dtype=np.float32) * 2,
                     rng.standard_normal((m, H, D), dtype=np.float32))
        elif op == "trunc" and n:
            c.truncate(s, int(rng.integers(0, n)))
        elif op == "fork":
            seqs.append(c.fork(s))
        elif op == "shift" and n:
            c.shift_left(s, int(rng.integers(0, n)))
    live = [s for s in seqs if c.seq_len(s, 0)]
    if not live:
        return
    q = rng.standard_normal((len(live), H, D), dtype=np.float32)
    for window in (None, int(rng.integers(1, 3 * P + 2))):
        got = km.paged_decode_attention(c, 0, live, q, window=window, backend="cpu")
        want = reference(c, 0, live, q, window=window)
        assert np.abs(got - want).max() / np.abs(want).max() <= RTOL
