"""Build the Cython extensions. Metadata lives in pyproject.toml.

Compiler directives are set here and only here. ``KVMMAP_DEBUG_CYTHON=1`` turns bounds and
wraparound checks back on; ``KVMMAP_PORTABLE=1`` builds for the generic CPU instead of
``-march=native`` (use it when the build is copied to other machines).
"""

import os
import platform
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("KVMMAP_DEBUG_CYTHON") == "1"
PORTABLE = os.environ.get("KVMMAP_PORTABLE") == "1"

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}

compile_args, link_args = [], []
if sys.platform == "win32":
    compile_args += ["/O2", "/openmp"]
else:
    compile_args += ["-O3", "-fno-math-errno"]
    if sys.platform != "darwin":  # Apple clang has no OpenMP by default
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    if not PORTABLE and platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        compile_args.append("-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native")
if DEBUG:
    compile_args.append("-O0" if sys.platform != "win32" else "/Od")


# The attention loops are dot products and sums; letting gcc reassociate float additions
# (no other fast-math assumption: infinities and NaN keep their meaning) vectorizes them.
REASSOCIATE = [] if sys.platform == "win32" else ["-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
# The codecs round to codes: a multiply-add fused into one instruction (FMA, -march=native)
# would decide ties by the rounding error of 1/scale, so bytes would differ between builds.
EXACT = [] if sys.platform == "win32" else ["-ffp-contract=off"]


def ext(name, extra=()):
    return Extension(
        f"kvmmap.{name}",
        [f"kvmmap/{name.replace('.', '/')}.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
        extra_compile_args=compile_args + list(extra),
        extra_link_args=link_args,
    )


setup(
    ext_modules=cythonize([ext("codecs._quant", EXACT), ext("codecs._pages", EXACT), ext("_pagetable"), ext("_attention", REASSOCIATE)],
                          compiler_directives=directives),
    package_dir={"kvmmap": "kvmmap", "kvmmap.kernels_cl": "kernels_cl"},
    packages=["kvmmap", "kvmmap.codecs", "kvmmap.compress", "kvmmap.core", "kvmmap.integrations", "kvmmap.kernels_cl",
              "kvmmap.tools"],
    package_data={"kvmmap": ["*.pxd", "*.pyx"], "kvmmap.codecs": ["*.pxd", "*.pyx"],
                  "kvmmap.kernels_cl": ["*.cl", "*.h"]},
)
