package main

import (
	"context"
	"encoding/base64"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"slices"
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
