#!/usr/bin/env bash
# Build the container images llm-cluster/shard-node, llm-cluster/coordinator and llm-cluster/etcd
# on a machine that cannot pull from a registry: the base image is made here from Debian's
# packages (debootstrap, then `docker import`), the binaries are this workspace's, and etcd is
# Debian's. Nothing is pulled; a base image given with --base is used as it is.
#
#   scripts/build-images.sh                      # release binaries on a local Debian base
#   scripts/build-images.sh --profile ci         # the test suite's profile
#   scripts/build-images.sh --bin-dir target/ci  # binaries already built there (no cargo)
#   scripts/build-images.sh --base debian:bookworm-slim      # where images can be pulled
#   scripts/build-images.sh --cuda --base nvidia/cuda:13.0.1-runtime-ubuntu24.04
#        # the CUDA node image (tag :cuda) from scripts/build-cuda.sh's .gpu/bin
#
# Needs: docker; root or sudo, debootstrap and Debian's apt reachable the first time (the base);
# Debian's etcd-server and etcd-client (etcd, etcdctl), installed if missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
profile=release
base=""
cuda=0
bindir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --base) base=$2; shift 2 ;;
    --bin-dir) bindir=$2; shift 2 ;;
    --cuda) cuda=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "build-images: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
say() { echo "build-images: $*" >&2; }
# docker build, without the legacy builder's deprecation notice (buildx may be absent)
build() { docker build -q "$@" 2> >(grep -v -e DEPRECATED -e 'Install the buildx' -e 'docs.docker.com/go/buildx' -e '^$' >&2) >/dev/null; }
sudo=""
[ "$(id -u)" -ne 0 ] && sudo=sudo
command -v docker >/dev/null || { say "docker is needed"; exit 1; }

if [ -z "$base" ]; then
  base=llm-cluster/base:bookworm
  if docker image inspect "$base" >/dev/null 2>&1; then
    say "[1/4] base image $base is present"
  else
    say "[1/4] making the base image $base from Debian's packages (debootstrap, a few minutes)"
    if ! command -v debootstrap >/dev/null; then
      $sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq debootstrap >/dev/null
    fi
    rootfs=$(mktemp -d)
    trap '$sudo rm -rf "$rootfs"' EXIT
    $sudo debootstrap --variant=minbase bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
      | awk '/^I: Retrieving|^I: Extracting|^I: Installing core/ {n++; if (n % 20 == 0) print "build-images:   " $0 > "/dev/stderr"}'
    $sudo rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    $sudo tar -C "$rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$base" >/dev/null
    $sudo rm -rf "$rootfs"
    say "      $base: $(docker image inspect -f '{{.Size}}' "$base" | awk '{printf "%.0f MB", $1/1e6}')"
  fi
else
  say "[1/4] base image $base (given)"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ctx="$work/context"
rm -rf "$ctx" && mkdir -p "$ctx"
if [ "$cuda" = 1 ]; then
  [ -x "$root/.gpu/bin/shard-node" ] || { say "no .gpu/bin/shard-node: run scripts/build-cuda.sh --release --features cuda --bins first"; exit 1; }
  say "[2/4] CUDA binaries from .gpu/bin"
  cp "$root/.gpu/bin/shard-node" "$root/.gpu/bin/coordinator" "$ctx/"
  tag=cuda
elif [ -n "$bindir" ]; then
  say "[2/4] binaries from $bindir"
  cp "$bindir/shard-node" "$bindir/coordinator" "$ctx/"
  tag=latest
else
  say "[2/4] building the binaries (cargo --profile $profile)"
  (cd "$root" && cargo build --profile "$profile" -p shard-node -p coordinator --bins)
  dir=$profile; [ "$profile" = dev ] && dir=debug
  target=${CARGO_TARGET_DIR:-$root/target}
  cp "$target/$dir/shard-node" "$target/$dir/coordinator" "$ctx/"
  tag=latest
fi

say "[3/4] images llm-cluster/shard-node:$tag and llm-cluster/coordinator:$tag"
for t in shard-node coordinator; do
  build -f "$root/cluster-configs/Dockerfile" --build-arg "BASE=$base" --target "$t" \
    -t "llm-cluster/$t:$tag" "$ctx"
  say "      llm-cluster/$t:$tag"
done

if [ "$cuda" = 1 ]; then
  say "[4/4] (etcd: the CPU build makes it)"
  exit 0
fi
say "[4/4] image llm-cluster/etcd from Debian's etcd"
if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq etcd-server etcd-client >/dev/null 2>&1
fi
ectx="$work/etcd"
rm -rf "$ectx" && mkdir -p "$ectx"
cp "$(command -v etcd)" "$(command -v etcdctl)" "$ectx/"
build -f "$root/cluster-configs/etcd.Dockerfile" --build-arg "BASE=$base" \
  -t llm-cluster/etcd:latest "$ectx"
say "      llm-cluster/etcd:latest"
say "done: $(docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^llm-cluster/' | tr '\n' ' ')"
