"""Sequences, their block tables and open pages: every change of a cache's contents.

A sequence holds one :class:`LayerState` per layer: a block table of *sealed* (full,
immutable) pages and an open page (the tail, :mod:`kvmmap.core.tail`). Sealed pages are
reference-counted (:class:`~kvmmap.pagetable.PageAllocator`), which gives the rest:

* ``fork`` shares sealed pages and copies only the open pages;
* a change that would alter a sealed page (``truncate`` into the middle of one) copies
  the kept rows into the open page and drops the page: copy-on-write;
* a page's checksum is computed once, when it is sealed;
* a commit never copies pages: the commits on disk list sealed pages only, which nothing
  overwrites until two later commits stopped listing them.

:class:`SequenceTable` makes the changes; it does not check its arguments (the
:class:`~kvmmap.PagedKVCache` facade does) and every change is all-or-nothing: it works
on copies, or undoes itself when anything raises.
"""

from __future__ import annotations

import numpy as np

from ..codecs import quant
from .._validate import is_int
from ..errors import SequenceError
from ..pagetable import BlockTable, PageAllocator
from .arena import Arena
from .layout import PageLayout
from .tail import SIDES, copy_tail, make_tail, seal_into, tail_q, write_rows

MAX_SEQUENCE_ID = 0xFFFFFFFE               # ids are 32-bit in the file; the next id must fit too



class LayerState:
    """One (sequence, layer): ``bt`` (sealed pages), ``n_pos`` (positions written),
    ``first`` (positions dropped at the front, < page_size), ``tail`` (the open page)."""

    __slots__ = ("bt", "n_pos", "first", "tail")

    def __init__(self, bt: BlockTable, n_pos: int, first: int, tail: dict):
        self.bt, self.n_pos, self.first, self.tail = bt, n_pos, first, tail

    @property
    def length(self) -> int:
        """Visible tokens."""
        return self.n_pos - self.first


class Sequence:
    """One sequence: id, name (or None), ``max_tokens`` (0: no limit) and its layers."""

    __slots__ = ("seq_id", "name", "layers", "max_tokens")

    def __init__(self, seq_id: int, name, layers: list, max_tokens: int = 0):
        self.seq_id, self.name, self.layers, self.max_tokens = seq_id, name, layers, max_tokens


class SequenceTable:
    """The sequences of one cache and the operations that change them.

    Parameters
    ----------
    layout : PageLayout
    arena : Arena
    num_layers : int
    """

    def __init__(self, layout: PageLayout, arena: Arena, num_layers: int):
        self.layout, self.arena, self.num_layers = layout, arena, num_layers
        self.page_size = layout.page_size
        self.alloc = PageAllocator()
        self.seqs: dict[int, Sequence] = {}
        self.names: dict[str, int] = {}
        self.next_id = 0
        self.tail_proto = make_tail(layout)
        self.tail_bytes = sum(a.nbytes for side in SIDES for a in self.tail_proto[side].values())

    # ------------------------------------------------------------------ lookups

    def get(self, seq) -> Sequence:
        # 0.0 == 0 and True == 1 as dict keys: only integers name sequences
        if is_int(seq):
            try:
                return self.seqs[int(seq)]
            except KeyError:
                pass
        raise SequenceError(f"unknown sequence id {seq!r}; known ids: {sorted(self.seqs)[:20]}") from None

    def check_name(self, name) -> None:
        """Refuse a name that is not a non-empty, encodable string under 64 KiB, or is taken."""
        if name is None:
            return
        try:
            size = len(name.encode()) if isinstance(name, str) else -1
        except UnicodeEncodeError:      # a lone surrogate has no UTF-8 form
            size = -1
        if size < 1 or size > 65535:
            raise SequenceError(f"a sequence name must be a non-empty string of valid unicode under 64 KiB "
                                f"of UTF-8, found {name!r}")
        if name in self.names:
            raise SequenceError(f"a sequence named {name!r} exists already (id {self.names[name]})")

    def tail_q(self, side: str, tail: dict, a: int, b: int):
        return tail_q(self.layout, side, tail, a, b)

    # ------------------------------------------------------------------ sequences

    def new(self, name=None, max_tokens: int = 0, seq_id=None) -> int:
        """A new empty sequence (arguments checked by the caller, ``seq_id`` free)."""
        self.check_name(name)
        if seq_id is None and self.next_id > MAX_SEQUENCE_ID:
            raise SequenceError(f"this cache has handed out every sequence id (0..{MAX_SEQUENCE_ID}); "
                                "ids are never reused: copy the sequences to a new cache")
        sid = self.next_id if seq_id is None else int(seq_id)
        layers = [LayerState(BlockTable(), 0, 0, copy_tail(self.tail_proto)) for _ in range(self.num_layers)]
        self.next_id = max(self.next_id, sid + 1)
        self.seqs[sid] = Sequence(sid, name, layers, int(max_tokens or 0))
        if name is not None:
            self.names[name] = sid
        return sid

    def drop(self, sid: int) -> None:
        s = self.seqs.pop(sid)
        if s.name is not None:
            del self.names[s.name]

    def fork(self, seq, name=None) -> int:
        src = self.get(seq)
        self.check_name(name)
        layers = [LayerState(st.bt.copy(), st.n_pos, st.first, copy_tail(st.tail)) for st in src.layers]
        shared = np.concatenate([st.bt.pages for st in src.layers])
        sid = self.new(name)            # built first, so that a failure leaves nothing behind
        try:
            self.alloc.incref(shared)
        except BaseException:
            self.drop(sid)
            raise
        self.seqs[sid].layers = layers
        return sid

    def free(self, seq) -> None:
        s = self.get(seq)
        self.alloc.decref(np.concatenate([st.bt.pages for st in s.layers]))    # one step: all or nothing
        self.drop(s.seq_id)

    def truncate(self, seq, n: int) -> None:
        s = self.get(seq)
        P = self.page_size
        # Worked out on copies first, then swapped in with one release of pages: a failure
        # on the way (MemoryError) leaves the sequence as it was.
        new_layers, dropped = [], []
        for st in s.layers:
            if n >= st.length:
                new_layers.append(st)
                continue
            new_pos = st.first + n
            keep, rem = divmod(new_pos, P)
            bt, tail = st.bt, st.tail
            if keep < len(st.bt):
                if rem:   # copy-on-write: the kept rows of a sealed page become the open page
                    tail = self._reopen_page(int(st.bt.pages[keep]), rem)
                bt = BlockTable(st.bt.pages[:keep])
                dropped.append(st.bt.pages[keep:])
            new_layers.append(LayerState(bt, new_pos, st.first, tail))
        if dropped:
            self.alloc.decref(np.concatenate(dropped))
        s.layers = new_layers

    def _reopen_page(self, page: int, rows: int) -> dict:
        """An open page holding rows ``0 .. rows - 1`` of a sealed page."""
        tail = copy_tail(self.tail_proto)
        for side in SIDES:
            src = self.arena.page_q(side, page, 0, rows)
            if self.layout.formats[side].grouped:
                quant.dequantize(src, out=tail[side]["codes"][:, :rows])
            else:
                for name, arr in tail[side].items():
                    arr[:, :rows] = getattr(src, name)
        return tail

    def shift_left(self, seq, n: int) -> None:
        s = self.get(seq)
        P = self.page_size
        new_layers, dropped = [], []        # copies first, then one release: all or nothing
        for st in s.layers:
            first = st.first + min(n, st.length)
            drop = min(first // P, len(st.bt))
            dropped.append(st.bt.pages[:drop])
            new_layers.append(LayerState(BlockTable(st.bt.pages[drop:]), st.n_pos - drop * P,
                                         first - drop * P, st.tail))
        self.alloc.decref(np.concatenate(dropped))
        s.layers = new_layers

    # ------------------------------------------------------------------ appending

    def prepare_pages(self, n: int) -> None:
        """Make sure handing out ``n`` pages cannot fail for lack of room.

        The arena grows (a file: extended, sparse) and the disk blocks of every page that
        could be handed out are reserved, all *before* any page is handed out: a full
        disk, ``ulimit -f`` (EFBIG) or a failed map raise here, with nothing changed but
        the file's size. Pages are then written through the map without a SIGBUS.
        """
        need = self.alloc.high_water + self.alloc.fresh_needed(n)
        self.arena.ensure_capacity(need)
        self.arena.reserve_upto(need)

    def take_pages(self, n: int, taken: list) -> np.ndarray:
        """Hand out ``n`` pages (room made first); ``taken`` collects them for an undo."""
        self.prepare_pages(n)
        pages = self.alloc.alloc(n)
        taken.extend(int(p) for p in pages)
        return pages

    def write_tail(self, st: LayerState, k: np.ndarray, v: np.ndarray):
        """Decode steps that stay in the open page: rows written, length not moved."""
        return write_rows(self.layout, st.tail, st.n_pos % self.page_size, k, v)

    def append_all(self, items) -> None:
        """Append checked tokens to several (sequence, layer) pairs: all of it, or nothing.

        ``items``: ``(layer state, {side: [H, tokens, D]})`` pairs. Room for every page
        the call seals is made first (:meth:`prepare_pages`); should anything still raise
        (MemoryError, KeyboardInterrupt), the lengths, block tables and open pages go back
        to what they were and the pages handed out return to the free list.
        """
        P = self.page_size
        self.prepare_pages(sum((st.n_pos % P + x["k"].shape[1]) // P for st, x in items))
        saved = []
        for st, x in items:
            row = st.n_pos % P
            # sealing the open page reuses its rows from 0: keep the rows it holds now
            tail = copy_tail(st.tail) if row and row + x["k"].shape[1] >= P else None
            saved.append((st, st.n_pos, len(st.bt), tail))
        taken: list[int] = []
        try:
            for st, x in items:
                self._append_tokens(st, x, taken)
        except BaseException:
            for st, n_pos, nbt, tail in saved:
                st.bt.drop_back(len(st.bt) - nbt)
                st.n_pos = n_pos
                if tail is not None:
                    st.tail = tail
            self.alloc.unalloc(taken)
            raise

    def _append_tokens(self, st: LayerState, x: dict, taken: list) -> None:
        P, n, i = self.page_size, x["k"].shape[1], 0
        arena = self.arena
        while i < n:
            row = st.n_pos % P
            take = min(P - row, n - i)
            if row == 0 and take == P:          # a whole page: quantize straight into it
                (page,) = self.take_pages(1, taken)
                for side in SIDES:
                    quant.quantize_into(x[side][:, i:i + P], arena.page_q(side, page, 0, P))
                arena.mark_sealed(page)
                st.bt.append(int(page))
            else:
                for side in SIDES:
                    quant.quantize_into(x[side][:, i:i + take], self.tail_q(side, st.tail, row, row + take))
                if row + take == P:
                    (page,) = self.take_pages(1, taken)
                    seal_into(self.layout, st.tail, lambda side: arena.page_q(side, page, 0, P))
                    arena.mark_sealed(page)
                    st.bt.append(int(page))
            st.n_pos += take
            i += take

    def append_rows(self, sts: list, k: np.ndarray, v: np.ndarray) -> int:
        """Append head-major ``k``, ``v`` ``[B, H, tokens, D]`` to ``B`` (sequence, layer)
        states of equal length, all or none; returns the first position whose stored value
        changed (the old length, or for a grouped format the first row of a page this call
        sealed: those rows are quantized again, as a whole)."""
        P, n = self.page_size, k.shape[2]
        start = sts[0].length
        if all(0 < n < P - st.n_pos % P for st in sts):
            # decode steps: the lengths move only after every row succeeded
            for b, st in enumerate(sts):
                self.write_tail(st, k[b], v[b])
            for st in sts:
                st.n_pos += n
            return start
        for side, x in (("k", k), ("v", v)):       # one read each; refuses before any change
            quant.check_storable(x, self.layout.formats[side].name)
        if any(f.grouped for f in self.layout.formats.values()):
            for st in sts:
                if st.n_pos % P + n >= P:
                    start = min(start, max(0, st.length - st.n_pos % P))
        self.append_all([(st, {"k": k[b], "v": v[b]}) for b, st in enumerate(sts)])
        return start

    def read(self, st: LayerState, start: int, stop: int, out: dict | None = None) -> dict:
        """Dequantized ``{side: float32 [stop - start, H, D]}`` of visible tokens
        ``start .. stop - 1`` (checked by the caller): sealed pages decoded in place, then the
        open page; into ``out`` (checked buffers) when given."""
        lay = self.layout
        n = stop - start
        if out is None:
            out = {side: np.empty((n, lay.num_kv_heads, lay.head_dim), np.float32) for side in SIDES}
        P, pos, end = self.page_size, st.first + start, st.first + stop
        nbt = len(st.bt)
        sealed = max(0, min(end, nbt * P) - pos)      # positions in sealed pages, then the open page
        if sealed:
            self.arena.will_need(st.bt.pages[pos // P:(pos + sealed - 1) // P + 1])
            for side in SIDES:
                self.arena.read_rows(side, st.bt.pages, pos, out[side][:sealed])
        if sealed < n:
            a = pos + sealed - nbt * P
            for side in SIDES:
                quant.dequantize(self.tail_q(side, st.tail, a, a + n - sealed),
                                 out=out[side][sealed:].transpose(1, 0, 2))
        return out

    def pages_read(self, st: LayerState, start: int, stop: int) -> np.ndarray:
        """The sealed pages holding visible tokens ``start .. stop - 1``."""
        P = self.page_size
        if stop <= start:
            return st.bt.pages[:0]
        first, last = (st.first + start) // P, min((st.first + stop - 1) // P, len(st.bt) - 1)
        return st.bt.pages[first:last + 1]

    def read_rows(self, sts: list, start: int, stop: int, k_out: np.ndarray, v_out: np.ndarray) -> None:
        """Head-major ``read`` of several states into ``[B, H, stop - start, D]`` outputs; rows
        of the open page (a decode step's) are decoded from it straight into the output."""
        P = self.page_size
        for b, st in enumerate(sts):
            row0 = st.length - st.n_pos % P             # the position of the open page's row 0
            if start >= row0:
                for side, out in (("k", k_out), ("v", v_out)):
                    quant.dequantize(self.tail_q(side, st.tail, start - row0, stop - row0), out=out[b])
            else:
                got = self.read(st, start, stop)
                k_out[b] = got["k"].transpose(1, 0, 2)
                v_out[b] = got["v"].transpose(1, 0, 2)

    # ------------------------------------------------------------------ whole-table views

    def listed_pages(self) -> list[int]:
        """Ids of the pages some block table lists, increasing."""
        return sorted({int(p) for s in self.seqs.values() for st in s.layers for p in st.bt.pages})

    def tokens(self) -> int:
        return sum(st.length for s in self.seqs.values() for st in s.layers)
