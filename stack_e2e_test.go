//go:build e2e || bench

package main

// The real stack for the end-to-end suite: Docker daemons (one builder and
// the "nodes"), two registries, a three-member etcd cluster, a deployer per
// node, and a supervisor per app container that does what the README's
// systemd unit does. Everything listens on 127.0.0.1 and every container
// runs with --network none. Everything started is stopped in t.Cleanup,
// also when a test fails.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// proc is a process of the stack, in its own process group.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

func startProc(t testing.TB, dir, name string, env []string, argv ...string) *proc {
	t.Helper()
	logPath := filepath.Join(dir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	return p
}

func (p *proc) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// stop sends sig to the process group and waits up to d, then kills it.
func (p *proc) stop(sig syscall.Signal, d time.Duration) {
	if !p.running() {
		return
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, sig)
	select {
	case <-p.done:
	case <-time.After(d):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
}

func (p *proc) tail(n int) string {
	b, _ := os.ReadFile(p.log)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

var (
	portMu   sync.Mutex
	nextPort = 20000 + os.Getpid()%5000
)

// freeTCPPort hands out loopback ports below the kernel's ephemeral range
// (32768 and up), so that no outgoing connection takes one before the
// process meant to listen on it does.
func freeTCPPort(t testing.TB) int {
	t.Helper()
	portMu.Lock()
	defer portMu.Unlock()
	for range 1000 {
		nextPort++
		if nextPort >= 32000 {
			nextPort = 20000
		}
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", nextPort))
		if err == nil {
			ln.Close()
			return nextPort
		}
	}
	t.Fatal("no free port below 32000")
	return 0
}

// pollInterval is how often waitFor looks; the benchmarks lower it.
var pollInterval = 50 * time.Millisecond

// waitFor polls an outside system until cond holds or d passes.
func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	took, ok := pollUntil(d, pollInterval, cond)
	if !ok {
		t.Fatalf("timed out after %v waiting for %s", d, what)
	}
	return took
}

type dockerd struct {
	name string
	sock string
	proc *proc
	cli  *docker.Client
}

func (d *dockerd) host() string { return "unix://" + d.sock }

type registry struct {
	port   int
	config string
	proc   *proc
	dir    string
}

func (r *registry) host() string { return "127.0.0.1:" + strconv.Itoa(r.port) }

type etcdMember struct {
	name            string
	clientURL, peer string
	dataDir         string
	args            []string
	proc            *proc
}

type node struct {
	*dockerd
	port     int
	deployer *proc
	args     []string
	sups     map[string]*proc
}

type stack struct {
	t       testing.TB
	dir     string
	bin     string
	builder *dockerd
	nodes   []*node
	hub     *registry // stands in for Docker Hub: no notifications
	push    *registry // sends notifications to the first node
	etcd    []*etcdMember
	cli     *clientv3.Client
	slack   *slackRecorder
	hook    *webhookRecorder // a generic JSON webhook (-notify)
	secret  string
	prefix  string
	results *os.File
	builds  int
	mu      sync.Mutex
}

// newStack starts everything. It fails the test, never skips, when a piece
// is missing.
func newStack(t testing.TB, nodes int) *stack {
	return newStackWith(t, nodes, 3)
}

// newStackWith starts a stack with the given numbers of nodes and etcd
// members.
func newStackWith(t testing.TB, nodes, members int) *stack {
	if os.Geteuid() != 0 {
		t.Fatal("the end-to-end suite needs root (Docker daemons); run `make test` as root")
	}
	for _, bin := range []string{"dockerd", "docker", "docker-registry", "etcd", "busybox"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s not found: run scripts/install-deps.sh (make test does) first", bin)
		}
	}
	dir, err := os.MkdirTemp("/tmp", "dpl-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	s := &stack{t: t, dir: dir, secret: "e2e-secret", prefix: "/e2e", slack: newSlackRecorder(t), hook: newWebhookRecorder(t)}
	t.Cleanup(func() { s.teardown() })
	if s.results, err = os.OpenFile(resultsPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644); err != nil {
		t.Fatal(err)
	}

	s.bin = filepath.Join(dir, "deployer")
	if out, err := exec.Command("go", "build", "-tags", "e2e", "-o", s.bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}

	var wg sync.WaitGroup
	s.builder = s.startDockerd("builder")
	for i := 1; i <= nodes; i++ {
		s.nodes = append(s.nodes, &node{dockerd: s.startDockerd(fmt.Sprintf("node%d", i)), port: freeTCPPort(t), sups: map[string]*proc{}})
	}
	s.startEtcd(members)
	s.hub = s.startRegistry("hub", "")
	s.push = s.startRegistry("push", fmt.Sprintf("http://127.0.0.1:%d/api/registry/webhook", s.nodes[0].port))
	for _, d := range append([]*dockerd{s.builder}, nodeDaemons(s.nodes)...) {
		wg.Go(func() { s.waitDockerd(d) })
	}
	wg.Wait()
	s.cli = newTestClient(t, s.etcd[0].clientURL)
	for _, n := range s.nodes {
		s.startDeployer(n)
	}
	return s
}

func resultsPath() string {
	if p := os.Getenv("E2E_RESULTS"); p != "" {
		return p
	}
	return filepath.Join(os.TempDir(), "deployer-e2e-results.txt")
}

func nodeDaemons(ns []*node) []*dockerd {
	var out []*dockerd
	for _, n := range ns {
		out = append(out, n.dockerd)
	}
	return out
}

func (s *stack) startDockerd(name string, extra ...string) *dockerd {
	root := filepath.Join(s.dir, name)
	if err := os.MkdirAll(root, 0o755); err != nil {
		s.t.Fatal(err)
	}
	sock := filepath.Join(root, "docker.sock")
	argv := append([]string{"dockerd",
		"-H", "unix://" + sock, "--data-root", filepath.Join(root, "data"), "--exec-root", filepath.Join(root, "exec"),
		"--pidfile", filepath.Join(root, "pid"), "--bridge=none", "--iptables=false", "--ip-masq=false"}, extra...)
	p := startProc(s.t, s.dir, "dockerd-"+name, nil, argv...)
	cli, err := docker.NewClient("unix://" + sock)
	if err != nil {
		s.t.Fatal(err)
	}
	return &dockerd{name: name, sock: sock, proc: p, cli: cli}
}

func (s *stack) waitDockerd(d *dockerd) {
	waitFor(s.t, 60*time.Second, "dockerd "+d.name, func() bool {
		if !d.proc.running() {
			s.t.Fatalf("dockerd %s exited:\n%s", d.name, d.proc.tail(20))
		}
		return d.cli.Ping() == nil
	})
}

func (s *stack) startRegistry(name, notifyURL string) *registry {
	r := &registry{port: freeTCPPort(s.t), dir: filepath.Join(s.dir, "registry-"+name)}
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: 127.0.0.1:%d
`, r.dir, r.port)
	if notifyURL != "" {
		cfg += fmt.Sprintf(`notifications:
  endpoints:
    - name: deployer
      url: %s
      headers:
        Authorization: [Bearer %s]
      timeout: 2s
      threshold: 3
      backoff: 1s
      ignore:
        actions: [pull]
`, notifyURL, s.secret)
	}
	r.config = filepath.Join(s.dir, "registry-"+name+".yml")
	if err := os.WriteFile(r.config, []byte(cfg), 0o644); err != nil {
		s.t.Fatal(err)
	}
	s.startRegistryProc(r, name)
	return r
}

func (s *stack) startRegistryProc(r *registry, name string) {
	r.proc = startProc(s.t, s.dir, "registry-"+name, nil, "docker-registry", "serve", r.config)
	waitFor(s.t, 30*time.Second, "registry "+name, func() bool {
		resp, err := http.Get("http://" + r.host() + "/v2/")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil && resp.StatusCode == 200
	})
}

func (s *stack) startEtcd(n int) {
	var initial []string
	for i := 1; i <= n; i++ {
		m := &etcdMember{
			name:      fmt.Sprintf("m%d", i),
			clientURL: fmt.Sprintf("http://127.0.0.1:%d", freeTCPPort(s.t)),
			peer:      fmt.Sprintf("http://127.0.0.1:%d", freeTCPPort(s.t)),
			dataDir:   filepath.Join(s.dir, fmt.Sprintf("etcd-m%d", i)),
		}
		s.etcd = append(s.etcd, m)
		initial = append(initial, m.name+"="+m.peer)
	}
	for _, m := range s.etcd {
		m.args = []string{"etcd", "--name", m.name, "--data-dir", m.dataDir,
			"--listen-client-urls", m.clientURL, "--advertise-client-urls", m.clientURL,
			"--listen-peer-urls", m.peer, "--initial-advertise-peer-urls", m.peer,
			"--initial-cluster", strings.Join(initial, ","), "--initial-cluster-state", "new",
			"--initial-cluster-token", "deployer-e2e", "--heartbeat-interval", "50", "--election-timeout", "500"}
		s.startEtcdMember(m)
	}
	s.waitEtcdHealthy()
}

func (s *stack) startEtcdMember(m *etcdMember) {
	m.proc = startProc(s.t, s.dir, "etcd-"+m.name, nil, m.args...)
}

func (s *stack) etcdEndpoints() string {
	var eps []string
	for _, m := range s.etcd {
		eps = append(eps, m.clientURL)
	}
	return strings.Join(eps, ",")
}

// waitEtcdHealthy waits until a quorum write works.
func (s *stack) waitEtcdHealthy() {
	cli := newTestClient(s.t, strings.Split(s.etcdEndpoints(), ",")...)
	waitFor(s.t, 60*time.Second, "etcd quorum", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := cli.Put(ctx, "/e2e-health", "ok")
		return err == nil
	})
}

func (s *stack) startDeployer(n *node) {
	n.args = []string{s.bin,
		"-docker", n.host(), "-etcd_nodes", s.etcdEndpoints(), "-etcd_prefix", s.prefix,
		"-etcd_retry_delay", "200ms", "-listen", fmt.Sprintf("127.0.0.1:%d", n.port),
		"-node_name", n.name, "-webhook_secret", s.secret, "-slack_webhook_url", s.slack.URL, "-notify", s.hook.genericURL(),
		"-registry", s.hub.host(), "-kill_timeout", "3", "-repull_period", "0", "-dockercfg", "",
		"-log_format", "json", "-restart_timeout", "20s",
		// The scenarios of halts test the halt itself; those of the
		// auto-rollback turn it on.
		"-auto_rollback=false"}
	s.runDeployer(n)
}

// restartDeployers restarts every node's deployer with extra flags.
func (s *stack) restartDeployers(extra ...string) {
	for _, n := range s.nodes {
		n.deployer.stop(syscall.SIGTERM, 15*time.Second)
		n.args = append(n.args[:len(n.args):len(n.args)], extra...)
		s.runDeployer(n)
	}
}

// runDeployer starts node n's deployer and waits until it answers and its
// watch has started (a line of this process's log: the file is appended
// to across restarts).
func (s *stack) runDeployer(n *node) {
	logPath := filepath.Join(s.dir, "deployer-"+n.name+".log")
	var offset int64
	if fi, err := os.Stat(logPath); err == nil {
		offset = fi.Size()
	}
	n.deployer = startProc(s.t, s.dir, "deployer-"+n.name, []string{"DEPLOYER_E2E_HOLD_REPORTS=" + s.holdReports()}, n.args...)
	waitFor(s.t, 30*time.Second, "deployer on "+n.name, func() bool {
		if !n.deployer.running() {
			s.t.Fatalf("deployer on %s exited:\n%s", n.name, n.deployer.tail(20))
		}
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/healthz", n.port))
		if err != nil {
			return false
		}
		resp.Body.Close()
		data, _ := os.ReadFile(logPath)
		return resp.StatusCode == 200 && int64(len(data)) > offset && strings.Contains(string(data[offset:]), "etcd watch")
	})
}

func (s *stack) teardown() {
	for _, n := range s.nodes {
		for _, p := range n.sups {
			p.stop(syscall.SIGTERM, 5*time.Second)
		}
		if n.deployer != nil {
			n.deployer.stop(syscall.SIGKILL, time.Second)
		}
	}
	if s.t.Failed() {
		for _, n := range s.nodes {
			if n.deployer != nil {
				s.t.Logf("deployer %s log:\n%s", n.name, n.deployer.tail(40))
			}
		}
		if s.push != nil {
			s.t.Logf("push registry log:\n%s", s.push.proc.tail(20))
		}
	}
	var daemons []*dockerd
	if s.builder != nil {
		daemons = append(daemons, s.builder)
	}
	daemons = append(daemons, nodeDaemons(s.nodes)...)
	for _, d := range daemons {
		if d.cli != nil {
			if cs, err := d.cli.ListContainers(docker.ListContainersOptions{All: true}); err == nil {
				for _, c := range cs {
					_ = d.cli.RemoveContainer(docker.RemoveContainerOptions{ID: c.ID, Force: true})
				}
			}
		}
		d.proc.stop(syscall.SIGTERM, 15*time.Second)
	}
	for _, r := range []*registry{s.hub, s.push} {
		if r != nil && r.proc != nil {
			r.proc.stop(syscall.SIGTERM, 5*time.Second)
		}
	}
	for _, m := range s.etcd {
		if m.proc != nil {
			m.proc.stop(syscall.SIGTERM, 5*time.Second)
		}
	}
	if s.results != nil {
		s.results.Close()
	}
	// Docker leaves mounts under its data roots; unmount before removing.
	if out, err := exec.Command("sh", "-c", "grep -o ' "+s.dir+"[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l").CombinedOutput(); err != nil {
		s.t.Logf("umount: %v %s", err, out)
	}
	if os.Getenv("E2E_KEEP") == "" {
		os.RemoveAll(s.dir)
	}
}

// dockerCLI runs the docker command line against one daemon.
func (s *stack) dockerCLI(d *dockerd, args ...string) string {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "docker", args...)
	cmd.Env = append(os.Environ(), "DOCKER_HOST="+d.host(), "DOCKER_BUILDKIT=0", "DOCKER_CLI_HINTS=false")
	out, err := cmd.CombinedOutput()
	if err != nil {
		s.t.Fatalf("docker %s on %s: %v\n%s", strings.Join(args, " "), d.name, err, out)
	}
	return strings.TrimSpace(string(out))
}

// build makes a new version of an image on the builder and pushes it.
// stubborn images ignore SIGTERM, so a stop takes the whole kill timeout.
func (s *stack) build(ref string, stubborn bool) string {
	kind := "app"
	if stubborn {
		kind = "stubborn"
	}
	return s.buildKind(ref, kind)
}

// buildKind builds one of: app (exits on SIGTERM), stubborn (ignores it),
// broken (exits with status 1 at once), idle (sleeps, using no CPU).
func (s *stack) buildKind(ref, kind string) string {
	s.t.Helper()
	cmd := map[string]string{
		"app":      `trap 'exit 0' TERM; while true; do /bin/busybox sleep 0.2; done`,
		"stubborn": `while true; do /bin/busybox sleep 0.2; done`,
		"broken":   `echo broken >&2; exit 1`,
		"idle":     `exec /bin/busybox sleep 86400`, // no CPU while it runs
	}[kind]
	return s.buildImage(ref, fmt.Sprintf("CMD [\"/bin/busybox\",\"sh\",\"-c\",%q]\n", cmd))
}

// buildImage builds a new version of ref FROM scratch with a static
// busybox and a version file unique to this build, the Dockerfile's lines
// after those in tail, pushes it, and returns its image ID.
func (s *stack) buildImage(ref, tail string) string {
	s.t.Helper()
	s.mu.Lock()
	s.builds++
	n := s.builds
	s.mu.Unlock()
	ctxDir := filepath.Join(s.dir, fmt.Sprintf("build-%d", n))
	if err := os.MkdirAll(ctxDir, 0o755); err != nil {
		s.t.Fatal(err)
	}
	bb, err := exec.LookPath("busybox")
	if err != nil {
		s.t.Fatal(err)
	}
	if out, err := exec.Command("cp", bb, filepath.Join(ctxDir, "busybox")).CombinedOutput(); err != nil {
		s.t.Fatalf("cp busybox: %v %s", err, out)
	}
	dockerfile := "FROM scratch\nCOPY busybox /bin/busybox\nCOPY version /version\n" + tail
	files := map[string]string{"Dockerfile": dockerfile, "version": fmt.Sprintf("%s build %d %d\n", ref, n, time.Now().UnixNano())}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(ctxDir, name), []byte(body), 0o644); err != nil {
			s.t.Fatal(err)
		}
	}
	s.dockerCLI(s.builder, "build", "-q", "-t", ref, ctxDir)
	s.dockerCLI(s.builder, "push", "-q", ref)
	img, err := s.builder.cli.InspectImage(ref)
	if err != nil {
		s.t.Fatal(err)
	}
	return img.ID
}

// supervise starts the supervisor for container name on node n and waits
// until it runs image ID want.
func (s *stack) supervise(n *node, name, ref, want string, runOpts ...string) {
	s.t.Helper()
	abs, _ := filepath.Abs("scripts/supervise.sh")
	n.sups[name] = startProc(s.t, s.dir, "sup-"+n.name+"-"+name, []string{"DOCKER_HOST=" + n.host()}, append([]string{abs, name, ref}, runOpts...)...)
	s.waitImage([]*node{n}, name, want, 60*time.Second)
}

// containerImage returns the container's ID and image ID when it runs.
func (s *stack) containerImage(n *node, name string) (id, image string) {
	c, err := n.cli.InspectContainerWithOptions(docker.InspectContainerOptions{ID: name})
	if err != nil || !c.State.Running {
		return "", ""
	}
	return c.ID, c.Image
}

// waitImage waits until container name runs image want on every node and
// returns how long that took.
func (s *stack) waitImage(ns []*node, name, want string, d time.Duration) time.Duration {
	s.t.Helper()
	return waitFor(s.t, d, fmt.Sprintf("%s on %s to run %s", name, nodeNames(ns), shortID(want)), func() bool {
		for _, n := range ns {
			if _, img := s.containerImage(n, name); img != want {
				return false
			}
		}
		return true
	})
}

func nodeNames(ns []*node) string {
	var names []string
	for _, n := range ns {
		names = append(names, n.name)
	}
	return strings.Join(names, ",")
}

// webhook posts a Docker Hub webhook to node n.
func (s *stack) webhook(n *node, repo, tag string) (int, string) {
	return s.postHook(n, "/api/dockerhub/webhook", "Bearer "+s.secret, hubBody(repo, tag))
}

func (s *stack) postHook(n *node, path, auth, body string) (int, string) {
	s.t.Helper()
	req, _ := http.NewRequest("POST", fmt.Sprintf("http://127.0.0.1:%d%s", n.port, path), strings.NewReader(body))
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// metric returns the sum of a deployer metric's samples whose label set
// contains match, from node n's /metrics.
func (s *stack) metric(n *node, name, match string) float64 {
	s.t.Helper()
	req, _ := http.NewRequest("GET", fmt.Sprintf("http://127.0.0.1:%d/metrics", n.port), nil)
	req.Header.Set("Authorization", "Bearer "+s.secret)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatalf("metrics of %s: %v", n.name, err)
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) || !strings.Contains(line, match) {
			continue
		}
		rest := strings.TrimPrefix(line, name)
		if rest != "" && rest[0] != '{' && rest[0] != ' ' {
			continue
		}
		f := strings.Fields(line)
		v, _ := strconv.ParseFloat(f[len(f)-1], 64)
		sum += v
	}
	return sum
}

// barrier sends a trigger for a repository no node has and waits until
// every running deployer has handled it and has nothing queued: the watch
// delivers triggers in order, so everything before it is done too.
func (s *stack) barrier(ns []*node) {
	s.t.Helper()
	before := map[*node]float64{}
	for _, n := range ns {
		before[n] = s.metric(n, "deployer_deploys_total", "")
	}
	if code, body := s.webhook(ns[0], "barrier/none", ""); code != 200 {
		s.t.Fatalf("barrier webhook: %d %s", code, body)
	}
	waitFor(s.t, 30*time.Second, "barrier", func() bool {
		for _, n := range ns {
			if s.metric(n, "deployer_deploys_total", "") <= before[n] || s.metric(n, "deployer_deploy_queue_repositories", "") != 0 {
				return false
			}
		}
		return true
	})
}

// slackTexts returns the texts of every Slack message so far.
func (s *stack) slackTexts() []string {
	s.slack.mu.Lock()
	defer s.slack.mu.Unlock()
	var out []string
	for _, p := range s.slack.payloads {
		text, _ := p["text"].(string)
		out = append(out, text)
	}
	return out
}

// holdReports is a file that, while it exists, holds every deployer's
// rollout report between its claim and its send (hook_e2e.go).
func (s *stack) holdReports() string { return filepath.Join(s.dir, "hold-reports") }

// rolloutReports returns the rollout reports among the Slack messages
// after index slackFrom and the generic webhook's bodies after hookFrom
// that contain every one of want.
func (s *stack) rolloutReports(slackFrom, hookFrom int, want ...string) (slack []string, hook []map[string]string) {
	has := func(text string) bool {
		for _, w := range want {
			if !strings.Contains(text, w) {
				return false
			}
		}
		return true
	}
	for _, text := range s.slackTexts()[slackFrom:] {
		if (strings.HasPrefix(text, "Rolled out ") || strings.HasPrefix(text, ":x: Rollout ")) && has(text) {
			slack = append(slack, text)
		}
	}
	for _, b := range s.hook.got()[hookFrom:] {
		if b["kind"] == "rollout" && has(b["message"]) {
			hook = append(hook, b)
		}
	}
	return slack, hook
}

// waitReports waits for a rollout report with all of want on Slack and on
// the generic webhook.
func (s *stack) waitReports(slackFrom, hookFrom int, want ...string) {
	s.t.Helper()
	waitFor(s.t, 60*time.Second, fmt.Sprintf("a rollout report %q on Slack and the webhook", want), func() bool {
		sl, hk := s.rolloutReports(slackFrom, hookFrom, want...)
		return len(sl) > 0 && len(hk) > 0
	})
}

// waitReportsOnce waits for the report as waitReports does; then, past
// the window in which another node could still send one
// (reportTakeover), checks that each service got exactly one, and
// returns its text.
func (s *stack) waitReportsOnce(slackFrom, hookFrom int, want ...string) string {
	s.t.Helper()
	s.waitReports(slackFrom, hookFrom, want...)
	// An observation window, not a synchronisation: a second report
	// would come within the takeover of the first.
	time.Sleep(reportTakeover + time.Second)
	sl, hk := s.rolloutReports(slackFrom, hookFrom, want...)
	if len(sl) != 1 || len(hk) != 1 {
		s.t.Errorf("rollout reports %q: %d on Slack %q, %d on the webhook; want one each", want, len(sl), sl, len(hk))
	}
	return sl[0]
}
