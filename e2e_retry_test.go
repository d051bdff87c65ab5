//go:build e2e

package main

import (
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestE2ERetry: the registry is down when a push's webhook comes; it is
// back 5 s later and no second webhook is sent. Every node retries the
// failed deploy by itself (its trigger stays open) and converges; Slack
// hears of the first failure and of the recovery; the pending retry shows
// in /metrics and /api/status meanwhile.
func TestE2ERetry(t *testing.T) {
	t.Parallel() // a stack of its own; three run at once (make e2e: -parallel 3)
	s := newStackWith(t, 2, 1)
	all := s.nodes
	ref := s.hub.host() + "/myorg/app:qa"
	v1 := s.build(ref, false)
	for _, n := range all {
		s.supervise(n, "app", ref, v1)
	}
	v2 := s.build(ref, false)

	s.hub.proc.stop(syscall.SIGTERM, 10*time.Second)
	from := len(s.slackTexts())
	sent := time.Now()
	if code, body := s.webhook(all[0], "myorg/app", "qa"); code != 200 {
		t.Fatalf("webhook: %d %s", code, body)
	}
	s.waitSlack(from, all, "FAILED", "myorg/app:qa pull failed", "will retry")
	for _, n := range all {
		if _, img := s.containerImage(n, "app"); img != v1 {
			t.Errorf("%s: app not on the old image while the registry is down (%s)", n.name, shortID(img))
		}
		if g := s.metric(n, "deployer_deploy_retries_pending", ""); g != 1 {
			t.Errorf("%s: deployer_deploy_retries_pending = %v; want 1", n.name, g)
		}
	}
	// The retries are in the cluster status (records are rewritten within
	// the status period, 5 s).
	waitFor(t, 15*time.Second, "pending retries in /api/status", func() bool {
		st := s.status(all[0])
		retrying := 0
		for _, n := range st.Nodes {
			for _, r := range n.Retries {
				if strings.HasSuffix(r.Repo, "myorg/app") && r.Attempts >= 1 {
					retrying++
				}
			}
		}
		return retrying == len(all)
	})

	// The registry comes back 5 s after the webhook; nothing else is sent.
	if wait := time.Until(sent.Add(5 * time.Second)); wait > 0 {
		time.Sleep(wait) // the outage's length, part of the scenario
	}
	s.startRegistryProc(s.hub, "hub")
	back := time.Now()
	took := s.waitImage(all, "app", v2, 60*time.Second)
	s.record("retry: registry back after %v, no second webhook → %d nodes converged in %v after its return",
		back.Sub(sent).Round(time.Millisecond), len(all), took.Round(time.Millisecond))

	s.waitSlack(from, all, "recovered after")
	failed := map[string]int{}
	for _, text := range s.slackTexts()[from:] {
		for _, n := range all {
			if strings.Contains(text, " on "+n.name) && strings.Contains(text, "FAILED") {
				failed[n.name]++
			}
		}
	}
	for _, n := range all {
		if failed[n.name] != 1 {
			t.Errorf("%s: %d FAILED messages; want 1, the first failure only", n.name, failed[n.name])
		}
	}
	waitFor(t, 30*time.Second, "no pending retry", func() bool {
		for _, n := range all {
			if s.metric(n, "deployer_deploy_retries_pending", "") != 0 {
				return false
			}
		}
		return true
	})
	s.barrier(all)

	// A registry notification carries the pushed manifest digest: the
	// nodes check it against the image's RepoDigests on the real daemon
	// and deploy at once (no retry: the registry serves what it notified).
	svcRef := s.push.host() + "/team/svc:latest"
	svc := s.build(svcRef, false)
	for _, n := range all {
		s.supervise(n, "svc", svcRef, svc)
	}
	from = len(s.slackTexts())
	start := time.Now()
	svc2 := s.build(svcRef, false)
	s.waitImage(all, "svc", svc2, 60*time.Second)
	s.record("retry: registry push with digest → %d nodes on the new image in %v (digest checked)", len(all), time.Since(start).Round(time.Millisecond))
	for _, text := range s.slackTexts()[from:] {
		if strings.Contains(text, "FAILED") {
			t.Errorf("Slack after a push with digest: %q; want no failure", text)
		}
	}
	for _, n := range all {
		if g := s.metric(n, "deployer_deploy_retries_pending", ""); g != 0 {
			t.Errorf("%s: deployer_deploy_retries_pending = %v after a push with digest; want 0", n.name, g)
		}
	}
}
