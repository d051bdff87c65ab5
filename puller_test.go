package main

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/distribution/reference"
	docker "github.com/fsouza/go-dockerclient"
)

func TestJobMerge(t *testing.T) {
	tests := []struct {
		name     string
		events   []deployEvent
		wantAll  bool
		wantTags []string
		wantRevs []int64
	}{
		{"tags unite", []deployEvent{{Tags: []string{"qa"}, Rev: 1}, {Tags: []string{"prod"}, Rev: 2}, {Tags: []string{"qa"}, Rev: 3}}, false, []string{"prod", "qa"}, []int64{1, 2, 3}},
		{"all wins", []deployEvent{{Tags: []string{"qa"}, Rev: 1}, {Rev: 2}, {Tags: []string{"x"}, Rev: 3}}, true, nil, []int64{1, 2, 3}},
		{"local events have no revision", []deployEvent{{Tags: []string{"qa"}}}, false, []string{"qa"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var j job
			for _, ev := range tt.events {
				j.merge(ev)
			}
			tags := slices.Sorted(maps.Keys(j.Tags))
			if j.All != tt.wantAll || !slices.Equal(tags, tt.wantTags) || !slices.Equal(j.Revs, tt.wantRevs) {
				t.Errorf("merged = all %v tags %q revs %v; want all %v tags %q revs %v", j.All, tags, j.Revs, tt.wantAll, tt.wantTags, tt.wantRevs)
			}
		})
	}
}

// TestDeployQueueCoalesces: a burst of events for one repository while a
// deploy runs gives exactly one follow-up deploy, with every tag.
func TestDeployQueueCoalesces(t *testing.T) {
	started := make(chan job)
	release := make(chan struct{})
	var mu sync.Mutex
	var doneRevs []int64
	q := newDeployQueue(4, func(ctx context.Context, j job) error {
		started <- j
		<-release
		return nil
	}, func(revs []int64) {
		mu.Lock()
		doneRevs = append(doneRevs, revs...)
		mu.Unlock()
	})
	q.quiet = 0
	ctx := t.Context()
	q.submit(ctx, deployEvent{Repo: "r", Tags: []string{"t0"}, Rev: 1})
	first := <-started
	for i := range 100 {
		q.submit(ctx, deployEvent{Repo: "r", Tags: []string{"t" + string(rune('a'+i%3))}, Rev: int64(i + 2)})
	}
	release <- struct{}{}
	second := <-started
	release <- struct{}{}
	q.wait()
	if len(first.Revs) != 1 || len(second.Revs) != 100 {
		t.Errorf("deploys covered %d and %d events; want 1 then 100", len(first.Revs), len(second.Revs))
	}
	if tags := slices.Sorted(maps.Keys(second.Tags)); !slices.Equal(tags, []string{"ta", "tb", "tc"}) {
		t.Errorf("follow-up tags = %q; want the union ta tb tc", tags)
	}
	if len(doneRevs) != 101 {
		t.Errorf("%d revisions marked done; want 101", len(doneRevs))
	}
}

// TestDeployQueueSettles: events spread over a second (as a burst of
// webhooks is) give one deploy at once and one follow-up after the burst;
// an endless stream still deploys at least every maxWait.
func TestDeployQueueSettles(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var starts []time.Duration
		t0 := time.Now()
		q := newDeployQueue(1, func(ctx context.Context, j job) error {
			starts = append(starts, time.Since(t0))
			time.Sleep(50 * time.Millisecond) // a pull
			return nil
		}, func([]int64) {})
		for i := range 50 {
			q.submit(t.Context(), deployEvent{Repo: "r", Tags: []string{"qa"}, Rev: int64(i + 1)})
			time.Sleep(20 * time.Millisecond)
		}
		q.wait()
		// Last event at 980ms; the follow-up waits 500ms of quiet.
		if want := []time.Duration{0, 1480 * time.Millisecond}; !slices.Equal(starts, want) {
			t.Errorf("burst over 1s: deploys started at %v; want %v", starts, want)
		}

		starts = nil
		t0 = time.Now()
		for i := range 1000 { // 20s of events every 20ms
			q.submit(t.Context(), deployEvent{Repo: "r", Rev: int64(i + 1)})
			time.Sleep(20 * time.Millisecond)
		}
		q.wait()
		for i := 1; i < len(starts); i++ {
			if gap := starts[i] - starts[i-1]; gap > q.maxWait+100*time.Millisecond {
				t.Errorf("endless stream: %v between deploys; want at most maxWait %v plus the deploy", gap, q.maxWait)
			}
		}
		if len(starts) < 4 || len(starts) > 6 {
			t.Errorf("endless stream of 20s: %d deploys; want about one per maxWait", len(starts))
		}
	})
}

// TestDeployQueueBoundsConcurrency: with n slots, at most n repositories
// deploy at once, and all of them run.
func TestDeployQueueBoundsConcurrency(t *testing.T) {
	const slots, repos = 2, 6
	var mu sync.Mutex
	running, peak := 0, 0
	ran := map[string]bool{}
	gate := make(chan struct{})
	entered := make(chan struct{}, repos)
	q := newDeployQueue(slots, func(ctx context.Context, j job) error {
		mu.Lock()
		running++
		peak = max(peak, running)
		ran[j.Repo] = true
		mu.Unlock()
		entered <- struct{}{}
		<-gate
		mu.Lock()
		running--
		mu.Unlock()
		return nil
	}, func([]int64) {})
	for i := range repos {
		q.submit(t.Context(), deployEvent{Repo: string(rune('a' + i))})
	}
	for range repos {
		<-entered
		gate <- struct{}{}
	}
	q.wait()
	if peak > slots || len(ran) != repos {
		t.Errorf("peak %d concurrent deploys, %d repositories ran; want at most %d and all %d", peak, len(ran), slots, repos)
	}
}

func TestDeployQueueCancelLeavesRevisionsOpen(t *testing.T) {
	var done []int64
	block := make(chan struct{})
	q := newDeployQueue(1, func(ctx context.Context, j job) error {
		if j.Repo == "busy" {
			<-block
		}
		return nil
	}, func(r []int64) { done = append(done, r...) })
	ctx, cancel := context.WithCancel(t.Context())
	q.submit(ctx, deployEvent{Repo: "busy", Rev: 1})
	q.submit(ctx, deployEvent{Repo: "waiting", Rev: 2})
	cancel()
	close(block)
	q.wait()
	if slices.Contains(done, 2) {
		t.Errorf("revision of a deploy that never ran was marked done: %v", done)
	}
	if slices.Contains(done, 1) {
		t.Errorf("revision of a deploy cut short by the stop was marked done: %v", done)
	}
}

func TestCredentials(t *testing.T) {
	dir := t.TempDir()
	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
	legacy := `{"https://index.docker.io/v1/":{"auth":"` + b64("hub:pa:ss") + `","email":"a@b"},
	            "127.0.0.1:5000":{"auth":"` + b64("local:pw") + `"}}`
	modern := `{"auths":{"https://index.docker.io/v1/":{"auth":"` + b64("hub2:x") + `"},
	            "http://127.0.0.1:5000":{"auth":"` + b64("local2:y") + `"}},"credsStore":""}`
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	tests := []struct {
		name, path, domain, user, pass string
		wantErr                        bool
	}{
		{"legacy hub", write("dockercfg", legacy), "docker.io", "hub", "pa:ss", false},
		{"legacy port", filepath.Join(dir, "dockercfg"), "127.0.0.1:5000", "local", "pw", false},
		{"legacy unknown registry", filepath.Join(dir, "dockercfg"), "quay.io", "", "", false},
		{"config.json hub", write("config.json", modern), "docker.io", "hub2", "x", false},
		{"config.json url key", filepath.Join(dir, "config.json"), "127.0.0.1:5000", "local2", "y", false},
		{"missing file is anonymous", filepath.Join(dir, "nope"), "docker.io", "", "", false},
		{"broken file", write("broken", "{"), "docker.io", "", "", true},
		{"no file configured", "", "docker.io", "", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &credentials{path: tt.path, log: testLogger(t)}
			got, err := c.lookup(t.Context(), tt.domain)
			if (err != nil) != tt.wantErr || got.Username != tt.user || got.Password != tt.pass {
				t.Errorf("lookup(%s) = %q/%q, %v; want %q/%q, error %v", tt.domain, got.Username, got.Password, err, tt.user, tt.pass, tt.wantErr)
			}
		})
	}
}

func TestCredentialHelper(t *testing.T) {
	dir := t.TempDir()
	helper := filepath.Join(dir, "docker-credential-fake")
	script := "#!/bin/sh\nread url\necho \"{\\\"Username\\\":\\\"u-$url\\\",\\\"Secret\\\":\\\"s\\\"}\"\n"
	if err := os.WriteFile(helper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+":"+os.Getenv("PATH"))
	cfg := filepath.Join(dir, "config.json")
	if err := os.WriteFile(cfg, []byte(`{"auths":{},"credHelpers":{"127.0.0.1:5000":"fake"},"credsStore":"fake"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	c := &credentials{path: cfg, log: testLogger(t)}
	for domain, want := range map[string]string{"127.0.0.1:5000": "u-127.0.0.1:5000", "docker.io": "u-https://index.docker.io/v1/"} {
		got, err := c.lookup(t.Context(), domain)
		if err != nil || got.Username != want || got.Password != "s" {
			t.Errorf("lookup(%s) = %+v, %v; want user %s from the helper", domain, got, err, want)
		}
	}
}

func TestPullerPassesCredentialsAndErrors(t *testing.T) {
	f := newFakeDocker()
	var gotAuth docker.AuthConfiguration
	cfg := filepath.Join(t.TempDir(), "config.json")
	creds := `{"auths":{"quay.io":{"auth":"` + base64.StdEncoding.EncodeToString([]byte("other:no")) + `"},
	           "127.0.0.1:5000":{"auth":"` + base64.StdEncoding.EncodeToString([]byte("ci:s3cret")) + `"}}}`
	if err := os.WriteFile(cfg, []byte(creds), 0o600); err != nil {
		t.Fatal(err)
	}
	p := newPuller(pullRecorder{f, &gotAuth}, cfg, testLogger(t), newMetrics())
	ref, _ := reference.ParseNormalizedNamed("127.0.0.1:5000/app:qa")
	f.pullErr["127.0.0.1:5000/app:qa"] = &docker.Error{Status: 500, Message: "toomanyrequests"}
	_, err := p.pull(t.Context(), ref.(reference.NamedTagged))
	var derr *docker.Error
	if !errors.As(err, &derr) || derr.Status != 500 {
		t.Errorf("pull = %v; want the Docker error, wrapped", err)
	}
	if got := f.pulls; !slices.Equal(got, []string{"127.0.0.1:5000/app:qa"}) {
		t.Errorf("pulled %q; want the full name with the registry port kept", got)
	}
	if gotAuth.Username != "ci" || gotAuth.Password != "s3cret" {
		t.Errorf("pulled with %q/%q; want the registry's credentials ci/s3cret", gotAuth.Username, gotAuth.Password)
	}
}

type pullRecorder struct {
	*fakeDocker
	auth *docker.AuthConfiguration
}

func (p pullRecorder) PullImage(opts docker.PullImageOptions, auth docker.AuthConfiguration) error {
	*p.auth = auth
	return p.fakeDocker.PullImage(opts, auth)
}

// Pull progress streams of dockerd 20.10 (Debian 20.10.24), captured from
// POST /images/create against docker-registry.
const (
	streamDownloaded = `{"status":"Pulling from app","id":"v1"}
{"status":"Already exists","progressDetail":{},"id":"fa4b03278310"}
{"status":"Pulling fs layer","progressDetail":{},"id":"5cf75060a0a7"}
{"status":"Downloading","progressDetail":{"current":128,"total":128},"progress":"[==================================================\u003e]     128B/128B","id":"5cf75060a0a7"}
{"status":"Verifying Checksum","progressDetail":{},"id":"5cf75060a0a7"}
{"status":"Download complete","progressDetail":{},"id":"5cf75060a0a7"}
{"status":"Extracting","progressDetail":{"current":128,"total":128},"progress":"[==================================================\u003e]     128B/128B","id":"5cf75060a0a7"}
{"status":"Pull complete","progressDetail":{},"id":"5cf75060a0a7"}
{"status":"Digest: sha256:cb1a4759f2b7741e28676b06f23c71ed329b25d8232736e677d0f7b6ddef77fe"}
{"status":"Status: Downloaded newer image for 127.0.0.1:34919/app:v1"}
`
	streamUpToDate = `{"status":"Pulling from app","id":"v1"}
{"status":"Digest: sha256:1c8fb9eb49d3a29fbc8ac54dfcd72b81297f568a0b20ae9255203b81fe7281aa"}
{"status":"Status: Image is up to date for 127.0.0.1:34919/app:v1"}
`
	// A layer blob missing from the registry: the daemon had answered 200.
	streamError = `{"status":"Pulling from app","id":"v3"}
{"status":"Already exists","progressDetail":{},"id":"fa4b03278310"}
{"status":"Pulling fs layer","progressDetail":{},"id":"dfae3f0cc1ad"}
{"status":"Downloading","progressDetail":{},"id":"dfae3f0cc1ad"}
{"errorDetail":{"message":"unknown blob"},"error":"unknown blob"}
`
)

// TestPullStream: what a pull's raw progress stream said, however the
// connection cuts it into chunks: the digest, whether the tag is up to
// date, and an error inside the stream.
func TestPullStream(t *testing.T) {
	for _, tt := range []struct {
		name       string
		stream     string
		wantDigest string
		wantUp     bool
		wantErr    string
	}{
		{"downloaded newer image", streamDownloaded, "sha256:cb1a4759f2b7741e28676b06f23c71ed329b25d8232736e677d0f7b6ddef77fe", false, ""},
		{"image is up to date", streamUpToDate, "sha256:1c8fb9eb49d3a29fbc8ac54dfcd72b81297f568a0b20ae9255203b81fe7281aa", true, ""},
		{"CRLF, no newline at the end", strings.ReplaceAll(strings.TrimSuffix(streamUpToDate, "\n"), "\n", "\r\n"), "sha256:1c8fb9eb49d3a29fbc8ac54dfcd72b81297f568a0b20ae9255203b81fe7281aa", true, ""},
		{"error inside the stream", streamError, "", false, "unknown blob"},
		{"rate limit, old-style error only", `{"status":"Pulling from app","id":"v1"}` + "\n" + `{"error":"toomanyrequests: Retry-After: 7"}` + "\n", "", false, "toomanyrequests: Retry-After: 7"},
		{"no final status: not known to be up to date", `{"status":"Pulling from app","id":"v1"}` + "\nnot json\n", "", false, ""},
	} {
		for _, chunk := range []int{1, 7, 4096} {
			t.Run(fmt.Sprintf("%s/%dB", tt.name, chunk), func(t *testing.T) {
				var s pullStream
				for b := []byte(tt.stream); len(b) > 0; {
					n, err := s.Write(b[:min(chunk, len(b))])
					if err != nil {
						t.Fatal(err)
					}
					b = b[n:]
				}
				s.end()
				up := strings.HasPrefix(s.status, "Status: Image is up to date for ")
				if s.digest != tt.wantDigest || up != tt.wantUp {
					t.Errorf("digest %q, up to date %v; want %q, %v", s.digest, up, tt.wantDigest, tt.wantUp)
				}
				if got := fmt.Sprint(s.err); (s.err != nil) != (tt.wantErr != "") || s.err != nil && got != tt.wantErr {
					t.Errorf("error %v; want %q", s.err, tt.wantErr)
				}
			})
		}
	}
}

// TestPullerStreamErrors: a pull that fails inside the progress stream
// (dockerd answered 200; go-dockerclient returns nil for a raw stream)
// still fails, with the daemon's message (a Retry-After included), and
// its outcome is not mistaken for a success.
func TestPullerStreamErrors(t *testing.T) {
	f := newFakeDocker()
	f.local["127.0.0.1:5000/app:qa"] = "sha256:aaaaaaaaaaaa1111"
	f.remote["127.0.0.1:5000/app:qa"] = "sha256:bbbbbbbbbbbb2222"
	f.pullErr["127.0.0.1:5000/app:qa"] = errRegistry429
	raw := docker.PullImageOptions{Repository: "127.0.0.1:5000/app", Tag: "qa", RawJSONStream: true, OutputStream: io.Discard}
	if err := f.PullImage(raw, docker.AuthConfiguration{}); err != nil {
		t.Fatalf("the fake returned %v for a raw stream; want nil and the error in the stream, as go-dockerclient", err)
	}
	p := newPuller(f, "", testLogger(t), newMetrics())
	ref, _ := reference.ParseNormalizedNamed("127.0.0.1:5000/app:qa")
	got, err := p.pull(t.Context(), ref.(reference.NamedTagged))
	if err == nil || !strings.Contains(err.Error(), "toomanyrequests") || got != (pulled{}) {
		t.Fatalf("pull = %+v, %v; want the stream's error", got, err)
	}
	if !retryable(err) {
		t.Errorf("retryable(%v) = false; want true", err)
	}
	if d, ok := retryAfter(err); !ok || d != 7*time.Second {
		t.Errorf("retryAfter(%v) = %v, %v; want 7s", err, d, ok)
	}
	if f.local["127.0.0.1:5000/app:qa"] != "sha256:aaaaaaaaaaaa1111" {
		t.Error("a failed pull moved the tag")
	}
}

// TestFakeListImagesReference: the fake's reference filter matches as
// dockerd 20.10's did on the same tags: the familiar name, every tag.
func TestFakeListImagesReference(t *testing.T) {
	f := newFakeDocker()
	for ref, id := range map[string]string{
		"127.0.0.1:5000/app:v1": "sha256:1111", "127.0.0.1:5000/app:v2": "sha256:2222", "127.0.0.1:5000/app2:v1": "sha256:2222",
		"docker.io/myorg/foo:qa": "sha256:1111", "docker.io/myorg/foo:prod": "sha256:2222", "docker.io/library/nginx:latest": "sha256:1111",
	} {
		f.local[ref] = id
	}
	f.repoDigests["sha256:1111"] = []string{"127.0.0.1:5000/app@sha256:cb1a4759f2b7741e28676b06f23c71ed329b25d8232736e677d0f7b6ddef77fe"}
	for _, tt := range []struct {
		filter      string
		wantTags    []string
		wantDigests []string
	}{
		{"127.0.0.1:5000/app", []string{"127.0.0.1:5000/app:v1", "127.0.0.1:5000/app:v2"}, []string{"127.0.0.1:5000/app@sha256:cb1a4759f2b7741e28676b06f23c71ed329b25d8232736e677d0f7b6ddef77fe"}},
		{"myorg/foo", []string{"myorg/foo:prod", "myorg/foo:qa"}, nil},
		{"docker.io/myorg/foo", nil, nil},
		{"nginx", []string{"nginx:latest"}, nil},
		{"docker.io/library/nginx", nil, nil},
		{"127.0.0.1:5000/app:v1", []string{"127.0.0.1:5000/app:v1"}, nil},
	} {
		imgs, err := f.ListImages(docker.ListImagesOptions{Filters: map[string][]string{"reference": {tt.filter}}})
		if err != nil {
			t.Fatal(err)
		}
		var tags, digests []string
		for _, img := range imgs {
			tags, digests = append(tags, img.RepoTags...), append(digests, img.RepoDigests...)
		}
		slices.Sort(tags)
		if !slices.Equal(tags, tt.wantTags) || !slices.Equal(digests, tt.wantDigests) {
			t.Errorf("filter %s: tags %q digests %q; want %q %q", tt.filter, tags, digests, tt.wantTags, tt.wantDigests)
		}
	}
}
