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
                   "--large-gb", "0.002", "--opens", "3", "--commit-seqs", "3", "--commit-layers", "2",
                   "--commit-repeat", "1", "--bits-seqs", "1", "--bits-tokens", "64", "--compact-seqs", "10",
                   "--compact-tokens", "32", "--threads", "1", "--dir", str(tmp_path))
    ratio = {"append": ("vs_numpy", "vs_memmap"), "open": ("vs_10ms", "vs_small"), "read": ("vs_dd",),
             "commit": ("vs_1_sequence",), "bits": ("vs_code_bits",), "compact": ("after_vs_before",)}
    assert {r["section"] for r in out["rows"]} == set(ratio)
    for r in out["rows"]:
        for key in ratio[r["section"]]:
            assert r[key] > 0, r
    read = {r["what"]: r["timing"] for r in out["rows"] if r["section"] == "read"}
    assert read["kvmmap read, cold"] == read["dd, cold"] == "one timed call (not repeatable)"
    assert read["kvmmap read, warm"] == out["statistic"]
    assert {"append prefill", "append decode", "dd cold", "dd warm", "commit 1 sequence", "bits code",
            "compact"} <= set(out["baseline"])

    commits = [r for r in out["rows"] if r["section"] == "commit"]
    assert [r["sequences"] for r in commits] == [1, 3]          # 1, the baseline, is always measured
    assert commits[0]["vs_1_sequence"] == 1.0
    bits = {r["what"]: r for r in out["rows"] if r["section"] == "bits"}
    assert len(bits) == 8 and bits["int4/int8"]["code_bits"] == 6
    for fmt in ("fp32", "fp16", "bf16"):        # no side data: the pages cost exactly the codes
        assert bits[f"{fmt}/{fmt}"]["bits_pages"] == bits[f"{fmt}/{fmt}"]["code_bits"]
        assert bits[f"{fmt}/{fmt}"]["target_met"] is True
    for r in bits.values():                     # side data and the file's own overhead only add
        assert r["code_bits"] <= r["bits_pages"] <= r["bits_file"], r
    for what in ("int8/int8", "int4/int4", "fp8_e4m3/fp8_e4m3", "int4/int8"):     # scales (and zeros) on top
        assert bits[what]["bits_pages"] > bits[what]["code_bits"], bits[what]
    compact = next(r for r in out["rows"] if r["section"] == "compact")
    assert compact["timing"] == "one timed call (not repeatable)"
    assert compact["bytes_on_disk_after"] < compact["bytes_on_disk_before"]
    assert list(tmp_path.iterdir()) == []          # its files are deleted at exit


def test_bench_pool_skip(tmp_path):
    out = run_json("bench_pool.py", tmp_path, "--skip", "append,open,read,bits,compact", "--commit-seqs", "1",
                   "--commit-layers", "1", "--commit-repeat", "1", "--dir", str(tmp_path))
    assert {r["section"] for r in out["rows"]} == {"commit"}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_pool.py"), "--skip", "comit"], check=False,
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown sections ['comit']" in proc.stderr


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
