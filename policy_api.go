package main

// policy_api.go: the release policy over HTTP (README, Release policy),
// with the webhooks' secret: GET and PUT /api/policy, POST /api/freeze,
// POST /api/thaw, and POST /api/deploy with "now": true.

import (
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"net/url"
	"time"
)

// policyRequest is the body of PUT /api/policy.
type policyRequest struct {
	Image   string   `json:"image,omitempty"` // repository:tag; with Default false
	Default bool     `json:"default,omitempty"`
	Policy  policy   `json:"policy"`          // the fields to set
	Unset   []string `json:"unset,omitempty"` // the fields to clear, or "all"
}

// policyAPI serves the policy routes.
type policyAPI struct {
	h              *webhook
	policies       *policies
	ops            *holdOps
	registryDomain string
	node           string
}

// GET /api/policy: every policy (policyView).
func (a *policyAPI) get(w http.ResponseWriter, r *http.Request) {
	v, err := readPolicies(r.Context(), a.policies)
	if err != nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// PUT /api/policy {"image":"repository:tag","policy":{…},"unset":[…]}
// or {"default":true,…}: changes the fields named, answers with every
// policy.
func (a *policyAPI) put(w http.ResponseWriter, r *http.Request) {
	const source = "policy"
	if r.Method != http.MethodPut {
		w.Header().Set("Allow", http.MethodPut)
		a.h.fail(w, r, source, http.StatusMethodNotAllowed, errors.New("only PUT (and GET) is allowed"))
		return
	}
	post := r.Clone(r.Context())
	post.Method = http.MethodPost // accept's checks, for a PUT
	body, ok := a.h.accept(w, post, source)
	if !ok {
		return
	}
	var req policyRequest
	if err := json.Unmarshal(body, &req); err != nil {
		a.h.fail(w, r, source, http.StatusBadRequest, fmt.Errorf(`want {"image":"repository:tag","policy":{…}}: %w`, err))
		return
	}
	ref := ""
	switch {
	case req.Default && req.Image != "":
		a.h.fail(w, r, source, http.StatusBadRequest, errors.New("image or default, not both"))
		return
	case !req.Default:
		tagged, err := parseRollbackImage(req.Image, a.registryDomain)
		if err != nil {
			a.h.fail(w, r, source, http.StatusBadRequest, err)
			return
		}
		ref = tagged.String()
	}
	if _, err := a.policies.set(r.Context(), ref, req.Policy, req.Unset, "PUT /api/policy from "+r.RemoteAddr, time.Now()); err != nil {
		code := http.StatusServiceUnavailable
		if errors.Is(err, errPolicy) {
			code = http.StatusBadRequest
		}
		a.h.fail(w, r, source, code, err)
		return
	}
	a.h.log.Info("policy set", "image", ref, "remote", r.RemoteAddr)
	a.get(w, r)
}

// POST /api/freeze {"scope":"repository[:tag]","until":"…","reason":"…"}
func (a *policyAPI) freeze(w http.ResponseWriter, r *http.Request) {
	const source = "freeze"
	body, ok := a.h.accept(w, r, source)
	if !ok {
		return
	}
	var req freezeRequest
	if len(body) > 0 {
		if err := json.Unmarshal(body, &req); err != nil {
			a.h.fail(w, r, source, http.StatusBadRequest, fmt.Errorf(`want {"scope":"repository[:tag]","until":"…","reason":"…"}: %w`, err))
			return
		}
	}
	f, err := a.ops.freeze(r.Context(), req, "POST /api/freeze from "+r.RemoteAddr)
	if err != nil {
		a.h.fail(w, r, source, usageCode(err), err)
		return
	}
	a.h.log.Info("frozen", "scope", f.Scope, "until", f.Until, "why", f.Reason, "remote", r.RemoteAddr)
	writeJSON(w, http.StatusOK, f)
}

// POST /api/thaw {"scope":"repository[:tag]"}
func (a *policyAPI) thaw(w http.ResponseWriter, r *http.Request) {
	const source = "thaw"
	body, ok := a.h.accept(w, r, source)
	if !ok {
		return
	}
	var req freezeRequest
	if len(body) > 0 {
		if err := json.Unmarshal(body, &req); err != nil {
			a.h.fail(w, r, source, http.StatusBadRequest, fmt.Errorf(`want {"scope":"repository[:tag]"}: %w`, err))
			return
		}
	}
	res, err := a.ops.thaw(r.Context(), req.Scope, askedBy{Node: a.node, Remote: r.RemoteAddr})
	if err != nil {
		code := usageCode(err)
		if errors.Is(err, errNoFreeze) {
			code = http.StatusNotFound
		}
		a.h.fail(w, r, source, code, err)
		return
	}
	a.h.log.Info("thawed", "scope", res.Scope, "released", res.Released, "remote", r.RemoteAddr)
	writeJSON(w, http.StatusOK, res)
}

// deployNow is POST /api/deploy with "now": true (or now=true in a
// form): the image's trigger, past a freeze or closed window, once.
func (a *policyAPI) deployNow(w http.ResponseWriter, r *http.Request, image string) {
	const source = "api"
	res, err := a.ops.deployNow(r.Context(), image, r.RemoteAddr, a.node)
	if err != nil {
		a.h.fail(w, r, source, usageCode(err), err)
		return
	}
	a.h.log.Info("deploy -now", "image", res.Image, "past", res.Held, "revision", res.Revision, "remote", r.RemoteAddr)
	a.h.metrics.webhooks.WithLabelValues(source, "ok").Inc()
	writeJSON(w, http.StatusOK, res)
}

func usageCode(err error) int {
	if errors.Is(err, errUsage) || errors.Is(err, errPolicy) {
		return http.StatusBadRequest
	}
	return http.StatusServiceUnavailable
}

// deployNowAsked reads "now" from a POST /api/deploy body: JSON
// {"now": true} or the form value now=true.
func deployNowAsked(contentType string, body []byte) bool {
	if mt, _, _ := mime.ParseMediaType(contentType); mt == "application/x-www-form-urlencoded" {
		form, err := url.ParseQuery(string(body))
		return err == nil && (form.Get("now") == "true" || form.Get("now") == "1")
	}
	var req struct {
		Now bool `json:"now"`
	}
	return json.Unmarshal(body, &req) == nil && req.Now
}
