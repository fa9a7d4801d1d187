"""Write the format 2.0 golden caches that tests/test_golden.py reads on every run.

    python tests/golden/make_golden2.py

Deterministic (fixed seed): running it again rewrites the same values. The files pin
format 2.0: regenerate them only on purpose, and review the diff of the manifest.

Six small caches (2 layers, 2 KV heads, head_dim 8, the default page size: 16, or 64
with int4 keys) cover every storage format on the K side or the V side, int4 on both.
Each is written through ``kvmmap.PagedKVCache`` with the same story:

* ``prompt``: appended in uneven chunks, its last page partly filled (int4 keys: residual
  rows spread over two residual pages);
* ``freed``: a named sequence with tokens in layer 0 only, freed later (a gap in the ids);
* an unnamed sequence, committed, then truncated into a full page (layer 0) and into its
  partly filled last page (layer 1), then appended to (copy-on-write of the cut pages;
  int4 keys: the cut page's quantized keys become residual rows again, and layer 0 fills
  the page: it is quantized again from those);
* ``prompt/fork``: a fork of the committed ``prompt`` (sharing every page, the partly
  filled last one included), then both grow (copy-on-write of the shared last page);
* ``window`` with ``max_tokens``: ``shift_left`` drops a page and leaves ``first`` > 0,
  then an append;
* commit (the *previous* commit), then one token in place on ``prompt``'s last page;
  ``prompt/short``, a fork of ``prompt`` truncated into its first (full, shared) page: a
  partly filled page listed whole by another sequence (int4 keys: no residual pages, the
  page's quantization); ``scratch`` created and freed (the next id is above every live
  one); commit (*newest*).

The values each (commit, sequence, layer) must decode to are computed here in plain numpy
from the inputs, by the rules of docs/FORMAT.md (``expected_*``), never read back from
kvmmap: float16 scales rounded up and int4 zero points rounded down, codes rounded half to
even against the rounded side data; int4 keys per channel over a page, from their float16
rounding; a page cut short by ``truncate`` keeps its quantization, and its keys go back to
float16 residual rows when it is appended to. Where FORMAT.md is silent the generator uses
the writer's arithmetic in float32: scale = absmax / 127 (int8) or / the format's largest
value (fp8), int4 scale = (max - zero) / 15; a code is round((x - zero) * (1 / scale)),
half to even. Decoding is exact in float32 (a code times a float16 scale has at most 15
significant bits), so every expected value is bit-exact.

One thing the writer's build decides: whether ``(x - zero) * inv`` is rounded to float32
before it is rounded to an integer, or the multiply is fused into the rounding add (gcc
contracts it into an FMA under ``-march=native``, not in a ``KVMMAP_PORTABLE=1`` build).
The two differ where the quotient is (nearly) a tie, which int4 keys hit often: they are
float16 values, on a grid a float16 scale divides. Both codes are within half a step; the
file holds one of them. The model computes both; the generator builds each file with the
fused rounding and, if the file's bytes (decoded by tests/reference.py, not by kvmmap)
disagree, again with the unfused one, and records which in the manifest
(``code_rounding``) with the number of codes where the two differ (``rounding_ties``).

Outputs: ``v2_0_<k>_<v>.kvm``, ``v2_0_manifest.json`` (geometry, formats, page size and
bytes, and per commit: next sequence id, sequences with id, name, max_tokens and per
layer n_pos, first, length, num_pages, num_res, max_tokens) and ``v2_0_expected.npz``
(float32 ``[length, H, D]`` under ``<file>/<commit>/<sequence id>/<layer>/<k|v>``; a
previous commit's values that are the first rows of the newest one's are stored once,
under ``newest``: see :func:`expected_values`).
"""

from __future__ import annotations

import copy
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))           # tests/, for reference.py

from reference import (
    bf16_round,
    fp8_decode_table,
    nearest_code,
    page_arrays,
    parse_cache_file,
    stored_kv,
    valid_roots,
)

import kvmmap as km

GEOMETRY = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8}
FILES = {   # file name: (k_format, v_format, v_group_size or None for the default)
    "v2_0_fp16_fp16.kvm": ("fp16", "fp16", None),
    "v2_0_bf16_fp8_e4m3.kvm": ("bf16", "fp8_e4m3", None),
    "v2_0_int8_int8.kvm": ("int8", "int8", None),
    "v2_0_int4_int4.kvm": ("int4", "int4", None),
    "v2_0_fp32_fp8_e5m2.kvm": ("fp32", "fp8_e5m2", None),
    "v2_0_int8_int4.kvm": ("int8", "int4", 4),
}
DEFAULT_PAGE_SIZE = {"int4": 64}                    # by k format; 16 for the others
FINGERPRINT = b"kvmmap golden 2.0"
SEED = 20250301
EXPECTED = "v2_0_expected.npz"
MANIFEST = "v2_0_manifest.json"
COMMITS = ("previous", "newest")

F32 = np.float32
TINY = F32(2.0 ** -100)       # a row's absmax (a group's span) below this is flushed to 0
FP8_MAX = {"fp8_e4m3": F32(448.0), "fp8_e5m2": F32(57344.0)}


# ------------------------------------------------------------------ quantization, in numpy

#: how codes round (see the module docstring): "fused" rounds the exact product, "float32"
#: the float32 product; ``ties`` counts codes where the two differ
ROUNDING = {"mode": "fused", "ties": 0}


def f16_up(x: np.ndarray) -> np.ndarray:
    """The smallest float16 value >= x, as float32."""
    h = x.astype(np.float16)
    return np.where(h.astype(F32) < x, np.nextafter(h, np.float16(np.inf)), h).astype(F32)


def f16_down(x: np.ndarray) -> np.ndarray:
    """The largest float16 value <= x, as float32."""
    h = x.astype(np.float16)
    return np.where(h.astype(F32) > x, np.nextafter(h, np.float16(-np.inf)), h).astype(F32)


def round_codes(t: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """round-half-even(t * inv) of float32 operands, the product exact ("fused") or
    rounded to float32 first, as ROUNDING says; counts the codes where that matters."""
    exact = np.rint(t.astype(np.float64) * inv.astype(np.float64))     # the product is exact in float64
    rounded = np.rint((t * inv).astype(F32))
    ROUNDING["ties"] += int((exact != rounded).sum())
    return exact if ROUNDING["mode"] == "fused" else rounded


def reciprocal(scale: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(scale > 0, F32(1) / scale, F32(0)).astype(F32)


def expected_int8(x: np.ndarray) -> np.ndarray:
    """Rows [..., D]: symmetric, scale = f16_up(absmax / 127)."""
    amax = np.abs(x).max(-1)
    amax = np.where(amax >= TINY, amax, F32(0)).astype(F32)
    scale = f16_up((amax / F32(127)).astype(F32))
    codes = round_codes(x, reciprocal(scale)[..., None])
    assert np.all(np.abs(codes) <= 127)
    return (codes.astype(F32) * scale[..., None]).astype(F32)


def expected_fp8(x: np.ndarray, fmt: str) -> np.ndarray:
    """Rows [..., D]: scale = f16_up(absmax / fmax); y = x * (1 / scale) saturated to
    +-fmax, rounded to the nearest fp8 value (ties to the even code)."""
    fmax = FP8_MAX[fmt]
    amax = np.abs(x).max(-1)
    amax = np.where(amax >= TINY, amax, F32(0)).astype(F32)
    scale = f16_up((amax / fmax).astype(F32))
    y = np.clip((x * reciprocal(scale)[..., None]).astype(F32), -fmax, fmax)
    table = fp8_decode_table(fmt)
    codes = np.arange(128)[np.isfinite(table[:128]) & (table[:128] <= fmax)]    # ascending values
    mag = nearest_code(np.abs(y), table[codes], codes)
    vals = np.where(y < 0, -table[mag], table[mag]).astype(F32)
    return (vals * scale[..., None]).astype(F32)


def int4_side(lo: np.ndarray, hi: np.ndarray):
    """(zero, scale) of int4 groups spanning [lo, hi]: zero = f16_down(lo), scale =
    f16_up((hi - zero) / 15)."""
    zero = f16_down(lo)
    span = (hi - zero).astype(F32)
    span = np.where(span >= TINY, span, F32(0)).astype(F32)
    return zero, f16_up((span / F32(15)).astype(F32))


def int4_decode(x, zero, scale):
    codes = np.clip(round_codes((x - zero).astype(F32), reciprocal(scale)), 0, 15)
    codes = np.where(scale > 0, codes, 0)
    return ((codes.astype(F32) * scale).astype(F32) + zero).astype(F32)     # code * scale is exact


def expected_int4_values(x: np.ndarray, group: int) -> np.ndarray:
    """Rows [..., D], groups of ``group`` consecutive elements."""
    g = x.reshape(x.shape[:-1] + (x.shape[-1] // group, group))
    zero, scale = int4_side(g.min(-1, keepdims=True), g.max(-1, keepdims=True))
    return int4_decode(g, zero, scale).reshape(x.shape)


def expected_int4_keys(page: np.ndarray) -> np.ndarray:
    """A full page of keys [P, H, D] (already float16 values): per channel over the page."""
    zero, scale = int4_side(page.min(0, keepdims=True), page.max(0, keepdims=True))
    return int4_decode(page, zero, scale)


def as_fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(F32)


def expected_rows(x: np.ndarray, fmt: str, group: int) -> np.ndarray:
    """What rows [n, H, D] of a format quantized row by row decode to."""
    if fmt == "fp32":
        return x.astype(F32)
    if fmt == "fp16":
        return as_fp16(x)
    if fmt == "bf16":
        return bf16_round(x)
    if fmt == "int8":
        return expected_int8(x)
    if fmt.startswith("fp8"):
        return expected_fp8(x, fmt)
    return expected_int4_values(x, group)


# ------------------------------------------------------------------ the model of one (sequence, layer, side)

class SideModel:
    """Expected contents of one side of one (sequence, layer), page by page.

    A page is ``{"dec": float32 [rows, H, D] or None, "src": ... or None}``: ``dec`` the
    decoded rows; for int4 keys ``src`` the float16 rows a page not yet full keeps
    (residual rows, ``dec`` None) and a full page is quantized from; a full page cut by
    truncate keeps ``dec`` only (its whole-page quantization) until appended to.
    """

    def __init__(self, fmt: str, side: str, P: int, group: int):
        self.fmt, self.P, self.group = fmt, P, group
        self.k4 = fmt == "int4" and side == "k"
        self.pages: list[dict] = []
        self.first = 0

    @staticmethod
    def rows(page) -> int:
        return len(page["dec"] if page["dec"] is not None else page["src"])

    @property
    def n_pos(self) -> int:
        return (len(self.pages) - 1) * self.P + self.rows(self.pages[-1]) if self.pages else 0

    @property
    def length(self) -> int:
        return self.n_pos - self.first

    @property
    def residual(self) -> bool:
        """The last page keeps residual rows (int4 keys, partly filled, not cut from a full page)."""
        return self.k4 and bool(self.pages) and self.pages[-1]["dec"] is None

    def append(self, x: np.ndarray) -> None:
        x = as_fp16(x) if self.k4 else expected_rows(x, self.fmt, self.group)
        i = 0
        while i < len(x):
            if not self.pages or self.rows(self.pages[-1]) == self.P:
                self.pages.append({"dec": None, "src": x[:0]} if self.k4 else {"dec": x[:0], "src": None})
            page = self.pages[-1]
            take = min(self.P - self.rows(page), len(x) - i)
            if self.k4:
                if page["dec"] is not None:      # cut from a full page: its values become residual rows
                    page["src"], page["dec"] = as_fp16(page["dec"]), None
                page["src"] = np.concatenate([page["src"], x[i:i + take]])
                if len(page["src"]) == self.P:
                    page["dec"] = expected_int4_keys(page["src"])
            else:
                page["dec"] = np.concatenate([page["dec"], x[i:i + take]])
            i += take

    def truncate(self, n: int) -> None:
        if n >= self.length:
            return
        new_pos = self.first + n
        keep = -(-new_pos // self.P)
        self.pages = self.pages[:keep]
        if keep:
            rows = new_pos - (keep - 1) * self.P
            page = self.pages[-1]
            if page["dec"] is not None:          # keeps its decoded rows (int4 keys: the page's quantization)
                self.pages[-1] = {"dec": page["dec"][:rows], "src": None}
            else:
                self.pages[-1] = {"dec": None, "src": page["src"][:rows]}

    def shift_left(self, n: int) -> None:
        first = self.first + min(n, self.length)
        drop = min(first // self.P, len(self.pages))
        self.pages = self.pages[drop:]
        self.first = first - drop * self.P

    def values(self) -> np.ndarray:
        if not self.pages:
            return np.zeros((0, GEOMETRY["num_kv_heads"], GEOMETRY["head_dim"]), F32)
        rows = [p["dec"] if p["dec"] is not None else p["src"] for p in self.pages]
        return np.concatenate(rows)[self.first:self.n_pos]


class Story:
    """Each operation done on the cache and on the numpy model side by side."""

    def __init__(self, c, kf: str, vf: str, group: int, res_pages: int):
        self.c, self.kf, self.vf, self.group, self.res_pages = c, kf, vf, group, res_pages
        self.P, self.L = c.page_size, c.num_layers
        self.seqs: dict[int, dict] = {}
        self.next_id = 0
        self.snapshots: list[dict] = []

    def new(self, name=None, max_tokens=None) -> int:
        sid = self.c.new_sequence(name, max_tokens=max_tokens)
        assert sid == self.next_id, "ids are handed out in order"
        self.next_id += 1
        self.seqs[sid] = {"name": name, "max_tokens": max_tokens or 0,
                          "layers": [{"k": SideModel(self.kf, "k", self.P, self.group),
                                      "v": SideModel(self.vf, "v", self.P, self.group)} for _ in range(self.L)]}
        return sid

    def append(self, sid: int, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        self.c.append(sid, layer, k, v)
        self.seqs[sid]["layers"][layer]["k"].append(k)
        self.seqs[sid]["layers"][layer]["v"].append(v)

    def fork(self, sid: int, name: str) -> int:
        new = self.c.fork(sid, name)
        assert new == self.next_id
        self.next_id += 1
        self.seqs[new] = copy.deepcopy(self.seqs[sid])
        self.seqs[new]["name"] = name
        return new

    def free(self, sid: int) -> None:
        self.c.free(sid)
        del self.seqs[sid]

    def each_side(self, sid: int, op: str, n: int) -> None:
        getattr(self.c, op)(sid, n)
        for layer in self.seqs[sid]["layers"]:
            for m in layer.values():
                getattr(m, op)(n)

    def flush(self) -> None:
        self.c.flush()
        seqs = {}
        for sid, s in self.seqs.items():
            layers = []
            for layer in s["layers"]:
                k, v = layer["k"], layer["v"]
                assert (k.n_pos, k.first) == (v.n_pos, v.first)
                layers.append({"n_pos": k.n_pos, "first": k.first, "length": k.length,
                               "num_pages": len(k.pages), "num_res": self.res_pages if k.residual else 0,
                               "values": (k.values(), v.values())})
            seqs[sid] = {"name": s["name"], "max_tokens": s["max_tokens"], "layers": layers}
        self.snapshots.append({"next_id": self.next_id, "sequences": seqs})


def build(path: str, kf: str, vf: str, v_group, rng) -> tuple[dict, dict, int]:
    """Write one golden cache; returns (file entry of the manifest, {key: expected array},
    values where the file's bytes disagree with the model)."""
    H, D = GEOMETRY["num_kv_heads"], GEOMETRY["head_dim"]
    c = km.PagedKVCache.create(path, **GEOMETRY, k_format=kf, v_format=vf, v_group_size=v_group,
                               fingerprint=FINGERPRINT)
    P = c.page_size
    assert P == DEFAULT_PAGE_SIZE.get(kf, 16)
    group = c.superblock.v_group_size if vf == "int4" else 0
    geo = {"num_kv_heads": H, "head_dim": D, "page_size": P, "k_format": kf, "v_format": vf,
           "v_group": group, "version": (2, 0)}
    page_bytes = page_arrays(bytes(1 << 20), geo)[1]             # FORMAT.md's layout, computed apart
    rows_per_res = page_bytes // (2 * H * D)
    res_pages = -(-P // rows_per_res) if kf == "int4" else 0
    st = Story(c, kf, vf, group, res_pages)

    def data(n):
        x = rng.standard_normal((n, H, D), dtype=F32) * 2
        x[:, :, 3] *= 8                               # an outlier channel, as keys have
        return x

    def grow(sid, layer, n, firsts=()):
        """Append n tokens: chunks of ``firsts``, then the rest."""
        for m in list(firsts) + [n - sum(firsts)]:
            st.append(sid, layer, data(m), data(m))

    prompt = st.new("prompt")
    grow(prompt, 0, P + 3 * P // 4 + 1, firsts=(1, P // 2 + 3))   # last page: 3P/4 + 1 rows
    grow(prompt, 1, P + 3)
    freed = st.new("freed")
    grow(freed, 0, 5)                                 # layer 1 stays empty
    cut = st.new()
    grow(cut, 0, P + 3)
    grow(cut, 1, 3 * P // 4)
    st.flush()

    fork = st.fork(prompt, "prompt/fork")             # shares every page, the partly filled one too
    grow(fork, 0, P // 2)                             # copy-on-write, then a new page
    grow(fork, 1, 2)
    grow(prompt, 0, 3)                                # prompt diverges: copy-on-write of its own
    st.free(freed)
    st.each_side(cut, "truncate", P // 2)             # layer 0 into a full page, layer 1 into the last
    grow(cut, 0, P // 2 + 3)                          # refills the cut page, and 3 rows on
    grow(cut, 1, 2)
    window = st.new("window", max_tokens=2 * P + 8)
    grow(window, 0, 2 * P + 5, firsts=(P + 1,))
    grow(window, 1, P + 6)
    st.each_side(window, "shift_left", P + 3)         # drops a page; first = 3
    grow(window, 0, 2)
    st.flush()                                        # the previous commit

    grow(prompt, 1, 1)                                # in place: past every committed row
    short = st.fork(prompt, "prompt/short")
    st.each_side(short, "truncate", P - 5)            # lists prompt's full first page, cut short
    scratch = st.new("scratch")
    grow(scratch, 0, 3)
    st.free(scratch)                                  # the next id is above every live one
    st.flush()                                        # the newest commit
    check_against_kvmmap(c, st.snapshots[-1])
    assert c.verify() == []
    c.close()
    with open(path, "rb") as f:
        raw = f.read()
    disagree = sum(bytes_disagree(raw, which, snap) for which, snap in zip(COMMITS, st.snapshots[-2:]))

    entry = {"k_format": kf, "v_format": vf, "page_size": P, "v_group_size": group, "page_bytes": page_bytes,
             "residual_rows_per_page": rows_per_res if kf == "int4" else 0,
             "code_rounding": ROUNDING["mode"], "rounding_ties": ROUNDING["ties"], "commits": {}}
    arrays = {}
    fname = os.path.basename(path)
    arrays_newest = {}
    for which, snap in reversed(list(zip(COMMITS, st.snapshots[-2:]))):
        if which == "previous":
            arrays_newest = dict(arrays)
        seqs = {}
        for sid, s in snap["sequences"].items():
            label = s["name"] if s["name"] is not None else f"#{sid}"
            layers = []
            for layer, info in enumerate(s["layers"]):
                for side, arr in zip("kv", info.pop("values")):
                    key = f"{fname}/{which}/{sid}/{layer}/{side}"
                    newest = arrays_newest.get(key.replace("/previous/", "/newest/"))
                    if which == "newest" or newest is None or not np.array_equal(newest[:len(arr)], arr):
                        arrays[key] = arr       # else: the newest commit's first rows (expected_values)
                layers.append({**info, "max_tokens": s["max_tokens"]})
            seqs[label] = {"id": sid, "name": s["name"], "max_tokens": s["max_tokens"], "layers": layers}
        entry["commits"][which] = {"next_id": snap["next_id"], "sequences": seqs}
    return entry, arrays, disagree


def expected_values(arrays, fname: str, which: str, sid: int, layer: int, length: int) -> tuple:
    """K and V float32 [length, H, D] that one (commit, sequence, layer) decodes to."""
    out = []
    for side in "kv":
        key = f"{fname}/{which}/{sid}/{layer}/{side}"
        arr = arrays[key] if key in arrays else arrays[key.replace("/previous/", "/newest/")][:length]
        assert len(arr) == length, key
        out.append(arr)
    return tuple(out)


def check_against_kvmmap(c, snap) -> None:
    """Warn (the tests fail) where kvmmap reads other values than the numpy model."""
    for sid, s in snap["sequences"].items():
        for layer, info in enumerate(s["layers"]):
            got = c.read(sid, layer)
            for side, want, arr in zip("kv", info["values"], got):
                if not np.array_equal(arr, want):
                    bad = np.argwhere(arr != want)
                    print(f"  WARNING {c.path}: sequence {sid} layer {layer} {side}: {len(bad)} values differ "
                          f"from the numpy model, first at {bad[0].tolist()}: {arr[tuple(bad[0])]!r} != "
                          f"{want[tuple(bad[0])]!r}", file=sys.stderr)


def at_commit(raw: bytes, which: str) -> bytes:
    """The file's bytes with only the chosen commit's root valid (the other zeroed), so
    that reference.parse_cache_file reads that commit."""
    geo = parse_cache_file(raw)
    gens = sorted(g for g, _ in valid_roots(raw, geo))
    drop = gens[0] if which == "newest" else gens[-1]
    out = bytearray(raw)
    for slot in (0, 1):
        at = geo["root_offset"] + slot * geo["root_bytes"]
        if int.from_bytes(raw[at + 8:at + 16], "little") == drop:
            out[at:at + 64] = bytes(64)
    return bytes(out)


def bytes_disagree(raw: bytes, which: str, snap: dict) -> int:
    """Values where tests/reference.py's decoding of the file's bytes differs from the model."""
    parsed = parse_cache_file(at_commit(raw, which))
    bad = 0
    for sid, s in snap["sequences"].items():
        for layer, info in enumerate(s["layers"]):
            for want, got in zip(info["values"], stored_kv(parsed, raw, sid, layer)):
                bad += int((want != got).sum()) if want.shape == got.shape else want.size + 1
    return bad


def main() -> None:
    manifest = {"format_version": [2, 0], "geometry": GEOMETRY, "fingerprint": FINGERPRINT.decode(),
                "seed": SEED, "files": {}}
    arrays = {}
    for number, (fname, (kf, vf, v_group)) in enumerate(FILES.items()):
        path = os.path.join(HERE, fname)
        for mode in ("fused", "float32"):
            if os.path.exists(path):
                os.unlink(path)
            ROUNDING.update(mode=mode, ties=0)
            entry, arr, disagree = build(path, kf, vf, v_group, np.random.default_rng([SEED, number]))
            if not disagree:
                break
            print(f"  {fname}: {disagree} values of the file differ from the model with {mode} rounding",
                  file=sys.stderr)
        else:
            sys.exit(f"{fname}: the file's bytes match the numpy model under neither rounding")
        manifest["files"][fname] = entry
        arrays.update(arr)
        print(f"{fname}: {os.path.getsize(path)} bytes, {os.stat(path).st_blocks * 512} on disk, "
              f"{mode} rounding, {entry['rounding_ties']} codes at ties")
    np.savez_compressed(os.path.join(HERE, EXPECTED), **arrays)
    with open(os.path.join(HERE, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"{EXPECTED}: {os.path.getsize(os.path.join(HERE, EXPECTED))} bytes")


if __name__ == "__main__":
    main()
