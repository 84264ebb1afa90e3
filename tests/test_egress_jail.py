"""Network through the warden's egress proxy, on real jailed kernels (docs/network.md).

The internet is stood in for by servers on this machine's loopback (tests/networld.py);
the proxy's resolver is pointed at a test file ($CELLBLOCK_EGRESS_RESOLVER) whose names
route to them. Everything else is real: nsjail with its own network namespace, the kernel's
loopback forwarder, the proxy in the warden, pip."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from networld import World, world

from cellblock.audit import read_events
from cellblock.sandbox import Sandbox

from conftest import wait_for

pytestmark = [pytest.mark.jail, pytest.mark.nonroot, pytest.mark.usefixtures("no_leftovers")]

PROBE = r'''
import socket, ssl
def ask(target, hello_for=None, head=None):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=30)
    s.sendall(head or f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    if hello_for:
        out = ssl.MemoryBIO()
        tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out,
                                                    server_hostname=hello_for)
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        s.sendall(out.read())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return data.decode("latin-1")
'''


@pytest.fixture
def net(tmp_path: Path, jupyter_env: dict[str, str], operator: Any,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    """The stand-in internet, and a policy whose profiles allow parts of it."""
    with world(tmp_path) as w:
        monkeypatch.setenv("CELLBLOCK_EGRESS_RESOLVER", str(w.resolver))
        p, s = w.index_port, w.sink_port
        operator(f"""
[profiles.net.network]
allow = ["pypi.test:{p}", "sink.test:{s}", "loop.test:{p}", "meta.test:{p}",
         "meta6.test:{p}", "mapped.test:{p}", "mixed.test:{p}"]

[profiles.plain]

[profiles.tls.network]
allow = ["pypi.test:{w.tls_port}"]

[profiles.metered.network]
allow = ["pypi.test:{p}"]
max_bytes = "2MiB"

[profiles.counted.network]
allow = ["pypi.test:{p}"]
max_connections = 5
""")
        yield w


def events(sb: Sandbox, prefix: str) -> list[Any]:
    assert sb.audit_log is not None
    return [e for e in read_events(sb.audit_log) if e.event.startswith(prefix)]


def pip(w: World, name: str = "cbdemo") -> str:
    return (f"%pip install --retries 0 --timeout 20 --index-url {w.index_url} "
            f"--trusted-host pypi.test:{w.index_port} {name}")


async def test_pip_installs_through_an_allowing_profile_then_lock_stops_it(net: World) -> None:
    async with Sandbox("net") as sb:
        r = await sb.run(pip(net), timeout=120)
        assert "Successfully installed cbdemo-1.0" in r.stdout, r.stdout + r.stderr
        r = await sb.run("import cbdemo, os; print(cbdemo.VALUE, cbdemo.__file__)")
        assert r.stdout.startswith("42 /home/jovyan/.cellblock-packages/cbdemo/"), r
        assert any("/files/cbdemo-1.0-py3-none-any.whl" in s for s in net.requests)
        allowed = [e.fields for e in events(sb, "net.connection")]
        assert allowed and all(f["host"] == "pypi.test" and f["address"] == "203.0.113.10"
                               and f["verdict"] == "allowed" for f in allowed), allowed
        assert sum(f["bytes_down"] for f in allowed) > 1000

        print(await sb.lock_network())
        r = await sb.run(pip(net, "cbdemo==1.0 --force-reinstall"), timeout=120)
        assert "Successfully installed" not in r.stdout
        assert "No matching distribution found for cbdemo==1.0" in r.stdout, r
        r = await sb.run("import urllib.request\ntry:\n    urllib.request.urlopen("
                         f"'{net.index_url}cbdemo/')\nexcept OSError as e:\n    print(e)")
        assert r.stdout.strip() == ("HTTP Error 403: cellblock: network locked (locked by "
                                    "the operator)"), r
        assert [e.fields["reason"] for e in events(sb, "net.lock")] == ["locked by the operator"]
        denied = [e.fields for e in events(sb, "net.denied")]
        assert denied and all("network locked" in f["reason"] for f in denied)


async def test_pip_over_https_through_a_connect_tunnel(net: World) -> None:
    """The realistic path: an HTTPS index, pip's CONNECT, a real TLS handshake end to end
    (the jail trusts the test certificate); then the lock, and pip says why."""
    index = f"https://pypi.test:{net.tls_port}/simple/"
    pip_https = (f"%pip install --retries 0 --timeout 20 --cert /tmp/ca.pem "
                 f"--index-url {index} cbdemo")
    async with Sandbox("tls") as sb:
        r = await sb.run(f"open('/tmp/ca.pem', 'w').write({net.ca_pem!r})")
        assert r.error is None
        r = await sb.run(pip_https, timeout=120)
        assert "Successfully installed cbdemo-1.0" in r.stdout, r.stdout + r.stderr
        r = await sb.run("import cbdemo; print(cbdemo.VALUE)")
        assert r.stdout == "42\n", r
        assert any("/files/cbdemo-1.0-py3-none-any.whl" in x for x in net.requests)
        tunnels = [e.fields for e in events(sb, "net.connection")]
        assert tunnels and all(f["port"] == net.tls_port and f["bytes_up"] > 0
                               for f in tunnels), tunnels
        await sb.lock_network()
        # one retry: pip prints why the first try failed (with none it only says "no
        # matching distribution")
        r = await sb.run(pip_https.replace("--retries 0", "--retries 1")
                         .replace("cbdemo", "cbdemo==1.0 --force-reinstall"), timeout=120)
        assert "Successfully installed" not in r.stdout
        assert "Tunnel connection failed: 403 cellblock: network locked (locked by the " \
               "operator)" in r.stdout, r.stdout


async def test_pip_on_a_default_profile_fails_with_a_clear_error(net: World) -> None:
    async with Sandbox("plain") as sb:
        r = await sb.run(pip(net), timeout=120)
        assert "cellblock: this kernel has no network" in r.stderr, r
        r = await sb.run("import os; print(os.environ.get('HTTP_PROXY'), "
                         "os.path.exists('/run/cellblock/egress.sock'))")
        assert r.stdout.strip() == "None False"
        r = await sb.run("import subprocess, sys\n"
                         "p = subprocess.run([sys.executable, '-m', 'pip', 'download', "
                         f"'--retries', '0', '--index-url', '{net.index_url}', "
                         f"'--trusted-host', 'pypi.test:{net.index_port}', 'cbdemo'], "
                         "capture_output=True, text=True)\n"
                         "print(p.returncode, 'No matching distribution found for cbdemo' in "
                         "p.stderr)")
        assert r.stdout.strip() == "1 True", r  # pip itself: no resolver, no route
        assert not net.requests


async def test_refusals_each_audited_with_its_reason(net: World) -> None:
    p, s = net.index_port, net.sink_port
    cases = {
        f"CONNECT other.test:{p}": "host other.test port",
        f"CONNECT pypi.test:{p + 1 if p + 1 != s else p + 2}": "not in the allowlist",
        f"CONNECT 203.0.113.10:{p}": "IP address 203.0.113.10",
        f"CONNECT [::1]:{p}": "IP address ::1",
        f"CONNECT loop.test:{p}": "loopback address 127.0.0.1",
        f"CONNECT meta.test:{p}": "cloud metadata address 169.254.169.254",
        f"CONNECT meta6.test:{p}": "cloud metadata address fd00:ec2::254",
        f"CONNECT mapped.test:{p}": "loopback address 127.0.0.1 (inside ::ffff:7f00:1)",
        f"CONNECT mixed.test:{p}": "private (10/8) address 10.0.0.1",
        f"GET http://loop.test:{p}/ ": "loopback address 127.0.0.1",
        f"GET http://pypi.test:{p}/ Host=evil.test": "Host header 'evil.test'",
        f"GET http://user@pypi.test:{p}/ ": "no userinfo",
        f"GET http://127.0.0.1:{p}/ ": "IP address 127.0.0.1",
    }
    async with Sandbox("net") as sb:
        assert (await sb.run(PROBE)).error is None
        for case, reason in cases.items():
            if case.startswith("CONNECT"):
                code = f"print(ask({case.split()[1]!r}))"
            else:
                url, _, host = case[4:].partition(" ")
                hdr = host.removeprefix("Host=") or url.split("/")[2].split("@")[-1]
                head = f"GET {url} HTTP/1.1\r\nHost: {hdr}\r\n\r\n"
                code = f"print(ask(None, head={head!r}.encode()))"
            r = await sb.run(code)
            assert r.stdout.startswith("HTTP/1.1 40"), (case, r)
            assert reason in r.stdout, (case, r.stdout)
        # a CONNECT to an allowed host whose ClientHello names another: nothing goes upstream
        r = await sb.run(f"print(ask('sink.test:{s}', hello_for='other.test'))")
        assert "200 Connection established" in r.stdout
        assert "the TLS SNI names another host (other.test)" in r.stdout, r
        # no DNS, no UDP: the jail has no resolver, and every address is its own loopback,
        # where the warden's sink sees the datagram (cellblock.egress.sink)
        r = await sb.run(
            "import socket, errno, os\n"
            "try:\n    socket.getaddrinfo('pypi.test', 80)\nexcept socket.gaierror as e:\n"
            "    print('dns', e.errno)\n"
            "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "u.sendto(b'q', ('8.8.8.8', 53))\n"
            "print(os.path.exists('/etc/resolv.conf'))")
        lines = r.stdout.split("\n")
        assert lines[0].startswith("dns ") and lines[1] == "False", r
        assert wait_for(lambda: len([e for e in events(sb, "net.denied")
                                     if e.fields.get("via") in ("dns", "udp")]) >= 2, 10)
        denied = [e.fields for e in events(sb, "net.denied")]
        reasons = [f["reason"] for f in denied]
        for reason in [*cases.values(), "the TLS SNI names another host",
                       "a DNS query from the jail (pypi.test A): the jail has no resolver",
                       "a UDP packet from the jail to 8.8.8.8 port 53"]:
            assert any(reason in x for x in reasons), (reason, reasons)
        assert all(f["verdict"] == "denied" for f in denied)
        assert all(f["status"] >= 400 for f in denied if f.get("via") not in ("dns", "udp"))
    assert net.sink_bytes == [0], net.sink_bytes  # the refused tunnel sent nothing upstream
    assert not net.requests


async def test_byte_budget_stops_a_download_loop(net: World) -> None:
    loop = ("import urllib.request\n"
            "for i in range(40):\n"
            f"    urllib.request.urlopen('http://pypi.test:{net.index_port}/blob/262144')"
            ".read()\n")
    async with Sandbox("metered") as sb:
        r = await sb.run(loop, timeout=120)
        assert r.kernel_stopped is not None, r
        assert "network budget: more than 2097152 bytes" in r.kernel_stopped
        exits = events(sb, "kernel.exit")
        assert exits[-1].fields["budget"] == "network", exits
    got = sum(1 for x in net.requests if "/blob/" in x)
    assert got <= 9, got  # 2 MiB / 256 KiB = 8 whole downloads, and the one cut


async def test_connection_budget_stops_a_connect_loop(net: World) -> None:
    loop = ("import urllib.request\n"
            "for i in range(20):\n"
            f"    urllib.request.urlopen('http://pypi.test:{net.index_port}/blob/10').read()\n")
    async with Sandbox("counted") as sb:
        r = await sb.run(loop, timeout=120)
        assert r.kernel_stopped is not None
        assert "network budget: more than 5 connections" in r.kernel_stopped, r
    assert sum(1 for x in net.requests if "/blob/" in x) == 5


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_the_wardens_memory_stays_bounded_under_a_download_loop(net: World) -> None:
    from cellblock.rundir import RunDir, runtime_base

    loop = ("import urllib.request\n"
            "for i in range(20):\n"
            f"    urllib.request.urlopen('http://pypi.test:{net.index_port}/blob/8388608')"
            ".read()\n")
    async with Sandbox("net") as sb:
        assert sb.kernel_id is not None
        record = RunDir(runtime_base(), sb.kernel_id).read_record()
        assert record is not None
        before = _rss_kib(record.warden_pid)
        r = await sb.run(loop, timeout=300)
        assert r.error is None and r.kernel_stopped is None, r
        grown = _rss_kib(record.warden_pid) - before
        assert grown < 32 * 1024, f"the warden grew {grown} KiB over 160 MiB through it"
        total = sum(e.fields["bytes_down"] for e in events(sb, "net.connection"))
        assert total > 20 * 8388608


async def test_cellblock_net_lock_from_a_shell(net: World) -> None:
    import subprocess

    from conftest import BIN

    get = (f"import urllib.request\ntry:\n    print(urllib.request.urlopen("
           f"'{net.index_url}cbdemo/').status)\nexcept OSError as e:\n    print(e)")
    async with Sandbox("net") as sb, Sandbox("plain") as plain:
        assert sb.kernel_id is not None and plain.kernel_id is not None
        assert (await sb.run(get)).stdout.strip() == "200"
        done = subprocess.run([str(BIN / "cellblock"), "net", "lock", sb.kernel_id[:12]],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"kernel {sb.kernel_id}: network locked"
        r = await sb.run(get)
        assert "403: cellblock: network locked (locked by the operator)" in r.stdout, r
        done = subprocess.run([str(BIN / "cellblock"), "net", "lock", plain.kernel_id],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0
        assert f"kernel {plain.kernel_id}: its profile has no network to lock" in done.stderr
