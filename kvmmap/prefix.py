"""Prefix reuse: find the longest stored prompt prefix of a new prompt, by token-id hashes.

A prompt's cache is *stored* by giving a sequence a name derived from its token ids
(:func:`sequence_name`); the name lives in the file's sequence table, so stored prompts
persist with the cache and need no format change. The name holds

* ``H(n)``, a 16-byte digest of all ``n`` token ids: an exact match of the whole prompt;
* ``H(page_size * k)[:8]`` for each full page ``k``: matches at page boundaries, so a new
  prompt that shares only its first pages with a stored one still reuses them.

``H(m)`` is BLAKE2b (personalised, stable across processes and machines, unlike Python's
salted ``hash``) over the first ``m`` token ids written as little-endian int64. Since each
digest covers a whole prefix, a match at page ``k`` implies matches at every earlier page,
which lets :func:`match_prefix` binary-search each stored prompt.

A match at a page boundary is taken by forking the stored sequence and truncating the fork
at that boundary: the shared pages are referenced, never copied. The stored sequence must
still hold the tokens its name describes: treat stored prefixes as read-only and continue
from forks of them (``truncate`` may shorten one; the match is then capped at its length).

Examples
--------
>>> import numpy as np, kvmmap as km
>>> c = km.PagedKVCache.create(None, num_layers=1, num_kv_heads=1, head_dim=8, page_size=4)
>>> s = c.new_sequence()
>>> c.append(s, 0, np.ones((10, 1, 8), np.float32), np.ones((10, 1, 8), np.float32))
>>> stored = c.store_prefix(s, range(10))
>>> c.match_prefix([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) == (stored, 10)   # the whole prompt
True
>>> c.match_prefix([0, 1, 2, 3, 4, 5, 99]) == (stored, 4)                 # its first page
True
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

from .errors import DTypeError, SequenceError, ShapeError, describe

NAME_TAG = "kvmmap.prefix/1/"
FULL_DIGEST_BYTES = 16
PAGE_DIGEST_BYTES = 8
MAX_NAME_BYTES = 65535          # the sequence table stores a name's length in 16 bits
_PERSON = b"kvmmap.prefix.1"


def as_token_ids(token_ids) -> np.ndarray:
    """Token ids as a 1-D little-endian int64 array (a copy only if needed).

    Parameters
    ----------
    token_ids : sequence of int, numpy array or torch tensor, shape ``[n]``
        Non-negative integers.

    Raises
    ------
    ShapeError
        Not one-dimensional, negative, or beyond int64.
    DTypeError
        Not integers.
    """
    if hasattr(token_ids, "detach"):                       # a torch tensor, without importing torch
        token_ids = token_ids.detach().cpu().numpy()
    a = np.asarray(token_ids if not isinstance(token_ids, range) else np.arange(
        token_ids.start, token_ids.stop, token_ids.step))
    if a.ndim != 1:
        raise ShapeError(f"token ids must be one-dimensional [n], found {describe(a)}")
    if a.size == 0:
        return np.zeros(0, "<i8")
    if a.dtype.kind not in "iu":
        raise DTypeError(f"token ids must be integers, found {a.dtype}")
    if a.dtype.kind == "u" and a.dtype.itemsize == 8 and int(a.max()) > np.iinfo(np.int64).max:
        raise ShapeError(f"token ids must fit in int64, found {int(a.max())}")
    if a.dtype.kind == "i" and int(a.min()) < 0:
        raise ShapeError(f"token ids must be non-negative, found {int(a.min())}")
    return np.ascontiguousarray(a, "<i8")


def _digests(ids: np.ndarray, checkpoints) -> dict[int, bytes]:
    """``{m: H(m)}`` for each ``m`` in ``checkpoints`` (all ``<= len(ids)``), in one pass."""
    h = hashlib.blake2b(digest_size=FULL_DIGEST_BYTES, person=_PERSON)
    raw = ids.tobytes()
    out, done = {}, 0
    for m in sorted(set(checkpoints)):
        h.update(raw[8 * done:8 * m])
        done = m
        out[m] = h.copy().digest()
    return out


def sequence_name(token_ids, page_size: int) -> str:
    """The sequence name under which a prompt of these token ids is stored.

    Parameters
    ----------
    token_ids : int array-like ``[n]``, n >= 1
    page_size : int
        The cache's page size: page digests are taken every ``page_size`` tokens.

    Returns
    -------
    str
        ``"kvmmap.prefix/1/{n}/{H(n) hex}/{H(P)[:8] hex}{H(2P)[:8] hex}..."``. Page digests
        that would push the name past 65535 bytes are left out (matches then stop at the
        last page listed; an exact whole-prompt match still works).
    """
    ids = as_token_ids(token_ids)
    n = len(ids)
    if n == 0:
        raise ShapeError("cannot store an empty prompt: token ids must hold at least one token")
    head = f"{NAME_TAG}{n}/"
    room = (MAX_NAME_BYTES - len(head) - 2 * FULL_DIGEST_BYTES - 1) // (2 * PAGE_DIGEST_BYTES)
    pages = min(n // page_size, room)
    d = _digests(ids, [page_size * k for k in range(1, pages + 1)] + [n])
    blocks = "".join(d[page_size * k][:PAGE_DIGEST_BYTES].hex() for k in range(1, pages + 1))
    return f"{head}{d[n].hex()}/{blocks}"


@lru_cache(maxsize=4096)
def parse_name(name: str):
    """``(n, full digest, page digests as one bytes object)`` of a prefix name, else None."""
    if not name.startswith(NAME_TAG):
        return None
    try:
        n, full, blocks = name[len(NAME_TAG):].split("/")
        n, full, blocks = int(n), bytes.fromhex(full), bytes.fromhex(blocks)
    except ValueError:
        return None
    if n < 1 or len(full) != FULL_DIGEST_BYTES or len(blocks) % PAGE_DIGEST_BYTES:
        return None
    return n, full, blocks


def match_prefix(cache, token_ids) -> tuple[int | None, int]:
    """The stored prompt sharing the longest prefix with ``token_ids``.

    A stored prompt of ``n`` tokens matches ``n`` tokens if it is a prefix of ``token_ids``;
    otherwise it matches the longest common prefix rounded down to whole pages.

    Parameters
    ----------
    cache : PagedKVCache
    token_ids : int array-like ``[N]``

    Returns
    -------
    (seq, length) : (int or None, int)
        The stored sequence and the number of leading tokens of ``token_ids`` whose K/V it
        holds; ``(None, 0)`` when nothing matches. Ties go to the lowest sequence id.
    """
    ids = as_token_ids(token_ids)
    N, P = len(ids), cache.page_size
    stored = []
    for sid, name in sorted(cache.sequences().items()):
        parsed = parse_name(name) if name else None
        if parsed is not None:
            stored.append((sid, *parsed))
    if not stored or N == 0:
        return None, 0
    d = _digests(ids, [P * k for k in range(1, N // P + 1)] + [n for _, n, _, _ in stored if n <= N])
    best_sid, best = None, 0
    for sid, n, full, blocks in stored:
        if n <= N and d[n] == full:
            length = n
        else:   # binary search: the last page whose digest still matches
            lo, hi = 0, min(len(blocks) // PAGE_DIGEST_BYTES, N // P, n // P)
            while lo < hi:
                k = (lo + hi + 1) // 2
                if d[P * k][:PAGE_DIGEST_BYTES] == blocks[PAGE_DIGEST_BYTES * (k - 1):PAGE_DIGEST_BYTES * k]:
                    lo = k
                else:
                    hi = k - 1
            length = lo * P
        length = min(length, cache.seq_len(sid))
        if length > best:
            best_sid, best = sid, length
    return best_sid, best


def store_prefix(cache, seq: int, token_ids) -> int:
    """Store the first ``len(token_ids)`` tokens of ``seq`` as the prompt ``token_ids``.

    The stored copy is a fork named by :func:`sequence_name`: it shares ``seq``'s pages
    (copy-on-write), and is truncated to ``len(token_ids)`` tokens if ``seq`` holds more.

    Parameters
    ----------
    cache : PagedKVCache
    seq : int
        A sequence holding at least ``len(token_ids)`` tokens in every layer, the K/V of
        exactly these token ids from position 0.
    token_ids : int array-like ``[n]``, n >= 1

    Returns
    -------
    int
        The id of the stored sequence; an existing one if this prompt was stored already.
    """
    ids = as_token_ids(token_ids)
    have = cache.seq_len(seq)
    if len(ids) > have:
        raise ShapeError(f"sequence {seq} holds {have} tokens, fewer than the {len(ids)} token ids given")
    name = sequence_name(ids, cache.page_size)
    try:
        return cache.find_sequence(name)
    except SequenceError:
        pass
    stored = cache.fork(seq, name=name)
    if have > len(ids):
        cache.truncate(stored, len(ids))
    return stored
