//go:build e2e

package main

// TLS on the real stack: an etcd 3.4 member that requires client
// certificates (certificates made here with crypto/x509), a deployer that
// deploys through it, renews its client certificate without a restart,
// and deployers without a usable certificate that fail with a line naming
// the problem. The deployer also negotiates the Engine API version with
// the real dockerd.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
)

// tlsEtcd is an etcd member with --client-cert-auth.
type tlsEtcd struct {
	m                             *etcdMember
	caFile, certFile, keyFile     string // the deployer's -etcd_cacert, -etcd_cert, -etcd_key
	clientCA                      *testCA
	serverCA                      *testCA
	serverCertFile, serverKeyFile string
	trustedCAFile                 string // etcd's --trusted-ca-file
}

func (s *stack) startTLSEtcd(dir string) *tlsEtcd {
	s.t.Helper()
	te := &tlsEtcd{serverCA: newTestCA(s.t, "etcd server CA"), clientCA: newTestCA(s.t, "etcd client CA")}
	sc, sk := te.serverCA.issue(s.t, "etcd", true, time.Now().Add(time.Hour))
	te.serverCertFile, te.serverKeyFile = writeFile(s.t, dir, "server.pem", sc), writeFile(s.t, dir, "server-key.pem", sk)
	te.trustedCAFile = writeFile(s.t, dir, "client-ca.pem", te.clientCA.pem)
	te.caFile = writeFile(s.t, dir, "ca.pem", te.serverCA.pem)
	cc, ck := te.clientCA.issue(s.t, "deployer", false, time.Now().Add(time.Hour))
	te.certFile, te.keyFile = writeFile(s.t, dir, "client.pem", cc), writeFile(s.t, dir, "client-key.pem", ck)

	m := &etcdMember{
		name:      "tls",
		clientURL: fmt.Sprintf("https://127.0.0.1:%d", freeTCPPort(s.t)),
		peer:      fmt.Sprintf("http://127.0.0.1:%d", freeTCPPort(s.t)),
		dataDir:   filepath.Join(s.dir, "etcd-tls"),
	}
	m.args = []string{"etcd", "--name", m.name, "--data-dir", m.dataDir,
		"--listen-client-urls", m.clientURL, "--advertise-client-urls", m.clientURL,
		"--listen-peer-urls", m.peer, "--initial-advertise-peer-urls", m.peer,
		"--initial-cluster", m.name + "=" + m.peer, "--initial-cluster-state", "new",
		"--client-cert-auth", "--trusted-ca-file", te.trustedCAFile,
		"--cert-file", te.serverCertFile, "--key-file", te.serverKeyFile}
	te.m = m
	s.etcd = append(s.etcd, m) // stopped by teardown
	s.startEtcdMember(m)
	te.waitHealthy(s)
	return te
}

// waitHealthy waits until a write with the deployer's certificate works.
func (te *tlsEtcd) waitHealthy(s *stack) {
	s.t.Helper()
	cfg := defaultConfig(env())
	cfg.EtcdNodes, cfg.EtcdDialTimeout = []string{te.m.clientURL}, 2*time.Second
	cfg.EtcdCACert, cfg.EtcdCert, cfg.EtcdKey = te.caFile, te.certFile, te.keyFile
	waitFor(s.t, 60*time.Second, "TLS etcd", func() bool {
		if !te.m.proc.running() {
			s.t.Fatalf("TLS etcd exited:\n%s", te.m.proc.tail(20))
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		cli, err := newEtcdClient(ctx, cfg, testLogger(s.t))
		if err != nil {
			return false
		}
		defer cli.Close()
		_, err = cli.Put(ctx, "/e2e-tls-health", "ok")
		return err == nil
	})
}

// runFailing runs a deployer that must exit on its own; it returns its
// exit code, its output and how long it ran.
func (s *stack) runFailing(args ...string) (int, string, time.Duration) {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	start := time.Now()
	out, err := exec.CommandContext(ctx, s.bin, args...).CombinedOutput()
	d := time.Since(start)
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		s.t.Fatalf("deployer %q: %v (want it to exit with an error)\n%s", args, err, out)
	}
	return ee.ExitCode(), string(out), d
}

func TestE2ETLS(t *testing.T) {
	t.Parallel() // a stack of its own; three run at once (make e2e: -parallel 3)
	s := newStackWith(t, 1, 1)
	n := s.nodes[0]
	certDir := filepath.Join(s.dir, "certs")
	if err := os.MkdirAll(certDir, 0o700); err != nil {
		t.Fatal(err)
	}
	ref := s.hub.host() + "/myorg/tlsapp:qa"
	img := s.build(ref, false)
	s.supervise(n, "tlsapp", ref, img)
	deploy := func(t *testing.T, label string) {
		t.Helper()
		img = s.build(ref, false)
		start := time.Now()
		if code, body := s.webhook(n, "myorg/tlsapp", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		s.waitImage([]*node{n}, "tlsapp", img, 90*time.Second)
		s.record("%s: webhook → app on the new image: %v", label, time.Since(start).Round(time.Millisecond))
	}
	// For comparison: the same deploy through the stack's plain etcd.
	deploy(t, "tls 0 (plain etcd, for comparison)")

	te := s.startTLSEtcd(certDir)
	tlsFlags := []string{"-etcd_nodes", te.m.clientURL, "-etcd_cacert", te.caFile, "-etcd_cert", te.certFile, "-etcd_key", te.keyFile}

	logPath := filepath.Join(s.dir, "deployer-"+n.name+".log")
	var offset int64
	if fi, err := os.Stat(logPath); err == nil {
		offset = fi.Size()
	}
	s.restartDeployers(tlsFlags...)
	log, _ := os.ReadFile(logPath)
	if !strings.Contains(string(log[offset:]), `"msg":"docker API version negotiated"`) || !strings.Contains(string(log[offset:]), `"api_version":"1.41"`) {
		t.Errorf("deployer log has no negotiated API version 1.41 for dockerd 20.10:\n%s", n.deployer.tail(20))
	}

	s.record("TLS stack up: 1 node, 1 etcd member with --client-cert-auth, Docker API %s", "1.41")

	t.Run("deploy through TLS etcd", func(t *testing.T) {
		deploy(t, "tls 1 (through TLS etcd)")
		out, err := exec.Command(s.bin, append([]string{"status", "-etcd_prefix", s.prefix}, tlsFlags...)...).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "myorg/tlsapp:qa") {
			t.Errorf("deployer status with the TLS flags: %v\n%s", err, out)
		}
	})

	t.Run("client certificate renewed without a restart", func(t *testing.T) {
		// etcd moves to a new client CA; the deployer's files get a
		// certificate of it. The running deployer must use the new files
		// when it reconnects: the old certificate is refused now.
		newCA := newTestCA(t, "etcd client CA 2")
		cc, ck := newCA.issue(t, "deployer-renewed", false, time.Now().Add(time.Hour))
		te.m.proc.stop(syscall.SIGTERM, 10*time.Second)
		replaceFile(t, te.certFile, cc)
		replaceFile(t, te.keyFile, ck)
		replaceFile(t, te.trustedCAFile, newCA.pem)
		pid := n.deployer.cmd.Process.Pid
		s.startEtcdMember(te.m)
		te.waitHealthy(s)
		deploy(t, "tls 2 (through TLS etcd, after a client-certificate renewal)")
		if n.deployer.cmd.Process.Pid != pid || !n.deployer.running() {
			t.Error("the deployer restarted")
		}
	})

	t.Run("docker over TLS", func(t *testing.T) {
		dn, tcp, certs := s.startTLSDockerd("tlsnode")
		dn.args = append([]string{s.bin,
			"-docker", tcp, "-docker_tls_verify", "-docker_cert_path", certs, "-etcd_prefix", s.prefix,
			"-etcd_retry_delay", "200ms", "-listen", fmt.Sprintf("127.0.0.1:%d", dn.port),
			"-node_name", dn.name, "-webhook_secret", s.secret, "-registry", s.hub.host(), "-kill_timeout", "3",
			"-repull_period", "0", "-dockercfg", "", "-log_format", "json", "-restart_timeout", "20s"}, tlsFlags...)
		s.runDeployer(dn)
		log, _ := os.ReadFile(dn.deployer.log)
		if !strings.Contains(string(log), `"msg":"docker API version negotiated","docker":"`+tcp+`","api_version":"1.41","tls":true`) {
			t.Errorf("deployer log has no negotiation with the TLS dockerd:\n%s", dn.deployer.tail(20))
		}
		s.supervise(dn, "tlsapp", ref, img)
		img = s.build(ref, false)
		start := time.Now()
		if code, body := s.webhook(dn, "myorg/tlsapp", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		s.waitImage([]*node{n, dn}, "tlsapp", img, 90*time.Second)
		s.record("tls 3: webhook → app on the new image on the node of dockerd tcp+--tlsverify and the other node, through TLS etcd: %v", time.Since(start).Round(time.Millisecond))
	})

	t.Run("no client certificate fails naming it", func(t *testing.T) {
		base := []string{"-docker", n.host(), "-etcd_prefix", s.prefix, "-listen", fmt.Sprintf("127.0.0.1:%d", freeTCPPort(t)),
			"-node_name", "nocert", "-webhook_secret", s.secret, "-dockercfg", "", "-etcd_nodes", te.m.clientURL, "-etcd_cacert", te.caFile}
		code, out, d := s.runFailing(base...)
		if code != 1 || !strings.Contains(out, "requires a client certificate and none was given (set -etcd_cert and -etcd_key)") {
			t.Errorf("without -etcd_cert: exit %d after %v:\n%s", code, d, out)
		}
		s.record("tls 4: deployer without a client certificate exits %d after %v: %s", code, d.Round(time.Millisecond), lastLine(out))

		stranger := newTestCA(t, "stranger")
		sc, sk := stranger.issue(t, "stranger", false, time.Now().Add(time.Hour))
		sDir := t.TempDir()
		scf, skf := writeFile(t, sDir, "c.pem", sc), writeFile(t, sDir, "k.pem", sk)
		code, out, d = s.runFailing(append(base, "-etcd_cert", scf, "-etcd_key", skf)...)
		if code != 1 || !strings.Contains(out, "refused the client certificate -etcd_cert "+scf) {
			t.Errorf("with a certificate of another CA: exit %d after %v:\n%s", code, d, out)
		}
		s.record("tls 5: deployer with a client certificate of another CA exits %d after %v: %s", code, d.Round(time.Millisecond), lastLine(out))

		code, out, _ = s.runFailing(append(base, "-etcd_cert", filepath.Join(sDir, "missing.pem"), "-etcd_key", skf)...)
		if code != 1 || !strings.Contains(out, "-etcd_cert "+filepath.Join(sDir, "missing.pem")) {
			t.Errorf("with a missing certificate file: exit %d:\n%s", code, out)
		}
		code, out, _ = s.runFailing("-etcd_nodes=", "-etcd_data_dir", t.TempDir(), "-etcd_listen_client", "http://0.0.0.0:4001")
		if code != 2 || !strings.Contains(out, "-etcd_listen_client") {
			t.Errorf("embedded etcd on 0.0.0.0: exit %d:\n%s", code, out)
		}
	})
}

// startTLSDockerd starts a dockerd that listens on a Unix socket (for the
// supervisor and the test) and on tcp://127.0.0.1 with --tlsverify, as a
// remote daemon on port 2376 does, and returns it as a node with the
// DOCKER_CERT_PATH directory of a client.
func (s *stack) startTLSDockerd(name string) (*node, string, string) {
	s.t.Helper()
	ca := newTestCA(s.t, "docker CA")
	root := filepath.Join(s.dir, name)
	certs := filepath.Join(root, "client-certs")
	if err := os.MkdirAll(certs, 0o700); err != nil {
		s.t.Fatal(err)
	}
	sc, sk := ca.issue(s.t, "dockerd", true, time.Now().Add(time.Hour))
	cc, ck := ca.issue(s.t, "deployer", false, time.Now().Add(time.Hour))
	writeFile(s.t, certs, "ca.pem", ca.pem)
	writeFile(s.t, certs, "cert.pem", cc)
	writeFile(s.t, certs, "key.pem", ck)
	tcp := fmt.Sprintf("tcp://127.0.0.1:%d", freeTCPPort(s.t))
	sock := filepath.Join(root, "docker.sock")
	p := startProc(s.t, s.dir, "dockerd-"+name, nil, "dockerd",
		"-H", "unix://"+sock, "-H", tcp, "--tlsverify",
		"--tlscacert", writeFile(s.t, root, "ca.pem", ca.pem),
		"--tlscert", writeFile(s.t, root, "server.pem", sc), "--tlskey", writeFile(s.t, root, "server-key.pem", sk),
		"--data-root", filepath.Join(root, "data"), "--exec-root", filepath.Join(root, "exec"),
		"--pidfile", filepath.Join(root, "pid"), "--bridge=none", "--iptables=false", "--ip-masq=false")
	cli, err := docker.NewClient("unix://" + sock)
	if err != nil {
		s.t.Fatal(err)
	}
	n := &node{dockerd: &dockerd{name: name, sock: sock, proc: p, cli: cli}, port: freeTCPPort(s.t), sups: map[string]*proc{}}
	s.nodes = append(s.nodes, n) // torn down with the stack
	s.waitDockerd(n.dockerd)
	return n, tcp, certs
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}
