package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/etcdc"
)

// blackHole is an etcd endpoint that accepts connections and never
// answers (a member hung, or a firewall dropping packets): every call
// blocks. accepted is signalled at each connection.
func blackHole(t *testing.T) (endpoint string, accepted <-chan struct{}) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ch := make(chan struct{}, 100)
	var conns []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			select {
			case ch <- struct{}{}:
			default:
			}
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return "http://" + ln.Addr().String(), ch
}

// TestStatusReporterStopsWithEtcdDown: the status reporter's first write
// creates the session (a lease grant); with etcd unreachable, that grant
// must end with the daemon, not wait for etcd.
func TestStatusReporterStopsWithEtcdDown(t *testing.T) {
	ep, accepted := blackHole(t)
	cli := newTestClient(t, ep)
	f := newFakeDocker()
	f.local["reg:5000/app:qa"] = "sha256:1"
	f.addContainer("app", "reg:5000/app:qa")
	// Only the daemon's end may stop the grant: no call timeout helps.
	leases := etcdc.NewNodeLease(etcdc.InPrefix(cli, testPrefix(t)), sessionTTL, time.Hour)
	s := newStatusReporter(f, nil, etcdc.InPrefix(cli, testPrefix(t)), leases, "n1", version, nil, nil, testLogger(t))
	s.period, s.callTimeout = time.Hour, time.Hour
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- s.run(ctx) }()
	select { // the client is connecting: the grant waits for it
	case <-accepted:
	case <-time.After(10 * time.Second):
		t.Fatal("the etcd client never connected")
	}
	select {
	case err := <-done:
		t.Fatalf("status reporter returned before the stop: %v", err)
	default:
	}
	cancel()
	select {
	case <-done:
		_ = leases.Close()
	case <-time.After(3 * time.Second):
		t.Fatal("status reporter still running 3s after the stop, etcd unreachable")
	}
}

// TestDaemonStopsWithEtcdDown: SIGTERM (the end of ctx) stops the whole
// daemon within the documented bound while etcd is unreachable.
func TestDaemonStopsWithEtcdDown(t *testing.T) {
	ep, accepted := blackHole(t)
	cli := newTestClient(t, ep)
	f := newFakeDocker()
	f.local["reg:5000/app:qa"] = "sha256:1"
	f.addContainer("app", "reg:5000/app:qa")
	cfg, err := parseFlags("deployer", []string{
		"-listen", "127.0.0.1:0", "-node_name", "n1", "-etcd_prefix", testPrefix(t), "-dockercfg", "",
		"-registry", "127.0.0.1:5000", "-repull_period", "0", "-etcd_retry_delay", "10ms", "-kill_timeout", "1",
	}, env(), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	d, err := newDaemon(cfg, cli, f, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- d.run(ctx) }()
	// With etcd unreachable the daemon waits at start (claiming its
	// node name); the status reporter's own grant is covered by
	// TestStatusReporterStopsWithEtcdDown.
	select {
	case <-accepted:
	case <-time.After(10 * time.Second):
		t.Fatal("the daemon never tried etcd")
	}
	start := time.Now()
	cancel()
	// kill_timeout + 2 s for deploys (none here), 2 s for the last
	// progress save, 3 s for the session: well within 10 s.
	select {
	case <-done:
		t.Logf("stopped in %v with etcd down", time.Since(start).Round(time.Millisecond))
	case <-time.After(10 * time.Second):
		t.Fatal("daemon still running 10s after SIGTERM, etcd unreachable")
	}
}

// TestRetryAcrossRestart: a trigger whose deploy failed with a retryable
// error is still open when the daemon stops; the next start deploys it,
// without a new trigger.
func TestRetryAcrossRestart(t *testing.T) {
	cli := testEtcd(t)
	f := newFakeDocker()
	f.local["127.0.0.1:5000/app:qa"] = "sha256:aaaaaaaaaaaa1111"
	f.remote["127.0.0.1:5000/app:qa"] = "sha256:bbbbbbbbbbbb2222"
	f.addContainer("app", "127.0.0.1:5000/app:qa")
	reg := newRegistryDocker(f)
	reg.failures["127.0.0.1:5000/app:qa"] = []error{errRegistry503, errRegistry503, errRegistry503, errRegistry503}
	cfg, err := parseFlags("deployer", []string{
		"-listen", "127.0.0.1:0", "-node_name", "n1", "-etcd_prefix", testPrefix(t), "-dockercfg", "",
		"-registry", "127.0.0.1:5000", "-repull_period", "0", "-etcd_retry_delay", "10ms", "-kill_timeout", "1", "-max_unavailable", "0",
	}, env(), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	start := func() (*daemon, func()) {
		d, err := newDaemon(cfg, cli, reg, testLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- d.run(ctx) }()
		select {
		case <-d.watcher.watching:
		case <-time.After(10 * time.Second):
			t.Fatal("watcher not started")
		}
		return d, func() { cancel(); <-done }
	}

	d, stop := start()
	resp, err := cli.Put(t.Context(), cfg.EtcdPrefix+triggerKey("127.0.0.1:5000/app"), `{"tag":"qa"}`)
	if err != nil {
		t.Fatal(err)
	}
	rev := resp.Header.Revision
	eventually(t, 20*time.Second, "pending retry", func() bool { return len(d.queue.pending()) == 1 })
	stop()
	got, err := cli.Get(t.Context(), cfg.EtcdPrefix+progressKey("n1"))
	if err != nil || len(got.Kvs) != 1 {
		t.Fatalf("progress record: %v %v", got, err)
	}
	var saved int64
	if _, err := fmt.Sscan(string(got.Kvs[0].Value), &saved); err != nil || saved >= rev {
		t.Fatalf("saved revision %s passes the failed trigger %d", got.Kvs[0].Value, rev)
	}
	if n := len(running(f)); n != 1 {
		t.Fatalf("app stopped while its pull failed")
	}

	reg.rmu.Lock()
	reg.failures = map[string][]error{} // the registry is back
	reg.rmu.Unlock()
	_, stop = start()
	defer stop()
	eventually(t, 20*time.Second, "deploy of the open trigger after the restart", func() bool { return len(running(f)) == 0 })
}

// TestStopKeepsLeaseUntilDeploysEnd: at the stop, the node's lease (its
// rollout slot and status record) lives as long as a deploy in flight, so
// the slot keeps guarding the container it took down; it is revoked as
// soon as that deploy is over, not left to expire.
func TestStopKeepsLeaseUntilDeploysEnd(t *testing.T) {
	const old, newer = "sha256:1111111111111111111111111111111111111111111111111111111111111111", "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	cli := testEtcd(t)
	f := newFakeDocker()
	f.local["127.0.0.1:5000/app:qa"] = old
	f.remote["127.0.0.1:5000/app:qa"] = newer
	f.addContainer("app", "127.0.0.1:5000/app:qa")
	f.stopped = make(chan string, 1)
	td := startTestDaemon(t, cli, f, func(c *config) {
		c.WebhookSecret, c.MaxUnavailable, c.RestartTimeout, c.shutdownGrace = "s", unavailable{N: 1}, time.Minute, time.Minute
	})
	held := func() (slots, status int64) {
		t.Helper()
		resp, err := cli.Get(t.Context(), td.cfg.EtcdPrefix+rolloutsPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range resp.Kvs {
			if strings.Contains(string(kv.Key), "/"+slotsLeaf) {
				slots++
			}
		}
		resp, err = cli.Get(t.Context(), td.cfg.EtcdPrefix+statusKey("n1"), clientv3.WithCountOnly())
		if err != nil {
			t.Fatal(err)
		}
		return slots, resp.Count
	}
	if code, body := td.post(t, "/api/dockerhub/webhook", "Bearer s", hubBody("app", "qa")); code != 200 {
		t.Fatalf("webhook: %d %s", code, body)
	}
	select {
	case <-f.stopped: // down, under its slot, waiting for a replacement
	case <-time.After(10 * time.Second):
		t.Fatal("container not stopped within 10s")
	}
	if slots, status := held(); slots != 1 || status != 1 {
		t.Fatalf("before the stop: %d slots, %d status records; want 1 and 1", slots, status)
	}
	td.stop()
	// For a second of the deploy's grace, the slot and the record stay.
	for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if slots, status := held(); slots != 1 || status != 1 {
			t.Fatalf("while a deploy runs at the stop: %d slots, %d status records; want 1 and 1", slots, status)
		}
	}
	// Its supervisor brings the replacement up: the deploy ends, then the
	// daemon, and the lease goes with it at once.
	f.mu.Lock()
	n := &fakeContainer{ID: "replacement", Name: "app", ConfigImage: "127.0.0.1:5000/app:qa", ImageID: newer, Running: true}
	f.containers = append(slices.DeleteFunc(f.containers, func(c *fakeContainer) bool { return c.Name == "app" }), n) // as a unit's rm + run
	f.emit("start", n)
	f.mu.Unlock()
	select {
	case err := <-td.done:
		if err != nil {
			t.Errorf("run = %v", err)
		}
		td.done <- nil // for the cleanup
	case <-time.After(20 * time.Second):
		t.Fatal("daemon still running 20s after the replacement came up")
	}
	if slots, status := held(); slots != 0 || status != 0 {
		t.Errorf("after the stop: %d slots, %d status records; want none (lease revoked)", slots, status)
	}
}

// hangingCallback is a Docker Hub that accepts a callback and never
// answers: each request signals started and returns only when its
// context ends, with the context's error on cancelled.
type hangingCallback struct {
	started   chan struct{}
	cancelled chan error
}

func (h *hangingCallback) RoundTrip(req *http.Request) (*http.Response, error) {
	h.started <- struct{}{}
	<-req.Context().Done()
	h.cancelled <- req.Context().Err()
	return nil, req.Context().Err()
}

// TestStopBoundsDockerHubCallbacks: a Docker Hub callback that never
// answers does not hold the stop past its bound: the progress is saved
// first, and the callback is cancelled when the bound is reached.
func TestStopBoundsDockerHubCallbacks(t *testing.T) {
	cli := testEtcd(t)
	f := newFakeDocker()
	cfg, err := parseFlags("deployer", []string{
		"-listen", "127.0.0.1:0", "-node_name", "n1", "-etcd_prefix", testPrefix(t), "-dockercfg", "", "-webhook_secret", "s",
		"-registry", "127.0.0.1:5000", "-repull_period", "0", "-etcd_retry_delay", "10ms", "-kill_timeout", "0",
	}, env(), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	d, err := newDaemon(cfg, cli, f, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	hub := &hangingCallback{started: make(chan struct{}, 1), cancelled: make(chan error, 1)}
	d.webhook.callback = &http.Client{Transport: hub}
	if want := cfg.killTimeout + 7*time.Second; d.stopBound != want {
		t.Errorf("stop bound = %v; want -kill_timeout + 7 s = %v", d.stopBound, want)
	}
	d.stopBound = 500 * time.Millisecond // what the test waits for
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- d.run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-d.watcher.watching:
	case <-time.After(30 * time.Second):
		t.Fatal("watcher not started within 30s")
	}
	body := `{"callback_url":"https://registry.hub.docker.com/u/myorg/app/hook/abc/","push_data":{"tag":"qa"},"repository":{"repo_name":"myorg/app"}}`
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, "http://"+d.listener.Addr().String()+"/api/dockerhub/webhook", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer s")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var hook triggered
	err = json.NewDecoder(resp.Body).Decode(&hook)
	resp.Body.Close()
	if resp.StatusCode != 200 || err != nil {
		t.Fatalf("webhook: %d %v", resp.StatusCode, err)
	}
	select {
	case <-hub.started:
	case <-time.After(10 * time.Second):
		t.Fatal("no callback within 10s")
	}
	// The trigger's deploy (nothing local to pull) is done and saved.
	if _, ok := pollUntil(10*time.Second, pollEvery, func() bool { return d.progress.watermark() >= hook.Revision }); !ok {
		t.Fatalf("watermark %d; want %d within 10s", d.progress.watermark(), hook.Revision)
	}
	start := time.Now()
	cancel()
	select {
	case err := <-done:
		done <- err // for the cleanup
		t.Logf("stopped in %v with a callback hanging", time.Since(start).Round(time.Millisecond))
	case <-time.After(5 * time.Second):
		t.Fatal("daemon still running 5s after SIGTERM (bound 500ms) with a Docker Hub callback hanging")
	}
	select {
	case err := <-hub.cancelled:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("callback ended with %v; want cancelled at the bound", err)
		}
	default:
		t.Error("the callback still runs after the stop")
	}
	got, err := cli.Get(t.Context(), cfg.EtcdPrefix+progressKey("n1"))
	if err != nil || len(got.Kvs) != 1 || string(got.Kvs[0].Value) != strconv.FormatInt(hook.Revision, 10) {
		t.Errorf("saved progress %v (%v); want revision %d", got.Kvs, err, hook.Revision)
	}
}
