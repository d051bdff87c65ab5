package main

// etcd.go: the etcd keyspace, one function per key. Every key the daemon
// reads or writes is built here. (The client itself, its TLS, its view of
// a prefix and its connection options, is internal/etcdc.)
//
// Every component gets a client confined to -etcd_prefix
// (etcdc.InPrefix): the keys below are relative to it, and etcd's
// namespace package adds and strips the prefix. Layout under -etcd_prefix (<prefix>):
//
//	<prefix>/<repository>                     a deploy trigger (trigger.go)
//	<prefix>/_nodes/<node>/revision           the last revision the node handled
//	<prefix>/_owner/<node>                    the live deployer of a node name, leased
//	<prefix>/_secret/webhook                  the cluster's webhook secret
//	<prefix>/_status/<node>                   what the node runs, leased
//	<prefix>/_rollout/<image ref>/halted      a version whose rollout is halted
//	<prefix>/_rollout/<image ref>/slots/<id>  a node replacing a container, leased
//	<prefix>/_rollout/<image ref>/queue/<id>  a node waiting for a slot, leased
//	<prefix>/_rollout/<image ref>/down/<node> the node's containers of the tag that are down, leased
//	<prefix>/_history/<image ref>/<version>   a version in the tag's deploy ledger (ledger.go), the last -history kept
//	<prefix>/_history-nodes/<image ref>/<version>/<node>  a node converged on that version (ledger.go), trimmed with it
//
// A trigger is the key <prefix>/<repository>, as in the original, so
// `etcdctl put /deployer/myorg/foo x` still deploys every local tag of
// myorg/foo. Names under the prefix that begin with "_" hold the daemon's
// own state and are never repositories.

import (
	"net/url"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
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
	downLeaf  = "down/"  // under a rollout's directory
	queueLeaf = "queue/" // under a rollout's directory
)

// triggersPrefix is where the triggers are: every key under it that
// repoFromKey accepts.
const triggersPrefix = "/"

// triggerRanges are the key ranges that hold the triggers, around the
// reserved names: ["/", "/_") and ["/`", "0") ("_" is 0x5F, "`" the
// byte after it, "0" the byte after "/"). Watching these, not all of
// triggersPrefix, keeps every node's status, slot and ledger writes from
// reaching every node.
var triggerRanges = []struct{ lo, hi string }{
	{triggersPrefix, triggersPrefix + reservedMark},
	{triggersPrefix + string(rune(reservedMark[0]+1)), clientv3.GetPrefixRangeEnd(triggersPrefix)},
}

// triggerKey is the trigger of one repository.
func triggerKey(repo string) string { return triggersPrefix + repo }

// repoFromKey returns the repository a trigger key names, or false for keys
// outside the triggers and for reserved ones.
func repoFromKey(key string) (string, bool) {
	name, ok := strings.CutPrefix(key, triggersPrefix)
	if !ok || name == "" || strings.HasPrefix(name, reservedMark) {
		return "", false
	}
	return name, true
}

// progressKey is the last revision a node handled (watcher.go).
func progressKey(node string) string { return "/" + nodesDir + "/" + node + "/revision" }

// ownerKey is held, under a lease, by the live deployer of a node name
// (nodeid.go).
func ownerKey(node string) string { return "/" + ownerDir + "/" + node }

// clusterSecretKey is the cluster's webhook secret (auth.go).
const clusterSecretKey = "/" + secretDir + "/webhook"

// statusPrefix holds every node's status; statusKey one node's (status.go).
const statusPrefix = "/" + statusDir + "/"

func statusKey(node string) string { return statusPrefix + node }

// rolloutsPrefix holds the coordination of every image tag's rollout
// (rollout.go); rolloutPrefix one tag's.
const rolloutsPrefix = "/" + rolloutDir + "/"

func rolloutPrefix(ref string) string { return rolloutsPrefix + url.PathEscape(ref) + "/" }

// haltKey records that a version of ref failed to come up.
func haltKey(ref string) string { return rolloutPrefix(ref) + haltLeaf }

// slotsDir holds the rollout slots of ref, one leased key per container
// being replaced.
func slotsDir(ref string) string { return rolloutPrefix(ref) + slotsLeaf }

// queueDir holds the nodes waiting for a rollout slot of ref, one leased
// key per container, first come first served by create revision.
func queueDir(ref string) string { return rolloutPrefix(ref) + queueLeaf }

// downDir holds, one leased key per node, the containers of ref that are
// down on that node (status.go writes them, rollout.go counts them).
func downDir(ref string) string { return rolloutPrefix(ref) + downLeaf }

// downKey lists node's containers of ref that are down.
func downKey(ref, node string) string { return downDir(ref) + node }
