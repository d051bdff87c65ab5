package main

// restarter.go: finding the stale containers of a repository, and the stop
// strategy: stop one and wait for its supervisor to replace it.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/distribution/reference"
	docker "github.com/fsouza/go-dockerclient"

	"github.com/die-net/deployer/internal/backoff"
)

// containerAPI is the part of the Docker client the restarter uses.
type containerAPI interface {
	// ListContainers lists containers; All includes stopped ones.
	ListContainers(docker.ListContainersOptions) ([]docker.APIContainers, error)
	// InspectContainerWithContext returns a container's configuration,
	// including the image reference it was started with.
	InspectContainerWithContext(id string, ctx context.Context) (*docker.Container, error)
	// StopContainerWithContext stops a container, killing it after
	// timeout seconds.
	StopContainerWithContext(id string, timeout uint, ctx context.Context) error
	// StartContainerWithContext starts a stopped container again.
	StartContainerWithContext(id string, hostConfig *docker.HostConfig, ctx context.Context) error
	// RenameContainer parks a container, and puts it back (parked.go).
	RenameContainer(opts docker.RenameContainerOptions) error
	// UpdateContainer sets a parked container's restart policy to "no",
	// and restores it (parked.go).
	UpdateContainer(id string, opts docker.UpdateContainerOptions) error
	// RemoveContainer removes a parked container once its replacement
	// runs, or what holds its name when it is put back (parked.go).
	RemoveContainer(opts docker.RemoveContainerOptions) error
}

// staleContainer is a running container whose tag now points at another
// image.
type staleContainer struct {
	ID      string
	Name    string
	Ref     reference.NamedTagged // the repo:tag it was started with
	ImageID string                // the image it runs
	NewID   string                // the image the tag points at now
	Labels  map[string]string
	// policy is what the tag's effective policy says to its replacement
	// (policy.go; the deploy sets it); nil: the flags'.
	policy *tagPolicy

	// What the stale scan saw, so that recreate need not ask Docker
	// again right after it (scan.go). The zero value means "not known":
	// recreate inspects and looks for parked containers itself.
	scan scanned
}

// restarter finds the containers of a repository that run an image their
// tag no longer points at, and stops them so that their supervisor
// (systemd, fleet) starts them again from the tag (the stop strategy).
type restarter struct {
	docker      containerAPI
	wait        *upWaiter
	killTimeout time.Duration
	selfID      string // the deployer's own container, never stopped
	callTimeout time.Duration
	parked      *parker    // parks before a stop, puts back (parked.go)
	leftAlone   *leftAlone // pruned of removed containers at every listing; nil: none
	log         *slog.Logger
	metrics     *metrics
}

// newRestarter returns the stop strategy on dc: stops give killTimeout of
// grace, wait judges the replacements, and container selfID (the
// deployer's own, "" outside a container) is never stopped. It starts
// nothing.
func newRestarter(dc containerAPI, wait *upWaiter, killTimeout time.Duration, selfID string, log *slog.Logger, m *metrics) *restarter {
	return &restarter{
		docker: dc, wait: wait, killTimeout: killTimeout, selfID: selfID, callTimeout: callTimeout,
		parked: newParker(dc, killTimeout+callTimeout, wait, log),
		log:    log, metrics: m,
	}
}

// stale returns the running containers of repo started by one of the tags
// in current (tag -> image ID it points at now) that run another image.
// Only containers started by repo:tag count; those started by digest or by
// image ID never move.
func (r *restarter) stale(ctx context.Context, repo reference.Named, current map[string]string) ([]staleContainer, error) {
	lctx, cancel := context.WithTimeout(ctx, r.callTimeout)
	defer cancel()
	at := time.Now() // the scan's age counts from before the list
	// All: the stopped containers show whether a parked one exists
	// (scan.go); only running ones can be stale.
	list, err := r.docker.ListContainers(docker.ListContainersOptions{All: true, Context: lctx})
	if err != nil {
		return nil, fmt.Errorf("list containers: %w", err)
	}
	parked := parkedBases(list)
	r.parked.noteLeftovers(list) // (parked.go) every deploy settles what a crash or a failed put-back left
	if r.leftAlone != nil {
		ids := map[string]bool{}
		for _, c := range list {
			ids[c.ID] = true
		}
		r.leftAlone.prune(ids)
	}
	pick := func(c docker.APIContainers) bool {
		return listedRunning(c) && r.candidate(c, repo) && !r.isSelf(c.ID)
	}
	var out []staleContainer
	for t, err := range runningFromTags(ctx, r.docker, r.callTimeout, list, pick) {
		if err != nil {
			return out, err
		}
		ctr, ref := t.ctr, t.ref
		if !ctr.State.Running || ref == nil || ref.Name() != repo.Name() {
			continue
		}
		newID, ok := current[ref.Tag()]
		if !ok || newID == ctr.Image {
			continue
		}
		out = append(out, staleContainer{
			ID: ctr.ID, Name: strings.TrimPrefix(ctr.Name, "/"), Ref: ref, ImageID: ctr.Image, NewID: newID,
			Labels: ctr.Config.Labels, scan: newScanned(ctr, at, parked),
		})
	}
	r.metrics.staleFound.Add(float64(len(out)))
	return out, nil
}

// candidate tells from the container list alone whether a container may
// belong to repo, so that unrelated containers cost no inspect call. The
// list shows the reference a container was started with while it still
// resolves to the container's image, and the bare image ID once the tag
// has moved.
func (r *restarter) candidate(c docker.APIContainers, repo reference.Named) bool {
	if hexID.MatchString(c.Image) {
		return true
	}
	named, err := reference.ParseNormalizedNamed(c.Image)
	return err == nil && named.Name() == repo.Name()
}

func (r *restarter) isSelf(id string) bool {
	return r.selfID != "" && (strings.HasPrefix(id, r.selfID) || strings.HasPrefix(r.selfID, id))
}

// stopOne stops a container, giving Docker killTimeout seconds before
// SIGKILL. A container already stopped or gone counts as stopped.
func (r *restarter) stopOne(ctx context.Context, c staleContainer) error {
	ctx, cancel := context.WithTimeout(ctx, r.stopBudget())
	defer cancel()
	err := r.docker.StopContainerWithContext(c.ID, uint(r.killTimeout/time.Second), ctx) //nolint:gosec // G115: -kill_timeout is validated non-negative
	var notRunning *docker.ContainerNotRunning
	var gone *docker.NoSuchContainer
	switch {
	case errors.As(err, &notRunning), errors.As(err, &gone):
		r.log.Info("container already gone", "container", c.Name)
		return nil
	case err != nil:
		r.metrics.containersStopped.WithLabelValues("error").Inc()
		return fmt.Errorf("stop %s: %w", c.Name, err)
	}
	r.metrics.containersStopped.WithLabelValues("ok").Inc()
	r.log.Info("stopped stale container", "container", c.Name, "tag", c.Ref.Tag(), "old_image", shortID(c.ImageID), "new_image", shortID(c.NewID))
	return nil
}

// stopBudget is how long a stop may take: Docker waits killTimeout
// seconds before SIGKILL, plus the usual call margin.
func (r *restarter) stopBudget() time.Duration {
	return r.killTimeout + r.callTimeout
}

// stopAndWait is the stop strategy: park the container (parked.go), stop
// it and wait for its supervisor to start the replacement on the new
// image. guard, called just before the first change, may refuse it (the
// rollout slot was lost). When nothing at all replaced the container
// within the bound, the host does not supervise it: the old container is
// put back and started again, and the error wraps errUnsupervised (not a
// failure of the version). When the wait ends otherwise (a shutdown, Docker
// not answering) and nothing replaced it, it is put back too: a container
// the deployer stopped never stays down because the deployer stopped.
func (r *restarter) stopAndWait(ctx context.Context, c staleContainer, guard func(context.Context) error, lost <-chan struct{}) error {
	name := c.Name
	if base, ok := parkedBase(name, c.ID); ok {
		name = base
	}
	release, err := r.parked.hold(ctx, name)
	if err != nil {
		return err
	}
	defer release()
	pol, err := r.settleBeforeStop(ctx, &c)
	if err != nil {
		return err
	}
	ev := r.wait.watch()
	defer ev.close()
	if err := callGuard(ctx, guard); err != nil {
		return err
	}
	start := time.Now()
	if err := r.parked.park(ctx, c.ID, c.Name, pol); err != nil {
		return err
	}
	if err := r.stopOne(ctx, c); err != nil {
		if perr := r.parked.putBack(ctx, c.Name, c.ID, pol); perr != nil {
			return fmt.Errorf("%w; putting %s back failed too: %w", err, c.Name, perr)
		}
		return err
	}
	err = r.wait.wait(ctx, ev, target{name: c.Name, oldID: c.ID, newID: c.NewID, upAfter: c.policy.up()}, lost)
	switch {
	case err == nil:
		r.log.Info("replacement up", "container", c.Name, "image", shortID(c.NewID), "took", time.Since(start).Round(time.Millisecond))
		_ = r.parked.removeParked(ctx, c.Name, c.ID) // as the supervisor's `docker rm -f` would have; logged inside
	case errors.Is(err, errNoReplacement):
		return r.restartOld(ctx, c, pol)
	case errors.Is(err, errReplacement):
		// The supervisor's replacement holds the name: the old
		// container is its business, as it would be unparked.
		_ = r.parked.removeParked(ctx, c.Name, c.ID)
	default:
		// Cut short (a shutdown) or Docker not answering: put it back
		// unless something replaced it; otherwise leave the record to
		// the settle, which judges the replacement.
		r.settleNow(ctx, c, pol)
	}
	return err
}

// settleBeforeStop settles a parked container of c's name that a crash
// left (c may be one itself, running between the rename and the stop;
// c.Name becomes its name), and returns c's restart policy.
func (r *restarter) settleBeforeStop(ctx context.Context, c *staleContainer) (docker.RestartPolicy, error) {
	ctr, noParked := c.scan.fresh(time.Now())
	if !noParked {
		name, err := r.parked.settleParked(ctx, c.Name, c.ID)
		if err != nil {
			return docker.RestartPolicy{}, err
		}
		c.Name, ctr = name, nil
	}
	if ctr == nil {
		ictx, cancel := context.WithTimeout(ctx, r.callTimeout)
		var err error
		ctr, err = r.docker.InspectContainerWithContext(c.ID, ictx)
		cancel()
		if err != nil {
			return docker.RestartPolicy{}, fmt.Errorf("inspect %s: %w", c.Name, err)
		}
	}
	return restartPolicy(ctr), nil
}

// settleNow puts the parked container c back at once when nothing is
// called c.Name; otherwise the settle loop judges what is.
func (r *restarter) settleNow(ctx context.Context, c staleContainer, pol docker.RestartPolicy) {
	ictx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.callTimeout)
	_, err := r.docker.InspectContainerWithContext(c.Name, ictx)
	cancel()
	if !isNoSuchContainer(err) {
		backoff.Wake(r.parked.settle)
		return
	}
	if err := r.parked.putBack(ctx, c.Name, c.ID, pol); err != nil {
		r.log.Error("could not put back the stopped container; will try again", "container", c.Name, "err", err)
		return
	}
	r.log.Warn("the wait for a replacement was cut short and nothing replaced the container: started the old one again",
		"container", c.Name, "image", shortID(c.ImageID))
}

// restartOld puts the stopped container back and starts it again, on its
// old image, when no supervisor replaced it.
func (r *restarter) restartOld(ctx context.Context, c staleContainer, pol docker.RestartPolicy) error {
	r.metrics.unsupervised.Inc()
	if err := r.parked.putBack(ctx, c.Name, c.ID, pol); err != nil {
		r.log.Error("nothing restarted the container, and starting the old one failed; will try again", "container", c.Name, "err", err)
		return fmt.Errorf("nothing restarted %s within %v: is it supervised? Starting the old container failed too: %w (%w)",
			c.Name, r.wait.timeout, err, errUnsupervised)
	}
	r.log.Warn("nothing restarted the container: is it supervised? started the old one again", "container", c.Name,
		"image", shortID(c.ImageID), "waited", r.wait.timeout)
	return fmt.Errorf("nothing restarted %s within %v: is it supervised? The old container runs again on %s (%w)",
		c.Name, r.wait.timeout, shortID(c.ImageID), errUnsupervised)
}
