"""Generate with attn_implementation="kvmmap" and no float copy; print the tokens as JSON.

    python generate_beyond_ram.py TOKENS PATH

A random Llama whose float32 K/V is 2 MiB a token (64 layers x 16 KV heads x 256), on one
thread; the prompt is prefilled in chunks of 256. Run by tests/test_transformers_attention.py
under a memory limit smaller than a quarter of that K/V, and without one.
"""

import json
import resource
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvmmap.integrations.transformers import KVMmapCache

LAYERS, KV_HEADS, HEAD_DIM = 64, 16, 256
KV_BYTES_PER_TOKEN = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4

if __name__ == "__main__":
    torch.set_num_threads(1)
    n, path = int(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                      num_attention_heads=KV_HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                      max_position_embeddings=n + 64, pad_token_id=0, eos_token_id=None, initializer_range=0.5,
                      attn_implementation="kvmmap")
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 64, (1, n), generator=torch.Generator().manual_seed(1))
    cache = KVMmapCache(path, config=model.config, k_format="int8", v_format="int8", keep_dequantized=False,
                        overwrite=True)
    with torch.no_grad():
        out = model.generate(ids, cache=cache, max_new_tokens=8, do_sample=False, prefill_chunk_size=256)
    print(json.dumps({"tokens": out[0, n:].tolist(), "kv_float32_bytes": n * KV_BYTES_PER_TOKEN,
                      "bytes_dequantized": cache.stats()["bytes_dequantized"],
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
