"""Decode attention at the edges of float32, and its argument checks.

Every case is compared with a float64 numpy reference written here, independent of the
kernels: logits x = K q in float64 (finite for any finite float32 q and K), weights
exp(scale * (x - max x)) (never NaN for a finite positive scale), output the weighted mean
of V. fp32 storage keeps the input exactly, so the reference reads the arrays the test
made; other formats decode the stored values from the committed file's bytes with
tests/reference.py (not ``cache.read``, which shares the kernels' decoder).
"""

from pathlib import Path

import numpy as np
import pytest

import kvmmap as km
from reference import parse_cache_file, stored_kv

RTOL = 2e-3
FLT_MAX = float(np.finfo(np.float32).max)


def reference(k, v, q, scale):
    """float64 softmax(scale * K q) V; k, v [T, H, D], q [Hq, D] -> [Hq, D]."""
    k, v, q = (np.asarray(a, np.float64) for a in (k, v, q))
    G = q.shape[0] // k.shape[1]
    out = np.empty(q.shape)
    for j in range(q.shape[0]):
        x = k[:, j // G] @ q[j]
        w = np.exp(scale * (x - x.max()))
        out[j] = (w @ v[:, j // G]) / w.sum()
    return out


def assert_close(got, want):
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.isfinite(got).all(), f"non-finite output: {got[~np.isfinite(got)][:4]}"
    err = np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30)
    assert err <= RTOL, f"relative error {err:.3e} > {RTOL} (got {got.ravel()[:3]}, want {want.ravel()[:3]})"


def fill(k, v, fmt="fp32", page_size=16, path=None):
    """A one-layer cache (RAM, or a file at ``path``) holding one sequence with K = k, V = v ([T, H, D])."""
    c = km.PagedKVCache.create(path, num_layers=1, num_kv_heads=k.shape[1], head_dim=k.shape[2],
                               page_size=page_size, k_format=fmt, v_format=fmt)
    s = c.new_sequence()
    for t0 in range(0, len(k), 700):        # a prefill in pieces, leaving an open tail
        c.append(s, 0, k[t0:t0 + 700], v[t0:t0 + 700])
    return c, s


def stored(c, s):
    """K and V [T, H, D] as stored: committed, then decoded from the file's bytes."""
    c.flush()
    raw = Path(c.path).read_bytes()
    return stored_kv(parse_cache_file(raw), raw, s, 0)


def attend(c, s, q, backend, **kw):
    return km.paged_decode_attention(c, 0, [s], q[None], backend=backend, **kw)[0]


# ---- weights that underflow ------------------------------------------------------------

@pytest.mark.parametrize("winner", [0, 700, 2499], ids=["first", "middle", "last"])
def test_negligible_weights_on_huge_values_are_exactly_zero(backend, winner):
    """One token has logit 0, the rest -1000 (weight exp(-1000) == 0): the output is that
    token's V even when every other V is near the float32 maximum."""
    T, H, G, D = 2500, 1, 4, 64
    q = np.zeros((H * G, D), np.float32)
    q[:, 0] = 1
    k = np.zeros((T, H, D), np.float32)
    k[:, :, 0] = -1000
    k[winner] = 0
    v = np.full((T, H, D), 3e38, np.float32)
    v[winner] = np.linspace(-1, 1, D, dtype=np.float32)
    c, s = fill(k, v)
    want = reference(k, v, q, 1.0)
    np.testing.assert_array_equal(want, np.broadcast_to(v[winner, 0], want.shape))   # the premise
    assert_close(attend(c, s, q, backend, scale=1.0), want)


def test_weights_in_the_subnormal_range_are_kept(backend):
    """Logits 87 .. 103 below the maximum give weights exp(x) below float32's smallest
    normal number: they are small, not zero, and with V near the maximum they count."""
    if backend == "opencl":
        import pyopencl as cl
        from kvmmap import opencl
        if not opencl._pick_device().single_fp_config & cl.device_fp_config.DENORM:
            pytest.skip("this OpenCL device flushes float32 subnormals to zero")
    T, H, D = 300, 1, 32
    rng = np.random.default_rng(4)
    q = np.zeros((H, D), np.float32)
    q[:, 0] = 1
    k = np.zeros((T, H, D), np.float32)
    k[1:, 0, 0] = rng.uniform(-100, -90, T - 1).astype(np.float32)
    v = np.full((T, H, D), 3e38, np.float32)
    v[0] = 1
    c, s = fill(k, v)
    want = reference(k, v, q, 1.0)
    assert 0.5 < want.max() - 1 < 1e3       # the premise: the subnormal weights matter
    assert_close(attend(c, s, q, backend, scale=1.0), want)


# ---- scores and sums that overflow float32 ---------------------------------------------

def overflowing_scores(kind, T=1500, H=2, G=2, D=64, seed=0):
    """(k, v, q) whose float32 logits overflow although every input is finite."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.5, 1, (H * G, D)).astype(np.float32)
    k = rng.standard_normal((T, H, D)).astype(np.float32)
    v = rng.standard_normal((T, H, D)).astype(np.float32)
    if kind == "positive":        # q . k up to ~1e40
        q *= 1e20
        k *= 1e19
    elif kind == "all_negative":  # every q . k below -FLT_MAX: the least negative wins
        q *= 1e19
        k = -np.abs(k) * 1e19 - 1e19
    elif kind == "cancelling":    # products overflow, their sum is small
        q[:] = 1e30
        k[:, :, 0::2] = 1e30
        k[:, :, 1::2] = -1e30
        k[::3, :, 1] *= 0.5       # these tokens score 0.5e60, the others 0 (seen only in float64)
    elif kind == "tie":           # two tokens share the overflowing maximum
        q *= 1e19
        k *= 1e15
        k[[10, 1200]] = 1e19
    return k, v, q


@pytest.mark.parametrize("kind", ["positive", "all_negative", "cancelling", "tie"])
def test_scores_beyond_float32_give_the_exact_softmax(backend, kind):
    k, v, q = overflowing_scores(kind)
    c, s = fill(k, v)
    scale = 1 / np.sqrt(k.shape[2])
    with np.errstate(over="ignore", invalid="ignore"):     # the premise: float32 overflows
        assert not np.isfinite(np.einsum("thd,hgd->thg", k, (q * np.float32(scale)).reshape(2, 2, -1))).all()
    want = reference(k, v, q, scale)
    assert_close(attend(c, s, q, backend), want)


@pytest.mark.parametrize("scale", [1e38, FLT_MAX, 1e39, 1e300])
def test_huge_scale(backend, scale):
    rng = np.random.default_rng(1)
    k = rng.standard_normal((333, 2, 64)).astype(np.float32)
    v = rng.standard_normal((333, 2, 64)).astype(np.float32)
    q = rng.standard_normal((4, 64)).astype(np.float32)
    c, s = fill(k, v)
    assert_close(attend(c, s, q, backend, scale=scale), reference(k, v, q, scale))


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_weighted_sum_of_values_near_the_maximum(tmp_path, backend, fmt):
    """V near FLT_MAX under spread weights: the sum overflows float32, the mean does not.
    (The scaled formats keep float16 scales: they store |x| up to 65504 times their largest
    code, and refuse more; see test_cache.py::test_refused_decode_steps_change_nothing.)"""
    rng = np.random.default_rng(2)
    T, H, D = 1100, 2, 64
    k = rng.standard_normal((T, H, D)).astype(np.float32) * 0.1
    v = rng.uniform(2.9e38, 3.3e38, (T, H, D)).astype(np.float32)
    v[:, :, 1::2] *= -1
    q = rng.standard_normal((H * 3, D)).astype(np.float32)
    c, s = fill(k, v, fmt, path=tmp_path / "c.kvm")
    ks, vs = stored(c, s)
    assert np.isfinite(vs).all()
    for window in (None, 1, 40, 1000):
        n = T if window is None else window
        want = reference(ks[-n:], vs[-n:], q, 1 / 8)
        assert_close(attend(c, s, q, backend, window=window), want)


def test_overflow_in_one_sequence_leaves_the_others_on_the_fast_path(backend, monkeypatch):
    """A batch where one sequence overflows: only it is recomputed, and every sequence
    gets its own answer."""
    from kvmmap import attention

    redone = []
    exact = attention.exact_decode
    monkeypatch.setattr(attention, "exact_decode", lambda c, layer, s, *a: redone.append(s) or exact(c, layer, s, *a))
    rng = np.random.default_rng(6)
    H, D = 2, 64
    c = km.PagedKVCache.create(None, num_layers=1, num_kv_heads=H, head_dim=D, k_format="fp32", v_format="fp32")
    data, seqs = [], []
    for i, T in enumerate([40, 500, 17]):
        k = rng.standard_normal((T, H, D)).astype(np.float32) * (1e21 if i == 1 else 1)
        v = rng.standard_normal((T, H, D)).astype(np.float32)
        s = c.new_sequence()
        c.append(s, 0, k, v)
        data.append((k, v))
        seqs.append(s)
    q = rng.standard_normal((3, H * 2, D)).astype(np.float32) * np.float32(1e19)
    got = km.paged_decode_attention(c, 0, seqs, q, backend=backend)
    assert redone == [seqs[1]]
    for b, (k, v) in enumerate(data):
        assert_close(got[b], reference(k, v, q[b], 1 / 8))


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8", "int4", "fp8_e4m3"])
def test_ordinary_inputs_never_take_the_float64_path(tmp_path, backend, monkeypatch, fmt):
    """Peaked (q * 40) and flat softmaxes over values near 1e4 are the kernels' work."""
    from kvmmap import attention

    def refuse(*a):
        raise AssertionError("exact_decode called for inputs that fit float32")
    monkeypatch.setattr(attention, "exact_decode", refuse)
    rng = np.random.default_rng(12)
    k = rng.standard_normal((1300, 2, 64)).astype(np.float32)
    v = rng.standard_normal((1300, 2, 64)).astype(np.float32) * 1e4
    c, s = fill(k, v, fmt, path=tmp_path / "c.kvm")
    ks, vs = stored(c, s)
    for mult in (40, 1, 1e-3):
        q = rng.standard_normal((8, 64)).astype(np.float32) * np.float32(mult)
        assert_close(attend(c, s, q, backend), reference(ks, vs, q, 1 / 8))


# ---- arguments -------------------------------------------------------------------------

def small_cache():
    rng = np.random.default_rng(8)
    k = rng.standard_normal((50, 2, 64)).astype(np.float32)
    v = rng.standard_normal((50, 2, 64)).astype(np.float32)
    c, s = fill(k, v)
    return c, s, k, v, rng.standard_normal((4, 64)).astype(np.float32)


@pytest.mark.parametrize("window", [50, 51, 2**31, 2**63, 2**70, np.uint64(2**64 - 1)])
def test_a_window_longer_than_the_sequence_is_the_whole_sequence(backend, window):
    c, s, k, v, q = small_cache()
    assert_close(attend(c, s, q, backend, window=window), reference(k, v, q, 1 / 8))


@pytest.mark.parametrize("arg,value", [
    ("scale", True), ("scale", False), ("scale", np.bool_(True)),
    ("window", True), ("window", np.bool_(True)),
    ("scale", 0.0), ("scale", float("inf")), ("scale", float("nan")), ("scale", "0.1"),
    ("window", 0), ("window", -(2**70)), ("window", 2.0),
])
def test_bad_scale_and_window_are_refused(arg, value):
    c, s, k, v, q = small_cache()
    with pytest.raises(km.ShapeError, match=arg):
        attend(c, s, q, "cpu", **{arg: value})


def test_numpy_scalars_are_accepted(backend):
    c, s, k, v, q = small_cache()
    want = reference(k[-7:], v[-7:], q, 0.25)
    for scale, window in [(np.float32(0.25), np.int64(7)), (np.float64(0.25), np.uint8(7)), (1 / 4, 7)]:
        assert_close(attend(c, s, q, backend, scale=scale, window=window), want)


@pytest.mark.parametrize("mode", ["ram", "r+", "r"])
def test_an_empty_batch_gives_an_empty_result(tmp_path, backend, mode):
    path = None if mode == "ram" else tmp_path / "c.kvm"
    c = km.PagedKVCache.create(path, num_layers=1, num_kv_heads=2, head_dim=64, k_format="int8", v_format="int4")
    s = c.new_sequence()
    x = np.ones((20, 2, 64), np.float32)
    c.append(s, 0, x, x)
    if path is not None:
        c.flush()
        c.close()
        c = km.PagedKVCache.open(path, mode=mode)
    with c:
        for q in (np.zeros((0, 6, 64), np.float32), np.zeros((0, 2, 64), np.float16)):
            out = km.paged_decode_attention(c, 0, [], q, backend=backend)
            assert out.dtype == np.float32 and out.shape == (0, q.shape[1], 64)
        with pytest.raises(km.ShapeError):      # the shape is still checked
            km.paged_decode_attention(c, 0, [], np.zeros((0, 3, 64), np.float32), backend=backend)
