//go:build e2e

package main

// Real-stack scenarios of rollbacks on TestE2ERollout's stack (three
// nodes): a halt rolled back by itself (-auto_rollback) under supervisors
// that pull, and deployer rollback with recreate-strategy containers (no
// supervisor). TestE2ERollout runs them after its own scenarios.

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// logLines returns the lines of node n's deployer log (every run) that
// contain all of want.
func (s *stack) logLines(n *node, want ...string) []string {
	data, _ := os.ReadFile(filepath.Join(s.dir, "deployer-"+n.name+".log"))
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		ok := true
		for _, w := range want {
			ok = ok && strings.Contains(line, w)
		}
		if ok {
			out = append(out, line)
		}
	}
	return out
}

// waitLedger waits until the newest versions of ref are the image IDs
// ids (newest first) with the outcomes outcomes, and returns the ledger.
func (s *stack) waitLedger(t *testing.T, ref string, ids, outcomes []string) []ledgerVersion {
	t.Helper()
	var vs []ledgerVersion
	waitFor(t, 30*time.Second, "the ledger of "+ref+": "+strings.Join(outcomes, ", "), func() bool {
		vs = s.ledgerOf(ref)
		if len(vs) < len(ids) {
			return false
		}
		for i := range ids {
			if vs[i].ImageID != ids[i] || vs[i].Outcome != outcomes[i] || vs[i].Digest == "" {
				return false
			}
		}
		return true
	})
	return vs
}

// autoRollbackScenario: a version that never turns healthy halts on the
// first node; the tag goes back to the version before by itself, and
// every node runs it again within -restart_timeout plus a few seconds.
func autoRollbackScenario(t *testing.T, s *stack) {
	all := s.nodes
	const restartTimeout = 8 * time.Second
	s.restartDeployers("-max_unavailable=1", "-restart_strategy=stop", "-restart_timeout="+restartTimeout.String(), "-auto_rollback=true")
	ref := s.hub.host() + "/myorg/ar:qa"
	v0 := s.buildHealth(ref, true)
	for _, n := range all {
		s.supervise(n, "ar", ref, v0)
	}
	v1 := s.buildHealth(ref, true)
	if code, body := s.webhook(all[0], "myorg/ar", "qa"); code != 200 {
		t.Fatalf("webhook: %d %s", code, body)
	}
	s.waitImage(all, "ar", v1, 90*time.Second)
	s.waitLedger(t, ref, []string{v1}, []string{outcomeRolledOut})

	broken := s.buildHealth(ref, false)
	start := time.Now()
	if code, body := s.webhook(all[0], "myorg/ar", "qa"); code != 200 {
		t.Fatalf("webhook: %d %s", code, body)
	}
	var h *halt
	waitFor(t, 60*time.Second, "the rollout to halt", func() bool {
		h = s.haltOf(ref)
		return h != nil && h.ImageID == broken
	})
	var back time.Time
	waitFor(t, restartTimeout+60*time.Second, "every node back on "+shortID(v1), func() bool {
		for _, n := range all {
			if _, img := s.containerImage(n, "ar"); img != v1 {
				return false
			}
		}
		back = time.Now()
		return true
	})
	took := back.Sub(h.Time)
	if limit := restartTimeout + 5*time.Second; took > limit {
		t.Errorf("the last node ran %s again %v after the halt; want within -restart_timeout + 5s (%v)", shortID(v1), took, limit)
	}
	vs := s.waitLedger(t, ref, []string{v1, broken, v1}, []string{outcomeRolledOut, outcomeRolledBack, outcomeRolledOut})
	if a := vs[0].AskedBy; a.Source != "auto-rollback" || a.Command != "auto-rollback" || a.Host != h.Node || !strings.Contains(a.Cause, "halted by "+h.Node) {
		t.Errorf("the rollback's version asked by %+v; want auto-rollback on the halting node %s with the halt's cause", a, h.Node)
	}
	var lines []string
	for _, n := range all {
		lines = append(lines, s.logLines(n, "rolled back by itself", ref)...)
	}
	if len(lines) != 1 {
		t.Errorf("%d nodes logged an auto-rollback; want 1:\n%s", len(lines), strings.Join(lines, "\n"))
	}
	s.record("scenario R-H: a never-healthy version halted on %s %v after the webhook (-restart_timeout %v); rolled back by itself: every node back on %s %v after the halt",
		h.Node, h.Time.Sub(start).Round(time.Millisecond), restartTimeout, shortID(v1), took.Round(time.Millisecond))
}

// recreateRollbackScenario: deployer rollback with recreate-strategy
// containers (no supervisor): every node back on the first version's
// image, never more than -max_unavailable down; a push after deploys.
func recreateRollbackScenario(t *testing.T, s *stack) {
	all := s.nodes
	ref := s.hub.host() + "/myorg/rrb:qa"
	v0 := s.build(ref, false)
	for _, n := range all {
		s.dockerCLI(n.dockerd, "pull", "-q", ref)
		s.dockerCLI(n.dockerd, "run", "-d", "--name", "rrb", "--network", "none", "--restart", "always", "-l", "deployer.strategy=recreate", ref)
		s.waitImage([]*node{n}, "rrb", v0, 30*time.Second)
	}
	push := func() string {
		v := s.build(ref, false)
		if code, body := s.webhook(all[0], "myorg/rrb", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		s.waitImage(all, "rrb", v, 90*time.Second)
		return v
	}
	v1 := push()
	v2 := push()
	s.waitLedger(t, ref, []string{v2, v1}, []string{outcomeRolledOut, outcomeRolledOut})

	stop := s.sampler("rrb")
	start := time.Now()
	out, err := exec.Command(s.bin, "rollback", ref, "-etcd_nodes", s.etcdEndpoints(), "-etcd_prefix", s.prefix, "-dockercfg", "").CombinedOutput()
	if err != nil {
		t.Fatalf("deployer rollback: %v\n%s", err, out)
	}
	s.waitImage(all, "rrb", v1, 90*time.Second)
	took := time.Since(start)
	maxDown, samples := stop()
	if maxDown > 1 {
		t.Errorf("up to %d nodes had no running rrb at once during the rollback; want at most 1 (-max_unavailable)", maxDown)
	}
	s.waitLedger(t, ref, []string{v1, v2}, []string{outcomeRolledOut, outcomeRolledBack})
	s.record("scenario R-I: deployer rollback of recreate-strategy containers (no supervisor): every node back on %s %v after the command; most nodes down at once: %d (%d samples every 50ms)\n%s",
		shortID(v1), took.Round(time.Millisecond), maxDown, samples, out)
	v3 := push()
	s.waitLedger(t, ref, []string{v3, v1, v2}, []string{outcomeRolledOut, outcomeRolledOut, outcomeRolledBack})
}
