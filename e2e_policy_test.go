//go:build e2e

package main

// The release policy on the real stack (README, Release policy), run on
// TestE2ERollout's three nodes: max_unavailable as a percentage against a
// count, a push during a freeze (also across a restart of every
// deployer), and a push outside a deploy window that opens 15 s later.

import (
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// policyCLI runs a deployer subcommand against the stack's etcd.
func (s *stack) policyCLI(t *testing.T, cmd string, args ...string) string {
	t.Helper()
	argv := append([]string{cmd, "-etcd_nodes", s.etcdEndpoints(), "-etcd_prefix", s.prefix, "-registry", s.hub.host()}, args...)
	out, err := exec.Command(s.bin, argv...).CombinedOutput()
	if err != nil {
		t.Fatalf("deployer %s: %v\n%s", strings.Join(argv, " "), err, out)
	}
	return string(out)
}

// containerIDs returns the ID of container name on every node.
func (s *stack) containerIDs(name string) map[string]string {
	ids := map[string]string{}
	for _, n := range s.nodes {
		id, _ := s.containerImage(n, name)
		ids[n.name] = id
	}
	return ids
}

// holdsStill checks for d that container name keeps its container on
// every node (nothing stopped or re-created) and runs want.
func (s *stack) holdsStill(t *testing.T, name, want string, d time.Duration) {
	t.Helper()
	ids := s.containerIDs(name)
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(250 * time.Millisecond) { // sampling a duration, not synchronising
		for _, n := range s.nodes {
			id, img := s.containerImage(n, name)
			if id != ids[n.name] || img != want {
				t.Fatalf("%s on %s replaced during the hold: %s on %s (was %s)", name, n.name, shortID(id), shortID(img), shortID(ids[n.name]))
			}
		}
	}
}

func (s *stack) waitingOf(t *testing.T, ref string) *waitingRecord {
	for _, tg := range s.status(s.nodes[0]).Tags {
		if tg.Image == ref {
			return tg.Waiting
		}
	}
	return nil
}

func policyScenarios(t *testing.T, s *stack) {
	all := s.nodes

	t.Run("1 max_unavailable 50% against 1 on three nodes", func(t *testing.T) {
		ref := s.hub.host() + "/myorg/pct:qa"
		v := s.build(ref, false)
		for _, n := range all {
			s.supervise(n, "pct", ref, v)
		}
		took := map[string]time.Duration{}
		most := map[string]int{}
		for _, mu := range []string{"1", "50%"} {
			s.policyCLI(t, "policy", ref, "-max_unavailable", mu, "-up_after", "2s")
			v = s.build(ref, false)
			stop := s.sampler("pct")
			if code, body := s.webhook(all[0], "myorg/pct", "qa"); code != 200 {
				t.Fatalf("webhook: %d %s", code, body)
			}
			took[mu] = s.waitImage(all, "pct", v, 90*time.Second)
			most[mu], _ = stop()
			s.barrier(all)
		}
		if most["1"] > 1 || most["50%"] > 2 {
			t.Errorf("most nodes down at once: %d under 1, %d under 50%%; want at most 1 and 2", most["1"], most["50%"])
		}
		if took["50%"] >= took["1"] {
			t.Errorf("50%% took %v, 1 took %v; want 50%% faster", took["50%"], took["1"])
		}
		s.record("scenario P-1: 3 nodes, up_after 2s: rollout (push to every node on it) under max_unavailable 1: %v (most down at once %d); under 50%% (2 of 3): %v (most down at once %d)",
			took["1"].Round(10*time.Millisecond), most["1"], took["50%"].Round(10*time.Millisecond), most["50%"])
	})

	freezeThaw := func(t *testing.T, repo string, restart bool) (time.Duration, int) {
		ref := s.hub.host() + "/" + repo + ":qa"
		name := strings.ReplaceAll(repo, "/", "-")
		v1 := s.build(ref, false)
		for _, n := range all {
			s.supervise(n, name, ref, v1)
		}
		// All at once: the figure is the release's, not the rolling pace's
		// (under 1, each node adds its replacement's ~2.5 s, P-1).
		s.policyCLI(t, "policy", ref, "-max_unavailable", "100%")
		s.policyCLI(t, "freeze", repo, "-reason", "e2e release train")
		v2 := s.build(ref, false)
		if code, body := s.webhook(all[0], repo, "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		waitFor(t, 20*time.Second, "the push recorded as waiting", func() bool {
			w := s.waitingOf(t, ref)
			return w != nil && w.ImageID == v2 && strings.Contains(w.Reason, "e2e release train")
		})
		held := time.Now()
		if restart {
			s.restartDeployers()
		}
		s.holdsStill(t, name, v1, 20*time.Second-time.Since(held))
		if !strings.Contains(s.policyCLI(t, "status"), "waiting: "+shortID(v2)) {
			t.Errorf("deployer status does not show %s waiting", shortID(v2))
		}
		told := 0
		for _, text := range s.slackTexts() {
			if strings.Contains(text, repo+":qa") && strings.Contains(text, "waits: frozen since") {
				told++
			}
		}
		out := s.policyCLI(t, "thaw", repo)
		took := s.waitImage(all, name, v2, 30*time.Second)
		t.Logf("thaw: %s", out)
		if took > 5*time.Second {
			t.Errorf("every node on the released version %v after the thaw; want within 5 s", took)
		}
		return took, told
	}

	t.Run("2 a push during a freeze waits, the thaw deploys it", func(t *testing.T) {
		took, told := freezeThaw(t, "myorg/freeze", false)
		if told != 1 {
			t.Errorf("Slack told of the held version %d times; want once", told)
		}
		s.record("scenario P-2: a push during a freeze (max_unavailable 100%%): no container replaced on 3 nodes for 20 s, Slack told once; thaw to every node on it: %v",
			took.Round(10*time.Millisecond))
	})

	t.Run("3 the same across a restart of every deployer during the freeze", func(t *testing.T) {
		took, told := freezeThaw(t, "myorg/freezer", true)
		if told != 1 {
			t.Errorf("Slack told of the held version %d times; want once", told)
		}
		s.record("scenario P-3: a push during a freeze (max_unavailable 100%%), every deployer restarted meanwhile: no container replaced for 20 s, Slack told once; thaw to every node on it: %v",
			took.Round(10*time.Millisecond))
	})

	t.Run("4 a push outside a window that opens 15 s later deploys when it opens", func(t *testing.T) {
		ref := s.hub.host() + "/myorg/window:qa"
		v1 := s.build(ref, false)
		for _, n := range all {
			s.supervise(n, "window", ref, v1)
		}
		opens := time.Now().Add(15 * time.Second).Truncate(time.Second).UTC()
		// Open from opens for two minutes, to the second: the six-field
		// cron form, one window per minute.
		wins := []string{fmt.Sprintf("cron %d-59 %d %d * * *", opens.Second(), opens.Minute(), opens.Hour())}
		for i := 1; i <= 2; i++ {
			m := opens.Truncate(time.Minute).Add(time.Duration(i) * time.Minute)
			wins = append(wins, fmt.Sprintf("cron * %d %d * * *", m.Minute(), m.Hour()))
		}
		s.policyCLI(t, "policy", ref, "-windows", strings.Join(wins, "; "), "-max_unavailable", "100%")
		v2 := s.build(ref, false)
		if time.Until(opens) < 5*time.Second {
			t.Fatalf("the build took too long: the window opens in %v", time.Until(opens))
		}
		if code, body := s.webhook(all[0], "myorg/window", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		s.holdsStill(t, "window", v1, time.Until(opens)-200*time.Millisecond)
		s.waitImage(all, "window", v2, 30*time.Second)
		after := time.Since(opens)
		if after > 5*time.Second {
			t.Errorf("every node on it %v after the window opened; want within 5 s", after)
		}
		s.record("scenario P-4: a push outside a window opening 15 s later (%s; max_unavailable 100%%): nothing replaced before it opened; every node on it %v after it opened",
			strings.Join(wins, "; "), after.Round(10*time.Millisecond))
	})
}
