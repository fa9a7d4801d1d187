"""Format 1.x files read by kvmmap.core.legacy, and upgraded by ``kvmmap convert --upgrade``.

The golden files under tests/golden/ stay format 1.0 forever; they are read here through
``read_v1`` only (never through ``PagedKVCache.open``, which follows the newest format) and
compared with what tests/golden/make_golden.py recorded when it wrote them. Damage is
made on private copies. Upgraded files are read through the public API and compared with
the 1.0 contents: exactly for fp32 / fp16 / bf16, within one quantization step otherwise.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
from pathlib import Path

import crc32c
import numpy as np
import pytest

import kvmmap as km
from helpers import fails, flip, requant_step, run
from kvmmap.core.legacy import V1File, is_v1, read_v1
from kvmmap.errors import CacheFileError, ConfigError, SequenceError, ShapeError
from kvmmap.tools.convert import upgrade

from golden_v1 import FILES, GOLDEN, MANIFEST, D, G, H, L, P, expected_side

FLOAT_FORMATS = ("fp32", "fp16", "bf16")
SLOT0 = 4096


def assert_decoded(got, want, fmt, what):
    """Exact, but int4's ``code * scale + zero`` may be rounded once or twice (a few ulp)."""
    if fmt == "int4":
        tol = 4 * np.finfo(np.float32).eps * (np.abs(want) + np.abs(want).max())
        assert np.all(np.abs(got - want) <= tol), what
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


def quant_step(x, fmt, side):
    """helpers.quant_step with the golden files' page size and value group."""
    return requant_step(x, fmt, side, P, G)


def slot_payload(path, slot):
    raw = Path(path).read_bytes()
    at = SLOT0 + slot * MANIFEST["meta_slot_bytes"]
    _, gen, length, _, _ = struct.unpack_from("<8sQQII", raw, at)
    return gen, raw[at + 64:at + 64 + length]


def write_slot(path, slot, gen, payload):
    """A slot whose checksums hold over ``payload``: only the format's rules can refuse it."""
    head = struct.pack("<8sQQI", b"KVMSLOT\0", gen, len(payload), crc32c.crc32c(payload))
    head += struct.pack("<I", crc32c.crc32c(head))
    with open(path, "r+b") as fh:
        fh.seek(SLOT0 + slot * MANIFEST["meta_slot_bytes"])
        fh.write(head.ljust(64, b"\0") + payload)


def newest_slot(path):
    with read_v1(path) as f:
        return f.slot, f.generation


# ------------------------------------------------------------------ reading the golden files

def test_is_v1(golden, tmp_path):
    _, _, path = golden
    assert is_v1(path)
    other = tmp_path / "other.bin"
    other.write_bytes(b"\x89KVMMAP\n\x02\x00\x00\x00" + bytes(4084))
    assert not is_v1(other)
    other.write_bytes(b"hello")
    assert not is_v1(other)
    with pytest.raises(CacheFileError, match="cannot open"):
        is_v1(tmp_path / "missing.kvm")
    with pytest.raises(CacheFileError, match="directory"):
        is_v1(tmp_path)


def test_read_v1_reads_golden_file(golden):
    name, entry, path = golden
    before = path.read_bytes()
    with read_v1(path) as f:
        assert isinstance(f, V1File) and f.version == (1, 0)
        assert (f.num_layers, f.num_kv_heads, f.head_dim, f.page_size) == (L, H, D, P)
        assert (f.k_format, f.v_format) == (entry["k_format"], entry["v_format"])
        assert f.v_group_size == (G if entry["v_format"] == "int4" else 0)
        assert f.fingerprint == MANIFEST["fingerprint"].encode()
        assert {str(s): q.name for s, q in f.sequences.items()} == entry["sequences"]
        assert f.next_sequence_id == 5          # prompt, freed, fork, cut, window: ids 0..4
        assert f.verify() == []
        for label, content in entry["contents"].items():
            sid = content["id"]
            if not label.startswith("#"):
                assert f.find_sequence(label) == sid
            for layer, info in enumerate(content["layers"]):
                st = f.sequences[sid].layers[layer]
                assert (st.n_pos, st.first, st.pages.tolist()) == (info["n_pos"], info["first"], info["block_table"])
                assert f.seq_len(sid, layer) == info["length"]
                k, v = f.read(sid, layer)
                assert k.shape == v.shape == (info["length"], H, D) and k.dtype == np.float32
                for side, arr in (("k", k), ("v", v)):
                    assert_decoded(arr, expected_side(name, entry, label, layer, side)[0], entry[f"{side}_format"],
                                   f"{label} layer {layer} {side}")
                n = info["length"]
                a, b = n // 3, n - 1                 # a range starting and ending inside pages
                for got, whole in zip(f.read(sid, layer, a, b), (k, v)):
                    np.testing.assert_array_equal(got, whole[a:b])
                kd, vd = f.read(sid, layer, dropped=True)
                assert len(kd) == info["n_pos"]
                np.testing.assert_array_equal(kd[info["first"]:], k)
                np.testing.assert_array_equal(vd[info["first"]:], v)
    assert path.read_bytes() == before


def test_previous_commit(golden):
    """The older slot holds the first commit: the prompt and a 5-token sequence freed later."""
    name, entry, path = golden
    with read_v1(path) as newest, read_v1(path, commit="previous") as f:
        assert f.generation < newest.generation and f.slot != newest.slot
        assert {s: q.name for s, q in f.sequences.items()} == {0: "prompt", 1: "freed"}
        assert f.next_sequence_id == 2
        for layer in range(L):
            for side, arr in zip("kv", f.read(0, layer)):
                assert_decoded(arr, expected_side(name, entry, "prompt", layer, side)[0], entry[f"{side}_format"],
                               f"prompt layer {layer} {side}")
        assert (f.seq_len(1, 0), f.seq_len(1, 1)) == (5, 0)
        assert f.verify() == []


def test_argument_errors(golden):
    _, _, path = golden
    with pytest.raises(ConfigError, match="commit"):
        read_v1(path, commit="oldest")
    with read_v1(path) as f:
        with pytest.raises(SequenceError, match="unknown sequence 1"):    # freed
            f.read(1, 0)
        with pytest.raises(SequenceError, match="no sequence is named"):
            f.find_sequence("freed")
        with pytest.raises(ShapeError, match="layer"):
            f.read(0, L)
        with pytest.raises(ShapeError, match="start"):
            f.read(0, 0, 3, 2)
        with pytest.raises(ShapeError, match="stop"):
            f.read(0, 0, 0, f.seq_len(0, 0) + 1)
    with pytest.raises(CacheFileError, match="closed"):
        f.read(0, 0)


# ------------------------------------------------------------------ damage

def test_flipped_page_byte_names_the_page(golden):
    _, _, path = golden
    with read_v1(path) as f:
        page = int(f.sequences[4].layers[1].pages[-1])           # window, layer 1: its pages are its own
        at = f.arena_offset + page * f.page_bytes + f.page_bytes // 3
    flip(path, at)
    with read_v1(path) as f:
        assert f.verify() == [page]
        with pytest.raises(CacheFileError, match=rf"damaged page {page}\b"):
            f.read(4, 1)
        f.read(4, 0)                                              # other pages still read
        f.read(0, 1)


def test_damaged_superblock(golden):
    _, _, path = golden
    flip(path, 20)                                                # num_kv_heads
    with pytest.raises(CacheFileError, match="superblock checksum mismatch"):
        read_v1(path)


def test_refused_headers(tmp_path):
    src = (GOLDEN / FILES[0]).read_bytes()

    def variant(offset, data, *more):
        """The golden file with ``data`` at ``offset`` (and further (offset, data) pairs), re-checksummed."""
        raw = bytearray(src[:4096])
        for at, b in ((offset, data), *more):
            raw[at:at + len(b)] = b
        raw[4092:] = struct.pack("<I", crc32c.crc32c(bytes(raw[:4092])))
        p = tmp_path / f"v{offset}.kvm"
        p.write_bytes(bytes(raw) + src[4096:])
        return p

    cases = [
        (variant(0, b"NOTKVMMA"), "not a kvmmap cache"),
        (variant(8, struct.pack("<H", 2)), "format version 2.0 is not 1.x"),
        (variant(200, b"\x01"), "reserved bytes"),
        (variant(28, struct.pack("<I", 5)), "page_bytes"),        # page_size 5
        (variant(32, b"\x09"), "format id"),
        (variant(38, struct.pack("<H", 1)), "flags"),
        (variant(64, struct.pack("<Q", 1234)), "arena offset"),
    ]
    for p, match in cases:
        with pytest.raises(CacheFileError, match=match):
            read_v1(p)
    # a higher minor of major 1 may use the reserved bytes
    with read_v1(variant(10, struct.pack("<H", 3), (200, b"\x01"))) as f:
        assert f.version == (1, 3) and f.verify() == []


@pytest.mark.parametrize("keep", ["header", "slots", "pages"])
def test_truncated_file(golden, keep):
    _, _, path = golden
    with read_v1(path) as f:
        arena, pb, hw = f.arena_offset, f.page_bytes, f.high_water
    size = {"header": 100, "slots": arena - 1000, "pages": arena + (hw - 2) * pb}[keep]
    os.truncate(path, size)
    match = {"header": "not a kvmmap cache", "slots": "truncated file", "pages": "truncated file"}[keep]
    with pytest.raises(CacheFileError, match=match):
        read_v1(path)


def test_damaged_slots(golden):
    _, _, path = golden
    slot, gen = newest_slot(path)
    flip(path, SLOT0 + slot * MANIFEST["meta_slot_bytes"] + 64 + 10)     # its payload
    with read_v1(path) as f:                                  # the other, older commit
        assert (f.slot, f.generation) == (1 - slot, gen - 1)
    with pytest.raises(CacheFileError, match="no previous commit"):
        read_v1(path, commit="previous")
    flip(path, SLOT0 + (1 - slot) * MANIFEST["meta_slot_bytes"] + 40)     # the other header's padding
    with pytest.raises(CacheFileError, match="neither metadata slot"):
        read_v1(path)


def test_payload_rules(golden):
    """A slot whose checksums hold but which breaks a rule of the payload is refused."""
    _, _, path = golden
    slot, _ = newest_slot(path)
    gen, payload = slot_payload(path, slot)
    hw = struct.unpack_from("<Q", payload)[0]
    window_l1 = struct.pack("<QII", 18, 3, 4)      # n_pos, first, pages of both layers of "window"
    at = [i for i in range(len(payload)) if payload.startswith(window_l1, i)][1]    # window, layer 1
    cases = [
        (payload[:16] + b"\x01\0\0\0" + payload[20:], "reserved field"),
        (payload + b"\0\0\0\0", "trailing bytes"),
        (payload[:-3], "truncated|inconsistent"),
        (payload[:at] + struct.pack("<QII", 18, 4, 4) + payload[at + 16:], "inconsistent block table"),
        (payload[:at + 16] + struct.pack("<I", hw) + payload[at + 20:], f"beyond the {hw} pages"),
        (payload[:at + 16] + payload[at + 20:at + 24] * 2 + payload[at + 24:], "lists a page twice"),
    ]
    with read_v1(path) as f:
        other_layer_page = int(f.sequences[4].layers[0].pages[-1])
    cases.append((payload[:at + 16] + struct.pack("<I", other_layer_page) + payload[at + 20:], "another layer"))
    for bad, match in cases:
        write_slot(path, slot, gen, bad)
        with pytest.raises(CacheFileError, match=match) as e:
            read_v1(path)
        assert "passes its checksums but is invalid" in str(e.value)


def test_garbage_payloads_give_clean_errors(golden):
    """Random bytes in a checksummed payload: a CacheFileError or a file that reads, never a crash."""
    _, _, path = golden
    slot, _ = newest_slot(path)
    gen, payload = slot_payload(path, slot)
    rng = np.random.default_rng(1)
    for _ in range(150):
        bad = bytearray(payload)
        for i in rng.integers(0, len(bad), rng.integers(1, 4)):
            bad[i] = int(rng.integers(0, 256))
        write_slot(path, slot, gen, bytes(bad))
        try:
            with read_v1(path) as f:
                for sid in f.sequences:
                    for layer in range(L):
                        f.read(sid, layer)
        except CacheFileError:
            pass


# ------------------------------------------------------------------ upgrade

def check_upgraded(old, new):
    """``new`` (read through the public API) holds what ``old`` holds (read by read_v1)."""
    with read_v1(old) as f, km.PagedKVCache.open(new, "r") as c:
        assert (c.num_layers, c.num_kv_heads, c.head_dim, c.page_size) == (L, H, D, P)
        assert (c.k_format, c.v_format, c.fingerprint) == (f.k_format, f.v_format, f.fingerprint)
        assert c.sequences() == {sid: s.name for sid, s in f.sequences.items()}
        assert c.verify() == []
        for sid, s in f.sequences.items():
            for layer, st in enumerate(s.layers):
                assert c.seq_len(sid, layer) == st.length
                assert c.page_table(sid, layer)[1:] == (st.n_pos, st.first)      # same page grid
                for side, want, got in zip("kv", f.read(sid, layer, dropped=True), c.read(sid, layer)):
                    fmt = getattr(f, f"{side}_format")
                    step = quant_step(want, fmt, side)[st.first:]
                    want = want[st.first:]
                    if fmt in FLOAT_FORMATS:
                        np.testing.assert_array_equal(got, want)
                    else:
                        assert np.all(np.abs(got - want) <= step * (1 + 1e-5) + 1e-6 * np.abs(want)), (sid, layer, side)
        next_id = f.next_sequence_id
    with km.PagedKVCache.open(new) as c:           # ids are never reused, across the upgrade too
        assert c.new_sequence() == next_id


def test_upgrade_golden_file(golden, tmp_path):
    _, entry, path = golden
    new = tmp_path / "new.kvm"
    r = upgrade(path, new, progress=False)
    assert (r["src"], r["dst"], r["version_before"]) == (str(path), str(new), "1.0")
    assert r["sequences"] == len(entry["sequences"])
    assert r["tokens"] == sum(i["length"] for c in entry["contents"].values() for i in c["layers"])
    check_upgraded(path, new)
    if entry["k_format"] in FLOAT_FORMATS:
        assert r["k_max_error"] == 0
    assert sorted(os.listdir(tmp_path)) == sorted([path.name, "new.kvm"])     # no partial file left


def test_upgrade_keeps_per_layer_dropped_positions(golden, tmp_path):
    """Layers that dropped different counts in front (shift_left on a shorter layer) keep them."""
    _, _, path = golden
    slot, _ = newest_slot(path)
    gen, payload = slot_payload(path, slot)
    window_l1 = struct.pack("<QII", 18, 3, 4)
    at = [i for i in range(len(payload)) if payload.startswith(window_l1, i)][1]
    write_slot(path, slot, gen, payload[:at] + struct.pack("<QII", 18, 1, 4) + payload[at + 16:])
    with read_v1(path) as f:
        assert [st.first for st in f.sequences[4].layers] == [3, 1]
    upgrade(path, tmp_path / "new.kvm", progress=False)
    check_upgraded(path, tmp_path / "new.kvm")


def test_upgrade_in_place(golden):
    _, _, path = golden
    keep = path.with_name("copy.kvm")
    shutil.copyfile(path, keep)
    r = upgrade(path, in_place=True, progress=False)
    assert r["dst"] == str(path)
    check_upgraded(keep, path)
    assert sorted(os.listdir(path.parent)) == sorted([path.name, keep.name])


def test_upgrade_refusals(golden, tmp_path):
    _, _, path = golden
    with pytest.raises(ConfigError, match="is the input file"):
        upgrade(path, path)
    with pytest.raises(ConfigError, match="in_place"):
        upgrade(path)
    with pytest.raises(ConfigError, match="another file"):
        upgrade(path, tmp_path / "x.kvm", in_place=True)
    taken = tmp_path / "taken.kvm"
    taken.write_bytes(b"x")
    with pytest.raises(CacheFileError, match="exists"):
        upgrade(path, taken)
    upgrade(path, taken, overwrite=True, progress=False)
    check_upgraded(path, taken)
    with pytest.raises(CacheFileError, match="not a format 1"):
        upgrade(_not_cache(tmp_path), tmp_path / "y.kvm")
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)      # a writer has it open
        with pytest.raises(CacheFileError, match="open for writing"):
            upgrade(path, tmp_path / "z.kvm")
    finally:
        os.close(fd)
    assert not (tmp_path / "z.kvm").exists()


def _not_cache(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_bytes(b"just text")
    return p


def test_upgrade_of_damaged_file_writes_nothing(golden, tmp_path):
    _, _, path = golden
    with read_v1(path) as f:
        page = int(f.sequences[0].layers[0].pages[0])
        at = f.arena_offset + page * f.page_bytes + 5
    flip(path, at)
    with pytest.raises(CacheFileError, match=rf"damaged page {page}\b"):
        upgrade(path, tmp_path / "new.kvm", progress=False)
    assert sorted(os.listdir(tmp_path)) == [path.name]


# ------------------------------------------------------------------ the console script

def test_cli_convert_upgrade(golden, tmp_path):
    _, entry, path = golden
    new = tmp_path / "new.kvm"
    r = run("/", "convert", "--upgrade", path, new, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "format 1.0" in r.stdout and f"{len(entry['sequences'])} sequence(s)" in r.stdout
    check_upgraded(path, new)
    fails(run("/", "convert", "--upgrade", path, path), 1, "is the input file")
    fails(run("/", "convert", "--upgrade", path, new), 1, "exists")
    fails(run("/", "convert", "--upgrade", path, tmp_path / "k.kvm", "--k-format", "int4"), 2, "--k-format")
    fails(run("/", "convert", "--upgrade", path), 2, "--in-place")
    fails(run("/", "convert", "--in-place", path, new), 2, "--upgrade only")
    keep = tmp_path / "copy.kvm"
    shutil.copyfile(path, keep)
    r = run("/", "convert", "--upgrade", "--in-place", path, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dst"] == str(path)
    check_upgraded(keep, path)
    assert "quantization step" in run("/", "convert", "--help").stdout


def test_cli_upgrade_of_damaged_page(golden, tmp_path):
    _, _, path = golden
    with read_v1(path) as f:
        page = int(f.sequences[2].layers[1].pages[-1])
        at = f.arena_offset + page * f.page_bytes + 1
    flip(path, at)
    fails(run("/", "convert", "--upgrade", path, tmp_path / "new.kvm"), 1, f"damaged page {page}")
    assert not (tmp_path / "new.kvm").exists()


def test_open_reads_a_format_1_file_read_only(golden):
    """PagedKVCache.open reads a 1.x file (into RAM, read-only): the same contents as
    read_v1, version (1, 0); mode "r+" is refused with the way to upgrade."""
    golden = golden[2]
    with read_v1(golden) as f, km.PagedKVCache.open(golden, "r") as c:
        assert c.version == (1, 0) and not c.writable
        assert c.sequences() == {sid: s.name for sid, s in f.sequences.items()}
        for sid, s in f.sequences.items():
            for layer in range(L):
                want = f.read(sid, layer, dropped=True)
                for side, w, got in zip("kv", want, c.read(sid, layer)):
                    w = w[s.layers[layer].first:]
                    fmt = getattr(f, f"{side}_format")
                    step = quant_step(f.read(sid, layer, dropped=True)[0 if side == "k" else 1], fmt, side)
                    step = step[s.layers[layer].first:]
                    assert np.all(np.abs(got - w) <= step * (1 + 1e-5) + 1e-6 * np.abs(w)), (sid, layer, side)
        with pytest.raises(km.ReadOnlyError):
            c.append(0, 0, np.zeros((1, H, D), np.float32), np.zeros((1, H, D), np.float32))
    with pytest.raises(CacheFileError, match="convert --upgrade"):
        km.PagedKVCache.open(golden, "r+")
    assert is_v1(golden)                        # untouched
