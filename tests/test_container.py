"""cellblock in a container (deploy/): the image built here, `cellblock doctor` passing
under the least privileges of deploy/README.md and failing, named, without them; a jail
in a user-namespaced container (--uidmap 0:200000:65536) on the default jail uid range.

Opt-in: set CELLBLOCK_CONTAINER_TESTS=1, as root, with podman installed (deploy/
build-image.sh installs it). The image build and the containment suite in a container
take minutes, so CI's default run skips them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
IMAGE = "localhost/cellblock:dev"
ENV = {**os.environ, "CONTAINERS_CONF": str(DEPLOY / "containers.conf")}
LEAST = ("--security-opt", f"seccomp={DEPLOY / 'seccomp.json'}",
         "--security-opt", "unmask=/proc/*")
USERNS = ("--uidmap", "0:200000:65536", "--gidmap", "0:200000:65536")

pytestmark = [
    pytest.mark.skipif(not os.environ.get("CELLBLOCK_CONTAINER_TESTS"),
                       reason="container tests are opt-in: set CELLBLOCK_CONTAINER_TESTS=1 "
                       "(they build an image; deploy/README.md)"),
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed (sh "
                       "deploy/build-image.sh installs it)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the container scripts run rootful podman"),
    pytest.mark.timeout(1800),
]


@pytest.fixture(scope="module")
def image() -> str:
    subprocess.run(["sh", str(DEPLOY / "build-image.sh")], check=True, env=ENV, timeout=1700)
    return IMAGE


def podman_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", "run", "--rm", *args], capture_output=True, text=True,
                          env=ENV, timeout=600, check=False)


def test_doctor_passes_under_the_least_privileges(image: str) -> None:
    out = podman_run(*LEAST, image, "cellblock", "doctor")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == "8 of 8 checks passed"
    caps = podman_run(*LEAST, image, "grep", "CapEff", "/proc/self/status").stdout
    assert caps.split()[1] == "00000000a80425fb"  # podman's default set: nothing added


def test_doctor_names_the_runtime_defaults_it_cannot_work_under(image: str) -> None:
    out = podman_run(image, "cellblock", "doctor")  # the runtime's seccomp, /proc masked
    assert out.returncode == 1
    assert "[FAIL] seccomp filter: a seccomp filter on this process" in out.stdout
    assert "sethostname('NSJAIL'): Operation not permitted" in out.stdout
    out = podman_run(LEAST[0], LEAST[1], image, "cellblock", "doctor")  # /proc masked
    assert out.returncode == 1
    assert "[FAIL] /proc: nsjail cannot mount a new /proc: this /proc is masked" in out.stdout
    assert "fix: run the container with /proc unmasked: podman --security-opt unmask=/proc/*" \
        in out.stdout
    out = podman_run(*LEAST, "--cap-drop", "ALL", image, "cellblock", "doctor")
    assert out.returncode == 1
    assert "[FAIL] jail uids: nsjail could not write the jail's uid/gid map: " in out.stdout


def test_a_jail_in_a_user_namespaced_container(image: str) -> None:
    """Only ids 0-65535 exist: jails take uids from 10000-59999 and a notebook runs."""
    out = podman_run(*LEAST, *USERNS, image, "cellblock", "doctor")
    assert out.returncode == 0, out.stdout + out.stderr
    assert '[ok] jail uids: 10000-59999 (host.jail_uids = "auto"), mapped in this user ' \
        "namespace" in out.stdout
    script = ("cellblock run --profile agent --output /tmp/out.ipynb >&2 && "
              "cat /tmp/out.ipynb")
    # the quickstart reads the sample dataset, a directory: its view needs CAP_SYS_ADMIN
    # (open_tree; deploy/README.md), here the container user namespace's
    out = podman_run(*LEAST, *USERNS, "--cap-add", "SYS_ADMIN", image, "sh", "-c", script)
    assert out.returncode == 0, out.stderr
    first = json.loads(out.stdout)["cells"]
    text = "".join("".join(o.get("text", "")) for c in first for o in c.get("outputs", []))
    line = next(x for x in text.splitlines() if x.startswith("host uid map: "))
    uid = int(line.split("'")[3])  # host uid map: ['1000', '<uid>', '1']
    assert 10000 <= uid <= 59999, line


def test_containment_suite_in_a_container(image: str) -> None:
    out = subprocess.run(["sh", str(DEPLOY / "run-tests.sh"), "tests/test_containment.py"],
                         env={**ENV, "IMAGE": "localhost/cellblock-test:dev",
                              "CELLBLOCK_CAPS": "SYS_ADMIN"},  # for directory datasets
                         capture_output=True, text=True, timeout=1700, check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


@pytest.mark.parametrize("engine", ["eg", "gp"])
def test_enterprise_gateway_starts_jailed_kernels_in_containers(image: str, engine: str) -> None:
    """deploy/eg-demo.sh: the gateway (Enterprise Gateway 3.3's DockerProcessProxy, or Kernel
    Gateway with gateway_provisioners' DockerProvisioner) against podman's Docker API starts
    a localhost/cellblock-kernel container per kernel; a client executes over the
    WebSocket; DELETE leaves no container."""
    import sys

    out = subprocess.run(["sh", str(DEPLOY / "eg-demo.sh")], capture_output=True, text=True,
                         env={**ENV, "ENGINE": engine, "CELLBLOCK_VENV": sys.prefix},
                         timeout=1200, check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert out.stdout.splitlines()[-1].endswith("demo passed")
    assert "ok: no container of the kernel is left" in out.stdout


def test_the_kernel_pod_under_kube_play_answers_a_kernel_request(image: str) -> None:
    """deploy/kube-play.sh: deploy/k8s/'s kernel pod template, rendered as Enterprise
    Gateway renders it (hostile KERNEL_* values included), played by podman (privileged:
    podman 4.3.1 ignores seccompProfile and procMount), sends its encrypted connection info
    to a response address; a client executes in the pod's jail; shutdown on the comm port
    ends it; kube down leaves no pod."""
    import sys

    out = subprocess.run(["sh", str(DEPLOY / "kube-play.sh")], capture_output=True, text=True,
                         env={**ENV, "CELLBLOCK_VENV": sys.prefix}, timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert out.stdout.splitlines()[-1].endswith("kube play passed")
    assert "ok: no KERNEL_* value reached the jail" in out.stdout


async def test_the_singleuser_image_offers_only_jailed_analyst_kernels(image: str,
                                                                      tmp_path: Path) -> None:
    """deploy/Containerfile's cellblock-singleuser (JupyterHub's server for analysts) under
    the privileges of deploy/jupyterhub/jupyterhub_config.py: uid 1000, no capability, no
    privilege escalation, deploy/seccomp.json, /proc unmasked. JupyterLab lists only
    cellblock-analyst, and a request for ipykernel's python3 gets a jailed analyst kernel."""
    import uuid

    from tornado.httpclient import AsyncHTTPClient

    from conftest import free_port, wait_for
    from jupyter_ws import execute, open_channels

    port, token, name = free_port(), uuid.uuid4().hex, f"cellblock-su-{uuid.uuid4().hex[:8]}"
    run = subprocess.run(
        ["podman", "run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:8888",
         *LEAST, "--security-opt", "no-new-privileges", "--cap-drop", "ALL",
         "localhost/cellblock-singleuser:dev", "jupyter", "lab", "--ip=0.0.0.0",
         "--port=8888", "--no-browser", f"--IdentityProvider.token={token}"],
        capture_output=True, text=True, env=ENV, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    http = AsyncHTTPClient()
    auth = {"Authorization": f"token {token}"}
    base = f"127.0.0.1:{port}"
    try:
        def up() -> bool:
            probe = subprocess.run(["curl", "-sf", "-H", f"Authorization: token {token}",
                                    f"http://{base}/api/status"], capture_output=True,
                                   timeout=10, check=False)
            return probe.returncode == 0
        assert wait_for(up, timeout=120, interval=0.5), "JupyterLab did not answer"
        specs = json.loads((await http.fetch(f"http://{base}/api/kernelspecs",
                                             headers=auth)).body)
        assert specs["default"] == "cellblock-analyst"
        assert set(specs["kernelspecs"]) == {"cellblock-analyst"}
        resp = await http.fetch(f"http://{base}/api/kernels", method="POST", headers=auth,
                                body=json.dumps({"name": "python3"}), request_timeout=120)
        kernel_id = json.loads(resp.body)["id"]
        ws = await open_channels(base, kernel_id, token, "su")
        try:
            got = await execute(ws, "import os, socket; print(socket.gethostname(), "
                                "os.getuid(), os.path.exists('/etc/shadow'))", "su")
        finally:
            ws.close()
        assert got["reply"] == "ok", got
        assert got["stdout"].split()[0] == "cellblock" and got["stdout"].split()[2] == "False"
        ps = subprocess.run(["podman", "exec", name, "cellblock", "ps", "--json"],
                            capture_output=True, text=True, env=ENV, timeout=60, check=True)
        assert [r["profile"] for r in json.loads(ps.stdout)] == ["analyst"]
        resp = await http.fetch(f"http://{base}/api/kernels/{kernel_id}", method="DELETE",
                                headers=auth)
        assert resp.code == 204
    finally:
        http.close()
        subprocess.run(["podman", "stop", "-t", "10", name], capture_output=True, env=ENV,
                       timeout=120, check=False)


def test_kubespawner_builds_a_valid_pod_for_analysts() -> None:
    """deploy/jupyterhub/check-kubespawner.sh: KubeSpawner's own get_pod_manifest on
    jupyterhub_config.py, validated against Kubernetes' schemas (offline)."""
    out = subprocess.run(["sh", str(DEPLOY / "jupyterhub" / "check-kubespawner.sh")],
                         capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert out.stdout.splitlines()[-1] == "kubespawner check passed"
