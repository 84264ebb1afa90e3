"""A bounded replay window over kernel message ids (THREATS P4).

Who calls this: the relay, once per kernel message whose signature verified, before the
message is bound to a request. jupyter_client keeps a history of 2**16 digests and culls
10% at random when full, so an old message can come back; this window forgets strictly in
arrival order, so the last ``size`` ids are always remembered.

Why ids and not signatures: a replayed message has the same header bytes, hence the same
msg_id, so one check covers both; and a kernel holding its key can re-sign anything, so
what must be unique is the id. Memory is fixed: an ``array`` ring of 64-bit hashes plus a
set of the same ints, about 70 bytes per entry (4.6 MiB at the default 65536). The hashes
are Python's salted str hash: a collision (about 2**-33 over a full window) could only make
the gate drop one of the kernel's own messages, never forward a replay.
"""

from __future__ import annotations

from array import array

__all__ = ["ReplayWindow"]


class ReplayWindow:
    """Remembers the last ``size`` message ids; :meth:`seen` answers and records."""

    __slots__ = ("_pos", "_ring", "_seen", "_size")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"cellblock gate: replay_window must be at least 1, got {size}")
        self._size = size
        self._ring: array[int] | None = None  # allocated on first use
        self._seen: set[int] = set()
        self._pos = 0

    def seen(self, msg_id: str) -> bool:
        """True if ``msg_id`` is in the window (a replay); otherwise record it and return False."""
        key = hash(msg_id)
        seen = self._seen
        if key in seen:
            return True
        ring = self._ring
        if ring is None:
            ring = self._ring = array("q")
        if len(ring) < self._size:
            ring.append(key)
        else:
            seen.discard(ring[self._pos])
            ring[self._pos] = key
            self._pos = (self._pos + 1) % self._size
        seen.add(key)
        return False

    def __len__(self) -> int:
        return len(self._seen)
