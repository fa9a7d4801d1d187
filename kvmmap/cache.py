"""PagedKVCache: the paged, quantized KV cache of one model, in a file or in RAM.

Tokens of one (sequence, layer) live in *sealed pages* listed by its block table, plus
an open *tail* of fewer than ``page_size`` tokens kept in RAM and saved with each commit.
Sealed pages are immutable, which gives the rest for free:

* ``fork`` shares sealed pages (reference counts) and copies only the tail;
* a write that would change a sealed page (``truncate`` into the middle of one) copies
  the kept part into the tail first and drops the page: copy-on-write;
* a page's checksum is computed once, when it is sealed;
* a commit never has to copy pages: the committed state on disk refers only to sealed
  pages, which nothing overwrites until a later commit has stopped referring to them.

The tail is stored in the side's own format, except for int4, where it stays float32
until the page fills and is quantized as a whole (keys per channel over the page's
tokens, KIVI's residual window).
"""

from __future__ import annotations

import fcntl
import functools
import os
import struct
import threading

import crc32c
import numpy as np

from .codecs import quant
from .errors import (
    CacheFileError,
    ConfigError,
    DTypeError,
    ReadOnlyError,
    SequenceError,
    ShapeError,
    describe,
)
from .formats import get_format
from . import _pagetable
from .pagetable import BlockTable, PageAllocator, slot_mapping
from .codecs.quant import QTensor
from .storage import (
    FINGERPRINT_BYTES,
    SUPERBLOCK_BYTES,
    PageLayout,
    Superblock,
    fsync_dir,
    newest_generation,
    open_regular,
    partial_path,
    pwrite_all,
    read_slot,
    reserve,
    same_file,
    write_slot,
)

_META_HEAD = struct.Struct("<QIII")     # high_water, num_sequences, next_sequence_id, reserved
_SEQ_HEAD = struct.Struct("<IHH")       # sequence id, name length, reserved
_LAYER_HEAD = struct.Struct("<QII")     # positions written, positions dropped in front, sealed pages
_SIDES = ("k", "v")
# geometry limits of docs/FORMAT.md, which open() enforces (storage.Superblock.validate)
MAX_LAYERS, MAX_KV_HEADS, MAX_HEAD_DIM, MAX_PAGE_SIZE = 1 << 16, 1 << 12, 1 << 14, 1 << 16
MAX_INT4_K_PAGE_SIZE = (1 << 16) - 1        # int4 keys: page_size is stored in a 16-bit group size
DEFAULT_META_SLOT_BYTES = 64 << 20
MAX_META_SLOT_BYTES = (1 << 62) - 4096      # keeps arena_offset = 4096 + 2S a valid file offset (< 2**63)


MAX_SEQUENCE_ID = 0xFFFFFFFE               # ids are 32-bit in the file; the next id must fit too


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _locked(method):
    """Run ``method`` holding the cache's lock: one thread changes a cache at a time.

    Changes (append, fork, free, truncate, shift_left, new_sequence, flush, close) and the
    calls that walk every sequence take it; reads and attention of a sequence do not, so
    they run beside each other and beside changes to *other* sequences (see
    docs/RELIABILITY.md, Threads).
    """
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._mutex:
            return method(self, *args, **kwargs)
    return wrapper


class _LayerState:
    """One (sequence, layer): sealed pages, positions written, positions dropped, tail."""

    __slots__ = ("bt", "n_pos", "first", "tail")

    def __init__(self, bt, n_pos, first, tail):
        self.bt, self.n_pos, self.first, self.tail = bt, n_pos, first, tail

    @property
    def length(self) -> int:
        return self.n_pos - self.first


class _Sequence:
    __slots__ = ("seq_id", "name", "layers")

    def __init__(self, seq_id, name, layers):
        self.seq_id, self.name, self.layers = seq_id, name, layers


class PagedKVCache:
    """A paged, quantized KV cache, backed by a memory-mapped file or by RAM.

    Use :meth:`create` or :meth:`open`; see ``docs/FORMAT.md`` for the file format.

    Examples
    --------
    >>> import numpy as np, kvmmap as km
    >>> c = km.PagedKVCache.create(None, num_layers=2, num_kv_heads=4, head_dim=64)
    >>> s = c.new_sequence("prompt")
    >>> k = np.ones((20, 4, 64), np.float32)
    >>> c.append(s, 0, k, k)
    >>> c.read(s, 0)[0].shape
    (20, 4, 64)
    """

    # ------------------------------------------------------------------ construction

    def __init__(self, *_args, **_kwargs):
        raise TypeError("use PagedKVCache.create(...) or PagedKVCache.open(path)")

    @classmethod
    def create(cls, path, *, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int = 16,
               k_format: str = "int8", v_format: str = "int8", v_group_size: int | None = None,
               fingerprint: bytes | str = b"", meta_slot_bytes: int | None = None,
               overwrite: bool = False) -> "PagedKVCache":
        """Create an empty cache.

        Parameters
        ----------
        path : str or os.PathLike or None
            File to create; None keeps the cache in RAM only (nothing persists).
        num_layers, num_kv_heads, head_dim : int
            Model geometry. K and V passed to :meth:`append` are
            ``[tokens, num_kv_heads, head_dim]``.
        page_size : int
            Tokens per page (default 16).
        k_format, v_format : str
            Storage formats (:data:`kvmmap.FORMATS`); may differ.
        v_group_size : int, optional
            int4 values: elements per quantization group along head_dim (default 32, or
            head_dim if 32 does not divide it). int4 keys are always grouped per channel
            over the tokens of a page.
        fingerprint : bytes or str
            Up to 32 bytes identifying the model (e.g. a hash of its config), stored in the
            header and readable as :attr:`fingerprint`.
        meta_slot_bytes : int, optional
            Capacity of each of the two metadata slots; reserved sparsely, so it costs no
            disk until used. A commit holds every sequence's block tables and open tail
            page (``num_layers`` tails each), so this bounds how many sequences a cache can
            commit. Default: room for the tails of 128 sequences, at least 64 MiB and at
            most 1 GiB (or one tail, if larger).
        overwrite : bool
            Replace an existing file instead of refusing. The new file is built under a
            temporary name and renamed over the old one while holding its writer lock.

        Returns
        -------
        PagedKVCache
            Open for writing (``mode="r+"``), with no sequence, committed once.

        Raises
        ------
        ShapeError
            A geometry value outside the limits of docs/FORMAT.md (num_layers 1..65536,
            num_kv_heads 1..4096, head_dim 1..16384, page_size 1..65536 and at most 65535
            for int4 keys), an odd head_dim with int4, a fingerprint over 32 bytes, or a
            meta_slot_bytes that is not a multiple of 4096 or cannot hold one sequence tail.
        ConfigError
            ``v_group_size`` given for values that are not int4, or not an integer; a
            fingerprint that is neither bytes nor str.
        FormatError
            An unknown format, or an int4 ``v_group_size`` that is not even, at most 256
            and a divisor of head_dim.
        CacheFileError
            ``path`` exists (without ``overwrite``), is held by a writer in another
            process (with ``overwrite``), or cannot be created. No file is left behind.
        """
        for name, v, hi in (("num_layers", num_layers, MAX_LAYERS), ("num_kv_heads", num_kv_heads, MAX_KV_HEADS),
                            ("head_dim", head_dim, MAX_HEAD_DIM), ("page_size", page_size, MAX_PAGE_SIZE)):
            if not _is_int(v) or not 1 <= v <= hi:
                raise ShapeError(f"{name} must be an integer in 1..{hi} (docs/FORMAT.md), found {v!r}")
        kf, vf = get_format(k_format), get_format(v_format)
        for f in (kf, vf):
            if f.name == "int4" and head_dim % 2:
                raise ShapeError(f"int4 needs an even head_dim, found {head_dim}")
        if kf.name == "int4" and page_size > MAX_INT4_K_PAGE_SIZE:
            raise ShapeError(f"int4 keys are grouped over a page and the group size field is 16 bits: page_size "
                             f"must be at most {MAX_INT4_K_PAGE_SIZE}, found {page_size}")
        if vf.name == "int4":
            if v_group_size is None:
                v_group_size = 32 if head_dim % 32 == 0 else head_dim
            if not _is_int(v_group_size):
                raise ConfigError(f"v_group_size must be an integer, found {v_group_size!r}")
            quant._resolve_grouping(vf, (1, head_dim), "token", v_group_size)
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
        if not _is_int(meta_slot_bytes) or not 4096 <= meta_slot_bytes <= MAX_META_SLOT_BYTES or meta_slot_bytes % 4096:
            raise ShapeError(f"meta_slot_bytes must be a multiple of 4096 in 4096..{MAX_META_SLOT_BYTES}, "
                             f"found {meta_slot_bytes!r}")
        meta_slot_bytes = int(meta_slot_bytes)
        if layout.tail_bytes > meta_slot_bytes - 64:     # open() would refuse such a file
            raise ShapeError(f"meta_slot_bytes={meta_slot_bytes} cannot hold one sequence tail of this "
                             f"geometry ({layout.tail_bytes} bytes); pass a larger meta_slot_bytes")
        sb = Superblock(int(num_layers), int(num_kv_heads), int(head_dim), int(page_size), kf, vf,
                        int(page_size) if kf.name == "int4" else 0, v_group_size, layout.page_bytes,
                        SUPERBLOCK_BYTES, meta_slot_bytes, SUPERBLOCK_BYTES + 2 * meta_slot_bytes, bytes(fingerprint))
        self = object.__new__(cls)
        self._init_common(sb, None if path is None else os.fspath(path), writable=True)
        if self.path is not None:
            self._create_file(overwrite)
        return self

    def _create_file(self, overwrite: bool) -> None:
        """Write a new, committed, empty cache file at ``self.path`` (create's file part)."""
        sb, target, old_fd = self._sb, self.path, None
        if overwrite:
            # Through a symlink, the file it names is replaced, not the link.
            target = self.path = os.path.realpath(target)
            # Build the new file under a temporary name and rename it over the old one,
            # holding the old file's writer lock: a live writer is refused instead of
            # truncated, and readers mapping the old file keep reading it (no SIGBUS).
            old_fd = self._lock_existing(target)
            if old_fd is not None:
                self.path = f"{partial_path(target)}.{id(self):x}"
        try:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise CacheFileError(f"{self.path} exists; pass overwrite=True to replace it") from None
            except OSError as e:
                raise CacheFileError(f"cannot create {self.path}: {e.strerror}") from None
            self._fd = fd
            self._lock()
            try:
                pwrite_all(fd, sb.pack(), 0)
                os.ftruncate(fd, sb.arena_offset)   # e.g. EFBIG: slots beyond the file system's limit
            except OSError as e:
                raise CacheFileError(f"cannot create {self.path}: {e.strerror}") from None
            self._generation, self._active_slot = 0, 1
            self.flush()
            if old_fd is not None:
                os.replace(self.path, target)
                self.path = target
            fsync_dir(target)           # the new directory entry is durable too
        except BaseException:
            if self._fd is not None:    # this call created the file at self.path: remove it
                os.close(self._fd)
                self._fd = None
                if self.path != target or old_fd is None:
                    try:
                        os.unlink(self.path)
                    except OSError:
                        pass
            self._closed = True
            raise
        finally:
            if old_fd is not None:
                os.close(old_fd)

    @staticmethod
    def _lock_existing(path: str):
        """fd holding the writer lock of an existing file at ``path`` (None if there is none)."""
        if not os.path.lexists(path):
            return None
        fd = open_regular(path, os.O_RDONLY, "replace")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheFileError(f"{path} is open for writing in another process (its writer lock is "
                                 "held); it cannot be overwritten") from None
        return fd

    @classmethod
    def open(cls, path, mode: str = "r+", *, commit: str = "newest") -> "PagedKVCache":
        """Open a cache file: read the header and the committed metadata, map the pages.

        Parameters
        ----------
        path : str or os.PathLike
        mode : {"r+", "r"}
            "r+" takes the file's writer lock (a second writer is refused); "r" maps it
            read-only and may run beside a writer, seeing the state committed when opened.
        commit : {"newest", "previous"}
            Which of the file's two commits to open. "previous" opens the one before the
            newest on purpose (recovery, as LMDB's previous snapshot): its pages are kept
            intact until a later commit (docs/RELIABILITY.md). In mode "r+", the first
            :meth:`flush` makes it the newest commit again, replacing the one after it.

        Returns
        -------
        PagedKVCache
            At the chosen commit.

        Raises
        ------
        ConfigError
            ``mode`` is neither "r" nor "r+", or ``commit`` neither "newest" nor "previous".
        CacheFileError
            The file cannot be opened, is not a regular file or not a kvmmap cache, has
            another major version, a damaged or invalid header, no valid metadata slot (or,
            with ``commit="previous"``, no valid older slot), a chosen slot whose contents
            are invalid, is truncated, or (mode "r+") its writer lock is held by another
            process. The file is left unchanged.
        """
        if mode not in ("r", "r+"):
            raise ConfigError(f"mode must be 'r' or 'r+', found {mode!r}")
        if commit not in ("newest", "previous"):
            raise ConfigError(f"commit must be 'newest' or 'previous', found {commit!r}")
        try:
            path = os.fspath(path)
        except TypeError:
            raise ConfigError(f"path must be a str or os.PathLike, found {type(path).__name__}") from None
        for _ in range(5):
            fd = open_regular(path, os.O_RDWR if mode == "r+" else os.O_RDONLY)
            self = None
            try:
                sb = Superblock.unpack(os.pread(fd, SUPERBLOCK_BYTES, 0), path)
                sb.check_file_size(os.fstat(fd).st_size, path)    # before sizing anything from it
                self = object.__new__(cls)
                self._init_common(sb, path, writable=mode == "r+")
                self._fd = fd
                if self.writable:
                    self._lock()
                    # create(overwrite=True) renames a new file over the path while holding
                    # the old one's lock: the inode locked here may no longer be the file
                    # the path names. Writing to it would commit to a deleted file.
                    if not same_file(fd, path):
                        self._fd, self._closed = None, True
                        os.close(fd)
                        continue
                self._load_commit(commit)
            except BaseException:
                if self is not None:        # its close() (or __del__) must not close fd a second time
                    self._fd, self._closed = None, True
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                raise
            return self
        raise CacheFileError(f"{path} was replaced by another process each time it was opened; try again")

    def _load_commit(self, commit: str) -> None:
        """Read both metadata slots and load the chosen commit (open's metadata part)."""
        fd, sb, path = self._fd, self._sb, self.path
        for _ in range(3):
            # A reader racing a writer can find each slot mid-rewrite if the writer
            # commits twice between the two reads: look again before calling it damage.
            slots = [read_slot(fd, sb, i) for i in (0, 1)]
            valid = sorted((s[0], i, s[1]) for i, s in enumerate(slots) if s is not None)
            if valid:
                break
        if not valid:
            raise CacheFileError(f"{path}: damaged metadata: neither metadata slot holds a valid commit")
        if commit == "previous":
            if len(valid) < 2:
                raise CacheFileError(f"{path}: no previous commit: slot {1 - valid[0][1]} holds no valid commit "
                                     f"(slot {valid[0][1]} holds the only one, generation {valid[0][0]})")
            gen, slot, payload = valid[0]
        else:
            gen, slot, payload = valid[-1]
        self._generation, self._active_slot = gen, slot
        self._newest_seen = valid[-1][0]    # newest on disk when opened (staleness checks)
        try:
            self._load(payload)
        except CacheFileError as e:
            # Refused; the other slot is not used in its place. A slot's payload and
            # header are each checksummed and the header is written last, so a crash
            # leaves a slot that fails a checksum, never one that holds and is invalid.
            # This one was written by a bug, forged, or the file was cut short behind
            # it: falling back would hand out a state its writer had replaced, without
            # a word, and a writer's next commit would overwrite the evidence.
            others = [g for g, i, _ in valid if i != slot]
            age = "a newer" if commit == "previous" else "an older"
            other = (f"Slot {1 - slot} holds {age} commit (generation {others[0]}), not used"
                     if others else f"Slot {1 - slot} holds no valid commit")
            which = "previous" if commit == "previous" else "newest"
            raise CacheFileError(
                f"{path}: damaged metadata: the {which} commit (slot {slot}, generation {gen}) passes its "
                f"checksums but is invalid: {e}. {other}: a slot whose checksums hold was written whole, so "
                "this is a bug, a forged file or a truncated file, not an interrupted write") from None
        if self.writable:
            # the next commit continues after the newest generation on disk
            self._generation = valid[-1][0]
            # Pages the other slot's commit lists and this one does not stay unused until
            # the next commit has replaced that slot: it must stay readable until then.
            if len(valid) == 2:
                other_payload = valid[0][2] if slot == valid[-1][1] else valid[-1][2]
                self._retire_other(other_payload)

    def _init_common(self, sb: Superblock, path, writable: bool) -> None:
        self._sb = sb
        self.path = path
        self.writable = writable
        self.layout: PageLayout = sb.layout()
        self._fd = None
        self._closed = False
        self._mutex = threading.RLock()
        self._pid = os.getpid()     # a forked child must not write through its parent's writer
        self._reserved = 0          # pages [0, _reserved) have disk blocks (file caches)
        self._meta_reserved = 0     # bytes at the start of each metadata slot with disk blocks
        self._sync_failed = ""      # why an fsync failed: no commit may follow (see flush)
        self._newest_seen = 0       # the newest generation on disk when opened
        self._seqs: dict[int, _Sequence] = {}
        self._names: dict[str, int] = {}
        self._next_id = 0
        self._alloc = PageAllocator()
        self._page_crc = np.zeros(0, np.uint32)
        # When each page was last sealed (a counter, not a clock): device copies of the pool
        # (kvmmap.opencl) upload the pages stamped after their last upload.
        self._page_stamp = np.zeros(0, np.uint64)
        self._stamp = 1
        self._capacity = 0
        self._arena = np.zeros(0, np.uint8)
        self._views = self.layout.arena_views(self._arena, 0)
        self._tail_proto = self._make_tail()
        self._tail_bytes = sum(a.nbytes for side in _SIDES for a in self._tail_proto[side].values())

    def _lock(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:     # the caller closes the fd
            raise CacheFileError(f"{self.path} is open for writing in another process (its writer lock is held)") from None

    # ------------------------------------------------------------------ properties

    num_layers = property(lambda self: self._sb.num_layers)
    num_kv_heads = property(lambda self: self._sb.num_kv_heads)
    head_dim = property(lambda self: self._sb.head_dim)
    page_size = property(lambda self: self._sb.page_size)
    k_format = property(lambda self: self._sb.k_format.name)
    v_format = property(lambda self: self._sb.v_format.name)
    fingerprint = property(lambda self: self._sb.fingerprint.rstrip(b"\0"))
    version = property(lambda self: self._sb.version)

    def __repr__(self) -> str:
        where = self.path or "RAM"
        return (f"PagedKVCache({where!r}, layers={self.num_layers}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, page_size={self.page_size}, k={self.k_format}, "
                f"v={self.v_format}, sequences={len(self._seqs)})")

    # ------------------------------------------------------------------ arena

    def _make_tail(self) -> dict:
        tail = {}
        for side in _SIDES:
            f = self.layout.formats[side]
            if f.name == "int4":
                tail[side] = {"codes": np.zeros((self.num_kv_heads, self.page_size, self.head_dim), np.float32)}
            else:
                tail[side] = {n: np.zeros(r.shape, r.dtype) for n, r in self.layout.regions[side].items()}
        return tail

    def _copy_tail(self, tail) -> dict:
        return {side: {n: a.copy() for n, a in tail[side].items()} for side in _SIDES}

    def _ensure_capacity(self, num_pages: int) -> None:
        if num_pages <= self._capacity:
            return
        cap = max(num_pages, 2 * self._capacity, 64)
        pb = self._sb.page_bytes
        if self.path is None:
            arena = np.zeros(cap * pb, np.uint8)
            arena[: self._arena.size] = self._arena
        else:
            end = self._sb.arena_offset + cap * pb
            if os.fstat(self._fd).st_size < end:    # a reopened file may be longer already
                os.ftruncate(self._fd, end)         # sparse: no page is rewritten
            arena = self._map(cap)
        self._set_arena(arena, cap)

    def _prepare_pages(self, n: int) -> None:
        """Make sure the next :meth:`_alloc` of ``n`` pages cannot fail for lack of room.

        The arena grows (a file: extended, sparse) and the disk blocks of every page that
        could be handed out are reserved, all *before* any page is handed out: a full
        disk, ``ulimit -f`` (EFBIG) or a failed map raise here, with nothing changed but
        the file's size. Pages are then written through the map without a SIGBUS.
        """
        need = self._alloc.high_water + self._alloc.fresh_needed(n)
        self._ensure_capacity(need)
        if self.path is not None and need > self._reserved:
            pb = self._sb.page_bytes
            reserve(self._fd, self._sb.arena_offset + self._reserved * pb, (need - self._reserved) * pb)
            self._reserved = need
    def _map(self, cap: int) -> np.ndarray:
        return np.memmap(self.path, dtype=np.uint8, mode="r+" if self.writable else "r",
                         offset=self._sb.arena_offset, shape=(cap * self._sb.page_bytes,))

    def _set_arena(self, arena, cap) -> None:
        self._arena, self._capacity = arena, cap
        self._views = self.layout.arena_views(arena, cap)
        if len(self._page_crc) < cap:
            crc = np.zeros(cap, np.uint32)
            crc[: len(self._page_crc)] = self._page_crc
            self._page_crc = crc
        if len(self._page_stamp) < cap:
            stamp = np.zeros(cap, np.uint64)
            stamp[: len(self._page_stamp)] = self._page_stamp
            self._page_stamp = stamp

    def _mark_sealed(self, page: int) -> None:
        self._page_crc[page] = self._page_crc_of(page)
        self._stamp += 1
        self._page_stamp[page] = self._stamp

    def _page_crc_of(self, page: int) -> int:
        pb = self._sb.page_bytes
        return crc32c.crc32c(self._arena[page * pb:(page + 1) * pb])

    def _seal_pages(self, n: int, taken: list | None = None) -> np.ndarray:
        """Hand out ``n`` pages (room made first); ``taken`` collects them for an undo."""
        self._prepare_pages(n)
        pages = self._alloc.alloc(n)
        if taken is not None:
            taken.extend(int(p) for p in pages)
        return pages

    # ------------------------------------------------------------------ views

    def _page_q(self, side: str, page: int, a: int, b: int) -> QTensor:
        """QTensor over tokens [a, b) of a sealed page (head-major: shape [H, b-a, D])."""
        f = self.layout.formats[side]
        v = self._views[side]
        shape = (self.num_kv_heads, b - a, self.head_dim)
        codes = v["codes"][page][:, a:b]
        if f.name == "int4" and side == "k":
            return QTensor(codes, v["scales"][page], v["zeros"][page], "int4", shape, "channel", self.page_size)
        scales = v["scales"][page][:, a:b] if f.scaled else None
        zeros = v["zeros"][page][:, a:b] if f.zero_point else None
        return QTensor(codes, scales, zeros, f.name, shape, "token", self.layout.group_size[side])

    def _tail_q(self, side: str, tail: dict, a: int, b: int) -> QTensor:
        f = self.layout.formats[side]
        t = tail[side]
        shape = (self.num_kv_heads, b - a, self.head_dim)
        if f.name == "int4":
            return QTensor(t["codes"][:, a:b], None, None, "fp32", shape)
        return QTensor(t["codes"][:, a:b], t["scales"][:, a:b] if f.scaled else None, None, f.name, shape)

    def _seal_tail(self, st: _LayerState, taken: list) -> None:
        (page,) = self._seal_pages(1, taken)
        for side in _SIDES:
            f = self.layout.formats[side]
            if f.name == "int4":
                quant.quantize_into(st.tail[side]["codes"], self._page_q(side, page, 0, self.page_size))
            else:
                for name, arr in st.tail[side].items():
                    self._views[side][name][page][...] = arr
        self._mark_sealed(page)
        st.bt.append(int(page))

    # ------------------------------------------------------------------ checks

    def _check_open(self, write: bool = False) -> None:
        if self._closed:
            raise CacheFileError("the cache is closed")
        if write and not self.writable:
            raise ReadOnlyError(f"{self.path} is open read-only (mode='r')")
        if write and self.path is not None and os.getpid() != self._pid:
            # The child shares the parent's file description and writer lock: its writes
            # would land in pages the parent hands out, its commits race the parent's.
            raise ReadOnlyError(
                f"{self.path} was opened for writing by process {self._pid}; this forked child "
                f"(process {os.getpid()}) may read through it but not write. Open the file in the "
                "child with PagedKVCache.open(path, mode='r'), or for writing once the parent closed it")

    def _seq(self, seq) -> _Sequence:
        # 0.0 == 0 and True == 1 as dict keys: only integers name sequences
        if _is_int(seq):
            try:
                return self._seqs[int(seq)]
            except KeyError:
                pass
        raise SequenceError(f"unknown sequence id {seq!r}; known ids: {sorted(self._seqs)[:20]}") from None

    def _seq_and_count(self, seq, n, what: str) -> _Sequence:
        self._check_open(write=True)
        s = self._seq(seq)
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise ShapeError(f"{what} needs a token count >= 0, found {n!r}")
        return s

    def _check_layer(self, layer) -> int:
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or not 0 <= layer < self.num_layers:
            raise ShapeError(f"layer must be an integer in 0..{self.num_layers - 1}, found {layer!r}")
        return int(layer)

    def _check_kv(self, x, name: str) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            if hasattr(x, "__array__"):
                x = np.asarray(x)
            else:
                raise DTypeError(f"{name} must be a numpy array, found {type(x).__name__}")
        if x.dtype not in (np.float32, np.float16):
            raise DTypeError(f"{name} must be float32 or float16, found {x.dtype}")
        want = (self.num_kv_heads, self.head_dim)
        if x.ndim != 3 or x.shape[1:] != want:
            raise ShapeError(f"{name} must be [tokens, {want[0]}, {want[1]}], found {describe(x)}")
        if x.dtype != np.float32 or (x.shape[2] > 1 and x.strides[2] != 4):
            x = np.ascontiguousarray(x, np.float32)
        return x

    # ------------------------------------------------------------------ sequences

    @_locked
    def new_sequence(self, name: str | None = None) -> int:
        """Start an empty sequence.

        Parameters
        ----------
        name : str, optional
            Unique, non-empty, under 64 KiB of UTF-8; :meth:`find_sequence` finds the
            sequence by it, in this process or after reopening the file.

        Returns
        -------
        int
            The new sequence's id (ids are never reused).

        Raises
        ------
        SequenceError
            ``name`` is not a non-empty string under 64 KiB, or is taken.
        ReadOnlyError
            The cache was opened with ``mode="r"``.
        CacheFileError
            The cache is closed.
        """
        self._check_open(write=True)
        self._check_name(name)
        if self._next_id > MAX_SEQUENCE_ID:
            raise SequenceError(f"this cache has handed out every sequence id (0..{MAX_SEQUENCE_ID}); "
                                "ids are never reused: copy the sequences to a new cache")
        sid = self._next_id
        self._next_id += 1
        layers = [_LayerState(BlockTable(), 0, 0, self._copy_tail(self._tail_proto)) for _ in range(self.num_layers)]
        self._seqs[sid] = _Sequence(sid, name, layers)
        if name is not None:
            self._names[name] = sid
        return sid

    def _check_name(self, name) -> None:
        if name is None:
            return
        try:
            size = len(name.encode()) if isinstance(name, str) else -1
        except UnicodeEncodeError:      # a lone surrogate has no UTF-8 form
            size = -1
        if size < 1 or size > 65535:
            raise SequenceError(f"a sequence name must be a non-empty string of valid unicode under 64 KiB "
                                f"of UTF-8, found {name!r}")
        if name in self._names:
            raise SequenceError(f"a sequence named {name!r} exists already (id {self._names[name]})")

    def find_sequence(self, name: str) -> int:
        """Id of the sequence called ``name``.

        Parameters
        ----------
        name : str

        Returns
        -------
        int

        Raises
        ------
        SequenceError
            No sequence has this name.
        CacheFileError
            The cache is closed.
        """
        self._check_open()
        try:
            return self._names[name]
        except (KeyError, TypeError):
            raise SequenceError(f"no sequence is named {name!r}") from None

    @_locked
    def store_prefix(self, seq: int, token_ids) -> int:
        """Store ``seq``'s first ``len(token_ids)`` tokens under the hash of ``token_ids``.

        A fork (pages shared) named by :func:`kvmmap.prefix.sequence_name`. See
        :mod:`kvmmap.prefix`.

        Parameters
        ----------
        seq : int
            A sequence holding the K/V of exactly these token ids from position 0, at
            least ``len(token_ids)`` tokens in every layer.
        token_ids : sequence of int, or integer numpy array / torch tensor, shape ``[n]``
            ``n >= 1`` non-negative ids.

        Returns
        -------
        int
            The stored sequence's id; the existing one if this prompt is stored already.

        Raises
        ------
        SequenceError
            Unknown ``seq``.
        ShapeError
            ``token_ids`` is empty, not 1-D, negative or beyond int64, or longer than ``seq``.
        DTypeError
            ``token_ids`` are not integers.
        ReadOnlyError
            The cache was opened with ``mode="r"``.
        CacheFileError
            The cache is closed.
        """
        from . import prefix

        self._check_open(write=True)
        return prefix.store_prefix(self, seq, token_ids)

    def match_prefix(self, token_ids) -> tuple[int | None, int]:
        """The stored prompt sharing the longest prefix with ``token_ids``.

        Reuse a match with ``s = c.fork(seq); c.truncate(s, length)``. See :mod:`kvmmap.prefix`.

        Parameters
        ----------
        token_ids : sequence of int, or integer numpy array / torch tensor, shape ``[n]``

        Returns
        -------
        seq : int or None
            The stored sequence (ties: the lowest id); None if none matches.
        length : int
            Leading tokens of ``token_ids`` whose K/V ``seq`` holds: a whole stored
            prompt, or a common prefix rounded down to whole pages; 0 if none matches.

        Raises
        ------
        ShapeError, DTypeError
            ``token_ids`` is not a 1-D array of non-negative integers.
        CacheFileError
            The cache is closed.
        """
        from . import prefix

        self._check_open()
        return prefix.match_prefix(self, token_ids)

    @_locked
    def sequences(self) -> dict[int, str | None]:
        """{sequence id: name or None} for every sequence.

        Raises
        ------
        CacheFileError
            The cache is closed.
        """
        self._check_open()
        return {sid: s.name for sid, s in self._seqs.items()}

    def seq_len(self, seq: int, layer: int | None = None) -> int:
        """Tokens stored for ``seq`` in one layer, or in every layer.

        Parameters
        ----------
        seq : int
        layer : int, optional
            ``0 .. num_layers - 1``; None: the fewest over all layers.

        Returns
        -------
        int
            Visible tokens (those :meth:`read` returns).

        Raises
        ------
        SequenceError
            Unknown ``seq``.
        ShapeError
            ``layer`` out of range.
        CacheFileError
            The cache is closed.
        """
        self._check_open()
        s = self._seq(seq)
        if layer is None:
            return min(st.length for st in s.layers)
        return s.layers[self._check_layer(layer)].length

    @_locked
    def append(self, seq: int, layer: int, k, v) -> None:
        """Append tokens to one layer of a sequence.

        Parameters
        ----------
        seq : int
        layer : int
        k, v : numpy.ndarray, float32 or float16, shape ``[tokens, num_kv_heads, head_dim]``
            Any number of tokens: a whole prompt or one decode step. Full pages are
            quantized straight into the memory-mapped pages.

        Raises
        ------
        SequenceError, ShapeError, DTypeError, NonFiniteError, ReadOnlyError
            Nothing is changed when the input is refused.
        """
        self._check_open(write=True)
        s = self._seq(seq)
        layer = self._check_layer(layer)
        k, v = self._check_kv(k, "k"), self._check_kv(v, "v")
        if k.shape[0] != v.shape[0]:
            raise ShapeError(f"k and v must hold the same number of tokens, found {k.shape[0]} and {v.shape[0]}")
        st = s.layers[layer]
        P, n = self.page_size, k.shape[0]
        x = {"k": k.transpose(1, 0, 2), "v": v.transpose(1, 0, 2)}      # [H, tokens, D] views
        if 0 < n < P - st.n_pos % P:
            # Decode steps: the tokens stay in the open tail. They go straight into its free
            # slots, which refuses bad input (_write_tail); the length moves only after both
            # sides succeed, so a refusal changes nothing visible.
            self._write_tail(st, x["k"], x["v"])
            st.n_pos += n
            return
        quant.check_storable(k, self.k_format)      # one read each; refuses before any change
        quant.check_storable(v, self.v_format)
        self._append_all([(st, x)])

    @_locked
    def _append_rows(self, seqs, layer: int, k: np.ndarray, v: np.ndarray, read_back: bool = False):
        """:meth:`append` to one layer of several sequences, all or none, unchecked.

        For callers that checked their input (``KVMmapCache``).

        Parameters
        ----------
        seqs : list of int
            Sequences holding the same number of tokens in ``layer``.
        layer : int
            ``0 .. num_layers - 1``.
        k, v : numpy.ndarray, float32, shape ``[len(seqs), num_kv_heads, tokens, head_dim]``
            Head-major; the last axis contiguous and the first two mergeable without a copy.
        read_back : bool
            Also return what is now stored for the positions that changed.

        Returns
        -------
        start : int
            The first position whose stored value changed: the old length, or for int4 the
            first token of a page this append sealed (its tokens are quantized again, as a
            whole).
        k_stored, v_stored : numpy.ndarray, float32, shape ``[len(seqs), num_kv_heads, new length - start, head_dim]``
            With ``read_back``, the dequantized values of positions ``start ..``, as
            :meth:`read` gives them (head-major); else None.

        Raises
        ------
        NonFiniteError
            Input the formats cannot store; nothing is changed.
        """
        self._check_open(write=True)
        sts = [self._seq(s).layers[layer] for s in seqs]
        P, n = self.page_size, k.shape[2]
        start = sts[0].length
        if all(0 < n < P - st.n_pos % P for st in sts):
            # Decode steps, as in append(): the lengths move only after every row succeeded.
            k_stored = v_stored = None
            if read_back:
                k_stored, v_stored = np.empty(k.shape, np.float32), np.empty(v.shape, np.float32)
            for b, st in enumerate(sts):
                qk, qv = self._write_tail(st, k[b], v[b])
                if read_back:
                    quant.dequantize(qk, out=k_stored[b])
                    quant.dequantize(qv, out=v_stored[b])
            for st in sts:
                st.n_pos += n
            return start, k_stored, v_stored
        quant.check_storable(k, self.k_format)      # one read each; refuses before any change
        quant.check_storable(v, self.v_format)
        int4 = "int4" in (self.k_format, self.v_format)
        for st in sts:
            if int4 and st.n_pos % P + n >= P:      # seals the open tail page
                start = min(start, max(0, st.length - st.n_pos % P))
        self._append_all([(st, {"k": k[b], "v": v[b]}) for b, st in enumerate(sts)])
        if not read_back:
            return start, None, None
        shape = (len(seqs), self.num_kv_heads, sts[0].length - start, self.head_dim)
        k_stored, v_stored = np.empty(shape, np.float32), np.empty(shape, np.float32)
        self._read_rows(seqs, layer, start, sts[0].length, k_stored, v_stored)
        return start, k_stored, v_stored

    def _write_tail(self, st: _LayerState, k: np.ndarray, v: np.ndarray) -> tuple[QTensor, QTensor]:
        """Quantize head-major ``k``, ``v`` ``[H, tokens, D]`` into the free slots of an open tail.

        The length does not move, and slots past it are not visible, so a refusal
        (NonFiniteError) changes nothing visible. The quantizers refuse non-finite input;
        int4's range is checked here, since its tail is stored as float32. Returns the
        slots written to.
        """
        for x, fmt in ((k, self.k_format), (v, self.v_format)):
            if fmt == "int4":
                quant.check_storable(x, fmt)
        slot = st.n_pos % self.page_size
        stop = slot + k.shape[1]
        qk, qv = self._tail_q("k", st.tail, slot, stop), self._tail_q("v", st.tail, slot, stop)
        quant._quantize_unchecked(k, qk)
        quant._quantize_unchecked(v, qv)
        return qk, qv

    def _append_all(self, items) -> None:
        """Append checked tokens to several (sequence, layer) pairs: all of it, or nothing.

        ``items``: ``(layer state, {side: [H, tokens, D]})`` pairs. Room for every page
        the call seals is made first (:meth:`_prepare_pages`); should anything still raise
        (MemoryError, KeyboardInterrupt), the lengths, block tables and tails go back to
        what they were and the pages handed out return to the free list.
        """
        P = self.page_size
        self._prepare_pages(sum((st.n_pos % P + x["k"].shape[1]) // P for st, x in items))
        saved = []
        for st, x in items:
            slot = st.n_pos % P
            # sealing the open tail reuses its rows from 0: keep the rows it holds now
            tail = self._copy_tail(st.tail) if slot and slot + x["k"].shape[1] >= P else None
            saved.append((st, st.n_pos, len(st.bt), tail))
        taken: list[int] = []
        try:
            for st, x in items:
                self._append_tokens(st, x, taken)
        except BaseException:
            for st, n_pos, nbt, tail in saved:
                st.bt.drop_back(len(st.bt) - nbt)
                st.n_pos = n_pos
                if tail is not None:
                    st.tail = tail
            self._alloc.unalloc(taken)
            raise

    def _append_tokens(self, st: _LayerState, x: dict, taken: list) -> None:
        """Append checked head-major ``x[side]`` ``[H, tokens, D]`` to one (sequence, layer);
        pages handed out are added to ``taken``."""
        P, n, i = self.page_size, x["k"].shape[1], 0
        while i < n:
            slot = st.n_pos % P
            take = min(P - slot, n - i)
            if slot == 0 and take == P:          # a whole page: quantize straight into it
                (page,) = self._seal_pages(1, taken)
                for side in _SIDES:
                    quant.quantize_into(x[side][:, i:i + P], self._page_q(side, page, 0, P))
                self._mark_sealed(page)
                st.bt.append(int(page))
            else:
                for side in _SIDES:
                    quant.quantize_into(x[side][:, i:i + take], self._tail_q(side, st.tail, slot, slot + take))
                if slot + take == P:
                    self._seal_tail(st, taken)
            st.n_pos += take
            i += take

    def read(self, seq: int, layer: int, start: int = 0, stop: int | None = None):
        """Dequantized K and V of tokens ``start .. stop - 1`` of one layer.

        Parameters
        ----------
        seq : int
        layer : int
            ``0 .. num_layers - 1``.
        start, stop : int, optional
            ``0 <= start <= stop <= seq_len(seq, layer)``; ``stop`` defaults to the
            sequence's length in this layer.

        Returns
        -------
        k, v : numpy.ndarray, float32, shape ``[stop - start, num_kv_heads, head_dim]``
            New arrays (nothing refers to the file).

        Raises
        ------
        SequenceError
            Unknown ``seq``.
        ShapeError
            ``layer`` or ``start`` / ``stop`` out of range.
        CacheFileError
            The cache is closed; or, on a read-only view, a writer has since reused pages
            this read copied (reopen to read the current state).
        """
        self._check_open()
        st = self._seq(seq).layers[self._check_layer(layer)]
        stop = st.length if stop is None else stop
        if not (_is_int(start) and _is_int(stop) and 0 <= start <= stop <= st.length):
            raise ShapeError(f"need 0 <= start <= stop <= {st.length}, found start={start!r}, stop={stop!r}")
        n = stop - start
        out = {side: np.empty((n, self.num_kv_heads, self.head_dim), np.float32) for side in _SIDES}
        P, pos, end = self.page_size, st.first + start, st.first + stop
        nbt = len(st.bt)
        sealed = max(0, min(end, nbt * P) - pos)      # positions in sealed pages, then the tail
        if sealed:
            from .attention import read_sealed, will_need
            will_need(self, st.bt.pages[pos // P:(pos + sealed - 1) // P + 1])
            for side in _SIDES:
                read_sealed(self, side, st.bt.pages, pos, out[side][:sealed])
        if sealed < n:
            a = pos + sealed - nbt * P
            for side in _SIDES:
                quant.dequantize(self._tail_q(side, st.tail, a, a + n - sealed),
                                 out=out[side][sealed:].transpose(1, 0, 2))
        first_page, last_page = (st.first + start) // P, min((st.first + stop - 1) // P, nbt - 1)
        if not self.writable and self.path is not None and n and first_page <= last_page:
            self._check_pages_current(st.bt.pages[first_page:last_page + 1])
        return out["k"], out["v"]

    def _read_rows(self, seqs, layer: int, start: int, stop: int, k_out: np.ndarray, v_out: np.ndarray) -> None:
        """Dequantized K and V of tokens ``start .. stop - 1`` of several sequences, head-major.

        For callers that checked their arguments (``KVMmapCache``): tokens still in the
        open tail (a decode step's) are decoded from it straight into the output; others
        go through :meth:`read`.

        Parameters
        ----------
        seqs : list of int
        layer : int
        start, stop : int
            ``0 <= start <= stop <=`` each sequence's length in ``layer``.
        k_out, v_out : numpy.ndarray, float32, shape ``[len(seqs), num_kv_heads, stop - start, head_dim]``
            Written; the last axis contiguous (views into the caller's buffers will do).
        """
        P = self.page_size
        for b, seq in enumerate(seqs):
            st = self._seq(seq).layers[layer]
            tail = st.length - st.n_pos % P             # the position of the tail's slot 0
            if start >= tail:
                for side, out in (("k", k_out), ("v", v_out)):
                    quant.dequantize(self._tail_q(side, st.tail, start - tail, stop - tail), out=out[b])
            else:
                k, v = self.read(seq, layer, start, stop)
                k_out[b] = k.transpose(1, 0, 2)
                v_out[b] = v.transpose(1, 0, 2)

    def _check_pages_current(self, pages) -> None:
        """Read-only views: refuse data just read from pages a writer may have reused.

        A page of the commit this view was opened at is rewritten only after a newer commit
        dropped it. While that commit is still the newest on disk nothing was; otherwise
        the pages just read must still match their checksums. Call after copying.
        """
        if newest_generation(self._fd, self._sb) == self._newest_seen:
            return
        changed = [int(p) for p in pages if self._page_crc_of(int(p)) != int(self._page_crc[p])]
        if changed:
            raise CacheFileError(
                f"{self.path}: pages {changed[:8]} changed since this read-only view was opened at "
                f"commit {self._generation} (a writer reused them, or they are damaged); reopen the "
                "cache to read the current state")

    @_locked
    def fork(self, seq: int, name: str | None = None) -> int:
        """A new sequence holding what ``seq`` holds, sharing its sealed pages.

        Sealed pages are reference-counted, not copied; only the open tail of each layer
        is copied. Later writes to either sequence never change the other.

        Parameters
        ----------
        seq : int
        name : str, optional
            A unique name for the new sequence, as in :meth:`new_sequence`.

        Returns
        -------
        int
            The new sequence's id.

        Raises
        ------
        SequenceError
            Unknown ``seq``, or ``name`` invalid or taken.
        ReadOnlyError
            The cache was opened with ``mode="r"``.
        CacheFileError
            The cache is closed.
        """
        self._check_open(write=True)
        src = self._seq(seq)
        self._check_name(name)
        layers = [_LayerState(st.bt.copy(), st.n_pos, st.first, self._copy_tail(st.tail)) for st in src.layers]
        shared = np.concatenate([st.bt.pages for st in src.layers])
        sid = self.new_sequence(name)       # built first, so that a failure leaves nothing behind
        try:
            self._alloc.incref(shared)
        except BaseException:
            self._drop_sequence(sid)
            raise
        self._seqs[sid].layers = layers
        return sid

    @_locked
    def free(self, seq: int) -> None:
        """Drop a sequence and its name.

        Its pages no other sequence shares return to the free list at the next
        :meth:`flush` (so the committed state never refers to a reused page).

        Parameters
        ----------
        seq : int

        Raises
        ------
        SequenceError
            Unknown ``seq``.
        ReadOnlyError
            The cache was opened with ``mode="r"``.
        CacheFileError
            The cache is closed.
        """
        self._check_open(write=True)
        s = self._seq(seq)
        self._alloc.decref(np.concatenate([st.bt.pages for st in s.layers]))    # one step: all or nothing
        self._drop_sequence(s.seq_id)

    def _drop_sequence(self, sid: int) -> None:
        s = self._seqs.pop(sid)
        if s.name is not None:
            del self._names[s.name]

    @_locked
    def truncate(self, seq: int, n: int) -> None:
        """Keep the first ``n`` tokens of every layer of ``seq`` (layers shorter keep all).

        A sealed page cut in the middle is not changed: its kept tokens are copied into
        the tail (copy-on-write) and the page is dropped.

        Parameters
        ----------
        seq : int
        n : int
            ``n >= 0``.

        Raises
        ------
        SequenceError
            Unknown ``seq``.
        ShapeError
            ``n`` is not an integer >= 0.
        ReadOnlyError
            The cache was opened with ``mode="r"``.
        CacheFileError
            The cache is closed.
        """
        s = self._seq_and_count(seq, n, "truncate")
        P = self.page_size
        # Worked out on copies first, then swapped in with one release of pages: a failure
        # on the way (MemoryError) leaves the sequence as it was.
        new_layers, dropped = [], []
        for st in s.layers:
            if n >= st.length:
                new_layers.append(st)
                continue
            new_pos = st.first + n
            keep, rem = divmod(new_pos, P)
            bt, tail = st.bt, st.tail
            if keep < len(st.bt):
                if rem:   # copy-on-write: the kept part of a sealed page becomes the tail
                    page = int(st.bt.pages[keep])
                    tail = self._copy_tail(self._tail_proto)
                    for side in _SIDES:
                        src = self._page_q(side, page, 0, rem)
                        if self.layout.formats[side].name == "int4":
                            quant.dequantize(src, out=tail[side]["codes"][:, :rem])
                        else:
                            for name, arr in tail[side].items():
                                arr[:, :rem] = getattr(src, name)
                bt = BlockTable(st.bt.pages[:keep])
                dropped.append(st.bt.pages[keep:])
            new_layers.append(_LayerState(bt, new_pos, st.first, tail))
        if dropped:
            self._alloc.decref(np.concatenate(dropped))
        s.layers = new_layers

    @_locked
    def shift_left(self, seq: int, n: int) -> None:
        """Drop the first ``n`` tokens of every layer of ``seq`` (a sliding window).

        Layers holding fewer than ``n`` tokens become empty. Pages that hold no visible
        token any more are dropped.

        Parameters
        ----------
        seq : int
        n : int
            ``n >= 0``.

        Raises
        ------
        SequenceError
            Unknown ``seq``.
        ShapeError
            ``n`` is not an integer >= 0.
        ReadOnlyError
            The cache was opened with ``mode="r"``.
        CacheFileError
            The cache is closed.
        """
        s = self._seq_and_count(seq, n, "shift_left")
        P = self.page_size
        new_layers, dropped = [], []        # copies first, then one release: all or nothing
        for st in s.layers:
            first = st.first + min(n, st.length)
            drop = min(first // P, len(st.bt))
            dropped.append(st.bt.pages[:drop])
            new_layers.append(_LayerState(BlockTable(st.bt.pages[drop:]), st.n_pos - drop * P,
                                          first - drop * P, st.tail))
        self._alloc.decref(np.concatenate(dropped))
        s.layers = new_layers

    def block_table(self, seq: int, layer: int = 0) -> np.ndarray:
        """Physical ids of the sealed pages of one layer of ``seq``, in logical order.

        Parameters
        ----------
        seq : int
        layer : int
            ``0 .. num_layers - 1`` (default 0).

        Returns
        -------
        numpy.ndarray, uint32, shape ``[num_sealed_pages]``
            A copy. Visible token ``i`` is in page ``[(first + i) // page_size]`` when
            that index is below ``num_sealed_pages``, else in the open tail
            (docs/FORMAT.md; ``first`` < page_size tokens dropped by :meth:`shift_left`).

        Raises
        ------
        SequenceError
            Unknown ``seq``.
        ShapeError
            ``layer`` out of range.
        CacheFileError
            The cache is closed.
        """
        self._check_open()
        return self._seq(seq).layers[self._check_layer(layer)].bt.pages.copy()

    def slot_mapping(self, seq: int, layer: int, start: int, n: int) -> np.ndarray:
        """Physical slot of each of ``n`` visible tokens from ``start``.

        Parameters
        ----------
        seq : int
        layer : int
            ``0 .. num_layers - 1``.
        start, n : int
            ``0 <= start``, ``0 <= n``, ``start + n <= seq_len(seq, layer)``.

        Returns
        -------
        numpy.ndarray, int64, shape ``[n]``
            ``page * page_size + row`` of each token in the page arena; -1 for tokens in
            the open tail (not in a sealed page yet).

        Raises
        ------
        SequenceError
            Unknown ``seq``.
        ShapeError
            ``layer``, ``start`` or ``n`` out of range.
        CacheFileError
            The cache is closed.
        """
        self._check_open()
        st = self._seq(seq).layers[self._check_layer(layer)]
        # the kernel indexes the block table without bounds checks: a negative start would read outside it
        if not (_is_int(start) and _is_int(n) and 0 <= start and 0 <= n and start + n <= st.length):
            raise ShapeError(f"need 0 <= start, 0 <= n and start + n <= {st.length} tokens, "
                             f"found start={start!r}, n={n!r}")
        return slot_mapping(st.bt.pages, st.first, start, n, self.page_size)

    def decode_attention(self, seq: int, layer: int, q, *, scale: float | None = None,
                         window: int | None = None, backend: str = "auto") -> np.ndarray:
        """Attention of one query token over ``seq``'s cached K/V in ``layer``.

        Parameters
        ----------
        q : numpy.ndarray, float32 or float16, shape ``[num_q_heads, head_dim]``
            ``num_q_heads`` a multiple of ``num_kv_heads`` (GQA).
        scale, window, backend
            As in :func:`kvmmap.paged_decode_attention`.

        Returns
        -------
        numpy.ndarray, float32, shape ``[num_q_heads, head_dim]``
        """
        from .attention import paged_decode_attention

        if not isinstance(q, np.ndarray) and hasattr(q, "__array__"):
            q = np.asarray(q)
        if not isinstance(q, np.ndarray) or q.ndim != 2:
            raise ShapeError(f"q must be [num_q_heads, head_dim={self.head_dim}], found {describe(q)}")
        return paged_decode_attention(self, layer, [seq], q[None], scale=scale, window=window,
                                      backend=backend)[0]

    @_locked
    def stats(self) -> dict:
        """Pages, bytes and tokens of the cache as it is now (uncommitted changes included).

        Returns
        -------
        dict of str to int
            ``sequences``: sequences held; ``pages_used``: pages some block table lists;
            ``pages_free``: pages ready for reuse; ``pages_pending``: dropped pages that
            the newest or the previous commit still lists (reusable once two
            :meth:`flush` calls have passed); ``pages_capacity``: pages the arena can hold before it grows; ``page_bytes``: bytes of one page;
            ``bytes_pages``: ``pages_used * page_bytes``; ``bytes_on_disk``: blocks the
            file occupies (0 in RAM; the file is sparse); ``bytes_in_ram``: open tails,
            page checksums and reference counts, plus the arena of a RAM-only cache;
            ``tokens``: visible tokens summed over sequences and layers.

        Raises
        ------
        CacheFileError
            The cache is closed.
        """
        self._check_open()
        used = self._alloc.high_water - self._alloc.num_free - self._alloc.num_pending
        tails = len(self._seqs) * self.num_layers * self._tail_bytes
        disk = 0
        if self.path is not None and self._fd is not None:
            st = os.fstat(self._fd)
            disk = st.st_blocks * 512
        return {
            "sequences": len(self._seqs),
            "pages_used": used,
            "pages_free": self._alloc.num_free,
            "pages_pending": self._alloc.num_pending,
            "pages_capacity": self._capacity,
            "page_bytes": self._sb.page_bytes,
            "bytes_pages": used * self._sb.page_bytes,
            "bytes_on_disk": disk,
            "bytes_in_ram": tails + self._page_crc.nbytes + self._alloc.refcounts.nbytes
            + (self._arena.nbytes if self.path is None else 0),
            "tokens": sum(st.length for s in self._seqs.values() for st in s.layers),
        }

    # ------------------------------------------------------------------ commit

    def _serialize(self) -> bytes:
        hw = self._alloc.high_water
        parts = [_META_HEAD.pack(hw, len(self._seqs), self._next_id, 0), self._page_crc[:hw].tobytes()]
        for s in self._seqs.values():
            name = (s.name or "").encode()
            parts.append(_SEQ_HEAD.pack(s.seq_id, len(name), 1 if s.name is not None else 0))
            parts.append(name + b"\0" * (-len(name) % 4))
            for st in s.layers:
                parts.append(_LAYER_HEAD.pack(st.n_pos, st.first, len(st.bt)))
                parts.append(st.bt.pages.tobytes())
                for side in _SIDES:
                    parts.extend(a.tobytes() for a in st.tail[side].values())
        return b"".join(parts)

    def _load(self, payload: bytes) -> None:
        """Build the state from a slot payload; CacheFileError(reason) if it is invalid
        (open() says which slot and file)."""
        def bad(msg):
            raise CacheFileError(msg)
        if len(payload) < _META_HEAD.size:
            bad("truncated")
        hw, nseq, next_id, reserved = _META_HEAD.unpack_from(payload)
        off = _META_HEAD.size
        if reserved:
            bad(f"reserved field is {reserved}, expected 0")
        if off + 4 * hw > len(payload):
            bad(f"{hw} page checksums do not fit in {len(payload)} bytes")
        pb = self._sb.page_bytes
        file_pages = (os.fstat(self._fd).st_size - self._sb.arena_offset) // pb
        if hw > file_pages:
            bad(f"{hw} pages are committed but the file holds only {max(file_pages, 0)}: truncated file")
        page_crc = np.frombuffer(payload, np.uint32, hw, off).copy()
        off += 4 * hw
        P, L = self.page_size, self.num_layers
        tables, owners = [], []     # every block table, and its (sequence, layer)
        for _ in range(nseq):
            if off + _SEQ_HEAD.size > len(payload):
                bad("sequence table truncated")
            sid, name_len, has_name = _SEQ_HEAD.unpack_from(payload, off)
            off += _SEQ_HEAD.size
            if has_name not in (0, 1) or (not has_name and name_len) or off + name_len > len(payload):
                bad(f"sequence {sid}: name field (length {name_len}, has_name {has_name}) is inconsistent")
            try:
                name = payload[off:off + name_len].decode("utf-8") if has_name else None
            except UnicodeDecodeError:
                bad(f"sequence {sid}: its name is not UTF-8")
            off += name_len + (-name_len % 4)
            if sid >= next_id or sid in self._seqs or (name is not None and name in self._names):
                bad(f"sequence id {sid} or name {name!r} repeated or out of range")
            layers = []
            for _ in range(L):
                if off + _LAYER_HEAD.size > len(payload):
                    bad("block table truncated")
                n_pos, first, nbt = _LAYER_HEAD.unpack_from(payload, off)
                off += _LAYER_HEAD.size
                if not (nbt * P <= n_pos < (nbt + 1) * P and first <= n_pos and first < P) \
                        or off + 4 * nbt + self._tail_bytes > len(payload):
                    bad(f"sequence {sid}: inconsistent block table (positions {n_pos}, first {first}, pages {nbt})")
                pages = np.frombuffer(payload, np.uint32, nbt, off)
                off += 4 * nbt
                if nbt and int(pages.max()) >= hw:
                    bad(f"sequence {sid} refers to page {int(pages.max())} beyond the {hw} pages in use")
                tables.append(pages)
                owners.append((sid, len(layers)))
                tail = {}
                for side in _SIDES:
                    tail[side] = {}
                    for name_, proto in self._tail_proto[side].items():
                        tail[side][name_] = np.frombuffer(payload, proto.dtype, proto.size, off).reshape(proto.shape).copy()
                        off += proto.nbytes
                layers.append(_LayerState(BlockTable(pages), n_pos, first, tail))
            self._seqs[sid] = _Sequence(sid, name, layers)
            if name is not None:
                self._names[name] = sid
        if off != len(payload):
            bad(f"{len(payload) - off} unexpected trailing bytes")
        counts = self._count_tables(tables, owners, hw, bad)
        self._next_id = next_id
        self._alloc = PageAllocator(counts)
        self._page_crc = page_crc
        self._page_stamp = np.ones(len(page_crc), np.uint64)
        # Sized by the committed pages, not by the file: a sparse file's apparent size
        # (a file extended to 1 TiB) must not decide what is allocated.
        if hw > 0:
            self._set_arena(self._map(hw), hw)
        if self.writable:
            # Pages below the high-water mark were written when sealed, so they have their
            # blocks, unless the file was copied with holes made of zero runs: reserve them
            # again (cheap where they are allocated); if the disk is full, the next page
            # handed out reserves the whole range and says so.
            try:
                reserve(self._fd, self._sb.arena_offset, hw * pb)
                self._reserved = hw
            except OSError:
                self._reserved = 0

    @staticmethod
    def _count_tables(tables, owners, hw: int, bad) -> np.ndarray:
        """Reference counts (uint32 [hw]) of a commit's block tables, each page listed at
        most once per table and by tables of one layer only (docs/FORMAT.md); ``bad``
        raises otherwise. One typed pass over all entries."""
        counts = np.zeros(hw, np.uint32)
        if not tables:
            return counts
        sizes = np.fromiter((len(t) for t in tables), np.int64, len(tables))
        indptr = np.zeros(len(tables) + 1, np.int64)
        np.cumsum(sizes, out=indptr[1:])
        layer_of = np.fromiter((layer for _, layer in owners), np.int64, len(owners))
        rule, t, i = _pagetable.count_tables(np.concatenate(tables), indptr, layer_of, counts,
                                             np.full(hw, -1, np.int64), np.full(hw, -1, np.int64))
        if rule:
            sid, layer = owners[t]
            page = int(tables[t][i - indptr[t]])
            bad(f"sequence {sid}, layer {layer}: its block table lists page {page} twice" if rule == 1 else
                f"sequence {sid}, layer {layer}: page {page} is listed by tables of another layer too "
                "(a page holds tokens of one layer)")
        return counts

    def _retire_other(self, payload: bytes) -> None:
        """Keep the pages the other slot's commit lists, and this one does not, out of use
        until the next commit replaces that slot (it must stay readable until then)."""
        other_hw, pages = self._payload_pages(payload)
        hw = self._alloc.high_water
        if other_hw > hw:
            # the other commit is newer (commit="previous") and used page ids beyond ours:
            # they must not be handed out as new ones either
            counts = np.zeros(other_hw, np.uint32)
            counts[:hw] = self._alloc.refcounts
            self._alloc = PageAllocator(counts)
            self._set_arena(self._map(other_hw), other_hw)      # within the file: opening grows nothing
        if len(pages):
            pages = pages[pages < self._alloc.high_water]
            idle = pages[self._alloc.refcounts[pages] == 0]
            if len(idle):
                self._alloc.retire(np.unique(idle))

    def _payload_pages(self, payload: bytes) -> tuple[int, np.ndarray]:
        """(high-water mark, every page id its block tables list) of a slot payload that
        passed its checksums; anything that does not parse gives what was found so far."""
        found, hw = [], 0
        try:
            hw, nseq, _, _ = _META_HEAD.unpack_from(payload)
            off = _META_HEAD.size + 4 * hw
            for _ in range(nseq):
                _, name_len, _ = _SEQ_HEAD.unpack_from(payload, off)
                off += _SEQ_HEAD.size + name_len + (-name_len % 4)
                for _ in range(self.num_layers):
                    _, _, nbt = _LAYER_HEAD.unpack_from(payload, off)
                    off += _LAYER_HEAD.size
                    if off + 4 * nbt > len(payload):
                        raise ValueError("truncated")
                    found.append(np.frombuffer(payload, np.uint32, nbt, off))
                    off += 4 * nbt + self._tail_bytes
        except (struct.error, ValueError):
            pass
        # a hostile high-water mark is bounded by what the file holds
        file_pages = max(0, (os.fstat(self._fd).st_size - self._sb.arena_offset) // self._sb.page_bytes)
        return min(int(hw), file_pages), (np.concatenate(found) if found else np.zeros(0, np.uint32))

    def flush(self) -> None:
        """Commit: make every change so far durable. After it returns a crash loses nothing.

        Data pages are synced first; then the metadata goes to the slot not holding the
        newest commit, with a higher generation and its checksum, and is synced. Pages
        dropped since the previous commit become reusable only now. Does nothing on a
        read-only cache; in RAM it only releases the dropped pages.

        Raises
        ------
        CacheFileError
            The cache is closed, or the metadata outgrew its slot (create the cache with
            a larger ``meta_slot_bytes``); the previous commit stays the newest.
        OSError
            Writing or syncing failed (e.g. the disk is full); the previous commit stays
            the newest. A failed write can be retried (free space, flush again); after a
            failed *sync* every later flush raises CacheFileError: the kernel may have
            dropped the pages it could not write and a retried sync would report success
            (PostgreSQL's "fsyncgate"), so reopen the file, which holds the last commit,
            and redo the work since.
        """
        self._check_open()
        if not self.writable:
            return
        self._check_open(write=True)        # a forked child of the writer is refused
        if self.path is None:
            self._alloc.release_pending()
            return
        if self._sync_failed:
            raise CacheFileError(
                f"{self.path}: an earlier flush failed to sync ({self._sync_failed}); changes since the last "
                "commit may be lost on disk, so this cache commits nothing more: reopen it (it holds the last "
                "commit) and redo the work since")
        slot = 1 - self._active_slot
        payload = self._serialize()
        self._sync(self._fd)
        write_slot(self._fd, self._sb, slot, self._generation + 1, payload, sync=self._sync)
        self._generation += 1
        self._active_slot = slot
        self._alloc.release_pending()
        self._reserve_metadata(len(payload))

    def _sync(self, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as e:
            self._sync_failed = f"{type(e).__name__}: {e}"
            raise

    def _reserve_metadata(self, payload_bytes: int) -> None:
        """Give both metadata slots disk blocks for commits up to about twice this one.

        The slots are sparse; on a full disk a commit could then not be written even
        though the pages it records are (their blocks are reserved before use). Reserving
        ahead, after a commit succeeded, keeps the next commits writable; if it fails the
        disk is full already and the next flush says so (ENOSPC), nothing is lost.
        """
        want = min(self._sb.meta_slot_bytes, 64 + 2 * payload_bytes + (16 << 10))
        if want <= self._meta_reserved:
            return
        try:
            for i in (0, 1):
                reserve(self._fd, self._sb.meta_offset + i * self._sb.meta_slot_bytes, want)
        except OSError:
            return
        self._meta_reserved = want

    @_locked
    def verify(self) -> list[int]:
        """Recompute the checksum of every page some block table lists.

        Returns
        -------
        list of int
            Ids of the pages whose contents no longer match their stored CRC-32C, in
            increasing order; empty when all match.

        Raises
        ------
        CacheFileError
            The cache is closed.
        """
        self._check_open()
        used = sorted({int(p) for s in self._seqs.values() for st in s.layers for p in st.bt.pages})
        return [p for p in used if self._page_crc_of(p) != int(self._page_crc[p])]

    @_locked
    def close(self) -> None:
        """Release the file and its writer lock; calling it again does nothing.

        Uncommitted changes are dropped: call :meth:`flush` first. Later method calls
        other than ``close`` raise :class:`~kvmmap.CacheFileError` (properties such as
        :attr:`num_layers` still answer). Arrays returned by :meth:`read` stay valid
        (they are copies).
        """
        if self._closed:
            return
        self._closed = True
        self._arena = np.zeros(0, np.uint8)
        self._views = None
        if self._fd is not None:
            os.close(self._fd)   # also drops the writer lock
            self._fd = None

    def __enter__(self) -> "PagedKVCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
