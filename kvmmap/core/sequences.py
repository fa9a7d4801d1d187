"""Sequences, their block tables and pages: every change of a cache's contents.

A sequence holds one :class:`LayerState` per layer: a block table listing every page of
its tokens in logical order (FlashInfer's layout: all pages full except perhaps the last,
which holds ``last_page_len`` rows), positions written and dropped in front. Tokens are
written straight into the pages of the arena. Pages are reference-counted
(:class:`~kvmmap.pagetable.PageAllocator`); the rule that makes commits cheap and safe:

    **bytes a commit on disk may list are never written again.**

Rows of a page are independent (per-token scales), so the open last page grows in place:
row ``r`` is written only while no commit lists row ``r`` of that page (``guard``) and no
other block table lists the page (``fork``). Otherwise the page is copied to a fresh one
first (copy-on-write). int4 keys are quantized per channel over a whole page (KIVI): until
the page fills, its key rows live as float16 in *residual pages* (the same arena, token-
major rows), and the full page is quantized at once when its last row arrives.

:class:`SequenceTable` makes the changes; it does not check its arguments (the
:class:`~kvmmap.PagedKVCache` facade does), and every change is all-or-nothing: it works
on copies, or undoes itself when anything raises. Changed sequences are marked dirty for
the next commit.
"""

from __future__ import annotations

import numpy as np

from ..codecs import quant
from .._validate import is_int
from ..errors import CapacityError, NonFiniteError, SequenceError
from ..pagetable import BlockTable, PageAllocator
from .arena import Arena
from .layout import PageLayout

MAX_SEQUENCE_ID = 0xFFFFFFFE               # ids are 32-bit in the file; the next id must fit too
SIDES = ("k", "v")
_NO_PAGES = np.zeros(0, np.uint32)
FP16_MAX = 65504.0


class LayerState:
    """One (sequence, layer).

    Attributes
    ----------
    bt : BlockTable
        Pages in logical order; page ``i`` holds positions ``i * P .. i * P + P - 1``.
        ``len(bt) == ceil(n_pos / P)``.
    n_pos : int
        Positions written (the last page holds ``n_pos - (len(bt) - 1) * P`` rows).
    first : int
        Positions dropped at the front by ``shift_left`` (< P).
    res : numpy.ndarray, uint32
        Residual pages of int4 keys of a partly filled last page (else empty).
    guard : int
        Rows of the last page that a commit on disk may list: rows below it are not
        written in place.
    committed : tuple or None
        ``(page, rows, crc, res_crc)`` of the last page at the commit this cache is at
        (checksums for a partly filled page only; for ``verify``).
    staged : tuple or None
        The same for the commit being written (:meth:`SequenceTable.stage`).
    """

    __slots__ = ("bt", "n_pos", "first", "res", "guard", "committed", "staged")

    def __init__(self, bt: BlockTable, n_pos: int = 0, first: int = 0, res=_NO_PAGES, guard: int = 0,
                 committed=None):
        self.bt, self.n_pos, self.first, self.res, self.guard = bt, n_pos, first, res, guard
        self.committed, self.staged = committed, None

    @property
    def length(self) -> int:
        """Visible tokens."""
        return self.n_pos - self.first

    def copy(self) -> "LayerState":
        return LayerState(self.bt.copy(), self.n_pos, self.first, self.res.copy(), self.guard, self.committed)

    def pages_listed(self) -> np.ndarray:
        """Block table and residual pages."""
        return np.concatenate([self.bt.pages, self.res]) if len(self.res) else self.bt.pages


class Sequence:
    """One sequence: id, name (or None), ``max_tokens`` (0: no limit), its layers, and
    ``rec``: where its record blob is in the commit this cache is at (None: not yet)."""

    __slots__ = ("seq_id", "name", "layers", "max_tokens", "rec")

    def __init__(self, seq_id: int, name, layers: list, max_tokens: int = 0, rec=None):
        self.seq_id, self.name, self.layers, self.max_tokens, self.rec = seq_id, name, layers, max_tokens, rec


class SequenceTable:
    """The sequences of one cache and the operations that change them.

    Parameters
    ----------
    layout : PageLayout
    arena : Arena
    num_layers : int
    max_pages : int
        Pages of tokens the pool may hold (0: no limit).
    """

    def __init__(self, layout: PageLayout, arena: Arena, num_layers: int, max_pages: int = 0):
        self.layout, self.arena, self.num_layers, self.max_pages = layout, arena, num_layers, max_pages
        self.page_size = P = layout.page_size
        self.clear()
        self.k4 = layout.formats["k"].grouped
        H, D = layout.num_kv_heads, layout.head_dim
        self.res_row_bytes = 2 * H * D
        self.res_rows_per_page = layout.page_bytes // self.res_row_bytes if self.k4 else 0
        self.res_pages = -(-P // self.res_rows_per_page) if self.k4 else 0
        self.meta_spare = 4                   # pages kept reserved for the next commit's metadata

    def clear(self) -> None:
        """No sequence (a new table, or a load that failed half-way)."""
        self.alloc = PageAllocator()
        self.seqs: dict[int, Sequence] = {}
        self.names: dict[str, int] = {}
        self.next_id = 0
        self.dirty: set[int] = set()          # sequences changed since the last commit
        self.dropped_records: list[int] = []  # record pages of sequences dropped since the last commit
        self.meta_pages = 0                   # pages holding the commit's metadata blobs

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

    def last_rows(self, st: LayerState) -> int:
        """Rows of the last page (0 without pages; P when it is full)."""
        return st.n_pos - (len(st.bt) - 1) * self.page_size if len(st.bt) else 0

    def full_pages(self, st: LayerState) -> int:
        """Pages of ``st`` that are full."""
        return st.n_pos // self.page_size

    # ------------------------------------------------------------------ sequences

    def new(self, name=None, max_tokens: int = 0, seq_id=None) -> int:
        """A new empty sequence (arguments checked by the caller, ``seq_id`` free)."""
        self.check_name(name)
        if seq_id is None and self.next_id > MAX_SEQUENCE_ID:
            raise SequenceError(f"this cache has handed out every sequence id (0..{MAX_SEQUENCE_ID}); "
                                "ids are never reused: copy the sequences to a new cache")
        sid = self.next_id if seq_id is None else int(seq_id)
        layers = [LayerState(BlockTable()) for _ in range(self.num_layers)]
        self.next_id = max(self.next_id, sid + 1)
        self.seqs[sid] = Sequence(sid, name, layers, int(max_tokens or 0))
        if name is not None:
            self.names[name] = sid
        self.dirty.add(sid)
        return sid

    def drop(self, sid: int) -> None:
        s = self.seqs.pop(sid)
        if s.name is not None:
            del self.names[s.name]
        if s.rec is not None:
            self.dropped_records += s.rec[3]
        self.dirty.add(sid)

    def fork(self, seq, name=None) -> int:
        src = self.get(seq)
        self.check_name(name)
        layers = [st.copy() for st in src.layers]
        shared = np.concatenate([st.pages_listed() for st in src.layers])
        sid = self.new(name, src.max_tokens)    # built first, so that a failure leaves nothing behind
        try:
            self.alloc.incref(shared)
        except BaseException:
            self.drop(sid)
            self.dirty.discard(sid)
            raise
        self.seqs[sid].layers = layers
        return sid

    def free(self, seq) -> None:
        s = self.get(seq)
        self.alloc.decref(np.concatenate([st.pages_listed() for st in s.layers]))    # all or nothing
        self.drop(s.seq_id)

    def truncate(self, seq, n: int) -> None:
        s = self.get(seq)
        P = self.page_size
        # Worked out on copies first, then swapped in with one release of pages: a failure
        # on the way (MemoryError, a full disk for a copy) leaves the sequence as it was.
        new_layers, dropped = [], []
        for st in s.layers:
            if n >= st.length:
                new_layers.append(st)
                continue
            new_pos = st.first + n
            keep = -(-new_pos // P)
            rows = new_pos - (keep - 1) * P if keep else 0
            was_full = keep <= self.full_pages(st)       # the new last page was full
            new = LayerState(BlockTable(st.bt.pages[:keep]), new_pos, st.first, st.res, st.guard, st.committed)
            dropped.append(st.bt.pages[keep:])
            if keep < len(st.bt) or not keep:     # the old last page goes, with its residual
                dropped.append(st.res)
                new.res = _NO_PAGES
            if keep and rows < P and was_full:
                # commits may list the page whole: the next append copies it first (int4
                # keys: into residual rows again, from their quantized values)
                new.guard = P
            elif keep:
                new.guard = max(st.guard, self.last_rows(st))
            new_layers.append(new)
        if dropped:
            self.alloc.decref(np.concatenate(dropped))
        s.layers = new_layers
        self.dirty.add(s.seq_id)

    def shift_left(self, seq, n: int) -> None:
        s = self.get(seq)
        P = self.page_size
        new_layers, dropped = [], []        # copies first, then one release: all or nothing
        for st in s.layers:
            first = st.first + min(n, st.length)
            drop = min(first // P, len(st.bt))
            new = LayerState(BlockTable(st.bt.pages[drop:]), st.n_pos - drop * P, first - drop * P, st.res,
                             st.guard, st.committed)
            dropped.append(st.bt.pages[:drop])
            if drop and drop == len(st.bt):
                dropped.append(st.res)
                new.res = _NO_PAGES
            new_layers.append(new)
        self.alloc.decref(np.concatenate(dropped))
        s.layers = new_layers
        self.dirty.add(s.seq_id)

    # ------------------------------------------------------------------ appending

    def check_pool(self, n: int) -> None:
        """Refuse (CapacityError) ``n`` new pages of tokens past the pool limit."""
        if self.max_pages and n:
            in_use = self.data_pages()
            if in_use + n > self.max_pages:
                raise CapacityError(
                    f"the pool is full: {in_use} of its {self.max_pages} pages (max_bytes) hold tokens and {n} more "
                    "are needed; free, truncate or shift_left sequences")

    def data_pages(self) -> int:
        """Pages listed by the sequences (tokens and residual rows)."""
        a = self.alloc
        return a.high_water - a.num_free - a.num_pending - self.meta_pages

    def prepare_pages(self, n: int, meta: bool = False) -> None:
        """Make sure handing out ``n`` pages cannot fail for lack of room.

        The arena grows (a file: extended, sparse) and the disk blocks of every page that
        could be handed out are reserved, all *before* any page is handed out: a full
        disk, ``ulimit -f`` (EFBIG) or a failed map raise here, with nothing changed but
        the file's size. Pages are then written through the map without a SIGBUS.
        Pages of tokens (not ``meta``) leave ``meta_spare`` reserved pages beyond them
        for the next commit's metadata: on a full disk, appends fail first and the
        process can still commit what it holds.
        """
        need = self.alloc.high_water + self.alloc.fresh_needed(n)
        want = need if meta else need + self.meta_spare
        self.arena.ensure_capacity(want)
        self.arena.reserve_upto(want)

    def reserve_meta_ahead(self, pages: int) -> None:
        """After a commit that wrote ``pages`` metadata pages: keep room reserved for one of
        about twice its size. If the disk is full already, the next commit says so."""
        self.meta_spare = 2 * pages + 2
        try:
            self.prepare_pages(0)
        except OSError:
            pass

    def take_pages(self, n: int, taken: list) -> np.ndarray:
        """Hand out ``n`` pages (room made first); ``taken`` collects them for an undo."""
        self.prepare_pages(n)
        pages = self.alloc.alloc(n)
        taken.extend(int(p) for p in pages)
        return pages

    def _pages_for(self, items) -> tuple[int, int]:
        """(pages the sequences list more after appending ``items``, most pages the call
        can take): new pages, a copy of a last page another sequence still lists, and for
        int4 keys the residual pages of a partly filled page less those given up."""
        P, R, net = self.page_size, self.res_pages, 0
        for st, x in items:
            row, n = st.n_pos % P, x["k"].shape[1]
            shared = bool(row) and self.alloc.refcount(int(st.bt.pages[-1])) > 1
            net += -(-(row + n) // P) - (1 if row else 0) + (1 if shared else 0)
            if self.k4:
                had, has = len(st.res) > 0, (row + n) % P != 0
                net += (R if has else 0) - (R if had and not shared else 0)
        return net, max(net, 0) + len(items) * (1 + 2 * R)

    def check_capacity(self, s: Sequence, st: LayerState, n: int) -> None:
        if s.max_tokens and st.length + n > s.max_tokens:
            raise CapacityError(f"sequence {s.seq_id} holds {st.length} of its max_tokens={s.max_tokens} tokens in "
                                f"this layer; {n} more do not fit (shift_left, truncate, or a new sequence)")

    def append_all(self, items) -> None:
        """Append checked tokens to several (sequence, layer) pairs: all of it, or nothing.

        ``items``: ``(layer state, {side: [H, tokens, D]})`` pairs. Room for every page the
        call can take is made first (:meth:`prepare_pages`); should anything still raise
        (MemoryError, KeyboardInterrupt), the lengths, block tables and residual pages go
        back to what they were and the pages handed out return to the free list.
        """
        net, most = self._pages_for(items)
        self.check_pool(net)
        self.prepare_pages(most)
        saved = [(st, st.n_pos, len(st.bt), int(st.bt.pages[-1]) if len(st.bt) else -1, st.res, st.guard)
                 for st, _ in items]
        taken: list[int] = []
        release: list[int] = []
        try:
            for st, x in items:
                self._append_tokens(st, x, taken, release)
        except BaseException:
            for st, n_pos, nbt, last, res, guard in saved:
                st.bt.drop_back(len(st.bt) - nbt)
                if nbt:
                    st.bt.set_last(last)
                st.n_pos, st.res, st.guard = n_pos, res, guard
            self.alloc.unalloc(taken)
            raise
        fresh = set(taken)
        gone = [p for p in release if p in fresh]
        if gone:
            self.alloc.unalloc(gone)            # handed out and let go within this call
        old = [p for p in release if p not in fresh]
        if old:
            self.alloc.decref(np.array(old, np.uint32))

    def _own_last(self, st: LayerState, taken: list, release: list) -> None:
        """Copy-on-write: give ``st`` its own copy of its last page (and residual pages).

        int4 keys of a page cut short by ``truncate`` are still quantized over the whole
        page (no residual pages): the copy gets residual rows again, from those values."""
        old = int(st.bt.pages[-1])
        (page,) = self.take_pages(1, taken)
        self.arena.copy_page(old, int(page))
        release.append(old)
        if self.k4 and not len(st.res):
            rows = self.last_rows(st)
            k = quant.dequantize(self.arena.page_q("k", old, 0, rows))           # [H, rows, D]
            st.res = self.take_pages(self.res_pages, taken)
            self._res_write(st.res, 0, self._as_fp16(k))
        elif len(st.res):
            res = self.take_pages(len(st.res), taken)
            for a, b in zip(st.res.tolist(), res.tolist()):
                self.arena.copy_page(a, b)
            release.extend(st.res.tolist())
            st.res = res
        st.bt.set_last(int(page))
        st.guard = 0

    def _append_tokens(self, st: LayerState, x: dict, taken: list, release: list) -> None:
        P, n, i = self.page_size, x["k"].shape[1], 0
        arena = self.arena
        while i < n:
            row = st.n_pos % P
            take = min(P - row, n - i)
            if row == 0:
                (page,) = self.take_pages(1, taken)
                st.bt.append(int(page))
                st.guard = 0
                if self.k4 and take < P:
                    st.res = self.take_pages(self.res_pages, taken)
            elif row < st.guard or self.alloc.refcount(int(st.bt.pages[-1])) > 1:
                self._own_last(st, taken, release)
            page = int(st.bt.pages[-1])
            for side in SIDES:
                xs = x[side][:, i:i + take]
                if side == "k" and self.k4:
                    xs = self._as_fp16(xs)          # int4 keys are stored from their float16 rounding
                    if take < P:
                        self._res_write(st.res, row, xs)
                        continue
                quant.quantize_into(xs, arena.page_q(side, page, row, row + take), all_or_nothing=False)
            st.n_pos += take
            if row + take == P:
                if self.k4 and len(st.res):
                    # the key group is complete: quantize it per channel over the page
                    quant.quantize_into(self.res_read(st.res, P), arena.page_q("k", page, 0, P),
                                        all_or_nothing=False)
                    release.extend(st.res.tolist())
                    st.res = _NO_PAGES
                arena.mark_sealed(page)
            i += take

    @staticmethod
    def _as_fp16(k: np.ndarray) -> np.ndarray:
        """int4 keys rounded to float16 (as float32): the residual rows of a page that is not
        full yet hold exactly this, and a full page is quantized from it either way."""
        if k.size and not np.all(np.abs(k) <= FP16_MAX):
            raise NonFiniteError(f"int4 keys are kept as float16 until their page fills: values must be finite "
                                 f"and within +-{FP16_MAX:g}")
        return k.astype(np.float16).astype(np.float32)

    def _res_write(self, res: np.ndarray, row: int, k: np.ndarray) -> None:
        """Store head-major keys ``[H, n, D]`` as float16 residual rows ``row .. row + n - 1``."""
        rpp, n = self.res_rows_per_page, k.shape[1]
        t = 0
        while t < n:
            j, r = divmod(row + t, rpp)
            m = min(rpp - r, n - t)
            self.arena.residual_rows(int(res[j]), rpp)[r:r + m] = k[:, t:t + m].transpose(1, 0, 2)
            t += m

    def res_read(self, res: np.ndarray, rows: int, a: int = 0) -> np.ndarray:
        """Residual key rows ``a .. rows - 1`` as float32, head-major ``[H, rows - a, D]``."""
        lay, rpp = self.layout, self.res_rows_per_page
        out = np.empty((lay.num_kv_heads, rows - a, lay.head_dim), np.float32)
        t = a
        while t < rows:
            j, r = divmod(t, rpp)
            m = min(rpp - r, rows - t)
            out[:, t - a:t - a + m] = self.arena.residual_rows(int(res[j]), rpp)[r:r + m].transpose(1, 0, 2)
            t += m
        return out

    def append_rows(self, seqs: list, sts: list, k: np.ndarray, v: np.ndarray) -> int:
        """Append head-major ``k``, ``v`` ``[B, H, tokens, D]`` to ``B`` (sequence, layer)
        states of equal length (of sequences ``seqs``), all or none; returns the first
        position whose stored value changed (the old length, or for int4 keys the first
        row of a page this call filled: the page is quantized again, as a whole)."""
        P, n = self.page_size, k.shape[2]
        start = sts[0].length
        for s, st in zip(seqs, sts):
            self.check_capacity(s, st, n)
        if all(st.guard <= st.n_pos % P and 0 < st.n_pos % P and st.n_pos % P + n < P
               and self.alloc.refcount(int(st.bt.pages[-1])) == 1 and (len(st.res) or not self.k4)
               for st in sts):
            self._write_in_place(sts, k, v)
        else:
            for side, x in (("k", k), ("v", v)):       # one read each; refuses before any change
                quant.check_storable(x, self.layout.formats[side].name)
            if self.k4:
                for st in sts:
                    if st.n_pos % P + n >= P:
                        start = min(start, max(0, st.length - st.n_pos % P))
            self.append_all([(st, {"k": k[b], "v": v[b]}) for b, st in enumerate(sts)])
        self.dirty.update(s.seq_id for s in seqs)
        return start

    def _write_in_place(self, sts: list, k: np.ndarray, v: np.ndarray) -> None:
        """Decode steps: rows that stay inside each state's own last page, past what any
        commit lists. Rows past a state's length are not visible, so a refusal (NonFiniteError)
        changes nothing visible; the lengths move after every row succeeded."""
        lay, arena, n = self.layout, self.arena, k.shape[2]
        for side, x in (("k", k), ("v", v)):
            if lay.formats[side].grouped and not (side == "k" and self.k4):
                quant.check_storable(x, lay.formats[side].name)
        for b, st in enumerate(sts):
            page, row = int(st.bt.pages[-1]), st.n_pos % self.page_size
            if self.k4:
                self._res_write(st.res, row, self._as_fp16(k[b]))
            else:
                arena.write_rows("k", page, row, k[b])
            arena.write_rows("v", page, row, v[b])
        for st in sts:
            st.n_pos += n

    # ------------------------------------------------------------------ reading

    def read(self, st: LayerState, start: int, stop: int, out: dict | None = None) -> dict:
        """Dequantized ``{side: float32 [stop - start, H, D]}`` of visible tokens
        ``start .. stop - 1`` (checked by the caller), read from the pages in place; into
        ``out`` (checked buffers) when given."""
        lay = self.layout
        n = stop - start
        if out is None:
            out = {side: np.empty((n, lay.num_kv_heads, lay.head_dim), np.float32) for side in SIDES}
        if not n:
            return out
        P, pos = self.page_size, st.first + start
        self.arena.will_need(st.bt.pages[pos // P:(pos + n - 1) // P + 1])
        for side in SIDES:
            m = n
            if side == "k" and self.k4 and len(st.res):
                m = max(0, min(n, self.full_pages(st) * P - pos))     # rows in full pages
                if m < n:
                    a = pos + m - self.full_pages(st) * P
                    out["k"][m:] = self.res_read(st.res, a + n - m, a).transpose(1, 0, 2)
            if m:
                self.arena.read_rows(side, st.bt.pages, pos, out[side][:m])
        return out

    def pages_read(self, st: LayerState, start: int, stop: int) -> np.ndarray:
        """The pages holding visible tokens ``start .. stop - 1``."""
        P = self.page_size
        if stop <= start:
            return st.bt.pages[:0]
        return st.bt.pages[(st.first + start) // P:(st.first + stop - 1) // P + 1]

    def read_rows(self, sts: list, start: int, stop: int, k_out: np.ndarray, v_out: np.ndarray) -> None:
        """Head-major ``read`` of several states into ``[B, H, stop - start, D]`` outputs;
        rows of the last page (a decode step's) are decoded from it straight into the output."""
        for b, st in enumerate(sts):
            row0 = st.length - self.last_rows(st)          # visible position of the last page's row 0
            if len(st.bt) and start >= row0:
                self.rows_of_last(st, start - row0, stop - row0, k_out[b], v_out[b])
            else:
                got = self.read(st, start, stop)
                k_out[b] = got["k"].transpose(1, 0, 2)
                v_out[b] = got["v"].transpose(1, 0, 2)

    def rows_of_last(self, st: LayerState, a: int, z: int, k_out, v_out) -> None:
        """Rows ``a .. z - 1`` of the last page, head-major, decoded into ``[H, z - a, D]``."""
        page = int(st.bt.pages[-1])
        for side, out in (("k", k_out), ("v", v_out)):
            if side == "k" and self.k4 and len(st.res):
                out[...] = self.res_read(st.res, z, a)
            else:
                quant.dequantize(self.arena.page_q(side, page, a, z), out=out)

    # ------------------------------------------------------------------ commits

    def last_page_crc(self, st: LayerState, rows: int | None = None) -> tuple[int, list[int]]:
        """CRC-32C of the first ``rows`` rows (default: all) of a partly filled last page,
        and of its residual pages' rows."""
        rows = st.n_pos % self.page_size if rows is None else rows
        page = int(st.bt.pages[-1])
        crc = self.arena.rows_crc(page, rows, skip_k=self.k4 and len(st.res) > 0)
        rpp = self.res_rows_per_page
        res_crc = [self.arena.bytes_crc(int(p), min(rpp, rows - j * rpp) * self.res_row_bytes)
                   for j, p in enumerate(st.res.tolist())]
        return crc, res_crc

    def stage(self, st: LayerState):
        """What the commit being written lists of the last page of ``st``: ``(page, rows,
        crc, residual crcs)`` (checksums of a partly filled page only), or None without
        pages; kept in ``st.staged`` for :meth:`committed`."""
        st.staged = None
        if len(st.bt):
            rows = self.last_rows(st)
            crc, res_crc = self.last_page_crc(st) if rows < self.page_size else (None, None)
            st.staged = (int(st.bt.pages[-1]), rows, crc, res_crc)
        return st.staged

    def committed(self, sids) -> None:
        """A commit listing the staged state of sequences ``sids`` is durable: rows it lists
        are not written in place from now on."""
        for sid in sids:
            s = self.seqs.get(sid)
            if s is None:
                continue
            for st in s.layers:
                # the guard always concerns the current last page (a new page or a copy
                # resets it): what the commits on disk list of it only grows
                st.guard = max(self.last_rows(st), st.guard)
                st.committed = st.staged

    def relocate(self, bound: int) -> int:
        """Copy the pages listed by sequences at ids ``>= bound`` into free pages below it,
        lowest first, and list the copies instead (compaction; every sequence becomes
        dirty). The originals are dropped like any page: reusable after two commits.
        Returns the pages moved."""
        a, arena = self.alloc, self.arena
        free = a.free_pages()
        free = free[free < bound]
        listed = [st.pages_listed() for s in self.seqs.values() for st in s.layers]
        listed = np.unique(np.concatenate(listed)) if listed else np.zeros(0, np.uint32)
        movers = listed[listed >= bound][::-1][:len(free)]     # the highest first
        if not len(movers):
            return 0
        targets = free[:len(movers)]
        a.move(movers, targets)
        mapping = np.arange(a.high_water, dtype=np.uint32)
        mapping[movers] = targets
        for old, new in zip(movers.tolist(), targets.tolist()):
            arena.copy_page(old, new)
            arena.page_crc[new] = arena.page_crc[old]
            arena.stamp += 1
            arena.page_stamp[new] = arena.stamp
        for s in self.seqs.values():
            for st in s.layers:
                st.bt = BlockTable(mapping[st.bt.pages])
                st.res = mapping[st.res] if len(st.res) else st.res
                if st.committed is not None:
                    st.committed = (int(mapping[st.committed[0]]),) + tuple(st.committed[1:])
            self.dirty.add(s.seq_id)
        return len(movers)

    # ------------------------------------------------------------------ whole-table views

    def listed_pages(self) -> list[int]:
        """Ids of the full pages some block table lists, increasing."""
        return sorted({int(p) for s in self.seqs.values() for st in s.layers
                       for p in st.bt.pages[:self.full_pages(st)]})

    def tokens(self) -> int:
        return sum(st.length for s in self.seqs.values() for st in s.layers)
