#!/usr/bin/env bash
# demo.sh [--keep]: the deployer's main job on one machine, step by step.
#
# Starts a Docker daemon if none is reachable, a registry on loopback, the
# deployer with its embedded etcd, a Slack stand-in and a sample app under
# a supervisor (what the README's systemd unit does); pushes a new version,
# sends a Docker Hub-format webhook, and shows what happened with timings.
# --keep leaves everything running and prints how to stop it.
set -euo pipefail
keep=false
[ "${1:-}" = "--keep" ] && keep=true
cd "$(dirname "$0")/.."
repo_root=$(pwd)
dir=$(mktemp -d /tmp/deployer-demo.XXXXXX)
pids=()
t0=$(date +%s%N)
step() { printf '\n[%6.2fs] \033[1m%s\033[0m\n' "$(( ($(date +%s%N) - t0) / 1000000 ))e-3" "$*"; }
info() { printf '          %s\n' "$*"; }
cleanup() {
	if $keep; then return; fi
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	docker rm -f demo-app >/dev/null 2>&1 || true
	if [ -n "${own_dockerd:-}" ]; then kill "$own_dockerd" 2>/dev/null || true; sleep 2; fi
	grep -o " $dir[^ ]*" /proc/mounts 2>/dev/null | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
	rm -rf "$dir"
}
trap cleanup EXIT
free_port() { for p in $(seq "$1" $(( $1 + 100 ))); do (echo >/dev/tcp/127.0.0.1/$p) 2>/dev/null || { echo "$p"; return; }; done; }

step "Building the deployer"
go build -o "$dir/deployer" . && go build -o "$dir/slack-recorder" ./scripts/slack-recorder
info "$dir/deployer"

step "Docker"
if docker info >/dev/null 2>&1; then
	info "using the Docker daemon at ${DOCKER_HOST:-unix:///var/run/docker.sock}"
else
	export DOCKER_HOST="unix://$dir/docker.sock"
	dockerd -H "$DOCKER_HOST" --data-root "$dir/docker" --exec-root "$dir/exec" --pidfile "$dir/docker.pid" \
		--bridge=none --iptables=false --ip-masq=false >"$dir/dockerd.log" 2>&1 &
	own_dockerd=$!; pids+=("$own_dockerd")
	for _ in $(seq 100); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
	info "started a private dockerd at $DOCKER_HOST (log: $dir/dockerd.log)"
fi
export DOCKER_BUILDKIT=0 DOCKER_CLI_HINTS=false
docker_host=${DOCKER_HOST:-unix:///var/run/docker.sock}

reg_port=$(free_port 5000); hook_port=$(free_port 4500); slack_port=$(free_port 4599)
etcd_port=$(free_port 4001); peer_port=$(free_port 4101)
registry="127.0.0.1:$reg_port"

step "Registry on $registry"
mkdir -p "$dir/registry"
cat >"$dir/registry.yml" <<YML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $dir/registry}}
http: {addr: $registry}
YML
docker-registry serve "$dir/registry.yml" >"$dir/registry.log" 2>&1 & pids+=($!)
for _ in $(seq 50); do curl -fs "http://$registry/v2/" >/dev/null && break; sleep 0.1; done

step "Slack stand-in on 127.0.0.1:$slack_port"
"$dir/slack-recorder" -listen "127.0.0.1:$slack_port" -out "$dir/slack.jsonl" & pids+=($!)

step "Deployer with its embedded etcd (webhooks on 127.0.0.1:$hook_port)"
"$dir/deployer" -docker "$docker_host" -etcd_nodes= -etcd_data_dir "$dir/etcd" \
	-etcd_listen_client "http://127.0.0.1:$etcd_port" -etcd_listen_peer "http://127.0.0.1:$peer_port" \
	-listen "127.0.0.1:$hook_port" -registry "$registry" -webhook_secret demo-secret -dockercfg= \
	-slack_webhook_url "http://127.0.0.1:$slack_port/" -node_name demo-node -kill_timeout 5 \
	>"$dir/deployer.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$hook_port/healthz" >/dev/null && break; sleep 0.1; done
info "$(curl -s "http://127.0.0.1:$hook_port/healthz")   (log: $dir/deployer.log)"

build() { # build VERSION: a FROM scratch busybox app, pushed to the registry
	mkdir -p "$dir/app"; cp "$(command -v busybox)" "$dir/app/busybox"; echo "$1" >"$dir/app/version"
	cat >"$dir/app/Dockerfile" <<'DF'
FROM scratch
COPY busybox /bin/busybox
COPY version /version
CMD ["/bin/busybox","sh","-c","trap 'exit 0' TERM; while true; do /bin/busybox sleep 0.2; done"]
DF
	docker build -q -t "$registry/demo/app:latest" "$dir/app" >/dev/null 2>&1
	docker push -q "$registry/demo/app:latest" >/dev/null
	docker image inspect -f '{{.Id}}' "$registry/demo/app:latest"
}
running_image() { docker inspect -f '{{if .State.Running}}{{.Image}}{{end}}' demo-app 2>/dev/null || true; }

step "Version 1 of demo/app, pushed and running under a supervisor"
v1=$(build "v1 $(date)")
DOCKER_HOST=$docker_host "$repo_root/scripts/supervise.sh" demo-app "$registry/demo/app:latest" & pids+=($!)
for _ in $(seq 100); do [ "$(running_image)" = "$v1" ] && break; sleep 0.1; done
info "demo-app runs ${v1:7:12}"

step "Version 2 built and pushed (the container still runs version 1)"
v2=$(build "v2 $(date)")
info "$registry/demo/app:latest is now ${v2:7:12}; demo-app runs $(running_image | cut -c8-19)"

step "Docker Hub-format webhook: POST /api/dockerhub/webhook"
hook_start=$(date +%s%N)
reply=$(curl -s -H 'Authorization: Bearer demo-secret' -d '{"push_data":{"tag":"latest"},"repository":{"repo_name":"demo/app"}}' \
	"http://127.0.0.1:$hook_port/api/dockerhub/webhook")
info "reply: $reply"

step "The trigger in etcd"
info "$(ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$etcd_port" get --prefix /deployer/demo 2>&1 | tr '\n' ' ')"

step "Waiting for demo-app to run version 2"
for _ in $(seq 300); do [ "$(running_image)" = "$v2" ] && break; sleep 0.05; done
[ "$(running_image)" = "$v2" ] || { echo "demo-app did not move to version 2; see $dir/deployer.log" >&2; exit 1; }
info "demo-app runs ${v2:7:12}, $(( ($(date +%s%N) - hook_start) / 1000000 )) ms after the webhook"

# The deploy finishes (and Slack hears of it) once the new container has
# kept running for a second.
for _ in $(seq 100); do [ -s "$dir/slack.jsonl" ] && break; sleep 0.1; done

step "What the deployer logged"
grep -E 'webhook|trigger|pulled|stopped|replacement|deploy finished' "$dir/deployer.log" | sed 's/^/          /'

step "What Slack got"
sed 's/^/          /' "$dir/slack.jsonl"

if $keep; then
	step "Left running"
	info "processes: ${pids[*]}  (stop: kill ${pids[*]}; docker rm -f demo-app)"
	info "files: $dir"
fi
