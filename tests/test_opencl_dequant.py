"""Every code of every format decodes to the same float32 on the CPU (kvmmap.dequantize),
on OpenCL (kernels_cl/dequant.cl, through kvmmap_formats.h: the decoders paged_attention.cl
uses) and in the numpy reference of tests/reference.py. OpenCL runs on PoCL without a GPU.
"""

import re
from pathlib import Path

import numpy as np
import pytest

import kvmmap as km
from kvmmap.formats import get_format
from kvmmap.codecs.quant import QTensor
from reference import dequantize as reference_dequantize
from reference import fp8_decode_table

KERNELS = Path(__file__).resolve().parent.parent / "kernels_cl"
# Scales a float32 product rounds (3.1, 1e-30), exact ones, 0 (a flushed row: 0 * inf is NaN).
SCALES = np.array([1.0, 3.1, 0.5, 1e-30, 0.0], np.float32)


def all_codes(fmt):
    """QTensor whose codes are every code of the format (fp32: 65536 bit patterns incl. the
    specials), one row per scale of SCALES for the scaled formats."""
    f = get_format(fmt)
    if fmt in ("fp16", "bf16"):
        codes = np.arange(1 << 16, dtype=np.uint16).reshape(256, 256)
        codes = codes.view(np.float16) if fmt == "fp16" else codes
    elif fmt == "fp32":
        bits = np.arange(1 << 16, dtype=np.uint32) * np.uint32(65537)        # every high and low half
        bits[:4] = [0x7F800000, 0xFF800000, 0x7FC00001, 0x00000001]          # inf, -inf, NaN, denormal
        codes = bits.view(np.float32).reshape(256, 256)
    else:
        codes = np.tile(np.arange(256, dtype=np.uint8), (len(SCALES), 1)).view(f.code_dtype)
    scales = SCALES.copy() if f.scaled else None
    return QTensor(codes, scales, None, fmt, codes.shape)


def all_nibbles(grouping):
    """int4 QTensor in which every byte value (so every nibble, in both positions) meets every
    group, with scales and zeros whose products and sums are exact in float32 (then fusing
    code * scale + zero into one rounding, as gcc and OpenCL may, changes nothing)."""
    rng = np.random.default_rng(4)
    if grouping == "token":
        A, T, D, G = 1, 3, 512, 32
        side = (A, T, D // G)
    else:
        A, T, D, G = 2, 7, 512, 3
        side = (A, -(-T // G), D)
    codes = np.stack([np.roll(np.arange(256, dtype=np.uint8), 17 * i) for i in range(A * T)]).reshape(A, T, D // 2)
    scales = (rng.integers(1, 64, side) / 16).astype(np.float32)
    zeros = (rng.integers(-512, 512, side) / 8).astype(np.float32)
    return QTensor(codes, scales, zeros, "int4", (A, T, D), grouping, G)


def assert_same_values(got, want, what):
    """Equal bit for bit, except that any NaN matches any NaN."""
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape, what
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{what}: NaN at other codes")
    bad = np.flatnonzero((got.view(np.uint32) != want.view(np.uint32)) & ~nan)
    assert not len(bad), f"{what}: {len(bad)} codes differ, first at {bad[0]}: {got.flat[bad[0]]} != {want.flat[bad[0]]}"


def reference_of(q):
    codes = q.codes.view(np.uint16) if q.format == "fp16" else q.codes
    return reference_dequantize(q.format, codes, q.scales, q.zeros, q.grouping, q.group_size)


CASES = [(fmt, "token") for fmt in km.FORMATS if fmt != "int4"] + [("int4", "token"), ("int4", "channel")]


def make(fmt, grouping):
    return all_nibbles(grouping) if fmt == "int4" else all_codes(fmt)


@pytest.mark.parametrize("fmt,grouping", CASES)
def test_cpu_decodes_every_code_as_the_reference(fmt, grouping):
    q = make(fmt, grouping)
    assert_same_values(km.dequantize(q), reference_of(q), f"CPU {fmt}")


@pytest.mark.opencl
@pytest.mark.parametrize("fmt,grouping", CASES)
def test_opencl_decodes_every_code_as_the_cpu(opencl, fmt, grouping):
    q = make(fmt, grouping)
    assert_same_values(opencl.dequantize_rows(q), km.dequantize(q), f"OpenCL {fmt}")


def test_reference_fp8_specials_follow_ocp():
    """OCP FP8: e4m3 has no infinity and NaN only at 0x7F / 0xFF (so 448 is its largest
    value); e5m2 is IEEE-like (0x7C infinity, 0x7D..0x7F NaN)."""
    e4 = fp8_decode_table("fp8_e4m3")
    assert np.flatnonzero(np.isnan(e4)).tolist() == [0x7F, 0xFF] and not np.isinf(e4).any()
    assert e4[0x7E] == 448 and e4[0x08] == 2.0**-6 and e4[0x01] == 2.0**-9
    e5 = fp8_decode_table("fp8_e5m2")
    assert np.flatnonzero(np.isnan(e5)).tolist() == [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF]
    assert e5[0x7C] == np.inf and e5[0xFC] == -np.inf and e5[0x7B] == 57344


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_quantizer_never_writes_nan_or_infinity_codes(fmt):
    """fp8 saturates at the largest finite value, whatever the row: the special codes come
    only from damaged or foreign data."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal((64, 64)) * 10.0 ** rng.integers(-30, 30, (64, 1)),
                        np.full((1, 64), np.finfo(np.float32).max), np.full((1, 64), -1e-30)]).astype(np.float32)
    table = fp8_decode_table(fmt)
    assert np.isfinite(table[km.quantize(x, fmt).codes]).all()


def header_ids() -> dict:
    text = (KERNELS / "kvmmap_formats.h").read_text()
    return {m[1].lower(): int(m[2]) for m in re.finditer(r"#define KVMMAP_(\w+) (\d+)\s*$", text, re.M)
            if m[1] != "NUM_FORMATS"}


def test_header_format_ids_are_the_registry_ids():
    assert header_ids() == {f: get_format(f).format_id for f in km.FORMATS}
    assert f"#define KVMMAP_NUM_FORMATS {len(km.FORMATS)}" in (KERNELS / "kvmmap_formats.h").read_text()


@pytest.mark.parametrize("kernel", ["dequant.cl", "paged_attention.cl"])
def test_kernels_decode_through_the_one_header(kernel):
    """No kernel keeps its own copy of a format's decoding or ids."""
    text = (KERNELS / kernel).read_text()
    assert '#include "kvmmap_formats.h"' in text
    body = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    for copy in ("kvmmap_fp8", "kvmmap_bf16", "as_float", "vload_half", "<< 16", "& 15", ">> 4",
                 "(__global const char *)"):
        assert copy not in body, f"{kernel} decodes by itself ({copy!r}): use kvmmap_formats.h"
    assert not re.search(r"#define KVMMAP_\w+ \d", body), f"{kernel} defines format ids of its own"


@pytest.mark.opencl
@pytest.mark.parametrize("fmt", km.FORMATS)
@pytest.mark.parametrize("shape", [(1, 64), (13, 3, 128), (5, 256), (0, 64)])
def test_opencl_decode_of_quantized_data_matches_cpu(opencl, fmt, shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape, dtype=np.float32) * 3
    for grouping in ("token", "channel") if fmt == "int4" and len(shape) > 2 else ("token",):
        q = km.quantize(x, fmt, grouping=grouping)
        got, want = opencl.dequantize_rows(q), km.dequantize(q)
        if fmt == "int4":    # code * scale + zero: either side may fuse it into one rounding
            tol = 2 * np.finfo(np.float32).eps * (np.abs(want) + np.abs(x).max(initial=0))
            assert np.all(np.abs(got - want) <= tol)
        else:
            np.testing.assert_array_equal(got, want)


@pytest.mark.opencl
def test_opencl_build_error_names_the_log(opencl):
    with pytest.raises(km.errors.KernelBuildError, match="dequant.cl"):
        opencl.program("dequant.cl", ("-DKVMMAP_FORMAT=9",))
