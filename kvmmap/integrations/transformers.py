"""KVMmapCache: a transformers ``Cache`` whose keys and values live in a kvmmap file.

Pass it as ``past_key_values=`` to ``model.generate()`` or to a forward call. Each batch
row is one sequence of a :class:`~kvmmap.PagedKVCache` (named ``kvmmap.row/<i>``), so
after :meth:`KVMmapCache.flush` another process can :meth:`KVMmapCache.open` the file and
go on generating without recomputing what is stored::

    # process 1: compute a prompt, keep it under its token ids
    cache = KVMmapCache("prompt.kvm", config=model.config, k_format="int8", v_format="int8")
    model(prompt_ids, past_key_values=cache)
    cache.store_prefix(prompt_ids)
    cache.flush()

    # process 2: reuse the longest stored prefix of a new prompt, compute only the rest
    cache = KVMmapCache.open("prompt.kvm", config=model.config)
    cache.reuse_prefix(new_ids)              # forks the stored pages, copies none
    out = model.generate(new_ids, past_key_values=cache, max_new_tokens=64)

Reopening the rows themselves also works: after ``generate(prompt, past_key_values=cache)``
and ``flush()``, ``generate(out, past_key_values=KVMmapCache.open(path))`` continues from
the stored rows (the cache holds ``len(out) - 1`` tokens; ``generate`` computes the last).

What the model attends over
    Always exactly what the file holds, read back: keys and values are quantized on
    append and the model sees their dequantized values, for the tokens of the current
    step too. A process that reopens the file therefore sees the same numbers as the one
    that wrote it, and generates the same tokens (up to the rounding differences between a
    batched prefill and one-token steps, which DynamicCache has as well). One exception:
    an int4 prefix reused up to a point inside a page keeps that page's tokens in float32
    and quantizes them again, with the new tokens, when the page fills.

Memory trade-off (``keep_dequantized``)
    With ``keep_dequantized=True`` (the default) each layer keeps a dequantized copy of its
    K/V, ``[batch, num_kv_heads, capacity, head_dim]`` in the model's dtype and on its
    device. It grows by a quarter at a time, so a step that fits copies nothing (where
    DynamicCache concatenates at every step). A step appends the new tokens to the file
    and reads back only those (plus, for int4, the page they sealed): O(new tokens) of
    kvmmap work per step. The copy takes as much memory as a DynamicCache (up to 25% more,
    its slack); the file holds the quantized pages besides. With ``keep_dequantized=False``
    nothing is kept: each step reads and dequantizes the layer's whole context from the
    memory map (O(context) per step), so memory stays at one layer's worth and the context
    may exceed RAM, the OS paging the file. ``benchmarks/bench_generate.py`` measures both.

Only models whose layers all use full attention are supported (no sliding window, no
linear attention), as with transformers' QuantizedCache.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

try:
    import torch
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as e:   # pragma: no cover - depends on the environment
    raise ImportError(
        "kvmmap.integrations.transformers needs torch and transformers >= 5: "
        "pip install 'kvmmap[transformers]'"
    ) from e

from ..codecs import quant
from ..cache import PagedKVCache
from ..errors import CacheFileError, ConfigError, DTypeError, SequenceError, ShapeError
from ..prefix import as_token_ids

__all__ = ["KVMmapCache", "KVMmapLayer", "model_geometry", "config_fingerprint"]

ROW_NAME = "kvmmap.row/{}"
# storage formats that hold every value of an input dtype exactly
_EXACT = {torch.float32: {"fp32"}, torch.float16: {"fp32", "fp16"}, torch.bfloat16: {"fp32", "bf16"}}


def model_geometry(config) -> dict:
    """``{num_layers, num_kv_heads, head_dim}`` of a transformers config.

    Raises
    ------
    ConfigError
        Not a decoder config, or a layer that is not plain full attention.
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
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise ConfigError(f"KVMmapCache supports full-attention layers only, found layer types {other}")
    else:
        for attr in ("sliding_window", "attention_chunk_size"):
            if getattr(text, attr, None) is not None:
                raise ConfigError(
                    f"KVMmapCache supports full-attention layers only, found {attr}={getattr(text, attr)}"
                )
    return {"num_layers": num_layers, "num_kv_heads": num_kv_heads, "head_dim": head_dim}


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


class KVMmapLayer(CacheLayerMixin):
    """One layer of a :class:`KVMmapCache`; the file is shared through the cache.

    ``keys`` / ``values`` are ``[batch, num_kv_heads, tokens, head_dim]`` views of the
    dequantized copy (None when ``keep_dequantized=False`` or before the first update).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, owner: "KVMmapCache", layer_idx: int, length: int):
        super().__init__()
        self._owner = owner
        self.layer_idx = layer_idx
        self._length = length          # tokens stored in the file for this layer
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
        """Append new K/V and return everything this layer holds.

        Parameters
        ----------
        key_states, value_states : torch.Tensor ``[batch, num_kv_heads, new_tokens, head_dim]``
            Any float dtype and device.

        Returns
        -------
        keys, values : torch.Tensor ``[batch, num_kv_heads, tokens, head_dim]``
            Dequantized from the file, in ``key_states``' dtype and on its device.

        Raises
        ------
        ShapeError, DTypeError, NonFiniteError, OSError
            The step is undone in every layer that took it already (the layers before
            this one in the forward pass), so the cache holds what it held before the
            step, every row and layer at the same length.
        """
        try:
            return self._update(key_states, value_states)
        except BaseException:
            self._owner._drop_unfinished_step()
            raise

    def _update(self, key_states: torch.Tensor, value_states: torch.Tensor):
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
        keep = owner.keep_dequantized
        exact = _EXACT.get(key_states.dtype, ())
        exact = store.k_format in exact and store.v_format in exact    # the input is what the file holds
        old = self._length
        # all rows or none; returns the dequantized stored values of the tokens it changed
        start, k_stored, v_stored = store.append_rows(rows, self.layer_idx, k, v, read_back=keep and not exact)
        self._length = new = old + n
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not keep:
            return self._read(rows, 0, new, key_states.dtype, key_states.device)
        self._ensure(new, key_states)
        if self._loaded < start:      # a reopened or reused row's tokens: loaded once
            self._fill(self._loaded, start, rows)
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

    def _read(self, rows, start, stop, dtype, device):
        """K/V of tokens [start, stop) of every row: ``[batch, H, stop - start, D]`` tensors."""
        store = self._owner.store
        shape = (len(rows), store.num_kv_heads, stop - start, store.head_dim)
        k, v = np.empty(shape, np.float32), np.empty(shape, np.float32)
        store.read_rows(rows, self.layer_idx, start, stop, k, v)
        return torch.from_numpy(k).to(device, dtype), torch.from_numpy(v).to(device, dtype)

    def _fill(self, start, stop, rows):
        """Dequantize tokens [start, stop) of every row from the file into the copy."""
        if self._knp is not None:     # float32 on the CPU: straight into the copy
            self._owner.store.read_rows(rows, self.layer_idx, start, stop,
                                         self._knp[:, :, start:stop], self._vnp[:, :, start:stop])
        else:
            k, v = self._read(rows, start, stop, self._kbuf.dtype, self._kbuf.device)
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
    keep_dequantized : bool
        Keep a dequantized copy of every layer (fast decode, memory like DynamicCache) or
        read the context from the file at every step; see the module docstring.
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

    Examples
    --------
    >>> cache = KVMmapCache(None, config=model.config, k_format="int8", v_format="int8")  # doctest: +SKIP
    >>> out = model.generate(input_ids, past_key_values=cache, max_new_tokens=32)          # doctest: +SKIP
    """

    def __init__(self, path=None, *, config, k_format: str = "int8", v_format: str = "int8",
                 page_size: int | None = None, keep_dequantized: bool = True, overwrite: bool = False,
                 max_bytes: int | None = None):
        geometry = model_geometry(config)
        store = PagedKVCache.create(path, **geometry, page_size=page_size, k_format=k_format,
                                    v_format=v_format, fingerprint=config_fingerprint(config),
                                    overwrite=overwrite, max_bytes=max_bytes)
        self._attach(store, keep_dequantized)

    @classmethod
    def open(cls, path, *, config=None, mode: str = "r+", keep_dequantized: bool = True) -> "KVMmapCache":
        """Reopen a flushed cache file; its rows (if any) continue where they stopped.

        Parameters
        ----------
        path : str or os.PathLike
        config : transformers.PretrainedConfig, optional
            If given, the file must have been made for this architecture (geometry and
            fingerprint), else :class:`~kvmmap.ConfigError`.
        mode : {"r+", "r"}
            "r" opens read-only: nothing can be appended, so only for looking.
        keep_dequantized : bool
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
            self._attach(store, keep_dequantized)
        except BaseException:
            store.close()
            raise
        return self

    def _attach(self, store: PagedKVCache, keep_dequantized: bool) -> None:
        self.store = store
        self.keep_dequantized = bool(keep_dequantized)
        self.rows = self._stored_rows()
        lengths = [store.seq_len(self.rows[0], layer) if self.rows else 0 for layer in range(store.num_layers)]
        super().__init__(layers=[KVMmapLayer(self, i, n) for i, n in enumerate(lengths)])

    def _stored_rows(self) -> list[int]:
        names = {name: sid for sid, name in self.store.sequences().items() if name}
        rows = []
        while ROW_NAME.format(len(rows)) in names:
            rows.append(names[ROW_NAME.format(len(rows))])
        lengths = {self.store.seq_len(s, layer) for s in rows for layer in range(self.store.num_layers)}
        if len(lengths) > 1:
            raise CacheFileError(
                f"{self.store.path}: the {len(rows)} stored rows hold different numbers of tokens "
                f"({sorted(lengths)}); a KVMmapCache needs every row and layer at the same length"
            )
        return rows

    def _rows_for(self, batch: int) -> list[int]:
        """The row sequences for a batch of ``batch``, created on the first update."""
        if not self.rows and self.get_seq_length() == 0:
            self.rows = [self.store.new_sequence(ROW_NAME.format(i)) for i in range(batch)]
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
        for seq in self.rows:
            self.store.truncate(seq, keep)
        for layer in self.layers:
            layer._trim(keep)

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
        rows = []
        for i in range(len(src)):
            if i in kept:
                rows.append(old[i])
            else:    # named forks so that the rows are found again after a flush
                rows.append(self.store.fork(temp[i], name=ROW_NAME.format(i)))
                self.store.free(temp[i])
        self.rows = rows
        index = torch.tensor(src, dtype=torch.long)
        for layer in self.layers:
            layer._select(index)

    def reset(self) -> None:
        """Free every row (stored prefixes stay); the next update starts new rows."""
        for seq in self.rows:
            self.store.free(seq)
        self.rows = []
        for layer in self.layers:
            layer._drop()

    # ------------------------------------------------------------------ prefixes

    def store_prefix(self, input_ids) -> list[int]:
        """Store what each row holds under the hash of its token ids, for :meth:`reuse_prefix`.

        Parameters
        ----------
        input_ids : int tensor or array ``[batch, n]`` (or ``[n]`` for one row)
            The tokens the rows were computed from; ids beyond what the cache holds (e.g.
            the last token ``generate`` returned) are ignored. Padding is part of a row's
            ids (its K/V are stored too): store unpadded prompts to find them again.

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
        return [self.store.store_prefix(seq, ids[b, :n]) for b, seq in enumerate(self.rows)]

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
        if not self.rows:
            return
        keep = min(layer._length for layer in self.layers)
        if keep == 0:
            self.reset()
            return
        # truncate() leaves layers at or below ``keep`` alone; it also cuts rows that a
        # failed append left partly written in the layer that failed
        for seq in self.rows:
            self.store.truncate(seq, keep)
        for layer in self.layers:
            layer._trim(keep)

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
