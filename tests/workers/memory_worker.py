"""The worker of tests/test_memory.py: ``python memory_worker.py PATH TARGET RLIMIT_HEADROOM``.

Warms up every code path, then (RLIMIT_HEADROOM > 0) caps RLIMIT_DATA at its private
memory plus that many bytes and checks that the cap bites; writes a cache of TARGET bytes
(an integer, or "<n>x": n times the cap) at PATH, reopens it and reads every token back
against data regenerated per chunk from a seed (never kept). Prints a JSON line: disk,
pages, rlimit_data, vmdata, maxrss.
"""

from __future__ import annotations

import json
import os
import resource
import sys

import numpy as np

import kvmmap as km

H, D, L, P, CHUNK = 4, 64, 2, 16, 1024      # as in tests/test_memory.py


def chunk(layer: int, i: int):
    """K, V of chunk ``i`` of ``layer``: deterministic, regenerated for the check instead of kept."""
    r = np.random.default_rng([layer, i]).random((2, CHUNK, H, D), dtype=np.float32)
    return r[0] * 8 - 4, r[1] * 2 - 1


def vmdata() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData in /proc/self/status")


def warm_up(path: str) -> None:
    """Every code path (imports, kernel threads) once, before any limit is set."""
    warm = km.PagedKVCache.create(path + ".warm", num_layers=1, num_kv_heads=H, head_dim=D,
                                  k_format="fp32", v_format="fp16")
    s = warm.new_sequence("x")
    warm.append(s, 0, *chunk(0, 0))
    warm.read(s, 0)
    warm.flush()
    warm.verify()
    warm.close()
    os.unlink(path + ".warm")


def cap_private_memory(headroom: int) -> int:
    """RLIMIT_DATA at the private memory in use plus ``headroom``, checked to bite; the cap."""
    limit = vmdata() + headroom
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:                        # twice the headroom cannot be had privately
        np.ones(2 * headroom, np.uint8)
        sys.exit("RLIMIT_DATA did not stop a private allocation past the limit")
    except MemoryError:
        pass
    return limit


def write(path: str, nchunks: int) -> None:
    c = km.PagedKVCache.create(path, num_layers=L, num_kv_heads=H, head_dim=D, page_size=P,
                               k_format="fp32", v_format="fp16")
    s = c.new_sequence("big")
    for i in range(nchunks):
        for layer in range(L):
            c.append(s, layer, *chunk(layer, i))
        if i % 32 == 31:
            c.flush()
    c.flush()
    c.close()


def read_back(path: str, nchunks: int, limit: int | None) -> dict:
    with km.PagedKVCache.open(path, mode="r") as c:
        s = c.find_sequence("big")
        assert c.seq_len(s) == nchunks * CHUNK
        for i in range(nchunks):
            for layer in range(L):
                k, v = c.read(s, layer, i * CHUNK, (i + 1) * CHUNK)
                xk, xv = chunk(layer, i)
                if not (np.array_equal(k, xk) and np.array_equal(v, xv.astype(np.float16).astype(np.float32))):
                    sys.exit(f"chunk {i} layer {layer} reads back wrong")
        bad = c.verify()
        assert bad == [], bad
        return {"disk": os.stat(path).st_blocks * 512, "pages": c.stats()["pages_used"],
                "rlimit_data": limit, "vmdata": vmdata(),
                "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(path: str, target: str, rlimit_headroom: int) -> None:
    warm_up(path)
    limit = cap_private_memory(rlimit_headroom) if rlimit_headroom else None
    nbytes = int(target[:-1]) * limit if target.endswith("x") else int(target)
    nchunks = -(-nbytes // (CHUNK * L * H * D * 6))
    write(path, nchunks)
    print(json.dumps(read_back(path, nchunks, limit)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
