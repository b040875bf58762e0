#!/usr/bin/env bash
# Build the kit's image with podman/buildah where no Docker engine runs, from a Debian base made
# locally with debootstrap (no registry, so no NVIDIA base either). Prints the build time and the size.
# --format docker: the OCI format has no HEALTHCHECK, and podman would drop it.
#   tests/docker/build.sh            # CPU variant -> localhost/kit:cpu, then: pytest tests/test_docker.py
#   tests/docker/build.sh gpu        # GPU variant (requirements/gpu-{train,serve}.txt) -> localhost/kit:gpu
# The host's CA bundle is passed as a build secret (never stored in the image); host wheel folders
# (/opt/wheels: torch 2.13.0+cpu on these machines) are mounted read-only and given to pip as find-links.
set -euo pipefail
cd "$(dirname "$0")/../.."
VARIANT=${1:-cpu}
ROOTFS=${ROOTFS:-/var/tmp/kitimg/rootfs}
BASE=localhost/debian-base:bookworm
if ! podman image exists "$BASE"; then
  [ -x "$ROOTFS/bin/sh" ] || debootstrap --variant=minbase bookworm "$ROOTFS"  # debootstrap's default mirror
  tar -C "$ROOTFS" -c . | podman import - "$BASE"
fi
links=() mounts=()
for d in ${WHEEL_DIRS:-/opt/wheels}; do [ -d "$d" ] && { mounts+=(--volume "$d:$d:ro"); links+=("$d"); }; done
start=$(date +%s)
podman build --isolation chroot --format docker -t "localhost/kit:$VARIANT" \
  --build-arg BASE_IMAGE="$BASE" --build-arg VARIANT="$VARIANT" \
  --build-arg KIT_GIT_COMMIT="$(git rev-parse HEAD)" --build-arg PIP_FIND_LINKS="${links[*]}" \
  --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt "${mounts[@]}" .
echo "build seconds: $(( $(date +%s) - start ))"
podman image inspect "localhost/kit:$VARIANT" --format 'size bytes: {{.Size}}'
