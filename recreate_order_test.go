package main

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
)

// errPodmanUlimit is Podman 4.3.1's answer to a create with its own
// inspect's ulimit names.
var errPodmanUlimit = &docker.Error{Status: 500, Message: `fill out specgen: ulimit option "RLIMIT_NOFILE=4096:4096" requires name=SOFT:HARD, failed to be parsed: invalid ulimit type: RLIMIT_NOFILE`}

// TestRecreateCreateFirst: the new container is created (under its
// temporary name) before the old one is touched: a create the runtime
// refuses stops nothing, parks nothing and leaves nothing; refused twice
// alike for one version it is final (not retried), then left alone
// quietly until a new version, which is tried again.
func TestRecreateCreateFirst(t *testing.T) {
	f, c := rolloutFixture(t, false)
	f.supervise = false
	f.failNext("CreateContainer", errPodmanUlimit, errPodmanUlimit, errPodmanUlimit)
	p := newTestReplacer(t, nil, f, "n1", 0)
	p.strategy = strategyRecr
	untouched := func(when string) {
		t.Helper()
		f.mu.Lock()
		stops, n := len(f.stops), len(f.containers)
		f.mu.Unlock()
		app := f.containerByName("app")
		if stops != 0 || n != 1 || app == nil || app.ID != c.ID || !app.Running {
			t.Fatalf("%s: %d stops, %d containers, app %+v; want the old app running, never stopped, alone", when, stops, n, app)
		}
	}

	out := p.replace(t.Context(), []staleContainer{c})[0]
	if out.err == nil || !strings.Contains(out.err.Error(), "RLIMIT_NOFILE") || !retryable(out.err) {
		t.Fatalf("first refused create: %+v; want the runtime's answer, retryable", out)
	}
	untouched("after the first refused create")

	out = p.replace(t.Context(), []staleContainer{c})[0]
	if !errors.Is(out.err, errCreateRefused) || retryable(out.err) || errors.Is(out.err, errReplacement) {
		t.Fatalf("second refused create, alike: %+v (retryable %v); want final, not a halt", out, retryable(out.err))
	}
	untouched("after the second refused create")

	out = p.replace(t.Context(), []staleContainer{c})[0]
	if !out.quiet || out.err != nil {
		t.Fatalf("third deploy of the same version: %+v; want it left alone quietly", out)
	}
	if got := p.leftAlone.list(); len(got) != 1 || got[0].Name != "app" || got[0].Image != c.NewID {
		t.Errorf("left alone: %+v; want app for %s", got, shortID(c.NewID))
	}

	// A new version is tried (and refused once more: one fault left).
	const third = "sha256:3333333333333333333333333333333333333333333333333333333333333333"
	f.mu.Lock()
	f.local["reg:5000/app:qa"] = third
	f.mu.Unlock()
	c.NewID = third
	if out = p.replace(t.Context(), []staleContainer{c})[0]; out.quiet || out.err == nil || errors.Is(out.err, errCreateRefused) {
		t.Fatalf("a new version: %+v; want it tried, refused once, retryable", out)
	}
	untouched("after the new version's refused create")
	if out = p.replace(t.Context(), []staleContainer{c})[0]; out.err != nil || out.skipped != "" {
		t.Fatalf("the new version, accepted: %+v; want it re-created", out)
	}
	if app := f.containerByName("app"); app == nil || app.ID == c.ID || !app.Running || app.ImageID != third {
		t.Errorf("app after the re-create: %+v; want a new container running %s", app, shortID(third))
	}
}

// TestRecreateCreateFailuresThatDiffer: failures that differ stay
// retryable: only the same answer twice in a row is final.
func TestRecreateCreateFailuresThatDiffer(t *testing.T) {
	f, c := rolloutFixture(t, false)
	f.supervise = false
	f.failNext("CreateContainer", errPodmanUlimit, &docker.Error{Status: 500, Message: "container create: invalid device mode: "}, errPodmanUlimit)
	p := newTestReplacer(t, nil, f, "n1", 0)
	p.strategy = strategyRecr
	for i := range 3 {
		if out := p.replace(t.Context(), []staleContainer{c})[0]; out.err == nil || errors.Is(out.err, errCreateRefused) || !retryable(out.err) {
			t.Fatalf("create %d: %+v; want a retryable failure", i+1, out)
		}
	}
}

// TestUnsupervisedLeftAlone: a container the stop strategy found
// unsupervised is not stopped again by the next trigger of its
// repository (reported once), until its labels change.
func TestUnsupervisedLeftAlone(t *testing.T) {
	f, c := rolloutFixture(t, false)
	f.supervise = false
	p := newTestReplacer(t, nil, f, "n1", 0)
	p.restarter.wait.timeout = 100 * time.Millisecond
	stops := func() int {
		f.mu.Lock()
		defer f.mu.Unlock()
		return len(f.stops)
	}
	if out := p.replace(t.Context(), []staleContainer{c})[0]; !errors.Is(out.err, errUnsupervised) {
		t.Fatalf("first deploy: %+v; want unsupervised", out)
	}
	if n := stops(); n != 1 {
		t.Fatalf("%d stops; want 1", n)
	}
	out := p.replace(t.Context(), []staleContainer{c})[0]
	if !out.quiet || out.err != nil || !strings.Contains(out.skipped, "unsupervised") {
		t.Fatalf("second trigger: %+v; want it left alone quietly", out)
	}
	if n := stops(); n != 1 {
		t.Fatalf("%d stops after the second trigger; want still 1", n)
	}
	if got := p.leftAlone.list(); len(got) != 1 || got[0].ID != c.ID || got[0].Image != "" {
		t.Errorf("left alone: %+v; want app, every version", got)
	}
	c.Labels = map[string]string{"supervisor": "systemd"}
	if out := p.replace(t.Context(), []staleContainer{c})[0]; out.quiet || !errors.Is(out.err, errUnsupervised) {
		t.Fatalf("after its labels changed: %+v; want it stopped (and found unsupervised) again", out)
	}
	if n := stops(); n != 2 {
		t.Errorf("%d stops; want 2", n)
	}
}

// TestLeftAloneInStatus: what a node leaves alone is in its status record
// and in `deployer status`.
func TestLeftAloneInStatus(t *testing.T) {
	cli := testNS(t)
	f, c := rolloutFixture(t, false)
	p := newTestReplacer(t, cli, f, "n1", 0)
	p.leftAlone.add(c.ID, c.Name, nil, "", "unsupervised: nothing restarted it when stopped")
	s := newStatusReporter(f, nil, cli, p.rollout.leases, "n1", version, nil, nil, testLogger(t))
	s.leftAlone = p.leftAlone.list
	cs, err := s.containers(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.write(t.Context(), cs, nil, nil, nil, 0); err != nil {
		t.Fatal(err)
	}
	st, err := readStatus(t.Context(), cli, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Nodes) != 1 || len(st.Nodes[0].LeftAlone) != 1 || st.Nodes[0].LeftAlone[0].Name != "app" {
		t.Fatalf("status nodes = %+v; want app left alone on n1", st.Nodes)
	}
	var b strings.Builder
	printStatus(&b, st)
	if !strings.Contains(b.String(), "LEFT ALONE") || !strings.Contains(b.String(), "unsupervised") {
		t.Errorf("deployer status:\n%s\nwant the left-alone container", b.String())
	}
}

// TestUnsupervisedReportedOnce: the deploy that finds a container
// unsupervised tells it; the next trigger of its repository neither
// stops it nor tells anything.
func TestUnsupervisedReportedOnce(t *testing.T) {
	const old, newer = "sha256:1111111111111111111111111111111111111111111111111111111111111111", "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	f := newFakeDocker()
	f.local["127.0.0.1:5000/app:qa"] = old
	f.addContainer("app", "127.0.0.1:5000/app:qa")
	f.remote["127.0.0.1:5000/app:qa"] = newer
	d, n := newTestDeployer(t, f, deployOptions{})
	f.supervise = false
	d.replacer.restarter.wait.timeout = 100 * time.Millisecond
	j := job{Repo: canon("127.0.0.1:5000/app"), Tags: map[string]struct{}{"qa": {}}}
	if err := d.deploy(t.Context(), j); !errors.Is(err, errUnsupervised) {
		t.Fatalf("first deploy = %v; want unsupervised", err)
	}
	if err := d.deploy(t.Context(), j); err != nil {
		t.Fatalf("second deploy = %v; want nil", err)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(n.reports) != 1 || len(f.stops) != 1 {
		t.Errorf("%d reports, %d stops; want 1 and 1: %+v", len(n.reports), len(f.stops), n.reports)
	}
}

// errPodmanNoUpdate is Podman 4.3.1's answer to POST
// /containers/{id}/update: its Docker API has no such endpoint.
var errPodmanNoUpdate = &docker.Error{Status: 404, Message: "Not Found\n"}

// TestParkWithoutUpdate: on a runtime that cannot change a restart policy
// (Podman), a container with one is parked with its policy unchanged and
// a name that records none to restore, and re-created; a failed
// re-create puts it back without trying the update again.
func TestParkWithoutUpdate(t *testing.T) {
	f, c := rolloutFixture(t, false)
	f.supervise = false
	f.containerByName("app").HostConfig = &docker.HostConfig{NetworkMode: "none", RestartPolicy: docker.AlwaysRestart()}
	f.failNext("UpdateContainer", errPodmanNoUpdate)
	p := newTestReplacer(t, nil, f, "n1", 0)
	p.strategy = strategyRecr
	if out := p.replace(t.Context(), []staleContainer{c})[0]; out.err != nil {
		t.Fatalf("re-create without update = %v; want it done", out.err)
	}
	app := f.containerByName("app")
	if app == nil || app.ID == c.ID || !app.Running || app.HostConfig.RestartPolicy.Name != "always" {
		t.Fatalf("app: %+v; want the new container running with --restart always", app)
	}
	// The next version fails to start: the old one is put back, its
	// policy never touched.
	f.failNext("StartContainer", &docker.Error{Status: 500, Message: "OCI runtime error"})
	const third = "sha256:3333333333333333333333333333333333333333333333333333333333333333"
	f.mu.Lock()
	f.local["reg:5000/app:qa"] = third
	f.mu.Unlock()
	next := staleContainer{ID: app.ID, Name: "app", Ref: c.Ref, ImageID: c.NewID, NewID: third}
	if out := p.replace(t.Context(), []staleContainer{next})[0]; out.err == nil || strings.Contains(out.err.Error(), "failed too") {
		t.Fatalf("failed re-create = %v; want it failed and the old container restored", out.err)
	}
	f.mu.Lock()
	updates := len(f.updates)
	f.mu.Unlock()
	if now := f.containerByName("app"); now == nil || now.ID != app.ID || !now.Running || updates != 0 {
		t.Errorf("app %+v, %d updates; want the previous container running, no update made", now, updates)
	}
	if left := parkedLeft(f); len(left) != 0 {
		t.Errorf("parked left: %v", left)
	}
}

// TestRecreateCreateTimeoutsNotFinal: creates that time out twice alike
// stay retryable: only the runtime's own refusal can be final.
func TestRecreateCreateTimeoutsNotFinal(t *testing.T) {
	f, c := rolloutFixture(t, false)
	f.supervise = false
	f.failNext("CreateContainer", context.DeadlineExceeded, context.DeadlineExceeded)
	p := newTestReplacer(t, nil, f, "n1", 0)
	p.strategy = strategyRecr
	for i := range 2 {
		if out := p.replace(t.Context(), []staleContainer{c})[0]; out.err == nil || errors.Is(out.err, errCreateRefused) || !retryable(out.err) {
			t.Fatalf("create %d: %+v; want a retryable failure", i+1, out)
		}
	}
}

// TestLeftAlonePruned: a container left alone and then removed is
// forgotten at the next listing.
func TestLeftAlonePruned(t *testing.T) {
	f, c := rolloutFixture(t, false)
	p := newTestReplacer(t, nil, f, "n1", 0)
	p.leftAlone.add(c.ID, c.Name, nil, "", "unsupervised")
	f.mu.Lock()
	f.containers = nil
	f.mu.Unlock()
	if _, err := p.stale(t.Context(), testRepo(t, "reg:5000/app"), map[string]string{"qa": c.NewID}); err != nil {
		t.Fatal(err)
	}
	if got := p.leftAlone.list(); len(got) != 0 {
		t.Errorf("left alone after the container went: %+v; want none", got)
	}
}
