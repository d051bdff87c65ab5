package main

import (
	"context"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// eventRecorder counts, by key, the events its watches deliver, and
// says on watched when the first watch of a prefix begins.
type eventRecorder struct {
	clientv3.Watcher
	watched chan struct{}
	once    sync.Once
	mu      sync.Mutex
	keys    []string
}

func (w *eventRecorder) Watch(ctx context.Context, key string, opts ...clientv3.OpOption) clientv3.WatchChan {
	in := w.Watcher.Watch(ctx, key, opts...)
	if clientv3.IsOptsWithPrefix(opts) {
		w.once.Do(func() { close(w.watched) })
	}
	out := make(chan clientv3.WatchResponse)
	go func() {
		defer close(out)
		for wr := range in {
			w.mu.Lock()
			for _, ev := range wr.Events {
				w.keys = append(w.keys, string(ev.Kv.Key))
			}
			w.mu.Unlock()
			select {
			case out <- wr:
			case <-ctx.Done():
				return
			}
		}
	}()
	return out
}

// delivered returns the keys of the events delivered so far that keep
// reports true for.
func (w *eventRecorder) delivered(keep func(string) bool) []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for _, k := range w.keys {
		if keep(k) {
			out = append(out, k)
		}
	}
	return out
}

// The auto-rollback of every node watches the halt records only: a
// tag's slot, queue and down records, written several times per node per
// rollout, reach none of them (issue 22: watch events per node per
// rollout must not grow with the fleet). A halt is still acted on at
// once.
func TestAutoRollbackWatchesOnlyHalts(t *testing.T) {
	f := newRollbackFixture(t, outcomeRolledOut, outcomeRollingOut)
	cli := f.kv.(*clientv3.Client)
	w := &eventRecorder{Watcher: cli, watched: make(chan struct{})}
	etcd := struct {
		clientv3.KV
		clientv3.Watcher
	}{cli, w}
	a := newAutoRollback(etcd, testLeases(t, cli), f.rb, testLedger(t, cli, "a", 20), "a", testLogger(t))
	a.takeover, a.ledgerWait, a.poll, a.retryBase, a.callTimeout = time.Second, 200*time.Millisecond, 10*time.Millisecond, 10*time.Millisecond, 5*time.Second
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = a.run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-w.watched:
	case <-time.After(10 * time.Second):
		t.Fatal("the auto-rollback did not watch within 10s")
	}

	// A rollout's records of 20 nodes: slots, queue and down records.
	for i := range 20 {
		node := "n" + strconv.Itoa(i)
		var key string
		switch i % 3 {
		case 0:
			key = slotsDir(f.ref) + strconv.Itoa(i)
		case 1:
			key = queueDir(f.ref) + strconv.Itoa(i)
		default:
			key = downKey(f.ref, node)
		}
		if _, err := f.kv.Put(t.Context(), key, node+" app"); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	putHalt(t, f.kv, f.ref, f.imgs[1].id, "a")
	checkAutoRolledBack(t, f, "a", "a")
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("rolled back %v after the halt; want at once", took)
	}
	// The halt came after the 20 records, on the same watch: had any of
	// them been delivered, it would be counted by now.
	if got := w.delivered(func(k string) bool { return strings.HasPrefix(k, rolloutPrefix(f.ref)) && k != haltKey(f.ref) }); len(got) != 0 {
		t.Errorf("the auto-rollback's watch got %d events of slot, queue and down records (%v); want none", len(got), got)
	}
}

// readKey returns key's value, and whether it exists.
func readKey(t *testing.T, kv clientv3.KV, key string) (string, bool) {
	t.Helper()
	resp, err := kv.Get(t.Context(), key)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return "", false
	}
	return string(resp.Kvs[0].Value), true
}

// A halt an earlier version wrote at its legacy key is at its new key
// after the move; the rollout's other records stay; several nodes moving
// at once move each record once, without an error; a halt at the new key
// is not overwritten.
func TestMoveLegacyHalts(t *testing.T) {
	refs := []string{"reg/app:qa", "reg/app:prod", "reg/web:latest", "docker.io/library/busybox:1"}
	value := func(ref string) string { return `{"image_id":"sha256:` + ref + `","node":"old"}` }
	put := func(t *testing.T, kv clientv3.KV, key, v string) {
		t.Helper()
		if _, err := kv.Put(t.Context(), key, v); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name    string
		movers  int
		current map[string]string // halts at the new key before the move
	}{
		{"one node", 1, nil},
		{"three nodes at once", 3, nil},
		{"a halt at the new key stays", 2, map[string]string{"reg/app:qa": `{"image_id":"sha256:new","node":"n2"}`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kv := testNS(t)
			for _, ref := range refs {
				put(t, kv, legacyHaltKey(ref), value(ref))
			}
			for ref, v := range tc.current {
				put(t, kv, haltKey(ref), v)
			}
			others := []string{slotsDir(refs[0]) + "1", downKey(refs[0], "n1"), queueDir(refs[1]) + "2"}
			for _, k := range others {
				put(t, kv, k, "n1 app")
			}
			var (
				wg    sync.WaitGroup
				mu    sync.Mutex
				moved int
				errs  []error
			)
			for range tc.movers {
				wg.Go(func() {
					n, err := moveLegacyHalts(t.Context(), kv, 5*time.Second, testLogger(t))
					mu.Lock()
					defer mu.Unlock()
					moved += n
					if err != nil {
						errs = append(errs, err)
					}
				})
			}
			wg.Wait()
			if len(errs) > 0 {
				t.Fatalf("moveLegacyHalts: %v; want no error", errs)
			}
			if want := len(refs) - len(tc.current); moved != want {
				t.Errorf("%d halts moved by %d nodes; want %d", moved, tc.movers, want)
			}
			for _, ref := range refs {
				want, ok := tc.current[ref]
				if !ok {
					want = value(ref)
				}
				if got, _ := readKey(t, kv, haltKey(ref)); got != want {
					t.Errorf("halt of %s at %s: %q; want %q", ref, haltKey(ref), got, want)
				}
				if got, ok := readKey(t, kv, legacyHaltKey(ref)); ok {
					t.Errorf("halt of %s still at its legacy key: %q", ref, got)
				}
			}
			for _, k := range others {
				if _, ok := readKey(t, kv, k); !ok {
					t.Errorf("%s is gone; want the rollout's records left alone", k)
				}
			}
		})
	}
}

// The daemon moves a legacy halt when it starts, before it listens, and
// then sees it: the status view shows the halt.
func TestDaemonMovesLegacyHaltAtStart(t *testing.T) {
	const ref = "127.0.0.1:5000/app:qa"
	kv := testNS(t)
	v := `{"image_id":"sha256:2222","node":"old","reason":"not up within 20s"}`
	if _, err := kv.Put(t.Context(), legacyHaltKey(ref), v); err != nil {
		t.Fatal(err)
	}
	startTestDaemon(t, testEtcd(t), newFakeDocker(), nil)
	if got, _ := readKey(t, kv, haltKey(ref)); got != v {
		t.Fatalf("halt at %s after the start: %q; want %q", haltKey(ref), got, v)
	}
	if _, ok := readKey(t, kv, legacyHaltKey(ref)); ok {
		t.Error("the halt is still at its legacy key")
	}
	st, err := readStatus(t.Context(), kv, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Tags) != 1 || st.Tags[0].Halted == nil || st.Tags[0].Halted.ImageID != "sha256:2222" {
		t.Errorf("status view: %+v; want %s halted at sha256:2222", st.Tags, ref)
	}
	view, err := readDashView(t.Context(), kv, "n1", 1, nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if len(view.Tags) != 1 || view.Tags[0].Halted == nil || view.Tags[0].Halted.ImageID != "sha256:2222" {
		t.Errorf("dashboard view: %+v; want %s halted at sha256:2222", view.Tags, ref)
	}
}

// rewritingKV rewrites key with value before the first transaction, as
// a node of the earlier version does that halts the tag again between
// the move's read and its transaction.
type rewritingKV struct {
	clientv3.KV
	t          *testing.T
	key, value string
	once       sync.Once
}

func (kv *rewritingKV) Txn(ctx context.Context) clientv3.Txn {
	kv.once.Do(func() {
		if _, err := kv.Put(ctx, kv.key, kv.value); err != nil {
			kv.t.Error(err)
		}
	})
	return kv.KV.Txn(ctx)
}

// A legacy halt rewritten between the move's read and its transaction
// moves as rewritten: the move compares what it read.
func TestMoveLegacyHaltRewrittenMeanwhile(t *testing.T) {
	const ref = "reg/app:qa"
	ns := testNS(t)
	if _, err := ns.Put(t.Context(), legacyHaltKey(ref), `{"image_id":"sha256:1111"}`); err != nil {
		t.Fatal(err)
	}
	newer := `{"image_id":"sha256:2222"}`
	kv := &rewritingKV{KV: ns, t: t, key: legacyHaltKey(ref), value: newer}
	moved, err := moveLegacyHalts(t.Context(), kv, 5*time.Second, testLogger(t))
	if err != nil || moved != 1 {
		t.Fatalf("moveLegacyHalts = %d, %v; want 1, nil", moved, err)
	}
	if got, _ := readKey(t, ns, haltKey(ref)); got != newer {
		t.Errorf("halt at the new key: %q; want the rewritten %q", got, newer)
	}
	if _, ok := readKey(t, ns, legacyHaltKey(ref)); ok {
		t.Error("the halt is still at its legacy key")
	}
}
