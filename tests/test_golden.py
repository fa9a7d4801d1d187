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

import kvmmap as km
from reference import fp8_decode_table, int4_channel_bound, int4_token_bound, int8_roundtrip_bound

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
from make_golden import reference  # noqa: E402

MANIFEST = json.loads((GOLDEN / "v1_0_manifest.json").read_text())
EXPECTED = np.load(GOLDEN / "v1_0_expected.npz")
GEO = MANIFEST["geometry"]
L, H, D, P = GEO["num_layers"], GEO["num_kv_heads"], GEO["head_dim"], GEO["page_size"]
G = MANIFEST["v_group_size"]
FILES = sorted(MANIFEST["files"])

FORMAT_IDS = {"fp32": 0, "fp16": 1, "bf16": 2, "int8": 3, "int4": 4, "fp8_e4m3": 5, "fp8_e5m2": 6}
CODE_DTYPE = {"fp32": "<f4", "fp16": "<u2", "bf16": "<u2", "int8": "i1", "int4": "u1",
              "fp8_e4m3": "u1", "fp8_e5m2": "u1"}
SCALED = {"int8", "int4", "fp8_e4m3", "fp8_e5m2"}


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

def regions(fmt, side):
    """[(name, dtype, shape)] of one side of a page, in file order (FORMAT.md, Pages)."""
    dc = D // 2 if fmt == "int4" else D
    out = [("codes", np.dtype(CODE_DTYPE[fmt]), (H, P, dc))]
    if fmt in SCALED:
        shape = (H, P) if fmt != "int4" else (H, 1, D) if side == "k" else (H, P, D // G)
        out.append(("scales", np.dtype("<f4"), shape))
        if fmt == "int4":
            out.append(("zeros", np.dtype("<f4"), shape))
    return out


def page_arrays(page: bytes, kf, vf):
    """{side: {region: array}} of one page; every region starts on a 64-byte boundary."""
    off, out = 0, {}
    for side, fmt in (("k", kf), ("v", vf)):
        out[side] = {}
        for name, dt, shape in regions(fmt, side):
            size = int(np.prod(shape)) * dt.itemsize
            out[side][name] = np.frombuffer(page, dt, int(np.prod(shape)), off).reshape(shape)
            off = -(-(off + size) // 64) * 64
    return out, off


def decode(fmt, side, arrs, rows):
    """float32 [H, len(rows), D] of the given rows of a page (or of a tail in the page's layout)."""
    codes = arrs["codes"][:, rows]
    if fmt == "fp32":
        return codes.astype(np.float32)
    if fmt == "fp16":
        return codes.view(np.float16).astype(np.float32)
    if fmt == "bf16":
        return (codes.astype(np.uint32) << 16).view(np.float32)
    if fmt == "int8":
        return codes.astype(np.float32) * arrs["scales"][:, rows, None]
    if fmt.startswith("fp8"):
        return fp8_decode_table(fmt)[codes].astype(np.float32) * arrs["scales"][:, rows, None]
    q = np.empty(codes.shape[:-1] + (D,), np.float32)          # int4: element 2j in the low nibble
    q[..., 0::2] = codes & 15
    q[..., 1::2] = codes >> 4
    if side == "k":
        return q * arrs["scales"][:, :1] + arrs["zeros"][:, :1]
    s = np.repeat(arrs["scales"][:, rows], G, axis=-1)
    z = np.repeat(arrs["zeros"][:, rows], G, axis=-1)
    return q * s + z


def parse_file(raw: bytes, kf, vf):
    """Everything FORMAT.md says is in the file, decoded with struct and numpy only."""
    sb = struct.unpack_from("<8sHHIIIIIBBHHHQQQQ32s", raw, 0)
    (magic, major, minor, sb_bytes, nl, nh, hd, ps, kid, vid, kg, vg, flags,
     page_bytes, meta_off, slot_bytes, arena_off, fingerprint) = sb
    assert magic == b"\x89KVMMAP\n" and (major, minor) == (1, 0) and sb_bytes == 4096
    assert (nl, nh, hd, ps) == (L, H, D, P)
    assert (kid, vid) == (FORMAT_IDS[kf], FORMAT_IDS[vf])
    assert kg == (P if kf == "int4" else 0) and vg == (G if vf == "int4" else 0) and flags == 0
    assert meta_off == 4096 and slot_bytes == MANIFEST["meta_slot_bytes"] and arena_off == 4096 + 2 * slot_bytes
    assert fingerprint.rstrip(b"\0") == MANIFEST["fingerprint"].encode()
    assert not any(raw[104:4092])
    assert struct.unpack_from("<I", raw, 4092)[0] == crc32c.crc32c(raw[:4092])
    _, layout_bytes = page_arrays(bytes(page_bytes), kf, vf)
    assert page_bytes == layout_bytes

    commits = []
    for slot in (0, 1):
        at = meta_off + slot * slot_bytes
        smagic, gen, length, pcrc, hcrc = struct.unpack_from("<8sQQII", raw, at)
        payload = raw[at + 64:at + 64 + length]
        if (smagic == b"KVMSLOT\0" and hcrc == crc32c.crc32c(raw[at:at + 28])
                and pcrc == crc32c.crc32c(payload) and not any(raw[at + 32:at + 64])):
            commits.append((gen, payload))
    assert len(commits) == 2, "the golden files hold two commits"
    _, payload = max(commits)

    hw, nseq, next_id, reserved = struct.unpack_from("<QIII", payload, 0)
    assert reserved == 0
    off = 20
    page_crc = np.frombuffer(payload, "<u4", hw, off)
    off += 4 * hw
    tail_layout = {side: [(n, dt, shape) if fmt != "int4" else ("codes", np.dtype("<f4"), (H, P, D))
                          for n, dt, shape in regions(fmt, side)][: 1 if fmt == "int4" else None]
                   for side, fmt in (("k", kf), ("v", vf))}
    seqs = {}
    for _ in range(nseq):
        sid, name_len, has_name = struct.unpack_from("<IHH", payload, off)
        off += 8
        name = payload[off:off + name_len].decode() if has_name else None
        off += name_len + (-name_len % 4)
        assert sid < next_id
        layers = []
        for _ in range(L):
            n_pos, first, npages = struct.unpack_from("<QII", payload, off)
            off += 16
            pages = np.frombuffer(payload, "<u4", npages, off)
            off += 4 * npages
            assert npages * P <= n_pos < (npages + 1) * P and first < P
            tail = {}
            for side in ("k", "v"):
                tail[side] = {}
                for n, dt, shape in tail_layout[side]:
                    tail[side][n] = np.frombuffer(payload, dt, int(np.prod(shape)), off).reshape(shape)
                    off += int(np.prod(shape)) * dt.itemsize
            layers.append({"n_pos": n_pos, "first": first, "pages": pages.tolist(), "tail": tail})
        seqs[sid] = {"name": name, "layers": layers}
    assert off == len(payload)
    return {"arena": arena_off, "page_bytes": page_bytes, "page_crc": page_crc, "seqs": seqs}


def visible(parsed, raw, sid, layer, kf, vf):
    """K and V float32 [length, H, D] of one (sequence, layer), decoded from the raw bytes."""
    st = parsed["seqs"][sid]["layers"][layer]
    out = {"k": [], "v": []}
    for pos in range(st["first"], st["n_pos"]):
        logical, row = divmod(pos, P)
        for side, fmt in (("k", kf), ("v", vf)):
            if logical < len(st["pages"]):
                at = parsed["arena"] + st["pages"][logical] * parsed["page_bytes"]
                arrs = page_arrays(raw[at:at + parsed["page_bytes"]], kf, vf)[0][side]
                out[side].append(decode(fmt, side, arrs, [row])[:, 0])
            elif fmt == "int4":
                out[side].append(st["tail"][side]["codes"][:, row])
            else:
                out[side].append(decode(fmt, side, st["tail"][side], [row])[:, 0])
    return [np.array(out[s], np.float32).reshape(-1, H, D) for s in ("k", "v")]


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
            k, v = visible(parsed, raw, content["id"], layer, kf, vf)
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
        at = parsed["arena"] + p * pb
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
                np.testing.assert_array_equal(c.block_table(sid, layer), info["block_table"])
                k, v = c.read(sid, layer)
                for side, arr in (("k", k), ("v", v)):
                    want, x, stream = expected_side(name, entry, label, layer, side)
                    np.testing.assert_array_equal(arr, want, err_msg=f"{label} layer {layer} {side}")
                    check_rounding_bound(entry[f"{side}_format"], side, arr, x, stream, info["dropped"])
                n = info["length"]
                a, b = n // 3, n - 1                 # a range starting and ending inside pages
                ka, va = c.read(sid, layer, a, b)
                np.testing.assert_array_equal(ka, k[a:b])
                np.testing.assert_array_equal(va, v[a:b])
        assert c.verify() == []
    assert path.read_bytes() == before


def check_rounding_bound(fmt, side, got, x, stream, dropped):
    """int8 / int4 values stored at creation still round the input within the reference bound."""
    if fmt == "int8":
        bound = int8_roundtrip_bound(x)
    elif fmt == "int4":
        sealed = len(stream) // P * P
        bound = np.zeros_like(stream)
        for p0 in range(0, sealed, P):
            page = stream[p0:p0 + P]
            bound[p0:p0 + P] = (int4_channel_bound(page.transpose(1, 0, 2), P).transpose(1, 0, 2)
                                if side == "k" else int4_token_bound(page, G))
        bound = bound[dropped:dropped + len(x)]
    else:
        return
    assert np.all(np.abs(got.astype(np.float64) - x) <= bound * (1 + 1e-5) + 1e-6 * np.abs(x))


def test_golden_file_accepts_new_writes(golden):
    """A 1.0 file opened for writing keeps its old contents and takes new tokens."""
    name, entry, path = golden
    rng = np.random.default_rng(5)
    x = rng.standard_normal((P + 3, H, D), dtype=np.float32)
    with km.PagedKVCache.open(path) as c:
        sid = c.find_sequence("prompt")
        n0 = c.seq_len(sid, 0)
        c.append(sid, 0, x, x)
        new = c.new_sequence("added")
        c.append(new, 1, x, x)
        c.flush()
        want_tail = c.read(sid, 0, n0)
        want_new = c.read(new, 1)
    with km.PagedKVCache.open(path, mode="r") as c:
        assert c.verify() == []
        for label, content in entry["contents"].items():
            for layer, info in enumerate(content["layers"]):
                n = info["length"]
                if (label, layer) == ("prompt", 0):
                    n = n // P * P          # its int4 tail was quantized when the page filled
                k, v = c.read(content["id"], layer, 0, n)
                np.testing.assert_array_equal(k, expected_side(name, entry, label, layer, "k")[0][:n])
                np.testing.assert_array_equal(v, expected_side(name, entry, label, layer, "v")[0][:n])
        sid = c.find_sequence("prompt")
        for got, want in zip(c.read(sid, 0, n0), want_tail):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(c.read(c.find_sequence("added"), 1), want_new):
            np.testing.assert_array_equal(got, want)
        # fp32 keeps new tokens exactly; the others round them
        if entry["k_format"] == "fp32":
            np.testing.assert_array_equal(c.read(sid, 0, n0)[0], x)
