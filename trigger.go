package main

// trigger.go: the trigger record, the JSON value a webhook writes at a
// trigger key (etcd.go) and the watcher reads back.

import (
	"encoding/json"
	"fmt"
	"slices"
	"time"
)

// trigger is the JSON value the daemon writes at a trigger key. Any other
// value is accepted and means "every local tag".
type trigger struct {
	Time   time.Time `json:"time"`
	Tag    string    `json:"tag,omitempty"`
	Source string    `json:"source"`           // "dockerhub", "registry", "api", "harbor", "github" or "quay"
	Node   string    `json:"node,omitempty"`   // the node that took the webhook
	Remote string    `json:"remote,omitempty"` // the sender's address (the deploy ledger's "asked by")
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

// imagePush is one image that a trigger source names: a repository as
// written (with its registry host when the sender gives one), a tag (empty:
// every local tag) and the manifest digest when the sender gives one.
type imagePush struct {
	Repo   string
	Tag    string
	Digest string
}

// checkPush is the one rule every trigger applies to a push by tag it is
// sent (README, Triggers): the repository is a valid repository name, with
// its registry host where the sender is a registry (hostRequired: every
// sender but Docker Hub and /api/deploy, whose bare names belong to
// -registry), and the tag is valid or, where the sender may name none,
// empty. A push that breaks it is refused with the whole delivery (400,
// nothing written): a 200 would show the sender a green delivery while
// nothing is deployed. Deliveries that are not a push by tag never get
// here; they answer 200 and write nothing. A digest that is not valid is
// dropped: the deploy does not need it.
func checkPush(p imagePush, hostRequired bool) (imagePush, error) {
	if err := checkRepoName(p.Repo); err != nil {
		return imagePush{}, err
	}
	if hostRequired && !hasDomain(p.Repo) {
		return imagePush{}, fmt.Errorf("%w: %q names no registry host (want host/repository)", errBadRepo, p.Repo)
	}
	if err := checkTag(p.Tag); err != nil {
		return imagePush{}, err
	}
	if checkDigest(p.Digest) != nil {
		p.Digest = ""
	}
	return p, nil
}
