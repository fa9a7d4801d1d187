"""Threads sharing one PagedKVCache: changes are serialized, reads of other sequences run beside them.

Each worker thread owns sequences of its own and, in a seeded random order, appends
(decode steps and prompts that seal pages and grow the arena), reads back, runs decode
attention, forks, truncates, frees and commits, checking every read and every attention
output against a numpy model of its own sequences (fp32 storage is exact). One more thread
walks the whole cache (stats, sequences, verify) meanwhile. Before the cache had a lock,
four threads appending to a RAM cache read back wrong tokens: the arena was reallocated
while another thread quantized into the old one with the GIL released.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import kvmmap as km

GEO = dict(num_layers=2, num_kv_heads=2, head_dim=32, page_size=8, k_format="fp32", v_format="fp32")
H, D, L = 2, 32, 2
THREADS = 8
OPS_PER_THREAD = 60


def attention_reference(k, v, q):
    """float64 softmax(q k^T / sqrt(D)) v per query head; k, v [n, H, D], q [Hq, D]."""
    G = q.shape[0] // H
    out = np.empty(q.shape, np.float64)
    for j in range(q.shape[0]):
        s = k[:, j // G].astype(np.float64) @ q[j].astype(np.float64) / np.sqrt(D)
        w = np.exp(s - s.max())
        out[j] = (w / w.sum()) @ v[:, j // G].astype(np.float64)
    return out


def worker(c, tid: int, errors: list, counts: dict, path) -> None:
    rng = np.random.default_rng(tid)
    own = {}                                  # sid -> per layer [k, v]
    try:
        for step in range(OPS_PER_THREAD):
            r = rng.random()
            if not own or r < 0.08:
                sid = c.new_sequence(f"t{tid}-{step}")
                own[sid] = [[np.zeros((0, H, D), np.float32)] * 2 for _ in range(L)]
                kind = "new"
            elif r < 0.5:
                sid = list(own)[int(rng.integers(len(own)))]
                n = int(rng.choice([1, 1, 1, 3, 40, 130]))
                for layer in range(L):
                    k = rng.standard_normal((n, H, D), dtype=np.float32)
                    v = rng.standard_normal((n, H, D), dtype=np.float32)
                    c.append(sid, layer, k, v)
                    own[sid][layer] = [np.concatenate([own[sid][layer][0], k]), np.concatenate([own[sid][layer][1], v])]
                kind = "append"
            elif r < 0.7:
                sid = list(own)[int(rng.integers(len(own)))]
                layer = int(rng.integers(L))
                k, v = c.read(sid, layer)
                np.testing.assert_array_equal(k, own[sid][layer][0])
                np.testing.assert_array_equal(v, own[sid][layer][1])
                kind = "read"
            elif r < 0.82:
                sid = list(own)[int(rng.integers(len(own)))]
                layer = int(rng.integers(L))
                if len(own[sid][layer][0]):
                    q = rng.standard_normal((2 * H, D), dtype=np.float32)
                    got = c.decode_attention(sid, layer, q, backend="cpu")
                    want = attention_reference(*own[sid][layer], q)
                    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
                kind = "attention"
            elif r < 0.88:
                sid = list(own)[int(rng.integers(len(own)))]
                new = c.fork(sid)
                own[new] = [list(kv) for kv in own[sid]]
                kind = "fork"
            elif r < 0.93:
                sid = list(own)[int(rng.integers(len(own)))]
                n = int(rng.integers(0, 60))
                c.truncate(sid, n)
                own[sid] = [[x[:n] for x in kv] for kv in own[sid]]
                kind = "truncate"
            elif r < 0.96 and len(own) > 1:
                sid = list(own)[int(rng.integers(len(own)))]
                c.free(sid)
                del own[sid]
                kind = "free"
            else:
                c.flush()
                kind = "flush"
            counts[kind] = counts.get(kind, 0) + 1
        for sid, layers in own.items():       # the final state, for the check after joining
            counts.setdefault("final", {})[sid] = layers
    except BaseException as e:                # reported by the test, with the thread's id
        errors.append((tid, repr(e)))


def walker(c, stop: threading.Event, errors: list) -> None:
    try:
        while not stop.is_set():
            st = c.stats()
            assert st["pages_used"] * st["page_bytes"] == st["bytes_pages"]
            assert all(name is None or isinstance(name, str) for name in c.sequences().values())
            assert c.verify() == []
    except BaseException as e:
        errors.append(("walker", repr(e)))


@pytest.mark.parametrize("where", ["ram", "file"])
def test_threads_sharing_a_cache_match_numpy(tmp_path, where):
    km.set_num_threads(2)                     # kernels release the GIL and run in parallel
    path = None if where == "ram" else tmp_path / "t.kvm"
    c = km.PagedKVCache.create(path, **GEO)
    errors, counts = [], [dict() for _ in range(THREADS)]
    stop = threading.Event()
    threads = [threading.Thread(target=worker, args=(c, t, errors, counts[t], path)) for t in range(THREADS)]
    w = threading.Thread(target=walker, args=(c, stop, errors))
    w.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    stop.set()
    w.join(timeout=60)
    assert not any(t.is_alive() for t in threads + [w]), "a thread hangs"
    assert not errors, errors[:4]
    final = {sid: layers for cnt in counts for sid, layers in cnt.get("final", {}).items()}
    assert sum(cnt.get("append", 0) for cnt in counts) > THREADS * 10
    c.flush()
    views = [c] if path is None else [c, km.PagedKVCache.open(path, mode="r")]
    for view in views:
        assert sorted(view.sequences()) == sorted(final)
        for sid, layers in final.items():
            for layer, (k, v) in enumerate(layers):
                got_k, got_v = view.read(sid, layer)
                np.testing.assert_array_equal(got_k, k)
                np.testing.assert_array_equal(got_v, v)
    for view in views:
        view.close()
