package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
	clientv3 "go.etcd.io/etcd/client/v3"
)

func TestHoldReason(t *testing.T) {
	ref := testTagged("docker.io/myorg/foo:latest")
	now := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC) // a Monday
	since := now.Add(-time.Hour)
	fr := func(scope string, until time.Time) freezeRecord {
		return freezeRecord{Scope: scope, Since: since, Until: until, Reason: "release train"}
	}
	win := func(spec string) rolloutPolicy { return rolloutPolicy{Windows: windows{must(parseWindow(spec))}} }
	for _, tc := range []struct {
		name    string
		freezes []freezeRecord
		pol     rolloutPolicy
		want    string // a prefix; "" for not held
	}{
		{"nothing", nil, rolloutPolicy{}, ""},
		{"all", []freezeRecord{fr(freezeAll, time.Time{})}, rolloutPolicy{}, "frozen since 2026-12-07 11:00:00 UTC: release train"},
		{"repository", []freezeRecord{fr("docker.io/myorg/foo", time.Time{})}, rolloutPolicy{}, "frozen since 2026-12-07 11:00:00 UTC (myorg/foo): release train"},
		{"tag", []freezeRecord{fr("docker.io/myorg/foo:latest", now.Add(time.Hour))}, rolloutPolicy{}, "frozen since 2026-12-07 11:00:00 UTC until 2026-12-07 13:00:00 UTC (myorg/foo:latest)"},
		{"another tag", []freezeRecord{fr("docker.io/myorg/foo:qa", time.Time{})}, rolloutPolicy{}, ""},
		{"another repository", []freezeRecord{fr("docker.io/myorg/foobar", time.Time{})}, rolloutPolicy{}, ""},
		{"until passed", []freezeRecord{fr(freezeAll, now)}, rolloutPolicy{}, ""},
		{"window open", nil, win("Mon-Fri 09:00-17:00"), ""},
		{"window closed", nil, win("Mon-Fri 13:00-17:00"), "outside window Mon-Fri 13:00-17:00 (opens 2026-12-07 13:00:00 UTC)"},
		{"freeze first", []freezeRecord{fr(freezeAll, time.Time{})}, win("Mon-Fri 13:00-17:00"), "frozen since"},
	} {
		got := holdReason(tc.freezes, tc.pol, ref, now)
		if (tc.want == "") != (got == "") || !strings.HasPrefix(got, tc.want) {
			t.Errorf("%s: holdReason = %q, want %q", tc.name, got, tc.want)
		}
	}
}

func TestParseScopeAndUntil(t *testing.T) {
	for in, want := range map[string]string{
		"": freezeAll, "myorg/foo": "docker.io/myorg/foo", "myorg/foo:qa": "docker.io/myorg/foo:qa", "reg:5000/app:qa": "reg:5000/app:qa",
	} {
		if got, err := parseScope(in, dockerHub); err != nil || got != want {
			t.Errorf("parseScope(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if got := must(parseScope("app", "reg:5000")); got != "reg:5000/app" {
		t.Errorf("bare name under -registry: %q", got)
	}
	now := time.Date(2026, 12, 3, 19, 0, 0, 0, time.UTC)
	for in, want := range map[string]time.Time{
		"2h": now.Add(2 * time.Hour), "2026-12-24T18:00:00+01:00": time.Date(2026, 12, 24, 17, 0, 0, 0, time.UTC),
		"2026-12-24 18:00": time.Date(2026, 12, 24, 18, 0, 0, 0, time.UTC), "": {},
	} {
		if got, err := parseUntil(in, now); err != nil || !got.Equal(want) {
			t.Errorf("parseUntil(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	if _, err := parseUntil("tomorrow", now); err == nil {
		t.Error("parseUntil(tomorrow): want an error")
	}
}

const (
	holdOld = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
	holdNew = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	holdRef = "reg:5000/app:qa"
)

// holdNode is one node of a hold test: a fake Docker with two containers
// of reg:5000/app:qa on the old image, the new one in the registry, and
// a deployer with holds on the shared etcd.
type holdNode struct {
	f     *fakeDocker
	d     *deployer
	n     *captureNotifier
	holds *holds
	led   *ledger
}

func newHoldNode(t *testing.T, cli *clientv3.Client, name string) *holdNode {
	f := newFakeDocker()
	f.local[holdRef] = holdOld
	f.addContainer("app1", holdRef)
	f.addContainer("app2", holdRef)
	f.remote[holdRef] = holdNew
	d, n := newTestDeployer(t, f, deployOptions{})
	d.node = name
	log := testLogger(t)
	led := newLedger(cli, f, name, 20, true, nil, log)
	ps := newPolicies(cli, basePolicy(unavailable{N: 1}, time.Second))
	h := newHolds(cli, ps, led, f, name, log)
	d.ledger, d.holds, d.replacer.gate = led, h, h.gate
	return &holdNode{f: f, d: d, n: n, holds: h, led: led}
}

func (hn *holdNode) stops() int {
	hn.f.mu.Lock()
	defer hn.f.mu.Unlock()
	return len(hn.f.stops)
}

func (hn *holdNode) local() string {
	hn.f.mu.Lock()
	defer hn.f.mu.Unlock()
	return hn.f.local[holdRef]
}

func putHoldTrigger(t *testing.T, cli *clientv3.Client, tr trigger) int64 {
	b, _ := json.Marshal(tr)
	return must(cli.Put(t.Context(), triggerKey("reg:5000/app"), string(b))).Header.Revision
}

func holdJob(rev int64) job {
	return job{Repo: canon("reg:5000/app"), All: true, Revs: []int64{rev}}
}

func readWaiting(t *testing.T, cli *clientv3.Client) []waitingRecord {
	return decodeWaiting(must(cli.Get(t.Context(), waitingsPrefix, clientv3.WithPrefix())).Kvs)
}

func ledgerVersions(t *testing.T, cli *clientv3.Client) []ledgerVersion {
	h := must(readHistory(t.Context(), cli, historyFilter{}, time.Now()))
	if len(h.Tags) == 0 {
		return nil
	}
	return h.Tags[0].Versions
}

// TestFreezeHoldsAndThawReleases: a push during a freeze replaces nothing
// on either node, puts the local tag back on the running version, records
// one waiting version (ledger: held, with the reason) and tells Slack once
// for the fleet; the thaw deletes the freeze and writes the trigger again
// in one transaction, and the next deploy replaces everything.
func TestFreezeHoldsAndThawReleases(t *testing.T) {
	cli := testNS(t)
	ops := newHoldOps(cli, basePolicy(unavailable{N: 1}, time.Second), dockerHub, testLogger(t))
	if _, err := ops.freeze(t.Context(), freezeRequest{Scope: "reg:5000/app", Reason: "release train"}, "test"); err != nil {
		t.Fatal(err)
	}
	n1, n2 := newHoldNode(t, cli, "n1"), newHoldNode(t, cli, "n2")
	rev := putHoldTrigger(t, cli, trigger{Tag: "qa", Source: "api"})
	for _, hn := range []*holdNode{n1, n2} {
		if err := hn.d.deploy(t.Context(), holdJob(rev)); err != nil {
			t.Fatalf("held deploy = %v; want nil (not a failure)", err)
		}
		if hn.stops() != 0 {
			t.Fatalf("a frozen deploy stopped %d containers", hn.stops())
		}
		for _, r := range hn.n.reports {
			if len(r.Held) > 0 { // the gate's: the check after the pull let them through
				t.Fatalf("containers reached the gate: %v; want the tag held after the pull", r.Held)
			}
		}
		if hn.local() != holdOld {
			t.Fatalf("local tag on %s after the hold; want it back on %s", shortID(hn.local()), shortID(holdOld))
		}
	}
	told := 0
	for _, hn := range []*holdNode{n1, n2} {
		for _, r := range hn.n.reports {
			if len(r.Waiting) > 0 {
				told++
				if !strings.Contains(r.text(), "waits: frozen since") || !strings.Contains(r.text(), "release train") {
					t.Errorf("Slack text: %s", r.text())
				}
			}
		}
	}
	if told != 1 {
		t.Fatalf("Slack told of the held version %d times; want once for the fleet", told)
	}
	ws := readWaiting(t, cli)
	if len(ws) != 1 || ws[0].ImageID != holdNew || !strings.HasPrefix(ws[0].Reason, "frozen since") {
		t.Fatalf("waiting = %+v", ws)
	}
	vs := ledgerVersions(t, cli)
	if len(vs) != 1 || vs[0].ImageID != holdNew || !strings.Contains(vs[0].Held, "release train") || len(vs[0].Nodes) != 0 {
		t.Fatalf("ledger = %+v; want the version held", vs)
	}
	if got := vs[0].outcomeText(); !strings.HasPrefix(got, "waiting: frozen since") {
		t.Errorf("deployer history shows %q; want waiting: frozen since …", got)
	}

	res, err := ops.thaw(t.Context(), "reg:5000/app", askedBy{Node: "test"})
	if err != nil || len(res.Released) != 1 {
		t.Fatalf("thaw = %+v, %v", res, err)
	}
	if len(readWaiting(t, cli)) != 0 {
		t.Fatal("the waiting record outlived the thaw")
	}
	kv := must(cli.Get(t.Context(), triggerKey("reg:5000/app"))).Kvs[0]
	var tr trigger
	if json.Unmarshal(kv.Value, &tr) != nil || tr.Source != "thaw" || tr.Tag != "qa" || kv.ModRevision <= rev {
		t.Fatalf("trigger after the thaw: %s at %d", kv.Value, kv.ModRevision)
	}
	for _, hn := range []*holdNode{n1, n2} {
		if err := hn.d.deploy(t.Context(), holdJob(kv.ModRevision)); err != nil {
			t.Fatal(err)
		}
		if hn.stops() != 2 {
			t.Fatalf("after the thaw %d containers replaced; want 2", hn.stops())
		}
	}
}

// TestReleaseOnce: two nodes that find a freeze's -until passed at once
// write one trigger between them, and delete the freeze.
func TestReleaseOnce(t *testing.T) {
	cli := testNS(t)
	ops := newHoldOps(cli, basePolicy(unavailable{N: 1}, time.Second), dockerHub, testLogger(t))
	if _, err := ops.freeze(t.Context(), freezeRequest{Scope: "reg:5000/app:qa", Until: "1h"}, "test"); err != nil {
		t.Fatal(err)
	}
	n1, n2 := newHoldNode(t, cli, "n1"), newHoldNode(t, cli, "n2")
	rev := putHoldTrigger(t, cli, trigger{Tag: "qa", Source: "api"})
	for _, hn := range []*holdNode{n1, n2} {
		must(0, hn.d.deploy(t.Context(), holdJob(rev)))
	}
	if len(readWaiting(t, cli)) != 1 {
		t.Fatal("no waiting version")
	}
	// Before -until: nothing released.
	must(n1.holds.releaseDue(t.Context()))
	if len(readWaiting(t, cli)) != 1 {
		t.Fatal("released before -until")
	}
	later := func() time.Time { return time.Now().Add(2 * time.Hour) }
	n1.holds.now, n2.holds.now = later, later
	var wg sync.WaitGroup
	for _, hn := range []*holdNode{n1, n2} {
		wg.Go(func() {
			for range 3 { // the first pass deletes the freeze, a later one releases
				if _, err := hn.holds.releaseDue(t.Context()); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	kv := must(cli.Get(t.Context(), triggerKey("reg:5000/app"))).Kvs[0]
	if kv.Version != 2 { // the push, and one release
		t.Fatalf("trigger written %d times; want the push and one release", kv.Version)
	}
	if len(readWaiting(t, cli)) != 0 || len(must(cli.Get(t.Context(), freezesPrefix, clientv3.WithPrefix())).Kvs) != 0 {
		t.Fatal("the freeze or the waiting record outlived the release")
	}
}

// TestFreezeRacesRollout: a freeze written while a node replaces its
// containers one at a time holds the rest: the gate just before each stop
// reads it. The version is recorded as waiting, so the thaw releases it.
func TestFreezeRacesRollout(t *testing.T) {
	cli := testNS(t)
	ops := newHoldOps(cli, basePolicy(unavailable{N: 1}, time.Second), dockerHub, testLogger(t))
	n1 := newHoldNode(t, cli, "n1")
	n1.d.replacer = newTestReplacer(t, cli, n1.f, "n1", 1) // coordinated: one at a time
	n1.d.replacer.gate = n1.holds.gate
	n1.f.stopped = make(chan string, 4)
	froze := make(chan struct{})
	go func() {
		<-n1.f.stopped // the first container is being replaced: freeze
		if _, err := ops.freeze(context.WithoutCancel(t.Context()), freezeRequest{Reason: "incident"}, "test"); err != nil {
			t.Error(err)
		}
		close(froze)
	}()
	// The replacement of the first container waits for the freeze to be
	// written before it counts as up.
	n1.f.inspectHook = func(c *docker.Container) error {
		if c.Image == holdNew {
			<-froze
		}
		return nil
	}
	rev := putHoldTrigger(t, cli, trigger{Tag: "qa", Source: "api"})
	if err := n1.d.deploy(t.Context(), holdJob(rev)); err != nil {
		t.Fatalf("deploy = %v", err)
	}
	if n1.stops() != 1 {
		t.Fatalf("%d containers stopped; want 1, the rest held by the freeze", n1.stops())
	}
	ws := readWaiting(t, cli)
	if len(ws) != 1 || !strings.Contains(ws[0].Reason, "incident") {
		t.Fatalf("waiting = %+v", ws)
	}
}

// TestDeployNowOverridesOnce: deploy -now lets the waiting version past a
// freeze (recorded on its ledger version), deleting the waiting record;
// the next push is held again.
func TestDeployNowOverridesOnce(t *testing.T) {
	cli := testNS(t)
	ops := newHoldOps(cli, basePolicy(unavailable{N: 1}, time.Second), dockerHub, testLogger(t))
	must(ops.freeze(t.Context(), freezeRequest{Reason: "release train"}, "test"))
	n1 := newHoldNode(t, cli, "n1")
	rev := putHoldTrigger(t, cli, trigger{Tag: "qa", Source: "api"})
	must(0, n1.d.deploy(t.Context(), holdJob(rev)))
	if n1.stops() != 0 {
		t.Fatal("frozen, yet stopped")
	}
	res, err := ops.deployNow(t.Context(), "reg:5000/app:qa", "tester", "")
	if err != nil || res.ImageID != holdNew || !strings.HasPrefix(res.Held, "frozen since") {
		t.Fatalf("deployNow = %+v, %v", res, err)
	}
	if len(readWaiting(t, cli)) != 0 {
		t.Fatal("the waiting record outlived deploy -now")
	}
	must(0, n1.d.deploy(t.Context(), holdJob(res.Revision)))
	if n1.stops() != 2 {
		t.Fatalf("deploy -now replaced %d; want 2", n1.stops())
	}
	vs := ledgerVersions(t, cli)
	if len(vs) == 0 || !strings.HasPrefix(vs[0].Override, "deploy -now from tester over: frozen since") {
		t.Fatalf("ledger = %+v; want the override recorded", vs)
	}
	// A later push is held again.
	n1.f.mu.Lock()
	n1.f.remote[holdRef] = "sha256:3333333333333333333333333333333333333333333333333333333333333333"
	n1.f.mu.Unlock()
	rev = putHoldTrigger(t, cli, trigger{Tag: "qa", Source: "api"})
	must(0, n1.d.deploy(t.Context(), holdJob(rev)))
	if n1.stops() != 2 || len(readWaiting(t, cli)) != 1 {
		t.Fatalf("the next push: %d stops, waiting %+v; want held", n1.stops(), readWaiting(t, cli))
	}
}

// TestWindowHoldsUntilItOpens: a push outside the tag's window waits; the
// node whose loop sees the window open writes the trigger again.
func TestWindowHoldsUntilItOpens(t *testing.T) {
	cli := testNS(t)
	n1 := newHoldNode(t, cli, "n1")
	ps := newPolicies(cli, basePolicy(unavailable{N: 1}, time.Second))
	must(ps.set(t.Context(), holdRef, policy{Windows: &[]string{"Mon 09:00-10:00"}}, nil, "test", time.Now()))
	monday := time.Date(2026, 12, 7, 8, 59, 0, 0, time.UTC)
	n1.holds.now = func() time.Time { return monday }
	rev := putHoldTrigger(t, cli, trigger{Tag: "qa", Source: "api"})
	must(0, n1.d.deploy(t.Context(), holdJob(rev)))
	ws := readWaiting(t, cli)
	if n1.stops() != 0 || len(ws) != 1 || ws[0].Reason != "outside window Mon 09:00-10:00 (opens 2026-12-07 09:00:00 UTC)" {
		t.Fatalf("stops %d, waiting %+v", n1.stops(), ws)
	}
	must(n1.holds.releaseDue(t.Context()))
	if len(readWaiting(t, cli)) != 1 {
		t.Fatal("released while the window is closed")
	}
	n1.holds.now = func() time.Time { return monday.Add(time.Minute) }
	must(n1.holds.releaseDue(t.Context()))
	kv := must(cli.Get(t.Context(), triggerKey("reg:5000/app"))).Kvs[0]
	if len(readWaiting(t, cli)) != 0 || kv.ModRevision <= rev {
		t.Fatal("the window opened and nothing was released")
	}
	must(0, n1.d.deploy(t.Context(), holdJob(kv.ModRevision)))
	if n1.stops() != 2 {
		t.Fatalf("after the window opened %d replaced; want 2", n1.stops())
	}
}

// TestThawRacesTimedRelease: a thaw and a node that finds the freeze's
// -until passed, at once: one trigger between them.
func TestThawRacesTimedRelease(t *testing.T) {
	for i := range 5 {
		t.Run(fmt.Sprint(i), func(t *testing.T) { thawRacesTimedRelease(t) })
	}
}

func thawRacesTimedRelease(t *testing.T) {
	cli := testNS(t)
	ops := newHoldOps(cli, basePolicy(unavailable{N: 1}, time.Second), dockerHub, testLogger(t))
	must(ops.freeze(t.Context(), freezeRequest{Scope: "reg:5000/app", Until: "1h"}, "test"))
	n1 := newHoldNode(t, cli, "n1")
	rev := putHoldTrigger(t, cli, trigger{Tag: "qa", Source: "api"})
	must(0, n1.d.deploy(t.Context(), holdJob(rev)))
	later := func() time.Time { return time.Now().Add(2 * time.Hour) }
	n1.holds.now, ops.now = later, later
	var wg sync.WaitGroup
	wg.Go(func() {
		for range 3 {
			if _, err := n1.holds.releaseDue(t.Context()); err != nil {
				t.Error(err)
			}
		}
	})
	wg.Go(func() { _, _ = ops.thaw(t.Context(), "reg:5000/app", askedBy{Node: "test"}) }) // not frozen any more, if the node was first
	wg.Wait()
	must(n1.holds.releaseDue(t.Context()))
	if kv := must(cli.Get(t.Context(), triggerKey("reg:5000/app"))).Kvs[0]; kv.Version != 2 {
		t.Fatalf("trigger written %d times; want the push and one release", kv.Version)
	}
	if len(readWaiting(t, cli)) != 0 {
		t.Fatal("the waiting record outlived the release")
	}
}
