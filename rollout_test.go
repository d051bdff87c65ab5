package main

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// faultKV is etcd's KV with injected faults: failing deletes, and a hook
// that runs after each Get (to change the store between two calls).
type faultKV struct {
	clientv3.KV
	mu         sync.Mutex
	deleteErrs int // the next deleteErrs deletes fail
	deletes    int
	afterGet   func(key string)
}

func (k *faultKV) Delete(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.DeleteResponse, error) {
	k.mu.Lock()
	k.deletes++
	fail := k.deleteErrs > 0
	if fail {
		k.deleteErrs--
	}
	k.mu.Unlock()
	if fail {
		return nil, errors.New("etcdserver: request timed out")
	}
	return k.KV.Delete(ctx, key, opts...)
}

func (k *faultKV) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	resp, err := k.KV.Get(ctx, key, opts...)
	if k.afterGet != nil {
		k.afterGet(key)
	}
	return resp, err
}

func testStale(id string) staleContainer {
	return staleContainer{ID: id, Name: "app", Tag: "qa", NewID: "sha256:new"}
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
		r := newTestReplacer(t, cli, newFakeDocker(), "node"+string(rune('a'+i)), slots).rollout
		wg.Go(func() {
			sl, err := r.acquire(t.Context(), "reg/app:qa", testStale("id"+string(rune('a'+i))))
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
			sl.release()
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

// acquireAsync starts an acquire and returns where its result arrives.
func acquireAsync(t *testing.T, r *rollout, id string) chan *slot {
	got := make(chan *slot, 1)
	go func() {
		sl, err := r.acquire(t.Context(), "reg/app:qa", testStale(id))
		if err != nil {
			t.Error(err)
		}
		got <- sl
	}()
	return got
}

// mustWait checks that nothing arrives on ch for a while (a failure bound,
// not a synchronisation: arriving at all is the failure).
func mustWait[T any](t *testing.T, ch <-chan T, what string) {
	t.Helper()
	select {
	case v := <-ch:
		t.Fatalf("%s: got %v", what, v)
	case <-time.After(300 * time.Millisecond):
	}
}

func mustGet[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(20 * time.Second):
		t.Fatalf("%s: timed out", what)
	}
	panic("unreachable")
}

// TestRolloutSlotOfDeadNode: a holder whose lease ends (a crashed node)
// frees its slot.
func TestRolloutSlotOfDeadNode(t *testing.T) {
	cli := testEtcd(t)
	dead := newTestReplacer(t, cli, newFakeDocker(), "dead", 1).rollout
	sl, err := dead.acquire(t.Context(), "reg/app:qa", testStale("a"))
	if err != nil {
		t.Fatal(err)
	}
	live := newTestReplacer(t, cli, newFakeDocker(), "live", 1).rollout
	got := acquireAsync(t, live, "b")
	mustWait(t, got, "took a slot held by another node")
	// The node dies: its lease goes (here at once, instead of after TTL).
	if _, err := cli.Revoke(t.Context(), sl.sess.Lease()); err != nil {
		t.Fatal(err)
	}
	if sl := mustGet(t, got, "slot of a dead node freed"); sl != nil {
		sl.release()
	}
}

// TestRolloutLeaseLostWhileQueued: a node whose lease expires while it
// waits in the queue (a partition, SIGSTOP) must not take a slot that is
// still held: it queues again under a new session, and gets the slot only
// when the holder leaves.
func TestRolloutLeaseLostWhileQueued(t *testing.T) {
	cli := testEtcd(t)
	holder := newTestReplacer(t, cli, newFakeDocker(), "holder", 1).rollout
	held, err := holder.acquire(t.Context(), "reg/app:qa", testStale("a"))
	if err != nil {
		t.Fatal(err)
	}
	waiterRep := newTestReplacer(t, cli, newFakeDocker(), "waiter", 1)
	waiter := waiterRep.rollout
	kv := &faultKV{KV: cli}
	waiter.kv = kv
	got := acquireAsync(t, waiter, "b")
	var lease clientv3.LeaseID
	waitUntil(t, "the waiter to queue", func() bool {
		waiter.mu.Lock()
		defer waiter.mu.Unlock()
		if waiter.session != nil {
			lease = waiter.session.Lease()
		}
		return lease != 0 && countKeys(t, cli, strings.TrimSuffix(slotsDir(waiter.prefix, "reg/app:qa"), "/")) == 2
	})
	// Its lease expires (revoked here, as etcd does after the TTL).
	if _, err := cli.Revoke(t.Context(), lease); err != nil {
		t.Fatal(err)
	}
	mustWait(t, got, "the waiter took the slot the holder still has")
	held.release()
	sl := mustGet(t, got, "the waiter gets the slot once the holder leaves")
	if sl == nil {
		t.Fatal("no slot")
	}
	defer sl.release()
	if sl.sess.Lease() == lease {
		t.Errorf("slot held under the revoked lease %x", lease)
	}
	if err := sl.verify(t.Context(), "sha256:new"); err != nil {
		t.Errorf("verify of the new slot: %v", err)
	}
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
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
	p := newTestReplacer(t, cli, f, "n1", 1)
	out := p.replace(t.Context(), "reg:5000/app", []staleContainer{c})
	if len(out) != 1 || out[0].err != nil || out[0].skipped != "" {
		t.Fatalf("replace = %+v; want success", out)
	}
	ctr, err := f.InspectContainerWithContext("app", t.Context())
	if err != nil || ctr.Image != c.NewID || !ctr.State.Running {
		t.Errorf("app after replace: %+v, %v; want running %s", ctr, err, shortID(c.NewID))
	}
}

// TestRolloutHalts: a version whose container exits at once (or crash-
// loops under a restart policy) halts the rollout; the other nodes leave
// their containers alone; a newer image rolls out again.
func TestRolloutHalts(t *testing.T) {
	for _, mode := range []string{"exits", "crash-loops"} {
		t.Run(mode, func(t *testing.T) {
			cli := testEtcd(t)
			f1, c1 := rolloutFixture(t, mode == "exits")
			f1.crashLoop = mode == "crash-loops"
			p1 := newTestReplacer(t, cli, f1, "n1", 1)
			out := p1.replace(t.Context(), "reg:5000/app", []staleContainer{c1})
			if len(out) != 1 || !errors.Is(out[0].err, errReplacement) {
				t.Fatalf("replace of a broken version = %+v; want errReplacement", out)
			}
			h, _, err := p1.rollout.halted(t.Context(), "reg:5000/app:qa")
			if err != nil || h == nil || h.ImageID != c1.NewID || h.Node != "n1" {
				t.Fatalf("halt record = %+v, %v; want one for %s by n1", h, err, shortID(c1.NewID))
			}

			f2, c2 := rolloutFixture(t, false)
			p2 := newTestReplacer(t, cli, f2, "n2", 1)
			out = p2.replace(t.Context(), "reg:5000/app", []staleContainer{c2})
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
			out = p2.replace(t.Context(), "reg:5000/app", []staleContainer{c2})
			if len(out) != 1 || out[0].err != nil || out[0].skipped != "" {
				t.Fatalf("newer image = %+v; want a normal rollout", out)
			}
			p2.rollout.clearHalt(t.Context(), "reg:5000/app:qa", c2.NewID)
			if h, _, _ := p2.rollout.halted(t.Context(), "reg:5000/app:qa"); h != nil {
				t.Errorf("halt record %+v left after a newer image rolled out", h)
			}
		})
	}
}

func TestRolloutSkipLabel(t *testing.T) {
	f, c := rolloutFixture(t, false)
	c.Labels = map[string]string{strategyKey: strategySkip}
	for _, max := range []int{0, 1} {
		p := newTestReplacer(t, testEtcd(t), f, "n1", max)
		out := p.replace(t.Context(), "reg:5000/app", []staleContainer{c})
		if len(out) != 1 || out[0].skipped == "" {
			t.Errorf("max_unavailable %d: %+v; want skipped", max, out)
		}
	}
}

// TestRecreate: the recreate strategy, chosen by the flag or the label,
// whatever the coordination mode; a broken version (exits, crash-loops,
// refused by the daemon) is a replacement failure and the old container
// comes back.
func TestRecreate(t *testing.T) {
	tests := []struct {
		name     string
		max      int
		byLabel  bool
		crash    string // "", "exits", "crash-loops", "start refused"
		wantHalt bool
	}{
		{name: "coordinated", max: 1},
		{name: "uncoordinated (-max_unavailable=0)", max: 0},
		{name: "uncoordinated, by label", max: 0, byLabel: true},
		{name: "exits at once", max: 1, crash: "exits", wantHalt: true},
		{name: "crash-loops under a restart policy", max: 1, crash: "crash-loops", wantHalt: true},
		{name: "crash-loops, uncoordinated", max: 0, crash: "crash-loops"},
		{name: "start refused by the daemon", max: 1, crash: "start refused", wantHalt: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, c := rolloutFixture(t, tt.crash == "exits")
			f.supervise = false // nothing re-creates it but the deployer
			f.crashLoop = tt.crash == "crash-loops"
			if tt.crash == "start refused" {
				f.startErr = &docker.Error{Status: 400, Message: `exec: "/app": stat /app: no such file or directory`}
			}
			p := newTestReplacer(t, testEtcd(t), f, "n1", tt.max)
			if tt.byLabel {
				c.Labels = map[string]string{strategyKey: strategyRecr}
			} else {
				p.strategy = strategyRecr
			}
			out := p.replace(t.Context(), "reg:5000/app", []staleContainer{c})
			ctr, err := f.InspectContainerWithContext("app", t.Context())
			if err != nil {
				t.Fatalf("no container called app: %v", err)
			}
			if h, _, _ := p.rollout.halted(t.Context(), "reg:5000/app:qa"); (h != nil) != tt.wantHalt {
				t.Errorf("halt record %+v; want one: %v", h, tt.wantHalt)
			}
			if tt.crash != "" {
				if len(out) != 1 || !errors.Is(out[0].err, errReplacement) {
					t.Errorf("recreate of a broken version = %+v; want errReplacement", out)
				}
				if ctr.ID != c.ID || !ctr.State.Running || ctr.State.Restarting {
					t.Errorf("old container not restored: %+v", ctr)
				}
				return
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
		})
	}
}

func TestJudgeUp(t *testing.T) {
	const newID = "sha256:2"
	started := time.Unix(100, 0)
	now := started.Add(time.Minute)
	running := docker.State{Running: true, StartedAt: started}
	tests := []struct {
		name    string
		c       docker.Container
		done    bool
		wantErr bool
	}{
		{"running, no healthcheck", docker.Container{Image: newID, State: running}, true, false},
		{"running for a moment only", docker.Container{Image: newID, State: docker.State{Running: true, StartedAt: now.Add(-10 * time.Millisecond)}}, false, false},
		{"healthy", docker.Container{Image: newID, State: docker.State{Running: true, Health: docker.Health{Status: "healthy"}}}, true, false},
		{"starting", docker.Container{Image: newID, State: docker.State{Running: true, Health: docker.Health{Status: "starting"}}}, false, false},
		{"unhealthy", docker.Container{Image: newID, State: docker.State{Running: true, Health: docker.Health{Status: "unhealthy"}}}, false, true},
		{"exited", docker.Container{Image: newID, State: docker.State{StartedAt: started, FinishedAt: started.Add(time.Second), ExitCode: 1}}, false, true},
		{"created, not started", docker.Container{Image: newID}, false, false},
		{"a newer image overtook", docker.Container{Image: "sha256:3", State: docker.State{Running: true}}, true, false},
		// Docker under a restart policy: "running" while it waits to
		// restart, StartedAt long ago.
		{"crash loop: restarting", docker.Container{Image: newID, RestartCount: 2, State: docker.State{Running: true, Restarting: true, StartedAt: started}}, false, true},
		{"crash loop: caught between restarts", docker.Container{Image: newID, RestartCount: 1, State: running}, false, true},
		{"crash loop: healthy between restarts", docker.Container{Image: newID, RestartCount: 1, State: docker.State{Running: true, StartedAt: started, Health: docker.Health{Status: "healthy"}}}, false, true},
		{"dead", docker.Container{Image: newID, State: docker.State{Dead: true, StartedAt: started}}, false, true},
	}
	for _, tt := range tests {
		done, err := judgeUp(&tt.c, newID, now)
		if done != tt.done || (err != nil) != tt.wantErr || (err != nil && !errors.Is(err, errReplacement)) {
			t.Errorf("%s: judgeUp = %v, %v; want %v, error %v", tt.name, done, err, tt.done, tt.wantErr)
		}
	}
}
