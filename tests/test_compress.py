"""KVCacheCompressor, its codecs and compress_cache against plain-numpy references.

References: the energy rule and the optimal rank-r error come from numpy's own SVD of the
centred tokens of each head (or head group); VQ codes are checked by brute-force nearest
search; cache re-encoding is checked against reading both files back.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

import kvmmap as km
from kvmmap.compress import CODECS, CompressedKV, HybridCodec, KVCacheCompressor, LowRankCodec, VQCodec, energy_rank, kmeans
from kvmmap.tools.rewrite import compress_cache

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import make_compressed  # noqa: E402  (the cases of the golden containers)

B, H, S, D = 2, 4, 48, 16


def decaying(shape, seed, decay=3.0, offset=0.5):
    """Tokens with a decaying spectrum per head (like real keys), plus a per-channel offset."""
    rng = np.random.default_rng(seed)
    d = shape[-1]
    mix = rng.standard_normal((shape[-3], d, d)) * np.exp(-np.arange(d) / decay)[None, :, None]
    x = rng.standard_normal(shape) @ mix if len(shape) == 3 else np.einsum("bhsd,hde->bhse", rng.standard_normal(shape), mix)
    return (x + offset * rng.standard_normal(d)).astype(np.float32)


def reference_lowrank(x4, rank, group_heads=1):
    """Best rank-r affine reconstruction of each head group, by numpy's SVD; and its spectra."""
    b, h, s, d = x4.shape
    out = np.empty_like(x4, dtype=np.float64)
    spectra = []
    for g in range(h // group_heads):
        heads = slice(g * group_heads, (g + 1) * group_heads)
        rows = x4[:, heads].transpose(0, 2, 1, 3).reshape(b * s, group_heads * d).astype(np.float64)
        mean = rows.mean(axis=0)
        _, sv, vt = np.linalg.svd(rows - mean, full_matrices=False)
        spectra.append(sv)
        rec = mean + (rows - mean) @ vt[:rank].T @ vt[:rank]
        out[:, heads] = rec.reshape(b, s, group_heads, d).transpose(0, 2, 1, 3)
    return out, spectra


def rel(x, y):
    return float(np.linalg.norm((np.asarray(x, np.float64) - y).ravel()) / np.linalg.norm(np.asarray(x, np.float64).ravel()))


# ---------------------------------------------------------------------------------- low rank


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("group_heads", [1, 2, 4])
def test_energy_rule_matches_numpy_svd(energy, group_heads):
    k, v = decaying((B, H, S, D), 1), decaying((B, H, S, D), 2, decay=8.0)
    c = KVCacheCompressor("lowrank", energy=energy, group_heads=group_heads).compress_kv(k, v)
    for side, x in (("k", k), ("v", v)):
        _, spectra = reference_lowrank(x, D, group_heads)
        want = 1
        for sv in spectra:
            e = np.cumsum(sv ** 2) / np.sum(sv ** 2)
            want = max(want, int(np.argmax(e >= energy - 1e-12)) + 1)
        got = c.report[f"{side}_rank"]
        assert got == want
        assert c.report[f"{side}_rel_error"] <= math.sqrt(1 - energy) + 1e-5
        ref, _ = reference_lowrank(x, got, group_heads)              # Eckart-Young: optimal
        assert c.report[f"{side}_rel_error"] == pytest.approx(rel(x, ref), rel=1e-3, abs=1e-5)


def test_energy_rank_helper():
    s = np.array([3.0, 2.0, 1.0, 0.0])
    assert [energy_rank(s, e) for e in (0.1, 9 / 14, 0.65, 13 / 14, 0.99, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert energy_rank(np.zeros(5), 0.9) == 1


@pytest.mark.parametrize("rank", [1, 3, 8, D])
@pytest.mark.parametrize("group_heads", [1, 2])
def test_lowrank_reconstruction_is_the_svd_projection(rank, group_heads):
    k, v = decaying((B, H, S, D), 3), decaying((B, H, S, D), 4)
    comp = KVCacheCompressor("lowrank", rank=rank, group_heads=group_heads)
    c = comp.compress_kv(k, v)
    k2, v2 = comp.decompress_kv(c)
    for x, y in ((k, k2), (v, v2)):
        ref, _ = reference_lowrank(x, rank, group_heads)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=2e-4 * np.abs(x).max())
    assert c.report["k_rank"] == c.report["v_rank"] == rank
    assert c.k.arrays["latent"].shape == (H // group_heads, B * S, rank)


def test_full_rank_reconstructs_exactly_for_3d_and_float16():
    x = decaying((H, S, D), 5)
    comp = KVCacheCompressor("lowrank", rank=D)
    k2, v2 = comp.decompress_kv(comp.compress_kv(x, x * 2))
    assert k2.shape == (H, S, D) and k2.dtype == np.float32
    np.testing.assert_allclose(k2, x, atol=1e-5 * np.abs(x).max())
    np.testing.assert_allclose(v2, 2 * x, atol=2e-5 * np.abs(x).max())
    h = x.astype(np.float16)
    k3, _ = comp.decompress_kv(comp.compress_kv(h, h))
    assert k3.dtype == np.float16
    np.testing.assert_array_equal(k3, h)     # fp16 rounding hides the float32 round-off


def test_rank_above_the_token_count_still_reconstructs():
    x = decaying((1, H, 5, D), 6)           # 5 tokens, rank 12 > 5
    comp = KVCacheCompressor("lowrank", rank=12)
    k2, _ = comp.decompress_kv(comp.compress_kv(x, x))
    np.testing.assert_allclose(k2, x, atol=1e-5 * np.abs(x).max())


# ---------------------------------------------------------------------------------- vq


def test_kmeans_reaches_a_lloyd_fixed_point():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 300, 2)).astype(np.float32)
    cents, codes = kmeans(x, 8, seed=1, max_iter=200, tol=0)
    for p in range(3):
        d2 = ((x[p, :, None, :] - cents[p][None]) ** 2).sum(-1)
        np.testing.assert_array_equal(codes[p], d2.argmin(1))          # nearest centroid
        for j in range(8):
            members = x[p][codes[p] == j]
            assert len(members)                                        # k-means++ leaves none empty here
            np.testing.assert_allclose(cents[p, j], members.mean(0), atol=1e-5)
    again = kmeans(x, 8, seed=1, max_iter=200, tol=0)
    np.testing.assert_array_equal(again[0], cents)                     # deterministic
    with pytest.raises(km.ConfigError, match="1 <= k <= n"):
        kmeans(x, 301)


@pytest.mark.parametrize("subvector_dim", [1, 4, 16])
def test_vq_codes_are_nearest_centroids(subvector_dim):
    k, v = decaying((B, H, S, D), 8), decaying((B, H, S, D), 9)
    comp = KVCacheCompressor("vq", codebook_size=16, subvector_dim=subvector_dim)
    c = comp.compress_kv(k, v)
    k2, _ = comp.decompress_kv(c)
    books, codes = c.k.arrays["codebooks"], c.k.arrays["codes"]
    m = D // subvector_dim
    assert books.shape == (H, m, 16, subvector_dim) and codes.shape == (B, H, S, m) and codes.dtype == np.uint8
    sub = k.reshape(B, H, S, m, subvector_dim)
    for h in range(H):
        for j in range(m):
            d2 = ((sub[:, h, :, j, None, :] - books[h, j][None, None]) ** 2).sum(-1)   # [B, S, C]
            best = d2.min(-1)
            chosen = np.take_along_axis(d2, codes[:, h, :, j, None].astype(np.intp), -1)[..., 0]
            np.testing.assert_allclose(chosen, best, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(k2[:, h, :, j * subvector_dim:(j + 1) * subvector_dim],
                                          books[h, j][codes[:, h, :, j]])


def test_vq_error_falls_with_codebook_size_and_is_exact_when_every_token_is_a_centroid():
    k, v = decaying((1, H, 256, D), 10), decaying((1, H, 256, D), 11)
    errors = []
    for size in (2, 8, 32, 128):
        r = KVCacheCompressor("vq", codebook_size=size).compress_kv(k, v).report
        errors.append((r["k_rel_error"], r["v_rel_error"]))
        assert r["codebook_size"] == size
    for a, b in zip(errors, errors[1:]):
        assert b[0] < a[0] and b[1] < a[1]
    small = decaying((1, H, 20, D), 12)
    comp = KVCacheCompressor("vq", codebook_size=300)           # 20 tokens: 20 centroids
    c = comp.compress_kv(small, small)
    assert c.report["codebook_size"] == 20
    np.testing.assert_array_equal(comp.decompress_kv(c)[0], small)


def test_large_codebooks_use_uint16_codes():
    x = decaying((1, 2, 300, 4), 13)
    c = KVCacheCompressor("vq", codebook_size=290, subvector_dim=4, max_iter=2).compress_kv(x, x)
    assert c.k.arrays["codes"].dtype == np.uint16


# ---------------------------------------------------------------------------------- hybrid


@pytest.mark.parametrize("bits", [8, 4])
def test_hybrid_adds_only_the_latent_quantization_error(bits):
    k, v = decaying((B, H, S, D), 14), decaying((B, H, S, D), 15)
    lr = KVCacheCompressor("lowrank", rank=6).compress_kv(k, v).report
    hy_c = KVCacheCompressor("hybrid", rank=6, quant_bits=bits).compress_kv(k, v)
    hy = hy_c.report
    stored = 6
    latent = hy_c.k.arrays["codes"]
    assert latent.shape == (H, B * S, stored if bits == 8 else stored // 2)
    for side in "kv":
        # the latent's quantization error lies in the basis' span, the projection error
        # orthogonal to it: hybrid's error is never below lowrank's, at either bit width
        assert lr[f"{side}_rel_error"] * 0.999 <= hy[f"{side}_rel_error"]
        limit = 0.01 if bits == 8 else 0.12
        assert hy[f"{side}_rel_error"] <= math.hypot(lr[f"{side}_rel_error"], limit)
    per_token = 6 + 4 if bits == 8 else 6 // 2 + 4 + 4        # codes + scale (+ zero: one int4 group a row)
    assert hy["bytes_out"] - hy["bytes_shared"] == 2 * H * B * S * per_token
    # the latent is what kvmmap.quantize makes of it: decode = mean + dequantize(codes) @ basis.T
    a = hy_c.k.arrays
    q = km.QTensor(a["codes"], a["scales"], a.get("zeros"), f"int{bits}", (H, B * S, stored), "token",
                   hy_c.k.params["group_size"])
    ref = km.dequantize(q).astype(np.float64) @ a["basis"].transpose(0, 2, 1) + a["mean"][:, None]
    ref = ref.reshape(H, B, S, D).transpose(1, 0, 2, 3)
    np.testing.assert_allclose(KVCacheCompressor("hybrid").decompress_kv(hy_c)[0], ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------- report, storage


@pytest.mark.parametrize("method", ["lowrank", "vq", "hybrid"])
def test_report_and_npz_round_trip(tmp_path, method):
    k, v = decaying((B, H, S, D), 16), decaying((B, H, S, D), 17)
    comp = KVCacheCompressor(method, **({"codebook_size": 8} if method == "vq" else {}))
    c = comp.compress_kv(k, v)
    k2, v2 = comp.decompress_kv(c)
    r = c.report
    arrays = sum(a.nbytes for t in (c.k, c.v) for a in t.arrays.values())
    assert r["bytes_out"] == c.nbytes == arrays
    assert r["bytes_in"] == k.nbytes + v.nbytes
    assert r["ratio"] == pytest.approx(r["bytes_in"] / arrays)
    assert r["ratio_shared"] == pytest.approx(r["bytes_in"] / (arrays - r["bytes_shared"]))
    assert r["k_rel_error"] == pytest.approx(rel(k, k2), rel=1e-5)
    assert r["v_rel_error"] == pytest.approx(rel(v, v2), rel=1e-5)
    assert r["k_max_abs_error"] == pytest.approx(float(np.abs(k - k2).max()), rel=1e-5)
    path = tmp_path / "c.kvz"                   # saved under exactly this name
    c.save(path)
    back = CompressedKV.load(path)
    assert back.report == c.report
    for x, y in zip(km.compress.decompress_kv(back), (k2, v2)):
        np.testing.assert_array_equal(x, y)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(km.CacheFileError):
        CompressedKV.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(km.CacheFileError, match="not a compressed K/V file"):
        CompressedKV.load(tmp_path / "other.npz")


def test_load_of_a_missing_or_damaged_file_raises_cache_file_error_naming_it(tmp_path):
    k, v = decaying((1, H, S, D), 18), decaying((1, H, S, D), 19)
    good = tmp_path / "c.kvz"
    KVCacheCompressor("lowrank", rank=4).compress_kv(k, v).save(good)
    raw = good.read_bytes()
    np.save(tmp_path / "one.npy", np.zeros(3))
    np.savez(tmp_path / "listhead.npz", __header__=np.frombuffer(b"[1, 2]", np.uint8))
    bad = [tmp_path / "missing.kvz", tmp_path, tmp_path / "one.npy", tmp_path / "listhead.npz"]
    for i, n in enumerate((0, 10, 100, len(raw) // 2, len(raw) - 30)):
        cut = tmp_path / f"cut{i}.kvz"
        cut.write_bytes(raw[:n])
        bad.append(cut)
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF          # inside the arrays: the zip's CRC fails
    (tmp_path / "flip.kvz").write_bytes(bytes(flipped))
    bad.append(tmp_path / "flip.kvz")
    for path in bad:
        with pytest.raises(km.CacheFileError, match=str(path)) as info:
            CompressedKV.load(path)
        assert isinstance(info.value, OSError)
    assert CompressedKV.load(good).report["method"] == "lowrank"


def test_fit_once_and_reuse_on_other_data():
    k, v = decaying((1, H, 230, D), 18), decaying((1, H, 230, D), 19)
    calib_k, calib_v, other_k, other_v = k[:, :, :200], v[:, :, :200], k[:, :, 200:], v[:, :, 200:]
    comp = KVCacheCompressor("lowrank", energy=0.95).fit(calib_k, calib_v)
    c = comp.compress_kv(other_k, other_v)
    np.testing.assert_array_equal(c.k.arrays["basis"], comp.compress_kv(calib_k, calib_v).k.arrays["basis"])
    assert c.report["k_rel_error"] < 2 * math.sqrt(1 - 0.95)       # held-out tokens: near the energy bound
    assert repr(comp).endswith("fitted)")
    with pytest.raises(km.ShapeError, match="fitted on 4 heads"):
        comp.compress_kv(other_k[:, :2], other_v[:, :2])


def test_bad_input_is_refused():
    x = decaying((B, H, S, D), 20)
    comp = KVCacheCompressor("lowrank")
    with pytest.raises(km.ShapeError, match="batch, heads, seq, head_dim"):
        comp.compress_kv(x[0, 0], x[0, 0])
    with pytest.raises(km.ShapeError, match="at least one element"):
        comp.compress_kv(x[:, :, :0], x[:, :, :0])
    with pytest.raises(km.ShapeError, match="share batch, heads and seq"):
        comp.compress_kv(x, x[:, :, :5])
    with pytest.raises(km.DTypeError, match="float16, float32 or float64"):
        comp.compress_kv(x.astype(np.int32), x)
    for bad in (np.nan, np.inf):
        y = x.copy()
        y[1, 2, 3, 4] = bad
        with pytest.raises(km.NonFiniteError, match="NaN or infinity"):
            comp.compress_kv(x, y)
    with pytest.raises(km.NonFiniteError, match="beyond float32"):
        comp.compress_kv(np.full((H, 2, D), 1e300), np.zeros((H, 2, D)))
    with pytest.raises(km.ConfigError, match="rank=17 exceeds the 16 dimensions"):
        KVCacheCompressor("lowrank", rank=17).compress_kv(x, x)
    with pytest.raises(km.ConfigError, match="group_heads=3 must divide"):
        KVCacheCompressor("lowrank", group_heads=3).compress_kv(x, x)
    with pytest.raises(km.ConfigError, match="subvector_dim=3 must divide"):
        KVCacheCompressor("vq", subvector_dim=3).compress_kv(x, x)
    for kwargs, match in (({"method": "svd"}, "method must be one of"), ({"method": ["vq"]}, "method must be one of"),
                          ({"rank": 0}, "rank must be"),
                          ({"method": "hybrid", "quant_bits": 2}, "quant_bits must be 8 or 4"),
                          ({"method": "hybrid", "quant_bits": True}, "quant_bits must be 8 or 4"),
                          ({"energy": 1.5}, "energy must be"), ({"method": "vq", "codebook_size": 1}, "at least 2"),
                          ({"rank": True}, "rank must be"), ({"method": "vq", "max_iter": 0}, "max_iter must be"),
                          ({"seed": -1}, "seed must be")):
        with pytest.raises(km.ConfigError, match=match):
            KVCacheCompressor(**kwargs)
    with pytest.raises(km.DTypeError, match="expects a CompressedKV"):
        comp.decompress_kv((x, x))


# ---------------------------------------------------------------------------------- codecs: parameters, configs

# a valid value of every parameter, and the methods that take it
PARAMETERS = {"rank": 3, "energy": 0.9, "group_heads": 2, "quant_bits": 4, "codebook_size": 8, "subvector_dim": 2,
              "max_iter": 3, "seed": 5}
TAKES = {"lowrank": {"rank", "energy", "group_heads", "seed"},
         "hybrid": {"rank", "energy", "group_heads", "quant_bits", "seed"},
         "vq": {"codebook_size", "subvector_dim", "max_iter", "seed"}}


def test_codecs_list_the_parameters_they_take():
    assert {m: set(c.PARAMETERS) for m, c in CODECS.items()} == TAKES
    assert (CODECS["lowrank"], CODECS["vq"], CODECS["hybrid"]) == (LowRankCodec, VQCodec, HybridCodec)


@pytest.mark.parametrize("method", sorted(TAKES))
@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_parameters_of_another_method_are_refused(method, name):
    """Given to a method that does not use it, a parameter raises ConfigError naming it,
    through the facade, the codec class and from_config alike (it used to be ignored)."""
    kwargs = {name: PARAMETERS[name]}
    if name in TAKES[method]:
        assert KVCacheCompressor(method, **kwargs).get_config()[name] == PARAMETERS[name]
        return
    match = f"{method} takes no parameter '{name}'"
    with pytest.raises(km.ConfigError, match=match):
        KVCacheCompressor(method, **kwargs)
    with pytest.raises(km.ConfigError, match=match):
        CODECS[method](**kwargs)
    with pytest.raises(km.ConfigError, match=match):
        KVCacheCompressor.from_config({"method": method, **kwargs})


@pytest.mark.parametrize("method", sorted(TAKES))
def test_get_config_from_config_round_trip(method):
    given = {n: PARAMETERS[n] for n in TAKES[method]}
    for kwargs in ({}, given):
        comp = KVCacheCompressor(method, **kwargs)
        config = comp.get_config()
        assert set(config) == TAKES[method] | {"method"} and config["method"] == method
        assert all(config[n] == v for n, v in kwargs.items())
        assert json.loads(json.dumps(config)) == config                  # JSON-encodable as it is
        again = KVCacheCompressor.from_config(config)
        assert again.get_config() == config and repr(again) == repr(comp)
        codec = CODECS[method].from_config(config)
        assert codec.get_config() == config
        assert CODECS[method].from_config({n: v for n, v in config.items() if n != "method"}).get_config() == config
        assert KVCacheCompressor(codec).get_config() == config            # a codec wrapped as it is
    k, v = decaying((1, 4, 24, 8), 21), decaying((1, 4, 24, 8), 22)
    a = KVCacheCompressor(method, **given).compress_kv(k, v)
    b = KVCacheCompressor.from_config(KVCacheCompressor(method, **given).get_config()).compress_kv(k, v)
    assert a.report == b.report
    for x, y in ((a.k, b.k), (a.v, b.v)):
        assert x.params == y.params and all(np.array_equal(x.arrays[n], y.arrays[n]) for n in x.arrays)


def test_bad_configs_are_refused():
    with pytest.raises(km.ConfigError, match="config must be a dict"):
        KVCacheCompressor.from_config([("method", "vq")])
    with pytest.raises(km.ConfigError, match="method must be one of"):
        KVCacheCompressor.from_config({"rank": 3})
    with pytest.raises(km.ConfigError, match="VQCodec reads 'vq' configs, found method 'lowrank'"):
        VQCodec.from_config({"method": "lowrank"})
    with pytest.raises(km.ConfigError, match="rank must be"):
        KVCacheCompressor.from_config({"method": "hybrid", "rank": -1})
    with pytest.raises(km.ConfigError, match="either a codec or parameters"):
        KVCacheCompressor(VQCodec(), codebook_size=4)


def test_decoding_refuses_a_tensor_of_another_or_unknown_method():
    x = decaying((1, H, 8, D), 23)
    c = KVCacheCompressor("vq", codebook_size=4).compress_kv(x, x)
    with pytest.raises(km.FormatError, match="LowRankCodec decodes 'lowrank' tensors, found 'vq'"):
        LowRankCodec.decode(c.k)
    c.k.method = "svd"
    with pytest.raises(km.FormatError, match="unknown method 'svd'"):
        km.decompress_kv(c)


# ---------------------------------------------------------------------------------- golden containers


GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("case", sorted(make_compressed.CASES))
def test_version_1_containers_still_load_and_decompress(case):
    """Files written by compress.py before it became a package (tests/golden/make_compressed.py)
    load, decompress to the values they gave then, and compressing the same input with the
    same settings gives the same result again."""
    kwargs, shape, dtype = make_compressed.CASES[case]
    expected = np.load(GOLDEN / make_compressed.EXPECTED)
    k, v = expected[f"{case}.k"], expected[f"{case}.v"]
    assert k.shape == shape and k.dtype == dtype
    old = CompressedKV.load(GOLDEN / f"compressed_v1_{case}.kvz")
    assert (old.ndim, old.dtype, old.report["method"]) == (len(shape), dtype, kwargs["method"])
    k_out, v_out = km.decompress_kv(old)
    tol = {"float16": 1e-3, "float32": 1e-6}[dtype]
    for got, want in ((k_out, expected[f"{case}.k_out"]), (v_out, expected[f"{case}.v_out"])):
        assert got.dtype == want.dtype and got.shape == shape
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()))
    new = KVCacheCompressor(**kwargs).compress_kv(k, v)
    assert new.report.keys() == old.report.keys()
    for side in ("k", "v"):
        a, b = getattr(old, side), getattr(new, side)
        assert (a.method, tuple(a.shape), a.params) == (b.method, tuple(b.shape), b.params)
        assert {n: (x.dtype, x.shape) for n, x in a.arrays.items()} == {n: (x.dtype, x.shape) for n, x in b.arrays.items()}
    # eigenvector signs may differ between LAPACK builds: compare what decompresses, not the basis
    for got, want, err in zip(km.decompress_kv(new), (k_out, v_out), ("k_max_abs_error", "v_max_abs_error")):
        np.testing.assert_allclose(got, want, rtol=0, atol=2 * old.report[err] + tol * float(np.abs(want).max()))
        assert new.report[err] == pytest.approx(old.report[err], rel=0.05, abs=1e-6)


# ---------------------------------------------------------------------------------- cache files

L, P = 2, 8


def make_cache(path, kf="fp32", vf="fp32", seed=0):
    rng = np.random.default_rng(seed)
    c = km.PagedKVCache.create(path, num_layers=L, num_kv_heads=H, head_dim=D, page_size=P,
                               k_format=kf, v_format=vf, fingerprint="model-x")
    a = c.new_sequence("prompt")
    for layer in range(L):
        x = np.stack([decaying((H, 37, D), seed + layer)[h] for h in range(H)], axis=1)   # [37, H, D]
        c.append(a, layer, x, rng.standard_normal((37, H, D)).astype(np.float32))
    b = c.fork(a, "fork")                          # shares 4 pages per layer
    for layer in range(L):
        c.append(b, layer, *(rng.standard_normal((2, 9, H, D)).astype(np.float32)))
    c.new_sequence()                               # empty and unnamed
    c.flush()
    c.close()
    return path


def test_compress_cache_changes_formats_and_keeps_names_and_forks(tmp_path):
    src = make_cache(tmp_path / "src.kvm")
    r = compress_cache(src, tmp_path / "dst.kvm", k_format="int8", v_format="int4")
    with km.PagedKVCache.open(src, "r") as s, km.PagedKVCache.open(tmp_path / "dst.kvm", "r") as d:
        assert (d.k_format, d.v_format, d.page_size, d.fingerprint) == ("int8", "int4", P, b"model-x")
        assert d.sequences() == s.sequences() == {0: "prompt", 1: "fork", 2: None}
        np.testing.assert_array_equal(d.block_table(1)[:4], d.block_table(0)[:4])   # the fork still shares
        ref = km.PagedKVCache.create(None, num_layers=L, num_kv_heads=H, head_dim=D, page_size=P,
                                     k_format="int8", v_format="int4")
        err = np.zeros((2, 2))
        for sid in (0, 1, 2):
            rs = ref.new_sequence()
            for layer in range(L):
                sk, sv = s.read(sid, layer)
                ref.append(rs, layer, sk, sv)
                dk, dv = d.read(sid, layer)
                np.testing.assert_array_equal(dk, ref.read(rs, layer)[0])
                if sid != 1:                  # the fork's shared pages were encoded once, for 'prompt'
                    np.testing.assert_array_equal(dv, ref.read(rs, layer)[1])
                for i, (x, y) in enumerate(((sk, dk), (sv, dv))):
                    err[i] += (np.square(x - y, dtype=np.float64).sum(), np.square(x, dtype=np.float64).sum())
    assert r["k_rel_error"] == pytest.approx(math.sqrt(err[0, 0] / err[0, 1]), rel=1e-6)
    assert r["v_rel_error"] == pytest.approx(math.sqrt(err[1, 0] / err[1, 1]), rel=1e-6)
    assert r["shared_pages"] == 4 * L and r["sequences"] == 3 and r["tokens"] == L * (37 + 46)
    assert r["k_format_before"] == "fp32" and r["v_format"] == "int4"


def test_compress_cache_through_a_compressor(tmp_path):
    src = make_cache(tmp_path / "src.kvm")
    comp = KVCacheCompressor("lowrank", rank=4)
    r = compress_cache(src, tmp_path / "dst.kvm", compressor=comp)
    with km.PagedKVCache.open(src, "r") as s, km.PagedKVCache.open(tmp_path / "dst.kvm", "r") as d:
        for layer in range(L):
            sk, sv = s.read(0, layer)
            want = comp.decompress_kv(comp.compress_kv(sk.transpose(1, 0, 2), sv.transpose(1, 0, 2)))
            dk, dv = d.read(0, layer)
            np.testing.assert_array_equal(dk, want[0].transpose(1, 0, 2))     # fp32 file: stored as is
            np.testing.assert_array_equal(dv, want[1].transpose(1, 0, 2))
    assert r["method"] == "lowrank" and r["method_ratio"] > 1
    assert 0 < r["k_rel_error"] < 0.5 and 0.3 < r["v_rel_error"] < 1      # V is white noise: rank 4 of 16 loses most


def test_compress_cache_refuses_damage_and_clobbering(tmp_path):
    src = make_cache(tmp_path / "src.kvm")
    with pytest.raises(km.CacheFileError, match="is the input file"):
        compress_cache(src, src, overwrite=True)
    (tmp_path / "exists.kvm").write_bytes(b"x")
    with pytest.raises(km.CacheFileError, match="exists; pass overwrite"):
        compress_cache(src, tmp_path / "exists.kvm")
    with km.PagedKVCache.open(src, "r") as c:
        page = int(c.block_table(0, 1)[2])
        off = c._sb.arena_offset + page * c._sb.page_bytes + 11
    with open(src, "r+b") as f:
        f.seek(off)
        byte = f.read(1)
        f.seek(off)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(km.CacheFileError, match=f"damaged page.*{page}"):
        compress_cache(src, tmp_path / "out.kvm")
    assert not (tmp_path / "out.kvm").exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_compress_overwrite_refuses_an_output_held_by_a_writer(tmp_path):
    """Like create(overwrite=True): replacing a file that a writer has open would lose its
    later commits (they would go to a file no longer at that name)."""
    src = make_cache(tmp_path / "src.kvm")
    dst = make_cache(tmp_path / "dst.kvm", kf="fp16", vf="fp16", seed=5)
    before = dst.read_bytes()
    with km.PagedKVCache.open(dst, "r+"):              # a separate open file: its flock conflicts
        with pytest.raises(km.CacheFileError, match="dst.kvm is open for writing .*writer lock"):
            compress_cache(src, dst, k_format="int8", overwrite=True)
    assert dst.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.kvm", "src.kvm"]
    compress_cache(src, dst, k_format="int8", overwrite=True)         # the writer is gone
    with km.PagedKVCache.open(dst, "r") as d:
        assert d.k_format == "int8"
