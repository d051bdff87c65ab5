//go:build bench

package main

// BenchmarkFleet: N simulated nodes in one process, each the daemon's own
// wiring (newDaemon: watcher, deploy queue, rollout slots and halts,
// status and down records, progress, ledger, node claim, its own etcd
// client) against a real 3-member etcd cluster (Debian's etcd on
// loopback). The one fake is Docker: fleetDocker, the unit tests'
// in-memory Docker whose stop-and-replace takes a fixed time.
//
// BENCH_FLEET_N (default 100,300,1000) says which fleet sizes run, each on
// a fresh etcd cluster, each writing its own section of BENCHMARKS.md;
// BENCH_FLEET_ROLLOUTS (default 100) how many rollouts run before the
// database and memory are measured; BENCH_FLEET_IDLE (default 30s) the
// idle window.

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"
)

// fleetReplace is how long the stand-in takes to stop a container and
// have its supervisor run the replacement.
const fleetReplace = 200 * time.Millisecond

const (
	fleetSecret = "fleet-secret"
	fleetRef    = "127.0.0.1:5000/bench/app:qa"
	fleetPrefix = "/fleet"
)

// fleetDocker is the Docker stand-in: fakeDocker (helpers_test.go), with
// a supervisor, whose stop takes replace before the replacement runs.
type fleetDocker struct {
	*fakeDocker
	replace time.Duration
}

func (f *fleetDocker) StopContainerWithContext(id string, timeout uint, ctx context.Context) error {
	t := time.NewTimer(f.replace)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
		return ctx.Err()
	}
	return f.fakeDocker.StopContainerWithContext(id, timeout, ctx)
}

// runs reports whether the app container runs image id.
func (f *fleetDocker) runs(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.containers {
		if c.Name == "app" && c.Running && c.ImageID == id {
			return true
		}
	}
	return false
}

func (f *fleetDocker) push(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.remote[fleetRef] = id
}

type fleetNode struct {
	name string
	dock *fleetDocker
	d    *daemon
	cli  *clientv3.Client
	stop context.CancelFunc
	done chan error
}

type fleet struct {
	b     *testing.B
	n     int
	s     *stack // its etcd members only
	ctl   *clientv3.Client
	nodes []*fleetNode
	logf  *os.File
	warns atomic.Int64

	mu   sync.Mutex
	seen map[int64][]time.Time // trigger revision -> when each node's watcher handed it on

	// notify records the rollout reports (-notify), as a team's chat
	// would receive them: the reporters' election runs as in production.
	notify  *httptest.Server
	reports atomic.Int64
}

func fleetImage(k int) string { return fmt.Sprintf("sha256:%064x", k+1) }

// newFleet starts a 3-member etcd cluster for n nodes.
func newFleet(b *testing.B, n int) *fleet {
	dir, err := os.MkdirTemp("/tmp", "dpl-fleet-")
	if err != nil {
		b.Fatal(err)
	}
	s := &stack{t: b, dir: dir}
	b.Cleanup(s.teardown)
	s.startEtcd(3)
	fl := &fleet{b: b, n: n, s: s, seen: map[int64][]time.Time{}}
	fl.notify = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if body, _ := io.ReadAll(r.Body); strings.Contains(string(body), "Rolled out") {
			fl.reports.Add(1)
		}
	}))
	b.Cleanup(fl.notify.Close)
	fl.ctl = newTestClient(b, strings.Split(s.etcdEndpoints(), ",")...)
	if fl.logf, err = os.Create(filepath.Join(os.TempDir(), fmt.Sprintf("deployer-fleet-%d.log", n))); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { fl.logf.Close() })
	for i := range n {
		f := newFakeDocker()
		f.supervise = true
		f.local[fleetRef], f.remote[fleetRef] = fleetImage(0), fleetImage(0)
		f.addContainer("app", fleetRef)
		fl.nodes = append(fl.nodes, &fleetNode{name: fmt.Sprintf("node%04d", i), dock: &fleetDocker{fakeDocker: f, replace: fleetReplace}})
	}
	return fl
}

// warnHandler writes warnings and errors to the fleet's log and counts them.
type warnHandler struct {
	slog.Handler
	n *atomic.Int64
}

func (h warnHandler) Handle(ctx context.Context, r slog.Record) error {
	h.n.Add(1)
	return h.Handler.Handle(ctx, r)
}

func (h warnHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return warnHandler{h.Handler.WithAttrs(as), h.n}
}

func (h warnHandler) WithGroup(g string) slog.Handler {
	return warnHandler{h.Handler.WithGroup(g), h.n}
}

// start starts every node's daemon with -max_unavailable m.
func (fl *fleet) start(m int) {
	var g errgroup.Group
	g.SetLimit(32)
	for _, n := range fl.nodes {
		g.Go(func() error { return fl.startNode(n, m) })
	}
	if err := g.Wait(); err != nil {
		fl.b.Fatal(err)
	}
}

func (fl *fleet) startNode(n *fleetNode, m int) error {
	cfg, err := parseFlags("deployer", []string{
		"-listen", "127.0.0.1:0", "-node_name", n.name, "-etcd_nodes", fl.s.etcdEndpoints(), "-etcd_prefix", fleetPrefix,
		"-dockercfg", "", "-registry", "127.0.0.1:5000", "-repull_period", "0", "-webhook_secret", fleetSecret,
		"-max_unavailable", strconv.Itoa(m), "-kill_timeout", "3",
		"-notify", "generic://" + strings.TrimPrefix(fl.notify.URL, "http://") + "/hook?template=json&disabletls=yes",
	}, func(string) string { return "" }, io.Discard)
	if err != nil {
		return err
	}
	log := slog.New(warnHandler{slog.NewJSONHandler(fl.logf, &slog.HandlerOptions{Level: slog.LevelWarn}).WithAttrs([]slog.Attr{slog.String("node", n.name)}), &fl.warns})
	ctx, cancel := context.WithCancel(context.Background())
	cli, err := newEtcdClient(ctx, cfg, log)
	if err != nil {
		cancel()
		return err
	}
	d, err := newDaemon(cfg, cli, n.dock, log)
	if err != nil {
		cancel()
		return err
	}
	emit := d.watcher.emit
	d.watcher.emit = func(repo string, ev deployEvent) {
		fl.mu.Lock()
		fl.seen[ev.Rev] = append(fl.seen[ev.Rev], time.Now())
		fl.mu.Unlock()
		emit(repo, ev)
	}
	n.d, n.cli, n.stop, n.done = d, cli, cancel, make(chan error, 1)
	go func() { n.done <- d.run(ctx) }()
	select {
	case <-d.ready:
	case err := <-n.done:
		return fmt.Errorf("%s exited: %w", n.name, err)
	}
	select {
	case <-d.watcher.watching:
		return nil
	case <-time.After(2 * time.Minute):
		return fmt.Errorf("%s: watcher not started within 2 minutes", n.name)
	}
}

// stopAll stops every daemon and closes its etcd client.
func (fl *fleet) stopAll() {
	var wg sync.WaitGroup
	for _, n := range fl.nodes {
		if n.d == nil {
			continue
		}
		wg.Go(func() {
			n.stop()
			<-n.done
			n.cli.Close()
			n.d = nil
		})
	}
	wg.Wait()
}

// idle waits until no node has a deploy queued or running and every
// ledger has written what it was handed.
func (fl *fleet) idle(d time.Duration) bool {
	_, ok := pollUntil(d, 50*time.Millisecond, func() bool {
		for _, n := range fl.nodes {
			n.d.queue.mu.Lock()
			busy := len(n.d.queue.repos)
			n.d.queue.mu.Unlock()
			if busy > 0 || len(n.d.ledger.entries) > 0 {
				return false
			}
		}
		return true
	})
	if ok {
		time.Sleep(time.Second) // the last ledger write and status records in flight: no event to wait on
	}
	return ok
}

// hook posts a Docker Hub webhook for repo:qa to node i; it returns the
// trigger's revision.
func (fl *fleet) hook(i int, repo string) int64 {
	req, _ := http.NewRequest("POST", "http://"+fl.nodes[i].d.listener.Addr().String()+"/api/dockerhub/webhook", strings.NewReader(hubBody(repo, "qa")))
	req.Header.Set("Authorization", "Bearer "+fleetSecret)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fl.b.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		fl.b.Fatalf("webhook: %d %s", resp.StatusCode, body)
	}
	var t triggered
	_ = json.Unmarshal(body, &t)
	return t.Revision
}

// fanOut posts k triggers of a repository no node runs, one after the
// other, and returns, for every node and trigger, the time from the post
// until the node's watcher handed the trigger on.
func (fl *fleet) fanOut(k int) []time.Duration {
	var out []time.Duration
	for i := range k {
		start := time.Now()
		rev := fl.hook(i%fl.n, "bench/fanout")
		_, ok := pollUntil(30*time.Second, 5*time.Millisecond, func() bool {
			fl.mu.Lock()
			defer fl.mu.Unlock()
			return len(fl.seen[rev]) >= fl.n
		})
		fl.mu.Lock()
		for _, t := range fl.seen[rev] {
			out = append(out, t.Sub(start))
		}
		fl.mu.Unlock()
		if !ok {
			fl.b.Logf("fan-out %d: %d of %d nodes saw the trigger within 30s", i, len(fl.seen[rev]), fl.n)
		}
		fl.idle(time.Minute)
	}
	return out
}

// rollout pushes image k to every node and posts its trigger; it returns
// how long until every node runs it (or how many did, when limit passed
// first).
func (fl *fleet) rollout(k int, limit time.Duration) (time.Duration, int) {
	id := fleetImage(k)
	for _, n := range fl.nodes {
		n.dock.push(id)
	}
	start := time.Now()
	fl.hook(k%fl.n, "bench/app")
	count := func() int {
		c := 0
		for _, n := range fl.nodes {
			if n.dock.runs(id) {
				c++
			}
		}
		return c
	}
	_, ok := pollUntil(limit, 20*time.Millisecond, func() bool { return count() == fl.n })
	took := time.Since(start)
	if !ok {
		return took, count()
	}
	return took, fl.n
}

// etcdStats is a scrape of every member's /metrics, summed.
type etcdStats map[string]float64

func (fl *fleet) etcdStats() etcdStats {
	out := etcdStats{}
	for _, m := range fl.s.etcd {
		resp, err := http.Get(m.clientURL + "/metrics")
		if err != nil {
			fl.b.Fatal(err)
		}
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			if strings.HasPrefix(line, "#") {
				continue
			}
			i := strings.LastIndexByte(line, ' ')
			if i < 0 {
				continue
			}
			v, err := strconv.ParseFloat(line[i+1:], 64)
			if err != nil {
				continue
			}
			name, labels, _ := strings.Cut(line[:i], "{")
			switch name {
			case "grpc_server_handled_total":
				if strings.Contains(labels, `grpc_type="unary"`) {
					out["unary"] += v
					out["unary:"+label(labels, "grpc_method")] += v
				}
			case "grpc_server_msg_received_total":
				if m := label(labels, "grpc_method"); m == "Watch" || m == "LeaseKeepAlive" {
					out["recv:"+m] += v
				}
			case "etcd_debugging_mvcc_events_total", "etcd_debugging_mvcc_watcher_total":
				out[name] += v
			case "etcd_mvcc_db_total_size_in_bytes", "etcd_debugging_mvcc_keys_total", "etcd_mvcc_db_total_size_in_use_in_bytes":
				out[name] = max(out[name], v)
			}
		}
		resp.Body.Close()
	}
	return out
}

func label(labels, name string) string {
	_, rest, ok := strings.Cut(labels, name+`="`)
	if !ok {
		return ""
	}
	v, _, _ := strings.Cut(rest, `"`)
	return v
}

// requests are the client requests between two scrapes: unary calls and
// watch messages (creates and cancels), keepalives left out.
func requests(a, b etcdStats) float64 {
	return b["unary"] - a["unary"] + b["recv:Watch"] - a["recv:Watch"]
}

// breakdown lists the unary calls between two scrapes by method.
func breakdown(a, b etcdStats, per float64) string {
	var parts []string
	for k, v := range b {
		if m, ok := strings.CutPrefix(k, "unary:"); ok && v-a[k] > 0 {
			parts = append(parts, fmt.Sprintf("%s %.1f", m, (v-a[k])/per))
		}
	}
	if w := b["recv:Watch"] - a["recv:Watch"]; w > 0 {
		parts = append(parts, fmt.Sprintf("Watch %.1f", w/per))
	}
	slices.Sort(parts)
	return strings.Join(parts, ", ")
}

// memory is this process's resident memory and live heap, after a GC.
func memory() (rss, heap float64) {
	runtime.GC()
	debug.FreeOSMemory()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	_, kib := procStats(os.Getpid())
	return float64(kib) * 1024, float64(ms.HeapAlloc)
}

func etcdRSS(fl *fleet) (rss float64, cpu time.Duration) {
	for _, m := range fl.s.etcd {
		c, kib := procStats(m.proc.cmd.Process.Pid)
		rss += float64(kib) * 1024
		cpu += c
	}
	return rss, cpu
}

func mib(b float64) string { return fmt.Sprintf("%.1f MiB", b/(1<<20)) }

func fleetSizes() []int {
	s := cmp.Or(os.Getenv("BENCH_FLEET_N"), "100,300,1000")
	var out []int
	for _, f := range strings.Split(s, ",") {
		if n, err := strconv.Atoi(strings.TrimSpace(f)); err == nil && n > 0 {
			out = append(out, n)
		}
	}
	return out
}

func envInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n > 0 {
		return n
	}
	return def
}

func BenchmarkFleet(b *testing.B) {
	idle := 30 * time.Second
	if d, err := time.ParseDuration(os.Getenv("BENCH_FLEET_IDLE")); err == nil && d > 0 {
		idle = d
	}
	rollouts := envInt("BENCH_FLEET_ROLLOUTS", 100)
	for _, n := range fleetSizes() {
		b.Run(strconv.Itoa(n), func(b *testing.B) { benchFleet(b, n, idle, rollouts) })
	}
}

func benchFleet(b *testing.B, n int, idleFor time.Duration, rollouts int) {
	began := time.Now()
	fl := newFleet(b, n)
	rss0, heap0 := memory()
	g0 := runtime.NumGoroutine()
	st0 := fl.etcdStats()
	fl.start(1)
	defer fl.stopAll()
	if !fl.idle(2 * time.Minute) {
		b.Fatal("not idle after the start")
	}
	st1 := fl.etcdStats()
	rss1, heap1 := memory()
	g1 := runtime.NumGoroutine()
	b.Logf("%d nodes started in %v", n, time.Since(began).Round(time.Second))

	// Idle.
	cpuA, _ := procStats(os.Getpid())
	_, ecpuA := etcdRSS(fl)
	stIdleA := fl.etcdStats()
	time.Sleep(idleFor) // the idle window: nothing to wait for
	cpuB, _ := procStats(os.Getpid())
	_, ecpuB := etcdRSS(fl)
	stIdleB := fl.etcdStats()
	perMin := float64(time.Minute) / float64(idleFor)

	// Fan-out.
	fan := fl.fanOut(10)

	type rolled struct {
		label     string
		m         int
		took      time.Duration
		done      int
		ideal     time.Duration
		req       float64
		events    float64
		breakdown string
	}
	var rs []rolled
	k := 0
	for _, mu := range []struct {
		label string
		pct   int
	}{{"1", 0}, {"10 %", 10}, {"50 %", 50}} {
		m := 1
		if mu.pct > 0 {
			m = max(1, n*mu.pct/100)
			fl.stopAll()
			fl.start(m)
			fl.idle(2 * time.Minute)
		}
		ideal := time.Duration(math.Ceil(float64(n)/float64(m))) * fleetReplace
		a := fl.etcdStats()
		k++
		took, done := fl.rollout(k, max(3*ideal, 2*time.Minute))
		if !fl.idle(5 * time.Minute) {
			b.Logf("rollout at %d not idle within 5 minutes", m)
		}
		z := fl.etcdStats()
		rs = append(rs, rolled{mu.label, m, took, done, ideal, requests(a, z), z["etcd_debugging_mvcc_events_total"] - a["etcd_debugging_mvcc_events_total"], breakdown(a, z, float64(n))})
		b.Logf("rollout at max_unavailable %d: %v (%d of %d), ideal %v, %.1f requests per node", m, took, done, n, ideal, requests(a, z)/float64(n))
	}
	// More rollouts (at 50 %), then the database and the memory.
	for k < rollouts {
		k++
		if _, done := fl.rollout(k, 5*time.Minute); done < n {
			b.Logf("rollout %d: %d of %d nodes", k, done, n)
		}
		fl.idle(5 * time.Minute)
	}
	stEnd := fl.etcdStats()
	eRSS, _ := etcdRSS(fl)
	rss2, heap2 := memory()

	per := float64(n)
	rows := [][]string{
		{"trigger fan-out (webhook → every node's watcher has it), p50 / p99 / max",
			fmt.Sprintf("%v / %v / %v", ms(percentile(fan, 0.5)), ms(percentile(fan, 0.99)), ms(slices.Max(fan)))},
	}
	for _, r := range rs {
		status := fmt.Sprintf("%v", r.took.Round(100*time.Millisecond))
		if r.done < n {
			status = fmt.Sprintf("not done: %d of %d nodes after %v", r.done, n, r.took.Round(time.Second))
		}
		rows = append(rows, []string{fmt.Sprintf("rollout of one tag, max_unavailable %s (%d): time, ideal, ratio", r.label, r.m),
			fmt.Sprintf("%s, %v, **%.2f×**", status, r.ideal, float64(r.took)/float64(r.ideal))})
	}
	for _, r := range rs {
		rows = append(rows, []string{fmt.Sprintf("etcd requests per node per rollout at %s (total)", r.label),
			fmt.Sprintf("**%.1f** (%.0f): %s", r.req/per, r.req, r.breakdown)})
	}
	for _, r := range rs {
		rows = append(rows, []string{fmt.Sprintf("watch events delivered per rollout at %s (per node)", r.label),
			fmt.Sprintf("%.0f (%.1f)", r.events, r.events/per)})
	}
	rows = append(rows,
		[]string{"etcd requests per node at start", fmt.Sprintf("%.1f: %s", requests(st0, st1)/per, breakdown(st0, st1, per))},
		[]string{fmt.Sprintf("etcd after %d rollouts: db size (in use), keys, resident memory of the 3 members", k),
			fmt.Sprintf("%s (%s), %.0f, %s", mib(stEnd["etcd_mvcc_db_total_size_in_bytes"]), mib(stEnd["etcd_mvcc_db_total_size_in_use_in_bytes"]),
				stEnd["etcd_debugging_mvcc_keys_total"], mib(eRSS))},
		[]string{"deployer memory per node: resident, live heap, goroutines (after the start)",
			fmt.Sprintf("%s, %s, %.0f", mib((rss1-rss0)/per), mib((heap1-heap0)/per), float64(g1-g0)/per)},
		[]string{fmt.Sprintf("deployer memory per node after %d rollouts: resident, live heap", k),
			fmt.Sprintf("%s, %s", mib((rss2-rss0)/per), mib((heap2-heap0)/per))},
		[]string{"idle, per node per minute: deployer CPU, etcd CPU (3 members), etcd requests, lease keepalives",
			fmt.Sprintf("%.2f ms, %.2f ms, %.2f, %.1f", float64(cpuB-cpuA)/float64(time.Millisecond)*perMin/per,
				float64(ecpuB-ecpuA)/float64(time.Millisecond)*perMin/per, requests(stIdleA, stIdleB)*perMin/per,
				(stIdleB["recv:LeaseKeepAlive"]-stIdleA["recv:LeaseKeepAlive"])*perMin/per)},
		[]string{"rollout reports received (-notify), for rollouts", fmt.Sprintf("%d for %d", fl.reports.Load(), k)},
		[]string{"warnings and errors logged by the daemons", strconv.FormatInt(fl.warns.Load(), 10)},
		[]string{"wall time of the benchmark", time.Since(began).Round(time.Second).String()},
	)
	section(b, fmt.Sprintf("8-%d. Fleet simulation: %d nodes on one 3-member etcd", n, n),
		fmt.Sprintf("BenchmarkFleet: %d simulated nodes in one process, each the daemon as newDaemon wires it (watcher, deploy queue, rollout slots and halts, "+
			"status and down records, progress, ledger, holds, canary and auto-rollback loops, rollout reports to a local -notify recorder, node claim, its own etcd client), against 3 Debian etcd members on loopback "+
			"(--heartbeat-interval 50 --election-timeout 500, otherwise defaults). The one fake is Docker: an in-memory stand-in whose "+
			"stop-and-replace takes %v. One app container per node from one tag; a rollout is a push of a new image and one webhook. "+
			"Requests are etcd's own counts (grpc_server_handled_total of unary calls plus Watch stream messages, summed over the members; "+
			"lease keepalives apart); watch events are etcd_debugging_mvcc_events_total. Memory per node is this process's growth divided by N. "+
			"The machine's 2 cores are shared with other work: times are noisy. Idle window %v; fan-out over 10 triggers.", n, fleetReplace, idleFor),
		[]string{"figure", "value"}, rows)
}
