"""OpenCL runtime: device choice, program cache, launches.

kvmmap works without OpenCL: importing this module never fails, and :func:`available`
says whether a device can be used. The device is the one named by
``KVMMAP_OPENCL_DEVICE`` (a case-insensitive substring of ``platform name / device name``),
else the first GPU, else the first CPU device (PoCL on machines without a GPU).
Programs are built once per (context, source, options) and cached.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from .errors import FormatError, KernelBuildError, OpenCLUnavailableError
from .formats import get_format

try:
    import pyopencl as cl
except ImportError:  # the CPU path does not need it
    cl = None


def _kernel_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels_cl")


@functools.lru_cache(maxsize=1)
def _pick_device():
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
        for p, d in devices:
            if want in f"{p.name} / {d.name}".lower():
                return d
        names = "; ".join(f"{p.name} / {d.name}" for p, d in devices)
        raise OpenCLUnavailableError(f"KVMMAP_OPENCL_DEVICE={want!r} matches none of: {names}")
    gpus = [d for _, d in devices if d.type & cl.device_type.GPU]
    return (gpus or [d for _, d in devices])[0]


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why OpenCL cannot be used here, or None if a device builds and runs kernels.

    Besides finding a device this builds a one-line kernel: some OpenCL stacks list a
    device but cannot compile for it (PoCL whose LLVM predates the host CPU says
    "unknown target CPU 'generic'").
    """
    try:
        ctx, _ = context()
        cl.Program(ctx, "__kernel void probe(__global int *a) { a[0] = 1; }").build()
    except OpenCLUnavailableError as e:
        return str(e)
    except cl.Error as e:
        log = str(e).strip().splitlines()
        detail = next((line for line in log if "error" in line.lower()), log[-1] if log else "")
        return f"the OpenCL device {_pick_device().name!r} cannot build kernels: {detail.strip()}"
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
    ctx = cl.Context([_pick_device()])
    return ctx, cl.CommandQueue(ctx)


@functools.lru_cache(maxsize=None)
def program(source: str, options: tuple[str, ...] = ()):
    """Build ``kernels_cl/<source>`` with ``-D`` options, once per process and options."""
    ctx, _ = context()
    with open(os.path.join(_kernel_dir(), source), encoding="utf-8") as fh:
        text = fh.read()
    opts = [*options, "-I", _kernel_dir()]
    try:
        return cl.Program(ctx, text).build(options=opts)
    except cl.RuntimeError as e:
        raise KernelBuildError(f"building {source} with {' '.join(options)} failed:\n{e}") from None


def dequantize_rows(q) -> np.ndarray:
    """OpenCL decode of a :class:`~kvmmap.quant.QTensor` in a per-row-scaled or unscaled format.

    Mirrors :func:`kvmmap.dequantize` for fp32, fp16, bf16, int8 and fp8 (int4 decodes
    inside the attention kernels). Returns float32 of shape ``q.shape``.
    """
    f = get_format(q.format)
    if f.name == "int4":
        raise FormatError("dequantize_rows handles the one-byte and unscaled formats, not int4")
    ctx, queue = context()
    head_dim = q.shape[-1]
    rows = int(np.prod(q.shape[:-1], dtype=np.int64))
    out = np.empty(q.shape, np.float32)
    if out.size == 0:
        return out
    mf = cl.mem_flags
    codes = cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=np.ascontiguousarray(q.codes))
    scales_host = np.ascontiguousarray(q.scales) if f.scaled else np.zeros(1, np.float32)
    scales = cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=scales_host)
    out_buf = cl.Buffer(ctx, mf.WRITE_ONLY, out.nbytes)
    prg = program("dequant.cl", (f"-DKVMMAP_FORMAT={f.format_id}", f"-DHEAD_DIM={head_dim}"))
    prg.dequantize_rows(queue, (out.size,), None, codes, scales, out_buf, np.uint32(rows))
    cl.enqueue_copy(queue, out, out_buf)
    return out
