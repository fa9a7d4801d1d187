"""Write the format 1.0 golden caches that tests/test_golden.py reads on every run.

    python tests/golden/make_golden.py [--force]

Run once per released format version; the files are committed and must never be
regenerated for a version that has shipped (that would hide a format change), so it
refuses to overwrite them without --force. It writes through the library, so it needs a
kvmmap that still writes format 1.0 (commit 3db7875 or earlier); today's kvmmap writes
2.0 (tests/golden/make_golden2.py). The ``reference`` function below is still used by the
tests.

Four small caches together cover every storage format on the K side and the V side (int4
on both, with a different V group size than the default). Each holds the same story:

* ``prompt``: 13 tokens appended in uneven chunks (3 sealed pages and a partial tail);
* ``prompt/fork``: a fork of ``prompt`` (sharing its pages) grown by 6 more tokens;
* an unnamed sequence of 14 (layer 0) / 9 (layer 1) tokens truncated to 6, into a
  sealed page (copy-on-write of the kept part into the tail);
* ``window``: 22 tokens then ``shift_left(7)`` (drops a page, leaves ``first`` = 3);
* a sequence that was freed, so ids have a gap;
* two commits, so both metadata slots hold a valid state.

``v1_0_expected.npz`` keeps, for each (file, sequence, layer, side), the float32 stream
of every token ever written there (``.../k_stream``; position 0 is the start of the first
page). fp32 / fp16 / bf16 / fp8 have bit-exact plain-numpy references in
tests/reference.py (see :func:`reference`), so the test recomputes their expected values;
int8 / int4 do not, so kvmmap's values, checked here against the reference rounding
bound, are stored too (``.../k``). ``v1_0_manifest.json`` records geometry, sequences,
the tokens dropped in front, visible lengths and block tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))           # tests/, for reference.py

import kvmmap as km  # noqa: E402
from reference import (  # noqa: E402
    bf16_round,
    fp8_decode_table,
    fp8_quantize,
    int4_channel_bound,
    int4_token_bound,
    int8_roundtrip_bound,
)

GEOMETRY = dict(num_layers=2, num_kv_heads=2, head_dim=16, page_size=4)
V_GROUP = 8
FILES = {   # file name: (k_format, v_format)
    "v1_0_int8_int4.kvm": ("int8", "int4"),
    "v1_0_int4_fp16.kvm": ("int4", "fp16"),
    "v1_0_bf16_fp8_e4m3.kvm": ("bf16", "fp8_e4m3"),
    "v1_0_fp32_fp8_e5m2.kvm": ("fp32", "fp8_e5m2"),
}
META_SLOT_BYTES = 12288
FINGERPRINT = b"kvmmap golden 1.0"
EXPECTED = "v1_0_expected.npz"
MANIFEST = "v1_0_manifest.json"


def reference(stream: np.ndarray, fmt: str, side: str, sealed: int, page_size: int, group: int):
    """Plain-numpy decoding of positions ``stream`` [n, H, D] on a page grid starting at 0.

    Positions below ``sealed`` lie in sealed pages (quantized page by page); the rest are
    the open tail (int4 keeps it in float32, other formats quantize it per token).
    Returns (values, bound): values exact where a bit-exact reference exists, else None;
    bound is the per-element error allowed (0 where exact).
    """
    x = stream.astype(np.float32)
    if fmt == "fp32":
        return x.copy(), np.zeros_like(x)
    if fmt == "fp16":
        return x.astype(np.float16).astype(np.float32), np.zeros_like(x)
    if fmt == "bf16":
        return bf16_round(x), np.zeros_like(x)
    if fmt.startswith("fp8"):
        codes, scales = fp8_quantize(x, fmt)
        vals = fp8_decode_table(fmt)[codes].astype(np.float32) * scales[..., None]
        return vals, np.zeros_like(x)
    if fmt == "int8":
        return None, int8_roundtrip_bound(x)
    bound = np.zeros_like(x)                          # int4: the tail stays exact
    for p0 in range(0, sealed, page_size):
        page = x[p0:p0 + page_size]                   # [P, H, D]
        if side == "k":                               # per channel over the page's tokens
            b = int4_channel_bound(page.transpose(1, 0, 2), page_size).transpose(1, 0, 2)
        else:
            b = int4_token_bound(page, group)
        bound[p0:p0 + page_size] = b
    return None, bound


def build(path: str, kf: str, vf: str, rng) -> dict:
    """Create one golden cache; returns, per sequence label, its id and for each layer the
    K and V streams ever written (position 0 on the page grid), the tokens dropped in
    front, the visible length, what kvmmap reads and the block table."""
    L, H, D = (GEOMETRY[k] for k in ("num_layers", "num_kv_heads", "head_dim"))
    c = km.PagedKVCache.create(path, **GEOMETRY, k_format=kf, v_format=vf,
                               v_group_size=V_GROUP if vf == "int4" else None,
                               fingerprint=FINGERPRINT, meta_slot_bytes=META_SLOT_BYTES)

    def data(n):
        x = rng.standard_normal((n, H, D), dtype=np.float32) * 2
        x[:, :, 3] *= 8                               # an outlier channel, as keys have
        return x

    story = {}   # label -> [per layer: [k stream, v stream, dropped in front, visible length]]
    prompt = c.new_sequence("prompt")
    story["prompt"] = []
    for layer in range(L):
        k, v = data(13), data(13)
        for a, b in ((0, 1), (1, 6), (6, 13)):
            c.append(prompt, layer, k[a:b], v[a:b])
        story["prompt"].append([k, v, 0, 13])
    doomed = c.new_sequence("freed")
    c.append(doomed, 0, data(5), data(5))
    c.flush()                                         # first commit

    fork = c.fork(prompt, name="prompt/fork")
    story["prompt/fork"] = []
    for layer in range(L):
        k0, v0, _, _ = story["prompt"][layer]
        k, v = data(6), data(6)
        c.append(fork, layer, k, v)
        story["prompt/fork"].append([np.concatenate([k0, k]), np.concatenate([v0, v]), 0, 19])
    c.free(doomed)
    cut = c.new_sequence()
    story["#cut"] = []
    for layer, n in zip(range(L), (14, 9)):
        k, v = data(n), data(n)
        c.append(cut, layer, k, v)
        story["#cut"].append([k, v, 0, 6])
    c.truncate(cut, 6)
    window = c.new_sequence("window")
    story["window"] = []
    for layer in range(L):
        k, v = data(22), data(22)
        c.append(window, layer, k[:9], v[:9])
        c.append(window, layer, k[9:], v[9:])
        story["window"].append([k, v, 7, 15])
    c.shift_left(window, 7)
    c.flush()                                         # second commit: both slots now valid

    ids = {"prompt": prompt, "prompt/fork": fork, "#cut": cut, "window": window}
    out = {}
    for label, layers in story.items():
        sid = ids[label]
        out[label] = {"id": sid, "layers": []}
        for layer, (k, v, dropped, length) in enumerate(layers):
            assert c.seq_len(sid, layer) == length
            out[label]["layers"].append({
                "stream": (k, v), "dropped": dropped, "length": length,
                "read": c.read(sid, layer), "block_table": c.block_table(sid, layer).tolist(),
            })
    assert c.verify() == []
    out["_sequences"] = {str(k): v for k, v in c.sequences().items()}
    c.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="overwrite existing golden files")
    args = ap.parse_args()
    targets = list(FILES) + [EXPECTED, MANIFEST]
    if not args.force and any(os.path.exists(os.path.join(HERE, t)) for t in targets):
        sys.exit("golden files exist; they pin a released format. Pass --force only for a new version.")
    P = GEOMETRY["page_size"]
    rng = np.random.default_rng(20240611)
    arrays, manifest = {}, {"format_version": [1, 0], "geometry": GEOMETRY, "v_group_size": V_GROUP,
                            "meta_slot_bytes": META_SLOT_BYTES, "fingerprint": FINGERPRINT.decode(),
                            "files": {}}
    for fname, (kf, vf) in FILES.items():
        path = os.path.join(HERE, fname)
        if os.path.exists(path):
            os.unlink(path)
        built = build(path, kf, vf, rng)
        entry = {"k_format": kf, "v_format": vf, "sequences": built.pop("_sequences"), "contents": {}}
        for label, info in built.items():
            layers = []
            for layer, li in enumerate(info["layers"]):
                d, n = li["dropped"], li["length"]
                for side, fmt, stream, got in zip("kv", (kf, vf), li["stream"], li["read"]):
                    sealed = len(stream) // P * P             # pages seal when full, never again
                    ref, bound = reference(stream, fmt, side, sealed, P, V_GROUP)
                    x, bound = stream[d:d + n], bound[d:d + n]
                    if ref is None:
                        err = np.abs(got.astype(np.float64) - x)
                        assert np.all(err <= bound * (1 + 1e-5) + 1e-6 * np.abs(x)), (fname, label, side)
                        want = got
                    else:
                        want = ref[d:d + n]
                        np.testing.assert_array_equal(got, want, err_msg=f"{fname} {label} {side}")
                    key = f"{fname}/{label}/{layer}/{side}"
                    arrays[f"{key}_stream"] = stream
                    if ref is None:
                        arrays[key] = want
                layers.append({"dropped": d, "first": d % P, "n_pos": d % P + n, "length": n,
                               "block_table": li["block_table"]})
            entry["contents"][label] = {"id": info["id"], "layers": layers}
        manifest["files"][fname] = entry
        print(f"{fname}: {os.path.getsize(path)} bytes")
    np.savez_compressed(os.path.join(HERE, EXPECTED), **arrays)
    with open(os.path.join(HERE, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"{EXPECTED}: {os.path.getsize(os.path.join(HERE, EXPECTED))} bytes")


if __name__ == "__main__":
    main()
