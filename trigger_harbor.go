package main

// trigger_harbor.go: Harbor's webhook.

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	"github.com/distribution/reference"
)

// Harbor's artifact push, as its webhook policy sends it: Harbor 2.x
// (goharbor/harbor src/pkg/notifier/formats: default.go and
// cloudevents.go) and Harbor 1.9 and 1.10, whose push has the same body
// under the type pushImage (EventTypePushImage of their notifier model;
// Harbor 2.0 renamed it). Harbor has sent webhooks since 1.9.
const (
	harborPushDefault     = "PUSH_ARTIFACT"
	harborPushV1          = "pushImage"
	harborPushCloudEvents = "harbor.artifact.pushed"
)

// harborResource is one artifact of a Harbor event.
type harborResource struct {
	Digest      string `json:"digest"`
	Tag         string `json:"tag"`
	ResourceURL string `json:"resource_url"`
}

// harborEventData is event_data in the default format and data in the
// CloudEvents format.
type harborEventData struct {
	Resources []harborResource `json:"resources"`
}

// parseHarbor reads a Harbor webhook payload, in the default (Harbor 1.9
// and later) or the CloudEvents format, and returns the pushes by tag of
// a push event: each resource_url's repository (with Harbor's host) and
// tag, and the digest. Other event types, and pushes by digest, give
// none. A body without a type is not a Harbor payload, and a pushed tag
// whose resource_url the deployer cannot use breaks checkPush's rule:
// both are errors (400), so that Harbor shows the delivery as failed.
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
	data, field := p.EventData, "event_data"
	switch {
	case p.Type == "":
		return nil, errors.New(`no "type": not a Harbor webhook payload (Harbor 1.9 and later, payload format Default or CloudEvents)`)
	case p.SpecVersion != "" && p.Type == harborPushCloudEvents:
		data, field = p.Data, "data"
	case p.SpecVersion == "" && (p.Type == harborPushDefault || p.Type == harborPushV1):
	default:
		return nil, nil
	}
	var out []imagePush
	for i, r := range data.Resources {
		push, ok, err := harborPush(r)
		if err != nil {
			return nil, fmt.Errorf("%s.resources[%d]: %w", field, i, err)
		}
		if ok {
			out = append(out, push)
		}
	}
	return dedupe(out), nil
}

// harborPush reads one resource of a push event: ok is false for a push
// by digest (Harbor then gives the digest as tag and host/repo@digest as
// resource_url), which has no tag to deploy.
func harborPush(r harborResource) (imagePush, bool, error) {
	ref, err := reference.Parse(r.ResourceURL)
	if err != nil {
		return imagePush{}, false, fmt.Errorf("resource_url %q is not host/project/repository:tag: %w", r.ResourceURL, err)
	}
	named, ok := ref.(reference.Named)
	if !ok {
		return imagePush{}, false, fmt.Errorf("resource_url %q names no repository", r.ResourceURL)
	}
	var urlTag string
	if t, ok := ref.(reference.Tagged); ok {
		urlTag = t.Tag()
	}
	tag := cmp.Or(r.Tag, urlTag) // the tag field wins; Harbor makes both agree
	if urlTag == "" && (tag == "" || checkDigest(tag) == nil) {
		return imagePush{}, false, nil
	}
	push, err := checkPush(imagePush{Repo: named.Name(), Tag: tag, Digest: r.Digest}, true)
	if err != nil {
		return imagePush{}, false, fmt.Errorf("resource_url %q, tag %q: %w", r.ResourceURL, r.Tag, err)
	}
	return push, true, nil
}

// POST /api/harbor/webhook
//
// Harbor's webhook (notify type HTTP, payload format Default or
// CloudEvents, auth header "Bearer <secret>"; Harbor 1.9 and later). Every
// tag of a push event (PUSH_ARTIFACT, pushImage, harbor.artifact.pushed)
// becomes a trigger for host/project/repository; other events and pushes
// by digest answer 200 and write nothing; a pushed tag whose resource_url
// names no valid repository is a 400, like every trigger's.
func (h *webhook) harbor(w http.ResponseWriter, r *http.Request) {
	h.servePushes(w, r, "harbor", parseHarbor)
}
