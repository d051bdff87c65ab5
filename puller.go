package main

// puller.go: the image side of a deploy: the local tags and digests of a
// repository, pulling one tag, and the registry credentials a pull uses
// (a .dockercfg or config.json, credential helpers included).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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
// RepoDigests), from one ListImages.
func (p *puller) localImages(ctx context.Context, repo reference.Named) (map[string]string, map[string][]string, error) {
	ctx, cancel := context.WithTimeout(ctx, p.callTimeout)
	defer cancel()
	imgs, err := p.docker.ListImages(docker.ListImagesOptions{Context: ctx})
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
		for _, rd := range img.RepoDigests {
			named, err := reference.ParseNormalizedNamed(rd)
			if err != nil || named.Name() != repo.Name() {
				continue
			}
			if c, ok := named.(reference.Canonical); ok {
				digests[img.ID] = append(digests[img.ID], c.Digest().String())
			}
		}
	}
	return tags, digests, nil
}

// pull pulls one tag. Errors inside the progress stream count as failures.
func (p *puller) pull(ctx context.Context, ref reference.NamedTagged) error {
	ctx, cancel := context.WithTimeout(ctx, p.pullTimeout)
	defer cancel()
	auth, err := p.creds.lookup(ctx, reference.Domain(ref))
	if err != nil {
		p.log.Warn("no registry credentials, pulling anonymously", "registry", reference.Domain(ref), "err", err)
	}
	start := time.Now()
	err = p.docker.PullImage(docker.PullImageOptions{
		Repository:        ref.Name(),
		Tag:               ref.Tag(),
		OutputStream:      io.Discard,
		InactivityTimeout: time.Minute,
		Context:           ctx,
	}, auth)
	if err != nil {
		p.metrics.pulls.WithLabelValues("error").Inc()
		return fmt.Errorf("pull %s: %w", reference.FamiliarString(ref), err)
	}
	p.metrics.pulls.WithLabelValues("ok").Inc()
	p.log.Debug("pulled", "image", reference.FamiliarString(ref), "duration", time.Since(start))
	return nil
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
