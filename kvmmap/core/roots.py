"""The two commit roots: 64 bytes each, naming a commit's index blob (docs/FORMAT.md, Roots).

A commit writes its root into the root block *not* holding the newest commit, after every
page the commit lists is durable. The root with the highest generation whose checksum
holds is the committed state.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import crc32c

from .fileio import pwrite_all
from .superblock import Superblock

ROOT_MAGIC = b"KVMROOT\x00"
_ROOT = struct.Struct("<8sQQQIIII12s")          # the fields before the checksum
ROOT_RECORD_BYTES = _ROOT.size + 4              # 64
NO_PAGE = 0xFFFFFFFF


@dataclass(frozen=True)
class Root:
    """One commit's root.

    Attributes
    ----------
    generation : int
        The newer commit has the larger number.
    high_water : int
        Pages ``0 .. high_water - 1`` have been handed out (data and metadata pages).
    index_page, index_bytes, index_crc : int
        The index blob: its first page (NO_PAGE when there are no sequences), its length
        and CRC-32C.
    next_sequence_id, num_sequences : int
    """

    generation: int
    high_water: int
    index_page: int
    index_bytes: int
    index_crc: int
    next_sequence_id: int
    num_sequences: int

    def pack(self) -> bytes:
        body = _ROOT.pack(ROOT_MAGIC, self.generation, self.high_water, self.index_bytes, self.index_page,
                          self.index_crc, self.next_sequence_id, self.num_sequences, bytes(12))
        return body + struct.pack("<I", crc32c.crc32c(body))

    @classmethod
    def unpack(cls, raw: bytes) -> "Root | None":
        """The root in ``raw`` (64 bytes), or None if it is empty or fails its checks."""
        if len(raw) < ROOT_RECORD_BYTES:
            return None
        (magic, gen, hw, ibytes, ipage, icrc, next_id, nseq, reserved) = _ROOT.unpack_from(raw)
        (stored,) = struct.unpack_from("<I", raw, _ROOT.size)
        if magic != ROOT_MAGIC or crc32c.crc32c(raw[:_ROOT.size]) != stored or any(reserved):
            return None
        return cls(gen, hw, ipage, ibytes, icrc, next_id, nseq)


def root_offset(sb: Superblock, index: int) -> int:
    return sb.root_offset + index * sb.root_bytes


def read_root(fd: int, sb: Superblock, index: int) -> Root | None:
    """Root ``index`` (0 or 1) of the file, or None if it is empty or damaged."""
    return Root.unpack(os.pread(fd, ROOT_RECORD_BYTES, root_offset(sb, index)))


def write_root(fd: int, sb: Superblock, index: int, root: Root, sync=None) -> None:
    """Write root ``index`` in one call and make it durable (``sync``: os.fsync or a
    wrapper). Raises OSError if the write is short or fails or the sync fails."""
    pwrite_all(fd, root.pack(), root_offset(sb, index))
    (sync or os.fsync)(fd)
