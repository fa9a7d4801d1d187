"""The `kvmmap compress` side of the crash campaign (tests/test_crash.py):
``python compress_server.py``.

Per line of stdin ``[src, dst, kill_at, args]`` it forks a child (kvmmap is imported
once, before forking, so a kill costs a fork, not an interpreter start) that runs
``kvmmap compress src dst --no-progress ARGS`` and reports, one line each: ``pid N``,
``event NAME`` for every call that changes its output (appends and forks into the new
cache, os.pwrite, os.ftruncate, os.fsync, os.replace), ``done RC``; then the server
prints ``exit STATUS`` (-9: SIGKILL). The child SIGKILLs itself at event ``kill_at``
(1-based); with ``kill_at`` = WAIT_FOR_KILL it waits after a complete run for the test to
kill it; with 0 it completes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

from kvmmap import cache, cli, compress  # noqa: F401  (all imported once, before forking)
from kvmmap.tools import common, rewrite  # noqa: F401

WAIT_FOR_KILL = -1                 # kill_at for a run that the test kills


def report(line: str) -> None:
    """One whole line to stdout in one write(2): a SIGKILL cannot cut it in half."""
    os.write(1, f"{line}\n".encode())


def _install_compress_hooks(kill_at: int) -> None:
    count = [0]

    def event(name):
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        report(f"event {name}")

    def hook(obj, attr, before=None, after=None):
        real = getattr(obj, attr)

        def wrapped(*a, **kw):
            if before:
                event(before)
            r = real(*a, **kw)
            if after:
                event(after)
            return r
        setattr(obj, attr, wrapped)

    hook(cache.PagedKVCache, "append", after="append")
    hook(cache.PagedKVCache, "fork", after="fork")
    hook(os, "pwrite", after="pwrite")
    hook(os, "ftruncate", after="ftruncate")
    hook(os, "fsync", before="fsync")
    hook(os, "replace", before="replace", after="replaced")


def compress_server() -> None:
    """Per line of stdin ``[src, dst, kill_at, args]``: fork a child that runs `kvmmap
    compress` with the hooks, wait for it, print ``exit <status>`` (-9: SIGKILL)."""
    for line in sys.stdin:
        src, dst, kill_at, args = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 4
            try:
                sys.stdout = open(os.devnull, "w")     # the CLI's report: not part of the protocol
                report(f"pid {os.getpid()}")
                _install_compress_hooks(kill_at)
                rc = cli.main(["compress", src, dst, "--no-progress", *args])
                report(f"done {rc}")
                if kill_at == WAIT_FOR_KILL and rc == 0:
                    while True:
                        signal.pause()
                code = rc or (3 if kill_at else 0)     # 3: the kill point was never reached
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        report(f"exit {-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)}")


if __name__ == "__main__":
    compress_server()
