// Package testdocker is a small Docker Engine API for tests.
package testdocker

import (
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"regexp"
	"sync"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"

	"github.com/die-net/deployer/internal/testca"
)

// Engine is a small Docker Engine API that checks versions as a
// daemon does: Engine 29 refuses API versions below 1.44 with a 400, and
// this one also refuses unversioned paths (deprecated upstream) except
// /_ping, the path clients negotiate with.
type Engine struct {
	API, Min     string // the versions the daemon reports and accepts
	NoPingHeader bool   // a daemon from before /_ping's API-Version
	Endpoint     string // for -docker, set by Start

	mu    sync.Mutex
	paths []string
}

var versionedPath = regexp.MustCompile(`^/v(\d+\.\d+)(/.*)$`)

func (f *Engine) ServeHTTP(w http.ResponseWriter, r *http.Request) {
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
		if !f.NoPingHeader {
			w.Header().Set("API-Version", f.API)
		}
		io.WriteString(w, "OK")
		return
	case path == "/version" && f.NoPingHeader:
		// An old daemon serves everything unversioned.
	case m == nil:
		fail(http.StatusBadRequest, "unversioned API requests are not supported: use /v%s%s", f.API, path)
		return
	default:
		v, _ := docker.NewAPIVersion(m[1])
		lo, _ := docker.NewAPIVersion(f.Min)
		hi, _ := docker.NewAPIVersion(f.API)
		if v.LessThan(lo) {
			fail(http.StatusBadRequest, "client version %s is too old. Minimum supported API version is %s, please upgrade your client to a newer version", m[1], f.Min)
			return
		}
		if v.GreaterThan(hi) {
			fail(http.StatusBadRequest, "client version %s is too new. Maximum supported API version is %s", m[1], f.API)
			return
		}
		path = m[2]
	}
	w.Header().Set("Content-Type", "application/json")
	switch {
	case path == "/_ping":
		io.WriteString(w, "OK")
	case path == "/version":
		fmt.Fprintf(w, `{"Version":"fake","ApiVersion":%q,"MinAPIVersion":%q}`, f.API, f.Min)
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

// Requests returns the requests seen so far.
func (f *Engine) Requests() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.paths...)
}

// Start serves f on a Unix socket ("unix"), TCP ("tcp") or TCP
// with TLS that requires a client certificate of ca ("tls").
func Start(t *testing.T, f *Engine, transport string, ca *testca.CA) {
	t.Helper()
	ts := httptest.NewUnstartedServer(f)
	ts.Config.ErrorLog = log.New(io.Discard, "", 0)
	switch transport {
	case "unix":
		sock := filepath.Join(t.TempDir(), "docker.sock")
		ln, err := (&net.ListenConfig{}).Listen(t.Context(), "unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		ts.Listener.Close()
		ts.Listener = ln
		ts.Start()
		f.Endpoint = "unix://" + sock
	case "tcp":
		ts.Start()
		f.Endpoint = "tcp://" + ts.Listener.Addr().String()
	case "tls":
		ts.TLS = ca.ServerTLS(t, ca)
		ts.StartTLS()
		f.Endpoint = "tcp://" + ts.Listener.Addr().String()
	}
	t.Cleanup(ts.Close)
}

// CertDir writes ca.pem, cert.pem and key.pem as the Docker CLI
// expects them in $DOCKER_CERT_PATH.
func CertDir(t *testing.T, ca *testca.CA) string {
	dir := t.TempDir()
	c, k := ca.Issue(t, "deployer", false, time.Now().Add(time.Hour))
	testca.WriteFile(t, dir, "ca.pem", ca.PEM)
	testca.WriteFile(t, dir, "cert.pem", c)
	testca.WriteFile(t, dir, "key.pem", k)
	return dir
}
