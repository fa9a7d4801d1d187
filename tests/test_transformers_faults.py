"""A refused KVMmapCache update changes nothing, and the file stays openable.

Layers are updated one after another in a forward pass: a refusal in layer 1 used to leave
layer 0 one step ahead, rows of different lengths that flush committed and open refused.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
pytest.importorskip("transformers", reason="transformers is not installed")
from transformers import LlamaConfig  # noqa: E402

import kvmmap as km  # noqa: E402
from kvmmap.integrations.transformers import KVMmapCache  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM, PAGE = 3, 2, 8, 4
CONFIG = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                     num_attention_heads=4, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM)


def new_cache(path, fmt="int8"):
    return KVMmapCache(path, config=CONFIG, k_format=fmt, v_format=fmt, page_size=PAGE)


def states(batch, n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, KV_HEADS, n, HEAD_DIM, generator=g),
            torch.randn(batch, KV_HEADS, n, HEAD_DIM, generator=g))


def step(cache, batch, n, seed):
    """One forward pass worth of updates: every layer gets ``n`` new tokens."""
    for layer in range(LAYERS):
        cache.update(*states(batch, n, seed + layer), layer)


def snapshot(cache):
    """Everything the cache holds, per row and layer: [(k, v), ...]."""
    return [[cache.store.read(seq, layer) for layer in range(LAYERS)] for seq in cache.rows]


def assert_same(a, b, requantized_from=None):
    """Same tokens; with ``requantized_from``, tokens from there on only within int4 error.

    Undoing a step that sealed an int4 page leaves the page's earlier tokens (float32 in the
    open tail before the step) as their int4 values: truncate() reopens a page that way.
    """
    assert len(a) == len(b)
    for row_a, row_b in zip(a, b):
        for (ka, va), (kb, vb) in zip(row_a, row_b):
            assert ka.shape == kb.shape
            cut = ka.shape[0] if requantized_from is None else requantized_from
            np.testing.assert_array_equal(ka[:cut], kb[:cut])
            np.testing.assert_array_equal(va[:cut], vb[:cut])
            np.testing.assert_allclose(ka[cut:], kb[cut:], atol=0.25)
            np.testing.assert_allclose(va[cut:], vb[cut:], atol=0.25)


def poisoned(batch, n, seed, row, value=float("nan")):
    k, v = states(batch, n, seed)
    k[row, 1, n - 1, 3] = value
    return k, v


# (what layer 1 of the failing step gets, the error): refused input of each kind
REFUSALS = {
    "nan_keys_row1": (lambda b, n: poisoned(b, n, 50, row=b - 1), km.NonFiniteError),
    "inf_values_row0": (lambda b, n: poisoned(b, n, 51, row=0, value=float("inf"))[::-1], km.NonFiniteError),
    "wrong_head_dim": (lambda b, n: (torch.zeros(b, KV_HEADS, n, HEAD_DIM + 1),) * 2, km.ShapeError),
    "wrong_batch": (lambda b, n: states(b + 1, n, 52), km.ShapeError),
    "int_dtype": (lambda b, n: (torch.zeros(b, KV_HEADS, n, HEAD_DIM, dtype=torch.int32),) * 2, km.DTypeError),
}


@pytest.mark.parametrize("fmt", ["int8", "fp16", "int4"])
@pytest.mark.parametrize("new_tokens", [1, 3, PAGE + 2], ids=["decode", "in_page", "across_pages"])
@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_refused_layer_update_changes_nothing(tmp_path, fmt, new_tokens, refusal):
    batch, path = 2, tmp_path / "c.kvm"
    cache = new_cache(path, fmt)
    step(cache, batch, 6, seed=0)            # a prefill: 6 tokens, the tail page open
    before = snapshot(cache)
    cache.update(*states(batch, new_tokens, 40), 0)    # layer 0 takes the step ...
    make, error = REFUSALS[refusal]
    with pytest.raises(error):                          # ... layer 1 refuses it
        cache.update(*make(batch, new_tokens), 1)
    assert [layer.get_seq_length() for layer in cache.layers] == [6] * LAYERS
    assert cache.get_seq_length() == 6
    sealed = fmt == "int4" and 6 % PAGE + new_tokens >= PAGE
    assert_same(snapshot(cache), before, requantized_from=6 - 6 % PAGE if sealed else None)
    step(cache, batch, 2, seed=60)           # the cache goes on from where it was
    assert cache.get_seq_length() == 8
    after = snapshot(cache)
    cache.flush()
    cache.close()
    with KVMmapCache.open(path, config=CONFIG) as again:
        assert again.get_seq_length() == 8
        assert_same(snapshot(again), after)


def test_refused_first_update_makes_no_rows(tmp_path):
    path = tmp_path / "c.kvm"
    cache = new_cache(path)
    cache.update(*states(2, 5, 0), 0)
    with pytest.raises(km.NonFiniteError):
        cache.update(*poisoned(2, 5, 1, row=1), 1)
    assert cache.get_seq_length() == 0
    cache.flush()
    cache.close()
    with KVMmapCache.open(path, config=CONFIG) as again:
        assert again.get_seq_length() == 0
        step(again, 3, 4, seed=2)            # a new batch size may start: nothing was kept
        assert again.get_seq_length() == 4


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_disk_full_in_the_middle_of_the_rows(tmp_path, monkeypatch, fmt):
    """Row 0 of layer 1 gets its pages, row 1 finds the disk full: all rows or none."""
    path = tmp_path / "c.kvm"
    cache = new_cache(path, fmt)
    step(cache, 2, 6, seed=0)
    before = snapshot(cache)
    cache.update(*states(2, 3 * PAGE, 10), 0)
    store, calls = cache.store, []
    real = type(store._table).take_pages          # where a cache hands out pages

    def seal_pages(self, n, *rest):
        calls.append(n)
        if len(calls) > 3:       # row 1 of this layer: its first page after row 0's three
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real(self, n, *rest)

    monkeypatch.setattr(type(store._table), "take_pages", seal_pages)
    with pytest.raises(OSError, match="injected"):
        cache.update(*states(2, 3 * PAGE, 11), 1)
    monkeypatch.undo()
    assert len(calls) > 3
    assert cache.get_seq_length() == 6
    assert_same(snapshot(cache), before, requantized_from=6 - 6 % PAGE if fmt == "int4" else None)
    assert {cache.store.seq_len(s, layer) for s in cache.rows for layer in range(LAYERS)} == {6}
    cache.flush()
    cache.close()
    with KVMmapCache.open(path, config=CONFIG) as again:
        assert again.get_seq_length() == 6


def test_flush_after_an_interrupted_forward(tmp_path):
    """A forward pass stopped between layers (not by kvmmap): flush keeps whole steps only."""
    path = tmp_path / "c.kvm"
    cache = new_cache(path)
    step(cache, 2, 6, seed=0)
    before = snapshot(cache)
    cache.update(*states(2, 1, 3), 0)
    cache.update(*states(2, 1, 4), 1)        # ... and layer 2 never comes
    cache.flush()
    assert cache.get_seq_length() == 6
    assert_same(snapshot(cache), before)
    cache.close()
    with KVMmapCache.open(path, config=CONFIG) as again:
        assert again.get_seq_length() == 6
        assert_same(snapshot(again), before)
