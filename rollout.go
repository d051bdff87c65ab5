package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	docker "github.com/fsouza/go-dockerclient"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// Rolling deploys. For one image tag, at most maxUnavailable containers
// are down at once across the cluster: before a node stops a stale
// container it takes a slot of an etcd semaphore for the tag, held by a
// session lease (a crashed node frees its slot when the lease expires);
// it frees the slot once the replacement runs the new image (and is
// healthy, when the image has a HEALTHCHECK). A replacement that does not
// come up halts the rollout of that image ID on every node.
//
// etcd keys, under the reserved namespace:
//
//	<prefix>/_rollout/<tag ref, path-escaped>/slots/<lease>-<container>  slot holders (lease-bound)
//	<prefix>/_rollout/<tag ref, path-escaped>/halted                     {"image_id",…} of a failed version
const (
	rolloutDir   = "_rollout"
	sessionTTL   = 10 // seconds a dead node's slots outlive it
	strategyStop = "stop"
	strategyRecr = "recreate"
	strategySkip = "skip"
	strategyKey  = "deployer.strategy" // container label overriding -restart_strategy
)

func rolloutPrefix(prefix, ref string) string {
	return prefix + "/" + rolloutDir + "/" + url.PathEscape(ref) + "/"
}

// halt is the record of a version that failed to come up.
type halt struct {
	ImageID   string    `json:"image_id"`
	Node      string    `json:"node"`
	Container string    `json:"container"`
	Reason    string    `json:"reason"`
	Time      time.Time `json:"time"`
}

// replaceAPI is the part of the Docker client the rollout uses.
type replaceAPI interface {
	// InspectContainerWithContext reads a container by ID or name.
	InspectContainerWithContext(id string, ctx context.Context) (*docker.Container, error)
	// StopContainerWithContext stops a container, killing it after timeout seconds.
	StopContainerWithContext(id string, timeout uint, ctx context.Context) error
	// AddEventListenerWithOptions subscribes to the daemon's events.
	AddEventListenerWithOptions(opts docker.EventsOptions, listener chan<- *docker.APIEvents) error
	// RemoveEventListener ends a subscription.
	RemoveEventListener(listener chan *docker.APIEvents) error
	// The rest re-creates containers (-restart_strategy=recreate).
	InspectImage(name string) (*docker.Image, error)
	CreateContainer(opts docker.CreateContainerOptions) (*docker.Container, error)
	StartContainerWithContext(id string, hostConfig *docker.HostConfig, ctx context.Context) error
	RenameContainer(opts docker.RenameContainerOptions) error
	RemoveContainer(opts docker.RemoveContainerOptions) error
}

// rollout replaces stale containers, coordinated across the cluster.
type rollout struct {
	etcd           *clientv3.Client
	prefix         string
	node           string
	maxUnavailable int // 0: no coordination, everything at once
	timeout        time.Duration
	strategy       string
	killTimeout    int
	callTimeout    time.Duration
	docker         replaceAPI
	restarter      *restarter
	log            *slog.Logger
	metrics        *metrics
	poll           time.Duration // inspect fallback when events are missed

	mu      sync.Mutex
	session *concurrency.Session
}

// outcome is what happened to one stale container.
type outcome struct {
	c       staleContainer
	err     error // the replacement failed: the rollout halted
	skipped string
}

// replace replaces the stale containers of one repository on this node:
// one at a time per tag, each under a cluster-wide slot.
func (r *rollout) replace(ctx context.Context, repo string, stale []staleContainer) []outcome {
	var out []outcome
	if r.maxUnavailable == 0 {
		// No coordination: stop everything at once, as the original did.
		var stop []staleContainer
		for _, c := range stale {
			if r.strategyOf(ctx, c) == strategySkip {
				out = append(out, outcome{c: c, skipped: "label " + strategyKey + "=skip"})
				continue
			}
			stop = append(stop, c)
		}
		stopped, err := r.restarter.stop(ctx, stop)
		for _, c := range stop {
			if slices.ContainsFunc(stopped, func(s staleContainer) bool { return s.ID == c.ID }) {
				out = append(out, outcome{c: c})
			} else {
				out = append(out, outcome{c: c, err: err})
			}
		}
		return out
	}
	halted := map[string]bool{} // tag whose rollout halted here
	for _, c := range stale {
		ref := repo + ":" + c.Tag
		if halted[c.Tag] {
			out = append(out, outcome{c: c, skipped: "rollout halted"})
			continue
		}
		o := r.replaceOne(ctx, ref, c)
		if o.err != nil {
			halted[c.Tag] = true
		}
		out = append(out, o)
	}
	return out
}

func (r *rollout) replaceOne(ctx context.Context, ref string, c staleContainer) outcome {
	strategy := r.strategyOf(ctx, c)
	if strategy == strategySkip {
		return outcome{c: c, skipped: "label " + strategyKey + "=skip"}
	}
	if h, err := r.halted(ctx, ref); err != nil {
		return outcome{c: c, err: fmt.Errorf("read halt record: %w", err)}
	} else if h != nil && h.ImageID == c.NewID {
		return outcome{c: c, skipped: fmt.Sprintf("rollout of %s halted by %s: %s", shortID(h.ImageID), h.Node, h.Reason)}
	}
	start := time.Now()
	release, err := r.acquire(ctx, ref, c)
	if err != nil {
		return outcome{c: c, err: fmt.Errorf("take a rollout slot: %w", err)}
	}
	defer release()
	if wait := time.Since(start); wait > time.Second {
		r.log.Info("rollout slot taken", "ref", ref, "container", c.Name, "waited", wait.Round(time.Millisecond))
	}
	// Another node may have halted this version while we waited.
	if h, err := r.halted(ctx, ref); err == nil && h != nil && h.ImageID == c.NewID {
		return outcome{c: c, skipped: fmt.Sprintf("rollout of %s halted by %s: %s", shortID(h.ImageID), h.Node, h.Reason)}
	}
	if strategy == strategyRecr {
		err = r.recreate(ctx, c)
	} else {
		err = r.stopAndWait(ctx, c)
	}
	if err != nil && ctx.Err() == nil {
		r.recordHalt(ctx, ref, c, err)
	}
	return outcome{c: c, err: err}
}

// strategyOf reads the container's deployer.strategy label.
func (r *rollout) strategyOf(ctx context.Context, c staleContainer) string {
	switch c.Labels[strategyKey] {
	case strategyStop, strategyRecr, strategySkip:
		return c.Labels[strategyKey]
	}
	return r.strategy
}

func (r *rollout) halted(ctx context.Context, ref string) (*halt, error) {
	ctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	defer cancel()
	resp, err := r.etcd.Get(ctx, rolloutPrefix(r.prefix, ref)+"halted")
	if err != nil || len(resp.Kvs) == 0 {
		return nil, err
	}
	var h halt
	if err := json.Unmarshal(resp.Kvs[0].Value, &h); err != nil {
		return nil, nil // unreadable: not halted
	}
	return &h, nil
}

func (r *rollout) recordHalt(ctx context.Context, ref string, c staleContainer, cause error) {
	h := halt{ImageID: c.NewID, Node: r.node, Container: c.Name, Reason: cause.Error(), Time: time.Now().UTC()}
	b, _ := json.Marshal(h)
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.callTimeout)
	defer cancel()
	if _, err := r.etcd.Put(ctx, rolloutPrefix(r.prefix, ref)+"halted", string(b)); err != nil {
		r.log.Error("could not record the halted rollout", "ref", ref, "err", err)
		return
	}
	r.metrics.rolloutsHalted.Inc()
	r.log.Warn("rollout halted", "ref", ref, "image", shortID(c.NewID), "container", c.Name, "reason", cause)
}

// clearHalt removes the halt record of ref if it names another image than
// the one now deployed: a later push resumes normal rollouts.
func (r *rollout) clearHalt(ctx context.Context, ref, imageID string) {
	if r.maxUnavailable == 0 {
		return // no coordination, no halts
	}
	h, err := r.halted(ctx, ref)
	if err != nil || h == nil || h.ImageID == imageID {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	defer cancel()
	_, _ = r.etcd.Delete(ctx, rolloutPrefix(r.prefix, ref)+"halted")
}

// sess returns the node's etcd session, creating it again if its lease
// was lost.
func (r *rollout) sess() (*concurrency.Session, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.session != nil {
		select {
		case <-r.session.Done():
			r.session = nil
		default:
			return r.session, nil
		}
	}
	s, err := concurrency.NewSession(r.etcd, concurrency.WithTTL(sessionTTL))
	if err != nil {
		return nil, err
	}
	r.session = s
	return s, nil
}

func (r *rollout) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.session != nil {
		r.session.Close() // revokes the lease: our slots go at once
	}
}

// acquire takes one of the maxUnavailable slots of ref, first come first
// served by etcd create revision. It returns a release function.
func (r *rollout) acquire(ctx context.Context, ref string, c staleContainer) (func(), error) {
	s, err := r.sess()
	if err != nil {
		return nil, err
	}
	dir := rolloutPrefix(r.prefix, ref) + "slots/"
	key := dir + strconv.FormatInt(int64(s.Lease()), 16) + "-" + r.node + "-" + shortID(c.ID)
	pctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	resp, err := r.etcd.Put(pctx, key, r.node+" "+c.Name, clientv3.WithLease(s.Lease()))
	cancel()
	if err != nil {
		return nil, err
	}
	myRev := resp.Header.Revision
	release := func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.callTimeout)
		defer cancel()
		if _, err := r.etcd.Delete(dctx, key); err != nil {
			r.log.Warn("could not free the rollout slot; its lease will", "key", key, "err", err)
		}
	}
	for {
		gctx, cancel := context.WithTimeout(ctx, r.callTimeout)
		// (Count ignores the create-revision filter; count the keys.)
		ahead, err := r.etcd.Get(gctx, dir, clientv3.WithPrefix(), clientv3.WithMaxCreateRev(myRev-1), clientv3.WithKeysOnly())
		cancel()
		if err != nil {
			release()
			return nil, err
		}
		if len(ahead.Kvs) < r.maxUnavailable {
			return release, nil
		}
		// Wait for a holder to leave (or its lease to expire), then count
		// again. Watching from the revision we counted at misses nothing.
		wctx, cancel := context.WithCancel(ctx)
		ch := r.etcd.Watch(clientv3.WithRequireLeader(wctx), dir, clientv3.WithPrefix(), clientv3.WithRev(ahead.Header.Revision+1), clientv3.WithFilterPut())
		select {
		case <-ch:
		case <-s.Done():
		case <-ctx.Done():
		case <-time.After(sessionTTL * time.Second): // a safety net; the count is the truth
		}
		cancel()
		if ctx.Err() != nil {
			release()
			return nil, ctx.Err()
		}
	}
}

// stopAndWait stops a container and waits for its supervisor to start the
// replacement on the new image.
func (r *rollout) stopAndWait(ctx context.Context, c staleContainer) error {
	events, unsubscribe := r.subscribe()
	defer unsubscribe()
	start := time.Now()
	if err := r.restarter.stopOne(ctx, c); err != nil {
		return err
	}
	err := r.waitReplacement(ctx, events, c.Name, c.ID, c.NewID)
	if err == nil {
		r.log.Info("replacement up", "container", c.Name, "image", shortID(c.NewID), "took", time.Since(start).Round(time.Millisecond))
	}
	return err
}

// subscribe listens to the daemon's container events; without them the
// waits fall back on inspecting every poll interval.
func (r *rollout) subscribe() (<-chan *docker.APIEvents, func()) {
	ch := make(chan *docker.APIEvents, 64)
	opts := docker.EventsOptions{Filters: map[string][]string{"type": {"container"}}}
	if err := r.docker.AddEventListenerWithOptions(opts, ch); err != nil {
		r.log.Warn("docker events unavailable, polling instead", "err", err)
		return nil, func() {}
	}
	return ch, func() { _ = r.docker.RemoveEventListener(ch) }
}

var errReplacement = errors.New("replacement failed")

// waitReplacement waits until a container called name, other than oldID,
// runs newID and is healthy (or has no healthcheck). It fails when such a
// container exits or turns unhealthy, or when none comes up in time.
func (r *rollout) waitReplacement(ctx context.Context, events <-chan *docker.APIEvents, name, oldID, newID string) error {
	deadline := time.NewTimer(r.timeout)
	defer deadline.Stop()
	tick := time.NewTicker(r.poll)
	defer tick.Stop()
	started := map[string]bool{}
	for {
		done, err := r.checkReplacement(ctx, name, oldID, newID)
		if done || err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-deadline.C:
			return fmt.Errorf("%w: no container %s on %s running within %v", errReplacement, name, shortID(newID), r.timeout)
		case <-tick.C:
		case ev := <-events:
			if ev == nil || ev.Actor.ID == oldID || ev.Actor.Attributes["name"] != name {
				continue
			}
			switch ev.Action {
			case "start":
				started[ev.Actor.ID] = true
			case "die":
				if started[ev.Actor.ID] {
					return fmt.Errorf("%w: %s on %s exited with code %s", errReplacement, name, shortID(newID), ev.Actor.Attributes["exitCode"])
				}
			}
		}
	}
}

func (r *rollout) checkReplacement(ctx context.Context, name, oldID, newID string) (bool, error) {
	ictx, cancel := context.WithTimeout(ctx, r.callTimeout)
	defer cancel()
	c, err := r.docker.InspectContainerWithContext(name, ictx)
	var gone *docker.NoSuchContainer
	if errors.As(err, &gone) || (err == nil && c.ID == oldID) {
		return false, nil
	}
	if err != nil {
		return false, nil // the daemon may be busy; the deadline bounds us
	}
	return replacementState(c, newID, time.Now())
}

// minUp is how long a replacement without a healthcheck must have been
// running to count as up: a version that crashes at once is "running" for
// a few milliseconds first.
const minUp = time.Second

// replacementState judges a container that replaced a stale one.
func replacementState(c *docker.Container, newID string, now time.Time) (bool, error) {
	name := strings.TrimPrefix(c.Name, "/")
	if c.Image != newID {
		// Not ours: a newer push overtook this one. Its own deploy
		// will judge it.
		return c.State.Running, nil
	}
	if !c.State.Running {
		if !c.State.FinishedAt.IsZero() && c.State.FinishedAt.After(c.State.StartedAt) {
			return false, fmt.Errorf("%w: %s on %s exited with code %d", errReplacement, name, shortID(newID), c.State.ExitCode)
		}
		return false, nil
	}
	switch c.State.Health.Status {
	case "healthy":
		return true, nil
	case "", "none":
		return now.Sub(c.State.StartedAt) >= minUp, nil
	case "unhealthy":
		return false, fmt.Errorf("%w: %s on %s is unhealthy", errReplacement, name, shortID(newID))
	}
	return false, nil // starting
}
