package main

// trigger_api.go: POST /api/deploy, for CI pipelines and people, and the
// image-push parsing the other webhooks share.

import (
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"net/url"
	"strings"

	"github.com/distribution/reference"
)

// parseImage reads an image reference as a sender writes it: "repo",
// "host:port/repo:tag", "repo:tag@sha256:…". The repository stays as
// written (a bare name belongs to -registry, as with Docker Hub webhooks),
// and must pass the same checks as every other trigger.
func parseImage(s string) (imagePush, error) {
	if s == "" {
		return imagePush{}, fmt.Errorf("%w: empty", errBadRepo)
	}
	ref, err := reference.Parse(s)
	if err != nil {
		return imagePush{}, fmt.Errorf("%w: %q: %w", errBadRepo, s, err)
	}
	named, ok := ref.(reference.Named)
	if !ok {
		return imagePush{}, fmt.Errorf("%w: %q names no repository", errBadRepo, s)
	}
	p := imagePush{Repo: named.Name()}
	if t, ok := ref.(reference.Tagged); ok {
		p.Tag = t.Tag()
	}
	if d, ok := ref.(reference.Digested); ok {
		p.Digest = d.Digest().String()
	}
	if p.Digest != "" && p.Tag == "" {
		// Without a tag the digest says nothing a deploy can use: local
		// tags are what the nodes pull and compare.
		return imagePush{}, fmt.Errorf("%q: a digest needs a tag (repo:tag@sha256:…)", s)
	}
	return checkPush(p, false)
}

// lowerRepo lower-cases the repository part of an image reference and
// keeps the tag and digest as they are: GitHub writes owners as they are
// spelled ("ghcr.io/Codertocat/hello-world:v1"), while ghcr.io and
// Docker know the repository only in lower case.
func lowerRepo(s string) string {
	end := len(s)
	slash := strings.LastIndexByte(s, '/')
	if i := strings.IndexAny(s[slash+1:], ":@"); i >= 0 {
		end = slash + 1 + i
	}
	return strings.ToLower(s[:end]) + s[end:]
}

// parseDeployRequest reads the body of POST /api/deploy: JSON
// {"image": "host/repo:tag"}, or the form value image= when the content
// type is application/x-www-form-urlencoded.
func parseDeployRequest(contentType string, body []byte) (imagePush, error) {
	mt, _, _ := mime.ParseMediaType(contentType)
	var image string
	if mt == "application/x-www-form-urlencoded" {
		form, err := url.ParseQuery(string(body))
		if err != nil {
			return imagePush{}, fmt.Errorf("invalid form: %w", err)
		}
		image = form.Get("image")
	} else {
		var req struct {
			Image string `json:"image"`
		}
		if err := json.Unmarshal(body, &req); err != nil {
			return imagePush{}, fmt.Errorf("invalid JSON: %w", err)
		}
		image = req.Image
	}
	if image == "" {
		return imagePush{}, errors.New(`no image: send {"image":"host/repo:tag"} or image=host/repo:tag`)
	}
	p, err := parseImage(strings.TrimSpace(image))
	if err != nil {
		return imagePush{}, fmt.Errorf("image: %w", err)
	}
	return p, nil
}

// POST /api/deploy
//
// For CI pipelines and people: deploy one image, named as
// {"image": "host/repo:tag"} or image=host/repo:tag (without a tag, every
// local tag of the repository). Same contract as the webhooks: 200 with
// the etcd key and revision; 400, 401, 405, 413; 503 when etcd cannot be
// written.
func (h *webhook) apiDeploy(w http.ResponseWriter, r *http.Request) {
	const source = "api"
	body, ok := h.accept(w, r, source)
	if !ok {
		return
	}
	p, err := parseDeployRequest(r.Header.Get("Content-Type"), body)
	if err != nil {
		h.fail(w, r, source, http.StatusBadRequest, err)
		return
	}
	if h.deployNow != nil && deployNowAsked(r.Header.Get("Content-Type"), body) {
		if p.Tag == "" {
			h.fail(w, r, source, http.StatusBadRequest, errors.New("now: a tag is needed (repository:tag)"))
			return
		}
		h.deployNow(w, r, p.Repo+":"+p.Tag)
		return
	}
	h.log.Info("deploy request", "repo", p.Repo, "tag", p.Tag, "digest", p.Digest, "remote", r.RemoteAddr)
	t, err := h.trigger(r.Context(), p.Repo, trigger{Tag: p.Tag, Digest: p.Digest, Source: source, Remote: r.RemoteAddr})
	if err != nil {
		h.fail(w, r, source, http.StatusServiceUnavailable, err)
		return
	}
	h.metrics.webhooks.WithLabelValues(source, "ok").Inc()
	writeJSON(w, http.StatusOK, t)
}

// servePushes is the body of a webhook whose payload is parsed alone
// (Harbor, Quay): accept the request, parse it (a payload that parse
// refuses is a 400), and write a trigger per push.
func (h *webhook) servePushes(w http.ResponseWriter, r *http.Request, source string, parse func([]byte) ([]imagePush, error)) {
	body, ok := h.accept(w, r, source)
	if !ok {
		return
	}
	pushes, err := parse(body)
	if err != nil {
		h.fail(w, r, source, http.StatusBadRequest, err)
		return
	}
	h.triggerEach(w, r, source, pushes)
}

// triggerEach writes one trigger per push and answers with all of them;
// no push is a 200 that wrote nothing ("ignored"), so that the sender
// does not retry an event that is not for us.
func (h *webhook) triggerEach(w http.ResponseWriter, r *http.Request, source string, pushes []imagePush) {
	out := struct {
		Triggered []triggered `json:"triggered"`
	}{Triggered: []triggered{}}
	for _, p := range pushes {
		h.log.Info("push notified", "source", source, "repo", p.Repo, "tag", p.Tag, "digest", p.Digest)
		t, err := h.trigger(r.Context(), p.Repo, trigger{Tag: p.Tag, Digest: p.Digest, Source: source, Remote: r.RemoteAddr})
		if err != nil {
			h.fail(w, r, source, http.StatusServiceUnavailable, err)
			return
		}
		out.Triggered = append(out.Triggered, t)
	}
	result := "ok"
	if len(pushes) == 0 {
		result = "ignored"
	}
	h.metrics.webhooks.WithLabelValues(source, result).Inc()
	writeJSON(w, http.StatusOK, out)
}

// dedupe drops repeated pushes, keeping the first of each.
func dedupe(pushes []imagePush) []imagePush {
	var out []imagePush
	seen := map[imagePush]bool{}
	for _, p := range pushes {
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	return out
}
