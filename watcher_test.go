package main

import (
	"context"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/etcdc"
)

type watchHarness struct {
	t      *testing.T
	cli    *clientv3.Client
	prefix string
	events chan deployEvent
	w      *watcher
}

func newWatchHarness(t *testing.T, cli *clientv3.Client, prefix string) *watchHarness {
	h := &watchHarness{t: t, cli: cli, prefix: prefix, events: make(chan deployEvent, 100)}
	log := testLogger(t)
	ns := etcdc.InPrefix(cli, prefix) // as newDaemon confines it; h.put writes whole keys
	h.w = newWatcher(ns, "n1", 10*time.Millisecond, false, newProgress(ns, progressKey("n1"), log), func(repo string, ev deployEvent) { ev.Repo = testName(repo); h.events <- ev }, log, newMetrics())
	return h
}

// start runs the watcher until the returned stop is called; the watcher
// has read its starting revision when start returns.
func (h *watchHarness) start() (stop func()) {
	ctx, cancel := context.WithCancel(h.t.Context())
	next, err := h.w.start(ctx)
	if err != nil {
		h.t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { h.w.loop(ctx, next); close(done) }()
	pdone := make(chan struct{})
	go func() { h.w.progress.run(ctx); close(pdone) }()
	return func() { cancel(); <-done; <-pdone }
}

func (h *watchHarness) put(key, val string) int64 {
	h.t.Helper()
	resp, err := h.cli.Put(h.t.Context(), h.prefix+"/"+key, val)
	if err != nil {
		h.t.Fatal(err)
	}
	return resp.Header.Revision
}

// next returns the next event, failing after a generous bound.
func (h *watchHarness) next() deployEvent {
	h.t.Helper()
	select {
	case ev := <-h.events:
		return ev
	case <-time.After(10 * time.Second):
		h.t.Fatal("no deploy event within 10s")
		return deployEvent{}
	}
}

// none checks that no event is pending, using a marker key as a barrier:
// etcd delivers events in revision order, so once the marker's event
// arrives, every earlier one has too.
func (h *watchHarness) none() {
	h.t.Helper()
	h.put("zz-barrier", `{"tag":"barrier"}`)
	ev := h.next()
	if ev.Repo.Name() != "zz-barrier" {
		h.t.Fatalf("unexpected event %+v", ev)
	}
	h.w.progress.done([]int64{ev.Rev})
}

func TestWatcherEvents(t *testing.T) {
	cli := testEtcd(t)
	h := newWatchHarness(t, cli, testPrefix(t))
	h.put("myorg/old", "before the node ever ran")
	stop := h.start()
	defer stop()

	tests := []struct {
		name string
		key  string
		val  string
		want *deployEvent
	}{
		{"json with tag", "myorg/foo", `{"time":"2026-11-25T12:00:00Z","tag":"qa","source":"dockerhub"}`, &deployEvent{Repo: testName("myorg/foo"), Tags: []string{"qa"}}},
		{"plain value means every tag", "myorg/foo", "anything", &deployEvent{Repo: testName("myorg/foo")}},
		{"json without tag", "127.0.0.1:5000/app", `{"source":"registry"}`, &deployEvent{Repo: testName("127.0.0.1:5000/app")}},
		{"reserved name", "_nodes/other/revision", "12", nil},
		{"reserved top", "_status", "x", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rev := h.put(tt.key, tt.val)
			if tt.want == nil {
				h.none()
				return
			}
			got := h.next()
			if got.Repo != tt.want.Repo || !slices.Equal(got.Tags, tt.want.Tags) || got.Rev != rev {
				t.Errorf("event = %+v; want %+v at revision %d", got, *tt.want, rev)
			}
			h.w.progress.done([]int64{got.Rev})
		})
	}
	t.Run("one transaction, two repositories", func(t *testing.T) {
		// A registry envelope naming two repositories writes both
		// triggers in one transaction: they share a revision.
		resp, err := cli.Txn(t.Context()).Then(
			clientv3.OpPut(h.prefix+"/myorg/one", `{"tag":"qa","source":"registry"}`),
			clientv3.OpPut(h.prefix+"/myorg/two", `{"tag":"qa","source":"registry"}`),
		).Commit()
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for range 2 {
			ev := h.next()
			if ev.Rev != resp.Header.Revision {
				t.Errorf("event %+v; want revision %d", ev, resp.Header.Revision)
			}
			got = append(got, ev.Repo.Name())
			h.w.progress.done([]int64{ev.Rev})
		}
		slices.Sort(got)
		if want := []string{testName("myorg/one").Name(), testName("myorg/two").Name()}; !slices.Equal(got, want) {
			t.Errorf("deployed %v; want both of %v", got, want)
		}
	})
	t.Run("delete deploys nothing", func(t *testing.T) {
		if _, err := cli.Delete(t.Context(), h.prefix+"/myorg/foo"); err != nil {
			t.Fatal(err)
		}
		h.none()
	})
}

func TestWatcherResumesAfterRestart(t *testing.T) {
	cli := testEtcd(t)
	prefix := testPrefix(t)
	h := newWatchHarness(t, cli, prefix)
	stop := h.start()
	h.put("a/one", `{"tag":"v1"}`)
	ev := h.next()
	h.w.progress.done([]int64{ev.Rev})
	// An event that was seen but whose deploy never finished (a crash).
	h.put("a/unfinished", `{"tag":"v1"}`)
	h.next()
	stop()

	// While the node is down: two more triggers.
	r1 := h.put("a/two", `{"tag":"v2"}`)
	r2 := h.put("a/three", `{"tag":"v3"}`)

	h2 := newWatchHarness(t, cli, prefix)
	stop = h2.start()
	defer stop()
	var got []string
	for range 3 {
		ev := h2.next()
		got = append(got, ev.Repo.Name())
		h2.w.progress.done([]int64{ev.Rev})
		if ev.Repo.Name() == "a/two" && ev.Rev != r1 || ev.Repo.Name() == "a/three" && ev.Rev != r2 {
			t.Errorf("event %+v has the wrong revision", ev)
		}
	}
	if want := []string{"a/unfinished", "a/two", "a/three"}; !slices.Equal(got, want) {
		t.Errorf("after restart got %q; want exactly %q (nothing handled twice, nothing lost)", got, want)
	}
	h2.none()
}

func TestWatcherCatchesUpAfterCompaction(t *testing.T) {
	cli := testEtcd(t)
	prefix := testPrefix(t)
	h := newWatchHarness(t, cli, prefix)
	stop := h.start()
	stop()
	h.put("b/changed", `{"tag":"v9"}`)
	h.put("b/changed-twice", `{"tag":"v1"}`)
	rev := h.put("b/changed-twice", `{"tag":"v2"}`)
	if _, err := cli.Compact(t.Context(), rev); err != nil {
		t.Fatal(err)
	}
	h2 := newWatchHarness(t, cli, prefix)
	stop = h2.start()
	defer stop()
	got := map[string]deployEvent{}
	for range 2 {
		ev := h2.next()
		got[ev.Repo.Name()] = ev
		h2.w.progress.done([]int64{ev.Rev})
	}
	for _, repo := range []string{"b/changed", "b/changed-twice"} {
		ev, ok := got[repo]
		if !ok || ev.Tags != nil {
			t.Errorf("after compaction: event for %s = %+v, %v; want one deploying every tag", repo, ev, ok)
		}
	}
	h2.none()
}

func TestProgressWatermark(t *testing.T) {
	p := newProgress(nil, "", testLogger(t))
	p.init(4)
	steps := []struct {
		add, done []int64
		want      int64
	}{
		{add: []int64{5, 6, 7}, want: 4},
		{done: []int64{6}, want: 4},
		{done: []int64{5}, want: 6},
		{add: []int64{9}, want: 6},
		{done: []int64{7}, want: 8},
		{done: []int64{9}, want: 9},
	}
	for i, s := range steps {
		for _, r := range s.add {
			p.add(r)
		}
		p.done(s.done)
		if got := p.watermark(); got != s.want {
			t.Errorf("step %d: watermark = %d; want %d", i, got, s.want)
		}
	}
}

// eventCountingWatcher counts the events its watches deliver.
type eventCountingWatcher struct {
	clientv3.Watcher
	events atomic.Int64
}

func (c *eventCountingWatcher) Watch(ctx context.Context, key string, opts ...clientv3.OpOption) clientv3.WatchChan {
	in := c.Watcher.Watch(ctx, key, opts...)
	out := make(chan clientv3.WatchResponse)
	go func() {
		defer close(out)
		for resp := range in {
			c.events.Add(int64(len(resp.Events)))
			select {
			case out <- resp:
			case <-ctx.Done():
				return
			}
		}
	}()
	return out
}

// TestWatcherWatchesOnlyTriggers: the watch covers the triggers on both
// sides of the reserved "_" names (a repository that begins with a digit
// and one that begins with a letter, in one transaction) and nothing of
// the daemon's own state: other nodes' status, slot and ledger writes
// reach no node's watcher (they did, N² events per rollout).
func TestWatcherWatchesOnlyTriggers(t *testing.T) {
	cli := testEtcd(t)
	h := newWatchHarness(t, cli, testPrefix(t))
	cw := &eventCountingWatcher{Watcher: h.w.w}
	h.w.w = cw
	stop := h.start()
	defer stop()
	for _, k := range []string{"_status/other", "_rollout/x/slots/1", "_history/x/000000000001", "_nodes/other/revision"} {
		h.put(k, "{}")
	}
	resp, err := cli.Txn(t.Context()).Then(
		clientv3.OpPut(h.prefix+"/127.0.0.1:5000/app", `{"tag":"qa"}`),
		clientv3.OpPut(h.prefix+"/myorg/app", `{"tag":"qa"}`),
	).Commit()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for range 2 {
		ev := h.next()
		if ev.Rev != resp.Header.Revision {
			t.Errorf("event %+v; want revision %d", ev, resp.Header.Revision)
		}
		got = append(got, ev.Repo.Name())
		h.w.progress.done([]int64{ev.Rev})
	}
	slices.Sort(got)
	if want := []string{testName("127.0.0.1:5000/app").Name(), testName("myorg/app").Name()}; !slices.Equal(got, want) {
		t.Errorf("deployed %v; want %v", got, want)
	}
	h.none()
	if n := cw.events.Load(); n != 3 {
		t.Errorf("the watcher received %d events; want 3 (two triggers and the barrier), none of the daemon's own keys", n)
	}
	// The progress record moves past the triggers.
	eventually(t, 10*time.Second, "the progress record", func() bool {
		r, err := cli.Get(t.Context(), h.prefix+progressKey("n1"))
		if err != nil || len(r.Kvs) != 1 {
			return false
		}
		n, _ := strconv.ParseInt(string(r.Kvs[0].Value), 10, 64)
		return n >= resp.Header.Revision
	})
}

// TestProgressConfirmCaps: the watermark never passes what the watch
// confirmed delivered: with two ranges watched, a trigger of one can be
// done before an earlier one of the other arrives.
func TestProgressConfirmCaps(t *testing.T) {
	p := newProgress(nil, "", testLogger(t))
	p.init(4)
	p.confirm(5)
	p.add(8)
	p.done([]int64{8})
	if got := p.watermark(); got != 5 {
		t.Errorf("watermark = %d; want 5 (confirmed), not 8", got)
	}
	p.confirm(9)
	if got := p.watermark(); got != 8 {
		t.Errorf("watermark = %d; want 8", got)
	}
}
