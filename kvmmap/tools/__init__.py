"""Tools over whole cache files, the layer above the library (the CLI calls them).

``rewrite``  :func:`~kvmmap.tools.rewrite.compress_cache` (``kvmmap compress``) and
             :func:`~kvmmap.tools.rewrite.meta_slot_bytes_for`.
"""
