"""Argument checks used by more than one module, each written once."""

from __future__ import annotations

import numpy as np

from .errors import ShapeError


def is_int(v) -> bool:
    """An integer (numpy's included), not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_layer(layer, num_layers: int) -> int:
    """``layer`` as an int in ``0 .. num_layers - 1``; ShapeError otherwise."""
    if not is_int(layer) or not 0 <= layer < num_layers:
        raise ShapeError(f"layer must be an integer in 0..{num_layers - 1}, found {layer!r}")
    return int(layer)
