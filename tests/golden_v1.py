"""The committed format 1.0 golden files, shared by test_golden.py and test_legacy.py:
their manifest, expected values, and a fixture giving a private copy of each."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
from make_golden import reference  # noqa: E402

MANIFEST = json.loads((GOLDEN / "v1_0_manifest.json").read_text())
EXPECTED = np.load(GOLDEN / "v1_0_expected.npz")
GEO = MANIFEST["geometry"]
L, H, D, P = GEO["num_layers"], GEO["num_kv_heads"], GEO["head_dim"], GEO["page_size"]
G = MANIFEST["v_group_size"]
FILES = sorted(MANIFEST["files"])


def private_copy(tmp_path, name: str):
    """A copy of golden file ``name`` in ``tmp_path`` (tests may write to it)."""
    dst = tmp_path / name
    shutil.copyfile(GOLDEN / name, dst)
    return dst


@pytest.fixture(params=FILES)
def golden(request, tmp_path):
    """(file name, manifest entry, path of a private copy)."""
    return request.param, MANIFEST["files"][request.param], private_copy(tmp_path, request.param)


def expected_side(name, entry, label, layer, side):
    """(values a reader must return for one (sequence, layer, side), float32 [length, H, D];
    the input they round)."""
    fmt = entry[f"{side}_format"]
    info = entry["contents"][label]["layers"][layer]
    d, n = info["dropped"], info["length"]
    key = f"{name}/{label}/{layer}/{side}"
    stream = EXPECTED[f"{key}_stream"]
    ref, _ = reference(stream, fmt, side, len(stream) // P * P, P, G)
    return (EXPECTED[key] if ref is None else ref[d:d + n]), stream[d:d + n]
