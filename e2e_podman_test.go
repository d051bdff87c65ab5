//go:build e2e

package main

// The real-stack run on Podman (issue 23): a rootful `podman system
// service` on a unix socket stands in for dockerd, with a configuration
// of the test's own (containers.conf, storage.conf, registries.conf in
// the test's directory, --root/--runroot there too), so that nothing
// touches the machine's Podman; one deployer with its embedded etcd; a
// registry on 127.0.0.1 that a second Podman store (the builder) builds
// and pushes to. Both strategies on one node:
//
//	/work/stack-lock go test -tags e2e -count=1 -run '^TestE2EPodman$' -v -timeout 20m .

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
)

// podman is a Podman installation of the test's own: its configuration
// and its stores under dir.
type podman struct {
	t    testing.TB
	dir  string
	env  []string
	root string // --root and --runroot of the service's store
	sock string
}

func newPodman(t testing.TB, dir, registry string) *podman {
	p := &podman{t: t, dir: dir, root: filepath.Join(dir, "store"), sock: filepath.Join(dir, "podman.sock")}
	// In a sandbox like CI's, rootful Podman needs vfs, cgroupfs and the
	// file events backend, and ulimits it may set (the host's nproc is
	// not one), or every start fails with "error setting rlimit".
	files := map[string]string{
		"containers.conf": fmt.Sprintf(`[containers]
default_ulimits = ["nofile=4096:4096","nproc=4096:4096"]
netns = "none"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "%[1]s/events.log"
tmp_dir = "%[1]s/tmp"
volume_path = "%[1]s/volumes"
static_dir = "%[1]s/static"
[network]
network_config_dir = "%[1]s/net"
`, dir),
		"storage.conf":    fmt.Sprintf("[storage]\ndriver = \"vfs\"\ngraphroot = %q\nrunroot = %q\n", p.root+"/root", p.root+"/run"),
		"registries.conf": fmt.Sprintf("unqualified-search-registries = []\n[[registry]]\nlocation = %q\ninsecure = true\n", registry),
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	p.env = []string{"CONTAINERS_CONF=" + filepath.Join(dir, "containers.conf"), "CONTAINERS_STORAGE_CONF=" + filepath.Join(dir, "storage.conf"),
		"CONTAINERS_REGISTRIES_CONF=" + filepath.Join(dir, "registries.conf")}
	return p
}

// cli runs the podman command line on store (the service's, or another
// one: the builder's).
func (p *podman) cli(store string, args ...string) string {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "podman", append([]string{"--root", store + "/root", "--runroot", store + "/run"}, args...)...)
	cmd.Env = append(os.Environ(), p.env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		p.t.Fatalf("podman %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// inspect returns the container's inspect as Podman's Docker API gives
// it, as `docker inspect` prints it (a list of one).
func (p *podman) inspect(name string) string {
	p.t.Helper()
	c := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", p.sock)
	}}, Timeout: 10 * time.Second}
	resp, err := c.Get("http://d/v1.41/containers/" + name + "/json")
	if err != nil {
		p.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		p.t.Fatalf("inspect %s: %d %s", name, resp.StatusCode, b)
	}
	return "[" + string(b) + "]"
}

func TestE2EPodman(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Fatal("the end-to-end suite needs root (rootful Podman); run `make test` as root")
	}
	for _, bin := range []string{"podman", "docker-registry", "busybox"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s not found: run scripts/install-deps.sh (make test does) first", bin)
		}
	}
	dir, err := os.MkdirTemp("/tmp", "dpl-e2e-podman-")
	if err != nil {
		t.Fatal(err)
	}
	s := &stack{t: t, dir: dir, secret: "e2e-secret", prefix: "/e2e", slack: newSlackRecorder(t)}
	t.Cleanup(func() { s.teardown() })
	if s.results, err = os.OpenFile(resultsPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644); err != nil {
		t.Fatal(err)
	}
	s.bin = filepath.Join(dir, "deployer")
	if out, err := exec.Command("go", "build", "-tags", "e2e", "-o", s.bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	s.hub = s.startRegistry("hub", "")
	pm := newPodman(t, dir, s.hub.host())
	builder := filepath.Join(dir, "builder")
	svc := startProc(t, dir, "podman", pm.env, "podman", "--root", pm.root+"/root", "--runroot", pm.root+"/run",
		"system", "service", "--time=0", "unix://"+pm.sock)
	cli, err := docker.NewClient("unix://" + pm.sock)
	if err != nil {
		t.Fatal(err)
	}
	n := &node{dockerd: &dockerd{name: "podman", sock: pm.sock, proc: svc, cli: cli}, port: freeTCPPort(t), sups: map[string]*proc{}}
	s.nodes = []*node{n}
	s.waitDockerd(n.dockerd)
	t.Logf("podman version:\n%s", pm.cli(pm.root, "version"))
	n.args = []string{s.bin,
		"-docker", n.host(), "-etcd_nodes", "", "-etcd_data_dir", filepath.Join(dir, "etcd"),
		"-etcd_listen_client", fmt.Sprintf("http://127.0.0.1:%d", freeTCPPort(t)), "-etcd_listen_peer", fmt.Sprintf("http://127.0.0.1:%d", freeTCPPort(t)),
		"-etcd_prefix", s.prefix, "-etcd_retry_delay", "200ms", "-listen", fmt.Sprintf("127.0.0.1:%d", n.port),
		"-node_name", n.name, "-webhook_secret", s.secret, "-slack_webhook_url", s.slack.URL,
		"-registry", s.hub.host(), "-kill_timeout", "3", "-repull_period", "0", "-dockercfg", "",
		"-log_format", "json", "-restart_timeout", "20s"}
	s.runDeployer(n)
	one := []*node{n}

	// build builds a new version of ref in the builder's store and pushes
	// it; the node's store has only what it pulls.
	builds := 0
	build := func(ref string) string {
		t.Helper()
		builds++
		ctxDir := filepath.Join(dir, fmt.Sprintf("build-%d", builds))
		if err := os.MkdirAll(ctxDir, 0o755); err != nil {
			t.Fatal(err)
		}
		bb, _ := exec.LookPath("busybox")
		if out, err := exec.Command("cp", bb, filepath.Join(ctxDir, "busybox")).CombinedOutput(); err != nil {
			t.Fatalf("cp busybox: %v %s", err, out)
		}
		files := map[string]string{
			"Containerfile": "FROM scratch\nCOPY busybox /bin/busybox\nCOPY version /version\nENV IMGVAR=1\nVOLUME /data\n" +
				`CMD ["/bin/busybox","sh","-c","trap 'exit 0' TERM INT; while true; do /bin/busybox sleep 0.2; done"]` + "\n",
			"version": fmt.Sprintf("%s build %d %d\n", ref, builds, time.Now().UnixNano()),
		}
		for name, body := range files {
			if err := os.WriteFile(filepath.Join(ctxDir, name), []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		pm.cli(builder, "build", "-q", "-t", ref, ctxDir)
		pm.cli(builder, "push", "-q", "--tls-verify=false", ref)
		return "sha256:" + pm.cli(builder, "image", "inspect", "--format", "{{.Id}}", ref)
	}
	deploy := func(t *testing.T, repo, tag string) time.Time {
		t.Helper()
		start := time.Now()
		if code, body := s.webhook(n, repo, tag); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		return start
	}

	t.Run("stop strategy: the supervisor runs the new version", func(t *testing.T) {
		ref := s.hub.host() + "/myorg/psvc:v1"
		v1 := build(ref)
		pm.cli(pm.root, "pull", "-q", ref)
		// What a systemd unit with Restart=always does: podman run in
		// the foreground, again whenever it exits.
		sup := fmt.Sprintf(`trap 'exit 0' TERM; while :; do podman --root %[1]s/root --runroot %[1]s/run rm -f psvc >/dev/null 2>&1; podman --root %[1]s/root --runroot %[1]s/run run --rm --name psvc --network none %[2]s >/dev/null 2>&1 & wait $!; sleep 0.5; done`, pm.root, ref)
		n.sups["psvc"] = startProc(t, dir, "sup-psvc", pm.env, "sh", "-c", sup)
		s.waitImage(one, "psvc", v1, 60*time.Second)
		v2 := build(ref)
		start := deploy(t, "myorg/psvc", "v1")
		s.waitImage(one, "psvc", v2, 60*time.Second)
		s.record("podman: stop strategy: webhook to psvc running the new image %s on Podman in %v", shortID(v2), time.Since(start).Round(time.Millisecond))
	})

	t.Run("recreate: podman inspect differs only where a new container must", func(t *testing.T) {
		ref := s.hub.host() + "/myorg/prich:v1"
		build(ref)
		pm.cli(pm.root, "pull", "-q", ref)
		pm.cli(pm.root, "volume", "create", "pnamed")
		bind := filepath.Join(dir, "bindsrc")
		if err := os.MkdirAll(bind, 0o755); err != nil {
			t.Fatal(err)
		}
		pm.cli(pm.root, "run", "-d", "--name", "prich", "--network", "none", "-l", "deployer.strategy=recreate", "-l", "team=x",
			"-e", "A=1", "-e", "B=two words", "-v", "pnamed:/named", "-v", "/anon", "-v", bind+":/bind:ro",
			"--mount", "type=tmpfs,destination=/mnt/tmpm", "--tmpfs", "/scratch:size=1m",
			"--cap-add", "NET_ADMIN", "--cap-drop", "MKNOD", "--device", "/dev/null:/dev/xnull",
			"--log-opt", "max-size=1m", "--health-cmd", `["/bin/busybox","true"]`, "--health-interval", "1s",
			"--restart", "always", "--ulimit", "nofile=1024:2048", "--ulimit", "nproc=4096:4096",
			"--stop-signal", "SIGINT", "--stop-timeout", "7", "-w", "/named", "--memory", "64m", "--pids-limit", "100", ref)
		// Podman runs healthchecks from systemd timers; there is no
		// systemd here, so the test is the timer.
		ctx, stop := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		wg.Go(func() {
			for ctx.Err() == nil {
				cmd := exec.CommandContext(ctx, "podman", "--root", pm.root+"/root", "--runroot", pm.root+"/run", "healthcheck", "run", "prich")
				cmd.Env = append(os.Environ(), pm.env...)
				_ = cmd.Run()
				select {
				case <-ctx.Done():
				case <-time.After(time.Second):
				}
			}
		})
		defer func() { stop(); wg.Wait() }()
		pm.cli(pm.root, "exec", "prich", "/bin/busybox", "sh", "-c", "echo anon > /anon/f && echo named > /named/f")
		waitFor(t, 30*time.Second, "prich to be healthy", func() bool {
			c, err := cli.InspectContainerWithOptions(docker.InspectContainerOptions{ID: "prich"})
			return err == nil && c.State.Health.Status == "healthy"
		})
		before := pm.inspect("prich")
		oldID, _ := s.containerImage(n, "prich")
		v2 := build(ref)
		start := deploy(t, "myorg/prich", "v1")
		s.waitImage(one, "prich", v2, 60*time.Second)
		took := time.Since(start)
		after := pm.inspect("prich")
		newID, _ := s.containerImage(n, "prich")
		if newID == oldID {
			t.Fatal("prich was not re-created")
		}
		diff := inspectDiff(t, before, after)
		// Per-container identity and state; the hostname is the new ID,
		// as Podman gives every container without --hostname, and its
		// HOSTNAME with it.
		expected := []string{"Id", "Created", "Image", "State.", "HostnamePath", "HostsPath", "LogPath", "GraphDriver.",
			"Config.Hostname", "Config.Env"}
		var unexpected []string
		for _, d := range diff {
			if !slices.ContainsFunc(expected, func(p string) bool { return d == p || strings.HasPrefix(d, p) && strings.HasSuffix(p, ".") }) {
				unexpected = append(unexpected, d)
			}
		}
		if len(unexpected) > 0 {
			t.Errorf("inspect of the re-created container differs in %v\nbefore: %s\nafter: %s", unexpected, before, after)
		}
		c, err := cli.InspectContainerWithOptions(docker.InspectContainerOptions{ID: "prich"})
		if err != nil {
			t.Fatal(err)
		}
		if want := "HOSTNAME=" + shortID(newID); !slices.Contains(c.Config.Env, want) || slices.Contains(c.Config.Env, "HOSTNAME="+shortID(oldID)) {
			t.Errorf("env of the re-created container: %q; want %s, not the old ID", c.Config.Env, want)
		}
		if got := pm.cli(pm.root, "exec", "prich", "/bin/busybox", "sh", "-c", "cat /anon/f /named/f"); got != "anon\nnamed" {
			t.Errorf("files in the re-created container: %q; want anon and named", got)
		}
		// Done once the new container is up (healthy, for minUp) and the
		// old one removed.
		waitFor(t, 30*time.Second, "the old prich to be removed", func() bool {
			names := pm.cli(pm.root, "ps", "-a", "--format", "{{.Names}}")
			return !strings.Contains(names, parkedInfix) && !strings.Contains(names, newInfix)
		})
		done := time.Since(start)
		s.record("podman: recreate: webhook to prich (rich configuration, healthcheck) running on %s in %v, the old one removed in %v; the inspect differs in %d fields: %s",
			shortID(v2), took.Round(time.Millisecond), done.Round(time.Millisecond), len(diff), strings.Join(diff, ", "))
	})

	// Stop the services before the teardown removes the containers.
	t.Cleanup(func() { n.deployer.stop(syscall.SIGTERM, 15*time.Second) })
}
