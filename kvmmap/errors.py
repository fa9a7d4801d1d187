"""Exceptions raised by kvmmap.

Every error a user can trigger is a subclass of :class:`KVMmapError` and also of the
builtin exception that fits (``ValueError`` for bad arguments, ``OSError`` for files),
so callers can catch either. Messages say what was expected and what was found.
"""

from __future__ import annotations


class KVMmapError(Exception):
    """Base class of every kvmmap error."""


class ConfigError(KVMmapError, ValueError):
    """A setting (argument or environment variable) has an invalid value."""


class FormatError(KVMmapError, ValueError):
    """Unknown storage format, or a format option that does not fit the data."""


class ShapeError(KVMmapError, ValueError):
    """An array has the wrong shape."""


class DTypeError(KVMmapError, TypeError, ValueError):
    """An array has the wrong dtype."""


class LayoutError(KVMmapError, ValueError):
    """An array is not laid out as required (e.g. its last axis is not contiguous)."""


class NonFiniteError(KVMmapError, ValueError):
    """The input holds NaN or infinity, or a value the storage format cannot represent."""


class PageTableError(KVMmapError, ValueError):
    """A page-table operation would break its rules (double free, page out of range, ...)."""


class SequenceError(KVMmapError, KeyError, ValueError):
    """Unknown sequence id or name, or a name already taken."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CapacityError(KVMmapError, ValueError):
    """An append would pass a limit: a sequence's ``max_tokens`` or the pool's ``max_bytes``.

    Nothing was changed; ``shift_left``, ``truncate`` or ``free`` make room."""


class CacheFileError(KVMmapError, OSError):
    """A cache file is missing, damaged, of an unknown version, or locked by a writer."""


class ReadOnlyError(KVMmapError, OSError):
    """A write was attempted on a cache opened with mode="r"."""


class OpenCLUnavailableError(KVMmapError, RuntimeError):
    """pyopencl is not installed, or no OpenCL device could be found."""


class KernelBuildError(KVMmapError, RuntimeError):
    """An OpenCL program failed to build; the message holds the build log."""


def describe(a) -> str:
    """Short description of an array for error messages: ``float32[3, 8, 128]``."""
    shape = ", ".join(str(n) for n in getattr(a, "shape", ()))
    return f"{getattr(a, 'dtype', type(a).__name__)}[{shape}]"
