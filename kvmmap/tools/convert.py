"""Import K/V arrays from ``.npz`` or ``.safetensors`` files into a cache file.

Naming convention of the input (``kvmmap convert``):

* **stacked**: an array named ``kv`` (or the file's only array) of shape
  ``[layers, 2, heads, seq, head_dim]`` (index 0 of axis 1 is K, 1 is V), or
  ``[layers, 2, batch, heads, seq, head_dim]``;
* **per layer**: arrays named ``layers.{i}.key`` and ``layers.{i}.value`` for
  ``i = 0 .. layers - 1``, each ``[heads, seq, head_dim]`` or ``[batch, heads, seq,
  head_dim]`` (the layout of a transformers ``DynamicCache`` layer's ``keys`` /
  ``values``). Other arrays in the file are ignored.

Each batch row becomes one sequence, named ``NAME`` (one row) or ``NAME/0``,
``NAME/1``, ... Arrays may be float16, float32, float64 or, in safetensors files,
bfloat16 (read through torch when it is installed). Padding is not detected: every row
is stored with the full ``seq`` tokens.

``.safetensors`` input needs the ``safetensors`` package (``pip install
'kvmmap[safetensors]'``).

:func:`upgrade` (``kvmmap convert --upgrade OLD NEW``) rewrites a format 1.x cache file,
read by :mod:`kvmmap.core.legacy`, in the format this kvmmap writes.
"""

from __future__ import annotations

import math
import os
import re
import zipfile

import numpy as np
from tqdm import tqdm

from ..cache import PagedKVCache, copy_v1
from ..core.fileio import fsync_dir, lock_existing, partial_path, remove_stale_partials
from ..core.legacy import MAGIC, V1File, is_v1, read_v1
from ..errors import CacheFileError, ConfigError, DTypeError, KVMmapError, ShapeError, describe
from .common import check_regular_file, disk_usage

_PER_LAYER = re.compile(r"^layers\.(\d+)\.(key|value)$")
_MAX_DEFLATE_RATIO = 1032      # deflate's largest expansion (258-byte matches in 2-bit codes)


class InputFileError(KVMmapError, OSError):
    """An input file of ``convert`` cannot be read or does not follow the naming convention."""


class _Arrays:
    """Named arrays of an input file, loaded one at a time."""

    def __init__(self, path: str):
        self.path = path
        ext = os.path.splitext(path)[1].lower()
        if ext == ".npz":
            self._open_npz()
        elif ext == ".safetensors":
            self._open_safetensors()
        else:
            raise InputFileError(f"{path}: unknown input type {ext or '(no extension)'!r}; expected .npz or .safetensors")

    def _open_npz(self) -> None:
        if not zipfile.is_zipfile(self.path):
            raise InputFileError(f"{self.path}: not an .npz file (not a zip archive)")
        try:
            self._npz = np.load(self.path, allow_pickle=False)
        except (zipfile.BadZipFile, ValueError, EOFError) as e:
            raise InputFileError(f"{self.path}: not a readable .npz file ({e})") from None
        if not isinstance(self._npz, np.lib.npyio.NpzFile):
            raise InputFileError(f"{self.path}: holds a single .npy array, not an .npz archive")
        self.names = list(self._npz.files)
        self._get = self._npz.__getitem__
        self._whole: dict = {}      # a stacked array is read once, not once per layer
        self._layer = lambda name, i: (self._whole.get(name) if name in self._whole
                                       else self._whole.setdefault(name, self._npz[name]))[i]

    def _npz_shape(self, name: str) -> tuple:
        """The shape an array's header declares, checked against the bytes its archive
        member holds: numpy allocates the declared size before reading, and a few hundred
        bytes of header can declare terabytes."""
        fmt = np.lib.format
        try:
            info = self._npz.zip.getinfo(name + ".npy")
            with self._npz.zip.open(info) as f:
                major, _ = fmt.read_magic(f)
                read = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
                shape, _, dtype = read(f)
                header = f.tell()
        except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
            raise InputFileError(f"{self.path}: array {name!r} is unreadable ({e})") from None
        declared = math.prod(shape) * dtype.itemsize
        held = info.file_size - header
        # deflate expands at most ~1032x: a member claiming more than that is forged
        if declared != held or info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024:
            raise InputFileError(
                f"{self.path}: array {name!r} declares {list(shape)} {dtype} ({declared} bytes), but its archive "
                f"member holds {max(held, 0)} bytes ({info.compress_size} compressed): damaged or forged")
        return tuple(shape)

    def _open_safetensors(self) -> None:
        try:
            from safetensors import safe_open
        except ImportError:
            raise InputFileError(
                f"{self.path}: reading .safetensors needs the safetensors package: pip install 'kvmmap[safetensors]'"
            ) from None
        try:
            self._st = safe_open(self.path, framework="numpy")
            self.names = list(self._st.keys())
        except Exception as e:   # safetensors raises its own SafetensorError (and OSError)
            if isinstance(e, FileNotFoundError):
                raise
            raise InputFileError(f"{self.path}: not a readable .safetensors file ({e})") from None
        self._get = lambda name: self._slice(name)[:]
        self._layer = lambda name, i: self._slice(name)[i]

    def _slice(self, name: str):
        if self._st.get_slice(name).get_dtype() != "BF16":
            return self._st.get_slice(name)
        try:
            import torch  # numpy has no bfloat16
            from safetensors import safe_open
        except ImportError:
            raise InputFileError(f"{self.path}: array {name!r} is bfloat16, which needs torch installed to read "
                                 f"(or save it as float16 / float32)") from None
        pt = safe_open(self.path, framework="pt")
        return _TorchSlice(pt.get_slice(name), torch)

    def shape(self, name: str) -> tuple:
        if hasattr(self, "_st"):
            return tuple(self._st.get_slice(name).get_shape())
        return self._npz_shape(name)

    def get(self, name: str) -> np.ndarray:
        return _checked(self._read(self._get, name), name)

    def layer(self, name: str, i: int) -> np.ndarray:
        return _checked(self._read(self._layer, name, i), name)

    def _read(self, fn, name, *args):
        try:
            return fn(name, *args)
        except (KVMmapError, MemoryError):
            raise
        except Exception as e:     # zip, zlib, npy header and safetensors errors alike
            raise InputFileError(f"{self.path}: array {name!r} is unreadable ({type(e).__name__}: {e})") from None

    def close(self) -> None:
        if hasattr(self, "_npz"):
            self._npz.close()


class _TorchSlice:
    def __init__(self, sl, torch):
        self._sl, self._torch = sl, torch

    def __getitem__(self, idx):
        return self._sl[idx].to(self._torch.float32).numpy()


def _checked(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype not in (np.float16, np.float32, np.float64):
        raise DTypeError(f"array {name!r} must be float16, float32, float64 or bfloat16, found {a.dtype}")
    return a


def _plan(src: _Arrays) -> tuple[str, dict]:
    """('stacked', {'name', 'shape'}) or ('layers', {'layers': [(key, value)], 'shape'})."""
    stacked = "kv" if "kv" in src.names else (src.names[0] if len(src.names) == 1 else None)
    if stacked is not None:
        shape = src.shape(stacked)
        if len(shape) not in (5, 6) or shape[1] != 2:
            raise ShapeError(f"{src.path}: array {stacked!r} must be [layers, 2, heads, seq, head_dim] or "
                             f"[layers, 2, batch, heads, seq, head_dim], found shape {list(shape)}")
        return "stacked", {"name": stacked, "shape": shape}
    found: dict[int, dict] = {}
    for n in src.names:
        m = _PER_LAYER.match(n)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = n
    if not found:
        raise InputFileError(
            f"{src.path}: no K/V arrays found among {src.names[:8]}; expected 'kv' [layers, 2, heads, seq, head_dim] "
            f"or 'layers.{{i}}.key' / 'layers.{{i}}.value' [(batch,) heads, seq, head_dim]"
        )
    missing = [f"layers.{i}.{side}" for i in range(max(found) + 1) for side in ("key", "value")
               if side not in found.get(i, {})]
    if missing:
        raise InputFileError(f"{src.path}: missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    pairs = [(found[i]["key"], found[i]["value"]) for i in range(len(found))]
    shape = src.shape(pairs[0][0])
    for kn, vn in pairs:
        for n in (kn, vn):
            if src.shape(n) != shape:
                raise ShapeError(f"{src.path}: {n!r} has shape {list(src.shape(n))}, but {pairs[0][0]!r} has {list(shape)}")
    if len(shape) not in (3, 4):
        raise ShapeError(f"{src.path}: per-layer arrays must be [heads, seq, head_dim] or [batch, heads, seq, head_dim], "
                         f"found shape {list(shape)}")
    return "layers", {"layers": pairs, "shape": shape}


def convert(src, dst, *, k_format: str = "int8", v_format: str = "int8", page_size: int = 16,
            name: str | None = None, append: bool = False, overwrite: bool = False,
            fingerprint: bytes | str = b"", progress: bool | None = None) -> dict:
    """Store the K/V arrays of an ``.npz`` / ``.safetensors`` file in a cache file.

    Parameters
    ----------
    src : str or os.PathLike
        Input following the naming convention of this module's docstring.
    dst : str or os.PathLike
        Cache file to create (or to add sequences to, with ``append``).
    k_format, v_format : str
        Formats of a new cache (ignored with ``append``: the file's own are used).
    page_size : int
        Tokens per page of a new cache.
    name : str, optional
        Sequence name (default: the input's file name without extension); batch rows
        are ``name/0``, ``name/1``, ...
    append : bool
        Add the sequences to an existing cache with the same geometry.
    overwrite : bool
        Replace an existing ``dst`` (without ``append``). Refused while another process
        has ``dst`` open for writing (its writer lock is held).
    fingerprint : bytes or str
        Model fingerprint of a new cache.
    progress : bool, optional
        Progress bar over layers (None: only when stderr is a terminal).

    Returns
    -------
    dict
        ``layers``, ``heads``, ``head_dim``, ``tokens`` (per sequence), ``sequences``
        (names), ``k_format``, ``v_format``, ``bytes_on_disk``, ``apparent_bytes`` (of
        ``dst``), ``source_bytes`` (of ``src``).

    Raises
    ------
    InputFileError, ShapeError, DTypeError, NonFiniteError, CacheFileError, OSError
        A new ``dst`` is written as ``.NAME.partial-PID`` in its directory and renamed
        when complete; partial files of ``dst`` left by a killed run are deleted first
        (:func:`kvmmap.core.fileio.remove_stale_partials`). With ``append`` nothing is
        committed unless every array was stored.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if not isinstance(page_size, (int, np.integer)) or isinstance(page_size, bool) or page_size < 1:
        raise ShapeError(f"page_size must be a positive integer, found {page_size!r}")
    if not os.path.exists(src):
        raise InputFileError(f"{src}: no such file")
    try:
        check_regular_file(src)        # before opening it: a FIFO would block
    except CacheFileError as e:
        raise InputFileError(str(e)) from None
    if append or overwrite and os.path.lexists(dst):
        check_regular_file(dst)
    arrays = _Arrays(src)
    old_fd = None
    try:
        kind, plan = _plan(arrays)
        shape = plan["shape"]
        if kind == "stacked":
            num_layers, rest = shape[0], shape[2:]
        else:
            num_layers, rest = len(plan["layers"]), shape
        batch = rest[0] if len(rest) == 4 else 1
        heads, seq, head_dim = rest[-3:]
        base = name or os.path.splitext(os.path.basename(src))[0]
        names = [base] if batch == 1 else [f"{base}/{b}" for b in range(batch)]

        if append:
            cache = PagedKVCache.open(dst, mode="r+")
            final = None
            got = (cache.num_layers, cache.num_kv_heads, cache.head_dim)
            if got != (num_layers, heads, head_dim):
                cache.close()
                raise ShapeError(f"{dst} holds {got[0]} layers x {got[1]} heads x head_dim {got[2]}; {src} holds "
                                 f"{num_layers} x {heads} x {head_dim}")
        else:
            if os.path.lexists(dst) and not overwrite:
                raise InputFileError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it or append=True (--append)")
            final = dst
            # held until the rename, as compress_cache does: a live writer of dst is refused
            old_fd = lock_existing(final) if overwrite else None
            remove_stale_partials(final)
            dst = partial_path(final)
            cache = PagedKVCache.create(dst, num_layers=num_layers, num_kv_heads=heads, head_dim=head_dim,
                                        page_size=page_size, k_format=k_format, v_format=v_format,
                                        fingerprint=fingerprint, overwrite=True)
        try:
            seqs = [cache.new_sequence(n) for n in names]
            for layer in tqdm(range(num_layers), desc="convert", unit="layer",
                              disable=None if progress is None else not progress):
                if kind == "stacked":
                    kv = arrays.layer(plan["name"], layer)
                    k, v = kv[0], kv[1]
                else:
                    kn, vn = plan["layers"][layer]
                    k, v = arrays.get(kn), arrays.get(vn)
                if k.ndim == 3:
                    k, v = k[None], v[None]
                for b, s in enumerate(seqs):
                    cache.append(s, layer, _tokens_first(k[b]), _tokens_first(v[b]))
            cache.flush()
            result = {"k_format": cache.k_format, "v_format": cache.v_format}
            if final is not None:
                # renamed while still open: its writer lock marks the complete partial file
                # as live, so a concurrent call's cleanup leaves it alone
                os.replace(dst, final)
                dst = final
                fsync_dir(final)
            cache.close()
        except BaseException:
            cache.close()     # without flush: nothing of this call is committed
            if final is not None and dst != final:
                try:
                    os.unlink(dst)
                except OSError:
                    pass
            raise
    finally:
        arrays.close()
        if old_fd is not None:
            os.close(old_fd)
    return {"src": src, "dst": dst, "layers": num_layers, "heads": heads, "head_dim": head_dim, "tokens": seq,
            "sequences": names, **result, **disk_usage(dst), "source_bytes": os.path.getsize(src)}


def _tokens_first(x: np.ndarray) -> np.ndarray:
    """[heads, seq, head_dim] (any float dtype) -> float32 [seq, heads, head_dim]."""
    if x.ndim != 3:
        raise ShapeError(f"expected [heads, seq, head_dim], found {describe(x)}")
    return np.ascontiguousarray(x.transpose(1, 0, 2), np.float32)


# ------------------------------------------------------------------ format upgrade

#: About how many tokens of a (sequence, layer) are decoded and appended at a time (rounded
#: to whole pages: a chunk's values are then final when they are compared with the source).
UPGRADE_CHUNK = 1 << 16

LOSSY_NOTE = ("fp32, fp16 and bf16 copy exactly; int8, int4 and fp8 are decoded and quantized again, which "
              "keeps each value within one quantization step (in practice almost always exactly, since "
              "page boundaries are kept)")


def upgrade(old, new=None, *, overwrite: bool = False, in_place: bool = False,
            progress: bool | None = None) -> dict:
    """Copy a format 1.x cache file into a cache file of the format this kvmmap writes.

    ``old`` is read by :mod:`kvmmap.core.legacy` (every page checksum is checked); the new
    file has the same geometry, formats (int4 value group size too), fingerprint,
    sequence ids and names, the same next sequence id (ids stay never reused), and the
    same contents: each layer's tokens are decoded to float32 and appended through
    :class:`~kvmmap.PagedKVCache`, starting at the same position of the page grid (the
    tokens ``shift_left`` dropped in front of the first page are appended and dropped
    again), so pages keep their boundaries. fp32 / fp16 / bf16 are copied exactly;
    int8 / int4 / fp8 are quantized again from their decoded values, which changes a
    value by at most one quantization step. Sequences that shared pages (forks) get
    their own copies.

    The new file is built as ``.NAME.partial-PID`` beside its destination, committed
    (synced), renamed into place, and the directory is synced: at the destination there
    is only ever the file that was there or the complete result. ``old`` is never
    written, except that ``in_place`` renames the result over it.

    Parameters
    ----------
    old : str or os.PathLike
        A format 1.x cache file. Its writer lock is taken while it is read (an open
        writer is refused), so the file cannot change underneath.
    new : str or os.PathLike, optional
        The cache file to write; must not be ``old`` unless ``in_place`` (it may then be
        omitted).
    overwrite : bool
        Replace an existing ``new`` (refused while another process has it open for
        writing).
    in_place : bool
        Replace ``old`` itself, once the new file is complete.
    progress : bool, optional
        Progress bar over (sequence, layer) pairs (None: only when stderr is a terminal).

    Returns
    -------
    dict
        ``src``, ``dst``, ``version_before`` / ``version`` (``"major.minor"``),
        ``sequences``, ``tokens`` (visible, summed over layers), ``k_format``,
        ``v_format``, ``k_max_error`` / ``v_max_error`` (largest ``|old - new|`` over
        every visible value), ``bytes_on_disk_before`` / ``_after`` and
        ``apparent_bytes_before`` / ``_after``.

    Raises
    ------
    ConfigError
        ``new`` is ``old`` without ``in_place``, or is missing, or ``in_place`` names
        another file.
    CacheFileError
        ``old`` is missing, damaged (a page that fails its checksum is named), not of
        format 1, or open for writing; ``new`` exists without ``overwrite``.
    OSError
        Writing ``new`` failed (nothing is left at its name).
    """
    old = os.fspath(old)
    check_regular_file(old)
    if in_place:
        if new is not None and not (os.path.exists(new) and os.path.samefile(old, new)):
            raise ConfigError(f"in_place replaces {old} itself; found new={os.fspath(new)!r}, another file "
                              "(leave new out, or drop in_place)")
        dst = old
    else:
        if new is None:
            raise ConfigError("new is missing: name the file to write, or pass in_place=True "
                              "(kvmmap convert --upgrade --in-place) to replace old")
        dst = os.fspath(new)
        if os.path.lexists(dst):
            if os.path.exists(dst) and os.path.samefile(old, dst):
                raise ConfigError(f"{dst} is the input file; write the upgraded cache elsewhere, or pass "
                                  "in_place=True (kvmmap convert --upgrade --in-place) to replace it")
            if not overwrite:
                raise CacheFileError(f"{dst} exists; pass overwrite=True (kvmmap convert --overwrite) to replace it")
            check_regular_file(dst)     # locking it opens it: a FIFO would block
    if not is_v1(old):
        raise CacheFileError(f"{old}: not a format 1 kvmmap cache ({_version_of(old)}); nothing to upgrade")
    # old's writer lock is held throughout: no writer changes the pages being read, and in
    # place, none can open the file that is about to be replaced
    old_fd = lock_existing(old, "upgraded")
    dst_fd = lock_existing(dst) if dst != old and overwrite else None
    try:
        before = disk_usage(old)
        with read_v1(old) as src:
            report = _upgrade_into(src, dst, progress)
        report.update(src=old, dst=dst, **_before_after(before, disk_usage(dst)))
        return report
    finally:
        for fd in (old_fd, dst_fd):
            if fd is not None:
                os.close(fd)


def _version_of(path: str) -> str:
    """'format version X.Y' of a kvmmap file, or 'not a kvmmap cache'."""
    with open(path, "rb") as fh:
        head = fh.read(12)
    if len(head) == 12 and head[:8] == MAGIC:
        return f"format version {int.from_bytes(head[8:10], 'little')}.{int.from_bytes(head[10:12], 'little')}"
    return "not a kvmmap cache"


def _before_after(before: dict, after: dict) -> dict:
    return {"bytes_on_disk_before": before["bytes_on_disk"], "bytes_on_disk_after": after["bytes_on_disk"],
            "apparent_bytes_before": before["apparent_bytes"], "apparent_bytes_after": after["apparent_bytes"]}


def _upgrade_into(src: V1File, dst: str, progress) -> dict:
    """Write ``src`` as a new cache at ``dst`` (built beside it, renamed into place)."""
    remove_stale_partials(dst)
    tmp = partial_path(dst)
    seqs = src.sequences
    d = PagedKVCache.create(tmp, num_layers=src.num_layers, num_kv_heads=src.num_kv_heads, head_dim=src.head_dim,
                            page_size=src.page_size, k_format=src.k_format, v_format=src.v_format,
                            v_group_size=src.v_group_size or None, fingerprint=src.fingerprint,
                            overwrite=True)
    try:
        bar = tqdm(total=len(seqs) * src.num_layers, desc="upgrade", unit="layer",
                   disable=None if progress is None else not progress)
        with bar:
            tokens, worst = copy_v1(src, d, step=max(1, UPGRADE_CHUNK // src.page_size) * src.page_size,
                                    on_layer=bar.update)
        d.flush()
        version = d.version
        # renamed while still open: its writer lock marks the complete partial file as
        # live, so a concurrent call's cleanup leaves it alone
        os.replace(tmp, dst)
        fsync_dir(dst)                  # the new name survives a power loss too
        d.close()
    except BaseException:
        d.close()                       # without flush: nothing of this call is committed
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return {"version_before": "{}.{}".format(*src.version), "version": "{}.{}".format(*version),
            "sequences": len(seqs), "tokens": tokens, "k_format": src.k_format, "v_format": src.v_format,
            "k_max_error": worst["k"], "v_max_error": worst["v"]}


