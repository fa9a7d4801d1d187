"""paged_attention (several query tokens per sequence; CPU and OpenCL) against a float64
numpy reference.

The reference attends over the *stored* data: the cache is committed and its file's bytes
decoded by tests/reference.py (written from docs/FORMAT.md, sharing no code with the
kernels), in float64 with a plain softmax under the causal / window mask written out
position by position. Both backends must agree to a relative error of 2e-3.
"""

import itertools
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import FORMAT_PAIRS, assert_bad_attention_call_refused, assert_close
from reference import parse_cache_file, stored_kv

import kvmmap as km

_names = itertools.count()


def make_cache(tmp_path, kf, vf, H, D, lengths, rng, page_size=16):
    """A one-layer cache file holding sequences of the given lengths, appended in mixed chunks."""
    c = km.PagedKVCache.create(tmp_path / f"c{next(_names)}.kvm", num_layers=1, num_kv_heads=H, head_dim=D,
                               page_size=page_size, k_format=kf, v_format=vf)
    seqs = []
    for n in lengths:
        s = c.new_sequence()
        done = 0
        while done < n:
            m = min(n - done, int(rng.choice([1, 7, 16, 100])))
            c.append(s, 0, rng.standard_normal((m, H, D), dtype=np.float32) * 2,
                     rng.standard_normal((m, H, D), dtype=np.float32))
            done += m
        seqs.append(s)
    return c, seqs


def reference(cache, seqs, q, causal=True, scale=None, window=None):
    """float64 attention of q [B, T, Hq, D] over the stored K/V of layer 0: query token i
    of a sequence of n visible tokens sits at position p = n - T + i and sees positions
    max(0, p - window + 1) .. p (causal) or .. n - 1."""
    cache.flush()
    raw = Path(cache.path).read_bytes()
    parsed = parse_cache_file(raw)
    T, Hq, D = q.shape[1:]
    out = np.empty(q.shape, np.float64)
    for b, s in enumerate(seqs):
        k, v = (a.astype(np.float64) for a in stored_kv(parsed, raw, s, 0))
        n, G = len(k), Hq // k.shape[1]
        sc = 1 / np.sqrt(D) if scale is None else scale
        for i in range(T):
            p = n - T + i
            lo = 0 if window is None else max(0, p - window + 1)
            hi = p + 1 if causal else n
            for j in range(Hq):
                x = k[lo:hi, j // G] @ q[b, i, j].astype(np.float64) * sc
                w = np.exp(x - x.max())
                out[b, i, j] = (w / w.sum()) @ v[lo:hi, j // G]
    return out


def check(c, seqs, q, backend, **kw):
    got = km.paged_attention(c, 0, seqs, q, backend=backend, **kw)
    assert got.shape == q.shape and got.dtype == np.float32
    assert_close(got, reference(c, seqs, q, **kw))


@pytest.mark.parametrize("kf,vf", FORMAT_PAIRS)
@pytest.mark.parametrize("H,G,D", [(2, 1, 64), (2, 4, 128), (1, 6, 32)])
def test_every_format_gqa_causal_and_not(tmp_path, backend, kf, vf, H, G, D):
    rng = np.random.default_rng(zlib.crc32(f"{kf}{vf}{H}{G}{D}".encode()))
    # different lengths in one batch; 19 query tokens cross page boundaries and end in a
    # partly filled last page (int4 keys: residual rows) or on a full one (48)
    c, seqs = make_cache(tmp_path, kf, vf, H, D, [19, 33, 48, 300], rng)
    q = rng.standard_normal((len(seqs), 19, H * G, D), dtype=np.float32)
    check(c, seqs, q, backend)
    check(c, seqs, q, backend, causal=False)


@pytest.mark.parametrize("T", [2, 16, 17, 40, 130])
def test_query_blocks_across_pages(tmp_path, backend, T):
    rng = np.random.default_rng(T)
    c, seqs = make_cache(tmp_path, "int4", "int8", 2, 64, [T, T + 5, 16 * 12, 401], rng)
    q = rng.standard_normal((len(seqs), T, 4, 64), dtype=np.float32)
    check(c, seqs, q, backend)


@pytest.mark.parametrize("window", [1, 5, 16, 37, 10_000])
@pytest.mark.parametrize("causal", [True, False])
def test_window(tmp_path, backend, window, causal):
    rng = np.random.default_rng(window)
    c, seqs = make_cache(tmp_path, "int8", "int4", 2, 64, [23, 100, 257], rng)
    q = rng.standard_normal((len(seqs), 23, 4, 64), dtype=np.float32)
    check(c, seqs, q, backend, causal=causal, window=window)


def test_forked_shifted_sequences_and_scale(tmp_path, backend):
    rng = np.random.default_rng(11)
    c, (a, b) = make_cache(tmp_path, "fp8_e4m3", "int8", 2, 64, [200, 45], rng)
    f = c.fork(a)                       # shares a's full pages
    x = rng.standard_normal((9, 2, 64), dtype=np.float32)
    c.append(f, 0, x, x)
    g = c.fork(a)
    c.truncate(g, 150)                  # copy-on-write of a full page into the last page
    c.shift_left(b, 20)                 # the first visible position inside a page
    seqs = [a, b, f, g, a]
    q = rng.standard_normal((len(seqs), 12, 6, 64), dtype=np.float32)
    check(c, seqs, q, backend)
    check(c, seqs, q, backend, window=30)
    check(c, seqs, q, backend, scale=0.05)


def test_long_contexts_split_over_threads(tmp_path, backend):
    rng = np.random.default_rng(7)
    c, seqs = make_cache(tmp_path, "int8", "fp16", 2, 128, [5000, 9], rng)
    q = rng.standard_normal((2, 9, 8, 128), dtype=np.float32)
    want = reference(c, seqs, q)
    for threads in (1, 2, 3):
        km.set_num_threads(threads)
        try:
            assert_close(km.paged_attention(c, 0, seqs, q, backend=backend), want)
        finally:
            km.set_num_threads(km.parallel._default_threads())


def test_one_query_token_is_decode(tmp_path, backend):
    rng = np.random.default_rng(3)
    c, seqs = make_cache(tmp_path, "int4", "int4", 2, 64, [1, 40, 333], rng)
    q = rng.standard_normal((3, 1, 4, 64), dtype=np.float32)
    for causal, window in [(True, None), (False, None), (True, 7)]:
        got = km.paged_attention(c, 0, seqs, q, causal=causal, window=window, backend=backend)
        want = km.paged_decode_attention(c, 0, seqs, q[:, 0], window=window, backend=backend)
        np.testing.assert_array_equal(got[:, 0], want)


def test_query_dtypes_and_empty_batch(tmp_path):
    rng = np.random.default_rng(5)
    c, seqs = make_cache(tmp_path, "fp16", "int8", 2, 64, [50], rng)
    q = rng.standard_normal((1, 6, 4, 64))
    want = km.paged_attention(c, 0, seqs, q.astype(np.float32), backend="cpu")
    np.testing.assert_array_equal(km.paged_attention(c, 0, seqs, q, backend="cpu"), want)     # float64
    assert_close(km.paged_attention(c, 0, seqs, q.astype(np.float16), backend="cpu"), want)
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(km.paged_attention(c, 0, seqs, torch.from_numpy(q).float(), backend="cpu"), want)
    assert km.paged_attention(c, 0, [], np.zeros((0, 3, 4, 64), np.float32)).shape == (0, 3, 4, 64)


def test_overflowing_logits_and_tiny_scale_are_recomputed(tmp_path, backend):
    """float32 scores overflow (huge q) or scale is not a normal float32: float64 rows."""
    rng = np.random.default_rng(9)
    c, seqs = make_cache(tmp_path, "fp32", "fp32", 1, 64, [70, 31], rng)
    q = rng.standard_normal((2, 5, 2, 64), dtype=np.float32)
    big = q * np.float32(1e37)
    got = km.paged_attention(c, 0, seqs, big, backend=backend)
    assert np.isfinite(got).all()
    assert_close(got, reference(c, seqs, big))
    check(c, seqs, q, backend, scale=1e-40)


@pytest.mark.parametrize("bad,exc", [
    (lambda c, s: km.paged_attention(c, 0, [s], np.ones((1, 2, 3, 64), np.float32)), km.ShapeError),
    (lambda c, s: km.paged_attention(c, 0, [s], np.ones((2, 2, 4, 64), np.float32)), km.ShapeError),
    (lambda c, s: km.paged_attention(c, 0, [s], np.ones((1, 2, 4, 32), np.float32)), km.ShapeError),
    (lambda c, s: km.paged_attention(c, 0, [s], np.ones((1, 4, 64), np.float32)), km.ShapeError),
    (lambda c, s: km.paged_attention(c, 0, [s], np.ones((1, 0, 4, 64), np.float32)), km.ShapeError),
    (lambda c, s: km.paged_attention(c, 0, [s], np.ones((1, 6, 4, 64), np.float32)), km.ShapeError),
    (lambda c, s: km.paged_attention(c, 0, [s], np.ones((1, 2, 4, 64), np.int32)), km.DTypeError),
    (lambda c, s: km.paged_attention(c, 0, [s], np.full((1, 2, 4, 64), np.inf, np.float32)), km.NonFiniteError),
    (lambda c, s: km.paged_attention(c, 2, [s], np.ones((1, 2, 4, 64), np.float32)), km.ShapeError),
    (lambda c, s: km.paged_attention(c, 1, [s], np.ones((1, 2, 4, 64), np.float32)), km.SequenceError),
    (lambda c, s: km.paged_attention(c, 0, [99], np.ones((1, 2, 4, 64), np.float32)), km.SequenceError),
    (lambda c, s: km.paged_attention(c, 0, s, np.ones((1, 2, 4, 64), np.float32)), km.SequenceError),
    (lambda c, s: km.paged_attention(c, 0, [s], np.ones((1, 2, 4, 64), np.float32), window=0), km.ShapeError),
    (lambda c, s: km.paged_attention(c, 0, [s], np.ones((1, 2, 4, 64), np.float32), scale=0.0), km.ShapeError),
    (lambda c, s: km.paged_attention(c, 0, [s], np.ones((1, 2, 4, 64), np.float32), causal=None), km.ConfigError),
    (lambda c, s: km.paged_attention(c, 0, [s], np.ones((1, 2, 4, 64), np.float32), backend="gpu"), km.ConfigError),
    (lambda c, s: km.paged_attention("cache.kvm", 0, [s], np.ones((1, 2, 4, 64), np.float32)), km.ConfigError),
])
def test_bad_input_raises_clear_errors(bad, exc):
    assert_bad_attention_call_refused(bad, exc)
