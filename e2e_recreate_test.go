//go:build e2e

package main

// Real-stack scenarios of -restart_strategy=recreate (issue 9, points 7–9),
// and of parking (issue 17: dockerd restarting while a container is
// parked, a SIGTERM during the wait for an unsupervised container):
//
//	/work/e2e-slot.sh go test -tags e2e -count=1 -run '^TestE2ERecreate$' -v -timeout 15m .
//
// One node, one etcd member. The containers carry the label
// deployer.strategy=recreate; the deployer binary is built with -tags e2e
// (stack_e2e_test.go), which compiles hook_e2e.go: a delay between the
// parking of the old container and the create of the new one.

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
)

func TestE2ERecreate(t *testing.T) {
	s := newStackWith(t, 1, 1)
	n := s.nodes[0]
	one := []*node{n}
	deploy := func(t *testing.T, repo, tag string) {
		t.Helper()
		if code, body := s.webhook(n, repo, tag); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
	}

	t.Run("anonymous and named volumes keep their files", func(t *testing.T) {
		ref := s.hub.host() + "/myorg/vol:v1"
		s.build(ref, false)
		s.dockerCLI(n.dockerd, "pull", "-q", ref)
		s.dockerCLI(n.dockerd, "volume", "create", "volnamed")
		s.dockerCLI(n.dockerd, "run", "-d", "--name", "vol", "--network", "none", "--restart", "unless-stopped",
			"-l", "deployer.strategy=recreate", "-v", "/var/lib/db", "-v", "volnamed:/named", ref)
		s.dockerCLI(n.dockerd, "exec", "vol", "/bin/busybox", "sh", "-c", "echo anon > /var/lib/db/f && echo named > /named/f")
		oldID, _ := s.containerImage(n, "vol")
		img := s.build(ref, false)
		start := time.Now()
		deploy(t, "myorg/vol", "v1")
		s.waitImage(one, "vol", img, 60*time.Second)
		took := time.Since(start)
		newID, _ := s.containerImage(n, "vol")
		if newID == oldID {
			t.Fatal("vol was not re-created")
		}
		got := s.dockerCLI(n.dockerd, "exec", "vol", "/bin/busybox", "sh", "-c", "cat /var/lib/db/f /named/f 2>&1; true")
		if got != "anon\nnamed" {
			t.Errorf("files in the re-created container: %q; want %q", got, "anon\nnamed")
		}
		s.record("recreate: anonymous volume /var/lib/db and named volume volnamed:/named both kept their file (%q) across the re-create %s → %s in %v",
			got, shortID(oldID), shortID(newID), took.Round(time.Millisecond))
	})

	t.Run("docker inspect differs only where the new image requires it", func(t *testing.T) {
		ref := s.hub.host() + "/myorg/full:v1"
		oldImg := s.build(ref, false)
		s.dockerCLI(n.dockerd, "pull", "-q", ref)
		data := filepath.Join(s.dir, "full-data")
		if err := os.MkdirAll(data, 0o755); err != nil {
			t.Fatal(err)
		}
		// --health-cmd runs /bin/sh -c; the image has only /bin/busybox.
		bb, err := exec.LookPath("busybox")
		if err != nil {
			t.Fatal(err)
		}
		s.dockerCLI(n.dockerd, "run", "-d", "--name", "full", "--network", "none", "--restart", "on-failure:3",
			"-e", "A=1", "-e", "B=two words", "-l", "team=x", "-l", "deployer.strategy=recreate",
			"-l", "com.docker.compose.project=demo", "-l", "com.docker.compose.service=full", "-l", "com.docker.compose.image="+oldImg,
			"--entrypoint", "/bin/busybox", "-u", "1000:1000", "-w", "/work", "--hostname", "fullhost",
			"--health-cmd", "/bin/busybox true", "--health-interval", "1s", "--health-retries", "2", "--health-start-period", "1s",
			"-v", data+":/data:ro", "-v", bb+":/bin/sh:ro", "-v", "/anon", "-v", "fullvol:/named", "--mount", "type=volume,target=/mnt/anon2", "--mount", "type=volume,source=fullro,target=/mnt/ro,readonly",
			"--tmpfs", "/run:size=1m", "--ulimit", "nofile=1024:2048", "--cap-add", "NET_ADMIN", "--cap-drop", "MKNOD",
			"--device", "/dev/zero:/dev/myzero:r", "--log-driver", "json-file", "--log-opt", "max-size=1m",
			"--memory", "64m", "--cpu-shares", "512", "--pids-limit", "100", "--stop-signal", "SIGINT", "--stop-timeout", "5",
			ref, "sh", "-c", "trap 'exit 0' INT TERM; while true; do /bin/busybox sleep 0.2; done")
		waitFor(t, 30*time.Second, "full to be healthy", func() bool {
			c, err := n.cli.InspectContainerWithOptions(docker.InspectContainerOptions{ID: "full"})
			return err == nil && c.State.Health.Status == "healthy"
		})
		before := s.dockerCLI(n.dockerd, "inspect", "full")
		oldID, _ := s.containerImage(n, "full")
		img := s.build(ref, false)
		deploy(t, "myorg/full", "v1")
		s.waitImage(one, "full", img, 60*time.Second)
		after := s.dockerCLI(n.dockerd, "inspect", "full")
		diff := inspectDiff(t, before, after)
		// Per-container identity and state, and what the new image changes.
		expected := []string{"Id", "Created", "Image", "State.", "ResolvConfPath", "HostnamePath", "HostsPath", "LogPath",
			"GraphDriver.", "NetworkSettings.SandboxID", "NetworkSettings.SandboxKey", "NetworkSettings.Networks.none.EndpointID",
			"Config.Labels.com.docker.compose.image",
			// The anonymous volumes, attached by name to the same paths;
			// Docker gives a volume attached by name its default mode "z"
			// (an SELinux relabel, a no-op without SELinux).
			"HostConfig.Binds", "HostConfig.Mounts", "Mounts[/anon].Mode"}
		var unexpected []string
		for _, d := range diff {
			if !slices.ContainsFunc(expected, func(p string) bool { return d == p || strings.HasPrefix(d, p) && strings.HasSuffix(p, ".") }) {
				unexpected = append(unexpected, d)
			}
		}
		if len(unexpected) > 0 {
			t.Errorf("docker inspect of the re-created container differs in %v\nbefore: %s\nafter: %s", unexpected, before, after)
		}
		var c []docker.Container
		if err := json.Unmarshal([]byte(after), &c); err != nil || len(c) != 1 {
			t.Fatalf("inspect: %v", err)
		}
		if c[0].ID == oldID || c[0].Config.Labels[composeImageLabel] != img {
			t.Errorf("re-created full: ID %s (old %s), %s=%q; want a new container and %s", shortID(c[0].ID), shortID(oldID), composeImageLabel, c[0].Config.Labels[composeImageLabel], img)
		}
		s.record("recreate: docker inspect before/after differs in %d fields: %s", len(diff), strings.Join(diff, ", "))
	})

	t.Run("SIGKILL with the old container parked, before the new one is named", func(t *testing.T) {
		ref := s.hub.host() + "/myorg/crash:v1"
		oldImg := s.build(ref, false)
		s.dockerCLI(n.dockerd, "pull", "-q", ref)
		s.dockerCLI(n.dockerd, "volume", "create", "crashvol")
		s.dockerCLI(n.dockerd, "run", "-d", "--name", "crash", "--network", "none", "--restart", "unless-stopped",
			"-l", "deployer.strategy=recreate", "-v", "/var/lib/db", ref)
		s.dockerCLI(n.dockerd, "exec", "crash", "/bin/busybox", "sh", "-c", "echo kept > /var/lib/db/f")
		t.Setenv("DEPLOYER_E2E_PARKED_DELAY", "2m")
		s.restartDeployers()
		img := s.build(ref, false)
		deploy(t, "myorg/crash", "v1")
		waitFor(t, 60*time.Second, "the old crash container to be parked and stopped", func() bool {
			parked, named := crashContainers(t, n, "crash")
			return len(parked) == 1 && !parked[0].running && !named
		})
		n.deployer.stop(syscall.SIGKILL, time.Second)
		killed := time.Now()
		t.Setenv("DEPLOYER_E2E_PARKED_DELAY", "")
		s.runDeployer(n)
		up := waitFor(t, 60*time.Second, "crash to run again", func() bool {
			id, _ := s.containerImage(n, "crash")
			return id != ""
		})
		recovered := time.Since(killed)
		_, runs := s.containerImage(n, "crash")
		which := "old"
		if runs == img {
			which = "new"
		} else if runs != oldImg {
			which = "other " + shortID(runs)
		}
		// The replayed trigger then re-creates it on the new image.
		s.waitImage(one, "crash", img, 90*time.Second)
		waitFor(t, 30*time.Second, "the parked crash container to be removed", func() bool {
			parked, _ := crashContainers(t, n, "crash")
			return len(parked) == 0
		})
		parked, named := crashContainers(t, n, "crash")
		if len(parked) != 0 || !named {
			t.Errorf("after recovery: parked %v, crash present %v; want no parked container", parked, named)
		}
		got := s.dockerCLI(n.dockerd, "exec", "crash", "/bin/busybox", "cat", "/var/lib/db/f")
		if got != "kept" {
			t.Errorf("anonymous volume after recovery and re-create: %q; want kept", got)
		}
		s.record("recreate: deployer SIGKILLed with the old container parked; crash running again (%s image) %v after the kill (%v after the restarted deployer was ready), on the new image with no parked container left %v after the kill",
			which, recovered.Round(time.Millisecond), up.Round(time.Millisecond), time.Since(killed).Round(time.Millisecond))
	})

	t.Run("dockerd restarts while the old container is parked", func(t *testing.T) {
		ref := s.hub.host() + "/myorg/always:v1"
		s.build(ref, false)
		s.dockerCLI(n.dockerd, "pull", "-q", ref)
		s.dockerCLI(n.dockerd, "run", "-d", "--name", "always", "--network", "none", "--restart", "always",
			"-l", "deployer.strategy=recreate", "-v", "/var/lib/db", ref)
		t.Setenv("DEPLOYER_E2E_PARKED_DELAY", "2m")
		s.restartDeployers()
		img := s.build(ref, false)
		deploy(t, "myorg/always", "v1")
		waitFor(t, 60*time.Second, "the old always container to be parked and stopped", func() bool {
			parked, named := crashContainers(t, n, "always")
			return len(parked) == 1 && !parked[0].running && !named
		})
		if pol := s.dockerCLI(n.dockerd, "inspect", "-f", "{{.HostConfig.RestartPolicy.Name}}", parkedOf(t, n, "always")); pol != "no" {
			t.Errorf("restart policy of the parked container: %q; want no", pol)
		}
		n.dockerd.proc.stop(syscall.SIGTERM, 20*time.Second)
		d := s.startDockerd(n.name)
		s.waitDockerd(d)
		n.dockerd = d
		parked, named := crashContainers(t, n, "always")
		if len(parked) != 1 || parked[0].running || named {
			t.Errorf("after a dockerd restart: parked %v, always present %v; want the parked container still stopped", parked, named)
		}
		// The deployer dies in the window and starts again: the parked
		// container is put back, and the replayed trigger re-creates it.
		n.deployer.stop(syscall.SIGKILL, time.Second)
		t.Setenv("DEPLOYER_E2E_PARKED_DELAY", "")
		s.runDeployer(n)
		s.waitImage(one, "always", img, 90*time.Second)
		waitFor(t, 30*time.Second, "the parked always container to be removed", func() bool {
			parked, _ := crashContainers(t, n, "always")
			return len(parked) == 0
		})
		if pol := s.dockerCLI(n.dockerd, "inspect", "-f", "{{.HostConfig.RestartPolicy.Name}}", "always"); pol != "always" {
			t.Errorf("restart policy of the re-created container: %q; want always", pol)
		}
		s.record("recreate: dockerd restarted while the old container (--restart always) was parked: it stayed stopped (policy no while parked); put back and re-created on %s after the deployer's restart, no parked container left",
			shortID(img))
	})

	t.Run("SIGTERM during the wait for an unsupervised stop-strategy container", func(t *testing.T) {
		ref := s.hub.host() + "/myorg/alone:v1"
		v1 := s.build(ref, false)
		s.dockerCLI(n.dockerd, "pull", "-q", ref)
		s.dockerCLI(n.dockerd, "run", "-d", "--name", "alone", "--network", "none", "--restart", "always",
			"-l", "deployer.strategy=stop", ref)
		oldID, _ := s.containerImage(n, "alone")
		s.build(ref, false)
		offset := fileSize(t, n.deployer.log)
		deploy(t, "myorg/alone", "v1")
		waitFor(t, 60*time.Second, "the deployer to stop alone", func() bool {
			return logHas(n.deployer.log, offset, `"msg":"stopped stale container"`, `"container":"alone"`)
		})
		stopped := time.Now()
		n.deployer.stop(syscall.SIGTERM, 30*time.Second) // inside -restart_timeout (20s)
		exited := time.Since(stopped)
		if id, img := s.containerImage(n, "alone"); id != oldID || img != v1 {
			t.Errorf("alone after the deployer's SIGTERM = %s on %s; want the old container %s running %s", shortID(id), shortID(img), shortID(oldID), shortID(v1))
		}
		// Started again (shorter wait), the replayed trigger stops it
		// again; nothing replaces it, so it runs again.
		n.args = append(n.args[:len(n.args):len(n.args)], "-restart_timeout=5s")
		offset = fileSize(t, n.deployer.log)
		s.runDeployer(n)
		waitFor(t, 60*time.Second, "the replayed deploy to start alone again", func() bool {
			return logHas(n.deployer.log, offset, "nothing restarted the container", `"container":"alone"`)
		})
		parked, _ := crashContainers(t, n, "alone")
		if id, img := s.containerImage(n, "alone"); id != oldID || img != v1 || len(parked) != 0 {
			t.Errorf("alone after the restart = %s on %s, parked %v; want the old container %s running %s, nothing parked", shortID(id), shortID(img), parked, shortID(oldID), shortID(v1))
		}
		s.record("stop strategy: deployer SIGTERMed during the wait for unsupervised 'alone': it exited in %v with alone running again on the old image; after its restart the replayed trigger left it running too, nothing parked",
			exited.Round(time.Millisecond))
	})
}

// parkedOf returns the name of the one parked container of name.
func parkedOf(t *testing.T, n *node, name string) string {
	t.Helper()
	parked, _ := crashContainers(t, n, name)
	if len(parked) != 1 {
		t.Fatalf("parked containers of %s: %v; want one", name, parked)
	}
	return parked[0].name
}

type parkedCtr struct {
	name    string
	running bool
}

// crashContainers returns the parked containers of name and whether a
// container called name exists.
func crashContainers(t *testing.T, n *node, name string) (parked []parkedCtr, named bool) {
	cs, err := n.cli.ListContainers(docker.ListContainersOptions{All: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cs {
		for _, cn := range c.Names {
			cn = strings.TrimPrefix(cn, "/")
			if cn == name {
				named = true
			}
			if strings.HasPrefix(cn, name+parkedInfix) {
				parked = append(parked, parkedCtr{cn, c.State == "running"})
			}
		}
	}
	return parked, named
}

// inspectDiff returns the paths of the fields that differ between two
// `docker inspect` outputs of one container. Lists compare as sets; mounts
// are matched by destination; null and empty are equal.
func inspectDiff(t *testing.T, before, after string) []string {
	t.Helper()
	flat := func(s string) map[string]string {
		var v []any
		if err := json.Unmarshal([]byte(s), &v); err != nil || len(v) != 1 {
			t.Fatalf("inspect output: %v", err)
		}
		out := map[string]string{}
		var walk func(path string, v any)
		walk = func(path string, v any) {
			switch x := v.(type) {
			case map[string]any:
				for k, e := range x {
					walk(strings.TrimPrefix(path+"."+k, "."), e)
				}
			case nil:
				// null, [] and {} are the same: go-dockerclient omits
				// empty lists and maps, the docker CLI sends them.
			case []any:
				if len(x) == 0 {
					return
				}
				if path == "Mounts" {
					for _, e := range x {
						m, _ := e.(map[string]any)
						walk(fmt.Sprintf("Mounts[%v]", m["Destination"]), e)
					}
					return
				}
				var parts []string
				for _, e := range x {
					b, _ := json.Marshal(e)
					parts = append(parts, string(b))
				}
				sort.Strings(parts)
				out[path] = strings.Join(parts, ",")
			default:
				b, _ := json.Marshal(x)
				out[path] = string(b)
			}
		}
		walk("", v[0])
		return out
	}
	b, a := flat(before), flat(after)
	var diff []string
	for k, v := range b {
		if w, ok := a[k]; !ok || w != v {
			diff = append(diff, k)
		}
	}
	for k := range a {
		if _, ok := b[k]; !ok {
			diff = append(diff, k)
		}
	}
	sort.Strings(diff)
	// State.* and GraphDriver.Data.* are many fields of one cause.
	var out []string
	for _, d := range diff {
		for _, p := range []string{"State.", "GraphDriver."} {
			if strings.HasPrefix(d, p) {
				d = p + "*"
			}
		}
		if len(out) == 0 || out[len(out)-1] != d {
			out = append(out, d)
		}
	}
	return out
}
