package main

// status.go: this node's status records. Every node keeps a record under
// _status/<node>, bound to its session lease (it goes when the node does),
// listing the containers it runs from tags, and, per tag, a down record
// under _rollout/<tag>/down/<node> (same lease) listing its containers of
// that tag that are down: the rollout counts those against
// -max_unavailable (rollout.go). statusReporter writes this node's;
// clusterview.go reads them all.

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	docker "github.com/fsouza/go-dockerclient"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/backoff"
	"github.com/die-net/deployer/internal/etcdc"
)

type containerStatus struct {
	Name    string    `json:"name"`
	Image   string    `json:"image"` // the tag it was started from
	ImageID string    `json:"image_id"`
	Since   time.Time `json:"since"`
	// Strategy is how a deploy replaces it: stop (its supervisor starts
	// the tag again), recreate or skip.
	Strategy string `json:"strategy,omitempty"`
	Ahead    string `json:"ahead,omitempty"` // runs a version that waits under a hold, and which (hold.go)
}

type nodeStatus struct {
	Node       string            `json:"node"`
	Version    string            `json:"version"`
	Labels     []string          `json:"labels,omitempty"` // -node_labels
	Started    time.Time         `json:"started"`
	Updated    time.Time         `json:"updated"`
	Containers []containerStatus `json:"containers"`
	// Retries are this node's deploys that failed with a retryable
	// error and wait to run again (their triggers stay open).
	Retries []pendingRetry `json:"retries,omitempty"`
	// LeftAlone are this node's containers the deploys pass over until
	// they change (leftalone.go): found unsupervised, or a re-create
	// refused twice alike.
	LeftAlone []leftAloneEntry `json:"left_alone,omitempty"`
}

// statusResync is how often the reporter lists the containers without
// being told that anything changed: a safety net against a missed event.
// Docker's event stream and the deploys' pokes do the real work, so that
// an idle node is not woken every few seconds.
const statusResync = 5 * time.Minute

// leaseSource is the node's session (etcdc.NodeLease) as the status reporter
// uses it: the record lives under the current lease.
type leaseSource interface {
	Current(ctx context.Context) (*etcdc.Session, error)
}

// statusPutter writes the node's records.
type statusPutter interface {
	// Put writes the status record.
	Put(ctx context.Context, key, val string, opts ...clientv3.OpOption) (*clientv3.PutResponse, error)
	// Txn writes and deletes the down records that changed, at once.
	Txn(ctx context.Context) clientv3.Txn
}

// downGrace is how long a container of a tag that was seen running and
// then no longer runs (exited, removed, renamed away) counts as down: long
// enough for its supervisor to run it again or a deploy to replace it,
// short enough that a container taken out of service on purpose stops
// holding back the rollouts of its tag. A container on a Docker daemon
// that does not answer counts as down for as long as it does not.
const downGrace = time.Minute

// Why a container counts as down (downContainer.Reason).
const (
	downRestarting  = "restarting"  // crash loop under a restart policy
	downPaused      = "paused"      // docker pause
	downUnhealthy   = "unhealthy"   // its healthcheck fails
	downStarting    = "starting"    // its healthcheck has not passed yet
	downNotRunning  = "not running" // seen running, then exited or gone
	downUnreachable = "unreachable" // Docker does not answer
)

// downRecord lists a node's containers of one tag that are down, as
// Kubernetes counts an unavailable pod: restarting, paused, unhealthy or
// not yet healthy, exited or gone (for downGrace), or on a Docker daemon
// that does not answer. It lives under downKey, bound to the node's
// session lease, so a dead node's record goes with its lease.
type downRecord struct {
	Node       string          `json:"node"`
	Containers []downContainer `json:"containers"`
}

type downContainer struct {
	Name   string    `json:"name"`
	Reason string    `json:"reason"`
	Since  time.Time `json:"since"`
}

// seenContainer is what the reporter remembers of a container name it has
// seen running from a tag.
type seenContainer struct {
	ref       string    // the tag
	down      string    // why it is down now ("" while up)
	downSince time.Time // since when
}

// listedDown says why a running container, as Docker lists it, is down,
// or "": Docker lists a crash loop as State "restarting", and the health
// in Status ("Up 3 minutes (unhealthy)", "(health: starting)").
func listedDown(c docker.APIContainers) string {
	switch {
	case c.State == "restarting":
		return downRestarting
	case c.State == "paused":
		return downPaused
	case strings.Contains(c.Status, "(unhealthy)"):
		return downUnhealthy
	case strings.Contains(c.Status, "(health: starting)"):
		return downStarting
	}
	return ""
}

// statusReporter writes this node's record after each deploy, when
// Docker reports that a container started, stopped, went or was renamed,
// when the record's lease was lost, and every period as a safety net.
type statusReporter struct {
	docker      containerAPI
	events      eventAPI // nil: no subscription, the period alone
	kv          statusPutter
	leases      leaseSource
	node        string
	version     string // the deployer's, in the record
	started     time.Time
	period      time.Duration // resync without events (statusResync)
	settle      time.Duration // coalesces a burst of events into one listing
	retryBase   time.Duration // first delay before subscribing or writing again
	downGrace   time.Duration // how long a container no longer running counts as down
	callTimeout time.Duration
	log         *slog.Logger
	wake        chan struct{}           // capacity 1
	retries     func() []pendingRetry   // may be nil
	leftAlone   func() []leftAloneEntry // may be nil; set by the daemon's wiring
	strategy    string                  // -restart_strategy, for the records' Strategy

	mu    sync.Mutex
	cache map[string]containerStatus // container ID -> status; a container's config never changes
	seen  map[string]*seenContainer  // container name -> what it ran and whether it is down

	lastDown  map[string]string // tag -> the down record written (run's goroutine only)
	lastLeft  []leftAloneEntry  // the left-alone containers written (run's goroutine only)
	downLease clientv3.LeaseID  // the lease lastDown was written under

	labels []string // -node_labels, in the record
	// ahead says why a container of ref on imageID runs a version it
	// should not run yet (hold.go); nil: never.
	ahead func(ref, imageID string) string
}

// newStatusReporter returns the reporter of node's record, written
// through kv (confined to -etcd_prefix) under leases' current lease, from
// the containers dc runs and the events it reports (events nil: the resync
// alone). retries lists the deploys waiting for a retry (nil: none); a
// send on pokes (capacity 1; nil: poke's alone) asks for the record to be
// written again. It starts nothing.
func newStatusReporter(dc containerAPI, events eventAPI, kv statusPutter, leases leaseSource, node, version string, retries func() []pendingRetry, pokes chan struct{}, log *slog.Logger) *statusReporter {
	if pokes == nil {
		pokes = make(chan struct{}, 1)
	}
	return &statusReporter{
		docker: dc, events: events, kv: kv, leases: leases, node: node, version: version, retries: retries, started: time.Now().UTC(),
		period: statusResync, settle: 250 * time.Millisecond, retryBase: time.Second, downGrace: downGrace, callTimeout: callTimeout, log: log,
		wake: pokes, cache: map[string]containerStatus{}, seen: map[string]*seenContainer{},
	}
}

// poke asks for the record to be written again (a deploy finished). It
// never blocks.
func (s *statusReporter) poke() { backoff.Wake(s.wake) }

// statusEvent reports whether a Docker event can change the list of
// running containers or whether one is down: health checks' execs and the
// like do not (Docker reports a health status only when it changes).
func statusEvent(ev *docker.APIEvents) bool {
	if ev == nil || (ev.Type != "" && ev.Type != "container") {
		return false
	}
	switch a := cmp.Or(ev.Action, ev.Status); a {
	case "start", "die", "destroy", "rename", "pause", "unpause":
		return true
	default:
		return strings.HasPrefix(a, "health_status")
	}
}

func (s *statusReporter) run(ctx context.Context) error {
	settle, retryBase := s.settle, s.retryBase
	resync := time.NewTimer(s.period)
	defer resync.Stop()
	var (
		last        []containerStatus
		lastRetries []pendingRetry
		lastLease   clientv3.LeaseID
		leaseGone   <-chan struct{} // closed when the record's lease is lost
		events      chan *docker.APIEvents
		subscribed  time.Time        // when events was subscribed
		resub       <-chan time.Time // when to subscribe again
		subFails    int
		settled     <-chan time.Time // a burst of events has settled
		retry       <-chan time.Time // a failed pass is retried
		expire      <-chan time.Time // a container stops counting as down (downGrace)
		fails       int
	)
	defer func() {
		if events != nil {
			_ = s.events.RemoveEventListener(events)
		}
	}()
	subscribe := func() {
		if s.events == nil || events != nil || resub != nil {
			return
		}
		ch := make(chan *docker.APIEvents, 64)
		opts := docker.EventsOptions{Filters: map[string][]string{"type": {"container"}}}
		if err := s.events.AddEventListenerWithOptions(opts, ch); err != nil {
			subFails++
			s.log.Debug("docker events unavailable, retrying", "err", err, "attempt", subFails)
			resub = time.After(backoff.Delay(retryBase, subFails))
			return
		}
		events, subscribed = ch, time.Now()
	}
	subscribe()
	pass := true
	for {
		if pass {
			pass, settled, retry = false, nil, nil
			cs, err := s.containers(ctx)
			if err != nil {
				s.unreachable(time.Now())
			}
			derr := s.writeDown(ctx)
			if err == nil {
				var rs []pendingRetry
				if s.retries != nil {
					rs = s.retries()
				}
				var lease clientv3.LeaseID
				lease, err = s.write(ctx, cs, last, rs, lastRetries, lastLease)
				if err == nil {
					last, lastRetries, lastLease = cs, rs, lease
					if sess, serr := s.leases.Current(ctx); serr == nil && sess.Lease() == lease {
						leaseGone = sess.Done()
					}
				}
			}
			err = cmp.Or(err, derr)
			expire = nil
			if d, ok := s.nextExpiry(time.Now()); ok {
				expire = time.After(d)
			}
			if err != nil && ctx.Err() == nil {
				fails++
				s.log.Warn("status record not written", "err", err, "attempt", fails)
				retry = time.After(backoff.Delay(retryBase, fails))
			} else {
				fails = 0
			}
			resync.Reset(s.period)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-resync.C:
			pass = true
		case <-s.wake:
			pass = true
		case <-retry:
			pass = true
		case <-leaseGone:
			leaseGone, pass = nil, true // write it again under the new lease
		case <-settled:
			pass = true
		case <-expire:
			expire, pass = nil, true
		case ev, ok := <-events:
			if !ok {
				// The stream ended (dockerd restarted or went away): the
				// client closed our channel. A stream that had worked
				// (not one refused at once while dockerd is away) is
				// listed now: if Docker does not answer, its containers
				// are down, and the down records say so at once.
				// Subscribe again after a backoff, and list then: events
				// were missed meanwhile.
				events = nil
				subFails++
				s.log.Debug("docker event stream ended, subscribing again", "attempt", subFails)
				resub = time.After(backoff.Delay(retryBase, subFails))
				pass = time.Since(subscribed) >= retryBase
				continue
			}
			subFails = 0
			if statusEvent(ev) && settled == nil {
				settled = time.After(settle)
			}
		case <-resub:
			resub = nil
			subscribe()
			pass = events != nil
		}
	}
}

// write puts the record when the containers, the retries or the lease
// changed. Every etcd call, the session's lease grant included, ends with
// ctx: a stop never waits for an unreachable etcd.
func (s *statusReporter) write(ctx context.Context, cs, last []containerStatus, rs, lastRs []pendingRetry, lastLease clientv3.LeaseID) (clientv3.LeaseID, error) {
	sess, err := s.leases.Current(ctx)
	if err != nil {
		return lastLease, err
	}
	var left []leftAloneEntry
	if s.leftAlone != nil {
		left = s.leftAlone()
	}
	if sess.Lease() == lastLease && slices.Equal(cs, last) && slices.EqualFunc(rs, lastRs, samePending) && slices.Equal(left, s.lastLeft) {
		return lastLease, nil
	}
	b, _ := json.Marshal(nodeStatus{Node: s.node, Version: s.version, Labels: s.labels, Started: s.started, Updated: time.Now().UTC(), Containers: cs, Retries: rs, LeftAlone: left})
	ctx, cancel := context.WithTimeout(ctx, s.callTimeout)
	defer cancel()
	if _, err := s.kv.Put(ctx, statusKey(s.node), string(b), clientv3.WithLease(sess.Lease())); err != nil {
		return lastLease, err
	}
	s.lastLeft = left
	return sess.Lease(), nil
}

// containers lists the running containers started from a tag.
func (s *statusReporter) containers(ctx context.Context) ([]containerStatus, error) {
	lctx, cancel := context.WithTimeout(ctx, s.callTimeout)
	list, err := s.docker.ListContainers(docker.ListContainersOptions{Context: lctx})
	cancel()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	seen := map[string]bool{}
	running := map[string]bool{} // names running from a tag
	var out []containerStatus
	uncached := func(c docker.APIContainers) bool { _, ok := s.cache[c.ID]; return !ok }
	for t, err := range runningFromTags(ctx, s.docker, s.callTimeout, list, uncached) {
		if err != nil {
			continue
		}
		st := containerStatus{Name: strings.TrimPrefix(t.ctr.Name, "/"), ImageID: t.ctr.Image, Since: t.ctr.State.StartedAt.UTC(),
			Strategy: containerStrategy(t.ctr.Config.Labels, cmp.Or(s.strategy, strategyStop))}
		if t.ref != nil {
			st.Image = t.ref.String()
		}
		s.cache[t.listed.ID] = st
	}
	for _, c := range list {
		seen[c.ID] = true
		if st := s.cache[c.ID]; st.Image != "" {
			out = append(out, st)
			if name, ok := listedName(c); ok {
				running[name] = true
				s.observe(name, st.Image, listedDown(c), now)
			}
		}
	}
	for name, sc := range s.seen {
		if !running[name] {
			s.observe(name, sc.ref, downNotRunning, now)
		}
	}
	maps.DeleteFunc(s.cache, func(id string, _ containerStatus) bool { return !seen[id] })
	for i := range out {
		if s.ahead != nil {
			out[i].Ahead = s.ahead(out[i].Image, out[i].ImageID)
		}
	}
	slices.SortFunc(out, func(a, b containerStatus) int {
		return cmp.Or(cmp.Compare(a.Image, b.Image), cmp.Compare(a.Name, b.Name))
	})
	return out, nil
}

// listedName is a listed container's name now (a rename leaves the
// cached one behind); false for a container parked by a re-create, which
// is the old version on its way out, never the service.
func listedName(c docker.APIContainers) (string, bool) {
	for _, n := range c.Names {
		n = strings.TrimPrefix(n, "/")
		if n == "" || strings.Contains(n, "/") { // a legacy link alias
			continue
		}
		if _, parked := parkedBase(n, c.ID); parked {
			return "", false
		}
		return n, true
	}
	return "", false
}

// observe records what a listing showed of container name of tag ref;
// s.mu is held. A container not running for downGrace is forgotten.
func (s *statusReporter) observe(name, ref, down string, now time.Time) {
	sc := s.seen[name]
	if sc == nil {
		sc = &seenContainer{}
		s.seen[name] = sc
	}
	if sc.ref != ref || sc.down != down {
		sc.ref, sc.down, sc.downSince = ref, down, now
	}
	if down == downNotRunning && now.Sub(sc.downSince) >= s.downGrace {
		delete(s.seen, name)
	}
}

// unreachable marks every container seen running as down: Docker does
// not answer, so nothing says they serve.
func (s *statusReporter) unreachable(now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sc := range s.seen {
		if sc.down != downUnreachable {
			sc.down, sc.downSince = downUnreachable, now
		}
	}
}

// nextExpiry says when the next container stops counting as down.
func (s *statusReporter) nextExpiry(now time.Time) (time.Duration, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var next time.Duration
	found := false
	for _, sc := range s.seen {
		if sc.down == downNotRunning {
			d := max(sc.downSince.Add(s.downGrace).Sub(now), 0)
			if !found || d < next {
				next, found = d, true
			}
		}
	}
	return next, found
}

// downRecords returns the down record of each tag with a container down
// here, encoded.
func (s *statusReporter) downRecords() map[string]string {
	s.mu.Lock()
	byRef := map[string]*downRecord{}
	for name, sc := range s.seen {
		if sc.down == "" {
			continue
		}
		r := byRef[sc.ref]
		if r == nil {
			r = &downRecord{Node: s.node}
			byRef[sc.ref] = r
		}
		r.Containers = append(r.Containers, downContainer{Name: name, Reason: sc.down, Since: sc.downSince.UTC()})
	}
	s.mu.Unlock()
	out := map[string]string{}
	for ref, r := range byRef {
		slices.SortFunc(r.Containers, func(a, b downContainer) int { return cmp.Compare(a.Name, b.Name) })
		b, _ := json.Marshal(r)
		out[ref] = string(b)
	}
	return out
}

// writeDown writes the down records that changed since the last write
// and deletes those of tags with nothing down any more, in transactions
// under the node's current lease (all of them again when the lease
// changed).
func (s *statusReporter) writeDown(ctx context.Context) error {
	recs := s.downRecords()
	sess, err := s.leases.Current(ctx)
	if err != nil {
		return err
	}
	lease := sess.Lease()
	var ops []clientv3.Op
	for _, ref := range slices.Sorted(maps.Keys(recs)) {
		if lease != s.downLease || s.lastDown[ref] != recs[ref] {
			ops = append(ops, clientv3.OpPut(downKey(ref, s.node), recs[ref], clientv3.WithLease(lease)))
		}
	}
	for _, ref := range slices.Sorted(maps.Keys(s.lastDown)) {
		if _, ok := recs[ref]; !ok {
			ops = append(ops, clientv3.OpDelete(downKey(ref, s.node)))
		}
	}
	const perTxn = 64 // etcd refuses a transaction of more than 128 operations by default
	for len(ops) > 0 {
		n := min(len(ops), perTxn)
		tctx, cancel := context.WithTimeout(ctx, s.callTimeout)
		_, err := s.kv.Txn(tctx).Then(ops[:n]...).Commit()
		cancel()
		if err != nil {
			// Some may have been written: write them all again, and
			// delete those no longer down.
			if s.lastDown == nil {
				s.lastDown = map[string]string{}
			}
			for ref := range recs {
				s.lastDown[ref] = ""
			}
			s.downLease = 0
			return fmt.Errorf("write the down records: %w", err)
		}
		ops = ops[n:]
	}
	s.lastDown, s.downLease = recs, lease
	return nil
}

func samePending(a, b pendingRetry) bool {
	return a.Repo == b.Repo && a.Attempts == b.Attempts && a.Next.Equal(b.Next) && a.Error == b.Error &&
		slices.Equal(a.Tags, b.Tags) && slices.Equal(a.Revisions, b.Revisions)
}
