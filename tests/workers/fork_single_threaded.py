"""A single-threaded process forks; the child must be free to use more threads
(tests/test_fork.py): ``python fork_single_threaded.py``.

No thread besides the forking one means no OpenMP pool to inherit dead. Exit status: 0
when the child ran a 2-thread kernel correctly on more than one thread; 3 when it ran on
one thread or computed wrong; 4 when it raised; 5 when it was still running after 60 s.
"""

import os
import sys
import time

import numpy as np

import kvmmap as km

DEADLINE_S = 60


def child(x: np.ndarray) -> None:
    try:
        km.set_num_threads(2)
        y = km.dequantize(km.quantize(x, "fp16"))
        ok = np.array_equal(y, x.astype(np.float16).astype(np.float32))
        os._exit(0 if ok and len(os.listdir("/proc/self/task")) > 1 else 3)
    finally:
        os._exit(4)


def main() -> int:
    assert len(os.listdir("/proc/self/task")) == 1, os.listdir("/proc/self/task")
    x = np.random.default_rng(0).standard_normal((4, 256, 128), dtype=np.float32)
    pid = os.fork()
    if pid == 0:
        child(x)
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    return 5


if __name__ == "__main__":
    sys.exit(main())
