"""SIGKILL a writer anywhere; every reopen holds exactly a committed state, at least the last flushed.

A writer process (this file run as a script) follows a seeded plan of steps, each a few
operations (append, fork, truncate, shift_left, new, free) then ``flush()``, printing the
step number once ``flush`` returns. It is killed with SIGKILL

* at chosen points *inside* operations, by hooks that make the writer kill itself on the
  n-th call of a low-level function while a given operation runs: mid-append, right
  after the file grows (capacity doubling), mid-fork, mid-truncate, mid-shift_left,
  mid-free, and inside ``flush`` between the payload and header writes of a slot;
* by the test, as soon as it reads a given step number, wherever the writer is then.

The file is then reopened for writing (so the dead writer's lock must be gone), must pass
``verify()`` and must equal, page table and bytes, the state after step s of the same plan
replayed in RAM, where s is the last step reported (or the next one, if the writer died
between its flush and its print). With exact formats (fp32 K, fp16 V) every value is
also compared with plain numpy. Finally the reopened file takes the next step and commits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import kvmmap as km

GEOMETRY = dict(num_layers=2, num_kv_heads=2, head_dim=32, page_size=4)
CONFIGS = {"exact": ("fp32", "fp16"), "quant": ("int8", "int4")}
NSTEPS = 60


# ------------------------------------------------------------------ the plan, shared by writer and test

def plan(seed: int, nsteps: int = NSTEPS) -> list[list[tuple]]:
    """Steps of operations on sequences named s0, s1, ...; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    live, counter = ["s0"], 1
    steps = [[("new", "s0"), ("append", "s0", 9, 0)]]
    for _ in range(1, nsteps):
        ops = []
        for _ in range(int(rng.integers(1, 4))):
            r = rng.random()
            name = live[int(rng.integers(len(live)))]
            if r < 0.08:
                ops.append(("append", name, int(rng.integers(40, 90)), int(rng.integers(1 << 30))))
            elif r < 0.45:
                ops.append(("append", name, int(rng.integers(1, 24)), int(rng.integers(1 << 30))))
            elif r < 0.57:
                new, counter = f"s{counter}", counter + 1
                ops.append(("fork", name, new))
                live.append(new)
            elif r < 0.69:
                ops.append(("truncate", name, int(rng.integers(0, 40))))
            elif r < 0.81:
                ops.append(("shift_left", name, int(rng.integers(0, 14))))
            elif r < 0.90 or len(live) == 1:
                new, counter = f"s{counter}", counter + 1
                ops.append(("new", new))
                live.append(new)
            else:
                ops.append(("free", name))
                live.remove(name)
        steps.append(ops)
    return steps


def apply_op(c, op, ids: dict, model: dict | None = None) -> None:
    """Run one planned operation on cache ``c``; mirror it on the numpy ``model`` if given.

    ``ids`` maps sequence names to ids; ``model`` maps names to per-layer [k, v] arrays.
    """
    L, H, D = GEOMETRY["num_layers"], GEOMETRY["num_kv_heads"], GEOMETRY["head_dim"]
    kind, name = op[0], op[1]
    if kind == "new":
        ids[name] = c.new_sequence(name)
        if model is not None:
            model[name] = [[np.zeros((0, H, D), np.float32)] * 2 for _ in range(L)]
    elif kind == "append":
        n, seed = op[2], op[3]
        x = np.random.default_rng(seed).standard_normal((L, 2, n, H, D), dtype=np.float32)
        for layer in range(L):
            c.append(ids[name], layer, x[layer, 0], x[layer, 1])
            if model is not None:
                model[name][layer] = [np.concatenate([model[name][layer][i], x[layer, i]]) for i in (0, 1)]
    elif kind == "fork":
        ids[op[2]] = c.fork(ids[name], name=op[2])
        if model is not None:
            model[op[2]] = [list(kv) for kv in model[name]]
    elif kind == "truncate":
        c.truncate(ids[name], op[2])
        if model is not None:
            model[name] = [[a[:op[2]] for a in kv] for kv in model[name]]
    elif kind == "shift_left":
        c.shift_left(ids[name], op[2])
        if model is not None:
            model[name] = [[a[op[2]:] for a in kv] for kv in model[name]]
    elif kind == "free":
        c.free(ids.pop(name))
        if model is not None:
            del model[name]


def replay(config: str, steps, upto: int):
    """An in-RAM cache (and numpy model) after steps 0..upto, flushing after each like the writer."""
    kf, vf = CONFIGS[config]
    c = km.PagedKVCache.create(None, **GEOMETRY, k_format=kf, v_format=vf)
    ids, model = {}, {}
    for ops in steps[: upto + 1]:
        for op in ops:
            apply_op(c, op, ids, model)
        c.flush()
    return c, model


def snapshot(c) -> dict:
    """{name: per layer (k bytes, v bytes, block table)} of every sequence."""
    out = {}
    for sid, name in c.sequences().items():
        out[name] = [(c.read(sid, layer)[0].tobytes(), c.read(sid, layer)[1].tobytes(),
                      c.block_table(sid, layer).tolist()) for layer in range(c.num_layers)]
    return out


# ------------------------------------------------------------------ the writer (this file as a script)

def _install_kill_hook(spec: str, current: list) -> None:
    """SIGKILL this process on the n-th call of ``point`` made while operation ``op`` runs."""
    from kvmmap import pagetable, quant

    op, point, n = spec.split(":")
    n, hits = int(n), [0]

    def check(p):
        if current[0] == op and p == point:
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
    after(os, "pwrite", "pwrite")                  # in flush: slot payload, then slot header
    after(pagetable.PageAllocator, "incref", "incref")
    after(pagetable.PageAllocator, "decref", "decref")
    after(quant, "quantize_into", "quantize_into")
    real_fsync = os.fsync

    def fsync(fd):                                 # before the data pages are synced
        check("fsync")
        real_fsync(fd)
    os.fsync = fsync


def writer(path: str, config: str, seed: int, kill: str) -> None:
    current = ["create"]
    if kill != "-":
        _install_kill_hook(kill, current)
    kf, vf = CONFIGS[config]
    c = km.PagedKVCache.create(path, **GEOMETRY, k_format=kf, v_format=vf)
    ids = {}
    for step, ops in enumerate(plan(seed)):
        for op in ops:
            current[0] = op[0]
            apply_op(c, op, ids)
        current[0] = "flush"
        c.flush()
        print(step, flush=True)
    if kill != "-":
        sys.exit(3)                                # the kill point was never reached
    sys.stdin.read()                               # wait here for the test's SIGKILL


# ------------------------------------------------------------------ the test side

def run_writer(path, config, seed, kill="-", stop_at=None) -> int:
    """Start a writer, let it die (or kill it on reading step ``stop_at``); last step it reported."""
    proc = subprocess.Popen([sys.executable, __file__, str(path), config, str(seed), kill],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reported = -1
    if stop_at is not None:
        for line in proc.stdout:
            reported = int(line)
            if reported >= stop_at:
                break
        proc.kill()
    out, err = proc.communicate(timeout=120)
    reported = max([reported] + [int(s) for s in out.split()])
    assert proc.returncode == -signal.SIGKILL, f"writer exited with {proc.returncode}: {err[-2000:]}"
    return reported


def check_recovery(path, config, seed, reported, candidates):
    """The reopened file equals the replayed state after one of ``candidates`` steps; returns it."""
    steps = plan(seed)
    with km.PagedKVCache.open(path, mode="r+") as c:       # r+: the dead writer's lock is gone
        assert c.verify() == []
        got = snapshot(c)
    matches = []
    for s in candidates:
        ref, model = replay(config, steps, s)
        if snapshot(ref) == got:
            matches.append((s, model))
    assert matches, (f"reopened state matches no committed step among {candidates} "
                     f"(last reported {reported}); sequences {sorted(got)}")
    s, model = matches[0]
    if config == "exact":                                   # independent of kvmmap: plain numpy
        assert sorted(model) == sorted(got)
        for name, layers in model.items():
            for layer, (k, v) in enumerate(layers):
                assert got[name][layer][0] == k.tobytes()
                assert got[name][layer][1] == v.astype(np.float16).astype(np.float32).tobytes()
    # the recovered file takes the next step and commits it
    if s + 1 < len(steps):
        with km.PagedKVCache.open(path) as c:
            ids = {name: sid for sid, name in c.sequences().items()}
            for op in steps[s + 1]:
                apply_op(c, op, ids)
            c.flush()
        ref, _ = replay(config, steps, s + 1)
        with km.PagedKVCache.open(path, mode="r") as c:
            assert c.verify() == []
            want = {n: [kv[:2] for kv in layers] for n, layers in snapshot(ref).items()}
            assert {n: [kv[:2] for kv in layers] for n, layers in snapshot(c).items()} == want
    return s


# (operation, hooked call, n-th call): where the writer kills itself
KILL_POINTS = [
    ("append", "quantize_into", 41),
    ("append", "ftruncate", 1),          # the first page makes the file grow
    ("append", "ftruncate", 2),          # capacity doubling: 64 -> 128 pages
    ("append", "ftruncate", 3),          # 128 -> 256 pages
    ("fork", "incref", 1),               # between the layers of a fork
    ("fork", "incref", 5),
    ("truncate", "decref", 1),
    ("truncate", "decref", 4),
    ("shift_left", "decref", 1),
    ("shift_left", "decref", 3),
    ("free", "decref", 1),
    ("flush", "fsync", 13),              # odd calls sync the data pages: those of the 7th commit
    ("flush", "pwrite", 13),             # 7th commit: payload written, header not: torn slot
    ("flush", "pwrite", 14),             # 7th commit: header written, not yet fsynced
]


@pytest.mark.parametrize("i", range(len(KILL_POINTS)), ids=[":".join(map(str, k)) for k in KILL_POINTS])
def test_kill_inside_an_operation(tmp_path, i):
    op, point, n = KILL_POINTS[i]
    config = ("exact", "quant")[i % 2]
    path = tmp_path / "c.kvm"
    reported = run_writer(path, config, seed=1, kill=f"{op}:{point}:{n}")
    if (op, point) == ("flush", "pwrite") and n % 2 == 0:
        # the header reached the page cache, which outlives the process: that commit holds
        assert check_recovery(path, config, 1, reported, [reported + 1]) == reported + 1
    else:
        # killed before this step's commit was complete: the previous one holds
        assert check_recovery(path, config, 1, reported, [reported]) == reported


@pytest.mark.parametrize("trial", range(8))
def test_kill_at_random_points(tmp_path, trial):
    rng = np.random.default_rng(1000 + trial)
    config = ("exact", "quant")[trial % 2]
    seed = 100 + trial
    path = tmp_path / "c.kvm"
    reported = run_writer(path, config, seed, stop_at=int(rng.integers(0, NSTEPS - 5)))
    check_recovery(path, config, seed, reported, [reported, reported + 1])


def test_plan_exercises_every_kill_point():
    """The plan for seed 1 holds enough of each operation for the kill points above."""
    counts = {}
    for ops in plan(1):
        for op in ops:
            counts[op[0]] = counts.get(op[0], 0) + 1
    assert counts["fork"] >= 3 and counts["truncate"] >= 4 and counts["shift_left"] >= 3 and counts["free"] >= 1
    assert sum(op[2] for ops in plan(1) for op in ops if op[0] == "append") > 400


if __name__ == "__main__":
    writer(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
