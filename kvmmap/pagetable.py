"""Page table: physical pages, reference counts, free list, block tables.

Rules (checked by :func:`check_paged_layout` and the tests), written the way FlashInfer
states its CSR layout. For a batch of ``B`` (sequence, layer) pairs:

* ``indptr`` has ``B + 1`` entries, ``indptr[0] == 0``, and never decreases;
* ``indices[indptr[b]:indptr[b + 1]]`` are the physical pages of entry ``b`` in logical
  order, and ``indptr[B] == len(indices)``;
* every index is below the number of physical pages;
* ``0 < last_page_len[b] <= page_size`` where entry ``b`` has pages, else 0.

Inside kvmmap each (sequence, layer) owns a block table of every page of its tokens: all
full but perhaps the last (rules of writing in place: :mod:`kvmmap.core.sequences`). A
page's reference count is the number of block tables that list it (metadata pages: 1);
``fork`` shares pages by raising their counts.
A page whose count drops to 0 is *pending*: it is still listed by the newest commit on
disk. The next commit *retires* it (only the previous commit, the other metadata slot,
lists it now) and the commit after that frees it for reuse. So neither of the two commits
on disk ever points at an overwritten page: the previous one can be opened on purpose
(``PagedKVCache.open(..., commit="previous")``) or fallen back to after damage.
"""

from __future__ import annotations

import numpy as np

from . import _pagetable
from .errors import PageTableError

_LAYOUT_RULES = {
    1: "indptr must have batch + 1 entries and start at 0",
    2: "indptr must not decrease",
    3: "indptr[-1] must equal len(indices)",
    4: "every page index must be below the number of physical pages",
    5: "last_page_len must be in 1..page_size for entries with pages and 0 for empty ones",
}


class PageAllocator:
    """Physical page ids, their reference counts and the free list.

    Parameters
    ----------
    refcounts : numpy.ndarray of uint32, optional
        Counts of pages ``0 .. len(refcounts) - 1`` (e.g. rebuilt from the block tables of
        a reopened file). Pages with count 0 start free.
    """

    def __init__(self, refcounts: np.ndarray | None = None):
        counts = np.zeros(0, np.uint32) if refcounts is None else np.asarray(refcounts, np.uint32)
        self._refcounts = np.zeros(max(16, 2 * len(counts)), np.uint32)
        self._refcounts[: len(counts)] = counts
        self._high_water = len(counts)
        self._free = [int(p) for p in np.flatnonzero(counts == 0)[::-1]]   # pop() takes the lowest
        self._pending: list[int] = []
        self._retired: list[int] = []

    @property
    def high_water(self) -> int:
        """Number of page ids ever handed out; the arena holds at least this many pages."""
        return self._high_water

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_pending(self) -> int:
        """Dropped pages not reusable yet: listed by the newest or the previous commit."""
        return len(self._pending) + len(self._retired)

    def retire(self, pages) -> None:
        """Keep free pages out of use until the next commit (they are listed by the other
        metadata slot's commit, e.g. after reopening a file)."""
        keep = {int(p) for p in pages}
        keep = {p for p in keep if p < self._high_water and self._refcounts[p] == 0} - set(self._retired)
        if keep:
            self._free = [p for p in self._free if p not in keep]
            self._retired.extend(sorted(keep))

    @property
    def refcounts(self) -> np.ndarray:
        """Read-only view of the counts of pages ``0 .. high_water - 1``."""
        v = self._refcounts[: self._high_water]
        v.flags.writeable = False
        return v

    def refcount(self, page: int) -> int:
        return int(self._refcounts[page])

    def fresh_needed(self, n: int) -> int:
        """How many new page ids :meth:`alloc` of ``n`` pages would add (beyond the free list)."""
        return max(0, n - len(self._free))

    def alloc(self, n: int) -> np.ndarray:
        """Hand out ``n`` pages with count 1: reused free pages first, then new ids."""
        reuse = [self._free.pop() for _ in range(min(n, len(self._free)))]
        fresh = n - len(reuse)
        if self._high_water + fresh > len(self._refcounts):
            grown = np.zeros(max(2 * len(self._refcounts), self._high_water + fresh), np.uint32)
            grown[: self._high_water] = self._refcounts[: self._high_water]
            self._refcounts = grown
        pages = np.array(reuse + list(range(self._high_water, self._high_water + fresh)), np.uint32)
        self._high_water += fresh
        self._refcounts[pages] = 1
        return pages

    def incref(self, pages) -> None:
        pages = np.ascontiguousarray(pages, np.uint32)
        bad = _pagetable.incref(self._refcounts[: self._high_water], pages)
        if bad >= 0:
            raise PageTableError(f"page {pages[bad]} does not exist (high water {self._high_water})")

    def decref(self, pages) -> None:
        """Drop one reference from each page; pages reaching 0 become pending."""
        pages = np.ascontiguousarray(pages, np.uint32)
        released = np.empty(len(pages), np.uint32)
        k = _pagetable.decref(self._refcounts[: self._high_water], pages, released)
        if k < 0:
            p = int(pages[-k - 1])
            what = "does not exist" if p >= self._high_water else "is already free"
            raise PageTableError(f"cannot release page {p}: it {what}")
        self._pending.extend(int(p) for p in released[:k])

    def unalloc(self, pages) -> None:
        """Take back pages handed out by :meth:`alloc` that no commit has seen (undoing a
        failed call): their counts return to 0 and they are free at once."""
        pages = [int(p) for p in pages]
        bad = [p for p in pages if p >= self._high_water or self._refcounts[p] != 1]
        if bad or len(set(pages)) != len(pages):
            raise PageTableError(f"cannot take back pages {pages[:8]}: not all are pages just handed out")
        self._refcounts[pages] = 0
        self._free.extend(sorted(pages, reverse=True))
        self._free.sort(reverse=True)

    def move(self, old, new) -> None:
        """Pages ``old`` were copied to the free pages ``new`` (compaction): ``new`` take
        their counts, ``old`` are dropped (pending: commits on disk still list them)."""
        old, new = [int(p) for p in old], [int(p) for p in new]
        taken = set(new)
        if len(taken) != len(new) or not taken <= set(self._free) or any(self._refcounts[p] == 0 for p in old):
            raise PageTableError("a move needs free destination pages and listed source pages")
        self._free = [p for p in self._free if p not in taken]
        self._refcounts[new] = self._refcounts[old]
        self._refcounts[old] = 0
        self._pending.extend(old)

    def free_pages(self) -> np.ndarray:
        """Ids of the free pages (no commit on disk lists them), increasing."""
        return np.array(sorted(self._free), np.int64)

    def shrink(self) -> int:
        """Forget free pages at the top of the id range (a RAM arena that gives memory
        back); returns the new high-water mark."""
        free = set(self._free)
        hw = self._high_water
        while hw > 0 and (hw - 1) in free:
            hw -= 1
        if hw < self._high_water:
            self._free = [p for p in self._free if p < hw]
            self._refcounts[hw:self._high_water] = 0
            self._high_water = hw
        return hw

    def release_pending(self) -> None:
        """A commit happened: pages dropped before the previous commit become free, and
        those dropped since are retired (the commit before this one still lists them)."""
        self._free.extend(self._retired)
        self._free.sort(reverse=True)
        self._retired = self._pending
        self._pending = []


class BlockTable:
    """The pages of one (sequence, layer), in logical order (a growable uint32 array)."""

    __slots__ = ("_pages", "_n")

    def __init__(self, pages=None):
        pages = np.zeros(0, np.uint32) if pages is None else np.asarray(pages, np.uint32)
        self._pages = np.zeros(max(8, 2 * len(pages)), np.uint32)
        self._pages[: len(pages)] = pages
        self._n = len(pages)

    def __len__(self) -> int:
        return self._n

    @property
    def pages(self) -> np.ndarray:
        """View of the page ids (valid until the next change)."""
        return self._pages[: self._n]

    def append(self, page: int) -> None:
        if self._n == len(self._pages):
            grown = np.zeros(2 * len(self._pages), np.uint32)
            grown[: self._n] = self._pages[: self._n]
            self._pages = grown
        self._pages[self._n] = page
        self._n += 1

    def set_last(self, page: int) -> None:
        """Replace the last page (copy-on-write)."""
        self._pages[self._n - 1] = page

    def drop_front(self, n: int) -> np.ndarray:
        """Remove and return the first ``n`` pages."""
        gone = self._pages[:n].copy()
        self._pages[: self._n - n] = self._pages[n : self._n].copy()
        self._n -= n
        return gone

    def drop_back(self, n: int) -> np.ndarray:
        """Remove and return the last ``n`` pages."""
        gone = self._pages[self._n - n : self._n].copy()
        self._n -= n
        return gone

    def copy(self) -> "BlockTable":
        return BlockTable(self.pages.copy())


def slot_mapping(block_table: np.ndarray, first: int, start: int, n: int, page_size: int) -> np.ndarray:
    """Physical slots ``page * page_size + offset`` of visible tokens ``start .. start+n-1``.

    """
    out = np.empty(n, np.int64)
    _pagetable.slot_mapping(np.ascontiguousarray(block_table, np.uint32), first, start, n, page_size, out)
    return out


def check_paged_layout(indptr, indices, last_page_len, page_size: int, num_pages: int) -> None:
    """Raise :class:`PageTableError` naming the first rule (module docstring) a layout breaks."""
    rule = _pagetable.check_paged_layout(
        np.ascontiguousarray(indptr, np.int64),
        np.ascontiguousarray(indices, np.uint32),
        np.ascontiguousarray(last_page_len, np.int64),
        page_size,
        num_pages,
    )
    if rule:
        raise PageTableError(f"paged layout breaks rule {rule}: {_LAYOUT_RULES[rule]}")
