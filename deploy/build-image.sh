#!/bin/sh
# Build cellblock's image here, from nothing fetched but Debian packages and PyPI:
#   1. the host tools (podman, buildah, runc, uidmap, iptables, debootstrap) from apt;
#   2. a Debian bookworm base made by debootstrap --variant=minbase and `podman import`d
#      (no registry);
#   3. deploy/Containerfile's targets: localhost/cellblock:dev (the kernel/server image),
#      localhost/cellblock-kernel:dev (a kernel per pod for Enterprise Gateway: its command
#      is cellblock-eg-launcher), localhost/cellblock-singleuser:dev (JupyterHub's
#      single-user server for analysts) and localhost/cellblock-test:dev (plus pytest, for
#      deploy/run-tests.sh). TARGETS="cellblock cellblock-kernel" builds only those.
# pip inside the build reaches PyPI through the host's CA bundle, mounted at build time.
# Opt-in: CI's default test run never calls this. Run as root from the repo's top.
#
#   sh deploy/build-image.sh            # REBUILD_BASE=1 to remake the base
set -eu
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="$PWD/deploy/containers.conf"
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=localhost/cellblock-base:bookworm
WORK=${CELLBLOCK_BUILD_DIR:-/var/tmp/cellblock-build}
CA=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

need=""
for tool in podman buildah runc newuidmap iptables debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || need=1
done
if [ -n "$need" ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        podman buildah runc uidmap iptables debootstrap
fi

if [ -n "${REBUILD_BASE:-}" ] || ! podman image exists "$BASE"; then
    rm -rf "$WORK/rootfs"
    mkdir -p "$WORK"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$WORK/rootfs" "$MIRROR"
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" -c . | podman import - "$BASE"
    rm -rf "$WORK/rootfs"
fi

for target in ${TARGETS:-cellblock cellblock-kernel cellblock-singleuser cellblock-test}; do
    podman build --target "$target" -t "localhost/$target:dev" -f deploy/Containerfile \
        --build-arg BASE="$BASE" -v "$CA:/etc/ssl/certs/host-ca.crt:ro" .
done
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep cellblock
