"""A reader of format 1.0 cache files that stands on its own (docs/FORMAT.md of 1.0).

The core modules follow the newest format; this module keeps files written in format 1.0
(and any 1.x, which only adds fields in reserved bytes) readable after they move on, and
is what ``kvmmap convert --upgrade`` reads. It therefore shares no code with the
superblock, metadata-slot, payload, layout or arena modules: everything it knows of 1.0
is written here, from the format's byte tables, and decoded with numpy.

It checks what a 1.0 reader checked: the superblock's checksum and rules, both metadata
slots' checksums (the newest valid commit, or ``commit="previous"``), every rule of the
payload, and the CRC-32C of each page before its rows are decoded. Damage is a
:class:`~kvmmap.errors.CacheFileError` that says what was expected and what was found.

Typical use (``convert --upgrade`` does this for every sequence)::

    from kvmmap.core.legacy import is_v1, read_v1

    if is_v1("old.kvm"):
        with read_v1("old.kvm") as f:
            for sid, s in f.sequences.items():
                k, v = f.read(sid, 0)            # float32 [visible tokens, H, D]
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass, field

import crc32c
import numpy as np

from .._validate import check_layer, is_int
from ..errors import CacheFileError, ConfigError, FormatError, SequenceError, ShapeError
from ..formats import Format, format_by_id

MAGIC = b"\x89KVMMAP\n"
MAJOR = 1
SUPERBLOCK_BYTES = 4096
SLOT_HEADER_BYTES = 64
SLOT_MAGIC = b"KVMSLOT\x00"
ALIGN = 64                                          # page regions start on 64-byte boundaries
# magic, major, minor, superblock bytes, L, H, D, P, k id, v id, k group, v group, flags,
# page_bytes, meta_offset, meta_slot_bytes, arena_offset, fingerprint
_SB = struct.Struct("<8sHHIIIIIBBHHHQQQQ32s")
_SB_CRC_AT = SUPERBLOCK_BYTES - 4
_SLOT = struct.Struct("<8sQQII")                    # magic, generation, payload length, payload crc, header crc
_META = struct.Struct("<QIII")                      # high_water, num_sequences, next_sequence_id, reserved
_SEQ = struct.Struct("<IHH")                        # sequence id, name length, has_name
_LAYER = struct.Struct("<QII")                      # n_pos, first, num_pages
_LIMITS = {"num_layers": 1 << 16, "num_kv_heads": 1 << 12, "head_dim": 1 << 14, "page_size": 1 << 16}
_CHUNK = 4 << 20                                    # large payloads are checksummed in chunks first


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _fp8_table(fmt: Format) -> np.ndarray:
    """float32 value of each of the 256 codes of an OCP fp8 format (NaN where reserved).

    e4m3fn: 4 exponent bits, bias 7, no infinity, S.1111.111 is NaN; e5m2: 5 exponent
    bits, bias 15, IEEE-like (exponent all ones: infinity or NaN).
    """
    e4m3 = fmt.format_id == 5
    ebits, mbits, bias = (4, 3, 7) if e4m3 else (5, 2, 15)
    codes = np.arange(256)
    e = (codes >> mbits) & ((1 << ebits) - 1)
    m = codes & ((1 << mbits) - 1)
    val = np.where(e == 0, np.ldexp(m.astype(np.float64), 1 - bias - mbits),
                   np.ldexp(1.0 + m / float(1 << mbits), e - bias))
    top = (1 << ebits) - 1
    if e4m3:
        val = np.where((e == top) & (m == (1 << mbits) - 1), np.nan, val)
    else:
        val = np.where(e == top, np.where(m == 0, np.inf, np.nan), val)
    return np.where(codes & 0x80, -val, val).astype(np.float32)


@dataclass(frozen=True)
class _Region:
    """One array of a page side: byte offset in the page, little-endian dtype, shape."""

    name: str
    offset: int
    dtype: np.dtype
    shape: tuple

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


# the little-endian code type of each 1.0 format id (fp16 as IEEE binary16, bf16 as its bits)
_CODE_DTYPE = {0: "<f4", 1: "<f2", 2: "<u2", 3: "i1", 4: "u1", 5: "u1", 6: "u1"}


def _side_regions(fmt: Format, side: str, H: int, P: int, D: int, v_group: int, offset: int):
    """([regions of one side of a page], offset after them), per FORMAT.md 1.0, Pages."""
    codes = _Region("codes", offset, np.dtype(_CODE_DTYPE[fmt.format_id]),
                    (H, P, D // 2 if fmt.grouped else D))
    regions, offset = [codes], _align(offset + codes.nbytes)
    if fmt.scaled:
        shape = (H, P) if not fmt.grouped else (H, 1, D) if side == "k" else (H, P, D // v_group)
        for name in ("scales", "zeros") if fmt.zero_point else ("scales",):
            r = _Region(name, offset, np.dtype("<f4"), shape)
            regions.append(r)
            offset = _align(offset + r.nbytes)
    return regions, offset


@dataclass(frozen=True, eq=False)
class V1Layer:
    """One layer of a sequence, as its commit records it.

    Attributes
    ----------
    n_pos : int
        Positions written: sealed pages ``* page_size`` plus the open page's positions.
    first : int
        Positions dropped at the front by ``shift_left`` (``< page_size``); visible token
        ``i`` is position ``first + i``.
    pages : numpy.ndarray
        uint32 ``[num_sealed_pages]``, physical page ids in logical order.
    """

    n_pos: int
    first: int
    pages: np.ndarray
    tail: dict = field(repr=False)      # {side: {region name: array in the page's shape}}

    @property
    def length(self) -> int:
        """Visible tokens: ``n_pos - first``."""
        return self.n_pos - self.first


@dataclass(frozen=True, eq=False)
class V1Sequence:
    """A sequence of a format 1.0 file: its id, name (or None) and one :class:`V1Layer` per layer."""

    seq_id: int
    name: str | None
    layers: tuple


class V1File:
    """A format 1.x cache file opened read-only at one commit (see :func:`read_v1`).

    Attributes
    ----------
    path : str
    version : tuple of int
        ``(1, minor)``.
    num_layers, num_kv_heads, head_dim, page_size : int
        The geometry (``H = num_kv_heads``, ``D = head_dim``, ``P = page_size``).
    k_format, v_format : str
        Storage format names of keys and values.
    v_group_size : int
        Elements per int4 value group along head_dim (0 unless values are int4). int4
        keys are grouped per channel over a page (``page_size`` tokens).
    fingerprint : bytes
        The model fingerprint, zero padding removed.
    generation, slot : int
        The commit read: its generation and metadata slot.
    high_water : int
        Pages ``0 .. high_water - 1`` had been handed out.
    next_sequence_id : int
        The id the next new sequence would have taken (ids are never reused).
    sequences : dict of int to V1Sequence
        In the order the commit lists them.
    """

    def __init__(self, path: str, raw_sb: bytes, size: int):
        self.path = path
        self._parse_superblock(raw_sb, size)
        self._map = None
        self._arena = np.zeros(0, np.uint8)
        self._checked: set[int] = set()

    # ------------------------------------------------------------------ superblock

    def _bad_header(self, msg: str):
        raise CacheFileError(f"{self.path}: damaged header: {msg}")

    def _parse_superblock(self, raw: bytes, size: int) -> None:
        path = self.path
        if len(raw) < SUPERBLOCK_BYTES:
            raise CacheFileError(f"{path}: not a kvmmap cache: {len(raw)} bytes, shorter than the "
                                 f"{SUPERBLOCK_BYTES}-byte header")
        if raw[:8] != MAGIC:
            raise CacheFileError(f"{path}: not a kvmmap cache: magic {raw[:8]!r}, expected {MAGIC!r}")
        (_, major, minor, sb_bytes, L, H, D, P, kid, vid, kg, vg, flags, page_bytes, meta_off, slot_bytes,
         arena_off, fingerprint) = _SB.unpack_from(raw)
        if major != MAJOR:
            raise CacheFileError(f"{path}: format version {major}.{minor} is not 1.x; this reader reads "
                                 "format 1 files only (open newer files with kvmmap.PagedKVCache.open)")
        (stored,) = struct.unpack_from("<I", raw, _SB_CRC_AT)
        actual = crc32c.crc32c(raw[:_SB_CRC_AT])
        if actual != stored:
            self._bad_header(f"superblock checksum mismatch (stored {stored:#010x}, computed {actual:#010x})")
        if sb_bytes != SUPERBLOCK_BYTES or flags != 0:
            self._bad_header(f"superblock size {sb_bytes} (expected {SUPERBLOCK_BYTES}) or flags {flags} "
                             "(expected 0)")
        if minor == 0 and any(raw[_SB.size:_SB_CRC_AT]):       # a later 1.x may add fields there
            self._bad_header(f"reserved bytes {_SB.size}..{_SB_CRC_AT - 1} of a version 1.0 file are not zero")
        for name, v in (("num_layers", L), ("num_kv_heads", H), ("head_dim", D), ("page_size", P)):
            if not 1 <= v <= _LIMITS[name]:
                self._bad_header(f"{name}={v} is outside 1..{_LIMITS[name]}")
        try:
            kf, vf = format_by_id(kid), format_by_id(vid)
        except FormatError as e:
            self._bad_header(str(e))
        if kid not in _CODE_DTYPE or vid not in _CODE_DTYPE:
            self._bad_header(f"format ids {kid} / {vid}: format 1.0 knows ids 0..6 only")
        if (kf.grouped or vf.grouped) and D % 2:
            self._bad_header(f"head_dim={D} is odd, but int4 packs two codes a byte")
        if kg != (P if kf.grouped else 0):
            self._bad_header(f"k group size is {kg}, expected {P if kf.grouped else 0} for {kf.name} keys")
        if not vf.grouped and vg != 0:
            self._bad_header(f"v group size is {vg}, expected 0 for {vf.name} values")
        if vf.grouped and not (2 <= vg <= 256 and vg % 2 == 0 and D % vg == 0):
            self._bad_header(f"v group size is {vg}, expected an even number in 2..256 that divides "
                             f"head_dim={D} for int4 values")
        self.version = (major, minor)
        self.num_layers, self.num_kv_heads, self.head_dim, self.page_size = L, H, D, P
        self._formats = {"k": kf, "v": vf}
        self.k_format, self.v_format = kf.name, vf.name
        self.v_group_size = vg
        self.fingerprint = fingerprint.rstrip(b"\0")
        self._regions, off = {}, 0
        for side in ("k", "v"):
            self._regions[side], off = _side_regions(self._formats[side], side, H, P, D, vg, off)
        if page_bytes != off:
            self._bad_header(f"page_bytes={page_bytes} does not match the geometry ({off})")
        if meta_off != SUPERBLOCK_BYTES or slot_bytes < 4096 or slot_bytes % 4096:
            self._bad_header(f"metadata slots at {meta_off} of {slot_bytes} bytes are misplaced")
        if arena_off != meta_off + 2 * slot_bytes:
            self._bad_header(f"arena offset {arena_off} does not follow the metadata slots")
        # the open page of one (sequence, layer): each side's regions packed, int4 as float32
        self._tail_regions = {}
        tail_bytes = 0
        for side in ("k", "v"):
            if self._formats[side].grouped:
                regs = [_Region("codes", 0, np.dtype("<f4"), (H, P, D))]
            else:
                regs = self._regions[side]
            self._tail_regions[side] = regs
            tail_bytes += sum(r.nbytes for r in regs)
        if tail_bytes > slot_bytes - SLOT_HEADER_BYTES:
            self._bad_header(f"one sequence tail of this geometry ({tail_bytes} bytes) does not fit the "
                             f"{slot_bytes}-byte metadata slots")
        if size < arena_off:
            raise CacheFileError(f"{path}: truncated file: {size} bytes, but its metadata slots end at byte "
                                 f"{arena_off}")
        self._tail_bytes = tail_bytes
        self.page_bytes, self.meta_slot_bytes, self.arena_offset = page_bytes, slot_bytes, arena_off
        self._file_pages = (size - arena_off) // page_bytes

    # ------------------------------------------------------------------ metadata slots

    def _read_slot(self, fd: int, index: int):
        """(generation, payload) of a slot whose checksums hold and padding is zero, else None."""
        off = SUPERBLOCK_BYTES + index * self.meta_slot_bytes
        head = os.pread(fd, SLOT_HEADER_BYTES, off)
        if len(head) < SLOT_HEADER_BYTES:
            return None
        magic, gen, length, payload_crc, header_crc = _SLOT.unpack_from(head)
        if (magic != SLOT_MAGIC or crc32c.crc32c(head[:_SLOT.size - 4]) != header_crc
                or any(head[_SLOT.size:])):
            return None
        start = off + SLOT_HEADER_BYTES
        if length > self.meta_slot_bytes - SLOT_HEADER_BYTES or start + length > os.fstat(fd).st_size:
            return None
        if length > 4 * _CHUNK:
            # checked in chunks before it is read whole: a forged header announcing hundreds
            # of MiB of a sparse slot costs no memory
            crc, done = 0, 0
            while done < length:
                part = os.pread(fd, min(_CHUNK, length - done), start + done)
                if not part:
                    return None
                crc, done = crc32c.crc32c(part, crc), done + len(part)
            if crc != payload_crc:
                return None
        payload = os.pread(fd, length, start)
        if len(payload) != length or crc32c.crc32c(payload) != payload_crc:
            return None
        return gen, payload

    def _load(self, fd: int, commit: str) -> None:
        slots = [self._read_slot(fd, i) for i in (0, 1)]
        valid = sorted((s[0], i, s[1]) for i, s in enumerate(slots) if s is not None)
        if not valid:
            raise CacheFileError(f"{self.path}: damaged metadata: neither metadata slot holds a valid commit")
        if commit == "previous" and len(valid) < 2:
            raise CacheFileError(f"{self.path}: no previous commit: slot {1 - valid[0][1]} holds no valid commit "
                                 f"(slot {valid[0][1]} holds the only one, generation {valid[0][0]})")
        self.generation, self.slot, payload = valid[0] if commit == "previous" else valid[-1]
        try:
            self._parse_payload(payload)
        except CacheFileError as e:
            raise CacheFileError(
                f"{self.path}: damaged metadata: the {commit} commit (slot {self.slot}, generation "
                f"{self.generation}) passes its checksums but is invalid: {e}") from None

    # ------------------------------------------------------------------ payload

    def _parse_payload(self, payload: bytes) -> None:
        """Every rule of FORMAT.md 1.0, Payload; CacheFileError(reason) when one fails."""
        def bad(msg):
            raise CacheFileError(msg)

        P, n = self.page_size, len(payload)
        if n < _META.size:
            bad(f"{n} bytes, shorter than the {_META.size}-byte payload head")
        hw, nseq, next_id, reserved = _META.unpack_from(payload)
        off = _META.size
        if reserved:
            bad(f"reserved field is {reserved}, expected 0")
        if off + 4 * hw > n:
            bad(f"{hw} page checksums do not fit in {n} bytes")
        if hw > self._file_pages:
            bad(f"{hw} pages are in use but the file holds only {self._file_pages}: truncated file")
        self.page_crc = np.frombuffer(payload, "<u4", hw, off).astype(np.uint32)
        off += 4 * hw
        seqs, names = {}, set()
        owner = np.full(hw, -1, np.int64)          # the layer whose tables list each page
        for _ in range(nseq):
            if off + _SEQ.size > n:
                bad("sequence table truncated")
            sid, name_len, has_name = _SEQ.unpack_from(payload, off)
            off += _SEQ.size
            if has_name not in (0, 1) or (not has_name and name_len) or off + name_len > n:
                bad(f"sequence {sid}: name field (length {name_len}, has_name {has_name}) is inconsistent")
            try:
                name = payload[off:off + name_len].decode("utf-8") if has_name else None
            except UnicodeDecodeError:
                bad(f"sequence {sid}: its name is not UTF-8")
            off += name_len + (-name_len % 4)
            if sid >= next_id or sid in seqs or (name is not None and name in names):
                bad(f"sequence id {sid} or name {name!r} repeated or not below next_sequence_id {next_id}")
            layers = []
            for layer in range(self.num_layers):
                if off + _LAYER.size > n:
                    bad(f"sequence {sid}: block table truncated")
                n_pos, first, npages = _LAYER.unpack_from(payload, off)
                off += _LAYER.size
                if not (npages * P <= n_pos < (npages + 1) * P and first <= n_pos and first < P):
                    bad(f"sequence {sid}, layer {layer}: inconsistent block table (positions {n_pos}, "
                        f"first {first}, pages {npages})")
                if off + 4 * npages + self._tail_bytes > n:
                    bad(f"sequence {sid}, layer {layer}: block table truncated")
                pages = np.frombuffer(payload, "<u4", npages, off).astype(np.uint32)
                off += 4 * npages
                if npages:
                    if int(pages.max()) >= hw:
                        bad(f"sequence {sid}, layer {layer} refers to page {int(pages.max())} beyond the "
                            f"{hw} pages in use")
                    uniq = np.unique(pages)
                    if len(uniq) != npages:
                        bad(f"sequence {sid}, layer {layer}: its block table lists a page twice")
                    others = owner[uniq]
                    clash = uniq[(others >= 0) & (others != layer)]
                    if len(clash):
                        bad(f"sequence {sid}, layer {layer}: page {int(clash[0])} is listed by tables of "
                            "another layer too (a page holds tokens of one layer)")
                    owner[uniq] = layer
                tail = {}
                for side in ("k", "v"):
                    tail[side] = {}
                    for r in self._tail_regions[side]:
                        tail[side][r.name] = np.frombuffer(payload, r.dtype, int(np.prod(r.shape)),
                                                           off).reshape(r.shape)
                        off += r.nbytes
                layers.append(V1Layer(int(n_pos), int(first), pages, tail))
            seqs[sid] = V1Sequence(int(sid), name, tuple(layers))
            if name is not None:
                names.add(name)
        if off != n:
            bad(f"{n - off} unexpected trailing bytes")
        self.high_water, self.next_sequence_id, self.sequences = int(hw), int(next_id), seqs

    def _map_arena(self, fd: int) -> None:
        """Map the pages in use read-only (the offset rounded down to the map granularity)."""
        nbytes = self.high_water * self.page_bytes
        if nbytes == 0:
            return
        start = self.arena_offset - self.arena_offset % mmap.ALLOCATIONGRANULARITY
        try:
            self._map = mmap.mmap(fd, self.arena_offset + nbytes - start, access=mmap.ACCESS_READ, offset=start)
        except (OSError, ValueError) as e:
            raise CacheFileError(f"{self.path}: cannot map its {self.high_water} pages: {e}") from None
        self._arena = np.frombuffer(self._map, np.uint8, nbytes, self.arena_offset - start)

    # ------------------------------------------------------------------ reading

    def find_sequence(self, name: str) -> int:
        """Id of the sequence called ``name``; SequenceError if there is none."""
        for s in self.sequences.values():
            if s.name == name:
                return s.seq_id
        raise SequenceError(f"{self.path}: no sequence is named {name!r}")

    def _sequence(self, seq) -> V1Sequence:
        if not is_int(seq) or int(seq) not in self.sequences:
            raise SequenceError(f"{self.path}: unknown sequence {seq!r}; the file holds ids "
                                f"{sorted(self.sequences)[:8]}{' ...' if len(self.sequences) > 8 else ''}")
        return self.sequences[int(seq)]

    def page(self, page: int) -> np.ndarray:
        """The bytes of one sealed page (uint8 ``[page_bytes]``, a read-only view), its
        CRC-32C checked against the commit's; CacheFileError names a page that fails it."""
        if self._map is None and self.high_water:
            raise CacheFileError(f"{self.path}: the file is closed")
        if not 0 <= page < self.high_water:
            raise CacheFileError(f"{self.path}: page {page} is beyond the {self.high_water} pages in use")
        raw = self._arena[page * self.page_bytes:(page + 1) * self.page_bytes]
        if page not in self._checked:
            actual = crc32c.crc32c(raw)
            if actual != int(self.page_crc[page]):
                raise CacheFileError(f"{self.path}: damaged page {page}: its CRC-32C is {actual:#010x}, the commit "
                                     f"records {int(self.page_crc[page]):#010x}")
            self._checked.add(page)
        return raw

    def _decode(self, side: str, arrays: dict, rows: int) -> np.ndarray:
        """float32 ``[H, rows, D]`` of rows ``0 .. rows - 1`` of one side of a page (or of a
        non-int4 open page), given its region arrays ``{name: [H, P, ...]}``."""
        f = self._formats[side]
        codes = arrays["codes"][:, :rows]
        if f.grouped:
            # code * scale + zero in float64 (exact but for the addition) and rounded once,
            # as a fused multiply-add would; the kernels may or may not fuse it
            x = np.empty(codes.shape[:-1] + (2 * codes.shape[-1],), np.float64)
            x[..., 0::2] = codes & 15                   # element 2j in the low nibble
            x[..., 1::2] = codes >> 4
            if side == "k":                             # per channel over the page: [H, 1, D]
                s, z = arrays["scales"], arrays["zeros"]
            else:                                       # per group of G along head_dim: [H, P, D / G]
                G = self.v_group_size
                s = np.repeat(arrays["scales"][:, :rows], G, axis=-1)
                z = np.repeat(arrays["zeros"][:, :rows], G, axis=-1)
            return (x * s + z).astype(np.float32)
        if f.format_id in (0, 1):                     # fp32, fp16 (stored as <f2)
            return codes.astype(np.float32)
        if f.format_id == 2:
            return (codes.astype(np.uint32) << 16).view(np.float32)
        if f.format_id == 3:
            x = codes.astype(np.float32)
        else:
            x = _fp8_table(f)[codes]
        return x * arrays["scales"][:, :rows, None]

    def _page_side(self, page: int, side: str) -> np.ndarray:
        """float32 ``[H, P, D]`` of one side of a sealed page."""
        raw = self.page(page)
        arrays = {r.name: np.frombuffer(raw, r.dtype, int(np.prod(r.shape)), r.offset).reshape(r.shape)
                  for r in self._regions[side]}
        return self._decode(side, arrays, self.page_size)

    def read(self, seq: int, layer: int, start: int = 0, stop: int | None = None, *,
             dropped: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """K and V of tokens ``start .. stop - 1`` of one (sequence, layer), decoded to float32.

        Sealed pages are decoded from the mapped file (each page's checksum checked
        first; only the pages the range touches are read), the open page from the commit:
        in its side's format, or float32 for an int4 side.

        Parameters
        ----------
        seq : int
            Sequence id.
        layer : int
            ``0 .. num_layers - 1``.
        start, stop : int
            Visible tokens (``0 <= start <= stop <= length``; default: all of them).
        dropped : bool
            Count from the start of the first page instead: the ``first`` positions that
            ``shift_left`` dropped in front (the first page still holds them) come first,
            then the visible tokens (visible token ``i`` is row ``first + i``, and ``stop``
            may go up to ``n_pos``).

        Returns
        -------
        k, v : numpy.ndarray
            float32 ``[stop - start, H, D]``, C-contiguous.

        Raises
        ------
        SequenceError
            Unknown ``seq``.
        ShapeError
            ``layer`` or the range out of bounds.
        CacheFileError
            A page fails its checksum (the message names it), or the file is closed.
        """
        st = self._sequence(seq).layers[check_layer(layer, self.num_layers)]
        H, P, D = self.num_kv_heads, self.page_size, self.head_dim
        base = 0 if dropped else st.first
        total = st.n_pos - base
        stop = total if stop is None else stop
        if not (is_int(start) and is_int(stop) and 0 <= start <= stop <= total):
            raise ShapeError(f"expected 0 <= start <= stop <= {total}, found start={start!r}, stop={stop!r}")
        a, b = base + int(start), base + int(stop)          # rows of the page grid
        sealed = len(st.pages) * P
        out = []
        for side in ("k", "v"):
            x = np.empty((b - a, H, D), np.float32)
            for i in range(a // P, min(-(-b // P), len(st.pages))):
                lo, hi = max(a, i * P), min(b, (i + 1) * P)
                x[lo - a:hi - a] = self._page_side(int(st.pages[i]), side)[:, lo - i * P:hi - i * P].transpose(1, 0, 2)
            if b > sealed:
                tail, rows = st.tail[side], b - sealed
                part = tail["codes"][:, :rows] if self._formats[side].grouped else self._decode(side, tail, rows)
                lo = max(a, sealed)
                x[lo - a:] = part[:, lo - sealed:].transpose(1, 0, 2)
            out.append(x)
        return out[0], out[1]

    def seq_len(self, seq: int, layer: int) -> int:
        """Visible tokens of one (sequence, layer)."""
        return self._sequence(seq).layers[check_layer(layer, self.num_layers)].length

    def verify(self) -> list[int]:
        """Ids of the pages listed by a block table whose checksum fails (sorted)."""
        bad = []
        listed = {int(p) for s in self.sequences.values() for st in s.layers for p in st.pages}
        for p in sorted(listed):
            try:
                self.page(p)
            except CacheFileError:
                bad.append(p)
        return bad

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Unmap the file (arrays :meth:`read` returned are copies and stay valid)."""
        self._arena = np.zeros(0, np.uint8)
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass        # a view is still referenced (a traceback's frame): unmapped once it goes
            self._map = None

    def __enter__(self) -> V1File:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"V1File({self.path!r}, version {self.version[0]}.{self.version[1]}, {self.num_layers} layers x "
                f"{self.num_kv_heads} heads x head_dim {self.head_dim}, page_size {self.page_size}, "
                f"K {self.k_format}, V {self.v_format}, {len(self.sequences)} sequences)")


def _open(path) -> tuple[str, int]:
    """(path as str, a read-only descriptor of it), refusing anything but a regular file
    without blocking on it (a FIFO opened for reading waits for a writer)."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise ConfigError(f"path must be a str or os.PathLike, found {type(path).__name__}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise CacheFileError(f"cannot open {path}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CacheFileError(f"cannot open {path}: {'a directory' if stat.S_ISDIR(mode) else 'not a regular file'}")
    os.set_blocking(fd, True)
    return path, fd


def is_v1(path) -> bool:
    """Whether ``path`` is a kvmmap cache of format major version 1 (magic and version only).

    Nothing else is checked: :func:`read_v1` says whether the file is intact.

    Raises
    ------
    CacheFileError
        The file cannot be opened or is not a regular file.
    """
    path, fd = _open(path)
    try:
        head = os.pread(fd, 10, 0)
    except OSError as e:
        raise CacheFileError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    return len(head) == 10 and head[:8] == MAGIC and struct.unpack_from("<H", head, 8)[0] == MAJOR


def read_v1(path, commit: str = "newest") -> V1File:
    """Open a format 1.x cache file read-only, without the core's reader.

    Parameters
    ----------
    path : str or os.PathLike
    commit : {"newest", "previous"}
        The commit to read: the newest valid metadata slot, or the one before it.

    Returns
    -------
    V1File
        Geometry, formats, fingerprint, sequences and their block tables; its
        :meth:`V1File.read` decodes a layer's tokens to float32 ``[n, H, D]``. Close it
        (or use it in a ``with`` block) to unmap the file.

    Raises
    ------
    ConfigError
        ``commit`` is neither "newest" nor "previous".
    CacheFileError
        The file cannot be opened, is not a regular file or not a kvmmap cache, has
        another major version, a damaged or invalid header, is truncated, has no valid
        metadata slot (no second one with ``commit="previous"``), or the chosen commit
        breaks a rule of the format. (Page checksums are checked when pages are read.)
    """
    if commit not in ("newest", "previous"):
        raise ConfigError(f"commit must be 'newest' or 'previous', found {commit!r}")
    path, fd = _open(path)
    try:
        f = V1File(path, os.pread(fd, SUPERBLOCK_BYTES, 0), os.fstat(fd).st_size)
        f._load(fd, commit)
        f._map_arena(fd)
        return f
    except OSError as e:
        if isinstance(e, CacheFileError):
            raise
        raise CacheFileError(f"cannot read {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
