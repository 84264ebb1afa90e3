# JupyterHub for analysts with KubeSpawner: each analyst's server is a pod of the
# cellblock-singleuser image (deploy/Containerfile), whose JupyterLab offers only
# cellblock's analyst kernel (deploy/jupyterhub/jupyter_server_config.py). The server runs
# as the analyst (uid 1000) and starts its jails unprivileged, in user namespaces of its
# own (cellblock's non-root mode; the image's policy sets cgroups = "off", so the pod's
# limits bind all of its kernels together).
#
# Checked here: tests/test_container.py runs the image under the same privileges with
# podman and starts a kernel through JupyterLab's REST API and WebSocket;
# deploy/jupyterhub/check_kubespawner.py builds this configuration's pod with KubeSpawner's
# own make_pod and validates it against Kubernetes' schemas. No hub has run it here.
c = get_config()  # noqa: F821 - traitlets' config loader defines it

c.JupyterHub.spawner_class = "kubespawner.KubeSpawner"
c.KubeSpawner.image = "registry.example.com/cellblock-singleuser:0.1.0"
c.KubeSpawner.cmd = ["jupyterhub-singleuser"]
c.KubeSpawner.default_url = "/lab"
c.KubeSpawner.uid = 1000
c.KubeSpawner.gid = 100
c.KubeSpawner.fs_gid = 100

# A server and up to KERNELS analyst kernels: each kernel may use its profile's
# limits.memory and limits.cpus plus its warden's, 5 GiB and 3 CPUs for the image's
# analyst profile (`cellblock-eg-launcher --pod-resources analyst`); the server about 1 GiB.
# With cgroups = "off" the pod's limit binds its kernels together, not each one.
KERNELS = 2
c.KubeSpawner.mem_limit = f"{KERNELS * 5 + 1}G"
c.KubeSpawner.mem_guarantee = "2G"
c.KubeSpawner.cpu_limit = float(KERNELS * 3 + 1)
c.KubeSpawner.cpu_guarantee = 1.0

# The least privileges for unprivileged jails (deploy/README.md): the node's
# cellblock-seccomp.json (deploy/seccomp.json), /proc unmasked (which needs the pod's own
# user namespace), no capability at all, no privilege escalation.
c.KubeSpawner.extra_pod_config = {
    "hostUsers": False,
    "automountServiceAccountToken": False,
    "enableServiceLinks": False,
}
c.KubeSpawner.container_security_context = {
    "runAsUser": 1000,
    "runAsGroup": 100,
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "procMount": "Unmasked",
    "seccompProfile": {"type": "Localhost", "localhostProfile": "cellblock-seccomp.json"},
    "capabilities": {"drop": ["ALL"]},
}
# The audit log is per pod: keep it on the user's volume (or a log shipper's).
c.KubeSpawner.environment = {"CELLBLOCK_AUDIT_DIR": "/home/jovyan/.cellblock-audit"}
