"""PagedKVCache against a plain reference: the tokens appended, quantized page by page."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import kvmmap as km

H, D, P, L = 4, 64, 16, 2
CHUNKS = [1, 7, 16, 33, 2, 15, 1, 31]       # crosses page boundaries every way; 106 tokens


def tokens(n, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, H, D), dtype=np.float32)


def expected(x, fmt, side, first=0):
    """What the cache must return for tokens x appended from position ``first`` of a page grid.

    Full pages are quantized as a whole; a partly filled last page per token, except
    int4 keys, kept as float16 until their page fills (KIVI's residual group).
    The per-format kernels are checked against plain numpy in test_quant.py.
    """
    n_pos = first + len(x)
    full = n_pos // P * P
    padded = np.concatenate([np.zeros((first, H, D), np.float32), x])
    out = padded.copy()
    xt = padded.transpose(1, 0, 2)
    for p0 in range(0, n_pos, P):
        p1 = min(p0 + P, n_pos)
        chunk = np.ascontiguousarray(xt[:, p0:p1])
        if fmt == "int4" and side == "k" and p1 > full:
            out[p0:p1] = padded[p0:p1].astype(np.float16)     # residual rows: float16
            continue
        if fmt == "int4" and side == "k":        # from the float16 rounding (see above)
            q = km.quantize(chunk.astype(np.float16).astype(np.float32), "int4", grouping="channel", group_size=P)
        else:
            q = km.quantize(chunk, fmt)
        out[p0:p1] = km.dequantize(q).transpose(1, 0, 2)
    return out[first:]


def fill(c, seq, k, v, chunks=CHUNKS):
    for layer in range(c.num_layers):
        i = 0
        for n in chunks:
            c.append(seq, layer, k[i:i + n], v[i:i + n])
            i += n


@pytest.fixture(params=[
    ("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("int8", "int8"),
    ("int4", "int4"), ("fp8_e4m3", "fp8_e5m2"), ("int4", "fp16"), ("int8", "int4"),
])
def fmts(request):
    return request.param


def read_all(c, s):
    return [c.read(s, layer) for layer in range(c.num_layers)]


def test_roundtrip_through_a_new_process(tmp_path, fmts):
    kf, vf = fmts
    path = tmp_path / "c.kvm"
    n = sum(CHUNKS)
    k, v = tokens(n, 1), tokens(n, 2) * 3
    c = km.PagedKVCache.create(path, num_layers=L, num_kv_heads=H, head_dim=D, page_size=P,
                               k_format=kf, v_format=vf, fingerprint="test-model")
    s = c.new_sequence("prompt")
    fill(c, s, k, v)
    for layer in range(L):
        rk, rv = c.read(s, layer)
        np.testing.assert_array_equal(rk, expected(k, kf, "k"))
        np.testing.assert_array_equal(rv, expected(v, vf, "v"))
    np.testing.assert_array_equal(c.read(s, 1, 5, 40)[0], expected(k, kf, "k")[5:40])
    c.flush()
    c.close()
    script = textwrap.dedent(f"""
        import numpy as np, kvmmap as km
        c = km.PagedKVCache.open({str(path)!r}, mode="r")
        s = c.find_sequence("prompt")
        assert c.fingerprint == b"test-model", c.fingerprint
        out = {{}}
        for layer in range(c.num_layers):
            out[f"k{{layer}}"], out[f"v{{layer}}"] = c.read(s, layer)
        np.savez({str(tmp_path / "out.npz")!r}, **out)
        assert c.verify() == []
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    got = np.load(tmp_path / "out.npz")
    for layer in range(L):
        np.testing.assert_array_equal(got[f"k{layer}"], expected(k, kf, "k"))
        np.testing.assert_array_equal(got[f"v{layer}"], expected(v, vf, "v"))


def test_layers_are_independent_and_anonymous_cache_works():
    c = km.PagedKVCache.create(None, num_layers=3, num_kv_heads=H, head_dim=D, k_format="int8", v_format="fp16")
    s = c.new_sequence()
    k = tokens(40, 3)
    c.append(s, 0, k, k)
    c.append(s, 2, k[:5], k[:5])
    assert [c.seq_len(s, layer) for layer in range(3)] == [40, 0, 5]
    assert c.seq_len(s) == 0
    np.testing.assert_array_equal(c.read(s, 2)[1], expected(k[:5], "fp16", "v"))
    c.flush()


def test_fork_shares_pages_and_isolates_writes():
    c = km.PagedKVCache.create(None, num_layers=1, num_kv_heads=H, head_dim=D, k_format="int8", v_format="int8")
    s = c.new_sequence()
    base = tokens(40, 4)
    c.append(s, 0, base, base)
    f = c.fork(s)
    np.testing.assert_array_equal(c.block_table(f), c.block_table(s))
    a, b = tokens(20, 5), tokens(20, 6)
    c.append(s, 0, a, a)
    c.append(f, 0, b, b)
    np.testing.assert_array_equal(c.read(s, 0)[0], expected(np.concatenate([base, a]), "int8", "k"))
    np.testing.assert_array_equal(c.read(f, 0)[0], expected(np.concatenate([base, b]), "int8", "k"))
    bs, bf = c.block_table(s), c.block_table(f)
    np.testing.assert_array_equal(bs[:2], bf[:2])     # full pages stay shared
    assert not set(bs[2:].tolist()) & set(bf[2:].tolist())    # the shared partly filled page was copied
    # copy-on-write: truncating the fork into a shared page leaves the parent intact
    c.truncate(f, 21)
    np.testing.assert_array_equal(c.read(f, 0)[0], expected(base, "int8", "k")[:21])
    np.testing.assert_array_equal(c.read(s, 0)[0], expected(np.concatenate([base, a]), "int8", "k"))
    c.append(f, 0, b[:3], b[:3])
    np.testing.assert_array_equal(c.read(f, 0)[0][21:], expected(b[:3], "int8", "k", first=21 % P)[:3])
    c.free(f)
    c.flush()
    assert c.stats()["pages_used"] == len(c.block_table(s))


@pytest.mark.parametrize("fmt", ["fp32", "int4", "int8"])
def test_truncate_and_shift_left_match_slicing(fmt):
    c = km.PagedKVCache.create(None, num_layers=1, num_kv_heads=H, head_dim=D, page_size=P, k_format=fmt,
                               v_format=fmt)
    s = c.new_sequence()
    x = tokens(70, 7)
    c.append(s, 0, x, x)
    ref = expected(x, fmt, "k")
    c.truncate(s, 50)
    np.testing.assert_array_equal(c.read(s, 0)[0][:48], ref[:48])
    if fmt != "int4":   # int4 keys of the kept part of a page become float16 residual rows again
        np.testing.assert_array_equal(c.read(s, 0)[0], ref[:50])
    c.shift_left(s, 20)
    assert c.seq_len(s) == 30
    np.testing.assert_array_equal(c.read(s, 0)[0][:28], ref[20:48])
    assert len(c.block_table(s)) == -(-(20 % P + 30) // P)
    c.shift_left(s, 100)
    assert c.seq_len(s) == 0


def test_names_and_sequence_errors(tmp_path):
    c = km.PagedKVCache.create(tmp_path / "n.kvm", num_layers=1, num_kv_heads=H, head_dim=D)
    a = c.new_sequence("alpha")
    c.new_sequence()
    assert c.find_sequence("alpha") == a
    with pytest.raises(km.SequenceError, match="exists"):
        c.new_sequence("alpha")
    with pytest.raises(km.SequenceError, match="no sequence is named"):
        c.find_sequence("beta")
    with pytest.raises(km.SequenceError, match="unknown sequence id 99"):
        c.read(99, 0)
    c.free(a)
    c.flush()
    c.close()
    c = km.PagedKVCache.open(tmp_path / "n.kvm")
    assert list(c.sequences().values()) == [None]


def test_bad_input_is_refused_and_changes_nothing(tmp_path):
    c = km.PagedKVCache.create(tmp_path / "b.kvm", num_layers=2, num_kv_heads=H, head_dim=D, k_format="fp16")
    s = c.new_sequence()
    x = tokens(20, 8)
    c.append(s, 0, x, x)
    before = c.read(s, 0)
    bad_nan = x.copy()
    bad_nan[3, 1, 2] = np.nan
    cases = [
        ((s, 0, x[:, :2], x[:, :2]), km.ShapeError, r"\[tokens, 4, 64\]"),
        ((s, 0, x.astype(np.int32), x), km.DTypeError, "int32"),
        ((s, 2, x, x), km.ShapeError, "layer"),
        ((7, 0, x, x), km.SequenceError, "unknown sequence"),
        ((s, 0, x, x[:3]), km.ShapeError, "same number"),
        ((s, 0, bad_nan, x), km.NonFiniteError, "non-finite"),
        ((s, 0, x * 1e5, x), km.NonFiniteError, "fp16"),
    ]
    for args, err, match in cases:
        with pytest.raises(err, match=match):
            c.append(*args)
        assert c.seq_len(s, 0) == 20
        np.testing.assert_array_equal(c.read(s, 0)[0], before[0])
    with pytest.raises(km.ShapeError):
        c.read(s, 0, 5, 30)
    c.flush()
    c.close()
    r = km.PagedKVCache.open(tmp_path / "b.kvm", mode="r")
    with pytest.raises(km.ReadOnlyError):
        r.append(0, 0, x, x)
    with pytest.raises(km.ReadOnlyError):
        r.new_sequence()
    np.testing.assert_array_equal(r.read(s, 0)[0], before[0])


@pytest.mark.parametrize("kf,vf", [("fp16", "int8"), ("int8", "int4"), ("int4", "fp8_e5m2"), ("bf16", "fp16")])
def test_refused_decode_steps_change_nothing(kf, vf):
    """Appends that stay inside the open tail (decode steps) refuse bad input on either side
    with nothing visible changed, and the next good step lands where it should."""
    c = km.PagedKVCache.create(None, num_layers=1, num_kv_heads=H, head_dim=D, k_format=kf, v_format=vf)
    s = c.new_sequence()
    x = tokens(21, 3)
    c.append(s, 0, x[:19], x[:19])                       # one sealed page and 3 tail tokens
    before = c.read(s, 0)
    step = x[19:20]
    cases = [(step * np.nan, step, True), (step, step * np.inf, True),
             # 1e38 overflows fp16, and the float16 scales of the scaled formats; not fp32 or bf16
             (step * 1e38, step, kf not in ("fp32", "bf16")), (step, step * 1e38, vf not in ("fp32", "bf16"))]
    for bad_k, bad_v, refused in cases:
        if refused:
            with pytest.raises(km.NonFiniteError):
                c.append(s, 0, bad_k, bad_v)
        else:
            c.append(s, 0, bad_k, bad_v)
            c.truncate(s, 19)
        assert c.seq_len(s, 0) == 19
        for got, want in zip(c.read(s, 0), before):
            np.testing.assert_array_equal(got, want)
    c.append(s, 0, x[19:21], x[19:21])
    k, v = c.read(s, 0)
    ref = km.PagedKVCache.create(None, num_layers=1, num_kv_heads=H, head_dim=D, k_format=kf, v_format=vf)
    r = ref.new_sequence()
    ref.append(r, 0, x, x)
    for got, want in zip((k, v), ref.read(r, 0)):
        np.testing.assert_array_equal(got, want)


def test_damaged_or_foreign_files_are_refused(tmp_path):
    path = tmp_path / "d.kvm"
    c = km.PagedKVCache.create(path, num_layers=1, num_kv_heads=H, head_dim=D)
    s = c.new_sequence()
    c.append(s, 0, tokens(40, 9), tokens(40, 10))
    c.flush()
    c.close()
    raw = path.read_bytes()

    def opened_with(data, match):
        bad = tmp_path / "bad.kvm"
        bad.write_bytes(data)
        with pytest.raises(km.CacheFileError, match=match):
            km.PagedKVCache.open(bad)

    opened_with(b"hello" * 100, "not a kvmmap cache")
    opened_with(raw[:100], "shorter than")
    flipped = bytearray(raw)
    flipped[20] ^= 0x40                     # num_kv_heads
    opened_with(bytes(flipped), "checksum")
    v3 = bytearray(raw)
    v3[8:10] = (3).to_bytes(2, "little")    # major version 3
    opened_with(bytes(v3), "version 3.0 is not supported")
    # a damaged newest root falls back to the previous commit; both damaged: refused
    both = bytearray(raw)
    for slot in (0, 1):
        both[4096 + slot * 4096 + 20] ^= 0xFF
    opened_with(bytes(both), "neither commit root")
    arena = 3 * 4096
    opened_with(raw[: arena + 100], "truncated file")
    page = bytearray(raw)
    page[arena + 5] ^= 0x01                 # a data page
    (tmp_path / "page.kvm").write_bytes(bytes(page))
    assert km.PagedKVCache.open(tmp_path / "page.kvm").verify() == [0]


def test_second_writer_is_refused(tmp_path):
    path = tmp_path / "w.kvm"
    c = km.PagedKVCache.create(path, num_layers=1, num_kv_heads=H, head_dim=D)
    code = f"import kvmmap as km; km.PagedKVCache.open({str(path)!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "writer lock" in r.stderr
    reader = f"import kvmmap as km; print(km.PagedKVCache.open({str(path)!r}, mode='r').num_layers)"
    r = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr
    c.close()



def test_create_enforces_the_format_limits_and_refuses_bad_settings(tmp_path):
    """create() refuses what open() would refuse or what cannot be stored, with a kvmmap
    error, before any file exists."""
    path = tmp_path / "x.kvm"
    geo = dict(num_layers=1, num_kv_heads=1, head_dim=8, page_size=4)
    cases = [
        (dict(num_layers=65537), km.ShapeError, r"num_layers must be an integer in 1\.\.65536"),
        (dict(num_kv_heads=4097), km.ShapeError, r"num_kv_heads must be an integer in 1\.\.4096"),
        (dict(head_dim=16386), km.ShapeError, r"head_dim must be an integer in 1\.\.16384"),
        (dict(page_size=65537), km.ShapeError, r"page_size must be an integer in 1\.\.65536"),
        (dict(page_size=2.0), km.ShapeError, "page_size"),
        (dict(page_size=65536, k_format="int4"), km.ShapeError, "at most 65535"),
        (dict(max_bytes="4096"), km.ShapeError, "max_bytes"),
        (dict(max_bytes=1 << 63), km.ShapeError, "max_bytes"),
        (dict(max_bytes=10), km.ShapeError, "one page"),
        (dict(v_group_size=4), km.ConfigError, "v_group_size applies to int4 values only; v_format is int8"),
        (dict(v_format="int4", v_group_size="4"), km.ConfigError, "v_group_size must be an integer"),
        (dict(fingerprint=123), km.ConfigError, "fingerprint must be bytes or str"),
    ]
    for kw, err, match in cases:
        with pytest.raises(err, match=match):
            km.PagedKVCache.create(path, **{**geo, **kw})
        assert not path.exists()
    with pytest.raises(km.ConfigError, match="mode must be 'r' or 'r\\+', found 'w'"):
        km.PagedKVCache.open(path, mode="w")
    for mode in ("r", "r+"):
        with pytest.raises(km.CacheFileError, match="cannot open"):
            km.PagedKVCache.open(tmp_path, mode=mode)
    # the largest values fit and reopen
    for kw in (dict(page_size=65535, k_format="int4"), dict(page_size=65536, num_layers=65536),
               dict(num_kv_heads=4096), dict(head_dim=16384)):
        km.PagedKVCache.create(path, **{**geo, **kw}, overwrite=True).close()
        with km.PagedKVCache.open(path, mode="r") as c:
            assert {k: getattr(c, k) for k in geo} == {**geo, **{k: v for k, v in kw.items() if k in geo}}


def test_a_closed_cache_refuses_every_call(tmp_path):
    c = km.PagedKVCache.create(tmp_path / "c.kvm", num_layers=1, num_kv_heads=H, head_dim=D, page_size=P)
    s = c.new_sequence("a")
    x = tokens(20, 3)
    c.append(s, 0, x, x)
    c.flush()
    c.close()
    for call in (lambda: c.sequences(), lambda: c.seq_len(s), lambda: c.seq_len(s, 0),
                 lambda: c.block_table(s), lambda: c.slot_mapping(s, 0, 0, 4), lambda: c.stats(),
                 lambda: c.read(s, 0), lambda: c.find_sequence("a"), lambda: c.flush(), lambda: c.verify()):
        with pytest.raises(km.CacheFileError, match="the cache is closed"):
            call()


def test_slot_mapping_matches_the_block_table_and_refuses_out_of_range_tokens():
    c = km.PagedKVCache.create(None, num_layers=1, num_kv_heads=H, head_dim=D, page_size=P)
    s = c.new_sequence()
    x = tokens(40, 4)
    c.append(s, 0, x, x)
    c.shift_left(s, 3)                                        # 37 visible tokens from position 3
    bt = c.block_table(s).astype(np.int64)
    pos = 3 + np.arange(37)
    want = np.where(pos // P < len(bt), bt[np.minimum(pos // P, len(bt) - 1)] * P + pos % P, -1)
    np.testing.assert_array_equal(c.slot_mapping(s, 0, 0, 37), want)
    np.testing.assert_array_equal(c.slot_mapping(s, 0, 30, 7), want[30:])
    assert c.slot_mapping(s, 0, 37, 0).shape == (0,)
    for start, n in ((-1, 3), (-100, 3), (0, -1), (30, 8), (2.5, 1), ("a", 1)):
        with pytest.raises(km.ShapeError, match="start"):
            c.slot_mapping(s, 0, start, n)


def test_hundreds_of_open_sequences_commit_and_reopen(tmp_path):
    """Format 1 kept every open page in a fixed-size metadata slot: 256 sequences of 20
    tokens x 8 layers x 8 heads x 128 broke flush(). Format 2 has no such limit."""
    path = tmp_path / "many.kvm"
    c = km.PagedKVCache.create(path, num_layers=8, num_kv_heads=8, head_dim=128, k_format="int8", v_format="int8")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 20, 8, 128)).astype(np.float32)
    seqs = [c.new_sequence(f"s{i}") for i in range(300)]
    for i, s in enumerate(seqs):
        for layer in range(8):
            c.append(s, layer, x[i], -x[i])
    c.flush()
    c.append(seqs[7], 3, x[0, :1], x[0, :1])       # one decode step, then a commit
    c.flush()
    c.close()
    with km.PagedKVCache.open(path, mode="r") as r:
        assert sorted(r.sequences()) == seqs and r.verify() == []
        for i in (0, 7, 299):
            k, v = r.read(seqs[i], 5)
            np.testing.assert_allclose(k, x[i], atol=np.abs(x[i]).max() / 127 * 0.51)
            np.testing.assert_allclose(v, -x[i], atol=np.abs(x[i]).max() / 127 * 0.51)
        assert r.seq_len(seqs[7], 3) == 21
