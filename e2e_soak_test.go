//go:build e2e

package main

// What a deployer holds must not grow with what it has done: after many
// deploys, goroutines and open file descriptors are back at the level they
// had after the first one. On the real stack, two nodes.

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// soakDeploys is how many deploys the soak makes; SOAK_DEPLOYS overrides
// it for a quick look.
func soakDeploys(t *testing.T) int {
	n := 100
	if v := os.Getenv("SOAK_DEPLOYS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			t.Fatalf("SOAK_DEPLOYS=%q: want a positive number", v)
		}
	}
	return n
}

func TestE2ESoak(t *testing.T) {
	t.Parallel() // a stack of its own; three run at once (make e2e: -parallel 3)
	s := newStackWith(t, 2, 1)
	all := s.nodes
	s.restartDeployers("-max_unavailable=0", "-notify_per_node") // per node: the warm-up opens every node's connections to the recorders (one report per rollout comes from any node)

	t.Run("goroutines and fds are back at their level after 100 deploys", func(t *testing.T) {
		const name, repo, tag = "soak", "myorg/soak", "qa"
		versions := s.versions(repo, 2)
		s.retag(repo, tag, versions[0])
		ref := s.hub.host() + "/" + repo + ":" + tag
		for _, n := range all {
			s.supervise(n, name, ref, versions[0].id, healthy(t)...)
		}
		deploy := func(i int) {
			v := versions[i%len(versions)]
			s.retag(repo, tag, v)
			s.deployAndWait(all, repo, tag, name, v.id)
		}
		deploy(1) // warm-up: the first deploy's one-time allocations
		s.barrier(all)
		before := s.usage(all)
		n := soakDeploys(t)
		start := time.Now()
		for i := range n {
			deploy(i)
		}
		took := time.Since(start)
		s.barrier(all)
		after := s.settledUsage(all, before, 3)
		s.reportUsage(t, fmt.Sprintf("%d deploys of one repository (-max_unavailable 0, stop strategy) in %v", n, took.Round(time.Second)), all, before, after, 3)
	})

	// The other long-lived paths, a few times each, on the same
	// containers: what each costs must come back too.
	const name, repo, tag = "soak", "myorg/soak", "qa"
	ref := s.hub.host() + "/" + repo + ":" + tag
	t.Run("retries: pulls that fail and are retried", func(t *testing.T) {
		s.leakCheck(t, "2 outages of the registry, each with failed and retried pulls", func() {
			for range 2 {
				v := s.build(ref, false)
				s.hub.proc.stop(syscall.SIGTERM, 10*time.Second)
				if code, body := s.webhook(all[0], repo, tag); code != 200 {
					t.Fatalf("webhook: %d %s", code, body)
				}
				waitFor(t, 30*time.Second, "a retry pending on every node", func() bool {
					for _, n := range all {
						if s.metric(n, "deployer_deploy_retries_pending", "") != 1 {
							return false
						}
					}
					return true
				})
				s.startRegistryProc(s.hub, "hub")
				s.waitImage(all, name, v, 60*time.Second)
			}
		})
	})
	t.Run("dockerd restarts: the event streams end and are subscribed again", func(t *testing.T) {
		s.leakCheck(t, "2 restarts of every node's dockerd", func() {
			for range 2 {
				for _, n := range all {
					_, img := s.containerImage(n, name)
					n.dockerd.proc.stop(syscall.SIGTERM, 20*time.Second)
					d := s.startDockerd(n.name)
					s.waitDockerd(d)
					n.dockerd = d
					s.waitImage([]*node{n}, name, img, 60*time.Second)
				}
			}
			// A deploy after: its wait subscribes on the new daemons.
			v := s.build(ref, false)
			s.deployAndWait(all, repo, tag, name, v)
		})
	})
	t.Run("etcd reconnects", func(t *testing.T) {
		// Three short outages (the client reconnects), then one longer
		// than the session's lease (the session is made again).
		s.leakCheck(t, "4 restarts of etcd, the last after 12 s down", func() {
			for i, down := range []time.Duration{0, 0, 0, 12 * time.Second} {
				m := s.etcd[0]
				m.proc.stop(syscall.SIGTERM, 10*time.Second)
				time.Sleep(down) // the outage's length, part of the scenario
				s.startEtcdMember(m)
				s.waitEtcdHealthy()
				if i < 3 {
					s.barrier(all) // every watch works again
				}
			}
		})
	})
	t.Run("recreate and halts", func(t *testing.T) {
		// recreate: the deployer creates the replacement itself.
		s.restartDeployers("-restart_strategy=recreate", "-max_unavailable=1")
		const rc = "soakrc"
		rcRef := s.hub.host() + "/myorg/soakrc:qa"
		versions := s.versions("myorg/soakrc", 2)
		s.retag("myorg/soakrc", "qa", versions[0])
		for _, n := range all {
			s.dockerCLI(n.dockerd, "pull", "-q", rcRef)
			s.dockerCLI(n.dockerd, append(append([]string{"run", "-d", "--name", rc, "--network", "none", "--restart", "unless-stopped"}, healthy(t)...), rcRef)...)
			s.waitImage([]*node{n}, rc, versions[0].id, 30*time.Second)
		}
		deploy := func(i int) {
			s.retag("myorg/soakrc", "qa", versions[i%2])
			s.deployAndWait(all, "myorg/soakrc", "qa", rc, versions[i%2].id)
		}
		deploy(1) // warm-up
		s.leakCheck(t, "10 re-creates", func() {
			for i := range 10 {
				deploy(i)
			}
		})
		s.leakCheck(t, "3 parked-container recoveries (a parked old container found beside the running one and removed before the re-create)", func() {
			for i := range 3 {
				for _, n := range all {
					id := s.dockerCLI(n.dockerd, "create", "--network", "none", rcRef)
					s.dockerCLI(n.dockerd, "rename", id, parkedName(rc, id))
				}
				deploy(i)
				for _, n := range all {
					if out := s.dockerCLI(n.dockerd, "ps", "-aq", "--filter", "name="+rc+parkedInfix); out != "" {
						t.Errorf("%s: parked container %s left", n.name, out)
					}
				}
			}
		})
		var v string
		s.leakCheck(t, "3 halts of a version that never comes up (recreate: the old container restored), each followed by a good version", func() {
			for range 3 {
				s.buildKind(rcRef, "broken")
				halts := s.metric(all[0], "deployer_rollouts_halted_total", "") + s.metric(all[1], "deployer_rollouts_halted_total", "")
				if code, body := s.webhook(all[0], "myorg/soakrc", "qa"); code != 200 {
					t.Fatalf("webhook: %d %s", code, body)
				}
				waitFor(t, 60*time.Second, "the halt", func() bool {
					return s.metric(all[0], "deployer_rollouts_halted_total", "")+s.metric(all[1], "deployer_rollouts_halted_total", "") > halts
				})
				s.barrier(all)
				v = s.build(rcRef, false)
				s.deployAndWait(all, "myorg/soakrc", "qa", rc, v)
			}
		})
	})
}

// leakCheck measures every node's usage with the stack quiet, runs what,
// waits until the stack is quiet again, and reports the usage after (±3).
func (s *stack) leakCheck(t *testing.T, what string, run func()) {
	t.Helper()
	s.barrier(s.nodes)
	before := s.usage(s.nodes)
	start := time.Now()
	run()
	s.barrier(s.nodes)
	after := s.settledUsage(s.nodes, before, 3)
	s.reportUsage(t, fmt.Sprintf("%s (%v)", what, time.Since(start).Round(time.Second)), s.nodes, before, after, 3)
}

// healthy returns the docker run options of a healthcheck that passes
// from the first probe, 100 ms after the start: a replacement is up then,
// not a second after it started (minUp), which keeps the soak short. The
// images are FROM scratch: busybox is mounted as the check's /bin/sh.
func healthy(t *testing.T) []string {
	bb, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatal(err)
	}
	return []string{"-v", bb + ":/bin/sh:ro", "--health-cmd", "true", "--health-interval", "100ms"}
}

// imageVersion is an image pushed to the hub under its own tag.
type imageVersion struct {
	id       string // image ID
	manifest []byte
	ctype    string
}

// versions builds n versions of repo and reads their manifests back, so
// that retag can point a tag at any of them without a build or a push.
func (s *stack) versions(repo string, n int) []imageVersion {
	s.t.Helper()
	var out []imageVersion
	for i := range n {
		src := fmt.Sprintf("%s/%s:v%d", s.hub.host(), repo, i)
		id := s.build(src, false)
		req, _ := http.NewRequest("GET", fmt.Sprintf("http://%s/v2/%s/manifests/v%d", s.hub.host(), repo, i), nil)
		req.Header.Set("Accept", "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			s.t.Fatal(err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 {
			s.t.Fatalf("manifest of %s: %d %v %s", src, resp.StatusCode, err, body)
		}
		out = append(out, imageVersion{id: id, manifest: body, ctype: resp.Header.Get("Content-Type")})
	}
	return out
}

// retag points repo:tag at v in the hub registry.
func (s *stack) retag(repo, tag string, v imageVersion) {
	s.t.Helper()
	req, _ := http.NewRequest("PUT", fmt.Sprintf("http://%s/v2/%s/manifests/%s", s.hub.host(), repo, tag), bytes.NewReader(v.manifest))
	req.Header.Set("Content-Type", v.ctype)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		s.t.Fatalf("put manifest %s:%s: %d %s", repo, tag, resp.StatusCode, body)
	}
}

// deployAndWait sends the Docker Hub webhook for repo:tag and waits until
// every node has finished a successful deploy and container name runs want.
func (s *stack) deployAndWait(ns []*node, repo, tag, name, want string) {
	s.t.Helper()
	ok := map[*node]float64{}
	for _, n := range ns {
		ok[n] = s.metric(n, "deployer_deploys_total", `result="ok"`)
	}
	if code, body := s.webhook(ns[0], repo, tag); code != 200 {
		s.t.Fatalf("webhook: %d %s", code, body)
	}
	waitFor(s.t, 60*time.Second, fmt.Sprintf("%s on %s to run %s, deployed", name, nodeNames(ns), shortID(want)), func() bool {
		for _, n := range ns {
			if s.metric(n, "deployer_deploys_total", `result="ok"`) <= ok[n] {
				return false
			}
			if _, img := s.containerImage(n, name); img != want {
				return false
			}
		}
		return true
	})
}

// usage is what a deployer holds: goroutines and open file descriptors,
// from its /metrics.
type usage struct{ goroutines, fds int }

func (u usage) String() string { return fmt.Sprintf("%d goroutines, %d fds", u.goroutines, u.fds) }

// usageOf reads node n's usage on a connection of its own, closed at
// once, after closing the idle connections of the other helpers: each
// holds a goroutine and a descriptor in the deployer.
func (s *stack) usageOf(n *node) usage {
	s.t.Helper()
	http.DefaultClient.CloseIdleConnections()
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	req, _ := http.NewRequest("GET", fmt.Sprintf("http://127.0.0.1:%d/metrics", n.port), nil)
	req.Header.Set("Authorization", "Bearer "+s.secret)
	resp, err := c.Do(req)
	if err != nil {
		s.t.Fatalf("metrics of %s: %v", n.name, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	get := func(name string) int {
		m := regexp.MustCompile(`(?m)^` + name + ` (\S+)$`).FindSubmatch(body)
		if m == nil {
			s.t.Fatalf("%s: no %s in /metrics", n.name, name)
		}
		v, _ := strconv.ParseFloat(string(m[1]), 64)
		return int(v)
	}
	return usage{goroutines: get("go_goroutines"), fds: get("process_open_fds")}
}

// usage reads every node's usage once it is steady: the same in two
// readings 200 ms apart (a connection just closed by a client takes a
// moment to end in the server).
func (s *stack) usage(ns []*node) map[*node]usage {
	s.t.Helper()
	out := map[*node]usage{}
	for _, n := range ns {
		prev := s.usageOf(n)
		for range 25 {
			time.Sleep(200 * time.Millisecond) // the interval between two readings
			u := s.usageOf(n)
			if u == prev {
				break
			}
			prev = u
		}
		out[n] = prev
	}
	return out
}

// settledUsage reads every node's usage until it is within tol of base,
// for up to 10 s (the last connections of the run closing), and returns
// the last reading.
func (s *stack) settledUsage(ns []*node, base map[*node]usage, tol int) map[*node]usage {
	s.t.Helper()
	var out map[*node]usage
	pollUntil(10*time.Second, 500*time.Millisecond, func() bool { // the interval between two readings
		out = s.usage(ns)
		return usageWithin(ns, base, out, tol) == ""
	})
	return out
}

// usageWithin describes every node whose usage in after is more than tol
// from before; "" when none is.
func usageWithin(ns []*node, before, after map[*node]usage, tol int) string {
	var bad []string
	for _, n := range ns {
		b, a := before[n], after[n]
		if abs(a.goroutines-b.goroutines) > tol || abs(a.fds-b.fds) > tol {
			bad = append(bad, fmt.Sprintf("%s: %v → %v", n.name, b, a))
		}
	}
	return strings.Join(bad, "; ")
}

func abs(x int) int { return max(x, -x) }

// reportUsage records every node's usage before and after what, and fails
// the test when one is more than tol from where it was; then it shows what
// the deployer holds (its open descriptors and, from SIGQUIT, its
// goroutines), which ends that deployer.
func (s *stack) reportUsage(t *testing.T, what string, ns []*node, before, after map[*node]usage, tol int) {
	t.Helper()
	var parts []string
	for _, n := range ns {
		b, a := before[n], after[n]
		parts = append(parts, fmt.Sprintf("%s goroutines %d → %d, fds %d → %d", n.name, b.goroutines, a.goroutines, b.fds, a.fds))
	}
	s.record("soak: %s: %s", what, strings.Join(parts, "; "))
	bad := usageWithin(ns, before, after, tol)
	if bad == "" {
		return
	}
	t.Errorf("%s: usage not back within ±%d of its level: %s", what, tol, bad)
	for _, n := range ns {
		t.Logf("%s: open descriptors:\n%s", n.name, fdSummary(n.deployer.cmd.Process.Pid))
		t.Logf("%s: goroutines:\n%s", n.name, s.goroutineDump(n))
	}
}

// fdSummary counts a process's open descriptors by what they point at.
func fdSummary(pid int) string {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err.Error()
	}
	counts := map[string]int{}
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		if strings.HasPrefix(target, "socket:") {
			target = "socket"
		}
		counts[target]++
	}
	var lines []string
	for target, c := range counts {
		lines = append(lines, fmt.Sprintf("%4d %s", c, target))
	}
	slices.Sort(lines)
	out, _ := exec.Command("ss", "-xtanp").Output()
	var mine []string
	for line := range strings.Lines(string(out)) {
		if strings.Contains(line, fmt.Sprintf("pid=%d,", pid)) {
			mine = append(mine, strings.TrimSpace(line))
		}
	}
	return strings.Join(lines, "\n") + "\nsockets (ss):\n" + strings.Join(mine, "\n")
}

// frameArgs is a frame's argument list in a goroutine dump.
var frameArgs = regexp.MustCompile(`\([^()]*\)( fp=.*)?$| in goroutine \d+$`)

// goroutineDump ends node n's deployer with SIGQUIT and returns its
// goroutines grouped by stack, largest group first.
func (s *stack) goroutineDump(n *node) string {
	var offset int64
	if fi, err := os.Stat(n.deployer.log); err == nil {
		offset = fi.Size()
	}
	n.deployer.stop(syscall.SIGQUIT, 10*time.Second)
	data, err := os.ReadFile(n.deployer.log)
	if err != nil || int64(len(data)) < offset {
		return fmt.Sprintf("no dump: %v", err)
	}
	counts := map[string]int{}
	for _, g := range strings.Split(string(data[offset:]), "\n\n") {
		if !strings.HasPrefix(g, "goroutine ") {
			continue
		}
		var frames []string
		for _, line := range strings.Split(g, "\n")[1:] {
			if strings.HasPrefix(line, "\t") || strings.HasPrefix(line, "runtime.") {
				continue // file lines; the runtime's own frames
			}
			frames = append(frames, frameArgs.ReplaceAllString(line, ""))
		}
		counts[strings.Join(frames, "\n  ")]++
	}
	type group struct {
		stack string
		n     int
	}
	var groups []group
	for st, c := range counts {
		groups = append(groups, group{st, c})
	}
	slices.SortFunc(groups, func(a, b group) int { return b.n - a.n })
	var out strings.Builder
	for _, g := range groups {
		fmt.Fprintf(&out, "%d ×\n  %s\n", g.n, g.stack)
	}
	return out.String()
}
