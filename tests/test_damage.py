"""Damaged and hostile files: open refuses with a kvmmap error or verify() names the damage.

A small cache holds two commits, A then B (no page is freed between them, so falling back
from B to A is exact). Every test damages a copy of it and checks:

* superblock: every single flipped byte is refused;
* newest metadata slot (header and its zero padding, page table, tails): open falls back
  to commit A, exactly; both slots: refused; the older slot: harmless;
* a newest slot whose checksums hold but whose contents are invalid: refused, naming both
  slots (not a torn write, so no fallback);
* data pages: open works and verify() returns exactly the damaged page;
* truncated files: refused unless every committed page is still whole;
* a higher minor version may use the reserved superblock bytes; 1.0 may not; group size
  fields and int4's even head_dim are checked;
* hostile files, whose checksums are recomputed after crafting, so only validation stands
  between them and the reader: refused without allocating more than a bounded amount, and
  never mapped past the end of the file;
* hypothesis fuzz over header and metadata bytes and fields.

A refused open changes nothing in the file.
"""

from __future__ import annotations

import mmap
import os
import struct
import tracemalloc

import crc32c
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmmap as km
from kvmmap.tools.verify import verify_cache

GEO = dict(num_layers=2, num_kv_heads=2, head_dim=32, page_size=4, k_format="int8", v_format="int4")
SLOT = 12288
SB = 4096
ARENA = SB + 2 * SLOT
FUZZ_EXAMPLES = 500


def snapshot(c) -> dict:
    return {name: [tuple(a.tobytes() for a in c.read(sid, layer)) for layer in range(c.num_layers)]
            for sid, name in c.sequences().items()}


def tokens(n, seed):
    return np.random.default_rng(seed).standard_normal((n, GEO["num_kv_heads"], GEO["head_dim"]), dtype=np.float32)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(file bytes, snapshot of commit A, snapshot of commit B, page_bytes, used pages of B)."""
    path = tmp_path_factory.mktemp("pristine") / "c.kvm"
    c = km.PagedKVCache.create(path, **GEO, meta_slot_bytes=SLOT)
    a = c.new_sequence("a")
    for layer in range(2):
        c.append(a, layer, tokens(23, layer), tokens(23, 10 + layer))
    b = c.fork(a, name="b")
    for layer in range(2):
        c.append(b, layer, tokens(5, 20 + layer), tokens(5, 30 + layer))
    c.flush()
    snap_a = snapshot(c)
    for layer in range(2):
        c.append(a, layer, tokens(6, 40 + layer), tokens(6, 50 + layer))
    s = c.new_sequence("c")
    c.append(s, 0, tokens(9, 60), tokens(9, 61))
    c.flush()
    snap_b = snapshot(c)
    used = sorted({int(p) for sid in c.sequences() for layer in range(2) for p in c.block_table(sid, layer)})
    pb = c.stats()["page_bytes"]
    c.close()
    return path.read_bytes(), snap_a, snap_b, pb, used


def newest_slot(raw: bytes) -> int:
    gens = [struct.unpack_from("<Q", raw, SB + i * SLOT + 8)[0] for i in (0, 1)]
    return int(np.argmax(gens))


def slot_payload_len(raw: bytes, slot: int) -> int:
    return struct.unpack_from("<Q", raw, SB + slot * SLOT + 16)[0]


def write(tmp_path, data: bytes, name="d.kvm"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def refused(path, match=None):
    """open() raises a kvmmap CacheFileError and leaves the file as it was."""
    before = path.read_bytes()
    for mode in ("r", "r+"):
        with pytest.raises(km.CacheFileError, match=match):
            km.PagedKVCache.open(path, mode=mode)
    assert path.read_bytes() == before


def flip(raw: bytes, off: int, mask: int = 0x10) -> bytes:
    b = bytearray(raw)
    b[off] ^= mask
    return bytes(b)


# ------------------------------------------------------------------ plain damage

def test_every_superblock_byte_flip_is_refused(tmp_path, pristine):
    raw = pristine[0]
    p = tmp_path / "d.kvm"
    for off in range(SB):
        p.write_bytes(flip(raw, off, 1 << (off % 8)))
        with pytest.raises(km.CacheFileError):
            km.PagedKVCache.open(p, mode="r")


def test_newest_slot_damage_falls_back_to_the_previous_commit(tmp_path, pristine):
    raw, snap_a, snap_b, _, _ = pristine
    slot = newest_slot(raw)
    start = SB + slot * SLOT
    end = start + 64 + slot_payload_len(raw, slot)
    # every header byte, and payload bytes at a stride that hits the page checksums, the
    # sequence table, the block tables and the tails
    offsets = list(range(start, start + 64)) + list(range(start + 64, end, 13))
    p = tmp_path / "d.kvm"
    for off in offsets:
        p.write_bytes(flip(raw, off))
        with km.PagedKVCache.open(p, mode="r") as c:      # zero padding (bytes 32..63) included
            assert snapshot(c) == snap_a, f"flipped byte at {off}"
            assert c.verify() == []
    # the fallen-back cache commits again and its new state sticks
    p.write_bytes(flip(raw, start + 100))
    with km.PagedKVCache.open(p) as c:
        c.append(c.find_sequence("b"), 1, tokens(3, 70), tokens(3, 71))
        c.flush()
        want = snapshot(c)
    with km.PagedKVCache.open(p, mode="r") as c:
        assert snapshot(c) == want and c.verify() == []


def test_older_slot_damage_is_harmless_and_both_damaged_is_refused(tmp_path, pristine):
    raw, _, snap_b, _, _ = pristine
    old = 1 - newest_slot(raw)
    p = write(tmp_path, flip(raw, SB + old * SLOT + 70))
    with km.PagedKVCache.open(p, mode="r") as c:
        assert snapshot(c) == snap_b
    both = flip(flip(raw, SB + 70), SB + SLOT + 70)
    refused(write(tmp_path, both), "neither metadata slot")


def slot_generation(raw: bytes, slot: int) -> int:
    return struct.unpack_from("<Q", raw, SB + slot * SLOT + 8)[0]


def test_slot_header_padding_must_be_zero(tmp_path, pristine):
    """Bytes 32..63 of a slot header are zero (FORMAT.md) and no checksum covers them: a
    nonzero byte there makes the slot damaged, for open(), the reader's staleness check
    and `kvmmap verify` alike."""
    raw, snap_a, snap_b, _, _ = pristine
    new, old = newest_slot(raw), 1 - newest_slot(raw)
    for off in (32, 45, 63):
        p = write(tmp_path, set_field(raw, SB + new * SLOT + off, 1, 0x80))
        with km.PagedKVCache.open(p, mode="r") as c:
            assert snapshot(c) == snap_a and c.verify() == []
            assert km.core.metaslot.newest_generation(c._fd, c._sb) == slot_generation(raw, old)
        res = verify_cache(p)
        assert [s["state"] for s in sorted(res["slots"], key=lambda s: s["slot"] != new)] == ["damaged", "valid"]
    p = write(tmp_path, set_field(raw, SB + old * SLOT + 40, 1, 1))
    with km.PagedKVCache.open(p, mode="r") as c:
        assert snapshot(c) == snap_b
    both = set_field(set_field(raw, SB + old * SLOT + 40, 1, 1), SB + new * SLOT + 40, 1, 1)
    refused(write(tmp_path, both), "neither metadata slot")


def test_checksummed_but_invalid_newest_slot_is_refused_naming_both_slots(tmp_path, pristine):
    """A newest slot whose checksums hold but whose contents are invalid is not a torn
    write (that fails a checksum): open() refuses, in both modes, rather than fall back to
    the older commit, and says which slot, which generations, and why."""
    raw, _, _, pb, used = pristine
    new, old = newest_slot(raw), 1 - newest_slot(raw)
    g_new, g_old = slot_generation(raw, new), slot_generation(raw, old)
    assert g_new == g_old + 1
    bad = fix_checksums(set_field(raw, SB + new * SLOT + 64 + 16, 4, 7))      # payload reserved field
    refused(write(tmp_path, bad),
            rf"the newest commit \(slot {new}, generation {g_new}\) passes its checksums but is invalid: "
            rf"reserved field is 7, expected 0\. Slot {old} holds an older commit \(generation {g_old}\), "
            r"not used: .* not an interrupted write")
    # the older slot damaged as well
    refused(write(tmp_path, flip(bad, SB + old * SLOT + 70)),
            rf"generation {g_new}\) passes .* Slot {old} holds no valid commit")
    # a file cut short behind a valid commit is refused the same way, though every page of
    # the older commit is still there
    assert struct.unpack_from("<Q", raw, SB + old * SLOT + 64)[0] <= max(used)
    refused(write(tmp_path, raw[:ARENA + max(used) * pb]), rf"truncated file\. Slot {old} holds an older commit")
    r = verify_cache(write(tmp_path, bad))
    assert not r["ok"] and any(f"generation {g_new}" in p for p in r["problems"])


def test_damaged_data_pages_are_named_by_verify(tmp_path, pristine):
    raw, _, snap_b, pb, used = pristine
    rng = np.random.default_rng(0)
    p = tmp_path / "d.kvm"
    for page in used:
        off = ARENA + page * pb + int(rng.integers(pb))
        p.write_bytes(flip(raw, off, 0x01))
        with km.PagedKVCache.open(p, mode="r") as c:
            assert c.verify() == [page]
            snapshot(c)                   # reading damaged data returns (wrong) numbers, no crash
    # two pages at once, one of them shared by the fork
    shared = used[0]
    p.write_bytes(flip(flip(raw, ARENA + shared * pb + 3), ARENA + used[-1] * pb + 5))
    with km.PagedKVCache.open(p, mode="r") as c:
        assert c.verify() == [shared, used[-1]]
    # capacity past the pages in use is not checked: damage there is harmless
    spare = (len(raw) - ARENA) // pb - 1
    assert spare > max(used)
    p.write_bytes(flip(raw, ARENA + spare * pb + 7))
    with km.PagedKVCache.open(p, mode="r") as c:
        assert c.verify() == [] and snapshot(c) == snap_b


def test_truncated_files(tmp_path, pristine):
    raw, _, snap_b, pb, used = pristine
    committed_end = ARENA + (max(used) + 1) * pb     # high water covers every used page here
    lengths = [0, 1, 8, 100, SB - 1, SB, SB + 63, SB + SLOT - 1, SB + SLOT + 10, ARENA - 1, ARENA,
               ARENA + pb // 2, ARENA + pb, committed_end - 1]
    for n in lengths:
        refused(write(tmp_path, raw[:n]))
    for n in (committed_end, committed_end + pb + 3, len(raw) - 1):
        with km.PagedKVCache.open(write(tmp_path, raw[:n]), mode="r") as c:
            assert snapshot(c) == snap_b and c.verify() == []


def test_fallback_after_damage_finds_the_previous_commit_intact(tmp_path):
    """Commit B frees pages that commit A used. They stay unused until a commit after B
    (A is still on disk, in the other slot): if B's slot is damaged, the fallback to A reads
    exactly A's data. Two commits later they are reused, and A's slot is gone by then."""
    path = tmp_path / "r.kvm"
    c = km.PagedKVCache.create(path, **GEO, meta_slot_bytes=SLOT)
    x = c.new_sequence("x")
    kx, vx = tokens(12, 1), tokens(12, 2)
    c.append(x, 0, kx, vx)
    want = c.read(x, 0)
    c.flush()                                       # A
    pages_a = c.block_table(x, 0).tolist()
    c.free(x)
    keep = c.new_sequence("keep")
    c.flush()                                       # B: x's pages are retired, not free
    c.append(keep, 0, tokens(12, 3), tokens(12, 4))
    assert not set(c.block_table(keep, 0).tolist()) & set(pages_a)
    c.close()                                       # killed here, in effect: B is the newest commit
    raw = path.read_bytes()
    dmg = write(tmp_path, flip(raw, SB + newest_slot(raw) * SLOT + 80))
    with km.PagedKVCache.open(dmg, mode="r") as c:
        assert list(c.sequences().values()) == ["x"]
        assert c.verify() == []
        for got, ref in zip(c.read(c.find_sequence("x"), 0), want):
            np.testing.assert_array_equal(got, ref)
    # reopened for writing at B, the pages A lists stay retired until the next commit
    with km.PagedKVCache.open(path) as c:
        keep = c.find_sequence("keep")
        c.append(keep, 0, tokens(12, 3), tokens(12, 4))
        assert not set(c.block_table(keep, 0).tolist()) & set(pages_a)
        c.flush()                                   # C replaces A's slot: A's pages are free now
        c.append(keep, 0, tokens(12, 5), tokens(12, 6))
        assert set(c.block_table(keep, 0).tolist()) & set(pages_a)


# ------------------------------------------------------------------ hostile files

def fix_checksums(raw: bytes) -> bytes:
    """Recompute the superblock and both slot checksums, as a forger would."""
    b = bytearray(raw)
    if len(b) >= SB:
        b[SB - 4:SB] = struct.pack("<I", crc32c.crc32c(bytes(b[:SB - 4])))
    for at in (SB, SB + SLOT):          # where the slots of the original file are
        if at + 64 > len(b):
            continue
        length = struct.unpack_from("<Q", b, at + 16)[0]
        if at + 64 + length <= len(b):
            struct.pack_into("<I", b, at + 24, crc32c.crc32c(bytes(b[at + 64:at + 64 + length])))
        struct.pack_into("<I", b, at + 28, crc32c.crc32c(bytes(b[at:at + 28])))
    return bytes(b)


def payload_fields(raw: bytes) -> list[tuple[int, int]]:
    """(absolute offset, width) of every integer field of the newest slot's payload."""
    slot = newest_slot(raw)
    base = SB + slot * SLOT + 64
    pay = raw[base:base + slot_payload_len(raw, slot)]
    fields = [(0, 8), (8, 4), (12, 4), (16, 4)]
    hw, nseq = struct.unpack_from("<QI", pay, 0)
    off = 20 + 4 * hw
    fields += [(20 + 4 * i, 4) for i in range(hw)]
    H, P, D = GEO["num_kv_heads"], GEO["page_size"], GEO["head_dim"]
    tail = (H * P * D + 4 * H * P) + 4 * H * P * D        # int8 K codes + scales, int4 V float tail
    for _ in range(nseq):
        fields += [(off, 4), (off + 4, 2), (off + 6, 2)]
        name_len = struct.unpack_from("<H", pay, off + 4)[0]
        off += 8 + name_len + (-name_len % 4)
        for _ in range(GEO["num_layers"]):
            fields += [(off, 8), (off + 8, 4), (off + 12, 4)]
            nbt = struct.unpack_from("<I", pay, off + 12)[0]
            fields += [(off + 16 + 4 * i, 4) for i in range(nbt)]
            off += 16 + 4 * nbt + tail
    assert off == len(pay)
    return [(base + o, w) for o, w in fields]


SUPERBLOCK_FIELDS = [(8, 2), (10, 2), (12, 4), (16, 4), (20, 4), (24, 4), (28, 4), (32, 1), (33, 1),
                     (34, 2), (36, 2), (38, 2), (40, 8), (48, 8), (56, 8), (64, 8)]
SLOT_FIELDS = [(SB + i * SLOT + o, w) for i in (0, 1) for o, w in ((8, 8), (16, 8))]


def set_field(raw: bytes, off: int, width: int, value: int) -> bytes:
    b = bytearray(raw)
    b[off:off + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return bytes(b)


def mappings_of(path) -> list[tuple[int, int]]:
    """(file offset, length) of this process's mappings of ``path``."""
    real = os.path.realpath(path)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == real:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((int(parts[2], 16), hi - lo))
    return out


def open_hostile(path):
    """Open a crafted file: a kvmmap error, or a cache that reads, verifies and stays in bounds.

    Returns "refused" or "opened". Checks that open() allocated at most a bounded amount
    (twice the file size plus 1 MiB) and mapped nothing past the end of the file.
    """
    size = os.path.getsize(path)
    before = path.read_bytes()
    tracemalloc.start()
    try:
        c = km.PagedKVCache.open(path, mode="r+")
    except km.CacheFileError:
        outcome, c = "refused", None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= 2 * size + (1 << 20), f"open() allocated {peak} bytes for a {size}-byte file"
    if c is not None:
        outcome = "opened"
        limit = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        for off, length in mappings_of(path):
            assert off + length <= limit, f"mapped [{off}, {off + length}) of a {size}-byte file"
        for sid in c.sequences():
            for layer in range(c.num_layers):
                k, v = c.read(sid, layer)
                assert k.shape == v.shape == (c.seq_len(sid, layer), c.num_kv_heads, c.head_dim)
        assert all(isinstance(p, int) for p in c.verify())
        c.close()
    assert path.read_bytes() == before
    return outcome


HOSTILE = {   # name: list of (offset, width, value), applied before checksums are recomputed
    "huge metadata slots": [(56, 8, 1 << 40), (64, 8, SB + (2 << 40))],
    "huge slot and payload length": [(56, 8, 1 << 40), (64, 8, SB + (2 << 40)), (SB + 16, 8, 1 << 39)],
    "payload length at the slot capacity": [(SB + 16, 8, SLOT - 64), (SB + SLOT + 16, 8, SLOT - 64)],
    "slots past the end of the file": [(56, 8, 1 << 20), (64, 8, SB + (2 << 20))],
    "huge geometry": [(20, 4, 4096), (24, 4, 16384), (28, 4, 65536)],
    "huge page_bytes": [(40, 8, 1 << 60)],
    "arena offset wraps": [(64, 8, (1 << 64) - 4096)],
    "unknown format id": [(32, 1, 99)],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_superblock(tmp_path, pristine, case):
    raw = pristine[0]
    for off, width, value in HOSTILE[case]:
        raw = set_field(raw, off, width, value)
    assert open_hostile(write(tmp_path, fix_checksums(raw))) == "refused"


def test_hostile_geometry_that_matches_its_page_bytes(tmp_path, pristine):
    """A header that is self-consistent but claims tails far larger than its metadata slot."""
    raw = pristine[0]
    H, P, D = 4096, 1024, 1024
    layout = km.core.layout.PageLayout(H, D, P, "int8", "int4", 32)
    for off, width, value in [(20, 4, H), (24, 4, D), (28, 4, P), (36, 2, 32), (40, 8, layout.page_bytes)]:
        raw = set_field(raw, off, width, value)
    assert open_hostile(write(tmp_path, fix_checksums(raw))) == "refused"


def test_reserved_and_name_fields_are_checked(tmp_path, pristine):
    """Fields FORMAT.md fixes (reserved 0, has_name 0 or 1, UTF-8 names) are refused otherwise."""
    raw = pristine[0]
    slot = newest_slot(raw)
    base = SB + slot * SLOT + 64
    hw = struct.unpack_from("<Q", raw, base)[0]
    seq0 = base + 20 + 4 * hw                     # first sequence: "a"
    cases = {
        "reserved": [(base + 16, 4, 1)],
        "has_name 2": [(seq0 + 6, 2, 2)],
        "name bytes without has_name": [(seq0 + 6, 2, 0)],
        "name not UTF-8": [(seq0 + 8, 1, 0xFF)],
    }
    for name, edits in cases.items():
        b = raw
        for off, width, value in edits:
            b = set_field(b, off, width, value)
        # checksums hold, so this is the committed state, and it is refused as a whole
        refused(write(tmp_path, fix_checksums(b)), "damaged metadata")


def block_table_entries(raw: bytes) -> dict:
    """{(sequence index, layer): [absolute offsets of its page ids]} in the newest slot."""
    fields = payload_fields(raw)
    base = SB + newest_slot(raw) * SLOT + 64
    hw = struct.unpack_from("<Q", raw, base)[0]
    out, i, seq = {}, 4 + hw, 0
    while i < len(fields):
        i += 3                                             # id, name length, has_name
        for layer in range(GEO["num_layers"]):
            npages = struct.unpack_from("<I", raw, fields[i + 2][0])[0]
            out[(seq, layer)] = [off for off, _ in fields[i + 3:i + 3 + npages]]
            i += 3 + npages
        seq += 1
    return out


@pytest.mark.parametrize("case", ["twice in one table", "two layers", "past high water"])
def test_verify_finds_a_broken_page_table(tmp_path, pristine, case):
    """A commit whose checksums hold but whose block tables break FORMAT.md's rules is
    damage in verify's report (and the CLI's), not a clean file."""
    raw = pristine[0]
    tables = block_table_entries(raw)
    page_of = lambda off: struct.unpack_from("<I", raw, off)[0]   # noqa: E731
    if case == "twice in one table":
        dst, src, want = tables[(0, 0)][1], tables[(0, 0)][0], "twice"
    elif case == "two layers":
        dst, src, want = tables[(0, 1)][0], tables[(0, 0)][0], "another layer"
    else:
        dst, src, want = tables[(0, 0)][0], None, "beyond the"
    value = page_of(src) if src is not None else struct.unpack_from("<Q", raw, SB + newest_slot(raw) * SLOT + 64)[0]
    p = write(tmp_path, fix_checksums(set_field(raw, dst, 4, value)))
    res = verify_cache(p)
    assert res["outcome"] == "damaged" and not res["ok"]
    assert any(want in problem for problem in res["problems"]), res["problems"]
    assert verify_cache(write(tmp_path, raw, "clean.kvm"))["ok"]


def test_hostile_payload_fields(tmp_path, pristine):
    """Every payload integer set to extreme values, checksums fixed: refused or consistent."""
    raw = pristine[0]
    p = tmp_path / "h.kvm"
    outcomes = {"refused": 0, "opened": 0}
    for off, width in payload_fields(raw):
        orig = int.from_bytes(raw[off:off + width], "little")
        for value in {0, 1, orig + 1, orig - 1, (1 << (8 * width)) - 1, 1 << (8 * width - 1)}:
            p.write_bytes(fix_checksums(set_field(raw, off, width, value)))
            outcomes[open_hostile(p)] += 1
    assert outcomes["refused"] > 0 and outcomes["opened"] > 0, outcomes


def test_a_higher_minor_version_may_use_the_reserved_bytes(tmp_path, pristine):
    """FORMAT.md: a higher minor of major 1 is read, additions only in the reserved bytes
    104..4091; a 1.0 file must keep them zero."""
    raw, _, snap_b, _, _ = pristine
    v11 = fix_checksums(set_field(set_field(raw, 10, 2, 1), 200, 1, 0x5A))     # minor 1, a field of 1.1
    p = write(tmp_path, v11)
    for mode in ("r", "r+"):
        with km.PagedKVCache.open(p, mode=mode) as c:
            assert c.version == (1, 1) and snapshot(c) == snap_b and c.verify() == []
    assert verify_cache(p)["ok"]
    with km.PagedKVCache.open(p, mode="r+") as c:          # a writer keeps the superblock as it is
        c.append(0, 0, tokens(3, 70), tokens(3, 71))
        c.flush()
    assert p.read_bytes()[:SB] == v11[:SB]
    with km.PagedKVCache.open(p, mode="r") as c:
        assert c.seq_len(0, 0) == 32
    refused(write(tmp_path, fix_checksums(set_field(raw, 200, 1, 0x5A))), "reserved bytes .* version 1.0")
    # flags and the superblock size stay fixed in every 1.x
    refused(write(tmp_path, fix_checksums(set_field(set_field(raw, 10, 2, 1), 38, 2, 1))), "flags 1")


def craft(tmp_path, raw, edits, name="g.kvm"):
    for off, width, value in edits:
        raw = set_field(raw, off, width, value)
    return write(tmp_path, fix_checksums(raw), name)


def test_group_size_fields_and_int4_head_dim_are_validated(tmp_path, pristine):
    """Offsets 34 / 36 (K / V group size) and the even head_dim of int4, with checksums and
    page_bytes forged to match: each is refused for what it breaks."""
    raw, _, snap_b, _, _ = pristine                 # K int8, V int4 in groups of 32, D 32, P 4
    H, D, P = GEO["num_kv_heads"], GEO["head_dim"], GEO["page_size"]
    assert struct.unpack_from("<HH", raw, 34) == (0, 32)
    refused(craft(tmp_path, raw, [(34, 2, P)]), "k group size is 4, expected 0 for int8 keys")
    refused(craft(tmp_path, raw, [(36, 2, 0)]), "v group size is 0, expected an even number in 2..256")
    pb12 = km.core.layout.PageLayout(H, D, P, "int8", "int4", 12).page_bytes      # 12 does not divide 32
    refused(craft(tmp_path, raw, [(36, 2, 12), (40, 8, pb12)]), "v group size is 12, .* divides head_dim=32")

    # K int4, V fp16, no sequences (a tail's size does not depend on what is forged below)
    path = tmp_path / "k4.kvm"
    km.PagedKVCache.create(path, num_layers=1, num_kv_heads=H, head_dim=D, page_size=P, k_format="int4",
                           v_format="fp16", meta_slot_bytes=SLOT).close()
    k4 = path.read_bytes()
    assert struct.unpack_from("<HH", k4, 34) == (P, 0)
    with km.PagedKVCache.open(path, mode="r") as c:
        assert c.sequences() == {}
    refused(craft(tmp_path, k4, [(34, 2, 2 * P)]), "k group size is 8, expected page_size=4 for int4 keys")
    refused(craft(tmp_path, k4, [(36, 2, 32)]), "v group size is 32, expected 0 for fp16 values")
    odd = km.core.layout.PageLayout(H, D - 1, P, "int4", "fp16", 0).page_bytes
    refused(craft(tmp_path, k4, [(24, 4, D - 1), (40, 8, odd)]), "head_dim=31 is odd")


def test_verify_calls_a_slot_with_nonzero_padding_damaged_not_empty(tmp_path):
    path = tmp_path / "e.kvm"
    km.PagedKVCache.create(path, **GEO, meta_slot_bytes=SLOT).close()    # one commit, in slot 0
    assert [s["state"] for s in verify_cache(path)["slots"]] == ["valid", "empty"]
    raw = path.read_bytes()
    p = write(tmp_path, set_field(raw, SB + SLOT + 40, 1, 1))            # slot 1's padding only
    assert [s["state"] for s in verify_cache(p)["slots"]] == ["valid", "damaged"]
    with km.PagedKVCache.open(p, mode="r") as c:
        assert c.sequences() == {}


# ------------------------------------------------------------------ fuzz

@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_header_and_metadata(tmp_path, pristine, data):
    raw = pristine[0]
    slot = newest_slot(raw)
    end = SB + slot * SLOT + 64 + slot_payload_len(raw, slot)
    fields = SUPERBLOCK_FIELDS + SLOT_FIELDS + payload_fields(raw)
    b = raw
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        if data.draw(st.booleans(), label="field or byte"):
            off, width = data.draw(st.sampled_from(fields), label="field")
            value = data.draw(st.one_of(st.integers(0, 64), st.integers(0, (1 << (8 * width)) - 1),
                                        st.sampled_from([(1 << (8 * width)) - 1, 1 << (8 * width - 1)])),
                              label="value")
            b = set_field(b, off, width, value)
        else:
            off = data.draw(st.integers(0, end - 1), label="byte")
            b = flip(b, off, data.draw(st.integers(1, 255), label="mask"))
    if data.draw(st.booleans(), label="forge checksums"):
        b = fix_checksums(b)
    if data.draw(st.booleans(), label="truncate"):
        b = b[:data.draw(st.integers(0, len(b)), label="length")]
    p = tmp_path / "fuzz.kvm"
    p.write_bytes(b)
    open_hostile(p)
