"""Capacity: a sequence's max_tokens, the pool's max_bytes, is_full / remaining_capacity.

An append past a limit raises CapacityError and changes nothing (checked against the
numpy copy of what was appended); the limits are kept in the file.
"""

from __future__ import annotations

import numpy as np
import pytest

import kvmmap as km

H, D, P = 2, 16, 4


def tokens(n, seed):
    return np.random.default_rng(seed).standard_normal((n, H, D), dtype=np.float32)


def test_max_tokens_refuses_and_changes_nothing(tmp_path):
    path = tmp_path / "cap.kvm"
    c = km.PagedKVCache.create(path, num_layers=2, num_kv_heads=H, head_dim=D, page_size=P,
                               k_format="fp32", v_format="fp32")
    s = c.new_sequence("s", max_tokens=10)
    free = c.new_sequence("free")
    assert c.remaining_capacity(s) == 10 and not c.is_full(s)
    assert c.remaining_capacity(free) is None and not c.is_full(free)
    x = tokens(12, 1)
    for layer in range(2):
        c.append(s, layer, x[:7], x[:7])
    assert c.remaining_capacity(s) == 3
    before = c.stats()
    with pytest.raises(km.CapacityError, match="max_tokens=10"):
        c.append(s, 0, x[7:11], x[7:11])
    assert c.stats() == before
    np.testing.assert_array_equal(c.read(s, 0)[0], x[:7])
    c.append(s, 0, x[7:10], x[7:10])                 # exactly up to the limit
    assert c.remaining_capacity(s) == 0 and c.is_full(s)    # layer 0 is full, so the sequence is
    c.flush()
    c.close()
    with km.PagedKVCache.open(path) as r:            # the limit is in the file
        assert r.is_full(s) and r.remaining_capacity(s) == 0
        with pytest.raises(km.CapacityError):
            r.append(s, 0, x[:1], x[:1])
        f = r.fork(s)                                # a fork keeps the limit
        assert r.remaining_capacity(f) == 0


def test_streaming_pattern_with_shift_left():
    """The README's loop: when full, drop the oldest tokens and keep going."""
    c = km.PagedKVCache.create(None, num_layers=1, num_kv_heads=H, head_dim=D, page_size=P,
                               k_format="fp32", v_format="fp32")
    s = c.new_sequence(max_tokens=16)
    x = tokens(100, 2)
    for t in range(100):
        if c.is_full(s):
            c.shift_left(s, 8)
        c.append(s, 0, x[t:t + 1], x[t:t + 1])
    n = c.seq_len(s)
    assert 8 < n <= 16
    np.testing.assert_array_equal(c.read(s, 0)[0], x[100 - n:])


def test_max_bytes_limits_the_pool(tmp_path):
    path = tmp_path / "pool.kvm"
    probe = km.PagedKVCache.create(None, num_layers=1, num_kv_heads=H, head_dim=D, page_size=P,
                                   k_format="fp32", v_format="fp32")
    pb = probe.stats()["page_bytes"]
    c = km.PagedKVCache.create(path, num_layers=1, num_kv_heads=H, head_dim=D, page_size=P,
                               k_format="fp32", v_format="fp32", max_bytes=6 * pb)
    a, b = c.new_sequence("a"), c.new_sequence("b")
    x = tokens(40, 3)
    c.append(a, 0, x[:16], x[:16])                   # 4 pages
    assert c.remaining_capacity(b) == 2 * P
    with pytest.raises(km.CapacityError, match="pool is full"):
        c.append(b, 0, x[:12], x[:12])               # 3 more pages: over 6
    assert c.seq_len(b) == 0
    c.append(b, 0, x[:8], x[:8])                     # 2 more: exactly 6
    assert c.is_full(a) and c.is_full(b)
    c.free(a)
    assert c.remaining_capacity(b) == 4 * P          # a's pages no longer count
    c.append(b, 0, x[8:24], x[8:24])
    np.testing.assert_array_equal(c.read(b, 0)[0], x[:24])
    c.flush()
    c.close()
    with km.PagedKVCache.open(path) as r:
        assert r.superblock.max_bytes == 6 * pb and r.is_full(b)


def test_bad_limits_are_refused():
    c = km.PagedKVCache.create(None, num_layers=1, num_kv_heads=H, head_dim=D, page_size=P)
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(km.ShapeError, match="max_tokens"):
            c.new_sequence(max_tokens=bad)
    assert c.sequences() == {}
