"""The gate's view of the kernel's connections, and the faults that stop a kernel.

Who calls this: :class:`cellblock.gate.relay.Gate` mixes :class:`KernelLinks` in; the loop
hands every libzmq monitor message of a kernel-facing socket to
:meth:`KernelLinks._connection_event`, and the relay reports every kernel byte it had to
drop to :meth:`KernelLinks._spent_dropped`.

Connections are the kernel's to make: the warden binds and never reconnects. Every accepted
connection is counted per channel; past ``GateLimits.max_kernel_connections`` in one jail's
life the gate calls ``on_fault`` once (the warden stops the kernel). A connection that breaks
and comes back (libzmq drops a peer that sends a frame over MAXMSGSIZE) leaves a marker in
the output of every open request.

Dropped bytes: what the kernel sends and the gate drops (unbound, malformed, over a bound,
refused by the profile) costs the host a receive and a check each. It fills a bucket of
``GateLimits.max_dropped_bytes`` that drains at ``dropped_bytes_per_second``; a kernel that
overflows it is flooding the gate, and ``on_fault`` stops it.
"""

from __future__ import annotations

import time

import zmq

from cellblock.gate.state import GateState

__all__ = ["KernelLinks", "monitor_event"]

_RESET_MARKER = (
    "[cellblock: the kernel's {channel} connection broke and came back; whatever it was "
    "sending then was dropped (a message over the {limit} MiB frame limit does this)]\n"
)


def monitor_event(frames: list[bytes]) -> tuple[int, int]:
    """The event number and value (a descriptor for ACCEPTED and DISCONNECTED) of one
    libzmq monitor message (its first frame: u16 event, u32 value). Raises ValueError for
    anything else."""
    if not frames or len(frames[0]) < 6:
        raise ValueError("not a monitor message")
    head = frames[0]
    return int.from_bytes(head[:2], "little"), int.from_bytes(head[2:6], "little")


class KernelLinks(GateState):
    """Mixed into :class:`~cellblock.gate.relay.Gate`: connections, dropped bytes, faults."""

    def _fault(self, reason: str, fields: dict[str, object], text: str) -> None:
        """Once per jail: audit ``gate.fault`` and ask the warden to stop the kernel."""
        if self._faulted:
            return
        self._faulted = True
        self._emit("gate.fault", {"reason": reason, **fields})
        if self._on_fault is not None:
            try:
                self._on_fault(text)
            except Exception:  # the warden's callback must not stop the relay
                self.audit_errors += 1

    def _spent_dropped(self, size: int) -> None:
        limits = self._limits
        now = time.monotonic()
        drained = (now - self._dropped_at) * limits.dropped_bytes_per_second
        self._dropped = max(0.0, self._dropped - drained) + size
        self._dropped_at = now
        if self._dropped > limits.max_dropped_bytes:
            self._fault("dropped_bytes", {"bytes": int(self._dropped)},
                        f"it sent more than {limits.max_dropped_bytes >> 20} MiB the gate had to "
                        "drop (messages bound to no open request, malformed, or over a bound)")

    def _connection_event(self, channel: str, frames: list[bytes]) -> None:
        """A kernel-facing socket accepted or lost a connection (libzmq's monitor). The
        kernel reconnects by itself; the gate counts, and tells open requests what a
        broken connection lost."""
        try:
            event, fd = monitor_event(frames)
        except ValueError:
            return
        live = self._live.setdefault(channel, set())
        if event == zmq.EVENT_DISCONNECTED:
            live.discard(fd)
            if not live:  # another connection (a second socket of the kernel's) may remain
                self._up.discard(channel)
                self._broken.add(channel)
            return
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if not live:
                return
            self._up.add(channel)
            self._check_ready()
            if channel in self._broken:
                self._broken.discard(channel)
                self._emit("gate.reconnect", {"channel": channel, "reason": "kernel_reconnected",
                                              "connections": self._accepts.get(channel, 0)})
                self._mark_open_requests(_RESET_MARKER.format(
                    channel=channel, limit=self._limits.max_frame_bytes >> 20))
                held = [m for m in self._down_held if m[0] == channel]
                self._down_held = [m for m in self._down_held if m[0] != channel]
                for held_channel, message in held:
                    self._from_client(held_channel, message)
            return
        if event != zmq.EVENT_ACCEPTED:
            return
        live.add(fd)
        count = self._accepts[channel] = self._accepts.get(channel, 0) + 1
        if count > self._limits.max_kernel_connections:
            self._fault("too_many_connections", {"channel": channel, "connections": count},
                        f"its {channel} connection to the warden was made {count} times "
                        f"(at most {self._limits.max_kernel_connections} in a kernel's life)")

    def _check_ready(self) -> None:
        if len(self._up) == len(self._monitors):
            self._kernel_connected.set()
            if self._kernel_welcomed:
                self._kernel_ready.set()
