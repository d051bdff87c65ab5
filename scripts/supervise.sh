#!/bin/sh
# supervise.sh NAME IMAGE [docker run options...]
#
# Does what the README's systemd/fleet unit does for an app container, for
# tests and the demo: remove the old container, pull the tag, run it in the
# foreground, and start it again whenever it exits (Restart=always,
# RestartSec=0.5). DOCKER_HOST picks the daemon. Stops on SIGTERM.
name=$1 image=$2
shift 2
trap 'docker rm -f "$name" >/dev/null 2>&1; exit 0' TERM INT
while :; do
	docker rm -f "$name" >/dev/null 2>&1                   # ExecStartPre=-/usr/bin/docker rm -f
	docker pull -q "$image" >/dev/null 2>&1                # ExecStartPre=-/usr/bin/docker pull
	docker run --rm --name "$name" --network none "$@" "$image" >/dev/null 2>&1 &  # ExecStart
	wait $!
	sleep 0.5                                              # RestartSec
done
