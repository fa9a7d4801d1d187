"""How many threads the Cython kernels use.

The default is the number of CPUs this process may run on; ``KVMMAP_NUM_THREADS`` in the
environment or :func:`set_num_threads` overrides it. Kernels fall back to one thread on
small inputs by themselves.

A child made by ``fork`` (``os.fork``, multiprocessing's "fork" start method) of a process
that had more than one thread runs the kernels on one thread, and refuses more. GNU
libgomp keeps its worker threads in a pool that fork does not copy: a parallel region
with more than one thread in the child waits forever for threads that do not exist.
The pool may have been started by kvmmap's kernels or by any library sharing the OpenMP
runtime (torch and kvmmap bind to one ``libgomp.so.1``), so any second thread in the
parent counts, though numpy's OpenBLAS thread alone makes one (``OPENBLAS_NUM_THREADS=1``
avoids it). Children of a single-threaded parent keep the full count, as do "spawn"
children and "forkserver" ones whose server has not imported kvmmap.
"""

from __future__ import annotations

import os

from .errors import ConfigError


def _default_threads() -> int:
    env = os.environ.get("KVMMAP_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ConfigError(f"KVMMAP_NUM_THREADS must be a positive integer, found {env!r}") from None
        if n < 1:
            raise ConfigError(f"KVMMAP_NUM_THREADS must be a positive integer, found {env!r}")
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_num_threads = _default_threads()
# True in a fork child whose parent may have started OpenMP threads; inherited by its
# own children, whose copy of the runtime holds the same dead pool.
_fork_pinned = False
_parent_threaded = False


def _threads_in_process() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # no procfs: assume the worst
        return 2


def _before_fork() -> None:
    global _parent_threaded
    _parent_threaded = _fork_pinned or _threads_in_process() > 1


def _after_fork_in_child() -> None:
    global _num_threads, _fork_pinned
    if _parent_threaded:
        _fork_pinned = True
        _num_threads = 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def get_num_threads() -> int:
    """Threads the kernels may use (1 in a fork child of a multi-threaded process)."""
    return _num_threads


def set_num_threads(n: int) -> None:
    """Set the number of threads the Cython kernels may use, for this process.

    It overrides ``KVMMAP_NUM_THREADS`` and the default (the CPUs this process may run
    on). Kernels still use one thread on small inputs. In a process made by ``fork`` from
    one that had more than one thread, only 1 is accepted (see the module docstring).

    Parameters
    ----------
    n : int
        Threads, at least 1.

    Raises
    ------
    ConfigError
        ``n`` is not an integer >= 1, or is more than 1 in a fork child of a
        multi-threaded process; the setting is left as it was.

    Examples
    --------
    >>> import kvmmap as km
    >>> before = km.get_num_threads()
    >>> km.set_num_threads(1)
    >>> km.get_num_threads()
    1
    >>> km.set_num_threads(before)
    """
    global _num_threads
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"number of threads must be a positive integer, found {n!r}")
    if n > 1 and _fork_pinned:
        raise ConfigError(
            f"this process was made by fork from a process with more than one thread, so it "
            f"runs kvmmap's kernels on 1 thread, found a request for {n}: the OpenMP runtime "
            f"(GNU libgomp) cannot start threads after fork and would hang. Start workers "
            f"with multiprocessing's 'spawn' or 'forkserver' method to use more threads")
    _num_threads = n
