package main

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestStopDuringUnsupervisedWait: the deployer stops (SIGTERM, or dies)
// while it waits for a replacement of an unsupervised container that
// nothing will replace; once it has stopped (and, after a crash, started
// again), the container runs again on its old image and nothing stays
// parked.
func TestStopDuringUnsupervisedWait(t *testing.T) {
	for _, tt := range []struct {
		name  string
		crash bool // the deployer dies: no Docker call of it gets through
	}{
		{"SIGTERM", false},
		{"SIGKILL", true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f, c := rolloutFixture(t, false)
			f.supervise = false
			f.stopped = make(chan string, 1)
			rs := newTestReplacer(t, nil, f, "n1", 0).restarter
			ctx, stop := context.WithCancel(t.Context())
			defer stop()
			done := make(chan error, 1)
			go func() { done <- rs.stopAndWait(ctx, c, nil, nil) }()
			select {
			case <-f.stopped:
			case err := <-done:
				t.Fatalf("stopAndWait returned before the stop: %v", err)
			case <-time.After(5 * time.Second):
				t.Fatal("app not stopped within 5s")
			}
			if tt.crash {
				f.mu.Lock()
				f.dead = true
				f.mu.Unlock()
			}
			stop() // inside -restart_timeout (5s here)
			select {
			case err := <-done:
				t.Logf("stopAndWait = %v", err)
			case <-time.After(5 * time.Second):
				t.Fatal("stopAndWait still running 5s after the stop")
			}
			if tt.crash {
				f.revive()
				// The deployer starts again.
				recoverAtStart(t, newTestReplacer(t, nil, f, "n1", 0).recreator)
			}
			app := f.containerByName("app")
			if app == nil || !app.Running || app.ID != c.ID {
				t.Fatalf("app after the deployer's stop: %+v; want the old container running", app)
			}
			if p := parkedLeft(f); len(p) != 0 {
				t.Errorf("parked containers left: %v", p)
			}
		})
	}
}

// TestStopOfARunningParkedContainer: a crash between the rename and the
// stop leaves the container running under its parked name, where the next
// deploy finds it stale; it is put back first, then stopped as app.
func TestStopOfARunningParkedContainer(t *testing.T) {
	f, c := rolloutFixture(t, false)
	f.crashAt = "StopContainer"
	rs := newTestReplacer(t, nil, f, "n1", 0).restarter
	if err := rs.stopAndWait(t.Context(), c, nil, nil); !errors.Is(err, errFakeCrashed) {
		t.Fatalf("stopAndWait = %v; want the crash", err)
	}
	f.revive()
	if p := parkedLeft(f); len(p) != 1 {
		t.Fatalf("parked after the crash: %v; want 1", p)
	}
	c.Name = parkedName("app", c.ID) // as stale() finds it
	if err := rs.stopAndWait(t.Context(), c, nil, nil); err != nil {
		t.Fatalf("stopAndWait of the parked container = %v", err)
	}
	if app := f.containerByName("app"); app == nil || !app.Running || app.ImageID != c.NewID {
		t.Errorf("app: %+v; want the supervisor's replacement running %s", app, shortID(c.NewID))
	}
	if p := parkedLeft(f); len(p) != 0 {
		t.Errorf("parked containers left: %v", p)
	}
}
