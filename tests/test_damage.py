"""Damaged and hostile files: open refuses with a kvmmap error or verify() names the damage.

A small cache holds three commits: create's (empty), A, then B (no page is freed between A
and B, so falling back from B to A is exact). Every test damages a copy of it and checks:

* superblock: every single flipped byte is refused;
* the newest commit root torn (any byte flipped, a write cut short at any byte, reserved
  bytes not zero): open falls back to commit A, exactly; both roots: refused; the older
  root: harmless;
* the newest root valid but a blob it leads to damaged (index or record, header or
  content): refused, not fallen back (Commits.load: a root is written after everything
  it lists was synced, so this is not an interrupted write), naming both roots;
* a commit whose checksums hold but whose contents are invalid (forged: every checksum
  recomputed): refused, naming both roots and why; page ids beyond the high-water mark, a
  cycle in a blob chain, a page listed twice or by two layers, a metadata page also
  listed as data, by two blobs, or by a blob and a record;
* data pages (full, partly filled, residual): open works and verify() returns exactly the
  damaged page; bytes no commit lists (rows past a partly filled page's, free pages) are
  not damage;
* truncated files: refused unless every committed page is still whole;
* a higher minor version may use the reserved superblock bytes; 2.0 may not; group size
  fields and int4's even head_dim are checked;
* hostile files, whose checksums are recomputed after crafting, so only validation stands
  between them and the reader: refused without allocating more than a bounded amount, and
  never mapped past the end of the file;
* hypothesis fuzz over header, roots and metadata bytes and fields.

Expectations come from tests/reference.py, a numpy reader of docs/FORMAT.md that shares
nothing with kvmmap. A refused open changes nothing in the file.
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

from reference import parse_cache_file, parse_superblock, valid_roots

GEO = dict(num_layers=2, num_kv_heads=2, head_dim=32, page_size=4, k_format="int8", v_format="int4")
SB = 4096
ROOT_BYTES = 4096
ARENA = SB + 2 * ROOT_BYTES
BLOB_HEAD = 16
NO_PAGE = 0xFFFFFFFF
FUZZ_EXAMPLES = 500


def snapshot(c) -> dict:
    return {name: [tuple(a.tobytes() for a in c.read(sid, layer)) for layer in range(c.num_layers)]
            for sid, name in c.sequences().items()}


def tokens(n, seed):
    return np.random.default_rng(seed).standard_normal((n, GEO["num_kv_heads"], GEO["head_dim"]), dtype=np.float32)


def root_at(i: int) -> int:
    return SB + i * ROOT_BYTES


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(file bytes, snapshot of commit A, snapshot of commit B, page_bytes, data pages of B,
    root bytes that B's commit overwrote)."""
    path = tmp_path_factory.mktemp("pristine") / "c.kvm"
    c = km.PagedKVCache.create(path, **GEO)
    a = c.new_sequence("a")
    for layer in range(2):
        c.append(a, layer, tokens(23, layer), tokens(23, 10 + layer))
    b = c.fork(a, name="b")
    for layer in range(2):
        c.append(b, layer, tokens(5, 20 + layer), tokens(5, 30 + layer))
    c.flush()
    snap_a = snapshot(c)
    before = path.read_bytes()
    for layer in range(2):
        c.append(a, layer, tokens(6, 40 + layer), tokens(6, 50 + layer))
    s = c.new_sequence("c")
    c.append(s, 0, tokens(9, 60), tokens(9, 61))
    c.flush()
    snap_b = snapshot(c)
    used = sorted({int(p) for sid in c.sequences() for layer in range(2) for p in c.block_table(sid, layer)})
    pb = c.stats()["page_bytes"]
    c.close()
    # open() imports modules on its first call: done here, so that open_hostile's bound on
    # what open() allocates measures open() alone, in whatever order the tests run
    with km.PagedKVCache.open(path, mode="r+") as c:
        c.verify()
    raw = path.read_bytes()
    new = newest_root(raw)
    return raw, snap_a, snap_b, pb, used, before[root_at(new):root_at(new) + 64]


def geo_of(raw: bytes) -> dict:
    return parse_superblock(raw)


def roots(raw: bytes) -> dict:
    """{root index: generation} of the valid roots (the reference's reading)."""
    out = {}
    for i in (0, 1):
        one = bytearray(raw[:ARENA])
        other = root_at(1 - i)
        one[other:other + 64] = bytes(64)
        found = valid_roots(bytes(one), geo_of(raw))
        if found:
            out[i] = found[0][0]
    return out


def newest_root(raw: bytes) -> int:
    r = roots(raw)
    return max(r, key=r.get)


def root_fields(raw: bytes, i: int) -> dict:
    at = root_at(i)
    _, gen, hw, ibytes, ipage, icrc, next_id, nseq = struct.unpack_from("<8sQQQIIII", raw, at)
    return {"generation": gen, "high_water": hw, "index_bytes": ibytes, "index_page": ipage, "index_crc": icrc,
            "next_id": next_id, "num_sequences": nseq}


def blob_pages(raw: bytes, pb: int, first: int) -> list[int]:
    pages, page = [], first
    while page != NO_PAGE and len(pages) < 1000:
        pages.append(page)
        page = struct.unpack_from("<I", raw, ARENA + page * pb + 4)[0]
    return pages


def blob_offsets(raw: bytes, pb: int, first: int) -> list[int]:
    """File offset of each content byte of the blob starting at page ``first``.

    A page header claiming more bytes than a page holds (the fuzz forges them) counts as a
    full page: followed as written, one such header made a list of 1.7e9 offsets."""
    out = []
    for page in blob_pages(raw, pb, first):
        at = ARENA + page * pb
        used = min(struct.unpack_from("<I", raw, at + 8)[0], pb - BLOB_HEAD)
        out += range(at + BLOB_HEAD, at + BLOB_HEAD + used)
    return out


class Commit:
    """A commit's metadata as the reference reads it, with where each byte lies in the file."""

    def __init__(self, raw: bytes, root: int):
        self.geo = geo_of(raw)
        pb = self.pb = self.geo["page_bytes"]
        self.root = root
        self.fields = root_fields(raw, root)
        self.index_pages = blob_pages(raw, pb, self.fields["index_page"]) if self.fields["num_sequences"] else []
        self.index_at = blob_offsets(raw, pb, self.fields["index_page"]) if self.fields["num_sequences"] else []
        index = bytes(raw[o] for o in self.index_at)
        self.entries = np.frombuffer(index, "<u4").reshape(-1, 4).tolist()
        self.records = {}            # sid: (index entry number, content offsets, record pages)
        for n, (sid, page, nbytes, crc) in enumerate(self.entries):
            self.records[sid] = (n, blob_offsets(raw, pb, page), blob_pages(raw, pb, page))

    def record_fields(self, raw: bytes, sid: int) -> list[tuple[int, int]]:
        """(file offset, width) of every integer field of a record, page lists included."""
        at = self.records[sid][1]
        data = bytes(raw[o] for o in at)
        fields = [(0, 4), (4, 2), (6, 2), (8, 8)]
        name_len = struct.unpack_from("<H", data, 4)[0]
        off = 16 + name_len + (-name_len % 8)
        for _ in range(self.geo["num_layers"]):
            n_pos, first, npg, nres, zero = struct.unpack_from("<QIIII", data, off)
            fields += [(off, 8), (off + 8, 4), (off + 12, 4), (off + 16, 4), (off + 20, 4)]
            off += 24
            fields += [(off + 4 * i, 4) for i in range(2 * (npg + nres))]
            off += 8 * (npg + nres)
        return [(at[o], w) for o, w in fields]

    def page_lists(self, raw: bytes, sid: int) -> list[list[int]]:
        """Per layer, the file offsets of the record's data page ids."""
        at = self.records[sid][1]
        data = bytes(raw[o] for o in at)
        name_len = struct.unpack_from("<H", data, 4)[0]
        off, out = 16 + name_len + (-name_len % 8), []
        for _ in range(self.geo["num_layers"]):
            n_pos, first, npg, nres, zero = struct.unpack_from("<QIIII", data, off)
            off += 24
            out.append([at[off + 4 * i] for i in range(npg)])
            off += 8 * (npg + nres)
        return out

    def index_fields(self) -> list[tuple[int, int]]:
        return [(self.index_at[o], 4) for o in range(0, len(self.index_at), 4)]

    def metadata_pages(self) -> list[int]:
        return self.index_pages + [p for r in self.records.values() for p in r[2]]


def fix_checksums(raw: bytes) -> bytes:
    """Recompute, as a forger would, the superblock's checksum, each record's CRC in the
    newest commit's index (by the entries as they stand), the index CRC in its root and
    both roots' checksums. Whatever cannot be followed is left alone."""
    b = bytearray(raw)
    if len(b) >= SB:
        b[SB - 4:SB] = struct.pack("<I", crc32c.crc32c(bytes(b[:SB - 4])))
    try:
        geo = geo_of(bytes(b))
        pb = geo["page_bytes"]
        if len(b) >= ARENA and 64 <= pb <= (1 << 24):
            gens = [struct.unpack_from("<Q", b, root_at(i) + 8)[0] for i in (0, 1)]
            i = int(np.argmax(gens))
            f = root_fields(bytes(b), i)
            if f["num_sequences"] and f["index_page"] != NO_PAGE:
                index_at = blob_offsets(bytes(b), pb, f["index_page"])
                for e in range(len(index_at) // 16):
                    sid, page, nbytes, _ = struct.unpack_from("<IIII", bytes(b[o] for o in index_at[e * 16:e * 16 + 16]))
                    try:
                        content = bytes(b[o] for o in blob_offsets(bytes(b), pb, page))[:nbytes]
                    except (struct.error, IndexError):
                        continue                    # a record past the end of the file
                    for k, byte in enumerate(struct.pack("<I", crc32c.crc32c(content))):
                        b[index_at[e * 16 + 12 + k]] = byte
                index = bytes(b[o] for o in index_at)[:f["index_bytes"]]
                struct.pack_into("<I", b, root_at(i) + 36, crc32c.crc32c(index))
    except (AssertionError, KeyError, struct.error, IndexError, ValueError, MemoryError):
        pass
    for i in (0, 1):
        at = root_at(i)
        if at + 64 <= len(b) and any(b[at:at + 64]):
            struct.pack_into("<I", b, at + 60, crc32c.crc32c(bytes(b[at:at + 60])))
    return bytes(b)


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


def set_field(raw: bytes, off: int, width: int, value: int) -> bytes:
    b = bytearray(raw)
    b[off:off + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return bytes(b)


def test_pristine_file_reads_as_the_reference_says(pristine):
    """The fixture is what the tests below assume: three commits, B newest, A before it,
    the index and records of B in blobs, no page freed between A and B."""
    raw, snap_a, snap_b, pb, used, _ = pristine
    parsed = parse_cache_file(raw)
    assert parsed["commits"] == 2 and sorted(roots(raw).values()) == [parsed["generation"] - 1, parsed["generation"]]
    assert {s["name"] for s in parsed["seqs"].values()} == {"a", "b", "c"} == set(snap_b)
    assert set(snap_a) == {"a", "b"}
    data = {p for s in parsed["seqs"].values() for layer in s["layers"] for p in layer["pages"] + layer["res"]}
    assert sorted(data) == used
    meta = Commit(raw, newest_root(raw)).metadata_pages()
    assert len(meta) == 4 and not set(meta) & data and max(meta + used) < parsed["high_water"]


# ------------------------------------------------------------------ plain damage

def test_every_superblock_byte_flip_is_refused(tmp_path, pristine):
    raw = pristine[0]
    p = tmp_path / "d.kvm"
    for off in range(SB):
        p.write_bytes(flip(raw, off, 1 << (off % 8)))
        with pytest.raises(km.CacheFileError):
            km.PagedKVCache.open(p, mode="r")


def torn_roots(raw: bytes, old: bytes):
    """The newest root flipped at each byte, and cut short at each byte over what was there."""
    at = root_at(newest_root(raw))
    for off in range(64):
        yield flip(raw, at + off)
    new = raw[at:at + 64]
    for k in range(1, 64):
        torn = new[:k] + old[k:]
        if torn != new:
            b = bytearray(raw)
            b[at:at + 64] = torn
            yield bytes(b)


def test_torn_newest_root_falls_back_to_the_previous_commit(tmp_path, pristine):
    raw, snap_a, snap_b, _, _, old = pristine
    new = newest_root(raw)
    p = tmp_path / "d.kvm"
    for n, b in enumerate(torn_roots(raw, old)):
        p.write_bytes(b)
        found = roots(b)                                   # torn, or (cut at byte 1) the old root again
        assert max(found, key=found.get) == 1 - new, n
        with km.PagedKVCache.open(p, mode="r") as c:
            assert snapshot(c) == snap_a, n
            assert c.verify() == []
    # the fallen-back cache commits again and its new state sticks
    p.write_bytes(flip(raw, root_at(new) + 20))
    with km.PagedKVCache.open(p) as c:
        c.append(c.find_sequence("b"), 1, tokens(3, 70), tokens(3, 71))
        c.flush()
        want = snapshot(c)
    with km.PagedKVCache.open(p, mode="r") as c:
        assert snapshot(c) == want and c.verify() == []


def test_root_reserved_bytes_must_be_zero(tmp_path, pristine):
    """Bytes 48..59 of a root are zero (FORMAT.md): nonzero, even under a matching
    checksum, the root is damaged for open() and `kvmmap verify` alike."""
    raw, snap_a, snap_b, _, _, _ = pristine
    new, old = newest_root(raw), 1 - newest_root(raw)
    for off in (48, 53, 59):
        b = fix_checksums(set_field(raw, root_at(new) + off, 1, 0x80))
        p = write(tmp_path, b)
        with km.PagedKVCache.open(p, mode="r") as c:
            assert snapshot(c) == snap_a and c.verify() == []
        res = verify_cache(p)
        assert {s["slot"]: s["state"] for s in res["slots"]} == {new: "damaged", old: "valid"}
    p = write(tmp_path, fix_checksums(set_field(raw, root_at(old) + 50, 1, 1)))
    with km.PagedKVCache.open(p, mode="r") as c:
        assert snapshot(c) == snap_b


def test_older_root_damage_is_harmless_and_both_damaged_is_refused(tmp_path, pristine):
    raw, _, snap_b, _, _, _ = pristine
    old = 1 - newest_root(raw)
    p = write(tmp_path, flip(raw, root_at(old) + 20))
    with km.PagedKVCache.open(p, mode="r") as c:
        assert snapshot(c) == snap_b and c.verify() == []
    with pytest.raises(km.CacheFileError, match="no previous commit"):
        km.PagedKVCache.open(p, mode="r", commit="previous")
    both = flip(flip(raw, root_at(0) + 20), root_at(1) + 20)
    refused(write(tmp_path, both), "neither commit root is valid")


def test_damaged_blob_under_a_valid_root_is_refused_not_fallen_back(tmp_path, pristine):
    """Any byte of the newest commit's index or record blobs (headers and content) flipped:
    the root is valid, so open() refuses, naming both roots, rather than fall back to A;
    the previous commit still opens on request."""
    raw, snap_a, _, pb, _, _ = pristine
    new, old = newest_root(raw), 1 - newest_root(raw)
    gens = roots(raw)
    commit = Commit(raw, new)
    shared = set(Commit(raw, old).metadata_pages())        # records of sequences B did not change
    assert shared and set(commit.metadata_pages()) - shared
    offsets = []
    for page in commit.metadata_pages():
        at = ARENA + page * pb
        used = struct.unpack_from("<I", raw, at + 8)[0]
        offsets += list(range(at, at + BLOB_HEAD)) + list(range(at + BLOB_HEAD, at + BLOB_HEAD + used, 3))
    assert len(offsets) > 100
    p = tmp_path / "d.kvm"
    for off in offsets:
        b = flip(raw, off)
        p.write_bytes(b)
        with pytest.raises(km.CacheFileError) as e:
            km.PagedKVCache.open(p, mode="r")
        msg = str(e.value)
        assert (f"the newest commit (root {new}, generation {gens[new]}) passes its checksum but is invalid" in msg
                and f"Root {old} holds an older commit (generation {gens[old]}), not used" in msg), (off, msg)
        if (off - ARENA) // pb in shared:
            with pytest.raises(km.CacheFileError, match="damaged metadata: the previous commit"):
                km.PagedKVCache.open(p, mode="r", commit="previous")
        else:
            with km.PagedKVCache.open(p, mode="r", commit="previous") as c:
                assert snapshot(c) == snap_a and c.verify() == []
    r = verify_cache(p)
    assert not r["ok"] and any(f"generation {gens[new]}" in problem for problem in r["problems"])


def test_damaged_data_pages_are_named_by_verify(tmp_path, pristine):
    raw, _, snap_b, pb, used, _ = pristine
    parsed = parse_cache_file(raw)
    P = GEO["page_size"]
    # the rows each page's checksum covers: all of a full page, the committed rows of the
    # last page (row 0 is committed in every page listed)
    last_rows = {}
    for s in parsed["seqs"].values():
        for layer in s["layers"]:
            if layer["n_pos"] % P:
                last_rows[layer["pages"][-1]] = layer["n_pos"] % P
    rng = np.random.default_rng(0)
    p = tmp_path / "d.kvm"
    for page in used:
        off = ARENA + page * pb + (int(rng.integers(pb)) if page not in last_rows else 0)
        p.write_bytes(flip(raw, off, 0x01))
        with km.PagedKVCache.open(p, mode="r") as c:
            assert c.verify() == [page]
            snapshot(c)                   # reading damaged data returns (wrong) numbers, no crash
        assert not verify_cache(p)["ok"]
    # two pages at once, one of them shared by the fork
    shared = parsed["seqs"][0]["layers"][0]["pages"][0]
    assert shared in parsed["seqs"][1]["layers"][0]["pages"]
    p.write_bytes(flip(flip(raw, ARENA + shared * pb + 3), ARENA + used[-1] * pb + 1))
    with km.PagedKVCache.open(p, mode="r") as c:
        assert c.verify() == sorted({shared, used[-1]})
    # rows past the committed ones of a partly filled page are listed by no commit
    page, rows = next(iter(last_rows.items()))
    codes_k = ARENA + page * pb + (P - 1) * GEO["head_dim"]          # K codes, head 0, last row
    assert rows < P
    p.write_bytes(flip(raw, codes_k))
    with km.PagedKVCache.open(p, mode="r") as c:
        assert c.verify() == [] and snapshot(c) == snap_b
    # pages past the high-water mark are not checked: damage there is harmless
    spare = (len(raw) - ARENA) // pb - 1
    assert spare >= parsed["high_water"]
    p.write_bytes(flip(raw, ARENA + spare * pb + 7))
    with km.PagedKVCache.open(p, mode="r") as c:
        assert c.verify() == [] and snapshot(c) == snap_b


def test_damaged_residual_page_is_named_by_verify(tmp_path):
    """int4 keys of a partly filled page live in residual pages: a flipped byte in their
    used rows is damage of that (sequence, layer)'s last page; past them it is not."""
    path = tmp_path / "k4.kvm"
    c = km.PagedKVCache.create(path, num_layers=1, num_kv_heads=2, head_dim=32, page_size=8, k_format="int4",
                               v_format="fp16")
    s = c.new_sequence()
    c.append(s, 0, tokens(11, 1), tokens(11, 2))
    c.flush()
    c.close()
    raw = path.read_bytes()
    parsed = parse_cache_file(raw)
    layer = parsed["seqs"][0]["layers"][0]
    assert len(layer["res"]) == 1 and layer["n_pos"] == 11
    pb, res, last = parsed["page_bytes"], layer["res"][0], layer["pages"][-1]
    row_bytes = 2 * 2 * 32
    p = write(tmp_path, flip(raw, ARENA + res * pb + 2 * row_bytes + 5))       # residual row 2 (of 3)
    with km.PagedKVCache.open(p, mode="r") as c:
        assert c.verify() == [last]
    p = write(tmp_path, flip(raw, ARENA + res * pb + 3 * row_bytes + 5))       # row 3: not written
    with km.PagedKVCache.open(p, mode="r") as c:
        assert c.verify() == []


def test_truncated_files(tmp_path, pristine):
    raw, _, snap_b, pb, used, _ = pristine
    hw = parse_cache_file(raw)["high_water"]
    committed_end = ARENA + hw * pb
    lengths = [0, 1, 8, 100, SB - 1, SB, SB + 63, ARENA - 1, ARENA, ARENA + pb // 2, ARENA + pb,
               ARENA + (max(used) + 1) * pb, committed_end - 1]
    for n in lengths:
        refused(write(tmp_path, raw[:n]))
    for n in (committed_end, committed_end + pb + 3, len(raw) - 1):
        with km.PagedKVCache.open(write(tmp_path, raw[:n]), mode="r") as c:
            assert snapshot(c) == snap_b and c.verify() == []


def test_a_truncated_file_is_refused_naming_both_roots(tmp_path, pristine):
    """A file cut short behind a valid commit: refused as such, not fallen back, though A
    might still be whole."""
    raw, _, _, pb, _, _ = pristine
    new, old = newest_root(raw), 1 - newest_root(raw)
    hw = root_fields(raw, new)["high_water"]
    refused(write(tmp_path, raw[:ARENA + (hw - 1) * pb]), rf"truncated file\. Root {old} holds an older commit")


def test_fallback_after_damage_finds_the_previous_commit_intact(tmp_path):
    """Commit B frees pages that commit A used. They stay unused until a commit after B
    (A is still on disk, in the other root): if B's root is torn, the fallback to A reads
    exactly A's data. Two commits later they are reused, and A's root is gone by then."""
    path = tmp_path / "r.kvm"
    c = km.PagedKVCache.create(path, **GEO)
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
    dmg = write(tmp_path, flip(raw, root_at(newest_root(raw)) + 20))
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
        c.flush()                                   # C replaces A's root: A's pages are free now
        c.append(keep, 0, tokens(12, 5), tokens(12, 6))
        assert set(c.block_table(keep, 0).tolist()) & set(pages_a)


# ------------------------------------------------------------------ hostile files

SUPERBLOCK_FIELDS = [(8, 2), (10, 2), (12, 4), (16, 4), (20, 4), (24, 4), (28, 4), (32, 1), (33, 1),
                     (34, 2), (36, 2), (38, 2), (40, 8), (48, 8), (56, 8), (64, 8), (104, 8)]
ROOT_FIELDS = [(root_at(i) + o, w) for i in (0, 1) for o, w in ((8, 8), (16, 8), (24, 8), (32, 4), (40, 4), (44, 4))]


def metadata_fields(raw: bytes) -> list[tuple[int, int]]:
    """(file offset, width) of every integer field of the newest commit's index and records."""
    commit = Commit(raw, newest_root(raw))
    out = commit.index_fields()
    for sid in commit.records:
        out += commit.record_fields(raw, sid)
    return out


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
    "roots far away": [(48, 8, 1 << 40)],
    "huge root blocks": [(56, 8, 1 << 40)],
    "arena past the end of the file": [(64, 8, 1 << 20)],
    "arena offset wraps": [(64, 8, (1 << 64) - 4096)],
    "huge geometry": [(20, 4, 4096), (24, 4, 16384), (28, 4, 65536)],
    "huge page_bytes": [(40, 8, 1 << 60)],
    "unknown format id": [(32, 1, 99)],
    "huge max_bytes": [(104, 8, 1 << 63)],
    "huge high water": [(root_at(0) + 16, 8, 1 << 40), (root_at(1) + 16, 8, 1 << 40)],
    "huge index": [(root_at(0) + 24, 8, 1 << 40), (root_at(1) + 24, 8, 1 << 40)],
    "many sequences": [(root_at(0) + 44, 4, 1 << 31), (root_at(1) + 44, 4, 1 << 31)],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_superblock_and_roots(tmp_path, pristine, case):
    raw = pristine[0]
    for off, width, value in HOSTILE[case]:
        raw = set_field(raw, off, width, value)
    assert open_hostile(write(tmp_path, fix_checksums(raw))) == "refused"


def test_max_bytes_below_one_page_is_refused(tmp_path, pristine):
    raw = pristine[0]
    refused(write(tmp_path, fix_checksums(set_field(raw, 104, 8, 1))), "max_bytes")


def test_hostile_geometry_that_matches_its_page_bytes(tmp_path, pristine):
    """A header that is self-consistent but claims pages far larger than the file."""
    raw = pristine[0]
    H, P, D = 4096, 1024, 1024
    layout = km.core.layout.PageLayout(H, D, P, "int8", "int4", 32)
    for off, width, value in [(20, 4, H), (24, 4, D), (28, 4, P), (36, 2, 32), (40, 8, layout.page_bytes)]:
        raw = set_field(raw, off, width, value)
    assert open_hostile(write(tmp_path, fix_checksums(raw))) == "refused"


def forged(raw: bytes, edits) -> bytes:
    for off, width, value in edits:
        raw = set_field(raw, off, width, value)
    return fix_checksums(raw)


def test_forged_commits_are_refused_naming_what_is_wrong(tmp_path, pristine):
    """Every checksum recomputed, so only validation stands between the reader and the
    commit; each is refused as a whole (not fallen back), saying why."""
    raw, _, _, pb, used, _ = pristine
    new, old = newest_root(raw), 1 - newest_root(raw)
    commit = Commit(raw, new)
    hw = commit.fields["high_water"]
    sid_a = 0                                        # "a": 29 tokens in both layers
    rec = commit.records[sid_a][1]
    lists = commit.page_lists(raw, sid_a)
    page_of = lambda off: struct.unpack_from("<I", raw, off)[0]   # noqa: E731
    index_first = commit.index_pages[0]
    record_first = commit.records[sid_a][2][0]
    other_record = commit.records[1][2][0]
    cases = {
        "reserved field of a layer": ([(rec[16 + 2 + 20], 4, 1)], "inconsistent block table"),    # name "a" padded to 8
        "has_name 2": ([(rec[6], 2, 2)], "name field"),
        "name without has_name": ([(rec[6], 2, 0)], "name field"),
        "name not UTF-8": ([(rec[16], 1, 0xFF)], "not UTF-8"),
        "first >= page_size": ([(rec[16 + 8 + 8], 4, GEO["page_size"])], "inconsistent block table"),
        "page beyond high water": ([(lists[0][0], 4, hw)], "beyond the"),
        "page listed twice": ([(lists[0][1], 4, page_of(lists[0][0]))], "twice"),
        "page listed by two layers": ([(lists[1][0], 4, page_of(lists[0][1]))], "another layer"),
        "metadata page listed as data": ([(lists[0][0], 4, index_first)], "metadata page"),
        "record page listed as data": ([(lists[1][1], 4, record_first)], "metadata page"),
        "two entries name one record": ([(commit.index_fields()[5][0], 4, record_first)], "metadata page"),
        "index names a data page": ([(root_at(new) + 32, 4, used[0])], "not a metadata page"),
        "index page beyond high water": ([(root_at(new) + 32, 4, hw)], "broken"),
        "record beyond high water": ([(commit.index_fields()[1][0], 4, hw + 5)], "broken"),
        "index ids not increasing": ([(commit.index_fields()[4][0], 4, 0)], "increasing"),
        "next id below an index id": ([(root_at(new) + 40, 4, 1)], "increasing"),
        "fewer sequences than entries": ([(root_at(new) + 44, 4, 2)], "does not hold"),
        "record of another sequence": ([(rec[0], 4, 1)], "names sequence 1"),
        "high water below the pages": ([(root_at(new) + 16, 8, max(used))], ""),
    }
    del other_record
    for name, (edits, why) in cases.items():
        p = write(tmp_path, forged(raw, edits))
        refused(p, rf"damaged metadata: the newest commit \(root {new}, .*invalid: .*{why}.*Root {old} holds an "
                   r"older commit")
        res = verify_cache(p)
        assert res["outcome"] == "damaged" and any(why in problem for problem in res["problems"]), (name, res)
    assert verify_cache(write(tmp_path, raw, "clean.kvm"))["ok"]


def test_cycle_in_a_blob_chain_is_refused(tmp_path, pristine):
    """Blob headers carry no checksum: a chain that loops (its last page pointing back to
    its first, or to itself) stops after the pages its length needs, and is refused."""
    raw, _, _, pb, _, _ = pristine
    new = newest_root(raw)
    commit = Commit(raw, new)
    for first in [commit.index_pages[0]] + [r[2][0] for r in commit.records.values()]:
        last = blob_pages(raw, pb, first)[-1]
        for target in {first, last}:
            p = write(tmp_path, set_field(raw, ARENA + last * pb + 4, 4, target))
            refused(p, "page chain is broken")


def test_hostile_metadata_fields(tmp_path, pristine):
    """Every integer of the roots, the index and the records set to extreme values,
    checksums fixed: refused or consistent."""
    raw = pristine[0]
    p = tmp_path / "h.kvm"
    outcomes = {"refused": 0, "opened": 0}
    for off, width in ROOT_FIELDS + metadata_fields(raw):
        orig = int.from_bytes(raw[off:off + width], "little")
        for value in {0, 1, orig + 1, orig - 1, (1 << (8 * width)) - 1, 1 << (8 * width - 1)}:
            p.write_bytes(fix_checksums(set_field(raw, off, width, value)))
            outcomes[open_hostile(p)] += 1
    assert outcomes["refused"] > 0 and outcomes["opened"] > 0, outcomes


def test_a_higher_minor_version_may_use_the_reserved_bytes(tmp_path, pristine):
    """FORMAT.md: a higher minor of major 2 is read, additions only in the reserved bytes
    112..4091; a 2.0 file must keep them zero."""
    raw, _, snap_b, _, _, _ = pristine
    v21 = fix_checksums(set_field(set_field(raw, 10, 2, 1), 200, 1, 0x5A))     # minor 1, a field of 2.1
    p = write(tmp_path, v21)
    for mode in ("r", "r+"):
        with km.PagedKVCache.open(p, mode=mode) as c:
            assert c.version == (2, 1) and snapshot(c) == snap_b and c.verify() == []
    assert verify_cache(p)["ok"]
    with km.PagedKVCache.open(p, mode="r+") as c:          # a writer keeps the superblock as it is
        c.append(0, 0, tokens(3, 70), tokens(3, 71))
        c.flush()
    assert p.read_bytes()[:SB] == v21[:SB]
    with km.PagedKVCache.open(p, mode="r") as c:
        assert c.seq_len(0, 0) == 32
    refused(write(tmp_path, fix_checksums(set_field(raw, 200, 1, 0x5A))), "reserved bytes .* version 2.0")
    refused(write(tmp_path, fix_checksums(set_field(raw, 112, 1, 1))), "reserved bytes")
    # flags and the superblock size stay fixed in every 2.x
    refused(write(tmp_path, fix_checksums(set_field(set_field(raw, 10, 2, 1), 38, 2, 1))), "flags 1")
    refused(write(tmp_path, fix_checksums(set_field(raw, 8, 2, 3))), "version 3.0 is not supported")


def craft(tmp_path, raw, edits, name="g.kvm"):
    for off, width, value in edits:
        raw = set_field(raw, off, width, value)
    return write(tmp_path, fix_checksums(raw), name)


def test_group_size_fields_and_int4_head_dim_are_validated(tmp_path, pristine):
    """Offsets 34 / 36 (K / V group size) and the even head_dim of int4, with checksums and
    page_bytes forged to match: each is refused for what it breaks."""
    raw = pristine[0]                               # K int8, V int4 in groups of 32, D 32, P 4
    H, D, P = GEO["num_kv_heads"], GEO["head_dim"], GEO["page_size"]
    assert struct.unpack_from("<HH", raw, 34) == (0, 32)
    refused(craft(tmp_path, raw, [(34, 2, P)]), "k group size is 4, expected 0 for int8 keys")
    refused(craft(tmp_path, raw, [(36, 2, 0)]), "v group size is 0, expected an even number in 2..256")
    pb12 = km.core.layout.PageLayout(H, D, P, "int8", "int4", 12).page_bytes      # 12 does not divide 32
    refused(craft(tmp_path, raw, [(36, 2, 12), (40, 8, pb12)]), "v group size is 12, .* divides head_dim=32")

    path = tmp_path / "k4.kvm"
    km.PagedKVCache.create(path, num_layers=1, num_kv_heads=H, head_dim=D, page_size=P, k_format="int4",
                           v_format="fp16").close()
    k4 = path.read_bytes()
    assert struct.unpack_from("<HH", k4, 34) == (P, 0)
    with km.PagedKVCache.open(path, mode="r") as c:
        assert c.sequences() == {}
    refused(craft(tmp_path, k4, [(34, 2, 2 * P)]), "k group size is 8, expected page_size=4 for int4 keys")
    refused(craft(tmp_path, k4, [(36, 2, 32)]), "v group size is 32, expected 0 for fp16 values")
    odd = km.core.layout.PageLayout(H, D - 1, P, "int4", "fp16", 0).page_bytes
    refused(craft(tmp_path, k4, [(24, 4, D - 1), (40, 8, odd)]), "head_dim=31 is odd")


def test_verify_calls_a_root_with_nonzero_bytes_damaged_not_empty(tmp_path):
    path = tmp_path / "e.kvm"
    km.PagedKVCache.create(path, **GEO).close()            # one commit, in root 0
    assert [s["state"] for s in verify_cache(path)["slots"]] == ["valid", "empty"]
    raw = path.read_bytes()
    assert not any(raw[root_at(1):root_at(1) + ROOT_BYTES])
    p = write(tmp_path, set_field(raw, root_at(1) + 50, 1, 1))           # root 1's reserved bytes only
    assert [s["state"] for s in verify_cache(p)["slots"]] == ["valid", "damaged"]
    with km.PagedKVCache.open(p, mode="r") as c:
        assert c.sequences() == {}


# ------------------------------------------------------------------ fuzz

@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_header_and_metadata(tmp_path, pristine, data):
    raw, pb = pristine[0], pristine[3]
    commit = Commit(raw, newest_root(raw))
    fields = SUPERBLOCK_FIELDS + ROOT_FIELDS + metadata_fields(raw)
    byte_ranges = [(0, ARENA)] + [(ARENA + p * pb, ARENA + (p + 1) * pb) for p in commit.metadata_pages()]
    b = raw
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        if data.draw(st.booleans(), label="field or byte"):
            off, width = data.draw(st.sampled_from(fields), label="field")
            value = data.draw(st.one_of(st.integers(0, 64), st.integers(0, (1 << (8 * width)) - 1),
                                        st.sampled_from([(1 << (8 * width)) - 1, 1 << (8 * width - 1)])),
                              label="value")
            b = set_field(b, off, width, value)
        else:
            lo, hi = data.draw(st.sampled_from(byte_ranges), label="region")
            off = data.draw(st.integers(lo, hi - 1), label="byte")
            b = flip(b, off, data.draw(st.integers(1, 255), label="mask"))
    if data.draw(st.booleans(), label="forge checksums"):
        b = fix_checksums(b)
    if data.draw(st.booleans(), label="truncate"):
        b = b[:data.draw(st.integers(0, len(b)), label="length")]
    p = tmp_path / "fuzz.kvm"
    p.write_bytes(b)
    open_hostile(p)
