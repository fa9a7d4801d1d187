"""KVMmapCache: a transformers ``Cache`` whose keys and values live in a kvmmap file.

Pass it as ``cache=`` to ``model.generate()`` or to a forward call (transformers 5's
spelling; the older ``past_key_values=`` works too, with transformers' FutureWarning). Each batch
row is one sequence of a :class:`~kvmmap.PagedKVCache` (named ``kvmmap.row/<i>``), so
after :meth:`KVMmapCache.flush` another process can :meth:`KVMmapCache.open` the file and
go on generating without recomputing what is stored::

    # process 1: compute a prompt, keep it under its token ids
    cache = KVMmapCache("prompt.kvm", config=model.config, k_format="int8", v_format="int8")
    model(prompt_ids, cache=cache)
    cache.store_prefix(prompt_ids)
    cache.flush()

    # process 2: reuse the longest stored prefix of a new prompt, compute only the rest
    cache = KVMmapCache.open("prompt.kvm", config=model.config)
    cache.reuse_prefix(new_ids)              # forks the stored pages, copies none
    out = model.generate(new_ids, cache=cache, max_new_tokens=64)

Reopening the rows themselves also works: after ``generate(prompt, cache=cache)`` and
``flush()``, ``generate(out, cache=KVMmapCache.open(path))`` continues from the stored rows (the cache holds ``len(out) - 1`` tokens; ``generate`` computes the last).

What the model attends over
    Always exactly what the file holds, read back: keys and values are quantized on
    append and the model sees their dequantized values, for the tokens of the current
    step too. A process that reopens the file therefore sees the same numbers as the one
    that wrote it, and generates the same tokens (up to the rounding differences between a
    batched prefill and one-token steps, which DynamicCache has as well). One exception:
    an int4 prefix reused up to a point inside a page keeps that page's tokens in float32
    and quantizes them again, with the new tokens, when the page fills.

Attention over the pages (``attn_implementation="kvmmap"``)
    Importing this module registers ``"kvmmap"`` with transformers' ``AttentionInterface``
    (and ``AttentionMaskInterface``)::

        model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="kvmmap")
        cache = KVMmapCache("chat.kvm", config=model.config, k_format="int8", v_format="int8")
        out = model.generate(ids, cache=cache, max_new_tokens=64)

    (or ``model.set_attn_implementation("kvmmap")`` on a loaded model). Then, unless
    ``keep_dequantized=True``, no float copy of the context exists anywhere: ``update()``
    appends the new K/V to the file and hands the model back only the new K/V, and the
    attention function (:func:`kvmmap_attention_forward`) reads the quantized pages in
    place through :func:`kvmmap.paged_attention`, for prefill chunks and decode steps
    alike (``update()`` puts its layer into the attention call's keyword arguments, which
    transformers passes on to the attention function). Memory stays at the quantized
    pages, which the OS may page out: the context may exceed RAM. Sliding-window layers
    (``config.layer_types`` / ``config.sliding_window``) attend through ``window=``.
    With any other cache, or a KVMmapCache that keeps a float copy, the function is
    transformers' ``sdpa`` (same mask, same results).

    Left padding: the padding mask is honoured. The first forward pass that stores a
    row's leading pad tokens attends without them (a forked view of the row with the pads
    shifted out, pages shared); after that pass the pads are dropped from the row
    (``PagedKVCache.shift_left``) and the row remembers their count (its name,
    ``kvmmap.row/<i>/pad=<n>``, so a reopened cache knows it too). Rows then hold
    different numbers of tokens in the file, while transformers sees the padded length.

Memory trade-off (``keep_dequantized``)
    With ``keep_dequantized=True`` (the default, unless the model attends with
    ``"kvmmap"``) each layer keeps a dequantized copy of its
    K/V, ``[batch, num_kv_heads, capacity, head_dim]`` in the model's dtype and on its
    device. It grows by a quarter at a time, so a step that fits copies nothing (where
    DynamicCache concatenates at every step). A step appends the new tokens to the file
    and reads back only those (plus, for int4, the page they sealed): O(new tokens) of
    kvmmap work per step. The copy takes as much memory as a DynamicCache (up to 25% more,
    its slack); the file holds the quantized pages besides. With ``keep_dequantized=False``
    nothing is kept: each step reads and dequantizes the layer's whole context from the
    memory map (O(context) per step), so memory stays at one layer's worth and the context
    may exceed RAM, the OS paging the file. ``benchmarks/bench_generate.py`` measures both.

Layers of full attention and sliding-window attention are supported (every token is kept;
the window is applied when attending), not linear or chunked attention.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

try:
    import torch
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:   # pragma: no cover - depends on the environment
    raise ImportError(
        "kvmmap.integrations.transformers needs torch and transformers >= 5: "
        "pip install 'kvmmap[transformers]'"
    ) from e

from ..attention import paged_attention
from ..codecs import quant
from ..cache import PagedKVCache
from ..errors import CacheFileError, ConfigError, DTypeError, SequenceError, ShapeError
from ..prefix import as_token_ids

__all__ = ["KVMmapCache", "KVMmapLayer", "model_geometry", "config_fingerprint", "layer_windows",
           "kvmmap_attention_forward", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "kvmmap"
ROW_NAME = "kvmmap.row/{}"
PADDED_ROW_NAME = "kvmmap.row/{}/pad={}"
_ROW_RE = re.compile(r"kvmmap\.row/(\d+)(?:/pad=(\d+))?")
# the key under which update() hands its layer to the attention function
_LAYER_KWARG = "kvmmap_layer"
# storage formats that hold every value of an input dtype exactly
_EXACT = {torch.float32: {"fp32"}, torch.float16: {"fp32", "fp16"}, torch.bfloat16: {"fp32", "bf16"}}


def model_geometry(config) -> dict:
    """``{num_layers, num_kv_heads, head_dim}`` of a transformers config.

    Raises
    ------
    ConfigError
        Not a decoder config, or a layer of neither full nor sliding-window attention.
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:
        num_layers = int(text.num_hidden_layers)
        num_heads = int(text.num_attention_heads)
    except (AttributeError, TypeError):
        raise ConfigError(
            f"expected a transformers decoder config with num_hidden_layers and num_attention_heads, "
            f"found {type(config).__name__}"
        ) from None
    num_kv_heads = int(getattr(text, "num_key_value_heads", None) or num_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // num_heads)
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        other = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if other:
            raise ConfigError(f"KVMmapCache supports full-attention and sliding-window layers only, "
                              f"found layer types {other}")
    elif getattr(text, "attention_chunk_size", None) is not None:
        raise ConfigError(f"KVMmapCache supports full-attention and sliding-window layers only, found "
                          f"attention_chunk_size={text.attention_chunk_size}")
    return {"num_layers": num_layers, "num_kv_heads": num_kv_heads, "head_dim": head_dim}


def layer_windows(config) -> list:
    """Each layer's sliding window (int) or None (full attention), from a transformers config.

    ``config.layer_types`` names each layer; without it, a ``config.sliding_window`` applies
    to every layer (Mistral's convention).
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    num_layers = model_geometry(config)["num_layers"]
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if layer_types is None:
        return [window] * num_layers
    return [window if t == "sliding_attention" else None for t in layer_types]


def config_fingerprint(config) -> str:
    """32 hex characters identifying a model architecture (not its weights).

    BLAKE2b of the model type, geometry, hidden size and vocabulary size; stored in the
    file header so that :meth:`KVMmapCache.open` can refuse a cache made for another model.
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    fields = dict(model_geometry(config), model_type=getattr(text, "model_type", ""),
                  hidden_size=getattr(text, "hidden_size", None), vocab_size=getattr(text, "vocab_size", None))
    blob = json.dumps(fields, sort_keys=True).encode()
    return hashlib.blake2b(blob, digest_size=16, person=b"kvmmap.model.1").hexdigest()


def _row_name(row: int, pad: int) -> str:
    return PADDED_ROW_NAME.format(row, pad) if pad else ROW_NAME.format(row)


def _float32_numpy(x: torch.Tensor) -> np.ndarray:
    """``x`` as a C-contiguous float32 numpy array on the CPU; no copy when it is one already."""
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


def _token_rows(input_ids) -> np.ndarray:
    """Token ids as int64 ``[batch, n]`` from a tensor, array or list ``[n]`` / ``[batch, n]``."""
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.detach().cpu().numpy()
    a = np.asarray(input_ids)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise ShapeError(f"input_ids must be [batch, n] or [n], found shape {a.shape}")
    return np.stack([as_token_ids(r) for r in a]) if len(a) else a.astype(np.int64)


def _first_seen(attention_mask, n: int):
    """Per row, the first of ``n`` key positions some query sees (``n`` if none), int64
    numpy ``[batch]``; None when that is 0 for every row (or no mask)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 4:
        raise ShapeError(f"the kvmmap attention takes a 4D mask [batch, heads, q_tokens, tokens] or None, found "
                         f"{type(attention_mask).__name__} {tuple(getattr(attention_mask, 'shape', ()))}")
    seen = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    cols = seen[..., :n].any(dim=2).any(dim=1)                    # [batch, n]
    first = torch.where(cols.any(dim=1), cols.to(torch.uint8).argmax(dim=1), n)
    if not bool(first.any()):
        return None
    return first.cpu().numpy()


def kvmmap_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, **kwargs):
    """transformers attention function ``"kvmmap"``: attention over a KVMmapCache's pages.

    Registered with ``transformers.AttentionInterface`` when this module is imported; select
    it with ``attn_implementation="kvmmap"``. When the layer's ``update()`` came from a
    :class:`KVMmapCache` attending in place (it puts its layer into ``kwargs``), the
    queries attend over the quantized pages through :func:`kvmmap.paged_attention`, and
    ``key`` / ``value`` (only the new tokens) are not used. Otherwise this is
    transformers' ``sdpa_attention_forward`` with the same arguments.

    Parameters
    ----------
    module : torch.nn.Module
        The attention module (``layer_idx``, ``is_causal``, maybe ``sliding_window``).
    query : torch.Tensor ``[batch, num_q_heads, q_tokens, head_dim]``
    key, value : torch.Tensor ``[batch, num_kv_heads, tokens, head_dim]``
    attention_mask : torch.Tensor or None
        As made by the mask function registered with it (transformers' ``sdpa_mask``).
    dropout : float
        Must be 0 on the paged path (inference only).
    scaling : float, optional
        Softmax scale (default ``1 / sqrt(head_dim)``).
    kwargs
        ``sliding_window`` (int) restricts each query to that many positions, its own
        included; ``softcap`` is refused on the paged path.

    Returns
    -------
    attn_output : torch.Tensor ``[batch, q_tokens, num_q_heads, head_dim]``
    attn_weights : None

    Raises
    ------
    ConfigError
        Dropout, logit soft-capping or attention weights asked of the paged path.
    """
    layer = kwargs.pop(_LAYER_KWARG, None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if dropout:
        raise ConfigError(f"the kvmmap attention is for inference: dropout must be 0, found {dropout} "
                          "(call model.eval())")
    if kwargs.get("softcap") is not None:
        raise ConfigError("the kvmmap attention has no logit soft-capping; use attn_implementation='eager' "
                          "with keep_dequantized=True for this model")
    if kwargs.get("output_attentions"):
        raise ConfigError("the kvmmap attention does not return attention weights; use "
                          "attn_implementation='eager' with keep_dequantized=True for output_attentions")
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    return layer.attend(query, attention_mask, scaling, window, bool(causal)), None


AttentionInterface.register(ATTN_IMPLEMENTATION, kvmmap_attention_forward)
# transformers makes no mask for an implementation it does not know: the same as sdpa's
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


class KVMmapLayer(CacheLayerMixin):
    """One layer of a :class:`KVMmapCache`; the file is shared through the cache.

    ``keys`` / ``values`` are ``[batch, num_kv_heads, tokens, head_dim]`` views of the
    dequantized copy (None without a copy or before the first update).
    """

    is_compileable = False
    is_croppable = True

    def __init__(self, owner: "KVMmapCache", layer_idx: int, length: int, window: int | None = None):
        super().__init__()
        self._owner = owner
        self.layer_idx = layer_idx
        self.is_sliding = window is not None   # the whole context is kept; the window applies when attending
        self._length = length          # tokens of every row as transformers counts them (left pads included)
        self._loaded = 0               # leading tokens present in the dequantized copy
        self._set_buffers(None, None)

    def __repr__(self):
        return f"KVMmapLayer({self.layer_idx}, tokens={self._length})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self._length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    # ------------------------------------------------------------------ the hot path

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append new K/V; return what the attention function needs.

        Parameters
        ----------
        key_states, value_states : torch.Tensor ``[batch, num_kv_heads, new_tokens, head_dim]``
            Any float dtype and device.
        kwargs : dict, optional (keyword)
            The attention call's keyword arguments, which transformers 5 passes to
            ``Cache.update`` and then to the attention function. When the cache attends
            over its pages (:attr:`KVMmapCache.attends_in_place`), this layer is put there
            for :func:`kvmmap_attention_forward`.

        Returns
        -------
        keys, values : torch.Tensor
            Attending in place: ``key_states`` and ``value_states`` themselves (the
            attention function reads the pages, not these). Otherwise everything this
            layer holds, ``[batch, num_kv_heads, tokens, head_dim]``, dequantized from the
            file, in ``key_states``' dtype and on its device.

        Raises
        ------
        ShapeError, DTypeError, NonFiniteError, OSError
            The step is undone in every layer that took it already (the layers before
            this one in the forward pass), so the cache holds what it held before the
            step, every row and layer at the same length.
        """
        try:
            return self._update(key_states, value_states, kwargs.get("kwargs"))
        except BaseException:
            self._owner._drop_unfinished_step()
            raise

    def _update(self, key_states: torch.Tensor, value_states: torch.Tensor, attn_kwargs):
        owner = self._owner
        store = owner.store
        want = (store.num_kv_heads, store.head_dim)
        for name, x in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(x, torch.Tensor) or x.ndim != 4 or (x.shape[1], x.shape[3]) != want:
                raise ShapeError(
                    f"{name} must be [batch, {want[0]}, tokens, {want[1]}] (this cache's num_kv_heads and "
                    f"head_dim), found {tuple(getattr(x, 'shape', ()))}"
                )
            if not x.is_floating_point():
                raise DTypeError(f"{name} must be a float tensor, found {x.dtype}")
        if key_states.shape != value_states.shape:
            raise ShapeError(f"key_states {tuple(key_states.shape)} and value_states "
                             f"{tuple(value_states.shape)} differ")
        batch, n = key_states.shape[0], key_states.shape[2]
        k, v = _float32_numpy(key_states), _float32_numpy(value_states)
        if not owner.rows:      # the rows are made below: refuse bad input before that
            quant.check_storable(k, store.k_format)
            quant.check_storable(v, store.v_format)
        rows = owner._rows_for(batch)
        if self.layer_idx == 0:
            owner._pending_pads.clear()     # left by a pass that stopped before its last layer
        in_place = isinstance(attn_kwargs, dict) and owner.attends_in_place
        keep = owner.keeps_copy
        exact = _EXACT.get(key_states.dtype, ())
        exact = store.k_format in exact and store.v_format in exact    # the input is what the file holds
        old = self._length
        # all rows or none; returns the dequantized stored values of the tokens it changed
        start, k_stored, v_stored = store.append_rows(rows, self.layer_idx, k, v,
                                                      read_back=keep and not exact and not in_place)
        self._length = new = old + n
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if in_place:
            attn_kwargs[_LAYER_KWARG] = self
            return key_states, value_states
        if not keep:
            return self._read(0, new, key_states.dtype, key_states.device)
        self._ensure(new, key_states)
        if self._loaded < start:      # a reopened or reused row's tokens: loaded once
            self._fill(self._loaded, start)
        if exact:
            k_stored, v_stored = (k, v) if self._knp is not None else (key_states, value_states)
        if self._knp is not None:     # float32 on the CPU: numpy copies, cheaper than torch's
            self._knp[:, :, start:new] = k_stored
            self._vnp[:, :, start:new] = v_stored
        else:
            self._kbuf[:, :, start:new] = torch.as_tensor(k_stored)
            self._vbuf[:, :, start:new] = torch.as_tensor(v_stored)
        self._loaded = new
        self._view()
        return self.keys, self.values

    def attend(self, query: torch.Tensor, attention_mask, scale, window, causal: bool) -> torch.Tensor:
        """Attention of ``query`` over this layer's pages (:func:`kvmmap.paged_attention`).

        Parameters
        ----------
        query : torch.Tensor ``[batch, num_q_heads, q_tokens, head_dim]``
            The queries of the tokens the last update appended.
        attention_mask : torch.Tensor ``[batch, 1 or heads, q_tokens, tokens]`` or None
            transformers' mask (bool: True attends; float: 0 attends). Only leading
            positions that no query sees are taken from it (left padding); causality
            and the window are applied by the kernel.
        scale : float or None
        window : int or None
        causal : bool

        Returns
        -------
        torch.Tensor ``[batch, q_tokens, num_q_heads, head_dim]``, query's dtype and device
            Rows of queries that see no token (left padding) are zero.
        """
        owner, store = self._owner, self._owner.store
        B, _, T, _ = query.shape
        n = self._length
        q = _float32_numpy(query.transpose(1, 2))      # [B, T, Hq, D]
        seqs = list(owner.rows)
        visible = [n - p for p in owner.pads]
        starts = _first_seen(attention_mask, n)
        forks = []
        try:
            for b in range(B if starts is not None else 0):
                s = int(starts[b])
                if window is not None and s <= n - T - window + 1:
                    continue        # hidden by the window, not by padding
                extra = s - owner.pads[b]
                if extra > 0:       # leading pads still stored: attend over a view without them
                    fork = store.fork(seqs[b])
                    forks.append(fork)
                    store.shift_left(fork, extra)
                    seqs[b] = fork
                    visible[b] -= extra
                    owner._pending_pads[b] = max(owner._pending_pads.get(b, 0), s)
            used = [min(T, m) for m in visible]
            kw = dict(causal=causal, scale=scale, window=window)
            if all(u == T for u in used):
                out = paged_attention(store, self.layer_idx, seqs, q, **kw)
            else:       # rows whose first queries are pad tokens: those see nothing
                out = np.zeros(q.shape, np.float32)
                for b, u in enumerate(used):
                    if u:
                        out[b, T - u:] = paged_attention(store, self.layer_idx, [seqs[b]], q[b:b + 1, T - u:],
                                                         **kw)[0]
        finally:
            for fork in forks:
                store.free(fork)
        if self.layer_idx == len(owner.layers) - 1:
            owner._drop_stored_pads()
        return torch.from_numpy(out).to(query.device, query.dtype)

    def _read(self, start, stop, dtype, device):
        """K/V of tokens [start, stop) of every row: ``[batch, H, stop - start, D]`` tensors."""
        store = self._owner.store
        shape = (len(self._owner.rows), store.num_kv_heads, stop - start, store.head_dim)
        k, v = np.empty(shape, np.float32), np.empty(shape, np.float32)
        self._owner._read_rows(self.layer_idx, start, stop, k, v)
        return torch.from_numpy(k).to(device, dtype), torch.from_numpy(v).to(device, dtype)

    def _fill(self, start, stop):
        """Dequantize tokens [start, stop) of every row from the file into the copy."""
        if self._knp is not None:     # float32 on the CPU: straight into the copy
            self._owner._read_rows(self.layer_idx, start, stop,
                                   self._knp[:, :, start:stop], self._vnp[:, :, start:stop])
        else:
            k, v = self._read(start, stop, self._kbuf.dtype, self._kbuf.device)
            self._kbuf[:, :, start:stop] = k
            self._vbuf[:, :, start:stop] = v
        self._loaded = stop
        self._view()

    def _ensure(self, tokens, like: torch.Tensor) -> None:
        """Room for ``tokens`` in the dequantized copy (capacity grows by a quarter at least)."""
        cap = 0 if self._kbuf is None else self._kbuf.shape[2]
        batch = len(self._owner.rows)
        if self._kbuf is not None and self._kbuf.shape[0] != batch:
            cap = 0
        if tokens <= cap and self._kbuf.dtype == like.dtype and self._kbuf.device == like.device:
            return
        store = self._owner.store
        new_cap = max(tokens, cap + cap // 4, 64)    # amortized O(1) copies, <= 25% slack
        shape = (batch, store.num_kv_heads, new_cap, store.head_dim)
        kbuf = torch.empty(shape, dtype=like.dtype, device=like.device)
        vbuf = torch.empty(shape, dtype=like.dtype, device=like.device)
        if self._loaded and self._kbuf is not None and self._kbuf.shape[0] == batch:
            kbuf[:, :, :self._loaded] = self._kbuf[:, :, :self._loaded]
            vbuf[:, :, :self._loaded] = self._vbuf[:, :, :self._loaded]
        else:
            self._loaded = 0
        self._set_buffers(kbuf, vbuf)

    def _set_buffers(self, kbuf, vbuf) -> None:
        self._kbuf, self._vbuf = kbuf, vbuf
        # numpy views of a float32 CPU copy, which kvmmap decodes into without a temporary
        cpu32 = kbuf is not None and kbuf.dtype == torch.float32 and kbuf.device.type == "cpu"
        self._knp, self._vnp = (kbuf.numpy(), vbuf.numpy()) if cpu32 else (None, None)
        if kbuf is not None:
            self._view()

    def _view(self):
        self.keys = self._kbuf[:, :, :self._loaded]
        self.values = self._vbuf[:, :, :self._loaded]

    # ------------------------------------------------------------------ edits (driven by KVMmapCache)

    def _trim(self, n: int) -> None:
        self._length = min(self._length, n)
        self._loaded = min(self._loaded, n)
        if self._kbuf is not None:
            self._view()

    def _select(self, index: torch.Tensor) -> None:
        if self._kbuf is not None and self._loaded:
            self._set_buffers(self._kbuf.index_select(0, index.to(self._kbuf.device)),
                              self._vbuf.index_select(0, index.to(self._vbuf.device)))
        else:
            self._set_buffers(None, None)
            self._loaded = 0

    def _drop(self, length: int = 0) -> None:
        self._length, self._loaded = length, 0
        self._set_buffers(None, None)
        self.keys = self.values = None
        self.is_initialized = False

    # a row holds every layer: these act on the whole cache, through KVMmapCache
    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("crop the KVMmapCache, not one of its layers (a row spans every layer)")

    def reset(self) -> None:
        raise NotImplementedError("reset the KVMmapCache, not one of its layers (a row spans every layer)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("reorder the KVMmapCache, not one of its layers (a row spans every layer)")


class KVMmapCache(Cache):
    """A transformers ``Cache`` backed by a :class:`~kvmmap.PagedKVCache` file.

    Parameters
    ----------
    path : str or os.PathLike or None
        File to create; None keeps everything in RAM (nothing persists).
    config : transformers.PretrainedConfig
        The model's config: gives num_layers, num_kv_heads and head_dim, and a fingerprint
        stored in the file (:func:`config_fingerprint`).
    k_format, v_format : str
        Storage formats (:data:`kvmmap.FORMATS`), e.g. "fp16", "int8", "int4".
    page_size : int, optional
        Tokens per page (default: 16, or 64 for int4 keys; see :meth:`kvmmap.PagedKVCache.create`).
    keep_dequantized : bool or None
        True: keep a dequantized copy of every layer (fast decode with sdpa, memory like
        DynamicCache). False: keep none; with ``attn_implementation="kvmmap"`` the model
        attends over the pages in place, with any other attention the context is read from
        the file at every step. None (default): False when ``config``'s attention
        implementation is ``"kvmmap"`` (looked up at every step), else True. See the
        module docstring.
    overwrite : bool
        Replace an existing file.
    max_bytes : int, optional
        Pool limit of the file (see :meth:`kvmmap.PagedKVCache.create`).

    Attributes
    ----------
    store : PagedKVCache
        The underlying cache; ``store.stats()`` gives pages and bytes.
    rows : list of int
        Sequence id of each batch row (empty until the first update).
    pads : list of int
        Leading pad tokens of each row that are not stored (see "Left padding" in the
        module docstring): row ``i`` holds ``get_seq_length() - pads[i]`` tokens.

    Examples
    --------
    >>> model.set_attn_implementation("kvmmap")                                           # doctest: +SKIP
    >>> cache = KVMmapCache(None, config=model.config, k_format="int8", v_format="int8")  # doctest: +SKIP
    >>> out = model.generate(input_ids, cache=cache, max_new_tokens=32)                   # doctest: +SKIP
    """

    def __init__(self, path=None, *, config, k_format: str = "int8", v_format: str = "int8",
                 page_size: int | None = None, keep_dequantized: bool | None = None, overwrite: bool = False,
                 max_bytes: int | None = None):
        geometry = model_geometry(config)
        store = PagedKVCache.create(path, **geometry, page_size=page_size, k_format=k_format,
                                    v_format=v_format, fingerprint=config_fingerprint(config),
                                    overwrite=overwrite, max_bytes=max_bytes)
        self._attach(store, keep_dequantized, config)

    @classmethod
    def open(cls, path, *, config=None, mode: str = "r+", keep_dequantized: bool | None = None) -> "KVMmapCache":
        """Reopen a flushed cache file; its rows (if any) continue where they stopped.

        Parameters
        ----------
        path : str or os.PathLike
        config : transformers.PretrainedConfig, optional
            If given, the file must have been made for this architecture (geometry and
            fingerprint), else :class:`~kvmmap.ConfigError`. Needed to attend over the
            pages (its attention implementation) and for sliding-window layers.
        mode : {"r+", "r"}
            "r" opens read-only: nothing can be appended, so only for looking.
        keep_dequantized : bool or None
            As in the constructor.

        Raises
        ------
        CacheFileError
            Missing or damaged file, or rows of different lengths.
        ConfigError
            The file was made for another model.
        """
        store = PagedKVCache.open(path, mode=mode)
        try:
            if config is not None:
                want = model_geometry(config)
                have = {k: getattr(store, k) for k in want}
                if want != have:
                    raise ConfigError(f"{os.fspath(path)} holds a cache for {have}, the config describes {want}")
                fp = config_fingerprint(config).encode()
                if store.fingerprint and store.fingerprint != fp:
                    raise ConfigError(
                        f"{os.fspath(path)} was made for another model: fingerprint "
                        f"{store.fingerprint.decode(errors='replace')}, this config gives {fp.decode()}"
                    )
            self = cls.__new__(cls)
            self._attach(store, keep_dequantized, config)
        except BaseException:
            store.close()
            raise
        return self

    def _attach(self, store: PagedKVCache, keep_dequantized: bool | None, config) -> None:
        self.store = store
        self.keep_dequantized = None if keep_dequantized is None else bool(keep_dequantized)
        self._config = config
        self._pending_pads = {}      # row -> leading pads seen by this forward pass, dropped at its end
        self.rows, self.pads = self._stored_rows()
        lengths = [store.seq_len(self.rows[0], layer) + self.pads[0] if self.rows else 0
                   for layer in range(store.num_layers)]
        windows = layer_windows(config) if config is not None else [None] * store.num_layers
        super().__init__(layers=[KVMmapLayer(self, i, n, w) for i, (n, w) in enumerate(zip(lengths, windows))])

    @property
    def attends_in_place(self) -> bool:
        """Whether the model attends over the pages (``"kvmmap"`` attention, no float copy)."""
        text = self._config
        if text is not None and hasattr(text, "get_text_config"):
            text = text.get_text_config(decoder=True)
        kvmmap = getattr(text, "_attn_implementation", None) == ATTN_IMPLEMENTATION
        return kvmmap and self.keep_dequantized is not True

    @property
    def keeps_copy(self) -> bool:
        """Whether each layer keeps a dequantized copy (``keep_dequantized``, resolved)."""
        return self.keep_dequantized if self.keep_dequantized is not None else not self.attends_in_place

    def _stored_rows(self) -> tuple[list[int], list[int]]:
        """The row sequences in the file, and the pads each one dropped."""
        found = {}
        for sid, name in self.store.sequences().items():
            m = _ROW_RE.fullmatch(name or "")
            if m:
                found[int(m.group(1))] = (sid, int(m.group(2) or 0))
        rows, pads = [], []
        while len(rows) in found:
            sid, pad = found[len(rows)]
            rows.append(sid)
            pads.append(pad)
        lengths = {self.store.seq_len(s, layer) + p for s, p in zip(rows, pads)
                   for layer in range(self.store.num_layers)}
        if len(lengths) > 1:
            raise CacheFileError(
                f"{self.store.path}: the {len(rows)} stored rows hold different numbers of tokens "
                f"(with their pads: {sorted(lengths)}); a KVMmapCache needs every row and layer at the same length"
            )
        return rows, pads

    def _rows_for(self, batch: int) -> list[int]:
        """The row sequences for a batch of ``batch``, created on the first update."""
        if not self.rows and self.get_seq_length() == 0:
            self.rows = [self.store.new_sequence(ROW_NAME.format(i)) for i in range(batch)]
            self.pads = [0] * batch
        elif len(self.rows) != batch:
            raise ShapeError(
                f"this cache holds {len(self.rows)} rows (batch size {len(self.rows)}), the input has "
                f"batch size {batch}; call reset() to start over"
            )
        return self.rows

    # ------------------------------------------------------------------ Cache API

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens of every row and layer (0: nothing).

        As in transformers 5, the argument is a negative count; the file pages keep their
        copy-on-write rules (a page cut in the middle becomes the open tail again).
        """
        if not isinstance(tokens_to_remove, (int, np.integer)) or tokens_to_remove > 0:
            raise ShapeError(f"crop takes a negative number of tokens to remove (or 0), found {tokens_to_remove!r}")
        if tokens_to_remove == 0:
            return
        keep = max(self.get_seq_length() + int(tokens_to_remove), 0)
        self._truncate_rows(keep)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row ``i`` becomes old row ``beam_idx[i]`` (beam search): pages are shared, not copied."""
        self._select_rows(torch.as_tensor(beam_idx).reshape(-1).tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each row ``repeats`` times in place (row ``i`` -> rows ``i*r .. i*r+r-1``)."""
        self._select_rows([i for i in range(len(self.rows)) for _ in range(int(repeats))])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices`` (long indices or a boolean mask)."""
        self._select_rows(torch.arange(len(self.rows))[torch.as_tensor(indices).cpu()].reshape(-1).tolist())

    def _select_rows(self, src: list[int]) -> None:
        """New row ``i`` is old row ``src[i]``; rows gained are forks, rows lost are freed."""
        old = self.rows
        if not old:
            return
        if any(not 0 <= s < len(old) for s in src):
            raise ShapeError(f"row indices must be in 0..{len(old) - 1}, found {src}")
        if src == list(range(len(old))):
            return
        kept = {i for i, s in enumerate(src) if i < len(old) and s == i}
        # fork every source first: a row freed below may be the source of another
        temp = {i: self.store.fork(old[s]) for i, s in enumerate(src) if i not in kept}
        for i, seq in enumerate(old):
            if i not in kept:
                self.store.free(seq)
        rows, pads = [], [self.pads[s] for s in src]
        for i in range(len(src)):
            if i in kept:
                rows.append(old[i])
            else:    # named forks so that the rows are found again after a flush
                rows.append(self.store.fork(temp[i], name=_row_name(i, pads[i])))
                self.store.free(temp[i])
        self.rows, self.pads = rows, pads
        index = torch.tensor(src, dtype=torch.long)
        for layer in self.layers:
            layer._select(index)

    def reset(self) -> None:
        """Free every row (stored prefixes stay); the next update starts new rows."""
        for seq in self.rows:
            self.store.free(seq)
        self.rows, self.pads = [], []
        self._pending_pads.clear()
        for layer in self.layers:
            layer._drop()

    # ------------------------------------------------------------------ prefixes

    def store_prefix(self, input_ids) -> list[int]:
        """Store what each row holds under the hash of its token ids, for :meth:`reuse_prefix`.

        Parameters
        ----------
        input_ids : int tensor or array ``[batch, n]`` (or ``[n]`` for one row)
            The tokens the rows were computed from; ids beyond what the cache holds (e.g.
            the last token ``generate`` returned) are ignored. Left pads a row dropped
            (:attr:`pads`) are skipped; other padding is part of a row's ids (its K/V are
            stored too): store unpadded prompts to find them again.

        Returns
        -------
        list of int
            The stored sequence of each row (forks: pages shared with the rows).
        """
        ids = _token_rows(input_ids)
        if not self.rows:
            raise SequenceError("the cache holds no rows yet: run the model on the prompt first")
        if len(ids) != len(self.rows):
            raise ShapeError(f"input_ids has {len(ids)} rows, the cache holds {len(self.rows)}")
        n = min(ids.shape[1], self.get_seq_length())
        return [self.store.store_prefix(seq, ids[b, pad:n]) for b, (seq, pad) in enumerate(zip(self.rows, self.pads))]

    def reuse_prefix(self, input_ids) -> int:
        """Start the rows from the longest stored prefixes of ``input_ids``.

        Replaces the current rows (see :meth:`reset`). Each row forks the stored sequence
        matching its prompt (:meth:`kvmmap.PagedKVCache.match_prefix`), truncated to the
        length common to all rows and to at most ``n - 1`` tokens, since ``generate``
        needs at least one token to compute. Then pass the same ``input_ids`` to
        ``generate``: it computes only the tokens the cache lacks.

        Parameters
        ----------
        input_ids : int tensor or array ``[batch, n]`` (or ``[n]``)

        Returns
        -------
        int
            Tokens now cached in every row (0 if nothing matched).
        """
        ids = _token_rows(input_ids)
        matches = [self.store.match_prefix(r) for r in ids]
        n = min([m[1] for m in matches] + [ids.shape[1] - 1])
        self.reset()
        if n <= 0:
            return 0
        for b, (seq, _) in enumerate(matches):
            row = self.store.fork(seq, name=ROW_NAME.format(b))
            self.store.truncate(row, n)
            self.rows.append(row)
            self.pads.append(0)
        for layer in self.layers:
            layer._drop(n)
        return n

    # ------------------------------------------------------------------ file

    def flush(self) -> None:
        """Commit the file (rows and stored prefixes): after it returns a crash loses nothing.

        Only whole steps are committed: a forward pass stopped between layers (by an
        exception outside kvmmap) leaves the first layers one step ahead, and that step is
        dropped first, since :meth:`open` needs every layer at the same length.
        """
        self._drop_unfinished_step()
        self.store.flush()

    def _drop_unfinished_step(self) -> None:
        """Cut every row and layer back to the length all layers reached.

        Rows left empty are freed, as by :meth:`reset`: the step that made them is undone.
        """
        self._pending_pads.clear()
        if not self.rows:
            return
        keep = min(layer._length for layer in self.layers)
        if keep == 0:
            self.reset()
            return
        # truncate() leaves layers at or below ``keep`` alone; it also cuts rows that a
        # failed append left partly written in the layer that failed
        self._truncate_rows(keep)

    def _truncate_rows(self, keep: int) -> None:
        """Every row and layer to ``keep`` tokens as transformers counts them (pads included)."""
        for seq, pad in zip(self.rows, self.pads):
            self.store.truncate(seq, max(keep - pad, 0))
        for layer in self.layers:
            layer._trim(keep)

    def _drop_stored_pads(self) -> None:
        """After a forward pass: drop the leading pads it stored from their rows.

        The rows are renamed (``kvmmap.row/<i>/pad=<n>``) so that a reopened cache knows
        how many positions each one lacks."""
        for b, pad in sorted(self._pending_pads.items()):
            if pad > self.pads[b]:
                self.store.shift_left(self.rows[b], pad - self.pads[b])
                row = self.store.fork(self.rows[b], name=_row_name(b, pad))
                self.store.free(self.rows[b])
                self.rows[b], self.pads[b] = row, pad
        self._pending_pads.clear()

    def _read_rows(self, layer: int, start: int, stop: int, k_out: np.ndarray, v_out: np.ndarray) -> None:
        """Dequantize positions [start, stop) of every row (pads as zeros) into
        ``[batch, H, stop - start, D]`` float32 buffers."""
        if not any(self.pads):
            self.store.read_rows(self.rows, layer, start, stop, k_out, v_out)
            return
        for b, (seq, pad) in enumerate(zip(self.rows, self.pads)):
            skip = min(max(pad - start, 0), stop - start)
            k_out[b, :, :skip] = 0
            v_out[b, :, :skip] = 0
            if skip < stop - start:
                self.store.read_rows([seq], layer, start + skip - pad, stop - pad, k_out[b:b + 1, :, skip:],
                                     v_out[b:b + 1, :, skip:])

    def close(self) -> None:
        """Release the file; uncommitted changes are dropped (call :meth:`flush` first)."""
        self.store.close()

    def __enter__(self) -> "KVMmapCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """:meth:`PagedKVCache.stats` plus ``bytes_dequantized``, the dequantized copies' size."""
        out = self.store.stats()
        out["bytes_dequantized"] = sum(
            t.numel() * t.element_size() for layer in self.layers for t in (layer._kbuf, layer._vbuf) if t is not None
        )
        return out

    def __repr__(self) -> str:
        return f"KVMmapCache({self.store!r}, rows={len(self.rows)}, tokens={self.get_seq_length()})"
