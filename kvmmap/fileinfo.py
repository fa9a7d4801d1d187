"""Read-only looks at a cache file: what it holds (``kvmmap inspect``) and whether it is
intact (``kvmmap verify``).

Both open the file with ``mode="r"``, which takes no lock, so they may run beside a
writer; they see the state committed when they opened it.
"""

from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from .cache import PagedKVCache
from .errors import CacheFileError, PageTableError
from .pagetable import check_paged_layout
from .storage import SLOT_HEADER_BYTES, SUPERBLOCK_BYTES, Superblock, read_slot

_FLOAT32_BYTES = 4


def layer_tables(cache: PagedKVCache, seq: int) -> list[tuple[np.ndarray, int, int]]:
    """The page table of every layer of one sequence.

    Parameters
    ----------
    cache : PagedKVCache
    seq : int
        Sequence id.

    Returns
    -------
    list of (pages, n_pos, first), one per layer
        ``pages``: uint32 ``[num_sealed_pages]`` physical ids in logical order (a copy);
        ``n_pos``: positions written; ``first``: positions dropped in front by
        ``shift_left``. Visible token ``i`` is position ``first + i`` (docs/FORMAT.md).
    """
    cache._check_open()
    return [(st.bt.pages.copy(), int(st.n_pos), int(st.first)) for st in cache._seq(seq).layers]


def commit_info(cache: PagedKVCache) -> dict:
    """``{"generation": int, "slot": int}`` of the commit a cache was opened at (or last made)."""
    return {"generation": int(cache._generation), "slot": int(cache._active_slot)}


def disk_usage(path) -> dict:
    """``{"bytes_on_disk": st_blocks * 512, "apparent_bytes": st_size}`` of a file (it is sparse)."""
    st = os.stat(path)
    return {"bytes_on_disk": st.st_blocks * 512, "apparent_bytes": st.st_size}


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------- inspect


def _format_summary(cache: PagedKVCache, pages_used: int) -> list[dict]:
    layout = cache.layout
    H, D, P = cache.num_kv_heads, cache.head_dim, cache.page_size
    out = []
    for side in ("k", "v"):
        f = layout.formats[side]
        regions = layout.regions[side]
        side_bytes = sum(r.nbytes for r in regions.values())
        if not f.scaled:
            scales = "none"
        elif f.name != "int4":
            scales = "scale per token per head"
        elif side == "k":
            scales = f"scale + zero per channel over the {P} tokens of a page"
        else:
            scales = f"scale + zero per {layout.group_size['v']} elements of a token"
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
    with PagedKVCache.open(path, mode="r") as c:
        stats = c.stats()
        tables = {sid: layer_tables(c, sid) for sid in c.sequences()}
        counts = np.zeros(max(stats["pages_capacity"], 1), np.int64)
        for layers in tables.values():
            for pages, _, _ in layers:
                np.add.at(counts, pages.astype(np.int64), 1)
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
                "capacity": stats["pages_capacity"], "shared": int((counts > 1).sum()),
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


# ---------------------------------------------------------------------------------- verify


def _slot_status(fd: int, sb: Superblock, index: int) -> dict:
    off = sb.meta_offset + index * sb.meta_slot_bytes
    got = read_slot(fd, sb, index)
    if got is not None:
        return {"slot": index, "state": "valid", "generation": int(got[0])}
    # empty only if the whole 64-byte header is zero, padding included (as read_slot checks it)
    if not any(os.pread(fd, SLOT_HEADER_BYTES, off)):
        return {"slot": index, "state": "empty"}
    return {"slot": index, "state": "damaged"}


def _page_owners(tables: dict, names: dict, page_size: int) -> dict:
    """{page: [(seq, name, layer, logical index, first visible token, last)]}."""
    owners: dict[int, list] = {}
    for sid, layers in tables.items():
        for layer, (pages, _, first) in enumerate(layers):
            for i, p in enumerate(pages.tolist()):
                a = max(i * page_size - first, 0)
                b = (i + 1) * page_size - first - 1
                owners.setdefault(p, []).append((sid, names[sid], layer, i, a, b))
    return owners


def _check_page_table(cache: PagedKVCache, tables: dict, high_water: int) -> list[str]:
    """Problems with the block tables beyond those :meth:`PagedKVCache.open` refuses."""
    problems = []
    indptr, indices, last = [0], [], []
    page_layer = np.full(high_water, -1, np.int64)
    for sid, layers in tables.items():
        for layer, (pages, n_pos, first) in enumerate(layers):
            indices.append(pages)
            indptr.append(indptr[-1] + len(pages))
            last.append(cache.page_size if len(pages) else 0)
            if len(np.unique(pages)) != len(pages):
                problems.append(f"sequence {sid} layer {layer}: a page is listed twice in one block table")
            if len(pages):
                seen = page_layer[pages]
                clash = (seen >= 0) & (seen != layer)
                if clash.any():
                    p = int(pages[np.argmax(clash)])
                    problems.append(f"page {p} is listed for layer {int(page_layer[p])} and, by sequence {sid}, "
                                    f"for layer {layer}: a page holds one layer")
                page_layer[pages] = layer
    indices = np.concatenate(indices) if indices else np.zeros(0, np.uint32)
    try:
        check_paged_layout(np.array(indptr, np.int64), indices, np.array(last, np.int64), cache.page_size, high_water)
    except PageTableError as e:
        problems.append(str(e))
    return problems


def verify_cache(path, progress: bool | None = None) -> dict:
    """Check a cache file: header, metadata slots, page table, every page checksum.

    Parameters
    ----------
    path : str or os.PathLike
    progress : bool, optional
        Show a progress bar over pages (None: only when stderr is a terminal).

    Returns
    -------
    dict
        ``ok`` (bool); ``problems`` (list of str, empty when ok); ``header`` (a short
        description, or None if unreadable); ``slots`` (state and generation of each
        metadata slot); ``sequences``, ``block_tables``, ``pages_checked``;
        ``damaged_pages`` (list of {``page``, ``stored``, ``computed``, ``owners``: list
        of {``sequence``, ``name``, ``layer``, ``page_index``, ``tokens``: [first, last]}}).

    Raises
    ------
    OSError
        The file cannot be opened or read at all (damage is reported, not raised).
    """
    path = os.fspath(path)
    result = {"path": path, "ok": False, "problems": [], "header": None, "slots": [],
              "sequences": 0, "block_tables": 0, "pages_checked": 0, "damaged_pages": []}
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            sb = Superblock.unpack(os.pread(fd, SUPERBLOCK_BYTES, 0), path)
        except CacheFileError as e:
            result["problems"].append(str(e))
            return result
        result["header"] = (f"kvmmap {sb.version[0]}.{sb.version[1]}, {sb.num_layers} layers x {sb.num_kv_heads} "
                            f"kv heads x head_dim {sb.head_dim}, page_size {sb.page_size}, "
                            f"K {sb.k_format.name}, V {sb.v_format.name}")
        result["slots"] = [_slot_status(fd, sb, i) for i in (0, 1)]
    finally:
        os.close(fd)
    try:
        cache = PagedKVCache.open(path, mode="r")
    except CacheFileError as e:
        result["problems"].append(str(e))
        return result
    with cache:
        hw = cache._alloc.high_water
        names = cache.sequences()
        tables = {sid: layer_tables(cache, sid) for sid in names}
        result["sequences"] = len(tables)
        result["block_tables"] = len(tables) * cache.num_layers
        result["problems"] += _check_page_table(cache, tables, hw)
        owners = _page_owners(tables, names, cache.page_size)
        for page in tqdm(sorted(owners), desc="verify", unit="page", disable=None if progress is None else not progress):
            stored, computed = int(cache._page_crc[page]), int(cache._page_crc_of(page))
            if stored != computed:
                result["damaged_pages"].append({
                    "page": page, "stored": stored, "computed": computed,
                    "owners": [{"sequence": o[0], "name": o[1], "layer": o[2], "page_index": o[3], "tokens": [o[4], o[5]]}
                               for o in owners[page]],
                })
        result["pages_checked"] = len(owners)
    if result["damaged_pages"]:
        result["problems"].append(f"{len(result['damaged_pages'])} of {len(owners)} pages in use fail their checksum")
    result["ok"] = not result["problems"]
    return result


def format_verify(res: dict) -> str:
    """The text that ``kvmmap verify`` prints for :func:`verify_cache`'s result."""
    path = res["path"]
    lines = []
    if res["header"]:
        lines.append(f"{path}: header ok: {res['header']}")
        slots = []
        for s in res["slots"]:
            state = f"generation {s['generation']}" if s["state"] == "valid" else s["state"]
            slots.append(f"slot {s['slot']} {state}")
        lines.append(f"{path}: metadata: {', '.join(slots)}")
        if any(s["state"] == "damaged" for s in res["slots"]):
            lines.append(f"{path}: note: a damaged slot is expected after a crash during a commit; "
                         f"the other slot holds the committed state")
    for d in res["damaged_pages"]:
        where = "; ".join(
            f"sequence {o['sequence']}{'' if o['name'] is None else ' ' + repr(o['name'])} layer {o['layer']} "
            f"tokens {o['tokens'][0]}..{o['tokens'][1]}" for o in d["owners"])
        lines.append(f"{path}: page {d['page']} DAMAGED: checksum 0x{d['computed']:08x}, stored 0x{d['stored']:08x} "
                     f"({where})")
    if res["ok"]:
        lines.append(f"{path}: page table ok: {res['sequences']} sequence(s), {res['block_tables']} block tables")
        lines.append(f"{path}: ok: {res['pages_checked']} page checksums match")
    else:
        lines += [f"{path}: DAMAGED: {p}" for p in res["problems"]]
    return "\n".join(lines)
