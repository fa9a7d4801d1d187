"""PagedKVCache: the paged, quantized KV cache of one model, in a file or in RAM.

Every token of one (sequence, layer) lives in a page of the arena listed by its block
table: full pages, then perhaps a partly filled last page (FlashInfer's
``last_page_len``). One rule makes the rest work (:mod:`kvmmap.core.sequences`): bytes
that a commit on disk may list are never written again, so

* the last page grows in place, row by row, while no commit lists those rows and no other
  sequence shares the page; otherwise it is copied first (copy-on-write: ``fork``,
  ``truncate`` into a page);
* a commit writes what changed since the last one: the pages written, one record per
  changed sequence and a small index (:mod:`kvmmap.core.commits`).

int4 keys are quantized per channel over a whole page (KIVI); until the page fills, its
key rows are kept as float16 in residual pages of the same arena.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref

import numpy as np

from .core.arena import Arena
from .core.commits import Commits
from .core import legacy
from .core.fileio import (fsync_dir, lock_existing, lock_writer, mark_reader, open_regular, partial_path, pwrite_all,
                          readers_present, same_file)
from .core.layout import PageLayout
from ._validate import as_float_array, check_layer, is_int
from .core.batch import PagedBatch
from .core.sequences import MAX_SEQUENCE_ID, SequenceTable
from .core.superblock import ARENA_OFFSET, SUPERBLOCK_BYTES, Superblock, file_version, geometry_superblock
from .errors import CacheFileError, ConfigError, DTypeError, ReadOnlyError, SequenceError, ShapeError, describe
from .pagetable import PageAllocator, slot_mapping

_SIDES = ("k", "v")
# read-only views of files in this process, by (device, inode): compact() does not cut a file
# they map (other processes mark themselves with a record lock, core.fileio.mark_reader)
_LOCAL_READERS: dict[tuple[int, int], weakref.WeakSet] = {}


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
    def create(cls, path, *, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int | None = None,
               k_format: str = "int8", v_format: str = "int8", v_group_size: int | None = None,
               fingerprint: bytes | str = b"", max_bytes: int | None = None,
               overwrite: bool = False) -> "PagedKVCache":
        """Create an empty cache.

        Parameters
        ----------
        path : str or os.PathLike or None
            File to create; None keeps the cache in RAM only (nothing persists).
        num_layers, num_kv_heads, head_dim : int
            Model geometry. K and V passed to :meth:`append` are
            ``[tokens, num_kv_heads, head_dim]``.
        page_size : int, optional
            Tokens per page: default 16, or 64 when keys are int4 (they are grouped per
            channel over a page, and 64 tokens put their float16 scale and zero point at
            0.5 bit per element).
        k_format, v_format : str
            Storage formats (:data:`kvmmap.FORMATS`); may differ.
        v_group_size : int, optional
            int4 values: elements per quantization group along head_dim (default 64, or
            the largest even divisor of head_dim below it). int4 keys are always grouped
            per channel over the tokens of a page.
        fingerprint : bytes or str
            Up to 32 bytes identifying the model (e.g. a hash of its config), stored in the
            header and readable as :attr:`fingerprint`.
        max_bytes : int, optional
            Pool limit: the most bytes of pages the sequences list (tokens, and float16
            key rows of int4 pages not yet full). An append past it raises CapacityError
            and changes nothing. Metadata pages (a few per commit) and pages dropped but
            not reusable yet (two commits) come on top. Kept in the file. Default: no limit.
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
            for int4 keys, at least 4 for them), an odd head_dim with int4, a fingerprint
            over 32 bytes, or a max_bytes below one page.
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
        sb = geometry_superblock(num_layers, num_kv_heads, head_dim, page_size, k_format, v_format,
                                 v_group_size, fingerprint, max_bytes)
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
            old_fd = lock_existing(target)
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
            lock_writer(fd, self.path)
            try:
                # the superblock and both (empty) root blocks, written: no hole a root lands in
                pwrite_all(fd, sb.pack().ljust(ARENA_OFFSET, b"\0"), 0)
            except OSError as e:
                raise CacheFileError(f"cannot create {self.path}: {e.strerror}") from None
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
                head = os.pread(fd, SUPERBLOCK_BYTES, 0)
                if file_version(head) is not None and file_version(head)[0] == 1:
                    os.close(fd)
                    fd = None
                    return cls._open_v1(path, mode, commit)
                sb = Superblock.unpack(head, path)
                sb.check_file_size(os.fstat(fd).st_size, path)    # before sizing anything from it
                self = object.__new__(cls)
                self._init_common(sb, path, writable=mode == "r+")
                self._fd = fd
                if self.writable:
                    lock_writer(fd, self.path)
                    # create(overwrite=True) renames a new file over the path while holding
                    # the old one's lock: the inode locked here may no longer be the file
                    # the path names. Writing to it would commit to a deleted file.
                    if not same_file(fd, path):
                        self._fd, self._closed = None, True
                        os.close(fd)
                        continue
                else:
                    mark_reader(fd)         # compact() leaves the file's length alone while it reads
                    st = os.fstat(fd)
                    _LOCAL_READERS.setdefault((st.st_dev, st.st_ino), weakref.WeakSet()).add(self)
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

    @classmethod
    def _open_v1(cls, path: str, mode: str, commit: str) -> "PagedKVCache":
        """A format 1.x file, read into a read-only cache in RAM (:func:`copy_v1`)."""
        if mode != "r":
            raise CacheFileError(
                f"{path}: a format 1 file opens read-only (mode='r'); to write to it, upgrade it first: "
                "`kvmmap convert --upgrade --in-place FILE` (or kvmmap.tools.convert.upgrade)")
        with legacy.read_v1(path, commit) as src:
            self = cls.create(None, num_layers=src.num_layers, num_kv_heads=src.num_kv_heads, head_dim=src.head_dim,
                              page_size=src.page_size, k_format=src.k_format, v_format=src.v_format,
                              v_group_size=src.v_group_size or None, fingerprint=src.fingerprint)
            copy_v1(src, self)
            self._v1 = (src.version, path)
        self.flush()
        self.writable = False
        return self

    def _load_commit(self, commit: str) -> None:
        """Read both commit roots and load the chosen commit (open's metadata part)."""
        other = self._commits.load(self._table, commit)
        if self.writable:
            self._commits.continue_as_writer()
            hw = self._table.alloc.high_water
            # Pages below the high-water mark have their blocks, unless the file was copied
            # with holes made of zero runs: reserve them again (cheap where allocated); if
            # the disk is full, the next page handed out reserves the whole range and says so.
            try:
                self._pool.reserve_upto(hw)
            except OSError:
                self._pool.reserved = 0
            # Pages the other root's commit lists and this one does not stay unused until
            # the next commit has replaced that root: it must stay readable until then.
            if other is not None:
                self._retire_other(other)

    def _init_common(self, sb: Superblock, path, writable: bool) -> None:
        self._sb = sb
        self.path = path
        self.writable = writable
        self.layout: PageLayout = sb.layout()
        self._closed = False
        self._mutex = threading.RLock()
        self._pid = os.getpid()     # a forked child must not write through its parent's writer
        self._partial = None        # read-only views: their partly filled pages, found once
        self._pool = Arena(sb, self.layout, path, None, writable)
        self._table = SequenceTable(self.layout, self._pool, sb.num_layers, sb.max_pages)
        self._commits = Commits(sb, path)

    @property
    def _fd(self):
        return self._pool.fd

    @_fd.setter
    def _fd(self, fd) -> None:      # the arena maps and grows the file, the commits write it
        self._pool.fd = self._commits.fd = fd

    # read by tests and tools: where this cache stands among the file's commits
    _generation = property(lambda self: self._commits.generation)
    _active_slot = property(lambda self: self._commits.active_slot)
    _newest_seen = property(lambda self: self._commits.newest_seen)

    # ------------------------------------------------------------------ properties

    num_layers = property(lambda self: self._sb.num_layers)
    num_kv_heads = property(lambda self: self._sb.num_kv_heads)
    head_dim = property(lambda self: self._sb.head_dim)
    page_size = property(lambda self: self._sb.page_size)
    k_format = property(lambda self: self._sb.k_format.name)
    v_format = property(lambda self: self._sb.v_format.name)
    fingerprint = property(lambda self: self._sb.fingerprint.rstrip(b"\0"))
    version = property(lambda self: getattr(self, "_v1", (self._sb.version,))[0])

    def __repr__(self) -> str:
        where = self.path or "RAM"
        return (f"PagedKVCache({where!r}, layers={self.num_layers}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, page_size={self.page_size}, k={self.k_format}, "
                f"v={self.v_format}, sequences={len(self._table.seqs)})")

    # ------------------------------------------------------------------ the pool, for kvmmap's kernels

    @property
    def arena(self) -> Arena:
        """The page arena (:class:`kvmmap.core.arena.Arena`): page bytes, typed views of
        every region, each page's checksum and seal stamp. Read by the attention kernels
        and device copies of the pool; change the cache through its methods only."""
        return self._pool

    def pool_views(self) -> dict:
        """Zero-copy, read-only arrays over the page arena, for other kernels.

        Returns
        -------
        dict
            ``{"k": {region: array}, "v": {region: array}}`` with the regions of
            :attr:`layout` (``codes``, and ``scales`` / ``zeros`` where the format has
            them), each ``[high_water, *region.shape]``: codes ``[pages, num_kv_heads,
            page_size, code width]`` in the format's code dtype (float32, float16, uint16
            for bf16, int8, uint8 for fp8 and packed int4); scales/zeros float16, ``[pages,
            num_kv_heads, page_size]`` per token, ``[pages, num_kv_heads, 1, head_dim]`` for
            int4 keys (per channel over the page), ``[pages, num_kv_heads, page_size,
            head_dim / v_group_size]`` for int4 values. Page ids are those of
            :meth:`block_table` / :meth:`paged_layout`: every token is in a page, except the
            int4 keys of a partly filled last page, which are float16 residual rows until
            the page fills (:meth:`paged_layout`'s ``res_indptr`` / ``res_indices``). Valid
            until the arena grows (an append), :meth:`compact` or :meth:`close`;
            ``torch.from_numpy`` shares them without a copy.
        """
        self._check_open()
        hw = self.high_water
        out = {}
        for side, regions in self._pool.views.items():
            out[side] = {}
            for name, a in regions.items():
                view = a[:hw]
                view.flags.writeable = False
                out[side][name] = view
        return out

    @property
    def superblock(self) -> Superblock:
        """The file's geometry and formats (:class:`kvmmap.core.superblock.Superblock`)."""
        return self._sb

    @property
    def commit(self) -> dict:
        """Where this cache stands in its file: ``generation`` and ``slot`` of the commit it
        was opened at (or last wrote), and ``newest_at_open``, the newest generation on
        disk when it was opened. RAM caches: generation 0."""
        c = self._commits
        return {"generation": int(c.generation), "slot": int(c.active_slot), "newest_at_open": int(c.newest_seen)}

    def commit_is_newest(self) -> bool:
        """Whether no writer has committed since this cache was opened (always true for
        a writer and in RAM). Pages of this view's commit cannot have been reused then."""
        self._check_open()
        return self.path is None or self._commits.is_current()

    @property
    def high_water(self) -> int:
        """Page ids ever handed out: pages ``0 .. high_water - 1`` exist in the arena."""
        return self._table.alloc.high_water

    def page_table(self, seq: int, layer: int) -> tuple[np.ndarray, int, int]:
        """``(pages, n_pos, first)`` of one layer of ``seq``: a copy of its block table
        (uint32, every page in logical order, all full but perhaps the last, which holds
        ``n_pos - (len(pages) - 1) * page_size`` rows), positions written, positions dropped
        at the front (< page_size). Visible token ``i`` is position ``first + i``, in page
        ``pages[(first + i) // page_size]`` at row ``(first + i) % page_size``
        (docs/FORMAT.md)."""
        self._check_open()
        st = self._seq(seq).layers[self._check_layer(layer)]
        return st.bt.pages.copy(), int(st.n_pos), int(st.first)

    def paged_layout(self, layer: int, seqs) -> dict:
        """FlashInfer's paged layout of ``seqs`` in ``layer``, for external kernels.

        Returns
        -------
        dict
            ``indptr`` int32 ``[B + 1]``, ``indices`` int32 ``[nnz]`` (the pages of sequence
            ``b`` are ``indices[indptr[b]:indptr[b + 1]]``, in logical order),
            ``last_page_len`` int32 ``[B]`` (rows of each last page, 0 without pages), and
            ``first`` int32 ``[B]`` (positions dropped in front of page 0 by ``shift_left``:
            a kernel attends positions ``first[b] ..``). With :meth:`pool_views`, pages hold
            every token, except int4 keys of a partly filled last page: float16 rows
            ``[rows, num_kv_heads, head_dim]``, token-major, in the residual pages
            ``res_indices[res_indptr[b]:res_indptr[b + 1]]`` (int32; docs/FORMAT.md). All stay
            valid until the next change of these sequences, commit or :meth:`compact`.
            Rules: :func:`kvmmap.pagetable.check_paged_layout`.
        """
        self._check_open()
        layer = self._check_layer(layer)
        states = [self._seq(s).layers[layer] for s in seqs]
        counts = np.array([len(st.bt) for st in states], np.int64)
        indptr = np.zeros(len(states) + 1, np.int32)
        np.cumsum(counts, out=indptr[1:])
        indices = (np.concatenate([st.bt.pages for st in states]).astype(np.int32) if states
                   else np.zeros(0, np.int32))
        last = np.array([self._table.last_rows(st) for st in states], np.int32)
        first = np.array([st.first for st in states], np.int32)
        res_indptr = np.zeros(len(states) + 1, np.int32)
        np.cumsum([len(st.res) for st in states], out=res_indptr[1:])
        res = np.concatenate([st.res for st in states]).astype(np.int32) if states else np.zeros(0, np.int32)
        return {"indptr": indptr, "indices": indices, "last_page_len": last, "first": first,
                "res_indptr": res_indptr, "res_indices": res}

    def paged_batch(self, layer: int, seqs, window: int | None = None) -> PagedBatch:
        """The paged view of ``seqs`` in ``layer`` that attention kernels read.

        Parameters
        ----------
        layer : int
        seqs : sequence of int
            Sequence ids (checked).
        window : int, optional
            Only the last ``window`` tokens of each sequence are visible.

        Returns
        -------
        PagedBatch
            CSR page table, visible ranges and the open pages (float32), per sequence.
        """
        self._check_open()
        layer = self._check_layer(layer)
        for s in seqs:
            self._seq(s)
        return PagedBatch(self._table, layer, list(seqs), window)

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

    def _seq(self, seq):
        return self._table.get(seq)

    def _seq_and_count(self, seq, n, what: str):
        self._check_open(write=True)
        s = self._seq(seq)
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise ShapeError(f"{what} needs a token count >= 0, found {n!r}")
        return s

    def _check_layer(self, layer) -> int:
        return check_layer(layer, self.num_layers)

    def _check_kv(self, x, name: str) -> np.ndarray:
        x = as_float_array(x, name)
        want = (self.num_kv_heads, self.head_dim)
        if x.ndim != 3 or x.shape[1:] != want:
            raise ShapeError(f"{name} must be [tokens, {want[0]}, {want[1]}], found {describe(x)}")
        if x.dtype != np.float32 or (x.shape[2] > 1 and x.strides[2] != 4):
            x = np.ascontiguousarray(x, np.float32)
        return x

    # ------------------------------------------------------------------ sequences

    @_locked
    def new_sequence(self, name: str | None = None, *, max_tokens: int | None = None,
                     seq_id: int | None = None) -> int:
        """Start an empty sequence.

        Parameters
        ----------
        name : str, optional
            Unique, non-empty, under 64 KiB of UTF-8; :meth:`find_sequence` finds the
            sequence by it, in this process or after reopening the file.
        max_tokens : int, optional
            The most visible tokens the sequence may hold in each layer (kept in the
            file); an append past it raises CapacityError. See :meth:`is_full`.
        seq_id : int, optional
            For tools that copy caches: take this id instead of the next one. It must be
            unused and at most 0xFFFFFFFE; later ids continue above it.

        Returns
        -------
        int
            The new sequence's id (ids are never reused).

        Raises
        ------
        SequenceError
            ``name`` is not a non-empty string under 64 KiB, or is taken; ``seq_id`` is
            taken or out of range.
        ShapeError
            ``max_tokens`` is not a positive integer.
        ReadOnlyError
            The cache was opened with ``mode="r"``.
        CacheFileError
            The cache is closed.
        """
        self._check_open(write=True)
        if max_tokens is not None and not (is_int(max_tokens) and 1 <= max_tokens < 1 << 63):
            raise ShapeError(f"max_tokens must be a positive integer or None, found {max_tokens!r}")
        if seq_id is not None and not (is_int(seq_id) and 0 <= seq_id <= MAX_SEQUENCE_ID
                                       and int(seq_id) not in self._table.seqs):
            raise SequenceError(f"seq_id must be an unused integer in 0..{MAX_SEQUENCE_ID}, found {seq_id!r}")
        return self._table.new(name, int(max_tokens or 0), seq_id)

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
            return self._table.names[name]
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
        return {sid: s.name for sid, s in self._table.seqs.items()}

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
        CapacityError
            The sequence's ``max_tokens`` or the pool's ``max_bytes`` would be passed;
            nothing is changed.
        OSError
            No room on disk (ENOSPC, EDQUOT, EFBIG): nothing is changed, the cache stays
            usable, and the append can be retried once space is freed.
        """
        self._check_open(write=True)
        s = self._seq(seq)
        layer = self._check_layer(layer)
        k, v = self._check_kv(k, "k"), self._check_kv(v, "v")
        if k.shape[0] != v.shape[0]:
            raise ShapeError(f"k and v must hold the same number of tokens, found {k.shape[0]} and {v.shape[0]}")
        # head-major [1, H, tokens, D] views: one sequence through the batch path
        self._table.append_rows([s], [s.layers[layer]], k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None])

    @_locked
    def append_rows(self, seqs, layer: int, k: np.ndarray, v: np.ndarray, read_back: bool = False):
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
        objs = [self._seq(s) for s in seqs]
        sts = [s.layers[layer] for s in objs]
        start = self._table.append_rows(objs, sts, k, v)
        if not read_back:
            return start, None, None
        shape = (len(seqs), self.num_kv_heads, sts[0].length - start, self.head_dim)
        k_stored, v_stored = np.empty(shape, np.float32), np.empty(shape, np.float32)
        self._table.read_rows(sts, start, sts[0].length, k_stored, v_stored)
        return start, k_stored, v_stored

    def read(self, seq: int, layer: int, start: int = 0, stop: int | None = None, *, out=None):
        """Dequantized K and V of tokens ``start .. stop - 1`` of one layer.

        Parameters
        ----------
        seq : int
        layer : int
            ``0 .. num_layers - 1``.
        start, stop : int, optional
            ``0 <= start <= stop <= seq_len(seq, layer)``; ``stop`` defaults to the
            sequence's length in this layer.
        out : (numpy.ndarray, numpy.ndarray), optional
            Buffers to fill instead of allocating: float32, C-contiguous,
            ``[stop - start, num_kv_heads, head_dim]`` each (e.g. numpy views of torch
            tensors from ``tensor.numpy()``).

        Returns
        -------
        k, v : numpy.ndarray, float32, shape ``[stop - start, num_kv_heads, head_dim]``
            New arrays (nothing refers to the file), or the ``out`` buffers.

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
        if not (is_int(start) and is_int(stop) and 0 <= start <= stop <= st.length):
            raise ShapeError(f"need 0 <= start <= stop <= {st.length}, found start={start!r}, stop={stop!r}")
        if out is not None:
            out = self._check_out(out, stop - start)
        got = self._table.read(st, start, stop, out)
        if not self.writable and self.path is not None:
            self.check_pages_current(self._table.pages_read(st, start, stop))
        return got["k"], got["v"]

    def _check_out(self, out, n: int) -> dict:
        want = (n, self.num_kv_heads, self.head_dim)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ShapeError(f"out must be a pair (k_out, v_out), found {type(out).__name__}")
        for name, a in zip("kv", out):
            if not isinstance(a, np.ndarray) or a.dtype != np.float32:
                raise DTypeError(f"out {name} must be a float32 numpy array, found {describe(a)}")
            if a.shape != want or not a.flags.c_contiguous or not a.flags.writeable:
                raise ShapeError(f"out {name} must be a writable C-contiguous float32{list(want)}, found "
                                 f"{describe(a)}" + ("" if a.flags.c_contiguous else " (not contiguous)"))
        if np.shares_memory(out[0], out[1]):
            raise ShapeError("out k and v must not overlap")
        return {"k": out[0], "v": out[1]}

    def read_rows(self, seqs, layer: int, start: int, stop: int, k_out: np.ndarray, v_out: np.ndarray) -> None:
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
        self._table.read_rows([self._seq(s).layers[layer] for s in seqs], start, stop, k_out, v_out)

    def check_pages_current(self, pages) -> None:
        """Read-only views: refuse data just read from pages a writer may have reused.

        A page of the commit this view was opened at is rewritten only after newer commits
        dropped it. While the newest commit on disk is the one that was newest at open,
        nothing was; otherwise the pages just read must still match their checksums. Call
        after copying. Does nothing for writers and RAM caches.

        Parameters
        ----------
        pages : iterable of int
            Page ids just read (e.g. :meth:`PagedBatch.pages`).

        Raises
        ------
        CacheFileError
            Some of them changed since the view was opened: reopen to read the current state.
        """
        if self.writable or self.path is None or self._commits.is_current():
            return
        changed = self.mismatched(pages)
        if changed:
            raise CacheFileError(
                f"{self.path}: pages {changed[:8]} changed since this read-only view was opened at "
                f"commit {self._generation} (a writer reused them, or they are damaged); reopen the "
                "cache to read the current state")

    @_locked
    def fork(self, seq: int, name: str | None = None) -> int:
        """A new sequence holding what ``seq`` holds, sharing its sealed pages.

        Pages are reference-counted, not copied; a shared partly filled last page is
        copied by whichever sequence appends to it first (copy-on-write). Later writes to
        either sequence never change the other.

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
        return self._table.fork(seq, name)

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
        self._table.free(seq)

    @_locked
    def truncate(self, seq: int, n: int) -> None:
        """Keep the first ``n`` tokens of every layer of ``seq`` (layers shorter keep all).

        A page cut in the middle is not changed: it stays listed with fewer rows, and
        the next append copies it first (copy-on-write), since commits may list its rows.

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
        self._seq_and_count(seq, n, "truncate")
        self._table.truncate(seq, n)

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
        self._seq_and_count(seq, n, "shift_left")
        self._table.shift_left(seq, n)

    def block_table(self, seq: int, layer: int = 0) -> np.ndarray:
        """Physical ids of the pages of one layer of ``seq``, in logical order.

        Parameters
        ----------
        seq : int
        layer : int
            ``0 .. num_layers - 1`` (default 0).

        Returns
        -------
        numpy.ndarray, uint32, shape ``[num_pages]``
            A copy: all full but perhaps the last. Visible token ``i`` is in page
            ``[(first + i) // page_size]`` at row ``(first + i) % page_size``
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
            ``page * page_size + row`` of each token in the page arena (int4 keys of a
            partly filled page are elsewhere: residual rows, see :meth:`paged_layout`).

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
        if not (is_int(start) and is_int(n) and 0 <= start and 0 <= n and start + n <= st.length):
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

        q = as_float_array(q, "q")
        if q.ndim != 2:
            raise ShapeError(f"q must be [num_q_heads, head_dim={self.head_dim}], found {describe(q)}")
        return paged_decode_attention(self, layer, [seq], q[None], scale=scale, window=window,
                                      backend=backend)[0]

    @_locked
    def stats(self) -> dict:
        """Pages, bytes and tokens of the cache as it is now (uncommitted changes included).

        Returns
        -------
        dict of str to int
            ``sequences``: sequences held; ``pages_used``: pages of tokens some block
            table lists (residual pages included); ``pages_meta``: pages holding the
            commit's metadata (records and index); ``pages_free``: pages ready for reuse;
            ``pages_pending``: dropped pages that the newest or the previous commit still
            lists (reusable once two :meth:`flush` calls have passed); ``pages_capacity``:
            pages the arena can hold before it grows; ``page_bytes``: bytes of one page;
            ``bytes_pages``: ``pages_used * page_bytes``; ``bytes_meta``: ``pages_meta *
            page_bytes``; ``bytes_on_disk``: blocks the file occupies (0 in RAM);
            ``bytes_in_ram``: page checksums, stamps and reference counts, plus the arena of
            a RAM-only cache; ``tokens``: visible tokens summed over sequences and layers.

        Raises
        ------
        CacheFileError
            The cache is closed.
        """
        self._check_open()
        alloc, table = self._table.alloc, self._table
        used = alloc.high_water - alloc.num_free - alloc.num_pending - table.meta_pages
        disk = 0
        if self.path is not None and self._fd is not None:
            disk = os.fstat(self._fd).st_blocks * 512
        return {
            "sequences": len(table.seqs),
            "pages_used": used,
            "pages_meta": table.meta_pages,
            "pages_free": alloc.num_free,
            "pages_pending": alloc.num_pending,
            "pages_capacity": self._pool.capacity,
            "page_bytes": self._sb.page_bytes,
            "bytes_pages": used * self._sb.page_bytes,
            "bytes_meta": table.meta_pages * self._sb.page_bytes,
            "bytes_on_disk": disk,
            "bytes_in_ram": self._pool.page_crc.nbytes + self._pool.page_stamp.nbytes + alloc.refcounts.nbytes
            + (self._pool.data.nbytes if self.path is None else 0),
            "tokens": table.tokens(),
        }

    # ------------------------------------------------------------------ capacity

    @_locked
    def remaining_capacity(self, seq: int) -> int | None:
        """Tokens that can still be appended to every layer of ``seq``, or None without limits.

        The smallest of what the sequence's ``max_tokens`` leaves (in its fullest layer) and
        what the pool's ``max_bytes`` leaves (page slots shared by all sequences, so a figure
        for this sequence alone, if no other grows meanwhile).

        Raises
        ------
        SequenceError
            Unknown ``seq``.
        CacheFileError
            The cache is closed.
        """
        self._check_open()
        s = self._seq(seq)
        left = None
        if s.max_tokens:
            left = max(0, s.max_tokens - max(st.length for st in s.layers))
        table = self._table
        if table.max_pages:
            P = self.page_size
            spare = max(0, table.max_pages - table.data_pages())
            room = min((P - st.n_pos % P) % P for st in s.layers)      # rows left in the last pages
            pool = room + (spare // self.num_layers) * P
            left = pool if left is None else min(left, pool)
        return left

    @_locked
    def is_full(self, seq: int) -> bool:
        """Whether no token can be appended to ``seq`` (see :meth:`remaining_capacity`):
        the streaming pattern is ``if c.is_full(s): c.shift_left(s, n)``."""
        left = self.remaining_capacity(seq)
        return left is not None and left <= 0

    # ------------------------------------------------------------------ commit

    def _retire_other(self, root) -> None:
        """Keep the pages the other root's commit lists, and this one does not, out of use
        until the next commit replaces that root (it must stay readable until then)."""
        other_hw = min(root.high_water, self._pool.file_pages())     # a hostile count is bounded by the file
        alloc = self._table.alloc
        hw = alloc.high_water
        if other_hw > hw:
            # the other commit is newer (commit="previous") and used page ids beyond ours:
            # they must not be handed out as new ones either
            counts = np.zeros(other_hw, np.uint32)
            counts[:hw] = alloc.refcounts
            alloc = self._table.alloc = PageAllocator(counts)
            self._pool.map_exactly(other_hw)                    # within the file: opening grows nothing
        pages = self._commits.other_pages(self._table, root)
        if len(pages):
            pages = pages[pages < alloc.high_water]
            idle = pages[alloc.refcounts[pages] == 0]
            if len(idle):
                alloc.retire(np.unique(idle))

    @_locked
    def flush(self) -> None:
        """Commit: make every change so far durable. After it returns a crash loses nothing.

        Writes a record for each sequence changed since the last commit and a new index
        (16 bytes a sequence) into fresh pages, syncs them with the data pages, then writes
        the root not holding the newest commit, with a higher generation and its checksum,
        and syncs it: the cost follows what changed. Pages dropped since the previous
        commit become reusable only now. Does nothing on a read-only cache; in RAM it only
        releases the dropped pages.

        Raises
        ------
        CacheFileError
            The cache is closed.
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
            self._table.alloc.release_pending()
            self._table.dirty.clear()
            return
        self._commits.save(self._table)

    @_locked
    def compact(self) -> dict:
        """Give the space of dropped pages back to the file system (or to RAM).

        Commits twice, so that pages dropped until now are listed by neither commit on disk
        and become free; copies pages in use near the end of the file into free pages
        lower down (the commits that follow list the copies and rewrite every sequence's
        record low); cuts the file after the last page in use once both commits on disk
        say so (not while read-only views of the file are open, here or in other processes:
        their mappings would fault past the new end; they get the stale-view error of
        :meth:`read` instead); and punches holes where free pages remain (Linux
        ``fallocate(PUNCH_HOLE)``). Do not run it beside reads of this cache in other threads.
        A RAM cache shrinks its arena to the pages in use. Crash-safe: only pages no
        commit on disk lists are overwritten or given back. Readers opened at older commits
        that read such a page get the stale-view error of :meth:`read`. Page ids change:
        views from :meth:`paged_layout` and :meth:`pool_views` must be taken again.

        Returns
        -------
        dict
            ``bytes_on_disk_before``, ``bytes_on_disk_after`` (file blocks; RAM: arena
            bytes), ``bytes_given_back``, ``pages_free``.

        Raises
        ------
        ReadOnlyError
            The cache was opened with ``mode="r"``.
        CacheFileError, OSError
            As :meth:`flush`.
        """
        self._check_open(write=True)
        before = self._space()
        self.flush()
        self.flush()            # dropped pages: pending, retired, now free
        alloc = self._table.alloc
        if self.path is None:
            given = self._pool.give_back(alloc.free_pages(), alloc.shrink())
        else:
            table = self._table
            # Pages of tokens move down below a bound that leaves room for two versions of the
            # metadata; the next commits list the copies, rewrite every record into the lowest
            # free pages, and free the originals; then both roots name the lower high-water
            # mark before the file is cut to it. At every step both commits on disk list only
            # intact pages.
            table.relocate(table.data_pages() + 2 * table.meta_pages + 2)
            table.dirty.update(table.seqs)
            self.flush()
            self.flush()
            hw = alloc.high_water
            # read-only views in other processes map the file: cutting it under them would be
            # a SIGBUS there, so with readers the free end only gets holes punched (below)
            if not self._readers() and alloc.shrink() < hw:
                self._commits.save(table)
                self._commits.save(table)
                given = self._pool.truncate_to(alloc.high_water)
            else:
                given = 0
            given += self._pool.give_back(alloc.free_pages(), alloc.high_water)
        return {"bytes_on_disk_before": before, "bytes_on_disk_after": self._space(),
                "bytes_given_back": int(given), "pages_free": alloc.num_free}

    def _readers(self) -> bool:
        """Whether read-only views of this file are open (this process, or another)."""
        st = os.fstat(self._fd)
        local = [r for r in _LOCAL_READERS.get((st.st_dev, st.st_ino), ()) if not r._closed]
        return bool(local) or readers_present(self._fd)

    def _space(self) -> int:
        return self._pool.data.nbytes if self.path is None else os.fstat(self._fd).st_blocks * 512

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
        table = self._table
        pages = set(table.listed_pages()) | set(self._partial_pages())
        return self.mismatched(sorted(pages))

    def _partial_pages(self) -> dict:
        """``{page: (layer state, rows, crc, residual crcs)}`` of partly filled last pages as
        committed (pages whose rows have grown since are checked up to the committed rows)."""
        if not self.writable and self._partial is not None:
            return self._partial                # a read-only view does not change
        table, out = self._table, {}
        for s in table.seqs.values():
            for st in s.layers:
                c = st.committed
                # still the page committed partly filled, still partly filled, with its keys
                # where they were (residual rows or not): else a full page's checksum applies
                if c is not None and c[2] is not None and len(st.bt) and int(st.bt.pages[-1]) == c[0] \
                        and c[1] <= table.last_rows(st) < self.page_size and bool(len(st.res)) == bool(c[3]):
                    out[c[0]] = (st, c[1], c[2], c[3])
        if not self.writable:
            self._partial = out
        return out

    @_locked
    def page_checksums(self, page: int, partial: dict | None = None) -> tuple[int, int]:
        """(stored, computed) CRC-32C of a page listed by a block table (a partly filled
        last page: of its committed rows and, for int4 keys, their residual rows too)."""
        self._check_open()
        partial = self._partial_pages() if partial is None else partial
        if page not in partial:
            return int(self._pool.page_crc[page]), int(self._pool.crc_of(page))
        st, rows, crc, res_crc = partial[page]
        now, res_now = self._table.last_page_crc(st, rows)
        # residual rows that changed make the page's computed checksum differ too
        return crc, now if list(res_now) == list(res_crc) else now ^ 0xFFFFFFFF

    @_locked
    def mismatched(self, pages) -> list[int]:
        """The pages among ``pages`` (listed by block tables) whose bytes no longer match
        their checksum, in order."""
        self._check_open()
        partial = self._partial_pages()
        unchecked = set()
        if self.writable or self.path is None:  # partly filled pages not committed (yet): nothing to check
            unchecked = {int(st.bt.pages[-1]) for q in self._table.seqs.values() for st in q.layers
                         if st.n_pos % self.page_size} - set(partial)
        out = []
        for p in pages:
            if int(p) in unchecked:
                continue
            stored, now = self.page_checksums(int(p), partial)
            if stored != now:
                out.append(int(p))
        return out

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
        self._pool.close()
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


def copy_v1(src, dst: PagedKVCache, step: int | None = None, on_layer=None) -> tuple[int, dict]:
    """Copy every sequence of a format 1.x file (:func:`kvmmap.core.legacy.read_v1`) into the
    empty cache ``dst`` of the same geometry: same ids, names, positions dropped in front,
    next id, and tokens (decoded, then stored again: exact for fp32/fp16/bf16, within a
    quantization step otherwise). Appends in chunks of ``step`` positions ending on page
    boundaries; ``on_layer()`` is called after each (sequence, layer).

    Returns ``(tokens copied, {"k": max error, "v": max error})``.
    """
    step = step or 64 * src.page_size
    worst, tokens = {"k": 0.0, "v": 0.0}, 0
    for sid, s in src.sequences.items():
        dst.new_sequence(s.name, seq_id=sid)
        # shift_left drops the same count from every layer holding tokens and leaves empty
        # layers alone: per distinct count, the layers dropping it get their dropped rows
        # and one shift_left drops exactly those, so the visible tokens continue on the same
        # page grid as in src
        for first in sorted({st.first for st in s.layers} - {0}):
            for layer, st in enumerate(s.layers):
                if st.first == first:
                    dst.append(sid, layer, *src.read(sid, layer, 0, first, dropped=True))
            dst.shift_left(sid, first)
        for layer, st in enumerate(s.layers):
            for row in range(st.first, st.n_pos, step):
                a, b = row - st.first, min((row // step + 1) * step, st.n_pos) - st.first
                k, v = src.read(sid, layer, a, b)
                dst.append(sid, layer, k, v)
                for side, x, y in zip("kv", (k, v), dst.read(sid, layer, a, b)):
                    worst[side] = max(worst[side], float(np.abs(x - y).max(initial=0.0)))
            tokens += st.length
            if on_layer is not None:
                on_layer()
    live = max(src.sequences, default=-1)
    if src.next_sequence_id > live + 1:     # ids freed in src above every live one stay used
        dst.free(dst.new_sequence(seq_id=src.next_sequence_id - 1))
    return tokens, worst
