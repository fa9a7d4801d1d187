"""Blobs: metadata bytes stored in a chain of arena pages (docs/FORMAT.md, Blobs).

A commit's index and each sequence's record are blobs. Every page of a blob starts with a
16-byte header (magic, next page, bytes used in this page, zero) and holds up to
``page_bytes - 16`` bytes of content; whoever names a blob names its first page, its length
and the CRC-32C of its content. Blob pages are written once, before the commit that names
them, and dropped like data pages when a later commit names a new version.
"""

from __future__ import annotations

import struct

import crc32c
import numpy as np

from ..errors import CacheFileError

BLOB_MAGIC = 0x424D564B             # "KVMB" little-endian
BLOB_HEAD = struct.Struct("<IIII")  # magic, next page (NO_PAGE: last), bytes used, zero
NO_PAGE = 0xFFFFFFFF


def pages_needed(nbytes: int, page_bytes: int) -> int:
    """Pages a blob of ``nbytes`` takes (at least one)."""
    room = page_bytes - BLOB_HEAD.size
    return max(1, -(-nbytes // room))


def write_blob(data: np.ndarray, page_bytes: int, pages, content: bytes) -> int:
    """Write ``content`` into ``pages`` (``pages_needed`` of them) of the arena bytes
    ``data``; returns the CRC-32C of the content."""
    room = page_bytes - BLOB_HEAD.size
    pages = [int(p) for p in pages]
    for i, p in enumerate(pages):
        part = content[i * room:(i + 1) * room]
        nxt = pages[i + 1] if i + 1 < len(pages) else NO_PAGE
        at = p * page_bytes
        data[at:at + BLOB_HEAD.size] = np.frombuffer(BLOB_HEAD.pack(BLOB_MAGIC, nxt, len(part), 0), np.uint8)
        data[at + BLOB_HEAD.size:at + BLOB_HEAD.size + len(part)] = np.frombuffer(part, np.uint8)
    return crc32c.crc32c(content)


def read_blob(data: np.ndarray, page_bytes: int, first: int, nbytes: int, crc: int, high_water: int,
              what: str) -> tuple[bytes, list[int]]:
    """(content, pages) of the blob starting at page ``first``; raises CacheFileError naming
    ``what`` if the chain or its checksum is wrong (every page id is checked against
    ``high_water`` before it is read, and the chain may not be longer than ``nbytes`` needs)."""
    room = page_bytes - BLOB_HEAD.size
    limit = pages_needed(nbytes, page_bytes)
    parts, pages, page, got = [], [], int(first), 0
    while True:
        if page >= high_water or len(pages) >= limit:
            raise CacheFileError(f"{what}: its page chain is broken at page {page} (after {len(pages)} pages, "
                                 f"{high_water} pages in use)")
        at = page * page_bytes
        magic, nxt, used, zero = BLOB_HEAD.unpack_from(data[at:at + BLOB_HEAD.size].tobytes())
        if magic != BLOB_MAGIC or zero or used > room or got + used > nbytes:
            raise CacheFileError(f"{what}: page {page} is not a metadata page of it")
        parts.append(data[at + BLOB_HEAD.size:at + BLOB_HEAD.size + used].tobytes())
        pages.append(page)
        got += used
        if nxt == NO_PAGE:
            break
        page = nxt
    content = b"".join(parts)
    if got != nbytes or crc32c.crc32c(content) != crc:
        raise CacheFileError(f"{what}: {got} bytes (expected {nbytes}) or checksum mismatch")
    return content, pages
