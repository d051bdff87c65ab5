package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	docker "github.com/fsouza/go-dockerclient"
)

// recreate replaces a container on a host with no supervisor: it creates
// a container with the same configuration (name, env, mounts, labels,
// restart policy, command, network mode) on the new image, starts it, and
// removes the old one only when the new one is up. On failure it restores
// the old one.
func (r *rollout) recreate(ctx context.Context, c staleContainer) error {
	// (parked.go) Settle a re-create of this container a crash interrupted.
	if err := r.settleParked(ctx, c); err != nil {
		return err
	}
	ictx, cancel := context.WithTimeout(ctx, r.callTimeout)
	old, err := r.docker.InspectContainerWithContext(c.ID, ictx)
	cancel()
	if err != nil {
		return fmt.Errorf("inspect %s: %w", c.Name, err)
	}
	// (parked.go) Refuse --rm containers.
	if err := checkRecreatable(old); err != nil {
		return err
	}
	// The old image's defaults (env, labels, command) were merged into
	// the container's configuration; leave them out so that the new
	// image's own defaults apply. InspectImage has no context variant.
	var defaults *docker.Config
	if img, err := r.docker.InspectImage(old.Image); err == nil {
		defaults = img.Config
	}
	cfg, host, netcfg := cloneConfig(old, defaults, c.NewID)

	name := strings.TrimPrefix(old.Name, "/")
	parked := parkedName(name, old.ID)
	if err := r.docker.RenameContainer(docker.RenameContainerOptions{ID: old.ID, Name: parked, Context: ctx}); err != nil {
		return fmt.Errorf("rename %s: %w", name, err)
	}
	restore := func(newID string, cause error) error {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.callTimeout+time.Duration(r.killTimeout)*time.Second)
		defer cancel()
		if newID != "" {
			_ = r.docker.RemoveContainer(docker.RemoveContainerOptions{ID: newID, Force: true, Context: rctx})
		}
		if err := r.docker.RenameContainer(docker.RenameContainerOptions{ID: old.ID, Name: name, Context: rctx}); err != nil {
			return fmt.Errorf("%w; restoring %s failed too: %w", cause, name, err)
		}
		if err := r.docker.StartContainerWithContext(old.ID, nil, rctx); err != nil {
			var running *docker.ContainerAlreadyRunning
			if !errors.As(err, &running) {
				return fmt.Errorf("%w; restarting the old %s failed too: %w", cause, name, err)
			}
		}
		r.log.Warn("restored the old container", "container", name, "cause", cause)
		return cause
	}

	if err := r.restarter.stopOne(ctx, c); err != nil {
		return restore("", err)
	}
	recreateHook(ctx, "parked") // (parked.go) tests crash here
	cctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	created, err := r.docker.CreateContainer(docker.CreateContainerOptions{
		Name: name, Config: cfg, HostConfig: host, NetworkingConfig: netcfg, Context: cctx,
	})
	cancel()
	if err != nil {
		return restore("", fmt.Errorf("%w: create %s: %w", errReplacement, name, err))
	}
	sctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	err = r.docker.StartContainerWithContext(created.ID, nil, sctx)
	cancel()
	if err != nil {
		return restore(created.ID, fmt.Errorf("%w: start %s: %w", errReplacement, name, err))
	}
	if err := r.waitUp(ctx, created.ID, c.NewID); err != nil {
		return restore(created.ID, err)
	}
	rctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	defer cancel()
	if err := r.docker.RemoveContainer(docker.RemoveContainerOptions{ID: old.ID, Context: rctx}); err != nil {
		r.log.Warn("could not remove the old container", "container", parked, "err", err)
	}
	r.metrics.containersRecreated.Inc()
	r.log.Info("recreated container", "container", name, "old_image", shortID(c.ImageID), "new_image", shortID(c.NewID))
	return nil
}

// waitUp waits until container id runs and is healthy (or has no
// healthcheck), within the restart timeout.
func (r *rollout) waitUp(ctx context.Context, id, newID string) error {
	deadline := time.Now().Add(r.timeout)
	for {
		ictx, cancel := context.WithTimeout(ctx, r.callTimeout)
		c, err := r.docker.InspectContainerWithContext(id, ictx)
		cancel()
		if err != nil {
			return fmt.Errorf("%w: inspect the new container: %w", errReplacement, err)
		}
		done, err := replacementState(c, newID, time.Now())
		if done || err != nil {
			return err
		}
		if !c.State.Running && !c.State.Restarting {
			return fmt.Errorf("%w: %s exited with code %d", errReplacement, c.Name, c.State.ExitCode)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w: %s not up within %v", errReplacement, c.Name, r.timeout)
		}
		if !sleepCtx(ctx, r.poll) {
			return ctx.Err()
		}
	}
}
