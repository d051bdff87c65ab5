package main

// haltrollback.go: the one way a halted version is rolled back by the
// deployers themselves (a canary that failed its bake, deployer abort):
// the registry's tag goes back to the previous version and the rollback
// is recorded in the deploy ledger with a trigger (rollback.go), so that
// every node deploys the previous version through the ordinary path.
// canary.go's rollbackStep claims it once for the fleet.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/distribution/reference"
)

// rollbackHalted returns the rollback of a halted version of ref to
// previous (an image ID in the tag's ledger; "": the newest earlier
// version that rolled out), run through rb on behalf of node. When no
// node has recorded the halted version in the ledger yet (an abort before
// a canary converged), the ledger's newest version is the previous one:
// the registry's tag is put back on it and a trigger written, with no
// new ledger version.
func rollbackHalted(rb *rollbacker, node string) haltRollback {
	return func(ctx context.Context, ref reference.NamedTagged, previous string) (string, error) {
		asked := askedBy{Command: "rollback of a halted version", Host: node, Node: node}
		res, err := rb.rollback(ctx, rollbackRequest{Image: ref.String(), To: previous}, asked)
		if err == nil {
			return fmt.Sprintf("rolled back to %s (ledger version %d)", shortID(res.ImageID), res.Version), nil
		}
		if errors.Is(err, errLedgerTarget) && previous != "" {
			if done, ok, rerr := retagNewest(ctx, rb, ref, previous, node); ok || rerr != nil {
				return done, rerr
			}
		}
		return "", fmt.Errorf("roll %s back to %s: %w", reference.FamiliarString(ref), shortID(previous), err)
	}
}

// retagNewest puts the registry's tag back on the ledger's newest version
// of ref when that is previous, and writes the tag's trigger (source
// rollback); ok is false when the newest version is another.
func retagNewest(ctx context.Context, rb *rollbacker, ref reference.NamedTagged, previous, node string) (string, bool, error) {
	rctx, cancel := context.WithTimeout(ctx, callTimeout)
	h, err := readHistory(rctx, rb.kv, historyFilter{name: ref.Name(), tag: ref.Tag(), bare: true}, rb.now())
	cancel()
	if err != nil || len(h.Tags) == 0 || len(h.Tags[0].Versions) == 0 {
		return "", false, err
	}
	v := h.Tags[0].Versions[0]
	if v.ImageID != previous || v.Digest == "" {
		return "", false, nil
	}
	if err := rb.retag(ctx, ref, v.Digest); err != nil {
		return "", true, fmt.Errorf("roll %s back to %s: %w", reference.FamiliarString(ref), shortID(previous), err)
	}
	t := trigger{Time: rb.now().UTC(), Tag: ref.Tag(), Digest: v.Digest, Source: "rollback", Node: node}
	b, _ := json.Marshal(t)
	wctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	if _, err := rb.kv.Put(wctx, triggerKey(rb.triggerName(ctx, ref, 0)), string(b)); err != nil {
		return "", true, fmt.Errorf("the registry's %s is %s again, but no trigger was written: %w", reference.FamiliarString(ref), shortDigest(v.Digest), err)
	}
	return fmt.Sprintf("rolled back to %s (the registry's tag; the ledger had not recorded the halted version)", shortID(previous)), true, nil
}
