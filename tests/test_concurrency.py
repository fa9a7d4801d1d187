"""One writer, several read-only readers, and writers that must be refused.

The writer (tests/workers/concurrency_writer.py) commits step after step: it appends a
chunk to sequence "log", one token to "clock" (so a reader learns the step it sees from
the clock's length), and every few steps drops tokens from the front of "log" with
shift_left, so freed pages are reused by later appends. Readers
(tests/workers/concurrency_reader.py) open the file read-only again and again and read
all of "log"; every read must equal, byte for byte, the plain-numpy model of the step the reader opened, or be
refused with a kvmmap error saying the writer has moved on (never silently torn data).
Synchronisation is by the writer's stdout (a step number once its flush returned) and
the readers' stdin (closed to stop them): nothing sleeps.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import kvmmap as km

from helpers import WORKERS
from workers.concurrency_log import GEO, NSTEPS, chunk, model

NREADERS = 3


def spawn(role, path, **kw):
    """tests/workers/concurrency_{role}.py on ``path``, run from the file's folder."""
    return subprocess.Popen([sys.executable, str(WORKERS / f"concurrency_{role}.py"), str(path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=path.parent, **kw)


def test_readers_see_only_committed_states_while_a_writer_runs(tmp_path):
    path = tmp_path / "shared.kvm"
    w = spawn("writer", path)
    assert w.stdout.readline().strip() == "0", w.stderr.read()
    readers = [spawn("reader", path) for _ in range(NREADERS)]
    for r in readers:
        assert r.stdout.readline().strip() == "ready", r.stderr.read()
    w.stdin.write("go\n")
    w.stdin.flush()
    for line in w.stdout:
        if int(line) == NSTEPS - 1:
            break
    results = []
    for r in readers:                       # the writer is done: readers must now see the last step
        out, err = r.communicate("", timeout=120)
        assert r.returncode == 0, f"reader failed: {out[-500:]} {err[-2000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    w.stdin.close()
    w.wait(timeout=60)
    for res in results:
        assert res["last"] == NSTEPS - 1, res
        assert res["distinct"] >= 2, f"a reader never overlapped the writer: {res}"
    with km.PagedKVCache.open(path, mode="r") as c:
        assert c.verify() == []
        # fewer page ids were ever handed out than pages sealed: the writer reused pages
        # freed by shift_left, so a stale reader was a real hazard in this run
        st = c.stats()
        sealed = 2 * (sum(len(chunk(i)[0, 0]) for i in range(NSTEPS)) // GEO["page_size"]) + NSTEPS // GEO["page_size"]
        assert st["pages_used"] + st["pages_free"] + st["pages_pending"] < sealed


def test_old_reader_is_refused_once_its_pages_are_reused(tmp_path):
    """A read-only view kept open across commits must not return pages the writer reused."""
    path = tmp_path / "old.kvm"
    w = km.PagedKVCache.create(path, **GEO)
    s = w.new_sequence("log")
    x = np.random.default_rng(0).standard_normal((12, 2, 32), dtype=np.float32)
    w.append(s, 0, x, x)
    w.flush()
    r = km.PagedKVCache.open(path, mode="r")
    np.testing.assert_array_equal(r.read(s, 0)[0], x)
    w.shift_left(s, 8)                      # frees two pages, reusable after the second next commit
    w.flush()
    np.testing.assert_array_equal(r.read(s, 0)[0], x)       # not reused yet: still exact
    w.flush()                               # the previous commit no longer lists them: free
    np.testing.assert_array_equal(r.read(s, 0)[0], x)
    y = -np.random.default_rng(1).standard_normal((8, 2, 32), dtype=np.float32)
    w.append(s, 0, y, y)                    # overwrites the two freed pages
    with pytest.raises(km.CacheFileError, match="reopen"):
        r.read(s, 0)
    np.testing.assert_array_equal(r.read(s, 0, 8, 12)[0], x[8:])   # pages still its own are fine
    r.close()
    w.close()


def test_open_looks_again_when_a_commit_races_it(tmp_path, monkeypatch):
    """Both roots found mid-rewrite (a writer committed twice between the two reads) is
    not damage: open() reads them again. Simulated by hiding the first look."""
    path = tmp_path / "race.kvm"
    with km.PagedKVCache.create(path, **GEO) as c:
        c.new_sequence("x")
        c.flush()
    real, calls = km.core.commits.read_root, []

    def first_look_torn(fd, sb, index):
        calls.append(index)
        return None if len(calls) <= 2 else real(fd, sb, index)
    monkeypatch.setattr(km.core.commits, "read_root", first_look_torn)
    with km.PagedKVCache.open(path, mode="r") as c:
        assert c.sequences() == {0: "x"}
    assert calls == [0, 1, 0, 1]


def test_open_looks_again_when_commits_race_its_blobs(tmp_path, monkeypatch):
    """A reader chose the newest root; before it read that commit's blobs a writer
    committed twice and reused their pages (allowed: no commit on disk lists them any
    more). That is a race, not damage: open() must read the roots again and open the
    newer commit. Simulated deterministically by committing between the two steps."""
    path = tmp_path / "race.kvm"
    w = km.PagedKVCache.create(path, **GEO)
    s = w.new_sequence("x")
    w.append(s, 0, *np.ones((2, 3, GEO["num_kv_heads"], GEO["head_dim"]), np.float32))
    w.flush()
    real, raced = km.core.commits.read_blob, []

    def race(*args, **kw):
        if not raced:
            raced.append(1)
            for i in range(3):                  # the record and index pages the reader chose get reused
                w.append(s, 0, *np.full((2, 1, GEO["num_kv_heads"], GEO["head_dim"]), i, np.float32))
                w.flush()
        return real(*args, **kw)
    monkeypatch.setattr(km.core.commits, "read_blob", race)
    with km.PagedKVCache.open(path, mode="r") as r:
        assert raced and r.seq_len(s, 0) == 6
    w.close()


def test_second_writer_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "w.kvm"
    w = spawn("writer", path)
    assert w.stdout.readline().strip() == "0"
    code = ("import sys, kvmmap as km\n"
            "try:\n"
            "    km.PagedKVCache.open(sys.argv[1], mode=sys.argv[2])\n"
            "except km.CacheFileError as e:\n"
            "    print('refused:', e)\n")
    # cwd: a folder without the source tree, so the installed kvmmap is imported
    r = subprocess.run([sys.executable, "-c", code, str(path), "r+"], capture_output=True, text=True,
                       cwd=path.parent)
    assert r.returncode == 0 and "refused:" in r.stdout and "writer lock" in r.stdout, r.stdout + r.stderr
    # create(overwrite=True) over a file a writer holds is refused too, and the file is intact
    code_create = ("import sys, kvmmap as km\n"
                   "try:\n"
                   "    km.PagedKVCache.create(sys.argv[1], num_layers=1, num_kv_heads=1, head_dim=2, overwrite=True)\n"
                   "except km.CacheFileError as e:\n"
                   "    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-c", code_create, str(path)], capture_output=True, text=True,
                       cwd=path.parent)
    assert r.returncode == 0 and "refused:" in r.stdout and "writer lock" in r.stdout, r.stdout + r.stderr
    w.stdin.write("go\n")
    w.stdin.flush()
    for line in w.stdout:
        if int(line) == NSTEPS - 1:
            break
    with km.PagedKVCache.open(path, mode="r") as c:
        assert (c.num_layers, c.head_dim) == (2, 32)
        assert c.seq_len(c.find_sequence("clock"), 0) == NSTEPS
        for layer, (k, v) in enumerate(model(NSTEPS - 1)):
            got = c.read(c.find_sequence("log"), layer)
            assert got[0].tobytes() == k.tobytes() and got[1].tobytes() == v.tobytes()
    w.stdin.close()
    assert w.wait(timeout=60) == 0
    # with the writer gone the lock is free: overwriting now works, and readers of the old
    # file (mapped before) keep reading the old contents
    old = km.PagedKVCache.open(path, mode="r")
    before = old.read(old.find_sequence("log"), 0)[0].copy()
    km.PagedKVCache.create(path, num_layers=1, num_kv_heads=1, head_dim=2, overwrite=True).close()
    np.testing.assert_array_equal(old.read(old.find_sequence("log"), 0)[0], before)
    old.close()
    with km.PagedKVCache.open(path, mode="r") as c:
        assert c.num_layers == 1 and c.sequences() == {}

