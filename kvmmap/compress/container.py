"""The compressed form of K/V and its ``.npz`` container (version 1).

:class:`CompressedTensor` is one side (K or V) as arrays and scalars, :class:`CompressedKV`
the pair with its report; :meth:`CompressedKV.save` / :meth:`CompressedKV.load` write and
read the container. The array names and ``params`` of each method are listed under
:class:`CompressedTensor`; ``tests/golden/compressed_v1_*.kvz`` pin the format.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field

import numpy as np

from ..errors import CacheFileError

NPZ_VERSION = 1


@dataclass
class CompressedTensor:
    """One side (K or V) in compressed form.

    Attributes
    ----------
    method : str
        ``"lowrank"``, ``"vq"`` or ``"hybrid"``.
    shape : tuple of int
        ``(batch, heads, seq, head_dim)`` of the input (a 3-D input has batch 1).
    arrays : dict of str to numpy.ndarray
        lowrank: ``mean`` float32 ``[groups, group_heads * head_dim]``, ``basis`` float32
        ``[groups, group_heads * head_dim, rank]``, ``latent`` float32
        ``[groups, batch * seq, rank]``. hybrid: ``mean``, ``basis``, and the quantized
        latent as ``codes``, ``scales`` (and ``zeros`` for int4) in the layout of
        :func:`kvmmap.quantize` for ``[groups, batch * seq, rank]``. vq: ``codebooks``
        float32 ``[heads, head_dim // subvector_dim, codebook_size, subvector_dim]``,
        ``codes`` uint8 or uint16 ``[batch, heads, seq, head_dim // subvector_dim]``.
    params : dict
        Scalars that describe the arrays: ``rank``, ``group_heads``, ``format``,
        ``group_size`` (lowrank / hybrid), ``codebook_size``, ``subvector_dim`` (vq).
    """

    method: str
    shape: tuple
    arrays: dict
    params: dict

    _SHARED = ("mean", "basis", "codebooks")

    @property
    def nbytes(self) -> int:
        """Bytes of every array, parameters included."""
        return sum(a.nbytes for a in self.arrays.values())

    @property
    def nbytes_shared(self) -> int:
        """Bytes of the parameters (mean, basis, codebooks), which sequences may share."""
        return sum(a.nbytes for n, a in self.arrays.items() if n in self._SHARED)


@dataclass
class CompressedKV:
    """K and V in compressed form, as returned by :meth:`KVCacheCompressor.compress_kv`.

    Attributes
    ----------
    k, v : CompressedTensor
    ndim : int
        3 or 4: the rank of the arrays that were compressed (decompression returns it).
    dtype : str
        dtype of the input (decompression returns it).
    report : dict
        ``method``; ``ratio`` = input bytes / :attr:`nbytes`; ``ratio_shared`` = input
        bytes / (:attr:`nbytes` - parameter bytes); ``bytes_in``, ``bytes_out``,
        ``bytes_shared``; ``k_rel_error``, ``v_rel_error`` = ``||x - x'|| / ||x||``
        (Frobenius); ``k_max_abs_error``, ``v_max_abs_error``; ``k_rank``, ``v_rank``
        (lowrank, hybrid) or ``codebook_size`` (vq).
    """

    k: CompressedTensor
    v: CompressedTensor
    ndim: int
    dtype: str
    report: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def save(self, path) -> None:
        """Write to ``path`` in ``.npz`` form (an uncompressed zip of arrays, nothing pickled).

        The arrays are named ``k.<name>`` / ``v.<name>`` after :attr:`CompressedTensor.arrays`,
        plus ``__header__``: UTF-8 JSON with the version, shapes, params and report.

        Parameters
        ----------
        path : str or os.PathLike
            Written under exactly this name (no ``.npz`` is appended); an existing file
            is replaced.

        Raises
        ------
        OSError
            The file cannot be written.
        TypeError
            The report holds a value that JSON cannot encode.
        """
        head = {"version": NPZ_VERSION, "ndim": self.ndim, "dtype": self.dtype, "report": self.report}
        arrays = {}
        for side in ("k", "v"):
            t = getattr(self, side)
            head[side] = {"method": t.method, "shape": list(t.shape), "params": t.params}
            for name, a in t.arrays.items():
                arrays[f"{side}.{name}"] = a
        with open(path, "wb") as f:       # a file object: numpy would append ".npz" to a bare name
            np.savez(f, __header__=np.frombuffer(json.dumps(head).encode(), np.uint8), **arrays)

    @classmethod
    def load(cls, path) -> "CompressedKV":
        """Read a file written by :meth:`save`.

        Parameters
        ----------
        path : str or os.PathLike

        Returns
        -------
        CompressedKV
            The arrays as saved (dtypes and shapes of :attr:`CompressedTensor.arrays`),
            with ``ndim``, ``dtype`` and ``report``.

        Raises
        ------
        CacheFileError
            The file is missing or unreadable, is not a zip of arrays written by
            :meth:`save`, or has another version. Its message names the path.
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                head = json.loads(bytes(z["__header__"]).decode())
                if head.get("version") != NPZ_VERSION:
                    raise CacheFileError(f"{path}: compressed K/V version {head.get('version')!r}, expected {NPZ_VERSION}")
                sides = {}
                for side in ("k", "v"):
                    h = head[side]
                    prefix = f"{side}."
                    arrays = {n[len(prefix):]: z[n] for n in z.files if n.startswith(prefix)}
                    sides[side] = CompressedTensor(h["method"], tuple(h["shape"]), arrays, h["params"])
                return cls(sides["k"], sides["v"], head["ndim"], head["dtype"], head["report"])
        except CacheFileError:
            raise
        except OSError as e:        # missing, a directory, unreadable
            raise CacheFileError(f"cannot read {path}: {e.strerror or e}") from None
        except (KeyError, ValueError, TypeError, AttributeError, EOFError, zipfile.BadZipFile) as e:
            raise CacheFileError(f"{path}: not a compressed K/V file written by CompressedKV.save "
                                 f"({type(e).__name__}: {e})") from None

