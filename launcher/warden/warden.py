"""The warden: one host process per kernel that owns the jail.

Forked by the spawner (:mod:`cellblock.warden.spawner`) for each launch the provisioner asks
for (:func:`cellblock.warden.life.run_forked`). It

1. dies with the client: it watches the client process through a pidfd (inherited from
   the spawner), so a killed client leaves nothing, even if the spawner died first;
2. makes the run dir, a fresh kernel HMAC key and the inner connection file, and binds
   the five kernel-facing sockets in the run dir's ``ipc/`` (read-only in the jail: the
   kernel connects, the host never follows a path the jail can write), and the egress
   proxy's if the profile has network (:mod:`cellblock.egress`);
3. makes the kernel's cgroup and starts nsjail inside it; once the kernel answers, opens the
   jail's network sink (:mod:`cellblock.egress.sink`: DNS and UDP from the jail, audited);
4. runs the gate between the client's connection (tcp, client key) and the kernel's (ipc);
5. reports ``ready`` (or the error, in words) on the launch's socket to the provisioner, and
   serves the client's file requests (inbox, outbox: :mod:`cellblock.warden.files`);
6. watches nsjail; when the jail ends it tells the client why on iopub ("cellblock: kernel
   stopped, memory limit 1 GiB exceeded");
7. runs the profile's budgets (:mod:`cellblock.budgets`) from what the gate's observer sees:
   interrupts a cell past ``cell_seconds``, kills the jail after the grace and restarts it in
   place (same run dir, same client sockets, a fresh kernel key), stops the kernel past its
   lifetime, idle or output budget; SIGUSR1 (``cellblock kill``) stops it "by operator";
   every execution, interrupt, restart and exit is an audit event;
8. on every way out (shutdown, SIGTERM from the client, crash, the client's death) removes
   the processes, the cgroup and the run dir.

A warden for the warm pool does 2 and 3 ahead of time, under a ``pool-<hex>`` slot name,
then waits: for a launch to adopt it (:meth:`Warden.adopt`: the kernel id, the client's
connection and key, the grants; then 4 and 5), for its jail to end, or to be retired;
until then its audit events are held in memory, written to the kernel's log at adoption.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import signal
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Any

from ..audit import AuditLog, audit_dir
from ..budgets import BudgetClock, Stop
from ..cgroups import KernelCgroup, detect, own_cgroups
from ..datasets import check_grants
from ..egress.proxy import EgressProxy, start_egress
from ..errors import HostUnsupported, JailStartError
from ..jailcmd import JAIL_RUN, jail_command, locate_nsjail, resolve_python
from ..names import check_kernel_id
from ..policy import Policy, Profile, load_policy
from ..rundir import (
    STOP_REASON_FILE,
    RunDir,
    WardenRecord,
    jail_ids,
    process_start,
    release_uid,
    runtime_base,
    sweep_stale,
)
from ..staging import DatasetSetup, setup_datasets
from ..telemetry import Telemetry
from .budgeting import Bookkeeping, HeldAudit
from .files import ServesFiles
from .jail import JailProcess, death_reason
from .process import cap_address_space

if TYPE_CHECKING:
    from ..gate.kernelside import KernelSockets
    from ..gate.relay import Gate

log = logging.getLogger("cellblock.warden")

INNER_PORTS = {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5}
# Ready means the gate's iopub subscription to the kernel is live (ipykernel's
# iopub_welcome, sent when the kernel's iopub connects, after its shell, stdin and control).
# An adopted pooled kernel answered a kernel_info already; its welcome is waited for this
# long at most.
WELCOME_WAIT = 2.0
WELCOME_POLL = 0.05  # seconds between checks of the jail while waiting for the welcome


class Warden(Bookkeeping, ServesFiles):
    """Owns one kernel's jail for its whole life. Not reusable across restarts: jupyter_client
    restarts a kernel by starting a new warden on the same ports. The one restart a warden
    does itself is in place, when a cell outlives its grace (:meth:`_restart_in_place`): same
    run dir, cgroup, gate and client sockets.

    A cold launch calls :meth:`start`; the warm pool calls :meth:`start_pooled` and later
    :meth:`adopt`. ``kernel_id`` is the slot name (run dir, cgroup) and, for a cold launch, the
    kernel id too."""

    def __init__(self, kernel_id: str, profile_name: str, client_conn: dict[str, Any] | None,
                 datasets: tuple[str, ...] = (), *, pooled: bool = False,
                 policy: Policy | None = None) -> None:
        self.kernel_id = self.slot = kernel_id
        self.profile_name, self.client_conn = profile_name, client_conn
        self.policy = load_policy() if policy is None else policy
        self.profile: Profile = self.policy.profile(profile_name)
        self.run = RunDir(runtime_base(), kernel_id)
        self.cgroup: KernelCgroup | None = None
        self.warden_cgroup: KernelCgroup | None = None  # this process's, beside the jail's
        self._home_cgroups: dict[str, Any] = {}  # where this process was before it
        self.jail: JailProcess | None = None
        self.gate: Gate | None = None
        self.kernel_sockets: KernelSockets | None = None  # bound before the jail
        self.egress: EgressProxy | None = None  # the profile's network, if it has one
        self._fault: str | None = None  # the gate saw the kernel misbehave: stop it
        self.drops: dict[str, int] = {}
        self._stop_reason: str | None = None
        self._closed, self.pooled = False, pooled
        self.audit: AuditLog | HeldAudit = (
            HeldAudit() if pooled else AuditLog(audit_dir(self.policy.audit.dir), kernel_id))
        self.requested_datasets = datasets  # the launch's final selection
        self.datasets: DatasetSetup | None = None
        self.telemetry = None if pooled else Telemetry.from_env(kernel_id, profile_name)
        self.clock: BudgetClock | None = None  # made when the kernel is ready
        self._lock = threading.Lock()  # around self.clock: the gate thread feeds it
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.record: WardenRecord | None = None
        self.restarts = self._oom_base = self._pids_base = 0
        self._argv: list[str] = []
        self._inner: dict[str, Any] = {}
        self._ids = (0, 0)
        self._claimed: int | None = None  #: the jail uid claimed for this run dir (as root)
        self._started = time.monotonic()
        self.client_pidfd = -1  # the client process; readable once it is gone

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The nsjail process of the current jail (None before the first starts)."""
        return self.jail.proc if self.jail is not None else None

    # -- start ---------------------------------------------------------------

    def start(self) -> None:
        """Cold launch: set up everything, start the jail and the gate, return when the
        kernel is up. Raises CellblockError."""
        if self.client_conn is None:  # a cold launch's request always carries it
            raise JailStartError(f"kernel {self.kernel_id}: a launch without the client's "
                                 "connection info")
        self._prepare_jail()
        self._start_gate(self.client_conn)  # builds the output rules while the kernel boots
        self._wait_for_kernel()
        self._open_sink()
        self._ready()

    def start_pooled(self) -> None:
        """Warm pool: start the jail and wait until the kernel answers a kernel_info_request
        of the warden's own (it has booted completely); no client yet."""
        self._prepare_jail()
        self._probe_kernel()
        self._open_sink()
        self._set_state("pooled")

    def _probe_kernel(self) -> None:
        """One kernel_info round trip with the kernel, signed with the kernel key; raises
        JailStartError if it does not answer in its startup time, or as soon as its jail
        has ended."""
        def check() -> None:
            self._check_stopped()
            assert self.jail is not None and self.proc is not None
            if self.proc.poll() is not None:  # it will never answer: say so at once
                raise JailStartError(
                    f"kernel {self.kernel_id} (profile {self.profile_name!r}) exited "
                    f"during start with status {self.proc.returncode}; its last output (the "
                    f"kernel's own words):\n{self.jail.output_tail()}")

        sockets = self._bound_sockets()
        if not sockets.probe(self._started + self.profile.startup_timeout, check):
            raise JailStartError(f"kernel {self.kernel_id} did not answer kernel_info "
                                 "within the profile's startup_timeout")

    def adopt(self, kernel_id: str, client_conn: dict[str, Any],
              datasets: tuple[str, ...]) -> None:
        """A launch takes this pooled kernel: from now on it is ``kernel_id``, it speaks to
        the client with the client's key, and it has the launch's file datasets (a launch
        with directory datasets is never sent here). Raises CellblockError."""
        assert self.pooled and self.record is not None and self.datasets is not None
        held = self.audit
        self.kernel_id = check_kernel_id(kernel_id)
        self.client_conn = client_conn
        self.audit = AuditLog(audit_dir(self.policy.audit.dir), kernel_id)
        self.telemetry = Telemetry.from_env(kernel_id, self.profile_name)
        if isinstance(held, HeldAudit):
            for event, fields in held.events:
                self._record(event, **fields)
        self._record("kernel.adopt", pool_slot=self.slot,
                     pooled_seconds=round(time.monotonic() - self._started, 6))
        self.record.kernel_id = kernel_id
        self.record.client_ports = {k: int(v) for k, v in client_conn.items()
                                    if k.endswith("_port")}
        self.run.write_record(self.record)
        granted = check_grants(self.policy, self.profile_name, datasets)
        for name in granted:
            self.datasets.broker.grant(name)
        if granted:
            self._audit_write("broker.grant", granted=list(granted), origin="launch")
        self._started = time.monotonic()
        gate = self._start_gate(client_conn)
        gate.wait_kernel_ready(WELCOME_WAIT)  # connected and welcomed since the probe
        self._ready()

    def _kernel_conn(self) -> dict[str, Any]:
        return {**self._inner, "ip": str(self.run.ipc / "k")}

    def _prepare_jail(self) -> None:
        profile = self.policy.startable(self.profile_name)
        cg_version = None
        if profile.cgroups == "required":
            found = detect()
            if found.version is None:
                raise HostUnsupported(
                    f"profile {self.profile_name!r} requires cgroup limits but {found.reason}. "
                    "Fix: enable the memory, pids and cpu controllers, or set "
                    "cgroups = \"off\" in the profile"
                )
            cg_version = found.version
        cap_address_space(profile.limits.warden_memory)
        locate_nsjail(self.policy.host)  # fails now, before anything is made, if missing
        resolve_python(profile)
        sweep_stale(self.run.path.parent)

        uid, gid = jail_ids(self.policy.host.jail_uids, claim_for=self.run)
        self._claimed = uid
        layout = self.run.create(uid, gid)
        self.datasets = setup_datasets(
            run_path=self.run.path, policy=self.policy, profile_name=self.profile_name,
            requested=() if self.pooled else self.requested_datasets, jail_uid=uid,
            audit=self._audit_write,
        )
        record = WardenRecord(
            kernel_id=self.kernel_id, profile=self.profile_name, warden_pid=os.getpid(),
            jail_uid=uid, cgroup_version=cg_version,
            cgroup_parent=self.policy.host.cgroup_parent, started=time.time(),
            client_ports={k: int(v) for k, v in (self.client_conn or {}).items()
                          if k.endswith("_port")},
            slot=self.slot, warden_start=process_start(os.getpid()) or 0,
        )
        self.run.write_record(record)
        self.record = record
        if cg_version is not None:
            # What the kernel makes its warden spend (a flood, the gate's CPU) is charged to
            # a cgroup of the warden's own. Made once the record names it, for the sweep.
            self._home_cgroups = own_cgroups()
            self.warden_cgroup = KernelCgroup.create_for_warden(
                cg_version, self.policy.host.cgroup_parent, self.slot, profile.limits)
            self.warden_cgroup.join(0)
        self._ids = (uid, gid)
        kernel_key = secrets.token_hex(32)
        inner = {
            **INNER_PORTS, "transport": "ipc", "ip": f"{JAIL_RUN}/k", "key": kernel_key,
            "signature_scheme": "hmac-sha256", "kernel_name": "",
        }
        self.run.write_connection_file(inner, uid, gid)
        self._inner = inner
        from ..gate import GateLimits
        from ..gate.kernelside import KernelSockets

        self.kernel_sockets = KernelSockets(self._kernel_conn(), GateLimits(), owner=(uid, gid))
        self.kernel_sockets.bind()  # before the jail: the kernel connects to them
        self.egress = start_egress(profile.network, self.run.path, (uid, gid),
                                   self._audit_write, self._on_gate_fault)
        if cg_version is not None:
            self.cgroup = KernelCgroup.create(
                cg_version, self.policy.host.cgroup_parent, self.slot, profile.limits
            )
        argv = jail_command(self.policy, self.profile_name, layout, self.datasets.data_mounts)
        self._record(
            "kernel.start", profile=self.profile_name, policy_sha256=self.policy.digest(),
            nsjail_argv_sha256=hashlib.sha256("\0".join(argv).encode()).hexdigest(),
            jail_uid=uid, cgroup=cg_version, warden_pid=os.getpid(),
            budgets=profile.budgets.model_dump(mode="json"), pooled=self.pooled,
        )
        self._argv = argv
        self.jail = JailProcess.start(argv, self.cgroup, self.datasets)
        self.datasets.close_staged()  # attached in nsjail's mount namespace now
        self.datasets.broker.start()
        record.nsjail_pid = self.proc.pid if self.proc else None
        self.run.write_record(record)

    def _ready(self) -> None:
        with self._lock:
            self.clock = BudgetClock(self.profile.budgets, time.monotonic(),
                                     self.profile.audit_code_text)
        self._set_state("idle")
        self._serve_files()  # cellblock.files: the client's inbox and outbox requests
        self._record("kernel.ready", startup_seconds=round(time.monotonic() - self._started, 6))

    def _open_sink(self) -> None:
        if self.jail is not None:  # what the jail sends past the proxy, seen and audited
            self.jail.open_sink(self._audit_write, self.kernel_id)

    def _bound_sockets(self) -> KernelSockets:
        """The kernel-facing sockets (bound by :meth:`_prepare_jail` before any use)."""
        if self.kernel_sockets is None:
            raise JailStartError(f"kernel {self.kernel_id}: its sockets are not bound yet")
        return self.kernel_sockets

    def _start_gate(self, client_conn: dict[str, Any]) -> Gate:
        from ..gate import Gate
        from ..gate.tracker import CLIENT_TYPES

        # every known request if the profile does not list them, stdin only where it has it
        listed = self.profile.allowed_requests
        allowed = set(set().union(*CLIENT_TYPES.values()) if listed is None else listed)
        allowed.discard("input_reply")
        if self.profile.allow_stdin:
            allowed.add("input_reply")
        sockets = self._bound_sockets()
        self.gate = gate = Gate(
            client=client_conn,
            kernel=sockets,
            limits=sockets.limits,
            rules=self._output_rules(),
            audit=self._audit,
            allowed_client_msg_types=frozenset(allowed),
            observer=self._observe,
            on_fault=self._on_gate_fault,
        )
        gate.start()
        return gate

    def _on_gate_fault(self, reason: str) -> None:
        """The gate's thread: the kernel misbehaved in a way that costs the host (its
        connections keep coming back). Wake the main thread, which stops it."""
        self._fault = reason
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"!")

    def _wait_for_kernel(self) -> None:
        """Return once the kernel has connected its five sockets and its iopub has welcomed
        the gate; raise if the jail ended or took longer than the profile's
        startup_timeout."""
        deadline = time.monotonic() + self.profile.startup_timeout
        assert self.proc is not None and self.gate is not None
        while not self.gate.wait_kernel_ready(WELCOME_POLL):
            assert self.jail is not None
            if self.proc.poll() is not None:
                raise JailStartError(
                    f"kernel {self.kernel_id} (profile {self.profile_name!r}) exited during "
                    f"start with status {self.proc.returncode}; its last output (the "
                    f"kernel's own words):\n{self.jail.output_tail()}"
                )
            if time.monotonic() > deadline:
                raise JailStartError(
                    f"kernel {self.kernel_id} did not connect to the warden within "
                    f"{self.profile.startup_timeout:.0f} s (profile startup_timeout)"
                )
            self._check_stopped()

    def _check_stopped(self) -> None:
        """During a start: give up (and clean up) once a stop signal has arrived."""
        if self._stop_reason is not None:
            raise JailStartError(f"kernel {self.kernel_id}: stopped during its start "
                                 f"({self._stop_reason})")

    # -- run -------------------------------------------------------------------

    def wait(self) -> int:
        """Block until the jail ends, a stop signal arrives or a budget stops the kernel;
        return the exit status. Budgets act here, on the warden's main thread."""
        assert self.jail is not None and self.proc is not None
        stop = self._watch(self._signal_fd())
        if self._stop_reason == "SIGUSR1":  # cellblock kill
            text = self.run.read_text(STOP_REASON_FILE, 200)
            stop = Stop("stopped by operator" + (f": {text}" if text else ""), "operator")
        if stop is not None:
            self._set_state("stopping")
            self.jail.stop()
            self._end_executions("stopped")
            evalue = ("cellblock: kernel " if stop.budget == "operator"
                      else "cellblock: kernel stopped, ") + stop.reason
            if self.gate is not None:
                self.gate.announce("CellblockKernelStopped", evalue, replies=True)
            self._record("kernel.exit", reason=stop.reason, budget=stop.budget,
                         status=self.proc.returncode, **self._totals())
            return 1
        if self._stop_reason is not None:
            self.jail.stop()
            self._end_executions("stopped")
            self._record("kernel.exit", reason=f"stopped ({self._stop_reason})",
                         status=self.proc.returncode, **self._totals())
            return 0
        status = self.proc.wait()
        reason = death_reason(
            status, limits=self.profile.limits, cgroup=self.cgroup, oom_base=self._oom_base,
            pids_base=self._pids_base,
            shutdown_requested=self.gate is not None and self.gate.shutdown_requested)
        self._end_executions("lost")
        self._record("kernel.exit", reason=reason or "shutdown requested", status=status,
                     **self._totals())
        if reason:
            log.warning("kernel %s: %s", self.kernel_id, reason)
            if self.gate is not None:
                self.gate.announce("CellblockKernelStopped", f"cellblock: kernel stopped, {reason}")
        return 0 if reason is None else 1

    def _signal_fd(self) -> int:
        """Catch the stop signals (once); return the fd that becomes readable on one."""
        if getattr(self, "_sigfd", None) is None:
            rfd, wfd = os.pipe()
            os.set_blocking(rfd, False)
            os.set_blocking(wfd, False)
            signal.set_wakeup_fd(wfd)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                signal.signal(sig, self._on_signal)
            self._sigfd = rfd
        return self._sigfd

    def _client_gone(self, ready: list[int]) -> bool:
        if self.client_pidfd >= 0 and self.client_pidfd in ready:
            self._stop_reason = "client exited"
            return True
        return False

    def _set_state(self, state: str) -> None:
        """Publish the kernel's state in warden.json (read by `cellblock ps`)."""
        record = self.record
        if record is None or record.state == state:
            return
        record.state = state
        with contextlib.suppress(OSError):
            self.run.write_record(record)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop_reason = signal.Signals(signum).name

    # -- cleanup ---------------------------------------------------------------

    def close(self) -> None:
        """Remove everything this warden made. Idempotent; safe after a failed start."""
        if self._closed:
            return
        self._closed = True
        self._close_files()
        if self.jail is not None:
            self.jail.stop()
        parts: list[Any] = [self.gate, self.kernel_sockets, self.egress]
        for part in parts:
            if part is not None:
                with contextlib.suppress(Exception):
                    part.close()
        if self.cgroup is not None:
            self.cgroup.remove()
        if self.datasets is not None:
            self.datasets.close_staged()
            self.datasets.broker.close()
        if self.run.created:  # never a run dir that was there before (another warden's)
            self.run.remove()
        if self._claimed is not None:
            release_uid(self.run, self._claimed)
        counted = {k: v for k, v in self.drops.items() if v > 100}
        if counted:
            self.audit.write("gate.drop_counts", counts=counted)
        self.audit.close()
        if self.telemetry is not None:
            self.telemetry.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.warden_cgroup is not None:  # last: this process leaves it, then removes it
            self.warden_cgroup.leave(self._home_cgroups)
            self.warden_cgroup.remove_empty()
