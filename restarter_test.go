package main

import (
	"context"
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
				newTestReplacer(t, nil, f, "n1", 0).recreator.recoverAtStart(t.Context())
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
