"""Faults of the tools: a writer beside them, paths that are not files, files whose
apparent size lies, crafted inputs, page tables that list a page twice.

Every failure is one line on stderr and a non-zero exit status, never a traceback; no
tool reports damage that is not there, nor misses damage that is.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from io import BytesIO

import crc32c
import numpy as np
import pytest

import kvmmap as km
from kvmmap.tools.common import check_pages, open_read_only
from kvmmap.tools.verify import verify_cache

from helpers import WORKERS, fails, flip, run

L, H, D, P = 2, 2, 16, 8
MEMORY_LIMIT = 2 << 30           # RLIMIT_AS of the tools in the memory tests


def run_limited(cwd, *args, limit=MEMORY_LIMIT):
    """``kvmmap ARGS`` in a process whose address space is capped at ``limit`` bytes."""
    code = ("import resource, sys\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))\n"
            "from kvmmap.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                       timeout=120, env=env)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def make_cache(path, sequences=3, tokens=40):
    rng = np.random.default_rng(0)
    c = km.PagedKVCache.create(path, num_layers=L, num_kv_heads=H, head_dim=D, page_size=P, k_format="int8",
                               v_format="int8")
    for i in range(sequences):
        s = c.new_sequence(f"s{i}")
        for layer in range(L):
            c.append(s, layer, *rng.standard_normal((2, tokens, H, D)).astype(np.float32))
    c.flush()
    c.close()
    return path


# ------------------------------------------------------------------ 1. beside a writer

def start_writer(path, seconds):
    """tests/workers/committing_writer.py on ``path`` for ``seconds``, once it is ready."""
    w = subprocess.Popen([sys.executable, str(WORKERS / "committing_writer.py"), str(path), str(seconds)],
                         stdout=subprocess.PIPE, text=True, cwd=path.parent)
    assert w.stdout.readline().strip() == "ready"
    return w


def test_verify_beside_a_writer_reports_no_false_damage(tmp_path):
    path = make_cache(tmp_path / "c.kvm", sequences=6, tokens=64)
    w = start_writer(path, 6.0)
    outcomes, rechecked = {"ok": 0, "changed": 0, "damaged": 0}, 0
    try:
        while w.poll() is None:
            res = verify_cache(path, progress=False)
            outcomes[res["outcome"]] += 1
            rechecked += res["rechecked"]
            assert res["outcome"] != "damaged", res["problems"]
            assert not res["damaged_pages"]
        commits = int(w.stdout.read().split()[-1])
    finally:
        w.kill()
        w.wait()
    print(f"verify beside a writer ({commits} commits): {outcomes}, {rechecked} pages rechecked")
    assert w.returncode == 0 and commits > 10 and sum(outcomes.values()) > 10
    # the CLI beside a writer: 0 or 3, never 1
    w = start_writer(path, 3.0)
    try:
        codes = []
        while w.poll() is None:
            r = run(tmp_path, "verify", "--json", path.name)
            codes.append(r.returncode)
            res = json.loads(r.stdout)
            assert r.returncode == {"ok": 0, "changed": 3}[res["outcome"]], r.stdout
    finally:
        w.kill()
        w.wait()
    assert codes and set(codes) <= {0, 3}
    # with no writer, true damage is still damage
    with km.PagedKVCache.open(path, "r") as c:
        seq = min(c.sequences())
        page = int(c.block_table(seq, 1)[0])
        off = c._sb.arena_offset + page * c._sb.page_bytes
    flip(path, off + 5)
    r = run(tmp_path, "verify", path.name)
    assert r.returncode == 1 and f"page {page} DAMAGED" in r.stdout, r.stdout
    fails(run(tmp_path, "compress", path.name, "out.kvm"), 1, "damaged page")


def test_changed_outcome_is_reported_not_damage(tmp_path):
    """A page that fails its checksum after a newer commit exists is "changed", exit 3."""
    path = make_cache(tmp_path / "c.kvm")
    res = verify_cache(path)
    assert res["outcome"] == "ok"
    with open_read_only(path) as view:
        page = int(view.block_table(0, 0)[0])
        with km.PagedKVCache.open(path, "r+") as c:      # a writer commits, then the page changes
            c.flush()
        flip(path, view._sb.arena_offset + page * view._sb.page_bytes + 3)
        damaged, changed = check_pages(view, [page])
        assert (damaged, changed) == ([], [page])
    # a fresh verify sees one commit and the flipped page: damage
    res = verify_cache(path)
    assert res["outcome"] == "damaged" and [d["page"] for d in res["damaged_pages"]] == [page]


def test_compress_beside_a_writer(tmp_path):
    path = make_cache(tmp_path / "c.kvm", sequences=6, tokens=64)
    w = start_writer(path, 4.0)
    codes = []
    try:
        i = 0
        while w.poll() is None:
            r = run(tmp_path, "compress", path.name, f"out{i}.kvm", "--k-format", "int4", "--no-progress")
            codes.append(r.returncode)
            if r.returncode:
                fails(r, 3, "a writer is committing")
            i += 1
    finally:
        w.kill()
        w.wait()
    assert codes and set(codes) <= {0, 3}
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


# ------------------------------------------------------------------ 2. not a regular file


def test_fifo_and_other_non_regular_paths_do_not_block(tmp_path):
    fifo = tmp_path / "pipe.kvm"
    os.mkfifo(fifo)
    for cmd in (["inspect"], ["verify"], ["compress"], ["convert"]):
        args = cmd + [fifo.name] + (["out.kvm"] if cmd[0] in ("compress", "convert") else [])
        fails(run(tmp_path, *args), 1, "a FIFO, not a regular file")
    make_cache(tmp_path / "c.kvm")
    fails(run(tmp_path, "compress", "c.kvm", fifo.name, "--overwrite"), 1, "a FIFO, not a regular file")
    fails(run(tmp_path, "inspect", "/dev/zero"), 1, "a character device, not a regular file")
    fails(run(tmp_path, "verify", "/dev/null"), 1, "a character device, not a regular file")
    fails(run(tmp_path, "inspect", "."), 1, "Is a directory")


def test_unreadable_file_is_one_line(tmp_path):
    path = make_cache(tmp_path / "c.kvm")
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as a user who reads any file (root)")
        fails(run(tmp_path, "inspect", path.name), 1, "Permission denied")
        fails(run(tmp_path, "verify", path.name), 1, "Permission denied")
    finally:
        os.chmod(path, 0o644)


# ------------------------------------------------------------------ 3. memory follows what is on disk


def test_apparent_size_of_a_terabyte_costs_nothing(tmp_path):
    path = make_cache(tmp_path / "c.kvm", sequences=1, tokens=20)
    ref = verify_cache(path)
    os.truncate(path, 1 << 40)                  # sparse: no blocks
    r = run_limited(tmp_path, "inspect", "--json", path.name)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["pages"]["used"] == ref["pages_checked"] and info["apparent_bytes"] == 1 << 40
    r = run_limited(tmp_path, "verify", path.name)
    assert r.returncode == 0 and f"ok: {ref['pages_checked']} page checksums match" in r.stdout, r.stdout
    r = run_limited(tmp_path, "compress", path.name, "out.kvm", "--no-progress")
    assert r.returncode == 0, r.stderr


def test_root_announcing_a_huge_index(tmp_path):
    """A 12 KiB file (superblock and roots, no page) whose newest root (checksum
    recomputed) announces a 200 MiB index at page 0 and a high-water mark of 2^40 pages."""
    path = tmp_path / "c.kvm"
    c = km.PagedKVCache.create(path, num_layers=1, num_kv_heads=1, head_dim=8, page_size=4)
    c.flush()
    c.close()
    os.truncate(path, 12 << 10)                 # the pages of the empty commits: none listed
    root = struct.pack("<8sQQQIIII12s", b"KVMROOT\0", 99, 1 << 40, 200 << 20, 0, 0, 1, 1 << 20, bytes(12))
    root += struct.pack("<I", crc32c.crc32c(root))
    with open(path, "r+b") as fh:
        fh.seek(4096)
        fh.write(root)
    for cmd in ("inspect", "verify"):
        r = run_limited(tmp_path, cmd, path.name, limit=512 << 20)
        assert r.returncode == 1, (cmd, r.stdout, r.stderr)
        if cmd == "verify":
            assert "commit roots: root 0 generation 99, root 1 generation" in r.stdout, r.stdout
            assert "truncated file" in r.stdout, r.stdout
        assert "Traceback" not in r.stdout


def npz_declaring(path, shape, stored=b"\0" * 64, name="kv"):
    h = BytesIO()
    np.lib.format.write_array_header_1_0(h, {"descr": "<f4", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name + ".npy", h.getvalue() + stored)


def test_convert_npz_declaring_terabytes(tmp_path):
    npz_declaring(tmp_path / "bomb.npz", (64, 2, 64, 1 << 20, 128))          # 16 TiB of float32
    assert (tmp_path / "bomb.npz").stat().st_size < 400
    fails(run_limited(tmp_path, "convert", "bomb.npz", "out.kvm"), 1, "declares [64, 2, 64, 1048576, 128]")
    npz_declaring(tmp_path / "layers.npz", (2, 1 << 40, 8), name="layers.0.key")
    fails(run_limited(tmp_path, "convert", "layers.npz", "out.kvm"), 1, "declares")
    good = tmp_path / "good.npz"
    np.savez_compressed(good, kv=np.ones((1, 2, 1, 4, 8), np.float32))
    r = run_limited(tmp_path, "convert", "good.npz", "out.kvm", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


# ------------------------------------------------------------------ 4. one line, never a traceback


def test_memory_error_is_one_line():
    from kvmmap.cli import _one_line

    assert _one_line(MemoryError()) == "out of memory"
    assert _one_line(MemoryError("Unable to allocate 32.0 GiB\nfor an array")) == \
        "out of memory: Unable to allocate 32.0 GiB for an array"


# ------------------------------------------------------------------ 5. a page listed twice


def listed_twice(path, mode):
    """A committed file whose sequence 0, layer 0 lists page ids the writer never would."""
    make_cache(path, sequences=2, tokens=24)
    with km.PagedKVCache.open(path, "r+") as c:
        pages = c._seq(0).layers[0].bt.pages
        if mode == "one table":
            pages[1] = pages[0]
        elif mode == "two layers":
            pages[1] = c._seq(0).layers[1].bt.pages[0]
        else:                                       # another sequence, same layer: what fork does
            pages[1] = c._seq(1).layers[0].bt.pages[2]
        c._table.dirty.add(0)                       # a commit writes the records of changed sequences
        c.flush()


@pytest.mark.parametrize("mode", ["one table", "two layers", "shared by two sequences"])
def test_page_listed_twice_cli(tmp_path, mode):
    path = tmp_path / "c.kvm"
    listed_twice(path, mode)
    r = run(tmp_path, "verify", "--json", path.name)
    res = json.loads(r.stdout)
    if mode == "shared by two sequences":
        assert r.returncode == 0 and res["outcome"] == "ok"
        return
    assert r.returncode == 1 and res["outcome"] == "damaged" and not res["damaged_pages"]
    # open() refuses the commit, naming the block table and the page (the API agrees: below)
    want = "twice" if mode == "one table" else "listed by tables of another layer"
    assert any(want in p for p in res["problems"]), res["problems"]
    r = run(tmp_path, "inspect", "--json", path.name)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("mode", ["one table", "two layers"])
def test_page_listed_twice_api_agrees(tmp_path, mode):
    path = tmp_path / "c.kvm"
    listed_twice(path, mode)
    with pytest.raises(km.CacheFileError, match="listed"):
        with km.PagedKVCache.open(path, "r") as c:
            assert c.verify() != []


def test_note_on_damaged_roots_names_the_committed_one(tmp_path):
    path = make_cache(tmp_path / "c.kvm")
    flip(path, 4096 + 20)                               # root 0: the older commit
    r = run(tmp_path, "verify", path.name)
    assert r.returncode == 0 and "root 1 (generation 2) holds the committed state" in r.stdout, r.stdout
    flip(path, 8192 + 20)                               # and root 1
    r = run(tmp_path, "verify", path.name)
    assert r.returncode == 1 and "neither commit root is valid" in r.stdout
    assert "holds the committed state" not in r.stdout, r.stdout
