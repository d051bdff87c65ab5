package main

// scan.go: what the stale scan already knows about a container, carried
// to recreate, so that re-creating a container found a moment ago costs no
// second container listing (for parked containers) and no second inspect;
// and the one walk of a listing that inspects each container and finds
// the tag it was started from (the stale scan, the re-pull, the status).

import (
	"context"
	"fmt"
	"iter"
	"strconv"
	"strings"
	"time"

	"github.com/distribution/reference"
	docker "github.com/fsouza/go-dockerclient"
)

// scanFresh is how old the stale scan's view of a container may be for
// recreate to act on it. A deploy goes from the scan to the re-create in
// milliseconds unless it waited (for a rollout slot, or for the
// replacements before it); after such a wait recreate asks Docker again.
const scanFresh = 5 * time.Second

// scanned is the stale scan's view of one container.
type scanned struct {
	ctr *docker.Container // its inspect
	at  time.Time         // when the containers were listed
	// noParked: the scan's list, stopped containers included, had no
	// parked container of this name, and this one is not parked itself.
	// Only a replacement (either strategy) parks a container, and
	// deploys of one repository do not overlap; a crash that leaves one
	// behind restarts the deployer, whose recovery at start settles it,
	// and a put-back that gave up wakes the settle (parked.go).
	noParked bool
}

// newScanned records the inspect ctr of a stale container, from a list
// made at at, in which parked holds the names parked containers had.
func newScanned(ctr *docker.Container, at time.Time, parked map[string]bool) scanned {
	name := strings.TrimPrefix(ctr.Name, "/")
	_, isParked := parkedBase(name, ctr.ID)
	return scanned{ctr: ctr, at: at, noParked: !isParked && !parked[name]}
}

// fresh returns the scan's inspect when it is recent enough to stand for
// a new one, and whether no parked container of the name existed then;
// nil when recreate must ask Docker itself.
func (s scanned) fresh(now time.Time) (ctr *docker.Container, noParked bool) {
	if s.ctr == nil || now.Sub(s.at) > scanFresh || now.Before(s.at) {
		return nil, false
	}
	return s.ctr, s.noParked
}

// parkedBases returns the names of the containers parked in list, and of
// those a re-create's new container still has its temporary name beside
// (newName): both are records to settle (parked.go).
func parkedBases(list []docker.APIContainers) map[string]bool {
	out := map[string]bool{}
	for _, c := range list {
		for _, n := range c.Names {
			if base, ok := parkedBase(n, c.ID); ok {
				out[base] = true
			}
			if base, ok := newBase(n); ok {
				out[base] = true
			}
		}
	}
	return out
}

// listedRunning tells whether a listed container would be listed without
// All: Docker's running, restarting and paused states. A list without
// states (an old API) counts it as running; the inspect decides then.
func listedRunning(c docker.APIContainers) bool {
	switch c.State {
	case "created", "exited", "dead", "removing":
		return false
	}
	return true
}

const parkedInfix = "-deployer-old-"

// newInfix marks the new container of a re-create while it has its
// temporary name: <name>-deployer-new-<the old container's short ID>.
const newInfix = "-deployer-new-"

// newName is the temporary name of the new container that replaces the
// container oldID, called name.
func newName(name, oldID string) string { return name + newInfix + shortID(oldID) }

// newBase returns the name of the container a container called name (its
// temporary name) was created to replace.
func newBase(name string) (string, bool) {
	name = strings.TrimPrefix(name, "/")
	i := strings.LastIndex(name, newInfix)
	if i <= 0 || strings.Contains(name, "/") || !hexID.MatchString(name[i+len(newInfix):]) || len(name)-i-len(newInfix) != 12 {
		return "", false
	}
	return name[:i], true
}

// parkedName is the name a container with no restart policy to restore
// has while parked.
func parkedName(name, id string) string { return name + parkedInfix + shortID(id) }

// parkedNameWith is the name a container with restart policy pol has
// while parked: the policy it gets back is the suffix.
func parkedNameWith(name, id string, pol docker.RestartPolicy) string {
	if !restarts(pol) {
		return parkedName(name, id)
	}
	s := pol.Name
	if pol.Name == "on-failure" && pol.MaximumRetryCount > 0 {
		s += "-" + strconv.Itoa(pol.MaximumRetryCount)
	}
	return parkedName(name, id) + "." + s
}

// restarts tells whether dockerd may start a container with policy pol by
// itself.
func restarts(pol docker.RestartPolicy) bool {
	return pol.Name != "" && pol.Name != "no"
}

// parseParked splits a parked container's name: the name it had, and the
// restart policy to give it back (zero when none). Only a name with the
// container's own short ID counts. Names with another slash are legacy
// link aliases (/other/alias), not the container's name.
func parseParked(name, id string) (base string, pol docker.RestartPolicy, ok bool) {
	name = strings.TrimPrefix(name, "/")
	mark := parkedInfix + shortID(id)
	i := strings.LastIndex(name, mark)
	if i <= 0 || strings.Contains(name, "/") {
		return "", pol, false
	}
	base, rest := name[:i], name[i+len(mark):]
	switch {
	case rest == "":
	case rest == ".always", rest == ".unless-stopped", rest == ".on-failure":
		pol.Name = rest[1:]
	case strings.HasPrefix(rest, ".on-failure-"):
		n, err := strconv.Atoi(strings.TrimPrefix(rest, ".on-failure-"))
		if err != nil || n <= 0 {
			return "", pol, false
		}
		pol = docker.RestartOnFailure(n)
	default:
		return "", pol, false
	}
	return base, pol, true
}

// parkedBase returns the name a parked container had.
func parkedBase(name, id string) (string, bool) {
	base, _, ok := parseParked(name, id)
	return base, ok
}

// restartPolicy returns a container's restart policy (zero when unknown).
func restartPolicy(c *docker.Container) docker.RestartPolicy {
	if c == nil || c.HostConfig == nil {
		return docker.RestartPolicy{}
	}
	return c.HostConfig.RestartPolicy
}

// inspector reads a container (ID or name).
type inspector interface {
	InspectContainerWithContext(id string, ctx context.Context) (*docker.Container, error)
}

// fromTag is a listed container, its inspect, and the tag reference it
// was started from: nil when it was started by digest or by image ID.
type fromTag struct {
	listed docker.APIContainers
	ctr    *docker.Container
	ref    reference.NamedTagged
}

// runningFromTags inspects, in order, the containers of list (the caller's
// one listing) that pick selects (nil: all), each call within timeout, and
// yields each with the tag it was started from (containerRef). A container
// gone since the listing, or inspected without a configuration, is
// skipped; any other failed inspect is yielded as an error, and the caller
// skips that container or stops.
func runningFromTags(ctx context.Context, dc inspector, timeout time.Duration, list []docker.APIContainers, pick func(docker.APIContainers) bool) iter.Seq2[fromTag, error] {
	return func(yield func(fromTag, error) bool) {
		for _, c := range list {
			if pick != nil && !pick(c) {
				continue
			}
			ictx, cancel := context.WithTimeout(ctx, timeout)
			ctr, err := dc.InspectContainerWithContext(c.ID, ictx)
			cancel()
			if isNoSuchContainer(err) {
				continue
			}
			if err != nil {
				if !yield(fromTag{listed: c}, fmt.Errorf("inspect container %s: %w", shortID(c.ID), err)) {
					return
				}
				continue
			}
			if ctr.Config == nil {
				continue
			}
			t := fromTag{listed: c, ctr: ctr}
			if ref, ok := containerRef(ctr.Config.Image, ctr.Image); ok {
				t.ref = ref
			}
			if !yield(t, nil) {
				return
			}
		}
	}
}
