"""The commits of a cache file: choosing one to open, writing the next.

A commit is a root (:mod:`kvmmap.core.roots`) naming an index blob, which names one
record blob per sequence (:mod:`kvmmap.core.records`, :mod:`kvmmap.core.blobs`). A commit
writes the records of the sequences changed since the last one, a new index, syncs every
page it lists, then writes its root into the root block not holding the commit this
process is at, and syncs again: its cost follows what changed, plus 16 bytes of index per
sequence. Records and index pages replaced by a commit are dropped like data pages: they
become reusable only once two later commits stopped listing them, so both commits on disk
stay whole. After a failed sync nothing more is committed (the kernel may have dropped
pages it could not write and a retried sync reports success: PostgreSQL's "fsyncgate").
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import CacheFileError
from ..pagetable import BlockTable, PageAllocator
from .blobs import NO_PAGE, pages_needed, read_blob, write_blob
from .records import count_tables, pack_index, pack_record, parse_index, parse_record
from .roots import Root, read_root, write_root
from .sequences import LayerState, Sequence, SequenceTable
from .superblock import Superblock


class Commits:
    """Where a cache stands among its file's commits, and how it writes the next.

    Attributes
    ----------
    generation : int
        The generation of the commit this cache is at (the next commit gets one more).
    active_slot : int
        The root of the commit this cache is at; the next commit goes to the other one.
    newest_seen : int
        The newest generation on disk when the file was opened (staleness checks).
    index_pages : list of int
        Pages of the index blob of the commit this cache is at.
    """

    def __init__(self, sb: Superblock, path):
        self.sb, self.path, self.fd = sb, path, None
        self.generation, self.active_slot, self.newest_seen = 0, 1, 0
        self.index_pages: list[int] = []
        self.sync_failed = ""       # why an fsync failed: no commit may follow

    # ------------------------------------------------------------------ opening

    def _roots(self) -> list:
        for _ in range(3):
            # A reader racing a writer can find each root mid-rewrite if the writer commits
            # twice between the two reads: look again before calling it damage.
            roots = [read_root(self.fd, self.sb, i) for i in (0, 1)]
            valid = sorted((r.generation, i, r) for i, r in enumerate(roots) if r is not None)
            if valid:
                return valid
        raise CacheFileError(f"{self.path}: damaged metadata: neither commit root is valid")

    def load(self, table: SequenceTable, commit: str):
        """Fill an empty ``table`` from the newest (or ``"previous"``) commit and map its
        pages. Returns the other valid root (or None). Raises CacheFileError."""
        for attempt in range(5):
            valid = self._roots()
            if commit == "previous" and len(valid) < 2:
                raise CacheFileError(f"{self.path}: no previous commit: root {1 - valid[0][1]} is not valid "
                                     f"(root {valid[0][1]} holds the only commit, generation {valid[0][0]})")
            chosen = valid[0] if commit == "previous" else valid[-1]
            other = [v for v in valid if v is not chosen]
            gen, slot, root = chosen
            self.generation, self.active_slot, self.newest_seen = gen, slot, valid[-1][0]
            try:
                self._load(table, root)
                return other[0][2] if other else None
            except CacheFileError as e:
                table.clear()
                # A reader racing a writer: once two newer commits are on disk, the writer may
                # reuse the pages of the commit being read. Look again rather than call it damage.
                if attempt < 4 and not self.is_current():
                    continue
                error = e
                break
        # Refused, and the other root is not used in its place: a root is checksummed and
        # written last, after every page it lists was synced, so a crash leaves a root that
        # fails its checksum, never a valid root over invalid metadata. Such a commit was
        # written by a bug, forged, or the file was cut short: falling back would hand out
        # a state its writer had replaced, and the next commit would destroy the evidence.
        which = "previous" if commit == "previous" else "newest"
        age = "a newer" if commit == "previous" else "an older"
        rest = (f"Root {1 - slot} holds {age} commit (generation {other[0][0]}), not used" if other
                else f"Root {1 - slot} holds no valid commit")
        raise CacheFileError(
            f"{self.path}: damaged metadata: the {which} commit (root {slot}, generation {gen}) passes its "
            f"checksum but is invalid: {error}. {rest}: a root whose checksum holds was written after "
            "everything it lists, so this is a bug, a forged or damaged file or a truncated file, not an "
            "interrupted write") from None

    def _load(self, table: SequenceTable, root: Root) -> None:
        arena, sb = table.arena, self.sb
        hw = root.high_water
        file_pages = arena.file_pages()
        if hw > file_pages:
            raise CacheFileError(f"{hw} pages are committed but the file holds only {file_pages}: truncated file")
        # sized by the committed pages, not by the file: a sparse file's apparent size
        # (a file extended to 1 TiB) must not decide what is mapped
        arena.attach(hw, np.zeros(hw, np.uint32))
        data, pb = arena.data, sb.page_bytes
        if root.num_sequences:
            if root.index_page == NO_PAGE:
                raise CacheFileError(f"{root.num_sequences} sequences but no index")
            index, self.index_pages = read_blob(data, pb, root.index_page, root.index_bytes, root.index_crc, hw,
                                                "the index")
        else:
            if root.index_page != NO_PAGE or root.index_bytes:
                raise CacheFileError("an index for no sequences")
            index, self.index_pages = b"", []
        entries = parse_index(index, root.num_sequences, root.next_sequence_id)
        meta = list(self.index_pages)
        tables, owners = [], []
        P = table.page_size
        for e in entries.tolist():
            sid, page, nbytes, crc = e
            content, rec_pages = read_blob(data, pb, page, nbytes, crc, hw, f"the record of sequence {sid}")
            meta += rec_pages
            rsid, name, max_tokens, layers = parse_record(content, table.num_layers, P, table.res_pages, hw)
            if rsid != sid or (name is not None and name in table.names):
                raise CacheFileError(f"the record of sequence {sid} names sequence {rsid} or a repeated name {name!r}")
            states = []
            for layer, lr in enumerate(layers):
                full = lr.n_pos // P
                arena.page_crc[lr.pages[:full]] = lr.crc[:full]
                committed = None
                if len(lr.pages):
                    rows = lr.n_pos - (len(lr.pages) - 1) * P
                    partial = rows < P
                    committed = (int(lr.pages[-1]), rows, int(lr.crc[-1]) if partial else None,
                                 lr.res_crc.tolist() if partial else None)
                # guard P: the other commit on disk may list more rows of the last page
                states.append(LayerState(BlockTable(lr.pages), lr.n_pos, lr.first, lr.res, P, committed))
                tables.append(np.concatenate([lr.pages, lr.res]))
                owners.append((sid, layer))
            table.seqs[sid] = Sequence(sid, name, states, max_tokens, (page, nbytes, crc, rec_pages))
            if name is not None:
                table.names[name] = sid
        table.next_id = root.next_sequence_id

        def bad(msg):
            raise CacheFileError(msg)
        counts = count_tables(tables, owners, hw, bad)
        meta = np.array(meta, np.int64)
        if len(meta) and (len(np.unique(meta)) != len(meta) or np.any(counts[meta])):
            bad("a metadata page is listed twice, or also holds tokens")
        counts[meta] = 1
        table.alloc = PageAllocator(counts)
        table.meta_pages = len(meta)

    def other_pages(self, table: SequenceTable, root: Root) -> np.ndarray:
        """Every page the commit of ``root`` lists, as far as it parses (the other root of a
        file being opened for writing: those pages stay unused until the next commit)."""
        found = []
        data, pb = table.arena.data, self.sb.page_bytes
        hw = min(root.high_water, table.arena.capacity)
        mine = {s.seq_id: s.rec for s in table.seqs.values()}
        try:
            if root.index_page == NO_PAGE:
                return np.zeros(0, np.int64)
            index, pages = read_blob(data, pb, root.index_page, root.index_bytes, root.index_crc, hw, "index")
            found += pages
            for sid, page, nbytes, crc in parse_index(index, root.num_sequences, root.next_sequence_id).tolist():
                rec = mine.get(sid)
                if rec is not None and rec[:3] == (page, nbytes, crc):
                    continue                    # the same record: nothing only the other lists
                content, pages = read_blob(data, pb, page, nbytes, crc, hw, "record")
                found += pages
                for lr in parse_record(content, table.num_layers, table.page_size, table.res_pages, hw)[3]:
                    found += lr.pages.tolist() + lr.res.tolist()
        except CacheFileError:
            pass
        return np.array(found, np.int64)

    def continue_as_writer(self) -> None:
        """The next commit follows the newest generation on disk."""
        self.generation = self.newest_seen

    def is_current(self) -> bool:
        """Whether the newest commit on disk is still the one that was newest at open."""
        gens = [r.generation for r in (read_root(self.fd, self.sb, i) for i in (0, 1)) if r is not None]
        return max(gens, default=-1) == self.newest_seen

    # ------------------------------------------------------------------ committing

    def save(self, table: SequenceTable) -> None:
        """Commit ``table``: records of changed sequences, a new index, sync, root, sync.

        Raises OSError (nothing moved: the commit this cache is at stays the newest and the
        pages taken for it are free again), or CacheFileError after an earlier failed sync.
        """
        if self.sync_failed:
            raise CacheFileError(
                f"{self.path}: an earlier flush failed to sync ({self.sync_failed}); changes since the last "
                "commit may be lost on disk, so this cache commits nothing more: reopen it (it holds the last "
                "commit) and redo the work since")
        arena, alloc, pb = table.arena, table.alloc, self.sb.page_bytes
        dirty = sorted(sid for sid in table.dirty if sid in table.seqs)
        contents = {sid: pack_record(table, table.seqs[sid]) for sid in dirty}
        nseq = len(table.seqs)
        need = sum(pages_needed(len(c), pb) for c in contents.values()) + (pages_needed(16 * nseq, pb) if nseq else 0)
        taken: list[int] = []

        def put(content: bytes) -> tuple:
            """Write a blob into fresh pages: (first page, length, crc, pages)."""
            pages = alloc.alloc(pages_needed(len(content), pb))
            taken.extend(pages.tolist())
            return int(pages[0]), len(content), write_blob(arena.data, pb, pages, content), pages.tolist()

        try:
            table.prepare_pages(need, meta=True)
            new_rec = {sid: put(c) for sid, c in contents.items()}
            index = pack_index([(sid, *(new_rec.get(sid) or s.rec)[:3]) for sid, s in table.seqs.items()])
            ipage, _, icrc, index_pages = put(index) if nseq else (NO_PAGE, 0, 0, [])
            root = Root(self.generation + 1, alloc.high_water, ipage, len(index), icrc, table.next_id, nseq)
            slot = 1 - self.active_slot
            self._sync(self.fd)                 # every page the root lists, durable first
        except BaseException:
            alloc.unalloc(taken)                # no root names them: free again
            raise
        try:
            write_root(self.fd, self.sb, slot, root, sync=self._sync)
        except OSError:
            if not self.sync_failed:            # the write failed: no whole root is on disk
                alloc.unalloc(taken)
            raise
        except BaseException as e:
            # Interrupted once the root may be on disk: it may become durable, so the pages
            # it names must not be handed out again, and this cache no longer knows which
            # commit is newest. It commits nothing more (like after a failed sync): reopen.
            self.sync_failed = self.sync_failed or f"{type(e).__name__} while the commit root was written"
            raise
        self.generation += 1
        self.active_slot = slot
        release = self.index_pages + table.dropped_records
        for sid, rec in new_rec.items():
            old = table.seqs[sid].rec
            if old is not None:
                release += old[3]
            table.seqs[sid].rec = rec
        self.index_pages, table.dropped_records = index_pages, []
        table.meta_pages += len(taken) - len(release)
        if release:
            alloc.decref(np.array(release, np.uint32))
        alloc.release_pending()
        table.committed(dirty)
        table.dirty.clear()
        table.reserve_meta_ahead(len(taken))

    def _sync(self, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as e:
            self.sync_failed = f"{type(e).__name__}: {e}"
            raise
