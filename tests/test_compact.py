"""compact(): the space of dropped pages goes back to the file system (or RAM), nothing committed is lost.

A cache of many sequences loses 90% of its tokens (free); after ``compact()`` the file's
blocks must be at most 20% of before, every kept token must read back as numpy says, both
commits on disk must open and verify, the file must take new appends afterwards (into the
punched pages, which are reserved again), and a reader opened at an older commit must be
refused rather than handed zeros.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import kvmmap as km

GEO = dict(num_layers=2, num_kv_heads=2, head_dim=64, page_size=16, k_format="fp32", v_format="fp16")
H, D = 2, 64


def tokens(n, seed):
    return np.random.default_rng(seed).standard_normal((n, H, D), dtype=np.float32)


def fill(c, nseq=20, n=200):
    model = {}
    for i in range(nseq):
        s = c.new_sequence(f"s{i}")
        model[s] = [(tokens(n, 100 * i + layer), tokens(n, 100 * i + 50 + layer)) for layer in range(2)]
        for layer, (k, v) in enumerate(model[s]):
            c.append(s, layer, k, v)
    c.flush()
    return model


def check(c, model):
    assert sorted(c.sequences()) == sorted(model)
    for s, layers in model.items():
        for layer, (k, v) in enumerate(layers):
            got_k, got_v = c.read(s, layer)
            np.testing.assert_array_equal(got_k, k)
            np.testing.assert_array_equal(got_v, v.astype(np.float16).astype(np.float32))


def blocks(path) -> int:
    return os.stat(path).st_blocks * 512


def test_compact_after_freeing_90_percent(tmp_path):
    path = tmp_path / "c.kvm"
    c = km.PagedKVCache.create(path, **GEO)
    model = fill(c)
    before = blocks(path)
    for s in list(model)[:18]:          # 18 of 20 sequences: 90% of the tokens, the last two kept
        c.free(s)
        del model[s]
    res = c.compact()
    after = blocks(path)
    assert res["bytes_on_disk_before"] == before and res["bytes_on_disk_after"] == after
    print(f"\ncompact: {before} -> {after} bytes on disk ({after / before:.1%}), "
          f"apparent {os.path.getsize(path)}")
    assert after <= 0.2 * before
    # the kept pages moved down and the file was cut: its apparent size follows its blocks
    assert os.path.getsize(path) <= 2 * after
    check(c, model)
    # the punched pages are handed out again: reserved, written, read back
    s = c.new_sequence("new")
    model[s] = [(tokens(300, 7 + layer), tokens(300, 9 + layer)) for layer in range(2)]
    for layer, (k, v) in enumerate(model[s]):
        c.append(s, layer, k, v)
    c.flush()
    check(c, model)
    c.close()
    for commit in ("newest", "previous"):
        for mode in ("r", "r+"):
            with km.PagedKVCache.open(path, mode=mode, commit=commit) as r:
                assert r.verify() == []
    with km.PagedKVCache.open(path, mode="r") as r:
        check(r, model)


def test_old_reader_is_refused_not_handed_zeros(tmp_path):
    path = tmp_path / "c.kvm"
    c = km.PagedKVCache.create(path, **GEO)
    model = fill(c, nseq=3, n=64)
    reader = km.PagedKVCache.open(path, mode="r")
    victim = list(model)[0]
    c.free(victim)
    if c.compact()["bytes_given_back"] == 0:
        pytest.skip("this file system cannot punch holes")
    with pytest.raises(km.CacheFileError, match="reopen"):
        reader.read(victim, 0)
    reader.close()
    c.close()


def test_ram_cache_shrinks():
    c = km.PagedKVCache.create(None, **GEO)
    model = fill(c, nseq=10, n=160)
    cap = c.stats()["pages_capacity"]
    for s in list(model)[1:]:
        c.free(s)
        del model[s]
    res = c.compact()
    assert res["bytes_on_disk_after"] < res["bytes_on_disk_before"]
    assert c.stats()["pages_capacity"] < cap
    check(c, model)
    s = c.new_sequence()
    model[s] = [(tokens(40, 1), tokens(40, 2)), (tokens(40, 3), tokens(40, 4))]
    for layer, (k, v) in enumerate(model[s]):
        c.append(s, layer, k, v)
    check(c, model)


def test_compact_is_refused_on_a_read_only_view(tmp_path):
    path = tmp_path / "c.kvm"
    fill(km.PagedKVCache.create(path, **GEO), nseq=1, n=20)
    with km.PagedKVCache.open(path, mode="r") as r:
        with pytest.raises(km.ReadOnlyError):
            r.compact()


def test_cli_compact(tmp_path):
    path = tmp_path / "c.kvm"
    c = km.PagedKVCache.create(path, **GEO)
    model = fill(c, nseq=4, n=100)
    for s in list(model)[1:]:
        c.free(s)
    c.flush()
    c.close()
    r = subprocess.run([sys.executable, "-m", "kvmmap", "compact", "--json", str(path)], capture_output=True,
                       text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    assert '"bytes_on_disk_after"' in r.stdout
    with km.PagedKVCache.open(path, mode="r") as c:
        assert c.verify() == [] and len(c.sequences()) == 1


KILLED_COMPACT = """
import os, signal, sys
import numpy as np
import kvmmap as km
from kvmmap.core import fileio

path, kill_at = sys.argv[1], int(sys.argv[2])
c = km.PagedKVCache.create(path, num_layers=2, num_kv_heads=2, head_dim=64, page_size=16, k_format="fp32",
                           v_format="fp16")
for i in range(8):
    s = c.new_sequence(f"s{i}")
    for layer in range(2):
        x = np.random.default_rng(10 * i + layer).standard_normal((100, 2, 64), dtype=np.float32)
        c.append(s, layer, x, x)
c.flush()
for i in range(1, 8, 2):
    c.free(c.find_sequence(f"s{i}"))
real, calls = {"punch": fileio.punch_hole, "fsync": os.fsync, "ftruncate": os.ftruncate}, [0]

def counted(name):
    def call(*a):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real[name](*a)
    return call

punch = counted("punch")
fileio.punch_hole = punch
km.core.arena.punch_hole = punch
os.fsync = counted("fsync")             # each commit inside compact syncs twice
os.ftruncate = counted("ftruncate")     # the cut
c.compact()
print("done", calls[0])
"""


@pytest.mark.parametrize("kill_at", [1, 2, 4, 7, 10, 13, 14, 15])
def test_kill_during_compact_loses_nothing(tmp_path, kill_at):
    """SIGKILL at the n-th sync, cut or hole punched inside compact (its commits, the
    relocation's, the cut, the holes): the file holds the committed state (the odd
    sequences freed, the even ones intact), in both modes and both commits."""
    path = tmp_path / "k.kvm"
    r = subprocess.run([sys.executable, "-c", KILLED_COMPACT, str(path), str(kill_at)], capture_output=True,
                       text=True, timeout=120, cwd="/")
    assert r.returncode == -9, (r.returncode, r.stdout, r.stderr)      # it was killed inside compact
    for commit in ("newest", "previous"):
        with km.PagedKVCache.open(path, mode="r+", commit=commit) as c:
            assert c.verify() == []
            names = sorted(c.sequences().values())
            if commit == "newest":      # the frees are committed by compact's first commit
                assert names in ([f"s{i}" for i in range(0, 8, 2)], [f"s{i}" for i in range(8)])
                if kill_at > 2:
                    assert names == [f"s{i}" for i in range(0, 8, 2)]
            for name in names:
                s = c.find_sequence(name)
                i = int(name[1:])
                for layer in range(2):
                    x = np.random.default_rng(10 * i + layer).standard_normal((100, 2, 64), dtype=np.float32)
                    np.testing.assert_array_equal(c.read(s, layer)[0], x)


READER = """
import sys
import kvmmap as km
r = km.PagedKVCache.open(sys.argv[1], mode="r")
print("open", flush=True)
sys.stdin.readline()                      # the writer compacts meanwhile
try:
    for s in r.sequences():
        r.read(s, 0)
    print("read")
except km.CacheFileError as e:
    print("stale", "changed since" in str(e))
"""


def test_compact_does_not_cut_a_file_mapped_by_a_reader(tmp_path):
    """A read-only view in another process maps the file: cutting it under the view would
    kill that process with SIGBUS. compact() leaves the length alone (punching holes
    instead), and the reader gets data or the stale-view error."""
    path = tmp_path / "r.kvm"
    c = km.PagedKVCache.create(path, **GEO)
    model = fill(c, nseq=6, n=64)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd="/")
    assert reader.stdout.readline().strip() == "open"
    size = os.path.getsize(path)
    for s in list(model)[:5]:
        c.free(s)
    res = c.compact()
    assert os.path.getsize(path) == size and res["bytes_on_disk_after"] < res["bytes_on_disk_before"]
    out, _ = reader.communicate("go\n", timeout=60)
    assert reader.returncode == 0 and out.split()[0] in ("read", "stale"), (reader.returncode, out)
    c.compact()                                # the reader is gone: now the file is cut
    assert os.path.getsize(path) < size
    c.close()
    with km.PagedKVCache.open(path, mode="r") as r:
        assert r.verify() == []
        check(r, {s: model[s] for s in list(model)[5:]})
