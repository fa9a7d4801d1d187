"""Odd paths, files changed behind kvmmap's back, recovery of the previous commit, small bad input.

Each case here was a fault found by trying: a FIFO hung open(), a writer could commit to
a file another process had just replaced, create(overwrite=True) replaced a symlink instead
of its target, temporary names overflowed 255 bytes, a sparse file's apparent size decided
how much memory open() took, bools and floats passed as integers, a lone surrogate in a
name or an exhausted id counter raised raw Python errors.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap

import crc32c
import numpy as np
import pytest

import kvmmap as km
from kvmmap import cache as cache_mod

GEO = dict(num_layers=2, num_kv_heads=2, head_dim=16, page_size=4, k_format="fp32", v_format="fp32")
H, D = 2, 16


def tokens(n, seed):
    return np.random.default_rng(seed).standard_normal((n, H, D), dtype=np.float32)


def make(path, n=10, name="s", **kw):
    c = km.PagedKVCache.create(path, **GEO, **kw)
    s = c.new_sequence(name)
    for layer in range(2):
        c.append(s, layer, tokens(n, layer), tokens(n, 10 + layer))
    c.flush()
    return c


def run_py(code: str, timeout=60):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd="/")


# ------------------------------------------------------------------ non-regular files

def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.kvm"
    os.mkfifo(fifo)
    r = run_py(f"""
        import kvmmap as km
        for call in (lambda: km.PagedKVCache.open({str(fifo)!r}, mode="r"),
                     lambda: km.PagedKVCache.open({str(fifo)!r}, mode="r+"),
                     lambda: km.PagedKVCache.create({str(fifo)!r}, num_layers=1, num_kv_heads=1, head_dim=8,
                                                    overwrite=True)):
            try:
                call()
                print("opened")
            except km.CacheFileError as e:
                print("refused:", e)
    """, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("refused:") and "not a regular file" in line for line in lines)
    assert fifo.exists() and not fifo.is_file()


def test_directory_is_refused(tmp_path):
    for mode in ("r", "r+"):
        with pytest.raises(km.CacheFileError, match="directory"):
            km.PagedKVCache.open(tmp_path, mode=mode)


# ------------------------------------------------------------------ a file replaced while opening

def test_open_follows_a_file_replaced_before_it_locked(tmp_path, monkeypatch):
    """open(r+) opened the old inode, create(overwrite=True) renamed a new file over the
    path, then open took the (now free) lock of the deleted old file: it would have
    committed into a file no one can reach. It must notice and open the new file."""
    path = tmp_path / "race.kvm"
    make(path, name="old").close()
    real, calls = cache_mod.open_regular, []

    def open_then_replace(p, flags, *a):
        fd = real(p, flags, *a)
        if flags & os.O_RDWR:            # open(r+), not create's lock of the old file
            calls.append(p)
        if len(calls) == 1 and flags & os.O_RDWR:              # between open and lock: another process replaces it
            make(path, name="new", overwrite=True).close()
        return fd
    monkeypatch.setattr(cache_mod, "open_regular", open_then_replace)
    with km.PagedKVCache.open(path) as c:
        assert list(c.sequences().values()) == ["new"]
        c.new_sequence("added")
        c.flush()
    assert len(calls) == 2
    monkeypatch.undo()
    with km.PagedKVCache.open(path, mode="r") as c:
        assert sorted(c.sequences().values()) == ["added", "new"]


# ------------------------------------------------------------------ symlinks and long names

def test_overwrite_through_a_symlink_replaces_the_target(tmp_path):
    target = tmp_path / "real.kvm"
    link = tmp_path / "link.kvm"
    make(target, name="before").close()
    link.symlink_to(target)
    make(link, name="after", overwrite=True).close()
    assert link.is_symlink() and os.readlink(link) == str(target)
    with km.PagedKVCache.open(target, mode="r") as c:
        assert list(c.sequences().values()) == ["after"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.kvm", "real.kvm"]


def test_long_names_get_temporary_names_that_fit(tmp_path):
    """A valid 250-byte file name: create(overwrite=True) and compress build their new
    file under a temporary name, which used to be longer than 255 bytes."""
    long = tmp_path / ("k" * 246 + ".kvm")
    make(long, name="a").close()
    make(long, name="b", overwrite=True).close()
    with km.PagedKVCache.open(long, mode="r") as c:
        assert list(c.sequences().values()) == ["b"]
    dst = tmp_path / ("d" * 246 + ".kvm")
    km.compress_cache(str(long), str(dst), k_format="int8", v_format="int8", progress=False)
    km.compress_cache(str(long), str(dst), k_format="int8", v_format="int8", progress=False,
                     overwrite=True)
    with km.PagedKVCache.open(dst, mode="r") as c:
        assert list(c.sequences().values()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([long.name, dst.name])
    for p in (km.core.fileio.partial_path(str(long)), km.core.fileio.partial_path(str(dst))):
        assert len(os.path.basename(p).encode()) + 14 <= 255


# ------------------------------------------------------------------ apparent size

def test_sparse_apparent_size_does_not_decide_memory(tmp_path):
    """A small cache extended to 1 TiB (a hole) opens, reads, verifies and takes appends
    under a 1.5 GiB address-space limit: what open() sizes comes from the committed pages."""
    path = tmp_path / "sparse.kvm"
    make(path, n=30).close()
    with open(path, "r+b") as f:
        f.truncate(1 << 40)
    r = run_py(f"""
        import resource, numpy as np, kvmmap as km
        resource.setrlimit(resource.RLIMIT_AS, (3 << 29, resource.RLIM_INFINITY))
        for mode in ("r", "r+"):
            with km.PagedKVCache.open({str(path)!r}, mode=mode) as c:
                s = c.find_sequence("s")
                k, v = c.read(s, 1)
                want = np.random.default_rng(1).standard_normal((30, 2, 16), dtype=np.float32)
                assert (k == want).all() and c.verify() == []
                assert c.stats()["pages_capacity"] < 1000, c.stats()
                if mode == "r+":
                    c.append(s, 0, want, want)
                    c.flush()
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


# ------------------------------------------------------------------ the previous commit, on purpose

def test_open_previous_commit(tmp_path):
    path = tmp_path / "prev.kvm"
    c = make(path, n=9, name="a")                   # commit 1 (create) is empty; 2 holds a
    want_a = c.read(c.find_sequence("a"), 0)
    c.free(c.find_sequence("a"))
    b = c.new_sequence("b")
    c.append(b, 0, tokens(13, 5), tokens(13, 6))
    c.flush()                                       # 3: b only; a's pages are retired
    c.close()
    with km.PagedKVCache.open(path, mode="r", commit="previous") as p:
        assert list(p.sequences().values()) == ["a"] and p.verify() == []
        for got, ref in zip(p.read(p.find_sequence("a"), 0), want_a):
            np.testing.assert_array_equal(got, ref)
    with km.PagedKVCache.open(path, mode="r") as n:
        assert list(n.sequences().values()) == ["b"]
    # roll back: r+ at the previous commit, the first flush makes it the newest again
    with km.PagedKVCache.open(path, commit="previous") as p:
        p.append(p.find_sequence("a"), 1, tokens(2, 7), tokens(2, 8))
        p.flush()
    with km.PagedKVCache.open(path, mode="r") as n:
        assert list(n.sequences().values()) == ["a"] and n.verify() == []
        assert n.seq_len(n.find_sequence("a"), 1) == 11
        for got, ref in zip(n.read(n.find_sequence("a"), 0), want_a):
            np.testing.assert_array_equal(got, ref)
    with pytest.raises(km.ConfigError):
        km.PagedKVCache.open(path, commit="oldest")


def test_previous_commit_must_exist(tmp_path):
    path = tmp_path / "one.kvm"
    km.PagedKVCache.create(path, **GEO).close()     # one commit: root 0 written, root 1 empty
    with pytest.raises(km.CacheFileError, match="no previous commit"):
        km.PagedKVCache.open(path, mode="r", commit="previous")


def test_writer_keeps_the_other_roots_pages_after_reopening(tmp_path):
    """Reopened for writing, the pages only the previous commit lists are not reused
    before the next commit: a crash right after reusing them would otherwise leave a
    previous commit (the fallback after damage) pointing at overwritten pages."""
    path = tmp_path / "keep.kvm"
    c = make(path, n=12, name="a")
    pages_a = set(c.block_table(c.find_sequence("a"), 0).tolist())
    c.free(c.find_sequence("a"))
    c.flush()
    c.close()
    with km.PagedKVCache.open(path) as c:
        s = c.new_sequence("b")
        c.append(s, 0, tokens(12, 3), tokens(12, 4))
        assert not pages_a & set(c.block_table(s, 0).tolist())
    with km.PagedKVCache.open(path, mode="r", commit="previous") as p:
        assert p.verify() == []


# ------------------------------------------------------------------ small bad input

def test_bools_and_floats_are_not_integers(tmp_path):
    c = make(None)
    s = c.find_sequence("s")
    with pytest.raises(km.ShapeError):
        c.read(s, 0, start=True)
    with pytest.raises(km.ShapeError):
        c.read(s, 0, 0, 3.0)
    for bad in (0.0, True, "0", None):
        with pytest.raises(km.SequenceError):
            c.append(bad, 0, tokens(1, 0), tokens(1, 0))
        with pytest.raises(km.SequenceError):
            c.read(bad, 0)
    assert c.seq_len(s) == 10
    assert c.seq_len(np.int64(s)) == 10                 # numpy integers are integers


def test_names_must_be_encodable():
    c = km.PagedKVCache.create(None, **GEO)
    for bad in ("\ud800", "a\udcff", "", b"bytes", 7):
        with pytest.raises(km.SequenceError, match="name"):
            c.new_sequence(bad)
        s = c.new_sequence()
        with pytest.raises(km.SequenceError, match="name"):
            c.fork(s, bad)
        c.free(s)
    assert len(c.sequences()) == 0


def set_next_id(path, value):
    """Rewrite the newest root's next_sequence_id (and its checksum), as FORMAT.md lays it out."""
    raw = bytearray(path.read_bytes())
    best = None
    for off in (4096, 8192):
        magic, gen = struct.unpack_from("<8sQ", raw, off)
        if magic == b"KVMROOT\0" and struct.unpack_from("<I", raw, off + 60)[0] == crc32c.crc32c(bytes(raw[off:off + 60])) \
                and (best is None or gen > best[1]):
            best = (off, gen)
    off = best[0]
    struct.pack_into("<I", raw, off + 40, value)
    struct.pack_into("<I", raw, off + 60, crc32c.crc32c(bytes(raw[off:off + 60])))
    path.write_bytes(bytes(raw))


def test_exhausted_sequence_ids_are_an_error_not_a_broken_flush(tmp_path):
    path = tmp_path / "ids.kvm"
    make(path).close()
    set_next_id(path, 0xFFFFFFFF)
    with km.PagedKVCache.open(path) as c:
        with pytest.raises(km.SequenceError, match="every sequence id"):
            c.new_sequence("x")
        with pytest.raises(km.SequenceError, match="every sequence id"):
            c.fork(c.find_sequence("s"))
        c.append(c.find_sequence("s"), 0, tokens(2, 1), tokens(2, 1))
        c.flush()                                    # was: struct.error on every later flush
    with km.PagedKVCache.open(path, mode="r") as c:
        assert c.seq_len(c.find_sequence("s"), 0) == 12


# ------------------------------------------------------------------ a forked child of a writer

def test_forked_child_of_a_writer_may_read_but_not_write(tmp_path):
    path = tmp_path / "fork.kvm"
    c = make(path, n=10)
    s = c.find_sequence("s")
    want = c.read(s, 0)[0]
    r_fd, w_fd = os.pipe()
    pid = os.fork()
    if pid == 0:                                     # the child: report, never return to pytest
        code = 0
        try:
            out = []
            np.testing.assert_array_equal(c.read(s, 0)[0], want)
            out.append("read")
            for name, call in (("append", lambda: c.append(s, 0, tokens(1, 9), tokens(1, 9))),
                               ("new", lambda: c.new_sequence("child")),
                               ("flush", c.flush), ("free", lambda: c.free(s))):
                try:
                    call()
                    out.append(f"{name}:allowed")
                except km.ReadOnlyError as e:
                    out.append(f"{name}:refused" if "forked child" in str(e) else f"{name}:{e}")
            os.write(w_fd, " ".join(out).encode())
        except BaseException as e:
            os.write(w_fd, repr(e).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w_fd)
    _, status = os.waitpid(pid, 0)
    got = os.read(r_fd, 4096).decode()
    os.close(r_fd)
    assert os.waitstatus_to_exitcode(status) == 0, got
    assert got == "read append:refused new:refused flush:refused free:refused"
    # the parent is still the writer, its state untouched
    c.append(s, 0, tokens(2, 3), tokens(2, 3))
    c.flush()
    c.close()
    with km.PagedKVCache.open(path, mode="r") as r:
        assert r.seq_len(r.find_sequence("s"), 0) == 12 and list(r.sequences().values()) == ["s"]


def test_cli_verify_previous(tmp_path):
    """`kvmmap verify --previous` checks the older commit; it says so when there is none."""
    from kvmmap.cli import main

    path = tmp_path / "v.kvm"
    km.PagedKVCache.create(path, **GEO).close()
    assert main(["verify", "--previous", "--no-progress", str(path)]) == 1      # one commit only
    c = make(path, overwrite=True)
    c.append(c.find_sequence("s"), 0, tokens(4, 3), tokens(4, 3))
    c.flush()
    c.close()
    assert main(["verify", "--previous", "--no-progress", str(path)]) == 0
    assert main(["verify", "--no-progress", str(path)]) == 0


def test_rolling_back_never_overwrites_the_newer_commit_before_committing(tmp_path):
    """Opened at the previous commit for writing, new pages must not take ids the newer
    commit (still the newest on disk) lists: a crash before the roll-back's first commit
    would leave the newest commit pointing at overwritten pages."""
    path = tmp_path / "roll.kvm"
    c = make(path, n=4, name="a")                   # previous: a few pages
    c.append(c.find_sequence("a"), 0, tokens(40, 3), tokens(40, 4))
    c.flush()                                       # newest: ten more pages in layer 0
    newest = {name: [x.tobytes() for x in c.read(sid, 0)] for sid, name in c.sequences().items()}
    c.close()
    with km.PagedKVCache.open(path, commit="previous") as p:
        s = p.find_sequence("a")
        p.append(s, 1, tokens(80, 5), tokens(80, 6))   # twenty new pages, none committed
        p.new_sequence("z")
        # "killed" here: closed without flush
    with km.PagedKVCache.open(path, mode="r") as n:
        assert n.verify() == []
        assert {name: [x.tobytes() for x in n.read(sid, 0)] for sid, name in n.sequences().items()} == newest


_POOL_CACHE = None          # the parent's writer, inherited by the fork pool's workers


def _child_tries_to_write(seq):
    c = _POOL_CACHE
    got = c.read(seq, 0)[0].sum()
    try:
        c.append(seq, 0, tokens(1, 5), tokens(1, 5))
        return float(got), "allowed"
    except km.ReadOnlyError as e:
        return float(got), "refused" if "forked child" in str(e) else str(e)


def test_fork_pool_workers_of_a_writer_read_but_do_not_write(tmp_path):
    import multiprocessing

    global _POOL_CACHE
    path = tmp_path / "pool.kvm"
    c = _POOL_CACHE = make(path, n=10)
    s = c.find_sequence("s")
    want = float(c.read(s, 0)[0].sum())
    try:
        with multiprocessing.get_context("fork").Pool(2) as pool:
            results = pool.map_async(_child_tries_to_write, [s] * 4).get(timeout=60)
    finally:
        _POOL_CACHE = None
    assert results == [(want, "refused")] * 4
    c.append(s, 0, tokens(1, 6), tokens(1, 6))     # the parent still writes
    c.flush()
    c.close()
    with km.PagedKVCache.open(path, mode="r") as r:
        assert r.seq_len(r.find_sequence("s"), 0) == 11
