"""Adapters between kvmmap and other libraries; each needs its library installed.

``kvmmap.integrations.transformers.KVMmapCache``: a transformers ``Cache`` (needs torch
and transformers: ``pip install "kvmmap[transformers]"``).
"""
