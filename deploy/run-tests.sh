#!/bin/sh
# Run `cellblock doctor` and the containment suite (tests/test_containment.py) inside
# localhost/cellblock-test:dev (deploy/build-image.sh) under the least privileges of
# deploy/README.md: deploy/seccomp.json, /proc unmasked, no --privileged, and capabilities
# only as $CELLBLOCK_CAPS says (default: none added to podman's defaults).
# The suite's profiles require cgroup limits and a container's cgroup fs is read-only, so
# a host subtree per controller is bound into the container at /cg ($CELLBLOCK_CGROUP_ROOT)
# and removed afterwards. Opt-in: CI's default test run never calls this. Root only.
#
#   sh deploy/run-tests.sh [PYTEST ARGS]     # default: tests/test_containment.py
#   USERNS=1 sh deploy/run-tests.sh          # in a user namespace: --uidmap 0:200000:65536
set -eu
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="$PWD/deploy/containers.conf"
IMAGE=${IMAGE:-localhost/cellblock-test:dev}
NAME=cellblock-ctr-$$
LEAST="--security-opt seccomp=$PWD/deploy/seccomp.json --security-opt unmask=/proc/*"
for cap in ${CELLBLOCK_CAPS:-}; do LEAST="$LEAST --cap-add $cap"; done
[ -n "${USERNS:-}" ] && LEAST="$LEAST --uidmap 0:200000:65536 --gidmap 0:200000:65536"

CG=""
DIRS=""
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then  # v2: one subtree with the controllers
    d=/sys/fs/cgroup/$NAME
    mkdir "$d"
    DIRS="$d"
    CG="-v $d:/cg"
else  # v1: one subtree per controller cellblock uses
    for c in memory pids cpu; do
        d=/sys/fs/cgroup/$c/$NAME
        mkdir "$d"
        DIRS="$DIRS $d"
        CG="$CG -v $d:/cg/$c"
    done
fi
[ -n "${USERNS:-}" ] && for d in $DIRS; do chown -R 200000:200000 "$d"; done
cleanup() {
    for d in $DIRS; do
        find "$d" -mindepth 1 -depth -type d -exec rmdir {} \; 2>/dev/null || true
        rmdir "$d" 2>/dev/null || echo "left behind: $d" >&2
    done
}
trap cleanup EXIT

echo "== privileges: $LEAST"
# shellcheck disable=SC2086
podman run --rm $LEAST "$IMAGE" cellblock doctor
[ $# -gt 0 ] || set -- tests/test_containment.py
# --init: catatonit is pid 1 and reaps; the suite's leftover checks take a process whose
# parent is pid 1 for an orphan, so pytest must not be pid 1 itself.
# shellcheck disable=SC2086
podman run --rm --init $LEAST $CG -e CELLBLOCK_CGROUP_ROOT=/cg -e CELLBLOCK_CGROUP_PARENT=suite \
    -v "$PWD:/src:ro" -w /src "$IMAGE" \
    python -m pytest -p no:cacheprovider -q "$@"
