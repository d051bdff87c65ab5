package main

// upwait.go: when a replacement container counts as up, and the one loop
// that waits for it, used by both restart strategies.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	docker "github.com/fsouza/go-dockerclient"
)

// minUp is how long a replacement without a healthcheck must have been
// running, without a restart, to count as up: a version that crashes at
// once is "running" for a few milliseconds first.
const minUp = time.Second

// judgeUp is the one definition of "up" for a replacement of image newID.
// It reports true once the container is running, not restarting, has never
// restarted (a fresh container starts at RestartCount 0: a restart policy
// bringing it back after a crash moves StartedAt and RestartCount), and is
// healthy where the image has a healthcheck or, without one, has been
// running for minUp. It fails (errReplacement) when the container exited,
// is crash-looping, or is unhealthy. now is on the Docker host's clock.
func judgeUp(c *docker.Container, newID string, now time.Time) (bool, error) {
	return judgeUpAfter(c, newID, now, minUp)
}

// judgeUpAfter is judgeUp with upAfter, the tag's policy's up duration
// (policy.go), in place of minUp.
func judgeUpAfter(c *docker.Container, newID string, now time.Time, upAfter time.Duration) (bool, error) {
	name := strings.TrimPrefix(c.Name, "/")
	if c.Image != newID {
		// Not ours: a newer push overtook this one. Its own deploy
		// judges it.
		return c.State.Running && !c.State.Restarting, nil
	}
	st := c.State
	switch {
	case st.Restarting || (st.Running && c.RestartCount > 0):
		return false, fmt.Errorf("%w: %s on %s is crash-looping (%d restarts, last exit code %d)",
			errReplacement, name, shortID(newID), c.RestartCount, st.ExitCode)
	case st.OOMKilled:
		return false, fmt.Errorf("%w: %s on %s exited, out of memory (code %d)", errReplacement, name, shortID(newID), st.ExitCode)
	case st.Dead: // exited and being removed (docker run --rm)
		return false, fmt.Errorf("%w: %s on %s exited with code %d", errReplacement, name, shortID(newID), st.ExitCode)
	case !st.Running:
		if !st.FinishedAt.IsZero() && !st.FinishedAt.Before(st.StartedAt) {
			return false, fmt.Errorf("%w: %s on %s exited with code %d", errReplacement, name, shortID(newID), st.ExitCode)
		}
		return false, nil // created, not started yet
	}
	switch st.Health.Status {
	case "healthy":
		return true, nil
	case "", "none":
		return now.Sub(st.StartedAt) >= upAfter, nil
	case "unhealthy":
		return false, fmt.Errorf("%w: %s on %s is unhealthy", errReplacement, name, shortID(newID))
	}
	return false, nil // health: starting
}

// upAPI is the part of the Docker client the wait uses.
type upAPI interface {
	// InspectContainerWithContext reads a container by ID or name.
	InspectContainerWithContext(id string, ctx context.Context) (*docker.Container, error)
	// PingWithContext asks whether the daemon answers: a replacement's
	// death counts against the version only while it does.
	PingWithContext(ctx context.Context) error
}

// upWaiter waits for replacements to come up.
type upWaiter struct {
	docker      upAPI
	events      eventAPI      // the daemon's one event source (eventsFor), never the client's own monitor
	timeout     time.Duration // -restart_timeout
	poll        time.Duration // inspect interval while waiting
	callTimeout time.Duration
	now         func() time.Time
	log         *slog.Logger
	metrics     *metrics
}

func newUpWaiter(d upAPI, events eventAPI, timeout, callTimeout time.Duration, log *slog.Logger, m *metrics) *upWaiter {
	return &upWaiter{docker: d, events: events, timeout: timeout, poll: 250 * time.Millisecond, callTimeout: callTimeout, now: time.Now, log: log, metrics: m}
}

// target says which container replaces which.
type target struct {
	name  string // the container name the replacement has
	id    string // the replacement's ID when known (recreate); else any container called name
	oldID string // the stopped container, never the replacement
	newID string // the image the replacement must run
	// upAfter is how long a replacement without a healthcheck must run
	// to count as up (the tag's policy); 0: minUp.
	upAfter time.Duration
}

// eventWatch is a subscription to container events that survives the end
// of Docker's event stream (a dockerd restart): the source closes the
// channel then, and the watch subscribes again on the next poll. Each
// subscription is a stream of its own (dockerc.Events), closed with it.
type eventWatch struct {
	src eventAPI
	ch  chan *docker.APIEvents // nil while not subscribed
	log *slog.Logger
}

// watch subscribes to container events. Subscribe before the stop, so
// that nothing the stop causes is missed.
func (w *upWaiter) watch() *eventWatch {
	e := &eventWatch{src: w.events, log: w.log}
	e.subscribe()
	return e
}

func (e *eventWatch) subscribe() {
	ch := make(chan *docker.APIEvents, 64)
	opts := docker.EventsOptions{Filters: map[string][]string{"type": {"container"}}}
	if err := e.src.AddEventListenerWithOptions(opts, ch); err != nil {
		e.log.Debug("docker events unavailable, polling", "err", err)
		return
	}
	e.ch = ch
}

// events is the channel to receive from; nil (blocks forever) while not
// subscribed.
func (e *eventWatch) events() <-chan *docker.APIEvents {
	if e.ch == nil {
		return nil
	}
	return e.ch
}

// ended marks the subscription as closed by the client.
func (e *eventWatch) ended() {
	e.ch = nil
}

func (e *eventWatch) close() {
	if e.ch != nil {
		_ = e.src.RemoveEventListener(e.ch)
		e.ch = nil
	}
}

// wait waits until the replacement described by t is up (judgeUp). It
// inspects on the poll tick and on events about the container it waits
// for, never on unrelated events. It returns nil once up; an error
// wrapping errReplacement when a replacement appeared and failed or did
// not come up in time while the daemon answered; errNoReplacement when
// none appeared at all; errDockerAway when the daemon went away and the
// replacement could not be judged (daemonTrouble); the context's error
// when ctx ended first. lost, when not nil, is closed if the rollout slot
// is lost meanwhile: the wait goes on (the container is already stopped),
// and the loss is logged.
func (w *upWaiter) wait(ctx context.Context, ev *eventWatch, t target, lost <-chan struct{}) error {
	deadline := time.NewTimer(w.timeout)
	defer deadline.Stop()
	tick := time.NewTicker(w.poll)
	defer tick.Stop()
	var (
		seen    string                // the replacement seen last, if any
		images  = map[string]string{} // replacement ID -> its image, as inspected
		lastErr error                 // the last inspect's error; nil once one succeeds
		trouble = daemonTrouble{excused: map[string]time.Time{}}
	)
	// judge judges a replacement; its failure counts only if the daemon
	// still answers: a death the daemon's going away explains is excused.
	judge := func(c *docker.Container) (bool, error) {
		up, err := judgeUpAfter(c, t.newID, w.now(), cmp.Or(t.upAfter, minUp))
		if !errors.Is(err, errReplacement) {
			return up, err
		}
		if trouble.excuses(c) {
			return false, nil
		}
		if perr := w.ping(ctx); perr != nil {
			if trouble.gone(c) {
				w.log.Warn("the docker daemon went away as the replacement stopped; judging it once the daemon is back",
					"container", t.name, "verdict", err.Error(), "err", perr)
			}
			return false, nil
		}
		return false, err
	}
	check := func() (bool, error) {
		c, err := w.inspect(ctx, t)
		if err != nil {
			lastErr = err
			if trouble.gone(nil) {
				w.log.Warn("the docker daemon does not answer; waiting for it", "container", t.name, "err", err)
			}
			return false, nil // the deadline bounds us
		}
		lastErr = nil
		if trouble.back(c) {
			w.log.Info("the docker daemon answers again; judging the replacement from now on", "container", t.name)
		}
		if c == nil {
			return false, nil
		}
		seen, images[c.ID] = c.ID, c.Image
		return judge(c)
	}
	inspect := true
	for {
		if inspect {
			if up, err := check(); up || err != nil {
				return err
			}
			inspect = false
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-lost:
			lost = nil
			w.metrics.slotsLost.Inc()
			w.log.Warn("rollout slot lost while waiting for the replacement; stopping no further container under it",
				"container", t.name)
			inspect = true
		case <-deadline.C:
			switch {
			case lastErr != nil:
				// Docker hung, overloaded or restarting: whatever was
				// seen before, the version is not to blame.
				return fmt.Errorf("%w: inspect %s: %w", errDockerAway, t.name, lastErr)
			case seen == "":
				return fmt.Errorf("%w: nothing started %s again within %v", errNoReplacement, t.name, w.timeout)
			case trouble.seen:
				return fmt.Errorf("%w: %s on %s not up within %v, the daemon having gone away meanwhile",
					errDockerAway, t.name, shortID(t.newID), w.timeout)
			}
			return fmt.Errorf("%w: %s on %s not up within %v", errReplacement, t.name, shortID(t.newID), w.timeout)
		case <-tick.C:
			inspect = true
			if ev.ch == nil {
				ev.subscribe()
			}
		case e, ok := <-ev.events():
			if !ok {
				ev.ended()
				w.log.Info("docker event stream ended; polling until it is back")
				continue
			}
			if !t.concerns(e, seen) {
				continue
			}
			if e.Action != "die" || trouble.away {
				inspect = true // while the daemon is away, only an inspect tells it is back
				continue
			}
			seen = e.Actor.ID
			if up, err := judge(w.died(ctx, e, t, images[e.Actor.ID])); up || err != nil {
				return err
			}
		}
	}
}

// daemonTrouble is what a wait knows of its daemon going away. A dockerd
// that stops (a restart, an upgrade, a crash) first closes its API socket,
// then stops every container (exit code 0 for an app that exits on
// SIGTERM), then exits, which ends the event stream; at start it runs
// again the containers whose restart policy says so, and a supervisor runs
// its own again. So a replacement's death counts against the version only
// if the daemon answers right after it; a death seen while the daemon was
// away, or on the first answer after it, is the daemon's, not the
// version's: the wait goes on, judges what runs once the daemon is back,
// and if nothing comes up in time ends node-local (errDockerAway).
type daemonTrouble struct {
	away    bool                 // no answer since the last failure
	seen    bool                 // away at least once during the wait
	excused map[string]time.Time // container ID -> the FinishedAt of a death the daemon explains
}

// gone records that the daemon did not answer; c, when not nil and not
// running, died with it. It reports whether the daemon was answering
// until now.
func (d *daemonTrouble) gone(c *docker.Container) bool {
	if c != nil && !c.State.Running {
		d.excused[c.ID] = c.State.FinishedAt
	}
	was := !d.away
	d.away, d.seen = true, true
	return was
}

// back records that the daemon answered with c (nil: no replacement): a
// death it shows now happened while the daemon was away. It reports
// whether the daemon was away until now.
func (d *daemonTrouble) back(c *docker.Container) bool {
	if !d.away {
		return false
	}
	d.away = false
	if c != nil && !c.State.Running {
		d.excused[c.ID] = c.State.FinishedAt
	}
	return true
}

// excuses reports whether c's failure is a death the daemon explains.
func (d *daemonTrouble) excuses(c *docker.Container) bool {
	at, ok := d.excused[c.ID]
	return ok && !c.State.Running && c.State.FinishedAt.Equal(at)
}

// ping reports whether the daemon answers.
func (w *upWaiter) ping(ctx context.Context) error {
	pctx, cancel := context.WithTimeout(ctx, w.callTimeout)
	defer cancel()
	return w.docker.PingWithContext(pctx)
}

// died returns the state of a replacement Docker reported dead: as
// inspected, or, when it is already gone (a supervisor's `docker run
// --rm`), as the event tells it, on the image it was last seen on (else
// the one it was started for).
func (w *upWaiter) died(ctx context.Context, e *docker.APIEvents, t target, image string) *docker.Container {
	ictx, cancel := context.WithTimeout(ctx, w.callTimeout)
	c, err := w.docker.InspectContainerWithContext(e.Actor.ID, ictx)
	cancel()
	if err == nil {
		return c
	}
	code, _ := strconv.Atoi(e.Actor.Attributes["exitCode"])
	return &docker.Container{
		ID: e.Actor.ID, Name: t.name, Image: cmp.Or(image, t.newID),
		State: docker.State{ExitCode: code, FinishedAt: w.now()},
	}
}

// concerns reports whether an event is about the replacement.
func (t target) concerns(e *docker.APIEvents, seen string) bool {
	if e == nil || e.Actor.ID == t.oldID {
		return false
	}
	return (seen != "" && e.Actor.ID == seen) || (t.id != "" && e.Actor.ID == t.id) ||
		(t.id == "" && e.Actor.Attributes["name"] == t.name)
}

// inspect returns the replacement, or nil while there is none.
func (w *upWaiter) inspect(ctx context.Context, t target) (*docker.Container, error) {
	ictx, cancel := context.WithTimeout(ctx, w.callTimeout)
	defer cancel()
	ref := t.name
	if t.id != "" {
		ref = t.id
	}
	c, err := w.docker.InspectContainerWithContext(ref, ictx)
	var gone *docker.NoSuchContainer
	switch {
	case errors.As(err, &gone):
		return nil, nil
	case err != nil:
		return nil, err
	case c.ID == t.oldID:
		return nil, nil
	}
	return c, nil
}

// callGuard runs the check made just before a container is touched; nil
// means no check (uncoordinated rollouts).
func callGuard(ctx context.Context, guard func(context.Context) error) error {
	if guard == nil {
		return nil
	}
	return guard(ctx)
}
