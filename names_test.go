package main

import (
	"errors"
	"testing"
)

func TestRegistryHost(t *testing.T) {
	tests := []struct {
		in, want string
		bad      bool
	}{
		{in: "", want: "docker.io"},
		{in: "https://index.docker.io/v1/", want: "docker.io"},
		{in: "registry-1.docker.io", want: "docker.io"},
		{in: "127.0.0.1:5000", want: "127.0.0.1:5000"},
		{in: "http://127.0.0.1:5000/", want: "127.0.0.1:5000"},
		{in: "quay.io", want: "quay.io"},
		{in: "https://", bad: true},
		{in: "bad host:1", bad: true},
	}
	for _, tt := range tests {
		got, err := registryHost(tt.in)
		if (err != nil) != tt.bad || got != tt.want {
			t.Errorf("registryHost(%q) = %q, %v; want %q, error %v", tt.in, got, err, tt.want, tt.bad)
		}
	}
}

func TestCheckRepoName(t *testing.T) {
	tests := []struct {
		name string
		ok   bool
	}{
		{"myorg/foo", true},
		{"foo", true},
		{"127.0.0.1:5000/app", true},
		{"docker.io/myorg/foo", true},
		{"", false},
		{"*", false},
		{"..", false},
		{"../other/key", false},
		{"myorg/../x", false},
		{"MyOrg/foo", false},
		{"myorg/foo:qa", false},
		{"myorg/foo@sha256:2aad020a0ba75a6264d44d2b876a37aa69d1a76fdd8e615bdebeae61e55799d3", false},
		{"_nodes/x", false},
		{"myorg//foo", false},
		{"myorg/foo/", false},
		{"/myorg/foo", false},
		{"my org/foo", false},
	}
	for _, tt := range tests {
		err := checkRepoName(tt.name)
		if (err == nil) != tt.ok {
			t.Errorf("checkRepoName(%q) = %v; want ok=%v", tt.name, err, tt.ok)
		}
		if err != nil && !errors.Is(err, errBadRepo) {
			t.Errorf("checkRepoName(%q) = %v; want errBadRepo", tt.name, err)
		}
	}
}

func TestResolveRepo(t *testing.T) {
	tests := []struct {
		name, registry, want string
	}{
		{"myorg/foo", "docker.io", "docker.io/myorg/foo"},
		{"nginx", "docker.io", "docker.io/library/nginx"},
		{"myorg/foo", "127.0.0.1:5000", "127.0.0.1:5000/myorg/foo"},
		{"app", "127.0.0.1:5000", "127.0.0.1:5000/app"},
		{"quay.io/team/app", "127.0.0.1:5000", "quay.io/team/app"},
		{"localhost:5000/app", "docker.io", "localhost:5000/app"},
	}
	for _, tt := range tests {
		got, err := resolveRepo(tt.name, tt.registry)
		if err != nil || got.Name() != tt.want {
			t.Errorf("resolveRepo(%q, %q) = %v, %v; want %q", tt.name, tt.registry, got, err, tt.want)
		}
	}
}

func TestLocalTagMatchesDockerHubForms(t *testing.T) {
	// Docker lists Hub images without "docker.io/"; both forms are the
	// same repository.
	for _, rt := range []string{"myorg/foo:qa", "docker.io/myorg/foo:qa"} {
		tag, ok := localTag(rt)
		if !ok || tag.Name() != "docker.io/myorg/foo" || tag.Tag() != "qa" {
			t.Errorf("localTag(%q) = %v, %v; want docker.io/myorg/foo:qa", rt, tag, ok)
		}
	}
	for _, rt := range []string{"<none>:<none>", "myorg/foo", "registry:5000/app"} {
		if tag, ok := localTag(rt); ok {
			t.Errorf("localTag(%q) = %v; want no tag", rt, tag)
		}
	}
	// A registry with a port: the original split at the first colon.
	if tag, ok := localTag("registry:5000/app:v2"); !ok || tag.Name() != "registry:5000/app" || tag.Tag() != "v2" {
		t.Errorf("localTag(registry:5000/app:v2) = %v, %v", tag, ok)
	}
}

func TestContainerRef(t *testing.T) {
	const id = "sha256:ac5e77357f51e754226682505f9882939715217361d89bd1a47b916f7320cc1d"
	tests := []struct {
		image string
		want  string // "" = never touched
	}{
		{"myorg/foo", "docker.io/myorg/foo:latest"},
		{"myorg/foo:qa", "docker.io/myorg/foo:qa"},
		{"127.0.0.1:5000/app:qa", "127.0.0.1:5000/app:qa"},
		{"myorg/foo@sha256:2aad020a0ba75a6264d44d2b876a37aa69d1a76fdd8e615bdebeae61e55799d3", ""},
		{"myorg/foo:qa@sha256:2aad020a0ba75a6264d44d2b876a37aa69d1a76fdd8e615bdebeae61e55799d3", ""},
		{"ac5e77357f51", ""},
		{id, ""},
		{"ac5e77357f51e754226682505f9882939715217361d89bd1a47b916f7320cc1d", ""},
		{"", ""},
	}
	for _, tt := range tests {
		got, ok := containerRef(tt.image, id)
		if tt.want == "" {
			if ok {
				t.Errorf("containerRef(%q) = %v; want untouchable", tt.image, got)
			}
			continue
		}
		if !ok || got.String() != tt.want {
			t.Errorf("containerRef(%q) = %v, %v; want %s", tt.image, got, ok, tt.want)
		}
	}
}
