// Package dockerc is the Docker client of the daemon: the endpoint is
// chosen as the Docker CLI chooses it, the Engine API version is
// negotiated (client.go), and events stream without a timer (events.go).
package dockerc

// client.go: the Docker client: the endpoint is chosen as the Docker CLI chooses it
// (-docker, else $DOCKER_HOST, else the default socket; TLS with
// $DOCKER_TLS_VERIFY and the ca.pem, cert.pem, key.pem of
// $DOCKER_CERT_PATH), and the Engine API version is negotiated: the daemon
// says its version on /_ping and every request carries that version,
// capped at the newest this client library knows. An unversioned client
// would send unversioned paths (deprecated by Docker), and a fixed version
// is refused by some daemon: Engine 29 refuses versions below 1.44 and
// Docker 20.10 knows nothing above 1.41.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	docker "github.com/fsouza/go-dockerclient"

	"github.com/die-net/deployer/internal/backoff"
)

// dockerAPIMax is the newest Engine API version go-dockerclient knows:
// v1.13 is built on github.com/moby/moby/api v1.55.0, whose API is 1.55.
// Raise it with go-dockerclient.
const dockerAPIMax = "1.55"

// dockerTLSFiles reads ca.pem and, when both are present, cert.pem and
// key.pem, as the Docker CLI does.
//
//nolint:gosec // G304: the directory the operator configured, as the Docker CLI reads it
func dockerTLSFiles(dir string) (ca, cert, key []byte, err error) {
	if ca, err = os.ReadFile(filepath.Join(dir, "ca.pem")); err != nil {
		return nil, nil, nil, fmt.Errorf("docker TLS: %w", err)
	}
	cert, cerr := os.ReadFile(filepath.Join(dir, "cert.pem"))
	key, kerr := os.ReadFile(filepath.Join(dir, "key.pem"))
	switch {
	case cerr == nil && kerr == nil:
		return ca, cert, key, nil
	case errors.Is(cerr, os.ErrNotExist) && errors.Is(kerr, os.ErrNotExist):
		return ca, nil, nil, nil
	}
	return nil, nil, nil, fmt.Errorf("docker TLS client certificate in %s: %w", dir, errors.Join(cerr, kerr))
}

// Client is go-dockerclient's client with the one call the deploy
// makes that it offers no context for: InspectImage (v1.13). Without a
// deadline, a daemon that accepts the request and never answers would
// hold the deploy, its rollout slot and the daemon's stop for good.
type Client struct {
	*docker.Client
	base    string // URL prefix of requests through the client's transport
	version string // the Engine API version of every request; "" for none
}

// NewFor wraps c, whose requests go to endpoint at API
// version (as c was built with it).
func NewFor(c *docker.Client, endpoint, version string) *Client {
	return &Client{Client: c, base: dockerBaseURL(endpoint, c.TLSConfig != nil), version: version}
}

// InspectImageWithContext is InspectImage (GET /images/{name}/json) ended
// by ctx: docker.ErrNoSuchImage when the daemon has no such image, a
// *docker.Error for any other refusal.
func (c *Client) InspectImageWithContext(ctx context.Context, name string) (*docker.Image, error) {
	path := "/images/" + name + "/json"
	if c.version != "" {
		path = "/v" + c.version + path
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.HTTPClient.Do(req) //nolint:gosec // the operator's own dockerd (-docker_host), not a URL from a request
	if err != nil {
		return nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return nil, docker.ErrNoSuchImage
	case resp.StatusCode/100 != 2:
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		var m struct{ Message string }
		if json.Unmarshal(b, &m) == nil && m.Message != "" {
			b = []byte(m.Message)
		}
		return nil, &docker.Error{Status: resp.StatusCode, Message: string(b)}
	}
	var img docker.Image
	if err := json.NewDecoder(resp.Body).Decode(&img); err != nil {
		return nil, fmt.Errorf("inspect image %s: %w", name, err)
	}
	return &img, nil
}

// Options say where the Docker daemon is and how to reach it; the
// daemon's config fills them from its flags and the environment.
type Options struct {
	Endpoint string // -docker: unix://, tcp:// or https://
	TLS      bool   // reach the endpoint with TLS (-docker_tls_verify)
	CertPath string // ca.pem and the optional cert.pem, key.pem for TLS
}

// New returns a client at the API version the daemon speaks
// (capped at dockerAPIMax). It waits for the daemon to answer, backing
// off, until ctx is done: until then no version is known to be safe.
func New(ctx context.Context, opts Options, log *slog.Logger) (*Client, error) {
	newClient := func(version string) (*docker.Client, error) {
		if !opts.TLS {
			return docker.NewVersionedClient(opts.Endpoint, version)
		}
		ca, cert, key, err := dockerTLSFiles(opts.CertPath)
		if err != nil {
			return nil, err
		}
		return docker.NewVersionedTLSClientFromBytes(opts.Endpoint, cert, key, ca, version)
	}
	// A client without a version, only for its transport (a Unix socket
	// or TLS) to ask the daemon's version on /_ping.
	probe, err := newClient("")
	if err != nil {
		return nil, fmt.Errorf("docker client %s: %w", opts.Endpoint, err)
	}
	base := dockerBaseURL(opts.Endpoint, opts.TLS)
	for attempt := 1; ; attempt++ {
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		version, err := negotiateDockerAPI(pctx, probe.HTTPClient, base)
		cancel()
		if err == nil {
			log.Info("docker API version negotiated", "docker", opts.Endpoint, "api_version", version, "tls", opts.TLS)
			c, err := newClient(version)
			if err != nil {
				return nil, fmt.Errorf("docker client %s: %w", opts.Endpoint, err)
			}
			return NewFor(c, opts.Endpoint, version), nil
		}
		if errors.Is(err, errDockerAPI) {
			return nil, fmt.Errorf("docker %s: %w", opts.Endpoint, err)
		}
		d := backoff.Delay(time.Second, attempt)
		log.Warn("docker not answering; retrying", "docker", opts.Endpoint, "attempt", attempt, "retry_in", d.Round(time.Millisecond), "err", err)
		if !backoff.Sleep(ctx, d) {
			return nil, fmt.Errorf("docker %s: %w (last error: %w)", opts.Endpoint, ctx.Err(), err)
		}
	}
}

// dockerBaseURL is the URL prefix of requests to the endpoint through
// go-dockerclient's transport (which dials the socket itself).
func dockerBaseURL(endpoint string, useTLS bool) string {
	u, err := url.Parse(endpoint)
	if err != nil || u.Scheme == "unix" {
		return "http://unix.sock"
	}
	scheme := "http"
	if useTLS || u.Scheme == "https" {
		scheme = "https"
	}
	return scheme + "://" + u.Host
}

// errDockerAPI marks a daemon that answers but whose API this client
// cannot use; waiting does not help.
var errDockerAPI = errors.New("docker API version")

// negotiateDockerAPI asks the daemon its API version: the API-Version
// header of /_ping (the one unversioned path every daemon serves), else
// the ApiVersion of /version for daemons older than that header. It
// returns the lower of it and dockerAPIMax.
func negotiateDockerAPI(ctx context.Context, hc *http.Client, base string) (string, error) {
	get := func(path string) (*http.Response, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+path, nil)
		if err != nil {
			return nil, err
		}
		resp, err := hc.Do(req)
		if err != nil {
			return nil, err
		}
		if resp.StatusCode != http.StatusOK {
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
			_ = resp.Body.Close()
			return nil, fmt.Errorf("GET %s: %s: %s", path, resp.Status, strings.TrimSpace(string(b)))
		}
		return resp, nil
	}
	resp, err := get("/_ping")
	if err != nil {
		return "", err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1024))
	_ = resp.Body.Close()
	v := resp.Header.Get("API-Version")
	if v == "" {
		if resp, err = get("/version"); err != nil {
			return "", err
		}
		var body struct{ ApiVersion string }
		err = json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&body)
		_ = resp.Body.Close()
		if err != nil {
			return "", fmt.Errorf("GET /version: %w", err)
		}
		v = body.ApiVersion
	}
	return capDockerAPI(v)
}

// capDockerAPI returns the lower of the daemon's version v and dockerAPIMax.
func capDockerAPI(v string) (string, error) {
	got, err := docker.NewAPIVersion(v)
	if err != nil || !strings.HasPrefix(v, "1.") {
		return "", fmt.Errorf("%w: the daemon reports %q, not a version like 1.41", errDockerAPI, v)
	}
	limit, _ := docker.NewAPIVersion(dockerAPIMax)
	if got.GreaterThan(limit) {
		return dockerAPIMax, nil
	}
	return got.String(), nil
}
