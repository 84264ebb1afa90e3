"""The containment notebooks (``notebooks/containment/``), run through nbclient on real
jailed kernels, and the attacks that end a kernel, run from here.

Every case cell of a containment notebook tries one attack from THREATS.md and prints
``HELD <case>`` only if it failed exactly as expected (an errno, an exception, a
signal); a cell whose outcome can only be seen outside the jail (what the gate let
through, what reached a host listener) prints ``SENT <case>`` and a host check here
decides. A case passes only if its cell printed its own token and nothing else, raised
nothing, and its host check (if any) passed. The notebooks' case lists are pinned, so a
deleted cell fails the inventory test.

Host facts are checked on the host: listeners on the host's loopback (TCP, IPv6, UDP,
abstract unix) that must see no connection, dataset files that must be unchanged, the
run dir that must hold no core file, processes that must not outlive their kernel.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from containment import (
    NOTEBOOKS,
    Run,
    case_params,
    cases_of,
    check_case,
    execute,
    inject,
    load,
    output_text,
    run_once,
    start_kernel,
)
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.session import Session
from nbformat import NotebookNode

from conftest import BIN, REPO, TEST_POLICY, audit_events, wait_dead, wait_for


def jailed(test: Any) -> Any:
    """Marks a test that starts real jails (it runs unprivileged too, and must leave
    nothing behind). The inventory test starts none."""
    for mark in (pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers")):
        test = mark(test)
    return test


ROOT = os.geteuid() == 0
GROUPS = {"N": "network", "F": "filesystem", "K": "process", "R": "resources",
          "S": "persistence", "B": "broker"}

# What each notebook must contain, in order: a deleted or renamed cell fails the
# inventory test, and so does a new one until it is listed here.
INVENTORY: dict[str, list[str]] = {
    "network": ["N1", "N3", "N4", "N4b", "N5", "N8", "N8b", "N2", "N2b", "N2c", "N2d", "N9",
                "N10", "N10b", "N6", "N6b", "N7", "N11", "N11b", "N12", "N13", "N14", "N14b",
                "N16", "N16b"],
    "filesystem": ["F1", "F1b", "F1c", "F2", "F3", "F4", "F6", "F7", "F19", "F5", "F8", "F9",
                   "F9b", "F9c", "F9d", "F9e", "F15", "F20", "F21", "F22", "F23", "F24", "F25"],
    "process": ["K1", "K2", "K4", "K5", "K6", "K17", "K3", "K7", "K8", "K9", "K10", "K11", "K12",
                "K13", "K14", "K18", "K15", "K16", "K16b", "K19", "S6", "S7"],
    "resources": ["R1", "R2", "R14", "R3", "R4", "R4b", "R5", "R5b", "R7", "R7b"],
    "output": ["R8", "R9", "R10", "R18", "R19", "R20", "N16c"],
    "datasets": ["F11", "F12", "F13", "F14", "F15b", "B9", "B10", "F16", "F17", "F18", "N15",
                 "B11", "B12", "B13", "R17"],
    "persistence-plant": [],
    "persistence-check": ["S1", "S5", "S2", "S2b", "F10", "S8", "S9"],
    "cpu": ["R11", "R12", "R12b"],
}
GROUP_COUNTS = {"network": 27, "filesystem": 32, "process": 20, "persistence": 8,
                "resources": 20, "broker": 5}


# -- inventory ---------------------------------------------------------------------------

def test_inventory_is_pinned() -> None:
    """Every notebook holds exactly the cases listed, once each, in order; one markdown
    heading per group names them; the counts per group are as pinned."""
    found = {p.stem: [c.case for c in cases_of(p.stem)] for p in NOTEBOOKS.glob("*.ipynb")}
    assert found == INVENTORY
    counts: dict[str, int] = {}
    for ids in found.values():
        assert len(ids) == len(set(ids)), ids
        for case in ids:
            group = GROUPS[case[0]]
            counts[group] = counts.get(group, 0) + 1
    assert counts == GROUP_COUNTS
    for name in found:
        nb = load(name)
        helpers = [c for c in nb.cells if "helpers" in c.metadata.get("tags", [])]
        assert len(helpers) == 1, name
        assert helpers[0].source == load("network").cells[1].source, f"{name}: helpers differ"
        for c in cases_of(name, nb):
            source = nb.cells[c.index].source
            word = "held" if c.verdict == "kernel" else "sent"
            assert f'{word}("{c.case}"' in source or f"{word.upper()} {c.case}:" in source, \
                f"{name} {c.case}: no {word}() call"
            assert source.startswith(f"# {c.case}: "), f"{name} {c.case}: no heading comment"
        headings = " ".join(c.source for c in nb.cells if c.cell_type == "markdown")
        for c in cases_of(name, nb):
            base = re.sub(r"[a-z]$", "", c.case)
            assert re.search(rf"\b{base}\b", headings), f"{name}: no markdown cell names {base}"


# -- network ----------------------------------------------------------------------------

@contextlib.contextmanager
def host_listeners() -> Iterator[dict[str, Any]]:
    """Real services on the host's loopback: TCP on 127.0.0.1 and ::1, UDP on 127.0.0.1,
    and an abstract unix socket. Non-blocking, so a check can see whether anything came."""
    tcp = socket.create_server(("127.0.0.1", 0))
    tcp6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    abstract = f"cellblock-containment-{secrets.token_hex(6)}"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind("\0" + abstract)
    unix.listen()
    socks = [tcp, tcp6, udp, unix]
    for s in socks:
        s.setblocking(False)
    try:
        yield {"HOST_TCP_PORT": tcp.getsockname()[1], "HOST_TCP6_PORT": tcp6.getsockname()[1],
               "HOST_UDP_PORT": udp.getsockname()[1], "HOST_ABSTRACT": abstract,
               "_socks": socks}
    finally:
        for s in socks:
            s.close()


def arrivals(socks: list[socket.socket]) -> list[str]:
    """What reached the host listeners (nothing, if the jail's network held)."""
    seen = []
    for s in socks:
        with contextlib.suppress(BlockingIOError):
            while True:
                if s.type == socket.SOCK_DGRAM:
                    seen.append(f"datagram {s.recvfrom(512)!r}")
                else:
                    conn, addr = s.accept()
                    conn.close()
                    seen.append(f"connection from {addr!r}")
    return seen


async def run_network() -> Run:
    with host_listeners() as params:
        socks = params.pop("_socks")
        km = await start_kernel("agent")
        try:
            info = km.get_connection_info()
            params["GATE_PORTS"] = [info[k] for k in ("shell_port", "iopub_port",
                                                      "stdin_port", "control_port", "hb_port")]
            nb = await execute(inject(load("network"), params), km)
        finally:
            await km.shutdown_kernel(now=False)
        events = audit_events(km.kernel_id)
        return Run("network", nb, {
            "arrivals": arrivals(socks),
            "denied": [e.fields for e in events if e.event == "net.denied"],
            "sink_unavailable": [e.fields for e in events
                                 if e.event == "net.sink_unavailable"]})


def no_remote_url(run: Run, cell: NotebookNode) -> None:
    """N16: the client got the output, with every remote URL removed or the HTML withheld."""
    text = output_text(cell)
    assert "evil.tld" not in text, text
    assert "#cellblock-remote-url-removed" in text or \
        "[cellblock: withheld text/html (not allowed by the profile)]" in text, text


def nothing_arrived(run: Run, cell: NotebookNode) -> None:
    assert run.host["arrivals"] == [], run.host["arrivals"]


def udp_audited(run: Run, cell: NotebookNode) -> None:
    """N3: the warden's sink saw the datagram and audited it as a refusal."""
    assert any(d.get("via") == "udp" and d["address"] == "8.8.8.8" and d["port"] == 53
               and "the jail has no network" in d["reason"] for d in run.host["denied"]), \
        run.host["denied"]


NETWORK_HOST_CHECKS = {"N2": nothing_arrived, "N2b": nothing_arrived, "N2c": nothing_arrived,
                       "N3": udp_audited, "N9": nothing_arrived, "N16": no_remote_url,
                       "N16b": no_remote_url}


@jailed
@pytest.mark.parametrize("case", case_params("network"))
def test_network(case: str) -> None:
    check_case(run_once("network", run_network), case, NETWORK_HOST_CHECKS.get(case))


def failing_cases(run: Run, host_checks: dict[str, Callable[[Run, NotebookNode], None]]
                  ) -> set[str]:
    failed = set()
    for c in cases_of(run.name, run.nb):
        try:
            check_case(run, c.case, host_checks.get(c.case))
        except AssertionError:
            failed.add(c.case)
    return failed


@jailed
async def test_network_probes_fail_without_the_network_namespace(
        tmp_path: Path, jupyter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The control run: the same notebook in a jail that shares the host's network
    namespace (the committed profile with ``clone_newnet: false``). The loopback probes
    fail there and the host listeners see the connections, so in the real jail they can
    only pass because the namespace holds."""
    base = (REPO / "nsjail-configs" / "python-kernel-no-net.cfg").read_text()
    assert base.count("clone_newnet: true") == 1
    weak = tmp_path / "shared-net.cfg"
    weak.write_text(base.replace("clone_newnet: true", "clone_newnet: false"))
    policy = tmp_path / "policy.toml"
    policy.write_text(TEST_POLICY + f'\n[profiles.agent]\nnsjail_config = "{weak}"\n')
    monkeypatch.setenv("CELLBLOCK_POLICY", str(policy))
    run = await run_network()
    failed = failing_cases(run, NETWORK_HOST_CHECKS)
    assert {"N2", "N2b", "N2c", "N2d", "N9"} <= failed, failed
    assert any(a.startswith("connection") for a in run.host["arrivals"]), run.host
    assert any(a.startswith("datagram") for a in run.host["arrivals"]), run.host
    # The warden's network sink refused to enter a namespace that is the host's own: its
    # rule and route would have made every address local for UDP on the host.
    assert any("shares this host's net namespace" in f["reason"]
               for f in run.host["sink_unavailable"]), run.host["sink_unavailable"]
    ip = shutil.which("ip")
    if ip is not None:
        for args in (["rule", "show"], ["-6", "rule", "show"]):
            rules = subprocess.run([ip, *args], capture_output=True, text=True).stdout
            assert "lookup 203" not in rules, rules
        for args in (["route", "show", "table", "203"], ["-6", "route", "show", "table", "203"]):
            routes = subprocess.run([ip, *args], capture_output=True, text=True).stdout
            assert not routes.strip(), routes


# -- filesystem -------------------------------------------------------------------------

async def run_filesystem() -> Run:
    km = await start_kernel("agent")
    try:
        params = {"HOST_ROOT": ROOT, "HOST_USER": getpass.getuser()}
        nb = await execute(inject(load("filesystem"), params), km)
    finally:
        await km.shutdown_kernel(now=False)
    return Run("filesystem", nb)


@jailed
@pytest.mark.parametrize("case", case_params("filesystem"))
def test_filesystem(case: str) -> None:
    check_case(run_once("filesystem", run_filesystem), case, None)


# -- processes and kernel interfaces ----------------------------------------------------

def warden_pid(km: AsyncKernelManager) -> int:
    provisioner = km.provisioner
    assert provisioner is not None and provisioner.process is not None  # type: ignore[attr-defined]
    return int(provisioner.process.pid)  # type: ignore[attr-defined]


def core_files(run_dir: Path) -> list[str]:
    return [str(p) for p in run_dir.rglob("core*")] if run_dir.is_dir() else []


async def run_process() -> Run:
    km = await start_kernel("agent")
    run_dir = Path(os.environ["CELLBLOCK_RUNTIME_DIR"]) / str(km.kernel_id)
    # In a container the host's pids are small and may equal the jail's own (K17 skips
    # those): a process started after the jail has a pid above every jail pid so far.
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        params = {"HOST_PIDS": [os.getpid(), warden_pid(km), sleeper.pid]}
        nb = await execute(inject(load("process"), params), km)
        alive = await km.is_alive()
        cores = core_files(run_dir)
        assert sleeper.poll() is None, "K17 reached a host process"
    finally:
        sleeper.kill()
        sleeper.wait()
        await km.shutdown_kernel(now=False)
    return Run("process", nb, {"alive": alive, "cores": cores})


def kernel_survived(run: Run, cell: NotebookNode) -> None:
    """K17: the host processes the jail tried to signal, and the kernel, are fine."""
    assert run.host["alive"]


def no_core_on_host(run: Run, cell: NotebookNode) -> None:
    """K19/S10: nothing named core* appeared in the kernel's run dir on the host."""
    assert run.host["cores"] == [], run.host["cores"]


PROCESS_HOST_CHECKS = {"K17": kernel_survived, "K19": no_core_on_host}


@jailed
@pytest.mark.parametrize("case", case_params("process"))
def test_process(case: str) -> None:
    check_case(run_once("process", run_process), case, PROCESS_HOST_CHECKS.get(case))


# -- resources --------------------------------------------------------------------------

def tiny_limits() -> dict[str, int]:
    """The tiny profile's limits from conftest's TEST_POLICY, in bytes and counts."""
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}

    def size(text: str) -> int:
        number, unit = re.fullmatch(r"(\d+)(KiB|MiB|GiB)", text).groups()  # type: ignore[union-attr]
        return int(number) * units[unit]

    limits = tomllib.loads(TEST_POLICY)["profiles"]["tiny"]["limits"]
    return {"MEMORY": size(limits["memory"]), "PIDS": limits["pids"],
            "TMP_SIZE": size(limits["tmp_size"]), "HOME_SIZE": size(limits["home_size"]),
            "OPEN_FILES": limits["open_files"]}


async def run_resources() -> Run:
    km = await start_kernel("tiny")
    try:
        nb = await execute(inject(load("resources"), tiny_limits()), km)
        alive = await km.is_alive()
    finally:
        await km.shutdown_kernel(now=False)
    return Run("resources", nb, {"alive": alive})


@jailed
@pytest.mark.parametrize("case", case_params("resources"))
def test_resources(case: str) -> None:
    run = run_once("resources", run_resources)
    check_case(run, case, None)
    assert run.host["alive"], "the kernel did not survive the resource notebook"


# -- output floods ----------------------------------------------------------------------

MARKER = re.compile(r"\[cellblock [0-9a-f]{6}: [0-9,]+ bytes(, [0-9,]+ lines)? of stdout "
                    r"truncated(; the rest is kept: read_output\(execution=\d+, offset=\d+\))?\]")
AGENT_STREAM = (16 + 4) * 1024  # the agent profile's stream_head + stream_tail


def streams(cell: NotebookNode) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream")


def bounded_with_marker(run: Run, cell: NotebookNode) -> None:
    """R8, R9, R18, R19: the client got the head, one truncation marker and the tail."""
    text = streams(cell)
    assert len(text.encode()) < AGENT_STREAM + 1024, len(text)
    assert len(MARKER.findall(text)) == 1, text[-2000:]


def image_withheld(run: Run, cell: NotebookNode) -> None:
    """R10: the 50 MB image was replaced by a note; nothing of it reached the client."""
    assert all("image/png" not in o.get("data", {}) for o in cell.outputs)
    assert "[cellblock: withheld image/png of 50,000,000 bytes (limit 524,288)]" \
        in output_text(cell)


def image_refused_by_header(run: Run, cell: NotebookNode) -> None:
    """R20: the PNG bomb did not reach the client: the gate read its header (16000x16000,
    over the agent's image budget) and withheld it, with its exact size in bytes, without
    inflating it."""
    text = output_text(cell)
    assert all("image/png" not in o.get("data", {}) for o in cell.outputs)
    sent = re.search(r"SENT R20: (\d+) bytes sha256", text)
    assert sent, text
    assert f"withheld image/png 16000x16000 px, {int(sent[1]):,} bytes (over this profile's " \
        "image budget" in text, text


def svg_withheld(run: Run, cell: NotebookNode) -> None:
    """N16c: for the agent, SVG is not an allowed MIME type; no URL got through."""
    assert "evil.tld" not in output_text(cell)
    assert "[cellblock: withheld image/svg+xml (not allowed by the profile)]" in output_text(cell)


OUTPUT_HOST_CHECKS = {"R8": bounded_with_marker, "R9": bounded_with_marker,
                      "R10": image_withheld, "R18": bounded_with_marker,
                      "R19": bounded_with_marker, "R20": image_refused_by_header,
                      "N16c": svg_withheld}


async def run_output() -> Run:
    km = await start_kernel("agent")
    try:
        nb = await execute(inject(load("output"), {}), km)
        alive = await km.is_alive()
    finally:
        await km.shutdown_kernel(now=False)
    return Run("output", nb, {"alive": alive})


@jailed
@pytest.mark.parametrize("case", case_params("output"))
def test_output(case: str) -> None:
    run = run_once("output", run_output)
    check_case(run, case, OUTPUT_HOST_CHECKS.get(case))
    assert run.host["alive"], "the kernel did not survive the output notebook"


# -- datasets and the broker ------------------------------------------------------------

SALES = "day,amount\n1,10\n2,20\n"


def make_datasets(top: Path) -> str:
    """World-writable dataset files on the host, a symlink and a FIFO among them; returns
    the policy text that names them (the test policy plus datasets for the agent)."""
    d = top / "data"
    (d / "weather").mkdir(parents=True)
    (d / "sales.csv").write_text(SALES)
    (d / "notes.txt").write_text("meeting notes\n")
    (d / "weather" / "jan.csv").write_text("jan\n")
    (d / "weather" / "shadow").symlink_to("/etc/shadow")
    (d / "leak.csv").symlink_to("/etc/shadow")
    os.mkfifo(d / "pipe.csv")
    for p in [top, d, d / "weather"]:
        os.chmod(p, 0o777 if p != top else 0o755)
    for p in [d / "sales.csv", d / "notes.txt", d / "weather" / "jan.csv"]:
        os.chmod(p, 0o666)
    names = {"sales": "sales.csv", "weather": "weather", "notes": "notes.txt",
             "leak": "leak.csv", "pipe": "pipe.csv"}
    text = TEST_POLICY + "".join(f'\n[datasets.{n}]\npath = "{d / f}"\n' for n, f in names.items())
    return text + f"\n[profiles.agent]\ndatasets = {json.dumps(list(names))}\n"


def host_dataset_state(top: Path) -> dict[str, Any]:
    d = top / "data"
    return {"sales": (d / "sales.csv").read_text(), "jan": (d / "weather" / "jan.csv").read_text(),
            "modes": [oct(os.stat(p).st_mode & 0o777) for p in (d / "sales.csv",
                                                               d / "weather" / "jan.csv")],
            "weather": sorted(p.name for p in (d / "weather").iterdir()),
            "tmp_alias": (d / "alias").exists()}


async def run_datasets() -> Run:
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="cellblock-containment-"))
    policy = top / "policy.toml"
    policy.write_text(make_datasets(top))
    old = os.environ["CELLBLOCK_POLICY"]
    os.environ["CELLBLOCK_POLICY"] = str(policy)
    try:
        env = {**os.environ, "CELLBLOCK_DATASETS": "sales,weather,notes,leak,pipe"}
        km = await start_kernel("agent", env=env)

        async def revoke_notes(km: AsyncKernelManager) -> None:
            out = subprocess.run([str(BIN / "cellblock"), "revoke", str(km.kernel_id), "notes"],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr

        try:
            nb = await execute(inject(load("datasets"), {"HOST_ROOT": ROOT}), km,
                               hooks={"B13": revoke_notes})
        finally:
            await km.shutdown_kernel(now=False)
        return Run("datasets", nb, {"files": host_dataset_state(top)})
    finally:
        os.environ["CELLBLOCK_POLICY"] = old
        shutil.rmtree(top, ignore_errors=True)


def host_files_unchanged(run: Run, cell: NotebookNode) -> None:
    assert run.host["files"] == {"sales": SALES, "jan": "jan\n", "modes": ["0o666", "0o666"],
                                 "weather": ["jan.csv", "shadow"], "tmp_alias": False}


DATASET_HOST_CHECKS = {case: host_files_unchanged for case in ("F11", "F12", "F13", "F14",
                                                                "F15b")}


@jailed
@pytest.mark.parametrize("case", case_params("datasets"))
def test_datasets(case: str) -> None:
    check_case(run_once("datasets", run_datasets), case, DATASET_HOST_CHECKS.get(case))


# -- persistence across kernels and restarts --------------------------------------------

KEYHASH = re.compile(r"KEYHASH ([0-9a-f]{64})")


def keyhash(nb: NotebookNode) -> str:
    found = KEYHASH.findall("".join(output_text(c) for c in nb.cells))
    assert len(found) == 1, found
    return found[0]


async def run_persistence() -> list[Run]:
    """Kernel A plants; kernel B starts while A runs and checks; A restarts and checks."""
    marker = f"cellblock-persist-{secrets.token_hex(6)}"
    params = {"MARKER_REVERSED": marker[::-1]}
    runtime = Path(os.environ["CELLBLOCK_RUNTIME_DIR"])
    a = await start_kernel("agent")
    try:
        plant = await execute(inject(load("persistence-plant"), params), a)
        planted_on_host = (runtime / str(a.kernel_id) / "ipc" / marker).is_file()
        b = await start_kernel("agent")
        try:
            other = await execute(inject(load("persistence-check"), params), b)
        finally:
            await b.shutdown_kernel(now=False)
        await a.restart_kernel(now=False)
        left_after_restart = [str(p) for p in runtime.rglob(f"*{marker}*")]
        restarted = await execute(inject(load("persistence-check"), params), a)
    finally:
        await a.shutdown_kernel(now=False)
    host = {"planted_on_host": planted_on_host, "left_after_restart": left_after_restart,
            "plant_key": keyhash(plant)}
    return [Run("persistence-plant", plant, host),
            Run("persistence-other", other, {**host, "key": keyhash(other)}),
            Run("persistence-restart", restarted, {**host, "key": keyhash(restarted)})]


def new_key_and_nothing_left(run: Run, cell: NotebookNode) -> None:
    """S8: a new HMAC key; the plant tried in the ipc dir (a host directory, read-only in
    the jail: H1) never reached the host, and nothing of it is anywhere after the restart."""
    assert run.host["key"] != run.host["plant_key"]
    assert not run.host["planted_on_host"]
    assert run.host["left_after_restart"] == []


@jailed
@pytest.mark.parametrize("situation", ["other", "restart"])
@pytest.mark.parametrize("case", case_params("persistence-check"))
def test_persistence(case: str, situation: str) -> None:
    run = run_once(f"persistence-{situation}", run_persistence)
    check_case(run, case, new_key_and_nothing_left if case == "S8" else None)


# -- CPU time ---------------------------------------------------------------------------

CELL_LIMIT = "CellblockBudget: cellblock: cell exceeded 1.5 s wall-clock limit"
CPU_ERRORS = {
    "R11": (f"{CELL_LIMIT}; kernel interrupted",),
    "R12": (f"{CELL_LIMIT}; kernel interrupted",
            f"{CELL_LIMIT}; kernel killed after 1 s grace and restarted"),
}


async def until_output_flows(km: AsyncKernelManager) -> None:
    """Before R12b: the kernel restarted in place answers, and the first cell a new client
    sends it at once has its output (the warden waits for the new kernel's iopub welcome
    and holds requests until then: nothing may be lost, so there is one try).
    The client has a session of its own: message ids must not repeat nbclient's."""
    kc = km.client(session=Session(key=km.session.key))
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        out = await collect(kc, "print('flowing')", timeout=30)
        assert out["stdout"] == "flowing\n", out
    finally:
        kc.stop_channels()


async def run_cpu() -> Run:
    km = await start_kernel("cell")
    try:
        ports = km.get_connection_info()
        nb = await execute(inject(load("cpu"), {}), km, hooks={"R12b": until_output_flows})
        same_ports = km.get_connection_info() == ports
        alive = await km.is_alive()
    finally:
        await km.shutdown_kernel(now=False)
    return Run("cpu", nb, {"alive": alive, "same_ports": same_ports})


def restarted_in_place(run: Run, cell: NotebookNode) -> None:
    """R12: the budget killed the jail and restarted it behind the same ports."""
    assert run.host["alive"] and run.host["same_ports"]


@jailed
@pytest.mark.parametrize("case", case_params("cpu"))
def test_cpu(case: str) -> None:
    run = run_once("cpu", run_cpu)
    check_case(run, case, restarted_in_place if case == "R12" else None,
               CPU_ERRORS.get(case, ()))


# -- attacks that end a kernel, run from here -------------------------------------------

async def collect(kc: Any, code: str, timeout: float = 120) -> dict[str, Any]:
    """Execute ``code``; everything the client sees for it until its idle."""
    msg_id = kc.execute(code)
    out: dict[str, Any] = {"stdout": "", "errors": []}
    while True:
        msg = await kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out["stdout"] += content["text"]
        elif kind == "error":
            out["errors"].append(content["evalue"])
        elif kind == "status" and content["execution_state"] == "idle":
            return out


def kernel_dirs(km: AsyncKernelManager) -> list[Path]:
    """The kernel's run dir and cgroup dirs on the host (those that exist)."""
    kid = str(km.kernel_id)
    parent = os.environ["CELLBLOCK_CGROUP_PARENT"]
    candidates = [Path(os.environ["CELLBLOCK_RUNTIME_DIR"]) / kid] + [
        Path("/sys/fs/cgroup") / c / parent / kid for c in ("", "memory", "pids", "cpu")]
    return [p for p in candidates if p.is_dir()]


MEMORY_STOP = "cellblock: kernel stopped, memory limit 256 MiB exceeded"
KERNEL_ENDERS = {
    # R3: touch memory until the memory cgroup's OOM killer ends the kernel.
    "R3b": ("x = []\nwhile True:\n    x.append(b'x' * (10 << 20))", MEMORY_STOP),
    # R13: deep recursion through C (map) overflows the 8 MiB stack: SIGSEGV.
    "R13": ("import sys\nsys.setrecursionlimit(10**9)\n"
            "def f(n):\n    return list(map(f, [n + 1]))\nf(0)",
            "cellblock: kernel stopped, killed by signal SIGSEGV"),
    # R13b: deep pure-Python recursion: Python 3.11 keeps its frames on the heap, so this
    # one ends at the memory limit instead.
    "R13b": ("import sys\nsys.setrecursionlimit(10**9)\nf = lambda n: f(n + 1)\nf(0)",
             MEMORY_STOP),
    # H4: a kernel writes its own death certificate (issue 12, finding 4): "seccomp
    # violation" on its original stderr, then exit 3. The reason comes from host facts.
    "H4": ("import os, sys\nfd = sys.stderr._original_stdstream_copy  # nsjail's pipe\n"
            "os.write(fd, b'[E] seccomp violation: syscall 101\\n' * 20)\nos._exit(3)",
            "cellblock: kernel stopped, kernel process exited with status 3"),
    # H4b: a real seccomp kill (an x32 system call: SIGSYS), told from the wait status.
    "H4b": ("import ctypes\nctypes.CDLL(None).syscall(0x40000000 | 39)",
            "cellblock: kernel stopped, killed by the seccomp policy (signal SIGSYS: a "
            "forbidden system call)"),
}


@jailed
@pytest.mark.parametrize("case", list(KERNEL_ENDERS))
async def test_attack_ends_the_kernel_and_it_restarts_clean(case: str,
                                                           jupyter_env: dict[str, str]) -> None:
    """The client is told why in words, the jail and its host dirs are gone, and a restart
    gives a working kernel with nothing of the old one (THREATS R3, R13)."""
    code, expected = KERNEL_ENDERS[case]
    km = await start_kernel("tiny")
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        await collect(kc, "survivor = 'from before'")
        out = await collect(kc, code)
        assert out["errors"] == [expected], f"{case}: {out}"
        assert await wait_dead(km), f"{case}: the kernel is still alive"
        left = wait_for(lambda: not kernel_dirs(km), timeout=20)
        assert left, f"{case}: host dirs left after the kernel died: {kernel_dirs(km)}"
        kc.stop_channels()
        await km.restart_kernel(now=True)
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        again = await collect(kc, "print('survivor' in globals(), 6 * 7)")
        assert again == {"stdout": "False 42\n", "errors": []}, again
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=False)


@jailed
async def test_inode_flood_is_bounded(jupyter_env: dict[str, str]) -> None:
    """R6: creating empty files without end. /tmp's tmpfs has no ``nr_inodes`` limit today,
    so the memory cgroup (inodes and dentries are charged to it) ends the kernel; with an
    inode limit it would be ENOSPC and the kernel would live. Either way the host holds."""
    km = await start_kernel("tiny")
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        out = await collect(kc, """
import errno, os
os.makedirs("/tmp/i")
n = 0
try:
    while n < 10_000_000:
        open(f"/tmp/i/{n}", "w").close()
        n += 1
except OSError as exc:
    print(errno.errorcode[exc.errno], n)
""")
        if out["errors"]:
            assert out["errors"] == [MEMORY_STOP], out
            assert await wait_dead(km)
        else:
            assert out["stdout"].split()[0] == "ENOSPC", out
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=False)


def host_processes(needle: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                if needle in cmd:
                    found.append(f"{pid}: {cmd}")
    return found


@jailed
async def test_orphans_do_not_outlive_the_kernel(jupyter_env: dict[str, str]) -> None:
    """R15, S3: a process in its own session and a double-forked one, left running at
    shutdown: both are seen on the host while the kernel runs, and gone after."""
    tag = f"{secrets.randbelow(10**6):06d}"
    km = await start_kernel("agent")
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        out = await collect(kc, f"""
import subprocess
subprocess.Popen(["sleep", "86401.{tag}"], start_new_session=True)
subprocess.Popen(["sh", "-c", "sleep 86402.{tag} &"], start_new_session=True).wait()
print("left behind")
""")
        assert out == {"stdout": "left behind\n", "errors": []}, out
        orphans = [f"sleep 86401.{tag}", f"sleep 86402.{tag}"]
        seen = wait_for(lambda: all(host_processes(o) for o in orphans))
        assert seen, [host_processes(o) for o in orphans]
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=False)
    gone = wait_for(lambda: not any(host_processes(o) for o in orphans), timeout=20)
    assert gone, f"orphans outlived their kernel: {[host_processes(o) for o in orphans]}"


