package etcdc

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// passes runs l over cli until the test ends; each pass reads the
// revision and says it on the returned channel, with the due time and
// error that next(i) (i: the pass's number, from 0) gives.
func passes(t *testing.T, l DueLoop, cli clientv3.KV, next func(i int) (time.Duration, error)) <-chan int64 {
	t.Helper()
	ch := make(chan int64, 100)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); <-done })
	i := 0
	go func() {
		defer close(done)
		l.Run(ctx, func(ctx context.Context) (Pass, error) {
			resp, err := cli.Get(ctx, "x")
			if err != nil {
				return Pass{}, err
			}
			due, err := next(i)
			i++
			ch <- resp.Header.Revision
			return Pass{Rev: resp.Header.Revision, Due: due}, err
		})
	}()
	return ch
}

func nothingDue(int) (time.Duration, error) { return 0, nil }

// pass waits for the next pass and returns the revision it read.
func pass(t *testing.T, ch <-chan int64, what string) int64 {
	t.Helper()
	select {
	case rev := <-ch:
		return rev
	case <-time.After(10 * time.Second):
		t.Fatalf("no pass: %s", what)
		return 0
	}
}

// quiet fails if a pass comes within d (with nothing due and nothing
// changed under the prefixes, none may).
func quiet(t *testing.T, ch <-chan int64, d time.Duration, what string) {
	t.Helper()
	select {
	case rev := <-ch:
		t.Fatalf("a pass (at revision %d) %s", rev, what)
	case <-time.After(d): // a window in which nothing may happen
	}
}

func put(t *testing.T, cli clientv3.KV, key string) int64 {
	t.Helper()
	resp, err := cli.Put(t.Context(), key, "v")
	if err != nil {
		t.Fatal(err)
	}
	return resp.Header.Revision
}

// TestDueLoopIdle: with nothing due, a pass at the start and then only
// for a change under the prefixes; changes elsewhere wake nothing.
func TestDueLoopIdle(t *testing.T) {
	cli := testNS(t)
	ch := passes(t, DueLoop{Watcher: cli, Prefixes: []string{"a/", "b/"}, Tick: time.Minute, Retry: time.Millisecond, Failed: func(err error) { t.Error(err) }}, cli, nothingDue)
	pass(t, ch, "at the start")
	put(t, cli, "c/1")
	quiet(t, ch, 300*time.Millisecond, "with nothing due and nothing changed under the prefixes")
	for _, key := range []string{"a/1", "b/1"} {
		rev := put(t, cli, key)
		if got := pass(t, ch, "after a put of "+key); got < rev {
			t.Errorf("the pass after the put of %s read at revision %d; want %d or later", key, got, rev)
		}
	}
}

// TestDueLoopDue: a pass at the due time the last pass named, and the
// safety tick.
func TestDueLoopDue(t *testing.T) {
	cli := testNS(t)
	ch := passes(t, DueLoop{Watcher: cli, Prefixes: []string{"a/"}, Tick: time.Minute, Retry: time.Millisecond, Failed: func(err error) { t.Error(err) }}, cli,
		func(i int) (time.Duration, error) {
			if i == 0 {
				return 200 * time.Millisecond, nil
			}
			return 0, nil
		})
	pass(t, ch, "at the start")
	start := time.Now()
	pass(t, ch, "at the due time")
	if took := time.Since(start); took < 150*time.Millisecond {
		t.Errorf("the due pass came after %v; want 200ms", took)
	}
	quiet(t, ch, 300*time.Millisecond, "after the due pass, with nothing due")

	cli2 := testNS(t)
	ticked := passes(t, DueLoop{Watcher: cli2, Prefixes: []string{"a/"}, Tick: 100 * time.Millisecond, Retry: time.Millisecond, Failed: func(err error) { t.Error(err) }}, cli2, nothingDue)
	for range 3 {
		pass(t, ticked, "on the tick")
	}
}

// TestDueLoopFailedPass: a pass that fails is told and tried again (with
// backoff) although nothing is due.
func TestDueLoopFailedPass(t *testing.T) {
	cli := testNS(t)
	var mu sync.Mutex
	var failed []error
	boom := errors.New("boom")
	ch := passes(t, DueLoop{Watcher: cli, Prefixes: []string{"a/"}, Tick: time.Minute, Retry: 10 * time.Millisecond,
		Failed: func(err error) { mu.Lock(); failed = append(failed, err); mu.Unlock() }}, cli,
		func(i int) (time.Duration, error) {
			if i < 2 {
				return 0, boom
			}
			return 0, nil
		})
	for range 3 {
		pass(t, ch, "a failed pass tried again")
	}
	quiet(t, ch, 200*time.Millisecond, "after a pass that succeeded, with nothing due")
	mu.Lock()
	defer mu.Unlock()
	if len(failed) != 2 || !errors.Is(failed[0], boom) {
		t.Errorf("failures told: %v; want boom twice", failed)
	}
}

// breakableWatcher is the etcd watch with a switch that ends every
// watch open, as a dropped stream or a compaction does.
type breakableWatcher struct {
	clientv3.Watcher
	mu    sync.Mutex
	revs  []int64         // the revision each Watch starts at
	stops []chan struct{} // per Watch: closed to end it
}

func (b *breakableWatcher) Watch(ctx context.Context, key string, opts ...clientv3.OpOption) clientv3.WatchChan {
	stop := make(chan struct{})
	b.mu.Lock()
	b.revs = append(b.revs, clientv3.OpGet(key, opts...).Rev())
	b.stops = append(b.stops, stop)
	b.mu.Unlock()
	in := b.Watcher.Watch(ctx, key, opts...)
	out := make(chan clientv3.WatchResponse)
	go func() {
		defer close(out)
		for {
			select {
			case <-stop:
				return
			case resp, ok := <-in:
				if !ok {
					return
				}
				select {
				case out <- resp:
				case <-stop:
					return
				}
			}
		}
	}()
	return out
}

func (b *breakableWatcher) breakAll() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, s := range b.stops {
		select {
		case <-s:
		default:
			close(s)
		}
	}
}

// wait returns the revisions the watches started at once there are n
// (or after 10 s).
func (b *breakableWatcher) wait(n int) []int64 {
	deadline := time.Now().Add(10 * time.Second)
	for {
		b.mu.Lock()
		revs := append([]int64(nil), b.revs...)
		b.mu.Unlock()
		if len(revs) >= n || time.Now().After(deadline) {
			return revs
		}
		time.Sleep(time.Millisecond) // polling: the watch starts right after the pass, which has no event to wait on
	}
}

// TestDueLoopWatchEnds: a watch that ends is set up again, after a pass
// that reads what it missed, from that pass's revision on.
func TestDueLoopWatchEnds(t *testing.T) {
	cli := testNS(t)
	bw := &breakableWatcher{Watcher: cli}
	ch := passes(t, DueLoop{Watcher: bw, Prefixes: []string{"a/"}, Tick: time.Minute, Retry: 10 * time.Millisecond, Failed: func(err error) { t.Error(err) }}, cli, nothingDue)
	first := pass(t, ch, "at the start")
	if got := bw.wait(1); len(got) != 1 || got[0] != first+1 {
		t.Fatalf("watches started at %v; want one, at %d", got, first+1)
	}
	bw.breakAll()
	again := pass(t, ch, "after the watch ended")
	if got := bw.wait(2); len(got) != 2 || got[1] != again+1 {
		t.Fatalf("watches started at %v; want a second one at %d", got, again+1)
	}
	rev := put(t, cli, "a/1")
	if got := pass(t, ch, "a change after the watch was set up again"); got < rev {
		t.Errorf("the pass read at %d; want %d or later", got, rev)
	}
}
