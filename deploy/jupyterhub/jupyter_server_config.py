# The single-user server of deploy/Containerfile's cellblock-singleuser image (JupyterHub
# with KubeSpawner, deploy/jupyterhub/jupyterhub_config.py): JupyterLab shows only
# cellblock's analyst kernel, and every kernel it starts is a jailed one.
c = get_config()  # noqa: F821 - traitlets' config loader defines it

# Only this spec in GET /api/kernelspecs and the launcher (ipykernel's python3 is hidden).
c.KernelSpecManager.allowed_kernelspecs = {"cellblock-analyst"}
c.MultiKernelManager.default_kernel_name = "cellblock-analyst"
# A spec that names no provisioner (ipykernel's built-in python3, which jupyter_client
# starts by name whatever the listing shows, or one in the user's home) starts under
# cellblock's provisioner, on the analyst profile, inside the jail.
c.KernelProvisionerFactory.default_provisioner_name = "cellblock-provisioner"
c.CellblockProvisioner.profile = "analyst"
