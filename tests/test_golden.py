"""The committed golden caches still read, through kvmmap and through an independent
decoder written from docs/FORMAT.md (tests/reference.py).

Format 1.0 files were written once by tests/golden/make_golden.py, format 2.0 files by
tests/golden/make_golden2.py; they pin the on-disk formats: if a change to kvmmap makes
them read differently, this fails. Each test works on a copy, since opening may take a
lock and a writer changes the file.
"""

from __future__ import annotations

import json
import struct
import sys

import crc32c
import numpy as np
import pytest
from reference import (
    FORMAT_IDS,
    page_arrays,
    parse_cache_file,
    parse_cache_file_v1,
    stored_kv,
    stored_kv_v1,
    valid_roots,
)

import kvmmap as km
from helpers import requant_step

from golden_v1 import GOLDEN, MANIFEST, D, G, H, L, P, expected_side, private_copy

sys.path.insert(0, str(GOLDEN))
from make_golden2 import at_commit, expected_values  # noqa: E402


def assert_inner_range_reads(c, sid, layer, n, k, v):
    """read() of a range starting and ending inside pages gives that slice of ``k``, ``v``."""
    a, b = n // 3, n - 1
    ka, va = c.read(sid, layer, a, b)
    np.testing.assert_array_equal(ka, k[a:b])
    np.testing.assert_array_equal(va, v[a:b])


# ------------------------------------------------------------------ independent decoder

def parse_file(raw: bytes, kf, vf):
    """tests/reference.py's reading of FORMAT.md, and what the golden files must hold."""
    parsed = parse_cache_file_v1(raw)
    assert parsed["magic"] == b"\x89KVMMAP\n" and parsed["version"] == (1, 0)
    assert parsed["superblock_bytes"] == 4096 and parsed["flags"] == 0
    assert tuple(parsed[k] for k in ("num_layers", "num_kv_heads", "head_dim", "page_size")) == (L, H, D, P)
    assert (parsed["k_format"], parsed["v_format"]) == (kf, vf)
    assert parsed["k_group"] == (P if kf == "int4" else 0) and parsed["v_group"] == (G if vf == "int4" else 0)
    slot_bytes = parsed["meta_slot_bytes"]
    assert parsed["meta_offset"] == 4096 and slot_bytes == MANIFEST["meta_slot_bytes"]
    assert parsed["arena_offset"] == 4096 + 2 * slot_bytes
    assert parsed["fingerprint"].rstrip(b"\0") == MANIFEST["fingerprint"].encode()
    assert not any(raw[104:4092])
    assert struct.unpack_from("<I", raw, 4092)[0] == crc32c.crc32c(raw[:4092])
    assert parsed["commits"] == 2, "the golden files hold two commits"
    return parsed


# ------------------------------------------------------------------ tests

def test_manifest_covers_every_format_on_both_sides():
    ks = {e["k_format"] for e in MANIFEST["files"].values()}
    vs = {e["v_format"] for e in MANIFEST["files"].values()}
    assert ks | vs == set(km.FORMATS) and "int4" in ks and "int4" in vs


def test_raw_bytes_follow_format_doc(golden):
    """An independent reader of FORMAT.md finds the same sequences, pages and values."""
    name, entry, path = golden
    kf, vf = entry["k_format"], entry["v_format"]
    raw = path.read_bytes()
    parsed = parse_file(raw, kf, vf)
    assert {str(s): v["name"] for s, v in parsed["seqs"].items()} == entry["sequences"]
    used = set()
    for label, content in entry["contents"].items():
        st = parsed["seqs"][content["id"]]
        for layer, info in enumerate(content["layers"]):
            got = st["layers"][layer]
            assert (got["first"], got["n_pos"], got["pages"]) == (info["first"], info["n_pos"], info["block_table"])
            used.update(got["pages"])
            k, v = stored_kv_v1(parsed, raw, content["id"], layer)
            for side, arr, fmt in (("k", k, kf), ("v", v, vf)):
                want, x = expected_side(name, entry, label, layer, side)
                if fmt == "int4":
                    # kvmmap may fuse code * scale + zero into one rounding: allow a few
                    # ulp of the operands' magnitude, far below one int4 step
                    tol = 4 * np.finfo(np.float32).eps * (np.abs(x) + np.abs(want) + np.abs(x).max())
                    assert np.all(np.abs(arr - want) <= tol), f"{label} layer {layer} {side}"
                else:
                    np.testing.assert_array_equal(arr, want, err_msg=f"{label} layer {layer} {side}")
    pb = parsed["page_bytes"]
    for p in sorted(used):
        at = parsed["arena_offset"] + p * pb
        assert crc32c.crc32c(raw[at:at + pb]) == parsed["page_crc"][p], f"page {p}"


def test_kvmmap_reads_golden_file(golden):
    name, entry, path = golden
    before = path.read_bytes()
    with km.PagedKVCache.open(path, mode="r") as c:
        assert c.version == (1, 0)
        assert (c.num_layers, c.num_kv_heads, c.head_dim, c.page_size) == (L, H, D, P)
        assert (c.k_format, c.v_format) == (entry["k_format"], entry["v_format"])
        assert c.fingerprint == MANIFEST["fingerprint"].encode()
        assert {str(s): n for s, n in c.sequences().items()} == entry["sequences"]
        for label, content in entry["contents"].items():
            sid = content["id"]
            if not label.startswith("#"):
                assert c.find_sequence(label) == sid
            for layer, info in enumerate(content["layers"]):
                assert c.seq_len(sid, layer) == info["length"]
                # read into format 2's layout (page ids as copied): the open page is a page too
                assert len(c.block_table(sid, layer)) == -(-(info["length"] + info["dropped"] % P) // P)
                k, v = c.read(sid, layer)
                for side, arr in (("k", k), ("v", v)):
                    # open() copies the 1.0 values into format 2 in RAM: float formats exactly,
                    # the others quantized again (float16 side data), within a step of them
                    want, _ = expected_side(name, entry, label, layer, side)
                    fmt = entry[f"{side}_format"]
                    if fmt in ("fp32", "fp16", "bf16"):
                        np.testing.assert_array_equal(arr, want, err_msg=f"{label} layer {layer} {side}")
                    else:
                        d = info["dropped"]       # the page grid starts d rows before the first token
                        grid = np.concatenate([np.zeros((d,) + want.shape[1:], np.float32), want])
                        step = requant_step(grid, fmt, side, P, G)[d:]
                        assert np.all(np.abs(arr - want) <= step * (1 + 1e-5) + 1e-6 * np.abs(want)), \
                            (label, layer, side)
                assert_inner_range_reads(c, sid, layer, info["length"], k, v)
        assert c.verify() == []
    assert path.read_bytes() == before


def test_golden_file_is_refused_for_writing(golden):
    """A 1.0 file is read only (format 2 writes 2.0): mode "r+" is refused, naming the
    upgrade, and the file is left as it was."""
    path = golden[2]
    before = path.read_bytes()
    with pytest.raises(km.CacheFileError, match="upgrade"):
        km.PagedKVCache.open(path)
    assert path.read_bytes() == before


# ================================================================== format 2.0
# The files tests/golden/make_golden2.py wrote through PagedKVCache (see its docstring for
# the story each holds). Their expected values were computed there in plain numpy from the
# inputs, by FORMAT.md's rules, and every comparison below is exact, for every format:
# a stored value decodes to code * scale (+ zero) with a float16 scale and an 8-bit (at
# most) code, whose product is exact in float32, so reading the same bytes has one answer.

MANIFEST2 = json.loads((GOLDEN / "v2_0_manifest.json").read_text())
EXPECTED2 = np.load(GOLDEN / "v2_0_expected.npz")
GEO2 = MANIFEST2["geometry"]
FILES2 = sorted(MANIFEST2["files"])
COMMITS2 = ("newest", "previous")
PAIRS2 = {("fp16", "fp16"), ("bf16", "fp8_e4m3"), ("int8", "int8"), ("int4", "int4"), ("fp32", "fp8_e5m2"),
          ("int8", "int4")}
NO_PAGE = 0xFFFFFFFF


@pytest.fixture(params=FILES2)
def golden2(request, tmp_path):
    """(file name, manifest entry, path of a private copy) of a format 2.0 golden file."""
    return request.param, MANIFEST2["files"][request.param], private_copy(tmp_path, request.param)


def expected2(name, which, sid, layer, length):
    return expected_values(EXPECTED2, name, which, sid, layer, length)


def test_v2_manifest_covers_the_story():
    files = MANIFEST2["files"]
    assert {(e["k_format"], e["v_format"]) for e in files.values()} == PAIRS2
    assert {f for e in files.values() for f in (e["k_format"], e["v_format"])} == set(km.FORMATS)
    for name, e in files.items():
        assert (GOLDEN / name).stat().st_size < 200 * 1024, name
        assert e["page_size"] == (64 if e["k_format"] == "int4" else 16)        # the defaults
        new, prev = e["commits"]["newest"], e["commits"]["previous"]
        seqs = new["sequences"].values()
        ids = sorted(s["id"] for s in seqs)
        assert new["next_id"] > ids[-1] + 1, "the sequence with the highest id was freed"
        assert set(range(ids[-1])) - set(ids), "a sequence freed below the others (a gap)"
        assert any(s["name"] is None for s in seqs) and any(s["max_tokens"] for s in seqs)
        layers = [li for s in seqs for li in s["layers"]]
        assert any(li["first"] > 0 for li in layers)
        assert any(li["n_pos"] % e["page_size"] for li in layers)
        if e["k_format"] == "int4":
            assert any(li["num_res"] for li in layers)
            assert any(li["n_pos"] % e["page_size"] and not li["num_res"] for li in layers)     # cut short
            assert any(li["n_pos"] % e["page_size"] > e["residual_rows_per_page"] for li in layers)
        assert prev["sequences"] != new["sequences"]
    assert (GOLDEN / "v2_0_expected.npz").stat().st_size < 200 * 1024


@pytest.mark.parametrize("which", COMMITS2)
def test_v2_kvmmap_reads_golden_file(golden2, which):
    """open(path, "r") reads exactly the expected values, names, ids, limits, at either
    commit, and changes no byte of the file."""
    name, entry, path = golden2
    state = entry["commits"][which]
    P = entry["page_size"]
    before = path.read_bytes()
    with km.PagedKVCache.open(path, mode="r", commit=which) as c:
        assert c.version == (2, 0)
        assert (c.num_layers, c.num_kv_heads, c.head_dim, c.page_size) == \
            (GEO2["num_layers"], GEO2["num_kv_heads"], GEO2["head_dim"], P)
        assert (c.k_format, c.v_format) == (entry["k_format"], entry["v_format"])
        assert c.fingerprint == MANIFEST2["fingerprint"].encode()
        assert c.commit["generation"] == c.commit["newest_at_open"] - (which == "previous")
        assert c.sequences() == {s["id"]: s["name"] for s in state["sequences"].values()}
        for label, s in state["sequences"].items():
            sid = s["id"]
            if s["name"] is not None:
                assert c.find_sequence(s["name"]) == sid
            lengths = [li["length"] for li in s["layers"]]
            assert c.remaining_capacity(sid) == (s["max_tokens"] - max(lengths) if s["max_tokens"] else None)
            for layer, li in enumerate(s["layers"]):
                assert c.seq_len(sid, layer) == li["length"]
                pages, n_pos, first = c.page_table(sid, layer)
                assert (len(pages), n_pos, first) == (li["num_pages"], li["n_pos"], li["first"]), (label, layer)
                k, v = c.read(sid, layer)
                want_k, want_v = expected2(name, which, sid, layer, li["length"])
                np.testing.assert_array_equal(k, want_k, err_msg=f"{label} layer {layer} k")
                np.testing.assert_array_equal(v, want_v, err_msg=f"{label} layer {layer} v")
                assert_inner_range_reads(c, sid, layer, li["length"], want_k, want_v)
        assert c.verify() == []
    assert path.read_bytes() == before


def blob_pages(raw, geo, page):
    """The pages of the blob starting at ``page``."""
    out = []
    while page != NO_PAGE:
        out.append(page)
        page = struct.unpack_from("<I", raw, geo["arena_offset"] + page * geo["page_bytes"] + 4)[0]
    return out


def rows_crc(page: bytes, geo, rows: int, skip_k: bool) -> int:
    """FORMAT.md's checksum of a partly filled page: rows 0 .. rows - 1 of every region,
    region by region in page order, head by head (int4 keys' [H, 1, D] side data whole)."""
    crc = 0
    for side, regions in page_arrays(page, geo)[0].items():
        if side == "k" and skip_k:
            continue
        for arr in regions.values():
            for h in range(geo["num_kv_heads"]):
                crc = crc32c.crc32c(np.ascontiguousarray(arr[h, 0:rows]).tobytes(), crc)
    return crc


@pytest.mark.parametrize("which", COMMITS2)
def test_v2_raw_bytes_follow_format_doc(golden2, which):
    """tests/reference.py's reading of FORMAT.md finds the superblock, roots, index and
    records the manifest describes, every checksum, and the expected values."""
    name, entry, path = golden2
    state = entry["commits"][which]
    raw = path.read_bytes()
    kf, vf, P = entry["k_format"], entry["v_format"], entry["page_size"]
    H, D = GEO2["num_kv_heads"], GEO2["head_dim"]

    # superblock
    parsed = parse_cache_file(at_commit(raw, which))
    assert raw[:8] == b"\x89KVMMAP\n" and parsed["magic"] == b"\x89KVMMAP\n"
    assert parsed["version"] == (2, 0) and parsed["superblock_bytes"] == 4096 and parsed["flags"] == 0
    assert tuple(parsed[k] for k in ("num_layers", "num_kv_heads", "head_dim", "page_size")) == \
        (GEO2["num_layers"], H, D, P)
    assert (parsed["k_format"], parsed["v_format"]) == (kf, vf)
    assert raw[32:34] == bytes([FORMAT_IDS[kf], FORMAT_IDS[vf]])
    assert parsed["k_group"] == (P if kf == "int4" else 0)
    assert parsed["v_group"] == (entry["v_group_size"] if vf == "int4" else 0)
    assert parsed["page_bytes"] == entry["page_bytes"] and parsed["page_bytes"] % 64 == 0
    assert (parsed["root_offset"], parsed["root_bytes"], parsed["arena_offset"]) == (4096, 4096, 12288)
    assert parsed["fingerprint"] == MANIFEST2["fingerprint"].encode().ljust(32, b"\0")
    assert parsed["max_bytes"] == 0
    assert not any(raw[112:4092])
    assert struct.unpack_from("<I", raw, 4092)[0] == crc32c.crc32c(raw[:4092])

    # roots: both valid, one generation apart; the rest of each root block zero
    roots = valid_roots(raw, parsed)
    assert len(roots) == 2
    gens = sorted(g for g, _ in roots)
    assert gens[1] == gens[0] + 1
    for slot in (0, 1):
        at = 4096 + slot * 4096
        assert raw[at:at + 8] == b"KVMROOT\0" and not any(raw[at + 64:at + 4096])
    root = dict(roots)[gens[-1] if which == "newest" else gens[0]]
    assert parsed["generation"] == (gens[-1] if which == "newest" else gens[0])
    hw, pb = parsed["high_water"], parsed["page_bytes"]
    assert 12288 + hw * pb <= len(raw)
    assert root["next_id"] == state["next_id"] and root["num_sequences"] == len(state["sequences"])
    assert root["index_bytes"] == 16 * len(state["sequences"])

    # index and records
    index = np.frombuffer(raw, "<u4", 4 * root["num_sequences"],
                          12288 + root["index_page"] * pb + 16).reshape(-1, 4)
    ids = index[:, 0].tolist()
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and ids[-1] < root["next_id"]
    meta = blob_pages(raw, parsed, root["index_page"])
    for sid, first_page, nbytes, _ in index.tolist():
        meta += blob_pages(raw, parsed, first_page)
        at = 12288 + first_page * pb + 16
        rec_sid, name_len, has_name, max_tokens = struct.unpack_from("<IHHQ", raw, at)
        s = parsed["seqs"][sid]
        assert rec_sid == sid and has_name == (s["name"] is not None) and name_len == len((s["name"] or "").encode())
        assert max_tokens == s["max_tokens"]
        layer_bytes = sum(24 + 8 * len(li["pages"]) + 8 * len(li["res"]) for li in s["layers"])
        assert nbytes == 16 + -(-name_len // 8) * 8 + layer_bytes
    assert len(meta) == len(set(meta)) and all(p < hw for p in meta)
    assert {s["id"] for s in state["sequences"].values()} == set(parsed["seqs"])

    R = entry["residual_rows_per_page"]
    layer_of = {}                            # page -> the layer whose lists name it
    for label, s in state["sequences"].items():
        rec = parsed["seqs"][s["id"]]
        assert (rec["name"], rec["max_tokens"]) == (s["name"], s["max_tokens"])
        for layer, (got, li) in enumerate(zip(rec["layers"], s["layers"])):
            assert (got["n_pos"], got["first"], len(got["pages"]), len(got["res"])) == \
                (li["n_pos"], li["first"], li["num_pages"], li["num_res"]), (label, layer)
            listed = got["pages"] + got["res"]
            assert len(set(listed)) == len(listed) and all(p < hw for p in listed)
            assert not set(listed) & set(meta)
            for p in listed:
                assert layer_of.setdefault(p, layer) == layer, f"page {p} in two layers"
            rows = got["n_pos"] % P
            for i, (p, crc) in enumerate(zip(got["pages"], got["crc"])):
                page = raw[12288 + p * pb:12288 + (p + 1) * pb]
                if i < len(got["pages"]) - 1 or not rows:
                    assert crc32c.crc32c(page) == crc, (label, layer, p)
                else:
                    assert rows_crc(page, parsed, rows, skip_k=bool(got["res"])) == crc, (label, layer, p)
            for j, (p, crc) in enumerate(zip(got["res"], got["res_crc"])):
                used = min(R, rows - j * R) * 2 * H * D
                assert crc32c.crc32c(raw[12288 + p * pb:12288 + p * pb + max(used, 0)]) == crc
            k, v = stored_kv(parsed, raw, s["id"], layer)
            want_k, want_v = expected2(name, which, s["id"], layer, li["length"])
            np.testing.assert_array_equal(k, want_k, err_msg=f"{label} layer {layer} k")
            np.testing.assert_array_equal(v, want_v, err_msg=f"{label} layer {layer} v")


@pytest.mark.parametrize("which", COMMITS2)
def test_v2_writer_open_and_flush(golden2, which):
    """open(..., "r+") at either commit and flush(): the file still verifies, holds that
    commit's values as its newest commit, and the next sequence id is the manifest's."""
    name, entry, path = golden2
    state = entry["commits"][which]
    with km.PagedKVCache.open(path, commit=which) as c:
        assert c.verify() == []
        c.flush()
    with km.PagedKVCache.open(path, "r") as c:
        assert c.verify() == []
        for s in state["sequences"].values():
            for layer, li in enumerate(s["layers"]):
                want = expected2(name, which, s["id"], layer, li["length"])
                for got, w in zip(c.read(s["id"], layer), want):
                    np.testing.assert_array_equal(got, w)
    raw = path.read_bytes()
    parsed = parse_cache_file(raw)
    assert parsed["commits"] == 2 and parsed["next_id"] == state["next_id"]
    for s in state["sequences"].values():
        for layer, li in enumerate(s["layers"]):
            want = expected2(name, which, s["id"], layer, li["length"])
            for got, w in zip(stored_kv(parsed, raw, s["id"], layer), want):
                np.testing.assert_array_equal(got, w)
    with km.PagedKVCache.open(path) as c:
        assert c.new_sequence() == state["next_id"]          # ids continue, never reused


@pytest.mark.parametrize("side", ["k", "v"])
def test_v2_codes_at_ties_round_half_to_even(side):
    """int4 keys (zero 0, scale 3 over the page) and int8 values (scale 381 / 127 = 3):
    7.5 is 2.5 steps, a tie between codes 2 (6.0) and 3 (9.0); half to even is 6.0."""
    c = km.PagedKVCache.create(None, num_layers=1, num_kv_heads=1, head_dim=2, page_size=4,
                               k_format="int4", v_format="int8")
    s = c.new_sequence()
    k = np.array([[0, 0], [45, 1], [7.5, 2], [0, 3]], np.float32)[:, None, :]
    v = np.array([[381, 7.5], [0, 0], [0, 0], [0, 0]], np.float32)[:, None, :]
    c.append(s, 0, k, v)
    got_k, got_v = c.read(s, 0)
    assert (got_k[2, 0, 0] if side == "k" else got_v[0, 0, 1]) == 6.0
