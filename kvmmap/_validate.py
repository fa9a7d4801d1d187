"""Argument checks used by more than one module, each written once."""

from __future__ import annotations

import numpy as np

from .errors import DTypeError, NonFiniteError, ShapeError


def is_int(v) -> bool:
    """An integer (numpy's included), not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_layer(layer, num_layers: int) -> int:
    """``layer`` as an int in ``0 .. num_layers - 1``; ShapeError otherwise."""
    if not is_int(layer) or not 0 <= layer < num_layers:
        raise ShapeError(f"layer must be an integer in 0..{num_layers - 1}, found {layer!r}")
    return int(layer)


_F32_MAX = float(np.finfo(np.float32).max)


def as_float_array(x, name: str) -> np.ndarray:
    """A numpy float16/float32 array of ``x``, converted as numpy users expect.

    float64 numpy arrays and torch tensors of any floating dtype (bfloat16 included; read
    through their ``detach().float().cpu().numpy()``, without importing torch) are
    converted to float32; float16 and float32 pass through. Integer and other dtypes are
    refused with DTypeError, float64 values beyond float32's range with NonFiniteError.
    """
    if not isinstance(x, np.ndarray):
        is_floating = getattr(x, "is_floating_point", None)
        if callable(is_floating) and callable(getattr(x, "detach", None)):       # a torch tensor
            if not is_floating():
                raise DTypeError(f"{name} must hold floating-point values, found {getattr(x, 'dtype', '?')}")
            x = x.detach().float().cpu().numpy()
        elif hasattr(x, "__array__"):
            x = np.asarray(x)
        else:
            raise DTypeError(f"{name} must be a numpy array or a torch tensor, found {type(x).__name__}")
    if x.dtype == np.float64:
        if x.size and np.nanmax(np.abs(x), initial=0.0) > _F32_MAX:
            raise NonFiniteError(f"{name} holds values beyond float32's range (|x| > {_F32_MAX:.4g})")
        x = x.astype(np.float32)
    if x.dtype not in (np.float32, np.float16):
        raise DTypeError(f"{name} must be a floating-point array (float16, float32, float64), found {x.dtype}")
    return x
