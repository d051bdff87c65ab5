package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	docker "github.com/fsouza/go-dockerclient"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
)

func TestRetryable(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"registry 503", errRegistry503, true},
		{"registry 429 with Retry-After", errRegistry429, true},
		{"pull timeout", errPullTimeout, true},
		{"registry down", errRegistryDown, true},
		{"docker unavailable", fmt.Errorf("list images: %w", docker.ErrConnectionRefused), true},
		{"docker socket refused", fmt.Errorf("list images: %w", &net.OpError{Op: "dial", Net: "unix", Err: errors.New("connect: no such file or directory")}), true},
		{"etcd no leader", fmt.Errorf("take a rollout slot: %w", rpctypes.ErrNoLeader), true},
		{"etcd unavailable (grpc)", fmt.Errorf("take a rollout slot: %w", rpctypes.ErrGRPCTimeout), true},
		{"rollout error other than a failed replacement", errors.New("stop app: container busy"), true},
		{"pushed digest not served yet", fmt.Errorf("%w: x", errDigestMismatch), true},
		{"halted version", fmt.Errorf("%w: app exited with code 1", errReplacement), false},
		{"bad reference", fmt.Errorf("%w: invalid tag", errBadReference), false},
		{"manifest unknown", errManifestUnknown, false},
		{"access denied", &docker.Error{Status: 403, Message: "pull access denied for app, repository does not exist"}, false},
		{"digest never served", fmt.Errorf("%w within 2m: x", errDigestGaveUp), false},
		{"joined: one retryable", errors.Join(errManifestUnknown, errRegistry503), true},
		{"joined: all final", errors.Join(errManifestUnknown, fmt.Errorf("%w: x", errReplacement)), false},
		{"unsupervised container (started again on the old image)", fmt.Errorf("nothing restarted app within 2m0s: is it supervised? (%w)", errUnsupervised), false},
		{"rollout slot lost", fmt.Errorf("app not replaced: %w", errSlotLost), true},
		{"no rollout slot in time", fmt.Errorf("no rollout slot within 10m0s: %w", context.DeadlineExceeded), true},
		{"replacement vanished (recreate)", fmt.Errorf("%w: app vanished: %w", errReplacement, errNoReplacement), false},
		{"start refused by the daemon (recreate)", fmt.Errorf("%w: start app: %w", errReplacement, &docker.Error{Status: 500, Message: "OCI runtime create failed"}), false},
		{"unsupervised, and the old container's start failed (restarter)", fmt.Errorf("nothing restarted app within 2m0s: is it supervised? Starting the old container failed too: %w (%w)", docker.ErrConnectionRefused, errUnsupervised), false},
		{"a failed replacement whose restore failed too, for a cause that passes (recreate)", fmt.Errorf("%w; restoring app failed too: %w", fmt.Errorf("%w: app exited", errReplacement), docker.ErrConnectionRefused), true},
		{"joined: a halted version and a registry down", errors.Join(fmt.Errorf("%w: x", errReplacement), errRegistry503), true},
		{"nil", nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := retryable(tt.err); got != tt.want {
				t.Errorf("retryable(%v) = %v; want %v", tt.err, got, tt.want)
			}
		})
	}
}

func TestRetryPolicyDelay(t *testing.T) {
	p := retryPolicy{min: 2 * time.Second, max: 5 * time.Minute}
	for attempt := 1; attempt < 30; attempt++ {
		nominal := min(p.min<<min(attempt-1, 20), p.max)
		d := p.delay(errRegistry503, attempt)
		if d < nominal/2 || d > nominal {
			t.Errorf("delay(503, %d) = %v; want within [%v, %v]", attempt, d, nominal/2, nominal)
		}
	}
	// The registry asked for 7 s: never sooner, whatever the attempt.
	for attempt := 1; attempt < 4; attempt++ {
		if d := p.delay(errRegistry429, attempt); d < 7*time.Second || d > 8*time.Second {
			t.Errorf("delay(429 Retry-After: 7, %d) = %v; want 7s to 8s", attempt, d)
		}
	}
	// A Retry-After beyond the cap is capped.
	if d := p.delay(errors.New("toomanyrequests: Retry-After: 3600"), 1); d > p.max+p.max/10 {
		t.Errorf("delay(Retry-After: 3600) = %v; want at most about %v", d, p.max)
	}
}

// retryHarness runs a deployer behind the queue and the progress
// tracker, as the daemon wires them, on a registryDocker.
type retryHarness struct {
	f    *fakeDocker
	reg  *registryDocker
	d    *deployer
	n    *captureNotifier
	q    *deployQueue
	p    *progress
	m    *metrics
	runs chan error // every deploy's result
}

func newRetryHarness(t *testing.T) *retryHarness {
	f := newFakeDocker()
	reg := newRegistryDocker(f)
	d, n := newTestDeployer(t, f, deployOptions{})
	d.puller.docker = reg
	h := &retryHarness{f: f, reg: reg, d: d, n: n, p: newProgress(nil, "", testLogger(t)), m: d.metrics, runs: make(chan error, 100)}
	h.p.init(9)
	h.q = newDeployQueue(2, time.Minute, func(ctx context.Context, j job) error {
		err := d.deploy(ctx, j)
		h.runs <- err
		return err
	}, h.p.done, testLogger(t), h.m)
	return h
}

func (h *retryHarness) submit(ev deployEvent) {
	h.p.add(ev.Rev)
	h.q.submit(ev)
}

// TestFailedPullIsRetried: a pull that fails with an error that passes
// (503, 429 with Retry-After, a timeout, the registry down) keeps its
// trigger open and is tried again after the backoff, without a second
// trigger; the watermark passes it only once the deploy worked. Slack
// hears of the first failure and of the recovery, not of every attempt.
func TestFailedPullIsRetried(t *testing.T) {
	const old, newer = "sha256:aaaaaaaaaaaa1111", "sha256:bbbbbbbbbbbb2222"
	for _, tt := range []struct {
		name     string
		failures []error
		minWait  time.Duration // the earliest the last attempt may run
	}{
		{"registry 503", []error{errRegistry503, errRegistry503}, 2 * time.Second},
		{"429 with Retry-After", []error{errRegistry429}, 7 * time.Second},
		{"pull timeout", []error{errPullTimeout}, time.Second},
		{"registry down for a while", []error{errRegistryDown, errRegistryDown, errRegistryDown, errRegistryDown}, 7 * time.Second},
	} {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				h := newRetryHarness(t)
				h.f.local["reg:5000/app:qa"] = old
				h.f.remote["reg:5000/app:qa"] = newer
				h.f.addContainer("app", "reg:5000/app:qa")
				h.reg.failures["reg:5000/app:qa"] = slices.Clone(tt.failures)
				start := time.Now()
				h.submit(deployEvent{Repo: canon("reg:5000/app"), Tags: []string{"qa"}, Rev: 10})
				for i := range tt.failures {
					if err := <-h.runs; !retryable(err) {
						t.Fatalf("attempt %d: %v; want a retryable failure", i+1, err)
					}
					synctest.Wait() // the queue has scheduled the retry
					if w := h.p.watermark(); w != 9 {
						t.Fatalf("after failed attempt %d the watermark is %d; want 9, behind the open trigger", i+1, w)
					}
					if g := testutil.ToFloat64(h.m.retrying); g != 1 {
						t.Errorf("deployer_deploy_retries_pending = %v; want 1", g)
					}
					if p := h.q.pending(); len(p) != 1 || p[0].Attempts != i+1 || !slices.Equal(p[0].Revisions, []int64{10}) || p[0].Error == "" {
						t.Errorf("pending retries = %+v; want one, attempt %d, revision 10, with its error", p, i+1)
					}
				}
				if err := <-h.runs; err != nil {
					t.Fatalf("last attempt: %v; want success", err)
				}
				h.q.wait()
				if waited := time.Since(start); waited < tt.minWait {
					t.Errorf("recovered after %v; want no sooner than %v (backoff, Retry-After)", waited, tt.minWait)
				}
				if w := h.p.watermark(); w != 10 {
					t.Errorf("watermark = %d after the recovery; want 10", w)
				}
				if got := running(h.f); !slices.Equal(got, []string{}) && !slices.Equal(got, []string(nil)) {
					t.Errorf("running %q; want app stopped for its new version", got)
				}
				if g := testutil.ToFloat64(h.m.retrying); g != 0 {
					t.Errorf("deployer_deploy_retries_pending = %v after the recovery; want 0", g)
				}
				if len(h.n.reports) != 2 || !h.n.reports[0].Retrying || h.n.reports[1].Recovered != len(tt.failures) {
					t.Fatalf("reports = %+v; want the first failure and the recovery only", h.n.reports)
				}
				if txt := h.n.reports[1].text(); !strings.Contains(txt, "recovered after") || strings.Contains(txt, "FAILED") {
					t.Errorf("recovery report %q", txt)
				}
			})
		})
	}
}

// TestFinalFailureIsDone: a failure that no retry changes (the tag is not
// in the registry, a halted version) is reported once and consumes its
// trigger.
func TestFinalFailureIsDone(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRetryHarness(t)
		h.f.local["reg:5000/app:qa"] = "sha256:aaaaaaaaaaaa1111"
		h.reg.failures["reg:5000/app:qa"] = []error{errManifestUnknown, errManifestUnknown}
		h.submit(deployEvent{Repo: canon("reg:5000/app"), Tags: []string{"qa"}, Rev: 10})
		if err := <-h.runs; err == nil || retryable(err) {
			t.Fatalf("deploy: %v; want a final failure", err)
		}
		h.q.wait()
		if w := h.p.watermark(); w != 10 {
			t.Errorf("watermark = %d; want 10: a final failure is done", w)
		}
		if n := h.reg.pullCount(); n != 1 {
			t.Errorf("%d pulls; want 1, no retry", n)
		}
		if len(h.n.reports) != 1 || !h.n.reports[0].failed() || h.n.reports[0].Retrying {
			t.Errorf("reports = %+v; want one final failure", h.n.reports)
		}
	})
}

// TestRetryMergesNewEvent: an event for a repository whose deploy waits
// for a retry joins it and runs it soon, without waiting out the backoff;
// one deploy covers both triggers.
func TestRetryMergesNewEvent(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRetryHarness(t)
		h.q.retry = retryPolicy{min: time.Hour, max: time.Hour}
		h.f.local["reg:5000/app:qa"] = "sha256:aaaaaaaaaaaa1111"
		h.f.local["reg:5000/app:prod"] = "sha256:aaaaaaaaaaaa1111"
		h.f.remote["reg:5000/app:qa"] = "sha256:bbbbbbbbbbbb2222"
		h.reg.failures["reg:5000/app:qa"] = []error{errRegistry503}
		start := time.Now()
		h.submit(deployEvent{Repo: canon("reg:5000/app"), Tags: []string{"qa"}, Rev: 10})
		<-h.runs
		synctest.Wait()
		h.submit(deployEvent{Repo: canon("reg:5000/app"), Tags: []string{"prod"}, Rev: 11})
		if err := <-h.runs; err != nil {
			t.Fatal(err)
		}
		h.q.wait()
		if waited := time.Since(start); waited > time.Minute {
			t.Errorf("the new event waited %v for the backoff; want it to run the retry at once", waited)
		}
		if w := h.p.watermark(); w != 11 {
			t.Errorf("watermark = %d; want 11", w)
		}
		if pulls := slices.Sorted(slices.Values(h.f.pulls)); !slices.Equal(pulls, []string{"reg:5000/app:prod", "reg:5000/app:qa", "reg:5000/app:qa"}) {
			t.Errorf("pulls = %q; want qa, then qa and prod together", pulls)
		}
	})
}

// TestRetryStopsAtShutdown: a wait for a retry ends with the daemon, and
// leaves the trigger open for the next start.
func TestRetryStopsAtShutdown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRetryHarness(t)
		h.q.retry = retryPolicy{min: time.Hour, max: time.Hour}
		h.f.local["reg:5000/app:qa"] = "sha256:aaaaaaaaaaaa1111"
		h.reg.failures["reg:5000/app:qa"] = []error{errRegistry503}
		h.submit(deployEvent{Repo: canon("reg:5000/app"), Tags: []string{"qa"}, Rev: 10})
		<-h.runs
		synctest.Wait()
		start := time.Now()
		h.q.stopRetries()
		h.q.wait()
		if d := time.Since(start); d > 0 {
			t.Errorf("the queue took %v to stop; want at once", d)
		}
		if w := h.p.watermark(); w != 9 {
			t.Errorf("watermark = %d; want 9: the trigger stays open for the next start", w)
		}
	})
}

// TestDigestCheck: a trigger that names a manifest digest deploys only
// once the pull brought that manifest. A registry that still serves the
// previous one is tried again until it serves the new one, or, after
// digestWait, the deploy is reported as failed.
func TestDigestCheck(t *testing.T) {
	const (
		old, newer = "sha256:aaaaaaaaaaaa1111", "sha256:bbbbbbbbbbbb2222"
		dOld       = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
		dNew       = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	)
	for _, tt := range []struct {
		name        string
		digest      string // in the trigger
		stalePulls  int    // pulls that still get the previous manifest
		wantPulls   int
		wantRunning bool // app still on the old version
		wantFailed  bool // final report is a failure
	}{
		{"digest served at once", dNew, 0, 1, false, false},
		{"CDN serves the previous manifest twice", dNew, 2, 3, false, false},
		{"previous manifest for ever", dNew, 1000, 0, true, true},
		{"trigger without digest: today's behaviour", "", 2, 1, true, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				h := newRetryHarness(t)
				h.f.local["reg:5000/app:qa"] = old
				h.f.remote["reg:5000/app:qa"] = newer
				h.reg.repoDigests[old] = []string{"reg:5000/app@" + dOld}
				h.reg.oldDigest["reg:5000/app:qa"] = dOld
				h.reg.digest["reg:5000/app:qa"] = dNew
				h.reg.stale["reg:5000/app:qa"] = tt.stalePulls
				h.f.addContainer("app", "reg:5000/app:qa")
				ev := deployEvent{Repo: canon("reg:5000/app"), Tags: []string{"qa"}, Rev: 10}
				if tt.digest != "" {
					ev.Digests = map[string]string{"qa": tt.digest}
				}
				h.submit(ev)
				h.q.wait()
				if n := h.reg.pullCount(); tt.wantPulls > 0 && n != tt.wantPulls {
					t.Errorf("%d pulls; want %d", n, tt.wantPulls)
				}
				if got := len(running(h.f)) == 1; got != tt.wantRunning {
					t.Errorf("app still running the old version: %v; want %v", got, tt.wantRunning)
				}
				if w := h.p.watermark(); w != 10 {
					t.Errorf("watermark = %d; want 10", w)
				}
				var last report
				if len(h.n.reports) > 0 {
					last = h.n.reports[len(h.n.reports)-1]
				}
				if last.failed() != tt.wantFailed {
					t.Errorf("last report failed = %v; want %v: %s", last.failed(), tt.wantFailed, last.text())
				}
				if tt.wantFailed && (!strings.Contains(last.text(), dNew) || strings.Contains(last.text(), "recovered")) {
					t.Errorf("report %q: want a failure naming the digest never served", last.text())
				}
				// A digest not served yet is retried quietly: one
				// report, the deploy or the giving up.
				if tt.stalePulls > 0 && tt.digest != "" && len(h.n.reports) != 1 {
					t.Errorf("%d reports %+v; want one: no failure told while the digest may still come", len(h.n.reports), h.n.reports)
				}
			})
		})
	}
}

// TestRetryFromTrigger: the digest of a registry trigger flows from the
// etcd value to the deploy.
func TestParseTriggerDigests(t *testing.T) {
	tests := []struct {
		value   string
		tags    []string
		digests map[string]string
	}{
		{`{"tag":"qa","digest":"sha256:1"}`, []string{"qa"}, map[string]string{"qa": "sha256:1"}},
		{`{"tag":"qa"}`, []string{"qa"}, nil},
		{`{"tags":["qa","prod"],"digests":{"qa":"sha256:1","prod":"sha256:2"}}`, []string{"qa", "prod"}, map[string]string{"qa": "sha256:1", "prod": "sha256:2"}},
		{`x`, nil, nil},
	}
	for _, tt := range tests {
		tags, digests := parseTrigger([]byte(tt.value))
		if !slices.Equal(tags, tt.tags) || fmt.Sprint(digests) != fmt.Sprint(tt.digests) {
			t.Errorf("parseTrigger(%s) = %q %v; want %q %v", tt.value, tags, digests, tt.tags, tt.digests)
		}
	}
	var j job
	j.merge(deployEvent{Tags: []string{"qa"}, Digests: map[string]string{"qa": "sha256:1"}, Rev: 1})
	j.merge(deployEvent{Tags: []string{"qa"}, Digests: map[string]string{"qa": "sha256:2"}, Rev: 2})
	if j.Digests["qa"] != "sha256:2" {
		t.Errorf("merged digests %v; want the later push's", j.Digests)
	}
}

// TestCatchUpRegistersBeforeEmitting: after a compaction, a later
// trigger whose deploy finishes at once must not move the watermark past
// an earlier one still in flight, whatever the key order.
func TestCatchUpRegistersBeforeEmitting(t *testing.T) {
	cli := testNS(t)
	put := func(key string) int64 {
		resp, err := cli.Put(t.Context(), triggerKey(key), `{"tag":"qa"}`)
		if err != nil {
			t.Fatal(err)
		}
		return resp.Header.Revision
	}
	early := put("z/early") // written first, last in key order
	late := put("a/late")
	p := newProgress(nil, "", testLogger(t))
	p.init(early - 1)
	var mu sync.Mutex
	var order []int64
	var marks []int64
	w := newWatcher(cli, "n1", time.Second, false, p, func(_ string, ev deployEvent) {
		mu.Lock()
		defer mu.Unlock()
		order = append(order, ev.Rev)
		if ev.Rev == late {
			p.done([]int64{late}) // a quick deploy
			marks = append(marks, p.watermark())
		}
	}, testLogger(t), newMetrics())
	if _, err := w.catchUp(t.Context(), early); err != nil {
		t.Fatal(err)
	}
	for _, m := range marks {
		if m >= early {
			t.Errorf("watermark %d passed revision %d still in flight", m, early)
		}
	}
	if !slices.Equal(order, []int64{early, late}) {
		t.Errorf("emitted revisions %v; want them in revision order %v", order, []int64{early, late})
	}
}

// TestStatusShowsRetries: a node's pending retries reach its status
// record, GET /api/status and `deployer status`.
func TestStatusShowsRetries(t *testing.T) {
	cli := testNS(t)
	f := newFakeDocker()
	f.local["reg:5000/app:qa"] = "sha256:1"
	f.addContainer("app", "reg:5000/app:qa")
	now := time.Now().UTC()
	pending := []pendingRetry{{Repo: "reg:5000/app", Tags: []string{"qa"}, Revisions: []int64{10}, Attempts: 3, Since: now.Add(-time.Minute),
		Next: now.Add(30 * time.Second), Error: "pull reg:5000/app:qa: received unexpected HTTP status: 503 Service Unavailable"}}
	s := newStatusReporter(f, nil, cli, testLeases(t, cli), "n1", version, func() []pendingRetry { return pending }, nil, testLogger(t))
	s.started, s.period = now, time.Hour
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- s.run(ctx) }()
	defer func() { cancel(); <-done }()
	var st clusterStatus
	pollUntil(10*time.Second, pollEvery, func() bool { // polling etcd for the record
		var err error
		if st, err = readStatus(t.Context(), cli, time.Now()); err != nil {
			t.Fatal(err)
		}
		return len(st.Nodes) == 1
	})
	if len(st.Nodes) != 1 || len(st.Nodes[0].Retries) != 1 || st.Nodes[0].Retries[0].Attempts != 3 {
		t.Fatalf("status = %+v; want n1 with its pending retry", st)
	}
	var b strings.Builder
	printStatus(&b, st)
	for _, want := range []string{"RETRYING", "reg:5000/app:qa", "503 Service Unavailable"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("deployer status output lacks %q:\n%s", want, b.String())
		}
	}
}

// TestFinalFailureAfterRetries: a retried deploy that then fails for good
// is told as a failure, not as a recovery, and consumes its trigger.
func TestFinalFailureAfterRetries(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newRetryHarness(t)
		h.f.local["reg:5000/app:qa"] = "sha256:aaaaaaaaaaaa1111"
		h.reg.failures["reg:5000/app:qa"] = []error{errRegistry503, errManifestUnknown}
		h.submit(deployEvent{Repo: canon("reg:5000/app"), Tags: []string{"qa"}, Rev: 10})
		h.q.wait()
		if w := h.p.watermark(); w != 10 {
			t.Errorf("watermark = %d; want 10", w)
		}
		if len(h.n.reports) != 2 || !h.n.reports[0].Retrying || h.n.reports[1].Recovered != 0 || !h.n.reports[1].failed() {
			t.Fatalf("reports = %+v; want the first failure, then the final one", h.n.reports)
		}
		if txt := h.n.reports[1].text(); strings.Contains(txt, "recovered") || !strings.Contains(txt, "FAILED") {
			t.Errorf("final report %q; want a failure, not a recovery", txt)
		}
	})
}
