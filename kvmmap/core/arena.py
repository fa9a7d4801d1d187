"""The page arena: page bytes in RAM or in a file mapping, with each page's checksum.

An :class:`Arena` knows nothing of sequences: it holds ``capacity`` pages of
``layout.page_bytes`` bytes, grows (a file: extended sparse, then mapped again; RAM:
copied), reserves disk blocks before pages are handed out, and keeps per page the CRC-32C
computed when it was sealed and a *stamp* (a counter, not a clock) that device copies of
the pool (kvmmap.opencl) use to upload only pages sealed since their last upload.
"""

from __future__ import annotations

import os

import crc32c
import numpy as np

from ..codecs import _pages, quant
from ..errors import DTypeError, LayoutError, ShapeError
from ..parallel import get_num_threads
from .fileio import punch_hole, reserve
from .layout import PageLayout
from .superblock import Superblock


class Arena:
    """Pages ``0 .. capacity - 1`` of one cache.

    Parameters
    ----------
    sb : Superblock
        Geometry; ``sb.arena_offset`` is where page 0 starts in a file.
    layout : PageLayout
    path : str or None
        The cache file (None: RAM only).
    fd : int or None
        Its open descriptor (file caches).
    writable : bool
        Map the file for writing.

    Attributes
    ----------
    data : numpy.ndarray, uint8 ``[capacity * page_bytes]``
        The bytes (a numpy.memmap for files).
    views : dict of side -> dict of region name -> numpy.ndarray ``[capacity, *region.shape]``
        Typed views of every region of every page (see :class:`PageLayout`).
    page_crc : numpy.ndarray, uint32 ``[>= capacity]``
        CRC-32C of each page as sealed.
    page_stamp : numpy.ndarray, uint64 ``[>= capacity]``
        When each page was last sealed (a counter).
    reserved : int
        Pages ``0 .. reserved - 1`` have disk blocks (file caches).
    """

    def __init__(self, sb: Superblock, layout: PageLayout, path, fd, writable: bool):
        self.sb, self.layout, self.path, self.fd, self.writable = sb, layout, path, fd, writable
        self.capacity = 0
        self.data = np.zeros(0, np.uint8)
        self.views = layout.arena_views(self.data, 0)
        self.page_crc = np.zeros(0, np.uint32)
        self.page_stamp = np.zeros(0, np.uint64)
        self.stamp = 1
        self.reserved = 0

    @property
    def page_bytes(self) -> int:
        return self.sb.page_bytes

    def file_pages(self) -> int:
        """Whole pages the file's length has room for (its apparent size; 0 in RAM)."""
        if self.path is None:
            return 0
        return max(0, (os.fstat(self.fd).st_size - self.sb.arena_offset) // self.page_bytes)

    def attach(self, num_pages: int, page_crc: np.ndarray) -> None:
        """Map the first ``num_pages`` pages of an opened file, with their checksums."""
        self.page_crc = page_crc
        self.page_stamp = np.ones(len(page_crc), np.uint64)
        if num_pages > 0:
            self._install(self._map(num_pages), num_pages)

    def ensure_capacity(self, num_pages: int) -> None:
        """Grow to hold at least ``num_pages`` pages: a file by half again at least (its
        apparent size stays within 1.5x of the pages handed out, whose blocks are reserved),
        RAM by doubling (each growth copies)."""
        if num_pages <= self.capacity:
            return
        if self.path is None:               # RAM: each growth copies, so double
            cap = max(num_pages, 2 * self.capacity, 64)
        else:
            cap = max(num_pages, self.capacity + self.capacity // 2, 4)
        pb = self.page_bytes
        if self.path is None:
            data = np.zeros(cap * pb, np.uint8)
            data[: self.data.size] = self.data
        else:
            end = self.sb.arena_offset + cap * pb
            if os.fstat(self.fd).st_size < end:     # a reopened file may be longer already
                os.ftruncate(self.fd, end)          # sparse: no page is rewritten
            data = self._map(cap)
        self._install(data, cap)

    def reserve_upto(self, num_pages: int) -> None:
        """Give pages ``0 .. num_pages - 1`` disk blocks (see :func:`fileio.reserve`)."""
        if self.path is not None and num_pages > self.reserved:
            pb = self.page_bytes
            reserve(self.fd, self.sb.arena_offset + self.reserved * pb, (num_pages - self.reserved) * pb)
            self.reserved = num_pages

    def _map(self, cap: int) -> np.ndarray:
        return np.memmap(self.path, dtype=np.uint8, mode="r+" if self.writable else "r",
                         offset=self.sb.arena_offset, shape=(cap * self.page_bytes,))

    def map_exactly(self, num_pages: int) -> None:
        """Map ``num_pages`` pages (within the file; opening grows nothing)."""
        self._install(self._map(num_pages), num_pages)

    def _install(self, data, cap: int) -> None:
        self.data, self.capacity = data, cap
        self.views = self.layout.arena_views(data, cap)
        if len(self.page_crc) < cap:
            crc = np.zeros(cap, np.uint32)
            crc[: len(self.page_crc)] = self.page_crc
            self.page_crc = crc
        if len(self.page_stamp) < cap:
            stamp = np.zeros(cap, np.uint64)
            stamp[: len(self.page_stamp)] = self.page_stamp
            self.page_stamp = stamp

    def copy_page(self, src: int, dst: int) -> None:
        """Copy page ``src``'s bytes to page ``dst`` (copy-on-write)."""
        pb = self.page_bytes
        self.data[dst * pb:(dst + 1) * pb] = self.data[src * pb:(src + 1) * pb]

    def residual_rows(self, page: int, rows_per_page: int) -> np.ndarray:
        """A residual page as float16 ``[rows_per_page, H, D]`` (token-major key rows)."""
        H, D = self.layout.num_kv_heads, self.layout.head_dim
        at = page * self.page_bytes
        return self.data[at:at + rows_per_page * H * D * 2].view(np.float16).reshape(rows_per_page, H, D)

    def rows_crc(self, page: int, rows: int, skip_k: bool = False) -> int:
        """CRC-32C of rows ``0 .. rows - 1`` of a partly filled page: each region in page
        order, head by head (docs/FORMAT.md); ``skip_k``: int4 keys, held in residual pages."""
        crc = 0
        for side, regs in self.views.items():
            if skip_k and side == "k":
                continue
            for a in regs.values():
                block = a[page]
                for h in range(block.shape[0]):
                    crc = crc32c.crc32c(block[h, :rows], crc)
        return crc

    def bytes_crc(self, page: int, nbytes: int) -> int:
        """CRC-32C of the first ``nbytes`` bytes of a page."""
        at = page * self.page_bytes
        return crc32c.crc32c(self.data[at:at + nbytes])

    def crc_of(self, page: int) -> int:
        """CRC-32C of the page's bytes as they are now."""
        pb = self.page_bytes
        return crc32c.crc32c(self.data[page * pb:(page + 1) * pb])

    def mark_sealed(self, page: int) -> None:
        """Record the checksum and stamp of a page just written."""
        self.page_crc[page] = self.crc_of(page)
        self.stamp += 1
        self.page_stamp[page] = self.stamp

    def page_q(self, side: str, page: int, a: int, b: int):
        """QTensor over rows ``a .. b - 1`` of a page (head-major ``[H, b - a, D]``)."""
        return self.layout.page_qtensor(self.views[side], side, page, a, b)

    def write_rows(self, side: str, page: int, a: int, x: np.ndarray) -> None:
        """Encode ``x`` float32 ``[H, n, D]`` (last axis contiguous, values checked by the
        caller as :func:`~kvmmap.codecs.quant.check_storable` does for grouped formats) into
        rows ``a .. a + n - 1`` of one side of a page: a decode step's rows, with none of
        :meth:`page_q`'s views. Raises NonFiniteError for values the format cannot store,
        possibly after writing some rows (callers write where nothing reads yet).

        The kernel trusts its arguments, so they are checked here, cheaply, whoever the
        caller: a wrong shape would write into other heads' rows or other pages."""
        lay = self.layout
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            raise DTypeError(f"rows to store must be float32, found {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 3 or x.shape[0] != lay.num_kv_heads or x.shape[2] != lay.head_dim \
                or not 0 <= a <= a + x.shape[1] <= lay.page_size:
            raise ShapeError(f"rows {a}.. of a page take [{lay.num_kv_heads}, <= {lay.page_size - a}, "
                             f"{lay.head_dim}] float32, found {x.shape}")
        if x.shape[2] > 1 and x.strides[2] != 4:
            raise LayoutError(f"rows to store need a contiguous last axis, found strides {x.strides}")
        if lay.grouping(side) == "channel":
            raise LayoutError("int4 keys are grouped per channel over the page: rows cannot be written alone")
        status = _pages.write_rows(self.data, page * self.page_bytes, self.layout.page_size,
                                   *self.layout.side_offsets(side), self.layout.kernel_group(side), a, x)
        if status:
            quant.raise_for_status(status, self.layout.formats[side])

    def read_rows(self, side: str, pages: np.ndarray, pos: int, out: np.ndarray) -> None:
        """Decode positions ``pos .. pos + len(out) - 1`` of one side of the ``pages``
        (logical page ``i`` holds positions ``i * P .. i * P + P - 1``) into ``out``
        float32 ``[n, H, D]``, in parallel, reading the pages in place."""
        _pages.read_pages(self.data, self.page_bytes, self.layout.page_size, *self.layout.side_offsets(side),
                          self.layout.kernel_group(side), pages.astype(np.int32, copy=False), pos, out,
                          get_num_threads())

    def will_need(self, pages: np.ndarray) -> None:
        """Ask the kernel to start reading ``pages`` of a file from disk now.

        A read through the memory map faults pages in one at a time in page-table order,
        which jumps around the file; announcing every run of consecutive pages first lets
        the disk work ahead (a cold full read went from 0.54 to 1.0+ GB/s of file).
        """
        if self.path is None or self.fd is None or len(pages) < 64:
            return
        pb, base = self.page_bytes, self.sb.arena_offset
        for a, b in _runs(np.sort(pages.astype(np.int64))):
            os.posix_fadvise(self.fd, base + a * pb, (b - a) * pb, os.POSIX_FADV_WILLNEED)

    def give_back(self, free: np.ndarray, high_water: int) -> int:
        """Return the space of free pages: punch holes in a file (runs of consecutive free
        pages), or, in RAM, shrink the arena to ``high_water`` pages. Returns the bytes
        given back (punched or freed). Free pages are listed by no commit on disk, so their
        bytes may go; their blocks are reserved again before they are handed out."""
        pb = self.page_bytes
        if self.path is None:
            if high_water >= self.capacity:
                return 0
            gone = (self.capacity - high_water) * pb
            data = np.zeros(high_water * pb, np.uint8)
            data[:] = self.data[: high_water * pb]
            self.data, self.capacity = data, high_water
            self.views = self.layout.arena_views(data, high_water)
            return gone
        if not len(free):
            return 0
        done = 0
        for a, b in _runs(free):
            if not punch_hole(self.fd, self.sb.arena_offset + a * pb, (b - a) * pb):
                break
            done += (b - a) * pb
        self.reserved = 0           # holes now: the next pages handed out reserve [0, need) again
        return done

    def truncate_to(self, num_pages: int) -> int:
        """Cut the file after page ``num_pages - 1`` (pages beyond are free and listed by
        no commit on disk) and map what is left; returns the bytes of blocks given back."""
        before = os.fstat(self.fd).st_blocks * 512
        self.data = np.zeros(0, np.uint8)       # unmap before the file shrinks under the map
        self.views = self.layout.arena_views(self.data, 0)
        os.ftruncate(self.fd, self.sb.arena_offset + num_pages * self.page_bytes)
        self.capacity = 0
        self.reserved = min(self.reserved, num_pages)
        if num_pages:
            self._install(self._map(num_pages), num_pages)
        return max(0, before - os.fstat(self.fd).st_blocks * 512)

    def close(self) -> None:
        self.data = np.zeros(0, np.uint8)
        self.views = None


def _runs(pages: np.ndarray):
    """``(first, end)`` of each run of consecutive ids in the increasing, non-empty ``pages``."""
    cuts = np.flatnonzero(np.diff(pages) != 1) + 1
    starts, ends = pages[np.r_[0, cuts]], pages[np.r_[cuts - 1, len(pages) - 1]] + 1
    return zip(starts.tolist(), ends.tolist())
