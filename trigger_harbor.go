package main

// trigger_harbor.go: Harbor's webhook.

import (
	"encoding/json"
	"fmt"
	"net/http"

	"github.com/distribution/reference"
)

// Harbor's artifact push, as its webhook policy sends it (goharbor/harbor
// src/pkg/notifier/formats: default.go and cloudevents.go).
const (
	harborPushDefault     = "PUSH_ARTIFACT"
	harborPushCloudEvents = "harbor.artifact.pushed"
)

// harborEventData is event_data in the default format and data in the
// CloudEvents format.
type harborEventData struct {
	Resources []struct {
		Digest      string `json:"digest"`
		Tag         string `json:"tag"`
		ResourceURL string `json:"resource_url"`
	} `json:"resources"`
}

// parseHarbor reads a Harbor webhook payload, in the default or the
// CloudEvents format, and returns the pushes by tag of a PUSH_ARTIFACT
// event: each resource_url's repository (with Harbor's host) and tag, and
// the digest. Other event types give none; resources it cannot use are
// skipped, not refused, so that Harbor does not retry them forever.
func parseHarbor(body []byte) ([]imagePush, error) {
	var p struct {
		// Default format.
		Type      string          `json:"type"`
		EventData harborEventData `json:"event_data"`
		// CloudEvents format.
		SpecVersion string          `json:"specversion"`
		Data        harborEventData `json:"data"`
	}
	if err := json.Unmarshal(body, &p); err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	data := p.EventData
	switch {
	case p.SpecVersion != "" && p.Type == harborPushCloudEvents:
		data = p.Data
	case p.SpecVersion == "" && p.Type == harborPushDefault:
	default:
		return nil, nil
	}
	var out []imagePush
	for _, r := range data.Resources {
		ref, err := reference.Parse(r.ResourceURL)
		if err != nil {
			continue
		}
		named, ok := ref.(reference.Named)
		if !ok {
			continue
		}
		push := imagePush{Repo: named.Name(), Tag: r.Tag}
		if t, ok := ref.(reference.Tagged); ok && push.Tag == "" {
			push.Tag = t.Tag()
		}
		if checkDigest(r.Digest) == nil {
			push.Digest = r.Digest
		}
		// A push by digest has no tag to deploy.
		if push.Tag == "" || checkTag(push.Tag) != nil || !hasDomain(push.Repo) || checkRepoName(push.Repo) != nil {
			continue
		}
		out = append(out, push)
	}
	return dedupe(out), nil
}

// POST /api/harbor/webhook
//
// Harbor's webhook (notify type HTTP, payload format Default or
// CloudEvents, auth header "Bearer <secret>"). Every tag of a
// PUSH_ARTIFACT event becomes a trigger for host/project/repository;
// other events answer 200 and write nothing.
func (h *webhook) harbor(w http.ResponseWriter, r *http.Request) {
	const source = "harbor"
	body, ok := h.accept(w, r, source)
	if !ok {
		return
	}
	pushes, err := parseHarbor(body)
	if err != nil {
		h.fail(w, r, source, http.StatusBadRequest, err)
		return
	}
	h.triggerEach(w, r, source, pushes)
}
