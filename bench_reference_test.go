//go:build bench

package main

// BenchmarkReference: the deployer against the physical limit of a
// deployer on one node, bench/reference (the least Engine API sequence
// for the same update, from a long-running process with one Docker
// client), per restart strategy, interleaved.

import (
	"bufio"
	"cmp"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// referenceProc is bench/reference running on one node: a line on its
// stdin makes it update the container once.
type referenceProc struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
}

func startReference(b *testing.B, s *stack, n *node, strategy, name, ref string) *referenceProc {
	b.Helper()
	bin := filepath.Join(s.dir, "reference")
	if _, err := os.Stat(bin); err != nil {
		if out, err := exec.Command("go", "build", "-o", bin, "./bench/reference").CombinedOutput(); err != nil {
			b.Fatalf("go build ./bench/reference: %v\n%s", err, out)
		}
	}
	cmd := exec.Command(bin, "-docker", n.host(), "-strategy", strategy, "-name", name, "-image", ref, "-stop_timeout", "3")
	in, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { in.Close(); cmd.Process.Kill(); cmd.Wait() })
	return &referenceProc{cmd: cmd, in: in, out: bufio.NewScanner(out)}
}

// update asks for one update and waits for its answer.
func (r *referenceProc) update(b *testing.B) {
	b.Helper()
	if _, err := io.WriteString(r.in, "update\n"); err != nil {
		b.Fatal(err)
	}
	if !r.out.Scan() || r.out.Text() != "ok" {
		b.Fatalf("reference: %q %v", r.out.Text(), r.out.Err())
	}
}

// buildQuick builds a new version of an app that exits at once on
// SIGTERM (the shell waits in the `wait` builtin, which a signal
// interrupts, not in a foreground sleep), so that a stop costs the same
// every time, and pushes it.
func buildQuick(b *testing.B, s *stack, ref string) string {
	b.Helper()
	s.mu.Lock()
	s.builds++
	n := s.builds
	s.mu.Unlock()
	dir := filepath.Join(s.dir, fmt.Sprintf("build-%d", n))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	bb, _ := exec.LookPath("busybox")
	if out, err := exec.Command("cp", bb, filepath.Join(dir, "busybox")).CombinedOutput(); err != nil {
		b.Fatalf("cp busybox: %v %s", err, out)
	}
	script := `trap 'exit 0' TERM; while true; do /bin/busybox sleep 1 & wait $!; done`
	files := map[string]string{
		"Dockerfile": fmt.Sprintf("FROM scratch\nCOPY busybox /bin/busybox\nCOPY version /version\nCMD [\"/bin/busybox\",\"sh\",\"-c\",%q]\n", script),
		"version":    fmt.Sprintf("%s build %d %d\n", ref, n, time.Now().UnixNano()),
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			b.Fatal(err)
		}
	}
	s.dockerCLI(s.builder, "build", "-q", "-t", ref, dir)
	s.dockerCLI(s.builder, "push", "-q", ref)
	img, err := s.builder.cli.InspectImage(ref)
	if err != nil {
		b.Fatal(err)
	}
	return img.ID
}

// apiCall is one Engine API call dockerd -D logged.
type apiCall struct {
	at   time.Duration // after the trigger
	call string        // method and path, IDs and versions shortened
}

var (
	dockerdCallRE = regexp.MustCompile(`time="([^"]+)".*msg="Calling ([A-Z]+) ([^"?]+)`)
	hexIDRE       = regexp.MustCompile(`[0-9a-f]{64}`)
	apiVersionRE  = regexp.MustCompile(`^/v[0-9.]+/`)
)

// apiCalls reads the API calls dockerd -D logged at offset and later, up
// to and including the first one whose path ends in until (all when "").
// The harness's own polls (an inspect of the container by name) are left
// out.
func apiCalls(path string, offset int64, start time.Time, until, name string) []apiCall {
	data, _ := os.ReadFile(path)
	if int64(len(data)) < offset {
		return nil
	}
	var out []apiCall
	for _, line := range strings.Split(string(data[offset:]), "\n") {
		m := dockerdCallRE.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		at, err := time.Parse(time.RFC3339Nano, m[1])
		if err != nil || at.Before(start) {
			continue
		}
		p := apiVersionRE.ReplaceAllString(m[3], "/")
		p = hexIDRE.ReplaceAllString(p, "<id>")
		if p == "/_ping" || p == "/containers/"+name+"/json" {
			continue // health probes; the harness's waitImage
		}
		out = append(out, apiCall{at: at.Sub(start), call: m[2] + " " + p})
		if until != "" && strings.HasSuffix(p, until) {
			break
		}
	}
	return out
}

// callsUntil is how long after the trigger the first call ending in
// suffix came, if it did.
func callsUntil(cs []apiCall, suffix string) (time.Duration, bool) {
	for _, c := range cs {
		if strings.HasSuffix(c.call, suffix) {
			return c.at, true
		}
	}
	return 0, false
}

func fileLen(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// restartDockerdDebug restarts node n's dockerd with -D, which logs every
// API call with its time; nothing runs on it yet.
func restartDockerdDebug(b *testing.B, s *stack, n *node) {
	n.dockerd.proc.stop(syscall.SIGTERM, 20*time.Second)
	d := s.startDockerd(n.name, "-D")
	s.waitDockerd(d)
	n.dockerd = d
}

func BenchmarkReference(b *testing.B) {
	pollInterval = 5 * time.Millisecond
	runs := max(benchRuns(), 7)
	s := newStack(b, 1)
	n := s.nodes[0]
	restartDockerdDebug(b, s, n)

	type result struct {
		dep, ref         []time.Duration // trigger → new container running the new image ID
		depStop, refStop []time.Duration // trigger → the stop call
		depCalls         [][]apiCall     // each deployer run's calls up to the stop
		refCalls         []apiCall       // one reference run's
	}
	results := map[string]*result{}
	strategies := []string{"recreate", "stop"}
	for _, strategy := range strategies {
		r := &result{}
		results[strategy] = r
		s.restartDeployers("-restart_strategy=" + strategy)
		repo := "bench/ref" + strategy
		ref := s.hub.host() + "/" + repo + ":qa"
		name := "ref" + strategy
		id := buildQuick(b, s, ref)
		if strategy == "stop" {
			s.supervise(n, name, ref, id)
		} else {
			s.dockerCLI(n.dockerd, "pull", "-q", ref)
			s.dockerCLI(n.dockerd, "run", "-d", "--name", name, "--network", "none", ref)
			s.waitImage([]*node{n}, name, id, time.Minute)
		}
		refProc := startReference(b, s, n, strategy, name, ref)
		deployer := func() {
			id := buildQuick(b, s, ref)
			off := fileLen(n.dockerd.proc.log)
			start := time.Now()
			rev := mustHook(b, s, n, repo, "qa")
			s.waitImage([]*node{n}, name, id, time.Minute)
			r.dep = append(r.dep, time.Since(start))
			s.barrier(s.nodes) // the deploy is over (the wait, the old container's removal)
			cs := apiCalls(n.dockerd.proc.log, off, start, "/stop", name)
			// The watcher's log line: when etcd delivered the trigger.
			if at, ok := logTime(n.deployer.log, `"etcd trigger"`, fmt.Sprintf(`"revision":%d}`, rev)); ok {
				cs = append(cs, apiCall{at: at.Sub(start), call: "(deployer log: etcd watch delivered the trigger)"})
				slices.SortStableFunc(cs, func(a, b apiCall) int { return cmp.Compare(a.at, b.at) })
			}
			r.depCalls = append(r.depCalls, cs)
			if at, ok := callsUntil(cs, "/stop"); ok {
				r.depStop = append(r.depStop, at)
			}
		}
		reference := func() {
			id := buildQuick(b, s, ref)
			off := fileLen(n.dockerd.proc.log)
			start := time.Now()
			refProc.update(b)
			s.waitImage([]*node{n}, name, id, time.Minute)
			r.ref = append(r.ref, time.Since(start))
			cs := apiCalls(n.dockerd.proc.log, off, start, "/start", name)
			// The reference lists and inspects nothing: those calls are the
			// deployer's status reporter, told of the stop by an event.
			cs = slices.DeleteFunc(cs, func(c apiCall) bool {
				return c.call == "GET /containers/json" || c.call == "GET /containers/<id>/json"
			})
			if r.refCalls == nil {
				r.refCalls = cs
			}
			if at, ok := callsUntil(cs, "/stop"); ok {
				r.refStop = append(r.refStop, at)
			}
		}
		for i := range runs {
			// Interleaved, each first every other run.
			if i%2 == 0 {
				deployer()
				reference()
			} else {
				reference()
				deployer()
			}
		}
		if strategy == "stop" {
			n.sups[name].stop(syscall.SIGTERM, 10*time.Second)
			delete(n.sups, name)
		}
	}

	var rows [][]string
	for _, strategy := range strategies {
		r := results[strategy]
		ratio := float64(median(r.dep)) / float64(median(r.ref))
		b.ReportMetric(ratio, "x-ref-"+strategy)
		refPath := "reference: pull, stop, remove, create, start"
		depPath := "deployer -restart_strategy=recreate"
		if strategy == "stop" {
			refPath = "reference: pull, stop, then the supervisor"
			depPath = "deployer -restart_strategy=stop, then the supervisor"
		}
		rows = append(rows,
			[]string{strategy, refPath, spread(r.ref), spread(r.refStop), strconv.Itoa(len(r.ref))},
			[]string{strategy, depPath, spread(r.dep), spread(r.depStop), strconv.Itoa(len(r.dep))},
			[]string{strategy, "**ratio deployer / reference (medians)**", fmt.Sprintf("**%.3f** (%+v)", ratio, ms(median(r.dep)-median(r.ref))),
				fmt.Sprintf("%+v", ms(median(r.depStop)-median(r.refStop))), ""},
		)
	}
	section(b, "7. Deployer against the direct-API reference (one node)",
		fmt.Sprintf("Measured %s. One node (one dockerd, run with -D to log each API call), one registry, 3 etcd members; an app that exits at once on SIGTERM. "+
			"From the trigger (deployer: the webhook POST; reference: the line written to bench/reference, a long-running Go process with one Docker client "+
			"that does the least Engine API sequence for the update and inspects nothing) until the container runs the new image ID, polled every 5 ms. "+
			"Per strategy the two alternate, %d runs each, each first every other run; a new image is built and pushed before every run. "+
			"The stop strategy includes the supervisor's (scripts/supervise.sh) 0.5 s RestartSec and its `docker rm`, `docker pull`, `docker run`. "+
			"The machine is shared with other test runs: figures are noisier than on a quiet machine.",
			time.Now().UTC().Format("2006-01-02 15:04 UTC"), runs),
		[]string{"strategy", "path", "trigger → new image running, median (min–max)", "trigger → stop call, median (min–max)", "runs"}, rows)

	// Where the deployer's time goes before the stop: each call in
	// order, at its median time after the webhook POST over the runs
	// that made the same calls.
	var brows [][]string
	for _, strategy := range strategies {
		r := results[strategy]
		byShape := map[string][][]apiCall{}
		shapeOf := func(cs []apiCall) string {
			var calls []string
			for _, c := range cs {
				calls = append(calls, c.call)
			}
			return strings.Join(calls, "\n")
		}
		var common string
		for _, cs := range r.depCalls {
			k := shapeOf(cs)
			byShape[k] = append(byShape[k], cs)
			if len(byShape[k]) > len(byShape[common]) {
				common = k
			}
		}
		same := byShape[common]
		if len(same) == 0 {
			continue
		}
		for i, c := range same[0] {
			var ats []time.Duration
			for _, cs := range same {
				ats = append(ats, cs[i].at)
			}
			gap := median(ats)
			if i > 0 {
				var prev []time.Duration
				for _, cs := range same {
					prev = append(prev, cs[i].at-cs[i-1].at)
				}
				gap = median(prev)
			}
			brows = append(brows, []string{strategy, "deployer", strconv.Itoa(i + 1), "`" + c.call + "`", ms(median(ats)), "+" + ms(gap)})
		}
		var prevAt time.Duration
		for i, c := range r.refCalls {
			brows = append(brows, []string{strategy, "reference (one run)", strconv.Itoa(i + 1), "`" + c.call + "`", ms(c.at), "+" + ms(c.at-prevAt)})
			prevAt = c.at
		}
	}
	section(b, "7b. Engine API calls from the trigger to the stop",
		fmt.Sprintf("Measured %s with BenchmarkReference, from dockerd -D's `Calling` lines: the deployer's calls from the webhook POST up to its stop call "+
			"(times are medians over the runs that made the same calls; \"after\" is the median gap since the previous call, which includes "+
			"the deployer's etcd round trips: they are not Docker calls), and the reference's calls for one run (with, for the stop strategy, the supervisor's `docker rm -f`, `docker pull`, `docker run`). `/_ping` calls and the harness's inspects by name are left out, and from the reference's list the deployer's status reporter's listing and inspects (after the stop's `die` event). `GET /events` in the deployer's list is the replacement wait subscribing before the stop.",
			time.Now().UTC().Format("2006-01-02 15:04 UTC")),
		[]string{"strategy", "who", "#", "call", "at", "after"}, brows)
}
