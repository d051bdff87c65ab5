package main

// holdops.go: what deployer freeze, thaw and deploy -now (and their API)
// do in etcd: a freeze record written; a thaw deleting it and releasing,
// in the same transaction, every waiting version nothing else holds; a
// deploy -now writing the tag's trigger as a once-only override.

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/distribution/reference"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// errNoFreeze: a thaw of a scope that is not frozen.
var errNoFreeze = errors.New("not frozen")

// holdOps runs freezes, thaws and deploy -now.
type holdOps struct {
	kv             clientv3.KV // confined to -etcd_prefix
	holds          *holds      // reads the state, decides what is still held
	registryDomain string      // where bare names live (-registry)
	now            func() time.Time
}

// newHoldOps returns the operations on kv, with the flags' policy
// (base) under the policy records. It starts nothing.
func newHoldOps(kv holdsEtcd, base rolloutPolicy, registryDomain string, log *slog.Logger) *holdOps {
	return &holdOps{kv: kv, holds: newHolds(kv, newPolicies(kv, base), nil, nil, "", log), registryDomain: registryDomain, now: time.Now}
}

// freezeRequest is the body of POST /api/freeze and what deployer freeze
// asks; a thaw takes Scope alone.
type freezeRequest struct {
	Scope  string `json:"scope,omitempty"` // repository or repository:tag; "": every image
	Until  string `json:"until,omitempty"` // RFC 3339 time, or a duration from now ("2h")
	Reason string `json:"reason,omitempty"`
}

// parseUntil reads -until: an RFC 3339 time, "2026-12-24 18:00" (UTC), or
// a duration from now.
func parseUntil(s string, now time.Time) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if d, err := time.ParseDuration(s); err == nil && d > 0 {
		return now.Add(d), nil
	}
	for _, layout := range []string{time.RFC3339, "2006-01-02 15:04", time.DateTime} {
		if t, err := time.Parse(layout, s); err == nil {
			return t, nil
		}
	}
	return time.Time{}, fmt.Errorf("%w: -until %q: want an RFC 3339 time, \"2006-01-02 15:04\" (UTC) or a duration such as 2h", errUsage, s)
}

// freeze writes the freeze of req's scope (replacing one of the same
// scope: a new -until or reason).
func (o *holdOps) freeze(ctx context.Context, req freezeRequest, by string) (freezeRecord, error) {
	scope, err := parseScope(req.Scope, o.registryDomain)
	if err != nil {
		return freezeRecord{}, err
	}
	now := o.now().UTC()
	until, err := parseUntil(req.Until, now)
	if err != nil {
		return freezeRecord{}, err
	}
	if !until.IsZero() && !until.After(now) {
		return freezeRecord{}, fmt.Errorf("%w: -until %s has passed", errUsage, until.Format(time.RFC3339))
	}
	f := freezeRecord{Scope: scope, Since: now, Until: until.UTC(), Reason: req.Reason, By: by}
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	resp, err := o.kv.Get(ctx, freezeKey(scope))
	if err != nil {
		return freezeRecord{}, fmt.Errorf("read the freeze: %w", err)
	}
	if prev := decodeFreezes(resp.Kvs); len(prev) > 0 && prev[0].active(now) {
		f.Since = prev[0].Since // frozen again: frozen since the first
	}
	b, _ := json.Marshal(f)
	if _, err := o.kv.Put(ctx, freezeKey(scope), string(b)); err != nil {
		return freezeRecord{}, fmt.Errorf("write the freeze: %w", err)
	}
	return f, nil
}

// thawResult is what a thaw did.
type thawResult struct {
	Scope    string   `json:"scope"`
	Released []string `json:"released"`       // image tags whose waiting version deploys now
	Held     []string `json:"held,omitempty"` // waiting versions something else still holds, with why
}

// thaw deletes the freeze of scope and, in the same transaction, releases
// every waiting version that nothing else holds: their triggers are
// written again, so every node deploys them now, asked by by (its
// Source, "thaw" when empty, its Node and Remote: the ledger's asker).
func (o *holdOps) thaw(ctx context.Context, scopeArg string, by askedBy) (thawResult, error) {
	scope, err := parseScope(scopeArg, o.registryDomain)
	if err != nil {
		return thawResult{}, err
	}
	for range 5 {
		st, err := o.holds.read(ctx)
		if err != nil {
			return thawResult{}, err
		}
		res := thawResult{Scope: scope, Released: []string{}}
		var this *freezeRecord
		var rest []freezeRecord
		for i, f := range st.freezes {
			if f.Scope == scope {
				this = &st.freezes[i]
			} else {
				rest = append(rest, f)
			}
		}
		if this == nil {
			return res, fmt.Errorf("%w: %s", errNoFreeze, displayScope(scope))
		}
		now := o.now()
		cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(freezeKey(scope)), "=", this.rev)}
		ops := []clientv3.Op{clientv3.OpDelete(freezeKey(scope))}
		for _, w := range st.waiting {
			named, err := reference.ParseNamed(w.Ref)
			tagged, ok := named.(reference.NamedTagged)
			if err != nil || !ok {
				continue
			}
			if why := holdReason(rest, o.holds.policyOf(st, w.Ref), tagged, now); why != "" {
				res.Held = append(res.Held, reference.FamiliarString(tagged)+": "+why)
				continue
			}
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(waitingKey(w.Ref)), "=", w.rev))
			ops = append(ops, releaseOps(w, cmp.Or(by.Source, "thaw"), by.Node, by.Remote, now)...)
			res.Released = append(res.Released, reference.FamiliarString(tagged))
		}
		tctx, cancel := context.WithTimeout(ctx, callTimeout)
		tr, err := o.kv.Txn(tctx).If(cmps...).Then(ops...).Commit()
		cancel()
		if err != nil {
			return thawResult{}, fmt.Errorf("thaw: %w", err)
		}
		if tr.Succeeded {
			return res, nil
		}
	}
	return thawResult{}, errors.New("thaw: the freezes keep changing; try again")
}

// displayScope is a scope as people write it.
func displayScope(scope string) string {
	if scope == freezeAll {
		return "every image"
	}
	return reference.FamiliarString(mustNamed(scope))
}

// deployNowResult is what deploy -now did.
type deployNowResult struct {
	Image    string `json:"image"`
	ImageID  string `json:"image_id,omitempty"` // the waiting version it deploys, when one waited
	Digest   string `json:"digest,omitempty"`
	Held     string `json:"held,omitempty"` // what it goes past, when anything
	Revision int64  `json:"revision"`
}

// deployNow writes the trigger of image (repository:tag) as a deploy
// -now: every node deploys what the registry's tag names (the waiting
// version's digest, when one waits) past any freeze or closed window,
// once; the waiting record goes in the same transaction.
func (o *holdOps) deployNow(ctx context.Context, image, remote, node string) (deployNowResult, error) {
	ref, err := parseRollbackImage(image, o.registryDomain)
	if err != nil {
		return deployNowResult{}, err
	}
	for range 5 {
		st, err := o.holds.read(ctx)
		if err != nil {
			return deployNowResult{}, err
		}
		now := o.now()
		res := deployNowResult{Image: ref.String(), Held: holdReason(st.freezes, o.holds.policyOf(st, ref.String()), ref, now)}
		t := trigger{Time: now.UTC(), Tag: ref.Tag(), Source: sourceNow, Remote: remote, Node: node}
		key := waitingKey(ref.String())
		cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", 0)}
		var ops []clientv3.Op
		for _, w := range st.waiting {
			if w.Ref == ref.String() {
				t.Digest, res.ImageID, res.Digest = w.Digest, w.ImageID, w.Digest
				cmps = []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", w.rev)}
				ops = append(ops, clientv3.OpDelete(key))
			}
		}
		b, _ := json.Marshal(t)
		ops = append(ops, clientv3.OpPut(triggerKey(ref.Name()), string(b)))
		tctx, cancel := context.WithTimeout(ctx, callTimeout)
		tr, err := o.kv.Txn(tctx).If(cmps...).Then(ops...).Commit()
		cancel()
		if err != nil {
			return deployNowResult{}, fmt.Errorf("deploy -now: %w", err)
		}
		if tr.Succeeded {
			res.Revision = tr.Header.Revision
			return res, nil
		}
	}
	return deployNowResult{}, errors.New("deploy -now: the waiting version keeps changing; try again")
}
