"""float16 side data (format 2 pages): quantizers, page readers and attention kernels
against plain-numpy references.

The rule under test: a scale is computed in float32 and rounded *up* to float16, an int4
zero point (the group minimum) rounded *down*, and codes are computed against the rounded
values, so no code clips and every decoded element is within half a (stored) step of its
input. What float16 cannot hold is refused before anything is written.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

import kvmmap as km
from kvmmap import attention
from kvmmap.codecs import _pages, quant
from kvmmap.core.layout import PageLayout
from reference import decode_codes, fp8_decode_table, nearest_code

F16_MAX = 65504.0
TINY = 2.0 ** -100
SCALED = ["int8", "fp8_e4m3", "fp8_e5m2", "int4"]
CASES = [("int8", "token"), ("fp8_e4m3", "token"), ("fp8_e5m2", "token"), ("int4", "token"), ("int4", "channel")]
SHAPES = [(1, 64), (3, 17, 128), (2, 1, 32), (5, 31, 64), (0, 3, 64)]
# slack on top of half a step, for the float32 arithmetic around it (per-dtype, as in test_quant)
RTOL = 1e-5


# ---------------------------------------------------------------------------------
# numpy references (float16 rounding by numpy's own conversion and nextafter)


def up16(x) -> np.ndarray:
    """Smallest float16 >= x, as float32 (inf past 65504)."""
    x = np.asarray(x, np.float32)
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    h = np.where(h.astype(np.float32) < x, np.nextafter(h, np.float16(np.inf)), h)
    return h.astype(np.float32)


def down16(x) -> np.ndarray:
    """Largest float16 <= x, as float32 (-inf below -65504)."""
    x = np.asarray(x, np.float32)
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    h = np.where(h.astype(np.float32) > x, np.nextafter(h, np.float16(-np.inf)), h)
    return h.astype(np.float32)


def fmax_of(fmt) -> float:
    return km.get_format(fmt).max_code_value


def ref_row_scaled(x, fmt):
    """(codes, scales float16) of int8 / fp8 rows with float16 side data."""
    amax = np.abs(x).max(axis=-1).astype(np.float32)
    amax = np.where(amax >= TINY, amax, np.float32(0))
    s = up16(amax / np.float32(fmax_of(fmt)))
    inv = np.where(s > 0, np.float32(1) / np.where(s > 0, s, 1), 0).astype(np.float32)
    y = x * inv[..., None]                                     # float32, as the kernel
    if fmt == "int8":
        codes = np.rint(y.astype(np.float64)).astype(np.int8)
    else:
        table = fp8_decode_table(fmt)
        fm = fmax_of(fmt)
        y = np.clip(y, -fm, fm)
        finite = np.isfinite(table) & ~((np.arange(256) & 0x80).astype(bool) & (table == 0))
        order = np.argsort(table[finite], kind="stable")
        codes = nearest_code(y, table[finite][order], np.arange(256)[finite][order]).astype(np.uint8)
    return codes, s.astype(np.float16)


def ref_int4_params(lo, hi):
    z = down16(lo)
    span = (hi.astype(np.float32) - z).astype(np.float32)
    span = np.where(span >= TINY, span, np.float32(0))
    s = up16(span / np.float32(15))
    return s, z


def ref_int4(x, grouping, G):
    """(codes unpacked [..., D], scales, zeros float16) of int4 with float16 side data."""
    if grouping == "token":
        g = x.reshape(x.shape[:-1] + (x.shape[-1] // G, G))
        s, z = ref_int4_params(g.min(-1), g.max(-1))
        se, ze = np.repeat(s, G, axis=-1), np.repeat(z, G, axis=-1)
    else:
        T = x.shape[-2]
        lo = np.stack([x[..., t:t + G, :].min(-2) for t in range(0, T, G)], axis=-2)
        hi = np.stack([x[..., t:t + G, :].max(-2) for t in range(0, T, G)], axis=-2)
        s, z = ref_int4_params(lo, hi)
        se, ze = (np.repeat(a, G, axis=-2)[..., :T, :] for a in (s, z))
    inv = np.where(se > 0, np.float32(1) / np.where(se > 0, se, 1), 0).astype(np.float32)
    codes = np.clip(np.rint(((x - ze) * inv).astype(np.float64)), 0, 15)
    return codes, s.astype(np.float16), z.astype(np.float16), se, ze


def data(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)
    if x.size:   # rows of very different magnitudes, outlier channels, an offset row
        x *= np.float32(10.0) ** rng.integers(-3, 4, size=shape[:-1] + (1,)).astype(np.float32)
        x[..., :: max(1, shape[-1] // 7)] *= 20
        x.reshape(-1, shape[-1])[0] += 3.3
    return x


def q16(x, fmt, grouping="token", group_size=None):
    return km.quantize(x, fmt, grouping=grouping, group_size=group_size, side_dtype=np.float16)


def step_of(q):
    """The stored step of every element, float64 [..., D]."""
    s = q.scales.astype(np.float64)
    if q.format != "int4":
        return np.broadcast_to(s[..., None], q.shape)
    if q.grouping == "token":
        return np.repeat(s, q.group_size, axis=-1)
    return np.repeat(s, q.group_size, axis=-2)[..., :q.shape[-2], :]


# ---------------------------------------------------------------------------------
# Quantizers


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt,grouping", CASES)
def test_quantize_matches_the_numpy_reference(fmt, grouping, shape):
    x = data(shape, seed=len(shape) * 7 + shape[-1])
    if grouping == "channel" and len(shape) < 2:
        pytest.skip("channel grouping needs a token axis")
    G = {"token": 16, "channel": 5}[grouping] if fmt == "int4" else None
    q = q16(x, fmt, grouping, G)
    assert q.scales.dtype == np.float16 and (q.zeros is None or q.zeros.dtype == np.float16)
    if fmt == "int4":
        codes, s, z, _, _ = ref_int4(x, grouping, G)
        np.testing.assert_array_equal(q.scales.view(np.uint16), s.view(np.uint16))
        np.testing.assert_array_equal(q.zeros.view(np.uint16), z.view(np.uint16))
        got = decode_codes("int4", q.codes)
    else:
        codes, s = ref_row_scaled(x, fmt)
        np.testing.assert_array_equal(q.scales.view(np.uint16), s.view(np.uint16))
        got = q.codes
    # codes: the reference's, except where x / step sits on a tie to within float32
    # rounding (the kernel may fuse a multiply-add there)
    differ = got.astype(np.int64) != codes.astype(np.int64)
    if fmt == "int8" or fmt == "int4":
        frac = np.abs(np.abs(np.asarray(x, np.float64) / np.where(step_of(q) > 0, step_of(q), 1)) % 1 - 0.5)
        if fmt == "int4":
            off = x - (np.repeat(q.zeros.astype(np.float32), G, axis=-1) if grouping == "token" else
                       np.repeat(q.zeros.astype(np.float32), G, axis=-2)[..., :shape[-2], :])
            frac = np.abs(np.abs(off / np.where(step_of(q) > 0, step_of(q), 1)) % 1 - 0.5)
        assert not (differ & (frac > 1e-5)).any()
    else:
        assert not differ.any()


@pytest.mark.parametrize("fmt,grouping", CASES)
def test_no_clipping_error_within_half_a_step(fmt, grouping):
    """int8 and int4: |x - decoded| <= stored step / 2, the row (group) extremes included."""
    if fmt.startswith("fp8"):
        pytest.skip("fp8 steps vary along the grid (test_quantize_matches_the_numpy_reference)")
    x = data((6, 40, 64), seed=3)
    # values whose scale is not a float16 value and minima just above a float16 value, so
    # that rounding the scale down or the zero up would clip the extremes
    x[0, :, 0] = np.float32(1234.567)
    x[0, :, 1] = np.float32(-1.0009766)
    q = q16(x, fmt, grouping, 16 if grouping == "token" and fmt == "int4" else (8 if fmt == "int4" else None))
    err = np.abs(km.dequantize(q).astype(np.float64) - x)
    step = step_of(q)
    assert (err <= step / 2 * (1 + RTOL) + 1e-30).all(), float((err / np.maximum(step, 1e-30)).max())
    # and the float16 step is at most 2**-10 coarser than the float32 one (int4: plus what
    # rounding the zero point down adds to the range, at most 2**-10 |min|)
    q32 = km.quantize(x, fmt, grouping=grouping, group_size=q.group_size or None)
    slack = 0 if fmt == "int8" else 2.0 ** -10 * np.abs(q32.zeros) / 15
    assert (q.scales.astype(np.float64) <= (q32.scales + slack) * (1 + 2.0 ** -10) + 2.0 ** -24).all()


@pytest.mark.parametrize("fmt,grouping", CASES)
def test_dequantize_float16_side_data_is_code_times_scale(fmt, grouping):
    x = data((3, 20, 64), seed=5)
    q = q16(x, fmt, grouping)
    want = _decode_numpy(q)
    got = km.dequantize(q)
    tol = 1e-6 * np.abs(want) + 1e-6 * step_of(q) * 16
    assert (np.abs(got - want) <= tol).all()


def _decode_numpy(q):
    codes = decode_codes(q.format, q.codes).astype(np.float64)
    s = step_of(q)
    if q.format != "int4":
        return codes * s
    z = q.zeros.astype(np.float64)
    z = np.repeat(z, q.group_size, axis=-1) if q.grouping == "token" else \
        np.repeat(z, q.group_size, axis=-2)[..., :q.shape[-2], :]
    return codes * s + z


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_largest_storable_row_and_past_it(fmt):
    limit = np.float32(F16_MAX * fmax_of(fmt))
    q = q16(np.array([[limit, -1.0]], np.float32), fmt)
    assert q.scales[0] == F16_MAX
    np.testing.assert_allclose(km.dequantize(q)[0, 0], limit, rtol=1e-6)
    with pytest.raises(km.NonFiniteError, match="float16 side data"):
        q16(np.array([[np.nextafter(limit, np.float32(np.inf)), 1.0]], np.float32), fmt)


def filled(fmt, shape, grouping="token", G=None):
    """A float16-side QTensor over sentinel bytes (codes 0x5A, scales 0.25, zeros -3)."""
    f = km.get_format(fmt)
    grouping, G = f.resolve_grouping(shape, grouping, G)
    side = f.side_shape(shape, grouping, G)
    codes = np.full(f.code_shape(shape), 0x5A, np.uint8).view(f.code_dtype)
    zeros = np.full(side, -3, np.float16) if f.zero_point else None
    return quant.QTensor(codes, np.full(side, 0.25, np.float16), zeros, fmt, shape, grouping, G)


def snapshot(q):
    return [a.copy() for a in (q.codes, q.scales, q.zeros) if a is not None]


REFUSED = [
    ("int8", "token", 8.4e6),                   # > 65504 * 127
    ("fp8_e4m3", "token", 3.0e7),               # > 65504 * 448
    ("fp8_e5m2", "token", 3.8e9),               # > 65504 * 57344
    ("int4", "token", -70000.0),                # a minimum below -65504
    ("int4", "channel", -70000.0),
    ("int4", "token", 1.0e6),                   # a range of 1e6: a scale of 66667
    ("int4", "channel", 1.0e6),
    ("int4", "token", np.nan),
    ("int8", "token", np.inf),
]


@pytest.mark.parametrize("fmt,grouping,bad", REFUSED)
def test_refused_input_leaves_the_destination_unchanged(fmt, grouping, bad):
    x = data((2, 12, 32), seed=9)
    x[1, 11, 5] = bad                  # the last row: every row before it is fine
    q = filled(fmt, x.shape, grouping, 4 if grouping == "channel" else None)
    before = snapshot(q)
    with pytest.raises(km.NonFiniteError) as e:
        quant.quantize_into(x, q)
    assert "nothing was written" in str(e.value) or "NaN or infinity" in str(e.value)
    for a, b in zip(before, snapshot(q)):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    x[1, 11, 5] = 0.5                  # the same destination takes good input
    quant.quantize_into(x, q)
    fresh = q16(x, fmt, grouping, q.group_size)
    for a, b in zip(snapshot(fresh), snapshot(q)):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_int4_limits_are_what_the_message_says():
    ok = np.array([[-F16_MAX, -F16_MAX + 1, 0.0, 5.0]], np.float32)       # min exactly -65504
    q = q16(ok, "int4", group_size=4)
    assert q.zeros[0, 0] == -F16_MAX
    wide = np.array([[0.0, 15 * F16_MAX]], np.float32)                     # scale exactly 65504
    assert q16(wide, "int4", group_size=2).scales[0, 0] == F16_MAX
    with pytest.raises(km.NonFiniteError, match="range <= about 982560"):
        q16(np.array([[0.0, 15 * F16_MAX * 1.001]], np.float32), "int4", group_size=2)


def test_float32_side_data_is_unchanged_and_mixed_dtypes_refused():
    x = data((4, 9, 64), seed=2)
    for fmt in SCALED:
        q = km.quantize(x, fmt)
        assert q.scales.dtype == np.float32                       # the default stays format 1.0's
    q = filled("int4", x.shape)
    bad = quant.QTensor(q.codes, q.scales, q.zeros.astype(np.float32), "int4", q.shape, "token", q.group_size)
    with pytest.raises(km.DTypeError, match="float16"):
        quant.quantize_into(x, bad)
    with pytest.raises(km.ShapeError, match="both alike"):
        km.dequantize(bad)
    with pytest.raises(km.DTypeError, match="side_dtype"):
        km.quantize(x, "int8", side_dtype=np.float64)


# ---------------------------------------------------------------------------------
# Page kernels over an arena built with PageLayout(..., side_dtype=np.float16)


def build_pages(kf, vf, H, D, P, num_pages, v_group, seed, side_dtype=np.float16):
    """(layout, arena, K, V as stored: float64 [num_pages, H, P, D]) with every page filled
    by quant.quantize_into through layout.page_qtensor."""
    rng = np.random.default_rng(seed)
    layout = PageLayout(H, D, P, kf, vf, v_group, side_dtype=side_dtype)
    arena = np.zeros(num_pages * layout.page_bytes, np.uint8)
    views = layout.arena_views(arena, num_pages)
    stored = {}
    for side, fmt in (("k", kf), ("v", vf)):
        out = np.empty((num_pages, H, P, D))
        for p in range(num_pages):
            x = (rng.standard_normal((H, P, D), dtype=np.float32) * (2 if side == "k" else 1)
                 + np.float32(rng.uniform(-1, 1)))
            q = layout.page_qtensor(views[side], side, p, 0, P)
            quant.quantize_into(x, q)
            out[p] = _decode_numpy(q) if km.get_format(fmt).scaled else decode_codes(
                fmt, q.codes.view(np.uint16) if fmt == "fp16" else q.codes)
        stored[side] = out
    return layout, arena, stored["k"], stored["v"]


def test_layout_side_dtype():
    a = PageLayout(4, 64, 16, "int8", "int4", 32)
    b = PageLayout(4, 64, 16, "int8", "int4", 32, side_dtype=np.float16)
    assert a.side_offsets("k")[-1] == 0 and b.side_offsets("k")[-1] == b.side_offsets("v")[-1] == 1
    assert b.page_bytes < a.page_bytes
    for side in ("k", "v"):
        for name, r in b.regions[side].items():
            assert r.offset % 64 == 0 and r.shape == a.regions[side][name].shape
            assert r.dtype == (np.float16 if name != "codes" else a.regions[side][name].dtype)
    with pytest.raises(km.DTypeError):
        PageLayout(4, 64, 16, "int8", "int4", 32, side_dtype=np.float64)


PAIRS = [("int8", "int8"), ("fp8_e4m3", "fp8_e5m2"), ("int4", "int4"), ("int8", "int4"), ("fp16", "int8")]


@pytest.mark.parametrize("kf,vf", PAIRS)
@pytest.mark.parametrize("side_dtype", [np.float16, np.float32])
def test_read_pages_matches_numpy(kf, vf, side_dtype):
    H, D, P, n_pages = 3, 64, 8, 5
    layout, arena, K, V = build_pages(kf, vf, H, D, P, n_pages, 16, seed=11, side_dtype=side_dtype)
    pages = np.array([3, 0, 4, 1], np.int32)                 # a block table, out of order
    for side, want_pages in (("k", K), ("v", V)):
        want = want_pages[pages].transpose(0, 2, 1, 3).reshape(-1, H, D)     # [tokens, H, D]
        for pos, n in ((0, 32), (5, 20), (7, 1), (31, 1)):
            out = np.empty((n, H, D), np.float32)
            _pages.read_pages(arena, layout.page_bytes, P, *layout.side_offsets(side), layout.kernel_group(side),
                              pages, pos, out, 2)
            np.testing.assert_allclose(out, want[pos:pos + n], rtol=1e-6, atol=1e-6)


class PagesOnly:
    """What the attention kernels read of a cache (layout, arena, the paged view of a
    batch), over hand-built pages: sequence b owns block_tables[b] and ``tail`` more
    positions in an open page (float32)."""

    def __init__(self, layout, arena, block_tables, tails, rng):
        self.layout, self.num_kv_heads = layout, layout.num_kv_heads
        self.page_size, self.head_dim = layout.page_size, layout.head_dim
        n = len(arena) // layout.page_bytes
        self.high_water = n
        self.arena = types.SimpleNamespace(data=arena, page_bytes=layout.page_bytes,
                                           page_stamp=np.ones(n, np.int64), stamp=1)
        B, H, P, D = len(block_tables), self.num_kv_heads, self.page_size, self.head_dim
        self.block_tables, self.tails = block_tables, tails
        self.tail_k = np.zeros((B, H, P, D), np.float32)
        self.tail_v = np.zeros((B, H, P, D), np.float32)
        for b, t in enumerate(tails):
            self.tail_k[b, :, :t] = rng.standard_normal((H, t, D), dtype=np.float32)
            self.tail_v[b, :, :t] = rng.standard_normal((H, t, D), dtype=np.float32)

    def paged_batch(self, layer, seqs, window):
        bt = [self.block_tables[s] for s in seqs]
        indptr = np.zeros(len(seqs) + 1, np.int64)
        np.cumsum([len(p) for p in bt], out=indptr[1:])
        end = np.array([len(self.block_tables[s]) * self.page_size + self.tails[s] for s in seqs], np.int64)
        start = np.zeros(len(seqs), np.int64) if window is None else np.maximum(0, end - window)
        return types.SimpleNamespace(
            page_indptr=indptr, page_indices=np.concatenate(bt).astype(np.int32), start=start, end=end,
            tail_k=self.tail_k[list(seqs)].copy(), tail_v=self.tail_v[list(seqs)].copy(), lengths=end - start)


def attention_numpy(cache, K, V, seqs, q, scale):
    """float64 softmax attention over the stored pages plus the open page."""
    H, _P, D = cache.num_kv_heads, cache.page_size, cache.head_dim
    out = np.empty(q.shape)
    G = q.shape[1] // H
    for i, s in enumerate(seqs):
        t = cache.tails[s]
        k = np.concatenate([K[cache.block_tables[s]].transpose(1, 0, 2, 3).reshape(H, -1, D),
                            cache.tail_k[s, :, :t]], axis=1)
        v = np.concatenate([V[cache.block_tables[s]].transpose(1, 0, 2, 3).reshape(H, -1, D),
                            cache.tail_v[s, :, :t]], axis=1)
        for j in range(q.shape[1]):
            logits = scale * (k[j // G] @ q[i, j].astype(np.float64))
            w = np.exp(logits - logits.max())
            out[i, j] = (w / w.sum()) @ v[j // G]
    return out


def attention_case(kf, vf, G, seed):
    rng = np.random.default_rng(seed)
    H, D, P = 2, 64, 16
    layout, arena, K, V = build_pages(kf, vf, H, D, P, 9, 32, seed=seed)
    cache = PagesOnly(layout, arena, [np.array([4, 1, 7]), np.array([2]), np.array([0, 3, 5, 6, 8])],
                      [5, 0, 16 - 1], rng)
    seqs = [0, 1, 2]
    q = rng.standard_normal((len(seqs), H * G, D), dtype=np.float32)
    return cache, seqs, q, attention_numpy(cache, K, V, seqs, q, 1 / np.sqrt(D))


ATT_PAIRS = [("int8", "int8"), ("int4", "int4"), ("fp8_e4m3", "fp8_e5m2"), ("int8", "int4"), ("fp16", "int8")]


@pytest.mark.parametrize("kf,vf", ATT_PAIRS)
@pytest.mark.parametrize("G", [1, 4])
def test_cpu_attention_over_float16_side_pages(kf, vf, G):
    cache, seqs, q, want = attention_case(kf, vf, G, seed=G * 31 + len(kf + vf))
    got = attention.cpu_decode(cache, 0, seqs, q, 1 / np.sqrt(cache.head_dim), None)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


@pytest.mark.opencl
@pytest.mark.parametrize("kf,vf", ATT_PAIRS)
@pytest.mark.parametrize("G", [1, 4])
def test_opencl_attention_over_float16_side_pages(opencl, kf, vf, G):
    cache, seqs, q, want = attention_case(kf, vf, G, seed=G * 31 + len(kf + vf))
    got = opencl.decode(cache, 0, seqs, q, 1 / np.sqrt(cache.head_dim), None)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def exact_qtensor(fmt, grouping, rng):
    """float16-side QTensor whose decoded values are exact in float32 (scales k / 16,
    zeros k / 8): CPU, OpenCL and numpy must agree bit for bit."""
    f = km.get_format(fmt)
    shape, G = (2, 7, 64), {"token": 16, "channel": 3}[grouping] if fmt == "int4" else 0
    side = f.side_shape(shape, grouping, G)
    codes = rng.integers(0, 256, f.code_shape(shape), dtype=np.uint8)
    if fmt.startswith("fp8"):
        codes &= np.uint8(0xF7)              # keep clear of NaN / inf codes
    codes = codes.view(f.code_dtype)
    scales = (rng.integers(1, 64, side) / 16).astype(np.float16)
    zeros = (rng.integers(-512, 512, side) / 8).astype(np.float16) if f.zero_point else None
    return quant.QTensor(codes, scales, zeros, fmt, shape, grouping, G)


@pytest.mark.parametrize("fmt,grouping", CASES)
def test_cpu_dequantize_of_exact_float16_side_data(fmt, grouping):
    q = exact_qtensor(fmt, grouping, np.random.default_rng(1))
    np.testing.assert_array_equal(km.dequantize(q), _decode_numpy(q).astype(np.float32))


@pytest.mark.opencl
@pytest.mark.parametrize("fmt,grouping", CASES)
def test_opencl_dequantize_of_float16_side_data(opencl, fmt, grouping):
    q = exact_qtensor(fmt, grouping, np.random.default_rng(1))
    np.testing.assert_array_equal(opencl.dequantize_rows(q), km.dequantize(q))
    x = data((3, 10, 64), seed=4)                 # and quantized data (products not exact)
    q = q16(x, fmt, grouping)
    np.testing.assert_allclose(opencl.dequantize_rows(q), km.dequantize(q), rtol=1e-6, atol=1e-6)
