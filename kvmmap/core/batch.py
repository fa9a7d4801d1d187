"""The paged view of a batch of sequences of one layer: what attention kernels read.

Kernels (the CPU's kvmmap._attention, OpenCL's paged_attention.cl) take this view and the
arena (:class:`kvmmap.core.arena.Arena`), never the cache's insides. The page table
follows FlashInfer's CSR layout (rules in :mod:`kvmmap.pagetable`).
"""

from __future__ import annotations

import numpy as np



class PagedBatch:
    """Full pages, visible range and partly filled last pages of ``B`` sequences of one layer.

    Sequence ``b`` owns full pages ``page_indices[page_indptr[b]:page_indptr[b + 1]]``
    (logical page ``i`` holds positions ``i * P .. i * P + P - 1``); positions at or past
    ``(page_indptr[b + 1] - page_indptr[b]) * P`` are in its partly filled last page, given
    dequantized as ``tail_k[b]`` / ``tail_v[b]`` (kvmmap's kernels take the last page so;
    :meth:`~kvmmap.PagedKVCache.paged_layout` gives every page, FlashInfer's way).
    Visible positions are ``start[b] .. end[b] - 1``.

    Attributes
    ----------
    page_indptr : numpy.ndarray, int64 ``[B + 1]``
    page_indices : numpy.ndarray, int32 ``[nnz]``
    start, end : numpy.ndarray, int64 ``[B]``
    tail_k, tail_v : numpy.ndarray, float32 ``[B, H, P, D]``
        The partly filled last pages, dequantized (rows past their length are zero).
    """

    def __init__(self, table, layer: int, seqs, window: int | None):
        """``table``: a :class:`~kvmmap.core.sequences.SequenceTable`; ``seqs`` checked ids."""
        B, lay = len(seqs), table.layout
        H, P, D = lay.num_kv_heads, lay.page_size, lay.head_dim
        states = [table.get(s).layers[layer] for s in seqs]
        counts = np.array([table.full_pages(st) for st in states], np.int64)
        self.page_indptr = np.zeros(B + 1, np.int64)
        np.cumsum(counts, out=self.page_indptr[1:])
        self.page_indices = (np.concatenate([st.bt.pages[:c] for st, c in zip(states, counts.tolist())])
                             .astype(np.int32, copy=False) if B else np.zeros(0, np.int32))
        self.end = np.array([st.n_pos for st in states], np.int64)
        self.start = np.array([st.first for st in states], np.int64)
        if window is not None:
            self.start = np.maximum(self.start, self.end - window)
        self.tail_k = np.zeros((B, H, P, D), np.float32)
        self.tail_v = np.zeros((B, H, P, D), np.float32)
        for b, st in enumerate(states):
            n_tail = st.n_pos % P
            if n_tail:
                table.rows_of_last(st, 0, n_tail, self.tail_k[b, :, :n_tail], self.tail_v[b, :, :n_tail])

    @property
    def lengths(self) -> np.ndarray:
        """Visible tokens of each sequence, int64 ``[B]``."""
        return self.end - self.start

    def pages(self) -> np.ndarray:
        """Every full page the batch lists, once, increasing."""
        return np.unique(self.page_indices)
