"""attn_implementation="kvmmap": the model attends over a KVMmapCache's pages in place.

Compared on tiny random models with the float-copy KVMmapCache path (same stored values)
and, with fp32 storage, with DynamicCache; left padding, beams, crop, prefix reuse, a
reopened file in another process, sliding windows, and a context beyond a memory limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from helpers import LLAMA_CONFIG, WORKERS, prompts  # noqa: E402
from kvmmap.integrations.transformers import KVMmapCache, kvmmap_attention_forward  # noqa: E402

CONFIG = LLAMA_CONFIG
RTOL = 1e-4         # max |a - b| / max |b| of the logits of every step


def make_model(attn, cls=LlamaForCausalLM, config_cls=LlamaConfig, **extra):
    torch.manual_seed(0)
    return cls(config_cls(**CONFIG, **extra, attn_implementation=attn)).eval()


@pytest.fixture(scope="module")
def sdpa():
    return make_model("sdpa")


@pytest.fixture(scope="module")
def paged():
    return make_model("kvmmap")


def kvmmap(model, fmt, **kw):
    return KVMmapCache(None, config=model.config, k_format=fmt, v_format=fmt, **({"page_size": 8} | kw))


def generate(model, ids, mask, cache, **kw):
    kw = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_logits=True) | kw
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, cache=cache, **kw)


def teacher_forced(model, cache, tokens, mask, chunks):
    """Logits of every position after the first chunk: prefill ``chunks`` then one token at a time."""
    out, pos = [], 0
    with torch.no_grad():
        for stop in [*chunks, *range(chunks[-1] + 1, tokens.shape[1] + 1)]:
            logits = model(tokens[:, pos:stop], attention_mask=mask[:, :stop], cache=cache).logits
            out.append(logits[:, -1])
            pos = stop
    return torch.stack(out, 1)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_close_logits(got, want):
    got = torch.stack(list(got), 1) if isinstance(got, tuple) else got
    want = torch.stack(list(want), 1) if isinstance(want, tuple) else want
    assert got.shape == want.shape
    assert rel_err(got, want) <= RTOL, rel_err(got, want)


def test_registered_and_selectable(tmp_path, sdpa):
    assert ALL_ATTENTION_FUNCTIONS["kvmmap"] is kvmmap_attention_forward
    sdpa.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="kvmmap")
    assert loaded.config._attn_implementation == "kvmmap"
    other = make_model("sdpa")
    other.set_attn_implementation("kvmmap")
    assert other.config._attn_implementation == "kvmmap"


@pytest.mark.parametrize("batch, pad", [(1, 0), (2, 5)])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_logits_equal_the_float_copy_path(sdpa, paged, fmt, batch, pad):
    ids, mask = prompts(batch, 40, seed=2, pad=pad)
    tokens = torch.cat([ids, prompts(batch, 20, seed=3)[0]], 1)
    mask = torch.cat([mask, torch.ones(batch, 20, dtype=mask.dtype)], 1)
    copy = kvmmap(sdpa, fmt, page_size=16, keep_dequantized=True)
    want = teacher_forced(sdpa, copy, tokens, mask, [17, 40])         # two prefill chunks, then steps
    cache = kvmmap(paged, fmt, page_size=16)
    got = teacher_forced(paged, cache, tokens, mask, [17, 40])
    assert_close_logits(got, want)
    assert copy.stats()["bytes_dequantized"] > 0
    assert cache.stats()["bytes_dequantized"] == 0 and all(layer.keys is None for layer in cache.layers)
    assert cache.pads == [0, pad][:batch]
    assert [cache.store.seq_len(s) for s in cache.rows] == [60 - p for p in cache.pads]


@pytest.mark.parametrize("batch, pad", [(1, 0), (2, 5)])
def test_fp32_logits_equal_dynamic_cache(sdpa, paged, batch, pad):
    ids, mask = prompts(batch, 40, seed=4, pad=pad)
    tokens = torch.cat([ids, prompts(batch, 12, seed=5)[0]], 1)
    mask = torch.cat([mask, torch.ones(batch, 12, dtype=mask.dtype)], 1)
    want = teacher_forced(sdpa, DynamicCache(config=sdpa.config), tokens, mask, [9, 40])
    got = teacher_forced(paged, kvmmap(paged, "fp32"), tokens, mask, [9, 40])
    assert_close_logits(got, want)


@pytest.mark.parametrize("pad, chunk", [(5, None), (29, 8)])
def test_generate_with_left_padding_matches_dynamic_cache(sdpa, paged, pad, chunk):
    """Padding longer than a prefill chunk: a row sees nothing in its first chunks."""
    ids, mask = prompts(2, 35, seed=6, pad=pad)
    kw = {} if chunk is None else {"prefill_chunk_size": chunk}
    ref = generate(sdpa, ids, mask, DynamicCache(config=sdpa.config), **kw)
    cache = kvmmap(paged, "fp32")
    out = generate(paged, ids, mask, cache, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert_close_logits(out.logits, ref.logits)
    n = out.sequences.shape[1] - 1
    assert cache.pads == [0, pad] and cache.get_seq_length() == n
    assert [cache.store.seq_len(s) for s in cache.rows] == [n, n - pad]
    assert cache.store.sequences() == {cache.rows[0]: "kvmmap.row/0", cache.rows[1]: f"kvmmap.row/1/pad={pad}"}


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_beam_search(sdpa, paged, fmt):
    ids, mask = prompts(2, 17, seed=7, pad=3)
    ref_cache = DynamicCache(config=sdpa.config) if fmt == "fp32" else kvmmap(sdpa, fmt, keep_dequantized=True)
    ref = generate(sdpa, ids, mask, ref_cache, num_beams=3, output_logits=False)
    cache = kvmmap(paged, fmt)
    out = generate(paged, ids, mask, cache, num_beams=3, output_logits=False)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(cache.rows) == 6 and len(cache.store.sequences()) == 6          # no leaked forks
    assert cache.pads == [0, 0, 0, 3, 3, 3]


def test_crop_then_continue(sdpa, paged):
    ids, mask = prompts(2, 13, seed=8, pad=3)
    results = []
    for model, cache in ((sdpa, DynamicCache(config=sdpa.config)), (paged, kvmmap(paged, "fp32", page_size=4))):
        out = generate(model, ids, mask, cache, max_new_tokens=9).sequences        # cache: 21 tokens
        cache.crop(-7)
        assert cache.get_seq_length() == 14
        mask2 = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1)
        results.append(generate(model, out[:, :16], mask2, cache, max_new_tokens=5))
    assert [cache.store.seq_len(s) for s in cache.rows] == [20, 17]
    assert torch.equal(results[0].sequences, results[1].sequences)
    assert_close_logits(results[1].logits, results[0].logits)


def test_prefix_reuse(sdpa, paged, tmp_path):
    system, _ = prompts(1, 11, seed=9)
    full = torch.cat([system.expand(2, -1), prompts(2, 4, seed=10)[0]], 1)
    path = tmp_path / "prefix.kvm"
    with KVMmapCache(path, config=paged.config, k_format="fp32", v_format="fp32", page_size=4) as c:
        with torch.no_grad():
            paged(system, cache=c)
        c.store_prefix(system)
        c.flush()
    ref = generate(sdpa, full, None, DynamicCache(config=sdpa.config))
    with KVMmapCache.open(path, config=paged.config) as c:
        assert c.reuse_prefix(full) == 11
        out = generate(paged, full, None, c)
        assert c.stats()["bytes_dequantized"] == 0
    assert torch.equal(out.sequences, ref.sequences)
    assert_close_logits(out.logits, ref.logits)


CHILD = textwrap.dedent(f"""
    import json, sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from kvmmap.integrations.transformers import KVMmapCache
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{CONFIG!r}, attn_implementation="kvmmap")).eval()
    step, path = sys.argv[1], sys.argv[2]
    ids, mask = (torch.tensor(x) for x in json.loads(sys.argv[3]))
    kw = dict(do_sample=False, max_new_tokens=6, attention_mask=mask)
    with torch.no_grad():
        if step == "write":
            cache = KVMmapCache(path, config=model.config, k_format="int8", v_format="int8", page_size=8)
            out = model.generate(ids, cache=cache, **kw)
            cache.flush()
        else:
            cache = KVMmapCache.open(path, config=model.config)
            before = (cache.get_seq_length(), cache.pads)
            out = model.generate(ids, cache=cache, **kw)
    print(json.dumps({{"out": out.tolist(), "before": before if step != "write" else None,
                      "copy": cache.stats()["bytes_dequantized"]}}))
""")


def run_child(*args):
    r = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True,
                       timeout=300, cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_reopened_padded_rows_continue_in_another_process(paged, tmp_path):
    ids, mask = prompts(2, 19, seed=11, pad=4)
    ref = generate(paged, ids, mask, kvmmap(paged, "int8"), max_new_tokens=12).sequences
    path = tmp_path / "run.kvm"
    wrote = run_child("write", path, json.dumps([ids.tolist(), mask.tolist()]))
    assert wrote["out"] == ref[:, :25].tolist() and wrote["copy"] == 0
    mask2 = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
    got = run_child("continue", path, json.dumps([wrote["out"], mask2.tolist()]))
    assert got["before"] == [24, [0, 4]]          # the pads came back from the file
    assert got["out"] == ref.tolist()


def sliding_models(window):
    mistral = pytest.importorskip("transformers.models.mistral")
    qwen2 = pytest.importorskip("transformers.models.qwen2")
    return {
        "mistral (every layer sliding)": (mistral.MistralForCausalLM, mistral.MistralConfig,
                                          {"sliding_window": window}),
        "qwen2 (sliding, full)": (qwen2.Qwen2ForCausalLM, qwen2.Qwen2Config,
                                  {"sliding_window": window, "use_sliding_window": True,
                                   "layer_types": ["sliding_attention", "full_attention"]}),
    }


@pytest.mark.parametrize("which", ["mistral (every layer sliding)", "qwen2 (sliding, full)"])
def test_sliding_window_layers_match_dynamic_cache(which):
    cls, config_cls, extra = sliding_models(6)[which]
    sdpa, paged = (make_model(a, cls, config_cls, **extra) for a in ("sdpa", "kvmmap"))
    ids, mask = prompts(2, 20, seed=12, pad=3)
    ref = generate(sdpa, ids, mask, DynamicCache(config=sdpa.config), prefill_chunk_size=8)
    cache = kvmmap(paged, "fp32", page_size=4)
    out = generate(paged, ids, mask, cache, prefill_chunk_size=8)
    assert [layer.is_sliding for layer in cache.layers] == [True, "full" not in which]
    assert torch.equal(out.sequences, ref.sequences)
    assert_close_logits(out.logits, ref.logits)


def test_other_caches_and_the_float_copy_use_sdpa(sdpa, paged):
    ids, mask = prompts(2, 15, seed=13, pad=2)
    ref = generate(sdpa, ids, mask, DynamicCache(config=sdpa.config))
    got = generate(paged, ids, mask, DynamicCache(config=paged.config))
    assert torch.equal(got.sequences, ref.sequences)
    assert_close_logits(got.logits, ref.logits)
    copy = kvmmap(paged, "int8", keep_dequantized=True)
    assert not copy.attends_in_place
    generate(paged, ids, mask, copy)
    assert copy.stats()["bytes_dequantized"] > 0 and copy.pads == [0, 0]     # pads stay, masked


def test_update_returns_only_the_new_tokens(paged):
    cache = kvmmap(paged, "int8")
    k = torch.randn(1, 2, 5, 16)
    attn_kwargs = {}
    keys, values = cache.update(k, -k, 0, kwargs=attn_kwargs)
    assert keys is k and attn_kwargs["kvmmap_layer"] is cache.layers[0]
    keys, _ = cache.update(k, -k, 1)              # no kwargs to hand the layer over: everything, read back
    assert keys.shape == (1, 2, 5, 16)


def test_both_spellings_of_the_cache_argument(paged):
    ids, mask = prompts(1, 9, seed=14)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        new = generate(paged, ids, mask, kvmmap(paged, "int8"))
    with torch.no_grad(), pytest.warns(FutureWarning, match="past_key_values"):
        old = paged.generate(ids, attention_mask=mask, past_key_values=kvmmap(paged, "int8"), max_new_tokens=10,
                             do_sample=False)
    assert torch.equal(new.sequences, old)


# ------------------------------------------------------------------ beyond RAM

def memory_cgroup(limit: int):
    """A cgroup v1 memory controller group limited to ``limit`` bytes: its path, or skip."""
    root = "/sys/fs/cgroup/memory"
    if not os.path.isdir(root):
        pytest.skip(f"no cgroup v1 memory controller at {root}")
    path = os.path.join(root, f"kvmmap-test-{os.getpid()}")
    try:
        os.mkdir(path)
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as fh:
            fh.write(str(limit))
    except OSError as e:
        if os.path.isdir(path):
            os.rmdir(path)
        pytest.skip(f"cannot make a memory cgroup under {root}: {e}")
    return path


@pytest.mark.slow
def test_generates_a_context_four_times_the_memory_limit(tmp_path):
    """Float32 K/V of 1.75 GiB under a 448 MiB limit (torch and transformers alone take
    about 400 MiB of RSS, most of it file pages the kernel can drop): the same tokens as
    without the limit."""
    limit, tokens = 448 << 20, 896
    group = memory_cgroup(limit)

    def enter():     # in the child, before exec: the whole interpreter runs under the limit
        with open(os.path.join(group, "cgroup.procs"), "w") as fh:
            fh.write(str(os.getpid()))

    cmd = [sys.executable, str(WORKERS / "generate_beyond_ram.py"), str(tokens)]
    try:
        # both at once: one thread each
        limited = subprocess.Popen([*cmd, tmp_path / "limited.kvm"], preexec_fn=enter, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, cwd="/")
        free = subprocess.Popen([*cmd, tmp_path / "free.kvm"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd="/")
        results = [p.communicate(timeout=900) + (p.returncode,) for p in (limited, free)]
        with open(os.path.join(group, "memory.max_usage_in_bytes")) as fh:
            max_usage = int(fh.read())
    finally:
        os.rmdir(group)
    for out, err, rc in results:
        assert rc == 0, (rc, err[-2000:])
    got, want = (json.loads(out.strip().splitlines()[-1]) for out, _, _ in results)
    assert got["kv_float32_bytes"] >= 4 * limit
    assert got["bytes_dequantized"] == 0
    assert max_usage <= limit
    assert got["tokens"] == want["tokens"]
