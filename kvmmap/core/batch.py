"""The paged view of a batch of sequences of one layer: what attention kernels read.

Kernels (the CPU's kvmmap._attention, OpenCL's paged_attention.cl) take this view and the
arena (:class:`kvmmap.core.arena.Arena`), never the cache's insides. The page table
follows FlashInfer's CSR layout (rules in :mod:`kvmmap.pagetable`).
"""

from __future__ import annotations

import numpy as np

from ..codecs import quant


class PagedBatch:
    """Sealed pages, visible range and open pages of ``B`` sequences of one layer.

    Sequence ``b`` owns sealed pages ``page_indices[page_indptr[b]:page_indptr[b + 1]]``
    (logical page ``i`` holds positions ``i * P .. i * P + P - 1``); positions at or past
    ``(page_indptr[b + 1] - page_indptr[b]) * P`` are in its open page ``tail_k[b]`` /
    ``tail_v[b]``. Visible positions are ``start[b] .. end[b] - 1``.

    Attributes
    ----------
    page_indptr : numpy.ndarray, int64 ``[B + 1]``
    page_indices : numpy.ndarray, int32 ``[nnz]``
    start, end : numpy.ndarray, int64 ``[B]``
    tail_k, tail_v : numpy.ndarray, float32 ``[B, H, P, D]``
        The open pages, dequantized (int4 open pages are float32 already).
    """

    def __init__(self, table, layer: int, seqs, window: int | None):
        """``table``: a :class:`~kvmmap.core.sequences.SequenceTable`; ``seqs`` checked ids."""
        B, lay = len(seqs), table.layout
        H, P, D = lay.num_kv_heads, lay.page_size, lay.head_dim
        states = [table.get(s).layers[layer] for s in seqs]
        counts = np.array([len(st.bt) for st in states], np.int64)
        self.page_indptr = np.zeros(B + 1, np.int64)
        np.cumsum(counts, out=self.page_indptr[1:])
        self.page_indices = (np.concatenate([st.bt.pages for st in states]).astype(np.int32, copy=False)
                             if B else np.zeros(0, np.int32))
        self.end = np.array([st.n_pos for st in states], np.int64)
        self.start = np.array([st.first for st in states], np.int64)
        if window is not None:
            self.start = np.maximum(self.start, self.end - window)
        self.tail_k = np.zeros((B, H, P, D), np.float32)
        self.tail_v = np.zeros((B, H, P, D), np.float32)
        for b, st in enumerate(states):
            n_tail = st.n_pos - len(st.bt) * P
            if n_tail:
                quant.dequantize(table.tail_q("k", st.tail, 0, n_tail), out=self.tail_k[b, :, :n_tail])
                quant.dequantize(table.tail_q("v", st.tail, 0, n_tail), out=self.tail_v[b, :, :n_tail])

    @property
    def lengths(self) -> np.ndarray:
        """Visible tokens of each sequence, int64 ``[B]``."""
        return self.end - self.start

    def pages(self) -> np.ndarray:
        """Every sealed page the batch lists, once, increasing."""
        return np.unique(self.page_indices)
