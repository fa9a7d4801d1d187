"""A commit's payload: the sequence table, block tables, open pages and page checksums as bytes.

:func:`serialize` and :func:`load` are each other's inverse (docs/FORMAT.md, Payload);
:func:`load` refuses anything a writer could not have written, naming what is wrong.
"""

from __future__ import annotations

import struct

import numpy as np

from .. import _pagetable
from ..errors import CacheFileError
from ..pagetable import BlockTable, PageAllocator
from .sequences import LayerState, Sequence, SequenceTable
from .tail import SIDES

META_HEAD = struct.Struct("<QIII")     # high_water, num_sequences, next_sequence_id, reserved
SEQ_HEAD = struct.Struct("<IHH")       # sequence id, name length, has_name
LAYER_HEAD = struct.Struct("<QII")     # positions written, positions dropped in front, sealed pages


def serialize(table: SequenceTable, page_crc: np.ndarray) -> bytes:
    """The payload of a commit of ``table`` (``page_crc``: the arena's page checksums)."""
    hw = table.alloc.high_water
    parts = [META_HEAD.pack(hw, len(table.seqs), table.next_id, 0), page_crc[:hw].tobytes()]
    for s in table.seqs.values():
        name = (s.name or "").encode()
        parts.append(SEQ_HEAD.pack(s.seq_id, len(name), 1 if s.name is not None else 0))
        parts.append(name + b"\0" * (-len(name) % 4))
        for st in s.layers:
            parts.append(LAYER_HEAD.pack(st.n_pos, st.first, len(st.bt)))
            parts.append(st.bt.pages.tobytes())
            for side in SIDES:
                parts.extend(a.tobytes() for a in st.tail[side].values())
    return b"".join(parts)


def load(payload: bytes, table: SequenceTable, file_pages: int) -> np.ndarray:
    """Fill an empty ``table`` from a payload; returns the page checksums (uint32 [hw]).

    Raises CacheFileError(reason) if the payload is invalid (the caller says which slot
    and file). ``file_pages``: whole pages the file holds.
    """
    def bad(msg):
        raise CacheFileError(msg)
    if len(payload) < META_HEAD.size:
        bad("truncated")
    hw, nseq, next_id, reserved = META_HEAD.unpack_from(payload)
    off = META_HEAD.size
    if reserved:
        bad(f"reserved field is {reserved}, expected 0")
    if off + 4 * hw > len(payload):
        bad(f"{hw} page checksums do not fit in {len(payload)} bytes")
    if hw > file_pages:
        bad(f"{hw} pages are committed but the file holds only {max(file_pages, 0)}: truncated file")
    page_crc = np.frombuffer(payload, np.uint32, hw, off).copy()
    off += 4 * hw
    tables, owners = [], []     # every block table, and its (sequence, layer)
    for _ in range(nseq):
        if off + SEQ_HEAD.size > len(payload):
            bad("sequence table truncated")
        sid, name_len, has_name = SEQ_HEAD.unpack_from(payload, off)
        off += SEQ_HEAD.size
        if has_name not in (0, 1) or (not has_name and name_len) or off + name_len > len(payload):
            bad(f"sequence {sid}: name field (length {name_len}, has_name {has_name}) is inconsistent")
        try:
            name = payload[off:off + name_len].decode("utf-8") if has_name else None
        except UnicodeDecodeError:
            bad(f"sequence {sid}: its name is not UTF-8")
        off += name_len + (-name_len % 4)
        if sid >= next_id or sid in table.seqs or (name is not None and name in table.names):
            bad(f"sequence id {sid} or name {name!r} repeated or out of range")
        layers = []
        for _ in range(table.num_layers):
            off, st, pages = _load_layer(payload, off, table, sid, hw, bad)
            tables.append(pages)
            owners.append((sid, len(layers)))
            layers.append(st)
        table.seqs[sid] = Sequence(sid, name, layers)
        if name is not None:
            table.names[name] = sid
    if off != len(payload):
        bad(f"{len(payload) - off} unexpected trailing bytes")
    table.next_id = next_id
    table.alloc = PageAllocator(count_tables(tables, owners, hw, bad))
    return page_crc


def _load_layer(payload: bytes, off: int, table: SequenceTable, sid: int, hw: int, bad):
    """One layer's header, block table and open page at ``off``: (new offset, state, pages)."""
    P = table.page_size
    if off + LAYER_HEAD.size > len(payload):
        bad("block table truncated")
    n_pos, first, nbt = LAYER_HEAD.unpack_from(payload, off)
    off += LAYER_HEAD.size
    if not (nbt * P <= n_pos < (nbt + 1) * P and first <= n_pos and first < P) \
            or off + 4 * nbt + table.tail_bytes > len(payload):
        bad(f"sequence {sid}: inconsistent block table (positions {n_pos}, first {first}, pages {nbt})")
    pages = np.frombuffer(payload, np.uint32, nbt, off)
    off += 4 * nbt
    if nbt and int(pages.max()) >= hw:
        bad(f"sequence {sid} refers to page {int(pages.max())} beyond the {hw} pages in use")
    tail = {}
    for side in SIDES:
        tail[side] = {}
        for name, proto in table.tail_proto[side].items():
            tail[side][name] = np.frombuffer(payload, proto.dtype, proto.size, off).reshape(proto.shape).copy()
            off += proto.nbytes
    return off, LayerState(BlockTable(pages), n_pos, first, tail), pages


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
    rule, t, i = _pagetable.count_tables(np.concatenate(tables), indptr, layer_of, counts,
                                         np.full(hw, -1, np.int64), np.full(hw, -1, np.int64))
    if rule:
        sid, layer = owners[t]
        page = int(tables[t][i - indptr[t]])
        bad(f"sequence {sid}, layer {layer}: its block table lists page {page} twice" if rule == 1 else
            f"sequence {sid}, layer {layer}: page {page} is listed by tables of another layer too "
            "(a page holds tokens of one layer)")
    return counts


def listed_pages(payload: bytes, num_layers: int, tail_bytes: int) -> tuple[int, np.ndarray]:
    """(high-water mark, every page id its block tables list) of a payload that passed its
    checksums; anything that does not parse gives what was found so far."""
    found, hw = [], 0
    try:
        hw, nseq, _, _ = META_HEAD.unpack_from(payload)
        off = META_HEAD.size + 4 * hw
        for _ in range(nseq):
            _, name_len, _ = SEQ_HEAD.unpack_from(payload, off)
            off += SEQ_HEAD.size + name_len + (-name_len % 4)
            for _ in range(num_layers):
                _, _, nbt = LAYER_HEAD.unpack_from(payload, off)
                off += LAYER_HEAD.size
                if off + 4 * nbt > len(payload):
                    raise ValueError("truncated")
                found.append(np.frombuffer(payload, np.uint32, nbt, off))
                off += 4 * nbt + tail_bytes
    except (struct.error, ValueError):
        pass
    return int(hw), (np.concatenate(found) if found else np.zeros(0, np.uint32))
