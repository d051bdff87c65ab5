package main

import (
	"context"
	"errors"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
)

// captureNotifier keeps every report.
type captureNotifier struct {
	mu      sync.Mutex
	reports []report
}

func (c *captureNotifier) notify(r report) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.reports = append(c.reports, r)
}

func newTestDeployer(t *testing.T, f *fakeDocker, opts deployOptions) (*deployer, *captureNotifier) {
	n := &captureNotifier{}
	m := newMetrics()
	log := testLogger(t)
	f.supervise = true // a supervised host: a stop brings the tag back up
	rep := newTestReplacer(t, nil, f, "n1", 0)
	return newDeployer(newPuller(f, "", log, m), rep, f, n, "n1", opts, nil, log, m), n
}

// running lists the containers left alone: running and never stopped (a
// stopped one runs again under the same name, on the new image).
func running(f *fakeDocker) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, c := range f.containers {
		if c.Running && !slices.Contains(f.stops, c.Name) {
			out = append(out, c.Name)
		}
	}
	sort.Strings(out)
	return out
}

func TestDeploy(t *testing.T) {
	const (
		old    = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
		newer  = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
		other  = "sha256:3333333333333333333333333333333333333333333333333333333333333333"
		digest = "@sha256:4444444444444444444444444444444444444444444444444444444444444444"
	)
	type ctr struct{ name, image string }
	tests := []struct {
		name        string
		local       map[string]string
		remote      map[string]string
		containers  []ctr
		self        string // container name that is the deployer itself
		job         job
		pullErr     map[string]error
		stopErr     map[string]error
		wantPulls   []string
		wantRunning []string
		wantReport  bool
		wantFailed  bool
	}{
		{
			name:        "pushed tag restarts only its containers",
			local:       map[string]string{"127.0.0.1:5000/app:qa": old, "127.0.0.1:5000/app:prod": old},
			remote:      map[string]string{"127.0.0.1:5000/app:qa": newer, "127.0.0.1:5000/app:prod": newer},
			containers:  []ctr{{"qa1", "127.0.0.1:5000/app:qa"}, {"qa2", "127.0.0.1:5000/app:qa"}, {"prod", "127.0.0.1:5000/app:prod"}},
			job:         job{Repo: canon("127.0.0.1:5000/app"), Tags: map[string]struct{}{"qa": {}}},
			wantPulls:   []string{"127.0.0.1:5000/app:qa"},
			wantRunning: []string{"prod"},
			wantReport:  true,
		},
		{
			name:        "every local tag when no tag is named",
			local:       map[string]string{"docker.io/myorg/foo:qa": old, "docker.io/myorg/foo:prod": old, "docker.io/myorg/foobar:qa": old},
			remote:      map[string]string{"docker.io/myorg/foo:qa": newer, "docker.io/myorg/foo:prod": old},
			containers:  []ctr{{"qa", "myorg/foo:qa"}, {"prod", "myorg/foo:prod"}, {"foobar", "myorg/foobar:qa"}},
			job:         job{Repo: canon("docker.io/myorg/foo"), All: true},
			wantPulls:   []string{"docker.io/myorg/foo:prod", "docker.io/myorg/foo:qa"},
			wantRunning: []string{"foobar", "prod"},
			wantReport:  true,
		},
		{
			name:        "implicit latest is a tag like any other",
			local:       map[string]string{"docker.io/myorg/foo:latest": old},
			remote:      map[string]string{"docker.io/myorg/foo:latest": newer},
			containers:  []ctr{{"web", "myorg/foo"}},
			job:         job{Repo: canon("docker.io/myorg/foo"), All: true},
			wantPulls:   []string{"docker.io/myorg/foo:latest"},
			wantRunning: nil,
			wantReport:  true,
		},
		{
			name:        "digest and image ID starts are never touched",
			local:       map[string]string{"docker.io/myorg/foo:qa": old},
			remote:      map[string]string{"docker.io/myorg/foo:qa": newer},
			containers:  []ctr{{"by-digest", "myorg/foo" + digest}, {"by-id", old[7:19]}},
			job:         job{Repo: canon("docker.io/myorg/foo"), All: true},
			wantPulls:   []string{"docker.io/myorg/foo:qa"},
			wantRunning: []string{"by-digest", "by-id"},
			wantReport:  true,
		},
		{
			name:        "nothing local, nothing pulled",
			local:       map[string]string{"docker.io/myorg/other:qa": old},
			remote:      map[string]string{"docker.io/myorg/foo:qa": newer},
			containers:  []ctr{{"other", "myorg/other:qa"}},
			job:         job{Repo: canon("docker.io/myorg/foo"), All: true},
			wantPulls:   nil,
			wantRunning: []string{"other"},
		},
		{
			name:        "up to date: no restart, no message",
			local:       map[string]string{"docker.io/myorg/foo:qa": old},
			remote:      map[string]string{"docker.io/myorg/foo:qa": old},
			containers:  []ctr{{"qa", "myorg/foo:qa"}},
			job:         job{Repo: canon("docker.io/myorg/foo"), All: true},
			wantPulls:   []string{"docker.io/myorg/foo:qa"},
			wantRunning: []string{"qa"},
		},
		{
			name:        "failed pull stops nothing and is reported",
			local:       map[string]string{"docker.io/myorg/foo:qa": old},
			remote:      map[string]string{"docker.io/myorg/foo:qa": newer},
			containers:  []ctr{{"qa", "myorg/foo:qa"}},
			job:         job{Repo: canon("docker.io/myorg/foo"), All: true},
			pullErr:     map[string]error{"docker.io/myorg/foo:qa": errors.New("toomanyrequests")},
			wantPulls:   []string{"docker.io/myorg/foo:qa"},
			wantRunning: []string{"qa"},
			wantReport:  true,
			wantFailed:  true,
		},
		{
			name:        "failed stop is reported",
			local:       map[string]string{"docker.io/myorg/foo:qa": old},
			remote:      map[string]string{"docker.io/myorg/foo:qa": newer},
			containers:  []ctr{{"qa", "myorg/foo:qa"}, {"qa-b", "myorg/foo:qa"}},
			job:         job{Repo: canon("docker.io/myorg/foo"), All: true},
			stopErr:     map[string]error{"qa": errors.New("device busy")},
			wantPulls:   []string{"docker.io/myorg/foo:qa"},
			wantRunning: []string{"qa"},
			wantReport:  true,
			wantFailed:  true,
		},
		{
			name:        "never stops itself",
			local:       map[string]string{"docker.io/die-net/deployer:latest": old},
			remote:      map[string]string{"docker.io/die-net/deployer:latest": newer},
			containers:  []ctr{{"deployer", "die-net/deployer"}, {"other-deployer", "die-net/deployer"}},
			self:        "deployer",
			job:         job{Repo: canon("docker.io/die-net/deployer"), All: true},
			wantPulls:   []string{"docker.io/die-net/deployer:latest"},
			wantRunning: []string{"deployer"},
			wantReport:  true,
		},
		{
			name:        "unrelated stale containers stay (the original stopped them)",
			local:       map[string]string{"docker.io/myorg/foo:qa": old, "docker.io/myorg/bar:qa": other},
			remote:      map[string]string{"docker.io/myorg/foo:qa": newer},
			containers:  []ctr{{"bar", "myorg/bar:qa"}},
			job:         job{Repo: canon("docker.io/myorg/foo"), All: true},
			wantPulls:   []string{"docker.io/myorg/foo:qa"},
			wantRunning: []string{"bar"},
			wantReport:  true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeDocker()
			f.local, f.remote = tt.local, tt.remote
			for _, c := range tt.containers {
				fc := f.addContainer(c.name, c.image)
				if c.name == "by-id" {
					fc.ImageID = old
				}
				if c.name == "by-digest" {
					fc.ImageID = other
				}
			}
			if tt.name == "unrelated stale containers stay (the original stopped them)" {
				f.local["docker.io/myorg/bar:qa"] = newer // bar is stale too
			}
			if tt.pullErr != nil {
				f.pullErr = tt.pullErr
			}
			if tt.stopErr != nil {
				f.stopErr = tt.stopErr
			}
			d, n := newTestDeployer(t, f, deployOptions{})
			for _, c := range f.containers {
				if c.Name == tt.self {
					d.replacer.restarter.selfID = c.ID[:12]
				}
			}
			d.deploy(t.Context(), tt.job)
			pulls := slices.Sorted(slices.Values(f.pulls))
			if !slices.Equal(pulls, tt.wantPulls) {
				t.Errorf("pulls = %q; want %q", pulls, tt.wantPulls)
			}
			if got := running(f); !slices.Equal(got, tt.wantRunning) {
				t.Errorf("running = %q; want %q", got, tt.wantRunning)
			}
			if (len(n.reports) > 0) != tt.wantReport {
				t.Fatalf("reports = %+v; want a report: %v", n.reports, tt.wantReport)
			}
			if tt.wantReport && n.reports[0].failed() != tt.wantFailed {
				t.Errorf("report failed = %v; want %v: %s", n.reports[0].failed(), tt.wantFailed, n.reports[0].text())
			}
		})
	}
}

func TestDeployReportText(t *testing.T) {
	f := newFakeDocker()
	f.local["127.0.0.1:5000/app:qa"] = "sha256:aaaaaaaaaaaa1111"
	f.remote["127.0.0.1:5000/app:qa"] = "sha256:bbbbbbbbbbbb2222"
	f.addContainer("app", "127.0.0.1:5000/app:qa")
	d, n := newTestDeployer(t, f, deployOptions{})
	d.deploy(t.Context(), job{Repo: canon("127.0.0.1:5000/app"), All: true})
	if len(n.reports) != 1 {
		t.Fatalf("%d reports; want 1", len(n.reports))
	}
	text := n.reports[0].text()
	for _, want := range []string{"n1", "127.0.0.1:5000/app:qa", "aaaaaaaaaaaa → bbbbbbbbbbbb", "stopped: app"} {
		if !strings.Contains(text, want) {
			t.Errorf("report %q lacks %q", text, want)
		}
	}
}

func TestDeployDryRun(t *testing.T) {
	f := newFakeDocker()
	f.local["reg:5000/app:qa"] = "sha256:aaaaaaaaaaaa1111"
	f.remote["reg:5000/app:qa"] = "sha256:bbbbbbbbbbbb2222"
	f.addContainer("app", "reg:5000/app:qa")
	d, n := newTestDeployer(t, f, deployOptions{dryRun: true})
	d.deploy(t.Context(), job{Repo: canon("reg:5000/app"), All: true})
	if got := running(f); !slices.Equal(got, []string{"app"}) {
		t.Errorf("dry run stopped something: running %q", got)
	}
	if len(n.reports) != 1 || !strings.Contains(n.reports[0].text(), "would restart: app") || !strings.HasPrefix(n.reports[0].text(), "Dry run") {
		t.Errorf("dry-run report %+v; want 'Dry run … would restart: app'", n.reports)
	}
}

func TestDeployCleanup(t *testing.T) {
	const old, newer = "sha256:aaaaaaaaaaaa1111", "sha256:bbbbbbbbbbbb2222"
	for _, tt := range []struct {
		name        string
		cleanup     bool
		oldInUse    bool
		otherTag    bool // the old image is also tagged reg:5000/app:backup
		stoppedUser bool // a stopped container was created from the old image
		otherFails  bool // the pull of another tag, reg:5000/app:dev, fails
		wantRemoved []string
	}{
		{"cleanup removes the superseded image", true, false, false, false, false, []string{old}},
		{"an image still in use is kept", true, true, false, false, false, nil},
		{"an image with another tag is kept", true, false, true, false, false, nil},
		{"an image of a stopped container is kept", true, false, false, true, false, nil},
		{"a deploy that failed removes nothing", true, false, false, false, true, nil},
		{"off by default", false, false, false, false, false, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeDocker()
			f.local["reg:5000/app:qa"] = old
			f.remote["reg:5000/app:qa"] = newer
			f.addContainer("app", "reg:5000/app:qa")
			if tt.oldInUse {
				f.addContainer("other", old[7:19]) // started by image ID: never stopped
				f.containers[1].ImageID = old
			}
			if tt.otherTag {
				f.local["reg:5000/app:backup"] = old
			}
			if tt.stoppedUser {
				c := f.addContainer("job", old[7:19])
				c.ImageID, c.Running, c.Exited = old, false, true
			}
			if tt.otherFails {
				f.local["reg:5000/app:dev"] = "sha256:cccccccccccc3333"
				f.pullErr["reg:5000/app:dev"] = errors.New("registry down")
			}
			f.supervise = true
			d, _ := newTestDeployer(t, f, deployOptions{cleanup: tt.cleanup})
			d.deploy(t.Context(), job{Repo: canon("reg:5000/app"), All: true})
			if !slices.Equal(f.removed, tt.wantRemoved) {
				t.Errorf("removed %q; want %q", f.removed, tt.wantRemoved)
			}
			if tt.otherTag && f.local["reg:5000/app:backup"] != old {
				t.Error("the other tag of the superseded image is gone")
			}
		})
	}
}

// TestDeployCancelledAtShutdownTellsNobody: a deploy the stop cut short
// reports nothing (the next start replays it) and says it was cancelled,
// so that the queue leaves its revisions open.
func TestDeployCancelledAtShutdownTellsNobody(t *testing.T) {
	f := newFakeDocker()
	f.local["reg:5000/app:qa"] = "sha256:aaaaaaaaaaaa1111"
	f.pullErr["reg:5000/app:qa"] = errors.New("context canceled while pulling")
	d, n := newTestDeployer(t, f, deployOptions{})
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	err := d.deploy(ctx, job{Repo: canon("reg:5000/app"), All: true})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("deploy = %v; want it to say it was cancelled", err)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(n.reports) != 0 {
		t.Errorf("told %d reports of a deploy cut short by the stop; want none", len(n.reports))
	}
}

// TestDeployImageCalls: a deploy lists the repository's images once,
// narrowed by the reference filter; a pulled tag the pull said is up to
// date costs no further call, a tag that moved one InspectImage.
func TestDeployImageCalls(t *testing.T) {
	const old, newer = "sha256:aaaaaaaaaaaa1111", "sha256:bbbbbbbbbbbb2222"
	for _, tt := range []struct {
		name         string
		repo         string
		remote       map[string]string // tag -> image ID the registry serves
		digests      map[string]string // named in the trigger
		wantFilter   string
		wantInspects int
		wantStopped  []string
	}{
		{"one tag moved", "127.0.0.1:5000/app", map[string]string{"qa": newer, "prod": old}, nil, "127.0.0.1:5000/app", 1, []string{"qa"}},
		{"both tags moved", "127.0.0.1:5000/app", map[string]string{"qa": newer, "prod": newer}, nil, "127.0.0.1:5000/app", 2, []string{"prod", "qa"}},
		{"up to date", "127.0.0.1:5000/app", map[string]string{"qa": old, "prod": old}, nil, "127.0.0.1:5000/app", 0, nil},
		{"pushed digest served", "127.0.0.1:5000/app", map[string]string{"qa": newer, "prod": old}, map[string]string{"qa": "sha256:4444444444444444444444444444444444444444444444444444444444444444"}, "127.0.0.1:5000/app", 1, []string{"qa"}},
		{"Docker Hub library image: familiar name", "docker.io/library/nginx", map[string]string{"qa": newer, "prod": old}, nil, "nginx", 1, []string{"qa"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeDocker()
			for _, tag := range []string{"qa", "prod"} {
				f.local[tt.repo+":"+tag] = old
				f.remote[tt.repo+":"+tag] = tt.remote[tag]
				if d := tt.digests[tag]; d != "" {
					f.digests[tt.repo+":"+tag] = d
				}
				f.addContainer(tag, tt.repo+":"+tag)
			}
			f.local["docker.io/myorg/other:qa"] = old // another repository
			d, _ := newTestDeployer(t, f, deployOptions{})
			j := job{Repo: canon(tt.repo), All: true, Digests: tt.digests}
			for range 2 { // the second deploy finds everything up to date
				f.mu.Lock()
				f.imageLists, f.imageReads, f.stops = 0, 0, nil
				f.mu.Unlock()
				if err := d.deploy(t.Context(), j); err != nil {
					t.Fatal(err)
				}
				f.mu.Lock()
				lists, reads, filter, stops := f.imageLists, f.imageReads, f.listFilters["reference"], slices.Sorted(slices.Values(f.stops))
				f.mu.Unlock()
				if lists != 1 || reads != tt.wantInspects || !slices.Equal(filter, []string{tt.wantFilter}) {
					t.Errorf("%d ListImages (reference %q), %d InspectImage; want 1 (reference %q), %d", lists, filter, reads, tt.wantFilter, tt.wantInspects)
				}
				if !slices.Equal(stops, tt.wantStopped) {
					t.Errorf("stopped %q; want %q", stops, tt.wantStopped)
				}
				tt.wantInspects, tt.wantStopped = 0, nil
			}
		})
	}
}

// TestDeployInspectFails: when Docker cannot say what a moved tag names
// now, nothing is stopped and the deploy fails, to be retried.
func TestDeployInspectFails(t *testing.T) {
	f := newFakeDocker()
	f.local["reg:5000/app:qa"] = "sha256:aaaaaaaaaaaa1111"
	f.remote["reg:5000/app:qa"] = "sha256:bbbbbbbbbbbb2222"
	f.addContainer("app", "reg:5000/app:qa")
	f.imageErr = errRegistryDown
	d, n := newTestDeployer(t, f, deployOptions{})
	err := d.deploy(t.Context(), job{Repo: canon("reg:5000/app"), All: true})
	if err == nil || !retryable(err) {
		t.Errorf("deploy = %v; want a retryable failure", err)
	}
	if got := running(f); !slices.Equal(got, []string{"app"}) {
		t.Errorf("running %q; want app left alone", got)
	}
	if len(n.reports) != 1 || !n.reports[0].failed() {
		t.Errorf("reports %+v; want one failure", n.reports)
	}
}

// TestDeployCleanupKeepsImages: -keep_images N keeps the images of the
// tag's last N versions (the one deployed, the one it replaced, then the
// ledger's, newest first, each image once) and removes the older ones
// still on the node; a version whose image is not here costs no removal.
func TestDeployCleanupKeepsImages(t *testing.T) {
	const (
		v0 = "sha256:000000000000aaaa" // in the ledger, no longer on the node
		v1 = "sha256:111111111111aaaa"
		v2 = "sha256:222222222222aaaa"
		v3 = "sha256:333333333333aaaa" // deployed before
		v4 = "sha256:444444444444aaaa" // pushed now
	)
	pushed, rolledBack := []string{v0, v1, v2, v3}, []string{v1, v2, v3, v2}
	for _, tt := range []struct {
		name    string
		ledger  []string // image IDs, oldest first
		keep    int
		want    []string
		current string // what the tag pointed at before the deploy
	}{
		{"keep 1", pushed, 1, []string{v3, v2, v1}, v3},
		{"keep 2 (default)", pushed, 2, []string{v2, v1}, v3},
		{"keep 3", pushed, 3, []string{v1}, v3},
		{"keep more than there are", pushed, 9, nil, v3},
		// v3 was rolled back to v2: the push after it keeps v2, which
		// ran last, and lets v3 go.
		{"after a rollback", rolledBack, 2, []string{v3, v1}, v2},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeDocker()
			f.local["reg:5000/app:qa"] = tt.current
			f.remote["reg:5000/app:qa"] = v4
			for _, id := range []string{v1, v2, v3} {
				f.repoDigests[id] = []string{"reg:5000/app@sha256:" + strings.Repeat(id[7:8], 64)}
			}
			f.addContainer("app", "reg:5000/app:qa")
			cli := testNS(t)
			for i, id := range tt.ledger {
				putVersions(t, cli, ledgerVersion{Version: int64(i + 1), Image: "reg:5000/app:qa", ImageID: id, Outcome: outcomeRolledOut})
			}
			d, _ := newTestDeployer(t, f, deployOptions{cleanup: true, keepImages: tt.keep})
			d.ledger = testLedger(t, cli, "n1", 20)
			d.deploy(t.Context(), job{Repo: canon("reg:5000/app"), All: true})
			if !slices.Equal(f.removed, tt.want) {
				t.Errorf("removed %q; want %q", f.removed, tt.want)
			}
		})
	}
}
