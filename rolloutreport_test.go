package main

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// sentLog records what the reporters of a test delivered, as
// "node: text".
type sentLog struct {
	mu  sync.Mutex
	got []string
}

// reportSink is one node's deliverer into a sentLog.
type reportSink struct {
	log  *sentLog
	node string
	err  error // returned by every delivery
}

var _ reportDeliverer = (*reportSink)(nil)

func (s *reportSink) deliver(_ context.Context, m message) error {
	s.log.mu.Lock()
	defer s.log.mu.Unlock()
	s.log.got = append(s.log.got, s.node+": "+m.Text)
	return s.err
}

func (l *sentLog) sink(node string) *reportSink { return &reportSink{log: l, node: node} }

func (l *sentLog) texts() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.got...)
}

var t0 = time.Date(2026, 12, 3, 10, 0, 0, 0, time.UTC)

func at(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }

func rolledOut() ledgerVersion {
	return ledgerVersion{
		Version: 3, Image: "127.0.0.1:5000/myorg/app:qa", ImageID: "sha256:8e41d0c3aa52ffffffff", Digest: "sha256:abcd",
		Pushed: t0, Outcome: outcomeRolledOut, Completed: at(4.2), FirstSeconds: 1.9, LastSeconds: 4.2,
		Nodes: map[string]nodeResult{"n1": {Converged: at(1.9)}, "n2": {Converged: at(4.2)}, "n3": {Converged: at(3)}},
	}
}

func halted() ledgerVersion {
	return ledgerVersion{
		Version: 4, Image: "127.0.0.1:5000/myorg/app:qa", ImageID: "sha256:99990000aaaaffff", Pushed: t0, Outcome: outcomeHalted,
		Nodes: map[string]nodeResult{"n1": {Converged: at(2)}, "n2": {Failed: at(5), Reason: "app exited (code 1)"}},
	}
}

func TestRolloutReportSummary(t *testing.T) {
	failedSettled := halted()
	failedSettled.Outcome = outcomeRollingOut
	tests := []struct {
		name    string
		v       ledgerVersion
		running []string
		want    []string // in the text
		fields  map[string]string
	}{
		{"rolled out", rolledOut(), []string{"n1", "n2", "n3"},
			[]string{"Rolled out 127.0.0.1:5000/myorg/app:qa (version 3, image 8e41d0c3aa52, digest sha256:abcd): 3 of 3 nodes in 4.2s (first node 1.9s)"},
			map[string]string{"kind": "rollout", "outcome": "rolled out", "done": "3", "failed": "0", "nodes": "3", "digest": "sha256:abcd", "lead_seconds": "4.200"}},
		{"halted, one node not reached", halted(), []string{"n1", "n2", "n3"},
			[]string{":x: Rollout HALTED: 127.0.0.1:5000/myorg/app:qa (version 4, image 99990000aaaa): 1 of 3 nodes done, 1 failed, 1 not reached (n3); 5s since the push",
				"\n• n2 failed: app exited (code 1)"},
			map[string]string{"outcome": "halted", "done": "1", "failed": "1", "failed_nodes": "n2", "nodes": "3"}},
		{"every node converged or failed, no halt", failedSettled, []string{"n1", "n2"},
			[]string{":x: Rollout FAILED: 127.0.0.1:5000/myorg/app:qa", "1 of 2 nodes done, 1 failed;", "n2 failed: app exited"},
			map[string]string{"outcome": "failed", "failed_nodes": "n2"}},
		{"docker hub names are familiar", func() ledgerVersion { v := rolledOut(); v.Image = "docker.io/library/nginx:1.27"; return v }(), nil,
			[]string{"Rolled out nginx:1.27 (version 3"}, map[string]string{"image": "nginx:1.27"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := summarize(tt.v, tt.running).message()
			for _, w := range tt.want {
				if !strings.Contains(m.Text, w) {
					t.Errorf("text = %q; want it to contain %q", m.Text, w)
				}
			}
			for k, w := range tt.fields {
				if m.Fields[k] != w {
					t.Errorf("field %s = %q; want %q", k, m.Fields[k], w)
				}
			}
		})
	}
}

func TestRolloutReportSettle(t *testing.T) {
	now := at(10)
	reported := rolledOut()
	reported.Reported = &reportMark{Node: "n1"}
	rolling := rolledOut()
	rolling.Outcome, rolling.Completed = outcomeRollingOut, time.Time{}
	failedAll := halted()
	failedAll.Outcome = outcomeRollingOut
	tests := []struct {
		name    string
		v       ledgerVersion
		running []string
		now     time.Time
		want    settled
		ok      bool
	}{
		{"rolled out: by the last node", rolledOut(), nil, now, settled{at(4.2), "n2"}, true},
		{"halted: by the node that failed first", halted(), []string{"n3"}, now, settled{at(5), "n2"}, true},
		{"already reported", reported, nil, now, settled{}, false},
		{"still rolling out", rolling, []string{"n4"}, now, settled{}, false},
		{"every node converged, not written complete yet", rolling, nil, now, settled{}, false},
		{"converged or failed everywhere", failedAll, []string{"n1", "n2"}, now, settled{at(5), "n2"}, true},
		{"a node running the tag has not answered", failedAll, []string{"n1", "n2", "n3"}, now, settled{}, false},
		{"settled too long ago", rolledOut(), nil, at(4.2).Add(reportWindow + time.Second), settled{}, false},
		{"superseded", func() ledgerVersion { v := rolledOut(); v.Outcome = outcomeSuperseded; return v }(), nil, now, settled{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := settle(tt.v, tt.running, tt.now)
			if ok != tt.ok || got != tt.want {
				t.Errorf("settle = %+v, %v; want %+v, %v", got, ok, tt.want, tt.ok)
			}
		})
	}
}

// putVersion writes v into the ledger as its node would have.
func putVersion(t *testing.T, cli *clientv3.Client, v ledgerVersion) string {
	t.Helper()
	b, _ := json.Marshal(v)
	key := historyKey(v.Image, v.Version)
	if _, err := cli.Put(t.Context(), key, string(b)); err != nil {
		t.Fatal(err)
	}
	return key
}

func readVersion(t *testing.T, cli *clientv3.Client, key string) ledgerVersion {
	t.Helper()
	resp, err := cli.Get(t.Context(), key)
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("get %s: %v (%d keys)", key, err, len(resp.Kvs))
	}
	var v ledgerVersion
	if err := json.Unmarshal(resp.Kvs[0].Value, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

func newTestReporter(t *testing.T, cli *clientv3.Client, node string, out reportDeliverer, now time.Time) *rolloutReporter {
	r := newRolloutReporter(cli, testLeases(t, cli), out, nil, node, testLogger(t))
	r.now = func() time.Time { return now }
	return r
}

// TestRolloutReportOnceFromTwoNodes: two nodes find the same settled
// version at once, each allowed to send it (past the takeover): one
// report, marked in the ledger, the claim gone; a second pass (a
// restart, a replayed trigger) sends nothing.
func TestRolloutReportOnceFromTwoNodes(t *testing.T) {
	cli := testNS(t)
	key := putVersion(t, cli, rolledOut())
	var log sentLog
	s1, s2 := log.sink("n1"), log.sink("n3")
	now := at(4.2).Add(time.Minute) // past the takeover: either may send
	r1, r2 := newTestReporter(t, cli, "n1", s1, now), newTestReporter(t, cli, "n3", s2, now)
	for range 2 {
		var wg sync.WaitGroup
		start := make(chan struct{})
		for _, r := range []*rolloutReporter{r1, r2} {
			wg.Go(func() {
				<-start
				if _, err := r.loopOnce(t.Context()); err != nil {
					t.Error(err)
				}
			})
		}
		close(start)
		wg.Wait()
	}
	got := log.texts()
	if len(got) != 1 || !strings.Contains(got[0], "Rolled out 127.0.0.1:5000/myorg/app:qa (version 3") {
		t.Fatalf("reports sent: %q; want one", got)
	}
	v := readVersion(t, cli, key)
	if v.Reported == nil || v.Reported.Outcome != outcomeRolledOut || !strings.HasPrefix(got[0], v.Reported.Node+": ") {
		t.Errorf("Reported = %+v; want the sender's mark (sent: %q)", v.Reported, got[0])
	}
	if resp, _ := cli.Get(t.Context(), reportsPrefix, clientv3.WithPrefix()); len(resp.Kvs) != 0 {
		t.Errorf("claims left: %d; want none", len(resp.Kvs))
	}
}

// TestRolloutReportBySettler: within the takeover, only the node that
// settled the version sends; the others wait and are told how long.
func TestRolloutReportBySettler(t *testing.T) {
	cli := testNS(t)
	putVersion(t, cli, rolledOut()) // n2 converged last
	var log sentLog
	s1, s2 := log.sink("n1"), log.sink("n2")
	now := at(4.2).Add(time.Second)
	r1 := newTestReporter(t, cli, "n1", s1, now)
	next, err := r1.loopOnce(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if got := log.texts(); len(got) != 0 || next != reportTakeover-time.Second {
		t.Fatalf("n1 sent %q and waits %v; want nothing sent and a wait of %v", got, next, reportTakeover-time.Second)
	}
	if _, err := newTestReporter(t, cli, "n2", s2, now).loopOnce(t.Context()); err != nil {
		t.Fatal(err)
	}
	if got := log.texts(); len(got) != 1 || !strings.HasPrefix(got[0], "n2: ") {
		t.Fatalf("sent %q; want one report from n2", got)
	}
}

// TestRolloutReportTakeover: the settler claims the report and dies
// before it sends (its lease ends): another node sends it, once.
func TestRolloutReportTakeover(t *testing.T) {
	cli := testNS(t)
	key := putVersion(t, cli, rolledOut())
	var log sentLog
	s1, s2 := log.sink("n2"), log.sink("n1")
	now := at(4.2).Add(time.Minute)
	dying := newTestReporter(t, cli, "n2", s1, now)
	leases := testLeases(t, cli)
	dying.leases = leases
	claimed := make(chan struct{})
	ctx, kill := context.WithCancel(t.Context())
	dying.hook = func(ctx context.Context) { close(claimed); <-ctx.Done() }
	done := make(chan struct{})
	go func() { defer close(done); _, _ = dying.loopOnce(ctx) }()
	<-claimed

	other := newTestReporter(t, cli, "n1", s2, now)
	if _, err := other.loopOnce(t.Context()); err != nil {
		t.Fatal(err)
	}
	if got := log.texts(); len(got) != 0 {
		t.Fatalf("sent %q while the claim is held; want nothing", got)
	}
	kill()
	<-done
	if err := leases.Close(); err != nil { // the lease ends: as a SIGKILL's expiry
		t.Fatal(err)
	}
	if _, err := other.loopOnce(t.Context()); err != nil {
		t.Fatal(err)
	}
	if _, err := other.loopOnce(t.Context()); err != nil {
		t.Fatal(err)
	}
	if got := log.texts(); len(got) != 1 || !strings.HasPrefix(got[0], "n1: ") {
		t.Fatalf("sent %q; want one report from n1", got)
	}
	if v := readVersion(t, cli, key); v.Reported == nil || v.Reported.Node != "n1" {
		t.Errorf("Reported = %+v; want n1's mark", v.Reported)
	}
}

// TestRolloutReportSendFailureMarked: no service took the report: it is
// marked with the error and not sent again and again.
func TestRolloutReportSendFailureMarked(t *testing.T) {
	cli := testNS(t)
	key := putVersion(t, cli, halted())
	var log sentLog
	s := log.sink("n2")
	s.err = errors.New("generic: 503 Service Unavailable")
	r := newTestReporter(t, cli, "n2", s, at(6))
	for range 2 {
		if _, err := r.loopOnce(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	if got := log.texts(); len(got) != 1 {
		t.Fatalf("sent %d times; want once", len(got))
	}
	if v := readVersion(t, cli, key); v.Reported == nil || !strings.Contains(v.Reported.Err, "503") || v.Reported.Outcome != outcomeHalted {
		t.Errorf("Reported = %+v; want the halted outcome and the error", v.Reported)
	}
}

// blockingSink blocks every delivery until its context ends.
type blockingSink struct{ started chan struct{} }

func (b blockingSink) deliver(ctx context.Context, _ message) error {
	close(b.started)
	<-ctx.Done()
	return ctx.Err()
}

// TestRolloutReportStopWhileSending: a node stopped while it sends leaves
// the report unmarked and its claim released: another node sends it.
func TestRolloutReportStopWhileSending(t *testing.T) {
	cli := testNS(t)
	key := putVersion(t, cli, rolledOut())
	now := at(4.2).Add(time.Minute)
	stopping := newTestReporter(t, cli, "n2", blockingSink{make(chan struct{})}, now)
	ctx, stop := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { defer close(done); _, _ = stopping.loopOnce(ctx) }()
	<-stopping.out.(blockingSink).started
	stop()
	<-done
	if v := readVersion(t, cli, key); v.Reported != nil {
		t.Fatalf("Reported = %+v after a stop during the send; want none", v.Reported)
	}
	var log sentLog
	if _, err := newTestReporter(t, cli, "n1", log.sink("n1"), now).loopOnce(t.Context()); err != nil {
		t.Fatal(err)
	}
	if got := log.texts(); len(got) != 1 {
		t.Errorf("n1 sent %q; want the report", got)
	}
}

// countingReportEtcd counts the reporter's reads of the fleet: every
// node's status record, and a version's node keys.
type countingReportEtcd struct {
	*clientv3.Client
	status, nodes atomic.Int32
}

func (c *countingReportEtcd) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	switch {
	case key == statusPrefix:
		c.status.Add(1)
	case strings.HasPrefix(key, historyNodesPrefix):
		c.nodes.Add(1)
	}
	return c.Client.Get(ctx, key, opts...)
}

// TestRolloutReportReadsTheFleetOnlyWhenDue: a version that rolls out
// without a failure, and one that rolled out and waits for its settler's
// report, cost a reporter no read of the status records or of the node
// keys (each as large as the fleet); it reads them once, to send. Before,
// every reporter read every status record on every change of the ledger.
func TestRolloutReportReadsTheFleetOnlyWhenDue(t *testing.T) {
	cli := testNS(t)
	v := rolledOut()
	v.CompletedBy = "n2"
	v.Nodes = nil // as the ledger writes it now: convergences are node keys
	putVersion(t, cli, v)
	for _, n := range []string{"n1", "n2"} {
		must(cli.Put(t.Context(), historyNodeKey(v.Image, v.Version, n), convergedAt(v.Completed)))
	}
	rolling := ledgerVersion{Version: 4, Image: v.Image, ImageID: "sha256:" + strings.Repeat("4", 64), Pushed: at(10), Outcome: outcomeRollingOut}
	putVersion(t, cli, rolling)
	must(cli.Put(t.Context(), historyNodeKey(v.Image, 4, "n1"), convergedAt(at(11))))
	var log sentLog
	etcd := &countingReportEtcd{Client: cli}
	r := newTestReporter(t, cli, "n1", log.sink("n1"), at(4.2).Add(time.Second))
	r.etcd = etcd
	for range 3 {
		if _, err := r.loopOnce(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	if s, n := etcd.status.Load(), etcd.nodes.Load(); s != 0 || n != 0 || len(log.texts()) != 0 {
		t.Fatalf("within the takeover: %d reads of the status records, %d of node keys, sent %q; want none", s, n, log.texts())
	}
	r.now = func() time.Time { return at(4.2).Add(time.Minute) } // past the takeover: n1 sends
	if _, err := r.loopOnce(t.Context()); err != nil {
		t.Fatal(err)
	}
	if got := log.texts(); len(got) != 1 || !strings.Contains(got[0], "2 of 2 nodes") {
		t.Fatalf("sent %q; want the report of 2 of 2 nodes", got)
	}
	if s, n := etcd.status.Load(), etcd.nodes.Load(); s != 1 || n != 1 {
		t.Errorf("to send: %d reads of the status records, %d of node keys; want 1 and 1", s, n)
	}
}
