package main

// tagstate.go: the deploy state of each image tag in the cluster view
// (deployer status, GET /api/status): rolling out, halted, rolled back
// (to which version), pinned (to which version, by whom), read from the
// deploy ledger and the pins.

import (
	"cmp"
	"context"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// tagState is a tag's deploy state.
type tagState struct {
	State   string     `json:"state,omitempty"` // "rolling out version 4", "halted: version 4 (…)", "rolled back from version 3 to version 1 (…)"
	Version int64      `json:"version,omitempty"`
	Pinned  *pinRecord `json:"pinned,omitempty"`
}

// readTagStates reads the state of every tag that has a ledger or a pin.
func readTagStates(ctx context.Context, kv clientv3.KV) (map[string]tagState, error) {
	h, err := readHistory(ctx, kv, historyFilter{bare: true}, time.Time{})
	if err != nil {
		return nil, err
	}
	pins, err := readPins(ctx, kv)
	if err != nil {
		return nil, err
	}
	out := map[string]tagState{}
	for _, t := range h.Tags {
		out[t.Image] = tagState{State: ledgerState(t.Versions), Version: t.Versions[0].Version}
	}
	for ref, p := range pins {
		st := out[ref]
		st.Pinned = &p
		out[ref] = st
	}
	return out, nil
}

// ledgerState says where a tag's newest version (versions newest first)
// stands: "" when it rolled out.
func ledgerState(versions []ledgerVersion) string {
	if len(versions) == 0 {
		return ""
	}
	v := versions[0]
	if v.AskedBy.Source == "rollback" && len(versions) > 1 {
		to := ""
		for _, o := range versions[1:] {
			if o.ImageID == v.ImageID {
				to = fmt.Sprintf("version %d's image", o.Version)
				break
			}
		}
		s := fmt.Sprintf("rolled back from version %d to %s (%s)", versions[1].Version, cmp.Or(to, "image"), shortID(v.ImageID))
		if v.Outcome == outcomeRollingOut {
			s += ", rolling out"
		}
		return s
	}
	switch v.Outcome {
	case outcomeRollingOut:
		return fmt.Sprintf("rolling out version %d (%s)", v.Version, shortID(v.ImageID))
	case outcomeHalted:
		return fmt.Sprintf("halted: version %d (%s)", v.Version, shortID(v.ImageID))
	case outcomeHeld:
		return fmt.Sprintf("version %d (%s) %s", v.Version, shortID(v.ImageID), v.Held)
	}
	return ""
}
