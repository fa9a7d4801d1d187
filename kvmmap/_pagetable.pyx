# Typed loops of the page table: reference counts, the free list, slot mapping and the
# checks of a batch's paged layout. Python-side bookkeeping lives in kvmmap/pagetable.py.
# Nothing here raises: functions return a status or an index, pagetable.py raises.

from libc.stdint cimport int64_t, uint32_t


def incref(uint32_t[::1] refcounts, const uint32_t[::1] pages):
    """refcounts[p] += 1 for each page; returns the index of the first page out of range, or -1."""
    cdef Py_ssize_t i, n = refcounts.shape[0]
    for i in range(pages.shape[0]):
        if pages[i] >= n:
            return i
    for i in range(pages.shape[0]):
        refcounts[pages[i]] += 1
    return -1


def decref(uint32_t[::1] refcounts, const uint32_t[::1] pages, uint32_t[::1] released):
    """refcounts[p] -= 1 for each page; pages that reach 0 are written to ``released``.

    Returns the number released, or -(i + 1) if pages[i] is out of range or already at 0
    (then nothing is changed). A page listed twice is decremented twice.
    """
    cdef Py_ssize_t i, n = refcounts.shape[0], k = 0
    # check first, against counts decremented in a scratch pass, so that a refused call
    # changes nothing
    for i in range(pages.shape[0]):
        if pages[i] >= n or refcounts[pages[i]] == 0:
            for k in range(i):
                refcounts[pages[k]] += 1
            return -(i + 1)
        refcounts[pages[i]] -= 1
    k = 0
    for i in range(pages.shape[0]):
        if refcounts[pages[i]] == 0:
            released[k] = pages[i]
            k += 1
            refcounts[pages[i]] = 0xFFFFFFFF   # mark, so a page listed twice is released once
    for i in range(k):
        refcounts[released[i]] = 0
    return k


def slot_mapping(const uint32_t[::1] block_table, int64_t first, int64_t start, int64_t n,
                 int64_t page_size, int64_t[::1] out):
    """Physical slot (page * page_size + offset) of visible tokens start .. start + n - 1.

    ``first`` is the number of positions dropped from the front of the first page (by a
    sliding window). Positions past the block table get -1 (they are in the open tail).
    """
    cdef int64_t i, pos, logical
    for i in range(n):
        pos = first + start + i
        logical = pos // page_size
        if logical < block_table.shape[0]:
            out[i] = <int64_t>block_table[logical] * page_size + pos % page_size
        else:
            out[i] = -1


def check_paged_layout(const int64_t[::1] indptr, const uint32_t[::1] indices,
                       const int64_t[::1] last_page_len, int64_t page_size, int64_t num_pages):
    """Check the CSR rules of a batch's paged layout; returns 0 or a rule number (1..5)."""
    cdef Py_ssize_t b, batch = last_page_len.shape[0]
    cdef int64_t i
    if indptr.shape[0] != batch + 1 or indptr[0] != 0:
        return 1
    for b in range(batch):
        if indptr[b + 1] < indptr[b]:
            return 2
    if indptr[batch] != indices.shape[0]:
        return 3
    for i in range(indices.shape[0]):
        if indices[i] >= num_pages:
            return 4
    for b in range(batch):
        if indptr[b + 1] > indptr[b]:
            if last_page_len[b] < 1 or last_page_len[b] > page_size:
                return 5
        elif last_page_len[b] != 0:
            return 5
    return 0


def count_tables(const uint32_t[::1] pages, const int64_t[::1] indptr, const int64_t[::1] table_layer,
                 uint32_t[::1] counts, int64_t[::1] last_table, int64_t[::1] page_layer):
    """Reference counts of the block tables of a commit, and the rules they must keep.

    Table ``t`` lists ``pages[indptr[t]:indptr[t + 1]]`` and belongs to layer
    ``table_layer[t]``. ``counts`` (zeroed), ``last_table`` and ``page_layer`` (both -1)
    have one entry per page; every page id is below their length (checked by the caller).
    One pass, O(entries). Returns (0, -1, -1) when the rules hold, else (rule, table,
    entry): rule 1, a table lists a page twice; rule 2, tables of two layers list one page.
    """
    cdef Py_ssize_t t, i
    cdef uint32_t p
    for t in range(table_layer.shape[0]):
        for i in range(indptr[t], indptr[t + 1]):
            p = pages[i]
            if last_table[p] == t:
                return 1, t, i
            if page_layer[p] != -1 and page_layer[p] != table_layer[t]:
                return 2, t, i
            last_table[p] = t
            page_layer[p] = table_layer[t]
            counts[p] += 1
    return 0, -1, -1
