"""SIGKILL a writer anywhere; every reopen holds exactly a committed state, at least the last flushed.

A writer process (tests/workers/crash_writer.py) follows a plan of steps, each a few
operations (append, fork, truncate, shift_left, new, free, compact) then ``flush()``,
printing the step number once ``flush`` returns: a seeded random plan, or a short
scenario that leads a format-2 writer into one situation in its last step (a partly
filled page growing in place after a commit, copy-on-write of a page shared by a fork,
an append after truncating into a committed page, compact). It is killed with SIGKILL

* at chosen points *inside* operations, by hooks that make the writer kill itself on the
  n-th call of a low-level function while a given operation runs (in a given step): mid-
  append, right after the file grows, mid-fork, mid-truncate, mid-shift_left, mid-free,
  mid-compact, and inside ``flush`` between writing the blobs and writing the root, and
  after the root write but before its fsync;
* by the test, as soon as it reads a given step number, wherever the writer is then.

The file is then reopened for writing (so the dead writer's lock must be gone), must pass
``verify()`` and must equal, block tables and values, the state after step s of the same
plan replayed into a file by an undisturbed writer, where s is the last step reported (or
the next one, if the writer died between its flush and its print). Independently of
kvmmap, the values are compared with the plan's numpy model (exactly for exact formats,
within the quantization step for the others) and with the numpy decoder of the file's
bytes (tests/reference.py). The commit before it (``commit="previous"``) must open and
verify too, holding the step before. Finally the reopened file takes the next step and
commits.

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
import tempfile
import threading
from dataclasses import dataclass

import numpy as np
import pytest

import kvmmap as km
from kvmmap.tools.rewrite import compress_cache

from helpers import WORKERS
from reference import int4_token_bound, int8_roundtrip_bound, parse_cache_file, stored_kv
from workers.compress_server import WAIT_FOR_KILL
from workers.crash_plan import CONFIGS, GEOMETRY, NSTEPS, SCENARIOS, apply_op, plan, steps_for


# ------------------------------------------------------------------ the plan replayed

def snapshot(c) -> dict:
    """{name: per layer (k bytes, v bytes, block table)} of every sequence."""
    out = {}
    for sid, name in c.sequences().items():
        out[name] = [(c.read(sid, layer)[0].tobytes(), c.read(sid, layer)[1].tobytes(),
                      c.block_table(sid, layer).tolist()) for layer in range(c.num_layers)]
    return out


_REPLAYS: dict = {}


def replay(config: str, plan_name: str) -> list:
    """[(snapshot, numpy model)] after each step of the plan, written by an undisturbed
    writer into a file like the killed one (so page ids agree too); index -1: the empty
    cache that ``create`` commits."""
    key = (config, plan_name)
    if key not in _REPLAYS:
        kf, vf = CONFIGS[config]
        with tempfile.TemporaryDirectory() as d:
            c = km.PagedKVCache.create(os.path.join(d, "replay.kvm"), **GEOMETRY, k_format=kf, v_format=vf)
            ids, model, out = {}, {}, []
            for ops in steps_for(plan_name):
                for op in ops:
                    apply_op(c, op, ids, model)
                c.flush()
                out.append((snapshot(c), {n: [list(kv) for kv in layers] for n, layers in model.items()}))
            c.close()
        _REPLAYS[key] = out + [({}, {})]
    return _REPLAYS[key]


def largest_value(plan_name: str) -> float:
    """The largest magnitude of any value the plan appends."""
    L, H, D = GEOMETRY["num_layers"], GEOMETRY["num_kv_heads"], GEOMETRY["head_dim"]
    return max([float(np.abs(np.random.default_rng(op[3]).standard_normal((L, 2, op[2], H, D), dtype=np.float32)).max())
                for ops in steps_for(plan_name) for op in ops if op[0] == "append"] + [0.0])


def check_model(config: str, plan_name: str, got: dict, model: dict, v_group: int) -> None:
    """The values read equal the numpy model: exactly (fp32, fp16 rounding), or within
    the quantization error of the format (another sequence's rows are off by far more)."""
    assert sorted(model) == sorted(got)
    kf, vf = CONFIGS[config]
    H, D = GEOMETRY["num_kv_heads"], GEOMETRY["head_dim"]
    for name, layers in model.items():
        for layer, want in enumerate(layers):
            for side, fmt in enumerate((kf, vf)):
                x = want[side]
                stored = np.frombuffer(got[name][layer][side], np.float32).reshape(x.shape)
                if fmt == "fp32":
                    np.testing.assert_array_equal(stored, x)
                elif fmt == "fp16":
                    np.testing.assert_array_equal(stored, x.astype(np.float16).astype(np.float32))
                else:
                    if fmt == "int8":
                        bound = int8_roundtrip_bound(x)
                    elif side == 1:
                        bound = int4_token_bound(x, v_group)
                    else:
                        # keys: one step per channel over a page (2 A / 15 at most), twice
                        # when a truncated page was reopened and quantized again
                        bound = np.full(x.shape, 2 * largest_value(plan_name) / 15)
                    # scales rounded up and zero points down to float16
                    tol = 1.01 * bound + 2e-3 * np.abs(x).max(initial=0) + 1e-6
                    err = np.abs(stored - x)
                    assert np.all(err <= tol), (name, layer, side, float((err - tol).max()))
    assert all(len(layers) == GEOMETRY["num_layers"] for layers in got.values()) and H and D


# ------------------------------------------------------------------ the test side

def run_writer(path, config, plan_name, kill="-", stop_at=None) -> int:
    """Start a writer, let it die (or kill it on reading step ``stop_at``); last step it reported."""
    proc = subprocess.Popen([sys.executable, str(WORKERS / "crash_writer.py"), str(path), config, str(plan_name),
                             kill], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=path.parent)
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


def matching_step(got: dict, states: list, candidates) -> int:
    found = [s for s in candidates if states[s][0] == got]
    assert found, f"the state matches no committed step among {list(candidates)}; sequences {sorted(got)}"
    return found[0]


def check_recovery(path, config, plan_name, reported, candidates) -> int:
    """The reopened file equals the replayed state after one of ``candidates`` steps;
    returns it."""
    states = replay(config, plan_name)
    plan_name = str(plan_name)
    with km.PagedKVCache.open(path, mode="r+") as c:       # r+: the dead writer's lock is gone
        assert c.verify() == []
        got = snapshot(c)
        sids = {name: sid for sid, name in c.sequences().items()}
    s = matching_step(got, states, candidates)
    raw = path.read_bytes()
    parsed = parse_cache_file(raw)                          # independent of kvmmap: plain numpy
    check_model(config, plan_name, got, states[s][1], parsed["v_group"])
    for name, sid in sids.items():
        for layer in range(GEOMETRY["num_layers"]):
            for side, want in enumerate(stored_kv(parsed, raw, sid, layer)):
                have = np.frombuffer(got[name][layer][side], np.float32).reshape(want.shape)
                if CONFIGS[config][side] == "int4":
                    # code * scale + zero may be fused into one rounding: a few ulp
                    tol = 4 * np.finfo(np.float32).eps * (np.abs(want) + np.abs(want).max(initial=0))
                    assert np.all(np.abs(have - want) <= tol), (name, layer, side)
                else:
                    np.testing.assert_array_equal(have, want)
    # the commit before it is whole too; a compact commits several times with one content
    steps = steps_for(plan_name)
    compacting = any(op[0] == "compact" for ops in steps[s:s + 2] for op in ops)
    previous = [s - 1, s] if compacting else [s - 1]
    if s == -1:                                             # create's commit is the only one
        with pytest.raises(km.CacheFileError, match="no previous commit"):
            km.PagedKVCache.open(path, mode="r", commit="previous")
    else:
        with km.PagedKVCache.open(path, mode="r", commit="previous") as c:
            assert c.verify() == []
            matching_step(snapshot(c), states, previous)
    # the recovered file takes the next step and commits it
    if s + 1 < len(steps):
        with km.PagedKVCache.open(path) as c:
            ids = {name: sid for sid, name in c.sequences().items()}
            for op in steps[s + 1]:
                apply_op(c, op, ids)
            c.flush()
        with km.PagedKVCache.open(path, mode="r") as c:
            assert c.verify() == []
            want = {n: [kv[:2] for kv in layers] for n, layers in states[s + 1][0].items()}
            assert {n: [kv[:2] for kv in layers] for n, layers in snapshot(c).items()} == want
    return s


# (operation, hooked call, n-th call): where the writer of plan(1) kills itself. A flush
# syncs twice (the pages it lists, then the root) and writes once (the root: blobs and rows
# go through the map); create's calls are not counted.
KILL_POINTS = [
    ("append", "quantize_into", 41),
    ("append", "ftruncate", 1),          # the first pages make the file grow
    ("append", "ftruncate", 2),          # growth by half again
    ("append", "ftruncate", 3),
    ("fork", "incref", 1),               # between the layers of a fork
    ("fork", "incref", 5),
    ("truncate", "decref", 1),
    ("truncate", "decref", 4),
    ("shift_left", "decref", 1),
    ("shift_left", "decref", 3),
    ("free", "decref", 1),
    ("flush", "fsync", 13),              # 7th commit: blobs written, not yet synced, no root
    ("flush", "pwrite", 7),              # 7th commit: root written, not yet synced
    ("flush", "fsync", 14),              # the same point, seen from the second sync
]


def committed_by_kill(op: str, point: str, n: int) -> bool:
    """Whether the step being run when the hook fires is committed: its root was written
    (the page cache outlives the process)."""
    return op == "flush" and (point == "pwrite" or (point == "fsync" and n % 2 == 0))


@pytest.mark.parametrize("i", range(len(KILL_POINTS)), ids=[":".join(map(str, k)) for k in KILL_POINTS])
def test_kill_inside_an_operation(tmp_path, i):
    op, point, n = KILL_POINTS[i]
    config = ("exact", "quant", "k4")[i % 3]
    path = tmp_path / "c.kvm"
    reported = run_writer(path, config, 1, kill=f"{op}:{point}:{n}")
    extra = 1 if committed_by_kill(op, point, n) else 0
    assert check_recovery(path, config, 1, reported, [reported + extra]) == reported + extra


# (scenario, operation, hooked call, n-th call) in the scenario's last step
SCENARIO_KILLS = [
    ("grow_in_place", "append", "quantize_into", 1),    # rows written in place past the committed ones
    ("grow_in_place", "flush", "fsync", 1),             # blobs written, no root
    ("grow_in_place", "flush", "pwrite", 1),            # root written, not synced: committed
    ("fork_append", "append", "quantize_into", 1),
    ("fork_append", "flush", "fsync", 1),
    ("truncate_append", "append", "quantize_into", 1),
    ("truncate_append", "flush", "fsync", 1),
    ("truncate_full_append", "append", "quantize_into", 1),
    ("truncate_full_append", "flush", "fsync", 1),
    ("shift_append", "flush", "fsync", 1),
    ("free_reuse", "append", "quantize_into", 3),       # pages freed two commits ago, written again
    ("free_reuse", "flush", "fsync", 1),
    ("compact", "compact", "pwrite", 1),
    ("compact", "compact", "pwrite", 2),
    ("compact", "compact", "fsync", 5),                 # before the third commit's pages are synced
    ("compact", "compact", "ftruncate", 1),             # the file cut after the free pages
    ("compact", "compact", "pwrite", 4),
]


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("i", range(len(SCENARIO_KILLS)), ids=[":".join(map(str, k)) for k in SCENARIO_KILLS])
def test_kill_in_a_scenario(tmp_path, i, config):
    name, op, point, n = SCENARIO_KILLS[i]
    last = len(SCENARIOS[name]) - 1
    path = tmp_path / "c.kvm"
    reported = run_writer(path, config, name, kill=f"{op}:{point}:{n}:{last}")
    assert reported == last - 1
    if op == "compact":
        candidates = [last - 1, last]               # compact changes no contents
    else:
        candidates = [last] if committed_by_kill(op, point, n) else [last - 1]
    check_recovery(path, config, name, reported, candidates)


def test_scenarios_reach_their_situations(tmp_path):
    """The scenarios do what their kill points assume, seen in the file (int4 keys)."""
    kf, vf = CONFIGS["k4"]
    for name in ("grow_in_place", "fork_append", "truncate_append", "compact"):
        path = tmp_path / f"{name}.kvm"
        c = km.PagedKVCache.create(path, **GEOMETRY, k_format=kf, v_format=vf)
        ids, pages = {}, []
        for ops in SCENARIOS[name][:-1]:
            for op in ops:
                apply_op(c, op, ids)
            c.flush()
            pages.append(c.block_table(ids["s0"], 0).tolist())
        size = path.stat().st_size
        for op in SCENARIOS[name][-1]:
            apply_op(c, op, ids)
        c.flush()
        after = c.block_table(ids["s0"], 0).tolist()
        c.close()
        if name == "grow_in_place":
            assert after[:2] == pages[-1] and len(after) == 3      # the page grew in place, then one more
        elif name == "fork_append":
            s1 = parse_cache_file(path.read_bytes())["seqs"][1]["layers"][0]
            assert s1["pages"][0] == pages[-1][0] and s1["pages"][1] != pages[-1][1]    # shared, copied
        elif name == "truncate_append":
            assert after[0] == pages[-1][0] and after[1] != pages[-1][1]                # copied
        else:
            assert path.stat().st_size < size                                          # cut


def test_plan_exercises_every_kill_point():
    """The plan for seed 1 holds enough of each operation for the kill points above."""
    counts = {}
    for ops in plan(1):
        for op in ops:
            counts[op[0]] = counts.get(op[0], 0) + 1
    assert counts["fork"] >= 3 and counts["truncate"] >= 4 and counts["shift_left"] >= 3 and counts["free"] >= 1
    assert sum(op[2] for ops in plan(1) for op in ops if op[0] == "append") > 400


@pytest.mark.parametrize("trial", range(9))
def test_kill_at_random_points(tmp_path, trial):
    rng = np.random.default_rng(1000 + trial)
    config = ("exact", "quant", "k4")[trial % 3]
    seed = 100 + trial
    path = tmp_path / "c.kvm"
    reported = run_writer(path, config, seed, stop_at=int(rng.integers(0, NSTEPS - 5)))
    check_recovery(path, config, seed, reported, [reported, reported + 1])


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
    c = km.PagedKVCache.create(src, **GEOMETRY, k_format="fp32", v_format="fp16", fingerprint="crash-test")
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
    # the commit: sync the pages (blobs included), write the root, sync it
    assert trace[final - 5:final + 1] == ["append", "fsync", "pwrite", "fsync", "replace", "replaced"]
    return {
        "first append": appends[0],
        "between the layers of a sequence": appends[len(appends) // 2],   # appends go layer 0, layer 1, ...
        "after a fork": trace.index("fork") + 1,
        "last append, nothing committed": appends[-1],
        "before the data fsync of the commit": final - 3,
        "root written, not synced": final - 2,
        "before the root's fsync": final - 1,
        "committed, before the rename": final,
        "renamed, before the directory fsync": final + 1,
    }


COMPRESS_KILLS = ["first append", "between the layers of a sequence", "after a fork", "last append, nothing committed",
                  "before the data fsync of the commit", "root written, not synced", "before the root's fsync",
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
    live = km.PagedKVCache.create(tmp_path / ".out.kvm.partial-1", **GEOMETRY)
    removed = km.core.fileio.remove_stale_partials(dst)
    assert sorted(map(os.path.basename, removed)) == sorted([dead.name, dead_tmp.name])
    assert partials(dst) == [".out.kvm.partial-1"] and other.exists()
    live.close()
    assert km.core.fileio.remove_stale_partials(dst) and partials(dst) == []

