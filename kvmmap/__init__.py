"""kvmmap: paged, quantized KV-cache pools backed by numpy.memmap files.

>>> import kvmmap as km
>>> km.FORMATS
('fp32', 'fp16', 'bf16', 'int8', 'int4', 'fp8_e4m3', 'fp8_e5m2')
"""

import os as _os

# The kernels run short OpenMP regions; idle threads that spin between them (libgomp's
# default) take the CPU from other work, and throughput collapses when cores are shared.
# Must be set before the OpenMP runtime loads with the first Cython module; an explicit
# setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ._version import __version__
from .errors import (
    ConfigError,
    DTypeError,
    FormatError,
    KVMmapError,
    LayoutError,
    CacheFileError,
    CapacityError,
    NonFiniteError,
    PageTableError,
    ReadOnlyError,
    SequenceError,
    ShapeError,
)
from .attention import paged_attention, paged_decode_attention
from .cache import PagedKVCache
from .codecs.quant import QTensor, dequantize, quantize, quantize_into
from .compress import CompressedKV, KVCacheCompressor, decompress_kv
from .formats import FORMATS, Format, get_format
from .parallel import get_num_threads, set_num_threads
from .tools.rewrite import compress_cache

__all__ = [
    "__version__",
    "FORMATS",
    "Format",
    "get_format",
    "PagedKVCache",
    "paged_attention",
    "paged_decode_attention",
    "KVCacheCompressor",
    "CompressedKV",
    "compress_cache",
    "decompress_kv",
    "QTensor",
    "quantize",
    "quantize_into",
    "dequantize",
    "get_num_threads",
    "set_num_threads",
    "KVMmapError",
    "ConfigError",
    "DTypeError",
    "FormatError",
    "LayoutError",
    "NonFiniteError",
    "ShapeError",
    "CacheFileError",
    "CapacityError",
    "PageTableError",
    "ReadOnlyError",
    "SequenceError",
]
