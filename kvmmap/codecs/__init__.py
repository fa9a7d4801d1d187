"""Encoding and decoding of the storage formats on the CPU.

``_rows.pxd`` holds one row encoder and decoder per format (cimported by every Cython
kernel), ``_quant.pyx`` the typed quantize / dequantize loops over them, and ``quant.py``
the checked public functions (:func:`kvmmap.quantize`, :func:`kvmmap.dequantize`, ...).
Format facts (ids, dtypes, side-data shapes, grouping rules) come from
:mod:`kvmmap.formats`.
"""
