//go:build e2e

package main

// Rollout safety under faults, on the real stack: a queued node frozen past
// its lease, crash-looping versions under a restart policy, recreate
// without coordination, unsupervised containers, dockerd restarts during
// a wait, and a node left down by a halted version counted against
// -max_unavailable.

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
	clientv3 "go.etcd.io/etcd/client/v3"
)

func TestE2ERollout(t *testing.T) {
	t.Parallel() // a stack of its own; three run at once (make e2e: -parallel 3)
	s := newStackWith(t, 3, 1)
	all := s.nodes

	t.Run("A a queued node frozen past its lease never makes two down", func(t *testing.T) {
		ref := s.hub.host() + "/myorg/frozen:qa"
		v1 := s.build(ref, false)
		for _, n := range all {
			s.supervise(n, "frozen", ref, v1)
		}
		v2 := s.build(ref, false)
		dir := s.prefix + slotsDir(ref)
		stop := s.sampler("frozen")
		if code, body := s.webhook(all[0], "myorg/frozen", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		// Freeze the node second in the queue: its key blocks the
		// third until its lease expires.
		var frozen *node
		var frozenKey string
		waitFor(t, 30*time.Second, "two nodes in the slot queue", func() bool {
			keys := s.slotKeys(dir)
			if len(keys) < 2 {
				return false
			}
			frozenKey = keys[1]
			frozen = nodeByName(all, strings.Split(strings.TrimPrefix(frozenKey, dir), "-")[1])
			return frozen != nil
		})
		if err := syscall.Kill(frozen.deployer.cmd.Process.Pid, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		frozenAt := time.Now()
		resumed := false
		defer func() {
			if !resumed {
				_ = syscall.Kill(frozen.deployer.cmd.Process.Pid, syscall.SIGCONT)
			}
		}()
		// Resume it once its lease has expired and another node holds
		// the slot: the moment the old code took a second slot.
		waitFor(t, 30*time.Second, "the frozen node's lease to expire and another node to hold the slot", func() bool {
			keys := s.slotKeys(dir)
			return len(keys) > 0 && !slices.Contains(keys, frozenKey) && !strings.Contains(keys[0], "-"+frozen.name+"-")
		})
		if err := syscall.Kill(frozen.deployer.cmd.Process.Pid, syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		resumed = true
		frozenFor := time.Since(frozenAt)
		s.waitImage(all, "frozen", v2, 90*time.Second)
		maxDown, samples := stop()
		if maxDown > 1 {
			t.Errorf("up to %d nodes had no running container at once; want at most 1 (-max_unavailable=1)", maxDown)
		}
		s.record("scenario R-A: %s SIGSTOPped for %v in the slot queue (lease %ds), resumed while another node held the slot; most nodes down at once: %d (%d samples every 50ms)",
			frozen.name, frozenFor.Round(time.Millisecond), sessionTTL, maxDown, samples)
	})

	t.Run("B recreate of a crash-looping version halts after the first node and restores it", func(t *testing.T) {
		ref := s.hub.host() + "/myorg/loop:qa"
		v1 := s.build(ref, false)
		ids := map[string]string{}
		for _, n := range all {
			s.dockerCLI(n.dockerd, "pull", "-q", ref)
			s.dockerCLI(n.dockerd, "run", "-d", "--name", "loop", "--network", "none", "--restart", "always",
				"-l", "deployer.strategy=recreate", ref)
			s.waitImage([]*node{n}, "loop", v1, 30*time.Second)
			ids[n.name], _ = s.containerImage(n, "loop")
		}
		broken := s.buildKind(ref, "broken")
		start := time.Now()
		if code, body := s.webhook(all[0], "myorg/loop", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		var h *halt
		waitFor(t, 60*time.Second, "the rollout to halt", func() bool {
			h = s.haltOf(ref)
			return h != nil && h.ImageID == broken
		})
		took := time.Since(start)
		halter := nodeByName(all, h.Node)
		// The halting node restores its old container; nobody else moves.
		waitFor(t, 30*time.Second, "the old container running again on "+h.Node, func() bool {
			id, img := s.containerImage(halter, "loop")
			return id == ids[halter.name] && img == v1
		})
		s.barrier(all)
		for _, n := range all {
			c, err := n.cli.InspectContainerWithOptions(docker.InspectContainerOptions{ID: "loop"})
			if err != nil || c.ID != ids[n.name] || c.Image != v1 || !c.State.Running || c.State.Restarting {
				t.Errorf("%s: loop = %+v, %v; want the old container %s running %s", n.name, c, err, shortID(ids[n.name]), shortID(v1))
			}
			cs, _ := n.cli.ListContainers(docker.ListContainersOptions{All: true})
			for _, c := range cs {
				if c.ID != ids[n.name] && slices.ContainsFunc(c.Names, func(name string) bool { return strings.Contains(name, "loop") }) {
					t.Errorf("%s: container %v left behind", n.name, c.Names)
				}
			}
		}
		s.record("scenario R-B: crash-looping version (--restart always, recreate) halted by %s %v after the webhook (%s); its old container restored, 2 other nodes untouched",
			h.Node, took.Round(time.Millisecond), h.Reason)
	})

	t.Run("C max_unavailable=0 with recreate re-creates on every node", func(t *testing.T) {
		s.restartDeployers("-max_unavailable=0", "-restart_strategy=recreate")
		ref := s.hub.host() + "/myorg/rc:qa"
		v1 := s.build(ref, false)
		ids := map[string]string{}
		for _, n := range all {
			s.dockerCLI(n.dockerd, "pull", "-q", ref)
			s.dockerCLI(n.dockerd, "run", "-d", "--name", "rc", "--network", "none", "--restart", "unless-stopped", ref)
			s.waitImage([]*node{n}, "rc", v1, 30*time.Second)
			ids[n.name], _ = s.containerImage(n, "rc")
		}
		v2 := s.build(ref, false)
		start := time.Now()
		if code, body := s.webhook(all[0], "myorg/rc", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		s.waitImage(all, "rc", v2, 60*time.Second)
		took := time.Since(start)
		for _, n := range all {
			if id, _ := s.containerImage(n, "rc"); id == ids[n.name] {
				t.Errorf("%s: rc is still container %s", n.name, shortID(id))
			}
		}
		s.record("scenario R-C: -max_unavailable=0 -restart_strategy=recreate: every node re-created rc on %s in %v", shortID(v2), took.Round(time.Millisecond))
	})

	t.Run("D an unsupervised stop-strategy container runs again and halts nothing", func(t *testing.T) {
		s.restartDeployers("-max_unavailable=1", "-restart_strategy=stop", "-restart_timeout=5s")
		n1 := all[0]
		ref := s.hub.host() + "/myorg/lone:qa"
		v1 := s.build(ref, false)
		s.dockerCLI(n1.dockerd, "pull", "-q", ref)
		s.dockerCLI(n1.dockerd, "run", "-d", "--name", "lone", "--network", "none", ref)
		s.waitImage([]*node{n1}, "lone", v1, 30*time.Second)
		oldID, _ := s.containerImage(n1, "lone")
		s.build(ref, false)
		from := len(s.slackTexts())
		start := time.Now()
		if code, body := s.webhook(all[0], "myorg/lone", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		s.waitSlack(from, []*node{n1}, "nothing restarted lone", "is it supervised?")
		took := time.Since(start)
		if id, img := s.containerImage(n1, "lone"); id != oldID || img != v1 {
			t.Errorf("lone = %s on %s; want the old container %s running %s again", shortID(id), shortID(img), shortID(oldID), shortID(v1))
		}
		if limit := 5*time.Second + 5*time.Second; took > limit {
			t.Errorf("running again %v after the webhook; want within -restart_timeout plus a few seconds (%v)", took, limit)
		}
		if h := s.haltOf(ref); h != nil {
			t.Errorf("halt record %+v; want none", h)
		}
		s.record("scenario R-D: unsupervised 'lone' stopped, then running again on the old image %v after the webhook (-restart_timeout 5s); Slack says why; no halt", took.Round(time.Millisecond))
	})

	t.Run("E a dockerd restart during a wait costs no inspect storm", func(t *testing.T) {
		n3 := all[2]
		restartDockerd := func() {
			n3.dockerd.proc.stop(syscall.SIGTERM, 20*time.Second)
			d := s.startDockerd(n3.name, "-D")
			s.waitDockerd(d)
			n3.dockerd = d
		}
		restartDockerd() // with debug logging, which shows each API call
		ref := s.hub.host() + "/myorg/wait:qa"
		v1 := s.build(ref, false)
		s.dockerCLI(n3.dockerd, "pull", "-q", ref)
		s.dockerCLI(n3.dockerd, "run", "-d", "--name", "waiter", "--network", "none", ref)
		s.waitImage([]*node{n3}, "waiter", v1, 30*time.Second)
		s.build(ref, false)
		deployerLog := n3.deployer.log
		offset := fileSize(t, deployerLog)
		if code, body := s.webhook(all[0], "myorg/wait", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		waitFor(t, 30*time.Second, "the deployer to stop waiter", func() bool {
			return logHas(deployerLog, offset, `"msg":"stopped stale container"`, `"container":"waiter"`)
		})
		// The deployer now waits (up to -restart_timeout) for a
		// replacement that never comes; dockerd restarts meanwhile.
		dlog := n3.dockerd.proc.log
		from := fileSize(t, dlog)
		waitStart := time.Now()
		restartDockerd()
		waitFor(t, 30*time.Second, "the wait to end", func() bool {
			return logHas(deployerLog, offset, "nothing restarted the container", `"container":"waiter"`)
		})
		waited := time.Since(waitStart)
		data, err := os.ReadFile(dlog)
		if err != nil {
			t.Fatal(err)
		}
		inspects := len(inspectCall.FindAll(data[from:], -1))
		t.Logf("dockerd log after the restart: %d bytes, %d API calls", len(data)-int(from), bytes.Count(data[from:], []byte("Calling ")))
		rate := float64(inspects) / waited.Seconds()
		if rate >= 10 {
			t.Errorf("%d container inspects in %v (%.1f/s) while dockerd restarted during the wait; want under 10/s", inspects, waited, rate)
		}
		s.record("scenario R-E: dockerd restarted during a %v wait for a replacement: %d container inspects in its debug log (%.1f/s)", waited.Round(time.Millisecond), inspects, rate)
	})

	t.Run("F a dockerd restart during the wait for a good version halts nothing", func(t *testing.T) {
		// Room for a dockerd restart and a new run of the replacement
		// within one wait: the replacement is judged once dockerd is back.
		s.restartDeployers("-restart_timeout=30s")
		ref := s.hub.host() + "/myorg/bounce:qa"
		v1 := s.build(ref, false)
		// A healthcheck that passes at its fourth run, a second apart
		// (the failures before count for nothing within the start
		// period): each replacement is "starting" for about 4 s, the
		// moment dockerd restarts. --health-cmd runs /bin/sh -c; the
		// image has only /bin/busybox.
		bb, err := exec.LookPath("busybox")
		if err != nil {
			t.Fatal(err)
		}
		health := []string{"-v", bb + ":/bin/sh:ro", "--health-interval", "1s", "--health-start-period", "20s",
			"--health-cmd", "echo >>/checks; test $(/bin/busybox wc -l </checks) -ge 4"}
		for _, n := range all {
			s.supervise(n, "bounce", ref, v1, health...)
		}
		v2 := s.build(ref, false)
		offsets := map[*node]int64{}
		for _, n := range all {
			offsets[n] = fileSize(t, n.deployer.log)
		}
		start := time.Now()
		if code, body := s.webhook(all[0], "myorg/bounce", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		var first *node
		waitFor(t, 60*time.Second, "a node to stop bounce", func() bool {
			for _, n := range all {
				if logHas(n.deployer.log, offsets[n], `"msg":"stopped stale container"`, `"container":"bounce"`) {
					first = n
					return true
				}
			}
			return false
		})
		// Its supervisor runs the new version; dockerd restarts before
		// it is healthy, stopping it (exit code 0: the app exits on
		// SIGTERM) and everything else.
		var health0 string
		waitFor(t, 30*time.Second, "the replacement on "+first.name+" to run "+shortID(v2), func() bool {
			c, err := first.cli.InspectContainerWithOptions(docker.InspectContainerOptions{ID: "bounce"})
			if err != nil || c.Image != v2 || !c.State.Running {
				return false
			}
			health0 = c.State.Health.Status
			return true
		})
		if health0 == "healthy" {
			t.Fatalf("the replacement on %s was healthy before dockerd restarted: the wait was over", first.name)
		}
		restartAt := time.Now()
		first.dockerd.proc.stop(syscall.SIGTERM, 20*time.Second)
		d := s.startDockerd(first.name)
		s.waitDockerd(d)
		first.dockerd = d
		down := time.Since(restartAt)
		s.waitImage(all, "bounce", v2, 60*time.Second)
		took := time.Since(start)
		s.barrier(all)
		if h := s.haltOf(ref); h != nil {
			t.Errorf("halt record %+v; a dockerd restart must not halt a good version", h)
		}
		for _, n := range all {
			if _, img := s.containerImage(n, "bounce"); img != v2 {
				t.Errorf("%s: bounce runs %s; want %s", n.name, shortID(img), shortID(v2))
			}
		}
		if !logHas(first.deployer.log, offsets[first], "the docker daemon answers again", `"container":"bounce"`) ||
			!logHas(first.deployer.log, offsets[first], `"msg":"replacement up"`, `"container":"bounce"`) {
			t.Errorf("%s's log does not show the wait judging bounce once dockerd was back", first.name)
		}
		s.record("scenario R-F: dockerd on %s restarted (%v) while the replacement of a good version was %q: no halt, all 3 nodes on %s %v after the webhook",
			first.name, down.Round(time.Millisecond), health0, shortID(v2), took.Round(time.Millisecond))
	})

	t.Run("G after a halt under stop, the next push never has two nodes without a healthy app", func(t *testing.T) {
		s.restartDeployers("-max_unavailable=1", "-restart_strategy=stop", "-restart_timeout=20s")
		ref := s.hub.host() + "/myorg/hc:qa"
		v1 := s.buildHealth(ref, true)
		for _, n := range all {
			s.supervise(n, "hc", ref, v1)
		}
		waitFor(t, 30*time.Second, "hc healthy everywhere", func() bool {
			for _, n := range all {
				if !s.healthy(n, "hc") {
					return false
				}
			}
			return true
		})
		// ... and so in the cluster's view: a node's down record follows
		// Docker's health events within about 250 ms (README: what counts
		// as down), and a push inside that window would find the "starting"
		// of v1 still recorded.
		waitFor(t, 10*time.Second, "no down record of hc", func() bool {
			resp, err := s.cli.Get(t.Context(), s.prefix+downDir(ref), clientv3.WithPrefix(), clientv3.WithCountOnly())
			return err == nil && resp.Count == 0
		})
		// A version that never turns healthy halts on the first node;
		// its supervisor keeps running it there, unhealthy.
		broken := s.buildHealth(ref, false)
		if code, body := s.webhook(all[0], "myorg/hc", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		var h *halt
		waitFor(t, 60*time.Second, "the rollout to halt", func() bool {
			h = s.haltOf(ref)
			return h != nil && h.ImageID == broken
		})
		halter := nodeByName(all, h.Node)
		s.barrier(all)
		if _, img := s.containerImage(halter, "hc"); img != broken || s.healthy(halter, "hc") {
			t.Fatalf("%s runs %s, healthy %v; want the broken version, unhealthy", halter.name, shortID(img), s.healthy(halter, "hc"))
		}
		waitFor(t, 30*time.Second, halter.name+"'s down record of hc", func() bool {
			resp, err := s.cli.Get(t.Context(), s.prefix+downKey(ref, halter.name))
			return err == nil && len(resp.Kvs) == 1 && strings.Contains(string(resp.Kvs[0].Value), `"name":"hc"`)
		})
		var others []*node
		for _, n := range all {
			if n != halter {
				others = append(others, n)
			}
		}

		// The next push. The halting node's deployer is held until both
		// healthy nodes wait for the tag's slot: the old code, counting
		// slots only, granted the first of them one at once, and it
		// stopped a healthy app while the halting node had none.
		stop := s.healthSampler("hc")
		if err := syscall.Kill(halter.deployer.cmd.Process.Pid, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		resumed := false
		defer func() {
			if !resumed {
				_ = syscall.Kill(halter.deployer.cmd.Process.Pid, syscall.SIGCONT)
			}
		}()
		v3 := s.buildHealth(ref, true)
		start := time.Now()
		if code, body := s.webhook(others[0], "myorg/hc", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		dir := s.prefix + slotsDir(ref)
		// Bounded well inside the halting node's 10 s lease, which its
		// frozen deployer does not refresh.
		waitFor(t, 6*time.Second, "both healthy nodes in the slot queue", func() bool { return len(s.slotKeys(dir)) >= 2 })
		if err := syscall.Kill(halter.deployer.cmd.Process.Pid, syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		resumed = true
		waitFor(t, 120*time.Second, "hc healthy on "+shortID(v3)+" everywhere", func() bool {
			for _, n := range all {
				if _, img := s.containerImage(n, "hc"); img != v3 || !s.healthy(n, "hc") {
					return false
				}
			}
			return true
		})
		took := time.Since(start)
		got := stop()
		if got.maxDown > 1 {
			t.Errorf("up to %d nodes without a healthy hc at once (samples by nodes down: %v; first: %s); want at most 1 (-max_unavailable=1)", got.maxDown, got.byDown, got.worst)
		}
		s.record("scenario R-G: after %s halted a never-healthy version under stop (kept running it, unhealthy), the next push converged on %s in %v; nodes without a healthy app, sampled every 50ms on each node's Engine API: at most %d at once (%d samples: %d with none down, %d with one, %d with two or more)",
			halter.name, shortID(v3), took.Round(time.Millisecond), got.maxDown, got.samples, got.byDown[0], got.byDown[1], got.samples-got.byDown[0]-got.byDown[1])
	})

	t.Run("H a version that never turns healthy is rolled back by itself", func(t *testing.T) { autoRollbackScenario(t, s) })
	t.Run("I deployer rollback with recreate-strategy containers", func(t *testing.T) { recreateRollbackScenario(t, s) })
	t.Run("P release policy", func(t *testing.T) { policyScenarios(t, s) }) // e2e_policy_test.go
	canaryScenarios(t, s)                                                   // e2e_canary_test.go: J, K
}

// buildHealth builds a version of an image with a HEALTHCHECK (every
// second) that passes, or that never does, and pushes it.
func (s *stack) buildHealth(ref string, healthy bool) string {
	s.t.Helper()
	check := "true"
	if !healthy {
		check = "false"
	}
	// A generous timeout: on a loaded machine an exec of busybox can
	// take over a second, and a healthy app flapping "unhealthy" would
	// count as a node down that no deployer caused.
	return s.buildImage(ref, fmt.Sprintf("HEALTHCHECK --interval=1s --timeout=10s --retries=1 CMD [\"/bin/busybox\",%q]\n"+
		"CMD [\"/bin/busybox\",\"sh\",\"-c\",\"trap 'exit 0' TERM; while true; do /bin/busybox sleep 0.2; done\"]\n", check))
}

// healthy reports whether container name on n runs, not restarting, and
// healthy, as the Engine API shows it.
func (s *stack) healthy(n *node, name string) bool {
	c, err := n.cli.InspectContainerWithOptions(docker.InspectContainerOptions{ID: name})
	return err == nil && c.State.Running && !c.State.Restarting && c.State.Health.Status == "healthy"
}

// healthSample is what healthSampler saw.
type healthSample struct {
	samples int
	maxDown int         // most nodes without a healthy container at once
	byDown  map[int]int // samples by the number of nodes without one
	worst   string      // the nodes down, and how, in the first sample with maxDown
}

// healthSampler counts, every 50 ms, the nodes where container name is not
// running healthy (inspected on each node's Engine API).
func (s *stack) healthSampler(name string) (stop func() healthSample) {
	done := make(chan struct{})
	result := make(chan healthSample)
	go func() {
		h := healthSample{byDown: map[int]int{}}
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			down := 0
			var how []string
			for _, n := range s.nodes {
				c, err := n.cli.InspectContainerWithOptions(docker.InspectContainerOptions{ID: name})
				if err == nil && c.State.Running && !c.State.Restarting && c.State.Health.Status == "healthy" {
					continue
				}
				down++
				if err != nil {
					how = append(how, n.name+": "+err.Error())
				} else {
					how = append(how, fmt.Sprintf("%s: %s running=%v restarting=%v health=%s", n.name, shortID(c.Image), c.State.Running, c.State.Restarting, c.State.Health.Status))
				}
			}
			h.samples++
			if down > h.maxDown {
				h.worst = time.Now().UTC().Format("15:04:05.000") + " " + strings.Join(how, "; ")
			}
			h.maxDown = max(h.maxDown, down)
			h.byDown[down]++
			select {
			case <-done:
				result <- h
				return
			case <-t.C:
			}
		}
	}()
	return func() healthSample {
		close(done)
		return <-result
	}
}

var inspectCall = regexp.MustCompile(`Calling GET /(v[0-9.]+/)?containers/[^/"?]+/json[?"]`)

func fileSize(t *testing.T, path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// logHas reports whether one line after offset contains every part.
func logHas(path string, offset int64, parts ...string) bool {
	data, err := os.ReadFile(path)
	if err != nil || int64(len(data)) < offset {
		return false
	}
	for line := range bytes.Lines(data[offset:]) {
		ok := true
		for _, p := range parts {
			ok = ok && bytes.Contains(line, []byte(p))
		}
		if ok {
			return true
		}
	}
	return false
}

// slotKeys lists the keys of a rollout's slots directory dir: the
// holders, then the waiters (queueDir), each oldest first, each named
// dir + its id.
func (s *stack) slotKeys(dir string) []string {
	var keys []string
	for _, d := range []string{dir, strings.TrimSuffix(dir, slotsLeaf) + queueLeaf} {
		resp, err := s.cli.Get(s.t.Context(), d, clientv3.WithPrefix(), clientv3.WithKeysOnly(),
			clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortAscend))
		if err != nil {
			s.t.Fatal(err)
		}
		for _, kv := range resp.Kvs {
			keys = append(keys, dir+strings.TrimPrefix(string(kv.Key), d))
		}
	}
	return keys
}

// haltOf reads the halt record of a tag reference, if any.
func (s *stack) haltOf(ref string) *halt {
	resp, err := s.cli.Get(s.t.Context(), s.prefix+haltKey(ref))
	if err != nil {
		s.t.Fatal(err)
	}
	return decodeHalt(resp.Kvs)
}
