#!/bin/sh
# deploy/jupyterhub/check_kubespawner.py in a venv of its own (JupyterHub and KubeSpawner
# are not cellblock's dependencies): KubeSpawner builds the analysts' pod from
# jupyterhub_config.py and Kubernetes' schemas validate it, offline.
set -eu
cd "$(dirname "$0")"
VENV=${HUB_VENV:-/opt/cellblock/venv-hub}
if [ ! -x "$VENV/bin/python" ]; then
    /usr/bin/python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check \
        "jupyterhub-kubespawner>=7,<8" "kubernetes-validate>=1.31,<2"
fi
exec "$VENV/bin/python" check_kubespawner.py
