"""The kernel pod of deploy/k8s/ under `podman kube play`, answering a kernel request the
way Enterprise Gateway's KubernetesProcessProxy would have it answered
(deploy/kube-play.sh runs it; root, podman, the cellblock-kernel image).

1. Render deploy/k8s/kernelspec/kernel-pod.yaml.j2 as launch_kubernetes.py does (jinja2,
   the request's KERNEL_* values as variables, hostile ones included), then add the
   container env launch_kubernetes.py adds (KERNEL_ID, RESPONSE_ADDRESS, PUBLIC_KEY,
   PORT_RANGE and every KERNEL_* value).
2. podman 4.3.1's kube play ignores seccompProfile and procMount and has no hostUsers, so
   the pod's securityContext is replaced by `privileged: true` here (the one change;
   printed). The image is the local one.
3. Listen on a response address with an RSA key of our own, as the gateway does; play the
   pod; decrypt the connection info; connect a jupyter_client to the pod's address and
   execute in the jail; send shutdown to the comm port; check the container exited by
   itself; kube down; check no pod is left.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import jinja2
import yaml
from Cryptodome.PublicKey import RSA
from jupyter_client import BlockingKernelClient
from jupyter_client.localinterfaces import public_ips

from cellblock.eg_protocol import decrypt_payload

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("KERNEL_IMAGE", "localhost/cellblock-kernel:dev")
ENV = {**os.environ, "CONTAINERS_CONF": str(REPO / "deploy" / "containers.conf")}


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def check(cond: bool, text: str) -> None:
    if not cond:
        raise SystemExit(f"FAILED: {text}")
    say(f"ok: {text}")


def podman(*args: str, check: bool = True) -> str:
    out = subprocess.run(["podman", *args], capture_output=True, text=True, env=ENV,
                         timeout=300, check=False)
    if check and out.returncode != 0:
        raise SystemExit(f"FAILED: podman {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def wait_until(cond: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.2)  # polling a condition
    raise SystemExit(f"FAILED: {what} within {timeout:.0f} s")


def pod_yaml(kernel_id: str, response: str, public_key: str) -> tuple[dict[str, Any], str]:
    request = {"KERNEL_ID": kernel_id, "KERNEL_USERNAME": "analyst1",
               "KERNEL_POD_NAME": f"analyst1-{kernel_id}", "KERNEL_MEMORY": "64Gi",
               "KERNEL_IMAGE": "docker.io/library/python:3.12", "KERNEL_UID": "0",
               "KERNEL_NAMESPACE": "kube-system"}
    keywords = {k.lower(): yaml.safe_load(v) for k, v in request.items()}
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(REPO / "deploy" / "k8s" /
                                                            "kernelspec"), autoescape=False)  # noqa: S701
    pod = yaml.safe_load(env.get_template("kernel-pod.yaml.j2").render(**keywords))
    c = pod["spec"]["containers"][0]
    for name, value in {**request, "RESPONSE_ADDRESS": response, "PUBLIC_KEY": public_key,
                        "PORT_RANGE": "0..0"}.items():  # launch_kubernetes.extend_pod_env
        c["env"].append({"name": name, "value": value})
    least = c["securityContext"]
    c["securityContext"] = {"privileged": True, "runAsUser": 0}
    pod["spec"].pop("hostUsers")
    c["image"] = IMAGE
    return pod, (f"podman 4.3.1 variant: securityContext {json.dumps(least)} -> "
                 f"{json.dumps(c['securityContext'])}, hostUsers dropped, image {IMAGE}")


def receive(server: socket.socket, key: Any) -> dict[str, Any]:
    """One payload from the response socket, as the gateway's ResponseManager reads it."""
    server.settimeout(180)
    conn, peer = server.accept()
    with conn:
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    say(f"response from {peer[0]}: {len(data)} bytes, encrypted")
    return decrypt_payload(data, key)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="cellblock-kube-play-"))
    kernel_id = str(uuid.uuid4())
    key = RSA.generate(2048)  # the gateways use 1024 (it wraps one AES key); 2048 here
    public = "".join(x for x in key.publickey().export_key().decode().splitlines()
                     if "-----" not in x)
    ip = public_ips()[0]  # as the gateway picks its response address
    server = socket.socket()
    server.bind((ip, 0))
    server.listen(1)
    response = f"{ip}:{server.getsockname()[1]}"
    pod, variant = pod_yaml(kernel_id, response, public)
    name = pod["metadata"]["name"]
    path = work / "kernel-pod.yaml"
    path.write_text(yaml.safe_dump(pod))
    say(f"kernel {kernel_id}; response address {response}")
    say(variant)
    played = False
    try:
        started = time.monotonic()
        podman("kube", "play", str(path))
        played = True
        status = podman("pod", "ps", "--filter", f"name={name}", "--format", "{{.Status}}")
        say(f"podman kube play: pod {name} {status.strip()}")
        info = receive(server, key)
        say(f"connection info after {time.monotonic() - started:.1f} s: "
            f"{ {k: ('***' if k == 'key' else v) for k, v in info.items()} }")
        check(info["kernel_id"] == kernel_id, "the launcher answered for this kernel")
        container = f"{name}-kernel"
        hc = json.loads(podman("inspect", container))[0]["HostConfig"]
        say(f"container limits: memory {hc['Memory']} B, cpus {hc['NanoCpus'] / 1e9}")
        check(hc["Memory"] == 2 * 1024**3, "the pod's memory limit is the template's "
              "(the profile's kernel + warden), not the request's KERNEL_MEMORY=64Gi")
        networks = json.loads(podman("inspect", container))[0]["NetworkSettings"]["Networks"]
        pod_ip = next(iter(networks.values()))["IPAddress"]  # kube play's own network
        say("pod memory with its idle kernel (launcher, spawner, warden, nsjail, kernel): "
            + podman("stats", "--no-stream", "--format", "{{.MemUsage}}", container).strip())
        kc = BlockingKernelClient()
        kc.load_connection_info({**info, "ip": pod_ip})
        kc.start_channels(hb=False)  # no heartbeat race: wait_for_ready asks kernel_info
        try:
            kc.wait_for_ready(timeout=60)
            out: list[str] = []
            reply = kc.execute_interactive(
                "import os, socket; print(socket.gethostname(), os.path.expanduser('~'), "
                "os.path.exists('/etc/shadow'), sorted(k for k in os.environ "
                "if k.startswith('KERNEL_')))",
                timeout=60, output_hook=lambda m: out.append(m["content"].get("text", "")))
            text = "".join(out)
            say(f"executed on {pod_ip}: {text.strip()!r} ({reply['content']['status']})")
            check(text.split()[:3] == ["cellblock", "/home/jovyan", "False"],
                  "the cell ran in the jail of the pod")
            check(text.strip().endswith("[]"), "no KERNEL_* value reached the jail")
        finally:
            kc.stop_channels()
        with socket.create_connection((pod_ip, info["comm_port"]), timeout=10) as s:
            s.sendall(json.dumps({"shutdown": 1}).encode())
            s.shutdown(socket.SHUT_WR)
        state = wait_until(lambda: podman("inspect", container, "--format",
                                          "{{.State.Status}} {{.State.ExitCode}}").strip()
                           if "exited" in podman("inspect", container, "--format",
                                                 "{{.State.Status}}") else None,
                           60, "the kernel container to exit after shutdown")
        check(state == "exited 0", f"shutdown on the comm port ended the pod's kernel ({state})")
        podman("kube", "down", str(path))
        played = False
        check(not podman("pod", "ps", "-q", "--filter", f"name={name}").strip(),
              "podman kube down left no pod")
        say("kube play passed")
        return 0
    except (SystemExit, Exception) as e:
        print(e if isinstance(e, SystemExit) else f"FAILED: {type(e).__name__}: {e}",
              flush=True)
        if played:
            print("--- kernel container log ---\n"
                  + podman("logs", f"{name}-kernel", check=False)[-3000:], flush=True)
        return 1
    finally:
        if played:
            podman("kube", "down", str(path), check=False)
        server.close()
        path.unlink(missing_ok=True)
        work.rmdir()


if __name__ == "__main__":
    sys.exit(main())
