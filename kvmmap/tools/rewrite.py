"""Rewrite a cache file: every sequence re-encoded into a new file (``kvmmap compress``).

:func:`compress_cache` reads each (sequence, layer) of a cache file, optionally passes it
through a :class:`~kvmmap.KVCacheCompressor`, and appends it to a new file in other
formats.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from ..cache import PagedKVCache
from ..compress import KVCacheCompressor, decompress_kv
from ..core.fileio import fsync_dir, lock_existing, partial_path, remove_stale_partials
from ..errors import CacheFileError
from .common import ChangedByWriterError, check_pages, check_regular_file, disk_usage, layer_tables, open_read_only


def _shared_pages(a: list, b: list) -> int:
    """Leading pages that two sequences share in every layer (0 if either was shifted)."""
    n = None
    for (pa, _, fa), (pb, _, fb) in zip(a, b):
        if fa or fb:
            return 0
        m = min(len(pa), len(pb))
        same = np.flatnonzero(pa[:m] != pb[:m])
        n = min(n if n is not None else m, int(same[0]) if len(same) else m)
    return n or 0


def compress_cache(src, dst, *, k_format: str | None = None, v_format: str | None = None,
                   compressor: KVCacheCompressor | None = None, overwrite: bool = False,
                   progress: bool | None = None) -> dict:
    """Re-encode every sequence of a cache file into a new file.

    Each (sequence, layer) is read from ``src`` (dequantized), passed through
    ``compressor`` if one is given (compressed, then decompressed: the file format
    stores K/V in its page formats, which is what every reader of the file needs), and
    appended to ``dst`` in ``k_format`` / ``v_format``. Names, page size and fingerprint
    are kept. Sequences that share leading pages in ``src`` (forks) share them in ``dst``.
    ``src`` is only read. ``dst`` is built as ``.NAME.partial-PID`` in its directory,
    committed (synced), then renamed to ``dst``: at ``dst`` there is only ever no file, the
    file that was there, or the complete result. A failure removes the partial file; a
    process killed leaves it, and the next call for the same ``dst`` deletes it
    (:func:`kvmmap.core.fileio.remove_stale_partials`: partial files whose writer lock is free).

    Parameters
    ----------
    src, dst : str or os.PathLike
    k_format, v_format : str, optional
        Formats of ``dst`` (default: those of ``src``).
    compressor : KVCacheCompressor, optional
        Fitted per (sequence, layer) on that data unless it was :meth:`~KVCacheCompressor.fit`.
    overwrite : bool
        Replace an existing ``dst``. Refused while another process has ``dst`` open for
        writing (its writer lock is held); the lock is then held until the rename.
    progress : bool, optional
        Progress bar over (sequence, layer) pairs (None: only when stderr is a terminal).

    Returns
    -------
    dict
        ``sequences``, ``tokens`` (summed over layers), ``shared_pages`` (pages reused by
        forks), formats before and after, ``bytes_on_disk_before`` / ``_after``
        (allocated blocks), ``apparent_bytes_before`` / ``_after``, ``k_rel_error`` and
        ``v_rel_error`` (``||src - dst|| / ||src||`` over all tokens of all layers,
        measured on what ``dst`` returns), and with a compressor ``method``,
        ``method_ratio`` and ``method_ratio_shared`` (what its compressed representation
        achieves, summed over every call).

    Raises
    ------
    CacheFileError, FormatError, NonFiniteError, ConfigError, OSError
    """
    src, dst = os.fspath(src), os.fspath(dst)
    check_regular_file(src)
    if os.path.lexists(dst):
        if os.path.exists(dst) and os.path.samefile(src, dst):
            raise CacheFileError(f"{dst} is the input file; write the compressed cache elsewhere")
        if not overwrite:
            raise CacheFileError(f"{dst} exists; pass overwrite=True (kvmmap compress --overwrite) to replace it")
        check_regular_file(dst)     # locking it opens it: a FIFO would block
    # The old dst's writer lock is held until the rename, as create(overwrite=True) does: a
    # writer that has dst open is refused instead of having its file replaced under it, and
    # no writer can open it meanwhile.
    old_fd = lock_existing(dst) if overwrite else None
    try:
        return _compress_into(src, dst, k_format, v_format, compressor, progress)
    finally:
        if old_fd is not None:
            os.close(old_fd)


@dataclass
class _Tally:
    """What compress_cache counts on the way."""

    sums: dict = field(default_factory=lambda: {"k": [0.0, 0.0], "v": [0.0, 0.0]})   # ||x - y||^2, ||x||^2
    method_in: int = 0
    method_out: int = 0
    method_shared: int = 0
    tokens: int = 0
    shared_pages: int = 0

    def rel(self, side: str) -> float:
        err, ref = self.sums[side]
        return math.sqrt(err / ref) if ref else (0.0 if err == 0 else math.inf)


def _changed(src: str, what: str) -> ChangedByWriterError:
    return ChangedByWriterError(f"{src}: {what} since compress started (a writer is committing): rerun; "
                                "nothing is known to be damaged")


def _check_source(s: PagedKVCache, src: str) -> None:
    """Refuse a source whose pages in use fail their checksums or were reused by a writer."""
    used = sorted({int(p) for sid in s.sequences() for pages, _, _ in layer_tables(s, sid) for p in pages})
    damaged, reused = check_pages(s, used)
    if damaged:
        raise CacheFileError(f"{src}: {len(damaged)} damaged page(s) (ids {', '.join(map(str, damaged[:8]))}); "
                             f"run `kvmmap verify {src}`")
    if reused:
        raise _changed(src, f"{len(reused)} page(s) (ids {', '.join(map(str, reused[:8]))}) changed")


def _compress_into(src: str, dst: str, k_format, v_format, compressor, progress) -> dict:
    """compress_cache's work, once ``dst`` may be replaced."""
    before = disk_usage(src)
    remove_stale_partials(dst)
    tmp = partial_path(dst)
    tally = _Tally()
    with open_read_only(src) as s:
        _check_source(s, src)
        kf_before, vf_before = s.k_format, s.v_format
        kf, vf = k_format or kf_before, v_format or vf_before
        names = s.sequences()
        tables = {sid: layer_tables(s, sid) for sid in names}
        d = PagedKVCache.create(tmp, num_layers=s.num_layers, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                                page_size=s.page_size, k_format=kf, v_format=vf, fingerprint=s.fingerprint,
                                overwrite=True)
        try:
            _copy_sequences(s, d, src, names, tables, compressor, progress, tally)
            d.flush()
            # renamed while still open: its writer lock marks the complete partial file as
            # live, so a concurrent call's cleanup leaves it alone
            os.replace(tmp, dst)
            fsync_dir(dst)              # the new name survives a power loss too
            d.close()
        except BaseException:
            d.close()
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    after = disk_usage(dst)
    report = {
        "src": src, "dst": dst, "sequences": len(names), "tokens": tally.tokens, "shared_pages": tally.shared_pages,
        "k_format_before": kf_before, "v_format_before": vf_before, "k_format": kf, "v_format": vf,
        "bytes_on_disk_before": before["bytes_on_disk"], "bytes_on_disk_after": after["bytes_on_disk"],
        "apparent_bytes_before": before["apparent_bytes"], "apparent_bytes_after": after["apparent_bytes"],
        "k_rel_error": tally.rel("k"), "v_rel_error": tally.rel("v"),
    }
    if compressor is not None:
        out = tally.method_out
        report.update(method=compressor.method,
                      method_ratio=tally.method_in / out if out else None,
                      method_ratio_shared=tally.method_in / max(out - tally.method_shared, 1) if out else None)
    return report


def _copy_sequences(s: PagedKVCache, d: PagedKVCache, src: str, names: dict, tables: dict, compressor,
                    progress, tally: _Tally) -> None:
    """Append every sequence of ``s`` to ``d``; a sequence sharing leading pages with one
    already copied starts as a fork of it, so the pages stay shared."""
    done: dict[int, int] = {}
    bar = tqdm(total=len(names) * s.num_layers, desc="compress", unit="layer",
               disable=None if progress is None else not progress)
    with bar:
        for sid, name in names.items():
            base, shared = None, 0
            for prev in done:
                n = _shared_pages(tables[prev], tables[sid])
                if n > shared:
                    base, shared = prev, n
            if base is None:
                out = d.new_sequence(name)
            else:
                out = d.fork(done[base], name)
                d.truncate(out, shared * s.page_size)
            tally.shared_pages += shared * s.num_layers
            for layer in range(s.num_layers):
                _copy_layer(s, d, src, sid, out, layer, shared * s.page_size, compressor, tally)
                bar.update()
            done[sid] = out


def _copy_layer(s: PagedKVCache, d: PagedKVCache, src: str, sid: int, out: int, layer: int, start: int,
                compressor, tally: _Tally) -> None:
    """Append tokens ``start:`` of (``sid``, ``layer``) of ``s`` to ``out`` in ``d``, through ``compressor``."""
    try:
        k, v = s.read(sid, layer)
    except CacheFileError:
        # read() refuses pages that fail their checksum once a newer
        # commit exists: reused by the writer (they passed above)
        if not s.commit_is_newest():
            raise _changed(src, f"sequence {sid} layer {layer} changed") from None
        raise
    k2, v2 = k, v
    if compressor is not None and len(k) > start:
        c = compressor.compress_kv(k.transpose(1, 0, 2), v.transpose(1, 0, 2))
        tally.method_in += c.report["bytes_in"]
        tally.method_out += c.report["bytes_out"]
        tally.method_shared += c.report["bytes_shared"]
        hk, hv = decompress_kv(c)
        k2, v2 = hk.transpose(1, 0, 2), hv.transpose(1, 0, 2)
    d.append(out, layer, k2[start:], v2[start:])
    for side, x, y in zip("kv", (k, v), d.read(out, layer)):
        tally.sums[side][0] += float(np.square(x - y, dtype=np.float64).sum())
        tally.sums[side][1] += float(np.square(x, dtype=np.float64).sum())
    tally.tokens += len(k)
