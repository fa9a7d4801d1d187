"""The writer of tests/test_concurrency.py: ``python concurrency_writer.py PATH``.

Creates PATH and commits steps 0 .. NSTEPS - 1 (concurrency_log), printing each step once
its flush returned. After step 0 it waits for a line on stdin (the test starts the
readers meanwhile); after the last it holds the writer lock until stdin closes.
"""

from __future__ import annotations

import sys

import numpy as np

import kvmmap as km
from concurrency_log import GEO, NSTEPS, chunk, shift_at


def writer(path: str) -> None:
    c = km.PagedKVCache.create(path, **GEO)
    log, clock = c.new_sequence("log"), c.new_sequence("clock")
    tick = np.zeros((1, GEO["num_kv_heads"], GEO["head_dim"]), np.float32)
    for step in range(NSTEPS):
        if step == 1:
            sys.stdin.readline()            # the test starts the readers after step 0, then says go
        x = chunk(step)
        for layer in range(2):
            c.append(log, layer, x[layer, 0], x[layer, 1])
        c.append(clock, 0, tick, tick)
        if shift_at(step):
            c.shift_left(log, shift_at(step))
        c.flush()
        print(step, flush=True)
    sys.stdin.read()                        # hold the writer lock until the test is done


if __name__ == "__main__":
    writer(sys.argv[1])
