#!/bin/sh
# Jupyter Enterprise Gateway starting jailed kernels in containers, end to end, on this
# host: podman's Docker-compatible API, the cellblock-kernel image, a client over the
# gateway's WebSocket, no container left after DELETE (deploy/gateway/eg_demo.py says
# each step). Root, from the repo's top, after deploy/build-image.sh. Opt-in: CI's default
# run never calls this.
#
#   sh deploy/eg-demo.sh                # Enterprise Gateway 3.3, its DockerProcessProxy
#   ENGINE=gp sh deploy/eg-demo.sh      # Kernel Gateway 3 + gateway_provisioners'
#                                       # DockerProvisioner (jupyter_client 8)
#
# Each gateway gets a venv of its own (Enterprise Gateway 3.3 pins jupyter_client < 7,
# jupyter_server < 2 and pyzmq < 25, which cellblock's venv cannot hold); the client and
# cellblock-eg-launcher --pod-resources run with $CELLBLOCK_VENV. $EG_VENV, $GP_VENV: the
# gateways' venvs (made here if missing).
set -eu
cd "$(dirname "$0")/.."
ENGINE=${ENGINE:-eg}
CELLBLOCK_VENV=${CELLBLOCK_VENV:-/opt/cellblock/venv}
case "$ENGINE" in
    eg) GW_VENV=${EG_VENV:-/opt/cellblock/venv-eg}
        PKGS='jupyter-enterprise-gateway==3.3.0 docker>=7,<8' ;;
    gp) GW_VENV=${GP_VENV:-/opt/cellblock/venv-gp}
        PKGS='jupyter-kernel-gateway>=3,<4 gateway-provisioners[docker]==0.5.0' ;;
    *) echo "ENGINE=$ENGINE: eg or gp" >&2; exit 2 ;;
esac
if ! command -v podman >/dev/null 2>&1; then
    echo "podman is not installed: sh deploy/build-image.sh installs it" >&2; exit 2
fi
export CONTAINERS_CONF="$PWD/deploy/containers.conf"
if ! podman image exists "${KERNEL_IMAGE:-localhost/cellblock-kernel:dev}"; then
    echo "no ${KERNEL_IMAGE:-localhost/cellblock-kernel:dev}: run sh deploy/build-image.sh" >&2
    exit 2
fi
if [ ! -x "$GW_VENV/bin/jupyter" ]; then
    /usr/bin/python3 -m venv "$GW_VENV"
    # shellcheck disable=SC2086
    "$GW_VENV/bin/pip" install -q --disable-pip-version-check $PKGS
fi
GATEWAY_PYTHON="$GW_VENV/bin/python" ENGINE="$ENGINE" \
    exec "$CELLBLOCK_VENV/bin/python" deploy/gateway/eg_demo.py
