"""File primitives every writer of kvmmap files uses, written once.

Full writes (a short ``pwrite`` is never a success), disk blocks reserved before pages
are written through a map, directory syncs, non-blocking opens that refuse anything but a
regular file, the writer lock, and the partial files tools build before renaming them
into place.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
import stat
import struct

from ..errors import CacheFileError


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` at ``offset``, or raise OSError.

    ``os.pwrite`` may write fewer bytes than asked (a nearly full disk, ``RLIMIT_FSIZE``)
    and says so only in its return value: the rest is written by further calls, and a
    call that writes nothing is a full disk (ENOSPC), never a silent success.
    """
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: wrote {done} of {len(view)} bytes")
        done += n


def reserve(fd: int, offset: int, length: int) -> None:
    """Give the byte range its disk blocks now, so that writing it later cannot fail.

    Pages are written through a memory map; a store into a hole of a sparse file on a full
    disk is a SIGBUS that kills the process. Reserving the blocks first (``fallocate``)
    turns that into an OSError (ENOSPC, EFBIG past ``ulimit -f``) the caller can handle,
    raised before anything is handed out. File systems without ``fallocate`` get the
    blocks written with zeros instead (glibc's fallback), which is as safe.
    """
    if length <= 0:
        return
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:           # macOS: no reservation call; writes may still fail late
        return
    fallocate(fd, offset, length)


def fsync_dir(path: str) -> None:
    """Make a new or renamed directory entry of ``path`` durable (sync its folder)."""
    dfd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def open_regular(path: str, flags: int, what: str = "open") -> int:
    """``os.open`` that refuses anything but a regular file *without blocking* on it.

    A FIFO opened for reading blocks until a writer appears, and a device may do anything:
    the path is opened with O_NONBLOCK (harmless for regular files, which are then put
    back in blocking mode) and checked with fstat before anything is read.
    """
    try:
        fd = os.open(path, flags | os.O_NONBLOCK)
    except OSError as e:
        raise CacheFileError(f"cannot {what} {path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise CacheFileError(f"cannot {what} {path}: {kind}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not replaced or deleted)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


_NAME_MAX = 255


def partial_path(dst: str) -> str:
    """Where a tool builds a new file ``dst`` before renaming it into place.

    A hidden name in the same directory (so the rename is atomic), unique to this process;
    :func:`remove_stale_partials` finds it by its prefix (:func:`partial_prefix`).
    """
    folder, _ = os.path.split(os.path.abspath(dst))
    return os.path.join(folder, f"{partial_prefix(dst)}{os.getpid()}")


def partial_prefix(dst: str) -> str:
    """``.NAME.partial-``; for a name too long to take the suffix within the file
    system's 255-byte limit, NAME is cut and followed by a digest of the whole name."""
    base = os.path.basename(os.path.abspath(dst))
    prefix = f".{base}.partial-"
    # room for a pid (10 digits) and create()'s ".<object id>" (13): 24 bytes
    if len(os.fsencode(prefix)) + 24 > _NAME_MAX:
        digest = hashlib.blake2b(os.fsencode(base), digest_size=8).hexdigest()
        room = _NAME_MAX - 24 - len(".~.partial-") - len(digest)
        cut = os.fsencode(base)[:room].decode("utf-8", "ignore")
        prefix = f".{cut}~{digest}.partial-"
    return prefix


def remove_stale_partials(dst: str) -> list[str]:
    """Delete the partial files of ``dst`` whose writer is gone; returns their paths.

    A partial file is a cache being created, and its writer holds the file's ``flock``
    until the file has its final name or the writer gave up; a process that dies releases
    it. So a partial whose lock can be taken has no live writer and is deleted, while one
    that is locked belongs to a run still going and is left alone. (A run caught in the
    microseconds between creating its file and locking it loses the file and fails with an
    error when it renames; it never produces a half-written ``dst``.)
    """
    folder = os.path.dirname(os.path.abspath(dst))
    prefix = partial_prefix(dst)
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix)]
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
            removed.append(path)
        except OSError:                 # locked (a live run) or not ours to delete
            pass
        finally:
            os.close(fd)
    return removed


def lock_writer(fd: int, path: str) -> None:
    """Take the writer lock of an open cache file (an exclusive, non-blocking ``flock``).

    Raises CacheFileError when another process holds it; the caller closes ``fd``.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise CacheFileError(f"{path} is open for writing in another process (its writer lock is held)") from None


READER_LOCK_BYTE = 4095        # a record lock on this byte marks a read-only view


def _byte_lock(fd: int, kind: int) -> bool:
    """Set (F_RDLCK / F_WRLCK) or clear (F_UNLCK) a non-blocking lock on READER_LOCK_BYTE.

    Linux's open-file-description locks (F_OFD_SETLK) belong to this descriptor, so closing
    another descriptor of the same file (numpy.memmap opens and closes one) does not drop
    them, as it drops classic POSIX record locks. Returns False if another holder conflicts."""
    cmd = getattr(fcntl, "F_OFD_SETLK", None)
    if cmd is None:                         # elsewhere: classic record locks, best effort
        op = {fcntl.F_RDLCK: fcntl.LOCK_SH, fcntl.F_WRLCK: fcntl.LOCK_EX, fcntl.F_UNLCK: fcntl.LOCK_UN}[kind]
        try:
            fcntl.lockf(fd, op | (fcntl.LOCK_NB if kind != fcntl.F_UNLCK else 0), 1, READER_LOCK_BYTE)
            return True
        except OSError:
            return False
    try:
        fcntl.fcntl(fd, cmd, struct.pack("hhqqi4x", kind, os.SEEK_SET, READER_LOCK_BYTE, 1, 0))
        return True
    except OSError:
        return False


def mark_reader(fd: int) -> None:
    """Mark a read-only view of the file (a shared lock on one byte of this descriptor), so a
    writer's ``compact`` does not cut the file under its mapping (SIGBUS)."""
    _byte_lock(fd, fcntl.F_RDLCK)


def readers_present(fd: int) -> bool:
    """Whether another descriptor holds a read-only view of the file (see :func:`mark_reader`)."""
    if not _byte_lock(fd, fcntl.F_WRLCK):
        return True
    _byte_lock(fd, fcntl.F_UNLCK)
    return False


def lock_existing(path: str, purpose: str = "overwritten"):
    """A descriptor holding the writer lock of the file at ``path``, or None if there is none.

    Used while a file is replaced (``create(overwrite=True)``, the tools) or read whole
    (``kvmmap convert --upgrade``): a live writer is refused instead of having its file
    renamed away or changed under it. ``purpose`` completes the refusal: "it cannot be ...".
    """
    if not os.path.lexists(path):
        return None
    fd = open_regular(path, os.O_RDONLY, "replace")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CacheFileError(f"{path} is open for writing in another process (its writer lock is "
                             f"held); it cannot be {purpose}") from None
    return fd


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = None


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Give the blocks of a byte range back to the file system; it then reads as zeros.

    Linux ``fallocate(PUNCH_HOLE | KEEP_SIZE)``: the file keeps its length. Returns False
    where the file system (or the platform) cannot punch holes; nothing is changed then.
    """
    global _libc
    if length <= 0:
        return True
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name, use_errno=True) if name else False
    fallocate = getattr(_libc, "fallocate", None) if _libc else None
    if fallocate is None:
        return False
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))
