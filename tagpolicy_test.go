package main

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
)

// TestReplaceManyUnderPercentage: 20 containers of one tag on one node
// with max_unavailable 25% go five at a time: each batch of replacements
// comes up only once five are in flight, so a node that replaced fewer at
// once would never see them up.
func TestReplaceManyUnderPercentage(t *testing.T) {
	cli := testNS(t)
	const old, newer = "sha256:1111111111111111111111111111111111111111111111111111111111111111", "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	const ref = "reg:5000/app:qa"
	f := newFakeDocker()
	f.local[ref] = old
	var stale []staleContainer
	for i := range 20 {
		name := fmt.Sprintf("app%02d", i)
		c := f.addContainer(name, ref)
		stale = append(stale, staleContainer{ID: c.ID, Name: name, Ref: testTagged(ref), ImageID: old, NewID: newer})
	}
	f.local[ref] = newer
	f.supervise, f.health = true, "starting"

	// The status records say 20 containers run the tag: 25% is 5.
	var cs []containerStatus
	for _, c := range stale {
		cs = append(cs, containerStatus{Name: c.Name, Image: ref, ImageID: old})
	}
	must(cli.Put(t.Context(), statusKey("n1"), string(must(json.Marshal(nodeStatus{Node: "n1", Containers: cs})))))
	ps := newPolicies(cli, basePolicy(unavailable{N: 1}, time.Second))
	must(ps.set(t.Context(), ref, policy{MaxUnavailable: &unavailable{N: 25, Percent: true}}, nil, "t", time.Now()))
	tp, _, err := ps.forTag(t.Context(), ref)
	if err != nil || tp.maxUnavailable != 5 {
		t.Fatalf("forTag = %+v, %v; want max_unavailable 5", tp, err)
	}
	for i := range stale {
		stale[i].policy = tp
	}

	pending, healthy := map[string]bool{}, map[string]bool{}
	peak := 0
	f.inspectHook = func(c *docker.Container) error { // f.mu held
		if c.Image != newer || healthy[c.ID] {
			if healthy[c.ID] {
				c.State.Health.Status = "healthy"
			}
			return nil
		}
		pending[c.ID] = true
		peak = max(peak, len(pending))
		if len(pending) >= 5 {
			for id := range pending {
				healthy[id] = true
			}
			clear(pending)
			c.State.Health.Status = "healthy"
		}
		return nil
	}
	p := newTestReplacer(t, cli, f, "n1", 1)
	out := p.replace(t.Context(), stale)
	for _, o := range out {
		if o.err != nil || o.skipped != "" {
			t.Fatalf("%s: %v %s", o.c.Name, o.err, o.skipped)
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if peak != 5 || len(healthy) != 20 {
		t.Fatalf("peak of replacements in flight = %d, up = %d; want 5, 20", peak, len(healthy))
	}
}

// TestUpAfterFromPolicy: a replacement without a healthcheck counts as up
// only after the policy's up duration.
func TestUpAfterFromPolicy(t *testing.T) {
	started := time.Unix(100, 0)
	c := &docker.Container{Name: "/app", Image: "sha256:new", State: docker.State{Running: true, StartedAt: started}}
	for _, tc := range []struct {
		after time.Duration
		ran   time.Duration
		up    bool
	}{
		{minUp, 1500 * time.Millisecond, true},
		{5 * time.Second, 1500 * time.Millisecond, false},
		{5 * time.Second, 5 * time.Second, true},
	} {
		up, err := judgeUpAfter(c, "sha256:new", started.Add(tc.ran), tc.after)
		if err != nil || up != tc.up {
			t.Errorf("up_after %v, ran %v: up = %v, %v; want %v", tc.after, tc.ran, up, err, tc.up)
		}
	}
	if (*tagPolicy)(nil).up() != 0 || (&tagPolicy{upAfter: 3 * time.Second}).up() != 3*time.Second {
		t.Error("tagPolicy.up wrong")
	}
}

// TestReplaceUsesPolicyUpAfter: the wait for a replacement takes the up
// duration from the container's tag policy: the fake's replacement has run
// 100 s, which is not enough under up_after 1000s.
func TestReplaceUsesPolicyUpAfter(t *testing.T) {
	cli := testNS(t)
	f, c := rolloutFixture(t, false)
	p := newTestReplacer(t, cli, f, "n1", 1)
	p.restarter.wait.timeout = 300 * time.Millisecond
	c.policy = &tagPolicy{maxUnavailable: 1, upAfter: 1000 * time.Second}
	out := p.replace(t.Context(), []staleContainer{c})
	if len(out) != 1 || out[0].err == nil {
		t.Fatalf("replace = %+v; want not up within the timeout", out)
	}
}
