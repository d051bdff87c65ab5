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
	// Nodes: per node, when it converged on the version or failed. (A
	// node's convergence is stored in its own key, below;
	// reading the history puts it here.)
	Nodes map[string]nodeResult `json:"nodes"`
	// Running is how many nodes ran the tag when the version was
	// recorded: the count of node keys at which the last nodes check
	// whether the version rolled out (0: unknown, every node checks).
	Running int    `json:"running,omitempty"`
	Outcome string `json:"outcome"`
	// Completed is when the last node that runs the tag converged,
	// written once, by that node.
	Completed time.Time `json:"completed,omitzero"`
	// Lead times from Pushed to the first node converged and to the last.
	FirstSeconds float64 `json:"lead_first_seconds,omitempty"`
	LastSeconds  float64 `json:"lead_last_seconds,omitempty"`
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
		if err == nil && completed >= 0 {
			l.fleetLead.Observe(completed.Seconds())
		}
		return err
	}
	return errLedgerConflict
}

// applyOnce is one read-modify-write of e's version; it returns the lead
// time to the last node when this write completed the version, -1 when
// it did not.
func (l *ledger) applyOnce(ctx context.Context, e ledgerEntry, asked askedBy, pushed time.Time) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, l.timeout)
	defer cancel()
	resp, err := l.kv.Get(ctx, historyPrefix(e.Ref), clientv3.WithPrefix())
	if err != nil {
		return 0, fmt.Errorf("read the history of %s: %w", e.Ref, err)
	}
	type stored struct {
		v   ledgerVersion
		rev int64 // ModRevision
	}
	var versions []stored // oldest first (the keys sort by version)
	for _, kv := range resp.Kvs {
		var v ledgerVersion
		if json.Unmarshal(kv.Value, &v) == nil {
			versions = append(versions, stored{v, kv.ModRevision})
		}
	}
	var target, newest *stored
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
	if target != nil && e.Failed == "" {
		if r, ok := target.v.Nodes[l.node]; ok && !r.Converged.IsZero() {
			return -1, errLedgerRecorded // written so by an earlier version of the daemon
		}
		return l.converge(ctx, e, target.v, target.rev)
	}
	var (
		cmps []clientv3.Cmp
		ops  []clientv3.Op
		v    ledgerVersion
		key  string
	)
	if target == nil {
		next := int64(1)
		if newest != nil {
			next = newest.v.Version + 1
		}
		key = historyKey(e.Ref, next)
		v = ledgerVersion{
			Version: next, Image: e.Ref, ImageID: e.ImageID, Digest: e.Digest, Pushed: pushed.UTC(),
			Revision: e.Revision, AskedBy: asked, Nodes: map[string]nodeResult{}, Outcome: outcomeRollingOut,
		}
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(key), "=", 0))
		if newest != nil {
			nkey := historyKey(e.Ref, newest.v.Version)
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(nkey), "=", newest.rev))
			if newest.v.Outcome == outcomeRollingOut {
				old := newest.v
				old.Outcome = outcomeSuperseded
				b, _ := json.Marshal(old)
				ops = append(ops, clientv3.OpPut(nkey, string(b)))
			}
		}
		// The versions that fall out of -history go in the same
		// transaction: every key below the oldest one kept.
		if oldest := next - l.keep + 1; oldest > 1 {
			ops = append(ops, clientv3.OpDelete(historyPrefix(e.Ref), clientv3.WithRange(historyKey(e.Ref, oldest))),
				clientv3.OpDelete(historyNodesRef(e.Ref), clientv3.WithRange(historyNodesDir(e.Ref, oldest))))
		}
		if e.Failed == "" {
			// This node converged on the version it records: its own
			// key, and the count of the nodes running the tag follows.
			b, _ := json.Marshal(nodeResult{Converged: e.Time.UTC()})
			ops = append(ops, clientv3.OpPut(historyNodeKey(e.Ref, next, l.node), string(b)))
			v.Running = runningUnknown
		}
	} else {
		key, v = historyKey(e.Ref, target.v.Version), target.v
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(key), "=", target.rev))
		if v.Nodes == nil {
			v.Nodes = map[string]nodeResult{}
		}
		if v.Digest == "" {
			v.Digest = e.Digest
		}
	}
	if e.Failed != "" {
		n := v.Nodes[l.node]
		n.Failed, n.Reason = e.Time.UTC(), truncate(e.Failed, 300)
		if l.coordinated && v.Outcome == outcomeRollingOut {
			v.Outcome = outcomeHalted
		}
		v.Nodes[l.node] = n
	}
	b, err := json.Marshal(v)
	if err != nil {
		return 0, err
	}
	ops = append(ops, clientv3.OpPut(key, string(b)))
	tr, err := l.kv.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		return 0, fmt.Errorf("write %s version %d: %w", e.Ref, v.Version, err)
	}
	if !tr.Succeeded {
		return 0, errLedgerConflict
	}
	if e.Failed != "" {
		return -1, nil
	}
	l.nodeLead.Observe(max(e.Time.Sub(pushed), 0).Seconds())
	return l.counted(ctx, e.Ref, v.Version)
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
	ctx, cancel := context.WithTimeout(ctx, l.timeout)
	defer cancel()
	// The triggers only, not every node's keys; repositories that begin
	// with a letter, the usual ones, first.
	for _, r := range slices.Backward(triggerRanges) {
		resp, err := l.kv.Get(ctx, r.lo, clientv3.WithRange(r.hi), clientv3.WithRev(rev),
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
// "repository:tag"; "" selects every tag.
type historyFilter struct {
	name, tag string
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
	nprefix := historyNodesPrefix
	if f.name != "" && f.tag != "" {
		nprefix = historyNodesRef(f.name + ":" + f.tag)
	}
	nodes, err := readNodeKeys(ctx, kv, nprefix)
	if err != nil {
		return out, err
	}
	tags := map[string]*tagHistory{}
	for _, kv := range resp.Kvs {
		var v ledgerVersion
		if json.Unmarshal(kv.Value, &v) != nil || !f.match(v.Image) {
			continue
		}
		mergeNodeKeys(&v, nodes[url.PathEscape(v.Image)][v.Version])
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
			ops = append(ops, clientv3.OpDelete(historyPrefix(r.Ref), clientv3.WithRange(historyKey(r.Ref, oldest))),
				clientv3.OpDelete(historyNodesRef(r.Ref), clientv3.WithRange(historyNodesDir(r.Ref, oldest))))
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

// Each node's part in a version, one key per node, so
// that recording it costs a node the same whatever the size of the
// fleet. A node that converges writes its own key under the version
// (historyNodeKey) in a transaction that also counts the keys; only when
// the count reaches the number of nodes that ran the tag when the version
// was recorded (ledgerVersion.Running, counted once, by the node that
// recorded it) does a node read every status record and every node key
// to decide whether the version rolled out, and the transaction that
// writes "rolled out" decides which node completed it. (Before, every
// node rewrote the one version key, whose value listed every node,
// retrying on conflicts, and read every node's status record: O(N) per
// node.) The node that completes the version folds the node keys into
// the version's value and deletes them, in the same transaction: what
// stays of a rolled-out version is one key. Failures are rare and stay
// in the version's value (Nodes), as does what earlier versions of the
// daemon wrote; reading the history assembles both.

// The node keys of the ledger: under their own directory, so that
// reading a tag's versions reads no node key.
const historyNodesPrefix = "/_history-nodes/"

// historyNodesRef holds the node keys of every version of ref.
func historyNodesRef(ref string) string { return historyNodesPrefix + url.PathEscape(ref) + "/" }

// historyNodesDir holds the node keys of one version of ref.
func historyNodesDir(ref string, version int64) string {
	return historyNodesRef(ref) + fmt.Sprintf("%012d", version) + "/"
}

// historyNodeKey is node's part in one version of ref.
func historyNodeKey(ref string, version int64, node string) string {
	return historyNodesDir(ref, version) + node
}

// runningUnknown is Running while the node that recorded the version
// counts the nodes that run the tag.
const runningUnknown = -1

// converge records that this node converged on target (read at ModRevision
// rev): its key, written once, and, once as many nodes converged as ran
// the tag, the completion. It returns the lead time to the last node when
// this node completed the version, -1 when it did not.
func (l *ledger) converge(ctx context.Context, e ledgerEntry, v ledgerVersion, rev int64) (time.Duration, error) {
	vkey, nkey := historyKey(e.Ref, v.Version), historyNodeKey(e.Ref, v.Version, l.node)
	b, _ := json.Marshal(nodeResult{Converged: e.Time.UTC()})
	tr, err := l.kv.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(nkey), "=", 0), clientv3.Compare(clientv3.CreateRevision(vkey), ">", 0)).
		Then(clientv3.OpPut(nkey, string(b)), clientv3.OpGet(historyNodesDir(e.Ref, v.Version), clientv3.WithPrefix(), clientv3.WithCountOnly()),
			clientv3.OpGet(vkey)).
		Else(clientv3.OpGet(nkey, clientv3.WithCountOnly())).Commit()
	if err != nil {
		return -1, fmt.Errorf("write %s version %d: %w", e.Ref, v.Version, err)
	}
	if !tr.Succeeded {
		if tr.Responses[0].GetResponseRange().Count > 0 {
			// A write retried after it took effect; if it recorded the
			// version and could not count the nodes then, it counts now.
			if v.Running == runningUnknown {
				if completed, err := l.counted(ctx, e.Ref, v.Version); err != nil || completed >= 0 {
					return completed, err
				}
			}
			return -1, errLedgerRecorded
		}
		return -1, errLedgerConflict // the version was trimmed meanwhile
	}
	l.nodeLead.Observe(max(e.Time.Sub(v.Pushed), 0).Seconds())
	converged := tr.Responses[1].GetResponseRange().Count
	// The version as it is now: the node that recorded it counts the
	// nodes running the tag in a transaction that comes before this one
	// (and so this node decides) or after it (and so counts this key).
	if kvs := tr.Responses[2].GetResponseRange().Kvs; len(kvs) == 1 {
		_ = json.Unmarshal(kvs[0].Value, &v)
	}
	if !v.Completed.IsZero() || v.Outcome == outcomeHalted || v.Running == runningUnknown || converged < int64(v.Running) {
		return -1, nil
	}
	return l.complete(ctx, e.Ref, v.Version)
}

// counted sets Running of the version this node just recorded (and
// converged on): the nodes whose status record shows a container of the
// tag, read once per version; then, as converge does, it completes the
// version if every one of them converged already.
func (l *ledger) counted(ctx context.Context, ref string, version int64) (time.Duration, error) {
	running, err := l.nodesRunning(ctx, ref)
	if err != nil {
		return -1, err
	}
	vkey := historyKey(ref, version)
	for range 5 {
		resp, err := l.kv.Get(ctx, vkey)
		if err != nil || len(resp.Kvs) == 0 {
			return -1, err
		}
		var v ledgerVersion
		if json.Unmarshal(resp.Kvs[0].Value, &v) != nil || v.Running != runningUnknown {
			return -1, nil
		}
		v.Running = len(running)
		b, _ := json.Marshal(v)
		tr, err := l.kv.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(vkey), "=", resp.Kvs[0].ModRevision)).
			Then(clientv3.OpPut(vkey, string(b)), clientv3.OpGet(historyNodesDir(ref, version), clientv3.WithPrefix(), clientv3.WithCountOnly())).Commit()
		if err != nil {
			return -1, fmt.Errorf("write %s version %d: %w", ref, version, err)
		}
		if !tr.Succeeded {
			continue // superseded, halted or rolled back meanwhile
		}
		if v.Outcome == outcomeHalted || tr.Responses[1].GetResponseRange().Count < int64(v.Running) {
			return -1, nil
		}
		return l.complete(ctx, ref, version)
	}
	return -1, errLedgerConflict
}

// complete marks the version rolled out if every node that runs the tag
// converged on it: it reads every status record and every node key of
// the version, which only the last nodes to converge do. The transaction
// that writes it compares the version's revision: of nodes completing at
// once, one does. It returns the lead time to the last node when this
// node completed the version, -1 when it did not.
func (l *ledger) complete(ctx context.Context, ref string, version int64) (time.Duration, error) {
	running, err := l.nodesRunning(ctx, ref)
	if err != nil {
		return -1, err
	}
	vkey := historyKey(ref, version)
	for range 5 {
		resp, err := l.kv.Txn(ctx).Then(clientv3.OpGet(vkey), clientv3.OpGet(historyNodesDir(ref, version), clientv3.WithPrefix())).Commit()
		if err != nil {
			return -1, fmt.Errorf("read %s version %d: %w", ref, version, err)
		}
		vkvs := resp.Responses[0].GetResponseRange().Kvs
		var v ledgerVersion
		if len(vkvs) == 0 || json.Unmarshal(vkvs[0].Value, &v) != nil || !v.Completed.IsZero() || v.Outcome == outcomeHalted {
			return -1, nil
		}
		mergeNodeKeys(&v, resp.Responses[1].GetResponseRange().Kvs)
		if !allConverged(v.Nodes, running) {
			return -1, nil
		}
		var last time.Time
		for _, n := range running {
			last = maxTime(last, v.Nodes[n].Converged)
		}
		var stored ledgerVersion // the value keeps the failures; the node keys the rest
		if err := json.Unmarshal(vkvs[0].Value, &stored); err != nil {
			return -1, err
		}
		stored.Completed = last.UTC()
		completed := max(stored.Completed.Sub(stored.Pushed), 0)
		stored.LastSeconds = completed.Seconds()
		stored.FirstSeconds = v.FirstSeconds
		if stored.Outcome == outcomeRollingOut {
			stored.Outcome = outcomeRolledOut
		}
		// The node keys fold into the version's value, written once, and
		// go: a rolled-out version keeps one key, not one per node.
		stored.Nodes = v.Nodes
		b, _ := json.Marshal(stored)
		ndir := historyNodesDir(ref, version)
		tr, err := l.kv.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(vkey), "=", vkvs[0].ModRevision),
			clientv3.Compare(clientv3.CreateRevision(ndir), "<", resp.Header.Revision+1).WithPrefix()). // no node key came since the read
			Then(clientv3.OpPut(vkey, string(b)), clientv3.OpDelete(ndir, clientv3.WithPrefix())).Commit()
		if err != nil {
			return -1, fmt.Errorf("write %s version %d: %w", ref, version, err)
		}
		if tr.Succeeded {
			return completed, nil
		}
	}
	return -1, errLedgerConflict
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// mergeNodeKeys adds to v.Nodes the node keys of its version (a
// convergence clears a failure recorded before it) and sets
// FirstSeconds from the earliest convergence.
func mergeNodeKeys(v *ledgerVersion, kvs []*mvccpb.KeyValue) {
	if v.Nodes == nil {
		v.Nodes = map[string]nodeResult{}
	}
	for _, kv := range kvs {
		var r nodeResult
		k := string(kv.Key)
		if json.Unmarshal(kv.Value, &r) != nil {
			continue
		}
		v.Nodes[k[strings.LastIndexByte(k, '/')+1:]] = r
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

// readNodeKeys reads the node keys under prefix (historyNodesPrefix, or
// one tag's), by escaped tag and version.
func readNodeKeys(ctx context.Context, kv clientv3.KV, prefix string) (map[string]map[int64][]*mvccpb.KeyValue, error) {
	resp, err := kv.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	out := map[string]map[int64][]*mvccpb.KeyValue{}
	for _, kv := range resp.Kvs {
		rest, _ := strings.CutPrefix(string(kv.Key), historyNodesPrefix)
		parts := strings.Split(rest, "/")
		if len(parts) != 3 {
			continue
		}
		version, err := strconv.ParseInt(parts[1], 10, 64)
		if err != nil {
			continue
		}
		if out[parts[0]] == nil {
			out[parts[0]] = map[int64][]*mvccpb.KeyValue{}
		}
		out[parts[0]][version] = append(out[parts[0]][version], kv)
	}
	return out, nil
}
