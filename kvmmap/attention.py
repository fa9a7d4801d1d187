"""Paged decode attention: one new query token per sequence against its cached K/V.

The CPU path (:mod:`kvmmap._attention`) reads the quantized pages in place and decodes
them inside the loop, a page at a time; no full-precision copy of the context is made.
The OpenCL path (:mod:`kvmmap.opencl`) runs the same computation on a device that keeps
its own copy of the pool and receives only the pages sealed since its last call.

For every sequence ``b`` and query head ``j`` (kv head ``h = j // G`` with
``G = num_q_heads / num_kv_heads``)::

    out[b, j] = softmax(scale * K_b[:, h] @ q[b, j]) @ V_b[:, h]

over the sequence's visible tokens (its last ``window`` tokens when a window is given),
where ``K_b``, ``V_b`` are the *stored* (dequantized) keys and values.

Finite inputs give finite outputs. Both kernels work in float32 and mark a row whose
logits or sums overflowed (``q . k`` of finite float32 vectors can reach
``head_dim * 3.4e38**2``) with NaN or inf; :func:`exact_decode` recomputes such rows in
float64, as it does every row when ``scale`` is not a normal float32.
"""

from __future__ import annotations

import math

import numpy as np

from ._validate import as_float_array, check_layer
from .errors import ConfigError, NonFiniteError, SequenceError, ShapeError, describe
from .parallel import get_num_threads

BACKENDS = ("cpu", "opencl", "auto")
BLOCK_TOKENS = 16     # CPU: tokens decoded per head per step (rounded to whole pages)
EXACT_TOKENS = 4096   # exact_decode: tokens read per step
FLT_MIN, FLT_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)


def check_query(cache, layer, seqs, q, scale, window):
    """Validate the arguments of a batched decode.

    Returns (layer, seqs, q float32, scale float, window int or None); a window at least as
    long as every sequence is None (any positive int is accepted: 2**70 means no limit).
    """
    if not callable(getattr(cache, "paged_batch", None)):       # the view every kernel reads
        raise ConfigError(f"cache must be a PagedKVCache, found {type(cache).__name__}")
    layer = check_layer(layer, cache.num_layers)
    if isinstance(seqs, (int, np.integer)):
        raise SequenceError("seqs must be a sequence of sequence ids (use decode_attention for one)")
    seqs = [int(s) if isinstance(s, np.integer) else s for s in seqs]
    lengths = [cache.seq_len(s, layer) for s in seqs]          # refuses unknown ids and a closed cache
    if not seqs:
        cache.paged_batch(layer, [])                            # an empty batch: still refuse a closed cache
    q = as_float_array(q, "q")      # float64 and torch tensors of any float dtype are converted
    H, D = cache.num_kv_heads, cache.head_dim
    if q.ndim != 3 or q.shape[0] != len(seqs) or q.shape[2] != D or q.shape[1] % H or q.shape[1] == 0:
        raise ShapeError(
            f"q must be [batch={len(seqs)}, num_q_heads (a multiple of num_kv_heads={H}), head_dim={D}], "
            f"found {describe(q)}"
        )
    if not np.isfinite(q).all():
        raise NonFiniteError("q holds NaN or inf")
    # bool is an int subclass and np.bool_ converts to one: True is not a length or a scale
    if window is not None and (not isinstance(window, (int, np.integer)) or isinstance(window, bool)
                               or int(window) < 1):
        raise ShapeError(f"window must be a positive number of tokens or None, found {window!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif (not isinstance(scale, (int, float, np.integer, np.floating)) or isinstance(scale, bool)
          or not math.isfinite(scale) or scale <= 0):
        raise ShapeError(f"scale must be a positive finite number, found {scale!r}")
    for s, n in zip(seqs, lengths):
        if n == 0:
            raise SequenceError(f"sequence {s} has no tokens in layer {layer}: nothing to attend over")
    if window is not None and int(window) >= max(lengths, default=0):
        window = None
    return (layer, seqs, np.ascontiguousarray(q, np.float32), float(scale),
            None if window is None else int(window))


def _items(batch, block: int, nthreads: int) -> np.ndarray:
    """Work items (b, t0, t1): long contexts are split so every thread has work."""
    lengths = batch.lengths
    total = int(lengths.sum())
    # About 4 items per thread, none shorter than 1024 tokens (a split costs a merge, and
    # waking a thread costs more than a short item).
    chunk = max(1024, -(-total // (4 * nthreads)))
    chunk = -(-chunk // block) * block
    rows = []
    for b in range(len(lengths)):
        s, e = int(batch.start[b]), int(batch.end[b])
        cuts = [s, *range((s // block) * block + chunk, e, chunk), e]     # on block boundaries
        rows.extend((b, t0, t1) for t0, t1 in zip(cuts[:-1], cuts[1:]))
    return np.array(rows, np.int64).reshape(-1, 3)


def cpu_decode(cache, layer: int, seqs, q: np.ndarray, scale: float, window) -> np.ndarray:
    """The CPU path of :func:`paged_decode_attention` (arguments already checked)."""
    from . import _attention

    P, D = cache.page_size, cache.head_dim
    B, Hq = q.shape[0], q.shape[1]
    block = max(1, BLOCK_TOKENS // P) * P
    batch = cache.paged_batch(layer, seqs, window)
    nthreads = get_num_threads()
    items = _items(batch, block, nthreads)
    m = np.empty((len(items), Hq), np.float32)
    l = np.empty((len(items), Hq), np.float32)
    acc = np.empty((len(items), Hq, D), np.float32)
    arena = cache.arena.data if cache.arena.data.size else np.zeros(1, np.uint8)
    _attention.attend(
        arena, cache.arena.page_bytes, *cache.layout.side_offsets("k"), *cache.layout.side_offsets("v"),
        cache.layout.group_size["v"],
        batch.page_indptr, batch.page_indices, batch.tail_k, batch.tail_v,
        items, q, scale, block, m, l, acc, nthreads,
    )
    if np.isnan(m[:, 0]).any():
        raise MemoryError("decode attention could not allocate its scratch buffers")
    out = np.empty((B, Hq, D), np.float32)
    _attention.merge_partials(items, m, l, acc, out)
    return out


def exact_decode(cache, layer: int, seq: int, q: np.ndarray, scale: float, window) -> np.ndarray:
    """Decode attention of one sequence in float64 (arguments already checked).

    The path for inputs whose float32 logits or sums overflow. Logits ``x = K q`` are
    finite in float64 for any finite float32 K and q (``|x| <= head_dim * 3.4e38**2``), and
    the weights ``exp(scale * (x - max x))`` lie in [0, 1] with 1 at the maximum for any
    positive finite scale, so the output, a weighted mean of V, is finite. The context is
    read ``EXACT_TOKENS`` at a time (online softmax), so memory does not grow with it.

    q: float32 [H * G, D]. Returns float32 [H * G, D].
    """
    H = cache.num_kv_heads
    Hq, D = q.shape
    n = cache.seq_len(seq, layer)
    t = 0 if window is None else max(0, n - window)
    qg = q.astype(np.float64).reshape(H, Hq // H, D)
    m = np.full(qg.shape[:2], -np.inf)
    l = np.zeros(qg.shape[:2])
    acc = np.zeros(qg.shape)
    with np.errstate(over="ignore"):       # scale * (x - m) may be -inf: a weight of 0
        for t0 in range(t, n, EXACT_TOKENS):
            k, v = cache.read(seq, layer, t0, min(n, t0 + EXACT_TOKENS))
            x = np.einsum("thd,hgd->hgt", k.astype(np.float64), qg)
            m_new = np.maximum(m, x.max(axis=2))
            alpha = np.exp(scale * (m - m_new))            # 0 on the first step (m = -inf)
            p = np.exp(scale * (x - m_new[..., None]))
            l = l * alpha + p.sum(axis=2)
            acc = acc * alpha[..., None] + np.einsum("hgt,thd->hgd", p, v.astype(np.float64))
            m = m_new
    out = acc / l[..., None]
    # a mean of float32 values, but float64 rounding may pass FLT_MAX by an ulp
    return np.clip(out, -FLT_MAX, FLT_MAX).astype(np.float32).reshape(Hq, D)


def paged_decode_attention(cache, layer: int, seqs, q, *, scale: float | None = None,
                           window: int | None = None, backend: str = "auto") -> np.ndarray:
    """Attention of one new query token per sequence over each sequence's cached K/V.

    Parameters
    ----------
    cache : PagedKVCache
    layer : int
    seqs : sequence of int, length B
        Sequence ids (they may share pages through :meth:`PagedKVCache.fork`).
    q : numpy.ndarray, float32 or float16, shape ``[B, num_q_heads, head_dim]``
        ``num_q_heads`` is a multiple ``G`` of ``num_kv_heads`` (GQA; ``G == 1`` is MHA,
        ``num_kv_heads == 1`` MQA). Query head ``j`` reads kv head ``j // G``.
    scale : float, optional
        Softmax scale, any positive finite number; default ``1 / sqrt(head_dim)``.
    window : int, optional
        Attend only over the last ``window`` tokens of each sequence (sliding window);
        a window longer than a sequence covers all of it.
    backend : {"auto", "cpu", "opencl"}
        ``"auto"`` uses OpenCL when a GPU is available and the CPU otherwise.

    Returns
    -------
    numpy.ndarray, float32, shape ``[B, num_q_heads, head_dim]``
        Finite for finite inputs: rows whose float32 logits or sums overflow (huge q, K, V
        or scale) are recomputed in float64. ``B == 0`` gives an empty array.

    Examples
    --------
    >>> import numpy as np, kvmmap as km
    >>> c = km.PagedKVCache.create(None, num_layers=1, num_kv_heads=2, head_dim=64)
    >>> s = c.new_sequence()
    >>> kv = np.random.default_rng(0).standard_normal((40, 2, 64), dtype=np.float32)
    >>> c.append(s, 0, kv, kv)
    >>> km.paged_decode_attention(c, 0, [s], np.ones((1, 8, 64), np.float32)).shape
    (1, 8, 64)
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, found {backend!r}")
    layer, seqs, q, scale, window = check_query(cache, layer, seqs, q, scale, window)
    if not seqs:
        return np.empty(q.shape, np.float32)
    if backend == "auto":
        from . import opencl
        backend = "opencl" if opencl.has_gpu() else "cpu"
    if not FLT_MIN <= scale <= FLT_MAX:     # the kernels take scale as a normal float32
        out = np.full(q.shape, np.nan, np.float32)
    elif backend == "opencl":
        from . import opencl
        out = opencl.decode(cache, layer, seqs, q, scale, window)
    else:
        out = cpu_decode(cache, layer, seqs, q, scale, window)
    finite = np.isfinite(out)
    if not finite.all():
        for b in np.flatnonzero(~finite.all(axis=(1, 2))):
            out[b] = exact_decode(cache, layer, seqs[b], q[b], scale, window)
    if seqs:
        # a read-only view: refuse the result if a writer has since reused pages it read
        cache.check_pages_current(np.unique(np.concatenate([cache.page_table(s, layer)[0] for s in seqs])))
    return out
