"""SIGKILL a writer anywhere; every reopen holds exactly a committed state, at least the last flushed.

A writer process (tests/workers/crash_writer.py) follows a seeded plan of steps, each a few
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

`kvmmap compress` is killed the same two ways (a hook at the n-th call that changes its
output; the test, on reading a call number from the pipe). The source must be untouched,
and the output path must hold nothing, the file that was there, or a complete cache equal
to an uninterrupted run; the next run must delete the partial file left behind.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

import numpy as np
import pytest

import kvmmap as km
from kvmmap.tools.rewrite import compress_cache

from helpers import WORKERS
from workers.compress_server import WAIT_FOR_KILL
from workers.crash_plan import CONFIGS, GEOMETRY, NSTEPS, apply_op, plan


# ------------------------------------------------------------------ the plan replayed in RAM

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


# ------------------------------------------------------------------ the test side

def run_writer(path, config, seed, kill="-", stop_at=None) -> int:
    """Start a writer, let it die (or kill it on reading step ``stop_at``); last step it reported."""
    proc = subprocess.Popen([sys.executable, str(WORKERS / "crash_writer.py"), str(path), config, str(seed), kill],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=path.parent)
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


# ------------------------------------------------------------------ kills during `kvmmap compress`
#
# A compress process runs the CLI's `kvmmap compress` and numbers every call that changes
# its output: appends and forks into the new cache, os.pwrite, os.ftruncate, os.fsync,
# os.replace. A trace run prints them; a killed run SIGKILLs itself at the n-th, or prints
# them and is killed by the test when it has read the n-th from the pipe. Each run is a
# child forked by a server process (tests/workers/compress_server.py) that has imported kvmmap
# already, so that a kill costs a fork, not an interpreter start.

COMPRESS_ARGS = {"formats": ["--k-format", "int8", "--v-format", "int4"],
                 "lowrank": ["--method", "lowrank", "--rank", "4"]}
SOURCE_STEPS = 15                  # plan(1) steps 0..15 in the source: 10 sequences, forks, shifts


class CompressRunner:
    """The test's end of tests/workers/compress_server.py."""

    def __init__(self, stderr_path):
        self.stderr_path = stderr_path
        self.stderr = open(stderr_path, "w")
        # one BLAS thread: lowrank's small eigh calls are ~20x slower with threads on a busy machine
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(WORKERS / "compress_server.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env,
                                     cwd=os.path.dirname(stderr_path))

    def run(self, src, dst, args, kill_at=0, stop_after=None) -> list[str]:
        """Run `kvmmap compress` in a child that kills itself at event ``kill_at``, is killed
        by the test on reporting event ``stop_after``, or (neither) completes; the events
        it reported."""
        wanted = WAIT_FOR_KILL if stop_after is not None else kill_at
        self.proc.stdin.write(json.dumps([str(src), str(dst), wanted, list(args)]) + "\n")
        self.proc.stdin.flush()
        events, pid = [], None
        watchdog = threading.Timer(120, self.proc.kill)      # a hung run ends the server: readline gets ""
        watchdog.start()
        try:
            while True:
                line = self.proc.stdout.readline()
                assert line, f"compress server died: {open(self.stderr_path).read()[-2000:]}"
                word, *rest = line.split() or [""]
                if word == "pid":
                    pid = int(rest[0])
                elif word == "event":
                    events.append(rest[0])
                    if len(events) == stop_after:
                        os.kill(pid, signal.SIGKILL)
                elif word == "exit":
                    status = int(rest[0])
                    break
                else:
                    assert word == "done", f"unexpected line {line!r} from the compress server"
        finally:
            watchdog.cancel()
        want = 0 if wanted == 0 else -signal.SIGKILL
        assert status == want, f"compress exited with {status}: {open(self.stderr_path).read()[-2000:]}"
        return events

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.proc.stdout.close()
        self.stderr.close()


def describe(path) -> tuple:
    """Formats, fingerprint, names and every sequence's values and block tables of a cache."""
    with km.PagedKVCache.open(path, mode="r+") as c:        # r+: no writer holds it
        assert c.verify() == []
        return c.k_format, c.v_format, c.fingerprint, snapshot(c)


def partials(dst) -> list[str]:
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.partial-"))


@dataclass
class CompressSetup:
    src: pathlib.Path
    src_bytes: bytes
    refs: dict                     # per argument set: describe() of a complete run's output
    traces: dict                   # per argument set: the events of that run
    runner: CompressRunner


@pytest.fixture(scope="module")
def compress_setup(tmp_path_factory):
    """A source file; per argument set the output and the events of a complete run."""
    d = tmp_path_factory.mktemp("compress")
    runner = CompressRunner(d / "server.err")
    src = d / "src.kvm"
    c = km.PagedKVCache.create(src, **GEOMETRY, k_format="fp32", v_format="fp16", fingerprint="crash-test",
                               meta_slot_bytes=1 << 17)
    ids = {}
    for ops in plan(1)[:SOURCE_STEPS + 1]:
        for op in ops:
            apply_op(c, op, ids)
        c.flush()
    c.close()
    refs, traces = {}, {}
    for name, args in COMPRESS_ARGS.items():
        traces[name] = runner.run(src, d / f"ref-{name}.kvm", args)
        refs[name] = describe(d / f"ref-{name}.kvm")
    # the child computes what compress_cache computes here (no BLAS in this one, so no
    # thread count can change a rounding)
    compress_cache(src, d / "here.kvm", k_format="int8", v_format="int4")
    assert describe(d / "here.kvm") == refs["formats"]
    yield CompressSetup(src, src.read_bytes(), refs, traces, runner)
    runner.close()


def check_after_compress_kill(tmp_path, setup: CompressSetup, name: str, old: bytes | None) -> tuple[str, list]:
    """Source untouched; at the output path nothing, the old file, or a complete cache equal
    to the reference; a rerun deletes the dead run's partial files and completes. Returns
    what was at the output path ("absent", "old", "new") and the partial files found."""
    dst = tmp_path / "out.kvm"
    assert setup.src.read_bytes() == setup.src_bytes
    with km.PagedKVCache.open(setup.src, mode="r+") as c:
        assert c.verify() == []
    left = partials(dst)
    if not dst.exists():
        outcome = "absent"
    elif old is not None and dst.stat().st_size == len(old) and dst.read_bytes() == old:
        outcome = "old"
    else:
        assert describe(dst) == setup.refs[name]
        outcome = "new"
    setup.runner.run(setup.src, dst, [*COMPRESS_ARGS[name], "--overwrite"])
    assert partials(dst) == [] and describe(dst) == setup.refs[name]
    return outcome, left


def compress_kill_points(trace: list[str]) -> dict[str, int]:
    """Chosen events (1-based) of a compress trace to kill at."""
    appends = [i + 1 for i, e in enumerate(trace) if e == "append"]
    final = len(trace) - trace[::-1].index("replace")         # the rename of the finished file
    assert trace[final - 6:final + 1] == ["append", "fsync", "pwrite", "pwrite", "fsync", "replace", "replaced"]
    return {
        "first append": appends[0],
        "between the layers of a sequence": appends[len(appends) // 2],   # appends go layer 0, layer 1, ...
        "after a fork": trace.index("fork") + 1,
        "last append, nothing committed": appends[-1],
        "before the data fsync of the commit": final - 4,
        "slot payload written": final - 3,
        "slot header written": final - 2,
        "committed, before the rename": final,
        "renamed, before the directory fsync": final + 1,
    }


COMPRESS_KILLS = ["first append", "between the layers of a sequence", "after a fork", "last append, nothing committed",
                  "before the data fsync of the commit", "slot payload written", "slot header written",
                  "committed, before the rename", "renamed, before the directory fsync"]


def expected_outcome(trace: list[str], kill_at: int, old: bytes | None) -> str:
    renamed = len(trace) - trace[::-1].index("replaced")
    return "new" if kill_at >= renamed else ("absent" if old is None else "old")


@pytest.mark.parametrize("i", range(len(COMPRESS_KILLS)), ids=COMPRESS_KILLS)
def test_kill_during_compress(tmp_path, compress_setup, i):
    setup, name = compress_setup, ("formats", "lowrank")[i % 2]
    trace = setup.traces[name]
    kill_at = compress_kill_points(trace)[COMPRESS_KILLS[i]]
    dst = tmp_path / "out.kvm"
    old, args = None, COMPRESS_ARGS[name]
    if i % 3 == 2:                                 # --overwrite over an existing cache
        old = setup.src_bytes
        dst.write_bytes(old)
        args = [*args, "--overwrite"]
    assert setup.runner.run(setup.src, dst, args, kill_at=kill_at) == trace[:kill_at - 1]
    outcome, left = check_after_compress_kill(tmp_path, setup, name, old)
    assert outcome == expected_outcome(trace, kill_at, old)
    # a dead run leaves its partial file (the next run deletes it) until it has renamed it
    assert bool(left) == (outcome != "new")


@pytest.mark.parametrize("trial", range(6))
def test_kill_during_compress_at_random_points(tmp_path, compress_setup, trial):
    """Self-kills at a random event (even trials); kills by the test when it reads a random
    event from the pipe, wherever the run has got to by then (odd trials)."""
    rng = np.random.default_rng(2000 + trial)
    setup, name = compress_setup, ("formats", "lowrank")[trial // 2 % 2]
    trace = setup.traces[name]
    n = int(rng.integers(1, len(trace) + 1))
    if trial % 2 == 0:
        assert setup.runner.run(setup.src, tmp_path / "out.kvm", COMPRESS_ARGS[name], kill_at=n) == trace[:n - 1]
        outcome, _ = check_after_compress_kill(tmp_path, setup, name, None)
        assert outcome == expected_outcome(trace, n, None)
    else:
        reported = setup.runner.run(setup.src, tmp_path / "out.kvm", COMPRESS_ARGS[name], stop_after=n)
        assert len(reported) >= n and reported == trace[:len(reported)]
        outcome, _ = check_after_compress_kill(tmp_path, setup, name, None)
        renamed = len(trace) - trace[::-1].index("replaced")
        if len(reported) != renamed - 1:           # else it may have died between rename and report
            assert outcome == ("new" if len(reported) >= renamed else "absent")


def test_stale_partials_are_removed_but_not_a_live_one(tmp_path):
    """remove_stale_partials deletes partial files whose writer lock is free, keeps one a
    live writer holds, and leaves other names alone."""
    dst = tmp_path / "out.kvm"
    dead = tmp_path / ".out.kvm.partial-99999999"
    dead.write_bytes(b"x")
    dead_tmp = tmp_path / ".out.kvm.partial-99999999.99999999.7f00.tmp"     # inside create(overwrite=True)
    dead_tmp.write_bytes(b"x")
    other = tmp_path / ".other.kvm.partial-1"
    other.write_bytes(b"x")
    live = km.PagedKVCache.create(tmp_path / ".out.kvm.partial-1", **GEOMETRY, meta_slot_bytes=1 << 16)
    removed = km.core.fileio.remove_stale_partials(dst)
    assert sorted(map(os.path.basename, removed)) == sorted([dead.name, dead_tmp.name])
    assert partials(dst) == [".out.kvm.partial-1"] and other.exists()
    live.close()
    assert km.core.fileio.remove_stale_partials(dst) and partials(dst) == []

