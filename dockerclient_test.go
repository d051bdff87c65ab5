package main

import (
	"context"
	"errors"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/distribution/reference"
	docker "github.com/fsouza/go-dockerclient"

	"github.com/die-net/deployer/internal/dockerc"
	"github.com/die-net/deployer/internal/testca"
	"github.com/die-net/deployer/internal/testdocker"
)

// handlerFunc is a slog.Handler calling f for every record.
type handlerFunc func(slog.Record)

func (h handlerFunc) Enabled(context.Context, slog.Level) bool      { return true }
func (h handlerFunc) Handle(_ context.Context, r slog.Record) error { h(r); return nil }
func (h handlerFunc) WithAttrs([]slog.Attr) slog.Handler            { return h }
func (h handlerFunc) WithGroup(string) slog.Handler                 { return h }

func TestDockerEndpointFlags(t *testing.T) {
	certs := testdocker.CertDir(t, testca.New(t, "ca"))
	noCA := t.TempDir()
	tests := []struct {
		name     string
		args     []string
		env      []string
		endpoint string
		tls      bool
		certPath string
		wantErr  string
	}{
		{"default socket", nil, []string{"HOME", "/home/u"}, "unix:///var/run/docker.sock", false, "/home/u/.docker", ""},
		{"DOCKER_HOST", nil, []string{"DOCKER_HOST", "tcp://10.1.2.3:2375"}, "tcp://10.1.2.3:2375", false, "", ""},
		{"DOCKER_HOST with TLS", nil, []string{"DOCKER_HOST", "tcp://h:2376", "DOCKER_TLS_VERIFY", "1", "DOCKER_CERT_PATH", certs}, "tcp://h:2376", true, certs, ""},
		{"-docker wins, TLS from the environment", []string{"-docker", "tcp://other:2376"}, []string{"DOCKER_HOST", "tcp://h:2376", "DOCKER_TLS_VERIFY", "1", "DOCKER_CERT_PATH", certs}, "tcp://other:2376", true, certs, ""},
		{"flags instead of the environment", []string{"-docker", "tcp://h:2376", "-docker_tls_verify", "-docker_cert_path", certs}, nil, "tcp://h:2376", true, certs, ""},
		{"TLS ignored for the socket", []string{"-docker", "unix:///run/docker.sock"}, []string{"DOCKER_TLS_VERIFY", "1", "DOCKER_CERT_PATH", noCA}, "unix:///run/docker.sock", false, noCA, ""},
		{"TLS without ca.pem", nil, []string{"DOCKER_HOST", "tcp://h:2376", "DOCKER_TLS_VERIFY", "1", "DOCKER_CERT_PATH", noCA}, "", false, "", "ca.pem"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := parseFlags("deployer", tt.args, env(tt.env...), io.Discard)
			if tt.wantErr != "" {
				if !errors.Is(err, errInvalidFlag) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("parseFlags = %v; want errInvalidFlag naming %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Docker != tt.endpoint || c.dockerUsesTLS() != tt.tls || c.DockerCertPath != tt.certPath {
				t.Errorf("docker %q tls %v cert path %q; want %q %v %q", c.Docker, c.dockerUsesTLS(), c.DockerCertPath, tt.endpoint, tt.tls, tt.certPath)
			}
		})
	}
}

// silentEngine is a dockerd that accepts a request and never answers it
// when hang matches it ("METHOD /path", version stripped): it reads the
// request and holds the connection until the test ends. Every other
// request gets the answer of a quiet daemon with one running container,
// app (old1) on reg:5000/app:qa.
type silentEngine struct {
	hang    func(req string) bool
	release chan struct{}

	mu   sync.Mutex
	held []string
}

// versionedPath is a request path with its API version: /v1.44/….
var versionedPath = regexp.MustCompile(`^/v(\d+\.\d+)(/.*)$`)

func (e *silentEngine) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	path := r.URL.Path
	if m := versionedPath.FindStringSubmatch(path); m != nil {
		path = m[2]
	}
	req := r.Method + " " + path
	_, _ = io.Copy(io.Discard, r.Body)
	if e.hang(req) {
		e.mu.Lock()
		e.held = append(e.held, req)
		e.mu.Unlock()
		select { // never answers
		case <-r.Context().Done():
		case <-e.release:
		}
		return
	}
	w.Header().Set("Content-Type", "application/json")
	switch {
	case req == "GET /events": // a stream: headers, then nothing
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		select {
		case <-r.Context().Done():
		case <-e.release:
		}
	case req == "GET /_ping":
		io.WriteString(w, "OK")
	case req == "GET /version": // go-dockerclient checks it before its first call
		io.WriteString(w, `{"Version":"fake","ApiVersion":"1.44","MinAPIVersion":"1.24"}`)
	case req == "GET /images/json":
		io.WriteString(w, `[]`)
	case req == "GET /containers/json":
		io.WriteString(w, `[{"Id":"old1","Image":"reg:5000/app:qa","ImageID":"sha256:old","Names":["/app"],"State":"running"}]`)
	case req == "GET /containers/app/json": // by name: what holds the name once the old one is parked
		io.WriteString(w, `{"Id":"new1","Name":"/app","Image":"sha256:new","Config":{"Image":"reg:5000/app:qa"},"HostConfig":{},"State":{"Running":false}}`)
	case strings.HasPrefix(req, "GET /containers/") && strings.HasSuffix(req, "/json"):
		io.WriteString(w, `{"Id":"old1","Name":"/app","Image":"sha256:old","Config":{"Image":"reg:5000/app:qa"},"HostConfig":{"RestartPolicy":{"Name":"always"}},"State":{"Running":true}}`)
	case strings.HasPrefix(req, "GET /images/"):
		w.WriteHeader(http.StatusNotFound)
		io.WriteString(w, `{"message":"No such image"}`)
	case req == "POST /images/create":
		io.WriteString(w, `{"status":"Status: Image is up to date for reg:5000/app:qa"}`+"\n")
	case req == "POST /containers/create":
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, `{"Id":"new1"}`)
	default: // stop, start, rename, remove
		w.WriteHeader(http.StatusNoContent)
	}
}

// heldRequests returns the requests the engine has held.
func (e *silentEngine) heldRequests() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.held...)
}

// TestDockerCallsHaveDeadlines: for each Docker call a deploy makes, a
// dockerd that accepts the request and never answers does not hold the
// deploy: the call returns within its deadline, through the real client
// and the deployer's own code around the call.
func TestDockerCallsHaveDeadlines(t *testing.T) {
	const to = 200 * time.Millisecond // every component's call timeout here
	repo := testRepo(t, "reg:5000/app")
	named, err := reference.ParseNormalizedNamed("reg:5000/app:qa")
	if err != nil {
		t.Fatal(err)
	}
	ref := named.(reference.NamedTagged)
	old := &docker.Container{ID: "old1", Name: "/app", Image: "sha256:old", Config: &docker.Config{Image: "reg:5000/app:qa"},
		HostConfig: &docker.HostConfig{RestartPolicy: docker.AlwaysRestart()}, State: docker.State{Running: true}}
	stale := func() staleContainer {
		return staleContainer{ID: "old1", Name: "app", Ref: testTagged("reg:5000/app:qa"), ImageID: "sha256:old", NewID: "sha256:new",
			scan: newScanned(old, time.Now(), map[string]bool{})}
	}
	type parts struct {
		p  *puller
		rs *restarter
		r  *recreator
		ev *dockerc.Events
		w  *upWaiter
		e  *silentEngine
	}
	tests := []struct {
		name string
		hang []string // requests held, each must be reached
		call func(ctx context.Context, c parts) error
	}{
		{"list images", []string{"GET /images/json"}, func(ctx context.Context, c parts) error {
			_, _, err := c.p.localImages(ctx, repo)
			return err
		}},
		{"pull", []string{"POST /images/create"}, func(ctx context.Context, c parts) error {
			_, err := c.p.pull(ctx, ref)
			return err
		}},
		{"inspect image (pull)", []string{"GET /images/reg:5000/app:qa/json"}, func(ctx context.Context, c parts) error {
			_, _, err := c.p.image(ctx, ref)
			return err
		}},
		{"list containers", []string{"GET /containers/json"}, func(ctx context.Context, c parts) error {
			_, err := c.rs.stale(ctx, repo, map[string]string{"qa": "sha256:new"})
			return err
		}},
		{"inspect container", []string{"GET /containers/old1/json"}, func(ctx context.Context, c parts) error {
			_, err := c.rs.stale(ctx, repo, map[string]string{"qa": "sha256:new"})
			return err
		}},
		{"stop", []string{"POST /containers/old1/stop"}, func(ctx context.Context, c parts) error {
			return c.rs.stopOne(ctx, stale())
		}},
		{"start the old container again", []string{"POST /containers/old1/start"}, func(ctx context.Context, c parts) error {
			return c.rs.restartOld(ctx, stale(), docker.RestartPolicy{})
		}},
		{"inspect image (recreate)", []string{"GET /images/sha256:old/json", "POST /containers/old1/rename"}, func(ctx context.Context, c parts) error {
			return c.r.recreate(ctx, stale(), nil, nil)
		}},
		{"rename", []string{"POST /containers/old1/rename"}, func(ctx context.Context, c parts) error {
			return c.r.recreate(ctx, stale(), nil, nil)
		}},
		{"update the restart policy", []string{"POST /containers/old1/update"}, func(ctx context.Context, c parts) error {
			return c.r.recreate(ctx, stale(), nil, nil)
		}},
		{"create", []string{"POST /containers/create"}, func(ctx context.Context, c parts) error {
			return c.r.recreate(ctx, stale(), nil, nil)
		}},
		{"start", []string{"POST /containers/new1/start"}, func(ctx context.Context, c parts) error {
			return c.r.recreate(ctx, stale(), nil, nil)
		}},
		{"remove", []string{"POST /containers/new1/start", "DELETE /containers/new1"}, func(ctx context.Context, c parts) error {
			return c.r.recreate(ctx, stale(), nil, nil)
		}},
		{"events (status)", []string{"GET /events"}, func(ctx context.Context, c parts) error {
			return c.ev.AddEventListenerWithOptions(docker.EventsOptions{}, make(chan *docker.APIEvents, 1)) //nolint:contextcheck // a subscription outlives the call; its deadline is the call timeout
		}},
		{"events (wait for the replacement)", []string{"GET /events"}, func(ctx context.Context, c parts) error {
			ev := c.w.watch() // subscribes within the call timeout, or polls
			defer ev.close()
			if ev.events() != nil {
				return nil
			}
			return errors.New("not subscribed: dockerd did not answer")
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := &silentEngine{release: make(chan struct{}), hang: func(req string) bool { return slices.Contains(tt.hang, req) }}
			sock := filepath.Join(t.TempDir(), "docker.sock")
			ln, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			srv := &http.Server{Handler: e, ErrorLog: log.New(io.Discard, "", 0)}
			go srv.Serve(ln)
			t.Cleanup(func() { close(e.release); srv.Close() })
			c, err := docker.NewVersionedClient("unix://"+sock, "1.44")
			if err != nil {
				t.Fatal(err)
			}
			dc := dockerc.NewFor(c, "unix://"+sock, "1.44")
			m, lg := newMetrics(), testLogger(t)
			w := newUpWaiter(dc, eventsFor(dc, to), time.Minute, to, lg, m)
			rs := newRestarter(dc, w, 0, "", lg, m)
			rs.callTimeout, rs.parked.callTimeout = to, to
			r := newRecreator(dc, rs, w, lg, m)
			r.callTimeout = to
			p := newPuller(dc, "", lg, m)
			p.callTimeout, p.pullTimeout = to, to
			done := make(chan error, 1)
			start := time.Now()
			go func() {
				done <- tt.call(t.Context(), parts{p: p, rs: rs, r: r, ev: dockerc.NewEvents(c, to), w: w, e: e})
			}()
			select {
			case err := <-done:
				if err == nil {
					t.Errorf("%s returned no error with dockerd silent", tt.name)
				}
				t.Logf("returned after %v: %v", time.Since(start).Round(time.Millisecond), err)
			case <-time.After(10 * time.Second):
				t.Fatalf("%s still waiting 10s after dockerd went silent (call timeout %v)", tt.name, to)
			}
			for _, want := range tt.hang {
				if _, ok := pollUntil(5*time.Second, pollEvery, func() bool { return slices.Contains(e.heldRequests(), want) }); !ok {
					t.Fatalf("%s never reached dockerd; held %q", want, e.heldRequests())
				}
			}
		})
	}
}
