"""Inputs as numpy users expect: float64 and torch tensors of any float dtype are converted.

append() and decode attention take float64 arrays and torch CPU tensors (float32, float16,
bfloat16, float64) and store or use exactly what the same values as float32 give; integer
input, values beyond float32's range, NaN/inf and wrong shapes are refused, changing nothing.
"""

from __future__ import annotations

import numpy as np
import pytest

import kvmmap as km

GEO = dict(num_layers=1, num_kv_heads=2, head_dim=16, page_size=4, k_format="fp32", v_format="fp32")


def tokens(n, seed):
    return np.random.default_rng(seed).standard_normal((n, 2, 16), dtype=np.float32)


def test_float64_is_stored_as_its_float32_values():
    c = km.PagedKVCache.create(None, **GEO)
    s = c.new_sequence()
    x = np.random.default_rng(0).standard_normal((9, 2, 16))          # float64
    c.append(s, 0, x, x)
    np.testing.assert_array_equal(c.read(s, 0)[0], x.astype(np.float32))
    q = np.random.default_rng(1).standard_normal((4, 16))
    np.testing.assert_array_equal(c.decode_attention(s, 0, q), c.decode_attention(s, 0, q.astype(np.float32)))


def test_refused_inputs_change_nothing():
    c = km.PagedKVCache.create(None, **GEO)
    s = c.new_sequence()
    c.append(s, 0, tokens(3, 1), tokens(3, 1))
    before = c.read(s, 0)[0].copy()
    cases = [(np.ones((2, 2, 16), np.int64), km.DTypeError), (np.full((2, 2, 16), 1e300), km.NonFiniteError),
             (np.full((2, 2, 16), np.nan), km.NonFiniteError), (np.ones((2, 2, 15)), km.ShapeError)]
    for x, err in cases:
        with pytest.raises(err):
            c.append(s, 0, x, x)
    assert c.seq_len(s) == 3
    np.testing.assert_array_equal(c.read(s, 0)[0], before)


def test_torch_tensors_of_every_float_dtype():
    torch = pytest.importorskip("torch", reason="needs torch (the [transformers] extra)")
    c = km.PagedKVCache.create(None, **GEO)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        s = c.new_sequence()
        t = torch.from_numpy(tokens(6, 3)).to(dtype)
        c.append(s, 0, t, t)
        np.testing.assert_array_equal(c.read(s, 0)[0], t.float().numpy())
        q = torch.from_numpy(np.random.default_rng(4).standard_normal((2, 16), dtype=np.float32)).to(dtype)
        np.testing.assert_allclose(c.decode_attention(s, 0, q), c.decode_attention(s, 0, q.float().numpy()),
                                   rtol=1e-6)
    with pytest.raises(km.DTypeError):
        c.append(s, 0, torch.ones((2, 2, 16), dtype=torch.int32), torch.ones((2, 2, 16), dtype=torch.int32))


def test_read_into_caller_buffers():
    c = km.PagedKVCache.create(None, **GEO)
    s = c.new_sequence()
    k, v = tokens(11, 5), tokens(11, 6)
    c.append(s, 0, k, v)
    ko, vo = np.full((7, 2, 16), np.nan, np.float32), np.full((7, 2, 16), np.nan, np.float32)
    got = c.read(s, 0, 2, 9, out=(ko, vo))
    assert got[0] is ko and got[1] is vo
    np.testing.assert_array_equal(ko, k[2:9])
    np.testing.assert_array_equal(vo, v[2:9])
    bad = [(np.zeros((6, 2, 16), np.float32), vo), (ko.astype(np.float64), vo), (ko, ko),
           (np.zeros((7, 16, 2), np.float32).transpose(0, 2, 1), vo), ko]
    for out in bad:
        with pytest.raises((km.ShapeError, km.DTypeError)):
            c.read(s, 0, 2, 9, out=out)


def test_pool_views_are_the_stored_pages_without_a_copy(tmp_path):
    c = km.PagedKVCache.create(tmp_path / "v.kvm", num_layers=1, num_kv_heads=2, head_dim=16, page_size=4,
                               k_format="fp32", v_format="int8")
    s = c.new_sequence()
    k, v = tokens(10, 1), tokens(10, 2)
    c.append(s, 0, k, v)
    views = c.pool_views()
    assert set(views["k"]) == {"codes"} and set(views["v"]) == {"codes", "scales"}
    pages = c.block_table(s, 0)
    kc = views["k"]["codes"]
    assert kc.shape == (c.high_water, 2, 4, 16) and kc.dtype == np.float32 and not kc.flags.writeable
    got = np.concatenate([kc[p].transpose(1, 0, 2) for p in pages])[:10]   # [tokens, H, D]
    np.testing.assert_array_equal(got, k)             # every token is in a page, the last one partly filled
    lay = c.paged_layout(0, [s])
    np.testing.assert_array_equal(lay["indices"], pages)
    assert lay["indptr"].tolist() == [0, 3] and lay["last_page_len"].tolist() == [2] and lay["first"].tolist() == [0]
    vc, vs = views["v"]["codes"], views["v"]["scales"]
    assert vc.dtype == np.int8 and vs.shape == (c.high_water, 2, 4)
    v_pages = np.concatenate([(vc[p] * vs[p][..., None].astype(np.float32)).transpose(1, 0, 2) for p in pages])
    np.testing.assert_array_equal(v_pages[:10], c.read(s, 0)[1])
    assert np.shares_memory(kc, c.arena.data)
    c.close()
