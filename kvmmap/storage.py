"""The cache file: superblock, page layout, metadata slots, commit and reopen.

Byte-by-byte description in docs/FORMAT.md. In short::

    [0, 4096)                      superblock: magic, version, geometry, formats, fingerprint, crc32c
    [4096, 4096 + S)               metadata slot 0   (S = meta_slot_bytes)
    [4096 + S, 4096 + 2S)          metadata slot 1
    [arena_offset, ...)            page arena: page p at arena_offset + p * page_bytes

The file is sparse: reserved metadata space and arena capacity cost nothing until
written. A commit writes the new metadata into the slot *not* holding the newest valid
state, after the data pages it refers to are durable; the slot with the highest
generation whose checksums hold is the committed state.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import struct
from dataclasses import dataclass

import crc32c
import numpy as np

from .errors import CacheFileError, FormatError
from .formats import Format, format_by_id, get_format

MAGIC = b"\x89KVMMAP\n"
VERSION = (1, 0)
SUPERBLOCK_BYTES = 4096
SLOT_MAGIC = b"KVMSLOT\x00"
SLOT_HEADER = struct.Struct("<8sQQII")          # magic, generation, payload_len, payload_crc, header_crc
SLOT_HEADER_BYTES = 64
ALIGN = 64                                      # every page region starts on a 64-byte boundary
FINGERPRINT_BYTES = 32
_SB = struct.Struct("<8sHHIIIIIBBHHHQQQQ32s")   # superblock fields before the reserved bytes
_SB_CRC_AT = SUPERBLOCK_BYTES - 4


def _align(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class Region:
    """One array inside a page: byte offset from the page start, dtype, shape."""

    offset: int
    dtype: np.dtype
    shape: tuple

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


class PageLayout:
    """Where K and V codes, scales and zero points sit inside one page of one layer.

    A page holds ``page_size`` tokens of one layer for every KV head, in this order, each
    region 64-byte aligned::

        K codes [H, P, Dc]  K scales  K zeros  V codes [H, P, Dc]  V scales  V zeros

    Codes are head-major so that one (sequence, kv-head) stream reads ``P * Dc``
    contiguous codes per page. Scales: int8 / fp8 ``[H, P]`` (one per token per head);
    int4 keys ``[H, 1, D]`` (per channel over the page, KIVI); int4 values
    ``[H, P, D / G]``; zero points like the scales (int4 only).
    """

    def __init__(self, num_kv_heads, head_dim, page_size, k_format, v_format, v_group_size):
        self.num_kv_heads, self.head_dim, self.page_size = num_kv_heads, head_dim, page_size
        self.formats = {"k": get_format(k_format), "v": get_format(v_format)}
        self.group_size = {"k": page_size if self.formats["k"].name == "int4" else 0,
                           "v": v_group_size if self.formats["v"].name == "int4" else 0}
        self.regions: dict[str, dict[str, Region]] = {}
        off = 0
        H, P, D = num_kv_heads, page_size, head_dim
        for side in ("k", "v"):
            f = self.formats[side]
            regs = {"codes": Region(off, f.code_dtype, (H, P, f.code_width(D)))}
            off = _align(off + regs["codes"].nbytes)
            if f.scaled:
                if f.name != "int4":
                    side_shape = (H, P)
                elif side == "k":
                    side_shape = (H, 1, D)
                else:
                    side_shape = (H, P, D // self.group_size["v"])
                for name in ("scales", "zeros") if f.zero_point else ("scales",):
                    regs[name] = Region(off, np.dtype(np.float32), side_shape)
                    off = _align(off + regs[name].nbytes)
            self.regions[side] = regs
        self.page_bytes = off

    @property
    def tail_bytes(self) -> int:
        """Bytes of one (sequence, layer) tail in the metadata: each side's page regions
        unpadded, or float32 [H, P, D] for an int4 side (docs/FORMAT.md, Payload)."""
        n = 0
        for side, regs in self.regions.items():
            if self.formats[side].name == "int4":
                n += self.num_kv_heads * self.page_size * self.head_dim * 4
            else:
                n += sum(r.nbytes for r in regs.values())
        return n

    def grouping(self, side: str) -> str:
        return "channel" if side == "k" and self.formats["k"].name == "int4" else "token"

    def arena_views(self, arena: np.ndarray, num_pages: int) -> dict[str, dict[str, np.ndarray]]:
        """Arrays ``[num_pages, *region.shape]`` over a flat uint8 arena, one per region."""
        views = {}
        for side, regs in self.regions.items():
            views[side] = {}
            for name, r in regs.items():
                if num_pages == 0:
                    views[side][name] = np.zeros((0,) + r.shape, r.dtype)
                    continue
                inner = tuple(int(s) for s in np.cumprod((1,) + r.shape[::-1])[:-1][::-1] * r.dtype.itemsize)
                views[side][name] = np.ndarray(
                    (num_pages,) + r.shape, r.dtype, buffer=arena, offset=r.offset,
                    strides=(self.page_bytes,) + inner,
                )
        return views


@dataclass(frozen=True)
class Superblock:
    """The immutable header of a cache file."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    k_format: Format
    v_format: Format
    k_group_size: int
    v_group_size: int
    page_bytes: int
    meta_offset: int
    meta_slot_bytes: int
    arena_offset: int
    fingerprint: bytes
    version: tuple = VERSION

    def pack(self) -> bytes:
        head = _SB.pack(
            MAGIC, *self.version, SUPERBLOCK_BYTES, self.num_layers, self.num_kv_heads,
            self.head_dim, self.page_size, self.k_format.format_id, self.v_format.format_id,
            self.k_group_size, self.v_group_size, 0, self.page_bytes, self.meta_offset, self.meta_slot_bytes,
            self.arena_offset, self.fingerprint.ljust(FINGERPRINT_BYTES, b"\0"),
        )
        body = head.ljust(_SB_CRC_AT, b"\0")
        return body + struct.pack("<I", crc32c.crc32c(body))

    @classmethod
    def unpack(cls, raw: bytes, path: str = "<file>") -> "Superblock":
        if len(raw) < SUPERBLOCK_BYTES:
            raise CacheFileError(f"{path}: not a kvmmap cache: {len(raw)} bytes, shorter than the {SUPERBLOCK_BYTES}-byte header")
        if raw[:8] != MAGIC:
            raise CacheFileError(f"{path}: not a kvmmap cache: magic {raw[:8]!r}, expected {MAGIC!r}")
        (magic, major, minor, sb_bytes, L, H, D, P, kf, vf, kg, vg, flags, page_bytes,
         meta_off, slot_bytes, arena_off, fp) = _SB.unpack_from(raw)
        if major != VERSION[0]:
            raise CacheFileError(
                f"{path}: format version {major}.{minor} is not supported; this kvmmap reads {VERSION[0]}.x"
            )
        (stored,) = struct.unpack_from("<I", raw, _SB_CRC_AT)
        if crc32c.crc32c(raw[:_SB_CRC_AT]) != stored:
            raise CacheFileError(f"{path}: damaged header: superblock checksum mismatch")
        if sb_bytes != SUPERBLOCK_BYTES or flags != 0:
            raise CacheFileError(f"{path}: damaged header: superblock size {sb_bytes} (expected "
                                 f"{SUPERBLOCK_BYTES}) or flags {flags} (expected 0)")
        # a later 1.x may add fields in the reserved bytes, which this version ignores
        if minor == 0 and any(raw[_SB.size:_SB_CRC_AT]):
            raise CacheFileError(f"{path}: damaged header: reserved bytes {_SB.size}..{_SB_CRC_AT - 1} "
                                 "of a version 1.0 file are not zero")
        try:
            kfmt, vfmt = format_by_id(kf), format_by_id(vf)
        except FormatError as e:
            raise CacheFileError(f"{path}: damaged header: {e}") from None
        sb = cls(L, H, D, P, kfmt, vfmt, kg, vg, page_bytes, meta_off, slot_bytes, arena_off, fp, (major, minor))
        sb.validate(path)
        return sb

    def validate(self, path: str) -> None:
        """Check the geometry is sane and self-consistent (hostile files included)."""
        def bad(msg):
            raise CacheFileError(f"{path}: damaged header: {msg}")
        for name, v, hi in (("num_layers", self.num_layers, 1 << 16), ("num_kv_heads", self.num_kv_heads, 1 << 12),
                            ("head_dim", self.head_dim, 1 << 14), ("page_size", self.page_size, 1 << 16)):
            if not 1 <= v <= hi:
                bad(f"{name}={v} is outside 1..{hi}")
        k4, v4 = self.k_format.name == "int4", self.v_format.name == "int4"
        if (k4 or v4) and self.head_dim % 2:
            bad(f"head_dim={self.head_dim} is odd, but int4 packs two codes a byte and needs an even head_dim")
        if self.k_group_size != (self.page_size if k4 else 0):
            bad(f"k group size is {self.k_group_size}, expected "
                + (f"page_size={self.page_size} for int4 keys (so page_size <= 65535)" if k4
                   else f"0 for {self.k_format.name} keys"))
        if not v4 and self.v_group_size != 0:
            bad(f"v group size is {self.v_group_size}, expected 0 for {self.v_format.name} values")
        if v4 and not (2 <= self.v_group_size <= 256 and self.v_group_size % 2 == 0
                       and self.head_dim % self.v_group_size == 0):
            bad(f"v group size is {self.v_group_size}, expected an even number in 2..256 that divides "
                f"head_dim={self.head_dim} for int4 values")
        layout = self.layout()
        if layout.page_bytes != self.page_bytes:
            bad(f"page_bytes={self.page_bytes} does not match the geometry ({layout.page_bytes})")
        if self.meta_offset != SUPERBLOCK_BYTES or self.meta_slot_bytes < 4096 or self.meta_slot_bytes % 4096:
            bad(f"metadata slots at {self.meta_offset} of {self.meta_slot_bytes} bytes are misplaced")
        if self.arena_offset != self.meta_offset + 2 * self.meta_slot_bytes:
            bad(f"arena offset {self.arena_offset} does not follow the metadata slots")
        # opening allocates one tail per layer; a slot that cannot hold one never held a
        # sequence, so a header claiming more is refused before that allocation
        if layout.tail_bytes > self.meta_slot_bytes - SLOT_HEADER_BYTES:
            bad(f"one sequence tail of this geometry ({layout.tail_bytes} bytes) does not fit "
                f"the {self.meta_slot_bytes}-byte metadata slots")

    def check_file_size(self, size: int, path: str) -> None:
        """Refuse a file too short to hold its own header and metadata slots."""
        if size < self.arena_offset:
            raise CacheFileError(f"{path}: truncated file: {size} bytes, but its metadata slots end at "
                                 f"byte {self.arena_offset}")

    def layout(self) -> PageLayout:
        try:
            return PageLayout(self.num_kv_heads, self.head_dim, self.page_size,
                              self.k_format, self.v_format, self.v_group_size)
        except (ValueError, ZeroDivisionError) as e:
            raise CacheFileError(f"damaged header: inconsistent geometry ({e})") from None


def _slot_header(head: bytes) -> tuple[int, int, int] | None:
    """(generation, payload length, payload crc) of a 64-byte slot header that holds, else None.

    It holds if its magic and header checksum are right and its last 32 bytes, which no
    checksum covers, are zero as docs/FORMAT.md fixes. A writer writes all 64 bytes in one
    call and old headers are zero there too, so a nonzero byte is damage to this header:
    the slot counts as damaged, exactly like one that fails its checksum.
    """
    if len(head) < SLOT_HEADER_BYTES:
        return None
    magic, gen, length, payload_crc, header_crc = SLOT_HEADER.unpack_from(head)
    if magic != SLOT_MAGIC or crc32c.crc32c(head[:SLOT_HEADER.size - 4]) != header_crc:
        return None
    if any(head[SLOT_HEADER.size:SLOT_HEADER_BYTES]):
        return None
    return gen, length, payload_crc


def read_slot(fd: int, sb: Superblock, index: int) -> tuple[int, bytes] | None:
    """(generation, payload) of a metadata slot, or None if it is empty or damaged."""
    off = sb.meta_offset + index * sb.meta_slot_bytes
    got = _slot_header(os.pread(fd, SLOT_HEADER_BYTES, off))
    if got is None:
        return None
    gen, length, payload_crc = got
    # the length is checked against the slot and the file before anything is allocated
    if length > sb.meta_slot_bytes - SLOT_HEADER_BYTES or off + SLOT_HEADER_BYTES + length > os.fstat(fd).st_size:
        return None
    if length > _CHECK_FIRST_BYTES and _crc_of_range(fd, off + SLOT_HEADER_BYTES, length) != payload_crc:
        # a large payload is checked in chunks before it is read whole: a crafted header
        # announcing hundreds of MiB (in a sparse file) costs no memory
        return None
    payload = os.pread(fd, length, off + SLOT_HEADER_BYTES)
    if len(payload) != length or crc32c.crc32c(payload) != payload_crc:
        return None
    return gen, payload


_CHECK_FIRST_BYTES = 16 << 20


def _crc_of_range(fd: int, offset: int, length: int, chunk: int = 4 << 20) -> int | None:
    """CRC-32C of ``length`` bytes at ``offset``, read a chunk at a time (None if short)."""
    crc, done = 0, 0
    while done < length:
        part = os.pread(fd, min(chunk, length - done), offset + done)
        if not part:
            return None
        crc = crc32c.crc32c(part, crc)
        done += len(part)
    return crc


def newest_generation(fd: int, sb: Superblock) -> int:
    """The highest generation among the slot headers that hold (payloads are not read).

    A writer writes a slot's header after its payload, so a valid header is a commit.
    """
    best = -1
    for index in (0, 1):
        got = _slot_header(os.pread(fd, SLOT_HEADER_BYTES, sb.meta_offset + index * sb.meta_slot_bytes))
        if got is not None:
            best = max(best, got[0])
    return best


def write_slot(fd: int, sb: Superblock, index: int, generation: int, payload: bytes, sync=None) -> None:
    """Write a metadata slot (payload, then header) and make it durable.

    Raises OSError if any write is short or fails, or the sync fails: the slot then
    does not hold a commit the caller may count on (it may hold nothing valid), and the
    other slot is untouched.
    """
    if len(payload) > sb.meta_slot_bytes - SLOT_HEADER_BYTES:
        raise CacheFileError(
            f"metadata of {len(payload)} bytes exceeds the slot capacity of "
            f"{sb.meta_slot_bytes - SLOT_HEADER_BYTES} bytes; create the cache with a larger meta_slot_bytes"
        )
    off = sb.meta_offset + index * sb.meta_slot_bytes
    head = SLOT_HEADER.pack(SLOT_MAGIC, generation, len(payload), crc32c.crc32c(payload), 0)[:-4]
    head += struct.pack("<I", crc32c.crc32c(head))
    pwrite_all(fd, payload, off + SLOT_HEADER_BYTES)
    pwrite_all(fd, head.ljust(SLOT_HEADER_BYTES, b"\0"), off)
    (sync or os.fsync)(fd)


# ------------------------------------------------------------------ file primitives

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
