"""OpenCL runtime: device choice, program cache, launches.

kvmmap works without OpenCL: importing this module never fails, and :func:`available`
says whether a device can be used. The device is the one named by
``KVMMAP_OPENCL_DEVICE`` (a case-insensitive substring of ``platform name / device name``),
else the first GPU, else the first CPU device (PoCL on machines without a GPU); a device
that cannot build a probe kernel is passed over. Programs are built once per (context,
source, options) and cached. :func:`decode` runs paged decode attention and
:func:`attention` attention of several query tokens against a :class:`DevicePool`, the
device's copy of a cache's pages.
"""

from __future__ import annotations

import functools
import os
import weakref

import numpy as np

from .errors import ConfigError, FormatError, KernelBuildError, OpenCLUnavailableError
from .formats import get_format

try:
    import pyopencl as cl
except ImportError:  # the CPU path does not need it
    cl = None


@functools.lru_cache(maxsize=1)
def _kernel_dir() -> str:
    """Where the .cl sources are: installed as kvmmap/kernels_cl, or kernels_cl/ at the top
    of a source checkout (editable installs and running from the repository)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.path.join(here, "kernels_cl"), os.path.join(os.path.dirname(here), "kernels_cl")):
        if os.path.isfile(os.path.join(d, "kvmmap_formats.h")):
            return d
    raise OpenCLUnavailableError(f"kvmmap's OpenCL sources (kernels_cl/) are missing next to {here}")


_PROBE = "__kernel void probe(__global int *a) { a[0] = 1; }"


def _build_error(e) -> str:
    log = str(e).strip().splitlines()
    return next((line.strip() for line in log if "error" in line.lower()), log[-1].strip() if log else "")


@functools.lru_cache(maxsize=1)
def _pick_device():
    """The device kvmmap uses: see the module docstring. Devices that list themselves but
    cannot build a kernel (PoCL whose LLVM predates the host CPU says "unknown target CPU
    'generic'") are passed over for the next one."""
    if cl is None:
        raise OpenCLUnavailableError("pyopencl is not installed: pip install 'kvmmap[opencl]'")
    try:
        platforms = cl.get_platforms()
    except cl.Error as e:
        raise OpenCLUnavailableError(f"no OpenCL platform found ({e})") from None
    devices = [(p, d) for p in platforms for d in p.get_devices()]
    if not devices:
        raise OpenCLUnavailableError("OpenCL platforms were found but they list no device")
    want = os.environ.get("KVMMAP_OPENCL_DEVICE", "").strip().lower()
    if want:
        chosen = [(p, d) for p, d in devices if want in f"{p.name} / {d.name}".lower()]
        if not chosen:
            names = "; ".join(f"{p.name} / {d.name}" for p, d in devices)
            raise OpenCLUnavailableError(f"KVMMAP_OPENCL_DEVICE={want!r} matches none of: {names}")
    else:   # GPUs first, in platform order
        chosen = sorted(devices, key=lambda pd: not pd[1].type & cl.device_type.GPU)
    failures = []
    for p, d in chosen:
        try:
            cl.Program(cl.Context([d]), _PROBE).build()
            return d
        except cl.Error as e:
            failures.append(f"{p.name} / {d.name}: {_build_error(e)}")
    raise OpenCLUnavailableError("no OpenCL device can build kernels here: " + "; ".join(failures))


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why OpenCL cannot be used here, or None if a device builds and runs kernels."""
    try:
        _pick_device()
    except OpenCLUnavailableError as e:
        return str(e)
    return None


def available() -> bool:
    """True if an OpenCL device can build and run kvmmap's kernels."""
    return unavailable_reason() is None


def has_gpu() -> bool:
    """True if the chosen OpenCL device is a GPU (what ``backend="auto"`` looks for)."""
    return available() and bool(_pick_device().type & cl.device_type.GPU)


@functools.lru_cache(maxsize=1)
def context():
    """The shared context and in-order queue on the chosen device."""
    device = _pick_device()
    ctx = cl.Context([device])
    return ctx, cl.CommandQueue(ctx)


def program(source: str, options: tuple[str, ...] = ()):
    """Build ``kernels_cl/<source>`` with ``-D`` options, once per context and options."""
    return _program(context()[0], source, tuple(options))


@functools.lru_cache(maxsize=None)
def _program(ctx, source: str, options: tuple[str, ...]):
    with open(os.path.join(_kernel_dir(), source), encoding="utf-8") as fh:
        text = fh.read()
    opts = [*options, "-I", _kernel_dir()]
    try:
        return cl.Program(ctx, text).build(options=opts)
    except cl.RuntimeError as e:
        raise KernelBuildError(f"building {source} with {' '.join(options)} failed:\n{e}") from None


@functools.lru_cache(maxsize=None)
def _dequant_kernel(ctx, options: tuple[str, ...]):
    return cl.Kernel(_program(ctx, "dequant.cl", options), "dequantize_rows")


def _upload(ctx, a):
    """A read-only device copy of ``a`` (contiguous); a one-element placeholder for None
    or an empty array, which OpenCL buffers cannot be."""
    if a is None:
        a = np.zeros(1, np.float32)
    a = np.ascontiguousarray(a)
    if a.size == 0:
        a = np.zeros(1, a.dtype)
    return cl.Buffer(ctx, cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR, hostbuf=a)


def dequantize_rows(q) -> np.ndarray:
    """OpenCL decode of a :class:`~kvmmap.codecs.quant.QTensor`: :func:`kvmmap.dequantize` on the device.

    Runs ``kernels_cl/dequant.cl``, which decodes with the same ``kvmmap_formats.h``
    functions as the attention kernels (so the tests of this function test theirs).
    Every format and int4 grouping, float32 or float16 side data. Returns float32 of
    shape ``q.shape``.
    """
    f = get_format(q.format)
    ctx, queue = context()
    head_dim = q.shape[-1]
    rows = int(np.prod(q.shape[:-1], dtype=np.int64))
    out = np.empty(q.shape, np.float32)
    if out.size == 0:
        return out
    options = [f"-DKVMMAP_FORMAT={f.format_id}", f"-DHEAD_DIM={head_dim}",
               f"-DSIDE_HALF={int(q.side_dtype == np.float16)}"]
    if f.zero_point:
        channel = q.grouping == "channel"
        options += [f"-DGROUP_SIZE={q.group_size}", f"-DCHANNEL_GROUPS={int(channel)}",
                    f"-DTOKENS={q.shape[-2] if channel else 1}"]
    upload = functools.partial(_upload, ctx)
    out_buf = cl.Buffer(ctx, cl.mem_flags.WRITE_ONLY, out.nbytes)
    kernel = _dequant_kernel(ctx, tuple(options))
    kernel(queue, (out.size,), None, upload(q.codes), upload(q.scales), upload(q.zeros), out_buf, np.uint32(rows))
    cl.enqueue_copy(queue, out, out_buf)
    return out


# ---------------------------------------------------------------------------------
# Paged decode attention

MAX_SHARDS = 8          # buffer arguments of paged_attention.cl
WG_SIZE = 128
LOCAL_LOGITS_BYTES = 16 << 10   # local memory for one split's logits [G, SPLIT_TOKENS]


class DevicePool:
    """A device copy of a cache's page arena, kept up to date incrementally.

    The arena is held in shards of ``pages_per_shard`` pages, each one buffer no larger
    than ``CL_DEVICE_MAX_MEM_ALLOC_SIZE`` (a quarter of the memory on NVIDIA) or
    ``KVMMAP_OPENCL_SHARD_BYTES`` if set. :meth:`sync` uploads only pages sealed since
    the previous sync (sealed pages never change, so a page's stamp says it all); a shard
    that must grow is reallocated and copied on the device, not re-uploaded.

    Attributes
    ----------
    bytes_uploaded : int
        Page bytes sent to the device so far (host to device), for tests and benchmarks.
    """

    def __init__(self, cache):
        self.ctx, self.queue = context()
        dev = _pick_device()
        self.page_bytes = cache.arena.page_bytes
        env = os.environ.get("KVMMAP_OPENCL_SHARD_BYTES", "").strip()
        try:
            limit = int(env) if env else 0
        except ValueError:
            raise ConfigError(f"KVMMAP_OPENCL_SHARD_BYTES must be a number of bytes, found {env!r}") from None
        limit = min(limit, dev.max_mem_alloc_size) if limit > 0 else dev.max_mem_alloc_size
        self.pages_per_shard = max(1, limit // self.page_bytes)
        self.global_mem = dev.global_mem_size
        self.shards: list = []           # (buffer, pages it holds)
        self.synced = 0                  # pages stamped after this are not on the device yet
        self.bytes_uploaded = 0

    def _ensure(self, num_pages: int) -> None:
        pps, pb = self.pages_per_shard, self.page_bytes
        need = -(-num_pages // pps)
        if need > MAX_SHARDS:
            raise OpenCLUnavailableError(
                f"the pool's {num_pages} pages of {pb} bytes need {need} device buffers of at most "
                f"{pps * pb} bytes; the kernels take {MAX_SHARDS}")
        if num_pages * pb > self.global_mem:
            raise OpenCLUnavailableError(
                f"the pool ({num_pages * pb / 2**30:.1f} GiB) does not fit in device memory "
                f"({self.global_mem / 2**30:.1f} GiB)")
        for i in range(need):
            want = min(pps, num_pages - i * pps)
            if i < len(self.shards) and self.shards[i][1] >= want:
                continue
            have = self.shards[i][1] if i < len(self.shards) else 0
            size = min(pps, max(want, 2 * have, 64))      # grow geometrically
            buf = cl.Buffer(self.ctx, cl.mem_flags.READ_ONLY, size * pb)
            if have:
                cl.enqueue_copy(self.queue, buf, self.shards[i][0], byte_count=have * pb)
                self.shards[i] = (buf, size)
            else:
                self.shards.append((buf, size))

    def sync(self, cache) -> list:
        """Upload the pages sealed since the last sync; returns the host arrays in flight."""
        hw = cache.high_water
        self._ensure(max(hw, 1))
        stamps = cache.arena.page_stamp[:hw]
        dirty = np.flatnonzero(stamps > self.synced)
        self.synced = cache.arena.stamp
        if not len(dirty):
            return []
        pps, pb = self.pages_per_shard, self.page_bytes
        # contiguous runs of dirty pages, cut at shard boundaries
        breaks = np.flatnonzero((np.diff(dirty) != 1) | (dirty[1:] // pps != dirty[:-1] // pps)) + 1
        held = []
        for run in np.split(dirty, breaks):
            p0, p1 = int(run[0]), int(run[-1]) + 1
            shard = p0 // pps
            host = cache.arena.data[p0 * pb:p1 * pb]
            cl.enqueue_copy(self.queue, self.shards[shard][0], host, dst_offset=(p0 - shard * pps) * pb,
                            is_blocking=False)
            held.append(host)
            self.bytes_uploaded += host.nbytes
        return held

    def buffers(self) -> list:
        bufs = [b for b, _ in self.shards]
        return bufs + [bufs[0]] * (MAX_SHARDS - len(bufs))


def device_pool(cache) -> DevicePool:
    """The cache's device copy, created on first use."""
    pool = _POOLS.get(cache)
    if pool is None or pool.ctx is not context()[0]:
        pool = _POOLS[cache] = DevicePool(cache)
    return pool


# each cache's device copy, for as long as the cache lives
_POOLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=None)
def _kernels(ctx, options: tuple[str, ...], name: str = "paged_decode_split"):
    prg = _program(ctx, "paged_attention.cl", options)
    return cl.Kernel(prg, name), cl.Kernel(prg, "merge_splits")


def _attention_kernels(cache, G: int, split_tokens: int, query_tokens: int = 0, tile_tokens: int = 0):
    """(split kernel, merge kernel): paged_decode_split, or with ``query_tokens``
    paged_prefill_split built for that many query tokens and ``tile_tokens`` per tile."""
    lay = cache.layout
    opts = [
        f"-DK_FORMAT={lay.formats['k'].format_id}", f"-DV_FORMAT={lay.formats['v'].format_id}",
        f"-DHEAD_DIM={cache.head_dim}", f"-DPAGE_SIZE={cache.page_size}", f"-DNUM_KV_HEADS={cache.num_kv_heads}",
        f"-DGQA={G}", f"-DV_GROUP={lay.group_size['v'] or 1}", f"-DPAGE_BYTES={lay.page_bytes}",
        f"-DWG_SIZE={WG_SIZE}", f"-DSPLIT_TOKENS={split_tokens}",
    ]
    for side in ("k", "v"):
        _, codes_off, scales_off, zeros_off, _, side_half = lay.side_offsets(side)
        opts += [f"-D{side.upper()}_CODES_OFF={codes_off}", f"-D{side.upper()}_SCALES_OFF={scales_off}",
                 f"-D{side.upper()}_ZEROS_OFF={zeros_off}", f"-D{side.upper()}_SIDE_HALF={side_half}"]
    if query_tokens:
        opts += [f"-DQUERY_TOKENS={query_tokens}", f"-DTILE_TOKENS={tile_tokens}"]
        return _kernels(context()[0], tuple(opts), "paged_prefill_split")
    return _kernels(context()[0], tuple(opts))


def _decode_split_tokens(P: int, G: int) -> int:
    return max(P, (LOCAL_LOGITS_BYTES // (4 * G)) // P * P)


def decode(cache, layer: int, seqs, q: np.ndarray, scale: float, window) -> np.ndarray:
    """The OpenCL path of :func:`kvmmap.paged_decode_attention` (arguments already checked).

    q: float32 [B, H * G, D]. Returns float32 [B, H * G, D].
    """

    ctx, queue = context()
    H, P, D = cache.num_kv_heads, cache.page_size, cache.head_dim
    B, Hq = q.shape[0], q.shape[1]
    G = Hq // H
    if D % 4:
        raise FormatError(f"the OpenCL kernels need head_dim a multiple of 4, found {D}")
    split = _decode_split_tokens(P, G)
    split_kernel, merge_kernel = _attention_kernels(cache, G, split)
    pool = device_pool(cache)
    held = pool.sync(cache)
    batch = cache.paged_batch(layer, seqs, window)
    num_splits = int(-(-batch.lengths.max() // split))
    mf = cl.mem_flags
    upload = functools.partial(_upload, ctx)

    args = [upload(batch.page_indptr.astype(np.int32)), upload(batch.page_indices),
            upload(batch.start.astype(np.int32)), upload(batch.end.astype(np.int32)),
            upload(batch.tail_k), upload(batch.tail_v), upload(q)]
    part_o = cl.Buffer(ctx, mf.READ_WRITE, B * Hq * num_splits * D * 4)
    part_m = cl.Buffer(ctx, mf.READ_WRITE, B * Hq * num_splits * 4)
    part_l = cl.Buffer(ctx, mf.READ_WRITE, B * Hq * num_splits * 4)
    out = np.empty((B, Hq, D), np.float32)
    out_buf = cl.Buffer(ctx, mf.WRITE_ONLY, out.nbytes)
    split_kernel(queue, (num_splits * WG_SIZE, B * H), (WG_SIZE, 1),
                 *pool.buffers(), np.uint64(pool.pages_per_shard), *args,
                 np.float32(scale), np.int32(num_splits), part_o, part_m, part_l)
    merge_kernel(queue, (D, B * Hq), None, part_o, part_m, part_l, np.int32(num_splits),
                 np.int32(B * Hq), out_buf)
    cl.enqueue_copy(queue, out, out_buf)     # blocking: also ends the page uploads
    del held
    return out


QUERY_ROWS = 16          # query rows (tokens x GQA heads) of one prefill work-group
LOCAL_KV_FLOATS = 4096   # floats of one decoded K or V tile in local memory
MIN_GROUPS = 256         # work-groups below which prefill splits the key range


def attention(cache, layer: int, seqs, q: np.ndarray, causal: bool, scale: float, window) -> np.ndarray:
    """The OpenCL path of :func:`kvmmap.paged_attention` for q_tokens > 1 (arguments
    already checked).

    q: float32 [B, T, H * G, D]. Returns float32 [B, T, H * G, D].
    """
    from .attention import query_bounds

    ctx, queue = context()
    H, P, D = cache.num_kv_heads, cache.page_size, cache.head_dim
    B, T, Hq = q.shape[:3]
    G = Hq // H
    if D % 4:
        raise FormatError(f"the OpenCL kernels need head_dim a multiple of 4, found {D}")
    query_tokens = max(1, min(T, QUERY_ROWS // G))
    tile = max(4, min(64, LOCAL_KV_FLOATS // D))
    split_kernel, merge_kernel = _attention_kernels(cache, G, _decode_split_tokens(P, G), query_tokens, tile)
    pool = device_pool(cache)
    held = pool.sync(cache)
    batch = cache.paged_batch(layer, seqs, None if window is None else window + T - 1)
    lo, hi = query_bounds(batch, T, causal, window)
    num_blocks = -(-T // query_tokens)
    first = np.arange(0, T, query_tokens)
    span = int((hi[:, np.minimum(first + query_tokens, T) - 1] + 1 - lo[:, first]).max())
    num_splits = max(1, min(-(-MIN_GROUPS // (num_blocks * B * H)), -(-span // tile)))
    per_split = -(-span // num_splits)
    split_tokens = -(-per_split // tile) * tile
    num_splits = -(-span // split_tokens)
    mf = cl.mem_flags
    upload = functools.partial(_upload, ctx)

    rows = B * T * Hq
    args = [upload(batch.page_indptr.astype(np.int32)), upload(batch.page_indices),
            upload(batch.tail_k), upload(batch.tail_v), upload(q),
            upload(lo.astype(np.int32)), upload(hi.astype(np.int32))]
    part_o = cl.Buffer(ctx, mf.READ_WRITE, rows * num_splits * D * 4)
    part_m = cl.Buffer(ctx, mf.READ_WRITE, rows * num_splits * 4)
    part_l = cl.Buffer(ctx, mf.READ_WRITE, rows * num_splits * 4)
    out = np.empty(q.shape, np.float32)
    out_buf = cl.Buffer(ctx, mf.WRITE_ONLY, out.nbytes)
    split_kernel(queue, (num_splits * WG_SIZE, num_blocks, B * H), (WG_SIZE, 1, 1),
                 *pool.buffers(), np.uint64(pool.pages_per_shard), *args,
                 np.int32(T), np.float32(scale), np.int32(num_splits), np.int32(split_tokens),
                 part_o, part_m, part_l)
    merge_kernel(queue, (D, rows), None, part_o, part_m, part_l, np.int32(num_splits), np.int32(rows), out_buf)
    cl.enqueue_copy(queue, out, out_buf)     # blocking: also ends the page uploads
    del held
    return out
