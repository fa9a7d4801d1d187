"""Write the version 1 compressed K/V containers that tests/test_compress.py reads on every run.

    python tests/golden/make_compressed.py [--force]

The files were written by the kvmmap of the commit that added this script (before
``kvmmap/compress.py`` became a package) and pin the ``.npz`` container of
:meth:`kvmmap.CompressedKV.save` (version 1): array names, header keys, params per method.
They must never be regenerated for a container version that has shipped (that would hide a
change), so the script refuses to overwrite them without --force.

One file per case, ``compressed_v1_<case>.kvz``, and ``compressed_v1_expected.npz`` holding,
per case, the input (``<case>.k`` / ``<case>.v``) and what decompressing the file gave
(``<case>.k_out`` / ``<case>.v_out``), so the test checks both that old files decompress to
the same values and that compressing the same input with the same settings still gives them.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
EXPECTED = "compressed_v1_expected.npz"

# case -> (KVCacheCompressor arguments, input shape, input dtype)
CASES = {
    "lowrank": ({"method": "lowrank", "rank": 3, "group_heads": 2}, (2, 2, 8, 8), "float32"),
    "vq": ({"method": "vq", "codebook_size": 8, "subvector_dim": 2, "seed": 3}, (2, 8, 8), "float16"),
    "hybrid_int8": ({"method": "hybrid", "energy": 0.9, "quant_bits": 8, "seed": 1}, (1, 2, 12, 8), "float32"),
    "hybrid_int4": ({"method": "hybrid", "rank": 3, "quant_bits": 4}, (2, 2, 8, 8), "float32"),
}


def inputs(shape, dtype, seed):
    """K and V with a decaying spectrum per head plus a per-channel offset (like real keys)."""
    rng = np.random.default_rng(seed)
    d = shape[-1]
    mix = rng.standard_normal((d, d)) * np.exp(-np.arange(d) / 3.0)[None, :]
    k = rng.standard_normal(shape) @ mix + rng.standard_normal(d)
    v = rng.standard_normal(shape) @ mix.T
    return k.astype(dtype), v.astype(dtype)


def main(argv=None) -> None:
    import kvmmap as km

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    args = p.parse_args(argv)
    paths = [os.path.join(HERE, f"compressed_v1_{case}.kvz") for case in CASES] + [os.path.join(HERE, EXPECTED)]
    if not args.force and any(os.path.exists(q) for q in paths):
        raise SystemExit("compressed_v1 files exist; they pin a shipped container version (--force to replace)")
    expected = {}
    for i, (case, (kwargs, shape, dtype)) in enumerate(CASES.items()):
        k, v = inputs(shape, dtype, seed=100 + i)
        c = km.KVCacheCompressor(**kwargs).compress_kv(k, v)
        path = os.path.join(HERE, f"compressed_v1_{case}.kvz")
        c.save(path)
        k_out, v_out = km.decompress_kv(km.CompressedKV.load(path))
        expected.update({f"{case}.k": k, f"{case}.v": v, f"{case}.k_out": k_out, f"{case}.v_out": v_out})
        print(path, os.path.getsize(path), "bytes", json.dumps(c.report)[:120])
    np.savez(os.path.join(HERE, EXPECTED), **expected)


if __name__ == "__main__":
    main()
