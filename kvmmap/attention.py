"""Paged attention against each sequence's cached K/V: decode (one new query token per
sequence, :func:`paged_decode_attention`) and several query tokens, causal among
themselves (:func:`paged_attention`).

The CPU path (:mod:`kvmmap._attention`) reads the quantized pages in place and decodes
them inside the loop, a page at a time; no full-precision copy of the context is made.
The OpenCL path (:mod:`kvmmap.opencl`) runs the same computation on a device that keeps
its own copy of the pool and receives only the pages sealed since its last call.

For every sequence ``b`` and query head ``j`` (kv head ``h = j // G`` with
``G = num_q_heads / num_kv_heads``)::

    out[b, j] = softmax(scale * K_b[:, h] @ q[b, j]) @ V_b[:, h]

over the sequence's visible tokens (its last ``window`` tokens when a window is given),
where ``K_b``, ``V_b`` are the *stored* (dequantized) keys and values. With several
query tokens, token ``i`` of a sequence of ``n`` visible tokens sits at position
``n - q_tokens + i`` and attends over positions up to its own (causal) or all ``n``, and
from its own minus ``window - 1`` when a window is given.

Finite inputs give finite outputs. Both kernels work in float32 and mark a row whose
logits or sums overflowed (``q . k`` of finite float32 vectors can reach
``head_dim * 3.4e38**2``) with NaN or inf; :func:`exact_decode` (:func:`exact_attention`)
recomputes such rows in float64, as it does every row when ``scale`` is not a normal float32.
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



def _resolve(backend: str) -> str:
    """"auto": OpenCL on a GPU, else the CPU."""
    if backend != "auto":
        return backend
    from . import opencl
    return "opencl" if opencl.has_gpu() else "cpu"

def _run(cache, layer: int, seqs, q: np.ndarray, scale: float, backend: str, on_opencl, on_cpu, exact):
    """What both attention entry points do with checked, non-empty arguments: run the
    backend's kernel (``on_opencl(module)`` or ``on_cpu()``), recompute in float64 every
    sequence whose output is not finite (``exact(b)``), and refuse the result if a writer
    has since reused pages it read (a read-only view)."""
    backend = _resolve(backend)
    if not FLT_MIN <= scale <= FLT_MAX:     # the kernels take scale as a normal float32
        out = np.full(q.shape, np.nan, np.float32)
    elif backend == "opencl":
        from . import opencl
        out = on_opencl(opencl)
    else:
        out = on_cpu()
    for b in np.flatnonzero(~np.isfinite(out).reshape(len(out), -1).all(axis=1)):
        out[b] = exact(b)
    cache.check_pages_current(np.unique(np.concatenate([cache.page_table(s, layer)[0] for s in seqs])))
    return out


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
    return _run(cache, layer, seqs, q, scale, backend,
                lambda opencl: opencl.decode(cache, layer, seqs, q, scale, window),
                lambda: cpu_decode(cache, layer, seqs, q, scale, window),
                lambda b: exact_decode(cache, layer, seqs[b], q[b], scale, window))


# ---------------------------------------------------------------------------------
# Attention of several query tokens per sequence

QUERY_ROWS = 64       # CPU: query rows (tokens x GQA heads) of one work item
QUERY_KEY_TOKENS = 64  # CPU: key positions decoded per step (rounded to whole pages)


def check_queries(cache, layer, seqs, q, causal, scale, window):
    """Validate the arguments of :func:`paged_attention`.

    Returns (layer, seqs, q float32 [B, T, Hq, D], scale, window int or None)."""
    if not callable(getattr(cache, "paged_batch", None)):
        raise ConfigError(f"cache must be a PagedKVCache, found {type(cache).__name__}")
    if not isinstance(causal, (bool, np.bool_)):
        raise ConfigError(f"causal must be True or False, found {causal!r}")
    if isinstance(seqs, (int, np.integer)):
        raise SequenceError("seqs must be a sequence of sequence ids, found one id")
    seqs = list(seqs)
    q = as_float_array(q, "q")
    H, D = cache.num_kv_heads, cache.head_dim
    nseq = len(seqs)
    if (q.ndim != 4 or q.shape[0] != nseq or q.shape[3] != D or q.shape[2] % H or q.shape[2] == 0
            or q.shape[1] == 0):
        raise ShapeError(
            f"q must be [batch={nseq}, q_tokens >= 1, num_q_heads (a multiple of num_kv_heads={H}), "
            f"head_dim={D}], found {describe(q)}")
    T = q.shape[1]
    # the checks of a decode step, on the first query token (q_tokens does not matter to them)
    layer, seqs, _, scale, _ = check_query(cache, layer, seqs, q[:, 0], scale, window)
    if not np.isfinite(q).all():
        raise NonFiniteError("q holds NaN or inf")
    lengths = [cache.seq_len(s, layer) for s in seqs]
    for s, n in zip(seqs, lengths):
        if n < T:
            raise ShapeError(f"q holds {T} query tokens but sequence {s} has only {n} tokens in layer "
                             f"{layer}: append the queries' K/V before attending")
    window = None if window is None else int(window)
    if window is not None and window >= max(lengths, default=0):
        window = None
    return layer, seqs, np.ascontiguousarray(q, np.float32), scale, window


def _query_items(lo, hi, H: int, qb: int, block: int, nthreads: int):
    """Work items (b, h, i0, i1, t0, t1) and the index of each group's first item.

    A group is (sequence, kv head, block of ``qb`` query tokens); its key range
    [lo[b, i0], hi[b, i1 - 1] + 1) is cut into splits, on ``block`` boundaries, only when
    there are too few groups to keep every thread busy."""
    B, T = lo.shape
    i0 = np.arange(0, T, qb)
    i1 = np.minimum(i0 + qb, T)
    k0 = lo[:, i0]                                   # [B, nqb]
    k1 = hi[:, i1 - 1] + 1
    spans = (k1 - k0).ravel()
    groups = B * H * len(i0)
    # about 4 items per thread; a split shorter than 512 keys costs more than it balances
    chunk = int(spans.max()) if groups >= 4 * nthreads else max(512, -(-int(spans.sum()) * H // (4 * nthreads)))
    chunk = -(-chunk // block) * block
    rows, group_ptr = [], [0]
    for b in range(B):
        for h in range(H):
            for j in range(len(i0)):
                s, e = int(k0[b, j]), int(k1[b, j])
                cuts = [s, *range((s // block) * block + chunk, e, chunk), e]
                rows.extend((b, h, int(i0[j]), int(i1[j]), t0, t1) for t0, t1 in zip(cuts[:-1], cuts[1:]))
                group_ptr.append(len(rows))
    return np.array(rows, np.int64).reshape(-1, 6), np.array(group_ptr, np.int64)


def query_bounds(batch, T: int, causal: bool, window):
    """lo, hi int64 [B, T]: the first and last key position query token i of sequence b sees.

    Query token i sits at position end - T + i; it sees positions from the first visible
    one (or its own minus window - 1) up to its own (causal) or the last one."""
    pos = batch.end[:, None] - T + np.arange(T)[None, :]
    lo = np.broadcast_to(batch.start[:, None], pos.shape)
    if window is not None:
        lo = np.maximum(lo, pos - window + 1)
    hi = pos if causal else np.broadcast_to(batch.end[:, None] - 1, pos.shape)
    return np.ascontiguousarray(lo, np.int64), np.ascontiguousarray(hi, np.int64)


def cpu_attention(cache, layer: int, seqs, q: np.ndarray, causal: bool, scale: float, window) -> np.ndarray:
    """The CPU path of :func:`paged_attention` for q_tokens > 1 (arguments already checked)."""
    from . import _attention

    P, D, H = cache.page_size, cache.head_dim, cache.num_kv_heads
    B, T, Hq = q.shape[:3]
    G = Hq // H
    # the first query token needs window - 1 positions before it
    batch = cache.paged_batch(layer, seqs, None if window is None else window + T - 1)
    lo, hi = query_bounds(batch, T, causal, window)
    qb = max(1, min(T, QUERY_ROWS // G))
    block = max(1, QUERY_KEY_TOKENS // P) * P
    nthreads = get_num_threads()
    items, group_ptr = _query_items(lo, hi, H, qb, block, nthreads)
    m = np.empty((len(items), qb * G), np.float32)
    l = np.empty((len(items), qb * G), np.float32)
    acc = np.empty((len(items), qb * G, D), np.float32)
    arena = cache.arena.data if cache.arena.data.size else np.zeros(1, np.uint8)
    _attention.attend_queries(
        arena, cache.arena.page_bytes, *cache.layout.side_offsets("k"), *cache.layout.side_offsets("v"),
        cache.layout.group_size["v"],
        batch.page_indptr, batch.page_indices, batch.tail_k, batch.tail_v,
        items, q, lo, hi, scale, block, m, l, acc, nthreads,
    )
    if np.isnan(m[:, 0]).any():
        raise MemoryError("paged attention could not allocate its scratch buffers")
    out = np.empty((B, T, Hq, D), np.float32)
    _attention.merge_query_blocks(items, group_ptr, m, l, acc, G, out, nthreads)
    return out


def exact_attention(cache, layer: int, seq: int, q: np.ndarray, causal: bool, scale: float,
                    window) -> np.ndarray:
    """:func:`paged_attention` of one sequence in float64 (arguments already checked), the
    path for inputs whose float32 logits or sums overflow (see :func:`exact_decode`).

    q: float32 [T, H * G, D]. Returns float32 [T, H * G, D]."""
    H = cache.num_kv_heads
    T, Hq, D = q.shape
    n = cache.seq_len(seq, layer)
    pos = n - T + np.arange(T)                              # positions relative to the visible ones
    lo = np.zeros(T, np.int64) if window is None else np.maximum(0, pos - window + 1)
    hi = pos if causal else np.full(T, n - 1)
    qg = q.astype(np.float64).reshape(T, H, Hq // H, D)
    m = np.full((T, H, Hq // H), -np.inf)
    l = np.zeros(m.shape)
    acc = np.zeros(qg.shape)
    step = max(16, EXACT_TOKENS * 16 // (T * Hq))         # bounds the logits buffer
    with np.errstate(over="ignore", invalid="ignore"):
        for t0 in range(int(lo.min()), n, step):
            t1 = min(n, t0 + step)
            k, v = cache.read(seq, layer, t0, t1)
            x = np.einsum("khd,ihgd->ihgk", k.astype(np.float64), qg)
            keys = np.arange(t0, t1)
            seen = (keys[None, :] >= lo[:, None]) & (keys[None, :] <= hi[:, None])   # [T, t1 - t0]
            x = np.where(seen[:, None, None, :], x, -np.inf)
            m_new = np.maximum(m, x.max(axis=3))
            alpha = np.where(m_new == -np.inf, 1.0, np.exp(scale * (m - m_new)))
            p = np.where(seen[:, None, None, :], np.exp(scale * (x - m_new[..., None])), 0.0)
            l = l * alpha + p.sum(axis=3)
            acc = acc * alpha[..., None] + np.einsum("ihgk,khd->ihgd", p, v.astype(np.float64))
            m = m_new
    out = acc / l[..., None]
    return np.clip(out, -FLT_MAX, FLT_MAX).astype(np.float32).reshape(T, Hq, D)


def paged_attention(cache, layer: int, seqs, q, *, causal: bool = True, scale: float | None = None,
                    window: int | None = None, backend: str = "auto") -> np.ndarray:
    """Attention of the last ``q_tokens`` tokens of each sequence over its cached K/V.

    The queries belong to the last ``q_tokens`` positions of each sequence, whose K/V are
    already appended (a prefill chunk, or tokens to verify). Query token ``i`` (at
    position ``n - q_tokens + i`` of a sequence of ``n`` visible tokens) sees every
    stored position before the block and, with ``causal``, the block's positions up to
    its own; without, all ``n``. Keys and values are read from the pages in place in
    their storage format, never copied to float. ``q_tokens == 1`` is
    :func:`paged_decode_attention`.

    Parameters
    ----------
    cache : PagedKVCache
    layer : int
    seqs : sequence of int, length B
        Sequence ids; each must hold at least ``q_tokens`` tokens in ``layer``.
    q : numpy.ndarray (float32, float16, float64) or torch tensor, shape ``[B, q_tokens, num_q_heads, head_dim]``
        ``num_q_heads`` is a multiple ``G`` of ``num_kv_heads``; query head ``j`` reads kv
        head ``j // G``.
    causal : bool
        Whether a query token sees the later tokens of its block (False) or not (True).
    scale : float, optional
        Softmax scale, any positive finite number; default ``1 / sqrt(head_dim)``.
    window : int, optional
        Each query token sees only the last ``window`` positions up to and including its
        own (sliding window); None or a window longer than a sequence: no limit.
    backend : {"auto", "cpu", "opencl"}
        ``"auto"`` uses OpenCL when a GPU is available and the CPU otherwise.

    Returns
    -------
    numpy.ndarray, float32, shape ``[B, q_tokens, num_q_heads, head_dim]``
        Finite for finite inputs (rows whose float32 logits or sums overflow are
        recomputed in float64).

    Raises
    ------
    ShapeError
        q's shape, a sequence shorter than ``q_tokens``, a bad window or scale.
    SequenceError, DTypeError, NonFiniteError, ConfigError
        As :func:`paged_decode_attention`.

    Examples
    --------
    >>> import numpy as np, kvmmap as km
    >>> c = km.PagedKVCache.create(None, num_layers=1, num_kv_heads=2, head_dim=64)
    >>> s = c.new_sequence()
    >>> kv = np.random.default_rng(0).standard_normal((40, 2, 64), dtype=np.float32)
    >>> c.append(s, 0, kv, kv)
    >>> km.paged_attention(c, 0, [s], np.ones((1, 8, 4, 64), np.float32)).shape
    (1, 8, 4, 64)
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, found {backend!r}")
    layer, seqs, q, scale, window = check_queries(cache, layer, seqs, q, causal, scale, window)
    T = q.shape[1]
    if T == 1:      # decode: the query sees every position before it, whatever causal says
        return paged_decode_attention(cache, layer, seqs, q[:, 0], scale=scale, window=window,
                                      backend=backend)[:, None]
    if not seqs:
        return np.empty(q.shape, np.float32)
    return _run(cache, layer, seqs, q, scale, backend,
                lambda opencl: opencl.attention(cache, layer, seqs, q, causal, scale, window),
                lambda: cpu_attention(cache, layer, seqs, q, causal, scale, window),
                lambda b: exact_attention(cache, layer, seqs[b], q[b], causal, scale, window))
