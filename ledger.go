package main

// ledger.go: the deploy ledger, each image tag's history of versions in
// etcd (README, History): what was pushed and by whom, when each node
// converged on it or failed, and how its rollout ended. A deploy hands the
// ledger what happened on this node with one call that never blocks; the
// ledger writes in the background, each write a transaction under a
// deadline, retried within a bound, so that a ledger write never fails or
// slows a deploy. The history of a tag is bounded (-history): the
// transaction that adds a version deletes those that fall out.

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/die-net/deployer/internal/backoff"
	"github.com/distribution/reference"
	docker "github.com/fsouza/go-dockerclient"
	"github.com/prometheus/client_golang/prometheus"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// The outcomes of a version.
const (
	outcomeRollingOut = "rolling out" // some nodes that run the tag have not converged yet
	outcomeRolledOut  = "rolled out"  // every node that runs the tag converged
	outcomeHalted     = "halted"      // a node's replacement failed and the rollout stopped
	outcomeSuperseded = "superseded"  // a newer version came before this one rolled out
	outcomeRolledBack = "rolled back" // a rollback put an earlier version back under the tag
	outcomeHeld       = "held"        // a hold (a pin) kept it from replacing containers (ledgerVersion.Held says why)
)

// ledgerVersion is one version of one image tag, the value of its
// historyKey. Rollback and pins (issue 19) add versions whose AskedBy
// names a command and a host, and the outcome "rolled back".
type ledgerVersion struct {
	Version int64  `json:"version"` // 1, 2, … per tag
	Image   string `json:"image"`   // the tag, canonical: docker.io/library/nginx:1.27
	ImageID string `json:"image_id"`
	// Digest is the manifest digest: the trigger's when the sender gave
	// one, else the one the first node to record the version found in
	// its pull's RepoDigests.
	Digest   string    `json:"digest,omitempty"`
	Pushed   time.Time `json:"pushed"`             // the trigger's time; else when the first node saw it
	Revision int64     `json:"revision,omitempty"` // the trigger's etcd revision; 0: the periodic re-pull found it
	AskedBy  askedBy   `json:"asked_by"`
	// Nodes: per node, when it converged on the version or failed. The
	// value holds the failures (and what earlier versions of the daemon
	// wrote); each convergence is a key of its own (historyNodeKey), which
	// readHistory puts here.
	Nodes map[string]nodeResult `json:"nodes"`
	// Running is how many nodes ran the tag when the version was
	// recorded (runningUnknown while its recorder counts them), corrected
	// by the completion check: when as many nodes converged, less
	// runningSlack, one checks whether the version rolled out.
	Running int    `json:"running,omitempty"`
	Outcome string `json:"outcome"`
	// Completed is when the last node that runs the tag converged, and
	// CompletedBy that node; written once, by the node that saw it.
	Completed   time.Time `json:"completed,omitzero"`
	CompletedBy string    `json:"completed_by,omitempty"`
	// Lead times from Pushed to the first node converged and to the last.
	FirstSeconds float64 `json:"lead_first_seconds,omitempty"`
	LastSeconds  float64 `json:"lead_last_seconds,omitempty"`
	// Held is why the nodes held the version ("held by pin …",
	// "quarantined: …" (gate.go), "frozen since …: reason", "outside
	// window …" (hold.go)), since HeldSince; cleared when a node
	// converges on it. Override records a deploy -now that let it past a hold (hold.go).
	Held      string    `json:"held,omitempty"`
	HeldSince time.Time `json:"held_since,omitzero"`
	Override  string    `json:"override,omitempty"`
	// Reported: the version's rollout report was sent (rolloutreport.go).
	Reported *reportMark `json:"reported,omitempty"`
	// SlackThread is the rollout's thread with -slack_token.
	SlackThread *slackThread `json:"slack_thread,omitempty"`
}

// reportMark records that a version's rollout report was sent: when, by
// which node, on which outcome; Err when no service took it.
type reportMark struct {
	Time    time.Time `json:"time"`
	Node    string    `json:"node"`
	Outcome string    `json:"outcome"`
	Err     string    `json:"err,omitempty"`
}

// slackThread is a version's Slack thread: the parent message (channel
// and timestamp) and the nodes that replied with their part.
type slackThread struct {
	Channel string   `json:"channel"`
	TS      string   `json:"ts"`
	Replied []string `json:"replied,omitempty"`
}

// askedBy is who asked for a version: a trigger's source and remote
// address (and the node that took it); later a rollback's or pin's
// command and host.
type askedBy struct {
	Source  string `json:"source,omitempty"` // dockerhub, registry, api, …; "etcd" for a raw put; "repull"
	Remote  string `json:"remote,omitempty"` // the sender's address
	Node    string `json:"node,omitempty"`   // the node that took the webhook
	Command string `json:"command,omitempty"`
	Host    string `json:"host,omitempty"`
	Cause   string `json:"cause,omitempty"` // an auto-rollback's: the halt it undoes
}

// nodeResult is one node's part in a version's rollout.
type nodeResult struct {
	Converged time.Time `json:"converged,omitzero"`
	Failed    time.Time `json:"failed,omitzero"`
	Reason    string    `json:"reason,omitempty"`
}

// The ledger's keys (etcd.go's layout): one key per version, its number
// zero-padded so that the keys sort by version and a range delete trims
// the oldest.
const (
	historyDir      = "_history"
	historiesPrefix = "/" + historyDir + "/"
)

// historyPrefix holds the versions of one image tag.
func historyPrefix(ref string) string { return historiesPrefix + url.PathEscape(ref) + "/" }

// historyKey is one version of ref.
func historyKey(ref string, version int64) string {
	return historyPrefix(ref) + fmt.Sprintf("%012d", version)
}

// historyNodesPrefix holds the node keys of the ledger: each node's
// convergence on a version (historyNodeKey), under a directory of their
// own so that reading a tag's versions reads no node key.
const historyNodesPrefix = "/" + historyDir + "-nodes/"

// historyNodesRef holds the node keys of every version of ref.
func historyNodesRef(ref string) string { return historyNodesPrefix + url.PathEscape(ref) + "/" }

// historyNodesDir holds the node keys of one version of ref.
func historyNodesDir(ref string, version int64) string {
	return historyNodesRef(ref) + fmt.Sprintf("%012d", version) + "/"
}

// historyNodeKey is node's convergence on one version of ref.
func historyNodeKey(ref string, version int64, node string) string {
	return historyNodesDir(ref, version) + node
}

// trimOps delete the versions of ref below oldest, and their node keys.
func trimOps(ref string, oldest int64) []clientv3.Op {
	return []clientv3.Op{
		clientv3.OpDelete(historyPrefix(ref), clientv3.WithRange(historyKey(ref, oldest))),
		clientv3.OpDelete(historyNodesRef(ref), clientv3.WithRange(historyNodesDir(ref, oldest))),
	}
}

// ledgerEntry is what one deploy did to one tag on this node.
type ledgerEntry struct {
	Ref      string // canonical image tag
	Repo     string // its repository, canonical
	ImageID  string
	Digest   string // pushed, per the job; "" when not known
	Revision int64  // the newest trigger revision of the job; 0: no trigger
	Seen     time.Time
	Time     time.Time // when the node converged or failed
	Failed   string    // why the replacement failed (the version halted here); "": converged
	// ViaStatus: nothing was replaced; converged if this node's status
	// record shows its containers of Ref on ImageID (Time: when the last
	// of them started), not recorded if it shows none within the
	// attempts.
	ViaStatus bool
	// Node is the node the entry is about: "" for this one; another's
	// when the auto-rollback records a halt its node did not live to
	// record (autorollback.go).
	Node string
	// Held: the gate held the version here, and why (the gate, gate.go;
	// freezes and windows, hold.go).
	Held string
	// Override: a deploy -now let the version past a hold (hold.go).
	Override string
}

// ledgerImages reads an image's RepoDigests.
type ledgerImages interface {
	// InspectImageWithContext reads one image, by ID or reference.
	InspectImageWithContext(ctx context.Context, name string) (*docker.Image, error)
}

// ledgerQueue bounds the entries waiting for their write: a ledger that
// cannot write drops the newest ones (logged) rather than hold deploys.
const ledgerQueue = 256

// ledger records the versions this node deploys.
type ledger struct {
	kv          clientv3.KV
	images      ledgerImages // nil: no digest lookup
	node        string
	keep        int64 // -history
	coordinated bool  // -max_unavailable > 0: a failed replacement halts the version
	timeout     time.Duration
	attempts    int
	retryBase   time.Duration
	log         *slog.Logger
	entries     chan ledgerEntry
	nodeLead    prometheus.Histogram
	fleetLead   prometheus.Histogram
	now         func() time.Time
}

// newLedger returns the ledger of node, kept through kv (confined to
// -etcd_prefix), registering its histograms on reg. It starts nothing.
func newLedger(kv clientv3.KV, images ledgerImages, node string, keep int, coordinated bool, reg prometheus.Registerer, log *slog.Logger) *ledger {
	buckets := prometheus.ExponentialBuckets(0.25, 2, 14) // 0.25 s … ~34 min
	l := &ledger{
		kv: kv, images: images, node: node, keep: int64(max(keep, 1)), coordinated: coordinated,
		timeout: callTimeout, attempts: 5, retryBase: time.Second, log: log,
		entries: make(chan ledgerEntry, ledgerQueue), now: time.Now,
		nodeLead: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "deployer_lead_time_seconds", Help: "Time from a version's trigger to this node converged on it.", Buckets: buckets,
		}),
		fleetLead: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "deployer_fleet_lead_time_seconds", Help: "Time from a version's trigger to the last node that runs the tag converged on it (observed once per version, by that node).", Buckets: buckets,
		}),
	}
	if reg != nil {
		reg.MustRegister(l.nodeLead, l.fleetLead)
	}
	return l
}

// deployed hands the ledger what a deploy of job j did to repo's tags on
// this node: per tag with stale containers, converged (every one
// replaced) or failed (a replacement failed: the version halted here);
// tags with containers left for a retry are not recorded yet. current
// holds the tags pulled and their image IDs: after a trigger, those with
// no stale container converged without a replacement (a supervisor that
// pulls had already restarted them on the new image), which the ledger
// checks against this node's status record. It never blocks; a nil
// ledger records nothing.
func (l *ledger) deployed(j job, repo reference.Named, current map[string]string, outs []outcome) {
	if l == nil {
		return
	}
	type tagState struct {
		id          string
		ok, pending bool
		failed      string
		failedID    string
	}
	tags := map[string]*tagState{}
	for _, o := range outs {
		t := tags[o.c.Ref.Tag()]
		if t == nil {
			t = &tagState{}
			tags[o.c.Ref.Tag()] = t
		}
		switch {
		case o.err != nil && errors.Is(o.err, errReplacement):
			t.failed, t.failedID = o.err.Error(), o.c.NewID
		case o.err != nil || o.skipped != "":
			t.pending = true
		default:
			t.ok, t.id = true, o.c.NewID
		}
	}
	var rev int64
	if len(j.Revs) > 0 {
		rev = slices.Max(j.Revs)
	}
	now := l.now()
	var entries []ledgerEntry
	for _, tag := range slices.Sorted(maps.Keys(tags)) {
		t := tags[tag]
		ref, err := reference.WithTag(repo, tag)
		if err != nil {
			continue
		}
		e := ledgerEntry{Ref: ref.String(), Repo: repo.Name(), Digest: j.Digests[tag], Revision: rev, Seen: j.Seen, Time: now}
		switch {
		case t.failed != "":
			e.ImageID, e.Failed = t.failedID, t.failed
		case t.ok && !t.pending:
			e.ImageID = t.id
		default:
			continue
		}
		entries = append(entries, e)
	}
	for _, tag := range slices.Sorted(maps.Keys(current)) {
		if _, replaced := tags[tag]; replaced || rev == 0 {
			continue
		}
		if ref, err := reference.WithTag(repo, tag); err == nil {
			entries = append(entries, ledgerEntry{Ref: ref.String(), Repo: repo.Name(), ImageID: current[tag], Digest: j.Digests[tag],
				Revision: rev, Seen: j.Seen, Time: now, ViaStatus: true})
		}
	}
	for _, e := range entries {
		select {
		case l.entries <- e:
		default:
			l.log.Warn("deploy ledger full: version not recorded", "image", e.Ref, "image_id", shortID(e.ImageID))
		}
	}
}

// run writes the entries until ctx is done, then gives those still
// queued one attempt each, within a few seconds.
func (l *ledger) run(ctx context.Context) error {
	for {
		select {
		case e := <-l.entries:
			l.write(ctx, e)
		case <-ctx.Done():
			fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 3*time.Second)
			defer cancel()
			for {
				select {
				case e := <-l.entries:
					if err := l.apply(fctx, e); err != nil {
						l.log.Warn("deploy ledger not written at shutdown", "image", e.Ref, "err", err)
					}
				default:
					return nil
				}
			}
		}
	}
}

// write applies e, retrying with backoff up to l.attempts times.
func (l *ledger) write(ctx context.Context, e ledgerEntry) {
	for attempt := 1; ; attempt++ {
		err := l.apply(ctx, e)
		if err == nil {
			return
		}
		if attempt >= l.attempts && errors.Is(err, errLedgerNotYet) {
			l.log.Debug("deploy ledger: the node did not converge", "image", e.Ref, "image_id", shortID(e.ImageID))
			return
		}
		if attempt >= l.attempts || ctx.Err() != nil {
			l.log.Warn("deploy ledger not written", "image", e.Ref, "image_id", shortID(e.ImageID), "attempts", attempt, "err", err)
			return
		}
		if !backoff.Sleep(ctx, backoff.Delay(l.retryBase, attempt)) {
			return
		}
	}
}

// errLedgerConflict: another node changed the tag's history in between;
// the transaction is tried again on what it wrote.
var errLedgerConflict = errors.New("the tag's history changed meanwhile")

// errLedgerRecorded: the node's convergence on the version is already
// recorded; nothing is written or observed again.
var errLedgerRecorded = errors.New("already recorded")

// apply records e: on the version of e.ImageID (a new one when the image
// is not the tag's newest version, or a trigger newer than it brings the
// image back), in one transaction that compares every key it read.
func (l *ledger) apply(ctx context.Context, e ledgerEntry) error {
	if e.Held != "" {
		return l.applyHeld(ctx, e)
	}
	if e.ViaStatus {
		var ok bool
		var err error
		if e, ok, err = l.convergedHere(ctx, e); err != nil || !ok {
			return err
		}
	}
	asked, pushed, digest := l.trigger(ctx, e)
	if e.Digest == "" {
		e.Digest = digest
	}
	if pushed.IsZero() {
		pushed = cmp.Or(e.Seen, e.Time)
	}
	for range 5 {
		completed, err := l.applyOnce(ctx, e, asked, pushed)
		if errors.Is(err, errLedgerConflict) {
			continue
		}
		if errors.Is(err, errLedgerRecorded) {
			return nil
		}
		if err == nil && e.Failed == "" && e.Held == "" && e.Override == "" {
			l.nodeLead.Observe(max(e.Time.Sub(pushed), 0).Seconds())
		}
		if err == nil && completed >= 0 {
			l.fleetLead.Observe(completed.Seconds())
		}
		return err
	}
	return errLedgerConflict
}

// storedVersion is a version as read, with its key's ModRevision.
type storedVersion struct {
	v   ledgerVersion
	rev int64
}

// versionWrite is the transaction that records an entry: the version
// written under key, the comparisons on what was read, and the other
// operations (a superseded version, the trim).
type versionWrite struct {
	key  string
	v    ledgerVersion
	cmps []clientv3.Cmp
	ops  []clientv3.Op
}

// applyOnce is one read-modify-write of e's version; it returns the lead
// time to the last node when this write completed the version, -1 when
// it did not. A convergence on an existing version is the node's own key
// (converge); a new version is written with its first node's.
func (l *ledger) applyOnce(ctx context.Context, e ledgerEntry, asked askedBy, pushed time.Time) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, l.timeout)
	defer cancel()
	versions, err := l.readVersions(ctx, e.Ref)
	if err != nil {
		return 0, err
	}
	target, newest := pickVersion(versions, e)
	converged := e.Failed == "" && e.Override == ""
	if converged && target != nil {
		return l.converge(ctx, e, target)
	}
	var w versionWrite
	if target == nil {
		w = l.newVersion(e, asked, pushed, newest)
	} else {
		w = existingVersion(e, target)
	}
	switch {
	case e.Override != "": // let past a hold, once: marked, nothing converged yet
		if w.v.Override != "" {
			return -1, errLedgerRecorded
		}
		w.v.Override, w.v.Held, w.v.HeldSince = e.Override, "", time.Time{}
	case converged: // a new version, recorded by the first node to converge
		w.ops = append(w.ops, clientv3.OpPut(historyNodeKey(e.Ref, w.v.Version, cmp.Or(e.Node, l.node)), convergedAt(e.Time)))
		w.v.FirstSeconds = max(e.Time.Sub(w.v.Pushed), 0).Seconds()
	default:
		markFailed(&w.v, e, cmp.Or(e.Node, l.node), l.coordinated)
	}
	b, err := json.Marshal(w.v)
	if err != nil {
		return 0, err
	}
	tr, err := l.kv.Txn(ctx).If(w.cmps...).Then(append(w.ops, clientv3.OpPut(w.key, string(b)))...).Commit()
	if err != nil {
		return 0, fmt.Errorf("write %s version %d: %w", e.Ref, w.v.Version, err)
	}
	if !tr.Succeeded {
		return 0, errLedgerConflict
	}
	if converged {
		return l.settle(ctx, e.Ref, w.v, 1)
	}
	return -1, nil
}

// readVersions reads the versions of ref, oldest first (the keys sort by
// version).
func (l *ledger) readVersions(ctx context.Context, ref string) ([]storedVersion, error) {
	resp, err := l.kv.Get(ctx, historyPrefix(ref), clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("read the history of %s: %w", ref, err)
	}
	var versions []storedVersion
	for _, kv := range resp.Kvs {
		var v ledgerVersion
		if json.Unmarshal(kv.Value, &v) == nil {
			versions = append(versions, storedVersion{v, kv.ModRevision})
		}
	}
	return versions, nil
}

// pickVersion finds, in versions (oldest first), the version e records
// on (nil: a new one) and the newest.
func pickVersion(versions []storedVersion, e ledgerEntry) (target, newest *storedVersion) {
	if len(versions) > 0 {
		newest = &versions[len(versions)-1]
	}
	for i := len(versions) - 1; i >= 0; i-- {
		if versions[i].v.ImageID == e.ImageID {
			target = &versions[i]
			break
		}
	}
	// An older version's image again, by a trigger newer than the newest
	// version: a new version (pushed back by hand).
	if target != nil && target != newest && e.Revision > newest.v.Revision {
		target = nil
	}
	return target, newest
}

// newVersion is the write of a new version after newest (nil: the
// first): newest, if still rolling out, is superseded, and the versions
// that fall out of -history go in the same transaction.
func (l *ledger) newVersion(e ledgerEntry, asked askedBy, pushed time.Time, newest *storedVersion) versionWrite {
	next := int64(1)
	if newest != nil {
		next = newest.v.Version + 1
	}
	w := versionWrite{key: historyKey(e.Ref, next), v: ledgerVersion{
		Version: next, Image: e.Ref, ImageID: e.ImageID, Digest: e.Digest, Pushed: pushed.UTC(),
		Revision: e.Revision, AskedBy: asked, Nodes: map[string]nodeResult{}, Outcome: outcomeRollingOut,
	}}
	w.cmps = append(w.cmps, clientv3.Compare(clientv3.CreateRevision(w.key), "=", 0))
	if newest != nil {
		nkey := historyKey(e.Ref, newest.v.Version)
		w.cmps = append(w.cmps, clientv3.Compare(clientv3.ModRevision(nkey), "=", newest.rev))
		if newest.v.Outcome == outcomeRollingOut || newest.v.Outcome == outcomeHeld {
			old := newest.v
			old.Outcome = outcomeSuperseded
			b, _ := json.Marshal(old)
			w.ops = append(w.ops, clientv3.OpPut(nkey, string(b)))
		}
	}
	// Every key below the oldest one kept.
	if oldest := next - l.keep + 1; oldest > 1 {
		w.ops = append(w.ops, trimOps(e.Ref, oldest)...)
	}
	return w
}

// existingVersion is the write of e on target, an existing version.
func existingVersion(e ledgerEntry, target *storedVersion) versionWrite {
	w := versionWrite{key: historyKey(e.Ref, target.v.Version), v: target.v}
	w.cmps = append(w.cmps, clientv3.Compare(clientv3.ModRevision(w.key), "=", target.rev))
	if w.v.Nodes == nil {
		w.v.Nodes = map[string]nodeResult{}
	}
	if w.v.Digest == "" {
		w.v.Digest = e.Digest
	}
	return w
}

// markFailed records on v that node's replacement failed (which halts a
// coordinated rollout).
func markFailed(v *ledgerVersion, e ledgerEntry, node string, coordinated bool) {
	n := v.Nodes[node]
	n.Failed, n.Reason = e.Time.UTC(), truncate(e.Failed, 300)
	if coordinated && v.Outcome == outcomeRollingOut {
		v.Outcome = outcomeHalted
	}
	v.Nodes[node] = n
}

// Each node's convergence on a version is a key of its own
// (historyNodeKey), written once, so that recording it costs a node the
// same whatever the size of the fleet: one read of the tag's versions
// (small: they hold failures, not convergences) and one transaction that
// writes the key and counts the version's keys. Only a few nodes per
// version read every status record (nodesRunning): the first to converge,
// which counts the nodes that run the tag (Running), and the last ones,
// from Running less runningSlack on, which check whether the version
// rolled out. Each write of the version compares its revision: of nodes
// completing at once, one does. (Before,
// every node rewrote the one version key listing every node, retried on
// conflicts, and read every status record: O(N) per node.)
//
// A node that stops running the tag while a version rolls out (a node
// gone) is one fewer to converge: up to runningSlack of them, the check
// still runs and completes the version; with more, the version stays
// "rolling out" until the next one supersedes it.
const runningSlack = 2

// convergedAt is the value of a node key: the node converged at t.
func convergedAt(t time.Time) string {
	b, _ := json.Marshal(nodeResult{Converged: t.UTC()})
	return string(b)
}

// converge records this node's convergence on target, an existing
// version: its key, written once (errLedgerRecorded when it exists: a
// retried write, or recorded in the value by an earlier daemon), in a
// transaction that counts the version's keys; a version held until now
// (an unpin, a thaw) is released in the same transaction.
func (l *ledger) converge(ctx context.Context, e ledgerEntry, target *storedVersion) (time.Duration, error) {
	node := cmp.Or(e.Node, l.node)
	if r, ok := target.v.Nodes[node]; ok && r.Converged.After(r.Failed) {
		return -1, errLedgerRecorded
	}
	version := target.v.Version
	vkey, nkey := historyKey(e.Ref, version), historyNodeKey(e.Ref, version, node)
	if !target.v.Completed.IsZero() {
		// Rolled out, its node keys folded (completeVersion): this node's
		// part may be in the folded key (a write retried after it took
		// effect), else it is a node that came later.
		resp, err := l.kv.Get(ctx, historyNodesDir(e.Ref, version))
		if err != nil {
			return -1, fmt.Errorf("read %s version %d: %w", e.Ref, version, err)
		}
		var folded ledgerVersion
		if mergeNodeKeys(&folded, resp.Kvs); !folded.Nodes[node].Converged.IsZero() {
			return -1, errLedgerRecorded
		}
	}
	cmps := []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(nkey), "=", 0), clientv3.Compare(clientv3.CreateRevision(vkey), ">", 0)}
	ops := []clientv3.Op{clientv3.OpPut(nkey, convergedAt(e.Time))}
	if v := target.v; v.Outcome == outcomeHeld || v.Held != "" {
		if v.Outcome == outcomeHeld {
			v.Outcome = outcomeRollingOut
		}
		v.Held, v.HeldSince = "", time.Time{}
		b, _ := json.Marshal(v)
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(vkey), "=", target.rev))
		ops = append(ops, clientv3.OpPut(vkey, string(b)))
	}
	ops = append(ops, clientv3.OpGet(historyNodesDir(e.Ref, version), clientv3.WithPrefix(), clientv3.WithCountOnly()), clientv3.OpGet(vkey))
	tr, err := l.kv.Txn(ctx).If(cmps...).Then(ops...).Else(clientv3.OpGet(nkey, clientv3.WithCountOnly())).Commit()
	if err != nil {
		return -1, fmt.Errorf("write %s version %d: %w", e.Ref, version, err)
	}
	if !tr.Succeeded {
		if tr.Responses[0].GetResponseRange().Count > 0 {
			if target.v.Running == 0 && target.v.Completed.IsZero() {
				// A write retried after it took effect: it may have been
				// the first, whose count of the nodes failed.
				if _, err := l.completeVersion(ctx, e.Ref, version); err != nil {
					return -1, err
				}
			}
			return -1, errLedgerRecorded
		}
		return -1, errLedgerConflict // trimmed, or released by another node, meanwhile: read again
	}
	n := len(tr.Responses)
	count := tr.Responses[n-2].GetResponseRange().Count
	v := target.v
	if kvs := tr.Responses[n-1].GetResponseRange().Kvs; len(kvs) == 1 {
		_ = json.Unmarshal(kvs[0].Value, &v)
	}
	return l.settle(ctx, e.Ref, v, count)
}

// settle decides, after a convergence that made count node keys of v,
// whether this node reads the fleet: the first node counts the nodes that
// run the tag, the last ones check whether v rolled out.
func (l *ledger) settle(ctx context.Context, ref string, v ledgerVersion, count int64) (time.Duration, error) {
	switch {
	case !v.Completed.IsZero() || v.Outcome == outcomeHalted:
		return -1, nil
	case v.Running == 0 && count == 1, v.Running > 0 && count+int64(len(v.Nodes)) >= int64(v.Running-runningSlack):
		return l.completeVersion(ctx, ref, v.Version)
	}
	return -1, nil
}

// completeVersion reads the nodes that run ref and the keys of version:
// if every one of those nodes converged, it marks the version rolled out
// (completed by the last of them); else it writes how many run the tag
// (Running), and reads again if nodes converged between its read and its
// write (they saw the Running before it, and may not have checked). It
// returns the lead time to the last node when it completed the version,
// -1 when it did not.
func (l *ledger) completeVersion(ctx context.Context, ref string, version int64) (time.Duration, error) {
	running, err := l.nodesRunning(ctx, ref)
	if err != nil {
		return -1, err
	}
	vkey, ndir := historyKey(ref, version), historyNodesDir(ref, version)
	for range 10 {
		resp, err := l.kv.Txn(ctx).Then(clientv3.OpGet(vkey), clientv3.OpGet(ndir, clientv3.WithPrefix())).Commit()
		if err != nil {
			return -1, fmt.Errorf("read %s version %d: %w", ref, version, err)
		}
		vkvs, nkvs := resp.Responses[0].GetResponseRange().Kvs, resp.Responses[1].GetResponseRange().Kvs
		var stored ledgerVersion
		if len(vkvs) == 0 || json.Unmarshal(vkvs[0].Value, &stored) != nil || !stored.Completed.IsZero() || stored.Outcome == outcomeHalted {
			return -1, nil
		}
		all := stored
		all.Nodes = maps.Clone(stored.Nodes)
		mergeNodeKeys(&all, nkvs)
		next, completed := stored, time.Duration(-1)
		next.Running = len(running)
		if allConverged(all.Nodes, running) {
			for _, n := range running {
				if c := all.Nodes[n].Converged; c.After(next.Completed) {
					next.Completed, next.CompletedBy = c.UTC(), n
				}
			}
			completed = max(next.Completed.Sub(next.Pushed), 0)
			next.LastSeconds, next.FirstSeconds = completed.Seconds(), all.FirstSeconds
			if next.Outcome == outcomeRollingOut {
				next.Outcome = outcomeRolledOut
			}
		} else if next.Running == stored.Running {
			return -1, nil // counted before: the nodes still to converge check
		}
		b, _ := json.Marshal(next)
		cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(vkey), "=", vkvs[0].ModRevision)}
		ops := []clientv3.Op{clientv3.OpPut(vkey, string(b)), clientv3.OpGet(ndir, clientv3.WithPrefix(), clientv3.WithCountOnly())}
		if completed >= 0 {
			// Rolled out: the node keys fold into one key, the version's
			// directory itself (no node is named ""), so that the ledger
			// keeps one key per version and not one per node.
			folded := map[string]nodeResult{}
			fromKeys := stored
			fromKeys.Nodes = nil
			mergeNodeKeys(&fromKeys, nkvs)
			maps.Copy(folded, fromKeys.Nodes)
			fb, _ := json.Marshal(folded)
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(ndir), "<", resp.Header.Revision+1).WithPrefix()) // no node key came since the read
			ops = append(ops, clientv3.OpPut(ndir, string(fb)), clientv3.OpDelete(ndir+"\x00", clientv3.WithRange(clientv3.GetPrefixRangeEnd(ndir))))
		}
		tr, err := l.kv.Txn(ctx).If(cmps...).Then(ops...).Commit()
		switch {
		case err != nil:
			return -1, fmt.Errorf("write %s version %d: %w", ref, version, err)
		case !tr.Succeeded:
			continue // the version changed meanwhile (a report, a failure): read again
		case completed >= 0:
			return completed, nil
		case tr.Responses[1].GetResponseRange().Count == int64(len(nkvs)):
			return -1, nil
		}
	}
	return -1, errLedgerConflict
}

// mergeNodeKeys puts the node keys of v's version into v.Nodes (a
// convergence after a failure clears it), the folded key of a version
// that rolled out included, and sets FirstSeconds from the earliest
// convergence.
func mergeNodeKeys(v *ledgerVersion, kvs []*mvccpb.KeyValue) {
	if v.Nodes == nil {
		v.Nodes = map[string]nodeResult{}
	}
	add := func(node string, r nodeResult) {
		if cur, ok := v.Nodes[node]; !ok || r.Converged.After(cur.Failed) {
			v.Nodes[node] = r
		}
	}
	for _, kv := range kvs {
		k := string(kv.Key)
		node := k[strings.LastIndexByte(k, '/')+1:]
		if node == "" { // the node keys of a version that rolled out, folded
			var folded map[string]nodeResult
			if json.Unmarshal(kv.Value, &folded) == nil {
				for n, r := range folded {
					add(n, r)
				}
			}
			continue
		}
		var r nodeResult
		if json.Unmarshal(kv.Value, &r) == nil {
			add(node, r)
		}
	}
	var first time.Time
	for _, r := range v.Nodes {
		if !r.Converged.IsZero() && (first.IsZero() || r.Converged.Before(first)) {
			first = r.Converged
		}
	}
	if !first.IsZero() {
		v.FirstSeconds = max(first.Sub(v.Pushed), 0).Seconds()
	}
}

// mark records e (Held or Override) on its version now, with the
// retries of a conflict; recorded already is no error.
func (l *ledger) mark(ctx context.Context, e ledgerEntry) error {
	if l == nil {
		return nil
	}
	return l.apply(ctx, e)
}

// recentImages returns the image IDs of ref's versions, newest first,
// each once (-keep_images).
func (l *ledger) recentImages(ctx context.Context, ref string) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, l.timeout)
	defer cancel()
	versions, err := l.readVersions(ctx, ref)
	if err != nil {
		return nil, err
	}
	var ids []string
	for i := len(versions) - 1; i >= 0; i-- {
		if id := versions[i].v.ImageID; !slices.Contains(ids, id) {
			ids = append(ids, id)
		}
	}
	return ids, nil
}

// errLedgerNotYet: this node's status record does not show the version
// on every container of the tag yet; the write is tried again.
var errLedgerNotYet = errors.New("the node's status record does not show the version yet")

// convergedHere checks e (ViaStatus) against this node's status record:
// ok with e.Time the start of the last container of e.Ref on e.ImageID
// when all of them run it; errLedgerNotYet when some still run another
// image or none runs (a supervisor between two runs): the write is tried
// again, and given up quietly after its attempts.
func (l *ledger) convergedHere(ctx context.Context, e ledgerEntry) (ledgerEntry, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, l.timeout)
	defer cancel()
	resp, err := l.kv.Get(ctx, statusKey(l.node))
	if err != nil {
		return e, false, fmt.Errorf("read the node's status: %w", err)
	}
	var n nodeStatus
	if len(resp.Kvs) == 0 || json.Unmarshal(resp.Kvs[0].Value, &n) != nil {
		return e, false, errLedgerNotYet
	}
	var last time.Time
	found := false
	for _, c := range n.Containers {
		if c.Image != e.Ref {
			continue
		}
		if c.ImageID != e.ImageID {
			return e, false, errLedgerNotYet
		}
		found = true
		if c.Since.After(last) {
			last = c.Since
		}
	}
	if !found {
		// Between two runs of a supervisor, or a node that keeps the
		// image but runs no container of it: asked again a few times.
		return e, false, errLedgerNotYet
	}
	if !last.IsZero() && last.Before(e.Time) {
		e.Time = last
	}
	return e, true, nil
}

// allConverged reports whether every node in running converged.
func allConverged(nodes map[string]nodeResult, running []string) bool {
	for _, n := range running {
		if nodes[n].Converged.IsZero() {
			return false
		}
	}
	return true
}

// nodesRunning lists the nodes whose status record (status.go) shows a
// container of ref, this node included: those a version of ref must reach
// to have rolled out.
func (l *ledger) nodesRunning(ctx context.Context, ref string) ([]string, error) {
	resp, err := l.kv.Get(ctx, statusPrefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("read the nodes' status: %w", err)
	}
	out := []string{l.node}
	for _, kv := range resp.Kvs {
		var n nodeStatus
		if json.Unmarshal(kv.Value, &n) != nil || slices.Contains(out, n.Node) {
			continue
		}
		for _, c := range n.Containers {
			if c.Image == ref {
				out = append(out, n.Node)
				break
			}
		}
	}
	return out, nil
}

// trigger reads who asked for e's version, when, and the digest: from the
// trigger written at e.Revision, else the image's RepoDigests. What cannot
// be read stays empty: the version is recorded all the same.
func (l *ledger) trigger(ctx context.Context, e ledgerEntry) (askedBy, time.Time, string) {
	asked := askedBy{Source: "repull"}
	var pushed time.Time
	var digest string
	if e.Revision > 0 {
		asked.Source = "etcd"
		if t, ok := l.readTrigger(ctx, e.Revision); ok {
			asked = askedBy{Source: cmp.Or(t.Source, "etcd"), Remote: t.Remote, Node: t.Node}
			pushed = t.Time
			digest = t.Digest
			if d := t.Digests[tagOf(e.Ref)]; d != "" {
				digest = d
			}
		}
	}
	if digest == "" && l.images != nil {
		ictx, cancel := context.WithTimeout(ctx, l.timeout)
		img, err := l.images.InspectImageWithContext(ictx, e.ImageID)
		cancel()
		if err == nil {
			for _, rd := range img.RepoDigests {
				if named, err := reference.ParseNormalizedNamed(rd); err == nil && named.Name() == e.Repo {
					if c, ok := named.(reference.Canonical); ok {
						digest = c.Digest().String()
						break
					}
				}
			}
		}
	}
	return asked, pushed, digest
}

// readTrigger reads the trigger written at revision rev: the trigger key
// modified at rev, as it was then.
func (l *ledger) readTrigger(ctx context.Context, rev int64) (trigger, bool) {
	return readTriggerAt(ctx, l.kv, rev, l.timeout)
}

// readTriggerAt reads the trigger written at revision rev through kv.
func readTriggerAt(ctx context.Context, kv clientv3.KV, rev int64, timeout time.Duration) (trigger, bool) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	resp, err := kv.Get(ctx, triggersPrefix, clientv3.WithPrefix(), clientv3.WithRev(rev),
		clientv3.WithMinModRev(rev), clientv3.WithMaxModRev(rev))
	if err != nil {
		return trigger{}, false // compacted: who asked is not known any more
	}
	for _, kv := range resp.Kvs {
		if _, ok := repoFromKey(string(kv.Key)); !ok {
			continue
		}
		var t trigger
		if json.Unmarshal(kv.Value, &t) == nil {
			return t, true
		}
	}
	return trigger{}, false
}

// tagOf is the tag of a canonical image reference.
func tagOf(ref string) string {
	if named, err := reference.ParseNamed(ref); err == nil {
		if t, ok := named.(reference.Tagged); ok {
			return t.Tag()
		}
	}
	return ""
}

// tagHistory is one tag's versions, newest first.
type tagHistory struct {
	Image    string          `json:"image"`
	Versions []ledgerVersion `json:"versions"`
}

// historyView is what GET /api/history and deployer history -json return.
type historyView struct {
	Time time.Time    `json:"time"`
	Tags []tagHistory `json:"tags"`
}

// historyFilter selects tags by "repository" (every tag of it) or
// "repository:tag"; "" selects every tag. bare reads the versions
// without the nodes that converged on them (their node keys): what
// the deploy path, the rollbacks and the pins need, at a cost that does
// not grow with the fleet.
type historyFilter struct {
	name, tag string
	bare      bool
}

// parseHistoryFilter reads a repository[:tag] as Docker does (library/
// and docker.io added).
func parseHistoryFilter(s string) (historyFilter, error) {
	if s == "" {
		return historyFilter{}, nil
	}
	named, err := reference.ParseNormalizedNamed(s)
	if err != nil {
		return historyFilter{}, fmt.Errorf("%w: %q: %w", errUsage, s, err)
	}
	f := historyFilter{name: named.Name()}
	if t, ok := named.(reference.Tagged); ok {
		f.tag = t.Tag()
	}
	return f, nil
}

func (f historyFilter) match(ref string) bool {
	if f.name == "" {
		return true
	}
	named, err := reference.ParseNamed(ref)
	if err != nil || named.Name() != f.name {
		return false
	}
	return f.tag == "" || tagOf(ref) == f.tag
}

// readHistory reads the ledger of every tag f selects.
func readHistory(ctx context.Context, kv clientv3.KV, f historyFilter, now time.Time) (historyView, error) {
	out := historyView{Time: now.UTC(), Tags: []tagHistory{}}
	prefix := historiesPrefix
	if f.name != "" && f.tag != "" {
		prefix = historyPrefix(f.name + ":" + f.tag)
	}
	resp, err := kv.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return out, err
	}
	var nodes map[string][]*mvccpb.KeyValue
	if !f.bare {
		nprefix := historyNodesPrefix
		if f.name != "" && f.tag != "" {
			nprefix = historyNodesRef(f.name + ":" + f.tag)
		}
		if nodes, err = readNodeKeys(ctx, kv, nprefix); err != nil {
			return out, err
		}
	}
	tags := map[string]*tagHistory{}
	for _, kv := range resp.Kvs {
		var v ledgerVersion
		if json.Unmarshal(kv.Value, &v) != nil || !f.match(v.Image) {
			continue
		}
		if !f.bare {
			mergeNodeKeys(&v, nodes[historyNodesDir(v.Image, v.Version)])
		}
		if tags[v.Image] == nil {
			tags[v.Image] = &tagHistory{Image: v.Image}
		}
		tags[v.Image].Versions = append(tags[v.Image].Versions, v)
	}
	for _, ref := range slices.Sorted(maps.Keys(tags)) {
		t := tags[ref]
		slices.SortFunc(t.Versions, func(a, b ledgerVersion) int { return cmp.Compare(b.Version, a.Version) })
		out.Tags = append(out.Tags, *t)
	}
	return out, nil
}

// readNodeKeys reads the node keys under prefix (historyNodesPrefix, or
// one tag's), by their version's directory (historyNodesDir).
func readNodeKeys(ctx context.Context, kv clientv3.KV, prefix string) (map[string][]*mvccpb.KeyValue, error) {
	resp, err := kv.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	out := map[string][]*mvccpb.KeyValue{}
	for _, kv := range resp.Kvs {
		k := string(kv.Key)
		dir := k[:strings.LastIndexByte(k, '/')+1]
		out[dir] = append(out[dir], kv)
	}
	return out, nil
}

// GET /api/history[?image=repository[:tag]]
//
// The deploy ledger: per image tag, its versions newest first. Same
// secret as the webhooks.
func historyHandler(kv clientv3.KV) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		f, err := parseHistoryFilter(r.URL.Query().Get("image"))
		if err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		h, err := readHistory(ctx, kv, f, time.Now())
		if err != nil {
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, h)
	}
}

// nodesSummary is a version's nodes for the table: those converged, then
// those failed.
func (v ledgerVersion) nodesSummary() string {
	var ok, failed []string
	for _, n := range slices.Sorted(maps.Keys(v.Nodes)) {
		switch r := v.Nodes[n]; {
		case !r.Failed.IsZero():
			failed = append(failed, n)
		case !r.Converged.IsZero():
			ok = append(ok, n)
		}
	}
	s := strconv.Itoa(len(ok))
	if len(ok) > 0 {
		s += " (" + strings.Join(ok, ",") + ")"
	}
	if len(failed) > 0 {
		s += " failed: " + strings.Join(failed, ",")
	}
	return s
}

// converged counts the nodes that converged on v.
func (v ledgerVersion) converged() int {
	n := 0
	for _, r := range v.Nodes {
		if !r.Converged.IsZero() {
			n++
		}
	}
	return n
}

// errLedgerTarget: the rollback's target is not a version in the ledger,
// or there is no earlier version to go back to.
var errLedgerTarget = errors.New("nothing to roll back to")

// rollbackRecord is what a rollback writes: the version it goes back to
// (From, the bad one, becomes "rolled back"; To is added again as a new
// version, asked by Asked), in the transaction of the trigger that rolls
// it out.
type rollbackRecord struct {
	Ref   string // canonical image tag
	From  int64  // the version rolled back: the newest when the rollback was decided
	To    ledgerVersion
	Asked askedBy
	Time  time.Time
	Keep  int64 // -history
}

// recordRollback records r in one transaction with the extra operations
// (the trigger put), which come first: a watcher handles the first event
// of a revision and skips the others (watcher.go), and returns the new version and the transaction's
// revision. It fails with errLedgerConflict when the tag's newest version
// is no longer r.From (a push came in between).
func recordRollback(ctx context.Context, kv clientv3.KV, r rollbackRecord, extra ...clientv3.Op) (ledgerVersion, int64, error) {
	for range 5 {
		resp, err := kv.Get(ctx, historyPrefix(r.Ref), clientv3.WithLastKey()...)
		if err != nil {
			return ledgerVersion{}, 0, fmt.Errorf("read the history of %s: %w", r.Ref, err)
		}
		var newest ledgerVersion
		if len(resp.Kvs) == 0 || json.Unmarshal(resp.Kvs[0].Value, &newest) != nil {
			return ledgerVersion{}, 0, fmt.Errorf("%w: %s has no version in the ledger", errLedgerTarget, r.Ref)
		}
		if newest.Version != r.From {
			return ledgerVersion{}, 0, fmt.Errorf("%w: %s version %d came after version %d", errLedgerConflict, r.Ref, newest.Version, r.From)
		}
		bad := newest
		bad.Outcome = outcomeRolledBack
		next := newest.Version + 1
		v := ledgerVersion{
			Version: next, Image: r.Ref, ImageID: r.To.ImageID, Digest: r.To.Digest, Pushed: r.Time.UTC(),
			AskedBy: r.Asked, Nodes: map[string]nodeResult{}, Outcome: outcomeRollingOut,
		}
		bb, _ := json.Marshal(bad)
		vb, _ := json.Marshal(v)
		key := historyKey(r.Ref, next)
		ops := []clientv3.Op{clientv3.OpPut(historyKey(r.Ref, bad.Version), string(bb)), clientv3.OpPut(key, string(vb))}
		if oldest := next - max(r.Keep, 1) + 1; oldest > 1 {
			ops = append(ops, trimOps(r.Ref, oldest)...)
		}
		tr, err := kv.Txn(ctx).If(
			clientv3.Compare(clientv3.ModRevision(string(resp.Kvs[0].Key)), "=", resp.Kvs[0].ModRevision),
			clientv3.Compare(clientv3.CreateRevision(key), "=", 0),
		).Then(append(extra, ops...)...).Commit()
		if err != nil {
			return ledgerVersion{}, 0, fmt.Errorf("record the rollback of %s: %w", r.Ref, err)
		}
		if !tr.Succeeded {
			continue // a node recorded its part in the bad version meanwhile
		}
		v.Revision = tr.Header.Revision
		// The version's trigger revision, once known: a replay of the
		// bad version's older trigger then counts as this version's. A
		// node may have recorded its part already: read and compare.
		for range 5 {
			g, err := kv.Get(ctx, key)
			if err != nil || len(g.Kvs) == 0 {
				break
			}
			var cur ledgerVersion
			if json.Unmarshal(g.Kvs[0].Value, &cur) != nil {
				break
			}
			cur.Revision = tr.Header.Revision
			b, _ := json.Marshal(cur)
			u, err := kv.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", g.Kvs[0].ModRevision)).
				Then(clientv3.OpPut(key, string(b))).Commit()
			if err != nil || u.Succeeded {
				break
			}
		}
		return v, tr.Header.Revision, nil
	}
	return ledgerVersion{}, 0, errLedgerConflict
}

// held hands the ledger that the gate held imageID of ref on this node in
// a deploy of job j, and why. It never blocks; a nil ledger records
// nothing.
func (l *ledger) held(j job, ref reference.NamedTagged, imageID, reason string) {
	if l == nil {
		return
	}
	var rev int64
	if len(j.Revs) > 0 {
		rev = slices.Max(j.Revs)
	}
	e := ledgerEntry{Ref: ref.String(), Repo: ref.Name(), ImageID: imageID, Digest: j.Digests[ref.Tag()], Revision: rev, Seen: j.Seen,
		Time: l.now(), Held: reason}
	select {
	case l.entries <- e:
	default:
		l.log.Warn("deploy ledger full: hold not recorded", "image", e.Ref, "image_id", shortID(e.ImageID))
	}
}

// applyHeld records e's hold: on the newest version of e.ImageID when
// there is one (a quarantined version keeps its outcome), else on a new
// version, "held", as a push that was not deployed.
func (l *ledger) applyHeld(ctx context.Context, e ledgerEntry) error {
	asked, pushed, digest := l.trigger(ctx, e)
	for range 5 {
		err := l.applyHeldOnce(ctx, e, asked, cmp.Or(pushed, e.Seen, e.Time), cmp.Or(e.Digest, digest))
		if !errors.Is(err, errLedgerConflict) {
			return err
		}
	}
	return errLedgerConflict
}

func (l *ledger) applyHeldOnce(ctx context.Context, e ledgerEntry, asked askedBy, pushed time.Time, digest string) error {
	ctx, cancel := context.WithTimeout(ctx, l.timeout)
	defer cancel()
	resp, err := l.kv.Get(ctx, historyPrefix(e.Ref), clientv3.WithPrefix())
	if err != nil {
		return fmt.Errorf("read the history of %s: %w", e.Ref, err)
	}
	var (
		target, newest ledgerVersion
		targetRev      int64
		newestRev      int64
		found          bool
	)
	for _, kv := range resp.Kvs { // oldest first
		var v ledgerVersion
		if json.Unmarshal(kv.Value, &v) != nil {
			continue
		}
		newest, newestRev = v, kv.ModRevision
		if v.ImageID == e.ImageID {
			target, targetRev, found = v, kv.ModRevision, true
		}
	}
	quarantined := target.Outcome == outcomeHalted || target.Outcome == outcomeRolledBack
	if found && (quarantined || target.Version == newest.Version || e.Revision <= newest.Revision) {
		if target.Held == e.Held {
			return nil // recorded by this node or another
		}
		target.Held, target.HeldSince = e.Held, e.Time.UTC()
		if target.Outcome == outcomeRollingOut {
			target.Outcome = outcomeHeld
		}
		b, _ := json.Marshal(target)
		key := historyKey(e.Ref, target.Version)
		tr, err := l.kv.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", targetRev)).Then(clientv3.OpPut(key, string(b))).Commit()
		if err != nil {
			return fmt.Errorf("write %s version %d: %w", e.Ref, target.Version, err)
		}
		if !tr.Succeeded {
			return errLedgerConflict
		}
		return nil
	}
	next := newest.Version + 1
	key := historyKey(e.Ref, next)
	v := ledgerVersion{
		Version: next, Image: e.Ref, ImageID: e.ImageID, Digest: digest, Pushed: pushed.UTC(), Revision: e.Revision,
		AskedBy: asked, Nodes: map[string]nodeResult{}, Outcome: outcomeHeld, Held: e.Held, HeldSince: e.Time.UTC(),
	}
	b, _ := json.Marshal(v)
	cmps := []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(key), "=", 0)}
	if newest.Version > 0 {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(historyKey(e.Ref, newest.Version)), "=", newestRev))
	}
	ops := []clientv3.Op{clientv3.OpPut(key, string(b))}
	if oldest := next - l.keep + 1; oldest > 1 {
		ops = append(ops, trimOps(e.Ref, oldest)...)
	}
	tr, err := l.kv.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		return fmt.Errorf("write %s version %d: %w", e.Ref, next, err)
	}
	if !tr.Succeeded {
		return errLedgerConflict
	}
	return nil
}
