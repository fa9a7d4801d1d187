"""Offline compression of K/V: low-rank projection, product vector quantization, hybrid.

:class:`KVCacheCompressor` turns a K/V pair into a :class:`CompressedKV` (arrays that can
be saved to ``.npz``) and back, and reports the compression ratio and the relative error
it achieved. Rewriting a whole cache file through a compressor is
:func:`kvmmap.tools.rewrite.compress_cache`.

Modules
-------
``container``  :class:`CompressedTensor`, :class:`CompressedKV`, the ``.npz`` container.
``kmeans``     vectorised k-means over many problems (VQ codebooks).
``codec``      :class:`Codec`, what every method implements, and the checks they share.
``lowrank``    ``"lowrank"`` (after PALU): projection on the leading eigenvectors per head group.
``vq``         ``"vq"``: product quantization, a k-means codebook per (head, sub-vector).
``hybrid``     ``"hybrid"``: lowrank, then the latent quantized (int8 / int4) after a random rotation.
``compressor`` :class:`KVCacheCompressor` (picks the codec of a method) and :func:`decompress_kv`.

Each codec validates its own parameters and refuses those of other methods, and
round-trips its settings through ``get_config()`` / ``from_config()``.

Basis, mean and codebooks are *parameters*: fitted on the data passed to
:meth:`KVCacheCompressor.compress_kv`, or once by :meth:`KVCacheCompressor.fit` on
calibration data and then shared by every later call (PALU's projections and VQ
codebooks are calibrated offline in the same way). ``ratio`` counts every byte of a
:class:`CompressedKV`, parameters included; ``ratio_shared`` leaves the parameters out:
what each further sequence costs once they are shared.
"""

from .codec import Codec
from .compressor import CODECS, METHODS, KVCacheCompressor, codec_class, decompress_kv
from .container import CompressedKV, CompressedTensor
from .hybrid import HybridCodec
from .kmeans import kmeans, nearest_centroid
from .lowrank import LowRankCodec, energy_rank
from .vq import VQCodec

__all__ = [
    "CODECS",
    "METHODS",
    "Codec",
    "CompressedKV",
    "CompressedTensor",
    "HybridCodec",
    "KVCacheCompressor",
    "LowRankCodec",
    "VQCodec",
    "codec_class",
    "decompress_kv",
    "energy_rank",
    "kmeans",
    "nearest_centroid",
]
