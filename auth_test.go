package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/die-net/deployer/internal/etcdc"
)

func TestClusterSecretCreatedOnceAndShared(t *testing.T) {
	cli := testNS(t)
	const n = 8
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		secrets = map[string]int{}
		created int
	)
	for range n {
		wg.Go(func() {
			s, c, err := clusterSecret(t.Context(), cli)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			secrets[s]++
			if c {
				created++
			}
		})
	}
	wg.Wait()
	if len(secrets) != 1 || created != 1 {
		t.Fatalf("%d starts saw %d secrets, %d created; want one secret created once", n, len(secrets), created)
	}
	for s := range secrets {
		if b, err := hex.DecodeString(s); err != nil || len(b) != secretBytes {
			t.Errorf("secret %q is not %d random bytes in hex", s, secretBytes)
		}
		got, err := readClusterSecret(t.Context(), cli)
		if err != nil || got != s {
			t.Errorf("readClusterSecret = %q, %v; want the created one", got, err)
		}
	}
	if _, err := readClusterSecret(t.Context(), etcdc.InPrefix(testEtcd(t), testPrefix(t)+"-none")); err == nil || !strings.Contains(err.Error(), "no webhook secret") {
		t.Errorf("readClusterSecret of a prefix without one = %v; want a 'no webhook secret' error", err)
	}
}

func TestAuthorizedNeverWithoutSecret(t *testing.T) {
	for _, target := range []string{"/hook", "/hook?token="} {
		r := httptest.NewRequest("POST", target, nil)
		r.Header.Set("Authorization", "Bearer ")
		if authorized(r, "") {
			t.Errorf("authorized(%s, empty secret) = true; want false: there is no unauthenticated mode", target)
		}
	}
}

// TestDaemonWithoutSecretUsesClusterSecret: two daemons of one cluster
// started with no -webhook_secret accept the same secret, which
// `deployer secret` prints and the log never shows.
func TestDaemonWithoutSecretUsesClusterSecret(t *testing.T) {
	cli := testEtcd(t)
	var logs [2]bytes.Buffer
	var tds [2]*testDaemon
	for i := range tds {
		tds[i] = startTestDaemonLog(t, cli, newFakeDocker(), func(c *config) {
			c.WebhookSecret, c.NodeName = "", fmt.Sprint("n", i+1)
		}, slog.New(slog.NewTextHandler(&syncWriter{w: &logs[i]}, nil)))
	}
	var out, errOut bytes.Buffer
	if err := run(t.Context(), []string{"secret", "-etcd_nodes", sharedEtcdURL, "-etcd_prefix", testPrefix(t)}, &out, &errOut); err != nil {
		t.Fatalf("deployer secret: %v (%s)", err, errOut.String())
	}
	secret := strings.TrimSpace(out.String())
	if len(secret) != 2*secretBytes {
		t.Fatalf("deployer secret printed %q; want %d hex digits", secret, 2*secretBytes)
	}
	for i, td := range tds {
		if code, body := td.post(t, "/api/dockerhub/webhook", "", hubBody("myorg/foo", "qa")); code != 401 {
			t.Errorf("n%d without the secret: %d %s; want 401", i+1, code, body)
		}
		if code, body := td.post(t, "/api/dockerhub/webhook", "Bearer "+secret, hubBody("myorg/foo", "qa")); code != 200 {
			t.Errorf("n%d with the cluster secret: %d %s; want 200", i+1, code, body)
		}
		resp, err := http.Get(td.base + "/api/status")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 401 {
			t.Errorf("n%d /api/status without the secret: %d; want 401", i+1, resp.StatusCode)
		}
		td.stop()
		<-td.done
		td.done <- nil
		log := logs[i].String()
		if strings.Contains(log, secret) {
			t.Errorf("n%d logged the secret:\n%s", i+1, log)
		}
		if !strings.Contains(log, "deployer secret -etcd_prefix "+testPrefix(t)) {
			t.Errorf("n%d log does not say how to get the secret:\n%s", i+1, log)
		}
	}
}

type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

func TestFailedAuthRateLimited(t *testing.T) {
	td := startTestDaemon(t, testEtcd(t), newFakeDocker(), func(c *config) { c.WebhookSecret = "s3cret" })
	burst := td.failures.burst
	codes := map[int]int{}
	for range burst + 5 {
		code, _ := td.post(t, "/api/dockerhub/webhook", "Bearer wrong", hubBody("myorg/foo", "qa"))
		codes[code]++
	}
	if codes[401] != burst || codes[429] != 5 {
		t.Errorf("%d failed requests in a burst got %v; want %d × 401 then 429", burst+5, codes, burst)
	}
	// The same address with the secret is not slowed.
	for i := range 20 {
		if code, body := td.post(t, "/api/dockerhub/webhook", "Bearer s3cret", hubBody("myorg/foo", "qa")); code != 200 {
			t.Fatalf("authenticated request %d after the limit: %d %s; want 200", i, code, body)
		}
	}
	// /metrics and /api/status share the limit.
	for _, path := range []string{"/metrics", "/api/status"} {
		resp, err := http.Get(td.base + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 429 || resp.Header.Get("Retry-After") == "" {
			t.Errorf("GET %s without the secret over the limit: %d (Retry-After %q); want 429 with Retry-After", path, resp.StatusCode, resp.Header.Get("Retry-After"))
		}
	}
}

func TestFailLimiterBounded(t *testing.T) {
	now := time.Unix(1000, 0)
	l := &failLimiter{every: time.Second, burst: 2, max: 3, now: func() time.Time { return now }, addrs: map[string]*addrLimiter{}}
	for i := range 10 {
		addr := fmt.Sprintf("10.0.0.%d:1234", i)
		for range 3 {
			l.allow(addr)
		}
		now = now.Add(time.Millisecond)
		if len(l.addrs) > l.max {
			t.Fatalf("%d addresses remembered; want at most %d", len(l.addrs), l.max)
		}
	}
	// Ports do not make new addresses.
	ok1, _ := l.allow("192.0.2.1:1")
	ok2, _ := l.allow("192.0.2.1:2")
	ok3, retry := l.allow("192.0.2.1:3")
	if !ok1 || !ok2 || ok3 || retry <= 0 {
		t.Errorf("three failures from one host on three ports: %v %v %v (retry %s); want the third limited", ok1, ok2, ok3, retry)
	}
	now = now.Add(time.Second)
	if ok, _ := l.allow("192.0.2.1:4"); !ok {
		t.Error("a second later: still limited; want one more allowed")
	}
}

// TestSlackURLNeverLogged posts to a Slack URL on a closed port: the
// network error (a *url.Error carrying the URL) must not put its token in
// the log or in the error.
func TestSlackURLNeverLogged(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // now a closed port
	const token = "T0000000/B0000000/XXXXsecretTOKENxxxx"
	url := "http://" + addr + "/services/" + token
	var buf bytes.Buffer
	m := newMetrics()
	n, _ := newSlackHub(url, slog.New(slog.NewTextHandler(&buf, nil)), m)
	_ = n.deliver(t.Context(), message{Text: "hello"})
	out := buf.String()
	if !strings.Contains(out, "notification not sent") {
		t.Fatalf("no failure logged:\n%s", out)
	}
	for _, leak := range []string{token, "XXXXsecretTOKENxxxx", "/services/"} {
		if strings.Contains(out, leak) {
			t.Errorf("the log shows %q:\n%s", leak, out)
		}
	}
	if !strings.Contains(out, addr) {
		t.Errorf("the log should still name the host %s:\n%s", addr, out)
	}
	// Metrics carry no URL either.
	rec := httptest.NewRecorder()
	d := &daemon{metrics: m, cfg: config{MetricsOpen: true}}
	d.metricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if strings.Contains(rec.Body.String(), "secretTOKEN") {
		t.Error("/metrics shows the Slack token")
	}
}

// errTransport fails every request, as a network error would.
type errTransport struct{}

func (errTransport) RoundTrip(*http.Request) (*http.Response, error) {
	return nil, errors.New("dial tcp: connection refused")
}

func TestDockerHubCallbackURLNeverLogged(t *testing.T) {
	var buf bytes.Buffer
	h, _ := newTestWebhook(t, testEtcd(t), "s")
	h.log = slog.New(slog.NewTextHandler(&syncWriter{w: &buf}, nil))
	h.callback = &http.Client{Transport: errTransport{}}
	const secretPath = "/u/myorg/foo/hook/2141b5bi5i5b02bec211i4eeih0242eg11000a/"
	h.dockerHubCallback(t.Context(), "https://registry.hub.docker.com"+secretPath, "success", "x")
	h.dockerHubCallback(t.Context(), "https://evil.example.com:8443"+secretPath+"?token=abc", "success", "x")
	h.wg.Wait()
	out := buf.String()
	if !strings.Contains(out, "docker hub callback failed") || !strings.Contains(out, "ignoring callback_url") {
		t.Fatalf("expected both failures logged:\n%s", out)
	}
	if strings.Contains(out, "2141b5bi5i5b02bec") || strings.Contains(out, "token=abc") {
		t.Errorf("the log shows the callback URL:\n%s", out)
	}
}

func TestRedactErr(t *testing.T) {
	const u = "https://hooks.slack.com/services/T1/B2/abc%20def?x=secretq"
	base := errors.New("boom")
	err := redactErr(fmt.Errorf("failed: Post %q: %w (path /services/T1/B2/abc def, query x=secretq)", u, base), u)
	if strings.Contains(err.Error(), "T1/B2") || strings.Contains(err.Error(), "secretq") {
		t.Errorf("redactErr = %q; want no part of the URL's path or query", err)
	}
	if !errors.Is(err, base) {
		t.Error("redactErr lost the wrapped error")
	}
	if redactErr(base, u) != base || //nolint:errorlint // the very same error value must come back
		redactErr(nil, u) != nil {
		t.Error("redactErr changed an error without the URL")
	}
}

func TestBadWebhookPathIsFlagError(t *testing.T) {
	for _, args := range [][]string{{"-webhook_path", "/hook/{"}, {"-registry_webhook_path", "/r/{x}/{x}"}} {
		err := run(t.Context(), args, io.Discard, io.Discard)
		if !errors.Is(err, errInvalidFlag) {
			t.Errorf("run(%q) = %v; want errInvalidFlag (exit 2), not a panic", args, err)
		}
	}
}

func TestSlackURLNotInFlagError(t *testing.T) {
	_, err := parseFlags("deployer", []string{"-slack_webhook_url", "hooks.slack.com/services/T1/B2/tok"}, env(), io.Discard)
	if err == nil || strings.Contains(err.Error(), "tok") {
		t.Errorf("bad -slack_webhook_url error = %v; want an error without the value", err)
	}
}

func TestHTTPSWithCertificateReload(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t, "deployer test CA")
	certFile, keyFile := ca.issueFiles(t, dir, "server", "first")
	td := startTestDaemon(t, testEtcd(t), newFakeDocker(), func(c *config) {
		c.WebhookSecret, c.TLSCert, c.TLSKey = "s3cret", certFile, keyFile
	})
	if !strings.HasPrefix(td.base, "https://") {
		t.Fatalf("base %s; want https", td.base)
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.pool()}, DisableKeepAlives: true}}
	served := func() string {
		t.Helper()
		req, _ := http.NewRequestWithContext(t.Context(), "POST", td.base+"/api/dockerhub/webhook", strings.NewReader(hubBody("myorg/foo", "qa")))
		req.Header.Set("Authorization", "Bearer s3cret")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("HTTPS webhook: %d", resp.StatusCode)
		}
		return resp.TLS.PeerCertificates[0].Subject.CommonName
	}
	if cn := served(); cn != "first" {
		t.Fatalf("served %q; want first", cn)
	}
	// Plain HTTP gets no webhook through.
	if resp, err := http.Get("http" + strings.TrimPrefix(td.base, "https") + "/healthz"); err == nil {
		resp.Body.Close()
		if resp.StatusCode == 200 {
			t.Error("plain HTTP answered 200 on the HTTPS port")
		}
	}
	// A renewal: new files in place, a later mtime.
	ca.issueFiles(t, dir, "server", "second")
	later := time.Now().Add(2 * time.Second)
	for _, f := range []string{certFile, keyFile} {
		os.Chtimes(f, later, later)
	}
	if cn := served(); cn != "second" {
		t.Errorf("after renewal served %q; want second, without a restart", cn)
	}
	// A broken renewal keeps the last good certificate.
	os.WriteFile(certFile, []byte("not a certificate"), 0o600)
	later = later.Add(time.Second)
	os.Chtimes(certFile, later, later)
	if cn := served(); cn != "second" {
		t.Errorf("after a broken renewal served %q; want the previous certificate", cn)
	}
}

func TestHTTPSBadCertificateFailsAtStart(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(dir+"/c.pem", []byte("junk"), 0o600)
	os.WriteFile(dir+"/k.pem", []byte("junk"), 0o600)
	cfg, err := parseFlags("deployer", []string{"-tls_cert", dir + "/c.pem", "-tls_key", dir + "/k.pem", "-listen", "127.0.0.1:0", "-node_name", "n1", "-etcd_prefix", testPrefix(t)}, env(), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	d, err := newDaemon(cfg, testEtcd(t), newFakeDocker(), testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := d.run(ctx); err == nil || !strings.Contains(err.Error(), "-tls_cert") {
		t.Errorf("run with a junk certificate = %v; want an error naming -tls_cert", err)
	}
}
