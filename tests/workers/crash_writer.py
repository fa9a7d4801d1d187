"""The writer of the crash campaign (tests/test_crash.py): ``python crash_writer.py PATH
CONFIG PLAN KILL``.

Follows ``crash_plan.steps_for(PLAN)`` (a seed or a scenario name) on a new cache at PATH
in formats ``CONFIG``, flushing after each step and printing its number once ``flush``
returns. ``KILL`` is ``-`` (run every step, then wait on stdin for the test's SIGKILL) or
``op:point:n[:step]``: SIGKILL itself on the n-th call of ``point`` made while operation
``op`` runs (in step ``step`` only, if given; exit status 3 if that call never comes).
"""

from __future__ import annotations

import os
import signal
import sys

import kvmmap as km
from kvmmap import pagetable
from kvmmap.codecs import quant

from crash_plan import CONFIGS, GEOMETRY, apply_op, steps_for


def _install_kill_hook(spec: str, current: list) -> None:
    """SIGKILL this process on the n-th call of ``point`` made while operation ``op`` runs
    (in step ``step``, if the spec names one)."""
    op, point, n, *step = spec.split(":")
    n, hits, step = int(n), [0], int(step[0]) if step else None

    def check(p):
        if current[0] == op and p == point and step in (None, current[1]):
            hits[0] += 1
            if hits[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)

    def after(obj, attr, p):
        real = getattr(obj, attr)

        def wrapped(*a, **kw):
            r = real(*a, **kw)
            check(p)
            return r
        setattr(obj, attr, wrapped)

    after(os, "ftruncate", "ftruncate")            # the file just grew; not yet mapped
    after(os, "pwrite", "pwrite")                  # in flush: the root (blobs go through the map)
    after(pagetable.PageAllocator, "incref", "incref")
    after(pagetable.PageAllocator, "decref", "decref")
    after(quant, "quantize_into", "quantize_into")
    real_fsync = os.fsync

    def fsync(fd):                                 # flush: before the pages, then before the root is synced
        check("fsync")
        real_fsync(fd)
    os.fsync = fsync


def writer(path: str, config: str, plan_name: str, kill: str) -> None:
    current = ["create", -1]                       # operation, step
    if kill != "-":
        _install_kill_hook(kill, current)
    kf, vf = CONFIGS[config]
    c = km.PagedKVCache.create(path, **GEOMETRY, k_format=kf, v_format=vf)
    ids = {}
    for step, ops in enumerate(steps_for(plan_name)):
        current[1] = step
        for op in ops:
            current[0] = op[0]
            apply_op(c, op, ids)
        current[0] = "flush"
        c.flush()
        print(step, flush=True)
    if kill != "-":
        sys.exit(3)                                # the kill point was never reached
    sys.stdin.read()                               # wait here for the test's SIGKILL


if __name__ == "__main__":
    writer(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4])
