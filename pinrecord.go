package main

// pinrecord.go: the pin record (README, Pins), as the gate, the cluster
// view and a rollback that falls back to a pin read and write it; pin.go
// pins and unpins.

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// pinRecord is the value of a tag's pinKey.
type pinRecord struct {
	Image   string    `json:"image"` // the tag, canonical
	Version int64     `json:"version"`
	ImageID string    `json:"image_id"`
	Digest  string    `json:"digest,omitempty"`
	AskedBy askedBy   `json:"asked_by"` // the command and host, or the API's remote address
	Time    time.Time `json:"time"`
	// Why, when the pin stands in for something (a rollback the registry
	// refused).
	Reason string `json:"reason,omitempty"`
}

// who says who asked for a pin, for people.
func (a askedBy) who() string {
	switch {
	case a.Command != "" && a.Node != "" && a.Remote != "": // the API
		return a.Command + " from " + a.Remote + " at " + a.Node
	case a.Command != "" && a.Host != "":
		return a.Command + " on " + a.Host
	case a.Command != "":
		return a.Command
	}
	return cmp.Or(a.Remote, a.Source)
}

// readPin reads ref's pin; nil when the tag is not pinned. rev is the
// key's ModRevision.
func readPin(ctx context.Context, kv clientv3.KV, ref string) (*pinRecord, int64, error) {
	resp, err := kv.Get(ctx, pinKey(ref))
	if err != nil {
		return nil, 0, fmt.Errorf("read the pin of %s: %w", ref, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, 0, nil
	}
	var p pinRecord
	if err := json.Unmarshal(resp.Kvs[0].Value, &p); err != nil {
		return nil, 0, fmt.Errorf("read the pin of %s: %w", ref, err)
	}
	return &p, resp.Kvs[0].ModRevision, nil
}

// readPins reads every pin, by image ref.
func readPins(ctx context.Context, kv clientv3.KV) (map[string]pinRecord, error) {
	resp, err := kv.Get(ctx, pinsPrefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("read the pins: %w", err)
	}
	out := map[string]pinRecord{}
	for _, kv := range resp.Kvs {
		var p pinRecord
		if json.Unmarshal(kv.Value, &p) == nil && p.Image != "" {
			out[p.Image] = p
		}
	}
	return out, nil
}

// stopStrategyContainers names, from the nodes' status records, the
// containers of ref replaced with the stop strategy ("node/container"):
// their supervisors start the tag, and one that pulls first undoes a pin.
func stopStrategyContainers(ctx context.Context, kv clientv3.KV, ref string) ([]string, error) {
	resp, err := kv.Get(ctx, statusPrefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("read the nodes' status: %w", err)
	}
	var out []string
	for _, kv := range resp.Kvs {
		var n nodeStatus
		if json.Unmarshal(kv.Value, &n) != nil {
			continue
		}
		for _, c := range n.Containers {
			if c.Image == ref && c.Strategy == strategyStop {
				out = append(out, n.Node+"/"+c.Name)
			}
		}
	}
	slices.Sort(out)
	return out, nil
}

// pinWarning is the line that names the containers whose supervisors may
// undo a pin; "" when there are none.
func pinWarning(image string, containers []string) string {
	if len(containers) == 0 {
		return ""
	}
	return fmt.Sprintf("warning: %s has containers under the stop strategy, started by their supervisors from the tag: %s; a supervisor that pulls the tag before it runs it (docker pull in ExecStartPre) starts the registry's version and undoes the pin for its container",
		familiar(image), strings.Join(containers, ", "))
}

// liftHalt is the delete of ref's halt record when it names imageID: an
// operator who deploys a halted version explicitly (a pin to it, a
// rollback to it) releases its quarantine, and the rollout's halt must
// not hold it either. None when the record names another image (the
// bad version a rollback goes back from keeps its halt).
func liftHalt(ctx context.Context, kv clientv3.KV, ref, imageID string) ([]clientv3.Op, error) {
	resp, err := kv.Get(ctx, haltKey(ref))
	if err != nil {
		return nil, fmt.Errorf("read the halt of %s: %w", ref, err)
	}
	if h := decodeHalt(resp.Kvs); h == nil || h.ImageID != imageID {
		return nil, nil
	}
	return []clientv3.Op{clientv3.OpDelete(haltKey(ref))}, nil
}
