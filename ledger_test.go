package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/distribution/reference"
	docker "github.com/fsouza/go-dockerclient"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// fakeLedgerImages answers InspectImage with the RepoDigests it holds.
type fakeLedgerImages struct {
	digests map[string][]string // image ID -> RepoDigests
}

var _ ledgerImages = (*fakeLedgerImages)(nil)

func (f *fakeLedgerImages) InspectImageWithContext(_ context.Context, id string) (*docker.Image, error) {
	if d, ok := f.digests[id]; ok {
		return &docker.Image{ID: id, RepoDigests: d}, nil
	}
	return nil, &docker.Error{Status: 404}
}

func testLedger(t *testing.T, cli *clientv3.Client, node string, keep int) *ledger {
	t.Helper()
	l := newLedger(cli, nil, node, keep, true, prometheus.NewRegistry(), testLogger(t))
	l.timeout = 5 * time.Second
	return l
}

// putNodeStatus writes a node's status record showing one container of ref.
func putNodeStatus(t *testing.T, cli *clientv3.Client, node, ref string) {
	t.Helper()
	b, _ := json.Marshal(nodeStatus{Node: node, Containers: []containerStatus{{Name: "app", Image: ref, ImageID: "sha256:old"}}})
	if _, err := cli.Put(t.Context(), statusKey(node), string(b)); err != nil {
		t.Fatal(err)
	}
}

func readVersions(t *testing.T, cli *clientv3.Client, ref string) []ledgerVersion {
	t.Helper()
	h, err := readHistory(t.Context(), cli, historyFilter{}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	for _, th := range h.Tags {
		if th.Image == ref {
			return th.Versions
		}
	}
	return nil
}

const ledgerRef = "docker.io/library/app:latest"

func TestLedgerTrimsInTheTransactionThatAdds(t *testing.T) {
	cli := testNS(t)
	l := testLedger(t, cli, "n1", 20)
	putNodeStatus(t, cli, "n1", ledgerRef)
	for i := 1; i <= 21; i++ {
		e := ledgerEntry{Ref: ledgerRef, Repo: "docker.io/library/app", ImageID: fmt.Sprintf("sha256:%064d", i), Revision: int64(i), Time: time.Now()}
		if err := l.apply(t.Context(), e); err != nil {
			t.Fatal(err)
		}
	}
	// The 21st version's write is the last revision: in it, version 1
	// went and version 21 came.
	resp, err := cli.Get(t.Context(), historyPrefix(ledgerRef), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 20 {
		t.Fatalf("%d versions kept, want 20", len(resp.Kvs))
	}
	if string(resp.Kvs[0].Key) != historyKey(ledgerRef, 2) || string(resp.Kvs[19].Key) != historyKey(ledgerRef, 21) {
		t.Fatalf("kept %s … %s, want versions 2 … 21", resp.Kvs[0].Key, resp.Kvs[19].Key)
	}
	// (Version 21's key is written again once its node counted the
	// nodes that run the tag: its create revision is the one that added it.)
	newest := resp.Kvs[19].CreateRevision
	gone, err := cli.Get(t.Context(), historyKey(ledgerRef, 1), clientv3.WithRev(newest-1))
	if err != nil {
		t.Fatal(err)
	}
	if len(gone.Kvs) != 1 {
		t.Fatalf("version 1 was gone before the revision that added version 21")
	}
	if now, err := cli.Get(t.Context(), historyKey(ledgerRef, 1), clientv3.WithRev(newest)); err != nil || len(now.Kvs) != 0 {
		t.Fatalf("version 1 still there at the revision that added version 21 (err %v)", err)
	}
	vs := readVersions(t, cli, ledgerRef)
	if vs[0].Version != 21 || vs[19].Version != 2 {
		t.Fatalf("newest first: got %d … %d", vs[0].Version, vs[19].Version)
	}
}

func TestLedgerTwoNodesConvergeOnce(t *testing.T) {
	cli := testNS(t)
	pushed := time.Now().Add(-10 * time.Second).UTC().Truncate(time.Millisecond)
	trig, _ := json.Marshal(trigger{Time: pushed, Tag: "latest", Source: "api", Node: "n1", Remote: "127.0.0.1:5555",
		Digest: "sha256:" + strings.Repeat("d", 64)})
	pr, err := cli.Put(t.Context(), triggerKey("app"), string(trig))
	if err != nil {
		t.Fatal(err)
	}
	rev := pr.Header.Revision
	putNodeStatus(t, cli, "n1", ledgerRef)
	putNodeStatus(t, cli, "n2", ledgerRef)
	l1, l2 := testLedger(t, cli, "n1", 20), testLedger(t, cli, "n2", 20)
	id := "sha256:" + strings.Repeat("a", 64)
	e := ledgerEntry{Ref: ledgerRef, Repo: "docker.io/library/app", ImageID: id, Revision: rev, Time: pushed.Add(2 * time.Second)}
	if err := l1.apply(t.Context(), e); err != nil {
		t.Fatal(err)
	}
	v := readVersions(t, cli, ledgerRef)[0]
	if v.Outcome != outcomeRollingOut || !v.Completed.IsZero() {
		t.Fatalf("after one node of two: %+v", v)
	}
	e.Time = pushed.Add(5 * time.Second)
	if err := l2.apply(t.Context(), e); err != nil {
		t.Fatal(err)
	}
	e.Time = pushed.Add(9 * time.Second) // the retry comes later
	vs := readVersions(t, cli, ledgerRef)
	if len(vs) != 1 {
		t.Fatalf("%d versions, want 1", len(vs))
	}
	v = vs[0]
	if v.Outcome != outcomeRolledOut || v.converged() != 2 || v.FirstSeconds != 2 || v.LastSeconds != 5 {
		t.Fatalf("after both nodes: %+v", v)
	}
	if v.AskedBy.Source != "api" || v.AskedBy.Remote != "127.0.0.1:5555" || v.Digest != "sha256:"+strings.Repeat("d", 64) || !v.Pushed.Equal(pushed) {
		t.Fatalf("trigger not recorded: %+v", v)
	}
	if sampleCount(t, l2.fleetLead) != 1 || sampleCount(t, l1.fleetLead) != 0 {
		t.Fatalf("fleet lead time: n1 %d, n2 %d observations, want 0 and 1", sampleCount(t, l1.fleetLead), sampleCount(t, l2.fleetLead))
	}
	if sampleCount(t, l1.nodeLead) != 1 || sampleCount(t, l2.nodeLead) != 1 {
		t.Fatal("each node observes its own lead time once")
	}
	// Recording again (a retried write) changes nothing of the outcome.
	if err := l2.apply(t.Context(), e); err != nil {
		t.Fatal(err)
	}
	if sampleCount(t, l2.fleetLead) != 1 || sampleCount(t, l2.nodeLead) != 1 {
		t.Fatal("a lead time observed twice")
	}
	if got := readVersions(t, cli, ledgerRef)[0]; !got.Nodes["n2"].Converged.Equal(pushed.Add(5 * time.Second)) {
		t.Fatalf("a repeated write moved n2's time: %+v", got.Nodes["n2"])
	}
}

func sampleCount(t *testing.T, h prometheus.Histogram) uint64 {
	t.Helper()
	var m dto.Metric
	if err := h.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount()
}

func TestLedgerOutcomes(t *testing.T) {
	cli := testNS(t)
	putNodeStatus(t, cli, "n1", ledgerRef)
	putNodeStatus(t, cli, "n2", ledgerRef)
	l1 := testLedger(t, cli, "n1", 20)
	l1.images = &fakeLedgerImages{digests: map[string][]string{"sha256:v1": {"app@sha256:" + strings.Repeat("1", 64)}}}
	apply := func(id string, rev int64, failed string) {
		t.Helper()
		if err := l1.apply(t.Context(), ledgerEntry{Ref: ledgerRef, Repo: "docker.io/library/app", ImageID: id, Revision: rev, Time: time.Now(), Failed: failed}); err != nil {
			t.Fatal(err)
		}
	}
	apply("sha256:v1", 0, "")        // n2 never converges
	apply("sha256:v2", 0, "")        // v1 superseded
	apply("sha256:v3", 0, "crashed") // halted
	vs := readVersions(t, cli, ledgerRef)
	want := []string{outcomeHalted, outcomeSuperseded, outcomeSuperseded}
	for i, v := range vs {
		if v.Outcome != want[i] {
			t.Errorf("version %d: %s, want %s", v.Version, v.Outcome, want[i])
		}
	}
	if vs[2].Digest != "sha256:"+strings.Repeat("1", 64) || vs[2].AskedBy.Source != "repull" {
		t.Errorf("v1: digest %q from RepoDigests, source %q", vs[2].Digest, vs[2].AskedBy.Source)
	}
	if r := vs[0].Nodes["n1"]; r.Failed.IsZero() || r.Reason != "crashed" {
		t.Errorf("halted node: %+v", r)
	}
	// A halted version does not become superseded: it stays halted.
	apply("sha256:v4", 0, "")
	if vs := readVersions(t, cli, ledgerRef); vs[1].Outcome != outcomeHalted {
		t.Errorf("after a newer version, the halted one is %s", vs[1].Outcome)
	}
}

func TestLedgerDeployed(t *testing.T) {
	l := newLedger(nil, nil, "n1", 20, true, nil, testLogger(t))
	repo, _ := reference.ParseNormalizedNamed("app")
	outs := []outcome{
		{c: staleContainer{Name: "a", Ref: testTagged("docker.io/library/app:latest"), NewID: "sha256:new"}},
		{c: staleContainer{Name: "b", Ref: testTagged("docker.io/library/app:latest"), NewID: "sha256:new"}},
		{c: staleContainer{Name: "c", Ref: testTagged("docker.io/library/app:v1"), NewID: "sha256:v1"}, err: fmt.Errorf("%w: no", errReplacement)},
		{c: staleContainer{Name: "d", Ref: testTagged("docker.io/library/app:v2"), NewID: "sha256:v2"}, err: errors.New("slot lost")},
	}
	current := map[string]string{"latest": "sha256:new", "v1": "sha256:v1", "v2": "sha256:v2", "v3": "sha256:v3"}
	j := job{Revs: []int64{7, 9}, Digests: map[string]string{"latest": "sha256:d"}}
	l.deployed(j, repo, current, outs)
	var got []string
	for len(l.entries) > 0 {
		e := <-l.entries
		got = append(got, fmt.Sprintf("%s %s rev=%d digest=%s failed=%t status=%t", e.Ref, e.ImageID, e.Revision, e.Digest, e.Failed != "", e.ViaStatus))
	}
	want := []string{
		"docker.io/library/app:latest sha256:new rev=9 digest=sha256:d failed=false status=false",
		"docker.io/library/app:v1 sha256:v1 rev=9 digest= failed=true status=false",
		// v2: a replacement left for a retry, not recorded.
		"docker.io/library/app:v3 sha256:v3 rev=9 digest= failed=false status=true",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("entries:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// Without a trigger (the periodic re-pull), tags not replaced are not
	// checked.
	l.deployed(job{}, repo, current, nil)
	if len(l.entries) != 0 {
		t.Errorf("%d entries from a re-pull that replaced nothing", len(l.entries))
	}
	// A full queue drops, it does not wait.
	for range ledgerQueue + 10 {
		l.deployed(j, repo, current, outs)
	}
	var nilLedger *ledger
	nilLedger.deployed(j, repo, current, outs)
}

// TestLedgerConvergedViaStatus: a node whose supervisor pulled and
// restarted the container before the deploy replaced nothing; its status
// record says whether it converged, and when.
func TestLedgerConvergedViaStatus(t *testing.T) {
	cli := testNS(t)
	l := testLedger(t, cli, "n1", 20)
	started := time.Now().Add(-time.Second).UTC().Truncate(time.Millisecond)
	put := func(containers ...containerStatus) {
		t.Helper()
		b, _ := json.Marshal(nodeStatus{Node: "n1", Containers: containers})
		if _, err := cli.Put(t.Context(), statusKey("n1"), string(b)); err != nil {
			t.Fatal(err)
		}
	}
	e := ledgerEntry{Ref: ledgerRef, Repo: "docker.io/library/app", ImageID: "sha256:new", Revision: 5, Time: time.Now(), ViaStatus: true}

	put(containerStatus{Name: "other", Image: "docker.io/library/other:latest", ImageID: "sha256:x"})
	if err := l.apply(t.Context(), e); !errors.Is(err, errLedgerNotYet) || len(readVersions(t, cli, ledgerRef)) != 0 {
		t.Fatalf("no container of the tag (yet): %v, %d versions; want errLedgerNotYet and none", err, len(readVersions(t, cli, ledgerRef)))
	}
	put(containerStatus{Name: "app", Image: ledgerRef, ImageID: "sha256:new", Since: started},
		containerStatus{Name: "app2", Image: ledgerRef, ImageID: "sha256:old", Since: started})
	if err := l.apply(t.Context(), e); !errors.Is(err, errLedgerNotYet) {
		t.Fatalf("a container still on the old image: %v, want errLedgerNotYet", err)
	}
	put(containerStatus{Name: "app", Image: ledgerRef, ImageID: "sha256:new", Since: started.Add(-time.Second)},
		containerStatus{Name: "app2", Image: ledgerRef, ImageID: "sha256:new", Since: started})
	if err := l.apply(t.Context(), e); err != nil {
		t.Fatal(err)
	}
	vs := readVersions(t, cli, ledgerRef)
	if len(vs) != 1 || !vs[0].Nodes["n1"].Converged.Equal(started) || vs[0].Outcome != outcomeRolledOut {
		t.Fatalf("converged via the status record: %+v", vs)
	}
}

func TestHistoryOutput(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	h := historyView{Time: now, Tags: []tagHistory{{Image: ledgerRef, Versions: []ledgerVersion{
		{Version: 2, Image: ledgerRef, ImageID: "sha256:" + strings.Repeat("b", 64), Digest: "sha256:" + strings.Repeat("e", 64),
			Pushed: now.Add(-time.Minute), Outcome: outcomeRolledOut, Completed: now.Add(-50 * time.Second), FirstSeconds: 1.5, LastSeconds: 10,
			Nodes: map[string]nodeResult{"n1": {Converged: now}, "n2": {Converged: now}}},
		{Version: 1, Image: ledgerRef, ImageID: "sha256:" + strings.Repeat("a", 64), Pushed: now.Add(-time.Hour), Outcome: outcomeHalted,
			Nodes: map[string]nodeResult{"n1": {Failed: now, Reason: "x"}}},
	}}}}
	var buf bytes.Buffer
	printHistory(&buf, h)
	got := buf.String()
	for _, want := range []string{
		"IMAGE                         VERSION  IMAGE ID      DIGEST               PUSHED    FIRST NODE  LAST NODE  NODES            OUTCOME",
		"docker.io/library/app:latest  2        bbbbbbbbbbbb  sha256:eeeeeeeeeeee  1m0s ago  1.5s        10s        2 (n1,n2)        rolled out",
		"                              1        aaaaaaaaaaaa  -                    1h0m0s ago  -           -          0 failed: n1     halted",
	} {
		if !containsFields(got, want) {
			t.Errorf("table lacks %q:\n%s", want, got)
		}
	}
}

// containsFields reports whether some line of s has want's fields.
func containsFields(s, want string) bool {
	w := strings.Join(strings.Fields(want), " ")
	for _, line := range strings.Split(s, "\n") {
		if strings.Join(strings.Fields(line), " ") == w {
			return true
		}
	}
	return false
}

func TestHistoryCommandArgs(t *testing.T) {
	for _, tc := range []struct {
		in       []string
		wantArgs string
		wantName string
	}{
		{[]string{"app:1", "-json"}, "-json", "app:1"},
		{[]string{"-json", "app:1"}, "-json", "app:1"},
		{[]string{"-etcd_nodes", "http://127.0.0.1:1", "-json", "app", "-etcd_prefix", "/x"}, "-etcd_nodes http://127.0.0.1:1 -json -etcd_prefix /x", "app"},
		{[]string{"-json"}, "-json", ""},
	} {
		args, name := cutHistoryArg(tc.in, historyOwnFlags(new(bool)))
		if strings.Join(args, " ") != tc.wantArgs || name != tc.wantName {
			t.Errorf("%q: args %q, name %q; want %q, %q", tc.in, args, name, tc.wantArgs, tc.wantName)
		}
	}
}

func TestHistoryCommandAndAPI(t *testing.T) {
	cli := testNS(t)
	putNodeStatus(t, cli, "n1", ledgerRef)
	l := testLedger(t, cli, "n1", 20)
	if err := l.apply(t.Context(), ledgerEntry{Ref: ledgerRef, Repo: "docker.io/library/app", ImageID: "sha256:v1", Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	other := "docker.io/library/other:latest"
	if err := l.apply(t.Context(), ledgerEntry{Ref: other, Repo: "docker.io/library/other", ImageID: "sha256:o1", Time: time.Now()}); err != nil {
		t.Fatal(err)
	}

	// deployer history app -json, against the test's prefix.
	var out, errOut bytes.Buffer
	args := []string{"app", "-json", "-etcd_nodes", sharedEtcdURL, "-etcd_prefix", testPrefix(t)}
	if err := historyCommand(t.Context(), args, &out, &errOut); err != nil {
		t.Fatal(err, errOut.String())
	}
	var h historyView
	if err := json.Unmarshal(out.Bytes(), &h); err != nil {
		t.Fatal(err)
	}
	if len(h.Tags) != 1 || h.Tags[0].Image != ledgerRef || h.Tags[0].Versions[0].Outcome != outcomeRolledOut {
		t.Fatalf("deployer history app -json: %s", out.String())
	}
	out.Reset()
	if err := historyCommand(t.Context(), args[2:], &out, &errOut); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), ledgerRef) || !strings.Contains(out.String(), other) || !strings.Contains(out.String(), "rolled out") {
		t.Fatalf("deployer history:\n%s", out.String())
	}

	// GET /api/history, behind the webhook secret.
	d := &daemon{secret: &secretCell{}, failures: newFailLimiter()}
	d.secret.set("s3cret")
	srv := httptest.NewServer(d.requireSecret(historyHandler(cli)))
	defer srv.Close()
	for _, tc := range []struct {
		secret string
		query  string
		code   int
		tags   int
	}{
		{"", "", http.StatusUnauthorized, 0},
		{"wrong", "", http.StatusUnauthorized, 0},
		{"s3cret", "", http.StatusOK, 2},
		{"s3cret", "?image=other", http.StatusOK, 1},
		{"s3cret", "?image=app:latest", http.StatusOK, 1},
		{"s3cret", "?image=app:nope", http.StatusOK, 0},
		{"s3cret", "?image=UPPER", http.StatusBadRequest, 0},
	} {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, srv.URL+tc.query, nil)
		if tc.secret != "" {
			req.Header.Set("Authorization", "Bearer "+tc.secret)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var h historyView
		_ = json.NewDecoder(resp.Body).Decode(&h)
		resp.Body.Close()
		if resp.StatusCode != tc.code || len(h.Tags) != tc.tags {
			t.Errorf("secret %q %s: %d with %d tags, want %d with %d", tc.secret, tc.query, resp.StatusCode, len(h.Tags), tc.code, tc.tags)
		}
	}
}

// ledgerFailingKV fails every call, as an etcd that lost its quorum does.
type ledgerFailingKV struct {
	clientv3.KV
	calls int
}

func (f *ledgerFailingKV) Get(context.Context, string, ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	f.calls++
	return nil, errors.New("etcdserver: request timed out")
}

func TestLedgerWriteFailureIsBounded(t *testing.T) {
	kv := &ledgerFailingKV{}
	l := newLedger(kv, nil, "n1", 20, true, nil, testLogger(t))
	l.retryBase = time.Millisecond
	start := time.Now()
	l.write(t.Context(), ledgerEntry{Ref: ledgerRef, Repo: "docker.io/library/app", ImageID: "sha256:new", Time: start})
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("gave up after %v", d)
	}
	// Each attempt: the trigger is not read (no revision), the history
	// read fails; 5 attempts, then it is dropped.
	if kv.calls != l.attempts {
		t.Fatalf("%d etcd calls, want %d (one per attempt)", kv.calls, l.attempts)
	}
}

func TestLedgerConcurrentNodesCompleteOnce(t *testing.T) {
	cli := testNS(t)
	nodes := []string{"n1", "n2", "n3"}
	var ls []*ledger
	for _, n := range nodes {
		putNodeStatus(t, cli, n, ledgerRef)
		ls = append(ls, testLedger(t, cli, n, 20))
	}
	for round := 1; round <= 5; round++ {
		id := fmt.Sprintf("sha256:%064d", round)
		errs := make(chan error, len(ls))
		for _, l := range ls {
			go func() {
				errs <- l.apply(t.Context(), ledgerEntry{Ref: ledgerRef, Repo: "docker.io/library/app", ImageID: id, Revision: int64(round), Time: time.Now()})
			}()
		}
		for range ls {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
	}
	vs := readVersions(t, cli, ledgerRef)
	if len(vs) != 5 {
		t.Fatalf("%d versions, want 5", len(vs))
	}
	for _, v := range vs {
		if v.converged() != 3 || v.Outcome != outcomeRolledOut {
			t.Errorf("version %d: %d nodes, %s", v.Version, v.converged(), v.Outcome)
		}
	}
	var completions uint64
	for _, l := range ls {
		completions += sampleCount(t, l.fleetLead)
	}
	if completions != 5 {
		t.Fatalf("%d fleet lead times observed for 5 versions", completions)
	}
}

// countingLedgerKV counts a ledger's etcd calls, and its reads of every
// node's status record.
type countingLedgerKV struct {
	clientv3.KV
	calls, statusReads int
}

func (k *countingLedgerKV) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	k.calls++
	if key == statusPrefix {
		k.statusReads++
	}
	return k.KV.Get(ctx, key, opts...)
}

func (k *countingLedgerKV) Txn(ctx context.Context) clientv3.Txn {
	k.calls++
	return k.KV.Txn(ctx)
}

// TestLedgerCostPerNodeIsConstant: recording a node's convergence costs
// it the same two etcd calls whatever the size of the fleet, and reads no
// other node's status record, except for the first node (it counts the
// nodes that run the tag, once) and the last 1+runningSlack (they check
// whether every one converged). Before, every node read every status
// record and rewrote the one version key that lists every node.
func TestLedgerCostPerNodeIsConstant(t *testing.T) {
	cli := testNS(t)
	const n = 12
	var kvs []*countingLedgerKV
	var ls []*ledger
	for i := range n {
		node := fmt.Sprintf("n%02d", i)
		putNodeStatus(t, cli, node, ledgerRef)
		kv := &countingLedgerKV{KV: cli}
		l := testLedger(t, cli, node, 20)
		l.kv = kv
		kvs, ls = append(kvs, kv), append(ls, l)
	}
	id := "sha256:" + strings.Repeat("b", 64)
	for _, l := range ls {
		if err := l.apply(t.Context(), ledgerEntry{Ref: ledgerRef, Repo: "docker.io/library/app", ImageID: id, Time: time.Now()}); err != nil {
			t.Fatal(err)
		}
	}
	last := n - 1 - runningSlack // the first node that checks the completion
	for i := 1; i < last; i++ {
		if kv := kvs[i]; kv.statusReads != 0 || kv.calls > 2 {
			t.Errorf("node %d of %d: %d etcd calls, %d reads of every status record; want at most 2 and none", i+1, n, kv.calls, kv.statusReads)
		}
	}
	checkers := []int{0}
	for i := last; i < n; i++ {
		checkers = append(checkers, i)
	}
	for _, i := range checkers {
		if kvs[i].statusReads != 1 {
			t.Errorf("node %d of %d read every status record %d times; want once", i+1, n, kvs[i].statusReads)
		}
	}
	v := readVersions(t, cli, ledgerRef)[0]
	if v.converged() != n || v.Outcome != outcomeRolledOut || v.Running != n || v.CompletedBy != "n11" {
		t.Errorf("version: %d nodes converged, %s, running %d, completed by %q; want %d, rolled out, by n11", v.converged(), v.Outcome, v.Running, v.CompletedBy, n)
	}
	if sampleCount(t, ls[n-1].fleetLead) != 1 {
		t.Error("the last node did not observe the fleet lead time")
	}
	// Rolled out, its node keys folded into one: one key per version.
	if keys := must(cli.Get(t.Context(), historyNodesPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())).Kvs; len(keys) != 1 || string(keys[0].Key) != historyNodesDir(ledgerRef, 1) {
		t.Errorf("node keys once the version rolled out: %d; want the one folded key", len(keys))
	}
	// The version's value lists no convergence: it stays small.
	g := must(cli.Get(t.Context(), historyKey(ledgerRef, 1)))
	var stored ledgerVersion
	if err := json.Unmarshal(g.Kvs[0].Value, &stored); err != nil || len(stored.Nodes) != 0 {
		t.Errorf("the version's value lists %d nodes (err %v); want none: they are node keys", len(stored.Nodes), err)
	}
}

// hookTxn runs after once its transaction committed.
type hookTxn struct {
	clientv3.Txn
	after func()
}

func (t *hookTxn) If(c ...clientv3.Cmp) clientv3.Txn  { t.Txn = t.Txn.If(c...); return t }
func (t *hookTxn) Then(o ...clientv3.Op) clientv3.Txn { t.Txn = t.Txn.Then(o...); return t }
func (t *hookTxn) Else(o ...clientv3.Op) clientv3.Txn { t.Txn = t.Txn.Else(o...); return t }
func (t *hookTxn) Commit() (*clientv3.TxnResponse, error) {
	r, err := t.Txn.Commit()
	t.after()
	return r, err
}

// countingDuringKV runs during after every transaction that follows a
// read of every status record (the count of the nodes that run the tag).
type countingDuringKV struct {
	clientv3.KV
	counted bool
	during  func()
}

func (k *countingDuringKV) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	if key == statusPrefix {
		k.counted = true
	}
	return k.KV.Get(ctx, key, opts...)
}

func (k *countingDuringKV) Txn(ctx context.Context) clientv3.Txn {
	if !k.counted {
		return k.KV.Txn(ctx)
	}
	return &hookTxn{Txn: k.KV.Txn(ctx), after: k.during}
}

// TestLedgerCompletesWhileNodesConvergeDuringTheCount: the first node
// counts the nodes that run the tag while the others keep converging,
// one after each of its reads and writes; the version still rolls out
// once the last converges. Before, the count's write compared that no
// node key came since its read: it lost five times, gave up silently,
// and the version stayed "rolling out" for good (no report).
func TestLedgerCompletesWhileNodesConvergeDuringTheCount(t *testing.T) {
	cli := testNS(t)
	const n = 16
	var ls []*ledger
	for i := range n {
		node := fmt.Sprintf("n%02d", i)
		putNodeStatus(t, cli, node, ledgerRef)
		ls = append(ls, testLedger(t, cli, node, 20))
	}
	id := "sha256:" + strings.Repeat("c", 64)
	entry := ledgerEntry{Ref: ledgerRef, Repo: "docker.io/library/app", ImageID: id, Time: time.Now()}
	next := 1
	first := &countingDuringKV{KV: cli}
	first.during = func() {
		if next < n-2 {
			l := ls[next]
			next++
			if err := l.apply(t.Context(), entry); err != nil {
				t.Error(err)
			}
		}
	}
	ls[0].kv = first
	if err := ls[0].apply(t.Context(), entry); err != nil {
		t.Fatal(err)
	}
	for ; next < n; next++ {
		if err := ls[next].apply(t.Context(), entry); err != nil {
			t.Fatal(err)
		}
	}
	if v := readVersions(t, cli, ledgerRef)[0]; v.Outcome != outcomeRolledOut || v.converged() != n || v.Running != n {
		t.Errorf("version: %s, %d of %d nodes converged, running %d; want rolled out, all, %d", v.Outcome, v.converged(), n, v.Running, n)
	}
}
