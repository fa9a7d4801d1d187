"""Prefix reuse: match_prefix against a brute-force search over the stored token lists."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvmmap as km
from kvmmap import prefix

H, D = 2, 8


def kv_of(ids):
    """K/V that depend on the token id and its position, so reuse of wrong tokens shows."""
    ids = np.asarray(ids, np.float32)
    pos = np.arange(len(ids), dtype=np.float32)
    k = (ids[:, None, None] + 0.001 * pos[:, None, None]) * np.ones((1, H, D), np.float32)
    return k, -k


def new_cache(page_size, path=None, layers=2):
    return km.PagedKVCache.create(path, num_layers=layers, num_kv_heads=H, head_dim=D,
                                  page_size=page_size, k_format="fp32", v_format="fp32")


def put(c, ids):
    """Append the prompt ``ids`` to a new sequence and store it; returns the stored id."""
    s = c.new_sequence()
    k, v = kv_of(ids)
    for layer in range(c.num_layers):
        c.append(s, layer, k, v)
    stored = c.store_prefix(s, ids)
    c.free(s)
    return stored


def brute_force(stored: dict[int, list[int]], query: list[int], page_size: int):
    """Longest match: a whole stored prompt that prefixes the query, or the common prefix
    rounded down to pages; ties to the lowest id."""
    best_sid, best = None, 0
    for sid in sorted(stored):
        s = stored[sid]
        lcp = 0
        while lcp < min(len(s), len(query)) and s[lcp] == query[lcp]:
            lcp += 1
        n = len(s) if lcp == len(s) else lcp // page_size * page_size
        if n > best:
            best_sid, best = sid, n
    return best_sid, best


def test_name_is_blake2b_of_int64_tokens():
    ids = [1, 2, 3, 4, 5]
    def h(m):
        return hashlib.blake2b(np.array(ids[:m], "<i8").tobytes(), digest_size=16,
                               person=b"kvmmap.prefix.1").digest()
    want = f"kvmmap.prefix/1/5/{h(5).hex()}/{h(2)[:8].hex()}{h(4)[:8].hex()}"
    assert prefix.sequence_name(ids, 2) == want
    # golden: stored files depend on this scheme; it must never change silently
    assert want == ("kvmmap.prefix/1/5/492b92fc1198e1e15a0a6441c6fbdea6/"
                    "502d994c6dc8c4ff83ccd70cbf944faa")
    assert prefix.sequence_name(np.array(ids, np.uint16), 2) == want


def test_name_is_stable_across_processes(tmp_path):
    code = "from kvmmap.prefix import sequence_name; print(sequence_name(list(range(40)), 16))"
    # cwd=tmp_path: away from the source tree, so the installed kvmmap is imported
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}, cwd=tmp_path).stdout.strip()
            for seed in ("1", "2")}
    assert outs == {prefix.sequence_name(range(40), 16)}


@settings(max_examples=40, deadline=None)
@given(data=st.data(), page_size=st.sampled_from([1, 3, 4]))
def test_match_prefix_against_brute_force(data, page_size):
    # prompts drawn from a small alphabet so that they share prefixes often
    prompt = st.lists(st.integers(0, 2), min_size=1, max_size=14)
    prompts = data.draw(st.lists(prompt, min_size=0, max_size=6))
    c = new_cache(page_size, layers=1)
    stored = {}
    for p in prompts:
        stored[put(c, p)] = p
    stored = {c.find_sequence(prefix.sequence_name(p, page_size)): p for p in stored.values()}
    for _ in range(5):
        q = data.draw(st.lists(st.integers(0, 2), min_size=0, max_size=16))
        assert c.match_prefix(q) == brute_force(stored, q, page_size)


def test_match_reuses_the_right_kv_and_shares_pages(tmp_path):
    P = 4
    c = new_cache(P, tmp_path / "p.kvm")
    system = list(range(100, 110))                     # 10 tokens: two full pages + 2
    a = put(c, system + [1, 2, 3])
    b = put(c, system)
    put(c, [7, 7, 7, 7, 7])
    assert c.match_prefix(system + [1, 2, 3, 4]) == (a, 13)
    assert c.match_prefix(system) == (b, 10)                    # a shares only 2 pages
    assert c.match_prefix(system + [9]) == (b, 10)
    assert c.match_prefix(system[:9] + [0]) == (min(a, b), 8)     # two whole pages, a tie
    assert c.match_prefix([5]) == (None, 0)
    assert c.match_prefix([]) == (None, 0)
    c.flush()
    c.close()

    c = km.PagedKVCache.open(tmp_path / "p.kvm")
    query = system[:9] + [0, 0]
    seq, n = c.match_prefix(query)
    assert n == 8
    used = c.stats()["pages_used"]
    s = c.fork(seq)
    c.truncate(s, n)
    assert c.stats()["pages_used"] == used                      # forked, not copied
    assert list(c.block_table(s)) == list(c.block_table(seq)[:2])
    k, v = c.read(s, 1)
    want_k, want_v = kv_of(query[:n])
    np.testing.assert_array_equal(k, want_k)
    np.testing.assert_array_equal(v, want_v)


def test_store_prefix_is_idempotent_and_checks_length():
    c = new_cache(4)
    s = c.new_sequence()
    k, v = kv_of(list(range(6)))
    for layer in range(c.num_layers):
        c.append(s, layer, k, v)
    first = c.store_prefix(s, range(5))
    assert c.store_prefix(s, range(5)) == first
    assert c.seq_len(first) == 5 and c.seq_len(s) == 6
    with pytest.raises(km.ShapeError, match="holds 6 tokens, fewer than the 7"):
        c.store_prefix(s, range(7))
    with pytest.raises(km.ShapeError, match="at least one token"):
        c.store_prefix(s, [])


def test_truncated_stored_prefix_caps_the_match():
    c = new_cache(4)
    stored = put(c, list(range(12)))
    c.truncate(stored, 6)
    assert c.match_prefix(list(range(12))) == (stored, 6)


@pytest.mark.parametrize("bad, err, msg", [
    ([[1, 2]], km.ShapeError, "one-dimensional"),
    ([1.5, 2.0], km.DTypeError, "integers"),
    ([3, -1], km.ShapeError, "non-negative"),
])
def test_bad_token_ids(bad, err, msg):
    c = new_cache(4)
    with pytest.raises(err, match=msg):
        c.match_prefix(bad)


def test_long_prompt_name_fits_and_matches_whole():
    P = 1                      # one page digest per token: the name would overflow 64 KiB
    ids = np.arange(9000) % 50
    name = prefix.sequence_name(ids, P)
    assert len(name.encode()) <= 65535
    c = new_cache(P, layers=1)
    stored = put(c, ids)
    assert c.match_prefix(np.append(ids, 1)) == (stored, 9000)
    n_listed = len(name.rsplit("/", 1)[1]) // 16
    assert n_listed < 9000
    assert c.match_prefix(np.append(ids[:8999], 77)) == (stored, n_listed)
