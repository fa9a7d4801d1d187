"""The OpenCL runtime: incremental page upload, sharded pools, device choice (PoCL in CI)."""

import numpy as np
import pytest

import kvmmap as km
from helpers import assert_close, attention_reference as reference

pytestmark = pytest.mark.opencl


def filled(tmp_path, rng, n, H=2, D=64, kf="int8", vf="int8"):
    """A cache file (the reference decodes its bytes) with one sequence of n tokens."""
    c = km.PagedKVCache.create(tmp_path / f"c{n}{kf}.kvm", num_layers=1, num_kv_heads=H, head_dim=D, k_format=kf, v_format=vf)
    s = c.new_sequence()
    x = rng.standard_normal((n, H, D), dtype=np.float32)
    c.append(s, 0, x, x)
    return c, s


def test_only_new_pages_are_uploaded(tmp_path, opencl):
    rng = np.random.default_rng(0)
    c, s = filled(tmp_path, rng, 160)                         # 10 sealed pages
    q = rng.standard_normal((1, 2, 64), dtype=np.float32)
    pb = c._sb.page_bytes
    km.paged_decode_attention(c, 0, [s], q, backend="opencl")
    pool = opencl.device_pool(c)
    assert pool.bytes_uploaded == 10 * pb
    km.paged_decode_attention(c, 0, [s], q, backend="opencl")
    assert pool.bytes_uploaded == 10 * pb           # nothing new: nothing sent
    for step in range(40):                          # decode steps: one token at a time
        x = rng.standard_normal((1, 2, 64), dtype=np.float32)
        c.append(s, 0, x, x)
        got = km.paged_decode_attention(c, 0, [s], q, backend="opencl")
    assert pool.bytes_uploaded == 12 * pb           # the two pages sealed meanwhile
    assert_close(got, reference(c, 0, [s], q))


def test_sharded_pool_matches_reference(tmp_path, opencl, monkeypatch):
    """A pool split over several device buffers (forced small) reads the same data."""
    rng = np.random.default_rng(1)
    c, s = filled(tmp_path, rng, 50 * 16 + 5, kf="fp16", vf="fp16")
    monkeypatch.setenv("KVMMAP_OPENCL_SHARD_BYTES", str(12 * c._sb.page_bytes + 100))
    t = c.fork(s)
    x = rng.standard_normal((300, 2, 64), dtype=np.float32)
    c.append(t, 0, x, x)
    q = rng.standard_normal((2, 8, 64), dtype=np.float32)
    got = km.paged_decode_attention(c, 0, [s, t], q, backend="opencl")
    pool = opencl.device_pool(c)
    assert len(pool.shards) > 3
    assert_close(got, reference(c, 0, [s, t], q))


def test_too_many_shards_is_a_clear_error(tmp_path, opencl, monkeypatch):
    monkeypatch.setenv("KVMMAP_OPENCL_SHARD_BYTES", "1")      # one page per buffer
    rng = np.random.default_rng(2)
    c, s = filled(tmp_path, rng, 16 * (opencl.MAX_SHARDS + 1))
    with pytest.raises(km.errors.OpenCLUnavailableError, match="device buffers"):
        km.paged_decode_attention(c, 0, [s], np.ones((1, 2, 64), np.float32), backend="opencl")


def test_device_choice_names_unknown_devices(opencl, monkeypatch):
    monkeypatch.setenv("KVMMAP_OPENCL_DEVICE", "no-such-device-anywhere")
    opencl._pick_device.cache_clear()
    try:
        with pytest.raises(km.errors.OpenCLUnavailableError, match="matches none of"):
            opencl._pick_device()
    finally:
        monkeypatch.undo()
        opencl._pick_device.cache_clear()
    assert opencl.available()


def test_kernel_build_error_names_the_source(opencl):
    with pytest.raises(km.errors.KernelBuildError, match="paged_attention.cl"):
        opencl.program("paged_attention.cl", ("-DK_FORMAT=99", "-DV_FORMAT=0", "-DPAGE_SIZE=16",
                                              "-DNUM_KV_HEADS=1", "-DGQA=1", "-DPAGE_BYTES=1"))


def test_growing_pool_is_copied_on_the_device_not_uploaded_again(tmp_path, opencl):
    """Past a shard's first allocation (64 pages) the device buffer grows by a device-side
    copy: every page is still sent exactly once, and the results stay right."""
    rng = np.random.default_rng(4)
    c, s = filled(tmp_path, rng, 40 * 16)
    q = rng.standard_normal((1, 2, 64), dtype=np.float32)
    km.paged_decode_attention(c, 0, [s], q, backend="opencl")
    pool = opencl.device_pool(c)
    first = pool.shards[0][1]
    x = rng.standard_normal((100 * 16, 2, 64), dtype=np.float32)
    c.append(s, 0, x, x)
    got = km.paged_decode_attention(c, 0, [s], q, backend="opencl")
    assert pool.shards[0][1] > first
    assert pool.bytes_uploaded == 140 * c._sb.page_bytes
    assert_close(got, reference(c, 0, [s], q))
