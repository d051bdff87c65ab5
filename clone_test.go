package main

import (
	"reflect"
	"slices"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
)

// TestKeepVolumes: every volume the old container mounted is attached to
// the new one at the same path, by name, with its options; binds and
// mounts given at create time are kept as they were.
func TestKeepVolumes(t *testing.T) {
	const anon, anon2, anon3 = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0", "a1b2", "c3d4"
	tests := []struct {
		name       string
		mounts     []docker.Mount
		binds      []string
		hostMounts []docker.HostMount
		driver     string
		wantBinds  []string
		wantMounts []docker.HostMount
	}{
		{
			name:      "-v /var/lib/db (anonymous)",
			mounts:    []docker.Mount{{Name: anon, Source: "/var/lib/docker/volumes/" + anon + "/_data", Destination: "/var/lib/db", Driver: "local", RW: true}},
			wantBinds: []string{anon + ":/var/lib/db"},
		},
		{
			name: "named and bind volumes already in Binds",
			mounts: []docker.Mount{
				{Name: "data", Destination: "/named", Driver: "local", Mode: "ro", RW: false},
				{Source: "/srv", Destination: "/srv", Mode: "rshared", RW: true},
			},
			binds:     []string{"data:/named:ro", "/srv:/srv:rshared"},
			wantBinds: []string{"data:/named:ro", "/srv:/srv:rshared"},
		},
		{
			name:       "--mount type=volume without a source, and a read-only named one",
			mounts:     []docker.Mount{{Name: anon2, Destination: "/cache", Driver: "local", RW: true}, {Name: "ro", Destination: "/ro", Driver: "local"}},
			hostMounts: []docker.HostMount{{Type: "volume", Target: "/cache"}, {Type: "volume", Source: "ro", Target: "/ro", ReadOnly: true}},
			wantMounts: []docker.HostMount{{Type: "volume", Source: anon2, Target: "/cache"}, {Type: "volume", Source: "ro", Target: "/ro", ReadOnly: true}},
		},
		{
			name:       "an image VOLUME on another driver, with z",
			mounts:     []docker.Mount{{Name: anon3, Destination: "/x", Driver: "nfs", Mode: "z", RW: true}, {Name: anon, Destination: "/y", Driver: "nfs", Mode: "z,nocopy", RW: true}},
			driver:     "",
			wantMounts: []docker.HostMount{{Type: "volume", Source: anon3, Target: "/x", VolumeOptions: &docker.VolumeOptions{DriverConfig: docker.VolumeDriverConfig{Name: "nfs"}}}, {Type: "volume", Source: anon, Target: "/y", VolumeOptions: &docker.VolumeOptions{DriverConfig: docker.VolumeDriverConfig{Name: "nfs"}}}},
		},
		{
			name:      "the container's --volume-driver, options kept",
			mounts:    []docker.Mount{{Name: anon3, Destination: "/x", Driver: "nfs", Mode: "z", RW: true}},
			driver:    "nfs",
			wantBinds: []string{anon3 + ":/x:z"},
		},
		{
			name:   "tmpfs and binds are not volumes",
			mounts: []docker.Mount{{Source: "/srv", Destination: "/data", RW: true}, {Destination: "/run", RW: true}},
			binds:  []string{"/srv:/data"}, hostMounts: []docker.HostMount{{Type: "tmpfs", Target: "/run"}},
			wantBinds: []string{"/srv:/data"}, wantMounts: []docker.HostMount{{Type: "tmpfs", Target: "/run"}},
		},
	}
	for _, tt := range tests {
		binds, mounts := keepVolumes(tt.mounts, tt.binds, tt.hostMounts, tt.driver)
		if !slices.Equal(binds, tt.wantBinds) {
			t.Errorf("%s: binds %q; want %q", tt.name, binds, tt.wantBinds)
		}
		if !reflect.DeepEqual(mounts, tt.wantMounts) {
			t.Errorf("%s: mounts %+v; want %+v", tt.name, mounts, tt.wantMounts)
		}
	}
}

// TestCloneConfigKeeps: everything given at create time is in the new
// container's configuration; what came from the old image is not.
func TestCloneConfigKeeps(t *testing.T) {
	const oldImg, newImg = "sha256:aaaa", "sha256:bbbb"
	swappiness, pids := int64(10), int64(100)
	host := &docker.HostConfig{
		Binds: []string{"/srv:/data:ro"}, NetworkMode: "none", RestartPolicy: docker.RestartOnFailure(3),
		Tmpfs: map[string]string{"/run": "size=1m"}, Ulimits: []docker.ULimit{{Name: "nofile", Soft: 1024, Hard: 2048}},
		CapAdd: []string{"NET_ADMIN"}, CapDrop: []string{"MKNOD"},
		Devices:   []docker.Device{{PathOnHost: "/dev/zero", PathInContainer: "/dev/myzero", CgroupPermissions: "r"}},
		LogConfig: docker.LogConfig{Type: "json-file", Config: map[string]string{"max-size": "1m"}},
		Memory:    64 << 20, CPUShares: 512, NanoCPUs: 5e8, PidsLimit: &pids, MemorySwappiness: &swappiness,
		SecurityOpt: []string{"no-new-privileges"}, Sysctls: map[string]string{"net.core.somaxconn": "1024"},
		ExtraHosts: []string{"db:127.0.0.1"}, Init: true, ReadonlyRootfs: true, ShmSize: 1 << 20,
	}
	old := &docker.Container{
		ID: "0123456789ab" + "cdef", Name: "/app", Image: oldImg,
		Config: &docker.Config{
			Hostname: "apphost", Domainname: "example", User: "1000:1000", WorkingDir: "/work", Image: "reg/app:qa",
			Env: []string{"PATH=/bin", "A=1"}, Cmd: []string{"serve", "--port=1"}, Entrypoint: []string{"/bin/busybox"},
			Labels: map[string]string{
				"team": "x", "from.image": "1",
				"com.docker.compose.project": "demo", "com.docker.compose.service": "app", composeImageLabel: oldImg,
			},
			Healthcheck: &docker.HealthConfig{Test: []string{"CMD", "true"}, Interval: time.Second, Retries: 2},
			StopSignal:  "SIGINT", StopTimeout: 5, Volumes: map[string]struct{}{"/anon": {}},
		},
		HostConfig: host,
		Mounts:     []docker.Mount{{Source: "/srv", Destination: "/data"}, {Name: "v1", Destination: "/anon", Driver: "local", RW: true}},
	}
	defaults := &docker.Config{
		Env: []string{"PATH=/bin"}, Cmd: []string{"/app"}, Labels: map[string]string{"from.image": "1"},
		// Same test, another interval: the container's is an override.
		Healthcheck: &docker.HealthConfig{Test: []string{"CMD", "true"}, Interval: 30 * time.Second},
		StopSignal:  "SIGTERM",
	}
	cfg, h, netcfg := cloneConfig(old, defaults, newImg)
	want := *old.Config
	want.Env = []string{"A=1"}
	want.Labels = map[string]string{"team": "x", "com.docker.compose.project": "demo", "com.docker.compose.service": "app", composeImageLabel: newImg}
	if !reflect.DeepEqual(*cfg, want) {
		t.Errorf("config:\n got %+v\nwant %+v", *cfg, want)
	}
	wantHost := *host
	wantHost.Binds = []string{"/srv:/data:ro", "v1:/anon"}
	if !reflect.DeepEqual(*h, wantHost) {
		t.Errorf("host config:\n got %+v\nwant %+v", *h, wantHost)
	}
	if netcfg != nil {
		t.Errorf("networking config for --network none: %+v", netcfg)
	}
	if old.HostConfig.Binds[0] != "/srv:/data:ro" || len(old.HostConfig.Binds) != 1 || old.Config.Labels[composeImageLabel] != oldImg {
		t.Error("cloneConfig changed the old container's configuration")
	}

	// The image's own healthcheck and stop signal are left to the new image.
	old.Config.Healthcheck = &docker.HealthConfig{Test: []string{"CMD", "true"}, Interval: 30 * time.Second}
	old.Config.StopSignal = "SIGTERM"
	delete(old.Config.Labels, composeImageLabel)
	cfg, _, _ = cloneConfig(old, defaults, newImg)
	if cfg.Healthcheck != nil || cfg.StopSignal != "" {
		t.Errorf("image defaults kept: healthcheck %+v, stop signal %q", cfg.Healthcheck, cfg.StopSignal)
	}
	if _, ok := cfg.Labels[composeImageLabel]; ok {
		t.Errorf("%s added to a container that had none", composeImageLabel)
	}
}
