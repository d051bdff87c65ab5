package main

import (
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/distribution/reference"
	docker "github.com/fsouza/go-dockerclient"
)

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
