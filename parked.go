package main

// Recovery of re-creates a crash interrupted.
//
// recreate parks the old container as <name>-deployer-old-<short ID>
// (renamed, then stopped) before the new <name> exists. A crash (SIGKILL,
// power loss, OOM) in that window leaves the service down with nothing
// called <name> for a later deploy to act on. recoverParked repairs it, at
// daemon start and before each re-create of <name>:
//
//   - parked, no <name>: the parked container is renamed back and started.
//     The trigger that was being deployed is replayed (the watermark did
//     not pass it), so the re-create is then done again from the start.
//   - parked and <name> up (running, not restarting, healthy or without a
//     healthcheck, for at least parkedMinUp): the re-create had got that
//     far; the parked container is removed, which finishes it.
//   - parked and <name> not up (created but never started, exited, crash
//     looping, unhealthy, or still starting after -restart_timeout): the
//     re-create failed or never finished; <name> is removed and the parked
//     container is put back, as recreate's own restore would have done.

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	docker "github.com/fsouza/go-dockerclient"
)

const parkedInfix = "-deployer-old-"

// errRefused marks a container recreate will not replace. It is final and
// local to this node: retrying will not help, and the version is not at
// fault.
var errRefused = errors.New("recreate refused")

// recreateHook is called at the named stages of recreate; tests (the e2e
// build tag) use it to crash the deployer at a chosen point.
var recreateHook = func(ctx context.Context, stage string) {}

// parkedName is the name recreate gives the old container while the new
// one comes up.
func parkedName(name, id string) string { return name + parkedInfix + shortID(id) }

// parkedBase returns the name a parked container had: only a name that
// ends in the container's own short ID counts. Names with another slash
// are legacy link aliases (/other/alias), not the container's name.
func parkedBase(name, id string) (string, bool) {
	name = strings.TrimPrefix(name, "/")
	base, ok := strings.CutSuffix(name, parkedInfix+shortID(id))
	return base, ok && base != "" && !strings.Contains(name, "/")
}

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

// recoverAtStart runs recoverParked for every parked container before the
// daemon acts on any trigger, within the restart timeout (a replacement
// may still be coming up) plus a call timeout. When Docker does not
// answer, it retries in the background until ctx ends, so that the daemon
// does not wait for Docker to start; deploys cannot act meanwhile either.
func (r *recreator) recoverAtStart(ctx context.Context) {
	sctx, cancel := context.WithTimeout(ctx, r.wait.timeout+r.callTimeout)
	err := r.recoverParked(sctx, "")
	cancel()
	if err == nil || ctx.Err() != nil {
		return
	}
	r.log.Warn("could not recover parked containers at start; retrying in the background", "err", err)
	go func() {
		for attempt := 1; sleepCtx(ctx, backoff(time.Second, attempt)); attempt++ {
			err := r.recoverParked(ctx, "")
			if err == nil {
				r.log.Info("recovered parked containers", "attempt", attempt+1)
				return
			}
			r.log.Debug("recovering parked containers", "attempt", attempt+1, "err", err)
		}
	}()
}

// settleParked runs recoverParked for the container recreate is about to
// replace. A stale container may itself be a parked one that a crash left
// running (between the rename and the stop): it is put back under its
// name first, and re-created as that.
func (r *recreator) settleParked(ctx context.Context, c staleContainer) error {
	name := strings.TrimPrefix(c.Name, "/")
	if base, ok := parkedBase(name, c.ID); ok {
		name = base
	}
	return r.recoverParked(ctx, name)
}

// recoverParked puts back or finishes the re-creates a crash interrupted:
// those of the container called only, or of every container when only is
// "".
func (r *recreator) recoverParked(ctx context.Context, only string) error {
	lctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	list, err := r.docker.ListContainers(docker.ListContainersOptions{All: true, Context: lctx})
	cancel()
	if err != nil {
		return fmt.Errorf("list containers: %w", err)
	}
	var errs []error
	for _, c := range list {
		for _, n := range c.Names {
			base, ok := parkedBase(n, c.ID)
			if !ok || (only != "" && base != only) {
				continue
			}
			if err := r.recoverOne(ctx, base, c.ID); err != nil {
				errs = append(errs, fmt.Errorf("recover %s: %w", base, err))
			}
		}
	}
	return errors.Join(errs...)
}

// recoverOne settles one parked container beside name (see the top of the
// file).
func (r *recreator) recoverOne(ctx context.Context, name, parkedID string) error {
	up, curID, err := r.settled(ctx, name, parkedID)
	if err != nil {
		return err
	}
	// The rest must not be cut short by a shutdown: a rename without the
	// start leaves the service down.
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*r.callTimeout+r.stopper.stopBudget())
	defer cancel()
	if up {
		if err := r.docker.RemoveContainer(docker.RemoveContainerOptions{ID: parkedID, Force: true, Context: wctx}); err != nil && !isNoSuchContainer(err) {
			return fmt.Errorf("remove the parked container: %w", err)
		}
		r.log.Warn("finished an interrupted re-create: removed the parked container", "container", name, "parked", parkedName(name, parkedID))
		return nil
	}
	if curID != "" {
		if err := r.docker.RemoveContainer(docker.RemoveContainerOptions{ID: curID, Force: true, Context: wctx}); err != nil && !isNoSuchContainer(err) {
			return fmt.Errorf("remove the replacement that is not up: %w", err)
		}
	}
	if err := r.docker.RenameContainer(docker.RenameContainerOptions{ID: parkedID, Name: name, Context: wctx}); err != nil {
		return fmt.Errorf("rename the parked container back: %w", err)
	}
	if err := r.docker.StartContainerWithContext(parkedID, nil, wctx); err != nil {
		var running *docker.ContainerAlreadyRunning
		if !errors.As(err, &running) {
			return fmt.Errorf("start the parked container: %w", err)
		}
	}
	r.log.Warn("put back a container an interrupted re-create had parked", "container", name, "id", shortID(parkedID), "replacement_removed", shortID(curID))
	return nil
}

// settled inspects the container called name until it is up or has
// failed, within the restart timeout. It returns whether it is up and its
// ID ("" when there is none).
func (r *recreator) settled(ctx context.Context, name, parkedID string) (bool, string, error) {
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
		if !sleepCtx(ctx, r.wait.poll) {
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

func isNoSuchContainer(err error) bool {
	var gone *docker.NoSuchContainer
	return errors.As(err, &gone)
}
