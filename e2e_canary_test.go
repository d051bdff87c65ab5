//go:build e2e

package main

// Canary rollouts on the real stack (TestE2ERollout's three nodes): a
// version that turns unhealthy during the bake is halted and rolled back
// without reaching another node; a good version under manual promotion
// stays on the canary until deployer promote.

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/die-net/deployer/internal/etcdc"
)

// canaryScenarios runs on s, whose deployers run with -max_unavailable=1
// and the stop strategy.
func canaryScenarios(t *testing.T, s *stack) {
	all := s.nodes
	canary, others := all[0], all[1:]

	t.Run("J a version unhealthy during the bake is halted and rolled back on the canary only", func(t *testing.T) {
		ref := s.hub.host() + "/myorg/canary:qa"
		s.putPolicy(ref, policy{CanaryNodes: &[]string{canary.name}, Bake: durPtr(20 * time.Second), Promotion: promoteAuto})
		v1 := s.build(ref, false)
		for _, n := range all {
			s.supervise(n, "canary", ref, v1)
		}
		s.deployKnown(t, ref, "myorg/canary", v1)

		// Healthy for the first 10 s after its start, then unhealthy.
		v2 := s.buildImage(ref, `HEALTHCHECK --interval=1s --timeout=2s --retries=1 CMD ["/bin/busybox","sh","-c","test $(( $(/bin/busybox date +%s) - $(/bin/busybox cat /started) )) -lt 10"]
CMD ["/bin/busybox","sh","-c","/bin/busybox date +%s > /started; trap 'exit 0' TERM; while true; do /bin/busybox sleep 0.2; done"]
`)
		stop := s.imageSampler(others, "canary", v2)
		slackFrom := len(s.slackTexts())
		start := time.Now()
		if code, body := s.webhook(all[0], "myorg/canary", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		onCanary := s.waitImage([]*node{canary}, "canary", v2, 60*time.Second)
		var rec *canaryRecord
		waitFor(t, 60*time.Second, "the bake to fail", func() bool {
			rec = s.canaryOf(ref)
			return rec != nil && rec.ImageID == v2 && rec.Phase == phaseFailed
		})
		failed := time.Since(start)
		back := s.waitImage([]*node{canary}, "canary", v1, 60*time.Second)
		seen, samples := stop()
		if seen != "" {
			t.Errorf("a node outside the canary set ran the bad version: %s", seen)
		}
		var state string
		waitFor(t, 30*time.Second, "the halt and the rollback in /api/status", func() bool {
			for _, tag := range s.status(others[0]).Tags {
				if tag.Image == ref && tag.Canary != nil {
					state = tag.Canary.State
				}
			}
			return strings.Contains(state, "HALTED") && strings.Contains(state, "rolled back to "+shortID(v1))
		})
		waitFor(t, 30*time.Second, "the halt on Slack", func() bool {
			for _, text := range s.slackTexts()[slackFrom:] {
				if strings.Contains(text, "HALTED") && strings.Contains(text, ref) && strings.Contains(text, "bake failed") {
					return true
				}
			}
			return false
		})
		for _, n := range others {
			if _, img := s.containerImage(n, "canary"); img != v1 {
				t.Errorf("%s runs %s; want %s", n.name, shortID(img), shortID(v1))
			}
		}
		s.record("scenario R-J (canary, bake 20 s, a version unhealthy 10 s after its start): on the canary %v after the webhook, bake failed %v after the webhook (%s), the canary back on the old version %v after the failure; %d samples every 100 ms of %d other nodes: none ever ran it; status: %s",
			onCanary.Round(time.Millisecond), failed.Round(time.Millisecond), rec.Reason, back.Round(time.Millisecond), samples, len(others), state)
	})

	t.Run("K manual promotion: only the canary until deployer promote, then every node", func(t *testing.T) {
		ref := s.hub.host() + "/myorg/promo:qa"
		s.putPolicy(ref, policy{CanaryNodes: &[]string{canary.name}, Bake: durPtr(10 * time.Second), Promotion: promoteManual})
		v1 := s.build(ref, false)
		for _, n := range all {
			s.supervise(n, "promo", ref, v1)
		}
		v2 := s.build(ref, false)
		stop := s.imageSampler(others, "promo", v2)
		slackFrom := len(s.slackTexts())
		if code, body := s.webhook(all[0], "myorg/promo", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		s.waitImage([]*node{canary}, "promo", v2, 60*time.Second)
		onCanary := time.Now()
		var state string
		waitFor(t, 30*time.Second, "waiting for promote in /api/status", func() bool {
			for _, tag := range s.status(others[1]).Tags {
				if tag.Image == ref && tag.Canary != nil {
					state = tag.Canary.State
				}
			}
			return strings.HasPrefix(state, "waiting for promote")
		})
		out, _ := exec.Command(s.bin, "status", "-etcd_nodes", s.etcdEndpoints(), "-etcd_prefix", s.prefix).CombinedOutput()
		if !strings.Contains(string(out), "waiting for promote") {
			t.Errorf("deployer status does not say waiting for promote:\n%s", out)
		}
		// Only the canary runs it for 30 s.
		time.Sleep(time.Until(onCanary.Add(30 * time.Second)))
		seen, samples := stop()
		if seen != "" {
			t.Errorf("a node outside the canary set ran the version before promote: %s", seen)
		}
		waiting := 0
		for _, text := range s.slackTexts()[slackFrom:] {
			if strings.Contains(text, "waiting for `deployer promote") && strings.Contains(text, ref) {
				waiting++
			}
		}
		if waiting != 1 {
			t.Errorf("Slack said waiting for promote %d times; want once for the fleet", waiting)
		}
		start := time.Now()
		cmd, err := exec.Command(s.bin, "promote", ref, "-etcd_nodes", s.etcdEndpoints(), "-etcd_prefix", s.prefix).CombinedOutput()
		if err != nil {
			t.Fatalf("deployer promote: %v\n%s", err, cmd)
		}
		answered := time.Since(start)
		last := s.waitImage(all, "promo", v2, 60*time.Second)
		again, _ := exec.Command(s.bin, "promote", ref, "-etcd_nodes", s.etcdEndpoints(), "-etcd_prefix", s.prefix).CombinedOutput()
		if !strings.Contains(string(again), "nothing to do") {
			t.Errorf("a second promote: %s; want nothing to do", again)
		}
		s.record("scenario R-K (canary, bake 10 s, promotion manual): only the canary on the new version for 30 s (%d samples every 100 ms of %d other nodes); deployer promote answered in %v (%s); every node on it %v after the promote",
			samples, len(others), answered.Round(time.Millisecond), strings.TrimSpace(string(cmd)), last.Round(time.Millisecond))
	})
}

// putPolicy writes the rollout policy of ref.
func (s *stack) putPolicy(ref string, p policy) {
	s.t.Helper()
	b, _ := json.Marshal(p)
	if _, err := s.cli.Put(s.t.Context(), s.prefix+policyKey(ref), string(b)); err != nil {
		s.t.Fatal(err)
	}
}

// canaryOf reads the canary record of ref, if any.
func (s *stack) canaryOf(ref string) *canaryRecord {
	resp, err := s.cli.Get(s.t.Context(), s.prefix+canaryKey(ref))
	if err != nil {
		s.t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return nil
	}
	var rec canaryRecord
	if json.Unmarshal(resp.Kvs[0].Value, &rec) != nil {
		return nil
	}
	return &rec
}

// deployKnown sends a trigger for the version every node already runs,
// so that the deploy ledger knows it (a rollback goes back to it), and
// waits until the ledger has it rolled out.
func (s *stack) deployKnown(t *testing.T, ref, repo, id string) {
	t.Helper()
	tag := ref[strings.LastIndex(ref, ":")+1:]
	if code, body := s.webhook(s.nodes[0], repo, tag); code != 200 {
		t.Fatalf("webhook: %d %s", code, body)
	}
	kv := etcdc.InPrefix(s.cli, s.prefix)
	named := canon(ref)
	waitFor(t, 30*time.Second, "the ledger: "+shortID(id)+" rolled out", func() bool {
		h, err := readHistory(t.Context(), kv, historyFilter{name: named.Name(), tag: tag}, time.Now())
		if err != nil || len(h.Tags) == 0 || len(h.Tags[0].Versions) == 0 {
			return false
		}
		v := h.Tags[0].Versions[0]
		return v.ImageID == id && v.Outcome == outcomeRolledOut && v.Digest != ""
	})
}

// imageSampler checks, every 100 ms, that container name on none of ns
// runs image bad; stop returns the first sighting ("" none) and the
// samples taken.
func (s *stack) imageSampler(ns []*node, name, bad string) (stop func() (seen string, samples int)) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	var seen string
	samples := 0
	wg.Go(func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			for _, n := range ns {
				if _, img := s.containerImage(n, name); img == bad && seen == "" {
					seen = fmt.Sprintf("%s ran %s at %s", n.name, shortID(bad), time.Now().Format(time.RFC3339Nano))
				}
			}
			samples++
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	})
	return func() (string, int) {
		close(done)
		wg.Wait()
		return seen, samples
	}
}
