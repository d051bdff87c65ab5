//go:build e2e

package main

// Scenarios of pins and the quarantine (issue 19 sections 3 and 4), run
// on TestE2E's stack (e2e_test.go): 14d and 14e.

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// ledgerOf reads the deploy ledger of ref with deployer history -json;
// nil when it cannot.
func (s *stack) ledgerOf(ref string) []ledgerVersion {
	out, err := exec.Command(s.bin, "history", "-json", "-etcd_nodes", s.etcdEndpoints(), "-etcd_prefix", s.prefix, ref).Output()
	var h historyView
	if err != nil || json.Unmarshal(out, &h) != nil || len(h.Tags) != 1 {
		return nil
	}
	return h.Tags[0].Versions
}

// starts counts, on every node, the starts of containers named name since
// t0 (Docker's event log).
func (s *stack) starts(ns []*node, name string, since time.Time) int {
	s.t.Helper()
	until := strconv.FormatInt(time.Now().Unix()+1, 10)
	total := 0
	for _, n := range ns {
		out := s.dockerCLI(n.dockerd, "events", "--since", fmt.Sprintf("%d.%09d", since.Unix(), since.Nanosecond()), "--until", until,
			"--filter", "type=container", "--filter", "event=start", "--filter", "container="+name, "--format", "{{.ID}}")
		if out != "" {
			total += len(strings.Split(out, "\n"))
		}
	}
	return total
}

// localTag is the image ID node n's local tag ref names.
func (s *stack) localTag(n *node, ref string) string {
	img, err := n.cli.InspectImage(ref)
	if err != nil {
		return ""
	}
	return img.ID
}

// logCount counts the lines of node n's deployer log that contain text.
func (s *stack) logCount(n *node, text string) int {
	b, _ := os.ReadFile(filepath.Join(s.dir, "deployer-"+n.name+".log"))
	return strings.Count(string(b), text)
}

// quarantineScenario (14d): a version that halted comes back by a re-sent
// webhook, by a deployer restart that replays its trigger and by the
// periodic re-pull: no container starts on it, every node's local tag
// stays on the good version, the ledger records the hold; then the next
// push deploys. The containers are re-created by the deployer (recreate
// strategy): nothing but the deployer could start the bad version.
func quarantineScenario(t *testing.T, s *stack) {
	all := s.nodes
	qRef := s.hub.host() + "/myorg/q:qa"
	good := s.build(qRef, false)
	for _, n := range all {
		s.dockerCLI(n.dockerd, "run", "-d", "--name", "qapp", "--network", "none", "--restart", "unless-stopped",
			"--label", "deployer.strategy=recreate", qRef)
	}
	defer func() {
		for _, n := range all {
			s.dockerCLI(n.dockerd, "rm", "-f", "qapp")
		}
	}()
	s.waitImage(all, "qapp", good, 60*time.Second)
	webhook := func() {
		t.Helper()
		if code, body := s.webhook(all[0], "myorg/q", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
	}
	// The good version in the ledger first: deployed by a trigger.
	webhook()
	waitFor(t, 30*time.Second, "the good version rolled out in the ledger", func() bool {
		vs := s.ledgerOf(qRef)
		return len(vs) > 0 && vs[0].ImageID == good && vs[0].Outcome == outcomeRolledOut
	})

	broken := s.buildKind(qRef, "broken")
	webhook()
	waitFor(t, 60*time.Second, "the broken version halted in the ledger", func() bool {
		vs := s.ledgerOf(qRef)
		return len(vs) > 0 && vs[0].ImageID == broken && vs[0].Outcome == outcomeHalted
	})
	s.barrier(all)
	s.waitImage(all, "qapp", good, 60*time.Second) // the halting node put its old container back
	ids := map[string]string{}
	for _, n := range all {
		ids[n.name], _ = s.containerImage(n, "qapp")
	}

	since := time.Now()
	// 1. The webhook sent again.
	webhook()
	s.barrier(all)
	byWebhook := s.starts(all, "qapp", since)

	// 2. A deployer that was down when it was sent replays it at start.
	n3 := all[2]
	n3.deployer.stop(syscall.SIGTERM, 15*time.Second)
	webhook()
	s.runDeployer(n3)
	s.barrier(all)
	byRestart := s.starts(all, "qapp", since) - byWebhook

	// 3. The periodic re-pull, every second, on every node (restarted).
	before := map[string]int{}
	for _, n := range all {
		before[n.name] = s.logCount(n, "periodic re-pull queued")
	}
	s.restartDeployers("-repull_period=1s")
	waitFor(t, 30*time.Second, "two periodic re-pulls on every node", func() bool {
		for _, n := range all {
			if s.logCount(n, "periodic re-pull queued") < before[n.name]+2 {
				return false
			}
		}
		return true
	})
	s.restartDeployers("-repull_period=0")
	byRepull := s.starts(all, "qapp", since) - byWebhook - byRestart

	if byWebhook+byRestart+byRepull != 0 {
		t.Errorf("containers started while %s was quarantined: %d by the webhook, %d by the restart, %d by the re-pull; want 0",
			shortID(broken), byWebhook, byRestart, byRepull)
	}
	for _, n := range all {
		if id, img := s.containerImage(n, "qapp"); id != ids[n.name] || img != good {
			t.Errorf("%s: qapp is %s on %s; want the same container on %s", n.name, shortID(id), shortID(img), shortID(good))
		}
		if tag := s.localTag(n, qRef); tag != good {
			t.Errorf("%s: the local tag %s names %s; want it back on %s", n.name, qRef, shortID(tag), shortID(good))
		}
	}
	var held string
	for _, v := range s.ledgerOf(qRef) {
		if v.ImageID == broken {
			held = v.Outcome + ", " + v.Held
		}
	}
	if !strings.Contains(held, "quarantined") {
		t.Errorf("the ledger's broken version: %q; want the hold recorded", held)
	}
	s.record("scenario 14d: halted %s re-sent by webhook, by a deployer restart's replay and by the periodic re-pull (1s, twice per node): %d, %d and %d containers started on it over 3 nodes; local tags back on %s; ledger: %s",
		shortID(broken), byWebhook, byRestart, byRepull, shortID(good), held)

	// The next push deploys.
	start := time.Now()
	next := s.build(qRef, false)
	webhook()
	s.waitImage(all, "qapp", next, 90*time.Second)
	s.record("scenario 14d: the next push after the quarantine rolled out to all 3 nodes in %v", time.Since(start).Round(time.Millisecond))
}

// refusedRollbackScenario (14e): a registry that refuses writes (read
// only); deployer rollback says so in one line and pins the fleet to the
// old version instead: the recreate-strategy containers go back on it,
// every local tag names it, and the answer names the container under a
// supervisor that pulls (the stop strategy), which keeps the registry's
// version. Unpinning then deploys nothing: the rolled-back version is
// quarantined, and the registry still serves it.
func refusedRollbackScenario(t *testing.T, s *stack) {
	all := s.nodes
	ro := s.startRegistry("ro", "")
	defer func() { ro.proc.stop(syscall.SIGTERM, 10*time.Second) }() // the proc of the restart below
	pRef := ro.host() + "/myorg/pin:qa"
	v1 := s.build(pRef, false)
	for _, n := range all {
		s.dockerCLI(n.dockerd, "run", "-d", "--name", "pinrc", "--network", "none", "--restart", "unless-stopped",
			"--label", "deployer.strategy=recreate", pRef)
	}
	s.supervise(all[0], "pinsup", pRef, v1)
	defer func() {
		all[0].sups["pinsup"].stop(syscall.SIGTERM, 10*time.Second)
		for _, n := range all {
			s.dockerCLI(n.dockerd, "rm", "-f", "pinrc")
		}
	}()
	s.waitImage(all, "pinrc", v1, 60*time.Second)
	trigger := func() {
		t.Helper()
		if code, body := s.postHook(all[0], "/api/deploy", "Bearer "+s.secret, fmt.Sprintf(`{"image":%q}`, pRef)); code != 200 {
			t.Fatalf("POST /api/deploy: %d %s", code, body)
		}
	}
	trigger()
	waitFor(t, 30*time.Second, "v1 rolled out in the ledger", func() bool {
		vs := s.ledgerOf(pRef)
		return len(vs) > 0 && vs[0].ImageID == v1 && vs[0].Outcome == outcomeRolledOut && vs[0].Digest != ""
	})
	v2 := s.build(pRef, false)
	trigger()
	s.waitImage(all, "pinrc", v2, 90*time.Second)
	s.waitImage(all[:1], "pinsup", v2, 60*time.Second)
	waitFor(t, 30*time.Second, "v2 rolled out in the ledger", func() bool {
		vs := s.ledgerOf(pRef)
		return len(vs) > 1 && vs[0].ImageID == v2 && vs[0].Outcome == outcomeRolledOut
	})

	// The registry becomes read-only.
	ro.proc.stop(syscall.SIGTERM, 10*time.Second)
	cfg, err := os.ReadFile(ro.config)
	if err != nil {
		t.Fatal(err)
	}
	cfg = []byte(strings.Replace(string(cfg), "  delete:\n    enabled: true\n", "  delete:\n    enabled: true\n  maintenance:\n    readonly:\n      enabled: true\n", 1))
	if err := os.WriteFile(ro.config, cfg, 0o644); err != nil {
		t.Fatal(err)
	}
	s.startRegistryProc(ro, "ro")

	from := len(s.slackTexts())
	start := time.Now()
	out, err := exec.Command(s.bin, "rollback", pRef, "-etcd_nodes", s.etcdEndpoints(), "-etcd_prefix", s.prefix, "-dockercfg", "",
		"-slack_webhook_url", s.slack.URL).CombinedOutput()
	answered := time.Since(start)
	if err != nil {
		t.Fatalf("deployer rollback: %v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	for i, want := range []string{"registry " + ro.host() + " refused", "pinned fleet-wide to version 1", "node1/pinsup"} {
		if len(lines) <= i || !strings.Contains(lines[i], want) {
			t.Errorf("line %d of deployer rollback lacks %q:\n%s", i+1, want, out)
		}
	}
	s.waitImage(all, "pinrc", v1, 90*time.Second)
	took := time.Since(start)
	s.barrier(all)
	if _, img := s.containerImage(all[0], "pinsup"); img != v2 {
		t.Errorf("node1's pinsup runs %s; want the registry's %s (its supervisor pulls: the deployer leaves it alone)", shortID(img), shortID(v2))
	}
	for _, n := range all {
		if tag := s.localTag(n, pRef); tag != v1 {
			t.Errorf("%s: the local tag names %s; want the pinned %s", n.name, shortID(tag), shortID(v1))
		}
	}
	var told []string
	for _, text := range s.slackTexts()[from:] {
		if strings.Contains(text, "myorg/pin:qa") && strings.Contains(text, "pinned fleet-wide") {
			told = append(told, text)
		}
	}
	if len(told) != 1 {
		t.Errorf("Slack heard of the pinned rollback %d times; want once:\n%s", len(told), strings.Join(told, "\n---\n"))
	}
	st, err := exec.Command(s.bin, "status", "-etcd_nodes", s.etcdEndpoints(), "-etcd_prefix", s.prefix).CombinedOutput()
	if err != nil || !strings.Contains(string(st), "PINNED to version 1") {
		t.Errorf("deployer status does not show the pin: %v\n%s", err, st)
	}
	s.record("scenario 14e: deployer rollback on a read-only registry answered in %v; recreate containers on all 3 nodes back on %s %v after the command; node1's pulling supervisor kept %s, named in the warning:\n%s",
		answered.Round(time.Millisecond), shortID(v1), took.Round(time.Millisecond), shortID(v2), out)

	// Unpinning deploys the newest version the registry serves: v2, which
	// the rollback quarantined. Nothing changes.
	since := time.Now()
	out, err = exec.Command(s.bin, "unpin", pRef, "-etcd_nodes", s.etcdEndpoints(), "-etcd_prefix", s.prefix).CombinedOutput()
	if err != nil {
		t.Fatalf("deployer unpin: %v\n%s", err, out)
	}
	s.barrier(all)
	n := s.starts(all, "pinrc", since)
	for _, node := range all {
		if _, img := s.containerImage(node, "pinrc"); img != v1 {
			t.Errorf("%s: after the unpin pinrc runs %s; want %s (%s is quarantined)", node.name, shortID(img), shortID(v1), shortID(v2))
		}
	}
	s.record("scenario 14e: deployer unpin: %d containers started (the registry's %s is quarantined by the rollback): %s", n, shortID(v2), strings.TrimSpace(string(out)))
}
