// Package selfid finds the ID of the container the deployer runs in, if
// any, so that it never stops itself.
package selfid

import (
	"bytes"
	"os"
	"regexp"
	"strings"
)

// The deployer never stops its own container. It finds the container it
// runs in from /proc/self/cgroup (cgroup v1, or v2 without a private
// cgroup namespace: the last path element names the container) and, when
// that says nothing (cgroup v2 with a private cgroup namespace shows "/"),
// from the files Docker bind-mounts into every container: /etc/hostname,
// /etc/hosts and /etc/resolv.conf come from its containers/<id>/ directory.
// Only those mount points count: on a host install, /proc/self/mountinfo
// also lists other containers' mounts (containers/<id>/mounts/shm, overlay
// layers), which must never be taken for our own.

// cgroupContainerID matches the last element of a cgroup path that names a
// container: <id> (cgroupfs driver: /docker/<id>, /kubepods/…/<id>) or
// <runtime>-<id>.scope (systemd driver: docker-<id>.scope,
// cri-containerd-<id>.scope, crio-<id>.scope).
var cgroupContainerID = regexp.MustCompile(`^(?:[a-z][a-z0-9-]*-)?([0-9a-f]{64})(?:\.scope)?$`)

// mountContainerID matches the source of a per-container file Docker
// (…/containers/<id>/hostname) or Podman (…/overlay-containers/<id>/userdata/hostname)
// bind-mounts.
var mountContainerID = regexp.MustCompile(`(?:^|/)(?:containers|overlay-containers)/([0-9a-f]{64})/(?:userdata/)?(?:hostname|hosts|resolv\.conf)$`)

// ContainerID returns the ID of the container this process runs in, or
// "" outside a container.
func ContainerID() string {
	cgroup, _ := os.ReadFile("/proc/self/cgroup")
	mountinfo, _ := os.ReadFile("/proc/self/mountinfo")
	return containerIDFrom(cgroup, mountinfo)
}

func containerIDFrom(cgroup, mountinfo []byte) string {
	if id := containerIDFromCgroup(cgroup); id != "" {
		return id
	}
	return containerIDFromMountinfo(mountinfo)
}

// containerIDFromCgroup reads "hierarchy-ID:controllers:path" lines.
func containerIDFromCgroup(data []byte) string {
	for line := range bytes.Lines(data) {
		parts := strings.SplitN(strings.TrimSpace(string(line)), ":", 3)
		if len(parts) != 3 {
			continue
		}
		path := parts[2]
		last := path[strings.LastIndexByte(path, '/')+1:]
		if m := cgroupContainerID.FindStringSubmatch(last); m != nil {
			return m[1]
		}
	}
	return ""
}

// containerIDFromMountinfo reads proc(5) mountinfo lines: field 4 is the
// mount's root within its filesystem, field 5 its mount point.
func containerIDFromMountinfo(data []byte) string {
	for line := range bytes.Lines(data) {
		f := strings.Fields(string(line))
		if len(f) < 5 {
			continue
		}
		switch f[4] {
		case "/etc/hostname", "/etc/hosts", "/etc/resolv.conf":
		default:
			continue
		}
		if m := mountContainerID.FindStringSubmatch(f[3]); m != nil {
			return m[1]
		}
	}
	return ""
}
