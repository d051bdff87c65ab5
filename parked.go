package main

// parked.go: parking, the deployer's record of a container it took down,
// and the recovery that settles it.
//
// Both strategies park the old container before they stop it: it is
// renamed <name>-deployer-old-<short ID> and, when its restart policy
// would let dockerd start it again at a daemon restart (beside its
// replacement, on the same volumes), that policy is set to "no" and kept
// in the parked name as a suffix (.always, .unless-stopped,
// .on-failure-3) to be restored if it is put back.
//
// The parked name is the record. It lives in Docker, with the container
// it describes, so it survives a stop, crash or SIGKILL of the deployer
// and a dockerd restart, needs no etcd (a node-scoped etcd key would need
// etcd at every stop and settle, and could disagree with what Docker has:
// a key written but the stop never made, a container removed by hand),
// and goes away with the container. It stays until the service runs
// again under <name>: a put-back starts the parked container before it
// renames it back, so even a put-back that fails half way leaves it.
//
// The process holds the names it is working on (hold); any other parked
// container is a leftover (a crash, a put-back that failed) and is
// settled at start, before a re-create or stop of its name, and by the
// settle loop, which every deploy that lists one wakes:
//
//   - parked, no <name>: the parked container is put back (started, then
//     renamed back). A trigger being deployed then is replayed (the
//     watermark did not pass it), so the deploy is then done again.
//   - parked and <name> up (running, not restarting, healthy or without a
//     healthcheck, for at least minUp): the replacement got that far; the
//     parked container is removed (with force), which finishes it.
//   - parked and <name> not up (created but never started, exited, crash
//     looping, unhealthy, or still starting after -restart_timeout): <name>
//     is removed and the parked container is put back, as recreate's own
//     restore would have done.
//   - a re-create's new container still under its temporary name
//     <name>-deployer-new-<old short ID> (recreate creates it before it
//     parks the old one, and names it <name> after the stop): it never
//     ran, and is removed; the parked container beside it, if any, is
//     settled as above. Its name is a record too, settled with the same
//     holds.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	docker "github.com/fsouza/go-dockerclient"

	"github.com/die-net/deployer/internal/backoff"
)

// parkAPI is the part of the Docker client parking uses.
type parkAPI interface {
	// ListContainers finds parked containers (All: stopped ones too).
	ListContainers(docker.ListContainersOptions) ([]docker.APIContainers, error)
	// InspectContainerWithContext finds what holds a name.
	InspectContainerWithContext(id string, ctx context.Context) (*docker.Container, error)
	// StartContainerWithContext starts a parked container again.
	StartContainerWithContext(id string, hostConfig *docker.HostConfig, ctx context.Context) error
	// RenameContainer parks a container, and puts it back.
	RenameContainer(opts docker.RenameContainerOptions) error
	// UpdateContainer sets a parked container's restart policy to "no",
	// and restores it.
	UpdateContainer(id string, opts docker.UpdateContainerOptions) error
	// RemoveContainer removes a parked container once its replacement
	// runs, or what holds its name when it is put back.
	RemoveContainer(opts docker.RemoveContainerOptions) error
}

// parker parks the containers the strategies take down, puts them back,
// and settles what is left parked.
type parker struct {
	docker      parkAPI
	callTimeout time.Duration
	stopBudget  time.Duration // a stop's bound: a put-back gets it and two calls
	wait        *upWaiter     // its timeout and poll bound the settle of a container beside a parked one
	retryBase   time.Duration // backoff between the tries of a put-back step
	log         *slog.Logger

	// recovered is closed by run once the parked containers found at
	// start are settled (or that gave up): triggers may be acted on.
	recovered chan struct{}

	noUpdate atomic.Bool // the runtime has no update endpoint (updateUnsupported)

	mu     sync.Mutex
	held   map[string]chan struct{} // names being parked, replaced or put back here (hold)
	settle chan struct{}            // capacity 1: wakes the settle of leftovers
}

// newParker returns the parking of containers on dc. It starts nothing.
func newParker(dc parkAPI, stopBudget time.Duration, wait *upWaiter, log *slog.Logger) *parker {
	return &parker{
		docker: dc, callTimeout: callTimeout, stopBudget: stopBudget, wait: wait, retryBase: 500 * time.Millisecond,
		log: log, recovered: make(chan struct{}), held: map[string]chan struct{}{}, settle: make(chan struct{}, 1),
	}
}

// putBackAttempts bounds the tries of each step of a put-back; between
// them the restarter waits backoff.Delay(retryBase, attempt).
const putBackAttempts = 5

// hold marks name as being parked, replaced or put back by this process
// until release is called: the settle of leftovers leaves it alone, and
// another hold of it waits.
func (r *parker) hold(ctx context.Context, name string) (release func(), err error) {
	for {
		release, busy := r.take(name)
		if release != nil {
			return release, nil
		}
		select {
		case <-busy:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// tryHold is hold without the wait: ok is false when name is held.
func (r *parker) tryHold(name string) (release func(), ok bool) {
	release, _ = r.take(name)
	return release, release != nil
}

// take holds name if it is free; otherwise busy is closed when it is
// released.
func (r *parker) take(name string) (release func(), busy <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if busy, held := r.held[name]; held {
		return nil, busy
	}
	done := make(chan struct{})
	r.held[name] = done
	return func() {
		r.mu.Lock()
		delete(r.held, name)
		r.mu.Unlock()
		close(done)
	}, nil
}

// park renames container id (called name, with restart policy pol) to its
// parked name and sets its restart policy to "no" when it has another. On
// failure nothing stays parked.
func (r *parker) park(ctx context.Context, id, name string, pol docker.RestartPolicy) error {
	if r.noUpdate.Load() {
		pol = docker.RestartPolicy{} // (updateUnsupported) the policy stays as it is
	}
	parked := parkedNameWith(name, id, pol)
	rctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	err := r.docker.RenameContainer(docker.RenameContainerOptions{ID: id, Name: parked, Context: rctx})
	cancel()
	if err != nil {
		return fmt.Errorf("rename %s: %w", name, err)
	}
	if !restarts(pol) {
		return nil
	}
	uctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	err = r.docker.UpdateContainer(id, docker.UpdateContainerOptions{RestartPolicy: docker.NeverRestart(), Context: uctx})
	cancel()
	if err == nil {
		return nil
	}
	if updateUnsupported(err) {
		// Podman's Docker API has no update (README, "Podman"): the
		// policy stays, and so does the name that records none to
		// restore.
		r.noUpdate.Store(true)
		r.log.Info("the runtime cannot change a restart policy: parked containers keep theirs", "container", name, "err", err)
		rctx, cancel := context.WithTimeout(ctx, r.callTimeout)
		err = r.docker.RenameContainer(docker.RenameContainerOptions{ID: id, Name: parkedName(name, id), Context: rctx})
		cancel()
		if err == nil {
			return nil
		}
		err = fmt.Errorf("rename %s to %s: %w", parked, parkedName(name, id), err)
	} else {
		err = fmt.Errorf("set the restart policy of %s to no: %w", parked, err)
	}
	// The policy is unchanged: only the name goes back.
	if perr := r.putBack(ctx, name, id, docker.RestartPolicy{}); perr != nil {
		return fmt.Errorf("%w; putting it back failed too: %w", err, perr)
	}
	return err
}

// updateUnsupported tells an update the runtime does not implement
// (Podman 4's Docker API answers POST /containers/{id}/update with a bare
// 404) from one of a container that is gone (Docker's 404 says "No such
// container").
func updateUnsupported(err error) bool {
	var de *docker.Error
	return errors.As(err, &de) && de.Status == 404 && !strings.Contains(strings.ToLower(de.Message), "no such container")
}

// retryStep runs one step of a put-back or removal, up to putBackAttempts
// times with backoff; a container that is gone ends it at once.
func (r *parker) retryStep(ctx context.Context, what string, step func(context.Context) error) error {
	for attempt := 1; ; attempt++ {
		cctx, cancel := context.WithTimeout(ctx, r.callTimeout)
		err := step(cctx)
		cancel()
		if err == nil {
			return nil
		}
		if isNoSuchContainer(err) || attempt >= putBackAttempts || !backoff.Sleep(ctx, backoff.Delay(r.retryBase, attempt)) {
			return fmt.Errorf("%s (attempt %d): %w", what, attempt, err)
		}
		r.log.Debug("retrying", "step", what, "attempt", attempt, "err", err)
	}
}

// putBackBudget bounds a put-back: a few calls and a stop's worth of
// backoff, whatever the caller's context (a shutdown must not leave a
// service half put back).
func (r *parker) putBackBudget() time.Duration {
	return 2*r.callTimeout + r.stopBudget
}

// putBack makes the parked container parkedID the service called name
// again: whatever else is called name (a replacement that failed, or one
// whose create timed out but happened) is removed, the restart policy pol
// is restored, the container is started and renamed back, in that order,
// so that the record (the parked name) stays until the service runs. Each
// step is retried with backoff. If a running container took the name
// meanwhile (a supervisor's), it stays and the parked one is removed. On
// failure the settle loop tries again.
func (r *parker) putBack(ctx context.Context, name, parkedID string, pol docker.RestartPolicy) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.putBackBudget())
	defer cancel()
	err := r.putBackSteps(ctx, name, parkedID, pol)
	if err != nil {
		backoff.Wake(r.settle) // the record stays: settle it again later
	}
	return err
}

func (r *parker) putBackSteps(ctx context.Context, name, parkedID string, pol docker.RestartPolicy) error {
	if err := r.retryStep(ctx, "remove the container called "+name, func(ctx context.Context) error {
		return r.removeOther(ctx, name, parkedID)
	}); err != nil {
		return err
	}
	if restarts(pol) && !r.noUpdate.Load() { // (updateUnsupported) unchanged then
		if err := r.retryStep(ctx, "restore the restart policy", func(ctx context.Context) error {
			return r.docker.UpdateContainer(parkedID, docker.UpdateContainerOptions{RestartPolicy: pol, Context: ctx})
		}); err != nil {
			return err
		}
	}
	if err := r.retryStep(ctx, "start the old container", func(ctx context.Context) error {
		err := r.docker.StartContainerWithContext(parkedID, nil, ctx)
		var running *docker.ContainerAlreadyRunning
		if errors.As(err, &running) {
			return nil
		}
		return err
	}); err != nil {
		return err
	}
	yielded := false
	err := r.retryStep(ctx, "rename the old container back", func(ctx context.Context) error {
		err := r.docker.RenameContainer(docker.RenameContainerOptions{ID: parkedID, Name: name, Context: ctx})
		if err == nil {
			return nil
		}
		// Found by name: an earlier try renamed it but its answer was
		// lost, or something took the name after the removal above (a
		// create that dockerd finished late, a supervisor's container).
		c, ierr := r.docker.InspectContainerWithContext(name, ctx)
		switch {
		case ierr == nil && c.ID == parkedID:
			return nil
		case !isConflict(err):
			return err
		case ierr != nil:
			return errors.Join(err, ierr)
		case c.State.Running:
			yielded = true
			return nil
		}
		if rerr := r.removeOther(ctx, name, parkedID); rerr != nil {
			return errors.Join(err, rerr)
		}
		return err // renamed on the next attempt
	})
	if err != nil {
		return err
	}
	if yielded {
		r.log.Warn("a container took the name while the old one was put back; keeping it", "container", name)
		return r.removeParked(ctx, name, parkedID)
	}
	return nil
}

// removeOther force-removes the container called name unless it is keep.
func (r *parker) removeOther(ctx context.Context, name, keep string) error {
	c, err := r.docker.InspectContainerWithContext(name, ctx)
	if isNoSuchContainer(err) {
		return nil
	}
	if err != nil {
		return err
	}
	if c.ID == keep {
		return nil
	}
	err = r.docker.RemoveContainer(docker.RemoveContainerOptions{ID: c.ID, Force: true, Context: ctx})
	if isNoSuchContainer(err) {
		return nil
	}
	return err
}

// removeParked removes a parked container once its replacement runs, with
// force: dockerd may have started it again. On failure the record stays
// and the settle loop removes it later.
func (r *parker) removeParked(ctx context.Context, name, parkedID string) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.putBackBudget())
	defer cancel()
	err := r.retryStep(ctx, "remove the parked container", func(ctx context.Context) error {
		err := r.docker.RemoveContainer(docker.RemoveContainerOptions{ID: parkedID, Force: true, Context: ctx})
		if isNoSuchContainer(err) {
			return nil // gone with --rm, or by hand
		}
		return err
	})
	if err != nil {
		backoff.Wake(r.settle)
		r.log.Warn("could not remove the parked container; will try again", "container", name, "id", shortID(parkedID), "err", err)
	}
	return err
}

// run settles every parked container before the daemon acts on any
// trigger, within the restart timeout (a replacement may still be coming
// up) plus a call timeout, and closes recovered when that is over; then
// it keeps settling leftovers until ctx ends: at once when Docker did not
// answer (retried with backoff), and whenever a put-back or a removal
// failed or a deploy saw a leftover. It returns nil when ctx ends.
func (r *parker) run(ctx context.Context) error {
	sctx, cancel := context.WithTimeout(ctx, r.wait.timeout+r.callTimeout)
	err := r.recoverParked(sctx, "")
	cancel()
	close(r.recovered)
	if ctx.Err() != nil {
		return nil
	}
	if err != nil {
		r.log.Warn("could not recover parked containers at start; retrying in the background", "err", err)
	}
	r.settleLoop(ctx, err != nil)
	return nil
}

// settleLoop settles leftovers whenever woken, and again with backoff
// while that fails.
func (r *parker) settleLoop(ctx context.Context, failing bool) {
	for attempt := 1; ; attempt++ {
		if !failing {
			attempt = 1
			select {
			case <-ctx.Done():
				return
			case <-r.settle:
			}
		} else {
			t := time.NewTimer(backoff.Delay(time.Second, attempt))
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			case <-r.settle:
				t.Stop()
			}
		}
		err := r.recoverParked(ctx, "")
		switch {
		case err == nil && failing:
			r.log.Info("settled parked containers", "attempt", attempt)
		case err != nil:
			r.log.Debug("settling parked containers", "attempt", attempt, "err", err)
		}
		failing = err != nil
	}
}

// noteLeftovers wakes the settle loop when list has a parked container
// this process is not working on.
func (r *parker) noteLeftovers(list []docker.APIContainers) {
	for base := range parkedBases(list) {
		r.mu.Lock()
		_, held := r.held[base]
		r.mu.Unlock()
		if !held {
			backoff.Wake(r.settle)
			return
		}
	}
}

// settleParked settles the parked containers of the container called
// name (with ID id), which the caller holds. It may itself be a parked one
// that a crash left running (between the rename and the stop): it is put
// back under its name first. It returns that name.
func (r *parker) settleParked(ctx context.Context, name, id string) (string, error) {
	name = strings.TrimPrefix(name, "/")
	if base, ok := parkedBase(name, id); ok {
		name = base
	}
	return name, r.recoverParked(ctx, name)
}

// recoverParked settles the parked containers of the container called
// only, which the caller holds, or, when only is "", every parked
// container whose name this process does not hold.
func (r *parker) recoverParked(ctx context.Context, only string) error {
	lctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	list, err := r.docker.ListContainers(docker.ListContainersOptions{All: true, Context: lctx})
	cancel()
	if err != nil {
		return fmt.Errorf("list containers: %w", err)
	}
	var errs []error
	for _, c := range list {
		for _, n := range c.Names {
			if base, ok := newBase(n); ok && (only == "" || base == only) && !listedRunning(c) {
				// A re-create's new container that never got its
				// name (a crash, a removal that failed): it never ran.
				if err := r.removeNew(ctx, base, only == "", c.ID); err != nil {
					errs = append(errs, fmt.Errorf("remove %s: %w", strings.TrimPrefix(n, "/"), err))
				}
				continue
			}
			base, pol, ok := parseParked(n, c.ID)
			if !ok || (only != "" && base != only) {
				continue
			}
			if only == "" {
				release, ok := r.tryHold(base)
				if !ok {
					continue // in flight here: its own deploy settles it
				}
				err = r.recoverOne(ctx, base, c.ID, pol)
				release()
			} else {
				err = r.recoverOne(ctx, base, c.ID, pol)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("recover %s: %w", base, err))
			}
		}
	}
	return errors.Join(errs...)
}

// removeNew removes id, a re-create's new container left with its
// temporary name beside name; hold: name is not held by the caller, and
// is left alone when this process works on it.
func (r *parker) removeNew(ctx context.Context, name string, hold bool, id string) error {
	if hold {
		release, ok := r.tryHold(name)
		if !ok {
			return nil // in flight here
		}
		defer release()
	}
	err := r.retryStep(ctx, "remove the new container", func(ctx context.Context) error {
		err := r.docker.RemoveContainer(docker.RemoveContainerOptions{ID: id, Force: true, Context: ctx})
		if isNoSuchContainer(err) {
			return nil
		}
		return err
	})
	if err == nil {
		r.log.Warn("removed the new container of an interrupted re-create", "container", name, "id", shortID(id))
	}
	return err
}

// recoverOne settles one parked container beside name (see the top of the
// file).
func (r *parker) recoverOne(ctx context.Context, name, parkedID string, pol docker.RestartPolicy) error {
	up, curID, err := r.settled(ctx, name, parkedID)
	if err != nil {
		return err
	}
	if up {
		if err := r.removeParked(ctx, name, parkedID); err != nil {
			return err
		}
		r.log.Warn("finished an interrupted replacement: removed the parked container", "container", name, "parked", shortID(parkedID))
		return nil
	}
	if err := r.putBack(ctx, name, parkedID, pol); err != nil {
		return fmt.Errorf("put the parked container back: %w", err)
	}
	r.log.Warn("put back a container an interrupted replacement had parked", "container", name, "id", shortID(parkedID), "replacement_removed", shortID(curID))
	return nil
}

// settled inspects the container called name until it is up or has
// failed, within the restart timeout. It returns whether it is up and its
// ID ("" when there is none).
func (r *parker) settled(ctx context.Context, name, parkedID string) (bool, string, error) {
	deadline := time.Now().Add(r.wait.timeout)
	for {
		ictx, cancel := context.WithTimeout(ctx, r.callTimeout)
		c, err := r.docker.InspectContainerWithContext(name, ictx)
		cancel()
		if isNoSuchContainer(err) {
			return false, "", nil
		}
		if err != nil {
			return false, "", fmt.Errorf("inspect %s: %w", name, err)
		}
		if c.ID == parkedID {
			// Renamed back by someone else meanwhile: it is the service.
			return false, "", fmt.Errorf("%s is the parked container itself", name)
		}
		up, pending := upState(c, time.Now())
		if !pending || time.Now().After(deadline) {
			return up, c.ID, nil
		}
		if !backoff.Sleep(ctx, r.wait.poll) {
			return false, "", ctx.Err()
		}
	}
}

// upState judges a container found beside a parked one with judgeUp, the
// one definition of up: up, or still coming up (pending); neither means it
// failed. A container that is not running has failed: a crash between
// create and start leaves one that nothing will start.
func upState(c *docker.Container, now time.Time) (up, pending bool) {
	if !c.State.Running {
		return false, false
	}
	up, err := judgeUp(c, c.Image, now)
	return up, !up && err == nil
}
