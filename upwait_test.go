package main

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
)

// TestDockerTroubleDoesNotHalt: a wait that cannot judge the replacement
// because dockerd hung or restarted is node-local: no halt record, and a
// retryable error, or success once dockerd is back and the version comes
// up. A restart stops every container with exit code 0 (stopDaemon), which
// is the daemon's doing, not the version's; a version that fails once
// dockerd is back still halts.
func TestDockerTroubleDoesNotHalt(t *testing.T) {
	hung := fmt.Errorf("inspect: %w", context.DeadlineExceeded)
	tests := []struct {
		name     string
		strategy string
		restart  string // the old container's restart policy (recreate copies it)
		fault    string // "hang": inspects fail once the replacement was seen; "restart": dockerd restarts then
		crash    bool   // the version crashes once dockerd is back and the wait has seen it
		want     string // "up", "retry" or "halt"
	}{
		{name: "inspects fail after the replacement was seen (stop)", strategy: strategyStop, fault: "hang", want: "retry"},
		{name: "inspects fail after the replacement was seen (recreate)", strategy: strategyRecr, restart: "unless-stopped", fault: "hang", want: "retry"},
		{name: "dockerd restarts; the supervisor runs the version again (stop)", strategy: strategyStop, fault: "restart", want: "up"},
		{name: "dockerd restarts; its restart policy runs it again (recreate)", strategy: strategyRecr, restart: "unless-stopped", fault: "restart", want: "up"},
		{name: "dockerd restarts; nothing runs it again (recreate, --restart no)", strategy: strategyRecr, restart: "no", fault: "restart", want: "retry"},
		{name: "dockerd restarts, then the version crashes (stop)", strategy: strategyStop, fault: "restart", crash: true, want: "halt"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, c := rolloutFixture(t, false)
			f.supervise = tt.strategy == strategyStop
			f.health = "starting" // seen, not up yet
			if tt.restart != "" {
				f.containerByName("app").HostConfig = &docker.HostConfig{NetworkMode: "none", RestartPolicy: docker.RestartPolicy{Name: tt.restart}}
			}
			p := newTestReplacer(t, testNS(t), f, "n1", 1)
			p.strategy = tt.strategy
			p.restarter.wait.timeout = time.Second

			// seen receives each replacement the wait inspects, once.
			seen := make(chan string, 8)
			inspected := map[string]int{}
			f.inspectHook = func(ctr *docker.Container) error { // f.mu is held
				if ctr.Image != c.NewID {
					return nil
				}
				if inspected[ctr.ID]++; inspected[ctr.ID] == 1 {
					seen <- ctr.ID
				}
				if tt.fault == "hang" && inspected[ctr.ID] > 1 {
					return hung
				}
				return nil
			}
			done := make(chan []outcome, 1)
			go func() { done <- p.replace(t.Context(), []staleContainer{c}) }()

			first := mustGet(t, seen, "the replacement seen")
			if tt.fault == "restart" {
				f.stopDaemon()
				// A restart takes seconds: the wait finds dockerd down
				// before it is back.
				eventually(t, 20*time.Second, "the wait to find dockerd down", func() bool {
					f.mu.Lock()
					defer f.mu.Unlock()
					return f.goneCalls > 0 || len(done) > 0
				})
				if !tt.crash {
					f.mu.Lock()
					f.health = "healthy"
					f.mu.Unlock()
				}
				f.startDaemon()
				if tt.crash {
					again := first
				next:
					for again == first {
						select {
						case again = <-seen:
						case o := <-done: // over already: judged below
							done <- o
							break next
						case <-time.After(20 * time.Second):
							t.Fatal("the supervisor's new replacement never seen")
						}
					}
					f.mu.Lock()
					for _, x := range f.containers {
						if x.ID == again {
							x.Running, x.Exited = false, true
							f.emit("die", x)
						}
					}
					f.mu.Unlock()
				}
			}
			out := mustGet(t, done, "replace")
			if len(out) != 1 {
				t.Fatalf("replace = %+v; want one outcome", out)
			}
			err := out[0].err
			if tt.fault == "hang" {
				// dockerd answers again: what the deploy could not put
				// back (its record, the parked name, stays) is settled.
				f.mu.Lock()
				f.inspectHook = nil
				f.mu.Unlock()
				if err := p.restarter.parked.recoverParked(t.Context(), ""); err != nil {
					t.Fatal(err)
				}
			}
			h, _, herr := p.rollout.halted(t.Context(), "reg:5000/app:qa")
			if herr != nil {
				t.Fatal(herr)
			}
			ctr, ierr := f.InspectContainerWithContext("app", t.Context())
			switch tt.want {
			case "up":
				if err != nil || out[0].skipped != "" {
					t.Errorf("replace = %+v; want the new version up", out[0])
				}
				if ierr != nil || ctr.Image != c.NewID || !ctr.State.Running {
					t.Errorf("app = %+v, %v; want it running %s", ctr, ierr, shortID(c.NewID))
				}
			case "retry":
				if err == nil || errors.Is(err, errReplacement) || !errors.Is(err, errDockerAway) || !retryable(err) {
					t.Errorf("replace = %v; want a retryable node-local error (errDockerAway)", err)
				}
				if tt.strategy == strategyRecr && (ierr != nil || ctr.ID != c.ID || !ctr.State.Running) {
					t.Errorf("app = %+v, %v; want the old container running again", ctr, ierr)
				}
			case "halt":
				if !errors.Is(err, errReplacement) {
					t.Errorf("replace = %v; want errReplacement: it crashed while dockerd answered", err)
				}
				if h == nil || h.ImageID != c.NewID {
					t.Errorf("halt record = %+v; want one for %s", h, shortID(c.NewID))
				}
			}
			if tt.want != "halt" && h != nil {
				t.Errorf("halt record %+v; dockerd's trouble must never halt the version", h)
			}
		})
	}
}
