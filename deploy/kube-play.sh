#!/bin/sh
# The kernel pod of deploy/k8s/ under `podman kube play` (privileged: podman 4.3.1 ignores
# seccompProfile and procMount), answering a kernel request as Enterprise Gateway's
# Kubernetes process proxy expects (deploy/gateway/kube_play.py says each step). Root, from
# the repo's top, after deploy/build-image.sh. Opt-in: CI's default run never calls this.
#
#   sh deploy/kube-play.sh
set -eu
cd "$(dirname "$0")/.."
CELLBLOCK_VENV=${CELLBLOCK_VENV:-/opt/cellblock/venv}
if ! command -v podman >/dev/null 2>&1; then
    echo "podman is not installed: sh deploy/build-image.sh installs it" >&2; exit 2
fi
export CONTAINERS_CONF="$PWD/deploy/containers.conf"
if ! podman image exists "${KERNEL_IMAGE:-localhost/cellblock-kernel:dev}"; then
    echo "no ${KERNEL_IMAGE:-localhost/cellblock-kernel:dev}: run sh deploy/build-image.sh" >&2
    exit 2
fi
exec "$CELLBLOCK_VENV/bin/python" deploy/gateway/kube_play.py
