package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/distribution/reference"
	docker "github.com/fsouza/go-dockerclient"
	clientv3 "go.etcd.io/etcd/client/v3"
)

const (
	canaryRef = "example.com/app:latest"
	oldImage  = "sha256:0000000000000000000000000000000000000000000000000000000000000001"
	newImage  = "sha256:0000000000000000000000000000000000000000000000000000000000000002"
)

// bakeFake is a Docker of running containers for the bake: listed and
// inspected, changed by the test as Docker would report them.
type bakeFake struct {
	mu   sync.Mutex
	ctrs map[string]*docker.Container
}

var _ bakeDocker = (*bakeFake)(nil)

func newBakeFake() *bakeFake { return &bakeFake{ctrs: map[string]*docker.Container{}} }

func (f *bakeFake) add(id, image string, started time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ctrs[id] = &docker.Container{ID: id, Name: "/" + id, Image: image, Config: &docker.Config{Image: canaryRef},
		State: docker.State{Running: true, StartedAt: started}}
}

func (f *bakeFake) change(id string, fn func(*docker.Container)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f.ctrs[id])
}

func (f *bakeFake) ListContainers(docker.ListContainersOptions) ([]docker.APIContainers, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []docker.APIContainers
	for id, c := range f.ctrs {
		if c.State.Running {
			out = append(out, docker.APIContainers{ID: id, Image: c.Config.Image, State: "running"})
		}
	}
	return out, nil
}

func (f *bakeFake) InspectContainerWithContext(id string, _ context.Context) (*docker.Container, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, ok := f.ctrs[id]
	if !ok {
		return nil, &docker.NoSuchContainer{ID: id}
	}
	cp := *c
	return &cp, nil
}

// sayings records what was announced.
type sayings struct {
	mu   sync.Mutex
	said []string
}

func (s *sayings) say(text string) { s.mu.Lock(); s.said = append(s.said, text); s.mu.Unlock() }
func (s *sayings) count() int      { s.mu.Lock(); defer s.mu.Unlock(); return len(s.said) }

// canaryWorld is a cluster's etcd with a policy for canaryRef, a clock,
// and a node's canary rollouts made on demand.
type canaryWorld struct {
	t         *testing.T
	cli       *clientv3.Client
	clock     atomic.Pointer[time.Time]
	said      *sayings
	rollbacks atomic.Int32
	rbErr     error
}

func newCanaryWorld(t *testing.T, pol policy) *canaryWorld {
	t.Helper()
	w := &canaryWorld{t: t, cli: testNS(t), said: &sayings{}}
	t0 := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	w.clock.Store(&t0)
	ps := newPolicies(w.cli, basePolicy(unavailable{N: 1}, time.Second))
	if _, err := ps.set(t.Context(), canaryRef, pol, nil, "test", t0); err != nil {
		t.Fatal(err)
	}
	return w
}

func (w *canaryWorld) now() time.Time          { return *w.clock.Load() }
func (w *canaryWorld) advance(d time.Duration) { t := w.now().Add(d); w.clock.Store(&t) }

// node returns the canary rollouts as node (labels) sees them, on dc.
func (w *canaryWorld) node(name string, labels []string, dc bakeDocker) *canaries {
	rb := func(_ context.Context, ref reference.NamedTagged, previous string) (string, error) {
		w.rollbacks.Add(1)
		if w.rbErr != nil {
			return "", w.rbErr
		}
		return "rolled back to " + shortID(previous), nil
	}
	c := newCanaries(w.cli, newPolicies(w.cli, basePolicy(unavailable{N: 1}, time.Second)), dc, name, labels, w.said, rb, "docker.io", testLogger(w.t))
	c.now = w.now
	return c
}

// live gives node an owner key, as its running deployer holds.
func (w *canaryWorld) live(node string) {
	if _, err := w.cli.Put(w.t.Context(), ownerKey(node), "x"); err != nil {
		w.t.Fatal(err)
	}
}

func (w *canaryWorld) record() *canaryRecord {
	w.t.Helper()
	c := w.node("reader", nil, nil)
	rec, _, err := c.get(w.t.Context(), canaryRef)
	if err != nil || rec == nil {
		w.t.Fatalf("canary record: %v, %v", rec, err)
	}
	return rec
}

// triggerPuts is how many times the release wrote the tag's trigger.
func (w *canaryWorld) triggerPuts() int64 {
	resp, err := w.cli.Get(w.t.Context(), triggerKey("example.com/app"))
	if err != nil {
		w.t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return 0
	}
	var tr trigger
	if json.Unmarshal(resp.Kvs[0].Value, &tr) != nil || tr.Source != "promote" {
		w.t.Fatalf("trigger %s: want source promote", resp.Kvs[0].Value)
	}
	return resp.Kvs[0].Version
}

func (w *canaryWorld) hold(c *canaries, imageID string) string {
	w.t.Helper()
	reason, err := c.hold(w.t.Context(), testTagged(canaryRef), imageID, oldImage, "", 0)
	if err != nil {
		w.t.Fatal(err)
	}
	return reason
}

func (w *canaryWorld) loop(cs ...*canaries) {
	w.t.Helper()
	for _, c := range cs {
		if _, err := c.loopOnce(w.t.Context()); err != nil {
			w.t.Fatal(err)
		}
	}
}

func canaryPolicy(promotion string) policy {
	return policy{CanaryNodes: &[]string{"n1"}, CanaryLabels: &[]string{"canary"}, Bake: durPtr(20 * time.Second), Promotion: promotion}
}

func TestCanaryHold(t *testing.T) {
	tests := []struct {
		name   string
		pol    policy
		node   string
		labels []string
		phase  string // the record's phase before the hold; "" none
		image  string
		want   string
	}{
		{name: "no canaries: today's rollout", pol: policy{Bake: durPtr(time.Minute)}, node: "n2", image: newImage, want: ""},
		{name: "canary by name goes first", pol: canaryPolicy(promoteManual), node: "n1", image: newImage, want: ""},
		{name: "canary by label goes first", pol: canaryPolicy(promoteManual), node: "n9", labels: []string{"eu", "canary"}, image: newImage, want: ""},
		{name: "other node held while the canaries roll out", pol: canaryPolicy(promoteManual), node: "n2", image: newImage, want: "baking on canaries"},
		{name: "other node held during the bake", pol: canaryPolicy(promoteManual), node: "n2", phase: phaseBaking, image: newImage, want: "baking on canaries"},
		{name: "other node waits for promote", pol: canaryPolicy(promoteManual), node: "n2", phase: phaseWaiting, image: newImage, want: "waiting for promote"},
		{name: "promoted goes everywhere", pol: canaryPolicy(promoteManual), node: "n2", phase: phasePromoted, image: newImage, want: ""},
		{name: "halted version held on a canary too", pol: canaryPolicy(promoteManual), node: "n1", phase: phaseFailed, image: newImage, want: "halted on the canaries: bake failed"},
		{name: "the rollback of a halted version goes everywhere", pol: canaryPolicy(promoteManual), node: "n2", phase: phaseAborted, image: oldImage, want: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newCanaryWorld(t, tt.pol)
			if tt.phase != "" {
				rec := &canaryRecord{ImageID: newImage, Previous: oldImage, Phase: tt.phase, Reason: "bake failed"}
				if _, err := w.node("x", nil, nil).put(t.Context(), canaryRef, rec, 0); err != nil {
					t.Fatal(err)
				}
			}
			got := w.hold(w.node(tt.node, tt.labels, nil), tt.image)
			if got != tt.want && (tt.want == "" || !strings.HasPrefix(got, tt.want)) {
				t.Errorf("hold = %q; want %q", got, tt.want)
			}
		})
	}
}

// TestCanaryHoldBeginsOnce: two nodes seeing a new version at once begin
// one canary rollout; a newer version replaces it.
func TestCanaryHoldBeginsOnce(t *testing.T) {
	w := newCanaryWorld(t, canaryPolicy(promoteManual))
	var wg sync.WaitGroup
	for _, n := range []string{"n1", "n2", "n3"} {
		wg.Go(func() { w.hold(w.node(n, nil, nil), newImage) })
	}
	wg.Wait()
	resp, err := w.cli.Get(t.Context(), canaryKey(canaryRef))
	if err != nil {
		t.Fatal(err)
	}
	if v := resp.Kvs[0].Version; v != 1 {
		t.Errorf("canary record written %d times; want 1", v)
	}
	if rec := w.record(); rec.Phase != phaseCanary || rec.ImageID != newImage || rec.Previous != oldImage || time.Duration(rec.Bake) != 20*time.Second {
		t.Errorf("record = %+v; want phase canary of the new image, previous the old, bake 20s", rec)
	}
}

// bakeTo runs a canary node (n1, one container) and another node (n2)
// until the canary's replacement is reported up: the bake began.
func bakeTo(t *testing.T, w *canaryWorld) (canary, other *canaries, dc *bakeFake) {
	t.Helper()
	dc = newBakeFake()
	dc.add("c1", newImage, w.now())
	canary, other = w.node("n1", nil, dc), w.node("n2", nil, newBakeFake())
	w.live("n1")
	w.live("n2")
	if r := w.hold(other, newImage); r != "baking on canaries" {
		t.Fatalf("other node's hold = %q", r)
	}
	w.loop(canary, other)
	rec := w.record()
	if rec.Phase != phaseBaking || rec.Canaries["n1"] == nil || !rec.BakeUntil.Equal(w.now().Add(20*time.Second)) {
		t.Fatalf("after the canary's report: %+v; want baking until now+20s", rec)
	}
	return canary, other, dc
}

func TestCanaryBakeClean(t *testing.T) {
	for _, promotion := range []string{promoteManual, promoteAuto} {
		t.Run(promotion, func(t *testing.T) {
			w := newCanaryWorld(t, canaryPolicy(promotion))
			canary, other, _ := bakeTo(t, w)
			w.advance(19 * time.Second)
			w.loop(canary, other)
			if p := w.record().Phase; p != phaseBaking {
				t.Fatalf("1 s before the bake's end: phase %s; want baking", p)
			}
			w.advance(time.Second)
			w.loop(canary, other, canary, other)
			rec := w.record()
			switch promotion {
			case promoteManual:
				if rec.Phase != phaseWaiting || w.triggerPuts() != 0 {
					t.Errorf("manual, baked: phase %s, %d trigger writes; want waiting, none", rec.Phase, w.triggerPuts())
				}
				if r := w.hold(other, newImage); r != "waiting for promote" {
					t.Errorf("other node's hold = %q; want waiting for promote", r)
				}
			case promoteAuto:
				if rec.Phase != phasePromoted || w.triggerPuts() != 1 {
					t.Errorf("auto, baked: phase %s, %d trigger writes; want promoted, 1", rec.Phase, w.triggerPuts())
				}
				if r := w.hold(other, newImage); r != "" {
					t.Errorf("other node's hold = %q; want none", r)
				}
			}
			if n := w.said.count(); n != 1 {
				t.Errorf("announced %d times; want once: %q", n, w.said.said)
			}
		})
	}
}

func TestCanaryBakeFailure(t *testing.T) {
	tests := []struct {
		name  string
		fault func(*bakeFake, time.Time)
		why   string
	}{
		{"crash loop", func(f *bakeFake, _ time.Time) {
			f.change("c1", func(c *docker.Container) { c.State.Restarting = true })
		}, "container c1 is restarting"},
		{"restarted", func(f *bakeFake, now time.Time) {
			f.change("c1", func(c *docker.Container) { c.State.StartedAt = now; c.RestartCount = 1 })
		}, "container c1 restarted"},
		{"unhealthy", func(f *bakeFake, _ time.Time) {
			f.change("c1", func(c *docker.Container) { c.State.Health.Status = "unhealthy" })
		}, "container c1 is unhealthy"},
		{"stopped", func(f *bakeFake, _ time.Time) {
			f.change("c1", func(c *docker.Container) { c.State.Running = false; c.State.ExitCode = 3 })
		}, "container c1 stopped"},
		{"gone", func(f *bakeFake, _ time.Time) {
			f.mu.Lock()
			delete(f.ctrs, "c1")
			f.mu.Unlock()
		}, "container c1 is gone"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newCanaryWorld(t, canaryPolicy(promoteAuto))
			canary, other, dc := bakeTo(t, w)
			w.advance(10 * time.Second)
			tt.fault(dc, w.now())
			w.loop(canary)
			rec := w.record()
			if rec.Phase != phaseFailed || !strings.Contains(rec.Reason, tt.why) {
				t.Fatalf("after %s: phase %s, reason %q; want failed, %q", tt.name, rec.Phase, rec.Reason, tt.why)
			}
			h, _, err := newRollout(w.cli, nil, "x", 1, time.Second, time.Second, testLogger(t), nil).halted(t.Context(), canaryRef)
			if err != nil || h == nil || h.ImageID != newImage {
				t.Errorf("halt record = %+v, %v; want the new image halted", h, err)
			}
			// Every node's loop sees the halt: one rolls back.
			w.loop(canary, other, canary, other)
			if n := w.rollbacks.Load(); n != 1 {
				t.Errorf("rolled back %d times; want once", n)
			}
			if rec := w.record(); rec.RolledBack == "" {
				t.Errorf("record after the rollback: %+v; want rolled_back", rec)
			}
			if r := w.hold(other, newImage); !strings.Contains(r, "halted") {
				t.Errorf("other node's hold after the halt = %q; want halted", r)
			}
			if r := w.hold(canary, oldImage); r != "" {
				t.Errorf("the canary's hold of the previous version = %q; want none (the rollback)", r)
			}
			if w.triggerPuts() != 0 {
				t.Error("a failed version was released")
			}
		})
	}
}

// TestCanaryRollbackRetried: a rollback that fails is recorded and tried
// again after rollbackRetry, by any node.
func TestCanaryRollbackRetried(t *testing.T) {
	w := newCanaryWorld(t, canaryPolicy(promoteAuto))
	canary, other, dc := bakeTo(t, w)
	dc.change("c1", func(c *docker.Container) { c.State.Restarting = true })
	w.rbErr = errors.New("registry down")
	for _, c := range []*canaries{canary, canary, other} {
		if _, err := c.loopOnce(t.Context()); err != nil && !strings.Contains(err.Error(), "registry down") {
			t.Fatal(err)
		}
	}
	if rec := w.record(); rec.RollbackErr == "" || w.rollbacks.Load() != 1 {
		t.Fatalf("after a failed rollback: %+v, %d tries; want the error recorded, 1 try", rec, w.rollbacks.Load())
	}
	if p := must(other.loopOnce(t.Context())); p.Due != other.rollbackRetry {
		t.Errorf("after a failed rollback: due in %v; want the retry, %v", p.Due, other.rollbackRetry)
	}
	w.rbErr = nil
	w.advance(canary.rollbackRetry)
	w.loop(other, canary)
	if rec := w.record(); rec.RolledBack == "" || w.rollbacks.Load() != 2 {
		t.Errorf("after the retry: %+v, %d tries; want rolled back, 2 tries", rec, w.rollbacks.Load())
	}
}

func TestCanaryPromoteRace(t *testing.T) {
	w := newCanaryWorld(t, canaryPolicy(promoteManual))
	bakeTo(t, w)
	var wg sync.WaitGroup
	var changed atomic.Int32
	for i := range 4 {
		wg.Go(func() {
			ans, err := w.node("cmd", nil, nil).promote(t.Context(), testTagged(canaryRef), "test "+string(rune('a'+i)))
			if err != nil {
				t.Errorf("promote: %v", err)
			}
			if ans.Changed {
				changed.Add(1)
			}
		})
	}
	wg.Wait()
	if n := changed.Load(); n != 1 {
		t.Errorf("%d promotes changed the record; want 1", n)
	}
	if n := w.triggerPuts(); n != 1 {
		t.Errorf("the release wrote the trigger %d times; want once", n)
	}
	if p := w.record().Phase; p != phasePromoted {
		t.Errorf("phase %s; want promoted", p)
	}
}

func TestCanaryAbortRacesPromote(t *testing.T) {
	for range 5 {
		w := newCanaryWorld(t, canaryPolicy(promoteManual))
		bakeTo(t, w)
		var wg sync.WaitGroup
		var promoted, aborted canaryAnswer
		var perr, aerr error
		wg.Go(func() { promoted, perr = w.node("a", nil, nil).promote(t.Context(), testTagged(canaryRef), "p") })
		wg.Go(func() { aborted, aerr = w.node("b", nil, nil).abort(t.Context(), testTagged(canaryRef), "a") })
		wg.Wait()
		rec := w.record()
		switch {
		case promoted.Changed && !aborted.Changed:
			if rec.Phase != phasePromoted || !errors.Is(aerr, errCanaryOver) || w.triggerPuts() != 1 {
				t.Errorf("promote won: phase %s, abort's error %v, %d trigger writes", rec.Phase, aerr, w.triggerPuts())
			}
		case aborted.Changed && !promoted.Changed:
			if rec.Phase != phaseAborted || !errors.Is(perr, errCanaryOver) || w.triggerPuts() != 0 {
				t.Errorf("abort won: phase %s, promote's error %v, %d trigger writes", rec.Phase, perr, w.triggerPuts())
			}
		default:
			t.Fatalf("promote %+v (%v) and abort %+v (%v): want exactly one to change the record", promoted, perr, aborted, aerr)
		}
		// The next round starts from a clean record.
		if _, err := w.cli.Delete(t.Context(), "/", clientv3.WithPrefix()); err != nil {
			t.Fatal(err)
		}
	}
}

func TestCanaryAbort(t *testing.T) {
	w := newCanaryWorld(t, canaryPolicy(promoteManual))
	canary, other, _ := bakeTo(t, w)
	ans, err := w.node("cmd", nil, nil).abort(t.Context(), testTagged(canaryRef), "deployer abort on test")
	if err != nil || !ans.Changed || ans.Phase != phaseAborted {
		t.Fatalf("abort = %+v, %v; want aborted", ans, err)
	}
	h, _, err := newRollout(w.cli, nil, "x", 1, time.Second, time.Second, testLogger(t), nil).halted(t.Context(), canaryRef)
	if err != nil || h == nil || h.ImageID != newImage || !strings.Contains(h.Reason, "aborted by deployer abort") {
		t.Errorf("halt record after abort = %+v, %v; want the version halted, aborted", h, err)
	}
	w.loop(other, canary)
	if n := w.rollbacks.Load(); n != 1 {
		t.Errorf("rolled back %d times; want once", n)
	}
	if _, err := w.node("cmd", nil, nil).promote(t.Context(), testTagged(canaryRef), "late"); !errors.Is(err, errCanaryOver) {
		t.Errorf("promote after abort: %v; want %v", err, errCanaryOver)
	}
	if _, err := w.node("cmd", nil, nil).promote(t.Context(), testTagged("example.com/other:1"), "x"); !errors.Is(err, errNoCanary) {
		t.Errorf("promote of a tag without a canary rollout: %v; want %v", err, errNoCanary)
	}
}

// TestCanaryDown: a canary node that is down at the bake's end does not
// block it; with every canary down the rollout says so and waits.
func TestCanaryDown(t *testing.T) {
	t.Run("one of two down", func(t *testing.T) {
		w := newCanaryWorld(t, canaryPolicy(promoteManual))
		canary, other, _ := bakeTo(t, w)
		dc3 := newBakeFake()
		dc3.add("c3", newImage, w.now())
		canary3 := w.node("n3", []string{"canary"}, dc3)
		w.loop(canary3) // reports; its node then dies (no owner key)
		w.advance(20 * time.Second)
		w.loop(canary, other)
		if p := w.record().Phase; p != phaseBaking {
			t.Fatalf("at the bake's end, n3 not confirmed: phase %s; want baking", p)
		}
		w.advance(canary.downGrace)
		w.loop(other)
		rec := w.record()
		if rec.Phase != phaseWaiting || !rec.Canaries["n3"].Down || !strings.Contains(rec.Note, "n3") {
			t.Errorf("after the grace: %+v; want waiting, n3 down and noted", rec)
		}
	})
	t.Run("every canary down", func(t *testing.T) {
		w := newCanaryWorld(t, canaryPolicy(promoteAuto))
		dc := newBakeFake()
		dc.add("c1", newImage, w.now())
		canary, other := w.node("n1", nil, dc), w.node("n2", nil, nil)
		w.hold(other, newImage)
		w.loop(canary) // n1 reports, then goes down: never confirms
		w.advance(20*time.Second + canary.downGrace)
		w.loop(other)
		rec := w.record()
		if rec.Phase != phaseBaking || !strings.Contains(rec.Note, "every canary is down") || w.triggerPuts() != 0 {
			t.Errorf("every canary down: %+v; want still baking, noted, not released", rec)
		}
		if _, err := other.promote(t.Context(), testTagged(canaryRef), "by hand"); err != nil || w.triggerPuts() != 1 {
			t.Errorf("promote by hand: %v, %d trigger writes; want released", err, w.triggerPuts())
		}
	})
	t.Run("no canary node up", func(t *testing.T) {
		w := newCanaryWorld(t, canaryPolicy(promoteAuto))
		other := w.node("n2", nil, nil)
		w.hold(other, newImage)
		w.advance(other.downGrace)
		w.loop(other)
		if rec := w.record(); rec.Phase != phaseCanary || !strings.Contains(rec.Note, "no canary node that runs the tag is up") {
			t.Errorf("no canary up: %+v; want the rollout waiting, noted", rec)
		}
		if st := w.record().state(); !strings.Contains(st, "no canary node") {
			t.Errorf("state %q; want it to say no canary is up", st)
		}
	})
}

// TestCanaryRestartMidBake: the bake lives in etcd; a deployer started
// anew (a new canaries on the same etcd) resumes it and ends it.
func TestCanaryRestartMidBake(t *testing.T) {
	w := newCanaryWorld(t, canaryPolicy(promoteAuto))
	_, _, dc := bakeTo(t, w)
	w.advance(10 * time.Second)
	restarted := w.node("n1", nil, dc)
	w.loop(restarted)
	if p := w.record().Phase; p != phaseBaking {
		t.Fatalf("mid-bake after the restart: %s; want baking", p)
	}
	w.advance(10 * time.Second)
	w.loop(restarted)
	if rec := w.record(); rec.Phase != phasePromoted || w.triggerPuts() != 1 {
		t.Errorf("at the bake's end after a restart: %+v, %d trigger writes; want promoted", rec, w.triggerPuts())
	}
}

// TestCanaryReportWaitsForUp: a canary reports only once every container
// of the tag runs the version and is up (healthy where checked).
func TestCanaryReportWaitsForUp(t *testing.T) {
	w := newCanaryWorld(t, canaryPolicy(promoteAuto))
	dc := newBakeFake()
	dc.add("c1", newImage, w.now())
	dc.add("c2", oldImage, w.now())
	dc.change("c1", func(c *docker.Container) { c.State.Health.Status = "starting" })
	canary := w.node("n1", nil, dc)
	w.hold(canary, newImage)
	w.loop(canary)
	if p := w.record().Phase; p != phaseCanary {
		t.Fatalf("one container old, one starting: phase %s; want canary", p)
	}
	dc.change("c2", func(c *docker.Container) { c.Image = newImage })
	w.loop(canary)
	if p := w.record().Phase; p != phaseCanary {
		t.Fatalf("both on the version, one health check still starting: phase %s; want canary", p)
	}
	dc.change("c1", func(c *docker.Container) { c.State.Health.Status = "healthy" })
	w.loop(canary)
	if rec := w.record(); rec.Phase != phaseBaking || len(rec.Canaries["n1"].Containers) != 2 {
		t.Errorf("both up: %+v; want baking on both", rec)
	}
}

// TestDeployCanaryHold: a deploy on a node outside the canary set pulls
// the new version ahead and stops nothing, saying why; on a canary node
// it replaces as usual.
func TestDeployCanaryHold(t *testing.T) {
	const ref = "127.0.0.1:5000/app:latest"
	for _, tt := range []struct {
		node        string
		wantRunning []string
		wantHeld    bool
	}{
		{node: "n2", wantRunning: []string{"web"}, wantHeld: true},
		{node: "n1", wantRunning: nil},
	} {
		t.Run(tt.node, func(t *testing.T) {
			cli := testNS(t)
			ps := newPolicies(cli, basePolicy(unavailable{}, time.Second))
			if _, err := ps.set(t.Context(), ref, canaryPolicy(promoteManual), nil, "test", time.Now()); err != nil {
				t.Fatal(err)
			}
			f := newFakeDocker()
			f.local = map[string]string{ref: oldImage}
			f.remote = map[string]string{ref: newImage}
			f.addContainer("web", ref)
			d, n := newTestDeployer(t, f, deployOptions{})
			d.canaries = newCanaries(cli, ps, f, tt.node, nil, nil, nil, "docker.io", testLogger(t))
			if err := d.deploy(t.Context(), job{Repo: canon("127.0.0.1:5000/app"), All: true, Revs: []int64{1}}); err != nil {
				t.Fatal(err)
			}
			if got := running(f); !slices.Equal(got, tt.wantRunning) {
				t.Errorf("running = %q; want %q", got, tt.wantRunning)
			}
			if len(f.pulls) != 1 {
				t.Errorf("pulls = %q; want the new version pulled ahead", f.pulls)
			}
			if held := len(n.reports) > 0 && len(n.reports[0].Held) > 0; held != tt.wantHeld {
				t.Errorf("held = %v; want %v (%+v)", held, tt.wantHeld, n.reports)
			} else if held && !strings.Contains(n.reports[0].Held[0], "baking on canaries") {
				t.Errorf("held %q; want baking on canaries", n.reports[0].Held)
			}
		})
	}
}

// TestCanaryHandlers: POST /api/promote and /api/abort, behind the
// webhook secret, answer with the decision.
func TestCanaryHandlers(t *testing.T) {
	w := newCanaryWorld(t, canaryPolicy(promoteManual))
	bakeTo(t, w)
	h, _ := newTestWebhook(t, testEtcd(t), "s3cret")
	c := w.node("api", nil, nil)
	promote, abort := canaryHandler(h, c, "promote"), canaryHandler(h, c, "abort")
	bearer := map[string]string{"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
	body := `{"image":"` + canaryRef + `"}`
	for _, tc := range []struct {
		name    string
		handler func(http.ResponseWriter, *http.Request)
		req     hookRequest
		code    int
	}{
		{"no secret", promote, hookRequest{target: "/api/promote", body: body}, 401},
		{"GET", promote, hookRequest{method: "GET", target: "/api/promote", headers: bearer}, 405},
		{"no image", promote, hookRequest{target: "/api/promote", headers: bearer, body: `{}`}, 400},
		{"no canary rollout", abort, hookRequest{target: "/api/abort", headers: bearer, body: `{"image":"example.com/other:1"}`}, 404},
		{"promote", promote, hookRequest{target: "/api/promote", headers: bearer, body: body}, 200},
		{"abort after promote", abort, hookRequest{target: "/api/abort", headers: bearer, body: body}, 409},
	} {
		rec := serveHook(t, tc.handler, tc.req)
		if rec.Code != tc.code {
			t.Errorf("%s: %d %s; want %d", tc.name, rec.Code, rec.Body, tc.code)
		}
	}
	if p := w.record().Phase; p != phasePromoted || w.triggerPuts() != 1 {
		t.Errorf("after POST /api/promote: phase %s, %d trigger writes; want promoted, 1", p, w.triggerPuts())
	}
}

// TestCanaryFewerNodesThanTheSet: a canary the policy names that has no
// live deployer (no status record) is reported in the record and in
// status, and does not hold the bake up.
func TestCanaryFewerNodesThanTheSet(t *testing.T) {
	w := newCanaryWorld(t, policy{CanaryNodes: &[]string{"n1", "n4"}, Bake: durPtr(20 * time.Second), Promotion: promoteAuto})
	for _, n := range []string{"n1", "n2"} {
		b, _ := json.Marshal(nodeStatus{Node: n, Containers: []containerStatus{{Name: "app", Image: canaryRef, ImageID: oldImage}}})
		if _, err := w.cli.Put(t.Context(), statusKey(n), string(b)); err != nil {
			t.Fatal(err)
		}
	}
	canary, other, _ := bakeTo(t, w)
	w.advance(canary.downGrace)
	w.loop(other)
	rec := w.record()
	if !slices.Equal(rec.Missing, []string{"n4"}) || !strings.Contains(rec.state(), "canary nodes not up: n4") {
		t.Errorf("record %+v, state %q; want n4 reported not up", rec, rec.state())
	}
	w.advance(20*time.Second - canary.downGrace)
	w.loop(canary, other)
	if rec := w.record(); rec.Phase != phasePromoted {
		t.Errorf("at the bake's end without n4: phase %s; want promoted", rec.Phase)
	}
}

// TestCanaryInStatus: the cluster view carries each tag's canary
// rollout, and deployer status says where it is.
func TestCanaryInStatus(t *testing.T) {
	w := newCanaryWorld(t, canaryPolicy(promoteManual))
	canary, _, _ := bakeTo(t, w)
	w.advance(20 * time.Second)
	w.loop(canary)
	st, err := readStatus(t.Context(), w.cli, w.now())
	if err != nil {
		t.Fatal(err)
	}
	var got *canaryStatus
	for _, tag := range st.Tags {
		if tag.Image == canaryRef {
			got = tag.Canary
		}
	}
	if got == nil || got.Phase != phaseWaiting || !strings.HasPrefix(got.State, "waiting for promote") {
		t.Fatalf("status of %s: canary %+v; want waiting for promote", canaryRef, got)
	}
	var out strings.Builder
	printStatus(&out, st)
	if !strings.Contains(out.String(), "canary "+shortID(newImage)+": waiting for promote") {
		t.Errorf("deployer status:\n%s\nwant the canary waiting for promote", out.String())
	}
}

// TestCanaryCommands: deployer promote and deployer abort take the
// daemon's whole command line, the image before or after the flags.
func TestCanaryCommands(t *testing.T) {
	w := newCanaryWorld(t, canaryPolicy(promoteManual))
	bakeTo(t, w)
	line := daemonCommandLine(t, sharedEtcdURL)
	var out, stderr bytes.Buffer
	if err := run(t.Context(), []string{"promote"}, &out, &stderr); !errors.Is(err, errUsage) {
		t.Errorf("deployer promote without an image: %v; want %v", err, errUsage)
	}
	if err := run(t.Context(), append([]string{"abort"}, append(line, "example.com/other:1")...), &out, &stderr); !errors.Is(err, errNoCanary) {
		t.Errorf("deployer abort of a tag without a canary rollout: %v; want %v", err, errNoCanary)
	}
	if err := run(t.Context(), append([]string{"promote", canaryRef}, line...), &out, &stderr); err != nil {
		t.Fatalf("deployer promote %s <daemon flags>: %v (%s)", canaryRef, err, stderr.String())
	}
	if !strings.Contains(out.String(), "promoted: deployer promote") || w.triggerPuts() != 1 {
		t.Errorf("deployer promote printed %q, %d trigger writes; want promoted, 1", out.String(), w.triggerPuts())
	}
	out.Reset()
	if err := run(t.Context(), append([]string{"promote", canaryRef}, line...), &out, &stderr); err != nil || !strings.Contains(out.String(), "nothing to do") {
		t.Errorf("a second deployer promote: %v, %q; want nothing to do", err, out.String())
	}
	if err := run(t.Context(), append([]string{"abort"}, append(line, canaryRef)...), &out, &stderr); !errors.Is(err, errCanaryOver) {
		t.Errorf("deployer abort after the promotion: %v; want %v", err, errCanaryOver)
	}
}

// statusReadsKV counts the reads of every node's status record.
type statusReadsKV struct {
	clientv3.KV
	n atomic.Int32
}

func (k *statusReadsKV) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	if key == statusPrefix {
		k.n.Add(1)
	}
	return k.KV.Get(ctx, key, opts...)
}

// TestCanaryNotesKeptByOpenerAndCanaries: while a canary rollout is
// open, the node that opened it and the canary nodes look at the status
// records (each as large as the fleet) for canaries not up; a node that
// is neither does not, however long it waits. Before, every node of the
// fleet read every status record every lookEvery.
func TestCanaryNotesKeptByOpenerAndCanaries(t *testing.T) {
	w := newCanaryWorld(t, canaryPolicy(promoteManual))
	canary, opener, _ := bakeTo(t, w)
	third := w.node("n3", nil, newBakeFake())
	w.live("n3")
	reads := map[*canaries]*statusReadsKV{}
	for _, c := range []*canaries{canary, opener, third} {
		reads[c] = &statusReadsKV{KV: c.kv}
		c.kv = reads[c]
	}
	w.advance(canary.downGrace)
	for i := range 3 { // within the 20 s bake
		if i > 0 {
			w.advance(canary.lookEvery)
		}
		w.loop(canary, opener, third)
	}
	// (The canary, baking, checks its own containers instead.)
	if got := [3]int32{reads[canary].n.Load(), reads[opener].n.Load(), reads[third].n.Load()}; got != [3]int32{0, 3, 0} {
		t.Errorf("status reads by the canary, the opener, a third node: %v; want 0, 3, 0", got)
	}
}
