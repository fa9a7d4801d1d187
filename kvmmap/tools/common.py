"""What the tools share: refusing paths that are not regular files, read-only views of a
cache file, page checksums checked beside a writer, and sizes.

A read-only view (``mode="r"``) takes no lock, so a tool may run beside a writer; it sees
the state committed when it opened. Pages the writer reuses after that are told apart
from damage: a page can be rewritten only once a newer commit has dropped it, so a
checksum mismatch is damage only while no newer commit is on disk.
"""

from __future__ import annotations

import errno
import os
import stat

import numpy as np
from tqdm import tqdm

from ..cache import PagedKVCache
from ..errors import CacheFileError


class ChangedByWriterError(CacheFileError):
    """A writer committed while the file was being read and may have reused pages that were
    read: nothing is known to be damaged; run again."""


def check_regular_file(path) -> os.stat_result:
    """``os.stat`` of ``path``, refused unless it is a regular file.

    Checked before anything opens the path: opening a FIFO for reading blocks until a
    writer appears, and a device or directory is never a cache file.

    Raises
    ------
    CacheFileError
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise CacheFileError(f"cannot open {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            raise CacheFileError(f"cannot open {path}: {os.strerror(errno.EISDIR)}")
        kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                 (stat.S_ISBLK, "a block device"))
        kind = next((k for test, k in kinds if test(st.st_mode)), "a special file")
        raise CacheFileError(f"cannot open {path}: {kind}, not a regular file")
    return st


def open_read_only(path, commit: str = "newest") -> PagedKVCache:
    """``PagedKVCache.open(path, "r", commit=commit)`` for tools, refusing a non-regular
    file before opening it. (``open`` maps only the committed pages, so a sparse file's
    apparent length costs nothing.)

    Raises
    ------
    CacheFileError, OSError
    """
    path = os.fspath(path)
    check_regular_file(path)
    return PagedKVCache.open(path, mode="r", commit=commit)


def check_pages(cache: PagedKVCache, pages, progress: bool | None = False) -> tuple[list[int], list[int]]:
    """Recompute the checksums of ``pages`` of a read-only view.

    Returns
    -------
    damaged, changed : list of int
        Pages that fail their checksum while the view's commit is still the newest on
        disk (damage), and pages that fail it after a writer committed since the view was
        opened (possibly reused by the writer: not known to be damaged).
    """
    pages = [int(p) for p in pages]
    bad = cache.mismatched(tqdm(pages, desc="verify", unit="page", disable=None if progress is None else not progress))
    # checked after reading, as PagedKVCache.read does: a page is rewritten only after a
    # newer commit dropped it, and the writer writes that commit first
    if not bad or cache.commit_is_newest():
        return bad, []
    return [], bad


def layer_tables(cache: PagedKVCache, seq: int) -> list[tuple[np.ndarray, int, int]]:
    """The page table of every layer of one sequence.

    Parameters
    ----------
    cache : PagedKVCache
    seq : int
        Sequence id.

    Returns
    -------
    list of (pages, n_pos, first), one per layer
        :meth:`PagedKVCache.page_table` of each layer: ``pages`` uint32
        ``[num_pages]`` physical ids in logical order (a copy); ``n_pos``:
        positions written; ``first``: positions dropped in front by ``shift_left``.
        Visible token ``i`` is position ``first + i`` (docs/FORMAT.md).
    """
    return [cache.page_table(seq, layer) for layer in range(cache.num_layers)]


def commit_info(cache: PagedKVCache) -> dict:
    """``{"generation": int, "slot": int}`` of the commit a cache was opened at (or last made)."""
    c = cache.commit
    return {"generation": c["generation"], "slot": c["slot"]}


def disk_usage(path) -> dict:
    """``{"bytes_on_disk": st_blocks * 512, "apparent_bytes": st_size}`` of a file (it is sparse)."""
    st = os.stat(path)
    return {"bytes_on_disk": st.st_blocks * 512, "apparent_bytes": st.st_size}


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
