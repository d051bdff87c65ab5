package main

// trigger.go: the trigger record, the JSON value a webhook writes at a
// trigger key (etcd.go) and the watcher reads back.

import (
	"encoding/json"
	"slices"
	"time"
)

// trigger is the JSON value the daemon writes at a trigger key. Any other
// value is accepted and means "every local tag".
type trigger struct {
	Time   time.Time `json:"time"`
	Tag    string    `json:"tag,omitempty"`
	Source string    `json:"source"`         // "dockerhub", "registry", "api", "harbor", "github" or "quay"
	Node   string    `json:"node,omitempty"` // the node that took the webhook
	Digest string    `json:"digest,omitempty"`
	// One registry envelope may push several tags of one repository; its
	// single write names them all here, with Tag empty (so that a
	// deployer that predates Tags deploys every local tag: a superset).
	Tags    []string          `json:"tags,omitempty"`
	Digests map[string]string `json:"digests,omitempty"` // tag -> manifest digest, with Tags
}

// parseTrigger reads a trigger value; it returns the tags to deploy, nil
// meaning every local tag, and the manifest digest pushed for each tag,
// where the trigger gives one.
func parseTrigger(value []byte) ([]string, map[string]string) {
	var t trigger
	if err := json.Unmarshal(value, &t); err != nil {
		return nil, nil
	}
	switch {
	case t.Tag != "":
		if t.Digest != "" {
			return []string{t.Tag}, map[string]string{t.Tag: t.Digest}
		}
		return []string{t.Tag}, nil
	case len(t.Tags) > 0:
		var digests map[string]string
		for _, tag := range t.Tags {
			if d := t.Digests[tag]; d != "" {
				if digests == nil {
					digests = map[string]string{}
				}
				digests[tag] = d
			}
		}
		return slices.Clone(t.Tags), digests
	}
	return nil, nil
}
