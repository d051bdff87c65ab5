package selfid

import (
	"os"
	"path/filepath"
	"testing"
)

// The samples in testdata/selfid: v1-* were read on this project's test
// machine (Debian dockerd 20.10, cgroup v1) from a busybox container and,
// while another container with --ipc shareable ran, from the host; v2-*
// follow the same format as a cgroup v2 host (Ubuntu 22.04, Docker 24)
// shows it.
func TestContainerIDFromSamples(t *testing.T) {
	const (
		v1Self = "faa7a98fd352ba4340ea0a4b19288157a097e672d653a9fae18e17bf6e14131c"
		v2Self = "4f1c7a0e2b9d8c6e5a3f1b0d9c8e7a6b5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c"
	)
	tests := []struct {
		name              string
		cgroup, mountinfo string // files in testdata/selfid; "" for empty
		want              string
	}{
		{"v1 container", "v1-container.cgroup", "v1-container.mountinfo", v1Self},
		{"v1 container, mountinfo only", "", "v1-container.mountinfo", v1Self},
		{"v1 host next to a container with a shm mount", "v1-host.cgroup", "v1-host-shareable-ipc.mountinfo", ""},
		{"v2 container, private cgroup namespace", "v2-container.cgroup", "v2-container.mountinfo", v2Self},
		{"v2 container, /var/lib/docker its own filesystem", "v2-container-own-fs.cgroup", "v2-container-own-fs.mountinfo", v2Self},
		{"v2 container, host cgroup namespace (systemd driver)", "v2-host-cgroupns.cgroup", "", v2Self},
		{"v2 host install among containers", "v2-host.cgroup", "v2-host.mountinfo", ""},
		{"nothing readable", "", "", ""},
	}
	read := func(name string) []byte {
		if name == "" {
			return nil
		}
		b, err := os.ReadFile(filepath.Join("testdata", "selfid", name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := containerIDFrom(read(tt.cgroup), read(tt.mountinfo)); got != tt.want {
				t.Errorf("container ID = %q; want %q", got, tt.want)
			}
		})
	}
}

func TestContainerIDFromCgroupLines(t *testing.T) {
	const id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	tests := []struct {
		cgroup, want string
	}{
		{"12:memory:/docker/" + id + "\n", id},
		{"1:name=systemd:/system.slice/docker-" + id + ".scope\n", id},
		{"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1a2b.slice/cri-containerd-" + id + ".scope\n", id},
		{"11:cpu:/kubepods/burstable/pod5b4c/" + id + "\n", id},
		{"0::/system.slice/deployer.service\n", ""},
		{"0::/user.slice/user-1000.slice/session-2.scope\n", ""},
		{"0::/system.slice/docker.service\n", ""},
		{"0::/\n", ""},
		{"0::/docker/" + id[:63] + "\n", ""},
	}
	for _, tt := range tests {
		if got := containerIDFromCgroup([]byte(tt.cgroup)); got != tt.want {
			t.Errorf("%q: %q; want %q", tt.cgroup, got, tt.want)
		}
	}
}
