"""How many threads the Cython kernels use.

The default is the number of CPUs this process may run on; ``KVMMAP_NUM_THREADS`` in the
environment or :func:`set_num_threads` overrides it. Kernels fall back to one thread on
small inputs by themselves.
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


def get_num_threads() -> int:
    """Threads the kernels may use."""
    return _num_threads


def set_num_threads(n: int) -> None:
    """Set the number of threads the Cython kernels may use, for this process.

    It overrides ``KVMMAP_NUM_THREADS`` and the default (the CPUs this process may run
    on). Kernels still use one thread on small inputs.

    Parameters
    ----------
    n : int
        Threads, at least 1.

    Raises
    ------
    ConfigError
        ``n`` is not an integer >= 1; the setting is left as it was.

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
    _num_threads = n
