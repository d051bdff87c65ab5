package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/etcdc"
	"github.com/die-net/deployer/internal/testdocker"
)

func TestRunRejectsBadFlags(t *testing.T) {
	var stderr bytes.Buffer
	err := run(t.Context(), []string{"-kill_timeout=-1"}, io.Discard, &stderr)
	if !errors.Is(err, errInvalidFlag) || !strings.Contains(err.Error(), "-kill_timeout") {
		t.Errorf("run(-kill_timeout=-1) = %v; want errInvalidFlag naming the flag", err)
	}
	err = run(t.Context(), []string{"-no_such_flag"}, io.Discard, &stderr)
	if !errors.Is(err, errUsage) {
		t.Errorf("run(-no_such_flag) = %v; want errUsage", err)
	}
	err = run(t.Context(), []string{"-h"}, io.Discard, &stderr)
	if !errors.Is(err, flag.ErrHelp) {
		t.Errorf("run(-h) = %v; want flag.ErrHelp", err)
	}
}

// TestRunRefusesBuiltinRouteAsWebhookPath: run refuses a built-in route
// as a webhook path before it starts anything (exit 2 in main); every
// path it accepts is served without a panic.
func TestRunRefusesBuiltinRouteAsWebhookPath(t *testing.T) {
	// Cancelled, with an etcd nobody serves: if the flag passed, run
	// would return at its first outside call.
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	err := run(ctx, []string{"-etcd_nodes", "http://127.0.0.1:1", "-webhook_path", "/api/deploy"}, io.Discard, io.Discard)
	if !errors.Is(err, errInvalidFlag) || !strings.Contains(err.Error(), "-webhook_path") {
		t.Errorf("run(-webhook_path /api/deploy) = %v; want errInvalidFlag naming -webhook_path", err)
	}
	for _, args := range [][]string{
		{"-webhook_path", "/api/deploy/"},
		{"-webhook_path", "/hooks/hub", "-registry_webhook_path", "/hooks/registry"},
		{"-registry_webhook_path", "/api/status/x"},
	} {
		cfg, err := parseFlags("deployer", append([]string{"-node_name", "n1", "-dockercfg", ""}, args...), env(), io.Discard)
		if err != nil {
			t.Fatalf("parseFlags(%q) = %v", args, err)
		}
		d, err := newDaemon(cfg, testEtcd(t), newFakeDocker(), testLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		func() {
			defer func() {
				if r := recover(); r != nil {
					t.Errorf("handler with %q panics: %v", args, r)
				}
			}()
			d.handler()
		}()
	}
}

type testDaemon struct {
	*daemon
	base string
	done chan error
	stop context.CancelFunc
}

func startTestDaemon(t *testing.T, cli *clientv3.Client, f *fakeDocker, mutate func(*config)) *testDaemon {
	t.Helper()
	return startTestDaemonLog(t, cli, f, mutate, testLogger(t))
}

// startTestDaemonLog is startTestDaemon with the daemon's logger given.
func startTestDaemonLog(t *testing.T, cli *clientv3.Client, f *fakeDocker, mutate func(*config), log *slog.Logger) *testDaemon {
	t.Helper()
	cfg, err := parseFlags("deployer", []string{
		"-listen", "127.0.0.1:0", "-node_name", "n1", "-etcd_prefix", testPrefix(t), "-dockercfg", "",
		"-registry", "127.0.0.1:5000", "-repull_period", "0", "-etcd_retry_delay", "10ms",
	}, env(), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if mutate != nil {
		mutate(&cfg)
	}
	d, err := newDaemon(cfg, cli, f, log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	td := &testDaemon{daemon: d, done: make(chan error, 1), stop: cancel}
	go func() { td.done <- d.run(ctx) }()
	select {
	case <-d.ready:
	case err := <-td.done:
		t.Fatalf("daemon exited: %v", err)
	}
	td.base = "http://" + d.listener.Addr().String()
	if cfg.TLSCert != "" {
		td.base = "https://" + d.listener.Addr().String()
	}
	select {
	case <-d.watcher.watching:
	case <-time.After(30 * time.Second):
		t.Fatal("watcher not started within 30s")
	}
	t.Cleanup(func() {
		cancel()
		<-td.done
	})
	return td
}

func (td *testDaemon) post(t *testing.T, path, auth, body string) (int, string) {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), "POST", td.base+path, strings.NewReader(body))
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestDaemonDeploysFromWebhook runs the whole daemon against embedded etcd,
// a fake Docker and an httptest Slack: webhook → etcd → watch → pull →
// stop → Slack.
func TestDaemonDeploysFromWebhook(t *testing.T) {
	const old, newer = "sha256:1111111111111111111111111111111111111111111111111111111111111111", "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	f := newFakeDocker()
	f.local["127.0.0.1:5000/myorg/foo:qa"] = old
	f.remote["127.0.0.1:5000/myorg/foo:qa"] = newer
	f.addContainer("foo", "127.0.0.1:5000/myorg/foo:qa")
	f.stopped = make(chan string, 1)
	f.supervise = true
	slack := newSlackRecorder(t)
	td := startTestDaemon(t, testEtcd(t), f, func(c *config) {
		c.SlackWebhookURL = slack.URL
		c.WebhookSecret = "s3cret"
		c.NotifyPerNode = true
	})

	code, body := td.post(t, "/api/dockerhub/webhook", "Bearer s3cret", hubBody("myorg/foo", "qa"))
	if code != 200 {
		t.Fatalf("webhook: %d %s", code, body)
	}
	var hook triggered
	if err := json.Unmarshal([]byte(body), &hook); err != nil || hook.Revision == 0 {
		t.Fatalf("webhook answered %s (%v); want the trigger's revision", body, err)
	}
	select {
	case name := <-f.stopped:
		if name != "foo" {
			t.Errorf("stopped %q; want foo", name)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("container not stopped within 10s")
	}
	// The node's own message (-notify_per_node) and the rollout's
	// report, in either order.
	var texts []string
	for range 2 {
		text, _ := slack.next(t)["text"].(string)
		texts = append(texts, text)
	}
	slices.Sort(texts)
	if !strings.Contains(texts[0], "n1") || !strings.Contains(texts[0], "111111111111 → 222222222222") {
		t.Errorf("slack text %q; want the node and old → new IDs", texts[0])
	}
	if !strings.HasPrefix(texts[1], "Rolled out 127.0.0.1:5000/myorg/foo:qa (version 1, image 222222222222") || !strings.Contains(texts[1], "1 of 1 nodes") {
		t.Errorf("slack text %q; want the rollout's report", texts[1])
	}
	if got := f.pulls; len(got) != 1 || got[0] != "127.0.0.1:5000/myorg/foo:qa" {
		t.Errorf("pulls = %q; want one pull of the -registry name", got)
	}

	// /metrics needs the secret too.
	req, _ := http.NewRequestWithContext(t.Context(), "GET", td.base+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 {
		t.Errorf("/metrics without secret: %d; want 401", resp.StatusCode)
	}
	req.Header.Set("Authorization", "Bearer s3cret")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`deployer_containers_stopped_total{result="ok"} 1`,
		`deployer_deploys_total{result="ok"} 1`, // counted before Slack is told
		`deployer_pulls_total{result="ok"} 1`,
	} {
		if !strings.Contains(string(b), want) {
			t.Errorf("/metrics lacks %s:\n%s", want, b)
		}
	}

	// A clean stop returns nil and records the handled revision.
	td.stop()
	if err := <-td.done; err != nil {
		t.Errorf("run after cancel = %v; want nil", err)
	}
	td.done <- nil // for the cleanup
	resp2, err := testEtcd(t).Get(t.Context(), testPrefix(t)+progressKey("n1"))
	if err != nil || len(resp2.Kvs) != 1 {
		t.Fatalf("progress after stop = %v, %v; want the handled revision", resp2, err)
	}
	if got, err := strconv.ParseInt(string(resp2.Kvs[0].Value), 10, 64); err != nil || got < hook.Revision {
		t.Errorf("progress after stop = %s; want at least %d, the revision the webhook wrote", resp2.Kvs[0].Value, hook.Revision)
	}
}

func TestHealthz(t *testing.T) {
	f := newFakeDocker()
	td := startTestDaemon(t, testEtcd(t), f, nil)
	now := time.Unix(1000, 0)
	td.health.now = func() time.Time { return now }
	get := func() (int, string) {
		resp, err := http.Get(td.base + "/healthz") // no secret
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get(); code != 200 || body != "ok\n" {
		t.Errorf("healthy: %d %q; want 200 ok", code, body)
	}
	f.mu.Lock()
	f.pingErr = errors.New("cannot connect to the Docker daemon at unix:///var/run/docker.sock")
	f.mu.Unlock()
	// Within a second the cached answer stands, however many ask.
	for range 20 {
		if code, body := get(); code != 200 || body != "ok\n" {
			t.Fatalf("cached: %d %q; want the cached 200 ok", code, body)
		}
	}
	if td.health.checks != 1 {
		t.Errorf("%d checks for 21 requests within a second; want 1", td.health.checks)
	}
	now = now.Add(1100 * time.Millisecond)
	// The failing part's name only: no socket path, no error text.
	if code, body := get(); code != 503 || body != "docker\n" {
		t.Errorf("docker down: %d %q; want 503 docker", code, body)
	}
}

// TestEmbeddedEtcdServe starts the real serve path with -etcd_nodes empty:
// the daemon runs its own etcd.
func TestEmbeddedEtcdServe(t *testing.T) {
	dir := t.TempDir()
	engine := &testdocker.Engine{API: "1.52", Min: "1.44"} // the daemon waits for Docker's API version
	testdocker.Start(t, engine, "unix", nil)
	cfg, err := parseFlags("deployer", []string{
		"-etcd_nodes=", "-etcd_data_dir", dir, "-etcd_listen_client", freePort(t), "-etcd_listen_peer", freePort(t),
		"-listen", "127.0.0.1:0", "-docker", engine.Endpoint, "-dockercfg=", "-node_name", "solo",
	}, env(), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- serve(ctx, cfg, testLogger(t)) }()
	cli := newTestClient(t, cfg.EtcdListenClient)
	// The watcher of a new node records its starting revision; watching
	// from revision 1 sees the write whenever it happened.
	wctx, wcancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer wcancel()
	if _, ok := <-cli.Watch(wctx, "/deployer"+progressKey("solo"), clientv3.WithRev(1)); !ok {
		t.Fatal("embedded etcd never got the progress key within 30s")
	}
	cli.Close() // an open client would hold up the server's graceful stop
	cancel()
	if err := <-done; err != nil {
		t.Errorf("serve = %v; want nil after cancel", err)
	}
}

func TestMetricsOpen(t *testing.T) {
	for _, open := range []bool{false, true} {
		td := startTestDaemon(t, testEtcd(t), newFakeDocker(), func(c *config) {
			c.WebhookSecret, c.MetricsOpen, c.NodeName = "s", open, fmt.Sprint("n-", open)
		})
		resp, err := http.Get(td.base + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if want := map[bool]int{false: 401, true: 200}[open]; resp.StatusCode != want {
			t.Errorf("-metrics_open=%v: /metrics without secret = %d; want %d", open, resp.StatusCode, want)
		}
	}
}

// daemonCommandLine is a command line that sets every flag of the daemon,
// with a non-default embedded etcd whose client URL is etcdURL.
func daemonCommandLine(t *testing.T, etcdURL string) []string {
	return []string{
		"-auto_rollback=false", "-cleanup", "-keep_images", "3", "-docker", "unix:///run/other-docker.sock", "-docker_cert_path", t.TempDir(), "-docker_tls_verify=false",
		"-dockercfg", "/root/.docker/config.json", "-dry_run", "-history", "5",
		"-etcd_cacert=", "-etcd_cert=", "-etcd_key=", "-etcd_username=", "-etcd_password_file=",
		"-etcd_nodes=", "-etcd_data_dir", t.TempDir(), "-etcd_listen_client", etcdURL, "-etcd_listen_peer", freePort(t),
		"-etcd_dial_timeout", "3s", "-etcd_prefix", testPrefix(t), "-etcd_retry_delay", "1s",
		"-kill_timeout", "5", "-listen", "127.0.0.1:4600", "-log_format", "json", "-max_threads", "2", "-max_unavailable", "0",
		"-metrics_open", "-node_labels", "canary,eu", "-node_name", "solo", "-up_after", "2s", "-registry", "127.0.0.1:5000", "-registry_webhook_path", "/hooks/registry",
		"-repull_period", "1h", "-restart_strategy", "recreate", "-restart_timeout", "1m", "-slack_username", "bot",
		"-slack_webhook_url=", "-slot_timeout", "5m", "-strong_consistency", "-tls_cert=", "-tls_key=",
		"-webhook_path", "/hooks/hub", "-webhook_secret=",
		"-notify", "generic://127.0.0.1:9/hook?template=json", "-notify_per_node", "-slack_api", "https://slack.com/api/",
		"-slack_channel=", "-slack_token=",
	}
}

// TestSubcommandsTakeTheDaemonsCommandLine: an operator who started the
// daemon with a non-default embedded etcd reaches it by putting `secret`
// or `status` in front of the same command line: every daemon flag is
// accepted, and -etcd_listen_client names the etcd when -etcd_nodes is
// empty.
func TestSubcommandsTakeTheDaemonsCommandLine(t *testing.T) {
	cli := testEtcd(t)
	secret, _, err := clusterSecret(t.Context(), etcdc.InPrefix(cli, testPrefix(t)))
	if err != nil {
		t.Fatal(err)
	}
	line := daemonCommandLine(t, sharedEtcdURL)
	if _, err := parseFlags("deployer", line, env(), io.Discard); err != nil {
		t.Fatalf("the daemon refuses its own command line: %v", err)
	}
	var help bytes.Buffer
	if _, err := parseFlags("deployer", []string{"-h"}, env(), &help); !errors.Is(err, flag.ErrHelp) {
		t.Fatal(err)
	}
	for _, l := range strings.Split(help.String(), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(l, "  -") && !slices.ContainsFunc(line, func(a string) bool {
			return a == f[0] || strings.HasPrefix(a, f[0]+"=")
		}) {
			t.Errorf("daemonCommandLine lacks the daemon flag %s", f[0])
		}
	}

	var out, stderr bytes.Buffer
	if err := run(t.Context(), append([]string{"secret"}, line...), &out, &stderr); err != nil {
		t.Fatalf("deployer secret <daemon flags>: %v (%s)", err, stderr.String())
	}
	if got := strings.TrimSpace(out.String()); got != secret {
		t.Errorf("deployer secret <daemon flags> printed %q; want the cluster secret %q", got, secret)
	}
	out.Reset()
	if err := run(t.Context(), append([]string{"status"}, line...), &out, &stderr); err != nil {
		t.Fatalf("deployer status <daemon flags>: %v (%s)", err, stderr.String())
	}
	if !strings.Contains(out.String(), "IMAGE") {
		t.Errorf("deployer status <daemon flags> printed %q; want the table", out.String())
	}
	out.Reset()
	if err := run(t.Context(), append([]string{"status", "-json"}, line...), &out, &stderr); err != nil || !json.Valid(out.Bytes()) {
		t.Errorf("deployer status -json <daemon flags>: %v, %q; want JSON", err, out.String())
	}
	out.Reset()
	if err := run(t.Context(), append([]string{"history"}, append(line, "myorg/app:qa")...), &out, &stderr); err != nil || !strings.Contains(out.String(), "OUTCOME") {
		t.Errorf("deployer history <daemon flags> myorg/app:qa: %v, %q; want the table", err, out.String())
	}

	// A daemon started with -webhook_secret accepts that secret, not the
	// cluster's: `secret` in front of its command line prints it.
	out.Reset()
	if err := run(t.Context(), append([]string{"secret"}, append(line, "-webhook_secret", "mine")...), &out, &stderr); err != nil || strings.TrimSpace(out.String()) != "mine" {
		t.Errorf("deployer secret -webhook_secret mine = %q, %v; want mine", out.String(), err)
	}
}

// TestSubcommandsRejectBadEtcdFlags: the etcd flags are checked as the
// daemon checks them (exit 2 naming the flag); the others are not the
// subcommands' business, and an unknown flag is still a usage error.
func TestSubcommandsRejectBadEtcdFlags(t *testing.T) {
	for _, cmd := range []string{"secret", "status"} {
		for _, tt := range []struct {
			args []string
			want error
			flag string
		}{
			{[]string{"-etcd_nodes=", "-etcd_listen_client", "http://example.com:4001"}, errInvalidFlag, "-etcd_listen_client"},
			{[]string{"-etcd_listen_client", "4001"}, errInvalidFlag, "-etcd_listen_client"},
			{[]string{"-etcd_prefix", "nope/"}, errInvalidFlag, "-etcd_prefix"},
			{[]string{"-etcd_dial_timeout", "0s"}, errInvalidFlag, "-etcd_dial_timeout"},
			{[]string{"-etcd_nodes", "ftp://x"}, errInvalidFlag, "-etcd_nodes"},
			{[]string{"-no_such_flag"}, errUsage, "no_such_flag"},
			{[]string{"extra"}, errUsage, "extra"},
		} {
			err := run(t.Context(), append([]string{cmd}, tt.args...), io.Discard, io.Discard)
			if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.flag) {
				t.Errorf("deployer %s %q = %v; want %v naming %s", cmd, tt.args, err, tt.want, tt.flag)
			}
		}
	}
}
