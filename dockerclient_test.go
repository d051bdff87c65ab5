package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/distribution/reference"
	docker "github.com/fsouza/go-dockerclient"
)

// fakeEngine is a small Docker Engine API that checks versions as a
// daemon does: Engine 29 refuses API versions below 1.44 with a 400, and
// this one also refuses unversioned paths (deprecated upstream) except
// /_ping, the path clients negotiate with.
type fakeEngine struct {
	api, min     string // the versions the daemon reports and accepts
	noPingHeader bool   // a daemon from before /_ping's API-Version
	endpoint     string // for -docker

	mu    sync.Mutex
	paths []string
}

var versionedPath = regexp.MustCompile(`^/v(\d+\.\d+)(/.*)$`)

func (f *fakeEngine) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.paths = append(f.paths, r.Method+" "+r.URL.Path)
	f.mu.Unlock()
	fail := func(code int, format string, args ...any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(map[string]string{"message": fmt.Sprintf(format, args...)})
	}
	path := r.URL.Path
	switch m := versionedPath.FindStringSubmatch(path); {
	case path == "/_ping":
		if !f.noPingHeader {
			w.Header().Set("API-Version", f.api)
		}
		io.WriteString(w, "OK")
		return
	case path == "/version" && f.noPingHeader:
		// An old daemon serves everything unversioned.
	case m == nil:
		fail(http.StatusBadRequest, "unversioned API requests are not supported: use /v%s%s", f.api, path)
		return
	default:
		v, _ := docker.NewAPIVersion(m[1])
		lo, _ := docker.NewAPIVersion(f.min)
		hi, _ := docker.NewAPIVersion(f.api)
		if v.LessThan(lo) {
			fail(http.StatusBadRequest, "client version %s is too old. Minimum supported API version is %s, please upgrade your client to a newer version", m[1], f.min)
			return
		}
		if v.GreaterThan(hi) {
			fail(http.StatusBadRequest, "client version %s is too new. Maximum supported API version is %s", m[1], f.api)
			return
		}
		path = m[2]
	}
	w.Header().Set("Content-Type", "application/json")
	switch {
	case path == "/_ping":
		io.WriteString(w, "OK")
	case path == "/version":
		fmt.Fprintf(w, `{"Version":"fake","ApiVersion":%q,"MinAPIVersion":%q}`, f.api, f.min)
	case path == "/images/json":
		io.WriteString(w, `[{"Id":"sha256:aaa","RepoTags":["myorg/foo:latest"]}]`)
	case path == "/images/create" && r.Method == http.MethodPost:
		io.WriteString(w, `{"status":"Status: Image is up to date for myorg/foo:latest"}`+"\n")
	case path == "/containers/json":
		io.WriteString(w, `[{"Id":"c1","Image":"myorg/foo:latest","ImageID":"sha256:aaa","Names":["/app"],"State":"running"}]`)
	case path == "/containers/c1/json":
		io.WriteString(w, `{"Id":"c1","Name":"/app","Image":"sha256:aaa","Config":{"Image":"myorg/foo:latest"},"State":{"Running":true}}`)
	case path == "/containers/c1/stop" && r.Method == http.MethodPost:
		w.WriteHeader(http.StatusNoContent)
	case path == "/images/myorg/foo:latest/json":
		io.WriteString(w, `{"Id":"sha256:aaa","RepoTags":["myorg/foo:latest"],"Config":{"Cmd":["/app"]}}`)
	default:
		fail(http.StatusNotFound, "page not found")
	}
}

// requests returns the requests seen so far.
func (f *fakeEngine) requests() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.paths...)
}

// startFakeEngine serves f on a Unix socket ("unix"), TCP ("tcp") or TCP
// with TLS that requires a client certificate of ca ("tls").
func startFakeEngine(t *testing.T, f *fakeEngine, transport string, ca *testCA) {
	t.Helper()
	ts := httptest.NewUnstartedServer(f)
	ts.Config.ErrorLog = log.New(io.Discard, "", 0)
	switch transport {
	case "unix":
		sock := filepath.Join(t.TempDir(), "docker.sock")
		ln, err := net.Listen("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		ts.Listener.Close()
		ts.Listener = ln
		ts.Start()
		f.endpoint = "unix://" + sock
	case "tcp":
		ts.Start()
		f.endpoint = "tcp://" + ts.Listener.Addr().String()
	case "tls":
		ts.TLS = ca.serverTLS(t, ca)
		ts.StartTLS()
		f.endpoint = "tcp://" + ts.Listener.Addr().String()
	}
	t.Cleanup(ts.Close)
}

// dockerCertDir writes ca.pem, cert.pem and key.pem as the Docker CLI
// expects them in $DOCKER_CERT_PATH.
func dockerCertDir(t *testing.T, ca *testCA) string {
	dir := t.TempDir()
	c, k := ca.issue(t, "deployer", false, time.Now().Add(time.Hour))
	writeFile(t, dir, "ca.pem", ca.pem)
	writeFile(t, dir, "cert.pem", c)
	writeFile(t, dir, "key.pem", k)
	return dir
}

func TestDockerAPINegotiation(t *testing.T) {
	ca := newTestCA(t, "docker CA")
	tests := []struct {
		name      string
		engine    *fakeEngine
		transport string
		want      string
	}{
		{"engine 29 on the socket", &fakeEngine{api: "1.52", min: "1.44"}, "unix", "1.52"},
		{"docker 20.10 over tcp", &fakeEngine{api: "1.41", min: "1.12"}, "tcp", "1.41"},
		{"engine 29 over TLS, DOCKER_TLS_VERIFY", &fakeEngine{api: "1.52", min: "1.44"}, "tls", "1.52"},
		{"a daemon newer than the client", &fakeEngine{api: "1.99", min: "1.44"}, "unix", dockerAPIMax},
		{"a daemon without API-Version on /_ping", &fakeEngine{api: "1.24", min: "1.12", noPingHeader: true}, "unix", "1.24"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := tt.engine
			startFakeEngine(t, f, tt.transport, ca)
			e := env()
			if tt.transport == "tls" {
				e = env("DOCKER_TLS_VERIFY", "1", "DOCKER_CERT_PATH", dockerCertDir(t, ca))
			}
			cfg, err := parseFlags("deployer", []string{"-docker", f.endpoint}, e, io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			client, err := newDockerClient(ctx, cfg, testLogger(t))
			if err != nil {
				t.Fatalf("newDockerClient: %v", err)
			}
			// The calls the deployer makes, through its interface.
			var dc dockerAPI = client
			if err := dc.PingWithContext(ctx); err != nil {
				t.Errorf("ping: %v", err)
			}
			if imgs, err := dc.ListImages(docker.ListImagesOptions{Context: ctx}); err != nil || len(imgs) != 1 {
				t.Errorf("list images = %v, %v", imgs, err)
			}
			if cs, err := dc.ListContainers(docker.ListContainersOptions{Context: ctx}); err != nil || len(cs) != 1 {
				t.Errorf("list containers = %v, %v", cs, err)
			}
			if c, err := dc.InspectContainerWithContext("c1", ctx); err != nil || c.Config.Image != "myorg/foo:latest" {
				t.Errorf("inspect = %v, %v", c, err)
			}
			if err := dc.PullImage(docker.PullImageOptions{Repository: "myorg/foo", Tag: "latest", Context: ctx}, docker.AuthConfiguration{}); err != nil {
				t.Errorf("pull: %v", err)
			}
			if err := dc.StopContainerWithContext("c1", 1, ctx); err != nil {
				t.Errorf("stop: %v", err)
			}
			if img, err := dc.InspectImageWithContext(ctx, "myorg/foo:latest"); err != nil || img.ID != "sha256:aaa" || img.Config == nil {
				t.Errorf("inspect image = %+v, %v", img, err)
			}
			if _, err := dc.InspectImageWithContext(ctx, "myorg/none:latest"); !errors.Is(err, docker.ErrNoSuchImage) {
				t.Errorf("inspect of a missing image = %v; want %v", err, docker.ErrNoSuchImage)
			}
			// Every request but the negotiation carried the version.
			reqs := f.requests()
			for _, r := range reqs[1:] {
				if _, p, _ := strings.Cut(r, " "); !strings.HasPrefix(p, "/v"+tt.want+"/") && (!f.noPingHeader || p != "/version") {
					t.Errorf("request %q; want every request at /v%s/", r, tt.want)
				}
			}
			if len(reqs) < 7 {
				t.Errorf("requests %q; want the negotiation and six calls", reqs)
			}
		})
	}
}

// TestFakeEngineRefusesOldClients checks the fake against the behaviour
// it copies: the clients the deployer used before (unversioned) and a
// client pinned below 1.44 are refused by an Engine 29.
func TestFakeEngineRefusesOldClients(t *testing.T) {
	f := &fakeEngine{api: "1.52", min: "1.44"}
	startFakeEngine(t, f, "unix", nil)
	old, _ := docker.NewVersionedClient(f.endpoint, "1.41")
	_, err := old.ListImages(docker.ListImagesOptions{Context: t.Context()})
	if err == nil || !strings.Contains(err.Error(), "client version 1.41 is too old. Minimum supported API version is 1.44") {
		t.Errorf("a 1.41 client = %v; want the daemon's refusal", err)
	}
	unversioned, _ := docker.NewClient(f.endpoint)
	if _, err := unversioned.ListImages(docker.ListImagesOptions{Context: t.Context()}); err == nil {
		t.Error("an unversioned client was served; want it refused")
	}
}

// TestNewDockerClientWaitsForDocker: a daemon that is not up yet is
// waited for (with a warning), and a daemon that answers with a version
// the client cannot use fails at once.
func TestNewDockerClientWaitsForDocker(t *testing.T) {
	f := &fakeEngine{api: "1.45", min: "1.44"}
	sock := filepath.Join(t.TempDir(), "docker.sock")
	cfg, err := parseFlags("deployer", []string{"-docker", "unix://" + sock}, env(), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	warned := make(chan struct{})
	var once sync.Once
	logger := slog.New(handlerFunc(func(r slog.Record) {
		if r.Message == "docker not answering; retrying" {
			once.Do(func() { close(warned) })
		}
	}))
	type result struct {
		dc  *dockerClient
		err error
	}
	done := make(chan result, 1)
	go func() {
		dc, err := newDockerClient(t.Context(), cfg, logger)
		done <- result{dc, err}
	}()
	select {
	case <-warned:
	case <-time.After(10 * time.Second):
		t.Fatal("no warning while Docker is down")
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: f, ErrorLog: log.New(io.Discard, "", 0)}
	go srv.Serve(ln)
	defer srv.Close()
	var r result
	select {
	case r = <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("newDockerClient did not return once Docker answered")
	}
	if r.err != nil {
		t.Fatal(r.err)
	}
	if _, err := r.dc.ListContainers(docker.ListContainersOptions{Context: t.Context()}); err != nil {
		t.Errorf("list containers: %v", err)
	}

	bad := &fakeEngine{api: "two", min: "1.44"}
	startFakeEngine(t, bad, "unix", nil)
	cfg.Docker = bad.endpoint
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if _, err := newDockerClient(ctx, cfg, testLogger(t)); !errors.Is(err, errDockerAPI) {
		t.Errorf("a daemon reporting version %q: %v; want errDockerAPI at once", bad.api, err)
	}
}

// handlerFunc is a slog.Handler calling f for every record.
type handlerFunc func(slog.Record)

func (h handlerFunc) Enabled(context.Context, slog.Level) bool      { return true }
func (h handlerFunc) Handle(_ context.Context, r slog.Record) error { h(r); return nil }
func (h handlerFunc) WithAttrs([]slog.Attr) slog.Handler            { return h }
func (h handlerFunc) WithGroup(string) slog.Handler                 { return h }

func TestDockerEndpointFlags(t *testing.T) {
	certs := dockerCertDir(t, newTestCA(t, "ca"))
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
		ev *dockerEvents
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
			dc := newDockerClientFor(c, "unix://"+sock, "1.44")
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
				done <- tt.call(t.Context(), parts{p: p, rs: rs, r: r, ev: newDockerEvents(c, to), w: w, e: e})
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
