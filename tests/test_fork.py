"""Kernels in a process made by fork, after the parent ran them on more than one thread.

GNU libgomp's thread pool does not survive fork: before kvmmap pinned fork children to one
thread, their first multi-threaded kernel waited forever. Every wait here has a deadline,
so a regression fails instead of hanging the run.
"""

import multiprocessing
import os
import signal
import subprocess
import sys
import time
import traceback

import numpy as np
import pytest

import kvmmap as km
from kvmmap import parallel

from helpers import WORKERS

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is not available")

DEADLINE_S = 60
# 4 x 256 x 128 = 131,072 elements: above the 65,536 below which the quantize kernels use
# one thread.
X = np.random.default_rng(7).standard_normal((4, 256, 128), dtype=np.float32)
TOKENS, KV_HEADS, Q_HEADS, HEAD_DIM = 4096, 2, 4, 64   # attend splits this over threads


def _attention_reference(q, k, v):
    """Softmax attention in numpy. q [Hq, D]; k, v [n, Hkv, D] -> [Hq, D]."""
    group = q.shape[0] // k.shape[1]
    out = np.empty_like(q)
    for h in range(q.shape[0]):
        s = k[:, h // group, :].astype(np.float64) @ q[h].astype(np.float64) / np.sqrt(q.shape[1])
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ v[:, h // group, :].astype(np.float64)
    return out


def _make_cache():
    rng = np.random.default_rng(11)
    cache = km.PagedKVCache.create(None, num_layers=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                                   page_size=16, k_format="int8", v_format="int8")
    seq = cache.new_sequence()
    cache.append(seq, 0, rng.standard_normal((TOKENS, KV_HEADS, HEAD_DIM), dtype=np.float32),
                 rng.standard_normal((TOKENS, KV_HEADS, HEAD_DIM), dtype=np.float32))
    q = rng.standard_normal((Q_HEADS, HEAD_DIM), dtype=np.float32)
    k, v = cache.read(seq, 0, 0, TOKENS)
    return cache, seq, q, _attention_reference(q, k, v)


def _kernels_agree(cache, seq, q, want) -> None:
    """Quantize, dequantize and attend, each checked against numpy; raises AssertionError."""
    for fmt in ("int8", "fp16"):
        y = km.dequantize(km.quantize(X, fmt, side_dtype=np.float16))
        if fmt == "int8":
            # half a step of the scale as stored: rounded up to float16
            bound = np.abs(X).max(axis=-1, keepdims=True) / 127 * 0.5 * (1 + 2.0 ** -10) + 1e-6
            assert np.all(np.abs(y - X) <= bound), "int8 round trip out of bounds"
        else:
            np.testing.assert_array_equal(y, X.astype(np.float16).astype(np.float32))
    got = cache.decode_attention(seq, 0, q, backend="cpu")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture
def two_threads():
    """The parent on 2 threads, having run the quantize and attention kernels on them."""
    before = km.get_num_threads()
    km.set_num_threads(2)
    cache, seq, q, want = _make_cache()
    _kernels_agree(cache, seq, q, want)   # starts libgomp's pool in this process
    yield cache, seq, q, want
    km.set_num_threads(before)


def _wait(pid: int, deadline_s: float = DEADLINE_S) -> int:
    """Exit code of child ``pid``; kills it and fails the test if it runs past the deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"forked child still running after {deadline_s} s: hung in the kernels")


def _in_child(body) -> str:
    """Run ``body()`` in an os.fork child; '' if it returned, else the child's traceback."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(read_end)
            body()
        except BaseException:
            os.write(write_end, traceback.format_exc().encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    code = _wait(pid)
    with os.fdopen(read_end, "rb") as f:
        message = f.read().decode()
    assert code == 0 or message, f"child exited with {code}"
    return message


def test_os_fork_child_runs_kernels(two_threads):
    cache, seq, q, want = two_threads

    def body():
        assert km.get_num_threads() == 1
        _kernels_agree(cache, seq, q, want)

    assert _in_child(body) == ""


def test_fork_child_refuses_more_threads(two_threads):
    def body():
        with pytest.raises(km.ConfigError, match="fork"):
            km.set_num_threads(2)
        assert km.get_num_threads() == 1   # left as it was
        km.set_num_threads(1)

    assert _in_child(body) == ""


def test_grandchild_stays_on_one_thread(two_threads):
    """A child has one thread, but inherits the parent's dead pool: so do its children."""
    cache, seq, q, want = two_threads

    def grandchild():
        assert km.get_num_threads() == 1
        _kernels_agree(cache, seq, q, want)

    def child():
        message = _in_child(grandchild)
        assert message == "", message

    assert _in_child(child) == ""


_POOL_CASE = None


def _pool_task(i: int) -> tuple:
    cache, seq, q, want = _POOL_CASE
    _kernels_agree(cache, seq, q, want)
    return i, km.get_num_threads(), os.getpid()


def test_multiprocessing_fork_pool(two_threads):
    global _POOL_CASE
    _POOL_CASE = two_threads
    pool = multiprocessing.get_context("fork").Pool(2)
    try:
        results = pool.map_async(_pool_task, range(6)).get(timeout=DEADLINE_S)
    except multiprocessing.TimeoutError:
        pytest.fail(f"fork pool workers still running after {DEADLINE_S} s: hung in the kernels")
    finally:
        pool.terminate()
        pool.join()
        _POOL_CASE = None
    assert sorted(r[0] for r in results) == list(range(6))
    assert {r[1] for r in results} == {1}
    assert os.getpid() not in {r[2] for r in results}


def test_parent_still_multithreaded_after_forks(two_threads):
    cache, seq, q, want = two_threads
    assert _in_child(lambda: _kernels_agree(cache, seq, q, want)) == ""
    km.set_num_threads(2)
    assert km.get_num_threads() == 2
    assert not parallel._fork_pinned
    _kernels_agree(cache, seq, q, want)


def test_torch_openmp_in_parent():
    """torch's OpenMP work alone poisons the runtime kvmmap's kernels bind to."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    before, torch_before = km.get_num_threads(), torch.get_num_threads()
    torch.set_num_threads(2)
    km.set_num_threads(2)
    try:
        a = torch.randn(256, 256)
        for _ in range(3):
            (a @ a).sum()
            torch.nn.functional.gelu(torch.randn(1 << 20))
        cache, seq, q, want = _make_cache()
        assert _in_child(lambda: _kernels_agree(cache, seq, q, want)) == ""
    finally:
        torch.set_num_threads(torch_before)
        km.set_num_threads(before)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux procfs")
def test_child_of_single_threaded_parent_keeps_threads():
    """No thread besides the forking one means no OpenMP pool: the child may use more."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(WORKERS / "fork_single_threaded.py")], env=env, cwd="/",
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (run.returncode, run.stderr)
