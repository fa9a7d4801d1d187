"""The superblock: the first 4096 bytes of a cache file (docs/FORMAT.md, Superblock).

Magic, version, geometry, formats, where the two commit roots and the arena sit, a pool
limit and a model fingerprint, checksummed. :meth:`Superblock.validate` is the one check of a geometry, for files being
opened and caches being created alike.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import crc32c
import numpy as np

from .._validate import is_int
from ..errors import CacheFileError, ConfigError, FormatError, ShapeError
from ..formats import Format, format_by_id, get_format
from .layout import PageLayout

MAGIC = b"\x89KVMMAP\n"
VERSION = (2, 0)
SUPERBLOCK_BYTES = 4096
FINGERPRINT_BYTES = 32
ROOT_OFFSET = 4096                  # root 0 at 4096, root 1 at 8192, each in its own 4 KiB block
ROOT_BYTES = 4096
ARENA_OFFSET = ROOT_OFFSET + 2 * ROOT_BYTES
_SB = struct.Struct("<8sHHIIIIIBBHHHQQQQ32sQ")   # superblock fields before the reserved bytes
_SB_CRC_AT = SUPERBLOCK_BYTES - 4
# geometry limits of docs/FORMAT.md, checked for files being opened and caches being created
LIMITS = {"num_layers": 1 << 16, "num_kv_heads": 1 << 12, "head_dim": 1 << 14, "page_size": 1 << 16}
MAX_INT4_K_PAGE_SIZE = (1 << 16) - 1        # int4 keys: page_size is stored in a 16-bit group size
DEFAULT_PAGE_SIZE = 16
DEFAULT_INT4_K_PAGE_SIZE = 64               # int4 keys are grouped per channel over the page (KIVI)
MAX_POOL_BYTES = 1 << 62
SIDE_DTYPE = np.float16                     # scales and zero points in pages (format 1.0: float32)


def file_version(raw: bytes) -> tuple[int, int] | None:
    """(major, minor) of a file starting with ``raw``, or None if it is not a kvmmap cache."""
    if len(raw) < 12 or raw[:8] != MAGIC:
        return None
    return struct.unpack_from("<HH", raw, 8)



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
    root_offset: int
    root_bytes: int
    arena_offset: int
    fingerprint: bytes
    max_bytes: int = 0              # bytes of pages holding tokens; 0: no limit
    version: tuple = VERSION

    def pack(self) -> bytes:
        head = _SB.pack(
            MAGIC, *self.version, SUPERBLOCK_BYTES, self.num_layers, self.num_kv_heads,
            self.head_dim, self.page_size, self.k_format.format_id, self.v_format.format_id,
            self.k_group_size, self.v_group_size, 0, self.page_bytes, self.root_offset, self.root_bytes,
            self.arena_offset, self.fingerprint.ljust(FINGERPRINT_BYTES, b"\0"), self.max_bytes,
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
         root_off, root_bytes, arena_off, fp, max_bytes) = _SB.unpack_from(raw)
        if major != VERSION[0]:
            hint = (" (a format 1 file: open it with mode='r', or upgrade it with `kvmmap convert --upgrade`)"
                    if major == 1 else "")
            raise CacheFileError(
                f"{path}: format version {major}.{minor} is not supported here; this kvmmap writes "
                f"{VERSION[0]}.x{hint}")
        (stored,) = struct.unpack_from("<I", raw, _SB_CRC_AT)
        if crc32c.crc32c(raw[:_SB_CRC_AT]) != stored:
            raise CacheFileError(f"{path}: damaged header: superblock checksum mismatch")
        if sb_bytes != SUPERBLOCK_BYTES or flags != 0:
            raise CacheFileError(f"{path}: damaged header: superblock size {sb_bytes} (expected "
                                 f"{SUPERBLOCK_BYTES}) or flags {flags} (expected 0)")
        # a later 1.x may add fields in the reserved bytes, which this version ignores
        if minor == 0 and any(raw[_SB.size:_SB_CRC_AT]):
            raise CacheFileError(f"{path}: damaged header: reserved bytes {_SB.size}..{_SB_CRC_AT - 1} "
                                 f"of a version {major}.0 file are not zero")
        try:
            kfmt, vfmt = format_by_id(kf), format_by_id(vf)
        except FormatError as e:
            raise CacheFileError(f"{path}: damaged header: {e}") from None
        sb = cls(L, H, D, P, kfmt, vfmt, kg, vg, page_bytes, root_off, root_bytes, arena_off, fp, max_bytes,
                 (major, minor))
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
        if (self.root_offset, self.root_bytes, self.arena_offset) != (ROOT_OFFSET, ROOT_BYTES, ARENA_OFFSET):
            bad(f"roots at {self.root_offset} of {self.root_bytes} bytes and arena at {self.arena_offset} are "
                f"misplaced (expected {ROOT_OFFSET}, {ROOT_BYTES}, {ARENA_OFFSET})")
        if k4 and layout.page_bytes < 2 * self.num_kv_heads * self.head_dim:
            bad(f"page_bytes={layout.page_bytes} cannot hold one float16 row of open int4 keys")
        if self.max_bytes and not self.page_bytes <= self.max_bytes <= MAX_POOL_BYTES:
            bad(f"max_bytes={self.max_bytes} is outside {self.page_bytes} (one page)..{MAX_POOL_BYTES}")

    def check_file_size(self, size: int, path: str) -> None:
        """Refuse a file too short to hold its own header and commit roots."""
        if size < self.arena_offset:
            raise CacheFileError(f"{path}: truncated file: {size} bytes, but its commit roots end at "
                                 f"byte {self.arena_offset}")

    @property
    def max_pages(self) -> int:
        """Pages of tokens the pool may hold (``max_bytes // page_bytes``; 0: no limit)."""
        return self.max_bytes // self.page_bytes if self.max_bytes else 0

    def layout(self) -> PageLayout:
        try:
            return PageLayout(self.num_kv_heads, self.head_dim, self.page_size,
                              self.k_format, self.v_format, self.v_group_size, side_dtype=SIDE_DTYPE)
        except (ValueError, ZeroDivisionError) as e:
            raise CacheFileError(f"damaged header: inconsistent geometry ({e})") from None


def default_page_size(k_format) -> int:
    """16 tokens, or 64 when keys are int4 (grouped per channel over the page: 64 tokens
    put their float16 scale and zero point at 0.5 bit per element)."""
    return DEFAULT_INT4_K_PAGE_SIZE if get_format(k_format).grouped else DEFAULT_PAGE_SIZE


def geometry_superblock(num_layers, num_kv_heads, head_dim, page_size, k_format, v_format, v_group_size,
                        fingerprint, max_bytes=None) -> Superblock:
    """The superblock of a new cache, from :meth:`PagedKVCache.create`'s arguments.

    Raises ShapeError, ConfigError or FormatError (see ``create``) for arguments outside
    the limits of docs/FORMAT.md; the result passes :meth:`Superblock.validate`.
    """
    kf, vf = get_format(k_format), get_format(v_format)
    if page_size is None:
        page_size = default_page_size(kf)
    for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                    ("page_size", page_size)):
        hi = LIMITS[name]
        if not is_int(v) or not 1 <= v <= hi:
            raise ShapeError(f"{name} must be an integer in 1..{hi} (docs/FORMAT.md), found {v!r}")
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
    layout = PageLayout(num_kv_heads, head_dim, page_size, kf, vf, v_group_size, side_dtype=SIDE_DTYPE)
    if max_bytes is not None and not (is_int(max_bytes) and layout.page_bytes <= max_bytes <= MAX_POOL_BYTES):
        raise ShapeError(f"max_bytes must be None or an integer in {layout.page_bytes} (one page)..{MAX_POOL_BYTES}, "
                         f"found {max_bytes!r}")
    if kf.grouped and layout.page_bytes < 2 * num_kv_heads * head_dim:
        raise ShapeError(f"page_size={page_size} is too small for int4 keys: a page must hold one float16 row "
                         "of the open key group; use page_size >= 4")
    sb = Superblock(int(num_layers), int(num_kv_heads), int(head_dim), int(page_size), kf, vf,
                    int(page_size) if kf.grouped else 0, v_group_size, layout.page_bytes,
                    ROOT_OFFSET, ROOT_BYTES, ARENA_OFFSET, bytes(fingerprint), int(max_bytes or 0))
    sb.validate("<new cache>")
    return sb
