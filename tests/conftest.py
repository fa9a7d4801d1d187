import pytest


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
        pytest.skip(f"OpenCL unusable here: {reason}")
    return ocl
