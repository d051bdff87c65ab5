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
//	<prefix>/_halt/<image ref>                a version whose rollout is halted
//	<prefix>/_rollout/<image ref>/slots/<id>  a node replacing a container, leased
//	<prefix>/_rollout/<image ref>/queue/<id>  a node waiting for a slot, leased
//	<prefix>/_rollout/<image ref>/down/<node> the node's containers of the tag that are down, leased
//	<prefix>/_history/<image ref>/<version>   a version in the tag's deploy ledger (ledger.go), the last -history kept
//	<prefix>/_history-nodes/<image ref>/<version>/<node>  the node converged on that version (ledger.go), trimmed with it
//	<prefix>/_autorollback/<image ref>        the node rolling a halt of the tag back by itself (autorollback.go), leased
//	<prefix>/_pin/<image ref>                 the tag's pin: the version every node keeps it on (pin.go)
//	<prefix>/_policy/default                  the cluster's default rollout policy (policy.go)
//	<prefix>/_policy/<image ref>              the rollout policy of one image tag
//	<prefix>/_freeze/<scope>                  a freeze (freeze.go): "_all", a repository, or an image ref
//	<prefix>/_waiting/<image ref>             the newest version of a tag that a freeze or window holds (hold.go)
//	<prefix>/_canary/<image ref>              the canary rollout of the tag's newest version (canary.go)
//	<prefix>/_reports/<image ref>/<version>   the node sending the version's rollout report, leased (rolloutreport.go)
//	<prefix>/_reports/<image ref>/<version>/thread  the node posting the version's Slack thread, leased
//
// The halt records have a directory of their own, not a leaf of the
// rollout's, so that every node's auto-rollback watches them without
// hearing of every slot, queue and down record of the fleet (issue 22).
// Before, a halt was <prefix>/_rollout/<image ref>/halted (legacyHaltKey):
// a node moves such a record to its new key once at start (haltmove.go).
//
// A trigger is the key <prefix>/<repository>, as in the original, so
// `etcdctl put /deployer/myorg/foo x` still deploys every local tag of
// myorg/foo. Names under the prefix that begin with "_" hold the daemon's
// own state and are never repositories.

import (
	"net/url"
	"strconv"
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
	haltDir      = "_halt"
	autoRbDir    = "_autorollback"
	pinDir       = "_pin"
	policyDir    = "_policy"
	freezeDir    = "_freeze"
	waitingDir   = "_waiting"
	canaryDir    = "_canary"
	reportsDir   = "_reports"

	haltLeaf  = "halted" // under a rollout's directory: a halt record written before haltDir (legacyHaltKey)
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

// haltsPrefix holds the halt records, one key per image tag; haltKey
// records that a version of ref failed to come up.
const haltsPrefix = "/" + haltDir + "/"

func haltKey(ref string) string { return haltsPrefix + url.PathEscape(ref) }

// refFromHaltKey returns the image ref a halt key names.
func refFromHaltKey(key string) (string, bool) {
	name, ok := strings.CutPrefix(key, haltsPrefix)
	if !ok || strings.Contains(name, "/") {
		return "", false
	}
	ref, err := url.PathUnescape(name)
	return ref, err == nil && ref != ""
}

// legacyHaltKey is where a halt of ref was recorded before haltsPrefix:
// read only to move it (haltmove.go).
func legacyHaltKey(ref string) string { return rolloutPrefix(ref) + haltLeaf }

// refFromLegacyHaltKey returns the image ref a legacy halt key names.
func refFromLegacyHaltKey(key string) (string, bool) {
	rest, ok := strings.CutPrefix(key, rolloutsPrefix)
	if !ok {
		return "", false
	}
	escaped, ok := strings.CutSuffix(rest, "/"+haltLeaf)
	if !ok || strings.Contains(escaped, "/") {
		return "", false
	}
	ref, err := url.PathUnescape(escaped)
	return ref, err == nil && ref != ""
}

// autoRollbackKey is held, under its lease, by the node that rolls a
// halt of ref back by itself (autorollback.go).
func autoRollbackKey(ref string) string { return "/" + autoRbDir + "/" + url.PathEscape(ref) }

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

// pinsPrefix holds the pins of every image tag; pinKey one tag's
// (pin.go).
const pinsPrefix = "/" + pinDir + "/"

func pinKey(ref string) string { return pinsPrefix + url.PathEscape(ref) }

// policiesPrefix holds the rollout policies (policy.go): the default's
// record and one per image tag.
const policiesPrefix = "/" + policyDir + "/"

// defaultPolicyKey is the cluster-wide default policy. ("default" is
// never an escaped image ref: those hold a ':' or a '/'.)
const defaultPolicyKey = policiesPrefix + "default"

// policyKey is the policy of one image tag.
func policyKey(ref string) string { return policiesPrefix + url.PathEscape(ref) }

// refFromPolicyKey returns the image ref a policy key names, "" for the
// default, false for other keys.
func refFromPolicyKey(key string) (string, bool) {
	name, ok := strings.CutPrefix(key, policiesPrefix)
	if !ok {
		return "", false
	}
	if name == "default" {
		return "", true
	}
	ref, err := url.PathUnescape(name)
	return ref, err == nil && ref != ""
}

// freezesPrefix holds the freezes (freeze.go), one key per scope.
const freezesPrefix = "/" + freezeDir + "/"

// freezeKey is the freeze of scope: freezeAll, a repository or an image
// ref.
func freezeKey(scope string) string { return freezesPrefix + url.PathEscape(scope) }

// waitingsPrefix holds the versions that a hold keeps waiting, one key
// per image tag (hold.go).
const waitingsPrefix = "/" + waitingDir + "/"

// waitingKey is the waiting version of ref.
func waitingKey(ref string) string { return waitingsPrefix + url.PathEscape(ref) }

// canariesPrefix holds the canary rollouts (canary.go), one key per image
// tag.
const canariesPrefix = "/" + canaryDir + "/"

// canaryKey is the canary rollout of one image tag.
func canaryKey(ref string) string { return canariesPrefix + url.PathEscape(ref) }

// refFromCanaryKey returns the image ref a canary key names.
func refFromCanaryKey(key string) (string, bool) {
	name, ok := strings.CutPrefix(key, canariesPrefix)
	if !ok {
		return "", false
	}
	ref, err := url.PathUnescape(name)
	return ref, err == nil && ref != ""
}

// reportsPrefix holds the claims of rollout reports being sent
// (rolloutreport.go); reportClaimKey one version's, held under the
// sender's lease until the report is marked sent in the ledger.
const reportsPrefix = "/" + reportsDir + "/"

func reportClaimKey(ref string, version int64) string {
	return reportsPrefix + url.PathEscape(ref) + "/" + strconv.FormatInt(version, 10)
}

// threadClaimKey is held, under its lease, by the node posting the parent
// message of a version's Slack thread (-slack_token).
func threadClaimKey(ref string, version int64) string {
	return reportClaimKey(ref, version) + "/thread"
}
