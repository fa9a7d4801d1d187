"""The format registry (kvmmap/formats.py) and the copies of its facts in the kernels."""

from __future__ import annotations

import numpy as np
import pytest

import kvmmap as km
from kvmmap import formats
from kvmmap.codecs import _quant, quant


def test_kernel_format_ids_match_the_registry():
    # codecs/_rows.pxd's FMT_* enum is the one copy of the ids the Cython kernels use
    assert _quant.FORMAT_IDS == {f.upper(): km.get_format(f).format_id for f in km.FORMATS}


def test_ids_are_dense_and_round_trip():
    assert [km.get_format(f).format_id for f in km.FORMATS] == list(range(len(km.FORMATS)))
    for f in km.FORMATS:
        assert formats.format_by_id(km.get_format(f).format_id).name == f


def test_kernel_group_limit_matches_the_registry():
    assert _quant.MAX_GROUP == formats.MAX_TOKEN_GROUP


@pytest.mark.parametrize("fmt", km.FORMATS)
def test_overflow_limit_is_storable_and_the_kernel_limit_refuses_past_it(fmt):
    f = km.get_format(fmt)
    refused = np.array([_quant.refused_abs_bits(f.format_id)], np.uint32).view(np.float32)[0]
    if f.overflow_limit is None:
        assert refused == np.inf
        return
    limit = np.float32(f.overflow_limit)
    assert limit < refused
    quant.check_storable(np.array([[limit, -limit]], np.float32), fmt)
    with pytest.raises(km.NonFiniteError, match=f.overflow_limit):
        quant.check_storable(np.array([[refused]], np.float32), fmt)


@pytest.mark.parametrize("fmt", km.FORMATS)
@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 96), (3, 1, 2)])
def test_code_and_side_shapes_are_what_quantize_makes(fmt, shape):
    f = km.get_format(fmt)
    for grouping in f.groupings:
        g, size = f.resolve_grouping(shape, grouping)
        q = km.quantize(np.ones(shape, np.float32), fmt, grouping=grouping)
        assert (q.grouping, q.group_size) == (g, size)
        assert q.codes.shape == f.code_shape(shape) and q.codes.dtype == f.code_dtype
        side = f.side_shape(shape, g, size)
        assert (q.scales is None) == (side is None) and (q.zeros is None) == (not f.zero_point)
        if side is not None:
            assert q.scales.shape == side


def test_default_group_sizes():
    int4 = km.get_format("int4")
    assert int4.default_group_size(128) == formats.DEFAULT_TOKEN_GROUP == 64
    assert int4.default_group_size(64) == 64
    # 64 does not divide it: the largest even divisor below 64
    assert [int4.default_group_size(d) for d in (96, 40, 32, 80, 20, 2, 130, 192)] == [48, 40, 32, 40, 20, 2, 26, 64]
    assert int4.default_group_size(128, "channel") == formats.DEFAULT_CHANNEL_GROUP
    assert km.get_format("int8").default_group_size(128) == 0
    with pytest.raises(km.ShapeError, match="even head_dim"):
        int4.default_group_size(33)


@pytest.mark.parametrize("head_dim", range(2, 300, 2))
def test_default_group_is_the_largest_even_divisor_up_to_64(head_dim):
    g = km.get_format("int4").default_group_size(head_dim)
    want = max(d for d in range(2, 65, 2) if head_dim % d == 0)
    assert g == want
    km.get_format("int4").resolve_grouping((1, head_dim), "token", None)     # and it is accepted


@pytest.mark.parametrize("fmt", km.FORMATS)
def test_value_tables(fmt):
    f = km.get_format(fmt)
    if f.value_table:
        assert quant.fp8_values(fmt).shape == (256,)
    else:
        with pytest.raises(km.FormatError, match="value table"):
            quant.fp8_values(fmt)
