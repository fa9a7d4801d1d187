"""Each benchmark script runs with its smallest options and ``--json``, and its JSON holds the ratios.

The scripts run in a subprocess from a temporary directory, without PYTHONPATH, so they
import the installed kvmmap (and ``_timing`` from their own folder), as a user runs them.
Sizes are tiny: these check that the scripts work and report what they claim, not speed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_json(script: str, cwd: Path, *options: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *options, "--json"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)          # the whole of stdout is the one JSON object
    assert out["benchmark"] == script.removesuffix(".py")
    assert out["statistic"] == "median of repeat calls after one warm-up call"
    assert out["arguments"]["json"] is True
    assert out["baseline"] and out["rows"]
    return out


def test_bench_pool(tmp_path):
    out = run_json("bench_pool.py", tmp_path, "--layers", "1", "--heads", "2", "--head-dim", "32",
                   "--prefill-tokens", "64", "--chunk", "32", "--decode-tokens", "4", "--repeat", "1",
                   "--large-gb", "0.002", "--opens", "3", "--threads", "1", "--dir", str(tmp_path))
    ratio = {"append": ("vs_numpy", "vs_memmap"), "open": ("vs_10ms", "vs_small"), "read": ("vs_dd",)}
    assert {r["section"] for r in out["rows"]} == set(ratio)
    for r in out["rows"]:
        for key in ratio[r["section"]]:
            assert r[key] > 0, r
    read = {r["what"]: r["timing"] for r in out["rows"] if r["section"] == "read"}
    assert read["kvmmap read, cold"] == read["dd, cold"] == "one timed call (not repeatable)"
    assert read["kvmmap read, warm"] == out["statistic"]
    assert {"append prefill", "append decode", "dd cold", "dd warm"} <= set(out["baseline"])
    assert list(tmp_path.iterdir()) == []          # its files are deleted at exit


def test_bench_compress(tmp_path):
    out = run_json("bench_compress.py", tmp_path, "--tokens", "32", "--layers", "1", "--synthetic",
                   "--repeat", "1")
    assert out["configuration"]["data"].startswith("SYNTHETIC")
    assert out["baseline"]["int8"]["vs_int8"] == out["baseline"]["int8"]["time_vs_int8"] == 1.0
    for r in out["rows"]:
        for fitted in ("self", "calib"):
            for key in ("ratio", "vs_int8", "time_vs_int8"):
                assert r[fitted][key] > 0, r


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("torch", "transformers")),
                    reason="bench_generate needs torch and transformers")
def test_bench_generate(tmp_path):
    out = run_json("bench_generate.py", tmp_path, "--prompt", "8", "--new", "2", "--layers", "1", "--hidden", "32",
                   "--heads", "2", "--kv-heads", "1", "--vocab", "64", "--repeat", "1", "--ttft-repeat", "1",
                   "--threads", "1")
    rows = {(r["part"], r.get("cache", r.get("what"))): r for r in out["rows"]}
    for name in ("DynamicCache (baseline)", "KVMmapCache int8", "KVMmapCache int8, in a file"):
        assert rows["generate", name]["vs_dynamic_cache"] > 0, rows["generate", name]
    assert rows["generate", "DynamicCache (baseline)"]["vs_dynamic_cache"] == 1.0
    ttft = [r for r in out["rows"] if r["part"] == "time to first token"]
    assert len(ttft) == 7 and all(r["vs_dynamic_cache"] > 0 for r in ttft)


def test_bench_commit(tmp_path):
    out = run_json("bench_commit.py", tmp_path, "--sequences", "1", "3", "--layers", "2", "--repeat", "1",
                   "--dir", str(tmp_path))
    commits = [r for r in out["rows"] if r["part"] == "commit"]
    assert [r["sequences"] for r in commits] == [1, 3] and commits[0]["vs_1_sequence"] == 1.0
    bits = {r["format"]: r["bits_per_element"] for r in out["rows"] if r["part"] == "bits"}
    # side data counted: exact formats cost their width, scaled formats a little more
    assert bits["fp32"] == 32 and bits["fp16"] == bits["bf16"] == 16
    assert 8 < bits["int8"] < 9 and 4 < bits["int4"] < 8
