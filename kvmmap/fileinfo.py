"""Read-only looks at a cache file: what it holds (``kvmmap inspect``) and whether it is
intact (``kvmmap verify``).

Both open the file with ``mode="r"``, which takes no lock, so they may run beside a
writer; they see the state committed when they opened it. Pages the writer reuses after
that are told apart from damage: a page can be rewritten only once a newer commit has
dropped it, so a checksum mismatch is damage only while no newer commit is on disk.
"""

from __future__ import annotations

import errno
import os
import stat
import time

import numpy as np
from tqdm import tqdm

from .cache import PagedKVCache
from .core.metaslot import newest_generation, read_slot
from .core.superblock import SLOT_HEADER_BYTES, SUPERBLOCK_BYTES, Superblock
from .errors import CacheFileError

_FLOAT32_BYTES = 4
_RECHECKS = 3           # newer commits verify re-reads before it calls a page "changed"


class ChangedByWriterError(CacheFileError):
    """A writer committed while the file was being read and may have reused pages that were
    read: nothing is known to be damaged; run again."""


def check_regular_file(path) -> os.stat_result:
    """``os.stat`` of ``path``, refused unless it is a regular file.

    Checked before anything opens the path: opening a FIFO for reading blocks until a
    writer appears, and a device or directory is never a cache file.

    Raises
    ------
    CacheFileError
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise CacheFileError(f"cannot open {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            raise CacheFileError(f"cannot open {path}: {os.strerror(errno.EISDIR)}")
        kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                 (stat.S_ISBLK, "a block device"))
        kind = next((k for test, k in kinds if test(st.st_mode)), "a special file")
        raise CacheFileError(f"cannot open {path}: {kind}, not a regular file")
    return st


def open_read_only(path, commit: str = "newest") -> PagedKVCache:
    """``PagedKVCache.open(path, "r", commit=commit)`` for tools, refusing a non-regular
    file before opening it. (``open`` maps only the committed pages, so a sparse file's
    apparent length costs nothing.)

    Raises
    ------
    CacheFileError, OSError
    """
    path = os.fspath(path)
    check_regular_file(path)
    return PagedKVCache.open(path, mode="r", commit=commit)


def file_pages(cache: PagedKVCache) -> int:
    """Pages the file's length has room for (its apparent capacity; nothing is mapped)."""
    return max((os.fstat(cache._fd).st_size - cache._sb.arena_offset) // cache._sb.page_bytes, 0)


def check_pages(cache: PagedKVCache, pages, progress: bool | None = False) -> tuple[list[int], list[int]]:
    """Recompute the checksums of ``pages`` of a read-only view.

    Returns
    -------
    damaged, changed : list of int
        Pages that fail their checksum while the view's commit is still the newest on
        disk (damage), and pages that fail it after a writer committed since the view was
        opened (possibly reused by the writer: not known to be damaged).
    """
    pages = [int(p) for p in pages]
    bad = [p for p in tqdm(pages, desc="verify", unit="page", disable=None if progress is None else not progress)
           if cache._page_crc_of(p) != int(cache._page_crc[p])]
    # checked after reading, as PagedKVCache._check_pages_current does: a page is rewritten
    # only after a newer commit dropped it, and the writer writes that commit first
    if not bad or newest_generation(cache._fd, cache._sb) == cache._newest_seen:
        return bad, []
    return [], bad


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
    with open_read_only(path) as c:
        stats = c.stats()
        tables = {sid: layer_tables(c, sid) for sid in c.sequences()}
        # block tables listing each page (a page listed twice in one table counts once)
        counts = np.zeros(c._alloc.high_water, np.int64)
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


def _slot_states(fd: int, sb: Superblock) -> list[dict]:
    """Both slots' states. A writer rewrites the slot not holding its newest commit,
    payload first, header last: a slot read in between looks damaged until the header
    lands and the newest generation moves. A slot is called damaged only if the newest
    generation stood still across its reading and a short wait after it; a slot caught
    mid-rewrite every time is "rewritten" (a writer is committing)."""
    for _ in range(_RECHECKS + 1):
        before = newest_generation(fd, sb)
        states = [_slot_status(fd, sb, i) for i in (0, 1)]
        if not any(s["state"] == "damaged" for s in states):
            return states
        time.sleep(0.05)
        if newest_generation(fd, sb) == before:
            return states
    return [dict(s, state="rewritten") if s["state"] == "damaged" else s for s in states]


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


def _damage_report(cache: PagedKVCache, pages: list[int], owners: dict) -> list[dict]:
    out = []
    for page in pages:
        out.append({
            "page": page, "generation": int(cache._generation), "stored": int(cache._page_crc[page]),
            "computed": int(cache._page_crc_of(page)),
            "owners": [{"sequence": o[0], "name": o[1], "layer": o[2], "page_index": o[3], "tokens": [o[4], o[5]]}
                       for o in owners[page]],
        })
    return out


def _tables(cache: PagedKVCache) -> tuple[dict, dict]:
    names = cache.sequences()
    return names, {sid: layer_tables(cache, sid) for sid in names}


def verify_cache(path, progress: bool | None = None, commit: str = "newest") -> dict:
    """Check a cache file: header, metadata slots, page table, every page checksum.

    The page table's rules (docs/FORMAT.md: page ids below the high-water mark, a page at
    most once in a block table and in tables of one layer only) are checked where the
    commit is read, by :meth:`PagedKVCache.open`; a commit that breaks one is reported
    among the problems with the reason open gives.

    May run beside a writer. A page that fails its checksum after the writer committed
    (it may have reused the page) is checked again at the newer commit if that commit
    still lists it, up to 3 times; one that keeps changing is reported in
    ``changed_pages``, never as damage.

    Parameters
    ----------
    path : str or os.PathLike
    progress : bool, optional
        Show a progress bar over pages (None: only when stderr is a terminal).
    commit : {"newest", "previous"}
        Which of the file's two commits to check (``kvmmap verify --previous``).

    Returns
    -------
    dict
        ``outcome``: "ok", "damaged" or "changed" (a writer kept committing and changed
        pages or a slot while they were read: nothing is known to be damaged; rerun);
        ``ok`` (bool, outcome "ok"); ``problems`` (list of str, empty when ok);
        ``header`` (a short description, or None if unreadable); ``slots`` (state:
        valid, empty, damaged or rewritten, and generation of each metadata slot);
        ``commit`` (generation and slot verified, None if the file did not open);
        ``sequences``, ``block_tables``, ``pages_checked``; ``rechecked`` (pages
        checked again at a newer commit); ``changed_pages`` (ids); ``damaged_pages``
        (list of {``page``, ``generation`` (the commit whose checksum it fails),
        ``stored``, ``computed``, ``owners``: list of {``sequence``, ``name``,
        ``layer``, ``page_index``, ``tokens``: [first, last]}}).

    Raises
    ------
    CacheFileError, OSError
        The path is not a regular file, or the file cannot be opened or read at all
        (damage is reported, not raised).
    """
    path = os.fspath(path)
    result = {"path": path, "outcome": "damaged", "ok": False, "problems": [], "header": None, "slots": [],
              "commit": None, "sequences": 0, "block_tables": 0, "pages_checked": 0, "rechecked": 0,
              "changed_pages": [], "damaged_pages": []}
    check_regular_file(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)     # never blocks, should the path turn into a FIFO
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CacheFileError(f"cannot open {path}: not a regular file")
        try:
            sb = Superblock.unpack(os.pread(fd, SUPERBLOCK_BYTES, 0), path)
        except CacheFileError as e:
            result["problems"].append(str(e))
            return result
        result["header"] = (f"kvmmap {sb.version[0]}.{sb.version[1]}, {sb.num_layers} layers x {sb.num_kv_heads} "
                            f"kv heads x head_dim {sb.head_dim}, page_size {sb.page_size}, "
                            f"K {sb.k_format.name}, V {sb.v_format.name}")
        result["slots"] = _slot_states(fd, sb)
    finally:
        os.close(fd)
    try:
        cache = open_read_only(path, commit)
    except CacheFileError as e:
        result["problems"].append(str(e))
        return result
    with cache:
        result["commit"] = commit_info(cache)
        names, tables = _tables(cache)
        result["sequences"] = len(tables)
        result["block_tables"] = len(tables) * cache.num_layers
        owners = _page_owners(tables, names, cache.page_size)
        damaged, changed = check_pages(cache, sorted(owners), progress)
        result["damaged_pages"] = _damage_report(cache, damaged, owners)
        result["pages_checked"] = len(owners)
    for _ in range(_RECHECKS):
        if not changed:
            break
        try:
            newer = open_read_only(path, commit)
        except CacheFileError:
            break
        with newer:
            names, tables = _tables(newer)
            owners = _page_owners(tables, names, newer.page_size)
            # a page the newer commit no longer lists was dropped (and maybe reused): not ours to judge
            listed = [p for p in changed if p in owners]
            result["rechecked"] += len(listed)
            damaged, changed = check_pages(newer, listed)
            result["damaged_pages"] += _damage_report(newer, damaged, owners)
    result["changed_pages"] = changed
    if result["damaged_pages"]:
        result["problems"].append(f"{len(result['damaged_pages'])} of {result['pages_checked']} pages in use fail "
                                  "their checksum")
    rewritten = [s["slot"] for s in result["slots"] if s["state"] == "rewritten"]
    if result["problems"]:
        result["outcome"] = "damaged"
    elif changed or rewritten:
        result["outcome"] = "changed"
    else:
        result["outcome"] = "ok"
    result["ok"] = result["outcome"] == "ok"
    return result


def format_verify(res: dict) -> str:
    """The text that ``kvmmap verify`` prints for :func:`verify_cache`'s result."""
    path = res["path"]
    lines = []
    if res["header"]:
        lines.append(f"{path}: header ok: {res['header']}")
        slots = []
        for s in res["slots"]:
            state = {"valid": f"generation {s.get('generation')}",
                     "rewritten": "being rewritten (a writer is committing)"}.get(s["state"], s["state"])
            slots.append(f"slot {s['slot']} {state}")
        lines.append(f"{path}: metadata: {', '.join(slots)}")
        if any(s["state"] == "damaged" for s in res["slots"]) and res["commit"] is not None:
            lines.append(f"{path}: note: a damaged slot is expected after a crash during a commit; slot "
                         f"{res['commit']['slot']} (generation {res['commit']['generation']}) holds the committed state")
    for d in res["damaged_pages"]:
        where = "; ".join(
            f"sequence {o['sequence']}{'' if o['name'] is None else ' ' + repr(o['name'])} layer {o['layer']} "
            f"tokens {o['tokens'][0]}..{o['tokens'][1]}" for o in d["owners"])
        lines.append(f"{path}: page {d['page']} DAMAGED: checksum 0x{d['computed']:08x}, stored 0x{d['stored']:08x} "
                     f"({where})")
    if res["outcome"] == "ok":
        lines.append(f"{path}: page table ok: {res['sequences']} sequence(s), {res['block_tables']} block tables")
        lines.append(f"{path}: ok: {res['pages_checked']} page checksums match"
                     + (f" ({res['rechecked']} checked again at a newer commit: a writer reused pages meanwhile)"
                        if res["rechecked"] else ""))
    elif res["outcome"] == "changed":
        what = []
        if res["changed_pages"]:
            ids = ", ".join(map(str, res["changed_pages"][:8])) + (" ..." if len(res["changed_pages"]) > 8 else "")
            what.append(f"{len(res['changed_pages'])} page(s) ({ids})")
        what += [f"metadata slot {s['slot']}" for s in res["slots"] if s["state"] == "rewritten"]
        lines.append(f"{path}: CHANGED: {' and '.join(what)} changed since verify started (a writer is committing): "
                     "rerun; nothing is known to be damaged")
    else:
        lines += [f"{path}: DAMAGED: {p}" for p in res["problems"]]
    return "\n".join(lines)
