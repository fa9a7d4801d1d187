"""A commit's metadata as bytes: the index blob and one record blob per sequence.

:func:`pack_record` / :func:`parse_record` and :func:`pack_index` / :func:`parse_index`
are each other's inverse (docs/FORMAT.md, Index and Records); the parsers refuse anything
a writer could not have written, naming what is wrong. :func:`count_tables` rebuilds the
reference counts from the block tables of a commit.
"""

from __future__ import annotations

import struct

import numpy as np

from .. import _pagetable
from ..errors import CacheFileError

REC_HEAD = struct.Struct("<IHHQ")       # sequence id, name length, has_name, max_tokens (0: none)
LAYER_HEAD = struct.Struct("<QIIII")    # positions written, dropped in front, pages, residual pages, zero
INDEX_ENTRY = np.dtype([("seq", "<u4"), ("page", "<u4"), ("nbytes", "<u4"), ("crc", "<u4")])


class LayerRecord:
    """One (sequence, layer) as a record lists it."""

    __slots__ = ("n_pos", "first", "pages", "crc", "res", "res_crc")

    def __init__(self, n_pos, first, pages, crc, res, res_crc):
        self.n_pos, self.first, self.pages, self.crc, self.res, self.res_crc = n_pos, first, pages, crc, res, res_crc


def pack_record(table, s) -> bytes:
    """The record of sequence ``s`` of a :class:`~kvmmap.core.sequences.SequenceTable`."""
    name = (s.name or "").encode()
    parts = [REC_HEAD.pack(s.seq_id, len(name), 1 if s.name is not None else 0, s.max_tokens),
             name + b"\0" * (-len(name) % 8)]
    crc_of = table.arena.page_crc
    for st in s.layers:
        pages = st.bt.pages
        crc = crc_of[pages].astype("<u4")
        staged = table.stage(st)
        res_crc = []
        if staged is not None and staged[2] is not None:
            crc[-1], res_crc = staged[2], staged[3]
        parts.append(LAYER_HEAD.pack(st.n_pos, st.first, len(pages), len(st.res), 0))
        parts += [pages.astype("<u4").tobytes(), crc.tobytes(), st.res.astype("<u4").tobytes(),
                  np.array(res_crc, "<u4").tobytes()]
    return b"".join(parts)


def parse_record(data: bytes, num_layers: int, page_size: int, res_pages: int, high_water: int):
    """(sequence id, name, max_tokens, [LayerRecord] * num_layers) of a record; raises
    CacheFileError(reason) if it is not one a writer could have written. ``res_pages``:
    residual pages of a partly filled page (int4 keys), else 0."""
    def bad(msg):
        raise CacheFileError(msg)
    if len(data) < REC_HEAD.size:
        bad("record truncated")
    sid, name_len, has_name, max_tokens = REC_HEAD.unpack_from(data)
    off = REC_HEAD.size
    if has_name not in (0, 1) or (not has_name and name_len) or off + name_len > len(data):
        bad(f"sequence {sid}: name field (length {name_len}, has_name {has_name}) is inconsistent")
    try:
        name = data[off:off + name_len].decode("utf-8") if has_name else None
    except UnicodeDecodeError:
        bad(f"sequence {sid}: its name is not UTF-8")
    if has_name and not name_len:
        bad(f"sequence {sid}: empty name")
    off += name_len + (-name_len % 8)
    P, layers = page_size, []
    for layer in range(num_layers):
        if off + LAYER_HEAD.size > len(data):
            bad(f"sequence {sid}: layer {layer} truncated")
        n_pos, first, npg, nres, zero = LAYER_HEAD.unpack_from(data, off)
        off += LAYER_HEAD.size
        # a partly filled page has residual pages (int4 keys), or none if truncate cut a full page
        if zero or npg != -(-n_pos // P) or first >= P or first > n_pos or nres not in (0, res_pages if n_pos % P else 0) \
                or off + 8 * (npg + nres) > len(data):
            bad(f"sequence {sid}, layer {layer}: inconsistent block table (positions {n_pos}, first {first}, "
                f"pages {npg}, residual pages {nres})")
        arrs = []
        for count in (npg, npg, nres, nres):
            arrs.append(np.frombuffer(data, "<u4", count, off).astype(np.uint32))
            off += 4 * count
        for a in (arrs[0], arrs[2]):
            if len(a) and int(a.max()) >= high_water:
                bad(f"sequence {sid}, layer {layer} refers to page {int(a.max())} beyond the {high_water} pages "
                    "in use")
        layers.append(LayerRecord(n_pos, first, *arrs))
    if off != len(data):
        bad(f"sequence {sid}: {len(data) - off} unexpected trailing bytes")
    return sid, name, max_tokens, layers


def pack_index(entries) -> bytes:
    """The index of ``(sequence id, record page, record bytes, record crc)`` entries."""
    arr = np.array(sorted(entries), INDEX_ENTRY) if entries else np.zeros(0, INDEX_ENTRY)
    return arr.tobytes()


def parse_index(data: bytes, num_sequences: int, next_id: int) -> np.ndarray:
    """The index entries (structured INDEX_ENTRY array, increasing ids); CacheFileError
    unless it holds ``num_sequences`` entries of distinct ids below ``next_id``."""
    if len(data) != num_sequences * INDEX_ENTRY.itemsize:
        raise CacheFileError(f"index of {len(data)} bytes does not hold {num_sequences} sequences")
    arr = np.frombuffer(data, INDEX_ENTRY)
    ids = arr["seq"].astype(np.int64)
    if len(ids) and (np.any(np.diff(ids) <= 0) or ids[-1] >= next_id):
        raise CacheFileError(f"index sequence ids are not increasing and below the next id {next_id}")
    return arr


def count_tables(tables, owners, hw: int, bad) -> np.ndarray:
    """Reference counts (uint32 [hw]) of a commit's block tables, each page listed at most
    once per table and by tables of one layer only (docs/FORMAT.md); ``bad`` raises
    otherwise. One typed pass over all entries."""
    counts = np.zeros(hw, np.uint32)
    if not tables:
        return counts
    sizes = np.fromiter((len(t) for t in tables), np.int64, len(tables))
    indptr = np.zeros(len(tables) + 1, np.int64)
    np.cumsum(sizes, out=indptr[1:])
    layer_of = np.fromiter((layer for _, layer in owners), np.int64, len(owners))
    rule, t, i = _pagetable.count_tables(np.concatenate(tables).astype(np.uint32), indptr, layer_of, counts,
                                         np.full(hw, -1, np.int64), np.full(hw, -1, np.int64))
    if rule:
        sid, layer = owners[t]
        page = int(tables[t][i - indptr[t]])
        bad(f"sequence {sid}, layer {layer}: its block table lists page {page} twice" if rule == 1 else
            f"sequence {sid}, layer {layer}: page {page} is listed by tables of another layer too "
            "(a page holds tokens of one layer)")
    return counts
