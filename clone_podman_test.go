package main

import (
	"encoding/json"
	"os"
	"reflect"
	"slices"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
)

// readPodmanPayload decodes a payload captured from Podman 4.3.1's Docker
// API (testdata/podman, testdata/README.md).
func readPodmanPayload(t *testing.T, name string, v any) {
	t.Helper()
	b, err := os.ReadFile("testdata/podman/" + name)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatal(err)
	}
}

// TestCloneConfigPodman: a richly configured container as Podman's inspect
// reports it gives a configuration Podman's create accepts and that
// keeps everything Podman shows: ulimits under Docker's names (Podman's
// inspect says RLIMIT_NOFILE, its create refuses it), devices with
// permissions (inspect says "", create refuses it), and no environment
// Podman added (HOSTNAME=<the old container's ID>, container=podman,
// TERM=xterm) or the image set (PATH, IMGVAR).
func TestCloneConfigPodman(t *testing.T) {
	var old docker.Container
	var img docker.Image
	readPodmanPayload(t, "container-inspect.json", &old)
	readPodmanPayload(t, "image-inspect.json", &img)
	cfg, host, netcfg := cloneConfig(&old, img.Config, "sha256:new")

	checks := []struct {
		field     string
		got, want any
	}{
		{"Env", cfg.Env, []string{"FOO=bar"}},
		{"Hostname", cfg.Hostname, ""},
		{"Labels", cfg.Labels, map[string]string{"app": "rich"}},
		{"Cmd", cfg.Cmd, []string(nil)},
		{"Entrypoint", cfg.Entrypoint, []string(nil)},
		{"WorkingDir", cfg.WorkingDir, "/named"},
		{"StopSignal", cfg.StopSignal, "2"},
		{"StopTimeout", cfg.StopTimeout, 7},
		{"Healthcheck", cfg.Healthcheck, &docker.HealthConfig{Test: []string{"CMD-SHELL", "true"}, Interval: 5 * time.Second, Timeout: 30 * time.Second, Retries: 3}},
		{"Ulimits", host.Ulimits, []docker.ULimit{{Name: "nofile", Soft: 1024, Hard: 2048}, {Name: "nproc", Soft: 4096, Hard: 4096}}},
		{"Devices", host.Devices, []docker.Device{{PathOnHost: "/dev/null", PathInContainer: "/dev/xnull", CgroupPermissions: "rwm"}}},
		{"RestartPolicy", host.RestartPolicy, docker.AlwaysRestart()},
		{"CapAdd", host.CapAdd, []string{"NET_ADMIN"}},
		{"CapDrop", host.CapDrop, []string{"MKNOD"}},
		{"Tmpfs", host.Tmpfs, map[string]string{"/mnt/tmpm": "rw,rprivate,nosuid,nodev,tmpcopyup", "/scratch": "size=1m,rw,rprivate,nosuid,nodev,tmpcopyup"}},
		{"NetworkMode", host.NetworkMode, "none"},
		{"Memory", host.Memory, int64(64 << 20)},
		{"ShmSize", host.ShmSize, int64(2 << 20)},
		// Podman's inspect names the volumes (anonymous ones too) in Binds.
		{"Binds", host.Binds, old.HostConfig.Binds},
		{"networking config", netcfg, (*docker.NetworkingConfig)(nil)},
	}
	for _, c := range checks {
		if !reflect.DeepEqual(c.got, c.want) {
			t.Errorf("%s: got %#v; want %#v", c.field, c.got, c.want)
		}
	}
	if old.HostConfig.Ulimits[0].Name != "RLIMIT_NOFILE" || old.HostConfig.Devices[0].CgroupPermissions != "" || !slices.Contains(old.Config.Env, "HOSTNAME=f3f2d2601d08") {
		t.Error("cloneConfig changed the old container's configuration")
	}
}

// TestCloneConfigPodmanRoundTrip: re-creating the container a re-create
// made gives the same configuration again: nothing drifts from one
// version to the next.
func TestCloneConfigPodmanRoundTrip(t *testing.T) {
	var old, recreated docker.Container
	var img docker.Image
	readPodmanPayload(t, "container-inspect.json", &old)
	readPodmanPayload(t, "recreated-inspect.json", &recreated)
	readPodmanPayload(t, "image-inspect.json", &img)
	cfg1, host1, _ := cloneConfig(&old, img.Config, img.ID)
	cfg2, host2, _ := cloneConfig(&recreated, img.Config, img.ID)
	cfg2.Image, cfg1.Image = "", ""
	if !reflect.DeepEqual(cfg1, cfg2) {
		t.Errorf("config drifts:\nfirst  %+v\nsecond %+v", cfg1, cfg2)
	}
	slices.Sort(host1.Binds)
	slices.Sort(host2.Binds)
	if !reflect.DeepEqual(host1, host2) {
		t.Errorf("host config drifts:\nfirst  %+v\nsecond %+v", host1, host2)
	}
}

// TestRuntimeAddedEnv: only what the runtime adds is left out: a HOSTNAME
// the user set, or one beside a hostname of their own, stays; Docker's
// containers (no container=podman) keep TERM.
func TestRuntimeAddedEnv(t *testing.T) {
	const id = "f3f2d2601d08a5dc312ea2f0bd72fab4baf912764cf37d0df4e41f0a5b06ccf5"
	tests := []struct {
		name     string
		env      []string
		hostname string
		want     []string
	}{
		{"podman default hostname", []string{"HOSTNAME=f3f2d2601d08", "container=podman"}, "f3f2d2601d08", []string{"HOSTNAME=f3f2d2601d08", "container=podman", "TERM=xterm"}},
		{"podman, --hostname app", []string{"HOSTNAME=app", "container=podman"}, "app", []string{"container=podman", "TERM=xterm"}},
		{"docker, TERM set by the user", []string{"TERM=xterm"}, "f3f2d2601d08", []string{"HOSTNAME=f3f2d2601d08"}},
	}
	for _, tt := range tests {
		if got := runtimeAddedEnv(tt.env, tt.hostname, id); !slices.Equal(got, tt.want) {
			t.Errorf("%s: %q; want %q", tt.name, got, tt.want)
		}
	}
}
