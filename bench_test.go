//go:build bench

package main

// Benchmarks on the real stack (make bench): each figure next to its
// baseline, repeated BENCH_RUNS times (default 5), median and spread. Run
// with -benchtime=1x: every benchmark runs its own repetitions. Each one
// appends a Markdown section to $BENCH_OUT; make bench assembles
// BENCHMARKS.md from it.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
)

func benchRuns() int {
	if n, err := strconv.Atoi(os.Getenv("BENCH_RUNS")); err == nil && n > 0 {
		return n
	}
	return 5
}

// spread formats the median and the range of a sample.
func spread(ds []time.Duration) string {
	if len(ds) == 0 {
		return "-"
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return fmt.Sprintf("%v (%v–%v)", ms(median(s)), ms(s[0]), ms(s[len(s)-1]))
}

func median(s []time.Duration) time.Duration {
	s = slices.Clone(s)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func percentile(s []time.Duration, p float64) time.Duration {
	s = slices.Clone(s)
	slices.Sort(s)
	i := int(float64(len(s)-1) * p)
	return s[i]
}

func ms(d time.Duration) string { return d.Round(time.Millisecond).String() }

// section prints a table and appends it to $BENCH_OUT.
func section(b *testing.B, title, intro string, header []string, rows [][]string) {
	var sb strings.Builder
	fmt.Fprintf(&sb, "\n## %s\n\n%s\n\n| %s |\n|%s\n", title, intro, strings.Join(header, " | "), strings.Repeat("---|", len(header)))
	for _, r := range rows {
		fmt.Fprintf(&sb, "| %s |\n", strings.Join(r, " | "))
	}
	fmt.Print(sb.String())
	out := os.Getenv("BENCH_OUT")
	if out == "" {
		out = "bench-results.md"
	}
	f, err := os.OpenFile(out, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	f.WriteString(sb.String())
}

// procStats reads a process's CPU seconds and resident memory.
func procStats(pid int) (cpu time.Duration, rssKiB int) {
	stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if i := strings.LastIndexByte(string(stat), ')'); i > 0 {
		f := strings.Fields(string(stat)[i+2:])
		if len(f) > 13 {
			ut, _ := strconv.Atoi(f[11])
			st, _ := strconv.Atoi(f[12])
			cpu = time.Duration(ut+st) * time.Second / 100 // USER_HZ
		}
	}
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			rssKiB, _ = strconv.Atoi(strings.Fields(v)[0])
		}
	}
	return cpu, rssKiB
}

// procWakeups sums the context switches of all of a process's threads:
// about how often it woke up.
func procWakeups(pid int) int {
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	total := 0
	for _, t := range tasks {
		status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", pid, t.Name()))
		for _, line := range strings.Split(string(status), "\n") {
			if v, ok := strings.CutPrefix(line, "voluntary_ctxt_switches:"); ok {
				n, _ := strconv.Atoi(strings.TrimSpace(v))
				total += n
			} else if v, ok := strings.CutPrefix(line, "nonvoluntary_ctxt_switches:"); ok {
				n, _ := strconv.Atoi(strings.TrimSpace(v))
				total += n
			}
		}
	}
	return total
}

// benchRaw appends each sample of a run to $BENCH_RAW, if set, one line
// each: name, the run's start (RFC 3339) and the sample in milliseconds,
// for pooling runs of several invocations (interleaved comparisons).
func benchRaw(b *testing.B, name string, start time.Time, ds []time.Duration) {
	out := os.Getenv("BENCH_RAW")
	if out == "" {
		return
	}
	f, err := os.OpenFile(out, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	for _, d := range ds {
		fmt.Fprintf(f, "%s %s %.1f\n", name, start.UTC().Format(time.RFC3339Nano), float64(d.Microseconds())/1000)
	}
}

func mustHook(b *testing.B, s *stack, n *node, repo, tag string) int64 {
	code, body := s.webhook(n, repo, tag)
	if code != 200 {
		b.Fatalf("webhook: %d %s", code, body)
	}
	var t triggered
	json.Unmarshal([]byte(body), &t)
	return t.Revision
}

// logTime finds when a JSON log line holding all of want was written.
func logTime(path string, want ...string) (time.Time, bool) {
	data, _ := os.ReadFile(path)
	for _, line := range strings.Split(string(data), "\n") {
		ok := true
		for _, w := range want {
			ok = ok && strings.Contains(line, w)
		}
		if i := strings.Index(line, `"time":"`); ok && i >= 0 {
			rest := line[i+8:]
			if j := strings.IndexByte(rest, '"'); j > 0 {
				t, err := time.Parse(time.RFC3339Nano, rest[:j])
				return t, err == nil
			}
		}
	}
	return time.Time{}, false
}

// BenchmarkDeployOverhead: one node; the same new image reaches the app
// by hand (docker pull, docker stop, the supervisor re-runs it) and
// through the deployer (webhook until the container runs the new ID).
func BenchmarkDeployOverhead(b *testing.B) {
	pollInterval = 5 * time.Millisecond
	s := newStack(b, 1)
	n := s.nodes[0]
	ref := s.hub.host() + "/bench/app:qa"
	id := s.build(ref, false)
	s.supervise(n, "app", ref, id)
	var base, dep []time.Duration
	for range benchRuns() {
		id = s.build(ref, false)
		start := time.Now()
		s.dockerCLI(n.dockerd, "pull", "-q", ref)
		s.dockerCLI(n.dockerd, "stop", "-t", "3", "app")
		s.waitImage([]*node{n}, "app", id, time.Minute)
		base = append(base, time.Since(start))

		id = s.build(ref, false)
		start = time.Now()
		mustHook(b, s, n, "bench/app", "qa")
		s.waitImage([]*node{n}, "app", id, time.Minute)
		dep = append(dep, time.Since(start))
	}
	ratio := float64(median(dep)) / float64(median(base))
	b.ReportMetric(float64(median(dep).Milliseconds()), "ms/deploy")
	b.ReportMetric(ratio, "x-baseline")
	section(b, "1. Deploy overhead against the physical limit (one node)",
		"Baseline: by hand, `docker pull` of the new tag, `docker stop`, and the supervisor's re-run until the new container runs. "+
			"Deployer: webhook POST until the container runs the new image ID. Both include the supervisor's 0.5 s RestartSec.",
		[]string{"path", "median (min–max)", "runs"},
		[][]string{
			{"by hand (pull + stop + supervisor)", spread(base), strconv.Itoa(len(base))},
			{"deployer (webhook → new image running)", spread(dep), strconv.Itoa(len(dep))},
			{"ratio deployer / by hand", fmt.Sprintf("%.3f", ratio), ""},
			{"absolute overhead", ms(median(dep) - median(base)), ""},
		})
}

// BenchmarkClusterLatency: webhook until the last of N nodes runs the new
// image, for N = 2 and 4, rolling off and on.
func BenchmarkClusterLatency(b *testing.B) {
	pollInterval = 5 * time.Millisecond
	s := newStack(b, 4)
	ref := s.hub.host() + "/bench/app:qa"
	id := s.build(ref, false)
	var rows [][]string
	for _, nNodes := range []int{2, 4} {
		for _, n := range s.nodes[:nNodes] {
			if n.sups["app"] == nil {
				s.supervise(n, "app", ref, id)
			}
		}
		for _, maxUnavailable := range []string{"0", "1"} {
			s.restartDeployers("-max_unavailable=" + maxUnavailable)
			var ds []time.Duration
			for range benchRuns() {
				// A push onto an idle cluster: the previous run's deploys
				// (which end once the replacement is confirmed up) are
				// over, so this one is not queued behind them as a
				// follow-up.
				s.barrier(s.nodes[:nNodes])
				id = s.build(ref, false)
				start := time.Now()
				mustHook(b, s, s.nodes[0], "bench/app", "qa")
				s.waitImage(s.nodes[:nNodes], "app", id, 2*time.Minute)
				ds = append(ds, time.Since(start))
			}
			mode := map[string]string{"0": "all at once (-max_unavailable=0)", "1": "rolling (-max_unavailable=1)"}[maxUnavailable]
			rows = append(rows, []string{strconv.Itoa(nNodes), mode, spread(ds)})
		}
	}
	section(b, "2. Cluster deploy latency",
		"Webhook POST until the last of N nodes (N Docker daemons, one app container each under a supervisor) runs the new image ID.",
		[]string{"nodes", "mode", "median (min–max)"}, rows)
}

// BenchmarkFanOut: 100 deployer processes (and the node's own) in -dry_run
// against one Docker daemon and one etcd: from the webhook's 200 until
// each has seen the trigger and found the stale container (its Slack
// message arrives). The new image is put on the daemon before the webhook
// by as many concurrent pulls as there are deployers (the baseline): one
// daemon completes concurrent pulls of one new manifest one at a time,
// which would measure dockerd, not the deployers, and does not happen on
// real nodes (one daemon each).
func BenchmarkFanOut(b *testing.B) {
	const procs = 100
	s := newStackWith(b, 1, 1)
	base := s.nodes[0]
	s.restartDeployers("-dry_run") // nothing may restart the app: every process must find it stale
	ref := s.hub.host() + "/bench/app:qa"
	id := s.build(ref, false)
	s.supervise(base, "app", ref, id)
	var fans []*node
	var wg sync.WaitGroup
	for i := range procs {
		d := *base.dockerd
		d.name = fmt.Sprintf("fan%03d", i)
		n := &node{dockerd: &d, port: freeTCPPort(b), sups: map[string]*proc{}}
		fans = append(fans, n)
		n.args = []string{s.bin, "-docker", n.host(), "-etcd_nodes", s.etcdEndpoints(), "-etcd_prefix", s.prefix,
			"-listen", fmt.Sprintf("127.0.0.1:%d", n.port), "-node_name", n.name, "-webhook_secret", s.secret,
			"-slack_webhook_url", s.slack.URL, "-registry", s.hub.host(), "-repull_period", "0", "-dockercfg", "",
			"-log_format", "json", "-dry_run"}
		wg.Go(func() { s.runDeployer(n) })
	}
	wg.Wait()
	b.Cleanup(func() {
		for _, n := range fans {
			n.deployer.stop(syscall.SIGTERM, 10*time.Second)
		}
	})
	const all = procs + 1 // the fans and the node's own deployer
	// pullAll pulls the tag all times at once straight to the Engine API
	// (the deployer's call), each pull's time since the start.
	pullAll := func() []time.Duration {
		ds := make([]time.Duration, all)
		start := time.Now()
		var wg sync.WaitGroup
		for i := range ds {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				defer cancel()
				if err := base.cli.PullImage(docker.PullImageOptions{Repository: s.hub.host() + "/bench/app", Tag: "qa",
					OutputStream: io.Discard, InactivityTimeout: time.Minute, Context: ctx}, docker.AuthConfiguration{}); err != nil {
					b.Errorf("baseline pull: %v", err)
				}
				ds[i] = time.Since(start)
			})
		}
		wg.Wait()
		b.Logf("baseline pulls at %s: p50 %s, p99 %s, max %s, n %d", start.UTC().Format(time.RFC3339Nano),
			ms(percentile(ds, 0.5)), ms(percentile(ds, 0.99)), ms(slices.Max(ds)), len(ds))
		benchRaw(b, "fanout-pulls", start, ds)
		return ds
	}
	var lat, seenLat, pullLat []time.Duration
	for range benchRuns() {
		from := len(s.slackTexts())
		id = s.build(ref, false)
		pullLat = append(pullLat, pullAll()...)
		start := time.Now()
		rev := mustHook(b, s, base, "bench/app", "qa")
		waitFor(b, 2*time.Minute, "every process to report", func() bool {
			s.slack.mu.Lock()
			defer s.slack.mu.Unlock()
			seen := map[string]bool{}
			for _, p := range s.slack.payloads[from:] {
				text, _ := p["text"].(string)
				if strings.Contains(text, "would restart") && strings.Contains(text, shortID(id)) {
					if f := strings.Fields(text); len(f) > 4 {
						seen[f[4]] = true // "Dry run: <repo> on <node>"
					}
				}
			}
			return len(seen) >= all
		})
		s.slack.mu.Lock()
		var run []time.Duration
		for i, p := range s.slack.payloads[from:] {
			if text, _ := p["text"].(string); strings.Contains(text, shortID(id)) {
				run = append(run, s.slack.at[from+i].Sub(start))
			}
		}
		s.slack.mu.Unlock()
		lat = append(lat, run...)
		b.Logf("fan-out run at %s (revision %d): p50 %s, p99 %s, max %s, n %d", start.UTC().Format(time.RFC3339Nano), rev,
			ms(percentile(run, 0.5)), ms(percentile(run, 0.99)), ms(slices.Max(run)), len(run))
		benchRaw(b, "fanout", start, run)
		for _, n := range fans {
			if at, ok := logTime(n.deployer.log, `"etcd trigger"`, fmt.Sprintf(`"revision":%d}`, rev)); ok {
				seenLat = append(seenLat, at.Sub(start))
			}
		}
	}
	var rss []int
	var cpu time.Duration
	for _, n := range fans {
		c, r := procStats(n.deployer.cmd.Process.Pid)
		rss = append(rss, r)
		cpu += c
	}
	slices.Sort(rss)
	pcts := func(ds []time.Duration) string {
		return fmt.Sprintf("%s / %s / %s", ms(percentile(ds, 0.5)), ms(percentile(ds, 0.99)), ms(slices.Max(ds)))
	}
	b.ReportMetric(float64(percentile(lat, 0.99).Milliseconds()), "ms-p99")
	section(b, "3. Fan-out: 100 deployers, one etcd, one Docker daemon",
		fmt.Sprintf("100 deployer processes with -dry_run and the node's own, one single-member etcd (Debian etcd-server), one dockerd. "+
			"Before each run the new image is put on the daemon by %d concurrent pulls straight to the Engine API (the baseline): "+
			"one daemon completes concurrent pulls of one new manifest one at a time, in 1 to 50 s, which would measure dockerd, "+
			"and on real nodes each deployer has its own daemon. From the webhook's 200 until each process has seen the trigger, "+
			"pulled (the registry is asked; the image is there), found the stale container and posted its Slack message "+
			"(arrival at the recorder). %d runs × %d processes.", all, benchRuns(), all),
		[]string{"figure", "value"},
		[][]string{
			{"trigger seen (etcd watch), p50 / p99 / max", pcts(seenLat)},
			{"stale container found and reported, p50 / p99 / max", pcts(lat)},
			{fmt.Sprintf("baseline: %d concurrent pulls of the new tag on the one dockerd, p50 / p99 / max", all), pcts(pullLat)},
			{"resident memory per process (median, max)", fmt.Sprintf("%.1f MiB, %.1f MiB", float64(rss[len(rss)/2])/1024, float64(rss[len(rss)-1])/1024)},
			{"CPU of all 100 processes over the whole benchmark", cpu.String()},
		})
}

// BenchmarkBurst: 1000 webhooks for one repository as fast as possible,
// against 1000 direct etcd puts (the floor of the trigger path).
func BenchmarkBurst(b *testing.B) {
	pollInterval = 5 * time.Millisecond
	const hooks, clients = 1000, 32
	s := newStack(b, 2)
	ref := s.hub.host() + "/bench/app:qa"
	id := s.build(ref, false)
	for _, n := range s.nodes {
		s.supervise(n, "app", ref, id)
	}
	fire := func(do func() bool) (time.Duration, int64) {
		var next, failed atomic.Int64
		var wg sync.WaitGroup
		start := time.Now()
		for range clients {
			wg.Go(func() {
				for next.Add(1) <= hooks {
					if !do() {
						failed.Add(1)
					}
				}
			})
		}
		wg.Wait()
		return time.Since(start), failed.Load()
	}
	var hookRate, putRate []float64
	var converge []time.Duration
	var pulls []string
	for range benchRuns() {
		d, _ := fire(func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_, err := s.cli.Put(ctx, "/bench-floor/bench/app", `{"tag":"qa"}`)
			return err == nil
		})
		putRate = append(putRate, hooks/d.Seconds())

		before := map[string]float64{}
		for _, n := range s.nodes {
			before[n.name] = s.metric(n, "deployer_pulls_total", "")
		}
		id = s.build(ref, false)
		start := time.Now()
		body := hubBody("bench/app", "qa")
		d, failed := fire(func() bool {
			code, _ := s.postHook(s.nodes[0], "/api/dockerhub/webhook", "Bearer "+s.secret, body)
			return code == 200
		})
		if failed > 0 {
			b.Errorf("%d of %d webhooks failed", failed, hooks)
		}
		hookRate = append(hookRate, hooks/d.Seconds())
		s.waitImage(s.nodes, "app", id, 2*time.Minute)
		converge = append(converge, time.Since(start))
		s.barrier(s.nodes)
		var per []string
		for _, n := range s.nodes {
			p := s.metric(n, "deployer_pulls_total", "") - before[n.name]
			per = append(per, fmt.Sprint(p))
			if p > 2 {
				b.Errorf("%s pulled %v times for %d webhooks; want at most 2", n.name, p, hooks)
			}
		}
		pulls = append(pulls, strings.Join(per, "/"))
	}
	rate := func(xs []float64) string {
		s := slices.Clone(xs)
		slices.Sort(s)
		return fmt.Sprintf("%.0f/s (%.0f–%.0f)", s[len(s)/2], s[0], s[len(s)-1])
	}
	b.ReportMetric(slices.Max(hookRate), "webhooks/s")
	section(b, "4. Burst coalescing: 1000 webhooks for one repository",
		fmt.Sprintf("%d webhooks from %d concurrent clients to one node of 2, each a Docker Hub payload for the same tag; baseline: %d direct etcd puts with the same concurrency.", hooks, clients, hooks),
		[]string{"figure", "median (min–max)"},
		[][]string{
			{"webhook throughput (webhook → etcd put → 200)", rate(hookRate)},
			{"baseline: direct etcd put throughput", rate(putRate)},
			{"time from the first webhook until both nodes run the new image", spread(converge)},
			{"pulls per node (node1/node2), each run", strings.Join(pulls, ", ")},
		})
}

// BenchmarkIdle: BENCH_IDLE (default 10m) with 20 running containers of 5
// repositories: registry requests, CPU and memory of the deployer, next
// to the Docker daemon's as a reference.
func BenchmarkIdle(b *testing.B) {
	idle := 10 * time.Minute
	if d, err := time.ParseDuration(os.Getenv("BENCH_IDLE")); err == nil {
		idle = d
	}
	s := newStack(b, 1)
	n := s.nodes[0]
	for r := range 5 {
		ref := fmt.Sprintf("%s/bench/idle%d:qa", s.hub.host(), r)
		s.buildKind(ref, "idle")
		s.dockerCLI(n.dockerd, "pull", "-q", ref)
		for c := range 4 {
			s.dockerCLI(n.dockerd, "run", "-d", "--network", "none", "--name", fmt.Sprintf("idle%d-%d", r, c), ref)
		}
	}
	// Let the start-up settle, then measure.
	s.barrier(s.nodes)
	regLines := func() int {
		data, _ := os.ReadFile(s.hub.proc.log)
		return strings.Count(string(data), `"GET /v2/`) + strings.Count(string(data), `"HEAD /v2/`)
	}
	reg0 := regLines()
	dcpu0, _ := procStats(n.deployer.cmd.Process.Pid)
	kcpu0, _ := procStats(n.dockerd.proc.cmd.Process.Pid)
	dwake0, kwake0 := procWakeups(n.deployer.cmd.Process.Pid), procWakeups(n.dockerd.proc.cmd.Process.Pid)
	time.Sleep(idle) // the measurement window itself
	dcpu1, drss := procStats(n.deployer.cmd.Process.Pid)
	kcpu1, krss := procStats(n.dockerd.proc.cmd.Process.Pid)
	perMin := func(w0, w1 int) string { return fmt.Sprintf("%.0f", float64(w1-w0)/idle.Minutes()) }
	dwake, kwake := perMin(dwake0, procWakeups(n.deployer.cmd.Process.Pid)), perMin(kwake0, procWakeups(n.dockerd.proc.cmd.Process.Pid))
	reqs := regLines() - reg0
	if reqs != 0 {
		b.Errorf("%d registry requests while idle; want 0", reqs)
	}
	section(b, "5. Idle cost",
		fmt.Sprintf("%v idle, 20 running containers of 5 repositories, default -repull_period (24h). The Docker daemon over the same window for reference.", idle),
		[]string{"figure", "deployer", "dockerd (reference)"},
		[][]string{
			{"registry requests", strconv.Itoa(reqs), "-"},
			{"CPU time", (dcpu1 - dcpu0).String(), (kcpu1 - kcpu0).String()},
			{"resident memory", fmt.Sprintf("%.1f MiB", float64(drss)/1024), fmt.Sprintf("%.1f MiB", float64(krss)/1024)},
			{"context switches per minute, all threads (about the wake-ups)", dwake, kwake},
		})
}

// BenchmarkScale: one node; one repository's deploy with no other
// containers, then with 199 unrelated containers of 49 more repositories;
// and one periodic re-pull cycle over all 200.
func BenchmarkScale(b *testing.B) {
	s := newStack(b, 1)
	n := s.nodes[0]
	// -dry_run: the deployer's own work (pull, list, stale scan) without
	// the container's own stop time, which is the app's, not ours.
	s.restartDeployers("-dry_run")
	ref := s.hub.host() + "/bench/scale0:qa"
	id := s.build(ref, false)
	s.supervise(n, "app", ref, id)
	deployTime := func() []time.Duration {
		var ds []time.Duration
		for range benchRuns() {
			sum0 := s.metric(n, "deployer_deploy_duration_seconds_sum", `result="ok"`)
			id = s.build(ref, false)
			mustHook(b, s, n, "bench/scale0", "qa")
			s.barrier(s.nodes)
			sum1 := s.metric(n, "deployer_deploy_duration_seconds_sum", `result="ok"`)
			ds = append(ds, time.Duration((sum1-sum0)*float64(time.Second)))
		}
		return ds
	}
	alone := deployTime()

	var refs []string
	for r := 1; r < 50; r++ {
		refs = append(refs, fmt.Sprintf("%s/bench/scale%d:qa", s.hub.host(), r))
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 4)
	for _, r := range refs {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			s.buildKind(r, "idle")
			s.dockerCLI(n.dockerd, "pull", "-q", r)
		})
	}
	wg.Wait()
	for i := range 199 {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			// Labelled: the periodic re-pull covers only repositories
			// with a trigger key and containers labelled managed.
			s.dockerCLI(n.dockerd, "run", "-d", "--network", "none", "-l", managedLabel+"=true", "--name", fmt.Sprintf("other%d", i), refs[i%len(refs)])
		})
	}
	wg.Wait()
	crowded := deployTime()

	// One periodic re-pull cycle: restart with a short period and time
	// from its start (a log line) until all 50 deploys are done.
	s.restartDeployers("-repull_period=15s")
	deploys0 := s.metric(n, "deployer_deploys_total", "")
	var started time.Time
	waitFor(b, 2*time.Minute, "the periodic re-pull to start", func() bool {
		data, _ := os.ReadFile(n.deployer.log)
		for _, line := range strings.Split(string(data), "\n") {
			if strings.Contains(line, `"periodic re-pull started"`) {
				if i := strings.Index(line, `"time":"`); i >= 0 {
					started, _ = time.Parse(time.RFC3339Nano, line[i+8:i+8+strings.IndexByte(line[i+8:], '"')])
				}
			}
		}
		return !started.IsZero()
	})
	waitFor(b, 5*time.Minute, "the re-pull cycle to finish", func() bool {
		return s.metric(n, "deployer_deploys_total", "")-deploys0 >= 50 && s.metric(n, "deployer_deploy_queue_repositories", "") == 0
	})
	cycle := time.Since(started)
	section(b, "6. Scale of one node",
		"Deploy of one repository as the deployer's deploy_duration_seconds measures it, with -dry_run so that it is the deployer's own work "+
			"(pull of a new image, image and container listing, stale scan) and not the app's stop time, "+
			"alone and among 199 unrelated running containers of 49 other repositories; then one periodic re-pull cycle over all 200 "+
			"containers (50 repositories: list, inspect, 50 pulls and stale scans).",
		[]string{"figure", "median (min–max)"},
		[][]string{
			{"one deploy, 1 container on the node", spread(alone)},
			{"one deploy, 200 containers on the node", spread(crowded)},
			{"one periodic re-pull cycle, 200 containers / 50 repositories", ms(cycle)},
		})
}
