package main

import (
	"context"
	"maps"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// TestDeployQueueCoalesces: a burst of events for one repository while a
// deploy runs gives exactly one follow-up deploy, with every tag.
func TestDeployQueueCoalesces(t *testing.T) {
	started := make(chan job)
	release := make(chan struct{})
	var mu sync.Mutex
	var doneRevs []int64
	q := newDeployQueue(4, time.Minute, func(ctx context.Context, j job) error {
		started <- j
		<-release
		return nil
	}, func(revs []int64) {
		mu.Lock()
		doneRevs = append(doneRevs, revs...)
		mu.Unlock()
	}, testLogger(t), newMetrics())
	q.quiet = 0
	q.submit(deployEvent{Repo: "r", Tags: []string{"t0"}, Rev: 1})
	first := <-started
	for i := range 100 {
		q.submit(deployEvent{Repo: "r", Tags: []string{"t" + string(rune('a'+i%3))}, Rev: int64(i + 2)})
	}
	release <- struct{}{}
	second := <-started
	release <- struct{}{}
	q.wait()
	if len(first.Revs) != 1 || len(second.Revs) != 100 {
		t.Errorf("deploys covered %d and %d events; want 1 then 100", len(first.Revs), len(second.Revs))
	}
	if tags := slices.Sorted(maps.Keys(second.Tags)); !slices.Equal(tags, []string{"ta", "tb", "tc"}) {
		t.Errorf("follow-up tags = %q; want the union ta tb tc", tags)
	}
	if len(doneRevs) != 101 {
		t.Errorf("%d revisions marked done; want 101", len(doneRevs))
	}
}

// TestDeployQueueSettles: events spread over a second (as a burst of
// webhooks is) give one deploy at once and one follow-up after the burst;
// an endless stream still deploys at least every maxWait.
func TestDeployQueueSettles(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var starts []time.Duration
		t0 := time.Now()
		q := newDeployQueue(1, 0, func(ctx context.Context, j job) error {
			starts = append(starts, time.Since(t0))
			time.Sleep(50 * time.Millisecond) // a pull
			return nil
		}, func([]int64) {}, testLogger(t), newMetrics())
		for i := range 50 {
			q.submit(deployEvent{Repo: "r", Tags: []string{"qa"}, Rev: int64(i + 1)})
			time.Sleep(20 * time.Millisecond)
		}
		q.wait()
		// Last event at 980ms; the follow-up waits 500ms of quiet.
		if want := []time.Duration{0, 1480 * time.Millisecond}; !slices.Equal(starts, want) {
			t.Errorf("burst over 1s: deploys started at %v; want %v", starts, want)
		}

		starts = nil
		t0 = time.Now()
		for i := range 1000 { // 20s of events every 20ms
			q.submit(deployEvent{Repo: "r", Rev: int64(i + 1)})
			time.Sleep(20 * time.Millisecond)
		}
		q.wait()
		for i := 1; i < len(starts); i++ {
			if gap := starts[i] - starts[i-1]; gap > q.maxWait+100*time.Millisecond {
				t.Errorf("endless stream: %v between deploys; want at most maxWait %v plus the deploy", gap, q.maxWait)
			}
		}
		if len(starts) < 4 || len(starts) > 6 {
			t.Errorf("endless stream of 20s: %d deploys; want about one per maxWait", len(starts))
		}
	})
}

// TestDeployQueueBoundsConcurrency: with n slots, at most n repositories
// deploy at once, and all of them run.
func TestDeployQueueBoundsConcurrency(t *testing.T) {
	const slots, repos = 2, 6
	var mu sync.Mutex
	running, peak := 0, 0
	ran := map[string]bool{}
	gate := make(chan struct{})
	entered := make(chan struct{}, repos)
	q := newDeployQueue(slots, time.Minute, func(ctx context.Context, j job) error {
		mu.Lock()
		running++
		peak = max(peak, running)
		ran[j.Repo] = true
		mu.Unlock()
		entered <- struct{}{}
		<-gate
		mu.Lock()
		running--
		mu.Unlock()
		return nil
	}, func([]int64) {}, testLogger(t), newMetrics())
	for i := range repos {
		q.submit(deployEvent{Repo: string(rune('a' + i))})
	}
	for range repos {
		<-entered
		gate <- struct{}{}
	}
	q.wait()
	if peak > slots || len(ran) != repos {
		t.Errorf("peak %d concurrent deploys, %d repositories ran; want at most %d and all %d", peak, len(ran), slots, repos)
	}
}

func TestDeployQueueCancelLeavesRevisionsOpen(t *testing.T) {
	var done []int64
	block, busy := make(chan struct{}), make(chan struct{})
	q := newDeployQueue(1, 0, func(ctx context.Context, j job) error {
		if j.Repo == "busy" {
			close(busy)
			<-block
		}
		return nil
	}, func(r []int64) { done = append(done, r...) }, testLogger(t), newMetrics())
	ctx, cancel := context.WithCancel(t.Context())
	stopped := make(chan error)
	go func() { stopped <- q.run(ctx) }()
	q.submit(deployEvent{Repo: "busy", Rev: 1})
	<-busy // holds the only deploy slot
	q.submit(deployEvent{Repo: "waiting", Rev: 2})
	cancel()
	<-q.work.Done() // no grace: the stop cancels the deploys at once
	close(block)
	if err := <-stopped; err != nil {
		t.Errorf("run = %v; want nil", err)
	}
	q.wait()
	if slices.Contains(done, 2) {
		t.Errorf("revision of a deploy that never ran was marked done: %v", done)
	}
	if slices.Contains(done, 1) {
		t.Errorf("revision of a deploy cut short by the stop was marked done: %v", done)
	}
}

// TestDeployQueueStopGrace: at the stop, a deploy in flight gets the
// grace period to finish (its trigger is done), one still running after it
// is cancelled (its trigger stays open), and a wait for a retry ends at
// once (its trigger stays open). An event that comes once the stop began
// (the watcher's last) never deploys: its trigger stays open for the next
// start.
func TestDeployQueueStopGrace(t *testing.T) {
	for _, tt := range []struct {
		name      string
		deploy    func(ctx context.Context) error // the first attempt; later ones succeed
		wantStop  time.Duration                   // from the stop until run returns
		wantDone  bool
		wantCtxOK bool // the deploy's context was not cancelled
	}{
		{"finishes within the grace", func(ctx context.Context) error { time.Sleep(2 * time.Second); return ctx.Err() }, 2 * time.Second, true, true},
		{"cancelled after the grace", func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }, 5 * time.Second, false, false},
		{"waiting for a retry", func(ctx context.Context) error { return errRegistry503 }, 0, false, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				var done []int64
				var ctxErr error
				attempts := 0
				q := newDeployQueue(1, 5*time.Second, func(ctx context.Context, j job) error {
					attempts++
					if attempts > 1 {
						return nil
					}
					err := tt.deploy(ctx)
					ctxErr = ctx.Err()
					return err
				}, func(r []int64) { done = append(done, r...) }, testLogger(t), newMetrics())
				q.retry = retryPolicy{min: time.Hour, max: time.Hour}
				ctx, stop := context.WithCancel(t.Context())
				stopped := make(chan error)
				go func() { stopped <- q.run(ctx) }()
				q.submit(deployEvent{Repo: "r", Rev: 7})
				synctest.Wait() // the deploy runs (or waits for its retry)
				start := time.Now()
				stop()
				synctest.Wait() // the stop began
				q.submit(deployEvent{Repo: "late", Rev: 8})
				if err := <-stopped; err != nil {
					t.Errorf("run = %v", err)
				}
				if took := time.Since(start); took != tt.wantStop {
					t.Errorf("run returned %v after the stop; want %v", took, tt.wantStop)
				}
				if got := slices.Contains(done, 7); got != tt.wantDone {
					t.Errorf("trigger done = %v; want %v", got, tt.wantDone)
				}
				q.wait()
				if slices.Contains(done, 8) {
					t.Errorf("trigger of an event submitted after the stop began was marked done: %v", done)
				}
				if (ctxErr == nil) != tt.wantCtxOK {
					t.Errorf("deploy context error = %v; want cancelled %v", ctxErr, !tt.wantCtxOK)
				}
				if attempts != 1 {
					t.Errorf("%d attempts; want 1: nothing runs after the stop", attempts)
				}
			})
		})
	}
}

func TestJobMerge(t *testing.T) {
	tests := []struct {
		name     string
		events   []deployEvent
		wantAll  bool
		wantTags []string
		wantRevs []int64
	}{
		{"tags unite", []deployEvent{{Tags: []string{"qa"}, Rev: 1}, {Tags: []string{"prod"}, Rev: 2}, {Tags: []string{"qa"}, Rev: 3}}, false, []string{"prod", "qa"}, []int64{1, 2, 3}},
		{"all wins", []deployEvent{{Tags: []string{"qa"}, Rev: 1}, {Rev: 2}, {Tags: []string{"x"}, Rev: 3}}, true, nil, []int64{1, 2, 3}},
		{"local events have no revision", []deployEvent{{Tags: []string{"qa"}}}, false, []string{"qa"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var j job
			for _, ev := range tt.events {
				j.merge(ev)
			}
			tags := slices.Sorted(maps.Keys(j.Tags))
			if j.All != tt.wantAll || !slices.Equal(tags, tt.wantTags) || !slices.Equal(j.Revs, tt.wantRevs) {
				t.Errorf("merged = all %v tags %q revs %v; want all %v tags %q revs %v", j.All, tags, j.Revs, tt.wantAll, tt.wantTags, tt.wantRevs)
			}
		})
	}
}
