#!/usr/bin/env bash
# Build doppel's images: `images/build.sh [app] [worker-cpu] [worker]` (default: all three); `make images`.
#
#   app         images/Dockerfile            `doppel operator`, `doppel bot`
#   worker-cpu  images/worker-cpu.Dockerfile the scrape and cleanup Jobs (no torch)
#   worker      images/worker.Dockerfile     the train Jobs (torch with CUDA 13 from its wheels, ~5.8 GB)
#
# The engine is the first of podman, docker, buildah that answers (`<engine> info`), not the first that is
# installed: a docker client without a daemon does not count. Where none answers and this runs as root on
# Debian/Ubuntu, podman, buildah, runc and mmdebstrap are installed with apt-get.
# With podman/buildah and no PYTHON_IMAGE given, the base is Debian bookworm's own Python 3.11, made with
# mmdebstrap from Debian's archive (no registry needed) and imported as localhost/debian-python:bookworm.
#
# Environment:
#   REGISTRY        image name prefix (default localhost/doppel-dev); names: doppel, doppel-worker-cpu,
#                   doppel-worker
#   TAG             image tag (default: the chart's appVersion)
#   PYTHON_IMAGE    base image of all three (python:3.11-slim-bookworm where Docker Hub is reachable)
#   TORCH_PIP_ARGS  pip arguments for the worker's torch, e.g. "--index-url https://download.pytorch.org/whl/cpu"
#   BUILD_VOLUMES   extra `--volume SRC:DST:ro` arguments for podman/buildah builds (space-separated)
#   PUSH=1          push each image and record the registry's digest (else the local build's, podman/buildah)
#   VALUES_OUT      values file written at the end, naming every image by digest (default images/built-values.yaml)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$ROOT/images/containers.conf}"
REGISTRY="${REGISTRY:-localhost/doppel-dev}"
TAG="${TAG:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/doppel/Chart.yaml)}"
VALUES_OUT="${VALUES_OUT:-$ROOT/images/built-values.yaml}"
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(app worker-cpu worker)

answers() { "$@" >/dev/null 2>&1; }

pick_engine() {
    if [ -n "${ENGINE:-}" ]; then echo "$ENGINE"; return; fi
    for engine in podman docker buildah; do
        if command -v "$engine" >/dev/null && answers "$engine" info; then echo "$engine"; return; fi
    done
}

ENGINE="$(pick_engine)"
if [ -z "$ENGINE" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== no container engine answers: installing podman, buildah, runc and mmdebstrap with apt-get" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc mmdebstrap >/dev/null
    ENGINE="$(pick_engine)"
fi
if [ -z "$ENGINE" ]; then
    echo "images/build.sh: no container engine answers (tried podman info, docker info, buildah info)" >&2
    exit 2
fi
echo "== engine: $ENGINE" >&2

# Base image: Debian's Python 3.11 from mmdebstrap unless one is given (or docker is the engine).
if [ -z "${PYTHON_IMAGE:-}" ]; then
    if [ "$ENGINE" = docker ]; then
        PYTHON_IMAGE=python:3.11.11-slim-bookworm
    else
        PYTHON_IMAGE=localhost/debian-python:bookworm
        if ! answers "$ENGINE" image inspect "$PYTHON_IMAGE"; then
            command -v mmdebstrap >/dev/null || {
                echo "images/build.sh: mmdebstrap is needed to make $PYTHON_IMAGE" >&2; exit 2; }
            rootfs="$(mktemp -d)/rootfs.tar"
            echo "== base: mmdebstrap bookworm -> $PYTHON_IMAGE" >&2
            mmdebstrap --quiet --variant=minbase \
                --include=python3,python3-venv,python-is-python3,ca-certificates bookworm "$rootfs"
            if [ "$ENGINE" = buildah ]; then
                ctr="$(buildah from scratch)"
                buildah add "$ctr" "$rootfs" / >/dev/null
                buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
                    --env LANG=C.UTF-8 "$ctr"
                buildah commit --quiet "$ctr" "$PYTHON_IMAGE" >/dev/null
                buildah rm "$ctr" >/dev/null
            else
                podman import --quiet \
                    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
                    --change 'ENV LANG=C.UTF-8' "$rootfs" "$PYTHON_IMAGE" >/dev/null
            fi
            rm -rf "$(dirname "$rootfs")"
        fi
    fi
fi

# pip in the build trusts the machine's CA certificates (a TLS-inspecting proxy, a private index).
volumes=()
if [ "$ENGINE" != docker ]; then
    [ -d /etc/ssl/certs ] && volumes+=(--volume /etc/ssl/certs:/etc/ssl/certs:ro)
    for v in ${BUILD_VOLUMES:-}; do volumes+=(--volume "$v"); done
fi

declare -A DOCKERFILE=([app]=images/Dockerfile [worker-cpu]=images/worker-cpu.Dockerfile [worker]=images/worker.Dockerfile)
declare -A NAME=([app]=doppel [worker-cpu]=doppel-worker-cpu [worker]=doppel-worker)
declare -A VALUE=([app]=app [worker-cpu]=workerCpu [worker]=worker)

digests=()
for target in "${TARGETS[@]}"; do
    [ -n "${DOCKERFILE[$target]:-}" ] || { echo "images/build.sh: unknown image $target" >&2; exit 2; }
    image="$REGISTRY/${NAME[$target]}:$TAG"
    args=(-f "${DOCKERFILE[$target]}" --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" -t "$image")
    [ "$target" = worker ] && args+=(--build-arg "TORCH_PIP_ARGS=${TORCH_PIP_ARGS:-}")
    [ "$ENGINE" = docker ] || args+=(--layers "${volumes[@]}")
    [ "$ENGINE" = buildah ] && build=(buildah build) || build=("$ENGINE" build)
    start=$SECONDS
    "${build[@]}" "${args[@]}" .
    if [ "${PUSH:-}" = 1 ]; then
        digestfile="$(mktemp)"
        if [ "$ENGINE" = docker ]; then
            docker push "$image" >/dev/null
            docker image inspect --format '{{index .RepoDigests 0}}' "$image" | sed 's/.*@//' >"$digestfile"
        else
            "$ENGINE" push --digestfile "$digestfile" "$image"
        fi
        digest="$(cat "$digestfile")"; rm -f "$digestfile"
    else
        # Not pushed: podman and buildah know the digest of the image's manifest as stored here, which an
        # uncompressed OCI archive of it keeps (`podman save --format oci-archive --uncompressed`: what
        # kind and k3s import). A registry may recompress the layers on push and name it by another digest
        # (PUSH=1 records that one). Docker keeps no manifest for a local build: no digest.
        case "$ENGINE" in
            podman) digest="$(podman image inspect --format '{{.Digest}}' "$image")" ;;
            buildah) digest="$(buildah inspect --type image --format '{{.FromImageDigest}}' "$image")" ;;
            *) digest="" ;;
        esac
    fi
    if [ "$ENGINE" = buildah ]; then
        size="$(buildah images --format '{{.Size}}' "$image")"
    else
        size="$("$ENGINE" image inspect --format '{{.Size}}' "$image")"
    fi
    [ "$ENGINE" = buildah ] && shown="$size" || shown="$((size / 1000000)) MB"
    echo "== built $image in $((SECONDS - start)) s, $shown${digest:+, $digest}" >&2
    digests+=("$target $digest")
done

# Release values: the chart pulls exactly these builds (images.<name>.digest wins over the tag).
{
    echo "# Written by images/build.sh: the images it built (helm install -f this file), each named by digest"
    echo "# (with PUSH=1 the registry's; else the local build's, kept by an uncompressed OCI archive), so every"
    echo "# node runs exactly this build."
    echo "images:"
    for entry in "${digests[@]}"; do
        read -r target digest <<<"$entry"
        echo "  ${VALUE[$target]}:"
        echo "    repository: $REGISTRY/${NAME[$target]}"
        echo "    tag: \"$TAG\""
        [ -z "$digest" ] || echo "    digest: \"$digest\""
    done
} >"$VALUES_OUT"
echo "== wrote $VALUES_OUT" >&2
