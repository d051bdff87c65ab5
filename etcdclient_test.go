package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/die-net/deployer/internal/etcdc"
)

func TestEtcdTLSFlags(t *testing.T) {
	dir := t.TempDir()
	pwFile := writeFile(t, dir, "pw", []byte("hunter2\n"))
	tests := []struct {
		name    string
		args    []string
		env     []string
		wantErr string // "" for success
	}{
		{"https with all files", []string{"-etcd_nodes", "https://10.0.0.1:2379", "-etcd_cacert", "ca", "-etcd_cert", "c", "-etcd_key", "k"}, nil, ""},
		{"cert without key", []string{"-etcd_nodes", "https://h:2379", "-etcd_cert", "c"}, nil, "-etcd_cert"},
		{"key without cert", []string{"-etcd_nodes", "https://h:2379", "-etcd_key", "k"}, nil, "-etcd_cert"},
		{"tls with http endpoint", []string{"-etcd_nodes", "https://a:2379,http://b:2379", "-etcd_cacert", "ca"}, nil, "must be https://"},
		{"tls with embedded etcd", []string{"-etcd_nodes=", "-etcd_cacert", "ca"}, nil, "external etcd"},
		{"user with env password", []string{"-etcd_username", "deployer"}, []string{"DEPLOYER_ETCD_PASSWORD", "pw"}, ""},
		{"user with password file", []string{"-etcd_username", "deployer", "-etcd_password_file", pwFile}, nil, ""},
		{"user without password", []string{"-etcd_username", "deployer"}, nil, "needs a password"},
		{"password without user", nil, []string{"DEPLOYER_ETCD_PASSWORD", "pw"}, "no -etcd_username"},
		{"both passwords", []string{"-etcd_username", "u", "-etcd_password_file", pwFile}, []string{"DEPLOYER_ETCD_PASSWORD", "pw"}, "not both"},
		{"no password flag", []string{"-etcd_password", "x"}, nil, "flag provided but not defined"},
		{"embedded on loopback", []string{"-etcd_nodes=", "-etcd_listen_client", "http://localhost:4001", "-etcd_listen_peer", "http://[::1]:4002"}, nil, ""},
		{"embedded client public", []string{"-etcd_nodes=", "-etcd_listen_client", "http://0.0.0.0:4001"}, nil, "-etcd_listen_client"},
		{"embedded client on a LAN address", []string{"-etcd_nodes=", "-etcd_listen_client", "http://192.168.1.2:4001"}, nil, "not a loopback address"},
		{"embedded peer public", []string{"-etcd_nodes=", "-etcd_listen_peer", "http://[::]:4002"}, nil, "-etcd_listen_peer"},
		{"embedded peer by name", []string{"-etcd_nodes=", "-etcd_listen_peer", "http://myhost:4002"}, nil, "-etcd_listen_peer"},
		{"external etcd ignores listen flags", []string{"-etcd_nodes", "http://127.0.0.1:2379", "-etcd_listen_client", "http://0.0.0.0:4001"}, nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			_, err := parseFlags("deployer", tt.args, env(tt.env...), &stderr)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("parseFlags(%q) = %v; want success", tt.args, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error()+stderr.String(), tt.wantErr) {
				t.Fatalf("parseFlags(%q) = %v; want an error naming %q", tt.args, err, tt.wantErr)
			}
			if !strings.Contains(tt.wantErr, "not defined") && !errors.Is(err, errInvalidFlag) {
				t.Errorf("error %v is not errInvalidFlag (exit 2)", err)
			}
		})
	}
	// The password is never a flag value, and the file wins over nothing.
	c, err := parseFlags("deployer", []string{"-etcd_username", "u", "-etcd_password_file", pwFile}, env(), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if pw, err := etcdPassword(c); err != nil || pw != "hunter2" {
		t.Errorf("etcdPassword = %q, %v; want the file's content without the newline", pw, err)
	}
}

// TestEmbeddedEtcdRefusesPublicListen: main exits 2 (errInvalidFlag)
// before starting anything.
func TestEmbeddedEtcdRefusesPublicListen(t *testing.T) {
	for _, flagName := range []string{"-etcd_listen_client", "-etcd_listen_peer"} {
		var stderr bytes.Buffer
		// Bounded: without the check, the daemon would start.
		ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
		err := run(ctx, []string{"-etcd_nodes=", "-etcd_data_dir", t.TempDir(), flagName, "http://0.0.0.0:4001"}, io.Discard, &stderr)
		cancel()
		if !errors.Is(err, errInvalidFlag) || !strings.Contains(err.Error(), flagName) {
			t.Errorf("run(%s=http://0.0.0.0:4001) = %v; want errInvalidFlag naming the flag", flagName, err)
		}
	}
}

// tlsEnv is a set of certificate files for one test.
type tlsEnv struct {
	dir               string
	ca, otherCA       *testCA
	caFile            string
	certFile, keyFile string
}

func newTLSEnv(t *testing.T) *tlsEnv {
	e := &tlsEnv{dir: t.TempDir(), ca: newTestCA(t, "etcd CA"), otherCA: newTestCA(t, "other CA")}
	e.caFile = writeFile(t, e.dir, "ca.pem", e.ca.pem)
	c, k := e.ca.issue(t, "client-a", false, time.Now().Add(time.Hour))
	e.certFile, e.keyFile = writeFile(t, e.dir, "client.pem", c), writeFile(t, e.dir, "client-key.pem", k)
	return e
}

// renew replaces the client certificate with one for cn signed by ca.
func (e *tlsEnv) renew(t *testing.T, ca *testCA, cn string) {
	c, k := ca.issue(t, cn, false, time.Now().Add(time.Hour))
	replaceFile(t, e.certFile, c)
	replaceFile(t, e.keyFile, k)
}

// cuttableProxy forwards TCP connections to target and can cut them all,
// as a network failure or a member restart does.
type cuttableProxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	conns  []net.Conn
}

func newCuttableProxy(t *testing.T, target string) *cuttableProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cuttableProxy{ln: ln, target: target}
	t.Cleanup(func() { ln.Close(); p.cut() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, u)
			p.mu.Unlock()
			go func() { io.Copy(u, c); u.Close() }()
			go func() { io.Copy(c, u); c.Close() }()
		}
	}()
	return p
}

func (p *cuttableProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// startTLSEtcd starts an embedded etcd that requires client certificates
// of e.ca, as `etcd --client-cert-auth --trusted-ca-file …` does.
func startTLSEtcd(t *testing.T, e *tlsEnv) string {
	sc, sk := e.ca.issue(t, "etcd", true, time.Now().Add(time.Hour))
	cfg := embed.NewConfig()
	cfg.Name = "tls"
	cfg.Dir = t.TempDir()
	cu, _ := url.Parse(strings.Replace(freePort(t), "http://", "https://", 1))
	pu, _ := url.Parse(freePort(t))
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cfg.ClientTLSInfo.CertFile = writeFile(t, e.dir, "server.pem", sc)
	cfg.ClientTLSInfo.KeyFile = writeFile(t, e.dir, "server-key.pem", sk)
	cfg.ClientTLSInfo.TrustedCAFile = e.caFile
	cfg.ClientTLSInfo.ClientCertAuth = true
	cfg.ClientAutoTLS = false
	etcd, err := embed.StartEtcd(cfg)
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(etcd.Close)
	select {
	case <-etcd.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		t.Fatal("etcd not ready in 30s")
	}
	return cu.String()
}

// TestEtcdClientTLS runs the daemon's etcd client and `deployer status`
// against an etcd that requires client certificates, renews the client
// certificate under a running client, then turns authentication on.
func TestEtcdClientTLS(t *testing.T) {
	e := newTLSEnv(t)
	ep := startTLSEtcd(t, e)
	u, _ := url.Parse(ep)
	proxy := newCuttableProxy(t, u.Host)
	proxied := "https://" + proxy.ln.Addr().String()

	cfg := defaultConfig(env())
	cfg.EtcdNodes, cfg.EtcdDialTimeout = []string{proxied}, 5*time.Second
	cfg.EtcdCACert, cfg.EtcdCert, cfg.EtcdKey = e.caFile, e.certFile, e.keyFile
	var logMu sync.Mutex
	var warnings []string
	logger := slog.New(handlerFunc(func(r slog.Record) {
		line := r.Message
		r.Attrs(func(a slog.Attr) bool { line += " " + a.Key + "=" + a.Value.String(); return true })
		logMu.Lock()
		warnings = append(warnings, line)
		logMu.Unlock()
	}))
	cli, err := newEtcdClient(t.Context(), cfg, logger)
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	put := func(d time.Duration) error {
		ctx, cancel := context.WithTimeout(t.Context(), d)
		defer cancel()
		_, err := cli.Put(ctx, "/tls/k", "v")
		return err
	}
	// Get is retried by the client on a broken connection, so it fails
	// only when no new connection gets through.
	get := func(d time.Duration) error {
		ctx, cancel := context.WithTimeout(t.Context(), d)
		defer cancel()
		_, err := cli.Get(ctx, "/tls/k")
		return err
	}
	if err := put(5 * time.Second); err != nil {
		t.Fatalf("put through TLS: %v", err)
	}

	// The certificate files now hold one etcd does not trust; the client
	// must use them on its next connection (a client that kept the
	// certificate it started with would still get through).
	e.renew(t, e.otherCA, "intruder")
	proxy.cut()
	if err := get(3 * time.Second); err == nil {
		t.Fatal("get succeeded with a client certificate etcd does not trust: the client kept the old files")
	}
	// The running client says why (gRPC alone says "deadline exceeded").
	logMu.Lock()
	logged := strings.Join(warnings, "\n")
	logMu.Unlock()
	if !strings.Contains(logged, "etcd TLS connection failed") || !strings.Contains(logged, "refused the client certificate -etcd_cert "+e.certFile) {
		t.Errorf("log %q; want a warning naming the refused certificate", logged)
	}
	// Renewed with a good certificate: the same client gets through again.
	e.renew(t, e.ca, "client-renewed")
	proxy.cut()
	if err := get(20 * time.Second); err != nil {
		t.Fatalf("get after renewal: %v; want the renewed certificate used without a restart", err)
	}

	t.Run("status", func(t *testing.T) {
		var out, stderr bytes.Buffer
		args := []string{"-etcd_nodes", ep, "-etcd_cacert", e.caFile, "-etcd_cert", e.certFile, "-etcd_key", e.keyFile}
		if err := statusCommand(t.Context(), args, &out, &stderr); err != nil || !strings.Contains(out.String(), "IMAGE") {
			t.Errorf("deployer status with the TLS flags = %v, %q %q", err, out.String(), stderr.String())
		}
		out.Reset()
		err := statusCommand(t.Context(), []string{"-etcd_nodes", ep, "-etcd_cacert", e.caFile}, &out, &stderr)
		if !errors.Is(err, etcdc.ErrTLS) || !strings.Contains(err.Error(), "requires a client certificate") {
			t.Errorf("deployer status without a client certificate = %v; want the certificate named", err)
		}
	})

	t.Run("password", func(t *testing.T) {
		ctx := t.Context()
		if _, err := cli.UserAdd(ctx, "root", "rootpw"); err != nil {
			t.Fatal(err)
		}
		if _, err := cli.UserGrantRole(ctx, "root", "root"); err != nil {
			t.Fatal(err)
		}
		if _, err := cli.AuthEnable(ctx); err != nil {
			t.Fatal(err)
		}
		c := cfg
		c.EtcdNodes = []string{ep}
		c.EtcdUsername, c.EtcdPassword = "root", "rootpw"
		good, err := newEtcdClient(ctx, c, testLogger(t))
		if err != nil {
			t.Fatalf("with the password from the environment: %v", err)
		}
		defer good.Close()
		if _, err := good.Put(ctx, "/tls/auth", "v"); err != nil {
			t.Errorf("put as root: %v", err)
		}
		c.EtcdPassword, c.EtcdPasswordFile = "", writeFile(t, e.dir, "pw", []byte("wrong\n"))
		bad, err := newEtcdClient(ctx, c, testLogger(t))
		if err == nil {
			bad.Close()
			t.Fatal("a wrong password from -etcd_password_file was accepted")
		}
		if !strings.Contains(err.Error(), "password") {
			t.Errorf("wrong password: %v; want it named", err)
		}
		// Leave etcd without auth for the clean-up.
		if _, err := good.AuthDisable(ctx); err != nil {
			t.Error(err)
		}
	})
}
