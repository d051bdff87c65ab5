package dockerc

import (
	"context"
	"errors"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"

	"github.com/die-net/deployer/internal/testca"
	"github.com/die-net/deployer/internal/testdocker"
)

func TestDockerAPINegotiation(t *testing.T) {
	ca := testca.New(t, "docker CA")
	tests := []struct {
		name      string
		engine    *testdocker.Engine
		transport string
		want      string
	}{
		{"engine 29 on the socket", &testdocker.Engine{API: "1.52", Min: "1.44"}, "unix", "1.52"},
		{"docker 20.10 over tcp", &testdocker.Engine{API: "1.41", Min: "1.12"}, "tcp", "1.41"},
		{"engine 29 over TLS, DOCKER_TLS_VERIFY", &testdocker.Engine{API: "1.52", Min: "1.44"}, "tls", "1.52"},
		{"a daemon newer than the client", &testdocker.Engine{API: "1.99", Min: "1.44"}, "unix", dockerAPIMax},
		{"a daemon without API-Version on /_ping", &testdocker.Engine{API: "1.24", Min: "1.12", NoPingHeader: true}, "unix", "1.24"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := tt.engine
			testdocker.Start(t, f, tt.transport, ca)
			opts := Options{Endpoint: f.Endpoint}
			if tt.transport == "tls" { // DOCKER_TLS_VERIFY
				opts.TLS, opts.CertPath = true, testdocker.CertDir(t, ca)
			}
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			client, err := New(ctx, opts, testLogger(t))
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			// The calls the deployer makes.
			dc := client
			if err := dc.PingWithContext(ctx); err != nil {
				t.Errorf("ping: %v", err)
			}
			if imgs, err := dc.ListImages(docker.ListImagesOptions{Context: ctx}); err != nil || len(imgs) != 1 {
				t.Errorf("list images = %v, %v", imgs, err)
			}
			if cs, err := dc.ListContainers(docker.ListContainersOptions{Context: ctx}); err != nil || len(cs) != 1 {
				t.Errorf("list containers = %v, %v", cs, err)
			}
			//nolint:staticcheck // the call the deployer makes
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
			reqs := f.Requests()
			for _, r := range reqs[1:] {
				if _, p, _ := strings.Cut(r, " "); !strings.HasPrefix(p, "/v"+tt.want+"/") && (!f.NoPingHeader || p != "/version") {
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
	f := &testdocker.Engine{API: "1.52", Min: "1.44"}
	testdocker.Start(t, f, "unix", nil)
	old, _ := docker.NewVersionedClient(f.Endpoint, "1.41")
	_, err := old.ListImages(docker.ListImagesOptions{Context: t.Context()})
	if err == nil || !strings.Contains(err.Error(), "client version 1.41 is too old. Minimum supported API version is 1.44") {
		t.Errorf("a 1.41 client = %v; want the daemon's refusal", err)
	}
	unversioned, _ := docker.NewClient(f.Endpoint)
	if _, err := unversioned.ListImages(docker.ListImagesOptions{Context: t.Context()}); err == nil {
		t.Error("an unversioned client was served; want it refused")
	}
}

// TestNewWaitsForDocker: a daemon that is not up yet is
// waited for (with a warning), and a daemon that answers with a version
// the client cannot use fails at once.
func TestNewWaitsForDocker(t *testing.T) {
	f := &testdocker.Engine{API: "1.45", Min: "1.44"}
	sock := filepath.Join(t.TempDir(), "docker.sock")
	opts := Options{Endpoint: "unix://" + sock}
	warned := make(chan struct{})
	var once sync.Once
	logger := slog.New(handlerFunc(func(r slog.Record) {
		if r.Message == "docker not answering; retrying" {
			once.Do(func() { close(warned) })
		}
	}))
	type result struct {
		dc  *Client
		err error
	}
	done := make(chan result, 1)
	go func() {
		dc, err := New(t.Context(), opts, logger)
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
		t.Fatal("New did not return once Docker answered")
	}
	if r.err != nil {
		t.Fatal(r.err)
	}
	if _, err := r.dc.ListContainers(docker.ListContainersOptions{Context: t.Context()}); err != nil {
		t.Errorf("list containers: %v", err)
	}

	bad := &testdocker.Engine{API: "two", Min: "1.44"}
	testdocker.Start(t, bad, "unix", nil)
	opts.Endpoint = bad.Endpoint
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if _, err := New(ctx, opts, testLogger(t)); !errors.Is(err, errDockerAPI) {
		t.Errorf("a daemon reporting version %q: %v; want errDockerAPI at once", bad.API, err)
	}
}

// handlerFunc is a slog.Handler calling f for every record.
type handlerFunc func(slog.Record)

func (h handlerFunc) Enabled(context.Context, slog.Level) bool      { return true }
func (h handlerFunc) Handle(_ context.Context, r slog.Record) error { h(r); return nil }
func (h handlerFunc) WithAttrs([]slog.Attr) slog.Handler            { return h }
func (h handlerFunc) WithGroup(string) slog.Handler                 { return h }

func testLogger(tb testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}
