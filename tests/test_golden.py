"""The committed format 1.0 golden caches still read, through kvmmap and through an
independent decoder written from docs/FORMAT.md.

The files under tests/golden/ were written once by tests/golden/make_golden.py and pin the
on-disk format: if a change to kvmmap makes them read differently, this fails. Each test
works on a copy, since opening may take a lock and a writer changes the file.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import crc32c
import numpy as np
import pytest
from reference import parse_cache_file_v1, stored_kv_v1

import kvmmap as km

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
from make_golden import reference
from test_legacy import quant_step

MANIFEST = json.loads((GOLDEN / "v1_0_manifest.json").read_text())
EXPECTED = np.load(GOLDEN / "v1_0_expected.npz")
GEO = MANIFEST["geometry"]
L, H, D, P = GEO["num_layers"], GEO["num_kv_heads"], GEO["head_dim"], GEO["page_size"]
G = MANIFEST["v_group_size"]
FILES = sorted(MANIFEST["files"])



@pytest.fixture(params=FILES)
def golden(request, tmp_path):
    """(file name, manifest entry, path of a private copy)."""
    name = request.param
    dst = tmp_path / name
    shutil.copyfile(GOLDEN / name, dst)
    return name, MANIFEST["files"][name], dst


def expected_side(name, entry, label, layer, side):
    """The values kvmmap must return for one (sequence, layer, side), and the input they round."""
    fmt = entry[f"{side}_format"]
    info = entry["contents"][label]["layers"][layer]
    d, n = info["dropped"], info["length"]
    key = f"{name}/{label}/{layer}/{side}"
    stream = EXPECTED[f"{key}_stream"]
    ref, _ = reference(stream, fmt, side, len(stream) // P * P, P, G)
    return (EXPECTED[key] if ref is None else ref[d:d + n]), stream[d:d + n], stream


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
                want, x, _ = expected_side(name, entry, label, layer, side)
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
                    want, _, _ = expected_side(name, entry, label, layer, side)
                    fmt = entry[f"{side}_format"]
                    if fmt in ("fp32", "fp16", "bf16"):
                        np.testing.assert_array_equal(arr, want, err_msg=f"{label} layer {layer} {side}")
                    else:
                        d = info["dropped"]       # the page grid starts d rows before the first token
                        grid = np.concatenate([np.zeros((d,) + want.shape[1:], np.float32), want])
                        step = quant_step(grid, fmt, side)[d:]
                        assert np.all(np.abs(arr - want) <= step * (1 + 1e-5) + 1e-6 * np.abs(want)), \
                            (label, layer, side)
                n = info["length"]
                a, b = n // 3, n - 1                 # a range starting and ending inside pages
                ka, va = c.read(sid, layer, a, b)
                np.testing.assert_array_equal(ka, k[a:b])
                np.testing.assert_array_equal(va, v[a:b])
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
