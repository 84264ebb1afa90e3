#!/usr/bin/env python3
"""The kernelspec command of a cellblock kernel started by Jupyter Enterprise Gateway's
Docker process proxy (or gateway_provisioners' DockerProvisioner): start one
localhost/cellblock-kernel container through the Docker API (Docker, or podman's
Docker-compatible `podman system service`) and exit. The container's command,
cellblock-eg-launcher, starts the jailed kernel and answers the gateway; the gateway finds
the container by its kernel_id label, connects to its address and removes it at shutdown.

It runs on the gateway's host with the gateway's Python (it needs the `docker` package,
a dependency of both gateways), never imports cellblock, and differs from the gateways'
own launch_docker.py in what a jailed kernel needs and what it keeps out:

- security options: deploy/seccomp.json (--seccomp) and /proc unmasked, nothing
  privileged, the runtime's default capabilities (deploy/README.md says why each);
- the image is --image, from the kernelspec: Enterprise Gateway 3 lets a request's
  KERNEL_IMAGE override the kernelspec's image_name, and launch_docker.py runs that;
- the container's environment is the protocol's four values: not the gateway's own
  environment and not the request's KERNEL_* values (launch_docker.py passes both);
- the user is root in the container (the warden maps each jail to a uid of its own):
  KERNEL_UID and KERNEL_GID are not used;
- limits come from the kernelspec's --memory, --cpus, --pids (write them from
  `cellblock-eg-launcher --pod-resources PROFILE`), never from the request.

Exit status: 0 the container was created, 1 the API refused it, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def main() -> int:
    p = argparse.ArgumentParser(prog="launch_container.py")
    p.add_argument("--kernel-id", required=True)
    p.add_argument("--response-address", required=True)
    p.add_argument("--public-key", required=True)
    p.add_argument("--port-range", default="0..0")
    p.add_argument("--memory", type=int, required=True, help="bytes")
    p.add_argument("--cpus", type=float, required=True)
    p.add_argument("--pids", type=int, required=True)
    p.add_argument("--seccomp", required=True, help="path of deploy/seccomp.json")
    p.add_argument("--image", required=True, help="the cellblock-kernel image")
    for ignored in ("--spark-context-initialization-mode", "--kernel-class-name",
                    "--transport-encryption"):
        p.add_argument(ignored, help=argparse.SUPPRESS)
    a = p.parse_args()
    if not NAME.fullmatch(a.kernel_id):
        print(f"launch_container.py: kernel id {a.kernel_id!r} is not a name", file=sys.stderr)
        return 2
    image = a.image  # never $KERNEL_IMAGE: a request may set it
    network = os.environ.get("EG_DOCKER_NETWORK") or os.environ.get("GP_DOCKER_NETWORK") \
        or "bridge"

    import docker

    client = docker.DockerClient.from_env()
    try:
        container = client.containers.run(
            image, detach=True, remove=True, name=f"cellblock-{a.kernel_id}",
            hostname="kernel", user="0", network=network,
            labels={"kernel_id": a.kernel_id, "component": "kernel",
                    "app": "enterprise-gateway"},
            environment={"KERNEL_ID": a.kernel_id, "RESPONSE_ADDRESS": a.response_address,
                         "PUBLIC_KEY": a.public_key, "PORT_RANGE": a.port_range},
            security_opt=[f"seccomp={a.seccomp}", "unmask=/proc/*"],
            mem_limit=a.memory, memswap_limit=a.memory, nano_cpus=int(a.cpus * 1e9),
            pids_limit=a.pids)
    except docker.errors.APIError as e:
        print(f"launch_container.py: the container API refused kernel {a.kernel_id}: {e}",
              file=sys.stderr)
        return 1
    print(f"launch_container.py: kernel {a.kernel_id}: container {container.short_id} "
          f"({image}) on network {network}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
