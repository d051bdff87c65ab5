package main

// autorollback.go: a halt rolls its tag back by itself (-auto_rollback;
// README, Rolling back by itself). When a version's rollout halts (a
// replacement ran and failed, rollout.go recordHalt), the tag goes back
// to the version that ran before it, the newest earlier version of the
// ledger that rolled out, through the rollbacker of deployer rollback:
// the old manifest back under the tag in the registry, then the trigger
// and the ledger records in one transaction. The halting node's
// supervisor then pulls and runs the old version, and every node rolls
// it out as a deploy.
//
// Once for the fleet: every node watches the halt records. The node that
// wrote the halt acts at once; another node acts only if the halt is
// still not rolled back after takeover (the halting node died first).
// Whoever acts first takes the tag's claim key, under its session lease,
// in a transaction that compares the halt record it read and the claim
// key's absence: only the claim's holder rolls back, and it rolls back
// only a halted version that is still the ledger's newest and not
// rolled back already. A claim whose holder dies goes with its lease,
// and the next node takes it. What cannot be rolled back (no earlier
// version, a registry that refuses the write, a newer push meanwhile) is
// said in one line and the claim stays, marked, so that no other node
// says it again while its holder lives; the halt stays as without
// -auto_rollback.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/distribution/reference"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/backoff"
)

// autoRollbackClaim is the value of a tag's claim key (etcd.go).
type autoRollbackClaim struct {
	Node    string    `json:"node"`
	HaltRev int64     `json:"halt_revision"` // the halt record's ModRevision when claimed
	Image   string    `json:"image_id"`      // the halted version
	Time    time.Time `json:"time"`
	// GaveUp says why the halt is not rolled back; such a claim stays
	// (with its holder's lease) so that no other node tries again.
	GaveUp string `json:"gave_up,omitempty"`
}

// autoRollbackEtcd is the part of the etcd client the auto-rollback uses.
type autoRollbackEtcd interface {
	clientv3.KV
	clientv3.Watcher
}

// autoRollback rolls halted versions back.
type autoRollback struct {
	kv          clientv3.KV
	watcher     clientv3.Watcher
	leases      sessions
	rb          *rollbacker
	ledger      *ledger
	node        string
	takeover    time.Duration // how long another node leaves the halting node to roll back
	ledgerWait  time.Duration // how long to wait for the halted version in the ledger
	poll        time.Duration // how often the ledger is read meanwhile
	attempts    int           // rollbacks tried per halt before giving up
	retryBase   time.Duration
	callTimeout time.Duration
	log         *slog.Logger

	mu      sync.Mutex
	active  map[string]bool // tags being handled; true: their halt record changed since the handler began
	wg      sync.WaitGroup
	handled atomic.Int64 // halts handled to the end (tests wait on it)
}

// newAutoRollback returns the auto-rollback of node through rb, its
// claims held under leases' sessions. It starts nothing.
func newAutoRollback(cli autoRollbackEtcd, leases sessions, rb *rollbacker, l *ledger, node string, log *slog.Logger) *autoRollback {
	return &autoRollback{
		kv: cli, watcher: cli, leases: leases, rb: rb, ledger: l, node: node,
		takeover: sessionTTL * time.Second, ledgerWait: 15 * time.Second, poll: 250 * time.Millisecond,
		attempts: 5, retryBase: time.Second, callTimeout: callTimeout, log: log, active: map[string]bool{},
	}
}

// run watches the halt records until ctx is done, then waits for the
// rollbacks under way (each bounded by its calls' deadlines).
func (a *autoRollback) run(ctx context.Context) error {
	defer a.wg.Wait()
	for attempt := 1; ; attempt++ {
		err := a.watchHalts(ctx)
		if ctx.Err() != nil {
			return nil
		}
		a.log.Warn("watching the halt records failed; watching again", "err", err)
		if !backoff.Sleep(ctx, backoff.Delay(a.retryBase, min(attempt, 6))) {
			return nil
		}
	}
}

// watchHalts reads the halt records there are, then watches for new ones.
// It reads and watches haltsPrefix alone: no slot, queue or down record
// of any rollout reaches it.
func (a *autoRollback) watchHalts(ctx context.Context) error {
	gctx, cancel := context.WithTimeout(ctx, a.callTimeout)
	resp, err := a.kv.Get(gctx, haltsPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	cancel()
	if err != nil {
		return fmt.Errorf("read the halt records: %w", err)
	}
	for _, kv := range resp.Kvs {
		a.consider(ctx, string(kv.Key))
	}
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	for wr := range a.watcher.Watch(wctx, haltsPrefix, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1),
		clientv3.WithFilterDelete()) {
		if err := wr.Err(); err != nil {
			return err
		}
		for _, ev := range wr.Events {
			a.consider(ctx, string(ev.Kv.Key))
		}
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return errors.New("the watch ended")
}

// consider starts handling the halt of the tag whose key changed, unless
// it is handled already (the handler reads the newest record).
func (a *autoRollback) consider(ctx context.Context, key string) {
	ref, ok := refFromHaltKey(key)
	if !ok {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.active[ref]; ok {
		// The handler reads the record again before it ends: a halt
		// written after its last read is not missed.
		a.active[ref] = true
		return
	}
	a.active[ref] = false
	a.wg.Go(func() {
		for {
			a.handle(ctx, ref)
			a.handled.Add(1)
			a.mu.Lock()
			again := a.active[ref] && ctx.Err() == nil
			if again {
				a.active[ref] = false
			} else {
				delete(a.active, ref)
			}
			a.mu.Unlock()
			if !again {
				return
			}
		}
	})
}

// claimState is what handle reads in one transaction.
type claimState struct {
	halt     *halt
	haltRev  int64
	claim    *autoRollbackClaim
	claimRev int64 // 0: no claim
}

func (a *autoRollback) read(ctx context.Context, ref string) (claimState, error) {
	ctx, cancel := context.WithTimeout(ctx, a.callTimeout)
	defer cancel()
	resp, err := a.kv.Txn(ctx).Then(clientv3.OpGet(haltKey(ref)), clientv3.OpGet(autoRollbackKey(ref))).Commit()
	if err != nil {
		return claimState{}, fmt.Errorf("read the halt of %s: %w", ref, err)
	}
	var st claimState
	if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
		st.halt, st.haltRev = decodeHalt(kvs), kvs[0].ModRevision
	}
	if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 {
		var c autoRollbackClaim
		if json.Unmarshal(kvs[0].Value, &c) == nil {
			st.claim = &c
		}
		st.claimRev = kvs[0].ModRevision
	}
	return st, nil
}

// handle rolls the halt of ref back, or leaves it to the node that holds
// its claim, until the halt is gone or rolled back (by anyone) or given
// up.
func (a *autoRollback) handle(ctx context.Context, ref string) {
	takeoverAt := time.Now().Add(a.takeover)
	for attempt := 1; ctx.Err() == nil; {
		st, err := a.read(ctx, ref)
		if err != nil {
			a.log.Warn("auto-rollback: reading the halt failed; trying again", "image", ref, "err", err)
			backoff.Sleep(ctx, backoff.Delay(a.retryBase, min(attempt, 6)))
			attempt++
			continue
		}
		h := st.halt
		switch {
		case h == nil:
			return // cleared: a newer version rolled out
		case st.claim != nil && st.claim.GaveUp != "" && st.claim.HaltRev == st.haltRev:
			return // said once already, by the claim's holder
		case st.claim != nil && st.claim.GaveUp == "":
			// Another node (or this one, before a restart) is on it:
			// wait until its claim goes (done, or its lease expired).
			a.waitChange(ctx, autoRollbackKey(ref), st.claimRev, max(a.takeover, time.Second))
			continue
		case h.Node != a.node && time.Now().Before(takeoverAt):
			// The halting node rolls back; the others only if it did
			// not live to. A halt this node writes meanwhile is its own
			// at once.
			a.waitChange(ctx, haltKey(ref), st.haltRev, time.Until(takeoverAt))
			continue
		}
		lease, ok := a.claim(ctx, ref, st)
		if !ok {
			continue // the halt or the claim changed meanwhile: read again
		}
		gaveUp, err := a.rollBack(ctx, ref, h)
		switch {
		case err != nil && attempt < a.attempts && ctx.Err() == nil:
			a.log.Warn("auto-rollback failed; trying again", "image", ref, "attempt", attempt, "err", err)
			a.unclaim(ctx, ref, lease)
			backoff.Sleep(ctx, backoff.Delay(a.retryBase, attempt))
			attempt++
			continue
		case err != nil:
			a.log.Error("auto-rollback: not rolled back", "image", ref, "halted_image", shortID(h.ImageID), "attempts", attempt, "err", err)
			gaveUp = err.Error()
		}
		if gaveUp == "" {
			a.unclaim(ctx, ref, lease)
			return
		}
		a.giveUp(ctx, ref, st.haltRev, h, lease, gaveUp)
		return
	}
}

// waitChange waits until key changes after rev, at most d (a safety net
// against a lost watch), or ctx ends.
func (a *autoRollback) waitChange(ctx context.Context, key string, rev int64, d time.Duration) {
	wctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	select {
	case <-a.watcher.Watch(clientv3.WithRequireLeader(wctx), key, clientv3.WithRev(rev+1)):
	case <-wctx.Done():
	}
}

// claim takes ref's claim under this node's session if the halt record
// and the claim key are still as read; it returns the claim's lease, and whether it took the claim.
func (a *autoRollback) claim(ctx context.Context, ref string, st claimState) (clientv3.LeaseID, bool) {
	sess, err := a.leases.Current(ctx)
	if err != nil {
		a.log.Warn("auto-rollback: no etcd session", "image", ref, "err", err)
		backoff.Sleep(ctx, a.retryBase)
		return 0, false
	}
	b, _ := json.Marshal(autoRollbackClaim{Node: a.node, HaltRev: st.haltRev, Image: st.halt.ImageID, Time: time.Now().UTC()})
	key := autoRollbackKey(ref)
	tctx, cancel := context.WithTimeout(ctx, a.callTimeout)
	defer cancel()
	resp, err := a.kv.Txn(tctx).If(
		clientv3.Compare(clientv3.ModRevision(haltKey(ref)), "=", st.haltRev),
		clientv3.Compare(clientv3.ModRevision(key), "=", st.claimRev),
	).Then(clientv3.OpPut(key, string(b), clientv3.WithLease(sess.Lease()))).Commit()
	switch {
	case errors.Is(err, rpctypes.ErrLeaseNotFound):
		a.leases.Drop(sess)
		return 0, false
	case err != nil:
		a.log.Warn("auto-rollback: claiming the halt failed", "image", ref, "err", err)
		backoff.Sleep(ctx, a.retryBase)
		return 0, false
	}
	return sess.Lease(), resp.Succeeded
}

// unclaim deletes ref's claim if this node's lease still holds it.
func (a *autoRollback) unclaim(ctx context.Context, ref string, lease clientv3.LeaseID) {
	key := autoRollbackKey(ref)
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), a.callTimeout)
	defer cancel()
	if _, err := a.kv.Txn(dctx).If(clientv3.Compare(clientv3.LeaseValue(key), "=", lease)).Then(clientv3.OpDelete(key)).Commit(); err != nil {
		a.log.Warn("auto-rollback: could not free the claim; it goes with the node's lease", "image", ref, "err", err)
	}
}

// giveUp marks ref's claim as given up for this halt, with why.
func (a *autoRollback) giveUp(ctx context.Context, ref string, haltRev int64, h *halt, lease clientv3.LeaseID, why string) {
	b, _ := json.Marshal(autoRollbackClaim{Node: a.node, HaltRev: haltRev, Image: h.ImageID, Time: time.Now().UTC(), GaveUp: why})
	key := autoRollbackKey(ref)
	pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), a.callTimeout)
	defer cancel()
	if _, err := a.kv.Txn(pctx).If(clientv3.Compare(clientv3.LeaseValue(key), "=", lease)).
		Then(clientv3.OpPut(key, string(b), clientv3.WithLease(lease))).Commit(); err != nil {
		a.log.Warn("auto-rollback: could not mark the claim", "image", ref, "err", err)
	}
}

// rollBack rolls the halted version h of ref back, under the claim. It
// returns why it will not (gaveUp, said in one line) or a failure worth
// another attempt; both empty when the tag is rolled back, by this call
// or an earlier one.
func (a *autoRollback) rollBack(ctx context.Context, ref string, h *halt) (gaveUp string, err error) {
	named, err := reference.ParseNamed(ref)
	if err != nil {
		return "image " + ref + ": " + err.Error(), nil
	}
	ready, err := a.haltedVersion(ctx, ref, named.Name(), h)
	if err != nil || !ready {
		return "", err
	}
	cause := "halted by " + h.Node + ": " + h.Reason
	res, err := a.rb.rollback(ctx, rollbackRequest{Image: ref, halted: h.ImageID},
		askedBy{Source: "auto-rollback", Command: "auto-rollback", Host: a.node, Node: a.node, Cause: truncate(cause, 300)})
	switch {
	case err == nil:
		a.log.Warn("rolled back by itself after a halt", "image", ref, "halted_image", shortID(h.ImageID),
			"from_version", res.FromVersion, "to_version", res.ToVersion, "image_id", shortID(res.ImageID), "digest", res.Digest,
			"version", res.Version, "halt", cause)
		return "", nil
	case errors.Is(err, errLedgerConflict):
		return "", nil // a newer version came, or another rollback: nothing to undo
	case errors.Is(err, errRegistryRefused), errors.Is(err, errLedgerTarget), errors.Is(err, errTagMoved), errors.Is(err, errUsage):
		// One clear line; the halt stays as without -auto_rollback.
		a.log.Error("auto-rollback: not done", "image", ref, "halted_image", shortID(h.ImageID), "err", err)
		return err.Error(), nil
	}
	return "", err
}

// haltedVersion waits (within ledgerWait) until the ledger records h's
// version, and reports whether it is the newest and not rolled back yet.
// A version still not recorded then (its node died before its ledger
// write) is recorded here, as its node's failure, unless the halt is
// older than the ledger's newest version (a stale halt record).
func (a *autoRollback) haltedVersion(ctx context.Context, ref, repo string, h *halt) (bool, error) {
	deadline := time.Now().Add(a.ledgerWait)
	recorded := false
	for {
		rctx, cancel := context.WithTimeout(ctx, a.callTimeout)
		hist, err := readHistory(rctx, a.kv, historyFilter{name: repo, tag: tagOf(ref), bare: true}, time.Now())
		cancel()
		if err != nil {
			return false, fmt.Errorf("read the deploy ledger of %s: %w", ref, err)
		}
		var versions []ledgerVersion
		if len(hist.Tags) > 0 {
			versions = hist.Tags[0].Versions
		}
		for i, v := range versions {
			if v.ImageID == h.ImageID {
				// Newest and not rolled back: to do. Else a rollback or
				// a newer version came after it: done.
				return i == 0 && v.Outcome != outcomeRolledBack, nil
			}
		}
		if len(versions) > 0 && versions[0].Pushed.After(h.Time) {
			// A halt older than the newest version, of an image the
			// ledger no longer (or never) had: stale, nothing to undo.
			return false, nil
		}
		if time.Now().After(deadline) {
			if recorded || a.ledger == nil {
				return false, fmt.Errorf("the halted version %s of %s is not in the deploy ledger", shortID(h.ImageID), ref)
			}
			recorded = true
			if err := a.ledger.apply(ctx, ledgerEntry{Ref: ref, Repo: repo, ImageID: h.ImageID, Seen: h.Time, Time: h.Time,
				Failed: h.Reason, Node: h.Node}); err != nil {
				return false, fmt.Errorf("record the halted version %s of %s: %w", shortID(h.ImageID), ref, err)
			}
			continue
		}
		if !backoff.Sleep(ctx, a.poll) {
			return false, ctx.Err()
		}
	}
}
