//go:build e2e

package main

// Real-stack scenario of issue 13: the status record follows Docker's
// event stream (not a 5-second listing), and survives a dockerd restart.

import (
	"syscall"
	"testing"
	"time"
)

func TestE2EStatusEvents(t *testing.T) {
	t.Parallel() // a stack of its own; three run at once (make e2e: -parallel 3)
	s := newStackWith(t, 1, 1)
	n := s.nodes[0]
	ref := s.hub.host() + "/myorg/evt:qa"
	id := s.buildKind(ref, "idle")
	s.dockerCLI(n.dockerd, "pull", "-q", ref)

	// containers returns the names in node1's record running ref.
	containers := func() map[string]bool {
		out := map[string]bool{}
		for _, ns := range s.status(n).Nodes {
			for _, c := range ns.Containers {
				if c.Image == ref && c.ImageID == id {
					out[c.Name] = true
				}
			}
		}
		return out
	}
	// The resync is 5 minutes (the old listing was every 5 s): anything
	// within 2 s came from an event.
	const bound = 2 * time.Second

	s.dockerCLI(n.dockerd, "run", "-d", "--name", "evt1", "--network", "none", ref)
	took := waitFor(t, bound, "evt1 in the status record", func() bool { return containers()["evt1"] })
	s.record("scenario S-1: a container started by hand is in the status record %v later", took.Round(time.Millisecond))

	s.dockerCLI(n.dockerd, "rm", "-f", "evt1")
	took = waitFor(t, bound, "evt1 out of the status record", func() bool { return !containers()["evt1"] })
	s.record("scenario S-2: removed by hand, out of the status record %v later", took.Round(time.Millisecond))

	// dockerd restarts: the event stream ends and the deployer subscribes
	// again (with a backoff); a container started afterwards is seen.
	n.dockerd.proc.stop(syscall.SIGTERM, 20*time.Second)
	d := s.startDockerd(n.name)
	s.waitDockerd(d)
	n.dockerd = d
	start := time.Now()
	s.dockerCLI(n.dockerd, "run", "-d", "--name", "evt2", "--network", "none", ref)
	waitFor(t, 40*time.Second, "evt2 in the status record after the dockerd restart", func() bool { return containers()["evt2"] })
	s.record("scenario S-3: after a dockerd restart, a container started by hand is in the status record %v later",
		time.Since(start).Round(time.Millisecond))
}
