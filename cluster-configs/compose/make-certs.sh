#!/bin/sh
# The compose's `certs` service: a cluster CA (in the `ca` volume, which only this service
# mounts) and a certificate per coordinator and node (in the `certs` volume, read-only for the
# others). Idempotent: what exists is kept, so a restart reuses the cluster's identity.
#   NODES="node-a node-b" COORDINATORS="coordinator-1" make-certs.sh
set -eu
ca=/var/lib/llm-cluster/ca
out=/var/lib/llm-cluster/certs
[ -f "$ca/ca.pem" ] || coordinator certs init --out "$ca"
cp "$ca/ca.pem" "$out/ca.pem"
for n in ${NODES:-node-a node-b node-c}; do
  # a node's certificate names every address it is dialed at: its service name, and the
  # addresses of the hosts where other hosts dial it (ADVERTISE_HOST, space-separated)
  set -- --ca "$ca" --role node --name "$n" --out "$out"
  for h in ${ADVERTISE_HOST:-}; do set -- "$@" --san "$h"; done
  [ -f "$out/$n.pem" ] || coordinator certs issue "$@"
done
for c in ${COORDINATORS:-coordinator-1 coordinator-2}; do
  [ -f "$out/$c.pem" ] || coordinator certs issue --ca "$ca" --role coordinator --name "$c" --out "$out"
done
ls "$out"
