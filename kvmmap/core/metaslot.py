"""The two metadata slots: where a commit's payload goes, with its header (docs/FORMAT.md).

A commit writes its payload, then a 64-byte header (magic, generation, length, CRC-32C of
the payload, CRC-32C of the header) into the slot *not* holding the newest commit, and
syncs. The slot with the highest generation whose checksums hold is the committed state.
"""

from __future__ import annotations

import os
import struct

import crc32c

from ..errors import CacheFileError
from .fileio import pwrite_all
from .superblock import SLOT_HEADER_BYTES, Superblock

SLOT_MAGIC = b"KVMSLOT\x00"
SLOT_HEADER = struct.Struct("<8sQQII")          # magic, generation, payload_len, payload_crc, header_crc


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


def payload_length(fd: int, sb: Superblock, index: int) -> int | None:
    """Payload length a valid slot header announces (the payload is not read), or None."""
    got = _slot_header(os.pread(fd, SLOT_HEADER_BYTES, sb.meta_offset + index * sb.meta_slot_bytes))
    return None if got is None else got[1]
