package main

import (
	"context"
	"errors"
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
	q.submit(deployEvent{Repo: testName("r"), Tags: []string{"t0"}, Rev: 1})
	first := <-started
	for i := range 100 {
		q.submit(deployEvent{Repo: testName("r"), Tags: []string{"t" + string(rune('a'+i%3))}, Rev: int64(i + 2)})
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
			q.submit(deployEvent{Repo: testName("r"), Tags: []string{"qa"}, Rev: int64(i + 1)})
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
			q.submit(deployEvent{Repo: testName("r"), Rev: int64(i + 1)})
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
		ran[j.Repo.Name()] = true
		mu.Unlock()
		entered <- struct{}{}
		<-gate
		mu.Lock()
		running--
		mu.Unlock()
		return nil
	}, func([]int64) {}, testLogger(t), newMetrics())
	for i := range repos {
		q.submit(deployEvent{Repo: testName(string(rune('a' + i)))})
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
		if j.Repo.Name() == "busy" {
			close(busy)
			<-block
		}
		return nil
	}, func(r []int64) { done = append(done, r...) }, testLogger(t), newMetrics())
	ctx, cancel := context.WithCancel(t.Context())
	stopped := make(chan error)
	go func() { stopped <- q.run(ctx) }()
	q.submit(deployEvent{Repo: testName("busy"), Rev: 1})
	<-busy // holds the only deploy slot
	q.submit(deployEvent{Repo: testName("waiting"), Rev: 2})
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
				q.submit(deployEvent{Repo: testName("r"), Rev: 7})
				synctest.Wait() // the deploy runs (or waits for its retry)
				start := time.Now()
				stop()
				synctest.Wait() // the stop began
				q.submit(deployEvent{Repo: testName("late"), Rev: 8})
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

// TestNoDeployStartsAfterStop: a worker waiting for a deploy slot when
// the stop begins does not start its deploy when a slot frees during the
// grace; its trigger stays open.
func TestNoDeployStartsAfterStop(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		var started []string
		var done []int64
		q := newDeployQueue(1, time.Hour, func(ctx context.Context, j job) error {
			started = append(started, j.Repo.Name())
			if j.Repo.Name() == "a" {
				<-release
			}
			return nil
		}, func(revs []int64) { done = append(done, revs...) }, testLogger(t), newMetrics())
		ctx, stop := context.WithCancel(t.Context())
		stopped := make(chan error)
		go func() { stopped <- q.run(ctx) }()
		q.submit(deployEvent{Repo: testName("a"), Rev: 1})
		synctest.Wait() // a deploys, in the only slot
		q.submit(deployEvent{Repo: testName("b"), Rev: 2})
		synctest.Wait() // b waits for the slot
		stop()
		<-q.stopping // the stop began
		close(release)
		if err := <-stopped; err != nil {
			t.Errorf("run = %v", err)
		}
		if !slices.Equal(started, []string{"a"}) {
			t.Errorf("deploys started: %q; want only a: nothing starts once the stop began", started)
		}
		if !slices.Equal(done, []int64{1}) {
			t.Errorf("done revisions %v; want [1]: b's trigger stays open for the next start", done)
		}
	})
}

// TestQueueStopIsBounded: a deploy that does not return when cancelled
// (a call without a deadline) does not hold the stop: run returns
// cutWait after the grace.
func TestQueueStopIsBounded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hung := make(chan struct{})
		q := newDeployQueue(1, time.Minute, func(ctx context.Context, j job) error {
			<-hung // ignores ctx
			return nil
		}, func([]int64) {}, testLogger(t), newMetrics())
		ctx, stop := context.WithCancel(t.Context())
		stopped := make(chan error)
		go func() { stopped <- q.run(ctx) }()
		q.submit(deployEvent{Repo: testName("a"), Rev: 1})
		synctest.Wait()
		start := time.Now()
		stop()
		<-stopped
		if took := time.Since(start); took != time.Minute+cutWait {
			t.Errorf("run returned %v after the stop; want the grace plus %v", took, cutWait)
		}
		close(hung)
		q.wait()
	})
}

// TestJobMergeDigests: only a trigger changes a pushed digest; a local
// (re-pull) event naming the same tag keeps it. A newer trigger restarts
// the digest wait and the backoff.
func TestJobMergeDigests(t *testing.T) {
	since := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	failed := func() job {
		return job{Repo: testName("r"), Tags: map[string]struct{}{"qa": {}}, Digests: map[string]string{"qa": "sha256:1"}, Revs: []int64{1},
			Attempts: 3, Tries: 3, DigestSince: since}
	}
	tests := []struct {
		name        string
		events      []deployEvent
		absorb      bool // events form a newer job that absorbs the failed one; else they merge into it
		wantDigest  string
		wantTries   int
		wantWaiting bool // DigestSince kept
	}{
		{"re-pull naming the tag", []deployEvent{{Tags: []string{"qa"}}}, false, "sha256:1", 3, true},
		{"re-pull of every tag", []deployEvent{{}}, false, "sha256:1", 3, true},
		{"newer push with a digest", []deployEvent{{Tags: []string{"qa"}, Digests: map[string]string{"qa": "sha256:2"}, Rev: 2}}, false, "sha256:2", 0, false},
		{"newer push without a digest", []deployEvent{{Tags: []string{"qa"}, Rev: 2}}, false, "", 0, false},
		{"newer push of another tag", []deployEvent{{Tags: []string{"prod"}, Digests: map[string]string{"prod": "sha256:3"}, Rev: 2}}, false, "sha256:1", 0, false},
		{"newer push of every tag", []deployEvent{{Rev: 2}}, false, "", 0, false},
		{"absorbed by a re-pull", []deployEvent{{Tags: []string{"qa"}}}, true, "sha256:1", 3, true},
		{"absorbed by a re-pull of every tag", []deployEvent{{}}, true, "sha256:1", 3, true},
		{"absorbed by a newer push", []deployEvent{{Tags: []string{"qa"}, Digests: map[string]string{"qa": "sha256:2"}, Rev: 2}}, true, "sha256:2", 0, false},
		{"absorbed by a newer push without a digest", []deployEvent{{Tags: []string{"qa"}, Rev: 2}}, true, "", 0, false},
		{"absorbed by a newer push of every tag", []deployEvent{{Rev: 2}}, true, "", 0, false},
		{"absorbed by a newer push of another tag", []deployEvent{{Tags: []string{"prod"}, Rev: 2}}, true, "sha256:1", 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			j := failed()
			if tt.absorb {
				var newer job
				for _, ev := range tt.events {
					newer.merge(ev)
				}
				newer.absorb(j)
				j = newer
			} else {
				for _, ev := range tt.events {
					j.merge(ev)
				}
			}
			if got := j.Digests["qa"]; got != tt.wantDigest {
				t.Errorf("digest of qa = %q; want %q", got, tt.wantDigest)
			}
			if j.Tries != tt.wantTries || j.Attempts != 3 {
				t.Errorf("tries %d, attempts %d; want %d, 3", j.Tries, j.Attempts, tt.wantTries)
			}
			if waiting := !j.DigestSince.IsZero(); waiting != tt.wantWaiting {
				t.Errorf("digest wait kept = %v; want %v", waiting, tt.wantWaiting)
			}
			if !slices.Contains(j.Revs, 1) {
				t.Errorf("revisions %v lost the failed job's", j.Revs)
			}
		})
	}
}

// TestNewPushRestartsDigestWait: a push that comes while a job has waited
// more than digestWait for a previous push's digest gets its own wait and
// the first step of the backoff; it does not give up at once.
func TestNewPushRestartsDigestWait(t *testing.T) {
	const (
		old, newer = "sha256:aaaaaaaaaaaa1111", "sha256:bbbbbbbbbbbb2222"
		dOld       = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
		dNew       = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
		dNewer     = "sha256:3333333333333333333333333333333333333333333333333333333333333333"
	)
	synctest.Test(t, func(t *testing.T) {
		h := newRetryHarness(t)
		h.q.retry = retryPolicy{min: 5 * time.Minute, max: time.Hour} // first retry after 2.5-5 min, the second after 5-10
		h.f.local["reg:5000/app:qa"] = old
		h.f.remote["reg:5000/app:qa"] = newer
		h.reg.repoDigests[old] = []string{"reg:5000/app@" + dOld}
		h.reg.oldDigest["reg:5000/app:qa"] = dOld
		h.reg.digest["reg:5000/app:qa"] = dNew
		h.reg.stale["reg:5000/app:qa"] = 1000 // the first push's manifest is never served
		h.f.addContainer("app", "reg:5000/app:qa")
		h.submit(deployEvent{Repo: canon("reg:5000/app"), Tags: []string{"qa"}, Digests: map[string]string{"qa": dNew}, Rev: 10})
		if err := <-h.runs; !errors.Is(err, errDigestMismatch) {
			t.Fatalf("first attempt = %v; want %v", err, errDigestMismatch)
		}
		synctest.Wait()
		time.Sleep(digestWait + time.Second) // the fake clock: the retry is not due yet
		h.f.mu.Lock()
		h.reg.digest["reg:5000/app:qa"] = dNewer // pushed again; served after one more stale pull
		h.f.mu.Unlock()
		h.reg.rmu.Lock()
		h.reg.stale["reg:5000/app:qa"] = 1
		h.reg.rmu.Unlock()
		h.submit(deployEvent{Repo: canon("reg:5000/app"), Tags: []string{"qa"}, Digests: map[string]string{"qa": dNewer}, Rev: 11})
		err := <-h.runs
		if !errors.Is(err, errDigestMismatch) || errors.Is(err, errDigestGaveUp) {
			t.Fatalf("attempt after the newer push = %v; want %v, retried: the new push's digest has its own wait", err, errDigestMismatch)
		}
		synctest.Wait()
		p := h.q.pending()
		if len(p) != 1 || time.Until(p[0].Next) > 5*time.Minute {
			t.Fatalf("pending %+v; want one retry within 5 min: the newer push restarts the backoff", p)
		}
		if err := <-h.runs; err != nil {
			t.Fatalf("attempt once the newer digest is served = %v", err)
		}
		h.q.wait()
		if w := h.p.watermark(); w != 11 {
			t.Errorf("watermark = %d; want 11", w)
		}
		if n := len(running(h.f)); n != 0 {
			t.Errorf("app still on the old version")
		}
		for _, r := range h.n.reports {
			if r.failed() {
				t.Errorf("failure reported: %s", r.text())
			}
		}
	})
}

// TestRepullKeepsPushedDigest: the periodic re-pull of a tag whose pushed
// digest is not served yet does not erase the digest: the deploy goes on
// waiting for it instead of closing the trigger on the old manifest.
func TestRepullKeepsPushedDigest(t *testing.T) {
	const (
		old, newer = "sha256:aaaaaaaaaaaa1111", "sha256:bbbbbbbbbbbb2222"
		dOld       = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
		dNew       = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	)
	synctest.Test(t, func(t *testing.T) {
		h := newRetryHarness(t)
		h.q.retry = retryPolicy{min: time.Minute, max: time.Minute}
		h.f.local["reg:5000/app:qa"] = old
		h.f.remote["reg:5000/app:qa"] = newer
		h.reg.repoDigests[old] = []string{"reg:5000/app@" + dOld}
		h.reg.oldDigest["reg:5000/app:qa"] = dOld
		h.reg.digest["reg:5000/app:qa"] = dNew
		h.reg.stale["reg:5000/app:qa"] = 2 // the push's attempt and the re-pull's get the previous manifest
		h.f.addContainer("app", "reg:5000/app:qa")
		h.submit(deployEvent{Repo: canon("reg:5000/app"), Tags: []string{"qa"}, Digests: map[string]string{"qa": dNew}, Rev: 10})
		if err := <-h.runs; !errors.Is(err, errDigestMismatch) {
			t.Fatalf("first attempt = %v; want %v", err, errDigestMismatch)
		}
		synctest.Wait()
		h.q.submit(deployEvent{Repo: canon("reg:5000/app"), Tags: []string{"qa"}}) // the periodic re-pull
		if err := <-h.runs; !errors.Is(err, errDigestMismatch) {
			t.Fatalf("attempt after the re-pull = %v; want %v: the pushed digest is still awaited", err, errDigestMismatch)
		}
		h.q.wait()
		if n := len(running(h.f)); n != 0 {
			t.Errorf("app still on the old version: the trigger was closed on the previous manifest")
		}
		if w := h.p.watermark(); w != 10 {
			t.Errorf("watermark = %d; want 10", w)
		}
	})
}
