package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/etcdc"
)

// faultKV is etcd's KV with injected faults: failing deletes, and a hook
// that runs after each Get (to change the store between two calls).
type faultKV struct {
	clientv3.KV
	mu         sync.Mutex
	deleteErrs int // the next deleteErrs deletes fail
	deletes    int
	putErrs    int // the next putErrs puts fail, as etcd's do while it elects a leader
	puts       int
	afterGet   func(key string)
}

func (k *faultKV) Put(ctx context.Context, key, val string, opts ...clientv3.OpOption) (*clientv3.PutResponse, error) {
	k.mu.Lock()
	k.puts++
	fail := k.putErrs > 0
	if fail {
		k.putErrs--
	}
	k.mu.Unlock()
	if fail {
		return nil, rpctypes.ErrLeaderChanged
	}
	return k.KV.Put(ctx, key, val, opts...)
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

// queued counts the keys of ref's rollout: the slot holders and the
// waiters.
func queued(t *testing.T, cli *clientv3.Client, ref string) int64 {
	t.Helper()
	return countKeys(t, cli, strings.TrimSuffix(slotsDir(ref), "/")) + countKeys(t, cli, strings.TrimSuffix(queueDir(ref), "/"))
}

func testStale(id string) staleContainer {
	return staleContainer{ID: id, Name: "app", Ref: testTagged("reg:5000/app:qa"), NewID: "sha256:new"}
}

// TestRolloutSlots: with maxUnavailable 2, five holders take turns, never
// more than two at once, and all get one.
func TestRolloutSlots(t *testing.T) {
	cli := testNS(t)
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
			sl.release(t.Context())
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
	cli := testNS(t)
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
		sl.release(t.Context())
	}
}

// TestRolloutLeaseLostWhileQueued: a node whose lease expires while it
// waits in the queue (a partition, SIGSTOP) must not take a slot that is
// still held: it queues again under a new session, and gets the slot only
// when the holder leaves.
func TestRolloutLeaseLostWhileQueued(t *testing.T) {
	cli := testNS(t)
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
	eventually(t, 20*time.Second, "the waiter to queue", func() bool {
		if s := heldSession(waiter); s != nil {
			lease = s.Lease()
		}
		return lease != 0 && queued(t, cli, "reg/app:qa") == 2
	})
	// Its lease expires (revoked here, as etcd does after the TTL).
	if _, err := cli.Revoke(t.Context(), lease); err != nil {
		t.Fatal(err)
	}
	mustWait(t, got, "the waiter took the slot the holder still has")
	held.release(t.Context())
	sl := mustGet(t, got, "the waiter gets the slot once the holder leaves")
	if sl == nil {
		t.Fatal("no slot")
	}
	defer sl.release(t.Context())
	if sl.sess.Lease() == lease {
		t.Errorf("slot held under the revoked lease %x", lease)
	}
	if err := sl.verify(t.Context(), "sha256:new"); err != nil {
		t.Errorf("verify of the new slot: %v", err)
	}
}

func rolloutFixture(t *testing.T, crash bool) (*fakeDocker, staleContainer) {
	const old, newer = "sha256:1111111111111111111111111111111111111111111111111111111111111111", "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	f := newFakeDocker()
	f.local["reg:5000/app:qa"] = old
	c := f.addContainer("app", "reg:5000/app:qa")
	f.local["reg:5000/app:qa"] = newer
	f.supervise, f.crash = true, crash
	return f, staleContainer{ID: c.ID, Name: "app", Ref: testTagged("reg:5000/app:qa"), ImageID: old, NewID: newer}
}

func TestRolloutReplaceWaitsForReplacement(t *testing.T) {
	cli := testNS(t)
	f, c := rolloutFixture(t, false)
	p := newTestReplacer(t, cli, f, "n1", 1)
	out := p.replace(t.Context(), []staleContainer{c})
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
	for _, mode := range []string{"exits", "exits, run with --rm", "crash-loops"} {
		t.Run(mode, func(t *testing.T) {
			cli := testNS(t)
			f1, c1 := rolloutFixture(t, mode != "crash-loops")
			f1.crashLoop = mode == "crash-loops"
			f1.rmOnExit = mode == "exits, run with --rm"
			p1 := newTestReplacer(t, cli, f1, "n1", 1)
			out := p1.replace(t.Context(), []staleContainer{c1})
			if len(out) != 1 || !errors.Is(out[0].err, errReplacement) {
				t.Fatalf("replace of a broken version = %+v; want errReplacement", out)
			}
			h, _, err := p1.rollout.halted(t.Context(), "reg:5000/app:qa")
			if err != nil || h == nil || h.ImageID != c1.NewID || h.Node != "n1" {
				t.Fatalf("halt record = %+v, %v; want one for %s by n1", h, err, shortID(c1.NewID))
			}

			f2, c2 := rolloutFixture(t, false)
			p2 := newTestReplacer(t, cli, f2, "n2", 1)
			out = p2.replace(t.Context(), []staleContainer{c2})
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
			out = p2.replace(t.Context(), []staleContainer{c2})
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
		p := newTestReplacer(t, testNS(t), f, "n1", max)
		out := p.replace(t.Context(), []staleContainer{c})
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
			p := newTestReplacer(t, testNS(t), f, "n1", tt.max)
			if tt.byLabel {
				c.Labels = map[string]string{strategyKey: strategyRecr}
			} else {
				p.strategy = strategyRecr
			}
			out := p.replace(t.Context(), []staleContainer{c})
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

// TestSlotRelease: a delete that fails once is retried; one that keeps
// failing ends the session, so that the lease frees the slot; at the stop,
// the keepalives stop at once and the stop's revoke frees it.
func TestSlotRelease(t *testing.T) {
	for _, tt := range []struct {
		name        string
		deleteErrs  int
		atStop      bool
		wantEndSess bool
	}{
		{"delete fails once", 1, false, false},
		{"delete keeps failing", 100, false, true},
		{"delete keeps failing at the stop", 100, true, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cli := testNS(t)
			r := newTestReplacer(t, cli, newFakeDocker(), "n1", 1).rollout
			kv := &faultKV{KV: cli, deleteErrs: tt.deleteErrs}
			r.kv = kv
			sl, err := r.acquire(t.Context(), "reg/app:qa", testStale("a"))
			if err != nil {
				t.Fatal(err)
			}
			if tt.atStop {
				stopped, cancel := context.WithCancel(t.Context())
				cancel()
				sl.release(stopped)
				if !lost(sl.sess) {
					t.Error("keepalives still running after a failed release at the stop")
				}
				if err := r.leases.(*etcdc.NodeLease).Close(); err != nil {
					t.Fatal(err)
				}
			} else {
				sl.release(t.Context())
				ended := heldSession(r) != sl.sess
				if ended != tt.wantEndSess {
					t.Errorf("session ended = %v; want %v", ended, tt.wantEndSess)
				}
			}
			if n := queued(t, cli, "reg/app:qa"); n != 0 {
				t.Errorf("%d slot keys left after release; want 0", n)
			}
			if tt.atStop {
				return
			}
			// The next slot is taken at once, under a live session.
			next, err := r.acquire(t.Context(), "reg/app:qa", testStale("b"))
			if err != nil {
				t.Fatal(err)
			}
			kv.mu.Lock()
			kv.deleteErrs = 0
			kv.mu.Unlock()
			next.release(t.Context())
		})
	}
}

// TestAcquireBounded: waiting for a slot ends at -slot_timeout with a
// node-local error: no halt, the container untouched.
func TestAcquireBounded(t *testing.T) {
	cli := testNS(t)
	holder := newTestReplacer(t, cli, newFakeDocker(), "holder", 1).rollout
	held, err := holder.acquire(t.Context(), "reg:5000/app:qa", testStale("x"))
	if err != nil {
		t.Fatal(err)
	}
	defer held.release(t.Context())
	f, c := rolloutFixture(t, false)
	p := newTestReplacer(t, cli, f, "n1", 1)
	p.rollout.slotTimeout = 200 * time.Millisecond
	out := p.replace(t.Context(), []staleContainer{c})
	if len(out) != 1 || out[0].err == nil || errors.Is(out[0].err, errReplacement) || !strings.Contains(out[0].err.Error(), "no rollout slot within") {
		t.Fatalf("replace while the slot is held = %+v; want a slot timeout", out)
	}
	if h, _, _ := p.rollout.halted(t.Context(), "reg:5000/app:qa"); h != nil {
		t.Errorf("a slot timeout halted the version: %+v", h)
	}
	if len(f.stops) != 0 {
		t.Errorf("stopped %v without a slot", f.stops)
	}
}

// TestSlotLostBeforeStop: a node whose lease expired after it got its slot
// stops nothing.
func TestSlotLostBeforeStop(t *testing.T) {
	cli := testNS(t)
	f, c := rolloutFixture(t, false)
	p := newTestReplacer(t, cli, f, "n1", 1)
	sl, err := p.rollout.acquire(t.Context(), "reg:5000/app:qa", c)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Revoke(t.Context(), sl.sess.Lease()); err != nil {
		t.Fatal(err)
	}
	for _, strategy := range []string{strategyStop, strategyRecr} {
		guard := func(ctx context.Context) error { return sl.verify(ctx, c.NewID) }
		if strategy == strategyStop {
			err = p.restarter.stopAndWait(t.Context(), c, guard, sl.lost())
		} else {
			err = p.recreator.recreate(t.Context(), c, guard, sl.lost())
		}
		if !errors.Is(err, errSlotLost) {
			t.Errorf("%s after the lease expired: %v; want errSlotLost", strategy, err)
		}
	}
	if ctr, _ := f.InspectContainerWithContext("app", t.Context()); len(f.stops) != 0 || ctr.ID != c.ID || !ctr.State.Running {
		t.Errorf("container touched without a slot: stops %v, app %s running %v", f.stops, shortID(ctr.ID), ctr.State.Running)
	}
}

// TestNodeLocalErrorsDoNotHalt: Docker refusing or timing out on this node
// is reported, never recorded as a halt of the version.
func TestNodeLocalErrorsDoNotHalt(t *testing.T) {
	for _, tt := range []struct {
		name     string
		strategy string
		fault    func(f *fakeDocker)
	}{
		{"stop times out", strategyStop, func(f *fakeDocker) { f.stopErr["app"] = context.DeadlineExceeded }},
		{"recreate: stop fails", strategyRecr, func(f *fakeDocker) { f.stopAll = errors.New("cannot connect to the Docker daemon") }},
		{"recreate: start times out", strategyRecr, func(f *fakeDocker) { f.startErr = context.DeadlineExceeded }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f, c := rolloutFixture(t, false)
			f.supervise = tt.strategy == strategyStop
			tt.fault(f)
			p := newTestReplacer(t, testNS(t), f, "n1", 1)
			p.strategy = tt.strategy
			out := p.replace(t.Context(), []staleContainer{c})
			if len(out) != 1 || out[0].err == nil || errors.Is(out[0].err, errReplacement) {
				t.Fatalf("replace = %+v; want a node-local error", out)
			}
			if h, _, _ := p.rollout.halted(t.Context(), "reg:5000/app:qa"); h != nil {
				t.Errorf("node-local error halted the version: %+v", h)
			}
			if ctr, err := f.InspectContainerWithContext("app", t.Context()); err != nil || ctr.ID != c.ID || !ctr.State.Running {
				t.Errorf("old container not running after a node-local error: %+v, %v", ctr, err)
			}
		})
	}
}

// TestUnsupervised: a stop-strategy container that nothing replaces is
// started again on its old image, reported, and halts nothing.
func TestUnsupervised(t *testing.T) {
	for _, max := range []int{0, 1} {
		f, c := rolloutFixture(t, false)
		f.supervise = false
		p := newTestReplacer(t, testNS(t), f, "n1", max)
		p.restarter.wait.timeout = 100 * time.Millisecond
		out := p.replace(t.Context(), []staleContainer{c})
		if len(out) != 1 || !errors.Is(out[0].err, errUnsupervised) || errors.Is(out[0].err, errReplacement) ||
			!strings.Contains(out[0].err.Error(), "nothing restarted app") || !strings.Contains(out[0].err.Error(), "is it supervised?") {
			t.Errorf("max_unavailable %d: replace = %+v; want 'nothing restarted app …: is it supervised?'", max, out)
		}
		if ctr, err := f.InspectContainerWithContext("app", t.Context()); err != nil || ctr.ID != c.ID || !ctr.State.Running || ctr.Image != c.ImageID {
			t.Errorf("max_unavailable %d: old container not running again: %+v, %v", max, ctr, err)
		}
		if h, _, _ := p.rollout.halted(t.Context(), "reg:5000/app:qa"); h != nil {
			t.Errorf("max_unavailable %d: an unsupervised container halted the version: %+v", max, h)
		}
	}
}

// TestClearHaltKeepsNewerHalt: a halt of a newer version recorded between
// clearHalt's read and its delete stays.
func TestClearHaltKeepsNewerHalt(t *testing.T) {
	cli := testNS(t)
	p := newTestReplacer(t, cli, newFakeDocker(), "n1", 1)
	r := p.rollout
	const ref = "reg:5000/app:qa"
	r.recordHalt(t.Context(), ref, staleContainer{Name: "app", NewID: "sha256:v2"}, errors.New("v2 broke"))
	kv := &faultKV{KV: cli}
	kv.afterGet = func(key string) {
		kv.afterGet = nil
		r.recordHalt(t.Context(), ref, staleContainer{Name: "app", NewID: "sha256:v4"}, errors.New("v4 broke"))
	}
	r.kv = kv
	r.clearHalt(t.Context(), ref, "sha256:v3") // v3 rolled out
	h, _, err := r.halted(t.Context(), ref)
	if err != nil || h == nil || h.ImageID != "sha256:v4" {
		t.Errorf("halt after clearHalt = %+v, %v; want v4's halt kept", h, err)
	}
}

// TestWaitSurvivesEventStreamEnd: when go-dockerclient closes the listener
// (dockerd restarted), the wait polls instead of spinning, subscribes
// again, and inspects only on the tick or for events about its container.
func TestWaitSurvivesEventStreamEnd(t *testing.T) {
	f, c := rolloutFixture(t, false)
	f.supervise = false
	p := newTestReplacer(t, nil, f, "n1", 0)
	w := p.restarter.wait
	w.poll = 50 * time.Millisecond
	w.timeout = 500 * time.Millisecond
	ev := w.watch()
	defer ev.close()
	f.endEvents() // the stream ends before the wait starts reading
	// Unrelated events in between must cost nothing.
	done := make(chan error, 1)
	go func() { done <- w.wait(t.Context(), ev, target{name: "app2", oldID: c.ID, newID: c.NewID}, nil) }()
	eventually(t, 20*time.Second, "a new subscription", func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		return len(f.listeners) == 1
	})
	f.mu.Lock()
	other := &fakeContainer{ID: "unrelated", Name: "unrelated"}
	for range 1000 {
		f.emit("exec_start", other)
	}
	f.mu.Unlock()
	if err := mustGet(t, done, "the wait"); !errors.Is(err, errNoReplacement) {
		t.Fatalf("wait = %v; want errNoReplacement (nothing called app2 ever ran)", err)
	}
	f.mu.Lock()
	n := f.inspects
	f.mu.Unlock()
	// 500ms at one inspect per 50ms tick, plus the first.
	if n > 15 {
		t.Errorf("%d inspects in a 500ms wait with a 50ms poll; want at most 15 (no spin, none per unrelated event)", n)
	}
}

// lost says whether s's keepalives have stopped.
func lost(s *etcdc.Session) bool {
	select {
	case <-s.Done():
		return true
	default:
		return false
	}
}

// heldSession is the session r's node holds now (nil: none).
func heldSession(r *rollout) *etcdc.Session {
	return r.leases.(*etcdc.NodeLease).Held()
}

// TestHaltWriteRetriedBeforeSlotFreed: the halt record's write fails a few
// times (etcd electing a leader); the node keeps its slot and retries, so
// the node queued behind it reads the halt instead of being granted the
// slot and rolling the broken version out.
func TestHaltWriteRetriedBeforeSlotFreed(t *testing.T) {
	const ref = "reg:5000/app:qa"
	cli := testNS(t)
	f1, c1 := rolloutFixture(t, true)
	f1.stopped = make(chan string) // holds n1 right after its stop
	p1 := newTestReplacer(t, cli, f1, "n1", 1)
	kv := &faultKV{KV: cli, putErrs: 3}
	p1.rollout.kv = kv
	done := make(chan []outcome, 1)
	go func() { done <- p1.replace(t.Context(), []staleContainer{c1}) }()
	slots := strings.TrimSuffix(slotsDir(ref), "/")
	eventually(t, 20*time.Second, "n1 to hold the slot", func() bool { return countKeys(t, cli, slots) == 1 })

	n2 := newTestReplacer(t, cli, newFakeDocker(), "n2", 1).rollout
	type result struct {
		sl  *slot
		err error
	}
	got := make(chan result, 1)
	go func() {
		sl, err := n2.acquire(t.Context(), ref, staleContainer{ID: "b", Name: "app", Ref: testTagged("reg:5000/app:qa"), NewID: c1.NewID})
		got <- result{sl, err}
	}()
	eventually(t, 20*time.Second, "n2 to queue", func() bool { return queued(t, cli, ref) == 2 })
	<-f1.stopped // n1's replacement now crashes; its halt write fails 3 times

	out := mustGet(t, done, "n1's replace")
	if len(out) != 1 || !errors.Is(out[0].err, errReplacement) {
		t.Fatalf("n1 replace = %+v; want errReplacement", out)
	}
	r := mustGet(t, got, "n2's acquire")
	var h *haltedError
	if r.sl != nil || !errors.As(r.err, &h) || h.h.ImageID != c1.NewID {
		if r.sl != nil {
			r.sl.release(t.Context())
		}
		t.Fatalf("n2 acquire = slot %v, %v; want no slot and the halt of %s (n1's halt write failed, then the slot was freed)",
			r.sl != nil, r.err, shortID(c1.NewID))
	}
	kv.mu.Lock()
	puts := kv.puts
	kv.mu.Unlock()
	if puts != 4 {
		t.Errorf("%d halt writes; want 4 (3 failed, then one that etcd took)", puts)
	}
}

// downNode is a node whose status reporter has written its down records
// from what its Docker shows.
func downNode(t *testing.T, cli *clientv3.Client, name string, max int, health string) (*rollout, *fakeDocker, *statusReporter, staleContainer) {
	t.Helper()
	f, c := rolloutFixture(t, false)
	f.containerByName("app").Health = health // nothing else runs on f yet
	r := newTestReplacer(t, cli, f, name, max).rollout
	s := newStatusReporter(f, nil, cli, r.leases, name, version, nil, nil, testLogger(t))
	reportDown(t, s)
	return r, f, s, c
}

// reportDown makes one pass of the reporter's down records, as its run
// does on a Docker event.
func reportDown(t *testing.T, s *statusReporter) {
	t.Helper()
	if _, err := s.containers(t.Context()); err != nil {
		s.unreachable(time.Now())
	}
	if err := s.writeDown(t.Context()); err != nil {
		t.Fatal(err)
	}
}

// TestRolloutCountsDownContainers: -max_unavailable counts containers that
// are down, not only slots. With one allowed, a node whose container is
// unhealthy (a halted version its supervisor keeps running) or whose
// Docker does not answer holds back the healthy nodes; the node whose
// container is down replaces it first, even behind them in the queue, and
// the next node goes once it is up again.
func TestRolloutCountsDownContainers(t *testing.T) {
	const ref = "reg:5000/app:qa"
	for _, tt := range []struct {
		name  string
		fault func(f *fakeDocker, app *fakeContainer) // f.mu is held
	}{
		{"unhealthy", func(_ *fakeDocker, app *fakeContainer) { app.Health = "unhealthy" }},
		{"crash-looping", func(_ *fakeDocker, app *fakeContainer) { app.Restarting = true }},
		{"docker unreachable", func(f *fakeDocker, _ *fakeContainer) { f.listErr = errors.New("cannot connect to the Docker daemon") }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cli := testNS(t)
			down, fd, sd, cd := downNode(t, cli, "down", 1, "healthy")
			app := fd.containerByName("app")
			fd.mu.Lock()
			tt.fault(fd, app)
			fd.mu.Unlock()
			reportDown(t, sd)
			healthy, _, _, ch := downNode(t, cli, "healthy", 1, "healthy")

			type result struct {
				sl  *slot
				err error
			}
			got := make(chan result, 1)
			go func() {
				sl, err := healthy.acquire(t.Context(), ref, ch)
				got <- result{sl, err}
			}()
			eventually(t, 20*time.Second, "the healthy node to queue", func() bool { return queued(t, cli, ref) == 1 })
			mustWait(t, got, "a healthy node took a slot while another node's container is down (-max_unavailable 1)")

			if tt.name == "docker unreachable" {
				// Docker answers again and shows the container unhealthy.
				fd.mu.Lock()
				fd.listErr = nil
				app.Health = "unhealthy"
				fd.mu.Unlock()
				reportDown(t, sd)
			}
			// The node whose container is down goes first, though
			// queued behind.
			sl, err := down.acquire(t.Context(), ref, cd)
			if err != nil {
				t.Fatalf("node with its container down: %v; want a slot at once", err)
			}
			mustWait(t, got, "the healthy node took a slot while the down node replaces")
			// Its replacement is up: the record clears, the slot goes,
			// and the healthy node's turn comes.
			fd.mu.Lock()
			app.Health, app.Restarting = "healthy", false
			fd.mu.Unlock()
			reportDown(t, sd)
			sl.release(t.Context())
			r := mustGet(t, got, "the healthy node's slot")
			if r.err != nil {
				t.Fatal(r.err)
			}
			r.sl.release(t.Context())
		})
	}
}

// TestRolloutDownCountedOnce: a container that holds a slot and is listed
// in its node's down record counts once; with -max_unavailable 2 another
// node still gets the second slot.
func TestRolloutDownCountedOnce(t *testing.T) {
	const ref = "reg:5000/app:qa"
	cli := testNS(t)
	n1, _, _, c1 := downNode(t, cli, "n1", 2, "unhealthy")
	sl, err := n1.acquire(t.Context(), ref, c1)
	if err != nil {
		t.Fatal(err)
	}
	defer sl.release(t.Context())
	n2, _, _, c2 := downNode(t, cli, "n2", 2, "healthy")
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	sl2, err := n2.acquire(ctx, ref, c2)
	if err != nil {
		t.Fatalf("second slot with one container down and -max_unavailable 2: %v", err)
	}
	sl2.release(t.Context())
	// A third node's container is unhealthy too: now two are down, and
	// a healthy node waits.
	downNode(t, cli, "n3", 2, "unhealthy")
	n4, _, _, c4 := downNode(t, cli, "n4", 2, "healthy")
	n4.slotTimeout = 300 * time.Millisecond
	if sl4, err := n4.acquire(t.Context(), ref, c4); err == nil {
		sl4.release(t.Context())
		t.Fatal("a healthy node got a slot with two containers down (-max_unavailable 2)")
	}
}

// txnKV counts the transactions made through it: each count of the slot
// queue is one.
type txnKV struct {
	clientv3.KV
	n atomic.Int64
}

func (k *txnKV) Txn(ctx context.Context) clientv3.Txn {
	k.n.Add(1)
	return k.KV.Txn(ctx)
}

// TestRolloutWakesOnlyWhomItConcerns: a slot change wakes the first
// waiter alone, which counts again; the waiters behind it read nothing
// until the one ahead of them leaves the queue (no thundering herd: a
// rollout over N nodes costs each a constant number of reads, not N).
func TestRolloutWakesOnlyWhomItConcerns(t *testing.T) {
	const ref = "reg/app:qa"
	cli := testNS(t)
	holder := newTestReplacer(t, cli, newFakeDocker(), "holder", 1).rollout
	held, err := holder.acquire(t.Context(), ref, testStale("h"))
	if err != nil {
		t.Fatal(err)
	}
	var kvs []*txnKV
	var gots []chan *slot
	for i := range 3 {
		r := newTestReplacer(t, cli, newFakeDocker(), "w"+string(rune('0'+i)), 1).rollout
		kv := &txnKV{KV: cli}
		r.kv = kv
		kvs = append(kvs, kv)
		gots = append(gots, acquireAsync(t, r, "w"+string(rune('0'+i))))
		eventually(t, 20*time.Second, "the waiter to queue", func() bool { return queued(t, cli, ref) == int64(i+2) })
	}
	before := []int64{kvs[0].n.Load(), kvs[1].n.Load(), kvs[2].n.Load()}
	// Another node's container goes down and comes back: the first
	// waiter counts again.
	rec := `{"node":"other","containers":[{"name":"app","reason":"restarting"}]}`
	if _, err := cli.Put(t.Context(), downKey(ref, "other"), rec); err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, "the first waiter to count again", func() bool { return kvs[0].n.Load() > before[0] })
	if _, err := cli.Delete(t.Context(), downKey(ref, "other")); err != nil {
		t.Fatal(err)
	}
	// The holder leaves: the first waiter gets the slot.
	held.release(t.Context())
	first := mustGet(t, gots[0], "the first waiter's slot")
	// Bound on failure, not a synchronisation: a waiter behind woken by
	// those changes would have counted by now.
	if _, woken := pollUntil(300*time.Millisecond, pollEvery, func() bool { return kvs[2].n.Load() > before[2] }); woken {
		t.Errorf("the third waiter made %d transactions on slot changes that did not concern it (the second is ahead of it); want none",
			kvs[2].n.Load()-before[2])
	}
	mustWait(t, gots[1], "the second waiter took a slot while the first holds it (-max_unavailable 1)")
	first.release(t.Context())
	second := mustGet(t, gots[1], "the second waiter's slot")
	second.release(t.Context())
	mustGet(t, gots[2], "the third waiter's slot").release(t.Context())
}

// TestRolloutGrantsFreeSlotsAtOnce: when m slots free up together, the
// first m waiters go together: the first waiter grants itself and those
// behind it that fit in one transaction, instead of each waking the next
// in turn (which serialised a rollout at max_unavailable 10 % to one
// grant per round trip). The waiter past the m stays queued.
func TestRolloutGrantsFreeSlotsAtOnce(t *testing.T) {
	const ref, m = "reg/app:qa", 3
	cli := testNS(t)
	for i := range m {
		h := newTestReplacer(t, cli, newFakeDocker(), "holder"+string(rune('0'+i)), m).rollout
		if _, err := h.acquire(t.Context(), ref, testStale("h"+string(rune('0'+i)))); err != nil {
			t.Fatal(err)
		}
	}
	var gots []chan *slot
	for i := range m + 1 {
		r := newTestReplacer(t, cli, newFakeDocker(), "w"+string(rune('0'+i)), m).rollout
		gots = append(gots, acquireAsync(t, r, "w"+string(rune('0'+i))))
		eventually(t, 20*time.Second, "the waiter to queue", func() bool { return queued(t, cli, ref) == int64(m+i+1) })
	}
	// All holders leave at once (one transaction, as leases expiring together do).
	if _, err := cli.Delete(t.Context(), slotsDir(ref), clientv3.WithPrefix()); err != nil {
		t.Fatal(err)
	}
	revs := map[int64]bool{}
	var granted []*slot
	for i := range m {
		sl := mustGet(t, gots[i], "waiter "+string(rune('0'+i))+"'s slot")
		resp, err := cli.Get(t.Context(), sl.key)
		if err != nil || len(resp.Kvs) != 1 {
			t.Fatalf("slot key %s: %v %v", sl.key, resp, err)
		}
		revs[resp.Kvs[0].CreateRevision] = true
		granted = append(granted, sl)
	}
	if len(revs) != 1 {
		t.Errorf("the %d waiters got their slots in %d transactions (create revisions %v); want one", m, len(revs), slices.Collect(maps.Keys(revs)))
	}
	mustWait(t, gots[m], "the waiter past the free slots took one")
	for _, sl := range granted {
		sl.release(t.Context())
	}
	mustGet(t, gots[m], "the last waiter's slot").release(t.Context())
}

// TestSlotReleaseWhileQueuedFreesAMovedKey: a waiter that gives up (its
// slot timeout) just as the first waiter moves its key to the slots
// frees the slot too; without it the slot would stay held under the
// node's live session.
func TestSlotReleaseWhileQueuedFreesAMovedKey(t *testing.T) {
	const ref = "reg/app:qa"
	cli := testNS(t)
	r := newTestReplacer(t, cli, newFakeDocker(), "w", 1).rollout
	s, err := r.leases.Current(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	id := strconv.FormatInt(int64(s.Lease()), 16) + "-w-app"
	sl := &slot{r: r, ref: ref, sess: s, key: queueDir(ref) + id, moved: slotsDir(ref) + id}
	// The first waiter's grant: the queue key gone, the slot key under the node's lease.
	if _, err := cli.Put(t.Context(), sl.moved, "w app", clientv3.WithLease(s.Lease())); err != nil {
		t.Fatal(err)
	}
	sl.release(t.Context())
	if n := queued(t, cli, ref); n != 0 {
		t.Errorf("%d slot keys left after the release of a queued node whose key was moved; want 0", n)
	}
}

// TestRolloutGrantsMoreSlotsThanOneTransactionHolds: with more slots free
// than one grant can move (etcd refuses a transaction of more than 128
// operations), the first waiter grants a group, the waiter after it the
// next: all get a slot. (The whole group in one transaction was refused,
// and retried, forever: a rollout at max_unavailable 150 stood still.)
func TestRolloutGrantsMoreSlotsThanOneTransactionHolds(t *testing.T) {
	const ref, m = "reg/app:qa", maxGroupGrant + 6
	cli := testNS(t)
	// m containers of other nodes down: nobody fits until they are back.
	for i := range m {
		rec := fmt.Sprintf(`{"node":"x%02d","containers":[{"name":"app","reason":"restarting"}]}`, i)
		if _, err := cli.Put(t.Context(), downKey(ref, fmt.Sprintf("x%02d", i)), rec); err != nil {
			t.Fatal(err)
		}
	}
	var gots []chan *slot
	for i := range m {
		r := newTestReplacer(t, cli, newFakeDocker(), fmt.Sprintf("w%02d", i), m).rollout
		gots = append(gots, acquireAsync(t, r, fmt.Sprintf("w%02d", i)))
	}
	eventually(t, 20*time.Second, "every waiter to queue", func() bool { return queued(t, cli, ref) == m })
	// All back at once: m slots free.
	if _, err := cli.Delete(t.Context(), downDir(ref), clientv3.WithPrefix()); err != nil {
		t.Fatal(err)
	}
	for i, got := range gots {
		mustGet(t, got, fmt.Sprintf("waiter %d's slot (-max_unavailable %d)", i, m)).release(t.Context())
	}
}
