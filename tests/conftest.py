import os

import pytest
from hypothesis import settings

from golden_v1 import golden  # noqa: F401  (the format 1.0 golden files, for several modules)


# Property tests draw the same examples on every run by default, so a result here is a
# result in CI too (a failure prints its reproduction blob); KVMMAP_HYPOTHESIS=explore
# draws new random examples each run, for hunting locally.
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("KVMMAP_HYPOTHESIS", "repeatable"))


def pytest_addoption(parser):
    parser.addoption("--no-opencl", action="store_true", help="skip the OpenCL tests")


@pytest.fixture
def opencl(request):
    """The kvmmap.opencl module, or a skip saying why OpenCL cannot run here."""
    if request.config.getoption("--no-opencl"):
        pytest.skip("OpenCL tests disabled with --no-opencl")
    from kvmmap import opencl as ocl

    reason = ocl.unavailable_reason()
    if reason:
        if os.environ.get("KVMMAP_REQUIRE_OPENCL") == "1":   # CI: OpenCL must run, not skip
            pytest.fail(f"KVMMAP_REQUIRE_OPENCL=1 but OpenCL is unusable: {reason}")
        pytest.skip(f"OpenCL unusable here: {reason}")
    return ocl


@pytest.fixture(params=["cpu", "opencl"])
def backend(request):
    """Each attention backend: the CPU kernels, and OpenCL (skipped where it cannot run)."""
    if request.param == "opencl":
        request.getfixturevalue("opencl")
    return request.param
