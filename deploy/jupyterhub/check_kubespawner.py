"""The pod KubeSpawner makes from deploy/jupyterhub/jupyterhub_config.py, built by
KubeSpawner itself (get_pod_manifest, no cluster: a kubeconfig pointing nowhere) and
validated against Kubernetes' schemas (kubernetes-validate, strict). Run with a Python
that has jupyterhub-kubespawner and kubernetes-validate (deploy/jupyterhub/check-kubespawner.sh
makes one). Prints the pod's securityContext and resources; exits 1 on a problem."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest.mock import Mock

HERE = Path(__file__).resolve().parent
KUBECONFIG = """apiVersion: v1
kind: Config
current-context: offline
clusters: [{name: offline, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: offline, user: {token: none}}]
contexts: [{name: offline, context: {cluster: offline, user: offline}}]
"""


async def manifest() -> dict[str, Any]:
    from jupyterhub.objects import Hub, Server
    from kubernetes_asyncio.client import ApiClient
    from kubespawner import KubeSpawner
    from traitlets.config import PyFileConfigLoader

    class User:  # what a spawner reads of JupyterHub's user
        id = 1
        name = escaped_name = "analyst1"
        url = "/user/analyst1/"
        settings: dict[str, Any] = {}
        spawners: dict[str, Any] = {}

        def __init__(self) -> None:
            self.server = Server()
            self.orm_user = Mock()
            self.authenticator = Mock()

    config = PyFileConfigLoader("jupyterhub_config.py", path=str(HERE)).load_config()
    spawner = KubeSpawner(config=config, user=User(), hub=Hub(), _mock=True)
    spawner.api_token = "not-a-token"  # noqa: S105
    pod = await spawner.get_pod_manifest()
    async with ApiClient() as api:
        return dict(api.sanitize_for_serialization(pod))


def main() -> int:
    import kubernetes_validate

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as kubeconfig:
        kubeconfig.write(KUBECONFIG)
        kubeconfig.flush()
        os.environ["KUBECONFIG"] = kubeconfig.name
        pod = asyncio.run(manifest())
    (c,) = pod["spec"]["containers"]
    print("pod", pod["metadata"]["name"], "image", c["image"], "args", c.get("args"))
    print("hostUsers:", pod["spec"].get("hostUsers"))
    print("securityContext:", json.dumps(c["securityContext"]))
    print("resources:", json.dumps(c["resources"]))
    problems = []
    for version in ("1.30.0", "1.33.0"):
        try:
            kubernetes_validate.validate(pod, version, strict=True)
            print(f"valid for Kubernetes {version} (strict)")
        except kubernetes_validate.ValidationError as e:
            problems.append(f"Kubernetes {version}: {e.message} at {list(e.path)}")
    sc = c["securityContext"]
    if pod["spec"].get("hostUsers") is not False or sc.get("procMount") != "Unmasked":
        problems.append("the pod needs hostUsers: false and procMount: Unmasked")
    if sc.get("capabilities") != {"drop": ["ALL"]} or sc.get("runAsUser") != 1000:
        problems.append("the server runs as uid 1000 with no capability")
    for p in problems:
        print("FAILED:", p)
    print("kubespawner check", "failed" if problems else "passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
