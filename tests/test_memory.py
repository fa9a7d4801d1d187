"""Caches larger than the memory a process may use: page data lives in the file mapping.

Two jails bound a worker process (tests/workers/memory_worker.py), which writes a cache
several times the bound, then reopens it and reads every token back, comparing against
numpy (the data are regenerated per chunk from a seed, never kept):

* ``RLIMIT_DATA``: on Linux >= 4.7 it caps private writable mappings (heap, anonymous
  mmap, thread stacks) but not shared file mappings. It is what bounds "Python-side"
  memory here; RLIMIT_AS cannot be used, since it counts the file mapping itself.
* a memory cgroup (v2 ``memory.max``, or v1 ``memory.limit_in_bytes``): caps everything
  charged to the process, page cache included, so the kernel must write back and evict
  cache pages while the worker runs. Skipped, with the reason, where no cgroup can be made.

Each jail is checked to really bite (an allocation past it fails / the cgroup hit its
limit), so a passing test cannot come from a limit that was never reached.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import kvmmap as km

from helpers import WORKERS

H, D, L, P, CHUNK = 4, 64, 2, 16, 1024
TOKEN_LAYER_BYTES = H * D * (4 + 2)          # K fp32 + V fp16 on disk


def run_worker(tmp_path, target, rlimit_headroom=0, prefix=()):
    """tests/workers/memory_worker.py writing ``target`` bytes into tmp_path/big.kvm; its JSON report."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", KVMMAP_NUM_THREADS="1")
    r = subprocess.run([*prefix, sys.executable, str(WORKERS / "memory_worker.py"), str(tmp_path / "big.kvm"),
                        str(target), str(rlimit_headroom)], capture_output=True, text=True, env=env, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, f"worker failed ({r.returncode}): {r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA excludes shared mappings on Linux only")
def test_cache_four_times_the_private_memory_limit(tmp_path):
    """RLIMIT_DATA caps private memory at ~its use after warm-up + 24 MiB; the cache is 4x the cap."""
    out = run_worker(tmp_path, "4x", rlimit_headroom=24 << 20)
    assert out["disk"] >= 4 * out["rlimit_data"], out
    assert out["vmdata"] <= out["rlimit_data"]


# ------------------------------------------------------------------ memory cgroup

def _mounts():
    """{fstype or v1 controller: (mount root, mount point)} for cgroup file systems."""
    found = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            fields, rfields = left.split(), right.split()
            if rfields[0] == "cgroup2":
                found["cgroup2"] = (fields[3], fields[4])
            elif rfields[0] == "cgroup" and "memory" in rfields[2].split(","):
                found["memory"] = (fields[3], fields[4])
    return found


def _own_cgroup(hierarchy):
    """This process's cgroup path in a hierarchy ("" for v2, "memory" for v1)."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, rel = line.rstrip("\n").split(":", 2)
            if (hierarchy == "" and ctrls == "" and line.startswith("0:")) or hierarchy in ctrls.split(","):
                return rel
    return None


def _host_dir(mount, rel):
    root, point = mount
    if root != "/" and rel.startswith(root):
        rel = rel[len(root):]
    return Path(point + rel)


def make_memory_cgroup(limit):
    """(kind, child cgroup dir) with a memory limit set, or (None, why not)."""
    if not sys.platform.startswith("linux"):
        return None, "memory cgroups are Linux only"
    mounts, reasons = _mounts(), []
    if "cgroup2" in mounts and _own_cgroup("") is not None:
        base = _host_dir(mounts["cgroup2"], _own_cgroup(""))
        ctl = base / "cgroup.subtree_control"
        enabled = ctl.read_text().split() if ctl.exists() else []
        if "memory" in enabled:
            child = base / f"kvmmap-test-{os.getpid()}"
            try:
                child.mkdir()
                (child / "memory.max").write_text(str(limit))
                if (child / "memory.swap.max").exists():
                    (child / "memory.swap.max").write_text("0")
                return "v2", child
            except OSError as e:
                reasons.append(f"cgroup v2 {base}: {e.strerror}")
                _remove(child)
        else:
            reasons.append(f"cgroup v2 {base}: the memory controller is not delegated (subtree_control: {enabled})")
    else:
        reasons.append("no cgroup v2 hierarchy for this process")
    if "memory" in mounts and _own_cgroup("memory") is not None:
        base = _host_dir(mounts["memory"], _own_cgroup("memory"))
        child = base / f"kvmmap-test-{os.getpid()}"
        try:
            child.mkdir()
            (child / "memory.limit_in_bytes").write_text(str(limit))
            if (child / "memory.memsw.limit_in_bytes").exists():
                (child / "memory.memsw.limit_in_bytes").write_text(str(limit))
            return "v1", child
        except OSError as e:
            reasons.append(f"cgroup v1 memory {base}: {e.strerror}")
            _remove(child)
    else:
        reasons.append("no cgroup v1 memory hierarchy")
    return None, "; ".join(reasons)


def _remove(child):
    try:
        child.rmdir()
    except OSError:
        pass


def test_cache_four_times_a_cgroup_memory_limit(tmp_path):
    """The whole process (page cache included) capped at 96 MiB; the cache is 4x that."""
    limit = 96 << 20
    kind, child = make_memory_cgroup(limit)
    if kind is None:
        pytest.skip(f"cannot impose a memory cgroup limit here: {child}")
    try:
        enter = f'echo $$ > {child / "cgroup.procs"} && exec "$0" "$@"'
        out = run_worker(tmp_path, 4 * limit, prefix=("sh", "-c", enter))
        if kind == "v2":
            events = dict(line.split() for line in (child / "memory.events").read_text().splitlines())
            peak_file = child / "memory.peak"
            peak = int(peak_file.read_text()) if peak_file.exists() else None
            hit = int(events.get("max", 0)) > 0
        else:
            peak = int((child / "memory.max_usage_in_bytes").read_text())
            hit = int((child / "memory.failcnt").read_text()) > 0 or peak >= 0.95 * limit
    finally:
        _remove(child)
    assert out["disk"] >= 4 * limit, out
    assert hit, f"the cgroup limit was never reached (peak {peak}); the test proved nothing"
    assert peak is None or peak <= limit


# ------------------------------------------------------------------ Python-side memory

def _append_tokens(path, n, seed=0):
    """Traced memory after appending n tokens (path None: a RAM cache), the peak, pages used."""
    c = km.PagedKVCache.create(path, num_layers=L, num_kv_heads=H, head_dim=D, page_size=P,
                               k_format="int8", v_format="int4")
    s = c.new_sequence()
    x = np.random.default_rng(seed).standard_normal((256, H, D), dtype=np.float32)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(0, n, 256):
        for layer in range(L):
            c.append(s, layer, x, x)
    c.flush()
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    pages = c.stats()["pages_used"]
    c.close()
    return cur - base, peak - base, pages


def test_python_memory_grows_with_metadata_not_tokens(tmp_path):
    n = 2048
    page_bytes = km.PagedKVCache.create(None, num_layers=L, num_kv_heads=H, head_dim=D, page_size=P,
                                        k_format="int8", v_format="int4").stats()["page_bytes"]
    small, small_peak, small_pages = _append_tokens(tmp_path / "a.kvm", n)
    big, big_peak, big_pages = _append_tokens(tmp_path / "b.kvm", 4 * n)
    token_bytes = 3 * n * L * H * D * 4 * 2        # float32 input of the extra tokens
    extra_pages = big_pages - small_pages
    # what stays allocated grows by a few bytes per page (ids, checksums, refcounts,
    # growable arrays doubling), never by the page data
    assert big - small < 64 * extra_pages, (big - small, extra_pages)
    assert big - small < token_bytes / 1000
    # transient use while appending (and committing) does not scale with the tokens either
    assert big_peak < 1.5 * small_peak + 64 * extra_pages, (small_peak, big_peak)
    # control: tracemalloc does see page data where it lives in RAM (an anonymous cache)
    ram, _, ram_pages = _append_tokens(None, n)
    assert ram > 0.9 * ram_pages * page_bytes
