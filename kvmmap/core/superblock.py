"""The superblock: the first 4096 bytes of a cache file (docs/FORMAT.md, Superblock).

Magic, version, geometry, formats, metadata slot placement and a model fingerprint,
checksummed. :meth:`Superblock.validate` is the one check of a geometry, for files being
opened and caches being created alike.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import crc32c

from .._validate import is_int
from ..errors import CacheFileError, ConfigError, FormatError, ShapeError
from ..formats import Format, format_by_id, get_format
from .layout import PageLayout

MAGIC = b"\x89KVMMAP\n"
VERSION = (1, 0)
SUPERBLOCK_BYTES = 4096
FINGERPRINT_BYTES = 32
SLOT_HEADER_BYTES = 64
_SB = struct.Struct("<8sHHIIIIIBBHHHQQQQ32s")   # superblock fields before the reserved bytes
_SB_CRC_AT = SUPERBLOCK_BYTES - 4
# geometry limits of docs/FORMAT.md, checked for files being opened and caches being created
LIMITS = {"num_layers": 1 << 16, "num_kv_heads": 1 << 12, "head_dim": 1 << 14, "page_size": 1 << 16}
MAX_INT4_K_PAGE_SIZE = (1 << 16) - 1        # int4 keys: page_size is stored in a 16-bit group size
DEFAULT_META_SLOT_BYTES = 64 << 20
MAX_META_SLOT_BYTES = (1 << 62) - 4096      # keeps arena_offset = 4096 + 2S a valid file offset (< 2**63)



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
        for name, v in (("num_layers", self.num_layers), ("num_kv_heads", self.num_kv_heads),
                        ("head_dim", self.head_dim), ("page_size", self.page_size)):
            hi = LIMITS[name]
            if not 1 <= v <= hi:
                bad(f"{name}={v} is outside 1..{hi}")
        k4, v4 = self.k_format.grouped, self.v_format.grouped
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


def geometry_superblock(num_layers, num_kv_heads, head_dim, page_size, k_format, v_format, v_group_size,
                        fingerprint, meta_slot_bytes) -> Superblock:
    """The superblock of a new cache, from :meth:`PagedKVCache.create`'s arguments.

    Raises ShapeError, ConfigError or FormatError (see ``create``) for arguments outside
    the limits of docs/FORMAT.md; the result passes :meth:`Superblock.validate`.
    """
    for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                    ("page_size", page_size)):
        hi = LIMITS[name]
        if not is_int(v) or not 1 <= v <= hi:
            raise ShapeError(f"{name} must be an integer in 1..{hi} (docs/FORMAT.md), found {v!r}")
    kf, vf = get_format(k_format), get_format(v_format)
    for f in (kf, vf):
        if f.grouped and head_dim % 2:
            raise ShapeError(f"int4 needs an even head_dim, found {head_dim}")
    if kf.grouped and page_size > MAX_INT4_K_PAGE_SIZE:
        raise ShapeError(f"int4 keys are grouped over a page and the group size field is 16 bits: page_size "
                         f"must be at most {MAX_INT4_K_PAGE_SIZE}, found {page_size}")
    if vf.grouped:
        if v_group_size is not None and not is_int(v_group_size):
            raise ConfigError(f"v_group_size must be an integer, found {v_group_size!r}")
        _, v_group_size = vf.resolve_grouping((1, head_dim), "token", v_group_size)   # default and limits
    elif v_group_size is not None:
        # the file has no group for such values; ignoring it would hide a mistaken setting
        raise ConfigError(f"v_group_size applies to int4 values only; v_format is {vf.name}, "
                          f"found v_group_size={v_group_size!r}")
    v_group_size = int(v_group_size or 0)
    if isinstance(fingerprint, str):
        fingerprint = fingerprint.encode()
    if not isinstance(fingerprint, (bytes, bytearray)):
        raise ConfigError(f"fingerprint must be bytes or str, found {type(fingerprint).__name__}")
    if len(fingerprint) > FINGERPRINT_BYTES:
        raise ShapeError(f"fingerprint holds at most {FINGERPRINT_BYTES} bytes, found {len(fingerprint)}")
    layout = PageLayout(num_kv_heads, head_dim, page_size, kf, vf, v_group_size)
    if meta_slot_bytes is None:
        tails = 128 * int(num_layers) * layout.tail_bytes
        meta_slot_bytes = max(DEFAULT_META_SLOT_BYTES, min(1 << 30, -(-tails // 4096) * 4096),
                              -(-(layout.tail_bytes + 64) // 4096) * 4096)
    if not is_int(meta_slot_bytes) or not 4096 <= meta_slot_bytes <= MAX_META_SLOT_BYTES or meta_slot_bytes % 4096:
        raise ShapeError(f"meta_slot_bytes must be a multiple of 4096 in 4096..{MAX_META_SLOT_BYTES}, "
                         f"found {meta_slot_bytes!r}")
    meta_slot_bytes = int(meta_slot_bytes)
    if layout.tail_bytes > meta_slot_bytes - 64:     # open() would refuse such a file
        raise ShapeError(f"meta_slot_bytes={meta_slot_bytes} cannot hold one sequence tail of this "
                         f"geometry ({layout.tail_bytes} bytes); pass a larger meta_slot_bytes")
    sb = Superblock(int(num_layers), int(num_kv_heads), int(head_dim), int(page_size), kf, vf,
                    int(page_size) if kf.grouped else 0, v_group_size, layout.page_bytes,
                    SUPERBLOCK_BYTES, meta_slot_bytes, SUPERBLOCK_BYTES + 2 * meta_slot_bytes, bytes(fingerprint))
    sb.validate("<new cache>")
    return sb
