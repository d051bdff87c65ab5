package main

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
	clientv3 "go.etcd.io/etcd/client/v3"
)

const (
	gateRepo = "127.0.0.1:5000/app"
	gateRef  = gateRepo + ":latest"
	imgA     = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" // the good version
	imgX     = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb" // the bad one
	imgY     = "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc" // a fix pushed later
)

// gateNode is one node of the gate's tests: a fake Docker whose web
// container runs imgA from the local tag, a registry that serves imgX for
// it, and a deployer with its gate and ledger on the test's etcd.
type gateNode struct {
	name string
	f    *fakeDocker
	dep  *deployer
	led  *ledger
}

func newGateNode(t *testing.T, cli *clientv3.Client, name string) *gateNode {
	t.Helper()
	f := newFakeDocker()
	f.supervise = true
	f.local[gateRef] = imgA
	f.remote[gateRef] = imgX
	f.addContainer("web", gateRef)
	log := testLogger(t)
	m := newMetrics()
	rep := newTestReplacer(t, cli, f, name, 0)
	led := testLedger(t, cli, name, 20)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = led.run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	dep := newDeployer(newPuller(f, "", log, m), rep, f, &captureNotifier{}, name, deployOptions{}, led, log, m)
	dep.gate = newGate(cli, f, "", led, log)
	return &gateNode{name: name, f: f, dep: dep, led: led}
}

// deploy runs one deploy of the events, merged into one job.
func (n *gateNode) deploy(t *testing.T, evs ...deployEvent) {
	t.Helper()
	j := job{Repo: canon(gateRepo)}
	for _, ev := range evs {
		j.merge(ev)
	}
	if err := n.dep.deploy(t.Context(), j); err != nil {
		t.Fatalf("deploy = %v; want nil (a held version is not a failure)", err)
	}
}

// web is what the node's web container runs now.
func (n *gateNode) web() string {
	c := n.f.containerByName("web")
	n.f.mu.Lock()
	defer n.f.mu.Unlock()
	return c.ImageID
}

// replaced reports whether anything of the node was stopped or created.
func (n *gateNode) replaced() bool {
	n.f.mu.Lock()
	defer n.f.mu.Unlock()
	return len(n.f.stops) > 0 || n.f.created > 0
}

// putTrigger writes the tag's trigger as a registry webhook does and
// returns its revision.
func putTrigger(t *testing.T, cli *clientv3.Client, source string) int64 {
	t.Helper()
	b, _ := json.Marshal(trigger{Time: time.Now().UTC(), Tag: "latest", Source: source})
	resp, err := cli.Put(t.Context(), triggerKey(gateRepo), string(b))
	if err != nil {
		t.Fatal(err)
	}
	return resp.Header.Revision
}

// ledgerAt writes versions of gateRef: image and outcome (and source),
// version 1 upwards.
func ledgerAt(t *testing.T, cli *clientv3.Client, vs ...ledgerVersion) {
	t.Helper()
	for i := range vs {
		vs[i].Version, vs[i].Image = int64(i+1), gateRef
		vs[i].Pushed = time.Date(2026, 12, 1, 12, i, 0, 0, time.UTC)
		if vs[i].AskedBy.Source == "" {
			vs[i].AskedBy.Source = "registry"
		}
	}
	putVersions(t, cli, vs...)
}

// TestQuarantine: a halted or rolled-back version is held on every path
// that can bring it back, until a newer push or an operator's explicit
// deploy releases it.
func TestQuarantine(t *testing.T) {
	halted := []ledgerVersion{{ImageID: imgA, Outcome: outcomeRolledOut}, {ImageID: imgX, Outcome: outcomeHalted}}
	rolledBack := []ledgerVersion{{ImageID: imgA, Outcome: outcomeRolledOut}, {ImageID: imgX, Outcome: outcomeRolledBack},
		{ImageID: imgA, Outcome: outcomeRolledOut, AskedBy: askedBy{Source: "rollback", Command: "deployer rollback app", Host: "ops"}}}
	// The ways a version comes to a node again.
	webhook := func(t *testing.T, cli *clientv3.Client) []deployEvent {
		return []deployEvent{{Tags: []string{"latest"}, Rev: putTrigger(t, cli, "registry")}}
	}
	repull := func(t *testing.T, cli *clientv3.Client, n *gateNode) []deployEvent {
		putTrigger(t, cli, "registry") // the re-pull keeps repositories with a trigger
		var evs []deployEvent
		p := newRepuller(n.f, cli, "127.0.0.1:5000", time.Hour, func(_ string, ev deployEvent) { evs = append(evs, ev) }, testLogger(t))
		if err := p.once(t.Context()); err != nil || len(evs) != 1 {
			t.Fatalf("re-pull: %v, %d events", err, len(evs))
		}
		return evs
	}
	// restart: the deployer stopped before it handled the trigger; the
	// one started again replays it from its watermark (watcher.go).
	restart := func(t *testing.T, cli *clientv3.Client, n *gateNode) []deployEvent {
		rev := putTrigger(t, cli, "registry")
		if _, err := cli.Put(t.Context(), progressKey(n.name), strconv.FormatInt(rev-1, 10)); err != nil {
			t.Fatal(err)
		}
		evs := make(chan deployEvent, 10)
		w := newWatcher(cli, n.name, 10*time.Millisecond, false, newProgress(cli, progressKey(n.name), testLogger(t)),
			func(_ string, ev deployEvent) { evs <- ev }, testLogger(t), newMetrics())
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { _ = w.run(ctx); close(done) }()
		defer func() { cancel(); <-done }()
		select {
		case ev := <-evs:
			if ev.Rev != rev {
				t.Fatalf("replayed revision %d; want %d", ev.Rev, rev)
			}
			return []deployEvent{ev}
		case <-time.After(10 * time.Second):
			t.Fatal("the restarted watcher replayed nothing")
		}
		return nil
	}
	for _, tc := range []struct {
		name    string
		ledger  []ledgerVersion
		node    string // "" : n1
		moved   bool   // the halting deploy's pull had moved the local tag to the bad version already
		path    func(t *testing.T, cli *clientv3.Client, n *gateNode) []deployEvent
		release func(t *testing.T, cli *clientv3.Client)
	}{
		{name: "halted, replayed webhook", ledger: halted, path: func(t *testing.T, cli *clientv3.Client, _ *gateNode) []deployEvent { return webhook(t, cli) }},
		{name: "halted, periodic re-pull", ledger: halted, path: repull},
		{name: "halted, replayed webhook, the local tag on it already", ledger: halted, moved: true,
			path: func(t *testing.T, cli *clientv3.Client, _ *gateNode) []deployEvent { return webhook(t, cli) }},
		{name: "halted, deployer restart", ledger: halted, path: restart},
		{name: "halted, a node that joins later", ledger: halted, node: "n9-new",
			path: func(t *testing.T, cli *clientv3.Client, _ *gateNode) []deployEvent { return webhook(t, cli) }},
		{name: "rolled back, replayed webhook", ledger: rolledBack, path: func(t *testing.T, cli *clientv3.Client, _ *gateNode) []deployEvent { return webhook(t, cli) }},
		{name: "rolled back, periodic re-pull", ledger: rolledBack, path: repull},
		{name: "rolled back, deployer restart", ledger: rolledBack, path: restart},
		{
			name: "a newer push releases", ledger: halted, path: func(t *testing.T, cli *clientv3.Client, _ *gateNode) []deployEvent { return webhook(t, cli) },
			release: func(t *testing.T, cli *clientv3.Client) {
				putVersions(t, cli, ledgerVersion{Version: 3, Image: gateRef, ImageID: imgY, Outcome: outcomeRolledOut, AskedBy: askedBy{Source: "registry"}})
			},
		},
		{
			name: "an explicit rollback to it releases", ledger: rolledBack, path: func(t *testing.T, cli *clientv3.Client, _ *gateNode) []deployEvent { return webhook(t, cli) },
			release: func(t *testing.T, cli *clientv3.Client) {
				// deployer rollback -to 2: version 2's image back, recorded.
				_, _, err := recordRollback(t.Context(), cli, rollbackRecord{Ref: gateRef, From: 3, To: rolledBack[1], Time: time.Now(), Keep: 20,
					Asked: askedBy{Source: "rollback", Command: "deployer rollback app -to 2", Host: "ops"}})
				if err != nil {
					t.Fatal(err)
				}
			},
		},
		{
			name: "a pin to it releases", ledger: halted, path: func(t *testing.T, cli *clientv3.Client, _ *gateNode) []deployEvent { return webhook(t, cli) },
			release: func(t *testing.T, cli *clientv3.Client) {
				p := newPinner(cli, "127.0.0.1:5000", 20)
				if _, _, err := p.pin(t.Context(), pinRequest{Image: gateRef, To: "2"}, askedBy{Command: "deployer pin app 2", Host: "ops"}); err != nil {
					t.Fatal(err)
				}
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cli := testNS(t)
			ledgerAt(t, cli, tc.ledger...)
			if tc.release != nil {
				tc.release(t, cli)
			}
			n := newGateNode(t, cli, cmpOr(tc.node, "n1"))
			if tc.moved {
				n.f.local[gateRef] = imgX
			}
			n.deploy(t, tc.path(t, cli, n)...)
			if tc.release != nil {
				if got := n.web(); got != imgX {
					t.Fatalf("after the release, web runs %s; want the released version %s", shortID(got), shortID(imgX))
				}
				return
			}
			if n.replaced() || n.web() != imgA {
				t.Fatalf("the quarantined version replaced containers: web runs %s, stops %v, created %d", shortID(n.web()), n.f.stops, n.f.created)
			}
			n.f.mu.Lock()
			tag := n.f.local[gateRef]
			n.f.mu.Unlock()
			if tag != imgA {
				t.Errorf("the local tag points at %s; want it back on %s (a unit that does not pull restarts from it)", shortID(tag), shortID(imgA))
			}
			eventually(t, 10*time.Second, "the hold recorded on version 2", func() bool {
				vs := readVersions(t, cli, gateRef)
				return slices.ContainsFunc(vs, func(v ledgerVersion) bool {
					return v.Version == 2 && strings.HasPrefix(v.Held, "quarantined: version 2")
				})
			})
			if vs := readVersions(t, cli, gateRef); len(vs) != len(tc.ledger) {
				t.Errorf("the held replay added a version: %+v", vs[0])
			}
		})
	}
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func TestQuarantinedBy(t *testing.T) {
	v := func(n int64, id, outcome, source string) ledgerVersion {
		return ledgerVersion{Version: n, ImageID: id, Outcome: outcome, AskedBy: askedBy{Source: source}}
	}
	for _, tc := range []struct {
		name     string
		versions []ledgerVersion // newest first
		id       string
		want     int64 // the quarantining version; 0: none
	}{
		{"rolled out", []ledgerVersion{v(1, imgA, outcomeRolledOut, "registry")}, imgA, 0},
		{"halted", []ledgerVersion{v(2, imgX, outcomeHalted, "registry"), v(1, imgA, outcomeRolledOut, "registry")}, imgX, 2},
		{"rolled back, then the rollback's version", []ledgerVersion{v(3, imgA, outcomeRolledOut, "rollback"), v(2, imgX, outcomeRolledBack, "registry")}, imgX, 2},
		{"the rollback's image is not quarantined", []ledgerVersion{v(3, imgA, outcomeRolledOut, "rollback"), v(2, imgX, outcomeRolledBack, "registry"), v(1, imgA, outcomeRolledOut, "registry")}, imgA, 0},
		{"a held replay of it does not release", []ledgerVersion{v(3, imgX, outcomeHeld, "registry"), v(2, imgX, outcomeHalted, "registry")}, imgX, 2},
		{"a newer push releases", []ledgerVersion{v(3, imgY, outcomeRollingOut, "registry"), v(2, imgX, outcomeHalted, "registry")}, imgX, 0},
		{"a push held by a pin releases", []ledgerVersion{v(3, imgY, outcomeHeld, "registry"), v(2, imgX, outcomeHalted, "registry")}, imgX, 0},
		{"a rollback to it releases", []ledgerVersion{v(4, imgX, outcomeRollingOut, "rollback"), v(3, imgA, outcomeRolledBack, "rollback"), v(2, imgX, outcomeRolledBack, "registry")}, imgX, 0},
		{"a pin to it releases", []ledgerVersion{v(3, imgX, outcomeRollingOut, "pin"), v(2, imgX, outcomeHalted, "registry")}, imgX, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := quarantinedBy(tc.versions, tc.id)
			if (tc.want != 0) != ok || got.Version != tc.want {
				t.Errorf("quarantinedBy(%s) = version %d, %t; want version %d", shortID(tc.id), got.Version, ok, tc.want)
			}
		})
	}
}

// TestPin: a pin holds every other version of the tag, puts the
// containers the node re-creates on the pinned image and the local tag on
// it, leaves the stop-strategy containers alone and names them; a push
// while pinned is recorded as held; unpinning deploys the newest version.
func TestPin(t *testing.T) {
	cli := testNS(t)
	ledgerAt(t, cli, ledgerVersion{ImageID: imgA, Outcome: outcomeRolledOut}, ledgerVersion{ImageID: imgX, Outcome: outcomeRolledOut})
	n := newGateNode(t, cli, "n1")
	n.f.local[gateRef] = imgX // version 2 rolled out: both containers run it
	n.f.containerByName("web").ImageID = imgX
	rc := n.f.addContainer("rc", gateRef)
	rc.Config = &docker.Config{Image: gateRef, Labels: map[string]string{strategyKey: strategyRecr}}
	rc.unsupervised = true

	// The node's status record says how each container is replaced.
	sr := newStatusReporter(n.f, nil, cli, testLeases(t, cli), "n1", "test", nil, nil, testLogger(t))
	sr.strategy = strategyStop
	cs, err := sr.containers(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(nodeStatus{Node: "n1", Containers: cs})
	if _, err := cli.Put(t.Context(), statusKey("n1"), string(b)); err != nil {
		t.Fatal(err)
	}

	p := newPinner(cli, "127.0.0.1:5000", 20)
	res, _, err := p.pin(t.Context(), pinRequest{Image: "127.0.0.1:5000/app", To: "1"}, askedBy{Command: "deployer pin app 1", Host: "ops"})
	if err == nil && res.Image != gateRef {
		t.Fatalf("pin of %s; want %s (a bare repository is :latest)", res.Image, gateRef)
	}
	if err == nil {
		t.Fatal("a pin without a tag was accepted")
	}
	res, from, err := p.pin(t.Context(), pinRequest{Image: gateRef, To: "1"}, askedBy{Command: "deployer pin app:latest 1", Host: "ops"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Version != 1 || res.ImageID != imgA || from.Version != 2 || !slices.Equal(res.Warnings, []string{"n1/web"}) {
		t.Errorf("pin = %+v from %d; want version 1 (%s), from version 2, warning about n1/web only", res, from.Version, shortID(imgA))
	}
	if text := pinAnnouncement(res, from, askedBy{Command: "deployer pin app:latest 1", Host: "ops"}); !strings.Contains(text, "pinned to version 1") ||
		!strings.Contains(text, "from version 2") || !strings.Contains(text, "deployer pin app:latest 1 on ops") || !strings.Contains(text, "n1/web") {
		t.Errorf("announcement: %s", text)
	}
	vs := readVersions(t, cli, gateRef)
	if vs[0].Version != 3 || vs[0].ImageID != imgA || vs[0].AskedBy.Source != "pin" || vs[0].AskedBy.Command != "deployer pin app:latest 1" {
		t.Errorf("the pin's version in the ledger: %+v", vs[0])
	}
	trig, err := cli.Get(t.Context(), triggerKey(gateRepo))
	if err != nil || len(trig.Kvs) != 1 || trig.Kvs[0].ModRevision != res.Revision {
		t.Fatalf("the pin's trigger: %v %v; want one written at revision %d", err, trig, res.Revision)
	}

	// Every node acts on the pin's trigger.
	n.deploy(t, deployEvent{Tags: []string{"latest"}, Rev: res.Revision})
	if got := n.f.containerByName("rc").ImageID; got != imgA {
		t.Errorf("the recreate container runs %s; want the pinned %s", shortID(got), shortID(imgA))
	}
	if got := n.web(); got != imgX || slices.Contains(n.f.stops, "web") {
		t.Errorf("the stop-strategy container was replaced (runs %s, stops %v); want it left alone and warned about", shortID(got), n.f.stops)
	}
	if got := n.f.local[gateRef]; got != imgA {
		t.Errorf("the local tag points at %s; want the pinned %s (units that do not pull start it)", shortID(got), shortID(imgA))
	}

	// A push while pinned: recorded as held, nothing replaced.
	n.f.remote[gateRef] = imgY
	stops := len(n.f.stops)
	n.deploy(t, deployEvent{Tags: []string{"latest"}, Rev: putTrigger(t, cli, "registry")})
	if len(n.f.stops) != stops || n.f.containerByName("rc").ImageID != imgA || n.f.local[gateRef] != imgA {
		t.Errorf("a push while pinned replaced something: stops %v, rc on %s, tag on %s", n.f.stops, shortID(n.f.containerByName("rc").ImageID), shortID(n.f.local[gateRef]))
	}
	eventually(t, 10*time.Second, "the push recorded as held by pin", func() bool {
		vs := readVersions(t, cli, gateRef)
		return vs[0].ImageID == imgY && vs[0].Outcome == outcomeHeld && strings.HasPrefix(vs[0].Held, "held by pin to version 1")
	})

	// Unpin: the pin goes and the trigger is written in one transaction;
	// the newest version deploys.
	ures, old, err := p.unpin(t.Context(), pinRequest{Image: gateRef}, askedBy{Command: "deployer unpin app:latest", Host: "ops"})
	if err != nil || old.Version != 1 {
		t.Fatalf("unpin = %v, %+v", err, old)
	}
	if pin, _, _ := readPin(t.Context(), cli, gateRef); pin != nil {
		t.Error("the pin is still there")
	}
	trig, _ = cli.Get(t.Context(), triggerKey(gateRepo))
	if trig.Kvs[0].ModRevision != ures.Revision {
		t.Errorf("the unpin's trigger at %d; want %d, the revision that deleted the pin", trig.Kvs[0].ModRevision, ures.Revision)
	}
	if _, _, err := p.unpin(t.Context(), pinRequest{Image: gateRef}, askedBy{}); !errorsIs(err, errNotPinned) {
		t.Errorf("a second unpin = %v; want %v", err, errNotPinned)
	}
	n.deploy(t, deployEvent{Tags: []string{"latest"}, Rev: ures.Revision})
	if rc, web := n.f.containerByName("rc").ImageID, n.web(); rc != imgY || web != imgY {
		t.Errorf("after unpin rc runs %s, web %s; want both on the newest %s", shortID(rc), shortID(web), shortID(imgY))
	}
	eventually(t, 10*time.Second, "the held version rolling out once released", func() bool {
		vs := readVersions(t, cli, gateRef)
		return vs[0].ImageID == imgY && vs[0].Outcome != outcomeHeld && vs[0].Nodes["n1"].Converged.After(time.Time{})
	})
}

func errorsIs(err, target error) bool { return errors.Is(err, target) }

// failingGets is etcd whose reads fail (a leader election, a partition).
type failingGets struct{ clientv3.KV }

func (failingGets) Get(context.Context, string, ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	return nil, errors.New("etcdserver: request timed out")
}

// TestGateUnreadable: when the holds cannot be read, nothing is replaced
// and the deploy fails with a retryable error (its trigger stays open): a
// pin or a quarantine that cannot be seen must not be deployed through.
func TestGateUnreadable(t *testing.T) {
	cli := testNS(t)
	n := newGateNode(t, cli, "n1")
	n.dep.gate.kv = failingGets{cli}
	n.dep.gate.quarantine.kv = failingGets{cli}
	err := n.dep.deploy(t.Context(), job{Repo: canon(gateRepo), Tags: map[string]struct{}{"latest": {}}, Revs: []int64{putTrigger(t, cli, "registry")}})
	if err == nil || !retryable(err) {
		t.Fatalf("deploy = %v; want a retryable failure", err)
	}
	if n.replaced() || n.web() != imgA {
		t.Errorf("replaced while the holds could not be read: web on %s, stops %v", shortID(n.web()), n.f.stops)
	}
}

// sparseDocker is a fake Docker that has only the images in have (by
// ID): a node that joined after a pin, or whose -cleanup removed the
// pinned image. A pull by digest fetches what registry maps it to
// (nothing: "manifest unknown").
type sparseDocker struct {
	*fakeDocker
	have     map[string]bool
	registry map[string]string // digest -> image ID
	byDigest []string          // the pulls by digest
}

func (s *sparseDocker) InspectImageWithContext(ctx context.Context, name string) (*docker.Image, error) {
	s.mu.Lock()
	missing := strings.HasPrefix(name, "sha256:") && !s.have[name]
	s.mu.Unlock()
	if missing {
		return nil, docker.ErrNoSuchImage
	}
	return s.fakeDocker.InspectImageWithContext(ctx, name)
}

func (s *sparseDocker) PullImage(opts docker.PullImageOptions, auth docker.AuthConfiguration) error {
	if !strings.HasPrefix(opts.Tag, "sha256:") {
		return s.fakeDocker.PullImage(opts, auth)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.byDigest = append(s.byDigest, opts.Repository+"@"+opts.Tag)
	id, ok := s.registry[opts.Tag]
	if !ok {
		return &docker.Error{Status: 404, Message: "manifest unknown"}
	}
	s.have[id] = true
	return nil
}

// TestPinPullsThePinnedImage: a node without the pinned image pulls it by
// its digest, then keeps the tag on it; when it cannot, it holds the
// version and replaces nothing.
func TestPinPullsThePinnedImage(t *testing.T) {
	const digestA = "sha256:dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd"
	for _, tc := range []struct {
		name     string
		served   bool // the registry still serves the pinned digest
		wantWeb  string
		wantTag  string
		wantPull int
	}{
		{"pulled by digest", true, imgA, imgA, 1},
		{"not pullable: held, nothing replaced", false, imgX, imgX, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cli := testNS(t)
			ledgerAt(t, cli, ledgerVersion{ImageID: imgA, Digest: digestA, Outcome: outcomeRolledOut}, ledgerVersion{ImageID: imgX, Outcome: outcomeRolledOut})
			n := newGateNode(t, cli, "n9-joined")
			n.f.local[gateRef] = imgX
			rc := n.f.containerByName("web")
			rc.ImageID, rc.unsupervised = imgX, true
			rc.Config = &docker.Config{Image: gateRef, Labels: map[string]string{strategyKey: strategyRecr}}
			sd := &sparseDocker{fakeDocker: n.f, have: map[string]bool{imgX: true}, registry: map[string]string{}}
			if tc.served {
				sd.registry[digestA] = imgA
			}
			n.dep.gate.docker = sd
			res, _, err := newPinner(cli, "127.0.0.1:5000", 20).pin(t.Context(), pinRequest{Image: gateRef, To: "1"}, askedBy{Command: "deployer pin", Host: "ops"})
			if err != nil {
				t.Fatal(err)
			}
			n.deploy(t, deployEvent{Tags: []string{"latest"}, Rev: res.Revision})
			if got := n.web(); got != tc.wantWeb {
				t.Errorf("web runs %s; want %s", shortID(got), shortID(tc.wantWeb))
			}
			if got := n.f.local[gateRef]; got != tc.wantTag {
				t.Errorf("the local tag names %s; want %s", shortID(got), shortID(tc.wantTag))
			}
			if len(sd.byDigest) != tc.wantPull || sd.byDigest[0] != gateRepo+"@"+digestA {
				t.Errorf("pulls by digest %v; want %s@%s", sd.byDigest, gateRepo, digestA)
			}
		})
	}
}
