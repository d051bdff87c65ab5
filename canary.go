package main

// canary.go: canary nodes, the bake and promotion (README, Release
// policy: Canary nodes, bake and promote). When the effective policy of
// a tag (policy.go) names canary nodes, a new version of the tag goes to
// them first, under the usual slots and "up" check, and is held on every
// other node (a hold, as pins and freezes are): pulled there ahead, so
// that promotion is fast, but nothing is stopped or re-created. Once a
// canary's replacements are up they bake: each must stay running, never
// restarted, healthy where the image has a health check, until the
// bake's end. A failure halts the version and rolls the canaries back; a
// clean bake promotes the version at once (promotion auto) or waits for
// `deployer promote` (manual). `deployer abort` halts and rolls back.
//
// The state of a tag's canary rollout is one record in etcd,
// _canary/<image ref>, so that a restart of any deployer or an etcd
// leader change resumes it where it was. Every change of it is a
// transaction on the record's ModRevision, so that of two nodes (or
// commands) changing it at once exactly one succeeds, and the other reads
// the result. A promotion writes the record and the tag's trigger in one
// transaction: every node, also one that restarted or joined meanwhile,
// deploys the version through the ordinary path, where the hold now lets
// it through. The phases:
//
//	canary   -> baking      a canary node reports its replacements up (the bake's end: now + bake)
//	baking   -> waiting     every canary that reported stayed up to the bake's end (manual)
//	baking   -> promoted    the same, promotion auto; with the trigger
//	canary, baking, waiting -> promoted  deployer promote; with the trigger
//	canary, baking -> failed             a canary replacement went down during the bake; with the halt record
//	canary, baking, waiting -> aborted   deployer abort; with the halt record
//	failed, aborted: the canaries roll back once (claimed by one node, rollbackHalted)
//
// A canary node that is down (its owner key gone) when the bake ends is
// marked down and does not count; when none is up the record says so and
// waits for promote, abort or a canary.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/die-net/deployer/internal/etcdc"
	"github.com/distribution/reference"
	docker "github.com/fsouza/go-dockerclient"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// The phases of a canary record.
const (
	phaseCanary   = "canary"   // rolling out on the canary nodes
	phaseBaking   = "baking"   // the canaries' replacements are up and must stay up until BakeUntil
	phaseWaiting  = "waiting"  // baked clean; waiting for deployer promote
	phasePromoted = "promoted" // released to every node
	phaseFailed   = "failed"   // a canary replacement failed during the bake
	phaseAborted  = "aborted"  // deployer abort
)

// Errors of promote and abort.
var (
	errNoCanary      = errors.New("no canary rollout")
	errCanaryOver    = errors.New("the canary rollout is over")
	errCanaryChanged = errors.New("the canary rollout keeps changing under us; try again")
)

// canaryRecord is the state of one tag's canary rollout (canaryKey).
type canaryRecord struct {
	ImageID   string    `json:"image_id"`           // the version on trial
	Previous  string    `json:"previous,omitempty"` // the image the first stale container ran: where a rollback goes
	Digest    string    `json:"digest,omitempty"`   // the pushed manifest digest, when the trigger gave one
	Revision  int64     `json:"revision,omitempty"` // the trigger's etcd revision
	Phase     string    `json:"phase"`
	Since     time.Time `json:"since"` // when the phase began
	Bake      jsonDur   `json:"bake"`
	Promotion string    `json:"promotion"`
	BakeUntil time.Time `json:"bake_until,omitzero"`
	// Canaries: per canary node that reported its replacements up.
	Canaries map[string]*canaryNode `json:"canaries,omitempty"`
	Note     string                 `json:"note,omitempty"`    // canaries down, or none up
	Missing  []string               `json:"missing,omitempty"` // canary nodes the policy names that are not up (no status record)
	Reason   string                 `json:"reason,omitempty"`  // failed, aborted: why; promoted: how
	By       string                 `json:"by,omitempty"`      // who promoted or aborted (a command and host, or a node)
	Opener   string                 `json:"opener,omitempty"`  // the node that opened the rollout: it keeps Note and Missing, with the canaries
	// The rollback of a failed or aborted version: claimed by one node
	// (RollbackBy, RollbackAt), then done ("rolled back to …") or
	// failed (RollbackErr, tried again after rollbackRetry).
	RollbackBy  string    `json:"rollback_by,omitempty"`
	RollbackAt  time.Time `json:"rollback_at,omitzero"`
	RolledBack  string    `json:"rolled_back,omitempty"`
	RollbackErr string    `json:"rollback_err,omitempty"`
}

// canaryNode is one canary node's part in the bake.
type canaryNode struct {
	Containers []bakeContainer `json:"containers"`
	Up         time.Time       `json:"up"`              // when it reported its replacements up
	Baked      bool            `json:"baked,omitempty"` // stayed up to the bake's end
	Down       bool            `json:"down,omitempty"`  // the node was down at the bake's end: not counted
}

// bakeContainer is a canary replacement as it was when the bake began:
// the same start, never restarted, is what staying up means.
type bakeContainer struct {
	ID           string    `json:"id"`
	Name         string    `json:"name"`
	StartedAt    time.Time `json:"started_at"`
	RestartCount int       `json:"restart_count"`
}

func (rec *canaryRecord) open() bool {
	switch rec.Phase {
	case phaseCanary, phaseBaking, phaseWaiting:
		return true
	}
	return false
}

func (rec *canaryRecord) halted() bool { return rec.Phase == phaseFailed || rec.Phase == phaseAborted }

// holdReason is why a node that is not a canary (or any node, for a
// halted version) must not replace anything with the record's version;
// "" lets it through.
func (rec *canaryRecord) holdReason(canary bool) string {
	switch {
	case rec.halted():
		return "halted on the canaries: " + rec.Reason
	case canary || rec.Phase == phasePromoted:
		return ""
	case rec.Phase == phaseWaiting:
		return "waiting for promote"
	}
	return "baking on canaries"
}

// state says where the rollout is, for status and the command's answer.
func (rec *canaryRecord) state() string {
	nodes := slices.Sorted(maps.Keys(rec.Canaries))
	var s string
	switch rec.Phase {
	case phaseCanary:
		s = "rolling out on the canaries"
	case phaseBaking:
		s = fmt.Sprintf("baking on %s until %s", strings.Join(nodes, ","), rec.BakeUntil.UTC().Format(time.RFC3339))
	case phaseWaiting:
		s = "waiting for promote (baked clean on " + strings.Join(nodes, ",") + ")"
	case phasePromoted:
		s = "promoted: " + rec.Reason
	case phaseFailed, phaseAborted:
		s = "HALTED (" + rec.Phase + "): " + rec.Reason
		switch {
		case rec.RolledBack != "":
			s += "; " + rec.RolledBack
		case rec.RollbackErr != "":
			s += "; rollback failed, retrying: " + rec.RollbackErr
		default:
			s += "; rolling the canaries back"
		}
	}
	if rec.Note != "" {
		s += " (" + rec.Note + ")"
	}
	if len(rec.Missing) > 0 && rec.open() {
		s += " (canary nodes not up: " + strings.Join(rec.Missing, ",") + ")"
	}
	return s
}

// bakeDocker is the part of the Docker client the bake watches.
type bakeDocker interface {
	inspector
	// ListContainers lists the running containers.
	ListContainers(docker.ListContainersOptions) ([]docker.APIContainers, error)
}

// announcer tells people, once for the fleet, what a canary rollout did.
type announcer interface {
	say(text string)
}

type nopAnnouncer struct{}

func (nopAnnouncer) say(string) {}

// haltRollback rolls back a halted version of ref: the canaries go back
// to previous (an image ID; "" lets the rollback pick the newest earlier
// version that rolled out). It is haltrollback.go's rollbackHalted in the
// daemon.
type haltRollback func(ctx context.Context, ref reference.NamedTagged, previous string) (string, error)

// canariesEtcd is the part of the etcd client the canary rollouts use:
// reads and writes, and run's watch.
type canariesEtcd interface {
	clientv3.KV
	clientv3.Watcher
}

// canaries runs the canary rollouts as this node sees them: the hold of
// each deploy, and the bake's watch and transitions (run).
type canaries struct {
	kv       clientv3.KV      // confined to -etcd_prefix
	watcher  clientv3.Watcher // run's watch of the canary records
	policies *policies
	docker   bakeDocker
	node     string
	labels   []string // -node_labels
	announce announcer
	rollback haltRollback // nil: none (tests)
	domain   string       // -registry: where bare names live
	log      *slog.Logger

	every         time.Duration        // how often run looks while this node's part waits on its containers (1 s): its report, its bake's check
	downGrace     time.Duration        // after the bake's end, how long a canary that has not confirmed has before it counts as down
	lookEvery     time.Duration        // how often the status records are read for canaries not up (noteCanaries)
	looked        map[string]time.Time // ref -> when run last read them; run's goroutine only
	rollbackRetry time.Duration        // a rollback claimed and not done is tried again after this
	callTimeout   time.Duration
	now           func() time.Time
}

// newCanaries returns the canary rollouts of node (started with labels).
// It starts nothing.
func newCanaries(kv canariesEtcd, ps *policies, dc bakeDocker, node string, labels []string, ann announcer, rb haltRollback, domain string, log *slog.Logger) *canaries {
	if ann == nil {
		ann = nopAnnouncer{}
	}
	return &canaries{
		kv: kv, watcher: kv, policies: ps, docker: dc, node: node, labels: labels, announce: ann, rollback: rb, domain: domain, log: log,
		every: time.Second, downGrace: 5 * time.Second, lookEvery: 5 * time.Second, looked: map[string]time.Time{}, rollbackRetry: 30 * time.Second, callTimeout: callTimeout, now: time.Now,
	}
}

// get reads ref's record and its ModRevision (0: none).
func (c *canaries) get(ctx context.Context, ref string) (*canaryRecord, int64, error) {
	ctx, cancel := context.WithTimeout(ctx, c.callTimeout)
	defer cancel()
	resp, err := c.kv.Get(ctx, canaryKey(ref))
	if err != nil {
		return nil, 0, fmt.Errorf("read the canary rollout of %s: %w", ref, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, 0, nil
	}
	var rec canaryRecord
	if err := json.Unmarshal(resp.Kvs[0].Value, &rec); err != nil {
		return nil, resp.Kvs[0].ModRevision, nil // unreadable: as none, replaced by the next version
	}
	return &rec, resp.Kvs[0].ModRevision, nil
}

// put writes rec in place of the record at rev (0: none), with the other
// ops, in one transaction; false when another writer got there first.
func (c *canaries) put(ctx context.Context, ref string, rec *canaryRecord, rev int64, also ...clientv3.Op) (bool, error) {
	b, err := json.Marshal(rec)
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithTimeout(ctx, c.callTimeout)
	defer cancel()
	key := canaryKey(ref)
	resp, err := c.kv.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).
		Then(append([]clientv3.Op{clientv3.OpPut(key, string(b))}, also...)...).Commit()
	if err != nil {
		return false, fmt.Errorf("write the canary rollout of %s: %w", ref, err)
	}
	return resp.Succeeded, nil
}

// isCanary reports whether this node is a canary of pol.
func (c *canaries) isCanary(pol rolloutPolicy) bool { return pol.canary(c.node, c.labels) }

// filter is the canary hold of one deploy: it drops from stale the
// containers of every tag whose new version is held on this node, and
// from current (tag -> image ID pulled) their tags, so that the ledger
// records nothing of them here; r.Held says why. A tag's first sight of
// a new version (on any node) begins its canary rollout. A tag whose hold
// cannot be read is not replaced, and the deploy fails (and is retried).
func (c *canaries) filter(ctx context.Context, stale []staleContainer, current map[string]string, j job, r *report) []staleContainer {
	if c == nil || len(stale) == 0 {
		return stale
	}
	held := map[string]string{} // ref -> reason
	var rev int64
	if len(j.Revs) > 0 {
		rev = slices.Max(j.Revs)
	}
	out := stale[:0:0]
	for _, s := range stale {
		ref := s.Ref.String()
		reason, seen := held[ref]
		if !seen {
			var err error
			reason, err = c.hold(ctx, s.Ref, s.NewID, s.ImageID, j.Digests[s.Ref.Tag()], rev)
			if err != nil {
				r.Failed = append(r.Failed, err)
				reason = "canary state unknown"
			}
			held[ref] = reason
		}
		if reason == "" {
			out = append(out, s)
			continue
		}
		delete(current, s.Ref.Tag())
		r.Held = append(r.Held, fmt.Sprintf("%s (%s)", s.Name, reason))
	}
	return out
}

// hold answers, for a new version (imageID) of ref found stale on this
// node (its containers run previous), whether it is held here, and why.
func (c *canaries) hold(ctx context.Context, ref reference.NamedTagged, imageID, previous, digest string, trigRev int64) (string, error) {
	key := ref.String()
	pol, err := c.policies.effective(ctx, key)
	if err != nil {
		c.log.Warn("policy unreadable, using what could be read", "ref", key, "err", err)
	}
	if !pol.hasCanaries() {
		return "", nil
	}
	canary := c.isCanary(pol)
	for range 5 {
		rec, rev, err := c.get(ctx, key)
		if err != nil {
			return "", err
		}
		if rec != nil && rec.ImageID == imageID {
			return rec.holdReason(canary), nil
		}
		if rec != nil && rec.halted() && rec.Previous == imageID {
			return "", nil // the rollback of a halted version goes everywhere
		}
		now := c.now().UTC()
		next := &canaryRecord{ImageID: imageID, Previous: previous, Digest: digest, Revision: trigRev, Phase: phaseCanary,
			Since: now, Bake: jsonDur(pol.Bake), Promotion: pol.Promotion, Opener: c.node}
		ok, err := c.put(ctx, key, next, rev)
		if err != nil {
			return "", err
		}
		if ok {
			c.log.Info("canary rollout begins", "ref", key, "image", shortID(imageID), "previous", shortID(previous),
				"canary_nodes", pol.CanaryNodes, "canary_labels", pol.CanaryLabels, "bake", pol.Bake, "promotion", pol.Promotion)
			return next.holdReason(canary), nil
		}
	}
	return "", errCanaryChanged
}

// run moves the canary rollouts on until ctx is done: a pass (loopOnce)
// at once, then at the earliest of the next due time of a rollout (step),
// a change of the canary records (a watch), and dueTick. With no rollout
// open it reads nothing but on the tick.
func (c *canaries) run(ctx context.Context) error {
	etcdc.DueLoop{
		Watcher: c.watcher, Prefixes: []string{canariesPrefix}, Tick: dueTick, Retry: c.every,
		Failed: func(err error) { c.log.Warn("canary rollouts not checked", "err", err) },
	}.Run(ctx, c.loopOnce)
	return nil
}

// loopOnce reads every open canary rollout and moves each on where this
// node can: report its replacements up, watch them bake, settle the
// bake's end, roll a halted version back. It says when the next step of
// any is due.
func (c *canaries) loopOnce(ctx context.Context) (etcdc.Pass, error) {
	lctx, cancel := context.WithTimeout(ctx, c.callTimeout)
	resp, err := c.kv.Get(lctx, canariesPrefix, clientv3.WithPrefix())
	cancel()
	if err != nil {
		return etcdc.Pass{}, fmt.Errorf("read the canary rollouts: %w", err)
	}
	due := etcdc.DueAfter(c.now().UTC())
	var errs []error
	for _, kv := range resp.Kvs {
		ref, ok := refFromCanaryKey(string(kv.Key))
		if !ok {
			continue
		}
		var rec canaryRecord
		if json.Unmarshal(kv.Value, &rec) != nil {
			continue
		}
		if err := c.step(ctx, ref, &rec, kv.ModRevision, &due); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", ref, err))
		}
	}
	return etcdc.Pass{Rev: resp.Header.Revision, Due: due.Wait()}, errors.Join(errs...)
}

// step moves one rollout on, and adds to due when it next has something
// to do: the bake's end, the down grace after it, the next look at the
// status records, a rollback to try again; and every c.every while this
// node's part waits on its own containers (its report, its bake's check)
// or a canary's node may go down unseen. A write that loses a race is
// left to the next pass, which the write that won starts (the watch).
func (c *canaries) step(ctx context.Context, ref string, rec *canaryRecord, rev int64, due *etcdc.Due) error {
	switch {
	case rec.halted():
		return c.rollbackStep(ctx, ref, rec, rev, due)
	case rec.Phase != phaseCanary && rec.Phase != phaseBaking:
		return nil
	}
	pol, err := c.policies.effective(ctx, ref)
	if err != nil {
		c.log.Debug("policy unreadable, using what could be read", "ref", ref, "err", err)
	}
	now := c.now().UTC()
	if c.isCanary(pol) {
		mine := rec.Canaries[c.node]
		switch {
		case mine == nil:
			due.In(c.every) // until its containers are up
			return c.report(ctx, ref, rec, rev)
		case rec.Phase == phaseBaking && !mine.Baked && !mine.Down:
			if why := c.check(ctx, mine.Containers); why != "" {
				return c.fail(ctx, ref, rec, rev, fmt.Sprintf("%s on %s", why, c.node))
			}
			if !now.Before(rec.BakeUntil) {
				mine.Baked = true
				c.settle(rec, now)
				return c.commit(ctx, ref, rec, rev)
			}
			due.At(rec.BakeUntil)
			due.In(c.every) // the next check
			return nil
		}
	}
	if rec.Phase == phaseBaking {
		settleAt := rec.BakeUntil.Add(c.downGrace)
		if !now.Before(settleAt) {
			for _, n := range rec.Canaries {
				if !n.Baked && !n.Down {
					due.In(c.every) // a canary to confirm its bake, or to count as down when its owner key goes
				}
			}
			return c.settleDown(ctx, ref, rec, rev, now)
		}
		due.At(settleAt)
	}
	if !c.looks(rec, pol) {
		return nil
	}
	if now.Sub(rec.Since) >= c.downGrace && now.Sub(c.looked[ref]) >= c.lookEvery {
		c.looked[ref] = now
		due.At(now.Add(c.lookEvery))
		return c.noteCanaries(ctx, ref, rec, rev, pol)
	}
	due.At(later(rec.Since.Add(c.downGrace), c.looked[ref].Add(c.lookEvery)))
	return nil
}

// looks reports whether this node keeps the record's notes
// (noteCanaries), which read every status record: the node that opened
// the rollout and the canary nodes do, not the whole fleet (a record
// written by an earlier daemon, without its opener: every node).
func (c *canaries) looks(rec *canaryRecord, pol rolloutPolicy) bool {
	return rec.Opener == "" || rec.Opener == c.node || c.isCanary(pol)
}

// later is the later of a and b.
func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// report adds this canary's replacements to the bake once every running
// container of the tag here runs the version and is up; the first report
// starts the bake, and each pushes its end to at least now + bake.
func (c *canaries) report(ctx context.Context, ref string, rec *canaryRecord, rev int64) error {
	cs, ready, err := c.upContainers(ctx, ref, rec.ImageID)
	if err != nil || !ready {
		return err
	}
	now := c.now().UTC()
	if rec.Canaries == nil {
		rec.Canaries = map[string]*canaryNode{}
	}
	rec.Canaries[c.node] = &canaryNode{Containers: cs, Up: now}
	if rec.Phase == phaseCanary {
		rec.Phase, rec.Since, rec.Note = phaseBaking, now, ""
	}
	if end := now.Add(time.Duration(rec.Bake)); end.After(rec.BakeUntil) {
		rec.BakeUntil = end
	}
	ok, err := c.put(ctx, ref, rec, rev)
	if ok {
		c.log.Info("canary replacements up: baking", "ref", ref, "image", shortID(rec.ImageID), "containers", len(cs),
			"until", rec.BakeUntil)
	}
	return err
}

// upContainers lists the running containers of ref on this node; ready
// when there is one at least and every one runs imageID, is not
// restarting and is healthy where it has a health check.
func (c *canaries) upContainers(ctx context.Context, ref, imageID string) ([]bakeContainer, bool, error) {
	lctx, cancel := context.WithTimeout(ctx, c.callTimeout)
	list, err := c.docker.ListContainers(docker.ListContainersOptions{Context: lctx})
	cancel()
	if err != nil {
		return nil, false, fmt.Errorf("list containers: %w", err)
	}
	var out []bakeContainer
	for t, err := range runningFromTags(ctx, c.docker, c.callTimeout, list, nil) {
		if err != nil {
			return nil, false, err
		}
		if t.ref == nil || t.ref.String() != ref {
			continue
		}
		st := t.ctr.State
		if t.ctr.Image != imageID || !st.Running || st.Restarting || (st.Health.Status != "" && st.Health.Status != "healthy") {
			return nil, false, nil
		}
		out = append(out, bakeContainer{ID: t.ctr.ID, Name: strings.TrimPrefix(t.ctr.Name, "/"), StartedAt: st.StartedAt.UTC(), RestartCount: t.ctr.RestartCount})
	}
	return out, len(out) > 0, nil
}

// check says why one of the baking containers is no longer up: gone,
// stopped, restarting (a crash loop is Running and Restarting), started
// again, or unhealthy; "" while every one is up. A Docker daemon that
// does not answer is not the version's fault: "" until it answers.
func (c *canaries) check(ctx context.Context, cs []bakeContainer) string {
	for _, b := range cs {
		ictx, cancel := context.WithTimeout(ctx, c.callTimeout)
		ctr, err := c.docker.InspectContainerWithContext(b.ID, ictx)
		cancel()
		var gone *docker.NoSuchContainer
		switch {
		case errors.As(err, &gone):
			return fmt.Sprintf("container %s is gone", b.Name)
		case err != nil:
			c.log.Debug("bake: container not inspected", "container", b.Name, "err", err)
			continue
		}
		st := ctr.State
		switch {
		case st.Restarting:
			return fmt.Sprintf("container %s is restarting", b.Name)
		case !st.Running:
			return fmt.Sprintf("container %s stopped (exit code %d)", b.Name, st.ExitCode)
		case ctr.RestartCount != b.RestartCount || !st.StartedAt.Equal(b.StartedAt):
			return fmt.Sprintf("container %s restarted", b.Name)
		case st.Health.Status == "unhealthy":
			return fmt.Sprintf("container %s is unhealthy", b.Name)
		}
	}
	return ""
}

// settle ends the bake in rec if every canary that reported has baked or
// is down, and one baked at least: promoted (auto, with the trigger) or
// waiting (manual; commit turns waiting into promoted for auto). It
// changes rec only, and reports whether the bake ended.
func (c *canaries) settle(rec *canaryRecord, now time.Time) bool {
	baked := 0
	for _, n := range rec.Canaries {
		switch {
		case n.Baked:
			baked++
		case !n.Down:
			return false
		}
	}
	if baked == 0 {
		rec.Note = "every canary is down: waiting for one, deployer promote or deployer abort"
		return false
	}
	rec.Phase, rec.Since = phaseWaiting, now
	return true
}

// settleDown marks the canaries that did not confirm their bake and whose
// node is down (no owner key) as down, then settles the bake; the write
// (with the trigger for auto) is one transaction.
func (c *canaries) settleDown(ctx context.Context, ref string, rec *canaryRecord, rev int64, now time.Time) error {
	var down []string
	for name, n := range rec.Canaries {
		if n.Baked || n.Down {
			continue
		}
		live, err := c.nodeLive(ctx, name)
		if err != nil {
			return err
		}
		if !live {
			n.Down = true
			down = append(down, name)
		}
	}
	before := rec.Note
	if len(down) > 0 {
		slices.Sort(down)
		rec.Note = "canary down at the bake's end, not counted: " + strings.Join(down, ",")
	}
	if !c.settle(rec, now) && len(down) == 0 && rec.Note == before {
		return nil
	}
	return c.commit(ctx, ref, rec, rev)
}

// commit writes rec; a bake that settled to waiting is promoted at once
// when the promotion is auto, and told on Slack once (by the writer that
// won).
func (c *canaries) commit(ctx context.Context, ref string, rec *canaryRecord, rev int64) error {
	if rec.Phase == phaseWaiting && rec.Promotion != promoteManual {
		_, err := c.release(ctx, ref, rec, rev, "baked clean, promotion auto", c.node)
		return err
	}
	ok, err := c.put(ctx, ref, rec, rev)
	if ok && rec.Phase == phaseWaiting {
		c.log.Info("canary baked clean: waiting for promote", "ref", ref, "image", shortID(rec.ImageID))
		c.announce.say(fmt.Sprintf(":hourglass: %s %s baked clean on the canaries (%s): waiting for `deployer promote %s` (or `deployer abort %s`)",
			ref, shortID(rec.ImageID), strings.Join(slices.Sorted(maps.Keys(rec.Canaries)), ","), familiar(ref), familiar(ref)))
	}
	return err
}

// nodeLive reports whether node's deployer holds its owner key.
func (c *canaries) nodeLive(ctx context.Context, node string) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, c.callTimeout)
	defer cancel()
	resp, err := c.kv.Get(ctx, ownerKey(node), clientv3.WithCountOnly())
	if err != nil {
		return false, fmt.Errorf("read the owner of %s: %w", node, err)
	}
	return resp.Count > 0, nil
}

// noteCanaries says in the record, from the nodes' status records (each
// bound to its node's lease), which canary nodes the policy names that
// are not up (Missing: a cluster with fewer nodes than the canary set, or
// a canary down), and, while no canary has reported, that none that runs
// the tag is up: the rollout waits for one, promote or abort.
func (c *canaries) noteCanaries(ctx context.Context, ref string, rec *canaryRecord, rev int64, pol rolloutPolicy) error {
	gctx, cancel := context.WithTimeout(ctx, c.callTimeout)
	resp, err := c.kv.Get(gctx, statusPrefix, clientv3.WithPrefix())
	cancel()
	if err != nil {
		return fmt.Errorf("read the status records: %w", err)
	}
	var up []string
	live := map[string]bool{}
	for _, kv := range resp.Kvs {
		var n nodeStatus
		if json.Unmarshal(kv.Value, &n) != nil {
			continue
		}
		live[n.Node] = true
		if !pol.canary(n.Node, n.Labels) {
			continue
		}
		for _, ctr := range n.Containers {
			if ctr.Image == ref {
				up = append(up, n.Node)
				break
			}
		}
	}
	var missing []string
	for _, name := range pol.CanaryNodes {
		if !live[name] {
			missing = append(missing, name)
		}
	}
	slices.Sort(missing)
	note := rec.Note
	if rec.Phase == phaseCanary {
		note = ""
		if len(up) == 0 {
			note = "no canary node that runs the tag is up: waiting for one, deployer promote or deployer abort"
		}
	}
	if note == rec.Note && slices.Equal(missing, rec.Missing) {
		return nil
	}
	if len(missing) > len(rec.Missing) {
		c.log.Warn("canary nodes named in the policy are not up", "ref", ref, "nodes", missing)
	}
	rec.Note, rec.Missing = note, missing
	_, err = c.put(ctx, ref, rec, rev)
	return err
}

// fail halts the version: the record's phase and the halt record (as
// rollout.go's recordHalt writes it) in one transaction, told once.
func (c *canaries) fail(ctx context.Context, ref string, rec *canaryRecord, rev int64, why string) error {
	now := c.now().UTC()
	rec.Phase, rec.Since, rec.Reason = phaseFailed, now, "bake failed: "+why
	h := halt{ImageID: rec.ImageID, Node: c.node, Reason: rec.Reason, Time: now}
	hb, _ := json.Marshal(h)
	ok, err := c.put(ctx, ref, rec, rev, clientv3.OpPut(haltKey(ref), string(hb)))
	if err != nil || !ok {
		return err
	}
	c.log.Warn("canary bake failed: version halted", "ref", ref, "image", shortID(rec.ImageID), "why", why)
	c.announce.say(fmt.Sprintf(":x: %s %s HALTED: %s; rolling the canaries back to %s", ref, shortID(rec.ImageID), rec.Reason, shortID(rec.Previous)))
	return nil
}

// rollbackStep rolls a halted version back, once for the fleet: this
// node claims the rollback in the record (a transaction), rolls back, and
// records the result; a claim neither done nor failed for rollbackRetry
// (its node died) is claimed again.
func (c *canaries) rollbackStep(ctx context.Context, ref string, rec *canaryRecord, rev int64, due *etcdc.Due) error {
	now := c.now().UTC()
	switch {
	case c.rollback == nil || rec.RolledBack != "":
		return nil
	case rec.RollbackBy != "" && now.Sub(rec.RollbackAt) < c.rollbackRetry:
		due.At(rec.RollbackAt.Add(c.rollbackRetry)) // claimed: tried again if it is neither done nor failed by then
		return nil
	}
	rec.RollbackBy, rec.RollbackAt = c.node, now
	ok, err := c.put(ctx, ref, rec, rev)
	if err != nil || !ok {
		return err
	}
	tagged, err := storedRef(ref)
	if err != nil {
		return err
	}
	done, rbErr := c.rollback(ctx, tagged, rec.Previous)
	for range 5 {
		cur, rev, err := c.get(ctx, ref)
		if err != nil {
			return errors.Join(rbErr, err)
		}
		if cur == nil || cur.ImageID != rec.ImageID || cur.RollbackBy != c.node {
			return rbErr
		}
		if rbErr != nil {
			cur.RollbackErr = rbErr.Error()
		} else {
			cur.RolledBack, cur.RollbackErr = done, ""
		}
		if ok, err := c.put(ctx, ref, cur, rev); err != nil || ok {
			if rbErr == nil {
				c.log.Info("halted canary version rolled back", "ref", ref, "image", shortID(rec.ImageID), "result", done)
			}
			return errors.Join(rbErr, err)
		}
	}
	return errors.Join(rbErr, errCanaryChanged)
}

// release promotes the version of rec: the record, promoted, and the
// tag's trigger (naming the promotion as its source) in one transaction
// on the record's revision. ok is false when another writer changed the
// record first.
func (c *canaries) release(ctx context.Context, ref string, rec *canaryRecord, rev int64, how, by string) (bool, error) {
	tagged, err := storedRef(ref)
	if err != nil {
		return false, err
	}
	now := c.now().UTC()
	rec.Phase, rec.Since, rec.Reason, rec.By = phasePromoted, now, how, by
	t := trigger{Time: now, Tag: tagged.Tag(), Digest: rec.Digest, Source: "promote", Node: c.node}
	tb, _ := json.Marshal(t)
	name := c.triggerName(ctx, tagged, rec.Revision)
	ok, err := c.put(ctx, ref, rec, rev, clientv3.OpPut(triggerKey(name), string(tb)))
	if ok {
		c.log.Info("canary version promoted", "ref", ref, "image", shortID(rec.ImageID), "how", how, "by", by)
		c.announce.say(fmt.Sprintf(":rocket: %s %s promoted (%s, by %s): every node deploys it now", ref, shortID(rec.ImageID), how, by))
	}
	return ok, err
}

// triggerName is the repository of the trigger key the version came by
// (its revision), so that the release rewrites that key; else ref's
// repository with its registry host.
func (c *canaries) triggerName(ctx context.Context, ref reference.NamedTagged, rev int64) string {
	if rev > 0 {
		ctx, cancel := context.WithTimeout(ctx, c.callTimeout)
		defer cancel()
		resp, err := c.kv.Get(ctx, triggersPrefix, clientv3.WithPrefix(), clientv3.WithRev(rev),
			clientv3.WithMinModRev(rev), clientv3.WithMaxModRev(rev), clientv3.WithKeysOnly())
		if err == nil {
			for _, kv := range resp.Kvs {
				if repo, ok := repoFromKey(string(kv.Key)); ok {
					if named, err := resolveRepo(repo, c.domain); err == nil && named.Name() == ref.Name() {
						return repo
					}
				}
			}
		}
	}
	return ref.Name()
}

// canaryAnswer is what promote and abort answer.
type canaryAnswer struct {
	Image   string `json:"image"`
	ImageID string `json:"image_id"`
	Phase   string `json:"phase"`
	State   string `json:"state"`
	Changed bool   `json:"changed"` // false: it was so already (another promote won)
}

// promote releases the open canary rollout of image to every node.
// Promoting a version already promoted changes nothing and says so; two
// promotes at once write one release.
func (c *canaries) promote(ctx context.Context, image reference.NamedTagged, by string) (canaryAnswer, error) {
	return c.decide(ctx, image, phasePromoted, by)
}

// abort halts the open canary rollout of image and has the canaries
// rolled back (by the deployers, rollbackStep).
func (c *canaries) abort(ctx context.Context, image reference.NamedTagged, by string) (canaryAnswer, error) {
	return c.decide(ctx, image, phaseAborted, by)
}

func (c *canaries) decide(ctx context.Context, image reference.NamedTagged, to, by string) (canaryAnswer, error) {
	ref := image.String()
	for range 10 {
		rec, rev, err := c.get(ctx, ref)
		if err != nil {
			return canaryAnswer{}, err
		}
		if rec == nil {
			return canaryAnswer{}, fmt.Errorf("%w of %s", errNoCanary, ref)
		}
		ans := canaryAnswer{Image: ref, ImageID: rec.ImageID, Phase: rec.Phase}
		if !rec.open() {
			ans.State = rec.state()
			if rec.Phase == to {
				return ans, nil
			}
			return ans, fmt.Errorf("%w: %s %s is %s", errCanaryOver, ref, shortID(rec.ImageID), rec.Phase)
		}
		var ok bool
		if to == phasePromoted {
			ok, err = c.release(ctx, ref, rec, rev, "deployer promote", by)
		} else {
			now := c.now().UTC()
			rec.Phase, rec.Since, rec.Reason, rec.By = phaseAborted, now, "aborted by "+by, by
			h := halt{ImageID: rec.ImageID, Node: c.node, Reason: rec.Reason, Time: now}
			hb, _ := json.Marshal(h)
			if ok, err = c.put(ctx, ref, rec, rev, clientv3.OpPut(haltKey(ref), string(hb))); ok {
				c.log.Warn("canary rollout aborted", "ref", ref, "image", shortID(rec.ImageID), "by", by)
				c.announce.say(fmt.Sprintf(":x: %s %s HALTED: %s; rolling the canaries back to %s", ref, shortID(rec.ImageID), rec.Reason, shortID(rec.Previous)))
			}
		}
		if err != nil {
			return canaryAnswer{}, err
		}
		if ok {
			ans.Phase, ans.State, ans.Changed = rec.Phase, rec.state(), true
			return ans, nil
		}
	}
	return canaryAnswer{}, errCanaryChanged
}

// storedRef reads an image ref as the records store it (canonical).
func storedRef(ref string) (reference.NamedTagged, error) {
	named, err := reference.ParseNamed(ref)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", errBadReference, ref, err)
	}
	tagged, ok := named.(reference.NamedTagged)
	if !ok {
		return nil, fmt.Errorf("%w: %s: no tag", errBadReference, ref)
	}
	return tagged, nil
}
