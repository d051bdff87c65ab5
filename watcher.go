package main

// watcher.go: the etcd watch of the triggers. It resumes from the node's
// recorded revision, catches up after a compaction, turns trigger keys
// into deploy events, and records progress: the revision below which
// every deploy is finished.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/backoff"
)

// watcher turns etcd trigger keys into deploy events. It reads where it
// stopped last time from etcd, watches from there, and reconnects with
// backoff. Delivery is at least once: no event is lost (the recorded
// revision only passes a trigger once its deploy finished or failed for
// good, see progress and retry.go), and one in flight at a crash is
// emitted again at the next start; deploys are idempotent.
type watcher struct {
	kv           clientv3.KV
	w            clientv3.Watcher
	node         string
	retryDelay   time.Duration
	serializable bool // !-strong_consistency
	log          *slog.Logger
	emit         func(repo string, ev deployEvent) // must not block; repo as the key names it
	progress     *progress
	metrics      *metrics
	watching     chan struct{} // closed once the starting revision is known; may be nil
}

// watchKV is the part of the etcd client the watcher uses.
type watchKV interface {
	clientv3.KV
	clientv3.Watcher
}

// newWatcher returns a watcher of the triggers in cli (confined to
// -etcd_prefix) for node, recording its progress in p and handing each
// trigger to emit, which must not block. It starts nothing.
func newWatcher(cli watchKV, node string, retryDelay time.Duration, serializable bool, p *progress, emit func(repo string, ev deployEvent), log *slog.Logger, m *metrics) *watcher {
	return &watcher{
		kv: cli, w: cli, node: node, emit: emit, retryDelay: retryDelay, serializable: serializable,
		log: log, progress: p, metrics: m, watching: make(chan struct{}),
	}
}

func (w *watcher) run(ctx context.Context) error {
	next, err := w.start(ctx)
	for ctx.Err() == nil && err != nil {
		w.log.Warn("etcd not ready", "err", err)
		if !backoff.Sleep(ctx, w.retryDelay) {
			return nil
		}
		next, err = w.start(ctx)
	}
	if w.watching != nil {
		close(w.watching)
	}
	return w.loop(ctx, next)
}

// loop watches from next, reconnecting with backoff, until ctx is done.
// pos holds, per range of triggerRanges, the revision through which its
// watch has delivered everything: a reconnect resumes from the lowest
// and skips what a range delivered already.
func (w *watcher) loop(ctx context.Context, next int64) error {
	pos := make([]int64, len(triggerRanges))
	for i := range pos {
		pos[i] = next - 1
	}
	failures := 0
	for ctx.Err() == nil {
		healthy, err := w.watchOnce(ctx, pos)
		if ctx.Err() != nil {
			return nil
		}
		w.metrics.watchReconnects.Inc()
		if healthy {
			failures = 0
		}
		failures++
		d := backoff.Delay(w.retryDelay, failures)
		w.log.Warn("etcd watch interrupted, reconnecting", "err", err, "next_revision", slices.Min(pos)+1, "retry_in", d)
		if !backoff.Sleep(ctx, d) {
			return nil
		}
	}
	return nil
}

// start returns the revision to watch from: one past the last revision this
// node handled, or, for a node that never ran, one past the current
// revision (which it records, so that a crash before the first event does
// not lose the events that follow).
func (w *watcher) start(ctx context.Context) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := w.kv.Get(ctx, progressKey(w.node))
	if err != nil {
		return 0, fmt.Errorf("read progress: %w", err)
	}
	if len(resp.Kvs) == 1 {
		rev, err := strconv.ParseInt(string(resp.Kvs[0].Value), 10, 64)
		if err == nil && rev >= 0 {
			w.log.Info("resuming etcd watch", "revision", rev+1)
			w.progress.init(rev)
			return rev + 1, nil
		}
		w.log.Warn("ignoring unreadable progress record", "value", string(resp.Kvs[0].Value))
	}
	rev := resp.Header.Revision
	if _, err := w.kv.Put(ctx, progressKey(w.node), strconv.FormatInt(rev, 10)); err != nil {
		return 0, fmt.Errorf("record progress: %w", err)
	}
	w.progress.init(rev)
	w.log.Info("starting etcd watch on a new node", "revision", rev+1)
	return rev + 1, nil
}

// watchOnce watches the triggers, one watch per range of triggerRanges
// (the daemon's own keys between them are never watched: every node's
// status, slot and ledger writes would otherwise reach every node), from
// the lowest revision of pos until the stream breaks, moving pos on. It
// returns whether the stream delivered anything.
//
// The watches share one stream but not one order: catching up, one can
// deliver a revision before the other delivers an earlier one. So the
// progress watermark is held to the lowest revision both ranges have
// delivered (progress.confirm); a range idle while the other has news
// is asked for its progress (RequestProgress), which etcd answers on
// every watch of the stream with the revision it has sent up to.
func (w *watcher) watchOnce(ctx context.Context, pos []int64) (bool, error) {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	from := slices.Min(pos) + 1
	type part struct {
		i    int
		resp clientv3.WatchResponse
		eof  bool
	}
	parts := make(chan part)
	for i, r := range triggerRanges {
		ch := w.w.Watch(wctx, r.lo, clientv3.WithRange(r.hi), clientv3.WithRev(from), clientv3.WithProgressNotify())
		go func() {
			for resp := range ch {
				select {
				case parts <- part{i: i, resp: resp}:
				case <-wctx.Done():
					return
				}
			}
			select {
			case parts <- part{i: i, eof: true}:
			case <-wctx.Done():
			}
		}()
	}
	healthy := false
	for {
		var p part
		select {
		case p = <-parts:
		case <-ctx.Done():
			return healthy, ctx.Err()
		}
		if p.eof {
			if err := ctx.Err(); err != nil {
				return healthy, err
			}
			return healthy, errors.New("watch channel closed")
		}
		resp := p.resp
		if resp.CompactRevision != 0 {
			w.log.Warn("etcd history compacted past our revision, re-reading", "next_revision", slices.Min(pos)+1, "compact_revision", resp.CompactRevision)
			n, err := w.catchUp(ctx, slices.Min(pos)+1)
			if err != nil {
				return healthy, err
			}
			for i := range pos {
				pos[i] = max(pos[i], n-1)
			}
			w.progress.confirm(n - 1)
			return true, errors.New("compacted")
		}
		if err := resp.Err(); err != nil {
			return healthy, err
		}
		healthy = true
		if resp.IsProgressNotify() {
			pos[p.i] = max(pos[p.i], resp.Header.Revision)
		}
		for _, ev := range resp.Events {
			// The events of one transaction share a revision (a registry
			// envelope naming several repositories, a rollback): each is
			// a trigger. A range resumed from below what it delivered
			// skips what it delivered.
			if ev.Kv.ModRevision <= pos[p.i] {
				continue
			}
			if ev.Type != clientv3.EventTypePut {
				continue // a deleted key deploys nothing
			}
			tags, digests := parseTrigger(ev.Kv.Value)
			w.handle(ev.Kv.Key, ev.Kv.ModRevision, tags, digests)
		}
		if n := len(resp.Events); n > 0 {
			last := resp.Events[n-1].Kv.ModRevision
			pos[p.i] = max(pos[p.i], last)
			if slices.Min(pos) < last {
				// Best effort: the periodic progress notification comes anyway.
				_ = w.w.RequestProgress(wctx)
			}
		}
		w.progress.confirm(slices.Min(pos))
	}
}

// catchUp re-reads the prefix after a compaction and emits every trigger
// modified since next. Intermediate values are gone, so it deploys every
// local tag of those repositories. Every revision is registered as pending
// before any is emitted, and they are emitted in revision order: a quick
// deploy of a later one must not save a watermark past an earlier one
// still in flight.
func (w *watcher) catchUp(ctx context.Context, next int64) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var reads []clientv3.Op
	for _, r := range triggerRanges {
		opts := []clientv3.OpOption{clientv3.WithRange(r.hi), clientv3.WithKeysOnly()}
		if w.serializable {
			opts = append(opts, clientv3.WithSerializable())
		}
		reads = append(reads, clientv3.OpGet(r.lo, opts...))
	}
	tresp, err := w.kv.Txn(ctx).Then(reads...).Commit()
	if err != nil {
		return next, fmt.Errorf("re-read the triggers: %w", err)
	}
	var kvs []*mvccpb.KeyValue
	for _, r := range tresp.Responses {
		kvs = append(kvs, r.GetResponseRange().Kvs...)
	}
	type trig struct {
		repo string
		rev  int64
	}
	var todo []trig
	for _, kv := range kvs {
		if repo, ok := repoFromKey(string(kv.Key)); ok && kv.ModRevision >= next {
			todo = append(todo, trig{repo, kv.ModRevision})
		}
	}
	slices.SortFunc(todo, func(a, b trig) int { return cmp.Compare(a.rev, b.rev) })
	for _, t := range todo {
		w.progress.add(t.rev)
	}
	for _, t := range todo {
		w.metrics.watchEvents.Inc()
		w.log.Info("etcd trigger", "repo", t.repo, "revision", t.rev, "catch_up", true)
		w.emit(t.repo, deployEvent{Rev: t.rev})
	}
	if tresp.Header.Revision+1 > next {
		next = tresp.Header.Revision + 1
	}
	return next, nil
}

func (w *watcher) handle(key []byte, rev int64, tags []string, digests map[string]string) {
	repo, ok := repoFromKey(string(key))
	if !ok {
		return
	}
	w.metrics.watchEvents.Inc()
	w.log.Info("etcd trigger", "repo", repo, "tags", tags, "revision", rev)
	w.progress.add(rev)
	w.emit(repo, deployEvent{Tags: tags, Digests: digests, Rev: rev})
}

// progress tracks which trigger revisions are still being deployed (or
// wait for a retry), and records in etcd the highest revision below which
// everything is done: finished, or failed for good.
type progress struct {
	kv  clientv3.KV
	key string
	log *slog.Logger

	mu      sync.Mutex
	pending map[int64]int // revision -> deploys still open for it
	highest int64         // highest revision handed out
	saved   int64
	// confirmed, once capped: the revision through which the watch has
	// delivered every trigger; the watermark never passes it.
	confirmed int64
	capped    bool
	wake      chan struct{} // capacity 1
}

func newProgress(kv clientv3.KV, key string, log *slog.Logger) *progress {
	return &progress{kv: kv, key: key, log: log, pending: map[int64]int{}, wake: make(chan struct{}, 1)}
}

func (p *progress) init(rev int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if rev > p.highest {
		p.highest, p.saved = rev, rev
	}
	p.confirmed = max(p.confirmed, rev)
}

// confirm records that every trigger through rev has been handed out
// (add): from the first call on, the watermark never passes the highest
// rev confirmed.
func (p *progress) confirm(rev int64) {
	p.mu.Lock()
	moved := !p.capped || rev > p.confirmed
	p.capped = true
	p.confirmed = max(p.confirmed, rev)
	p.mu.Unlock()
	if moved {
		backoff.Wake(p.wake)
	}
}

func (p *progress) add(rev int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.pending[rev]++
	if rev > p.highest {
		p.highest = rev
	}
}

// done marks deploys of these revisions as finished.
func (p *progress) done(revs []int64) {
	p.mu.Lock()
	for _, r := range revs {
		if p.pending[r]--; p.pending[r] <= 0 {
			delete(p.pending, r)
		}
	}
	p.mu.Unlock()
	backoff.Wake(p.wake)
}

// watermark is the highest revision with nothing open at or below it.
func (p *progress) watermark() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	w := p.highest
	for r := range p.pending {
		if r-1 < w {
			w = r - 1
		}
	}
	if p.capped && p.confirmed < w {
		w = p.confirmed
	}
	return w
}

// run saves the watermark whenever it moves, coalescing bursts.
func (p *progress) run(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			// One last save with a fresh deadline, so a clean stop
			// records everything that finished.
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			_ = p.save(sctx)
			cancel()
			return nil
		case <-p.wake:
			sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			if err := p.save(sctx); err != nil && ctx.Err() == nil {
				p.log.Warn("saving progress failed", "err", err)
				// Try again soon; the wake-up is level-triggered.
				backoff.Wake(p.wake)
				backoff.Sleep(ctx, time.Second)
			}
			cancel()
		}
	}
}

func (p *progress) save(ctx context.Context) error {
	w := p.watermark()
	p.mu.Lock()
	if w <= p.saved {
		p.mu.Unlock()
		return nil
	}
	p.mu.Unlock()
	if _, err := p.kv.Put(ctx, p.key, strconv.FormatInt(w, 10)); err != nil {
		return fmt.Errorf("put %s: %w", p.key, err)
	}
	p.mu.Lock()
	if w > p.saved {
		p.saved = w
	}
	p.mu.Unlock()
	return nil
}
