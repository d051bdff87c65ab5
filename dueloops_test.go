package main

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/backoff"
)

// countingEtcd is an etcd client that counts the requests made through
// it (the watch's stream aside).
type countingEtcd struct {
	*clientv3.Client
	requests atomic.Int64
}

func (c *countingEtcd) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	c.requests.Add(1)
	return c.Client.Get(ctx, key, opts...)
}

func (c *countingEtcd) Put(ctx context.Context, key, val string, opts ...clientv3.OpOption) (*clientv3.PutResponse, error) {
	c.requests.Add(1)
	return c.Client.Put(ctx, key, val, opts...)
}

func (c *countingEtcd) Delete(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.DeleteResponse, error) {
	c.requests.Add(1)
	return c.Client.Delete(ctx, key, opts...)
}

func (c *countingEtcd) Txn(ctx context.Context) clientv3.Txn {
	c.requests.Add(1)
	return c.Client.Txn(ctx)
}

func (c *countingEtcd) Do(ctx context.Context, op clientv3.Op) (clientv3.OpResponse, error) {
	c.requests.Add(1)
	return c.Client.Do(ctx, op)
}

// runLoop runs fn until the test ends.
func runLoop(t *testing.T, fn func(context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	wg.Go(func() { _ = fn(ctx) })
	t.Cleanup(func() { cancel(); wg.Wait() })
}

// TestLoopsIdle: with nothing frozen, nothing waiting and no canary
// rollout open (a policy with a window and a promoted rollout do not
// count), the holds' and the canaries' loops read once at the start and
// then make no etcd request (until the one-minute safety tick).
func TestLoopsIdle(t *testing.T) {
	ce := &countingEtcd{Client: testNS(t)}
	log := testLogger(t)
	ps := newPolicies(ce, basePolicy(unavailable{N: 1}, time.Second))
	must(ps.set(t.Context(), holdRef, policy{Windows: &[]string{"Mon 09:00-10:00"}}, nil, "test", time.Now()))
	b, _ := json.Marshal(canaryRecord{ImageID: newImage, Phase: phasePromoted, Since: time.Now(), Reason: "baked clean, promotion auto"})
	must(ce.Put(t.Context(), canaryKey(canaryRef), string(b)))
	h := newHolds(ce, ps, nil, nil, "n1", log)
	c := newCanaries(ce, ps, newBakeFake(), "n1", nil, nil, nil, "docker.io", log)
	ce.requests.Store(0)
	runLoop(t, h.run)
	runLoop(t, c.run)
	eventually(t, 10*time.Second, "the first pass of each loop", func() bool { return ce.requests.Load() >= 2 })
	start := ce.requests.Load()
	time.Sleep(1500 * time.Millisecond) // the window measured: nothing may happen in it
	if n := ce.requests.Load() - start; n != 0 {
		t.Errorf("idle for 1.5s: %d etcd requests after the first passes (%d); want none", n, start)
	}
}

// TestHoldsRunActsWhenDue: the holds' loop releases a waiting version
// when the freeze that holds it is deleted (the watch), when a freeze's
// -until passes and when the tag's window opens (due times), each well
// before the one-minute safety tick.
func TestHoldsRunActsWhenDue(t *testing.T) {
	cli := testNS(t)
	ps := newPolicies(cli, basePolicy(unavailable{N: 1}, time.Second))
	h := newHolds(cli, ps, nil, nil, "n1", testLogger(t))
	var shift atomic.Int64 // the loop's clock, ahead of the real one by this
	h.now = func() time.Time { return time.Now().Add(time.Duration(shift.Load())) }
	passed := make(chan struct{}, 1)
	h.changed = func() { backoff.Wake(passed) }

	wait := func(id string) waitingRecord {
		return waitingRecord{Ref: holdRef, Repo: "reg:5000/app", ImageID: id, Reason: "test", Since: time.Now(), Node: "n1"}
	}
	putOps := func(ops ...clientv3.Op) {
		t.Helper()
		if _, err := cli.Txn(t.Context()).Then(ops...).Commit(); err != nil {
			t.Fatal(err)
		}
	}
	putFreeze := func(until time.Time) clientv3.Op {
		b, _ := json.Marshal(freezeRecord{Scope: freezeAll, Since: time.Now(), Until: until})
		return clientv3.OpPut(freezeKey(freezeAll), string(b))
	}
	putWaiting := func(w waitingRecord) clientv3.Op {
		b, _ := json.Marshal(w)
		return clientv3.OpPut(waitingKey(w.Ref), string(b))
	}
	// released waits for the release of id and returns its trigger.
	released := func(id string) trigger {
		t.Helper()
		eventually(t, 10*time.Second, "the release of "+id, func() bool { return len(readWaiting(t, cli)) == 0 })
		var tr trigger
		kvs := must(cli.Get(t.Context(), triggerKey("reg:5000/app"))).Kvs
		if len(kvs) == 0 || json.Unmarshal(kvs[0].Value, &tr) != nil || tr.Source != "release" {
			t.Fatalf("released %s: trigger %v; want one, source release", id, kvs)
		}
		return tr
	}

	// A freeze without -until, thawed: the delete of its key (as etcd
	// shows a thaw) releases at once.
	putOps(putFreeze(time.Time{}), putWaiting(wait(holdOld)))
	runLoop(t, h.run)
	<-passed // the first pass saw the waiting version
	if len(readWaiting(t, cli)) != 1 {
		t.Fatal("released while frozen")
	}
	must(cli.Delete(t.Context(), freezeKey(freezeAll)))
	released(holdOld)

	// A freeze until now+400ms: deleted, and its version released, then.
	until := time.Now().Add(400 * time.Millisecond)
	putOps(putFreeze(until), putWaiting(wait(holdNew)))
	if tr := released(holdNew); tr.Time.Before(until) {
		t.Errorf("released at %v; want at the freeze's end, %v", tr.Time, until)
	}
	if n := len(must(cli.Get(t.Context(), freezesPrefix, clientv3.WithPrefix())).Kvs); n != 0 {
		t.Errorf("%d freezes left after the -until passed; want none", n)
	}

	// A window that opens 600ms from the loop's now: released then.
	now := time.Now()
	opens := now.Truncate(time.Minute).Add(2 * time.Minute)
	shift.Store(int64(opens.Add(-600 * time.Millisecond).Sub(now)))
	spec := fmt.Sprintf("daily %s-%s", opens.UTC().Format("15:04"), opens.Add(10*time.Minute).UTC().Format("15:04"))
	must(ps.set(t.Context(), holdRef, policy{Windows: &[]string{spec}}, nil, "test", time.Now()))
	putOps(putWaiting(wait("sha256:3333333333333333333333333333333333333333333333333333333333333333")))
	if tr := released("the third version"); tr.Time.Before(opens) {
		t.Errorf("released at %v (the loop's clock); want when the window opens, %v", tr.Time, opens)
	}
}

// TestHoldsDue: what releaseDue says is due next.
func TestHoldsDue(t *testing.T) {
	monday := time.Date(2026, 12, 7, 8, 59, 0, 0, time.UTC)
	for _, tc := range []struct {
		name    string
		freezes []freezeRecord
		waiting bool
		window  string
		want    time.Duration
	}{
		{name: "nothing", want: 0},
		{name: "a freeze until thawed", freezes: []freezeRecord{{Scope: freezeAll}}, waiting: true, want: 0},
		{name: "a freeze with -until", freezes: []freezeRecord{{Scope: freezeAll, Until: monday.Add(time.Hour)}}, want: time.Hour},
		{name: "a window, nothing waiting", window: "Mon 09:00-10:00", want: 0},
		{name: "a window, a version waiting", window: "Mon 09:00-10:00", waiting: true, want: time.Minute},
		{name: "frozen in an open window", freezes: []freezeRecord{{Scope: freezeAll}}, window: "Mon 08:00-10:00", waiting: true, want: 0},
		{name: "the window opens before the freeze ends", freezes: []freezeRecord{{Scope: freezeAll, Until: monday.Add(2 * time.Hour)}},
			window: "Mon 09:00-10:00", waiting: true, want: time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cli := testNS(t)
			ps := newPolicies(cli, basePolicy(unavailable{N: 1}, time.Second))
			if tc.window != "" {
				must(ps.set(t.Context(), holdRef, policy{Windows: &[]string{tc.window}}, nil, "test", monday))
			}
			for _, f := range tc.freezes {
				f.Since = monday.Add(-time.Hour)
				b, _ := json.Marshal(f)
				must(cli.Put(t.Context(), freezeKey(f.Scope), string(b)))
			}
			if tc.waiting {
				b, _ := json.Marshal(waitingRecord{Ref: holdRef, Repo: "reg:5000/app", ImageID: holdNew, Reason: "test", Since: monday})
				must(cli.Put(t.Context(), waitingKey(holdRef), string(b)))
			}
			h := newHolds(cli, ps, nil, nil, "n1", testLogger(t))
			h.now = func() time.Time { return monday }
			p := must(h.releaseDue(t.Context()))
			if p.Due != tc.want {
				t.Errorf("releaseDue: due in %v; want %v", p.Due, tc.want)
			}
			if p.Rev == 0 {
				t.Error("releaseDue: no revision for the watch")
			}
			if tc.waiting && len(readWaiting(t, cli)) != 1 {
				t.Error("released; want held")
			}
		})
	}
}

// TestCanaryDue: what loopOnce says is due next, along a bake.
func TestCanaryDue(t *testing.T) {
	w := newCanaryWorld(t, canaryPolicy(promoteManual))
	canary, other, _ := bakeTo(t, w) // baking until now+20s
	due := func(c *canaries) time.Duration { return must(c.loopOnce(t.Context())).Due }
	if d := due(canary); d != canary.every {
		t.Errorf("baking canary: due in %v; want its next check, %v", d, canary.every)
	}
	canary.every = time.Hour
	if d := due(canary); d != 20*time.Second {
		t.Errorf("baking canary: due in %v; want the bake's end, 20s", d)
	}
	if d := due(other); d != other.downGrace {
		t.Errorf("other node, bake begun: due in %v; want its first look at the status records, %v", d, other.downGrace)
	}
	w.advance(other.downGrace)
	if d := due(other); d != other.lookEvery {
		t.Errorf("other node, after a look: due in %v; want the next, %v", d, other.lookEvery)
	}
	w.advance(20*time.Second - other.downGrace)
	if d := due(other); d != other.downGrace {
		t.Errorf("other node at the bake's end: due in %v; want the down grace, %v", d, other.downGrace)
	}
	w.advance(other.downGrace)
	if d := due(other); d != other.every {
		t.Errorf("other node after the grace, the canary not confirmed but its node up: due in %v; want %v", d, other.every)
	}
	if d := due(canary); d != 0 {
		t.Errorf("canary at the bake's end: due in %v; want nothing (waiting for promote)", d)
	}
	if p := w.record().Phase; p != phaseWaiting {
		t.Errorf("phase %s; want waiting", p)
	}
	if d := due(other); d != 0 {
		t.Errorf("other node, waiting for promote: due in %v; want nothing", d)
	}
}

// TestCanaryRunBakeEnds: a canary's loop ends the bake at its end (a due
// time), with no periodic look in between, and promotes (auto).
func TestCanaryRunBakeEnds(t *testing.T) {
	bake := 400 * time.Millisecond
	w := newCanaryWorld(t, policy{CanaryNodes: &[]string{"n1"}, Bake: durPtr(bake), Promotion: promoteAuto})
	dc := newBakeFake()
	dc.add("c1", newImage, time.Now())
	canary, other := w.node("n1", nil, dc), w.node("n2", nil, newBakeFake())
	canary.now, other.now = time.Now, time.Now
	canary.every = time.Hour // only the bake's end may end it
	w.live("n1")
	if r := w.hold(other, newImage); r != "baking on canaries" {
		t.Fatalf("other node's hold = %q", r)
	}
	runLoop(t, canary.run)
	var rec *canaryRecord
	eventually(t, 10*time.Second, "the promotion", func() bool { rec = w.record(); return rec.Phase == phasePromoted })
	if rec.BakeUntil.IsZero() || rec.Since.Before(rec.BakeUntil) || !rec.Canaries["n1"].Baked {
		t.Errorf("promoted %+v; want at the bake's end, n1 baked", rec)
	}
	if w.triggerPuts() != 1 {
		t.Errorf("%d trigger writes; want the promotion's", w.triggerPuts())
	}
}

// TestCanaryRunReportsWhenUp: a canary whose replacement is not up yet
// looks again every c.every (its containers change without an etcd
// event) and reports once it is.
func TestCanaryRunReportsWhenUp(t *testing.T) {
	w := newCanaryWorld(t, policy{CanaryNodes: &[]string{"n1"}, Bake: durPtr(time.Hour), Promotion: promoteAuto})
	dc := &listCounter{bakeFake: newBakeFake()}
	dc.add("c1", oldImage, time.Now())
	canary, other := w.node("n1", nil, dc), w.node("n2", nil, newBakeFake())
	canary.now, other.now = time.Now, time.Now
	canary.every = 20 * time.Millisecond
	w.hold(other, newImage)
	runLoop(t, canary.run)
	eventually(t, 10*time.Second, "a look at the containers", func() bool { return dc.lists.Load() > 0 })
	if p := w.record().Phase; p != phaseCanary {
		t.Fatalf("phase %s before the replacement is up; want canary", p)
	}
	dc.change("c1", func(c *docker.Container) { c.Image, c.State.StartedAt = newImage, time.Now() })
	eventually(t, 10*time.Second, "the canary's report", func() bool { return w.record().Phase == phaseBaking })
}

// listCounter counts the looks at the containers.
type listCounter struct {
	*bakeFake
	lists atomic.Int32
}

func (l *listCounter) ListContainers(opts docker.ListContainersOptions) ([]docker.APIContainers, error) {
	defer l.lists.Add(1)
	return l.bakeFake.ListContainers(opts)
}
