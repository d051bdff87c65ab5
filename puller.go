package main

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

// job is one deploy of one repository: the union of the events that came
// in for it while it waited.
type job struct {
	Repo string
	All  bool                // every local tag
	Tags map[string]struct{} // the tags named by events, when !All
	Revs []int64             // trigger revisions this job completes
	Seen time.Time           // when its first event came
}

func (j *job) merge(ev deployEvent) {
	if j.Seen.IsZero() {
		j.Seen = time.Now()
	}
	if ev.Rev != 0 {
		j.Revs = append(j.Revs, ev.Rev)
	}
	if ev.Tags == nil {
		j.All, j.Tags = true, nil
		return
	}
	if j.All {
		return
	}
	if j.Tags == nil {
		j.Tags = map[string]struct{}{}
	}
	for _, t := range ev.Tags {
		j.Tags[t] = struct{}{}
	}
}

// deployQueue runs at most a fixed number of deploys at once, and
// coalesces events per repository: while a deploy of a repository waits or
// runs, further events for it merge into a single follow-up deploy. The
// first event of a quiet repository deploys at once; a follow-up waits
// until events have stopped for `quiet` (at most `maxWait`), so a burst of
// webhooks costs two deploys, whatever its length, and none is lost.
type deployQueue struct {
	deploy func(context.Context, job)
	done   func(revs []int64) // called after each deploy, even a failed one
	queued interface {
		Inc()
		Dec()
	}
	sem     chan struct{}
	quiet   time.Duration
	maxWait time.Duration

	mu    sync.Mutex
	repos map[string]*repoState
	wg    sync.WaitGroup
}

type repoState struct {
	next      *job      // waiting work; nil when none
	lastEvent time.Time // when the latest event merged into next came
}

const (
	followUpQuiet   = 500 * time.Millisecond
	followUpMaxWait = 5 * time.Second
)

func newDeployQueue(n int, deploy func(context.Context, job), done func([]int64)) *deployQueue {
	return &deployQueue{
		deploy: deploy, done: done, sem: make(chan struct{}, n), repos: map[string]*repoState{}, queued: nopGauge{},
		quiet: followUpQuiet, maxWait: followUpMaxWait,
	}
}

// submit queues an event. It never blocks. The deploy runs under ctx.
func (q *deployQueue) submit(ctx context.Context, ev deployEvent) {
	q.mu.Lock()
	defer q.mu.Unlock()
	st, busy := q.repos[ev.Repo]
	if !busy {
		st = &repoState{}
		q.repos[ev.Repo] = st
	}
	if st.next == nil {
		st.next = &job{Repo: ev.Repo}
	}
	st.next.merge(ev)
	st.lastEvent = time.Now()
	if !busy {
		q.queued.Inc()
		q.wg.Add(1)
		go q.worker(ctx, ev.Repo, st)
	}
}

// worker deploys one repository until no work for it is left.
func (q *deployQueue) worker(ctx context.Context, repo string, st *repoState) {
	defer q.wg.Done()
	defer q.queued.Dec()
	for first := true; ; first = false {
		if !first && !q.settle(ctx, st) {
			q.mu.Lock()
			delete(q.repos, repo)
			q.mu.Unlock()
			return
		}
		select {
		case q.sem <- struct{}{}:
		case <-ctx.Done():
			// Leave the revisions open: the next start replays them.
			q.mu.Lock()
			delete(q.repos, repo)
			q.mu.Unlock()
			return
		}
		q.mu.Lock()
		j := st.next
		st.next = nil
		q.mu.Unlock()

		q.deploy(ctx, *j)
		<-q.sem
		if ctx.Err() == nil {
			q.done(j.Revs)
		}

		q.mu.Lock()
		if st.next == nil {
			delete(q.repos, repo)
			q.mu.Unlock()
			return
		}
		q.mu.Unlock()
	}
}

// settle waits, before a follow-up deploy, until no event has come for
// q.quiet, or q.maxWait has passed. It reports false if ctx ended first.
func (q *deployQueue) settle(ctx context.Context, st *repoState) bool {
	deadline := time.Now().Add(q.maxWait)
	for {
		q.mu.Lock()
		wait := min(time.Until(st.lastEvent.Add(q.quiet)), time.Until(deadline))
		q.mu.Unlock()
		if wait <= 0 {
			return true
		}
		if !sleepCtx(ctx, wait) {
			return false
		}
	}
}

type nopGauge struct{}

func (nopGauge) Inc() {}
func (nopGauge) Dec() {}

// wait blocks until every worker has returned.
func (q *deployQueue) wait() { q.wg.Wait() }

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

// localTags returns tag -> image ID for every local tag of repo.
func (p *puller) localTags(ctx context.Context, repo reference.Named) (map[string]string, error) {
	ctx, cancel := context.WithTimeout(ctx, p.callTimeout)
	defer cancel()
	imgs, err := p.docker.ListImages(docker.ListImagesOptions{Context: ctx})
	if err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	tags := map[string]string{}
	for _, img := range imgs {
		for _, rt := range img.RepoTags {
			if t, ok := localTag(rt); ok && t.Name() == repo.Name() {
				tags[t.Tag()] = img.ID
			}
		}
	}
	return tags, nil
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
	cmd := exec.CommandContext(ctx, "docker-credential-"+name, "get")
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
