package main

// queue.go: the deploy queue. Events (deployEvent, from the watcher and
// the periodic re-pull) become jobs, one per repository; the coalescing
// queue runs at most a fixed number of deploys at once, merges the events
// that come while a repository's deploy waits or runs into one follow-up,
// and schedules the retry of a job that failed with a retryable error.

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/distribution/reference"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/die-net/deployer/internal/backoff"
)

// deployEvent asks for a deploy of one repository.
type deployEvent struct {
	Repo    reference.Named   // resolved once, by daemon.submit
	Tags    []string          // nil: every local tag
	Digests map[string]string // tag -> manifest digest pushed, when known
	Rev     int64             // etcd revision of the trigger; 0 for local (periodic) events
}

// job is one deploy of one repository: the union of the events that came
// in for it while it waited.
type job struct {
	Repo reference.Named
	All  bool                // every local tag
	Tags map[string]struct{} // the tags named by events, when !All
	// Digests: tag -> manifest digest pushed, as the latest trigger of
	// the tag said; "" when it said none (pushed again, digest unknown).
	// Only triggers change it, never a local (re-pull) event.
	Digests map[string]string
	// PushedAll: a trigger for every tag came, so no digest of an older
	// job applies (absorb).
	PushedAll bool
	Revs      []int64   // trigger revisions this job completes
	Seen      time.Time // when its first event came

	// Set once an attempt has failed with a retryable error.
	Attempts    int       // failed attempts so far
	Tries       int       // failed attempts since the latest trigger: the backoff's exponent
	FirstFail   time.Time // when the first attempt failed
	LastErr     error     // what the last attempt failed with
	DigestSince time.Time // when a pushed digest was first found missing since the latest trigger
	Told        bool      // a failure was announced (Slack): its recovery will be
}

// merge adds an event to the job. A trigger (an event with a revision:
// a newer push) decides the digests of the tags it names and restarts
// the wait for a pushed digest and the backoff; a local event (the
// periodic re-pull) only adds its tags.
func (j *job) merge(ev deployEvent) {
	if j.Seen.IsZero() {
		j.Seen = time.Now()
	}
	if ev.Rev != 0 {
		j.Revs = append(j.Revs, ev.Rev)
		j.pushed(ev)
	}
	if ev.Tags == nil {
		j.All, j.Tags = true, nil
		return
	}
	if j.All {
		return
	}
	if j.Tags == nil {
		j.Tags = map[string]struct{}{}
	}
	for _, t := range ev.Tags {
		j.Tags[t] = struct{}{}
	}
}

// pushed records a trigger's digests: a later push of a tag wins, a tag
// pushed without a digest has none known any more. A newer push restarts
// the wait for its digest and the backoff: the registry serves a new
// manifest, whatever it did with the previous one.
func (j *job) pushed(ev deployEvent) {
	j.DigestSince, j.Tries = time.Time{}, 0
	if ev.Tags == nil {
		j.Digests, j.PushedAll = nil, true
	}
	for t, d := range ev.Digests {
		if j.Digests == nil {
			j.Digests = map[string]string{}
		}
		j.Digests[t] = d
	}
	for _, t := range ev.Tags {
		if _, ok := ev.Digests[t]; !ok {
			if j.Digests == nil {
				j.Digests = map[string]string{}
			}
			j.Digests[t] = "" // pushed again, digest unknown
		}
	}
}

// absorb merges a failed job into the newer one that waits behind it: the
// newer triggers win where they say something (digests), the failed
// job's tags, revisions and retry state carry over; a newer trigger
// restarts the digest wait and the backoff (pushed).
func (j *job) absorb(failed job) {
	if !failed.Seen.IsZero() && (j.Seen.IsZero() || failed.Seen.Before(j.Seen)) {
		j.Seen = failed.Seen
	}
	j.Revs = append(slices.Clone(failed.Revs), j.Revs...)
	if failed.All {
		j.All, j.Tags = true, nil
	} else if !j.All {
		if j.Tags == nil {
			j.Tags = map[string]struct{}{}
		}
		for t := range failed.Tags {
			j.Tags[t] = struct{}{}
		}
	}
	newPush := len(j.Revs) > len(failed.Revs) // the newer job's own revisions come after the failed job's
	for t, d := range failed.Digests {
		if _, newer := j.Digests[t]; newer || j.PushedAll {
			continue // pushed again: the newer trigger decides
		}
		if j.Digests == nil {
			j.Digests = map[string]string{}
		}
		j.Digests[t] = d
	}
	j.Attempts, j.FirstFail, j.LastErr, j.Told = failed.Attempts, failed.FirstFail, failed.LastErr, failed.Told
	if !newPush {
		j.DigestSince, j.Tries = failed.DigestSince, failed.Tries
	}
}

// deployQueue runs at most a fixed number of deploys at once, and
// coalesces events per repository: while a deploy of a repository waits or
// runs, further events for it merge into a single follow-up deploy. The
// first event of a quiet repository deploys at once; a follow-up waits
// until events have stopped for `quiet` (at most `maxWait`), so a burst of
// webhooks costs two deploys, whatever its length, and none is lost.
//
// A deploy that fails with a retryable error (retry.go) keeps its trigger
// revisions open and runs again after the retry policy's delay, or as soon
// as a new event for the repository comes (it merges in). Every other
// outcome, success or final failure, marks its revisions done.
//
// Deploys run under the queue's own context, not the caller's: at the
// daemon's stop (run's ctx ends) they get a grace period to finish their
// stops before they are cancelled.
type deployQueue struct {
	deploy   func(context.Context, job) error
	done     func(revs []int64) // called after each deploy that is not retried
	queued   prometheus.Gauge   // repositories waiting or deploying
	retrying prometheus.Gauge   // repositories waiting for a retry
	retry    retryPolicy
	sem      chan struct{}
	quiet    time.Duration
	maxWait  time.Duration
	grace    time.Duration // for deploys in flight at the stop
	cutWait  time.Duration // for deploys cancelled after grace to return
	log      *slog.Logger

	work       context.Context // every deploy's; ends at the stop, after grace
	cancelWork context.CancelFunc

	mu       sync.Mutex
	closing  bool // the stop began: no new worker starts
	repos    map[string]*repoState
	wg       sync.WaitGroup
	stopping chan struct{} // closed by stopRetries
	stopOnce sync.Once
}

type repoState struct {
	next      *job          // waiting work; nil when none
	lastEvent time.Time     // when the latest event merged into next came
	kick      chan struct{} // capacity 1: an event came during a retry wait
	retryAt   time.Time     // when the failed job runs again; zero when none waits
}

const (
	followUpQuiet   = 500 * time.Millisecond
	followUpMaxWait = 5 * time.Second
	// cutWait bounds the queue's last wait at the stop: deploys still
	// running after the grace are cancelled, and get this long to return.
	cutWait = time.Second
)

// newDeployQueue returns a queue that runs at most n deploys at once, and
// calls done with the trigger revisions of every deploy that is not
// retried. Deploys in flight when run's ctx ends get grace to finish. It
// starts nothing: a submitted event starts its repository's worker.
func newDeployQueue(n int, grace time.Duration, deploy func(context.Context, job) error, done func([]int64), log *slog.Logger, m *metrics) *deployQueue {
	work, cancel := context.WithCancel(context.Background())
	return &deployQueue{
		deploy: deploy, done: done, sem: make(chan struct{}, n), repos: map[string]*repoState{}, queued: m.queued,
		retrying: m.retrying, retry: retryPolicy{min: retryMin, max: retryMax}, stopping: make(chan struct{}),
		quiet: followUpQuiet, maxWait: followUpMaxWait, grace: grace, cutWait: cutWait, log: log, work: work, cancelWork: cancel,
	}
}

// run returns once ctx has ended and the queue has stopped: waits for a
// retry or a deploy slot end at once (no deploy starts once the stop
// began), deploys in flight get the grace period to finish and are
// cancelled after it; run waits cutWait more for them, no longer. Every trigger whose deploy did not finish stays
// open (cancelledAtShutdown), and so does every event submitted after the
// stop began: the next start replays them.
func (q *deployQueue) run(ctx context.Context) error {
	<-ctx.Done()
	q.mu.Lock()
	q.closing = true // no wg.Add after this: wait below is final
	q.mu.Unlock()
	q.stopRetries()
	drained := make(chan struct{})
	go func() { q.wg.Wait(); close(drained) }()
	grace := time.NewTimer(q.grace)
	defer grace.Stop()
	select {
	case <-drained:
	case <-grace.C:
		q.log.Warn("deploys still running at shutdown, cancelling them", "grace", q.grace)
		q.cancelWork()
		// Every Docker and etcd call of a deploy has a deadline and
		// honours the cancellation; a deploy that still does not return
		// must not hold the stop: the rest of the stop goes on.
		cut := time.NewTimer(q.cutWait)
		defer cut.Stop()
		select {
		case <-drained:
		case <-cut.C:
			q.log.Warn("deploys still running after their cancellation; stopping without them", "waited", q.cutWait)
		}
	}
	q.cancelWork()
	return nil
}

// submit queues an event. It never blocks. After the stop began, the
// event is left for the next start (its revision stays open).
func (q *deployQueue) submit(ev deployEvent) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closing {
		return
	}
	st, busy := q.repos[ev.Repo.Name()]
	if !busy {
		st = &repoState{kick: make(chan struct{}, 1)}
		q.repos[ev.Repo.Name()] = st
	}
	if st.next == nil {
		st.next = &job{Repo: ev.Repo}
	}
	st.next.merge(ev)
	st.lastEvent = time.Now()
	backoff.Wake(st.kick)
	if !busy {
		q.queued.Inc()
		q.wg.Add(1)
		go q.worker(q.work, ev.Repo.Name(), st)
	}
}

// pendingRetry is a repository whose deploy failed and waits to run again.
type pendingRetry struct {
	Repo      string    `json:"repo"`
	Tags      []string  `json:"tags,omitempty"` // empty: every local tag
	Revisions []int64   `json:"revisions,omitempty"`
	Attempts  int       `json:"attempts"`
	Since     time.Time `json:"since"` // first failure
	Next      time.Time `json:"next"`  // next attempt
	Error     string    `json:"error"`
}

// pending lists the repositories waiting for a retry.
func (q *deployQueue) pending() []pendingRetry {
	q.mu.Lock()
	defer q.mu.Unlock()
	var out []pendingRetry
	for _, st := range q.repos {
		if st.retryAt.IsZero() || st.next == nil {
			continue
		}
		j := st.next
		p := pendingRetry{Repo: j.Repo.Name(), Tags: slices.Sorted(maps.Keys(j.Tags)), Revisions: slices.Sorted(slices.Values(j.Revs)),
			Attempts: j.Attempts, Since: j.FirstFail.UTC(), Next: st.retryAt.UTC()}
		if j.LastErr != nil {
			p.Error = strings.ReplaceAll(j.LastErr.Error(), "\n", "; ")
		}
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b pendingRetry) int { return strings.Compare(a.Repo, b.Repo) })
	return out
}

// cancelledAtShutdown is the one rule for a deploy the daemon's stop cut
// short (its ctx ended): it is neither done nor told. Its trigger
// revisions stay open, so the watermark stays behind them and the next
// start replays them; nobody hears of a failure that was only the stop.
// The worker applies it to every wait and to the deploy's outcome, the
// deploy to its report.
func cancelledAtShutdown(ctx context.Context) bool { return ctx.Err() != nil }

// worker deploys one repository until no work for it is left.
func (q *deployQueue) worker(ctx context.Context, repo string, st *repoState) {
	defer q.wg.Done()
	defer q.queued.Dec()
	leave := func() {
		q.mu.Lock()
		delete(q.repos, repo)
		q.mu.Unlock()
	}
	for first, retry := true, false; ; first = false {
		switch {
		case retry:
			// At shutdown (cancelledAtShutdown, or stopRetries) the
			// revisions stay open.
			ok := q.waitRetry(ctx, st)
			if !ok {
				leave()
				return
			}
		case !first && !q.settle(ctx, st):
			leave()
			return
		}
		if !q.acquire(ctx) { // the stop began: the revisions stay open
			leave()
			return
		}
		q.mu.Lock()
		j := st.next
		st.next = nil
		q.mu.Unlock()

		err := q.deploy(ctx, *j)
		<-q.sem
		if cancelledAtShutdown(ctx) {
			leave()
			return
		}
		retry = err != nil && retryable(err)
		if !retry {
			q.done(j.Revs)
		}

		q.mu.Lock()
		if retry {
			if errors.Is(err, errDigestMismatch) && j.DigestSince.IsZero() {
				j.DigestSince = time.Now()
			}
			j.Attempts++
			j.Tries++
			j.Told = j.Told || !quietRetry(err)
			if j.FirstFail.IsZero() {
				j.FirstFail = time.Now()
			}
			j.LastErr = err
			if st.next != nil {
				// Newer events came: one deploy covers both, after
				// the usual settling.
				st.next.absorb(*j)
				retry = false
			} else {
				st.next = j
				st.retryAt = time.Now().Add(q.retry.delay(err, j.Tries))
				select { // a kick from events merged before the failure
				case <-st.kick:
				default:
				}
			}
			q.mu.Unlock()
			continue
		}
		if st.next == nil {
			delete(q.repos, repo)
			q.mu.Unlock()
			return
		}
		q.mu.Unlock()
	}
}

// acquire takes a deploy slot. It reports false, holding none, once the
// stop has begun: a deploy that has not started by then does not start
// (its revisions stay open for the next start), even if a slot frees
// during the grace given to the deploys in flight.
func (q *deployQueue) acquire(ctx context.Context) bool {
	select {
	case q.sem <- struct{}{}:
	case <-q.stopping:
		return false
	case <-ctx.Done(): // cancelledAtShutdown
		return false
	}
	select {
	case <-q.stopping: // both were ready: the stop wins
		<-q.sem
		return false
	default:
		return true
	}
}

// waitRetry waits until the failed job's retry time, or until a new event
// for the repository came (and then settled). It reports false if ctx
// ended first.
func (q *deployQueue) waitRetry(ctx context.Context, st *repoState) bool {
	q.retrying.Inc()
	defer q.retrying.Dec()
	defer func() {
		q.mu.Lock()
		st.retryAt = time.Time{}
		q.mu.Unlock()
	}()
	q.mu.Lock()
	wait := time.Until(st.retryAt)
	q.mu.Unlock()
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-q.stopping:
		return false
	case <-t.C:
		return true
	case <-st.kick:
		return q.settle(ctx, st)
	}
}

// stopRetries ends every wait for a retry, a follow-up's settling or a
// deploy slot at once (the daemon is stopping): their revisions stay
// open and the next start replays them. Deploys in flight are not
// affected.
func (q *deployQueue) stopRetries() {
	q.stopOnce.Do(func() { close(q.stopping) })
}

// settle waits, before a follow-up deploy, until no event has come for
// q.quiet, or q.maxWait has passed. It reports false if ctx ended or the
// stop began first.
func (q *deployQueue) settle(ctx context.Context, st *repoState) bool {
	deadline := time.Now().Add(q.maxWait)
	for {
		q.mu.Lock()
		wait := min(time.Until(st.lastEvent.Add(q.quiet)), time.Until(deadline))
		q.mu.Unlock()
		if wait <= 0 {
			return true
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return false
		case <-q.stopping:
			t.Stop()
			return false
		case <-t.C:
		}
	}
}

// wait blocks until every worker has returned.
func (q *deployQueue) wait() { q.wg.Wait() }
