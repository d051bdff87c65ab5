package main

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
)

// parkedLeft returns the names of the parked containers in f.
func parkedLeft(f *fakeDocker) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, c := range f.containers {
		if strings.Contains(c.Name, parkedInfix) {
			out = append(out, c.Name)
		}
	}
	return out
}

// TestRecreateCrashRecovery: the deployer dies just before one of
// recreate's Docker calls; at the next start the service runs again, on
// the old or the new image, and no parked container is left.
func TestRecreateCrashRecovery(t *testing.T) {
	tests := []struct {
		crashAt string // the call that never happens
		onNew   bool   // the recovery keeps the new container
	}{
		{"CreateContainer", false},     // nothing done yet
		{"RenameContainer", false},     // the new one created under its temporary name, the old one serving
		{"StopContainer", false},       // the old one renamed, still running
		{"RenameContainer:app", false}, // the old one renamed and stopped, no <name>
		{"StartContainer", false},      // the new one created and named, never started
		{"RemoveContainer", true},      // the new one up, the old one parked
	}
	for _, tt := range tests {
		t.Run(tt.crashAt, func(t *testing.T) {
			f, c := rolloutFixture(t, false)
			f.supervise = false
			f.crashAt = tt.crashAt
			r := newTestReplacer(t, nil, f, "n1", 0).recreator
			// (A failed removal of the old container is only logged.)
			if err := r.recreate(t.Context(), c, nil, nil); !errors.Is(err, errFakeCrashed) && (err != nil || tt.crashAt != "RemoveContainer") {
				t.Fatalf("recreate with a crash before %s = %v; want the crash", tt.crashAt, err)
			}
			f.revive()
			recoverAtStart(t, r)
			app := f.containerByName("app")
			if app == nil || !app.Running {
				t.Fatalf("after recovery: app %+v; want it running", app)
			}
			if got := app.ID != c.ID; got != tt.onNew {
				t.Errorf("after recovery: app is the new container: %v; want %v", got, tt.onNew)
			}
			if p := parkedLeft(f); len(p) != 0 {
				t.Errorf("parked containers left: %v", p)
			}
			f.mu.Lock()
			n := len(f.containers)
			f.mu.Unlock()
			if n != 1 {
				t.Errorf("%d containers after recovery; want 1", n)
			}
		})
	}
}

// TestRecreateSettlesParkedFirst: a parked container left by a crash is
// settled before the next re-create of its name.
func TestRecreateSettlesParkedFirst(t *testing.T) {
	f, c := rolloutFixture(t, false)
	f.supervise = false
	f.crashAt = "RemoveContainer"
	r := newTestReplacer(t, nil, f, "n1", 0).recreator
	if err := r.recreate(t.Context(), c, nil, nil); err != nil {
		t.Fatalf("recreate = %v; want success (a failed removal of the old container is only logged)", err)
	}
	if p := parkedLeft(f); len(p) != 1 {
		t.Fatalf("parked containers after the crash: %v; want 1", p)
	}
	f.revive()
	// No start-time recovery (Docker was down then); a newer push.
	const third = "sha256:3333333333333333333333333333333333333333333333333333333333333333"
	f.mu.Lock()
	f.local["reg:5000/app:qa"] = third
	f.mu.Unlock()
	cur := f.containerByName("app")
	next := staleContainer{ID: cur.ID, Name: "app", Ref: testTagged("reg:5000/app:qa"), ImageID: c.NewID, NewID: third}
	if err := r.recreate(t.Context(), next, nil, nil); err != nil {
		t.Fatalf("second recreate = %v", err)
	}
	if app := f.containerByName("app"); app == nil || !app.Running || app.ImageID != third {
		t.Errorf("app after the second recreate: %+v; want it running %s", app, shortID(third))
	}
	if p := parkedLeft(f); len(p) != 0 {
		t.Errorf("parked containers left: %v", p)
	}
}

// TestRecoverAtStartDockerDown: with Docker down at start, the recovery
// does not hold up the daemon and happens once Docker answers.
func TestRecoverAtStartDockerDown(t *testing.T) {
	f, c := rolloutFixture(t, false)
	f.supervise = false
	f.crashAt = "RenameContainer:app" // parked and stopped, no app
	r := newTestReplacer(t, nil, f, "n1", 0).recreator
	_ = r.recreate(t.Context(), c, nil, nil)
	f.revive()
	f.mu.Lock()
	f.listErr = errors.New("cannot connect to the Docker daemon")
	f.mu.Unlock()
	returned := make(chan struct{})
	go func() { recoverAtStart(t, r); close(returned) }()
	select {
	case <-returned:
	case <-time.After(5 * time.Second):
		t.Fatal("recoverAtStart blocked while Docker was down")
	}
	f.mu.Lock()
	f.listErr = nil
	f.mu.Unlock()
	eventually(t, 10*time.Second, "the parked container put back after Docker's return", func() bool {
		app := f.containerByName("app")
		return app != nil && app.Running
	})
}

// TestRecreateRefusesAutoRemove: a --rm container is left alone, with an
// error that says why.
func TestRecreateRefusesAutoRemove(t *testing.T) {
	f, c := rolloutFixture(t, false)
	f.supervise = false
	fc := f.containerByName("app")
	fc.HostConfig = &docker.HostConfig{NetworkMode: "none", AutoRemove: true}
	r := newTestReplacer(t, nil, f, "n1", 0).recreator
	err := r.recreate(t.Context(), c, nil, nil)
	if !errors.Is(err, errRefused) || errors.Is(err, errReplacement) || !strings.Contains(err.Error(), "--rm") {
		t.Errorf("recreate of a --rm container = %v; want errRefused naming --rm", err)
	}
	if app := f.containerByName("app"); app == nil || app.ID != c.ID || !app.Running {
		t.Errorf("app after a refused recreate: %+v; want the old container running", app)
	}
}

// TestRecreateKeepsVolumes: through recreate and a fake that, like
// Docker, gives a new container a new anonymous volume for every
// Config.Volumes path nothing else mounts.
func TestRecreateKeepsVolumes(t *testing.T) {
	f, c := rolloutFixture(t, false)
	f.supervise = false
	fc := f.containerByName("app")
	fc.Config = &docker.Config{Image: "reg:5000/app:qa", Volumes: map[string]struct{}{"/var/lib/db": {}}}
	fc.HostConfig = &docker.HostConfig{NetworkMode: "none", Binds: []string{"named:/named:ro"}}
	fc.Mounts = []docker.Mount{
		{Name: "anon1", Source: "/var/lib/docker/volumes/anon1/_data", Destination: "/var/lib/db", Driver: "local", RW: true},
		{Name: "named", Source: "/var/lib/docker/volumes/named/_data", Destination: "/named", Driver: "local", Mode: "ro"},
	}
	r := newTestReplacer(t, nil, f, "n1", 0).recreator
	if err := r.recreate(t.Context(), c, nil, nil); err != nil {
		t.Fatal(err)
	}
	app, err := f.InspectContainerWithContext("app", t.Context())
	if err != nil || app.ID == c.ID {
		t.Fatalf("app after recreate: %v, %v", app, err)
	}
	got := map[string]docker.Mount{}
	for _, m := range app.Mounts {
		got[m.Destination] = m
	}
	for _, want := range fc.Mounts {
		if m := got[want.Destination]; m.Name != want.Name || m.RW != want.RW {
			t.Errorf("new container mounts %+v at %s; want volume %s (rw %v)", m, want.Destination, want.Name, want.RW)
		}
	}
}

func TestUpState(t *testing.T) {
	now := time.Unix(1000, 0)
	tests := []struct {
		name        string
		s           docker.State
		up, pending bool
	}{
		{"running a while", docker.State{Running: true, StartedAt: now.Add(-time.Minute)}, true, false},
		{"just started", docker.State{Running: true, StartedAt: now}, false, true},
		{"healthy", docker.State{Running: true, StartedAt: now, Health: docker.Health{Status: "healthy"}}, true, false},
		{"health starting", docker.State{Running: true, StartedAt: now.Add(-time.Minute), Health: docker.Health{Status: "starting"}}, false, true},
		{"unhealthy", docker.State{Running: true, Health: docker.Health{Status: "unhealthy"}}, false, false},
		{"crash loop", docker.State{Running: true, Restarting: true, StartedAt: now.Add(-time.Minute)}, false, false},
		{"created", docker.State{}, false, false},
		{"exited", docker.State{ExitCode: 1, FinishedAt: now}, false, false},
	}
	for _, tt := range tests {
		up, pending := upState(&docker.Container{State: tt.s}, now)
		if up != tt.up || pending != tt.pending {
			t.Errorf("%s: upState = %v, %v; want %v, %v", tt.name, up, pending, tt.up, tt.pending)
		}
	}
}

// TestRecreateOfARunningParkedContainer: a crash between the rename and
// the stop leaves the old container running under its parked name, where
// the next deploy finds it stale; it is put back and re-created as <name>.
func TestRecreateOfARunningParkedContainer(t *testing.T) {
	f, c := rolloutFixture(t, false)
	f.supervise = false
	f.crashAt = "StopContainer"
	r := newTestReplacer(t, nil, f, "n1", 0).recreator
	if err := r.recreate(t.Context(), c, nil, nil); !errors.Is(err, errFakeCrashed) {
		t.Fatalf("recreate = %v; want the crash", err)
	}
	f.revive()
	c.Name = parkedName("app", c.ID) // as stale() finds it
	if err := r.recreate(t.Context(), c, nil, nil); err != nil {
		t.Fatalf("recreate of the parked container = %v", err)
	}
	if app := f.containerByName("app"); app == nil || !app.Running || app.ImageID != c.NewID {
		t.Errorf("app: %+v; want it running %s", app, shortID(c.NewID))
	}
	if p := parkedLeft(f); len(p) != 0 {
		t.Errorf("parked containers left: %v", p)
	}
}

func TestParkedBase(t *testing.T) {
	const id = "0123456789abcdef"
	tests := []struct {
		name, base string
		ok         bool
	}{
		{"/app-deployer-old-0123456789ab", "app", true},
		{"app-deployer-old-0123456789ab", "app", true},
		{"/app-deployer-old-ffffffffffff", "", false}, // another container's ID
		{"/app", "", false},
		{"/-deployer-old-0123456789ab", "", false},
		{"/web/app-deployer-old-0123456789ab", "", false}, // a link alias
	}
	for _, tt := range tests {
		base, ok := parkedBase(tt.name, id)
		if base != tt.base && tt.ok || ok != tt.ok {
			t.Errorf("parkedBase(%q) = %q, %v; want %q, %v", tt.name, base, ok, tt.base, tt.ok)
		}
	}
	if n := parkedName("app", id); n != "app-deployer-old-0123456789ab" {
		t.Errorf("parkedName = %q", n)
	}
}

// TestRestoreFailsHalfWay: putting the old container back fails at a
// step, as dockerd does under load; the restore tries again, and whatever
// it cannot finish the record (the parked name) keeps for the settle: in
// every case the old container ends up running as app, alone.
func TestRestoreFailsHalfWay(t *testing.T) {
	for _, tt := range []struct {
		name    string
		fault   func(f *fakeDocker, oldID string)
		restart bool // the restore gives up: the deployer's next start settles it
	}{
		{"create timed out but created", func(f *fakeDocker, _ string) { f.createLate = context.DeadlineExceeded }, false},
		{"forced removal of the new container busy", func(f *fakeDocker, _ string) {
			f.startErr = &docker.Error{Status: 500, Message: "OCI runtime create failed: exec: \"/app\": not found"}
			f.failNext("RemoveContainer:app", errRemoveBusy, errRemoveBusy)
		}, false},
		{"first start of the old container fails", func(f *fakeDocker, oldID string) {
			f.crash = true
			f.failNext("StartContainer:"+oldID, errStartFailed)
		}, false},
		{"rename back done but its answer lost", func(f *fakeDocker, oldID string) {
			f.crash = true
			f.failNext("RenameContainer:"+oldID, nil, lateAnswer{context.DeadlineExceeded}) // the park, then the rename back
		}, false},
		{"every start of the old container fails, then the deployer restarts", func(f *fakeDocker, oldID string) {
			f.crash = true
			f.failNext("StartContainer:"+oldID, slices.Repeat([]error{errStartFailed}, putBackAttempts)...)
		}, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f, c := rolloutFixture(t, false)
			f.supervise = false
			tt.fault(f, c.ID)
			r := newTestReplacer(t, nil, f, "n1", 0).recreator
			err := r.recreate(t.Context(), c, nil, nil)
			if err == nil {
				t.Fatal("recreate = nil; want the failure")
			}
			t.Logf("recreate = %v", err)
			if !tt.restart && strings.Contains(err.Error(), "failed too") {
				t.Errorf("recreate = %v; want the old container restored", err)
			}
			if tt.restart {
				if !strings.Contains(err.Error(), "restoring app failed too") {
					t.Errorf("recreate = %v; want the failed restore told", err)
				}
				if p := parkedLeft(f); len(p) != 1 {
					t.Fatalf("parked after a failed restore: %v; want the record kept", p)
				}
				recoverAtStart(t, newTestReplacer(t, nil, f, "n1", 0).recreator)
			}
			app := f.containerByName("app")
			if app == nil || !app.Running || app.ID != c.ID {
				t.Fatalf("app: %+v; want the old container running", app)
			}
			if p := parkedLeft(f); len(p) != 0 {
				t.Errorf("parked containers left: %v", p)
			}
			f.mu.Lock()
			n := len(f.containers)
			f.mu.Unlock()
			if n != 1 {
				t.Errorf("%d containers; want 1", n)
			}
		})
	}
}

// TestFailedRestoreSettledByTheNextDeploy: a restore that gives up leaves
// the record; the next deploy's stale scan (of any repository) wakes the
// settle, which puts the old container back without a restart.
func TestFailedRestoreSettledByTheNextDeploy(t *testing.T) {
	f, c := rolloutFixture(t, false)
	f.supervise, f.crash = false, true
	f.local["reg:5000/other:qa"] = "sha256:9999999999999999999999999999999999999999999999999999999999999999"
	f.failNext("StartContainer:"+c.ID, slices.Repeat([]error{errStartFailed}, putBackAttempts)...)
	p := newTestReplacer(t, nil, f, "n1", 0)
	recoverAtStart(t, p.recreator) // nothing to settle yet; starts the settle loop
	if err := p.recreator.recreate(t.Context(), c, nil, nil); err == nil {
		t.Fatal("recreate = nil; want a failed restore")
	}
	// A deploy of another repository lists the containers.
	if _, err := p.restarter.stale(t.Context(), testRepo(t, "reg:5000/other"), map[string]string{"qa": "sha256:9999999999999999999999999999999999999999999999999999999999999999"}); err != nil {
		t.Fatal(err)
	}
	if _, ok := pollUntil(10*time.Second, pollEvery, func() bool {
		app := f.containerByName("app")
		return app != nil && app.Running && app.ID == c.ID
	}); !ok {
		t.Fatalf("app %+v not put back within 10s of the next deploy", f.containerByName("app"))
	}
}

// TestParkedStaysDownAcrossDockerdRestart: dockerd restarts while the old
// container is parked (its policy --restart always): it is not started
// beside app, gets its policy back when it is put back, and is removed
// (with force) when app is up.
func TestParkedStaysDownAcrossDockerdRestart(t *testing.T) {
	for _, tt := range []struct {
		crashAt string // where the deployer died, leaving it parked
		onNew   bool   // the settle keeps the new container
	}{
		{"RenameContainer:app", false}, // parked and stopped, no app
		{"RemoveContainer", true},      // the new app up beside it
	} {
		t.Run(tt.crashAt, func(t *testing.T) {
			f, c := rolloutFixture(t, false)
			f.supervise = false
			old := f.containerByName("app")
			old.HostConfig = &docker.HostConfig{NetworkMode: "none", RestartPolicy: docker.AlwaysRestart()}
			f.crashAt = tt.crashAt
			r := newTestReplacer(t, nil, f, "n1", 0).recreator
			_ = r.recreate(t.Context(), c, nil, nil)
			f.revive()
			f.restartDaemon()
			f.mu.Lock()
			running := old.Running
			f.mu.Unlock()
			if running {
				t.Errorf("the parked container %s runs after a dockerd restart", old.Name)
			}
			recoverAtStart(t, newTestReplacer(t, nil, f, "n1", 0).recreator)
			app, err := f.InspectContainerWithContext("app", t.Context())
			if err != nil || !app.State.Running || (app.ID != c.ID) == !tt.onNew {
				t.Fatalf("app after the settle: %+v, %v; want running, the new container: %v", app, err, tt.onNew)
			}
			if pol := app.HostConfig.RestartPolicy; pol.Name != "always" {
				t.Errorf("app's restart policy %+v; want always", pol)
			}
			if p := parkedLeft(f); len(p) != 0 {
				t.Errorf("parked containers left: %v", p)
			}
		})
	}
}

func TestParkedNamePolicy(t *testing.T) {
	const id = "0123456789abcdef"
	for _, pol := range []docker.RestartPolicy{{}, {Name: "no"}, docker.AlwaysRestart(), docker.RestartUnlessStopped(), docker.RestartOnFailure(0), docker.RestartOnFailure(3)} {
		n := parkedNameWith("my-app", id, pol)
		base, got, ok := parseParked("/"+n, id)
		want := pol
		if !restarts(pol) {
			want = docker.RestartPolicy{}
		}
		if !ok || base != "my-app" || got != want {
			t.Errorf("parseParked(%q) = %q, %+v, %v; want my-app, %+v", n, base, got, ok, want)
		}
	}
	for _, n := range []string{"app-deployer-old-0123456789ab.sometimes", "app-deployer-old-0123456789ab.on-failure-x", "app-deployer-old-0123456789abc"} {
		if _, _, ok := parseParked(n, id); ok {
			t.Errorf("parseParked(%q) ok; want not a parked name", n)
		}
	}
}

// TestParkUpdateFails: when dockerd refuses to set the restart policy to
// no, nothing stays parked and nothing is stopped.
func TestParkUpdateFails(t *testing.T) {
	f, c := rolloutFixture(t, false)
	f.supervise = false
	f.containerByName("app").HostConfig = &docker.HostConfig{NetworkMode: "none", RestartPolicy: docker.AlwaysRestart()}
	f.failNext("UpdateContainer", &docker.Error{Status: 500, Message: "Cannot update container"})
	r := newTestReplacer(t, nil, f, "n1", 0).recreator
	if err := r.recreate(t.Context(), c, nil, nil); err == nil || !strings.Contains(err.Error(), "restart policy") {
		t.Fatalf("recreate = %v; want the failed update", err)
	}
	if app := f.containerByName("app"); app == nil || app.ID != c.ID || !app.Running || app.HostConfig.RestartPolicy.Name != "always" {
		t.Errorf("app after a failed park: %+v; want the old container running, --restart always", app)
	}
	if p := parkedLeft(f); len(p) != 0 || len(f.stops) != 0 {
		t.Errorf("parked %v, stopped %v; want neither", p, f.stops)
	}
}
