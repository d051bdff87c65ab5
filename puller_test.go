package main

import (
	"encoding/base64"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"testing"

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
	err := p.pull(t.Context(), ref.(reference.NamedTagged))
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
