package main

// trigger_github.go: GitHub's package webhook (ghcr.io pushes).

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"strings"
)

// gitHubSignature checks GitHub's X-Hub-Signature-256 header:
// "sha256=" and the hex HMAC-SHA256 of the raw body keyed with the
// webhook secret, compared in constant time.
func gitHubSignature(header string, body []byte, secret string) bool {
	hexSum, ok := strings.CutPrefix(header, "sha256=")
	if !ok || secret == "" {
		return false
	}
	got, err := hex.DecodeString(hexSum)
	if err != nil {
		return false
	}
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write(body)
	return hmac.Equal(got, mac.Sum(nil))
}

// gitHubPackage is the part of a package or registry_package event that
// names a container image.
type gitHubPackage struct {
	PackageType    string `json:"package_type"`
	PackageVersion struct {
		PackageURL        string `json:"package_url"`
		ContainerMetadata struct {
			Tag struct {
				Name   string `json:"name"`
				Digest string `json:"digest"`
			} `json:"tag"`
		} `json:"container_metadata"`
	} `json:"package_version"`
}

// parseGitHub reads a GitHub webhook delivery of the given event (the
// X-GitHub-Event header). A package or registry_package event with action
// "published" for a tagged container version gives one push: the
// repository of package_version.package_url (ghcr.io/owner/name, lower
// case), the tag from container_metadata.tag.name and its digest. Every
// other event, action, package type and untagged version gives none.
func parseGitHub(event string, body []byte) ([]imagePush, error) {
	if event != "package" && event != "registry_package" {
		return nil, nil
	}
	var p struct {
		Action          string        `json:"action"`
		Package         gitHubPackage `json:"package"`
		RegistryPackage gitHubPackage `json:"registry_package"`
	}
	if err := json.Unmarshal(body, &p); err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	pkg := p.Package
	if event == "registry_package" {
		pkg = p.RegistryPackage
	}
	if p.Action != "published" || !strings.EqualFold(pkg.PackageType, "container") {
		return nil, nil
	}
	v := pkg.PackageVersion
	tag := v.ContainerMetadata.Tag
	if tag.Name == "" {
		return nil, nil // an untagged manifest (one platform of an index)
	}
	// package_url is "ghcr.io/owner/name:tag" ("…:" when untagged).
	image := lowerRepo(v.PackageURL)
	if slash := strings.LastIndexByte(image, '/'); slash >= 0 {
		if i := strings.IndexAny(image[slash:], ":@"); i >= 0 {
			image = image[:slash+i]
		}
	}
	push, err := checkPush(imagePush{Repo: image, Tag: tag.Name, Digest: tag.Digest}, true)
	if err != nil {
		return nil, fmt.Errorf("package_version.package_url %q, container_metadata.tag.name %q: %w", v.PackageURL, tag.Name, err)
	}
	return []imagePush{push}, nil
}

// POST /api/github/webhook
//
// GitHub's package and registry_package events (content type
// application/json or application/x-www-form-urlencoded, secret = the
// deployer's secret). A delivery is authenticated by its
// X-Hub-Signature-256 or, like every other endpoint, by ?token= or a
// Bearer header. ping, other events and untagged versions answer 200 and
// write nothing.
func (h *webhook) gitHub(w http.ResponseWriter, r *http.Request) {
	const source = "github"
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		h.fail(w, r, source, http.StatusMethodNotAllowed, errors.New("only POST is allowed"))
		return
	}
	// The signature covers the raw body, so it is read first.
	raw, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		h.fail(w, r, source, http.StatusRequestEntityTooLarge, fmt.Errorf("body larger than %d bytes", maxBody))
		return
	}
	if err != nil {
		h.fail(w, r, source, http.StatusBadRequest, fmt.Errorf("read body: %w", err))
		return
	}
	// No secret, no entry (there is no unauthenticated mode); failures
	// are rate-limited like every other endpoint's.
	secret := h.secret()
	if secret == "" || (!gitHubSignature(r.Header.Get("X-Hub-Signature-256"), raw, secret) && !authorized(r, secret)) {
		w.Header().Set("WWW-Authenticate", `Bearer realm="deployer"`)
		code, err := rejectUnauthorized(w, r, h.failures)
		if code == http.StatusUnauthorized {
			err = errors.New("missing or wrong X-Hub-Signature-256 (or secret)")
		}
		h.fail(w, r, source, code, err)
		return
	}
	event := r.Header.Get("X-GitHub-Event")
	if event == "" {
		h.fail(w, r, source, http.StatusBadRequest, errors.New("no X-GitHub-Event header"))
		return
	}
	body := raw
	if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt == "application/x-www-form-urlencoded" {
		form, err := url.ParseQuery(string(raw))
		if err != nil {
			h.fail(w, r, source, http.StatusBadRequest, fmt.Errorf("invalid form: %w", err))
			return
		}
		body = []byte(form.Get("payload"))
	}
	pushes, err := parseGitHub(event, body)
	if err != nil {
		h.fail(w, r, source, http.StatusBadRequest, err)
		return
	}
	if len(pushes) == 0 {
		h.log.Info("github delivery ignored", "event", event, "delivery", r.Header.Get("X-GitHub-Delivery"))
	}
	h.triggerEach(w, r, source, pushes)
}
