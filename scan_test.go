package main

import (
	"context"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
)

// dockerCalls returns how many container listings and inspects f served.
func dockerCalls(f *fakeDocker) (lists, inspects int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.listedAt), f.inspects
}

// TestRecreateUsesTheScan: a re-create right after the stale scan lists
// and inspects nothing again before it parks the old container: the
// scan's listing (stopped containers included) showed no parked one, and
// its inspect has the configuration.
func TestRecreateUsesTheScan(t *testing.T) {
	f, want := rolloutFixture(t, false)
	f.supervise = false
	p := newTestReplacer(t, nil, f, "n1", 0)
	stale, err := p.restarter.stale(t.Context(), testRepo(t, "reg:5000/app"), map[string]string{"qa": want.NewID})
	if err != nil || len(stale) != 1 || stale[0].ID != want.ID {
		t.Fatalf("stale = %+v, %v; want %s", stale, err, want.Name)
	}
	lists, inspects := -1, -1
	guard := func(context.Context) error { // just before the rename
		lists, inspects = dockerCalls(f)
		return nil
	}
	if err := p.recreator.recreate(t.Context(), stale[0], guard, nil); err != nil {
		t.Fatalf("recreate = %v", err)
	}
	if lists != 1 || inspects != 1 {
		t.Errorf("before the rename: %d container listings and %d inspects; want 1 and 1 (the scan's)", lists, inspects)
	}
	if app := f.containerByName("app"); app == nil || !app.Running || app.ImageID != want.NewID {
		t.Errorf("app: %+v; want it running %s", app, shortID(want.NewID))
	}
}

// TestRecreateSettlesAParkedContainerTheScanSaw: a stopped parked
// container, which only a listing of all containers shows, is settled
// before the next re-create of its name, as when recreate looked itself.
func TestRecreateSettlesAParkedContainerTheScanSaw(t *testing.T) {
	f, c := rolloutFixture(t, false)
	f.supervise = false
	f.crashAt = "RemoveContainer" // the new container up, the old one left parked
	p := newTestReplacer(t, nil, f, "n1", 0)
	if err := p.recreator.recreate(t.Context(), c, nil, nil); err != nil {
		t.Fatalf("recreate = %v; want success (a failed removal of the old container is only logged)", err)
	}
	f.revive()
	if left := parkedLeft(f); len(left) != 1 {
		t.Fatalf("parked containers after the crash: %v; want 1", left)
	}
	const third = "sha256:3333333333333333333333333333333333333333333333333333333333333333"
	f.mu.Lock()
	f.local["reg:5000/app:qa"] = third
	f.mu.Unlock()
	stale, err := p.restarter.stale(t.Context(), testRepo(t, "reg:5000/app"), map[string]string{"qa": third})
	if err != nil || len(stale) != 1 || stale[0].Name != "app" {
		t.Fatalf("stale = %+v, %v; want app alone (the parked container is stopped)", stale, err)
	}
	if err := p.recreator.recreate(t.Context(), stale[0], nil, nil); err != nil {
		t.Fatalf("second recreate = %v", err)
	}
	if app := f.containerByName("app"); app == nil || !app.Running || app.ImageID != third {
		t.Errorf("app after the second recreate: %+v; want it running %s", app, shortID(third))
	}
	if left := parkedLeft(f); len(left) != 0 {
		t.Errorf("parked containers left: %v", left)
	}
}

// TestStaleSkipsStoppedContainers: listing all containers does not make
// a stopped one stale.
func TestStaleSkipsStoppedContainers(t *testing.T) {
	f, c := rolloutFixture(t, false)
	stopped := f.addContainer("stopped", "reg:5000/app:qa")
	f.mu.Lock()
	stopped.Running, stopped.ImageID = false, c.ImageID
	f.mu.Unlock()
	p := newTestReplacer(t, nil, f, "n1", 0)
	stale, err := p.restarter.stale(t.Context(), testRepo(t, "reg:5000/app"), map[string]string{"qa": c.NewID})
	if err != nil || len(stale) != 1 || stale[0].Name != "app" {
		t.Errorf("stale = %+v, %v; want app alone", stale, err)
	}
	if _, inspects := dockerCalls(f); inspects != 1 {
		t.Errorf("%d inspects; want 1: a stopped container costs none", inspects)
	}
}

func TestScannedFresh(t *testing.T) {
	at := time.Unix(1000, 0)
	ctr := &docker.Container{ID: "0123456789abcdef0123", Name: "/app"}
	parkedID := "fedcba9876543210fedc"
	tests := []struct {
		name         string
		s            scanned
		now          time.Time
		wantCtr      bool
		wantNoParked bool
	}{
		{"just scanned", newScanned(ctr, at, map[string]bool{}), at.Add(time.Millisecond), true, true},
		{"parked beside it", newScanned(ctr, at, map[string]bool{"app": true}), at, true, false},
		{"another name parked", newScanned(ctr, at, map[string]bool{"web": true}), at, true, true},
		{"itself parked", newScanned(&docker.Container{ID: parkedID, Name: "/" + parkedName("app", parkedID)}, at, map[string]bool{}), at, true, false},
		{"after a wait", newScanned(ctr, at, map[string]bool{}), at.Add(scanFresh + time.Millisecond), false, false},
		{"clock went back", newScanned(ctr, at, map[string]bool{}), at.Add(-time.Second), false, false},
		{"not scanned", scanned{}, at, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, noParked := tt.s.fresh(tt.now)
			if (got != nil) != tt.wantCtr || noParked != tt.wantNoParked {
				t.Errorf("fresh = %v, %v; want the inspect: %v, no parked: %v", got != nil, noParked, tt.wantCtr, tt.wantNoParked)
			}
		})
	}
}

func TestListedRunning(t *testing.T) {
	for state, want := range map[string]bool{
		"running": true, "restarting": true, "paused": true, "": true,
		"created": false, "exited": false, "dead": false, "removing": false,
	} {
		if got := listedRunning(docker.APIContainers{State: state}); got != want {
			t.Errorf("listedRunning(%q) = %v; want %v", state, got, want)
		}
	}
}
