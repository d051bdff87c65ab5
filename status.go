package main

// status.go: the cluster status. Every node keeps a record under
// _status/<node>, bound to its session lease (it goes when the node does),
// listing the containers it runs from tags, and, per tag, a down record
// under _rollout/<tag>/down/<node> (same lease) listing its containers of
// that tag that are down: the rollout counts those against
// -max_unavailable (rollout.go). statusReporter writes this node's. GET
// /api/status and `deployer status` gather the records and the rollout
// state into one view per tag, and /metrics exports the version skew from
// it.

import (
	"cmp"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	docker "github.com/fsouza/go-dockerclient"
	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
)

type containerStatus struct {
	Name    string    `json:"name"`
	Image   string    `json:"image"` // the tag it was started from
	ImageID string    `json:"image_id"`
	Since   time.Time `json:"since"`
}

type nodeStatus struct {
	Node       string            `json:"node"`
	Version    string            `json:"version"`
	Started    time.Time         `json:"started"`
	Updated    time.Time         `json:"updated"`
	Containers []containerStatus `json:"containers"`
	// Retries are this node's deploys that failed with a retryable
	// error and wait to run again (their triggers stay open).
	Retries []pendingRetry `json:"retries,omitempty"`
}

// statusResync is how often the reporter lists the containers without
// being told that anything changed: a safety net against a missed event.
// Docker's event stream and the deploys' pokes do the real work, so that
// an idle node is not woken every few seconds.
const statusResync = 5 * time.Minute

// eventAPI is the part of the Docker client the status reporter's event
// subscription uses (dockerEvents in production, see eventstream.go).
type eventAPI interface {
	// AddEventListenerWithOptions subscribes to the daemon's events; the
	// channel is closed when the event stream ends.
	AddEventListenerWithOptions(opts docker.EventsOptions, listener chan<- *docker.APIEvents) error
	// RemoveEventListener ends a subscription.
	RemoveEventListener(listener chan *docker.APIEvents) error
}

// leaseSource is the node's session (nodeLease) as the status reporter
// uses it: the record lives under the current lease.
type leaseSource interface {
	current(ctx context.Context) (*session, error)
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
	started     time.Time
	period      time.Duration // resync without events (statusResync)
	settle      time.Duration // coalesces a burst of events into one listing
	retryBase   time.Duration // first delay before subscribing or writing again
	downGrace   time.Duration // how long a container no longer running counts as down
	callTimeout time.Duration
	log         *slog.Logger
	wake        chan struct{}         // capacity 1
	retries     func() []pendingRetry // may be nil

	mu    sync.Mutex
	cache map[string]containerStatus // container ID -> status; a container's config never changes
	seen  map[string]*seenContainer  // container name -> what it ran and whether it is down

	lastDown  map[string]string // tag -> the down record written (run's goroutine only)
	downLease clientv3.LeaseID  // the lease lastDown was written under
}

// newStatusReporter returns the reporter of node's record, written
// through kv (confined to -etcd_prefix) under leases' current lease, from
// the containers dc runs and the events it reports (events nil: the resync
// alone). retries lists the deploys waiting for a retry (nil: none). It
// starts nothing.
func newStatusReporter(dc containerAPI, events eventAPI, kv statusPutter, leases leaseSource, node string, retries func() []pendingRetry, log *slog.Logger) *statusReporter {
	return &statusReporter{
		docker: dc, events: events, kv: kv, leases: leases, node: node, retries: retries, started: time.Now().UTC(),
		period: statusResync, settle: 250 * time.Millisecond, retryBase: time.Second, downGrace: downGrace, callTimeout: callTimeout, log: log,
		wake: make(chan struct{}, 1), cache: map[string]containerStatus{}, seen: map[string]*seenContainer{},
	}
}

// poke asks for the record to be written again (a deploy finished). It
// never blocks.
func (s *statusReporter) poke() { wake(s.wake) }

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
			resub = time.After(backoff(retryBase, subFails))
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
					if sess, serr := s.leases.current(ctx); serr == nil && sess.Lease() == lease {
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
				retry = time.After(backoff(retryBase, fails))
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
				resub = time.After(backoff(retryBase, subFails))
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
	sess, err := s.leases.current(ctx)
	if err != nil {
		return lastLease, err
	}
	if sess.Lease() == lastLease && slices.Equal(cs, last) && slices.EqualFunc(rs, lastRs, samePending) {
		return lastLease, nil
	}
	b, _ := json.Marshal(nodeStatus{Node: s.node, Version: version, Started: s.started, Updated: time.Now().UTC(), Containers: cs, Retries: rs})
	ctx, cancel := context.WithTimeout(ctx, s.callTimeout)
	defer cancel()
	if _, err := s.kv.Put(ctx, statusKey(s.node), string(b), clientv3.WithLease(sess.Lease())); err != nil {
		return lastLease, err
	}
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
		st := containerStatus{Name: strings.TrimPrefix(t.ctr.Name, "/"), ImageID: t.ctr.Image, Since: t.ctr.State.StartedAt.UTC()}
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
	sess, err := s.leases.current(ctx)
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

// clusterStatus is the view GET /api/status returns.
type clusterStatus struct {
	Time  time.Time    `json:"time"`
	Nodes []nodeStatus `json:"nodes"`
	Tags  []tagStatus  `json:"tags"`
}

type tagStatus struct {
	Image    string        `json:"image"`
	Versions []versionInfo `json:"versions"` // newest first
	Rolling  []string      `json:"rolling,omitempty"`
	Halted   *halt         `json:"halted,omitempty"`
	// Down lists the containers of the tag that are down, as
	// "<node> <container> (<reason>)": they count against
	// -max_unavailable.
	Down []string `json:"down,omitempty"`
	// SkewSeconds is how long two image IDs of this tag have been
	// running at once: since the newest one's first container started.
	SkewSeconds float64 `json:"skew_seconds"`
}

type versionInfo struct {
	ImageID    string    `json:"image_id"`
	Nodes      []string  `json:"nodes"`
	Containers int       `json:"containers"`
	Since      time.Time `json:"since"` // first container on it
}

// readStatus gathers the node records and the rollout state.
func readStatus(ctx context.Context, kv clientv3.KV, now time.Time) (clusterStatus, error) {
	out := clusterStatus{Time: now.UTC(), Nodes: []nodeStatus{}, Tags: []tagStatus{}}
	nodes, err := kv.Get(ctx, statusPrefix, clientv3.WithPrefix())
	if err != nil {
		return out, err
	}
	tags := map[string]*tagStatus{}
	tag := func(ref string) *tagStatus {
		if tags[ref] == nil {
			tags[ref] = &tagStatus{Image: ref}
		}
		return tags[ref]
	}
	versions := map[string]map[string]*versionInfo{}
	for _, kv := range nodes.Kvs {
		var n nodeStatus
		if json.Unmarshal(kv.Value, &n) != nil {
			continue
		}
		out.Nodes = append(out.Nodes, n)
		for _, c := range n.Containers {
			tag(c.Image)
			if versions[c.Image] == nil {
				versions[c.Image] = map[string]*versionInfo{}
			}
			v := versions[c.Image][c.ImageID]
			if v == nil {
				v = &versionInfo{ImageID: c.ImageID, Since: c.Since}
				versions[c.Image][c.ImageID] = v
			}
			if !slices.Contains(v.Nodes, n.Node) {
				v.Nodes = append(v.Nodes, n.Node)
			}
			v.Containers++
			if c.Since.Before(v.Since) {
				v.Since = c.Since
			}
		}
	}
	rolls, err := kv.Get(ctx, rolloutsPrefix, clientv3.WithPrefix())
	if err != nil {
		return out, err
	}
	for _, kv := range rolls.Kvs {
		rest := strings.TrimPrefix(string(kv.Key), rolloutsPrefix)
		esc, what, ok := strings.Cut(rest, "/")
		ref, err := url.PathUnescape(esc)
		if !ok || err != nil {
			continue
		}
		switch {
		case what == haltLeaf:
			var h halt
			if json.Unmarshal(kv.Value, &h) == nil {
				tag(ref).Halted = &h
			}
		case strings.HasPrefix(what, slotsLeaf):
			t := tag(ref)
			t.Rolling = append(t.Rolling, string(kv.Value))
		case strings.HasPrefix(what, downLeaf):
			var d downRecord
			if json.Unmarshal(kv.Value, &d) == nil {
				t := tag(ref)
				for _, c := range d.Containers {
					t.Down = append(t.Down, fmt.Sprintf("%s %s (%s)", d.Node, c.Name, c.Reason))
				}
			}
		}
	}
	for ref, t := range tags {
		for _, v := range versions[ref] {
			slices.Sort(v.Nodes)
			t.Versions = append(t.Versions, *v)
		}
		slices.SortFunc(t.Versions, func(a, b versionInfo) int { return b.Since.Compare(a.Since) })
		if len(t.Versions) > 1 {
			t.SkewSeconds = now.Sub(t.Versions[0].Since).Seconds()
		}
		out.Tags = append(out.Tags, *t)
	}
	slices.SortFunc(out.Tags, func(a, b tagStatus) int { return cmp.Compare(a.Image, b.Image) })
	slices.SortFunc(out.Nodes, func(a, b nodeStatus) int { return cmp.Compare(a.Node, b.Node) })
	return out, nil
}

// skewCollector exports deployer_version_skew_seconds{image}, read from
// the cluster view when /metrics is scraped: the view is cluster-wide, so
// no node keeps reading it between scrapes.
type skewCollector struct {
	kv   clientv3.KV
	desc *prometheus.Desc
}

func newSkewCollector(kv clientv3.KV) *skewCollector {
	return &skewCollector{kv: kv, desc: prometheus.NewDesc("deployer_version_skew_seconds",
		"How long two image IDs of one tag have run at once across the cluster (0: one version).", []string{"image"}, nil)}
}

func (c *skewCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *skewCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	st, err := readStatus(ctx, c.kv, time.Now())
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.desc, err)
		return
	}
	for _, t := range st.Tags {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, t.SkewSeconds, t.Image)
	}
}

// GET /api/status
//
// The cluster's state per image tag: which image IDs run on which nodes,
// rollouts in progress or halted, and the version skew. Same secret as the
// webhooks.
func (d *daemon) apiStatus(w http.ResponseWriter, r *http.Request) {
	if !authorized(r, d.cfg.WebhookSecret) {
		writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "missing or wrong secret"})
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	st, err := readStatus(ctx, d.etcd, time.Now())
	if err != nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, st)
}

// statusCommand is `deployer status`: the cluster status as a table.
func statusCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var asJSON bool
	ce, err := parseCommand("deployer status", args, os.Getenv, stderr, func(fs *flag.FlagSet) {
		fs.BoolVar(&asJSON, "json", false, "print JSON instead of a table")
	})
	if err != nil {
		return err
	}
	var st clusterStatus
	err = ce.read(ctx, stderr, func(ctx context.Context, kv clientv3.KV) (err error) {
		st, err = readStatus(ctx, kv, time.Now())
		return err
	})
	if err != nil {
		return fmt.Errorf("read status from %s: %w", strings.Join(ce.cfg.etcdEndpoints(), ","), err)
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	printStatus(stdout, st)
	return nil
}

func printStatus(w io.Writer, st clusterStatus) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IMAGE\tIMAGE ID\tNODES\tCONTAINERS\tSINCE\tSTATE")
	for _, t := range st.Tags {
		state := "ok"
		switch {
		case t.Halted != nil:
			state = fmt.Sprintf("HALTED: %s on %s: %s", shortID(t.Halted.ImageID), t.Halted.Node, t.Halted.Reason)
		case len(t.Rolling) > 0:
			state = "rolling: " + strings.Join(t.Rolling, ", ")
		case len(t.Down) > 0:
			state = "down: " + strings.Join(t.Down, ", ")
		case len(t.Versions) > 1:
			state = fmt.Sprintf("skew %s", (time.Duration(t.SkewSeconds) * time.Second).String())
		}
		name := t.Image
		if len(t.Versions) == 0 {
			fmt.Fprintf(tw, "%s\t-\t-\t0\t-\t%s\n", name, state)
		}
		for i, v := range t.Versions {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s ago\t%s\n", name, shortID(v.ImageID), strings.Join(v.Nodes, ","), v.Containers,
				st.Time.Sub(v.Since).Round(time.Second), state)
			if i == 0 {
				name, state = "", ""
			}
		}
	}
	var retrying bool
	for _, n := range st.Nodes {
		for _, r := range n.Retries {
			if !retrying {
				fmt.Fprintln(tw)
				fmt.Fprintln(tw, "RETRYING\tNODE\tATTEMPTS\tSINCE\tNEXT IN\tLAST ERROR")
				retrying = true
			}
			name := r.Repo
			if len(r.Tags) > 0 {
				name += ":" + strings.Join(r.Tags, ",")
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s ago\t%s\t%s\n", name, n.Node, r.Attempts, st.Time.Sub(r.Since).Round(time.Second),
				max(r.Next.Sub(st.Time), 0).Round(time.Second), truncate(r.Error, 120))
		}
	}
	fmt.Fprintln(tw)
	fmt.Fprintln(tw, "NODE\tVERSION\tUP\tUPDATED")
	for _, n := range st.Nodes {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s ago\n", n.Node, n.Version, st.Time.Sub(n.Started).Round(time.Second), st.Time.Sub(n.Updated).Round(time.Second))
	}
	tw.Flush()
}

func samePending(a, b pendingRetry) bool {
	return a.Repo == b.Repo && a.Attempts == b.Attempts && a.Next.Equal(b.Next) && a.Error == b.Error &&
		slices.Equal(a.Tags, b.Tags) && slices.Equal(a.Revisions, b.Revisions)
}
