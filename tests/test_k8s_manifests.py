"""deploy/k8s/ against Kubernetes' own schemas, offline (kubernetes-validate, strict: an
unknown field is an error), and what the manifests must say for cellblock:

- the kernel pod template, rendered the way Enterprise Gateway's launch_kubernetes.py
  renders it (jinja2, every KERNEL_* value of the request as a variable), takes none of
  the request's values but the kernel id and pod name: not its image, namespace, service
  account, limits, uid or volumes;
- its limits are the profile's (``cellblock-eg-launcher --pod-resources``) under the
  image's policy, and its securityContext is deploy/README.md's least privileges;
- the NetworkPolicy selects the kernel pods and lets in only the gateway's pods;
- the gateway lists and starts only cellblock kernels.

The pod itself runs under podman kube play in deploy/kube-play.sh (tests/test_container.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
VERSIONS = ["1.30.0", "1.33.0"]  # hostUsers: false is beta (on by default) from 1.30

#: a request's KERNEL_* values as launch_kubernetes.py passes them (lower-cased), hostile
HOSTILE = {
    "kernel_id": "0b1e4c5e-8a59-4d7f-9f5c-7d0f4f6f2b11",
    "kernel_pod_name": "analyst1-0b1e4c5e-8a59-4d7f-9f5c-7d0f4f6f2b11",
    "kernel_namespace": "kube-system",
    "kernel_service_account_name": "cluster-admin-sa",
    "kernel_image": "docker.io/library/python:3.12",
    "kernel_memory": "64Gi", "kernel_cpus": 32, "kernel_memory_limit": "64Gi",
    "kernel_uid": 0, "kernel_gid": 0, "kernel_working_dir": "/etc",
    "kernel_volumes": ["{name: host, hostPath: {path: /}}"],
    "kernel_volume_mounts": ["{name: host, mountPath: /host}"],
}


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def render_kernel_pod(values: dict[str, Any]) -> dict[str, Any]:
    """What launch_kubernetes.py does with the template (generate_kernel_pod_yaml)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(K8S / "kernelspec"),
                             autoescape=False)  # YAML, as the gateway renders it
    (pod,) = [d for d in yaml.safe_load_all(
        env.get_template("kernel-pod.yaml.j2").render(**values)) if d]
    return dict(pod)


def all_objects() -> list[dict[str, Any]]:
    objs = [d for f in sorted(K8S.glob("*.yaml")) for d in documents(f.name)]
    return [*objs, render_kernel_pod(HOSTILE)]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    import kubernetes_validate

    objs = all_objects()
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == ["Deployment", "NetworkPolicy", "Pod", "Role", "RoleBinding", "Service",
                     "ServiceAccount", "ServiceAccount"], kinds
    for obj in objs:
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_refuses_what_kubernetes_would() -> None:
    """The check above can fail: a misspelt field and a wrong type are refused."""
    import kubernetes_validate

    pod = render_kernel_pod(HOSTILE)
    pod["spec"]["containers"][0]["securityContext"]["procMoun"] = "Unmasked"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, VERSIONS[-1], strict=True)
    pod = render_kernel_pod(HOSTILE)
    pod["spec"]["hostUsers"] = "no"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, VERSIONS[-1], strict=True)


def test_the_kernel_pod_takes_nothing_from_the_request() -> None:
    source = (K8S / "kernelspec" / "kernel-pod.yaml.j2").read_text()
    used = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(source))
    assert used == {"kernel_id", "kernel_pod_name"}
    pod = render_kernel_pod(HOSTILE)
    text = json.dumps(pod)
    for key in ("kernel_namespace", "kernel_service_account_name", "kernel_image",
                "kernel_memory", "kernel_working_dir"):
        assert str(HOSTILE[key]) not in text, key
    assert "hostPath" not in text and "/host" not in text
    spec = pod["spec"]
    assert pod["metadata"]["namespace"] == "cellblock"
    assert pod["metadata"]["labels"] == {"kernel_id": HOSTILE["kernel_id"],
                                         "app": "enterprise-gateway", "component": "kernel"}
    assert spec["serviceAccountName"] == "cellblock-kernel"
    assert spec["automountServiceAccountToken"] is False


def test_the_kernel_pod_has_the_profile_limits_and_least_privileges(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from cellblock.eg_launcher import pod_resources

    monkeypatch.setenv("CELLBLOCK_POLICY", str(REPO / "deploy" / "cellblock.toml"))
    want = pod_resources("agent")
    spec = render_kernel_pod(HOSTILE)["spec"]
    (c,) = spec["containers"]
    assert c["command"] == ["cellblock-eg-launcher"]
    assert {"name": "CELLBLOCK_PROFILE", "value": "agent"} in c["env"]
    for kind in ("limits", "requests"):
        assert c["resources"][kind] == {"cpu": f"{want['cpus']:g}",
                                        "memory": f"{want['memory_mib'] // 1024}Gi"}
    sc = c["securityContext"]
    assert spec["hostUsers"] is False
    assert sc["procMount"] == "Unmasked" and sc["runAsUser"] == 0
    assert sc["seccompProfile"] == {"type": "Localhost",
                                    "localhostProfile": "cellblock-seccomp.json"}
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SETUID", "SETGID", "CHOWN",
                                                           "DAC_OVERRIDE", "FOWNER", "KILL"]}
    assert "privileged" not in sc


def test_only_the_gateway_reaches_kernel_pods() -> None:
    (policy,) = documents("network-policy.yaml")
    gateway = next(d for d in documents("enterprise-gateway.yaml") if d["kind"] == "Deployment")
    gw_labels = gateway["spec"]["template"]["metadata"]["labels"]
    kernel_labels = render_kernel_pod(HOSTILE)["metadata"]["labels"]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["podSelector"]["matchLabels"].items() <= kernel_labels.items()
    (ingress,) = spec["ingress"]
    assert ingress == {"from": [{"podSelector": {"matchLabels": gw_labels}}]}
    (egress,) = spec["egress"]
    assert egress["to"] == [{"podSelector": {"matchLabels": gw_labels}}]
    assert egress["ports"] == [{"protocol": "TCP", "port": 8877}]
    # the kernel pods are not the gateway's: a kernel cannot pass for the gateway
    assert not gw_labels.items() <= kernel_labels.items()


def test_the_gateway_lists_and_starts_only_cellblock_kernels() -> None:
    objs = documents("enterprise-gateway.yaml")
    gateway = next(d for d in objs if d["kind"] == "Deployment")
    (c,) = gateway["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["EG_ALLOWED_KERNELS"] == "['cellblock-agent']"
    assert env["EG_DEFAULT_KERNEL_NAME"] == "cellblock-agent"
    assert env["EG_SHARED_NAMESPACE"] == "True"
    (role,) = [d for d in objs if d["kind"] == "Role"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                              "verbs": ["get", "list", "watch", "create", "delete"]}]
    spec = json.loads((K8S / "kernelspec" / "kernel.json").read_text())
    assert spec["argv"][1] == \
        "/usr/local/share/jupyter/kernels/cellblock-agent/scripts/launch_kubernetes.py"
    assert spec["metadata"]["process_proxy"]["class_name"].endswith(".KubernetesProcessProxy")
