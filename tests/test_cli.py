"""The ``kvmmap`` console script and tools/*.py, run as subprocesses.

Every failure must be one line on stderr and a non-zero exit status, never a traceback.
Files are checked against the API and against plain numpy.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

import kvmmap as km
from helpers import fails, flip, run

TOOLS = Path(__file__).resolve().parent.parent / "tools"
L, H, D, P = 2, 2, 16, 8


@pytest.fixture
def cache_file(tmp_path):
    """A cache with a named prompt (30 tokens), a fork of it (+10) and an empty sequence."""
    path = tmp_path / "c.kvm"
    rng = np.random.default_rng(0)
    c = km.PagedKVCache.create(path, num_layers=L, num_kv_heads=H, head_dim=D, page_size=P,
                               k_format="int8", v_format="fp16", fingerprint="tiny")
    s = c.new_sequence("prompt")
    for layer in range(L):
        c.append(s, layer, *rng.standard_normal((2, 30, H, D)).astype(np.float32))
    f = c.fork(s, "fork")
    for layer in range(L):
        c.append(f, layer, *rng.standard_normal((2, 10, H, D)).astype(np.float32))
    c.new_sequence()
    c.flush()
    c.close()
    return path


def page_offset(path, seq, layer, index):
    with km.PagedKVCache.open(path, "r") as c:
        page = int(c.block_table(seq, layer)[index])
        return page, c._sb.arena_offset + page * c._sb.page_bytes


def test_version_help_and_usage_errors(tmp_path):
    r = run(tmp_path, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"kvmmap {km.__version__}"
    r = run(tmp_path)
    assert r.returncode == 0 and all(c in r.stdout for c in ("inspect", "verify", "compress", "convert", "demo"))
    fails(run(tmp_path, "frobnicate"), 2, "invalid choice")
    fails(run(tmp_path, "compress", "a.kvm", "b.kvm", "--k-format", "int3"), 2, "int3")
    fails(run(tmp_path, "compress", "a.kvm", "b.kvm", "--method", "vq", "--rank", "3"), 2, "--rank applies to")


def test_python_m_kvmmap_is_the_console_script(cache_file, tmp_path, capsys):
    """``python -m kvmmap`` (what every test here runs) gives what ``kvmmap.cli:main``,
    the console script's entry point, gives in-process: same output, same exit status."""
    from kvmmap.cli import main

    for args in (["inspect", str(cache_file), "--json"], ["verify", str(cache_file), "--json", "--no-progress"]):
        r = run(tmp_path, *args)
        assert main(args) == r.returncode == 0
        assert json.loads(capsys.readouterr().out) == json.loads(r.stdout)


def test_demo_runs(tmp_path):
    r = run(tmp_path, "demo", "--workdir", tmp_path / "demo")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "read back by the new process match" in r.stdout and "relative error vs numpy" in r.stdout


def test_inspect_text_and_json(cache_file, tmp_path):
    r = run(tmp_path, "inspect", cache_file.name)
    assert r.returncode == 0
    for text in ("2 layers x 2 kv heads x head_dim 16", "K int8, V fp16", "'prompt'", "'fork'", "fingerprint  tiny"):
        assert text in r.stdout
    info = json.loads(run(tmp_path, "inspect", cache_file.name, "--json").stdout)
    st = os.stat(cache_file)
    assert info["bytes_on_disk"] == st.st_blocks * 512 and info["apparent_bytes"] == st.st_size
    assert (info["num_layers"], info["num_kv_heads"], info["head_dim"], info["page_size"]) == (L, H, D, P)
    seqs = {s["name"]: s for s in info["sequences"]}
    assert seqs["prompt"]["tokens"] == 30 and seqs["fork"]["tokens"] == 40 and seqs[None]["tokens"] == 0
    # every token is in a page: 30 tokens in 4 pages of 8, 40 in 5
    assert seqs["prompt"]["pages"] == 4 * L and seqs["fork"]["pages"] == 5 * L
    assert seqs["fork"]["shared_pages"] == 3 * L == info["pages"]["shared"]
    assert info["pages"]["used"] == 4 * L + 5 * L - 3 * L        # shared (full) pages counted once
    k, v = info["formats"]
    assert (k["format"], v["format"]) == ("int8", "fp16")
    assert k["bytes_per_token"] == H * D + 2 * H                  # int8 codes + a float16 scale per head
    assert v["ratio_vs_fp32"] == pytest.approx(2.0)


def test_verify_clean_and_damaged_page(cache_file, tmp_path):
    r = run(tmp_path, "verify", cache_file.name)
    assert r.returncode == 0 and "ok: 12 page checksums match" in r.stdout
    page, off = page_offset(cache_file, 1, 1, 4)                 # a page of the fork only
    flip(cache_file, off + 100)
    r = run(tmp_path, "verify", cache_file.name)
    assert r.returncode == 1
    assert f"page {page} DAMAGED" in r.stdout and "sequence 1 'fork' layer 1 tokens 32..39" in r.stdout
    res = json.loads(run(tmp_path, "verify", "--json", cache_file.name).stdout)
    assert not res["ok"] and [d["page"] for d in res["damaged_pages"]] == [page]
    shared, off = page_offset(cache_file, 0, 0, 1)                # shared by prompt and fork: both named
    flip(cache_file, off)
    r = run(tmp_path, "verify", cache_file.name)
    assert r.returncode == 1 and "sequence 0 'prompt' layer 0 tokens 8..15; sequence 1 'fork' layer 0" in r.stdout
    fails(run(tmp_path, "compress", cache_file.name, "out.kvm"), 1, "damaged page")


def test_damaged_header_and_metadata_give_clean_errors(cache_file, tmp_path):
    raw = cache_file.read_bytes()[:3 * 4096]                       # superblock and both roots
    header = tmp_path / "header.kvm"
    header.write_bytes(raw)
    flip(header, 24)                                              # head_dim
    r = run(tmp_path, "verify", header.name)
    assert r.returncode == 1 and "DAMAGED" in r.stdout and "superblock checksum mismatch" in r.stdout
    fails(run(tmp_path, "inspect", header.name), 1, "damaged header")
    magic = tmp_path / "magic.kvm"
    magic.write_bytes(b"\0" + raw[1:])
    fails(run(tmp_path, "inspect", magic.name), 1, "not a kvmmap cache")
    flip(cache_file, 4096 + 20)                                   # root 0: the older commit (generation 1)
    r = run(tmp_path, "verify", cache_file.name)
    assert r.returncode == 0 and "commit roots: root 0 damaged, root 1 generation 2" in r.stdout
    flip(cache_file, 8192 + 20)                                   # and root 1, the newest
    r = run(tmp_path, "verify", cache_file.name)
    assert r.returncode == 1 and "neither commit root is valid" in r.stdout


def test_bad_paths(tmp_path, cache_file):
    fails(run(tmp_path, "inspect", "missing.kvm"), 1, "missing.kvm: No such file or directory")
    fails(run(tmp_path, "verify", "missing.kvm"), 1, "No such file or directory")
    fails(run(tmp_path, "verify", "."), 1, "Is a directory")
    fails(run(tmp_path, "compress", "missing.kvm", "out.kvm"), 1, "No such file")
    fails(run(tmp_path, "compress", cache_file.name, "no/such/dir/out.kvm"), 1, "No such file or directory")
    fails(run(tmp_path, "compress", cache_file.name, cache_file.name, "--overwrite"), 1, "is the input file")
    fails(run(tmp_path, "compress", cache_file.name, "x.kvm", "--method", "lowrank", "--rank", "17"), 1,
          "rank=17 exceeds")
    fails(run(tmp_path, "convert", "missing.npz", "out.kvm"), 1, "missing.npz: no such file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.kvm"]   # nothing half-written was left


def test_compress_end_to_end(cache_file, tmp_path):
    r = run(tmp_path, "compress", cache_file.name, "small.kvm", "--k-format", "int4", "--v-format", "int8")
    assert r.returncode == 0 and "-> small.kvm (K int4, V int8)" in r.stdout and "error      K" in r.stdout
    assert run(tmp_path, "verify", "small.kvm").returncode == 0
    fails(run(tmp_path, "compress", cache_file.name, "small.kvm"), 1, "exists")
    r = run(tmp_path, "compress", cache_file.name, "small.kvm", "--overwrite", "--json", "--v-format", "fp32",
            "--method", "hybrid", "--rank", "4", "--quant-bits", "4")
    rep = json.loads(r.stdout)
    assert rep["method"] == "hybrid" and rep["method_ratio"] > 1 and rep["shared_pages"] == 3 * L
    # the reported error is what the two files hold, computed here with numpy
    with km.PagedKVCache.open(cache_file, "r") as a, km.PagedKVCache.open(tmp_path / "small.kvm", "r") as b:
        assert a.sequences() == b.sequences()
        num = den = 0.0
        for s in a.sequences():
            for layer in range(L):
                x, y = a.read(s, layer)[1], b.read(s, layer)[1]
                num += float(((x.astype(np.float64) - y) ** 2).sum())
                den += float((x.astype(np.float64) ** 2).sum())
    assert rep["v_rel_error"] == pytest.approx(math.sqrt(num / den), rel=1e-6)
    assert rep["bytes_on_disk_after"] == os.stat(tmp_path / "small.kvm").st_blocks * 512


def test_convert_npz_layouts(tmp_path):
    rng = np.random.default_rng(1)
    stacked = rng.standard_normal((L, 2, H, 21, D)).astype(np.float32)
    np.savez(tmp_path / "stacked.npz", kv=stacked)
    r = run(tmp_path, "convert", "stacked.npz", "s.kvm", "--k-format", "fp32", "--v-format", "fp32",
            "--page-size", "4", "--name", "doc")
    assert r.returncode == 0 and "1 sequence(s) of 21 tokens ('doc')" in r.stdout
    with km.PagedKVCache.open(tmp_path / "s.kvm", "r") as c:
        s = c.find_sequence("doc")
        for layer in range(L):
            k, v = c.read(s, layer)
            np.testing.assert_array_equal(k, stacked[layer, 0].transpose(1, 0, 2))
            np.testing.assert_array_equal(v, stacked[layer, 1].transpose(1, 0, 2))
    per_layer = {f"layers.{i}.{side}": rng.standard_normal((2, H, 9, D)).astype(np.float16)
                 for i in range(L) for side in ("key", "value")}
    np.savez(tmp_path / "batch.npz", **per_layer, input_ids=np.arange(9))
    r = run(tmp_path, "convert", "batch.npz", "s.kvm", "--append")
    assert r.returncode == 0
    with km.PagedKVCache.open(tmp_path / "s.kvm", "r") as c:
        assert sorted(c.sequences().values()) == ["batch/0", "batch/1", "doc"]
        k, v = c.read(c.find_sequence("batch/1"), 1)
        np.testing.assert_array_equal(v, per_layer["layers.1.value"][1].astype(np.float32).transpose(1, 0, 2))
    del per_layer["layers.1.value"]
    np.savez(tmp_path / "missing.npz", **per_layer)
    fails(run(tmp_path, "convert", "missing.npz", "m.kvm"), 1, "missing layers.1.value")
    np.savez(tmp_path / "shape.npz", kv=np.zeros((L, 3, H, 4, D), np.float32))
    fails(run(tmp_path, "convert", "shape.npz", "m.kvm"), 1, "[layers, 2, heads, seq, head_dim]")
    np.savez(tmp_path / "ints.npz", kv=np.zeros((L, 2, H, 4, D), np.int32))
    fails(run(tmp_path, "convert", "ints.npz", "m.kvm"), 1, "int32")
    bad = np.ones((L, 2, H, 4, D), np.float32)
    bad[1, 0, 0, 2, 3] = np.nan
    np.savez(tmp_path / "nan.npz", kv=bad)
    fails(run(tmp_path, "convert", "nan.npz", "m.kvm"), 1, "NaN")
    (tmp_path / "junk.npz").write_bytes(b"junk" * 50)
    fails(run(tmp_path, "convert", "junk.npz", "m.kvm"), 1, "not an .npz file")
    (tmp_path / "x.pt").write_bytes(b"junk")
    fails(run(tmp_path, "convert", "x.pt", "m.kvm"), 1, "expected .npz or .safetensors")
    fails(run(tmp_path, "convert", "stacked.npz", "s.kvm"), 1, "exists")
    np.savez(tmp_path / "other.npz", kv=np.zeros((L, 2, H, 4, 8), np.float32))
    fails(run(tmp_path, "convert", "other.npz", "s.kvm", "--append"), 1, "holds 2 layers x 2 heads x head_dim 16")
    assert not [p for p in os.listdir(tmp_path) if "partial" in p or p == "m.kvm"]


def test_convert_safetensors(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(2)
    arrays = {f"layers.{i}.{side}": rng.standard_normal((H, 12, D)).astype(np.float32)
              for i in range(L) for side in ("key", "value")}
    st.save_file(arrays, str(tmp_path / "kv.safetensors"))
    r = run(tmp_path, "convert", "kv.safetensors", "t.kvm", "--k-format", "fp32", "--v-format", "fp32")
    assert r.returncode == 0
    with km.PagedKVCache.open(tmp_path / "t.kvm", "r") as c:
        k, _ = c.read(c.find_sequence("kv"), 1)
        np.testing.assert_array_equal(k, arrays["layers.1.key"].transpose(1, 0, 2))
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    fails(run(tmp_path, "convert", "bad.safetensors", "u.kvm"), 1, "not a readable .safetensors file")


def test_tools_scripts_are_the_same_commands(cache_file, tmp_path):
    r = run(tmp_path, cache_file.name, "--json", script=TOOLS / "inspect.py")   # tools/inspect.py: no stdlib clash
    assert r.returncode == 0 and json.loads(r.stdout)["num_layers"] == L
    assert run(tmp_path, cache_file.name, script=TOOLS / "verify.py").returncode == 0
    r = run(tmp_path, cache_file.name, "c2.kvm", "--v-format", "int4", script=TOOLS / "compress.py")
    assert r.returncode == 0 and (tmp_path / "c2.kvm").exists()
    fails(run(tmp_path, "nothing.npz", "x.kvm", script=TOOLS / "convert.py"), 1, "no such file")


def test_overwrite_refuses_an_output_held_by_a_writer(cache_file, tmp_path):
    """compress/convert --overwrite do not rename over a file that a writer has open."""
    out = tmp_path / "out.kvm"
    assert run(tmp_path, "compress", cache_file.name, out.name).returncode == 0
    before = out.read_bytes()
    np.savez(tmp_path / "kv.npz", kv=np.ones((L, 2, H, 5, D), np.float32))
    with km.PagedKVCache.open(out, "r+"):
        fails(run(tmp_path, "compress", cache_file.name, out.name, "--overwrite"), 1,
              "out.kvm is open for writing in another process (its writer lock is held)")
        fails(run(tmp_path, "convert", "kv.npz", out.name, "--overwrite"), 1, "writer lock")
    assert out.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]
    assert run(tmp_path, "convert", "kv.npz", out.name, "--overwrite").returncode == 0


def test_convert_removes_stale_partials_but_not_a_live_one(tmp_path):
    """A killed convert leaves its partial file; the next convert to the same output deletes
    it (no writer holds its lock), as compress does, and leaves a live run's alone."""
    np.savez(tmp_path / "kv.npz", kv=np.ones((L, 2, H, 5, D), np.float32))
    stale = tmp_path / ".out.kvm.partial-99999999"
    stale.write_bytes(b"x" * 100)
    live = km.PagedKVCache.create(tmp_path / ".out.kvm.partial-1", num_layers=L, num_kv_heads=H, head_dim=D)
    assert run(tmp_path, "convert", "kv.npz", "out.kvm").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == [".out.kvm.partial-1"]
    live.close()
    with km.PagedKVCache.open(tmp_path / "out.kvm", "r") as c:
        assert c.seq_len(c.find_sequence("kv")) == 5
