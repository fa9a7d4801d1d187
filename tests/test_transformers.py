"""KVMmapCache inside transformers' generate(), against DynamicCache on a tiny random Llama."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig  # noqa: E402

import kvmmap as km  # noqa: E402
from helpers import LLAMA_CONFIG, prompts  # noqa: E402
from kvmmap.integrations.transformers import KVMmapCache, config_fingerprint  # noqa: E402

CONFIG = LLAMA_CONFIG
MODEL_CODE = f"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(**{CONFIG!r})
model = LlamaForCausalLM(cfg).eval()
"""
# |logits - DynamicCache's logits| <= TOL[format] * std(DynamicCache's logits), teacher-forced
# over 60 tokens. Measured on this model: fp16 3e-4, bf16 3.4e-3, int8 6.6e-3, fp8_e4m3 0.033,
# int4 0.12 (keys per channel over 16-token pages, values per token in groups of 16).
TOL = {"fp16": 2e-3, "bf16": 2e-2, "int8": 3e-2, "fp8_e4m3": 0.1, "int4": 0.4}


@pytest.fixture(scope="module")
def model():
    scope = {}
    exec(MODEL_CODE, scope)
    return scope["model"]


@pytest.fixture(scope="module")
def cfg(model):
    return model.config


def generate(model, ids, mask, cache, **kw):
    kw = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True) | kw
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, cache=cache, **kw)


def stored_equals_view(cache):
    """The dequantized copy must be exactly what the file returns."""
    for layer_idx, layer in enumerate(cache.layers):
        for b, seq in enumerate(cache.rows):
            k, v = cache.store.read(seq, layer_idx)
            np.testing.assert_array_equal(layer.keys[b].permute(1, 0, 2).numpy(), k)
            np.testing.assert_array_equal(layer.values[b].permute(1, 0, 2).numpy(), v)


@pytest.mark.parametrize("batch, pad", [(1, 0), (2, 5)])
@pytest.mark.parametrize("keep", [True, False])
def test_fp32_generates_the_tokens_of_dynamic_cache(model, cfg, batch, pad, keep):
    ids, mask = prompts(batch, 21, pad=pad)
    ref = generate(model, ids, mask, DynamicCache(config=cfg))
    cache = KVMmapCache(None, config=cfg, k_format="fp32", v_format="fp32", page_size=8, keep_dequantized=keep)
    out = generate(model, ids, mask, cache)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert len(cache.rows) == batch
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    assert all(cache.store.seq_len(s) == cache.get_seq_length() for s in cache.rows)
    if keep:
        stored_equals_view(cache)


def teacher_forced_logits(model, cache, tokens, prompt_len):
    """Logits of a prefill of ``tokens[:, :prompt_len]`` then one token at a time."""
    out = []
    with torch.no_grad():
        out.append(model(tokens[:, :prompt_len], cache=cache).logits[:, -1])
        for t in range(prompt_len, tokens.shape[1]):
            out.append(model(tokens[:, t:t + 1], cache=cache).logits[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "int8", "fp8_e4m3", "int4"])
def test_quantized_logits_stay_close(model, cfg, fmt):
    ids, _ = prompts(2, 40, seed=2)
    tokens = torch.cat([ids, prompts(2, 20, seed=3)[0]], 1)      # 60 tokens: crosses pages
    ref = teacher_forced_logits(model, DynamicCache(config=cfg), tokens, 40)
    cache = KVMmapCache(None, config=cfg, k_format=fmt, v_format=fmt, page_size=16)
    got = teacher_forced_logits(model, cache, tokens, 40)
    err = (got - ref).abs().max().item()
    assert err <= TOL[fmt] * ref.std().item(), (fmt, err, ref.std().item())
    assert err > 0                           # it did store in the format
    if fmt in ("fp16", "bf16", "int8"):      # the greedy token is the same at every step
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    stored_equals_view(cache)
    s = cache.stats()
    assert s["tokens"] == 2 * cfg.num_hidden_layers * 60                # rows x layers x tokens
    pages = 2 * cfg.num_hidden_layers * -(-60 // 16)                  # 3 full pages and a partly filled one
    if fmt == "int4":                   # + residual pages of the partly filled page's float16 keys
        assert s["pages_used"] > pages
    else:
        assert s["pages_used"] == pages


CHILD = MODEL_CODE + textwrap.dedent("""
    import json, sys
    from kvmmap.integrations.transformers import KVMmapCache
    step, path, prompt = sys.argv[1], sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
    seen = []        # the input length of every forward: what was computed
    model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    kw = dict(do_sample=False, max_new_tokens=6)
    if step == "write":
        cache = KVMmapCache(path, config=cfg, k_format="int8", v_format="int8", page_size=8)
        with torch.no_grad():
            out = model.generate(prompt, cache=cache, **kw)     # rows: prompt + 5
        stored = KVMmapCache(path + ".prompt", config=cfg, k_format="int8", v_format="int8", page_size=8)
        with torch.no_grad():
            model(prompt, cache=stored)
        stored.store_prefix(prompt)
        stored.flush()
        cache.flush()
        print(json.dumps({"out": out.tolist()}))
    else:
        cache = KVMmapCache.open(path, config=cfg)
        before = cache.get_seq_length()
        with torch.no_grad():
            out = model.generate(torch.tensor(json.loads(sys.argv[4])), cache=cache, **kw)
        seen_rows = list(seen)
        seen.clear()
        stored = KVMmapCache.open(path + ".prompt", config=cfg)
        reused = stored.reuse_prefix(prompt)
        with torch.no_grad():
            out2 = model.generate(prompt, cache=stored, do_sample=False, max_new_tokens=12)
        print(json.dumps({"out": out.tolist(), "before": before, "seen_rows": seen_rows,
                          "reused": reused, "out2": out2.tolist(), "seen_prompt": seen}))
""")


def run_child(*args):
    # cwd: away from the source tree, so the installed kvmmap is imported
    r = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONHASHSEED": "random"}, timeout=300, cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_persisted_prompt_continues_in_another_process(model, cfg, tmp_path):
    prompt, _ = prompts(1, 19, seed=4)
    ref = generate(model, prompt, None, KVMmapCache(None, config=cfg, k_format="int8", v_format="int8",
                                                    page_size=8))
    path = tmp_path / "run.kvm"
    wrote = run_child("write", path, json.dumps(prompt.tolist()))
    assert wrote["out"] == ref.sequences[:, :25].tolist()
    got = run_child("continue", path, json.dumps(prompt.tolist()), json.dumps(wrote["out"]))
    # the reopened rows: nothing recomputed but the last generated token, then 6 more steps
    assert got["before"] == 24 and got["seen_rows"] == [1] * 6
    assert got["out"] == ref.sequences.tolist()[:1] and len(got["out"][0]) == 31
    # the stored prompt, found by its token ids: only its last token is computed again
    assert got["reused"] == 18 and got["seen_prompt"] == [1] * 12
    assert got["out2"] == ref.sequences.tolist()


def test_crop_then_continue_matches_dynamic_cache(model, cfg):
    ids, mask = prompts(2, 13, seed=5, pad=3)
    results = []
    for cache in (DynamicCache(config=cfg), KVMmapCache(None, config=cfg, k_format="fp32", v_format="fp32",
                                                          page_size=4)):
        out = generate(model, ids, mask, cache, max_new_tokens=9).sequences     # cache: 21 tokens
        cache.crop(-7)
        assert cache.get_seq_length() == 14
        if isinstance(cache, KVMmapCache):
            assert [cache.store.seq_len(s) for s in cache.rows] == [14, 14]
            stored_equals_view(cache)
        prefix = out[:, :16]
        mask2 = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1)
        results.append(generate(model, prefix, mask2, cache, max_new_tokens=5).sequences)
    assert torch.equal(results[0], results[1])


def test_beam_search_matches_dynamic_cache_and_shares_pages(model, cfg):
    ids, mask = prompts(1, 17, seed=6)
    ref = generate(model, ids, mask, DynamicCache(config=cfg), num_beams=3, output_logits=False)
    cache = KVMmapCache(None, config=cfg, k_format="fp32", v_format="fp32", page_size=4)
    out = generate(model, ids, mask, cache, num_beams=3, output_logits=False)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(cache.rows) == 3 and len(cache.store.sequences()) == 3      # no leaked forks
    stored_equals_view(cache)
    # the beams share the prompt's pages: fewer pages than three separate copies
    pages = cache.store.stats()["pages_used"]
    assert pages < 3 * cfg.num_hidden_layers * (cache.get_seq_length() // 4)


def test_batch_select_and_repeat(cfg):
    cache = KVMmapCache(None, config=cfg, k_format="int8", v_format="int8", page_size=4)
    k = torch.randn(2, 2, 10, 16)
    for layer in range(2):
        cache.update(k + layer, -k, layer)
    cache.batch_repeat_interleave(2)
    assert len(cache.rows) == 4
    got = [cache.store.read(s, 1)[0] for s in cache.rows]
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_array_equal(got[2], got[3])
    cache.batch_select_indices(torch.tensor([3, 0]))
    assert [cache.store.read(s, 1)[0].tolist() for s in cache.rows] == [got[3].tolist(), got[0].tolist()]
    stored_equals_view(cache)


def test_prefix_reuse_with_a_batch(model, cfg, tmp_path):
    system, _ = prompts(1, 11, seed=7)
    tails = prompts(2, 4, seed=8)[0]
    full = torch.cat([system.expand(2, -1), tails], 1)                 # two prompts, one system prefix
    path = tmp_path / "prefix.kvm"
    with KVMmapCache(path, config=cfg, k_format="fp32", v_format="fp32", page_size=4) as c:
        with torch.no_grad():
            model(system, cache=c)
        c.store_prefix(system)
        c.flush()
    ref = generate(model, full, None, DynamicCache(config=cfg))
    with KVMmapCache.open(path, config=cfg) as c:
        used = c.store.stats()["pages_used"]
        assert c.reuse_prefix(full) == 11
        assert c.store.stats()["pages_used"] == used                   # forked, not copied
        out = generate(model, full, None, c)
        assert torch.equal(out.sequences, ref.sequences)
        assert c.reuse_prefix(prompts(2, 9, seed=9)[0]) == 0 and c.rows == []   # no match


def test_bad_input_raises_kvmmap_errors(model, cfg, tmp_path):
    other = LlamaConfig(**(CONFIG | {"num_hidden_layers": 3}))
    path = tmp_path / "c.kvm"
    c = KVMmapCache(path, config=cfg, k_format="int8", v_format="int8")
    ids, _ = prompts(2, 5)
    with torch.no_grad():
        model(ids, cache=c)
    c.flush()
    c.close()
    with pytest.raises(km.ConfigError, match="holds a cache for"):
        KVMmapCache.open(path, config=other)
    renamed = LlamaConfig(**(CONFIG | {"vocab_size": 256}))
    with pytest.raises(km.ConfigError, match="made for another model"):
        KVMmapCache.open(path, config=renamed)
    assert config_fingerprint(cfg) != config_fingerprint(renamed)
    with pytest.raises(km.ConfigError, match="full-attention and sliding-window layers only"):
        KVMmapCache(None, config=LlamaConfig(**CONFIG, layer_types=["chunked_attention"] * 2))
    with pytest.raises(km.CacheFileError):
        KVMmapCache.open(tmp_path / "missing.kvm")

    c = KVMmapCache.open(path, config=cfg)
    with pytest.raises(km.ShapeError, match="holds 2 rows"), torch.no_grad():
        model(ids[:1], cache=c)
    with pytest.raises(km.ShapeError, match="num_kv_heads and head_dim"):
        c.update(torch.zeros(2, 4, 1, 16), torch.zeros(2, 4, 1, 16), 0)
    with pytest.raises(km.ShapeError, match="negative"):
        c.crop(3)
    bad = torch.zeros(2, 2, 1, 16)
    bad[1, 0, 0, 3] = float("nan")
    with pytest.raises(km.NonFiniteError):
        c.update(bad, bad, 0)
    assert [c.store.seq_len(s, 0) for s in c.rows] == [5, 5]           # refused: nothing changed
    with pytest.raises(km.ShapeError, match="input_ids has 1 rows"):
        c.store_prefix(ids[:1])
    with pytest.raises(NotImplementedError, match="not one of its layers"):
        c.layers[0].crop(-1)
    c.close()

    fresh = KVMmapCache(None, config=cfg, k_format="fp16", v_format="fp16")
    with pytest.raises(km.NonFiniteError):
        fresh.update(torch.full((1, 2, 1, 16), 1e6), torch.zeros(1, 2, 1, 16), 0)   # beyond fp16
    assert fresh.rows == [] and fresh.store.sequences() == {}
