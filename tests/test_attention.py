"""Paged decode attention (CPU and OpenCL) against a float64 numpy reference.

The reference attends over the *stored* data: the cache is committed and its file's bytes
decoded by tests/reference.py, written from docs/FORMAT.md and sharing no code with the
kernels (``cache.read()`` would share their decoder), in float64, with a plain softmax.
Both backends must agree with it to a relative error of 2e-3 (they accumulate in float32
and use an exp approximation).
"""

import itertools
import zlib

import numpy as np
import pytest

import kvmmap as km
from helpers import FORMAT_PAIRS, assert_close, assert_bad_attention_call_refused, attention_reference as reference

_names = itertools.count()


def make_cache(tmp_path, kf, vf, H, D, lengths, rng, page_size=16, layers=2):
    """A cache file (the reference reads its bytes) holding sequences of the given lengths."""
    c = km.PagedKVCache.create(tmp_path / f"c{next(_names)}.kvm", num_layers=layers, num_kv_heads=H, head_dim=D,
                               page_size=page_size, k_format=kf, v_format=vf)
    seqs = []
    for n in lengths:
        s = c.new_sequence()
        done = 0
        while done < n:    # mixed chunk sizes: prefill pieces and single tokens
            m = min(n - done, int(rng.choice([1, 7, 16, 100])))
            for layer in range(layers):
                c.append(s, layer, rng.standard_normal((m, H, D), dtype=np.float32) * 2,
                         rng.standard_normal((m, H, D), dtype=np.float32))
            done += m
        seqs.append(s)
    return c, seqs


@pytest.mark.parametrize("kf,vf", FORMAT_PAIRS)
@pytest.mark.parametrize("H,G,D", [(2, 1, 64), (2, 4, 128), (1, 8, 64)])
def test_matches_reference_across_formats_and_gqa(tmp_path, backend, kf, vf, H, G, D):
    rng = np.random.default_rng(zlib.crc32(f"{kf}{vf}{H}{G}{D}".encode()))
    lengths = [1, 15, 16, 17, 33, 300]
    c, seqs = make_cache(tmp_path, kf, vf, H, D, lengths, rng)
    q = rng.standard_normal((len(seqs), H * G, D), dtype=np.float32)
    for layer in (0, 1):
        got = km.paged_decode_attention(c, layer, seqs, q, backend=backend)
        assert got.shape == q.shape and got.dtype == np.float32
        assert_close(got, reference(c, layer, seqs, q))


@pytest.mark.parametrize("P,v_group", [(64, None), (16, 32), (8, 16), (64, 2)])
@pytest.mark.parametrize("kf,vf", [("int4", "int4"), ("int4", "int8"), ("int8", "int4")])
def test_int4_pages_read_in_place_with_one_query_head_per_kv_head(tmp_path, backend, kf, vf, P, v_group):
    """With one query head per KV head the CPU reads full int4 pages as they are (scales
    folded into the query and the weights, zero points into one constant per group): keys
    per channel over pages of P tokens, values in groups of v_group (one or several per row)."""
    rng = np.random.default_rng(P * 1000 + (v_group or 0))
    H, D = 2, 64
    c = km.PagedKVCache.create(tmp_path / "m.kvm", num_layers=1, num_kv_heads=H, head_dim=D, page_size=P,
                               k_format=kf, v_format=vf, v_group_size=v_group if vf == "int4" else None)
    seqs = []
    for n in (P, 3 * P + 5, 40 * P + 1):    # full pages only, full pages and a tail, a long context
        s = c.new_sequence()
        c.append(s, 0, rng.standard_normal((n, H, D), dtype=np.float32) * 3 + 1,
                 rng.standard_normal((n, H, D), dtype=np.float32) - 0.5)
        seqs.append(s)
    q = rng.standard_normal((len(seqs), H, D), dtype=np.float32)
    assert_close(km.paged_decode_attention(c, 0, seqs, q, backend=backend), reference(c, 0, seqs, q))
    assert_close(km.paged_decode_attention(c, 0, seqs[2:], q[2:], window=5 * P + 3, backend=backend),
                 reference(c, 0, seqs[2:], q[2:], window=5 * P + 3))


@pytest.mark.parametrize("kf,vf", [("int8", "int8"), ("fp16", "fp16"), ("int4", "int4")])
def test_thousands_of_tokens_and_split_contexts(tmp_path, backend, kf, vf):
    rng = np.random.default_rng(7)
    c, seqs = make_cache(tmp_path, kf, vf, 2, 128, [5000, 3], rng, layers=1)
    q = rng.standard_normal((2, 8, 128), dtype=np.float32)
    want = reference(c, 0, seqs, q)
    for threads in (1, 2, 3):
        km.set_num_threads(threads)
        try:
            assert_close(km.paged_decode_attention(c, 0, seqs, q, backend=backend), want)
        finally:
            km.set_num_threads(km.parallel._default_threads())


@pytest.mark.parametrize("H,G,D,P,kf,vf", [
    (2, 2, 256, 16, "int8", "int4"),      # head_dim above the OpenCL work-group size
    (1, 16, 64, 8, "fp16", "int8"),       # a wide GQA group, small pages
    (2, 4, 128, 32, "int4", "fp8_e4m3"),  # int4 keys over 32-token pages
    (3, 3, 96, 16, "bf16", "int4"),       # head_dim not a power of two
    (1, 1, 4, 1, "fp32", "fp32"),         # one-token pages
])
def test_unusual_geometry(tmp_path, backend, H, G, D, P, kf, vf):
    rng = np.random.default_rng(D * 100 + P)
    c, seqs = make_cache(tmp_path, kf, vf, H, D, [1, max(P - 1, 1), 3 * P + 1, 700], rng, page_size=P, layers=1)
    q = rng.standard_normal((len(seqs), H * G, D), dtype=np.float32)
    assert_close(km.paged_decode_attention(c, 0, seqs, q, backend=backend), reference(c, 0, seqs, q))


def test_peaked_scores_stay_exact(tmp_path, backend):
    """Large logits (a near one-hot softmax) must not overflow the online softmax."""
    rng = np.random.default_rng(3)
    c, seqs = make_cache(tmp_path, "fp32", "fp32", 1, 64, [700], rng, layers=1)
    q = rng.standard_normal((1, 2, 64), dtype=np.float32) * 40
    assert_close(km.paged_decode_attention(c, 0, seqs, q, backend=backend), reference(c, 0, seqs, q))


def test_forked_pages_window_shift_and_scale(tmp_path, backend):
    rng = np.random.default_rng(11)
    c, (a, b) = make_cache(tmp_path, "int8", "int4", 2, 64, [200, 45], rng)
    f = c.fork(a)                       # shares a's sealed pages
    for layer in range(2):
        x = rng.standard_normal((9, 2, 64), dtype=np.float32)
        c.append(f, layer, x, x)
    g = c.fork(a)
    c.truncate(g, 150)                  # copy-on-write of a sealed page into the tail
    c.shift_left(b, 20)                 # a sliding window that starts inside a page
    seqs = [a, b, f, g, a]
    q = rng.standard_normal((len(seqs), 4, 64), dtype=np.float32)
    for layer in range(2):
        assert_close(km.paged_decode_attention(c, layer, seqs, q, backend=backend),
                     reference(c, layer, seqs, q))
        for window in (1, 16, 37, 10_000):
            assert_close(km.paged_decode_attention(c, layer, seqs, q, window=window, backend=backend),
                         reference(c, layer, seqs, q, window=window))
        assert_close(km.paged_decode_attention(c, layer, seqs, q, scale=0.05, backend=backend),
                     reference(c, layer, seqs, q, scale=0.05))


def test_single_sequence_method_and_float16_query(tmp_path, backend):
    rng = np.random.default_rng(5)
    c, (s,) = make_cache(tmp_path, "fp16", "int8", 4, 64, [123], rng, layers=1)
    q = rng.standard_normal((8, 64)).astype(np.float16)
    got = c.decode_attention(s, 0, q, backend=backend)
    assert got.shape == (8, 64)
    assert_close(got, reference(c, 0, [s], q[None].astype(np.float32))[0])


def test_file_cache_reopened_read_only(tmp_path, backend):
    rng = np.random.default_rng(9)
    path = tmp_path / "a.kvm"
    c = km.PagedKVCache.create(path, num_layers=1, num_kv_heads=2, head_dim=64, k_format="int8", v_format="int4")
    s = c.new_sequence("p")
    x = rng.standard_normal((77, 2, 64), dtype=np.float32)
    c.append(s, 0, x, x)
    c.flush()
    c.close()
    with km.PagedKVCache.open(path, mode="r") as r:
        s = r.find_sequence("p")
        q = rng.standard_normal((1, 2, 64), dtype=np.float32)
        assert_close(km.paged_decode_attention(r, 0, [s], q, backend=backend), reference(r, 0, [s], q, commit=False))


def test_pages_written_after_a_call_are_seen(tmp_path, backend):
    """A second call after more appends (and a page freed and reused) sees the new data."""
    rng = np.random.default_rng(2)
    c, (s, t) = make_cache(tmp_path, "int8", "int8", 2, 64, [40, 40], rng, layers=1)
    q = rng.standard_normal((1, 2, 64), dtype=np.float32)
    km.paged_decode_attention(c, 0, [s], q, backend=backend)
    c.free(t)
    c.flush()                                  # t's pages become reusable
    u = c.new_sequence()
    for _ in range(3):
        x = rng.standard_normal((20, 2, 64), dtype=np.float32)
        c.append(s, 0, x, x)
        c.append(u, 0, x * 3, x - 1)
        for seq in (s, u):
            assert_close(km.paged_decode_attention(c, 0, [seq], q, backend=backend), reference(c, 0, [seq], q))


@pytest.mark.parametrize("bad,exc", [
    (lambda c, s: km.paged_decode_attention(c, 0, [s], np.ones((1, 3, 64), np.float32)), km.ShapeError),
    (lambda c, s: km.paged_decode_attention(c, 0, [s], np.ones((2, 4, 64), np.float32)), km.ShapeError),
    (lambda c, s: km.paged_decode_attention(c, 0, [s], np.ones((1, 4, 32), np.float32)), km.ShapeError),
    (lambda c, s: km.paged_decode_attention(c, 0, [s], np.ones((1, 4, 64), np.int32)), km.DTypeError),
    (lambda c, s: km.paged_decode_attention(c, 0, [s], np.full((1, 4, 64), np.nan, np.float32)), km.NonFiniteError),
    (lambda c, s: km.paged_decode_attention(c, 2, [s], np.ones((1, 4, 64), np.float32)), km.ShapeError),
    (lambda c, s: km.paged_decode_attention(c, 0, [99], np.ones((1, 4, 64), np.float32)), km.SequenceError),
    (lambda c, s: km.paged_decode_attention(c, 0, s, np.ones((1, 4, 64), np.float32)), km.SequenceError),
    (lambda c, s: km.paged_decode_attention(c, 1, [s], np.ones((1, 4, 64), np.float32)), km.SequenceError),
    (lambda c, s: km.paged_decode_attention(c, 0, [s], np.ones((1, 4, 64), np.float32), window=0), km.ShapeError),
    (lambda c, s: km.paged_decode_attention(c, 0, [s], np.ones((1, 4, 64), np.float32), scale=-1.0), km.ShapeError),
    (lambda c, s: km.paged_decode_attention(c, 0, [s], np.ones((1, 4, 64), np.float32), backend="gpu"), km.ConfigError),
    (lambda c, s: c.decode_attention(s, 0, np.ones((4, 4, 64), np.float32)), km.ShapeError),
    (lambda c, s: km.paged_decode_attention("cache.kvm", 0, [s], np.ones((1, 4, 64), np.float32)), km.ConfigError),
])
def test_bad_input_raises_clear_errors(bad, exc):
    assert_bad_attention_call_refused(bad, exc)


def test_works_without_opencl(monkeypatch):
    """backend='auto' falls back to the CPU when pyopencl is missing."""
    from kvmmap import opencl

    monkeypatch.setattr(opencl, "cl", None)
    for f in (opencl._pick_device, opencl.unavailable_reason, opencl.context):
        f.cache_clear()
    try:
        assert not opencl.has_gpu()
        c = km.PagedKVCache.create(None, num_layers=1, num_kv_heads=1, head_dim=64)
        s = c.new_sequence()
        x = np.ones((3, 1, 64), np.float32)
        c.append(s, 0, x, x)
        out = c.decode_attention(s, 0, np.ones((2, 64), np.float32), backend="auto")
        np.testing.assert_allclose(out, 1.0, rtol=2e-3)     # int8 with a float16 scale: 1 -> 127 * s
        with pytest.raises(km.errors.OpenCLUnavailableError, match="pyopencl"):
            c.decode_attention(s, 0, np.ones((2, 64), np.float32), backend="opencl")
    finally:
        monkeypatch.undo()
        for f in (opencl._pick_device, opencl.unavailable_reason, opencl.context):
            f.cache_clear()
