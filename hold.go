package main

// hold.go: freezes and deploy windows hold a version back (README,
// Release policy). After the pull and before anything is stopped, each
// tag's new version is checked (holdReason, freeze.go): while a freeze
// covers the tag or its deploy windows are closed, nothing of it is
// stopped or re-created on this node, the local tag is put back on the
// version the node runs (so a unit that restarts a crashed container
// without pulling gets that one), and the version is recorded as waiting:
// a waiting record per tag in etcd (_waiting/<image ref>), and the reason
// on its version in the deploy ledger. The node that records a version
// first tells Slack, so the fleet says it once per version. A held deploy
// is not a failure and not a retry.
//
// The release is a trigger: thaw (and deploy -now) write the tag's
// trigger again in the transaction that changes the hold; a timed release
// (a freeze's -until passing, a window opening) is written by whichever
// node's run loop gets there first, in a transaction that compares the
// waiting record's ModRevision, so exactly one trigger is written. Every
// node, also one that restarted or joined meanwhile, then deploys the
// newest waiting version through the ordinary path.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/die-net/deployer/internal/etcdc"
	"github.com/distribution/reference"
	docker "github.com/fsouza/go-dockerclient"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// sourceNow is the trigger source of deploy -now: its version goes past
// a freeze or a closed window, once.
const sourceNow = "now"

// tagAPI puts a local tag back on an image.
type tagAPI interface {
	// TagImage tags image name as opts.Repo:opts.Tag (Force moves it).
	TagImage(name string, opts docker.TagImageOptions) error
}

// holdsEtcd is the part of the etcd client the holds use: reads and
// writes, and run's watch.
type holdsEtcd interface {
	clientv3.KV
	clientv3.Watcher
}

// holds decides, records and releases the holds of freezes and windows.
type holds struct {
	kv       clientv3.KV      // confined to -etcd_prefix
	watcher  clientv3.Watcher // run's watch of the freezes, waiting versions and policies
	policies *policies
	ledger   *ledger // nil records nothing
	images   tagAPI  // nil: the local tag is left where the pull put it
	node     string
	now      func() time.Time
	retry    time.Duration // run's backoff base after a failed pass or a broken watch
	log      *slog.Logger
	changed  func() // the waiting versions changed (the status record marks containers ahead); nil: none

	mu      sync.Mutex
	waiting map[string]waitingRecord // ref -> the version that waits, as last read
	warned  map[string]bool          // ref + image ID of containers ahead, logged once
	passed  map[string]string        // ref -> the image ID a deploy -now let past its hold
}

// newHolds returns the holds of node. It starts nothing.
func newHolds(kv holdsEtcd, ps *policies, led *ledger, images tagAPI, node string, log *slog.Logger) *holds {
	return &holds{
		kv: kv, watcher: kv, policies: ps, ledger: led, images: images, node: node, now: time.Now, retry: time.Second, log: log,
		waiting: map[string]waitingRecord{}, warned: map[string]bool{}, passed: map[string]string{},
	}
}

// holdState is what one read tells: the freezes and the policy records.
type holdState struct {
	rev     int64 // the revision read at
	freezes []freezeRecord
	waiting []waitingRecord
	def     policy
	tags    map[string]policy // ref -> its record
}

// read reads every freeze, waiting record and policy record in one
// transaction.
func (h *holds) read(ctx context.Context) (holdState, error) {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	resp, err := h.kv.Txn(ctx).Then(
		clientv3.OpGet(freezesPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(waitingsPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(policiesPrefix, clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return holdState{}, fmt.Errorf("read the freezes and policies: %w", err)
	}
	st := holdState{
		rev:     resp.Header.Revision,
		freezes: decodeFreezes(resp.Responses[0].GetResponseRange().Kvs),
		waiting: decodeWaiting(resp.Responses[1].GetResponseRange().Kvs),
		tags:    map[string]policy{},
	}
	for _, kv := range resp.Responses[2].GetResponseRange().Kvs {
		ref, ok := refFromPolicyKey(string(kv.Key))
		if !ok {
			continue
		}
		var rec policy
		if json.Unmarshal(kv.Value, &rec) != nil || rec.validate() != nil {
			continue
		}
		if ref == "" {
			st.def = rec
		} else {
			st.tags[ref] = rec
		}
	}
	return st, nil
}

// policyOf is the effective policy of ref in st.
func (h *holds) policyOf(st holdState, ref string) rolloutPolicy {
	return st.tags[ref].over(st.def.over(h.policies.base))
}

// holdTags checks each tag of current (tag -> the image ID it points at
// after the pull) and takes the held ones out of current and r.Tags: the
// deploy replaces nothing of them. before is what each tag pointed at
// before the pull. A check that cannot be made holds the tag and fails
// the deploy (retried): nothing is replaced without it.
func (h *holds) holdTags(ctx context.Context, repo reference.Named, j job, current map[string]string, r *report) {
	if h == nil {
		return
	}
	var rev int64
	if len(j.Revs) > 0 {
		rev = slices.Max(j.Revs)
	}
	for _, tag := range slices.Sorted(maps.Keys(current)) {
		ref, err := reference.WithTag(repo, tag)
		if err != nil {
			continue
		}
		i := slices.IndexFunc(r.Tags, func(t tagReport) bool { return t.Tag == tag })
		var before string
		if i >= 0 {
			before = r.Tags[i].OldID
		}
		id := current[tag]
		reason, first, err := h.hold(ctx, ref, id, before, j.Digests[tag], rev)
		if err == nil && reason == "" {
			continue
		}
		delete(current, tag)
		if i >= 0 {
			r.Tags = slices.Delete(r.Tags, i, i+1)
		}
		switch {
		case err != nil:
			r.Failed = append(r.Failed, err)
		case first: // recorded here first: the fleet tells it once
			r.Waiting = append(r.Waiting, fmt.Sprintf("%s %s → %s waits: %s", reference.FamiliarString(ref), shortID(before), shortID(id), reason))
		}
	}
}

// hold decides whether imageID, the new version of ref (before: what
// the tag pointed at before the pull), may replace containers here: ""
// when it may; else the reason, after recording the version as waiting
// (first: this node recorded it). rev is the newest trigger revision of
// the deploy: a deploy -now trigger goes past the hold. A tag that did
// not move is not held.
func (h *holds) hold(ctx context.Context, ref reference.NamedTagged, imageID, before, digest string, rev int64) (reason string, first bool, err error) {
	if imageID == before {
		return "", false, nil // nothing new: containers on an old image catch up
	}
	st, err := h.read(ctx)
	if err != nil {
		return "", false, err
	}
	now := h.now()
	if reason = holdReason(st.freezes, h.policyOf(st, ref.String()), ref, now); reason == "" {
		return "", false, nil
	}
	h.mu.Lock()
	passed := h.passed[ref.String()] == imageID
	h.mu.Unlock()
	if passed {
		return "", false, nil // the rest of a deploy -now
	}
	if rev > 0 {
		if t, ok := readTriggerAt(ctx, h.kv, rev, callTimeout); ok && t.Source == sourceNow && (t.Tag == "" || t.Tag == ref.Tag()) {
			who := "deploy -now"
			if t.Remote != "" {
				who += " from " + t.Remote
			}
			if err := h.ledger.mark(ctx, ledgerEntry{Ref: ref.String(), Repo: ref.Name(), ImageID: imageID, Digest: digest, Revision: rev,
				Time: now, Override: who + " over: " + reason}); err != nil {
				h.log.Warn("deploy -now not recorded in the ledger", "ref", ref.String(), "err", err)
			}
			h.mu.Lock()
			h.passed[ref.String()] = imageID
			h.mu.Unlock()
			h.log.Info("deploy -now goes past the hold", "ref", ref.String(), "image", shortID(imageID), "hold", reason)
			return "", false, nil
		}
	}
	h.putBack(ctx, ref, before, imageID)
	w := waitingRecord{Ref: ref.String(), Repo: ref.Name(), ImageID: imageID, Digest: digest, Reason: reason, Since: now.UTC(), Node: h.node}
	first, err = h.recordWaiting(ctx, w)
	if err != nil {
		return "", false, err
	}
	h.log.Info("version held", "ref", ref.String(), "image", shortID(imageID), "why", reason, "recorded_here", first)
	if !first {
		return reason, false, nil
	}
	if err := h.ledger.mark(ctx, ledgerEntry{Ref: ref.String(), Repo: ref.Name(), ImageID: imageID, Digest: digest, Revision: rev,
		Time: now, Held: reason}); err != nil {
		h.log.Warn("held version not recorded in the ledger", "ref", ref.String(), "err", err)
	}
	return reason, true, nil
}

// gate is asked just before each container is stopped or re-created: a
// freeze set, or a window closed, since the deploy's check holds the
// rest of the rollout, recorded as any hold (errHeld).
func (h *holds) gate(ctx context.Context, c staleContainer) error {
	reason, _, err := h.hold(ctx, c.Ref, c.NewID, c.ImageID, "", 0)
	switch {
	case err != nil:
		return fmt.Errorf("%w: cannot tell whether a freeze or window holds %s: %w", errHeld, c.Ref, err)
	case reason != "":
		return fmt.Errorf("%w: %s", errHeld, reason)
	}
	return nil
}

// putBack puts the local tag back on the image the node ran before the
// pull, so that whatever starts the tag without pulling (a unit that
// restarts a crashed container) starts that one; the new image stays,
// untagged, for a fast release.
func (h *holds) putBack(ctx context.Context, ref reference.NamedTagged, before, pulled string) {
	if h.images == nil || before == "" || before == pulled {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	err := h.images.TagImage(before, docker.TagImageOptions{Repo: ref.Name(), Tag: ref.Tag(), Force: true, Context: ctx})
	if err != nil {
		h.log.Warn("could not put the local tag back on the running version", "ref", ref.String(), "image", shortID(before), "err", err)
	}
}

// recordWaiting writes w as the waiting version of its tag unless that
// image already waits; first reports whether this call wrote it.
func (h *holds) recordWaiting(ctx context.Context, w waitingRecord) (first bool, err error) {
	key := waitingKey(w.Ref)
	for range 5 {
		gctx, cancel := context.WithTimeout(ctx, callTimeout)
		resp, err := h.kv.Get(gctx, key)
		cancel()
		if err != nil {
			return false, fmt.Errorf("read the waiting version of %s: %w", w.Ref, err)
		}
		var rev int64
		if old := decodeWaiting(resp.Kvs); len(old) > 0 {
			if old[0].ImageID == w.ImageID {
				return false, nil
			}
			rev = old[0].rev
		}
		b, _ := json.Marshal(w)
		tctx, cancel := context.WithTimeout(ctx, callTimeout)
		tr, err := h.kv.Txn(tctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).Then(clientv3.OpPut(key, string(b))).Commit()
		cancel()
		if err != nil {
			return false, fmt.Errorf("record the waiting version of %s: %w", w.Ref, err)
		}
		if tr.Succeeded {
			return true, nil
		}
	}
	return false, errors.New("record the waiting version: it keeps changing")
}

// run releases what is due until ctx is done: a pass (releaseDue) at
// once, then at the earliest of the next due time (a freeze's -until, a
// window that opens for a waiting version), a change of the freezes,
// waiting versions or policies (a watch), and dueTick. With nothing
// frozen and nothing waiting it reads nothing but on the tick.
func (h *holds) run(ctx context.Context) error {
	etcdc.DueLoop{
		Watcher: h.watcher, Prefixes: []string{freezesPrefix, waitingsPrefix, policiesPrefix}, Tick: dueTick, Retry: h.retry,
		Failed: func(err error) { h.log.Warn("checking the holds failed", "err", err) },
	}.Run(ctx, h.releaseDue)
	return nil
}

// releaseDue deletes the freezes whose -until passed and releases every
// waiting version nothing holds any more; it keeps the waiting records
// for the status view (ahead). It says when the next of these is due:
// the earliest -until of a freeze, and for each waiting version under a
// closed window, when its window opens.
func (h *holds) releaseDue(ctx context.Context) (etcdc.Pass, error) {
	st, err := h.read(ctx)
	if err != nil {
		return etcdc.Pass{}, err
	}
	h.remember(st.waiting)
	now := h.now()
	due := etcdc.DueAfter(now)
	var errs []error
	for _, f := range st.freezes {
		if f.active(now) {
			if !f.Until.IsZero() {
				due.At(f.Until)
			}
			continue
		}
		// Expired: whichever node gets here first deletes it.
		ctx, cancel := context.WithTimeout(ctx, callTimeout)
		tr, err := h.kv.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(freezeKey(f.Scope)), "=", f.rev)).Then(clientv3.OpDelete(freezeKey(f.Scope))).Commit()
		cancel()
		if err != nil {
			errs = append(errs, err)
		} else if tr.Succeeded {
			h.log.Info("freeze ended", "scope", f.Scope, "until", f.Until)
		}
	}
	for _, w := range st.waiting {
		ref, err := reference.ParseNamed(w.Ref)
		tagged, ok := ref.(reference.NamedTagged)
		if err != nil || !ok {
			continue
		}
		pol := h.policyOf(st, w.Ref)
		if holdReason(st.freezes, pol, tagged, now) != "" {
			if !pol.Windows.open(now) {
				due.At(pol.Windows.next(now)) // a freeze that holds it is due above, or thawed (the watch)
			}
			continue
		}
		released, err := releaseWaiting(ctx, h.kv, w, "release", h.node, now, nil)
		if err != nil {
			errs = append(errs, err)
		} else if released {
			h.log.Info("released a waiting version", "ref", w.Ref, "image", shortID(w.ImageID), "was", w.Reason)
		}
	}
	return etcdc.Pass{Rev: st.rev, Due: due.Wait()}, errors.Join(errs...)
}

// releaseWaiting writes w's tag's trigger again and deletes w, with ops,
// in one transaction that compares w's ModRevision: of two nodes (or a
// node and a thaw) releasing w at once, one writes the trigger. released
// is false when w had changed.
func releaseWaiting(ctx context.Context, kv clientv3.KV, w waitingRecord, source, node string, now time.Time, cmps []clientv3.Cmp, ops ...clientv3.Op) (bool, error) {
	cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(waitingKey(w.Ref)), "=", w.rev))
	ops = append(ops, releaseOps(w, source, node, "", now)...)
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	tr, err := kv.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		return false, fmt.Errorf("release %s: %w", w.Ref, err)
	}
	return tr.Succeeded, nil
}

// releaseOps are the operations of w's release: the trigger of its tag,
// naming its digest, and the waiting record's delete.
func releaseOps(w waitingRecord, source, node, remote string, now time.Time) []clientv3.Op {
	t := trigger{Time: now.UTC(), Tag: tagOf(w.Ref), Digest: w.Digest, Source: source, Node: node, Remote: remote}
	b, _ := json.Marshal(t)
	return []clientv3.Op{clientv3.OpPut(triggerKey(w.Repo), string(b)), clientv3.OpDelete(waitingKey(w.Ref))}
}

// remember keeps the waiting versions for ahead, and says when they
// changed.
func (h *holds) remember(ws []waitingRecord) {
	h.mu.Lock()
	old := maps.Clone(h.waiting)
	clear(h.waiting)
	for _, w := range ws {
		w.rev = 0
		h.waiting[w.Ref] = w
	}
	same := maps.Equal(old, h.waiting)
	h.mu.Unlock()
	if !same && h.changed != nil {
		h.changed()
	}
}

// ahead says, for a container of ref running imageID, why it runs a
// version it should not run yet ("" when it does not): the version waits
// under a hold. It logs each such version once.
func (h *holds) ahead(ref, imageID string) string {
	if h == nil {
		return ""
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	w, ok := h.waiting[ref]
	if !ok || w.ImageID != imageID {
		return ""
	}
	s := fmt.Sprintf("runs %s, which waits: %s", shortID(imageID), w.Reason)
	if k := ref + " " + imageID; !h.warned[k] {
		h.warned[k] = true
		h.log.Warn("a container runs a version that waits under a hold (does its unit pull the tag itself?)",
			"ref", ref, "image", shortID(imageID), "hold", w.Reason)
	}
	return s
}
