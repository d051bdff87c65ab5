//go:build e2e

package main

// Security by default on a real stack: the cluster's webhook secret shared
// by two nodes started without -webhook_secret, HTTPS webhooks with a
// certificate renewed while the deployer runs, and `deployer` with no
// flags deploying on one node.

import (
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestE2ESecurity(t *testing.T) {
	t.Parallel() // a stack of its own; three run at once (make e2e: -parallel 3)
	s := newStackWith(t, 2, 1)
	all := s.nodes
	ref := s.hub.host() + "/sec/app:qa"
	v1 := s.build(ref, false)
	for _, n := range all {
		s.supervise(n, "app", ref, v1)
	}
	s.record("security stack up: %d nodes, 1 etcd member", len(all))

	t.Run("two nodes without -webhook_secret share the cluster secret", func(t *testing.T) {
		for _, n := range all {
			n.deployer.stop(syscall.SIGTERM, 15*time.Second)
			n.args = withoutFlag(n.args, "-webhook_secret")
			s.runDeployer(n)
		}
		out, err := exec.Command(s.bin, "secret", "-etcd_nodes", s.etcdEndpoints(), "-etcd_prefix", s.prefix).Output()
		if err != nil {
			t.Fatalf("deployer secret: %v", err)
		}
		secret := strings.TrimSpace(string(out))
		if len(secret) != 64 {
			t.Fatalf("deployer secret printed %q; want 64 hex digits", secret)
		}
		s.secret = secret // for the stack's helpers from now on
		for _, n := range all {
			if code, body := s.postHook(n, "/api/dockerhub/webhook", "", hubBody("barrier/none", "")); code != 401 {
				t.Errorf("%s without the secret: %d %s; want 401", n.name, code, body)
			}
			if code, body := s.postHook(n, "/api/dockerhub/webhook", "Bearer e2e-secret", hubBody("barrier/none", "")); code != 401 {
				t.Errorf("%s with the old flag's secret: %d %s; want 401", n.name, code, body)
			}
			if code, body := s.postHook(n, "/api/dockerhub/webhook", "Bearer "+secret, hubBody("barrier/none", "")); code != 200 {
				t.Errorf("%s with the cluster secret: %d %s; want 200", n.name, code, body)
			}
		}
		// A deploy through one node's webhook reaches both.
		v2 := s.build(ref, false)
		start := time.Now()
		if code, body := s.webhook(all[1], strings.TrimSuffix(ref, ":qa"), "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		s.waitImage(all, "app", v2, 60*time.Second)
		took := time.Since(start)
		for _, n := range all {
			log, _ := os.ReadFile(n.deployer.log)
			if strings.Contains(string(log), secret) {
				t.Errorf("%s logged the cluster secret", n.name)
			}
			if !strings.Contains(string(log), "deployer secret -etcd_prefix "+s.prefix) {
				t.Errorf("%s's log does not say how to get the secret", n.name)
			}
		}
		if t.Failed() {
			return
		}
		s.record("security 1: 2 nodes without -webhook_secret: 401 without the secret and 200 with `deployer secret`'s on both; webhook to node2 → app on the new image on both nodes in %v",
			took.Round(time.Millisecond))
	})

	t.Run("HTTPS webhooks with a renewed certificate", func(t *testing.T) {
		n := all[0]
		dir := filepath.Join(s.dir, "tls")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		ca := newTestCA(t, "deployer test CA")
		certFile, keyFile := ca.issueFiles(t, dir, "webhook", "first")
		n.deployer.stop(syscall.SIGTERM, 15*time.Second)
		n.args = append(slices.Clone(n.args), "-tls_cert", certFile, "-tls_key", keyFile)
		n.deployer = startProc(s.t, s.dir, "deployer-"+n.name, nil, n.args...)
		client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: ca.pool()}, DisableKeepAlives: true,
		}}
		base := fmt.Sprintf("https://127.0.0.1:%d", n.port)
		waitFor(t, 30*time.Second, "HTTPS /healthz", func() bool {
			if !n.deployer.running() {
				t.Fatalf("deployer exited:\n%s", n.deployer.tail(20))
			}
			resp, err := client.Get(base + "/healthz")
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == 200
		})
		post := func(auth string) (int, string) {
			req, _ := http.NewRequest("POST", base+"/api/dockerhub/webhook", strings.NewReader(hubBody(strings.TrimSuffix(ref, ":qa"), "qa")))
			if auth != "" {
				req.Header.Set("Authorization", auth)
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatalf("HTTPS webhook: %v", err)
			}
			defer resp.Body.Close()
			io.Copy(io.Discard, resp.Body)
			return resp.StatusCode, resp.TLS.PeerCertificates[0].Subject.CommonName
		}
		if code, _ := post(""); code != 401 {
			t.Errorf("HTTPS webhook without the secret: %d; want 401", code)
		}
		// Plain HTTP on the same port gets nothing through.
		if resp, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/api/dockerhub/webhook?token=%s", n.port, s.secret), "application/json", strings.NewReader(hubBody("barrier/none", ""))); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				t.Error("plain HTTP webhook accepted on the HTTPS port")
			}
		}
		v3 := s.build(ref, false)
		start := time.Now()
		code, cn := post("Bearer " + s.secret)
		if code != 200 || cn != "first" {
			t.Fatalf("HTTPS webhook: %d, certificate %q; want 200 with the first certificate", code, cn)
		}
		s.waitImage(all, "app", v3, 60*time.Second)
		deployed := time.Since(start)

		// Renewal: new files in place, no restart.
		pid := n.deployer.cmd.Process.Pid
		ca.issueFiles(t, dir, "webhook", "renewed")
		later := time.Now().Add(2 * time.Second)
		os.Chtimes(certFile, later, later)
		os.Chtimes(keyFile, later, later)
		if code, cn := post("Bearer " + s.secret); code != 200 || cn != "renewed" {
			t.Errorf("after the renewal: %d, certificate %q; want 200 with the renewed one", code, cn)
		}
		if !n.deployer.running() || n.deployer.cmd.Process.Pid != pid {
			t.Error("the deployer restarted for the renewal")
		}
		if t.Failed() {
			return
		}
		s.record("security 2: HTTPS webhook (test CA made with crypto/x509) → app on the new image on both nodes in %v; renewed certificate served at the next handshake, same process",
			deployed.Round(time.Millisecond))
	})

	t.Run("deployer with no flags deploys on one node", func(t *testing.T) {
		n := all[1]
		n.deployer.stop(syscall.SIGTERM, 15*time.Second)
		// Only -docker and a data dir in the test's directory; -listen on
		// a free loopback port because the default :4500 listens on
		// every interface and may be taken by another stack on this box.
		// The embedded etcd on free ports too (not the default 4001, for
		// the same reason), which the subcommands must find from the
		// daemon's own command line.
		dataDir := filepath.Join(s.dir, "solo-etcd")
		port := freeTCPPort(t)
		n.args = []string{s.bin, "-docker", n.host(), "-etcd_data_dir", dataDir, "-listen", fmt.Sprintf("127.0.0.1:%d", port),
			"-etcd_listen_client", fmt.Sprintf("http://127.0.0.1:%d", freeTCPPort(t)), "-etcd_listen_peer", fmt.Sprintf("http://127.0.0.1:%d", freeTCPPort(t))}
		n.port = port
		start := time.Now()
		s.runDeployer(n)
		s.record("security 3: `deployer -docker … -etcd_data_dir … -listen … -etcd_listen_client …` up (embedded etcd, watch started) in %v", time.Since(start).Round(time.Millisecond))
		// `deployer secret` in front of the daemon's command line reads
		// its embedded etcd (-etcd_listen_client; every other flag is
		// accepted and ignored).
		out, err := exec.Command(s.bin, append([]string{"secret"}, n.args[1:]...)...).Output()
		if err != nil {
			t.Fatalf("deployer secret <the daemon's flags>: %v", err)
		}
		secret := strings.TrimSpace(string(out))
		if secret == s.secret || len(secret) != 64 {
			t.Fatalf("deployer secret printed %q; want this single node's own secret", secret)
		}
		saved := s.secret
		s.secret = secret
		defer func() { s.secret = saved }()
		if code, _ := s.postHook(n, "/api/dockerhub/webhook", "", hubBody("x/y", "")); code != 401 {
			t.Errorf("no-flags deployer without the secret: %d; want 401", code)
		}
		v4 := s.build(ref, false)
		start = time.Now()
		if code, body := s.webhook(n, strings.TrimSuffix(ref, ":qa"), "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		s.waitImage([]*node{n}, "app", v4, 60*time.Second)
		took := time.Since(start)
		if _, img := s.containerImage(all[0], "app"); img == v4 {
			t.Error("node1, not in the no-flags deployer's cluster, deployed too")
		}
		if fi, err := os.Stat(filepath.Join(dataDir, "member")); err != nil || !fi.IsDir() {
			t.Errorf("embedded etcd data not in -etcd_data_dir: %v", err)
		}
		// `deployer status` in front of the same command line shows the
		// app on the new version (the record follows within a second).
		var status []byte
		pollUntil(15*time.Second, 200*time.Millisecond, func() bool { // polling an outside process: no event to wait on
			status, err = exec.Command(s.bin, append([]string{"status"}, n.args[1:]...)...).CombinedOutput()
			return err == nil && strings.Contains(string(status), ref) && strings.Contains(string(status), shortID(v4))
		})
		if err != nil || !strings.Contains(string(status), ref) || !strings.Contains(string(status), shortID(v4)) {
			t.Errorf("deployer status <the daemon's flags>: %v\n%s\nwant %s on the new image", err, status, ref)
		}
		if t.Failed() {
			return
		}
		s.record("security 3: minimal-flags deployer: webhook → app on the new image in %v; `deployer secret` and `deployer status` in front of its command line read its embedded etcd at -etcd_listen_client",
			took.Round(time.Millisecond))
	})
}

// withoutFlag returns args without flag and its value.
func withoutFlag(args []string, flag string) []string {
	var out []string
	for i := 0; i < len(args); i++ {
		if args[i] == flag {
			i++
			continue
		}
		out = append(out, args[i])
	}
	return out
}
