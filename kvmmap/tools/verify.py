"""Whether a cache file is intact (``kvmmap verify``): header, both commit roots, the
metadata and page table of a commit, and every page checksum.

Opens the file read-only (no lock), so it may run beside a writer; pages the writer
reuses meanwhile are told apart from damage (:mod:`kvmmap.tools.common`).
"""

from __future__ import annotations

import os
import stat
import time

from ..cache import PagedKVCache
from ..core.roots import ROOT_RECORD_BYTES, read_root, root_offset
from ..core.superblock import SUPERBLOCK_BYTES, Superblock
from ..errors import CacheFileError
from .common import check_pages, check_regular_file, commit_info, layer_tables, open_read_only

_RECHECKS = 3           # newer commits verify re-reads before it calls a page "changed"


def newest_generation(fd: int, sb: Superblock) -> int:
    gens = [r.generation for r in (read_root(fd, sb, i) for i in (0, 1)) if r is not None]
    return max(gens, default=-1)


def _slot_status(fd: int, sb: Superblock, index: int) -> dict:
    got = read_root(fd, sb, index)
    if got is not None:
        return {"slot": index, "state": "valid", "generation": int(got.generation)}
    # empty only if all 64 bytes of the root are zero
    if not any(os.pread(fd, ROOT_RECORD_BYTES, root_offset(sb, index))):
        return {"slot": index, "state": "empty"}
    return {"slot": index, "state": "damaged"}


def _slot_states(fd: int, sb: Superblock) -> list[dict]:
    """Both roots' states. A writer rewrites the root not holding its newest commit in
    one 64-byte write: a root read mid-write looks damaged until the write lands and the
    newest generation moves. A root is called damaged only if the newest generation stood
    still across its reading and a short wait after it; one caught mid-rewrite every time
    is "rewritten" (a writer is committing)."""
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
    generation = cache.commit["generation"]
    out = []
    for page in pages:
        stored, computed = cache.page_checksums(page)
        out.append({
            "page": page, "generation": generation, "stored": stored, "computed": computed,
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
            slots.append(f"root {s['slot']} {state}")
        lines.append(f"{path}: commit roots: {', '.join(slots)}")
        if any(s["state"] == "damaged" for s in res["slots"]) and res["commit"] is not None:
            lines.append(f"{path}: note: a damaged root is expected after a crash during a commit; root "
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
        what += [f"commit root {s['slot']}" for s in res["slots"] if s["state"] == "rewritten"]
        lines.append(f"{path}: CHANGED: {' and '.join(what)} changed since verify started (a writer is committing): "
                     "rerun; nothing is known to be damaged")
    else:
        lines += [f"{path}: DAMAGED: {p}" for p in res["problems"]]
    return "\n".join(lines)
