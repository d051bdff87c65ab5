package main

// trigger_quay.go: Quay's repository-push notification.

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"slices"
)

// parseQuay reads Quay's "Repository Push" notification and returns one
// push per updated tag of docker_url (quay.io/namespace/repository, or the
// host of a Red Hat Quay install). updated_tags is a list of tags; early
// Quay sent a map of tag to image ID, which is accepted too (its image IDs
// are not manifest digests and are not recorded). Quay gives no digest.
// Every Quay notification names docker_url, so a body without one is an
// error; one without updated_tags (a build, mirror or vulnerability
// notification) is not a push and gives none; a push whose docker_url or
// tag breaks checkPush's rule is an error.
func parseQuay(body []byte) ([]imagePush, error) {
	var p struct {
		DockerURL   string          `json:"docker_url"`
		UpdatedTags json.RawMessage `json:"updated_tags"`
	}
	if err := json.Unmarshal(body, &p); err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	if p.DockerURL == "" {
		return nil, errors.New(`no "docker_url": not a Quay notification`)
	}
	var tags []string
	if len(p.UpdatedTags) > 0 && string(p.UpdatedTags) != "null" {
		if err := json.Unmarshal(p.UpdatedTags, &tags); err != nil {
			var byTag map[string]json.RawMessage
			if json.Unmarshal(p.UpdatedTags, &byTag) != nil {
				return nil, errors.New("updated_tags: neither a list of tags nor a map of tag to image")
			}
			tags = slices.Sorted(maps.Keys(byTag))
		}
	}
	var out []imagePush
	for _, t := range tags {
		if t == "" {
			continue
		}
		push, err := checkPush(imagePush{Repo: p.DockerURL, Tag: t}, true)
		if err != nil {
			return nil, fmt.Errorf("docker_url %q, updated_tags %q: %w", p.DockerURL, t, err)
		}
		out = append(out, push)
	}
	return dedupe(out), nil
}

// POST /api/quay/webhook?token=<secret>
//
// Quay's Repository Push notification (method "Webhook POST"). Quay sends
// no authentication header, so the secret goes in the URL. Every updated
// tag becomes a trigger; a notification that names no updated tag (not a
// push) answers 200 and writes nothing; a push whose docker_url or tag is
// not valid is a 400, like every trigger's.
func (h *webhook) quay(w http.ResponseWriter, r *http.Request) {
	h.servePushes(w, r, "quay", parseQuay)
}
