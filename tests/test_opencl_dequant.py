"""OpenCL decode of the storage formats against the CPU dequantize (on PoCL without a GPU)."""

import numpy as np
import pytest

import kvmmap as km

FORMATS = [f for f in km.FORMATS if f != "int4"]


@pytest.mark.opencl
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1, 64), (13, 3, 128), (5, 256)])
def test_opencl_decode_matches_cpu(opencl, fmt, shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape, dtype=np.float32) * 3
    q = km.quantize(x, fmt)
    np.testing.assert_array_equal(opencl.dequantize_rows(q), km.dequantize(q))


@pytest.mark.opencl
def test_opencl_build_error_names_the_log(opencl):
    with pytest.raises(km.errors.KernelBuildError, match="dequant.cl"):
        opencl.program("dequant.cl", ("-DKVMMAP_FORMAT=4",))
