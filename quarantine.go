package main

// quarantine.go: a version whose rollout halted or that was rolled back
// is quarantined fleet-wide, by image ID (README, Quarantine): no node
// deploys that image of the tag again, whatever brings it (a replayed
// webhook, the periodic re-pull, a node that restarts or joins), until a
// newer version is pushed or an operator deploys it explicitly (deployer
// rollback -to it, or a pin to it). The deploy ledger is the record: the
// quarantine is read from it, so it lives in etcd with the ledger and
// needs no key, no writer and no release of its own.

import (
	"context"
	"fmt"
	"time"

	"github.com/distribution/reference"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// quarantine answers whether an image of a tag is quarantined.
type quarantine struct {
	kv clientv3.KV // confined to -etcd_prefix
}

// hold says why imageID must not be deployed for ref ("": it may).
func (q *quarantine) hold(ctx context.Context, ref reference.NamedTagged, imageID string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	h, err := readHistory(ctx, q.kv, historyFilter{name: ref.Name(), tag: ref.Tag(), bare: true}, time.Time{})
	if err != nil {
		return "", fmt.Errorf("read the deploy ledger of %s: %w", ref, err)
	}
	if len(h.Tags) == 0 {
		return "", nil
	}
	v, ok := quarantinedBy(h.Tags[0].Versions, imageID)
	if !ok {
		return "", nil
	}
	return fmt.Sprintf("quarantined: version %d (%s) %s", v.Version, shortID(v.ImageID), v.Outcome), nil
}

// quarantinedBy finds, in versions (newest first), the version that
// quarantines image id: the newest version of id that halted or was
// rolled back, unless a newer version released it: another image pushed
// after it, or id deployed again by an operator (a rollback to it, a pin
// to it).
func quarantinedBy(versions []ledgerVersion, id string) (ledgerVersion, bool) {
	for _, v := range versions {
		switch {
		case v.ImageID == id && (v.Outcome == outcomeHalted || v.Outcome == outcomeRolledBack):
			return v, true
		case v.ImageID != id && pushed(v):
			return ledgerVersion{}, false // a newer version was pushed
		case v.ImageID == id && !pushed(v):
			return ledgerVersion{}, false // deployed again explicitly
		}
	}
	return ledgerVersion{}, false
}

// pushed reports whether v came from the registry (a push, or the
// re-pull finding one), not from an operator's rollback or pin.
func pushed(v ledgerVersion) bool {
	return v.AskedBy.Source != "rollback" && v.AskedBy.Source != "pin"
}
