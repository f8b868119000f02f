#!/usr/bin/env bash
# Installs what `just container-test` needs, when it is missing: podman with runc (apt
# would pick crun, which fails on cgroup v1 machines like ours), podman-compose, the
# netavark network stack, and the Mosquitto clients that test from the host.
set -euo pipefail

need=()
for cmd in podman runc podman-compose netavark iptables mosquitto_sub; do
  command -v "$cmd" >/dev/null || [ -x "/usr/lib/podman/$cmd" ] || need+=("$cmd")
done
[ -x /usr/lib/podman/aardvark-dns ] || need+=(aardvark-dns)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "container-deps: installing for ${need[*]}"
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "container-deps: need root and apt-get; install podman runc podman-compose netavark aardvark-dns iptables mosquitto-clients" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq \
  podman runc podman-compose netavark aardvark-dns iptables mosquitto-clients >/dev/null
