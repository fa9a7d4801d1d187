"""Tools over whole cache files, the layer above the library (the CLI calls them). They use
only the public surface of :class:`~kvmmap.PagedKVCache` and of ``kvmmap.core``.

``common``   what the tools share: regular-file checks, read-only views, page checks beside
             a writer (:class:`~kvmmap.tools.common.ChangedByWriterError`), sizes.
``inspect``  :func:`~kvmmap.tools.inspect.inspect_cache` (``kvmmap inspect``).
``verify``   :func:`~kvmmap.tools.verify.verify_cache` (``kvmmap verify``).
``rewrite``  :func:`~kvmmap.tools.rewrite.compress_cache` (``kvmmap compress``).
``convert``  :func:`~kvmmap.tools.convert.convert` (``kvmmap convert``): .npz / .safetensors in;
             :func:`~kvmmap.tools.convert.upgrade` (``kvmmap convert --upgrade``): a format 1.x
             file, read by :mod:`kvmmap.core.legacy`, rewritten in the current format.
``demo``     :func:`~kvmmap.tools.demo.run` (``kvmmap demo``).
"""
