package main

// puller.go: the image side of a deploy: the local tags and digests of a
// repository, pulling one tag, and the registry credentials a pull uses
// (a .dockercfg or config.json, credential helpers included).

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/distribution/reference"
	docker "github.com/fsouza/go-dockerclient"
)

// imageAPI is the part of the Docker client the puller uses.
type imageAPI interface {
	// ListImages lists local images with their tags and IDs.
	ListImages(docker.ListImagesOptions) ([]docker.APIImages, error)
	// PullImage pulls one tag, reading the progress stream to its end.
	PullImage(docker.PullImageOptions, docker.AuthConfiguration) error
	// InspectImageWithContext reads one image, by ID or reference.
	InspectImageWithContext(ctx context.Context, name string) (*docker.Image, error)
}

// puller finds the local tags of a repository and pulls them.
type puller struct {
	docker      imageAPI
	creds       *credentials
	pullTimeout time.Duration // whole pull
	callTimeout time.Duration // any other Docker call
	log         *slog.Logger
	metrics     *metrics
}

// pullTimeout bounds a whole pull.
const pullTimeout = 10 * time.Minute

// newPuller returns a puller that reads registry credentials from
// dockerCfg (empty: anonymous pulls). It starts nothing.
func newPuller(dc imageAPI, dockerCfg string, log *slog.Logger, m *metrics) *puller {
	return &puller{
		docker: dc, creds: &credentials{path: dockerCfg, log: log},
		pullTimeout: pullTimeout, callTimeout: callTimeout, log: log, metrics: m,
	}
}

// localImages returns tag -> image ID for every local tag of repo, and
// image ID -> the manifest digests of repo the image was pulled by (its
// RepoDigests), from one ListImages narrowed to repo by the Engine's
// reference filter. dockerd matches the filter against the familiar name
// (path.Match, so every tag of "host:5000/app" or "nginx"; never
// "docker.io/library/nginx") and lists only the matching tags and digests.
func (p *puller) localImages(ctx context.Context, repo reference.Named) (map[string]string, map[string][]string, error) {
	ctx, cancel := context.WithTimeout(ctx, p.callTimeout)
	defer cancel()
	opts := docker.ListImagesOptions{Context: ctx}
	if name := reference.FamiliarName(repo); !strings.ContainsAny(name, `*?[\`) { // an IPv6 host would be a pattern
		opts.Filters = map[string][]string{"reference": {name}}
	}
	imgs, err := p.docker.ListImages(opts)
	if err != nil {
		return nil, nil, fmt.Errorf("list images: %w", err)
	}
	tags := map[string]string{}
	digests := map[string][]string{}
	for _, img := range imgs {
		for _, rt := range img.RepoTags {
			if t, ok := localTag(rt); ok && t.Name() == repo.Name() {
				tags[t.Tag()] = img.ID
			}
		}
		if ds := repoDigests(repo, img.RepoDigests); len(ds) > 0 {
			digests[img.ID] = append(digests[img.ID], ds...)
		}
	}
	return tags, digests, nil
}

// repoDigests returns the manifest digests of repo among an image's
// RepoDigests (repo@digest of every manifest it was pulled by).
func repoDigests(repo reference.Named, rds []string) []string {
	var out []string
	for _, rd := range rds {
		named, err := reference.ParseNormalizedNamed(rd)
		if err != nil || named.Name() != repo.Name() {
			continue
		}
		if c, ok := named.(reference.Canonical); ok {
			out = append(out, c.Digest().String())
		}
	}
	return out
}

// image returns the image ID ref names and the manifest digests of ref's
// repository that image was pulled by, from one InspectImage. A tag that
// no longer exists gives "" and no error.
func (p *puller) image(ctx context.Context, ref reference.NamedTagged) (string, []string, error) {
	ctx, cancel := context.WithTimeout(ctx, p.callTimeout)
	defer cancel()
	img, err := p.docker.InspectImageWithContext(ctx, ref.String())
	switch {
	case errors.Is(err, docker.ErrNoSuchImage):
		return "", nil, nil
	case err != nil:
		return "", nil, fmt.Errorf("inspect %s: %w", reference.FamiliarString(ref), err)
	}
	return img.ID, repoDigests(ref, img.RepoDigests), nil
}

// pulled is what a pull's progress stream said at its end.
type pulled struct {
	// digest is the manifest digest the tag was pulled by
	// ("Digest: sha256:…"); "" when the stream did not say.
	digest string
	// upToDate: "Status: Image is up to date for …": the tag names the
	// image it named before the pull. dockerd 20.10 says "Downloaded
	// newer image" whenever the tag moved, even to an image it already
	// had without downloading a layer (checked on it). False too when the
	// stream said nothing known.
	upToDate bool
}

// pullStreamError is an error the daemon reported inside a pull's
// progress stream, after answering 200 (a missing blob, a rate limit met
// mid-pull): {"errorDetail":{"message":"unknown blob"},"error":"unknown blob"}.
type pullStreamError struct {
	Code    int
	Message string
}

func (e *pullStreamError) Error() string { return e.Message }

// pullStream reads a pull's raw progress stream as go-dockerclient copies
// it (RawJSONStream: one JSON message a line, in chunks of any size): it
// keeps the digest, the final status and the first error, and drops the
// progress lines as they come.
type pullStream struct {
	line   []byte // the incomplete last line
	digest string
	status string // "Status: …"
	err    error
}

// maxPullLine bounds one message of the stream; a longer one is dropped.
const maxPullLine = 1 << 20

func (s *pullStream) Write(b []byte) (int, error) {
	n := len(b)
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			if len(s.line)+len(b) <= maxPullLine {
				s.line = append(s.line, b...)
			}
			break
		}
		s.message(append(s.line, b[:i]...))
		s.line, b = s.line[:0], b[i+1:]
	}
	return n, nil
}

// end reads a last message not ended by a newline.
func (s *pullStream) end() {
	s.message(s.line)
	s.line = nil
}

func (s *pullStream) message(line []byte) {
	line = bytes.TrimSpace(line)
	if len(line) == 0 {
		return
	}
	var m struct {
		Status      string `json:"status"`
		Error       string `json:"error"`
		ErrorDetail *struct {
			Code    int    `json:"code"`
			Message string `json:"message"`
		} `json:"errorDetail"`
	}
	if json.Unmarshal(line, &m) != nil {
		return // not a message: the outcome stays unknown
	}
	if (m.ErrorDetail != nil || m.Error != "") && s.err == nil {
		e := &pullStreamError{Message: m.Error}
		if m.ErrorDetail != nil {
			e.Code, e.Message = m.ErrorDetail.Code, cmp.Or(m.ErrorDetail.Message, m.Error)
		}
		s.err = e
	}
	if d, ok := strings.CutPrefix(m.Status, "Digest: "); ok {
		s.digest = d
	}
	if strings.HasPrefix(m.Status, "Status: ") {
		s.status = m.Status
	}
}

// pull pulls one tag and says what the pull's progress stream said at its
// end. Errors inside the stream count as failures.
func (p *puller) pull(ctx context.Context, ref reference.NamedTagged) (pulled, error) {
	ctx, cancel := context.WithTimeout(ctx, p.pullTimeout)
	defer cancel()
	auth, err := p.creds.lookup(ctx, reference.Domain(ref))
	if err != nil {
		p.log.Warn("no registry credentials, pulling anonymously", "registry", reference.Domain(ref), "err", err)
	}
	start := time.Now()
	var s pullStream
	err = p.docker.PullImage(docker.PullImageOptions{
		Repository:        ref.Name(),
		Tag:               ref.Tag(),
		OutputStream:      &s,
		RawJSONStream:     true, // go-dockerclient copies it undecoded: s reads the errors
		InactivityTimeout: time.Minute,
		Context:           ctx,
	}, auth)
	s.end()
	if err == nil {
		err = s.err
	}
	if err != nil {
		p.metrics.pulls.WithLabelValues("error").Inc()
		return pulled{}, fmt.Errorf("pull %s: %w", reference.FamiliarString(ref), err)
	}
	p.metrics.pulls.WithLabelValues("ok").Inc()
	p.log.Debug("pulled", "image", reference.FamiliarString(ref), "duration", time.Since(start), "status", s.status, "digest", s.digest)
	return pulled{digest: s.digest, upToDate: strings.HasPrefix(s.status, "Status: Image is up to date for ")}, nil
}

// credentials reads registry credentials from a legacy .dockercfg or a
// docker config.json, again at each lookup so that rotated credentials
// need no restart. A missing file means anonymous pulls.
type credentials struct {
	path string
	log  *slog.Logger
	warn sync.Once
}

// lookup returns the credentials for a registry domain ("docker.io",
// "host:5000"). The zero AuthConfiguration means anonymous.
func (c *credentials) lookup(ctx context.Context, domain string) (docker.AuthConfiguration, error) {
	if c == nil || c.path == "" {
		return docker.AuthConfiguration{}, nil
	}
	data, err := os.ReadFile(c.path)
	if errors.Is(err, os.ErrNotExist) {
		c.warn.Do(func() { c.log.Warn("registry credentials file missing, pulling anonymously", "dockercfg", c.path) })
		return docker.AuthConfiguration{}, nil
	}
	if err != nil {
		return docker.AuthConfiguration{}, fmt.Errorf("read %s: %w", c.path, err)
	}
	var helpers struct {
		CredsStore  string            `json:"credsStore"`
		CredHelpers map[string]string `json:"credHelpers"`
	}
	_ = json.Unmarshal(data, &helpers) // the legacy format has neither
	for key, helper := range helpers.CredHelpers {
		if h, err := registryHost(key); err == nil && h == domain {
			return credentialHelper(ctx, helper, key)
		}
	}
	auths, err := docker.NewAuthConfigurations(strings.NewReader(string(data)))
	if err != nil {
		if helpers.CredsStore == "" {
			return docker.AuthConfiguration{}, fmt.Errorf("parse %s: %w", c.path, err)
		}
		auths = &docker.AuthConfigurations{} // only a credential store
	}
	for _, key := range slices.Sorted(maps.Keys(auths.Configs)) {
		if h, err := registryHost(key); err == nil && h == domain {
			return auths.Configs[key], nil
		}
	}
	if helpers.CredsStore != "" {
		key := domain
		if domain == dockerHub {
			key = "https://index.docker.io/v1/"
		}
		return credentialHelper(ctx, helpers.CredsStore, key)
	}
	return docker.AuthConfiguration{}, nil
}

// credentialHelper runs docker-credential-<name> get, as the docker CLI does.
func credentialHelper(ctx context.Context, name, serverURL string) (docker.AuthConfiguration, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "docker-credential-"+name, "get") //nolint:gosec // the helper named in the operator's docker config, as the docker CLI runs it
	cmd.Stdin = strings.NewReader(serverURL)
	out, err := cmd.Output()
	if err != nil {
		return docker.AuthConfiguration{}, fmt.Errorf("credential helper %s: %w", name, err)
	}
	var cred struct{ Username, Secret string }
	if err := json.Unmarshal(out, &cred); err != nil {
		return docker.AuthConfiguration{}, fmt.Errorf("credential helper %s: %w", name, err)
	}
	a := docker.AuthConfiguration{Username: cred.Username, Password: cred.Secret, ServerAddress: serverURL}
	if cred.Username == "<token>" {
		a = docker.AuthConfiguration{IdentityToken: cred.Secret, ServerAddress: serverURL}
	}
	return a, nil
}
