"""Plain-numpy reference implementations that the kernels are tested against.

Written independently of kvmmap's kernels: rounding is done by searching the set of
representable values, not by bit tricks, so a shared mistake is unlikely.
"""

from __future__ import annotations

import struct

import crc32c
import numpy as np

FP8 = {  # name: (exponent bits, mantissa bits, bias, has inf)
    "fp8_e4m3": (4, 3, 7, False),
    "fp8_e5m2": (5, 2, 15, True),
}


def fp8_decode_table(fmt: str) -> np.ndarray:
    """float64 value of each of the 256 codes (NaN / inf where the format reserves them)."""
    ebits, mbits, bias, has_inf = FP8[fmt]
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    e = (codes >> mbits) & ((1 << ebits) - 1)
    m = codes & ((1 << mbits) - 1)
    val = np.where(e == 0, np.ldexp(m.astype(float), 1 - bias - mbits),
                   np.ldexp(1.0 + m / 2.0**mbits, e - bias))
    emax = (1 << ebits) - 1
    if has_inf:
        val = np.where(e == emax, np.where(m == 0, np.inf, np.nan), val)
    else:
        val = np.where((e == emax) & (m == (1 << mbits) - 1), np.nan, val)
    return sign * val


def nearest_code(y: np.ndarray, values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Round each y to the nearest of ``values`` (sorted, ascending), ties to the even code."""
    y = np.asarray(y, np.float64)
    hi = np.clip(np.searchsorted(values, y), 1, len(values) - 1)
    lo = hi - 1
    d_lo = y - values[lo]
    d_hi = values[hi] - y
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (codes[hi] % 2 == 0))
    return np.where(pick_hi, codes[hi], codes[lo])


def fp8_quantize(x: np.ndarray, fmt: str):
    """Per-row scaled fp8: returns (codes uint8, scales float32)."""
    table = fp8_decode_table(fmt)
    fmax = np.nanmax(table[np.isfinite(table)])
    amax = np.abs(x).max(axis=-1).astype(np.float32)
    safe = np.where(amax > 0, amax, 1).astype(np.float64)
    inv = np.where(amax > 0, (fmax / safe).astype(np.float32), np.float32(0))
    y = np.clip(x * inv[..., None], -fmax, fmax)            # float32 multiply, like the kernel
    finite = np.isfinite(table) & ~((np.arange(256) & 0x80).astype(bool) & (table == 0))
    codes = np.arange(256)[finite]
    order = np.argsort(table[finite], kind="stable")
    out = nearest_code(y, table[finite][order], codes[order]).astype(np.uint8)
    return out, (amax / np.float32(fmax)).astype(np.float32)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (as float32), ties to even, by comparing the two neighbours."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    down = (u & 0xFFFF0000).astype(np.uint32)
    up = (down.astype(np.uint64) + 0x10000).astype(np.uint32)
    fd = down.view(np.float32).astype(np.float64)
    fu = up.view(np.float32).astype(np.float64)
    xd = x.astype(np.float64)
    take_up = (np.abs(fu - xd) < np.abs(xd - fd)) | (
        (np.abs(fu - xd) == np.abs(xd - fd)) & (((up >> 16) & 1) == 0)
    )
    return np.where(take_up, up, down).view(np.float32)


def int8_roundtrip_bound(x: np.ndarray) -> np.ndarray:
    """Per-element error bound of int8: half a step of the row's absmax / 127."""
    return (np.abs(x).max(axis=-1, keepdims=True) / 127.0) / 2


def int4_token_bound(x: np.ndarray, group: int) -> np.ndarray:
    g = x.reshape(x.shape[:-1] + (x.shape[-1] // group, group))
    step = (g.max(-1, keepdims=True) - g.min(-1, keepdims=True)) / 15.0
    return np.broadcast_to(step / 2, g.shape).reshape(x.shape)


def int4_channel_bound(x: np.ndarray, group: int) -> np.ndarray:
    T = x.shape[-2]
    out = np.empty_like(x)
    for t0 in range(0, T, group):
        blk = x[..., t0:t0 + group, :]
        step = (blk.max(-2, keepdims=True) - blk.min(-2, keepdims=True)) / 15.0
        out[..., t0:t0 + group, :] = step / 2
    return out


# ------------------------------------------------------------------ stored values, decoded
# An independent decoder of docs/FORMAT.md: struct and numpy only, nothing of kvmmap. The
# attention and golden tests compare kvmmap with what it decodes from a file's bytes.

FORMAT_IDS = {"fp32": 0, "fp16": 1, "bf16": 2, "int8": 3, "int4": 4, "fp8_e4m3": 5, "fp8_e5m2": 6}
CODE_DTYPE = {"fp32": "<f4", "fp16": "<u2", "bf16": "<u2", "int8": "i1", "int4": "u1",
              "fp8_e4m3": "u1", "fp8_e5m2": "u1"}
SCALED = {"int8", "int4", "fp8_e4m3", "fp8_e5m2"}


def decode_codes(fmt: str, codes: np.ndarray) -> np.ndarray:
    """float32 value of each code before its scale and zero point.

    ``codes`` holds the format's code type (fp16 and bf16 as uint16 bit patterns); int4
    takes uint8 bytes ``[..., D / 2]`` and returns ``[..., D]``, element 2j from the low
    nibble.
    """
    codes = np.asarray(codes)
    if fmt == "fp32":
        return codes.astype(np.float32)
    if fmt == "fp16":
        return codes.astype(np.uint16).view(np.float16).astype(np.float32)
    if fmt == "bf16":
        return (codes.astype(np.uint32) << 16).view(np.float32)
    if fmt == "int8":
        return codes.astype(np.int8).astype(np.float32)
    if fmt.startswith("fp8"):
        return fp8_decode_table(fmt).astype(np.float32)[codes]
    out = np.empty(codes.shape[:-1] + (2 * codes.shape[-1],), np.float32)
    out[..., 0::2] = codes & 15
    out[..., 1::2] = codes >> 4
    return out


def dequantize(fmt: str, codes, scales=None, zeros=None, grouping="token", group_size=0) -> np.ndarray:
    """float32 ``code * scale (+ zero)``, side arrays laid out as kvmmap.quant documents."""
    x = decode_codes(fmt, codes)
    if fmt not in SCALED:
        return x
    if fmt != "int4":
        with np.errstate(invalid="ignore"):          # inf * 0 is NaN, as in the kernels
            return x * np.asarray(scales, np.float32)[..., None]
    if grouping == "token":
        s, z = (np.repeat(a, group_size, axis=-1) for a in (scales, zeros))
    else:                      # [..., ceil(T / G), D] over the tokens of axis -2
        T = x.shape[-2]
        s, z = (np.repeat(a, group_size, axis=-2)[..., :T, :] for a in (scales, zeros))
    return x * s + z


SIDE_DTYPE = {1: np.dtype("<f4"), 2: np.dtype("<f2")}      # scales / zero points by major version
FORMAT_NAMES = {i: name for name, i in FORMAT_IDS.items()}


def page_regions(geo: dict, fmt: str, side: str) -> list:
    """[(name, dtype, shape)] of one side of a page, in file order (FORMAT.md, Pages)."""
    H, P, D = geo["num_kv_heads"], geo["page_size"], geo["head_dim"]
    out = [("codes", np.dtype(CODE_DTYPE[fmt]), (H, P, D // 2 if fmt == "int4" else D))]
    if fmt in SCALED:
        shape = (H, P) if fmt != "int4" else (H, 1, D) if side == "k" else (H, P, D // geo["v_group"])
        dt = SIDE_DTYPE[geo["version"][0]]
        out.append(("scales", dt, shape))
        if fmt == "int4":
            out.append(("zeros", dt, shape))
    return out


def page_arrays(page: bytes, geo: dict) -> tuple[dict, int]:
    """({side: {region: array}} of one page, the page's size): regions on 64-byte boundaries."""
    off, out = 0, {}
    for side in ("k", "v"):
        out[side] = {}
        for name, dt, shape in page_regions(geo, geo[f"{side}_format"], side):
            n = int(np.prod(shape))
            out[side][name] = np.frombuffer(page, dt, n, off).reshape(shape)
            off = -(-(off + n * dt.itemsize) // 64) * 64
    return out, off


def decode_page_rows(geo: dict, side: str, arrs: dict, rows) -> np.ndarray:
    """float32 [H, len(rows), D] of rows of a page."""
    fmt = geo[f"{side}_format"]
    codes = arrs["codes"][:, rows]
    f32 = {n: arrs[n].astype(np.float32) for n in ("scales", "zeros") if n in arrs}
    if fmt == "int4" and side == "k":        # scale and zero per channel over the page
        return decode_codes(fmt, codes) * f32["scales"][:, :1] + f32["zeros"][:, :1]
    side_arrays = {n: a[:, rows] for n, a in f32.items()}
    return dequantize(fmt, codes, side_arrays.get("scales"), side_arrays.get("zeros"), "token",
                      geo.get("v_group") or 0)


SUPERBLOCK = struct.Struct("<8sHHIIIIIBBHHHQQQQ32sQ")


def parse_superblock(raw: bytes) -> dict:
    (magic, major, minor, sb_bytes, nl, nh, hd, ps, kid, vid, kg, vg, flags,
     page_bytes, root_off, root_bytes, arena_off, fingerprint, max_bytes) = SUPERBLOCK.unpack_from(raw, 0)
    assert struct.unpack_from("<I", raw, 4092)[0] == crc32c.crc32c(raw[:4092]), "superblock checksum"
    return {"magic": magic, "version": (major, minor), "superblock_bytes": sb_bytes, "num_layers": nl,
            "num_kv_heads": nh, "head_dim": hd, "page_size": ps, "k_format": FORMAT_NAMES[kid],
            "v_format": FORMAT_NAMES[vid], "k_group": kg, "v_group": vg, "flags": flags,
            "page_bytes": page_bytes, "root_offset": root_off, "root_bytes": root_bytes,
            "arena_offset": arena_off, "fingerprint": fingerprint, "max_bytes": max_bytes}


def valid_roots(raw: bytes, geo: dict) -> list:
    """[(generation, root fields)] of the commit roots whose checksum holds."""
    out = []
    for slot in (0, 1):
        at = geo["root_offset"] + slot * geo["root_bytes"]
        magic, gen, hw, ibytes, ipage, icrc, next_id, nseq = struct.unpack_from("<8sQQQIIII", raw, at)
        if (magic == b"KVMROOT\0" and struct.unpack_from("<I", raw, at + 60)[0] == crc32c.crc32c(raw[at:at + 60])
                and not any(raw[at + 48:at + 60])):
            out.append((gen, {"high_water": hw, "index_bytes": ibytes, "index_page": ipage, "index_crc": icrc,
                              "next_id": next_id, "num_sequences": nseq}))
    return out


def read_blob(raw: bytes, geo: dict, page: int, nbytes: int, crc: int) -> bytes:
    """A blob's content: the chain of pages from ``page`` (16-byte header each)."""
    pb, base, parts = geo["page_bytes"], geo["arena_offset"], []
    while True:
        at = base + page * pb
        magic, nxt, used, zero = struct.unpack_from("<IIII", raw, at)
        assert magic == 0x424D564B and zero == 0 and used <= pb - 16
        parts.append(raw[at + 16:at + 16 + used])
        if nxt == 0xFFFFFFFF:
            break
        page = nxt
    data = b"".join(parts)
    assert len(data) == nbytes and crc32c.crc32c(data) == crc, "blob checksum"
    return data


def parse_record(data: bytes, geo: dict) -> dict:
    L, P = geo["num_layers"], geo["page_size"]
    sid, name_len, has_name, max_tokens = struct.unpack_from("<IHHQ", data, 0)
    off = 16
    name = data[off:off + name_len].decode() if has_name else None
    off += name_len + (-name_len % 8)
    layers = []
    for _ in range(L):
        n_pos, first, npages, nres, zero = struct.unpack_from("<QIIII", data, off)
        off += 24
        assert zero == 0 and npages == -(-n_pos // P) and first < P
        arrs = []
        for count in (npages, npages, nres, nres):
            arrs.append(np.frombuffer(data, "<u4", count, off).tolist())
            off += 4 * count
        layers.append({"n_pos": n_pos, "first": first, "pages": arrs[0], "crc": arrs[1], "res": arrs[2],
                       "res_crc": arrs[3]})
    assert off == len(data)
    return {"id": sid, "name": name, "max_tokens": max_tokens, "layers": layers}


def parse_cache_file(raw: bytes) -> dict:
    """The superblock fields and the newest valid commit of a format-2 cache file's bytes."""
    geo = parse_superblock(raw)
    assert geo["version"][0] == 2
    _, layout_bytes = page_arrays(bytes(geo["page_bytes"]), geo)
    assert geo["page_bytes"] == layout_bytes, "page_bytes disagrees with the page layout"
    roots = valid_roots(raw, geo)
    assert roots, "no valid commit root"
    gen, root = max(roots, key=lambda r: r[0])
    seqs = {}
    if root["num_sequences"]:
        index = read_blob(raw, geo, root["index_page"], root["index_bytes"], root["index_crc"])
        for sid, page, nbytes, crc in np.frombuffer(index, "<u4").reshape(-1, 4).tolist():
            rec = parse_record(read_blob(raw, geo, page, nbytes, crc), geo)
            assert rec["id"] == sid
            seqs[sid] = rec
    return {**geo, "commits": len(roots), "generation": gen, "high_water": root["high_water"],
            "next_id": root["next_id"], "seqs": seqs}


def residual_rows(raw: bytes, parsed: dict, res: list, rows: int) -> np.ndarray:
    """float32 [H, rows, D] of int4 keys kept as float16 residual rows (token-major)."""
    H, D, pb = parsed["num_kv_heads"], parsed["head_dim"], parsed["page_bytes"]
    per_page = pb // (2 * H * D)
    out = []
    for t in range(rows):
        at = parsed["arena_offset"] + res[t // per_page] * pb + (t % per_page) * 2 * H * D
        out.append(np.frombuffer(raw, "<f2", H * D, at).reshape(H, D))
    return (np.stack(out, axis=1) if out else np.zeros((H, 0, D), np.float16)).astype(np.float32)


def stored_kv(parsed: dict, raw: bytes, sid: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """K and V float32 [length, H, D] of one (sequence, layer), decoded from the file's bytes:
    visible token i is position first + i, in page pages[(first + i) // P] at row
    (first + i) % P; a partly filled last page's int4 keys are float16 residual rows."""
    P, pb = parsed["page_size"], parsed["page_bytes"]
    st = parsed["seqs"][sid]["layers"][layer]
    rows_last = st["n_pos"] - (len(st["pages"]) - 1) * P if st["pages"] else 0
    out = []
    for side in ("k", "v"):
        parts = []
        for i, page in enumerate(st["pages"]):
            at = parsed["arena_offset"] + page * pb
            rows = P if i < len(st["pages"]) - 1 else rows_last
            if side == "k" and parsed["k_format"] == "int4" and rows < P and st["res"]:
                parts.append(residual_rows(raw, parsed, st["res"], rows))
            else:
                parts.append(decode_page_rows(parsed, side, page_arrays(raw[at:at + pb], parsed)[0][side],
                                              slice(0, rows)))
        H, D = parsed["num_kv_heads"], parsed["head_dim"]
        allrows = np.concatenate(parts, axis=1) if parts else np.zeros((H, 0, D), np.float32)
        out.append(allrows.transpose(1, 0, 2)[st["first"]:st["n_pos"]].astype(np.float32))
    return out[0], out[1]


# ---------------------------------------------------------------- format 1.0 (golden files)

SUPERBLOCK_V1 = struct.Struct("<8sHHIIIIIBBHHHQQQQ32s")


def parse_superblock_v1(raw: bytes) -> dict:
    (magic, major, minor, sb_bytes, nl, nh, hd, ps, kid, vid, kg, vg, flags,
     page_bytes, meta_off, slot_bytes, arena_off, fingerprint) = SUPERBLOCK_V1.unpack_from(raw, 0)
    return {"magic": magic, "version": (major, minor), "superblock_bytes": sb_bytes, "num_layers": nl,
            "num_kv_heads": nh, "head_dim": hd, "page_size": ps, "k_format": FORMAT_NAMES[kid],
            "v_format": FORMAT_NAMES[vid], "k_group": kg, "v_group": vg, "flags": flags,
            "page_bytes": page_bytes, "meta_offset": meta_off, "meta_slot_bytes": slot_bytes,
            "arena_offset": arena_off, "fingerprint": fingerprint}


def valid_commits_v1(raw: bytes, geo: dict) -> list:
    """[(generation, payload)] of the metadata slots whose checksums hold and padding is zero."""
    out = []
    for slot in (0, 1):
        at = geo["meta_offset"] + slot * geo["meta_slot_bytes"]
        magic, gen, length, pcrc, hcrc = struct.unpack_from("<8sQQII", raw, at)
        payload = raw[at + 64:at + 64 + length]
        if (magic == b"KVMSLOT\0" and hcrc == crc32c.crc32c(raw[at:at + 28])
                and pcrc == crc32c.crc32c(payload) and not any(raw[at + 32:at + 64])):
            out.append((gen, payload))
    return out


def parse_payload_v1(payload: bytes, geo: dict) -> dict:
    """high_water, page CRCs and every sequence's layers (n_pos, first, pages, tail arrays)."""
    L, H, P, D = geo["num_layers"], geo["num_kv_heads"], geo["page_size"], geo["head_dim"]
    hw, nseq, next_id, reserved = struct.unpack_from("<QIII", payload, 0)
    assert reserved == 0
    off = 20
    page_crc = np.frombuffer(payload, "<u4", hw, off)
    off += 4 * hw
    tail_layout = {}
    for side in ("k", "v"):
        fmt = geo[f"{side}_format"]
        tail_layout[side] = ([("codes", np.dtype("<f4"), (H, P, D))] if fmt == "int4"    # float32 until sealed
                             else page_regions(geo, fmt, side))
    seqs = {}
    for _ in range(nseq):
        sid, name_len, has_name = struct.unpack_from("<IHH", payload, off)
        off += 8
        name = payload[off:off + name_len].decode() if has_name else None
        off += name_len + (-name_len % 4)
        assert sid < next_id
        layers = []
        for _ in range(L):
            n_pos, first, npages = struct.unpack_from("<QII", payload, off)
            off += 16
            pages = np.frombuffer(payload, "<u4", npages, off)
            off += 4 * npages
            assert npages * P <= n_pos < (npages + 1) * P and first < P
            tail = {}
            for side in ("k", "v"):
                tail[side] = {}
                for n, dt, shape in tail_layout[side]:
                    tail[side][n] = np.frombuffer(payload, dt, int(np.prod(shape)), off).reshape(shape)
                    off += int(np.prod(shape)) * dt.itemsize
            layers.append({"n_pos": n_pos, "first": first, "pages": pages.tolist(), "tail": tail})
        seqs[sid] = {"name": name, "layers": layers}
    assert off == len(payload)
    return {"high_water": hw, "page_crc": page_crc, "seqs": seqs}


def parse_cache_file_v1(raw: bytes) -> dict:
    """The superblock fields and the newest valid commit of a cache file's bytes."""
    geo = parse_superblock_v1(raw)
    _, layout_bytes = page_arrays(bytes(geo["page_bytes"]), geo)
    assert geo["page_bytes"] == layout_bytes, "page_bytes disagrees with the page layout"
    commits = valid_commits_v1(raw, geo)
    assert commits, "no valid metadata slot"
    return {**geo, "commits": len(commits), **parse_payload_v1(max(commits)[1], geo)}


def stored_kv_v1(parsed: dict, raw: bytes, sid: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """K and V float32 [length, H, D] of one (sequence, layer), decoded from the file's bytes:
    visible token i is position first + i, in page pages[(first + i) // P] at row
    (first + i) % P, or in the tail past the sealed pages."""
    P, pb = parsed["page_size"], parsed["page_bytes"]
    st = parsed["seqs"][sid]["layers"][layer]
    n_tail = st["n_pos"] - len(st["pages"]) * P
    out = []
    for side in ("k", "v"):
        parts = []
        for page in st["pages"]:
            at = parsed["arena_offset"] + page * pb
            parts.append(decode_page_rows(parsed, side, page_arrays(raw[at:at + pb], parsed)[0][side], slice(None)))
        tail = st["tail"][side]
        if parsed[f"{side}_format"] == "int4":
            parts.append(tail["codes"][:, :n_tail])
        else:
            parts.append(decode_page_rows(parsed, side, tail, slice(0, n_tail)))
        out.append(np.concatenate(parts, axis=1).transpose(1, 0, 2)[st["first"]:st["n_pos"]].astype(np.float32))
    return out[0], out[1]
