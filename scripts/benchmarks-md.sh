#!/bin/sh
# benchmarks-md.sh RESULTS: BENCHMARKS.md on stdout, the machine first.
set -eu
cat <<HDR
# Benchmarks

Measured by \`make bench\` on $(date -u +%Y-%m-%d). Every figure comes from
the real stack: Debian's dockerd, docker-registry and etcd on loopback,
busybox images \`FROM scratch\`, containers with \`--network none\`.

| machine | |
|---|---|
| CPU | $(nproc) × $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//') |
| memory | $(free -h | awk '/^Mem:/ {print $2}') |
| kernel | $(uname -r) |
| Go | $(go version | cut -d' ' -f3) |
| dockerd | $(dockerd --version | cut -d' ' -f3 | tr -d ,) |
| etcd | $(etcd --version 2>/dev/null | head -1 | cut -d' ' -f3) |
| registry | $(docker-registry --version 2>/dev/null | awk '{print $3}') |
HDR
cat "$1"
