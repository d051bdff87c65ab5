package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// startReporter runs a status reporter on f until the test ends.
func startReporter(t *testing.T, cli *clientv3.Client, f *fakeDocker, period time.Duration) *statusReporter {
	t.Helper()
	s := newStatusReporter(f, f, cli, testLeases(t, cli), "n1", version, nil, nil, testLogger(t))
	s.period, s.settle, s.retryBase = period, 10*time.Millisecond, 20*time.Millisecond
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { s.run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return s
}

// recordNames reads node n1's status record: the names of its containers.
func recordNames(t *testing.T, cli *clientv3.Client) []string {
	t.Helper()
	resp, err := cli.Get(t.Context(), statusKey("n1"))
	if err != nil || len(resp.Kvs) == 0 {
		return nil
	}
	var n nodeStatus
	json.Unmarshal(resp.Kvs[0].Value, &n)
	var out []string
	for _, c := range n.Containers {
		out = append(out, c.Name)
	}
	return out
}

func (f *fakeDocker) listCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.listedAt)
}

func (f *fakeDocker) subscribed() (subscribes, listeners int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.subscribes, len(f.listeners)
}

// A container that starts outside any deploy reaches the record through
// Docker's event stream, long before the resync period.
func TestStatusEventWritesRecord(t *testing.T) {
	cli := testNS(t)
	f := newFakeDocker()
	f.local["reg:5000/app:qa"] = "sha256:" + strings.Repeat("1", 64)
	f.local["reg:5000/web:qa"] = "sha256:" + strings.Repeat("2", 64)
	f.addContainer("app", "reg:5000/app:qa")
	startReporter(t, cli, f, time.Hour)
	eventually(t, 5*time.Second, "the first record", func() bool { return fmt.Sprint(recordNames(t, cli)) == "[app]" })
	eventually(t, 5*time.Second, "the subscription", func() bool { _, n := f.subscribed(); return n == 1 })

	web := f.addContainer("web", "reg:5000/web:qa")
	f.mu.Lock()
	f.emit("start", web)
	f.mu.Unlock()
	eventually(t, 5*time.Second, "web in the record", func() bool { return fmt.Sprint(recordNames(t, cli)) == "[app web]" })

	f.mu.Lock()
	web.Running = false
	f.emit("die", web)
	f.mu.Unlock()
	eventually(t, 5*time.Second, "web out of the record", func() bool { return fmt.Sprint(recordNames(t, cli)) == "[app]" })
}

// With no event, the reporter lists the containers once at start and then
// not again before the resync period; events that cannot change the
// list or what is down (a health check's exec) do not make it list
// either. (A health status event does: Docker sends one only when the
// status changes.)
func TestStatusIdleListsOnlyOnResync(t *testing.T) {
	cli := testNS(t)
	f := newFakeDocker()
	f.local["reg:5000/app:qa"] = "sha256:" + strings.Repeat("1", 64)
	app := f.addContainer("app", "reg:5000/app:qa")
	const period = 400 * time.Millisecond
	startReporter(t, cli, f, period)
	eventually(t, 5*time.Second, "the subscription", func() bool { _, n := f.subscribed(); return n == 1 })
	f.mu.Lock()
	f.emit("exec_start: /bin/true", app)
	f.emit("exec_die", app)
	f.mu.Unlock()
	eventually(t, 5*time.Second, "the resync", func() bool { return f.listCount() >= 2 })
	f.mu.Lock()
	gap := f.listedAt[1].Sub(f.listedAt[0])
	f.mu.Unlock()
	if gap < period {
		t.Errorf("second listing %v after the first; want none before the resync period %v", gap, period)
	}

	// The daemon's own reporter resyncs no more than once a minute.
	d, err := newDaemon(config{Registry: "reg:5000", NodeName: "n1", EtcdPrefix: testPrefix(t), RestartStrategy: strategyStop}, cli, f, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	if d.status.period < time.Minute || d.status.events == nil {
		t.Errorf("daemon's status reporter: period %v, events %T; want at least a minute and a subscription", d.status.period, d.status.events)
	}
}

// When the event stream ends the client closes the channel: the reporter
// subscribes again after a growing backoff (not in a loop on the closed
// channel), and lists once it has, because events were missed.
func TestStatusEventStreamClosedResubscribes(t *testing.T) {
	cli := testNS(t)
	f := newFakeDocker()
	f.local["reg:5000/app:qa"] = "sha256:" + strings.Repeat("1", 64)
	f.addContainer("app", "reg:5000/app:qa")
	startReporter(t, cli, f, time.Hour)
	eventually(t, 5*time.Second, "the subscription", func() bool { _, n := f.subscribed(); return n == 1 })
	eventually(t, 5*time.Second, "the first record", func() bool { return fmt.Sprint(recordNames(t, cli)) == "[app]" })

	// dockerd goes away: every new subscription is closed at once.
	f.mu.Lock()
	f.eventsDown = true
	f.mu.Unlock()
	start := time.Now()
	f.endEvents()
	eventually(t, 10*time.Second, "four more subscriptions", func() bool { s, _ := f.subscribed(); return s >= 5 })
	// Backoffs of 20ms base: at least 10+20+40+80 ms (half of each, the
	// jitter's floor) before the fifth; a spin would take microseconds.
	if took := time.Since(start); took < 150*time.Millisecond {
		t.Errorf("4 re-subscriptions in %v; want a backoff between them", took)
	}
	// While down the reporter does not list in a loop either.
	if n := f.listCount(); n > 6 {
		t.Errorf("%d listings while the event stream was down; want one per re-subscription at most", n)
	}

	// dockerd is back: a subscription holds, the missed change is listed,
	// and events work again.
	f.mu.Lock()
	f.eventsDown = false
	f.local["reg:5000/web:qa"] = "sha256:" + strings.Repeat("2", 64)
	f.mu.Unlock()
	f.addContainer("web", "reg:5000/web:qa")
	eventually(t, 10*time.Second, "a subscription again", func() bool { _, n := f.subscribed(); return n == 1 })
	eventually(t, 5*time.Second, "web listed after re-subscribing", func() bool { return fmt.Sprint(recordNames(t, cli)) == "[app web]" })
	web := f.containerByName("web")
	f.mu.Lock()
	web.Running = false
	f.emit("die", web)
	f.mu.Unlock()
	eventually(t, 5*time.Second, "web out of the record", func() bool { return fmt.Sprint(recordNames(t, cli)) == "[app]" })
}

// When the record's lease is lost (revoked here; expired after a network
// partition), the record goes with it: the reporter writes it again under
// the new session at once, not at the next resync.
func TestStatusRewrittenWhenLeaseLost(t *testing.T) {
	cli := testNS(t)
	f := newFakeDocker()
	f.local["reg:5000/app:qa"] = "sha256:" + strings.Repeat("1", 64)
	f.addContainer("app", "reg:5000/app:qa")
	startReporter(t, cli, f, time.Hour)
	key := statusKey("n1")
	var lease int64
	eventually(t, 5*time.Second, "the first record", func() bool {
		resp, err := cli.Get(t.Context(), key)
		if err != nil || len(resp.Kvs) == 0 {
			return false
		}
		lease = resp.Kvs[0].Lease
		return true
	})
	if _, err := cli.Revoke(t.Context(), clientv3.LeaseID(lease)); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the record under a new lease", func() bool {
		resp, err := cli.Get(t.Context(), key)
		return err == nil && len(resp.Kvs) == 1 && resp.Kvs[0].Lease != lease && fmt.Sprint(recordNames(t, cli)) == "[app]"
	})
}

// readDown reads node's down record of ref (nil: none).
func readDown(t *testing.T, cli *clientv3.Client, ref, node string) *downRecord {
	t.Helper()
	resp, err := cli.Get(t.Context(), downKey(ref, node))
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return nil
	}
	var d downRecord
	if err := json.Unmarshal(resp.Kvs[0].Value, &d); err != nil {
		t.Fatal(err)
	}
	return &d
}

// downString renders a down record as "name:reason …" ("" for none).
func downString(d *downRecord) string {
	if d == nil {
		return ""
	}
	var parts []string
	for _, c := range d.Containers {
		parts = append(parts, c.Name+":"+c.Reason)
	}
	return strings.Join(parts, " ")
}

// The node's down record of a tag follows what Docker reports, through
// its events: unhealthy, starting, crash-looping (listed as restarting)
// and no longer running count as down; healthy again clears it; a daemon
// that stops answering makes every container it ran down; a container
// gone for good stops counting after the grace; and the record is bound
// to the node's lease.
func TestStatusDownRecords(t *testing.T) {
	const app, web = "reg:5000/app:qa", "reg:5000/web:qa"
	cli := testNS(t)
	f := newFakeDocker()
	f.local[app] = "sha256:" + strings.Repeat("1", 64)
	f.local[web] = "sha256:" + strings.Repeat("2", 64)
	a := f.addContainer("app", app)
	w := f.addContainer("web", web)
	a.Health, w.Health = "healthy", "healthy"
	s := startReporter(t, cli, f, time.Hour)
	eventually(t, 5*time.Second, "the first record", func() bool { return fmt.Sprint(recordNames(t, cli)) == "[app web]" })
	eventually(t, 5*time.Second, "the subscription", func() bool { _, n := f.subscribed(); return n == 1 })
	if d := readDown(t, cli, app, "n1"); d != nil {
		t.Fatalf("down record %+v with every container healthy; want none", d)
	}
	change := func(c *fakeContainer, action string, mutate func()) {
		f.mu.Lock()
		mutate()
		f.emit(action, c)
		f.mu.Unlock()
	}
	steps := []struct {
		name     string
		c        *fakeContainer
		action   string
		mutate   func()
		ref      string
		wantDown string
	}{
		{"turns unhealthy", a, "health_status: unhealthy", func() { a.Health = "unhealthy" }, app, "app:unhealthy"},
		{"healthy again", a, "health_status: healthy", func() { a.Health = "healthy" }, app, ""},
		{"restarted, health starting", a, "start", func() { a.Health = "starting" }, app, "app:starting"},
		{"crash-loops", a, "die", func() { a.Health, a.Running, a.Restarting = "", true, true }, app, "app:restarting"},
		{"runs again", a, "start", func() { a.Restarting = false }, app, ""},
		{"web exits", w, "die", func() { w.Running = false }, web, "web:not running"},
		{"web runs again", w, "start", func() { w.Running = true }, web, ""},
	}
	for _, st := range steps {
		change(st.c, st.action, st.mutate)
		eventually(t, 5*time.Second, st.name+": down record "+st.wantDown, func() bool { return downString(readDown(t, cli, st.ref, "n1")) == st.wantDown })
	}

	// dockerd goes away: the event stream ends, the listing fails, and
	// every container it ran is down until it answers again.
	f.mu.Lock()
	f.listErr = errors.New("cannot connect to the Docker daemon")
	f.mu.Unlock()
	f.endEvents()
	eventually(t, 5*time.Second, "app unreachable", func() bool { return downString(readDown(t, cli, app, "n1")) == "app:unreachable" })
	eventually(t, 5*time.Second, "web unreachable", func() bool { return downString(readDown(t, cli, web, "n1")) == "web:unreachable" })
	f.mu.Lock()
	f.listErr = nil
	f.mu.Unlock()
	eventually(t, 10*time.Second, "records cleared once Docker answers", func() bool {
		return readDown(t, cli, app, "n1") == nil && readDown(t, cli, web, "n1") == nil
	})

	// The record is bound to the node's lease: it goes with it, and is
	// written again under the next one.
	change(a, "health_status: unhealthy", func() { a.Health = "unhealthy" })
	eventually(t, 5*time.Second, "app unhealthy", func() bool { return downString(readDown(t, cli, app, "n1")) == "app:unhealthy" })
	resp, err := cli.Get(t.Context(), downKey(app, "n1"))
	if err != nil || len(resp.Kvs) != 1 || resp.Kvs[0].Lease == 0 {
		t.Fatalf("down record %v, %v; want one bound to a lease", resp, err)
	}
	if _, err := cli.Revoke(t.Context(), clientv3.LeaseID(resp.Kvs[0].Lease)); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the record under a new lease", func() bool {
		r, err := cli.Get(t.Context(), downKey(app, "n1"))
		return err == nil && len(r.Kvs) == 1 && r.Kvs[0].Lease != resp.Kvs[0].Lease
	})

	// A container removed for good counts as down for the grace only
	// (shortened here once it counts, and the reporter woken).
	change(w, "destroy", func() { f.containers = slices.DeleteFunc(f.containers, func(c *fakeContainer) bool { return c == w }) })
	eventually(t, 5*time.Second, "web removed", func() bool { return downString(readDown(t, cli, web, "n1")) == "web:not running" })
	s.mu.Lock()
	s.downGrace = time.Millisecond
	s.mu.Unlock()
	s.poke()
	eventually(t, 5*time.Second, "web forgotten after the grace", func() bool { return readDown(t, cli, web, "n1") == nil })
}
