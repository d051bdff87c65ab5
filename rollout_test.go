package main

import (
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
	clientv3 "go.etcd.io/etcd/client/v3"
)

func newTestRollout(t *testing.T, cli *clientv3.Client, f *fakeDocker, node string, maxUnavailable int) *rollout {
	log := testLogger(t)
	m := newMetrics()
	r := &rollout{
		etcd: cli, prefix: testPrefix(t), node: node, maxUnavailable: maxUnavailable, timeout: 5 * time.Second,
		strategy: strategyStop, killTimeout: 1, callTimeout: 5 * time.Second, docker: f, poll: 10 * time.Millisecond,
		restarter: &restarter{docker: f, killTimeout: 1, callTimeout: 5 * time.Second, log: log, metrics: m},
		log:       log, metrics: m,
	}
	t.Cleanup(r.close)
	return r
}

// TestRolloutSlots: with maxUnavailable 2, five holders take turns, never
// more than two at once, and all get one.
func TestRolloutSlots(t *testing.T) {
	cli := testEtcd(t)
	const holders, slots = 5, 2
	var mu sync.Mutex
	var order []int
	inside, peak := 0, 0
	var wg sync.WaitGroup
	release := make(chan struct{})
	entered := make(chan int, holders)
	for i := range holders {
		r := newTestRollout(t, cli, newFakeDocker(), "node"+string(rune('a'+i)), slots)
		wg.Go(func() {
			rel, err := r.acquire(t.Context(), "reg/app:qa", staleContainer{ID: "id" + string(rune('a'+i)), Name: "app"})
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			inside++
			peak = max(peak, inside)
			order = append(order, i)
			mu.Unlock()
			entered <- i
			<-release
			mu.Lock()
			inside--
			mu.Unlock()
			rel()
		})
	}
	for range holders {
		<-entered
		release <- struct{}{}
	}
	wg.Wait()
	if peak > slots || len(order) != holders {
		t.Errorf("peak %d holders, %d served; want at most %d and all %d", peak, len(order), slots, holders)
	}
}

// TestRolloutSlotOfDeadNode: a holder whose lease ends (a crashed node)
// frees its slot.
func TestRolloutSlotOfDeadNode(t *testing.T) {
	cli := testEtcd(t)
	dead := newTestRollout(t, cli, newFakeDocker(), "dead", 1)
	if _, err := dead.acquire(t.Context(), "reg/app:qa", staleContainer{ID: "a"}); err != nil {
		t.Fatal(err)
	}
	live := newTestRollout(t, cli, newFakeDocker(), "live", 1)
	got := make(chan error, 1)
	go func() {
		rel, err := live.acquire(t.Context(), "reg/app:qa", staleContainer{ID: "b"})
		if rel != nil {
			rel()
		}
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("took a slot held by another node: %v", err)
	case <-time.After(200 * time.Millisecond): // a failure bound only
	}
	// The node dies: its lease goes (here at once, instead of after TTL).
	s, _ := dead.sess()
	if _, err := cli.Revoke(t.Context(), s.Lease()); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("slot of a dead node never freed")
	}
}

func rolloutFixture(t *testing.T, crash bool) (*fakeDocker, staleContainer) {
	const old, newer = "sha256:1111111111111111111111111111111111111111111111111111111111111111", "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	f := newFakeDocker()
	f.local["reg:5000/app:qa"] = old
	c := f.addContainer("app", "reg:5000/app:qa")
	f.local["reg:5000/app:qa"] = newer
	f.supervise, f.crash = true, crash
	return f, staleContainer{ID: c.ID, Name: "app", Tag: "qa", ImageID: old, NewID: newer}
}

func TestRolloutReplaceWaitsForReplacement(t *testing.T) {
	cli := testEtcd(t)
	f, c := rolloutFixture(t, false)
	r := newTestRollout(t, cli, f, "n1", 1)
	out := r.replace(t.Context(), "reg:5000/app", []staleContainer{c})
	if len(out) != 1 || out[0].err != nil || out[0].skipped != "" {
		t.Fatalf("replace = %+v; want success", out)
	}
	ctr, err := f.InspectContainerWithContext("app", t.Context())
	if err != nil || ctr.Image != c.NewID || !ctr.State.Running {
		t.Errorf("app after replace: %+v, %v; want running %s", ctr, err, shortID(c.NewID))
	}
}

// TestRolloutHalts: a version whose container exits at once halts the
// rollout; the other nodes leave their containers alone; a newer image
// rolls out again.
func TestRolloutHalts(t *testing.T) {
	cli := testEtcd(t)
	f1, c1 := rolloutFixture(t, true)
	r1 := newTestRollout(t, cli, f1, "n1", 1)
	out := r1.replace(t.Context(), "reg:5000/app", []staleContainer{c1})
	if len(out) != 1 || !errors.Is(out[0].err, errReplacement) {
		t.Fatalf("replace of a crashing version = %+v; want errReplacement", out)
	}
	h, err := r1.halted(t.Context(), "reg:5000/app:qa")
	if err != nil || h == nil || h.ImageID != c1.NewID || h.Node != "n1" || !strings.Contains(h.Reason, "exited") {
		t.Fatalf("halt record = %+v, %v; want one for %s by n1", h, err, shortID(c1.NewID))
	}

	f2, c2 := rolloutFixture(t, false)
	r2 := newTestRollout(t, cli, f2, "n2", 1)
	out = r2.replace(t.Context(), "reg:5000/app", []staleContainer{c2})
	if len(out) != 1 || out[0].err != nil || !strings.Contains(out[0].skipped, "halted by n1") {
		t.Fatalf("other node = %+v; want it held back", out)
	}
	if ctr, _ := f2.InspectContainerWithContext("app", t.Context()); ctr.ID != c2.ID || !ctr.State.Running {
		t.Errorf("other node's container was touched")
	}

	// A newer push: a new image ID rolls out and clears the halt.
	c2.NewID = "sha256:3333333333333333333333333333333333333333333333333333333333333333"
	f2.mu.Lock()
	f2.local["reg:5000/app:qa"] = c2.NewID
	f2.mu.Unlock()
	out = r2.replace(t.Context(), "reg:5000/app", []staleContainer{c2})
	if len(out) != 1 || out[0].err != nil || out[0].skipped != "" {
		t.Fatalf("newer image = %+v; want a normal rollout", out)
	}
	r2.clearHalt(t.Context(), "reg:5000/app:qa", c2.NewID)
	if h, _ := r2.halted(t.Context(), "reg:5000/app:qa"); h != nil {
		t.Errorf("halt record %+v left after a newer image rolled out", h)
	}
}

func TestRolloutSkipLabel(t *testing.T) {
	f, c := rolloutFixture(t, false)
	c.Labels = map[string]string{strategyKey: strategySkip}
	for _, max := range []int{0, 1} {
		r := newTestRollout(t, testEtcd(t), f, "n1", max)
		out := r.replace(t.Context(), "reg:5000/app", []staleContainer{c})
		if len(out) != 1 || out[0].skipped == "" {
			t.Errorf("max_unavailable %d: %+v; want skipped", max, out)
		}
	}
}

func TestRecreate(t *testing.T) {
	for _, crash := range []bool{false, true} {
		f, c := rolloutFixture(t, false)
		f.supervise = false // nothing re-creates it but the deployer
		f.crash = crash
		r := newTestRollout(t, testEtcd(t), f, "n1", 1)
		r.strategy = strategyRecr
		out := r.replace(t.Context(), "reg:5000/app", []staleContainer{c})
		ctr, err := f.InspectContainerWithContext("app", t.Context())
		if err != nil {
			t.Fatalf("crash=%v: no container called app: %v", crash, err)
		}
		if crash {
			if len(out) != 1 || !errors.Is(out[0].err, errReplacement) {
				t.Errorf("recreate of a crashing version = %+v; want errReplacement", out)
			}
			if ctr.ID != c.ID || !ctr.State.Running {
				t.Errorf("old container not restored: %+v", ctr)
			}
			continue
		}
		if len(out) != 1 || out[0].err != nil {
			t.Fatalf("recreate = %+v", out)
		}
		if ctr.ID == c.ID || ctr.Image != c.NewID || !ctr.State.Running {
			t.Errorf("recreated app = %s on %s; want a new container on %s", shortID(ctr.ID), shortID(ctr.Image), shortID(c.NewID))
		}
		f.mu.Lock()
		var cfg *docker.Config
		var host *docker.HostConfig
		for _, fc := range f.containers {
			if fc.ID == ctr.ID {
				cfg, host = fc.Config, fc.HostConfig
			}
			if fc.ID == c.ID {
				t.Error("old container not removed")
			}
		}
		f.mu.Unlock()
		if cfg == nil || cfg.Image != "reg:5000/app:qa" || !slices.Equal(cfg.Env, []string{"APP=1"}) || cfg.Labels["team"] != "x" || cfg.Cmd != nil {
			t.Errorf("config = %+v; want the tag, env APP=1 without image defaults, label team=x, the image's command", cfg)
		}
		if host == nil || host.NetworkMode != "none" || host.RestartPolicy.Name != "unless-stopped" || !slices.Equal(host.Binds, []string{"/srv:/data"}) {
			t.Errorf("host config = %+v; want network none, unless-stopped, /srv:/data", host)
		}
	}
}

func TestReplacementState(t *testing.T) {
	const newID = "sha256:2"
	started := time.Unix(100, 0)
	now := started.Add(time.Minute)
	tests := []struct {
		name    string
		c       docker.Container
		done    bool
		wantErr bool
	}{
		{"running, no healthcheck", docker.Container{Image: newID, State: docker.State{Running: true, StartedAt: started}}, true, false},
		{"running for a moment only", docker.Container{Image: newID, State: docker.State{Running: true, StartedAt: now.Add(-10 * time.Millisecond)}}, false, false},
		{"healthy", docker.Container{Image: newID, State: docker.State{Running: true, Health: docker.Health{Status: "healthy"}}}, true, false},
		{"starting", docker.Container{Image: newID, State: docker.State{Running: true, Health: docker.Health{Status: "starting"}}}, false, false},
		{"unhealthy", docker.Container{Image: newID, State: docker.State{Running: true, Health: docker.Health{Status: "unhealthy"}}}, false, true},
		{"exited", docker.Container{Image: newID, State: docker.State{StartedAt: started, FinishedAt: started.Add(time.Second), ExitCode: 1}}, false, true},
		{"created, not started", docker.Container{Image: newID}, false, false},
		{"a newer image overtook", docker.Container{Image: "sha256:3", State: docker.State{Running: true}}, true, false},
	}
	for _, tt := range tests {
		done, err := replacementState(&tt.c, newID, now)
		if done != tt.done || (err != nil) != tt.wantErr {
			t.Errorf("%s: replacementState = %v, %v; want %v, error %v", tt.name, done, err, tt.done, tt.wantErr)
		}
	}
}
