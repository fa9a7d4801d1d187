"""What a cache file holds (``kvmmap inspect``): geometry, formats and their cost in bytes,
sequences, pages and disk use. Page checksums are not read here (``kvmmap verify``).

Opens the file read-only (no lock), so it may run beside a writer and describes the state
committed when it opened.
"""

from __future__ import annotations

import os

import numpy as np

from ..cache import PagedKVCache
from .common import commit_info, disk_usage, human_bytes, layer_tables, open_read_only

_FLOAT32_BYTES = 4


def file_pages(cache: PagedKVCache) -> int:
    """Pages the file's length has room for (its apparent capacity; nothing is mapped)."""
    sb = cache.superblock
    return max((os.stat(cache.path).st_size - sb.arena_offset) // sb.page_bytes, 0)


def _format_summary(cache: PagedKVCache, pages_used: int) -> list[dict]:
    layout = cache.layout
    H, D, P = cache.num_kv_heads, cache.head_dim, cache.page_size
    out = []
    for side in ("k", "v"):
        f = layout.formats[side]
        regions = layout.regions[side]
        side_bytes = sum(r.nbytes for r in regions.values())
        dt = layout.side_dtype.name
        if not f.scaled:
            scales = "none"
        elif not f.grouped:
            scales = f"{dt} scale per token per head"
        elif side == "k":
            scales = f"{dt} scale + zero per channel over the {P} tokens of a page"
        else:
            scales = f"{dt} scale + zero per {layout.group_size['v']} elements of a token"
        out.append({
            "side": side,
            "format": f.name,
            "bits": f.bits,
            "side_data": scales,
            "bytes_per_token": side_bytes / P,            # one layer, all heads
            "ratio_vs_fp32": H * D * _FLOAT32_BYTES * P / side_bytes,
            "bytes_in_pages": pages_used * side_bytes,
        })
    return out


def inspect_cache(path) -> dict:
    """Describe a cache file.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    dict
        ``path``, ``version``, ``num_layers``, ``num_kv_heads``, ``head_dim``,
        ``page_size``, ``page_bytes``, ``k_format``, ``v_format``, ``fingerprint``
        (hex), ``commit`` (generation, slot), ``pages`` (used, free, pending,
        capacity, shared), ``bytes_on_disk`` (allocated blocks), ``apparent_bytes``
        (file length), ``formats`` (per side: format, bits, side data, bytes per token
        per layer, ratio vs fp32, bytes in pages) and ``sequences`` (id, name, tokens
        (fewest over layers), tokens_max, pages, shared_pages).

    Raises
    ------
    CacheFileError, OSError
    """
    path = os.fspath(path)
    with open_read_only(path) as c:
        stats = c.stats()
        tables = {sid: layer_tables(c, sid) for sid in c.sequences()}
        # block tables listing each page (a page listed twice in one table counts once)
        counts = np.zeros(c.high_water, np.int64)
        for layers in tables.values():
            for pages, _, _ in layers:
                np.add.at(counts, np.unique(pages).astype(np.int64), 1)
        seqs = []
        for sid, name in c.sequences().items():
            lengths = [n_pos - first for _, n_pos, first in tables[sid]]
            pages = np.concatenate([p for p, _, _ in tables[sid]]).astype(np.int64)
            seqs.append({
                "id": sid, "name": name, "tokens": min(lengths), "tokens_max": max(lengths),
                "pages": int(len(pages)), "shared_pages": int((counts[pages] > 1).sum()),
            })
        info = {
            "path": path,
            "version": "%d.%d" % c.version,
            "num_layers": c.num_layers,
            "num_kv_heads": c.num_kv_heads,
            "head_dim": c.head_dim,
            "page_size": c.page_size,
            "page_bytes": stats["page_bytes"],
            "k_format": c.k_format,
            "v_format": c.v_format,
            "fingerprint": c.fingerprint.hex(),
            "commit": commit_info(c),
            "pages": {
                "used": stats["pages_used"], "free": stats["pages_free"], "pending": stats["pages_pending"],
                "capacity": file_pages(c), "shared": int((counts > 1).sum()),
            },
            **disk_usage(path),
            "formats": _format_summary(c, stats["pages_used"]),
            "sequences": seqs,
        }
    return info


def format_inspect(info: dict) -> str:
    """The text that ``kvmmap inspect`` prints for :func:`inspect_cache`'s result."""
    fp = bytes.fromhex(info["fingerprint"])
    shown = fp.decode("ascii") if fp and fp.isascii() and fp.decode("ascii").isprintable() else info["fingerprint"]
    p = info["pages"]
    disk, apparent = info["bytes_on_disk"], info["apparent_bytes"]
    lines = [
        f"file         {info['path']}",
        f"format       kvmmap {info['version']}, committed generation {info['commit']['generation']} "
        f"(metadata slot {info['commit']['slot']})",
        f"geometry     {info['num_layers']} layers x {info['num_kv_heads']} kv heads x head_dim {info['head_dim']}, "
        f"page_size {info['page_size']} tokens ({human_bytes(info['page_bytes'])} a page)",
        f"formats      K {info['k_format']}, V {info['v_format']}",
        f"fingerprint  {shown or '(none)'}",
        f"pages        {p['used']} used, {p['free']} free, {p['pending']} pending, {p['capacity']} capacity; "
        f"{p['shared']} shared by forks",
        f"size         {human_bytes(disk)} on disk (allocated blocks), {human_bytes(apparent)} apparent"
        + (f" (sparse: {disk / apparent:.1%} allocated)" if apparent else ""),
        "",
        f"{'side':<5}{'format':<10}{'bits':>5}{'B/token/layer':>15}{'vs fp32':>9}{'in pages':>12}  side data",
    ]
    for f in info["formats"]:
        lines.append(f"{f['side'].upper():<5}{f['format']:<10}{f['bits']:>5}{f['bytes_per_token']:>15.1f}"
                     f"{f['ratio_vs_fp32']:>8.2f}x{human_bytes(f['bytes_in_pages']):>12}  {f['side_data']}")
    lines += ["", f"{len(info['sequences'])} sequence(s)"]
    if info["sequences"]:
        lines.append(f"{'id':>6}  {'tokens':>10}  {'pages':>8}  {'shared':>7}  name")
        for s in info["sequences"]:
            tokens = str(s["tokens"]) if s["tokens"] == s["tokens_max"] else f"{s['tokens']}..{s['tokens_max']}"
            name = "-" if s["name"] is None else repr(s["name"])
            lines.append(f"{s['id']:>6}  {tokens:>10}  {s['pages']:>8}  {s['shared_pages']:>7}  {name}")
    lines += ["", "page checksums are not read here: run `kvmmap verify` for that"]
    return "\n".join(lines)
