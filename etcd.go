package main

// etcd.go: the etcd keyspace, one function per key, and the client's
// connection options. Every key the daemon reads or writes is built here.
// (The client itself, its flags and TLS, is etcdclient.go.)
//
// Layout under -etcd_prefix (<prefix>):
//
//	<prefix>/<repository>                     a deploy trigger (trigger.go)
//	<prefix>/_nodes/<node>/revision           the last revision the node handled
//	<prefix>/_owner/<node>                    the live deployer of a node name, leased
//	<prefix>/_secret/webhook                  the cluster's webhook secret
//	<prefix>/_status/<node>                   what the node runs, leased
//	<prefix>/_rollout/<image ref>/halted      a version whose rollout is halted
//	<prefix>/_rollout/<image ref>/slots/<id>  a node replacing a container, leased
//
// A trigger is the key <prefix>/<repository>, as in the original, so
// `etcdctl put /deployer/myorg/foo x` still deploys every local tag of
// myorg/foo. Names under the prefix that begin with "_" hold the daemon's
// own state and are never repositories.

import (
	"net/url"
	"strings"
	"time"

	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
)

const (
	reservedMark = "_"
	nodesDir     = "_nodes"
	ownerDir     = "_owner"
	secretDir    = "_secret"
	statusDir    = "_status"
	rolloutDir   = "_rollout"

	haltLeaf  = "halted" // under a rollout's directory
	slotsLeaf = "slots/" // under a rollout's directory
)

// triggersPrefix is where the triggers are: every key under it that
// repoFromKey accepts.
func triggersPrefix(prefix string) string { return prefix + "/" }

// triggerKey is the trigger of one repository.
func triggerKey(prefix, repo string) string { return triggersPrefix(prefix) + repo }

// repoFromKey returns the repository a trigger key names, or false for keys
// outside the prefix and for reserved ones.
func repoFromKey(prefix, key string) (string, bool) {
	name, ok := strings.CutPrefix(key, triggersPrefix(prefix))
	if !ok || name == "" || strings.HasPrefix(name, reservedMark) {
		return "", false
	}
	return name, true
}

// progressKey is the last revision a node handled (watcher.go).
func progressKey(prefix, node string) string {
	return prefix + "/" + nodesDir + "/" + node + "/revision"
}

// ownerKey is held, under a lease, by the live deployer of a node name
// (nodeid.go).
func ownerKey(prefix, node string) string { return prefix + "/" + ownerDir + "/" + node }

// clusterSecretKey is the cluster's webhook secret (auth.go).
func clusterSecretKey(prefix string) string { return prefix + "/" + secretDir + "/webhook" }

// statusPrefix holds every node's status; statusKey one node's (status.go).
func statusPrefix(prefix string) string { return prefix + "/" + statusDir + "/" }

func statusKey(prefix, node string) string { return statusPrefix(prefix) + node }

// rolloutsPrefix holds the coordination of every image tag's rollout
// (rollout.go); rolloutPrefix one tag's.
func rolloutsPrefix(prefix string) string { return prefix + "/" + rolloutDir + "/" }

func rolloutPrefix(prefix, ref string) string {
	return rolloutsPrefix(prefix) + url.PathEscape(ref) + "/"
}

// haltKey records that a version of ref failed to come up.
func haltKey(prefix, ref string) string { return rolloutPrefix(prefix, ref) + haltLeaf }

// slotsDir holds the rollout slots of ref, one leased key per container
// being replaced.
func slotsDir(prefix, ref string) string { return rolloutPrefix(prefix, ref) + slotsLeaf }

// etcdDialOptions caps gRPC's reconnect backoff (2 minutes by default), so
// that the client is back within seconds of an etcd member's return.
func etcdDialOptions() []grpc.DialOption {
	return []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
		Backoff:           grpcbackoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 3 * time.Second},
		MinConnectTimeout: 2 * time.Second,
	})}
}
