"""The two commits of a cache file: choosing one to open, writing the next.

A file holds two metadata slots (:mod:`kvmmap.core.metaslot`). Opening reads both and
takes the newest valid one (or, on request, the previous); committing writes the slot not
holding the commit this process is at, with the next generation. The rules that make this
crash-safe live here: data pages are synced before the slot is written; after a failed
sync nothing more is committed (the kernel may have dropped the pages it could not write,
and a retried sync reports success: PostgreSQL's "fsyncgate"); after each commit both slots
get disk blocks for commits of about twice its size, so a full disk still lets the next
commit through.
"""

from __future__ import annotations

import os

from ..errors import CacheFileError
from .fileio import reserve
from .metaslot import newest_generation, read_slot, write_slot
from .superblock import Superblock


class Commits:
    """Where a cache stands among its file's commits.

    Attributes
    ----------
    generation : int
        The generation the next commit follows (a writer: the newest on disk when opened).
    active_slot : int
        The slot of the commit this cache is at; the next commit goes to the other one.
    newest_seen : int
        The newest generation on disk when the file was opened (staleness checks).
    """

    def __init__(self, sb: Superblock, path):
        self.sb, self.path, self.fd = sb, path, None
        self.generation, self.active_slot, self.newest_seen = 0, 1, 0
        self.meta_reserved = 0      # bytes at the start of each slot with disk blocks
        self.sync_failed = ""       # why an fsync failed: no commit may follow

    def choose(self, commit: str):
        """Read both slots: (payload of the chosen commit, the other valid one or None, a
        function making the error to raise when the chosen payload turns out invalid)."""
        for _ in range(3):
            # A reader racing a writer can find each slot mid-rewrite if the writer
            # commits twice between the two reads: look again before calling it damage.
            slots = [read_slot(self.fd, self.sb, i) for i in (0, 1)]
            valid = sorted((s[0], i, s[1]) for i, s in enumerate(slots) if s is not None)
            if valid:
                break
        if not valid:
            raise CacheFileError(f"{self.path}: damaged metadata: neither metadata slot holds a valid commit")
        if commit == "previous" and len(valid) < 2:
            raise CacheFileError(f"{self.path}: no previous commit: slot {1 - valid[0][1]} holds no valid commit "
                                 f"(slot {valid[0][1]} holds the only one, generation {valid[0][0]})")
        chosen = valid[0] if commit == "previous" else valid[-1]
        other = [v for v in valid if v is not chosen]
        gen, slot, data = chosen
        self.generation, self.active_slot, self.newest_seen = gen, slot, valid[-1][0]
        # Refused if invalid; the other slot is not used in its place. A slot's payload and
        # header are each checksummed and the header is written last, so a crash leaves a
        # slot that fails a checksum, never one that holds and is invalid. Such a slot was
        # written by a bug, forged, or the file was cut short behind it: falling back would
        # hand out a state its writer had replaced, and the next commit would overwrite the
        # evidence.
        age = "a newer" if commit == "previous" else "an older"
        rest = (f"Slot {1 - slot} holds {age} commit (generation {other[0][0]}), not used"
                if other else f"Slot {1 - slot} holds no valid commit")
        which = "previous" if commit == "previous" else "newest"

        def invalid(reason) -> CacheFileError:
            return CacheFileError(
                f"{self.path}: damaged metadata: the {which} commit (slot {slot}, generation {gen}) passes its "
                f"checksums but is invalid: {reason}. {rest}: a slot whose checksums hold was written whole, so "
                "this is a bug, a forged file or a truncated file, not an interrupted write")
        return data, (other[0][2] if other else None), invalid

    def continue_as_writer(self) -> None:
        """The next commit follows the newest generation on disk."""
        self.generation = self.newest_seen

    def is_current(self) -> bool:
        """Whether the newest commit on disk is still the one that was newest at open."""
        return newest_generation(self.fd, self.sb) == self.newest_seen

    def write(self, data: bytes) -> None:
        """Commit ``data``: sync the data pages, write the other slot, sync, move on.

        Raises OSError (nothing moved: the commit this cache is at stays the newest), or
        CacheFileError after an earlier failed sync or when ``data`` outgrew the slot.
        """
        if self.sync_failed:
            raise CacheFileError(
                f"{self.path}: an earlier flush failed to sync ({self.sync_failed}); changes since the last "
                "commit may be lost on disk, so this cache commits nothing more: reopen it (it holds the last "
                "commit) and redo the work since")
        slot = 1 - self.active_slot
        self._sync(self.fd)
        write_slot(self.fd, self.sb, slot, self.generation + 1, data, sync=self._sync)
        self.generation += 1
        self.active_slot = slot
        self._reserve_ahead(len(data))

    def _sync(self, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as e:
            self.sync_failed = f"{type(e).__name__}: {e}"
            raise

    def _reserve_ahead(self, payload_bytes: int) -> None:
        """Disk blocks in both slots for commits up to about twice this one; if that fails
        the disk is full already and the next commit says so, nothing is lost."""
        want = min(self.sb.meta_slot_bytes, 64 + 2 * payload_bytes + (16 << 10))
        if want <= self.meta_reserved:
            return
        try:
            for i in (0, 1):
                reserve(self.fd, self.sb.meta_offset + i * self.sb.meta_slot_bytes, want)
        except OSError:
            return
        self.meta_reserved = want
