"""quantize / dequantize against plain-numpy references, for every format."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kvmmap as km
from kvmmap.codecs import quant
from reference import (
    bf16_round,
    fp8_decode_table,
    fp8_quantize,
    int4_channel_bound,
    int4_token_bound,
    int8_roundtrip_bound,
)

SHAPES = [(1, 64), (7, 3, 128), (13, 256), (2, 5, 11, 64), (16, 8, 128), (0, 4, 64)]
# Slack on top of each format's rounding bound, for the float32 arithmetic around it.
RTOL = {"int8": 1e-5, "int4": 1e-5, "fp8_e4m3": 1e-6, "fp8_e5m2": 1e-6}


def data(shape, seed=0, spread=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)
    if spread and x.size:  # rows of very different magnitudes, plus outlier channels
        x *= np.float32(10.0) ** rng.integers(-3, 4, size=shape[:-1] + (1,)).astype(np.float32)
        x[..., :: max(1, shape[-1] // 7)] *= 20
    return x


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_is_exact(shape):
    x = data(shape)
    q = km.quantize(x, "fp32")
    assert q.scales is None and q.codes.dtype == np.float32
    np.testing.assert_array_equal(km.dequantize(q), x)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp16_matches_numpy_rounding(shape):
    x = data(shape)
    x.flat[:: max(1, x.size // 5)] = np.float32(3e-8)   # fp16 subnormal range
    q = km.quantize(x, "fp16")
    np.testing.assert_array_equal(q.codes.view(np.uint16), x.astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(km.dequantize(q), x.astype(np.float16).astype(np.float32))


def test_fp16_every_code_roundtrips():
    codes = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    finite = np.isfinite(codes.view(np.float16))
    x = codes.view(np.float16)[finite].astype(np.float32).reshape(1, -1)
    q = km.quantize(x, "fp16")
    np.testing.assert_array_equal(q.codes.view(np.uint16)[0], codes[finite])
    np.testing.assert_array_equal(km.dequantize(q), x)


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_rounds_to_nearest_even(shape):
    x = data(shape)
    # halfway cases: exactly between two bf16 values, both parities
    if x.size >= 4:
        x.flat[0] = np.uint32(0x3F808000).view(np.float32)
        x.flat[1] = np.uint32(0x3F818000).view(np.float32)
    q = km.quantize(x, "bf16")
    expect = bf16_round(x)
    np.testing.assert_array_equal(km.dequantize(q), expect)
    np.testing.assert_array_equal(q.codes, (expect.view(np.uint32) >> 16).astype(np.uint16))


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_within_half_step(shape):
    x = data(shape)
    q = km.quantize(x, "int8")
    assert q.codes.dtype == np.int8 and q.scales.shape == shape[:-1]
    np.testing.assert_allclose(q.scales, np.abs(x).max(axis=-1) / 127, rtol=1e-6)
    err = np.abs(km.dequantize(q) - x)
    assert np.all(err <= int8_roundtrip_bound(x) * (1 + RTOL["int8"]) + 1e-30)
    # codes use the whole range: the row's absmax maps to +-127
    if x.size:
        assert np.all(np.abs(q.codes).max(axis=-1) == 127)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[-1] % 32 == 0] + [(5, 6), (3, 2)])
def test_int4_token_groups_within_half_step(shape):
    x = data(shape)
    q = km.quantize(x, "int4")
    group = q.group_size
    assert q.codes.shape == shape[:-1] + (shape[-1] // 2,)
    assert q.scales.shape == shape[:-1] + (shape[-1] // group,)
    g = x.reshape(shape[:-1] + (shape[-1] // group, group))
    np.testing.assert_array_equal(q.zeros, g.min(-1))
    np.testing.assert_allclose(q.scales, (g.max(-1) - g.min(-1)) / 15, rtol=1e-6)
    err = np.abs(km.dequantize(q) - x)
    assert np.all(err <= int4_token_bound(x, group) * (1 + RTOL["int4"]) + 1e-6 * np.abs(x))


@pytest.mark.parametrize("shape", [(16, 64), (17, 128), (1, 64), (3, 31, 128), (2, 4, 32, 256)])
@pytest.mark.parametrize("group", [16, 32])
def test_int4_channel_groups_within_half_step(shape, group):
    x = data(shape)
    q = km.quantize(x, "int4", grouping="channel", group_size=group)
    ngroups = -(-shape[-2] // group)
    assert q.scales.shape == shape[:-2] + (ngroups, shape[-1])
    err = np.abs(km.dequantize(q) - x)
    assert np.all(err <= int4_channel_bound(x, group) * (1 + RTOL["int4"]) + 1e-6 * np.abs(x))
    # the zero point is the per-channel minimum of each token group
    first = x[..., :group, :].min(axis=-2)
    np.testing.assert_array_equal(q.zeros[..., 0, :], first)


def test_int4_channel_handles_outlier_channels_better_than_token_groups():
    # KIVI's observation, reproduced: keys with outlier channels lose less per channel.
    rng = np.random.default_rng(3)
    k = rng.standard_normal((64, 128), dtype=np.float32)
    k[:, [5, 77]] *= 30
    err_tok = np.abs(km.dequantize(km.quantize(k, "int4")) - k).mean()
    err_ch = np.abs(km.dequantize(km.quantize(k, "int4", grouping="channel", group_size=16)) - k).mean()
    assert err_ch < err_tok / 2


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_value_table(fmt):
    ours = quant.fp8_values(fmt).astype(np.float64)
    ref = fp8_decode_table(fmt)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_array_equal(ours[ok], ref[ok])
    assert np.nanmax(ours[np.isfinite(ours)]) == km.get_format(fmt).max_code_value


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_rounds_to_nearest_even_and_saturates(fmt, shape):
    x = data(shape)
    q = km.quantize(x, fmt)
    codes_ref, scales_ref = fp8_quantize(x, fmt)
    np.testing.assert_array_equal(q.scales, scales_ref)
    table = fp8_decode_table(fmt)
    np.testing.assert_array_equal(table[q.codes], table[codes_ref])
    out = km.dequantize(q)
    assert np.all(np.isfinite(out))
    if x.size:  # the row absmax hits the format's max code, not inf / NaN
        fmax = km.get_format(fmt).max_code_value
        assert np.all(np.abs(table[q.codes]).max(axis=-1) == fmax)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_exact_for_representable_values(fmt):
    table = fp8_decode_table(fmt)
    vals = table[np.isfinite(table)].astype(np.float32)
    fmax = vals.max()
    row = np.concatenate([vals, [fmax]]).astype(np.float32).reshape(1, -1)  # scale == 1 exactly
    q = km.quantize(row, fmt)
    assert q.scales[0] == 1.0
    np.testing.assert_array_equal(km.dequantize(q), row)


@pytest.mark.parametrize("fmt", km.FORMATS)
def test_zero_rows_stay_zero(fmt):
    x = np.zeros((3, 64), np.float32)
    x[1] = 1.0
    np.testing.assert_array_equal(km.dequantize(km.quantize(x, fmt)), x)


@pytest.mark.parametrize("fmt", km.FORMATS)
def test_float16_input_equals_its_float32_widening(fmt):
    x16 = data((9, 64)).astype(np.float16)
    a = km.quantize(x16, fmt)
    b = km.quantize(x16.astype(np.float32), fmt)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(km.dequantize(a), km.dequantize(b))


@pytest.mark.parametrize("fmt", km.FORMATS)
def test_noncontiguous_input_is_copied(fmt):
    big = data((8, 4, 256))
    x = big[:, ::2, ::2]   # neither leading nor last axis contiguous
    a = km.quantize(x, fmt)
    b = km.quantize(np.ascontiguousarray(x), fmt)
    np.testing.assert_array_equal(km.dequantize(a), km.dequantize(b))


@pytest.mark.parametrize("fmt", km.FORMATS)
def test_quantize_into_strided_page_view(fmt):
    # token-major input [tokens, heads, dim] written head-major into a bigger "page" buffer
    tokens, heads, dim, page = 11, 4, 64, 16
    x = data((tokens, heads, dim))
    f = km.get_format(fmt)
    codes = np.zeros((heads, page, f.code_width(dim)), f.code_dtype)
    side = np.zeros((heads, page) + ((dim // 32,) if fmt == "int4" else ()), np.float32)
    zeros = np.zeros_like(side) if f.zero_point else None
    dest = km.QTensor(
        codes[:, :tokens], side[:, :tokens] if f.scaled else None,
        zeros[:, :tokens] if zeros is not None else None,
        fmt, (heads, tokens, dim), group_size=32 if fmt == "int4" else 0,
    )
    km.quantize_into(x.transpose(1, 0, 2), dest)
    expect = km.quantize(x.transpose(1, 0, 2), fmt, group_size=32 if fmt == "int4" else None)
    np.testing.assert_array_equal(codes[:, :tokens], expect.codes)
    assert not codes[:, tokens:].any()          # nothing written past the destination
    np.testing.assert_array_equal(km.dequantize(dest), km.dequantize(expect))


def test_quantize_into_accepts_transposed_input_without_copy():
    x = data((10, 4, 64))
    xt = x.transpose(1, 0, 2)        # [heads, tokens, dim], last axis still contiguous
    dest = km.quantize(np.ascontiguousarray(xt), "int8")
    before = dest.codes.copy()
    dest.codes[...] = 0
    km.quantize_into(xt, dest)
    np.testing.assert_array_equal(dest.codes, before)


@pytest.mark.parametrize("fmt", km.FORMATS)
def test_threads_do_not_change_results(fmt):
    x = data((512, 8, 128), spread=False)
    old = km.get_num_threads()
    try:
        km.set_num_threads(1)
        a = km.quantize(x, fmt)
        km.set_num_threads(2)
        b = km.quantize(x, fmt)
    finally:
        km.set_num_threads(old)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(km.dequantize(a), km.dequantize(b))


# ---------------------------------------------------------------------------------
# Property tests

finite_f32 = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.tuples(st.integers(1, 9), st.sampled_from([2, 6, 32, 64])), elements=finite_f32),
    fmt=st.sampled_from(km.FORMATS),
)
def test_roundtrip_error_bounds_hold(x, fmt):
    if fmt == "fp16" and np.abs(x).max() >= 65520:     # rounds past fp16's largest value
        with pytest.raises(km.NonFiniteError, match="range"):
            km.quantize(x, fmt)
        return
    q = km.quantize(x, fmt)
    out = km.dequantize(q)
    assert out.shape == x.shape and out.dtype == np.float32
    err = np.abs(out.astype(np.float64) - x)
    if fmt == "fp32":
        assert np.all(err == 0)
    elif fmt == "fp16":
        np.testing.assert_array_equal(out, x.astype(np.float16).astype(np.float32))
    elif fmt == "bf16":
        np.testing.assert_array_equal(out, bf16_round(x))
    elif fmt == "int8":
        assert np.all(err <= int8_roundtrip_bound(x.astype(np.float64)) * (1 + RTOL[fmt]) + quant.TINY)
    elif fmt == "int4":
        bound = int4_token_bound(x.astype(np.float64), q.group_size)
        assert np.all(err <= bound * (1 + RTOL[fmt]) + 1e-6 * np.abs(x) + quant.TINY)
    else:
        tiny_rows = np.abs(x).max(axis=-1) < quant.TINY
        np.testing.assert_array_equal(out[tiny_rows], 0)
        table = fp8_decode_table(fmt)
        codes_ref, _ = fp8_quantize(x[~tiny_rows], fmt)
        np.testing.assert_array_equal(table[q.codes[~tiny_rows]], table[codes_ref])


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.tuples(st.integers(1, 40), st.sampled_from([2, 8, 64])), elements=finite_f32),
    group=st.integers(1, 17),
)
def test_channel_roundtrip_bound_holds(x, group):
    q = km.quantize(x, "int4", grouping="channel", group_size=group)
    err = np.abs(km.dequantize(q).astype(np.float64) - x)
    bound = int4_channel_bound(x.astype(np.float64), group) * (1 + RTOL["int4"])
    assert np.all(err <= bound + 1e-6 * np.abs(x) + quant.TINY)


# ---------------------------------------------------------------------------------
# Bad input: a clear kvmmap error, never a crash


@pytest.mark.parametrize("fmt", km.FORMATS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_is_refused(fmt, bad):
    x = data((4, 64))
    x[2, 17] = bad
    with pytest.raises(km.NonFiniteError, match="non-finite"):
        km.quantize(x, fmt)


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_overflow_is_refused(fmt):
    x = np.full((2, 8), 65520 if fmt == "fp16" else 3.3962e38, np.float32)
    with pytest.raises(km.NonFiniteError, match="range"):
        km.quantize(x, fmt)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8_e4m3", "fp8_e5m2"])
def test_tiny_rows_flush_to_zero_without_nan(fmt):
    x = np.zeros((3, 64), np.float32)
    x[0, :7] = 1e-40          # below TINY: flushed
    x[1, :7] = 1e-29          # above TINY: quantized normally
    x[1, 8] = -3e-29
    x[2] = np.linspace(-1, 1, 64)
    out = km.dequantize(km.quantize(x, fmt))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0], 0)
    for r in (1, 2):  # within the coarsest format's step: int4's range / 15 / 2
        span = x[r].max() - x[r].min()
        assert np.all(np.abs(out[r] - x[r]) <= span / 30 * 1.001)


def test_int4_refuses_values_whose_range_overflows():
    x = np.array([[3e38, -3e38]], np.float32)
    with pytest.raises(km.NonFiniteError, match="int4"):
        km.quantize(x, "int4")
    with pytest.raises(km.NonFiniteError, match="int4"):
        km.quantize(np.array([[3e38, 0], [-3e38, 0]], np.float32), "int4", grouping="channel", group_size=2)


def test_fp16_largest_finite_is_kept():
    x = np.array([[65504.0, 65519.0, -65519.0, 1.0]], np.float32)   # 65519 rounds down to 65504
    np.testing.assert_array_equal(km.dequantize(km.quantize(x, "fp16")), [[65504, 65504, -65504, 1]])


@pytest.mark.parametrize(
    "x, fmt, kwargs, err, match",
    [
        (np.zeros((3, 0), np.float32), "int8", {}, km.ShapeError, "head_dim"),
        (np.float32(1.0), "int8", {}, km.ShapeError, "scalar"),
        (np.zeros((3, 8), np.float64), "int8", {}, km.DTypeError, "float64"),
        (np.zeros((3, 8), np.int32), "fp16", {}, km.DTypeError, "int32"),
        (np.zeros((3, 8), np.float32), "int3", {}, km.FormatError, "int3"),
        (np.zeros((3, 7), np.float32), "int4", {}, km.ShapeError, "even head_dim"),
        (np.zeros((3, 8), np.float32), "int8", {"grouping": "channel"}, km.FormatError, "only available for int4"),
        (np.zeros((3, 8), np.float32), "int4", {"grouping": "rows"}, km.FormatError, "grouping"),
        (np.zeros((3, 64), np.float32), "int4", {"group_size": 24}, km.FormatError, "group_size"),
        (np.zeros((64,), np.float32), "int4", {"grouping": "channel"}, km.ShapeError, "token axis"),
    ],
)
def test_bad_input_is_refused_clearly(x, fmt, kwargs, err, match):
    with pytest.raises(err, match=match) as info:
        km.quantize(x, fmt, **kwargs)
    assert isinstance(info.value, km.KVMmapError) and isinstance(info.value, ValueError)


def test_quantize_into_refuses_mismatches_and_leaves_destination():
    x = data((4, 64))
    dest = km.quantize(x, "int8")
    snapshot = dest.codes.copy()
    with pytest.raises(km.ShapeError):
        km.quantize_into(data((5, 64)), dest)
    with pytest.raises(km.DTypeError):
        km.quantize_into(x.astype(np.float16), dest)
    wrong = km.QTensor(dest.codes.astype(np.int16), dest.scales, None, "int8", dest.shape)
    with pytest.raises(km.DTypeError, match="int8"):
        km.quantize_into(x, wrong)
    strided = km.QTensor(np.zeros((4, 128), np.int8)[:, ::2], dest.scales, None, "int8", dest.shape)
    with pytest.raises(km.LayoutError, match="contiguous"):
        km.quantize_into(x, strided)
    np.testing.assert_array_equal(dest.codes, snapshot)


def test_dequantize_refuses_inconsistent_qtensor():
    q = km.quantize(data((4, 64)), "int8")
    with pytest.raises(km.ShapeError, match="scales"):
        km.dequantize(km.QTensor(q.codes, q.scales[:2], None, "int8", q.shape))
    with pytest.raises(km.DTypeError):
        km.dequantize(q.codes)


def test_thread_setting_is_validated():
    with pytest.raises(km.ConfigError):
        km.set_num_threads(0)
