package etcdc

// dueloop.go: a loop that sleeps until it has something to do. A pass
// reads what it needs under some prefixes, acts on what is due, and says
// when it next has something due; the loop runs the next pass at the
// earliest of that time, a change under the prefixes (one etcd watch,
// from the revision the pass read at), a slow safety tick, or the end of
// its context. With nothing due and nothing changing it makes no request
// but the tick's pass.

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/backoff"
)

// DueLoop runs a pass whenever it may have something to do (Run).
type DueLoop struct {
	Watcher  clientv3.Watcher // nil: no watch (the due times and the tick only)
	Prefixes []string         // a change under any of them runs a pass
	Tick     time.Duration    // the safety net: a pass at least this often
	Retry    time.Duration    // the backoff's base after a failed pass or a watch that ended
	Failed   func(error)      // a pass's error, while the context lives
}

// Pass is what one pass tells the loop.
type Pass struct {
	Rev int64         // the revision the pass read at (0: none); the watch starts after it
	Due time.Duration // how long until the pass next has something due; 0: nothing
}

// Due keeps the earliest of the times after now at which a pass has
// something due.
type Due struct{ now, at time.Time }

// DueAfter returns a Due that keeps times after now.
func DueAfter(now time.Time) Due { return Due{now: now} }

// At says something is due at t; a time not after now is ignored (the
// pass acted on it).
func (d *Due) At(t time.Time) {
	if t.After(d.now) && (d.at.IsZero() || t.Before(d.at)) {
		d.at = t
	}
}

// In says something is due in dur.
func (d *Due) In(dur time.Duration) { d.At(d.now.Add(dur)) }

// Wait is how long until the earliest time; 0 when nothing is due.
func (d Due) Wait() time.Duration {
	if d.at.IsZero() {
		return 0
	}
	return d.at.Sub(d.now)
}

// Run runs pass at once and then again at the earliest of: the due time
// it returned, a change under l.Prefixes after its read, l.Tick after the
// pass, until ctx is done. A failed pass is tried again with backoff; a
// watch that ends or fails is set up again, after a backoff delay, from
// the next pass's read (which sees what the lost watch missed).
func (l DueLoop) Run(ctx context.Context, pass func(context.Context) (Pass, error)) {
	var w *prefixWatch
	defer func() { w.stop() }()
	safety := time.NewTimer(l.Tick)
	defer safety.Stop()
	var fails, watchFails int
	for {
		start := time.Now()
		p, err := pass(ctx)
		if ctx.Err() != nil {
			return
		}
		wait, timed := p.Due, p.Due > 0
		if err != nil {
			fails++
			l.Failed(err)
			if r := backoff.Delay(l.Retry, fails); !timed || r < wait {
				wait, timed = r, true
			}
		} else {
			fails = 0
		}
		if w == nil && l.Watcher != nil && p.Rev > 0 {
			w = l.watch(ctx, p.Rev+1)
		}
		safety.Reset(l.Tick)
		due := time.NewTimer(max(wait-time.Since(start), 0))
		if !timed {
			due.Stop()
		}
		select {
		case <-ctx.Done():
		case <-due.C:
		case <-safety.C:
		case <-w.changedC():
		case <-w.endedC():
			watchFails++
			if w.healthy.Load() {
				watchFails = 1
			}
			w.stop()
			w = nil
			retry := time.NewTimer(backoff.Delay(l.Retry, watchFails))
			select {
			case <-ctx.Done():
			case <-due.C:
			case <-retry.C:
			}
			retry.Stop()
		}
		due.Stop()
		if ctx.Err() != nil {
			return
		}
	}
}

// prefixWatch is one watch of every prefix of a DueLoop.
type prefixWatch struct {
	cancel  context.CancelFunc
	changed chan struct{} // capacity 1: a change since the last pass
	ended   chan struct{} // closed when any of the watches ends or fails
	healthy atomic.Bool   // etcd created the watches
	wg      sync.WaitGroup
}

// watch watches every prefix from rev on.
func (l DueLoop) watch(ctx context.Context, rev int64) *prefixWatch {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	w := &prefixWatch{cancel: cancel, changed: make(chan struct{}, 1), ended: make(chan struct{})}
	var once sync.Once
	end := func() { once.Do(func() { close(w.ended) }) }
	for _, p := range l.Prefixes {
		ch := l.Watcher.Watch(wctx, p, clientv3.WithPrefix(), clientv3.WithRev(rev), clientv3.WithCreatedNotify())
		w.wg.Go(func() {
			defer end()
			for resp := range ch {
				if resp.Err() != nil || resp.Canceled {
					return
				}
				if resp.Created {
					w.healthy.Store(true)
				}
				if len(resp.Events) > 0 {
					backoff.Wake(w.changed)
				}
			}
		})
	}
	return w
}

// stop ends the watch and waits for its goroutines; nil-safe.
func (w *prefixWatch) stop() {
	if w == nil {
		return
	}
	w.cancel()
	w.wg.Wait()
}

// changedC and endedC are nil (never ready) on a nil watch.
func (w *prefixWatch) changedC() <-chan struct{} {
	if w == nil {
		return nil
	}
	return w.changed
}

func (w *prefixWatch) endedC() <-chan struct{} {
	if w == nil {
		return nil
	}
	return w.ended
}
