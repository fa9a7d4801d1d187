"""I/O faults: every failing call changes nothing it has not committed to.

A fault-injection fixture makes the n-th low-level I/O call of an operation fail (an
OSError of some errno, a short write followed by a full disk, or a KeyboardInterrupt),
swept over every n the operation makes, as SQLite's I/O-error tests do. After each fault
the cache takes a further commit with the faults off, and the file reopened in both
modes must hold exactly the state the cache object says it holds: the operation's
result if it returned, the state before it if it raised. The expected values come from
a numpy model (fp32 keys, fp16 values are exact) and, for the quantized formats, from
the same operations replayed on a RAM cache, which does no I/O.

Real limits follow: ``ulimit -f`` (RLIMIT_FSIZE) during a commit and during arena growth,
and a full file system (a small tmpfs) under appends that write pages through the map.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import kvmmap as km

GEO = dict(num_layers=2, num_kv_heads=2, head_dim=16, page_size=4)
CONFIGS = {"exact": ("fp32", "fp16"), "quant": ("int8", "int4")}
H, D = GEO["num_kv_heads"], GEO["head_dim"]


class Faults:
    """Counts, and on request fails, the I/O calls kvmmap makes.

    Hooked: ``os.pwrite``, ``os.ftruncate``, ``os.fsync``, ``os.posix_fallocate`` and
    ``mmap.mmap`` (numpy.memmap maps through it). ``arm(n, mode)`` fails the n-th call from
    then on: ``"error"`` raises OSError (ENOSPC, EIO or EFBIG by call kind), ``"short"`` makes
    a pwrite write half of its bytes (any other call fails as in "error") and every later
    write, growth or reservation fail with ENOSPC (the disk is now full), ``"interrupt"``
    raises KeyboardInterrupt.
    """

    ERRNO = {"pwrite": errno.ENOSPC, "ftruncate": errno.EFBIG, "fsync": errno.EIO,
             "posix_fallocate": errno.ENOSPC, "mmap": errno.ENOMEM}

    def __init__(self, monkeypatch):
        self.calls, self.n, self.mode, self.full, self.fired, self.seen = 0, 0, None, False, None, {}
        self.counting = False
        self.real = {"pwrite": os.pwrite, "ftruncate": os.ftruncate, "fsync": os.fsync,
                     "posix_fallocate": os.posix_fallocate, "mmap": mmap.mmap}
        for name in ("pwrite", "ftruncate", "fsync", "posix_fallocate"):
            monkeypatch.setattr(os, name, self._hook(name))
        monkeypatch.setattr(mmap, "mmap", self._hook("mmap"))

    def arm(self, n: int, mode: str) -> None:
        self.calls, self.n, self.mode, self.full, self.fired, self.seen = 0, n, mode, False, None, {}

    def count(self) -> None:
        self.arm(0, None)
        self.counting = True

    def off(self) -> None:
        self.n, self.mode, self.full, self.counting = 0, None, False, False

    def _hook(self, name):
        def call(*args, **kwargs):
            real = self.real[name]
            if self.mode is not None:
                self.calls += 1
                if self.full and name in ("pwrite", "ftruncate", "posix_fallocate"):
                    raise OSError(errno.ENOSPC, "No space left on device (injected)")
                if self.calls == self.n:
                    self.fired, self.fired_args = name, args
                    if self.mode == "interrupt":
                        raise KeyboardInterrupt
                    if self.mode == "short" and name == "pwrite":
                        fd, data, offset = args
                        data = memoryview(data).cast("B")
                        self.full = True
                        return real(fd, data[: max(0, len(data) // 2)], offset)
                    if self.mode == "short":
                        self.full = True
                    e = self.ERRNO[name]
                    raise OSError(e, f"{os.strerror(e)} (injected)")
            elif self.counting:
                self.calls += 1
                self.seen[name] = self.seen.get(name, 0) + 1
            return real(*args, **kwargs)
        return call


@pytest.fixture
def faults(monkeypatch):
    return Faults(monkeypatch)


def tokens(n, seed):
    return np.random.default_rng(seed).standard_normal((n, H, D), dtype=np.float32)


def exact_v(v):
    return v.astype(np.float16).astype(np.float32)


# ------------------------------------------------------------------ operations and the model

def base_state(c, model):
    """Three sequences, one forked (shared pages), committed."""
    a = c.new_sequence("a")
    model["a"] = [[tokens(22, 1 + layer), tokens(22, 11 + layer)] for layer in range(c.num_layers)]
    for layer, (k, v) in enumerate(model["a"]):
        c.append(a, layer, k, v)
    b = c.fork(a, "b")
    model["b"] = [list(kv) for kv in model["a"]]
    c.truncate(b, 9)
    model["b"] = [[x[:9] for x in kv] for kv in model["b"]]
    e = c.new_sequence("e")
    model["e"] = [[tokens(3, 30 + layer), tokens(3, 40 + layer)] for layer in range(c.num_layers)]
    for layer, (k, v) in enumerate(model["e"]):
        c.append(e, layer, k, v)
    c.flush()


def append_every_layer(c, m, name, n, seed):
    """``n`` tokens to every layer of sequence ``name``; the model follows each append that returned."""
    sid = c.find_sequence(name)
    for layer in range(c.num_layers):
        k, v = tokens(n, seed + layer), tokens(n, seed + 100 + layer)
        c.append(sid, layer, k, v)
        m[name][layer] = [np.concatenate([m[name][layer][0], k]), np.concatenate([m[name][layer][1], v])]


def op_append_growth(c, m):
    """A prompt of 300 tokens a layer: crosses the open page, seals ~75 pages, grows the arena."""
    append_every_layer(c, m, "a", 300, 100)


def op_decode(c, m):
    append_every_layer(c, m, "e", 1, 300)


def op_fork(c, m):
    c.fork(c.find_sequence("a"), "f")
    m["f"] = [list(kv) for kv in m["a"]]


def op_truncate(c, m):
    c.truncate(c.find_sequence("a"), 7)
    m["a"] = [[x[:7] for x in kv] for kv in m["a"]]


def op_shift_left(c, m):
    c.shift_left(c.find_sequence("a"), 9)
    m["a"] = [[x[9:] for x in kv] for kv in m["a"]]


def op_free(c, m):
    c.free(c.find_sequence("b"))
    del m["b"]


def op_new(c, m):
    c.new_sequence("n")
    m["n"] = [[np.zeros((0, H, D), np.float32)] * 2 for _ in range(c.num_layers)]
    append_every_layer(c, m, "n", 5, 500)


OPS = {f.__name__[3:]: f for f in (op_append_growth, op_decode, op_fork, op_truncate, op_shift_left,
                                    op_free, op_new)}


def copy_model(m):
    return {name: [list(kv) for kv in layers] for name, layers in m.items()}


def contents(c) -> dict:
    return {name: [tuple(x.tobytes() for x in c.read(sid, layer)) for layer in range(c.num_layers)]
            for sid, name in c.sequences().items()}


def check_model(config, model, held):
    """With exact formats, what the cache holds is the numpy model's data."""
    if config == "exact":
        assert sorted(held) == sorted(model)
        for name, layers in model.items():
            for layer, (k, v) in enumerate(layers):
                assert held[name][layer] == (k.tobytes(), exact_v(v).tobytes()), (name, layer)


def check_file(path, committed, or_else=None):
    """Both modes reopen the file at exactly the state last committed (or ``or_else``)."""
    for mode in ("r", "r+"):
        with km.PagedKVCache.open(path, mode=mode) as c:
            assert c.verify() == []
            got = contents(c)
            assert got == committed or (or_else is not None and got == or_else)


@pytest.fixture(scope="module")
def base_files(tmp_path_factory):
    out = {}
    for config, (kf, vf) in CONFIGS.items():
        path = tmp_path_factory.mktemp("base") / f"{config}.kvm"
        model = {}
        with km.PagedKVCache.create(path, **GEO, k_format=kf, v_format=vf) as c:
            base_state(c, model)
        out[config] = (path, model)
    return out


def run_faulted(tmp_path, base_files, faults, config, op, n, mode):
    """One trial; returns (what raised or None, the hooked call that failed)."""
    src, base_model = base_files[config]
    path = tmp_path / f"{op}-{n}-{mode}.kvm"
    shutil.copyfile(src, path)
    model = copy_model(base_model)
    c = km.PagedKVCache.open(path)
    committed = contents(c)                 # what the file holds now
    raised = None
    faults.arm(n, mode)
    attempted = None
    try:
        OPS[op](c, model)           # the model follows each public call that returned
        attempted = contents(c)
        c.flush()
        committed = attempted
    except (OSError, KeyboardInterrupt) as e:
        raised = e
    fired = faults.fired
    if fired in ("posix_fallocate", "ftruncate", "mmap") and raised is None and committed is attempted:
        fired = "reserve-metadata"      # room for the next commit, reserved after one: may fail silently
    faults.off()
    # a further commit records exactly what the object holds (the model), except after a
    # failed sync, when the cache refuses to commit and the file keeps the last commit
    try:
        c.flush()
        committed = contents(c)
        check_model(config, model, committed)
    except km.CacheFileError as e:
        # after a failed sync, or an interrupt while the root was written (it may be on
        # disk), the cache commits nothing more
        assert "failed to sync" in str(e) and (fired == "fsync" or (fired == "pwrite" and mode == "interrupt")), \
            (fired, e)
        # the sync after the slot's header failed: the header may be on disk or not, as
        # when a crash hits at that point: the file holds one of the two commits
        if attempted is not None:
            c.close()
            check_file(path, committed, attempted)
            os.unlink(path)
            return raised, fired
    c.close()
    check_file(path, committed)
    os.unlink(path)
    return raised, fired


def calls_made(tmp_path, base_files, faults, config, op) -> int:
    src, base_model = base_files[config]
    path = tmp_path / f"count-{op}.kvm"
    shutil.copyfile(src, path)
    with km.PagedKVCache.open(path) as c:
        faults.count()
        OPS[op](c, copy_model(base_model))
        c.flush()
        n = faults.calls
        faults.counting = False
    os.unlink(path)
    return n


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("op", list(OPS))
def test_a_fault_at_every_io_call_changes_nothing_uncommitted(tmp_path, base_files, faults, config, op):
    total = calls_made(tmp_path, base_files, faults, config, op)
    assert total >= 3, f"{op} + flush made only {total} I/O calls"    # at least fsync, pwrite x2
    outcomes = {}
    for mode in ("error", "short", "interrupt"):
        for n in range(1, total + 1):
            raised, fired = run_faulted(tmp_path, base_files, faults, config, op, n, mode)
            # a failed write, sync or reservation is never a silent success (except the
            # metadata blocks reserved ahead after a commit, which the next commit needs not)
            if fired != "reserve-metadata" or mode == "interrupt":
                assert raised is not None, f"{op}: the {fired} call #{n} failed ({mode}) but nothing raised"
            outcomes[(mode, fired)] = outcomes.get((mode, fired), 0) + 1
    print(f"\n{op}/{config}: {sum(outcomes.values())} faults injected and survived: {outcomes}")


def test_sweep_covers_growth_reservation_and_commit(tmp_path, base_files, faults):
    """The append that grows the arena makes every kind of hooked call, so the sweep above
    fails each of them at least once."""
    calls_made(tmp_path, base_files, faults, "exact", "append_growth")
    assert sorted(faults.seen) == ["fsync", "ftruncate", "mmap", "posix_fallocate", "pwrite"]


# ------------------------------------------------------------------ a short write in a commit (case 1)

def test_short_metadata_write_raises_and_keeps_the_previous_commit(tmp_path, base_files, faults):
    """os.pwrite writing part of a commit's root used to pass unnoticed (format 1: its slot):
    flush() reported success and released freed pages. Now it raises, and nothing moves."""
    src, model = base_files["exact"]
    path = tmp_path / "short.kvm"
    shutil.copyfile(src, path)
    with km.PagedKVCache.open(path) as c:
        gen = c._generation
        c.free(c.find_sequence("b"))
        pending = c.stats()["pages_pending"]
        shorted = 0
        for n in range(1, 12):                  # whichever hooked call the root's pwrite is
            gen, pending = c._generation, c.stats()["pages_pending"]
            faults.arm(n, "short")
            try:
                c.flush()
            except OSError as e:
                if faults.fired == "pwrite":
                    assert e.errno == errno.ENOSPC
                    shorted += 1
                assert c._generation == gen and c.stats()["pages_pending"] == pending    # nothing moved
            finally:
                fired = faults.fired
                faults.off()
            if fired == "pwrite":
                break
        assert shorted == 1
    with km.PagedKVCache.open(path, mode="r") as c:
        assert c.verify() == [] and c._generation == gen

# ------------------------------------------------------------------ real limits, in a child process

CHILD_PRELUDE = textwrap.dedent("""
    import errno, os, resource, sys
    import numpy as np
    import kvmmap as km
    H, D = 2, 16
    def tok(n, seed):
        return np.random.default_rng(seed).standard_normal((n, H, D), dtype=np.float32)
""")


def run_child(code: str, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout, cwd="/")


def test_rlimit_fsize_during_arena_growth_leaves_an_openable_file(tmp_path):
    """Case 2: ``ulimit -f`` stops the arena's growth (EFBIG). The allocator used to hand
    out a 65th page in a 64-page file, and the next commit made the file unopenable. Now
    the append that needs the file to grow is refused, changing nothing, and the commit
    after it still succeeds (its room was reserved)."""
    path = tmp_path / "fsize.kvm"
    r = run_child(f"""
        path = {str(path)!r}
        c = km.PagedKVCache.create(path, num_layers=1, num_kv_heads=H, head_dim=D, page_size=4,
                                   k_format="fp32", v_format="fp32")
        s = c.new_sequence("s")
        k = tok(64 * 4, 1)
        c.append(s, 0, k, k)                        # exactly the first 64 pages
        c.flush()
        size = os.path.getsize(path)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
        n, i = 256, 2
        while i < 500:                               # until a page past the file's end is needed
            try:
                c.append(s, 0, tok(9, i), tok(9, i))
            except OSError as e:
                print("refused", errno.errorcode[e.errno])
                break
            n, i = n + 9, i + 1
        assert c.seq_len(s) == n, (c.seq_len(s), n)  # the refused append changed nothing
        c.flush()                                    # room for the commit was kept
        c.close()
        print("ok", i)
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "refused EFBIG" in r.stdout and "ok" in r.stdout, r.stdout
    last = int(r.stdout.split()[-1])
    k = np.random.default_rng(1).standard_normal((256, H, D), dtype=np.float32)
    rest = [np.random.default_rng(i).standard_normal((9, H, D), dtype=np.float32) for i in range(2, last)]
    for mode in ("r", "r+"):
        with km.PagedKVCache.open(path, mode=mode) as c:
            assert c.verify() == []
            got = c.read(c.find_sequence("s"), 0)[0]
            np.testing.assert_array_equal(got, np.concatenate([k] + rest))


def test_rlimit_fsize_short_commit_write_is_an_error(tmp_path):
    """Case 1 with a real limit: a commit's metadata needs the file to grow past
    RLIMIT_FSIZE. flush() raises EFBIG and the file keeps its previous commit."""
    path = tmp_path / "short.kvm"
    r = run_child(f"""
        path = {str(path)!r}
        c = km.PagedKVCache.create(path, num_layers=1, num_kv_heads=H, head_dim=D, page_size=4,
                                   k_format="fp32", v_format="fp32")
        s = c.new_sequence("s")
        c.append(s, 0, tok(5, 1), tok(5, 1))
        c.flush()
        for i in range(300):                         # many sequences: 300 records to write
            t = c.new_sequence(f"t{{i}}")
            c.append(t, 0, tok(3, 10 + i), tok(3, 10 + i))
        # the records need the file to grow past what the appends reserved
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path), resource.RLIM_INFINITY))
        outcomes = []
        for _ in range(2):
            try:
                c.flush()
                outcomes.append("committed")
            except OSError as e:
                outcomes.append(errno.errorcode[e.errno])
        c.close()
        print(" ".join(outcomes))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    words = r.stdout.split()
    # the commit fails, loudly
    assert "EFBIG" in words or "ENOSPC" in words, r.stdout
    with km.PagedKVCache.open(path, mode="r") as c:
        names = sorted(c.sequences().values())
        assert c.verify() == []
    # the newest commit is the last one that succeeded: all or only "s"
    assert names in (["s"], sorted(["s"] + [f"t{i}" for i in range(300)]))
    if words == ["EFBIG", "EFBIG"] or words == ["ENOSPC", "ENOSPC"]:
        assert names == ["s"]


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs (root only); skipped where it cannot be mounted."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip() or r.returncode}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_file_system_is_an_error_not_sigbus(small_fs):
    """Case 3: pages are written through the map; on a full file system a store into a hole
    was a SIGBUS that killed the process. Now append raises ENOSPC and changes nothing; the
    process commits what it holds and the file reopens with it."""
    path = small_fs / "full.kvm"
    r = run_child(f"""
        path = {str(path)!r}
        c = km.PagedKVCache.create(path, num_layers=1, num_kv_heads=H, head_dim=D, page_size=16,
                                   k_format="fp32", v_format="fp32")
        s = c.new_sequence("s")
        n, i = 0, 0
        while True:
            k = tok(16, i)
            try:
                c.append(s, 0, k, k)
            except OSError as e:
                print("refused", errno.errorcode[e.errno], "after", n)
                break
            n += 16
            i += 1
        assert c.seq_len(s) == n
        c.flush()
        print("committed", n, i)
    """)
    assert r.returncode == 0, f"exit {r.returncode} (-7 is SIGBUS): {r.stderr[-3000:]}"
    words = r.stdout.split()
    assert words[:2] == ["refused", "ENOSPC"], r.stdout
    n, count = int(words[-2]), int(words[-1])
    assert n > 0
    want = np.concatenate([np.random.default_rng(i).standard_normal((16, H, D), dtype=np.float32)
                           for i in range(count)])
    for mode in ("r", "r+"):
        with km.PagedKVCache.open(path, mode=mode) as c:
            assert c.verify() == []
            np.testing.assert_array_equal(c.read(c.find_sequence("s"), 0)[0], want)


def test_full_file_system_at_commit_then_space_freed(small_fs):
    """A commit that needs more metadata pages than were kept in reserve meets a full file
    system: flush() raises ENOSPC, nothing moves, reads still work; once space is freed the
    same writer commits everything it holds, and the file reopens with it."""
    path, filler = small_fs / "c.kvm", small_fs / "filler"
    r = run_child(f"""
        path, filler = {str(path)!r}, {str(filler)!r}
        c = km.PagedKVCache.create(path, num_layers=1, num_kv_heads=H, head_dim=D, page_size=16,
                                   k_format="fp32", v_format="fp32")
        s = c.new_sequence("s")
        c.append(s, 0, tok(40, 0), tok(40, 0))
        c.flush()
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)   # fill the file system to the last block
        try:
            while os.write(fd, b"x" * 4096):
                pass
        except OSError as e:
            assert e.errno == errno.ENOSPC
        os.close(fd)
        for i in range(200):                         # sequences without tokens: only records to write
            c.new_sequence(f"t{{i}}")
        try:
            c.flush()
            print("committed-while-full")
        except OSError as e:
            print("refused", errno.errorcode[e.errno])
        np.testing.assert_array_equal(c.read(s, 0)[0], tok(40, 0))     # reads still work
        try:
            c.append(s, 0, tok(16, 1), tok(16, 1))
            print("appended-while-full")
        except OSError as e:
            print("append-refused", errno.errorcode[e.errno])
        os.unlink(filler)                            # space comes back
        c.append(s, 0, tok(16, 2), tok(16, 2))
        c.flush()
        c.close()
        print("ok")
    """)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-3000:]}"
    words = r.stdout.split()
    assert words[:2] == ["refused", "ENOSPC"] and words[-1] == "ok", r.stdout
    appended = "appended-while-full" in words
    want = [tok_np(0, 40)] + ([tok_np(1, 16)] if appended else []) + [tok_np(2, 16)]
    for mode in ("r", "r+"):
        with km.PagedKVCache.open(path, mode=mode) as c:
            assert c.verify() == [] and len(c.sequences()) == 201
            np.testing.assert_array_equal(c.read(c.find_sequence("s"), 0)[0], np.concatenate(want))


def tok_np(seed, n):
    return np.random.default_rng(seed).standard_normal((n, H, D), dtype=np.float32)
