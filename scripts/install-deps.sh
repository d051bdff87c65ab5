#!/bin/sh
# install-deps.sh: install what the end-to-end suite and the demo need, on
# Debian, as root. Fails loudly when it cannot.
set -eu
need=""
{ command -v dockerd && command -v docker; } >/dev/null 2>&1 || need="$need docker.io"
command -v docker-registry >/dev/null 2>&1 || need="$need docker-registry"
command -v etcd >/dev/null 2>&1 || need="$need etcd-server"
command -v etcdctl >/dev/null 2>&1 || need="$need etcd-client"
command -v curl >/dev/null 2>&1 || need="$need curl"
dpkg -s busybox-static >/dev/null 2>&1 || need="$need busybox-static"
command -v podman >/dev/null 2>&1 || need="$need podman"
command -v chromium >/dev/null 2>&1 || need="$need chromium" # the dashboard's browser test
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
	echo "install-deps: missing:$need; run as root on Debian (apt-get) or install them yourself" >&2
	exit 1
fi
echo "install-deps: installing$need" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends $need >/dev/null
