package main

// rolloutreport.go: one report per fleet rollout. The deploy ledger
// (ledger.go) records each node's part in a version; when the version
// has rolled out, halted, or every node that runs the tag has either
// converged or failed, one node sends the report: the version, how many
// nodes are done and failed (named, with why), and the lead time.
//
// The sender is chosen through etcd. The node whose ledger write settled
// the version (the last to converge, the one that halted it) claims the
// report at once; the others wait reportTakeover before they may. A claim
// is a key under the claimant's lease (reportClaimKey), taken in a
// transaction that also checks the version unchanged; the report is then
// sent and marked in the version's ledger record (Reported), deleting the
// claim, in one transaction. A claimant that dies before the mark loses
// its lease within the session TTL: another node claims and sends. So a
// report is sent once; twice only if its sender dies in the one etcd round
// trip between the send and the mark. A retried deploy, a replayed
// trigger or a restart finds the mark and sends nothing.

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/distribution/reference"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/backoff"
	"github.com/die-net/deployer/internal/etcdc"
)

// reportTakeover is how long after a version settled the nodes other
// than its settler wait before they claim its report.
const reportTakeover = 5 * time.Second

// reportWindow: versions settled longer ago than this are not reported
// (the ledger's history when this feature first starts, a long outage).
const reportWindow = time.Hour

// reportEtcd is what the reporter uses of etcd.
type reportEtcd interface {
	clientv3.KV
	clientv3.Watcher
}

// reportLeases gives the node's live session, whose lease holds a claim.
type reportLeases interface {
	// Current returns the live session, granting a lease if needed.
	Current(ctx context.Context) (*etcdc.Session, error)
}

// reportDeliverer sends a message to every service now.
type reportDeliverer interface {
	// deliver sends m, returning what failed (already logged).
	deliver(ctx context.Context, m message) error
}

// rolloutReporter sends the rollout reports this node is chosen for.
type rolloutReporter struct {
	etcd     reportEtcd
	leases   reportLeases
	out      reportDeliverer
	threads  threadPoster // nil: no -slack_token
	node     string
	log      *slog.Logger
	now      func() time.Time
	takeover time.Duration
	timeout  time.Duration             // one etcd call
	hook     func(ctx context.Context) // between the claim and the send (e2e: a kill there)
}

// newRolloutReporter returns the reporter of node; it starts nothing.
func newRolloutReporter(etcd reportEtcd, leases reportLeases, out reportDeliverer, threads threadPoster, node string, log *slog.Logger) *rolloutReporter {
	return &rolloutReporter{etcd: etcd, leases: leases, out: out, threads: threads, node: node, log: log, now: time.Now,
		takeover: reportTakeover, timeout: 10 * time.Second, hook: reportHook}
}

// reportHook runs between a claim and its send; the e2e build sets it.
var reportHook = func(context.Context) {}

// run watches the ledger and the claims, and acts on every change, on
// the takeover time of a version waiting for its settler, and every
// minute as a safety net.
func (r *rolloutReporter) run(ctx context.Context) error {
	for attempt := 0; ctx.Err() == nil; attempt++ {
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		hist := r.etcd.Watch(wctx, historiesPrefix, clientv3.WithPrefix())
		claims := r.etcd.Watch(wctx, reportsPrefix, clientv3.WithPrefix(), clientv3.WithFilterPut())
		err := r.loop(ctx, hist, claims)
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		r.log.Warn("rollout reports: etcd watch ended, watching again", "err", err)
		if !backoff.Sleep(ctx, backoff.Delay(time.Second, min(attempt+1, 5))) {
			return nil
		}
	}
	return nil
}

// loop runs loopOnce on every event of hist and claims (deletes of claims:
// a claimant gone), at the next takeover time, and every minute.
func (r *rolloutReporter) loop(ctx context.Context, hist, claims clientv3.WatchChan) error {
	safety := time.NewTicker(time.Minute)
	defer safety.Stop()
	for {
		next, err := r.loopOnce(ctx)
		if err != nil {
			r.log.Warn("rollout reports", "err", err)
			next = 5 * time.Second
		}
		if err := r.wait(ctx, next, hist, claims, safety.C); err != nil || ctx.Err() != nil {
			return err
		}
	}
}

// wait returns at the next event, after d (0: no timer), or on tick; an
// error when a watch ended.
func (r *rolloutReporter) wait(ctx context.Context, d time.Duration, hist, claims clientv3.WatchChan, tick <-chan time.Time) error {
	var wake <-chan time.Time
	if d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		wake = t.C
	}
	select {
	case <-ctx.Done():
	case w, ok := <-hist:
		if !ok || w.Err() != nil {
			return cmp.Or(w.Err(), errors.New("history watch closed"))
		}
	case w, ok := <-claims:
		if !ok || w.Err() != nil {
			return cmp.Or(w.Err(), errors.New("claims watch closed"))
		}
	case <-wake:
	case <-tick:
	}
	return nil
}

// loopOnce reads the ledger and the claims in one transaction and sends
// the reports that are due and this node's to send. It reads the nodes'
// status records and a version's node keys (both as many as the fleet)
// only for a version whose report may be due: every node does so once
// per settled version, not on every node's convergence (those are keys
// of their own, which this watch does not see). It returns how long
// until a report waiting for its settler may be taken over (0: none
// waits).
func (r *rolloutReporter) loopOnce(ctx context.Context) (time.Duration, error) {
	rctx, cancel := context.WithTimeout(ctx, r.timeout)
	resp, err := r.etcd.Txn(rctx).Then(
		clientv3.OpGet(historiesPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(reportsPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly()),
	).Commit()
	cancel()
	if err != nil {
		return 0, fmt.Errorf("read the ledger: %w", err)
	}
	claimed := map[string]bool{}
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		claimed[string(kv.Key)] = true
	}
	var running map[string][]string // read once, when a version needs it
	fleet := func(v *ledgerVersion) ([]string, error) {
		if err := r.withNodes(ctx, v); err != nil {
			return nil, err
		}
		if running == nil {
			rctx, cancel := context.WithTimeout(ctx, r.timeout)
			st, err := r.etcd.Get(rctx, statusPrefix, clientv3.WithPrefix())
			cancel()
			if err != nil {
				return nil, fmt.Errorf("read the nodes' status: %w", err)
			}
			running = nodesRunningTags(st.Kvs)
		}
		return running[v.Image], nil
	}
	now := r.now()
	var next time.Duration
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		var v ledgerVersion
		if json.Unmarshal(kv.Value, &v) != nil || v.Reported != nil && r.threads == nil {
			continue
		}
		var nodes []string
		read := false
		if r.threads != nil && threadOpen(v, now) || v.Outcome == outcomeRollingOut && hasFailure(v) {
			if nodes, err = fleet(&v); err != nil {
				return 0, err
			}
			read = true
		}
		if r.threads != nil {
			if err := r.thread(ctx, string(kv.Key), kv.ModRevision, v, nodes, claimed, now); err != nil {
				r.log.Warn("rollout's Slack thread not updated", "image", v.Image, "version", v.Version, "err", err)
			}
		}
		s, ok := settle(v, nodes, now)
		if !ok || claimed[reportClaimKey(v.Image, v.Version)] {
			continue
		}
		if s.by != r.node {
			if wait := s.at.Add(r.takeover).Sub(now); wait > 0 {
				if next == 0 || wait < next {
					next = wait
				}
				continue
			}
		}
		if !read {
			if nodes, err = fleet(&v); err != nil {
				return 0, err
			}
		}
		if err := r.report(ctx, string(kv.Key), kv.ModRevision, v, nodes); err != nil {
			r.log.Warn("rollout report not sent", "image", v.Image, "version", v.Version, "err", err)
		}
	}
	return next, nil
}

// withNodes puts the node keys of v's version (ledger.go) into v.Nodes.
func (r *rolloutReporter) withNodes(ctx context.Context, v *ledgerVersion) error {
	rctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	resp, err := r.etcd.Get(rctx, historyNodesDir(v.Image, v.Version), clientv3.WithPrefix())
	if err != nil {
		return fmt.Errorf("read the nodes of %s version %d: %w", v.Image, v.Version, err)
	}
	mergeNodeKeys(v, resp.Kvs)
	return nil
}

// hasFailure reports whether a node's replacement to v failed.
func hasFailure(v ledgerVersion) bool {
	for _, res := range v.Nodes {
		if !res.Failed.IsZero() {
			return true
		}
	}
	return false
}

// errNotClaimed: the version kept changing under the writes.
var errNotClaimed = errors.New("the version kept changing")

// claim takes claim under this node's lease if nobody holds it and the
// version at key is still at modRev; ok is false when another node has
// it or the version changed (the next pass reads again).
func (r *rolloutReporter) claim(ctx context.Context, claim, key string, modRev int64) (ok bool, err error) {
	sess, err := r.leases.Current(ctx)
	if err != nil {
		return false, err
	}
	cctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	tr, err := r.etcd.Txn(cctx).If(
		clientv3.Compare(clientv3.CreateRevision(claim), "=", 0),
		clientv3.Compare(clientv3.ModRevision(key), "=", modRev),
	).Then(clientv3.OpPut(claim, r.node, clientv3.WithLease(sess.Lease()))).Commit()
	if err != nil {
		return false, fmt.Errorf("claim: %w", err)
	}
	return tr.Succeeded, nil
}

// release deletes a claim this node gives up.
func (r *rolloutReporter) release(ctx context.Context, claim string) {
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.timeout)
	defer cancel()
	if _, err := r.etcd.Delete(dctx, claim); err != nil {
		r.log.Warn("rollout reports: claim not released; its lease frees it", "err", err)
	}
}

// report claims v's report, sends it and marks it sent.
func (r *rolloutReporter) report(ctx context.Context, key string, modRev int64, v ledgerVersion, running []string) error {
	claim := reportClaimKey(v.Image, v.Version)
	if ok, err := r.claim(ctx, claim, key, modRev); err != nil || !ok {
		return err // another node has it, or the version changed: read again
	}
	r.hook(ctx)
	if ctx.Err() != nil {
		return ctx.Err() // stopping: the lease's end frees the claim for another node
	}
	rep := summarize(v, running)
	m := rep.message()
	serr := r.out.deliver(ctx, m)
	if ctx.Err() != nil {
		// Stopping while sending: another node sends it (to the services
		// that got it too, a second time) rather than none.
		r.release(ctx, claim)
		return ctx.Err()
	}
	r.log.Info("rollout report sent", "image", v.Image, "version", v.Version, "outcome", rep.Outcome, "done", len(rep.Done), "failed", len(rep.Failed))
	mark := reportMark{Time: r.now().UTC(), Node: r.node, Outcome: rep.Outcome}
	if serr != nil {
		mark.Err = serr.Error()
	}
	if _, err := r.modify(context.WithoutCancel(ctx), key, claim, func(v *ledgerVersion) bool {
		if v.Reported != nil {
			r.log.Warn("rollout report was sent twice", "image", v.Image, "version", v.Version, "other_node", v.Reported.Node)
		}
		v.Reported = &mark
		return true
	}); err != nil {
		return err
	}
	// The thread's parent gets the final text after the mark: a node
	// that updates it with its progress reads the mark after its update
	// and puts the final text back (thread).
	if r.threads != nil && v.SlackThread != nil {
		t := v.SlackThread
		err := r.threads.update(ctx, t.Channel, t.TS, m.Text)
		if err == nil {
			_, _, err = r.threads.post(ctx, m.Text, t.TS, true)
		}
		if err != nil {
			return fmt.Errorf("the report in its Slack thread: %w", err)
		}
	}
	return nil
}

// modify applies f to the version at key and writes it, deleting claim
// (when set) in the same transaction; tried again while other nodes
// write the version. f returns false to write nothing (the claim is
// deleted all the same). It returns the version as written.
func (r *rolloutReporter) modify(ctx context.Context, key, claim string, f func(*ledgerVersion) bool) (ledgerVersion, error) {
	for range 5 {
		mctx, cancel := context.WithTimeout(ctx, r.timeout)
		g, err := r.etcd.Get(mctx, key)
		if err != nil || len(g.Kvs) == 0 {
			cancel()
			return ledgerVersion{}, fmt.Errorf("write %s: %w", key, cmp.Or(err, errors.New("the version is gone")))
		}
		var v ledgerVersion
		if err := json.Unmarshal(g.Kvs[0].Value, &v); err != nil {
			cancel()
			return ledgerVersion{}, fmt.Errorf("write %s: %w", key, err)
		}
		var ops []clientv3.Op
		if f(&v) {
			b, _ := json.Marshal(v)
			ops = append(ops, clientv3.OpPut(key, string(b)))
		}
		if claim != "" {
			ops = append(ops, clientv3.OpDelete(claim))
		}
		tr, err := r.etcd.Txn(mctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", g.Kvs[0].ModRevision)).Then(ops...).Commit()
		cancel()
		if err != nil {
			return ledgerVersion{}, fmt.Errorf("write %s: %w", key, err)
		}
		if tr.Succeeded {
			return v, nil
		}
	}
	return ledgerVersion{}, fmt.Errorf("write %s: %w", key, errNotClaimed)
}

// threadPoster posts and updates Slack messages (notify_slackthread.go).
type threadPoster interface {
	// post posts text, in thread threadTS when set (broadcast: shown in
	// the channel too), and returns the message's channel and timestamp.
	post(ctx context.Context, text, threadTS string, broadcast bool) (channel, ts string, err error)
	// update replaces the text of a message.
	update(ctx context.Context, channel, ts, text string) error
}

// thread keeps v's Slack thread (-slack_token) up to date with this
// node's part: the first node with a result posts the parent message (a
// claim elects it); then each node replies with its own result, once
// (failures shown in the channel too), and updates the parent's counts.
func (r *rolloutReporter) thread(ctx context.Context, key string, modRev int64, v ledgerVersion, running []string, claimed map[string]bool, now time.Time) error {
	if !threadOpen(v, now) || len(v.Nodes) == 0 {
		return nil
	}
	if v.SlackThread == nil {
		if v.Reported != nil {
			return nil // told before this node had a token: no thread now
		}
		claim := threadClaimKey(v.Image, v.Version)
		if claimed[claim] {
			return nil
		}
		if ok, err := r.claim(ctx, claim, key, modRev); err != nil || !ok {
			return err
		}
		channel, ts, err := r.threads.post(ctx, summarize(v, running).progress(), "", false)
		if err != nil {
			r.release(ctx, claim)
			return err
		}
		_, err = r.modify(context.WithoutCancel(ctx), key, claim, func(v *ledgerVersion) bool {
			if v.SlackThread != nil {
				return false
			}
			v.SlackThread = &slackThread{Channel: channel, TS: ts}
			return true
		})
		return err
	}
	res, ok := v.Nodes[r.node]
	if !ok || slices.Contains(v.SlackThread.Replied, r.node) {
		return nil
	}
	failed := !res.Failed.IsZero()
	if _, _, err := r.threads.post(ctx, nodeDetail(r.node, v, res), v.SlackThread.TS, failed); err != nil {
		return err
	}
	cur, err := r.modify(context.WithoutCancel(ctx), key, "", func(v *ledgerVersion) bool {
		if v.SlackThread == nil || slices.Contains(v.SlackThread.Replied, r.node) {
			return false
		}
		v.SlackThread.Replied = append(v.SlackThread.Replied, r.node)
		return true
	})
	if err != nil || cur.SlackThread == nil || cur.Reported != nil {
		return err // the final report sets the parent's text
	}
	if err := r.withNodes(ctx, &cur); err != nil {
		return err
	}
	if err := r.threads.update(ctx, cur.SlackThread.Channel, cur.SlackThread.TS, summarize(cur, running).progress()); err != nil {
		return err
	}
	// The report may have been marked sent, and its text put in the
	// parent, before this update landed: put it back.
	gctx, cancel := context.WithTimeout(ctx, r.timeout)
	g, err := r.etcd.Get(gctx, key)
	cancel()
	if err != nil || len(g.Kvs) == 0 || json.Unmarshal(g.Kvs[0].Value, &cur) != nil || cur.Reported == nil || cur.SlackThread == nil {
		return err
	}
	if err := r.withNodes(ctx, &cur); err != nil {
		return err
	}
	return r.threads.update(ctx, cur.SlackThread.Channel, cur.SlackThread.TS, summarize(cur, running).message().Text)
}

// threadOpen reports whether v's Slack thread may still change: the
// version rolls out, or settled, within reportWindow of its push.
func threadOpen(v ledgerVersion, now time.Time) bool {
	return (v.Outcome == outcomeRollingOut || v.Outcome == outcomeRolledOut || v.Outcome == outcomeHalted) && now.Sub(v.Pushed) <= reportWindow
}

// nodeDetail is a node's reply in a rollout's thread.
func nodeDetail(node string, v ledgerVersion, res nodeResult) string {
	if !res.Failed.IsZero() {
		return fmt.Sprintf(":x: %s failed %s after the push: %s", node, max(res.Failed.Sub(v.Pushed), 0).Round(100*time.Millisecond), res.Reason)
	}
	return fmt.Sprintf("%s converged %s after the push", node, max(res.Converged.Sub(v.Pushed), 0).Round(100*time.Millisecond))
}

// settled is when a version settled and which node settled it.
type settled struct {
	at time.Time
	by string
}

// settle says whether v's report is due (not sent yet, settled within
// reportWindow of now), and when and by whom it settled: rolled out, by
// the last node to converge; halted, by the node that failed first;
// otherwise settled when every node in running has converged or failed
// and one failed, by the last of them.
func settle(v ledgerVersion, running []string, now time.Time) (settled, bool) {
	if v.Reported != nil {
		return settled{}, false
	}
	var s settled
	switch v.Outcome {
	case outcomeRolledOut:
		s.at, s.by = v.Completed, v.CompletedBy
		for n, res := range v.Nodes { // written by an earlier daemon, without CompletedBy
			if s.by == "" && res.Converged.Equal(v.Completed) {
				s.by = n
			}
		}
	case outcomeHalted:
		for _, n := range slices.Sorted(maps.Keys(v.Nodes)) {
			if f := v.Nodes[n].Failed; !f.IsZero() && (s.at.IsZero() || f.Before(s.at)) {
				s = settled{f, n}
			}
		}
	case outcomeRollingOut:
		failed := false
		for _, n := range unionNodes(v.Nodes, running) {
			res, ok := v.Nodes[n]
			if !ok {
				return settled{}, false
			}
			t := res.Converged
			if !res.Failed.IsZero() {
				failed, t = true, res.Failed
			}
			if t.After(s.at) {
				s = settled{t, n}
			}
		}
		if !failed {
			return settled{}, false
		}
	default:
		return settled{}, false
	}
	if s.at.IsZero() || now.Sub(s.at) > reportWindow {
		return settled{}, false
	}
	return s, true
}

// unionNodes is the nodes of a version's results and those running its
// tag, sorted.
func unionNodes(nodes map[string]nodeResult, running []string) []string {
	all := slices.Collect(maps.Keys(nodes))
	for _, n := range running {
		if !slices.Contains(all, n) {
			all = append(all, n)
		}
	}
	slices.Sort(all)
	return all
}

// nodesRunningTags maps each image tag to the nodes whose status record
// shows a container of it.
func nodesRunningTags(kvs []*mvccpb.KeyValue) map[string][]string {
	out := map[string][]string{}
	for _, kv := range kvs {
		var n nodeStatus
		if json.Unmarshal(kv.Value, &n) != nil {
			continue
		}
		for _, c := range n.Containers {
			if !slices.Contains(out[c.Image], n.Node) {
				out[c.Image] = append(out[c.Image], n.Node)
			}
		}
	}
	return out
}

// rolloutReport is a version's rollout across the fleet, as told.
type rolloutReport struct {
	Image   string // familiar: myorg/app:qa
	Version int64
	ImageID string
	Digest  string
	Outcome string // rolled out, halted, failed
	Done    []string
	Failed  []nodeFailure
	Pending []string // running the tag, neither converged nor failed
	Lead    time.Duration
	First   time.Duration // to the first node converged
}

type nodeFailure struct {
	Node, Reason string
}

// summarize aggregates v's node results, with running the nodes that run
// its tag.
func summarize(v ledgerVersion, running []string) rolloutReport {
	r := rolloutReport{Image: v.Image, Version: v.Version, ImageID: v.ImageID, Digest: v.Digest, Outcome: v.Outcome,
		First: seconds(v.FirstSeconds), Lead: seconds(v.LastSeconds)}
	if named, err := reference.ParseNormalizedNamed(v.Image); err == nil {
		r.Image = reference.FamiliarString(named)
	}
	var last time.Time
	for _, n := range unionNodes(v.Nodes, running) {
		res, ok := v.Nodes[n]
		switch {
		case !ok:
			r.Pending = append(r.Pending, n)
		case !res.Failed.IsZero():
			r.Failed = append(r.Failed, nodeFailure{n, res.Reason})
			last = latest(last, res.Failed)
		case !res.Converged.IsZero():
			r.Done = append(r.Done, n)
			last = latest(last, res.Converged)
		}
	}
	if r.Outcome == outcomeRollingOut {
		r.Outcome = "failed" // settled with failures, not halted
	}
	if r.Lead == 0 && !last.IsZero() {
		r.Lead = max(last.Sub(v.Pushed), 0)
	}
	return r
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

func latest(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// progress is the parent message of a rollout's Slack thread while it
// rolls out.
func (r rolloutReport) progress() string {
	total := len(r.Done) + len(r.Failed) + len(r.Pending)
	return fmt.Sprintf("Rolling out %s (version %d, image %s): %d of %d nodes done, %d failed", r.Image, r.Version, shortID(r.ImageID), len(r.Done), total, len(r.Failed))
}

// message renders the report: one line with the version and the counts,
// then one line per failed node.
func (r rolloutReport) message() message {
	total := len(r.Done) + len(r.Failed) + len(r.Pending)
	id := fmt.Sprintf("version %d, image %s", r.Version, shortID(r.ImageID))
	if r.Digest != "" {
		id += ", digest " + r.Digest
	}
	var b strings.Builder
	var title string
	switch r.Outcome {
	case outcomeRolledOut:
		title = "Rolled out " + r.Image
		fmt.Fprintf(&b, "Rolled out %s (%s): %d of %d nodes in %s (first node %s)", r.Image, id, len(r.Done), total, r.Lead.Round(100*time.Millisecond), r.First.Round(100*time.Millisecond))
	default:
		verb := "HALTED"
		if r.Outcome != outcomeHalted {
			verb = "FAILED"
		}
		title = "Rollout " + verb + ": " + r.Image
		fmt.Fprintf(&b, ":x: Rollout %s: %s (%s): %d of %d nodes done, %d failed", verb, r.Image, id, len(r.Done), total, len(r.Failed))
		if len(r.Pending) > 0 {
			fmt.Fprintf(&b, ", %d not reached (%s)", len(r.Pending), strings.Join(r.Pending, ", "))
		}
		fmt.Fprintf(&b, "; %s since the push", r.Lead.Round(100*time.Millisecond))
		for _, f := range r.Failed {
			fmt.Fprintf(&b, "\n• %s failed: %s", f.Node, f.Reason)
		}
	}
	var failed []string
	for _, f := range r.Failed {
		failed = append(failed, f.Node)
	}
	return message{Title: title, Text: b.String(), Fields: map[string]string{
		"kind": "rollout", "image": r.Image, "version": strconv.FormatInt(r.Version, 10), "image_id": r.ImageID,
		"digest": r.Digest, "outcome": r.Outcome, "nodes": strconv.Itoa(total), "done": strconv.Itoa(len(r.Done)),
		"failed": strconv.Itoa(len(r.Failed)), "failed_nodes": strings.Join(failed, ","),
		"lead_seconds": strconv.FormatFloat(r.Lead.Seconds(), 'f', 3, 64),
	}}
}
