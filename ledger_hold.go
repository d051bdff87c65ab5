package main

// ledger_hold.go: the deploy ledger's record of a version the gate held
// (gate.go): on the version, with the reason, written once per reason
// whichever node gets there first.

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	"github.com/distribution/reference"
	clientv3 "go.etcd.io/etcd/client/v3"
)

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
		if err != errLedgerConflict { //nolint:errorlint // applyHeldOnce returns it bare
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
		target.Held = e.Held
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
		AskedBy: asked, Nodes: map[string]nodeResult{}, Outcome: outcomeHeld, Held: e.Held,
	}
	b, _ := json.Marshal(v)
	cmps := []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(key), "=", 0)}
	if newest.Version > 0 {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(historyKey(e.Ref, newest.Version)), "=", newestRev))
	}
	ops := []clientv3.Op{clientv3.OpPut(key, string(b))}
	if oldest := next - l.keep + 1; oldest > 1 {
		ops = append(ops, clientv3.OpDelete(historyPrefix(e.Ref), clientv3.WithRange(historyKey(e.Ref, oldest))))
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
