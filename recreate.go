package main

// recreate.go: the recreate strategy, for hosts with no supervisor:
// create a container with the same configuration on the new image (under
// a temporary name, while the old one still serves), then park and stop
// the old one, give the new one its name, start it, and remove the old one
// only once the new one is up; on failure, put the old one back. A create
// that fails stops nothing.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	docker "github.com/fsouza/go-dockerclient"

	"github.com/die-net/deployer/internal/backoff"
)

// recreateAPI is the part of the Docker client the recreate strategy uses.
type recreateAPI interface {
	// InspectContainerWithContext reads the old container's configuration.
	InspectContainerWithContext(id string, ctx context.Context) (*docker.Container, error)
	// InspectImageWithContext reads the old image's defaults, left out
	// of the copy.
	InspectImageWithContext(ctx context.Context, name string) (*docker.Image, error)
	// CreateContainer creates the new container.
	CreateContainer(opts docker.CreateContainerOptions) (*docker.Container, error)
	// StartContainerWithContext starts the new container.
	StartContainerWithContext(id string, hostConfig *docker.HostConfig, ctx context.Context) error
	// RenameContainer gives the new container its name.
	RenameContainer(opts docker.RenameContainerOptions) error
}

// recreator re-creates containers on their new image.
type recreator struct {
	docker      recreateAPI
	stopper     *restarter // stops the old container
	parked      *parker    // parks and puts back the old container (parked.go)
	wait        *upWaiter
	callTimeout time.Duration
	log         *slog.Logger
	metrics     *metrics

	mu       sync.Mutex
	failures map[string]string // "oldID newID" -> the last create's error (createFailed)
}

// newRecreator returns the recreate strategy on dc: stopper stops the old
// container, wait judges the new one. It starts nothing.
func newRecreator(dc recreateAPI, stopper *restarter, wait *upWaiter, log *slog.Logger, m *metrics) *recreator {
	return &recreator{docker: dc, stopper: stopper, parked: stopper.parked, wait: wait, callTimeout: callTimeout, log: log, metrics: m, failures: map[string]string{}}
}

// recreate replaces container c by a new one on c.NewID. guard, called
// just before the first change, may refuse it (the rollout slot was
// lost). A create refused twice alike for one version is final
// (errCreateRefused). Errors wrapping errReplacement mean the new version ran and
// failed; any other error is node-local. Either way the old container is
// put back and started; if that fails, its parked name stays as the
// record, settled later (parked.go).
func (r *recreator) recreate(ctx context.Context, c staleContainer, guard func(context.Context) error, lost <-chan struct{}) error {
	held := c.Name
	if base, ok := parkedBase(held, c.ID); ok {
		held = base
	}
	release, err := r.parked.hold(ctx, held)
	if err != nil {
		return err
	}
	defer release()
	// The stale scan's inspect and list, when just made (scan.go).
	old, noParked := c.scan.fresh(time.Now())
	if !noParked {
		// (parked.go) Settle a re-create of this container a crash
		// interrupted; that may rename c, so inspect it again after.
		if _, err := r.parked.settleParked(ctx, c.Name, c.ID); err != nil {
			return err
		}
		old = nil
	}
	if old == nil {
		ictx, cancel := context.WithTimeout(ctx, r.callTimeout)
		var err error
		old, err = r.docker.InspectContainerWithContext(c.ID, ictx)
		cancel()
		if err != nil {
			return fmt.Errorf("inspect %s: %w", c.Name, err)
		}
	}
	// (parked.go) Refuse --rm containers.
	if err := checkRecreatable(old); err != nil {
		return err
	}
	// The old image's defaults (env, labels, command) were merged into
	// the container's configuration; leave them out so that the new
	// image's own defaults apply.
	var defaults *docker.Config
	ictx, cancel := context.WithTimeout(ctx, r.callTimeout)
	img, err := r.docker.InspectImageWithContext(ictx, old.Image)
	cancel()
	if err == nil {
		defaults = img.Config
	}
	cfg, host, netcfg := cloneConfig(old, defaults, c.NewID)

	name := strings.TrimPrefix(old.Name, "/")
	pol := restartPolicy(old)
	if err := callGuard(ctx, guard); err != nil {
		return err
	}
	// The new container is created first, under a temporary name, while
	// the old one still serves: a create the runtime refuses (a bad
	// option, a missing volume driver, Podman's answers) stops nothing.
	created, err := r.createNew(ctx, name, old.ID, c.NewID, cfg, host, netcfg)
	if err != nil {
		return err
	}
	// dropNew removes the new container while it still has its temporary
	// name; once renamed, restore's put-back removes it by name.
	dropNew := func(cause error) error {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.callTimeout)
		defer cancel()
		if err := r.parked.removeOther(rctx, newName(name, old.ID), ""); err != nil {
			r.log.Warn("could not remove the new container; the settle will", "container", newName(name, old.ID), "err", err)
			backoff.Wake(r.parked.settle)
		}
		return cause
	}
	if err := r.parked.park(ctx, old.ID, name, pol); err != nil {
		return dropNew(err)
	}
	// restore puts the old container back: whatever is called name now
	// (the new container) is found by name and removed, each step
	// retried (parked.go putBack).
	restore := func(cause error) error {
		if err := r.parked.putBack(ctx, name, old.ID, pol); err != nil {
			return fmt.Errorf("%w; restoring %s failed too: %w", cause, name, err)
		}
		r.log.Warn("restored the old container", "container", name, "err", cause)
		return cause
	}

	ev := r.wait.watch()
	defer ev.close()
	if err := r.stopper.stopOne(ctx, c); err != nil {
		return restore(dropNew(err))
	}
	recreateHook(ctx, "parked") // (parked.go) tests crash here
	rctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	err = r.docker.RenameContainer(docker.RenameContainerOptions{ID: created.ID, Name: name, Context: rctx})
	cancel()
	if err != nil {
		return restore(dropNew(fmt.Errorf("rename the new container to %s: %w", name, err)))
	}
	sctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	err = r.docker.StartContainerWithContext(created.ID, nil, sctx)
	cancel()
	var refused *docker.Error
	switch {
	case errors.As(err, &refused):
		// The daemon answered and refused: the new version cannot run
		// (no such executable, a bad mount of the new image).
		return restore(fmt.Errorf("%w: start %s: %w", errReplacement, name, err)) // errReplacement decides, not the cause (retryable)
	case err != nil:
		return restore(fmt.Errorf("start %s: %w", name, err))
	}
	err = r.wait.wait(ctx, ev, target{name: name, id: created.ID, oldID: old.ID, newID: c.NewID, upAfter: c.policy.up()}, lost)
	switch {
	case err == nil:
	case ctx.Err() != nil && errors.Is(err, ctx.Err()):
		// Shutting down while the new container comes up: keep it
		// unless it has already failed, and finish.
		if ferr := r.judgeNow(ctx, created.ID, c.NewID); ferr != nil {
			return restore(ferr)
		}
		r.log.Info("shutting down while the new container comes up; keeping it", "container", name)
	case errors.Is(err, errNoReplacement):
		return restore(fmt.Errorf("%w: %s vanished: %w", errReplacement, name, err))
	default:
		return restore(err)
	}
	// With force: a dockerd restart may have started it again. A failure
	// is logged, and the settle removes it later.
	_ = r.parked.removeParked(ctx, name, old.ID)
	r.metrics.containersRecreated.Inc()
	r.log.Info("recreated container", "container", name, "old_image", shortID(c.ImageID), "new_image", shortID(c.NewID))
	return ctx.Err()
}

// createNew creates the new container under its temporary name (newName),
// removing first what an earlier attempt or a crash left there. A create
// the runtime refuses with the same answer as the previous try for the
// same container and version is final (errCreateRefused): it will refuse
// it again, and as nothing was stopped, retrying serves nobody. A timeout
// or an unreachable Docker is never final.
func (r *recreator) createNew(ctx context.Context, name, oldID, newID string, cfg *docker.Config, host *docker.HostConfig, netcfg *docker.NetworkingConfig) (*docker.Container, error) {
	tmp := newName(name, oldID)
	if err := r.parked.removeOther(ctx, tmp, ""); err != nil {
		return nil, fmt.Errorf("remove the leftover %s: %w", tmp, err)
	}
	cctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	created, err := r.docker.CreateContainer(docker.CreateContainerOptions{
		Name: tmp, Config: cfg, HostConfig: host, NetworkingConfig: netcfg, Context: cctx,
	})
	cancel()
	if err == nil {
		r.createFailed(oldID, newID, nil)
		return created, nil
	}
	// A create whose answer was lost may have happened.
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.callTimeout)
	if rerr := r.parked.removeOther(rctx, tmp, ""); rerr != nil {
		backoff.Wake(r.parked.settle) // the settle removes it
	}
	cancel()
	var refused *docker.Error
	if !errors.As(err, &refused) {
		// Not the runtime's answer (a timeout, Docker away): it may
		// pass by itself.
		return nil, fmt.Errorf("create %s: %w", name, err)
	}
	err = fmt.Errorf("create %s: %w", name, err)
	if r.createFailed(oldID, newID, err) {
		return nil, fmt.Errorf("%w: the same error twice in a row, not retried for this version: %w", errCreateRefused, err)
	}
	return nil, err
}

// createFailed records the outcome of a create of the container oldID on
// image newID (err nil: it worked) and reports whether it failed as the
// previous create of the same did.
func (r *recreator) createFailed(oldID, newID string, err error) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	key := oldID + " " + newID
	if err == nil {
		delete(r.failures, key)
		return false
	}
	prev, seen := r.failures[key]
	if seen && prev == err.Error() {
		delete(r.failures, key) // left alone from now on (leftalone.go)
		return true
	}
	r.failures[key] = err.Error()
	return false
}

// judgeNow inspects the new container once, with a fresh deadline, and
// returns an error wrapping errReplacement if it has already failed.
func (r *recreator) judgeNow(ctx context.Context, id, newID string) error {
	ictx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.callTimeout)
	defer cancel()
	c, err := r.docker.InspectContainerWithContext(id, ictx)
	if err != nil {
		return fmt.Errorf("inspect the new container: %w", err)
	}
	_, err = judgeUp(c, newID, time.Now())
	return err
}

// recreateHook is called at the named stages of recreate; tests (the e2e
// build tag) use it to crash the deployer at a chosen point.
var recreateHook = func(ctx context.Context, stage string) {}

// checkRecreatable refuses containers recreate cannot replace safely.
//
// --rm (HostConfig.AutoRemove): stopping the container makes Docker delete
// it, and with it its anonymous volumes, so a replacement that fails
// could not be undone, and a crash in the middle would leave nothing to
// put back. Keeping the old configuration in the deployer's memory would
// not survive that crash either, and Docker cannot turn AutoRemove off on
// an existing container. So such containers are refused, with a message
// that says what to do.
func checkRecreatable(old *docker.Container) error {
	name := strings.TrimPrefix(old.Name, "/")
	if old.HostConfig != nil && old.HostConfig.AutoRemove {
		return fmt.Errorf("%w: %s was started with --rm: stopping it would delete it and its anonymous volumes, so a failed replacement could not be undone; "+
			"run it without --rm (with a --restart policy), or give it the label %s=%s and a supervisor", errRefused, name, strategyKey, strategyStop)
	}
	return nil
}
