//go:build bench

package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// BenchmarkIdleOneMachine: the smallest install, idle. One machine with
// the defaults (the embedded etcd; only -docker, the data directory and
// free loopback ports given), three running containers, BENCH_IDLE_ONE
// (default 120 s) idle after a 20 s settle: the deployer's CPU time,
// resident memory (anonymous and file-backed) and context switches, and
// how long its start took to the watch. Watchtower's figures are the
// issue's, measured side by side on the same kind of machine (its
// maintained fork in API mode): this machine cannot fetch it.
func BenchmarkIdleOneMachine(b *testing.B) {
	idle := 120 * time.Second
	if d, err := time.ParseDuration(os.Getenv("BENCH_IDLE_ONE")); err == nil {
		idle = d
	}
	s := newStack(b, 1)
	n := s.nodes[0]
	ref := s.hub.host() + "/bench/idleone:qa"
	s.buildKind(ref, "idle")
	s.dockerCLI(n.dockerd, "pull", "-q", ref)
	for c := range 3 {
		s.dockerCLI(n.dockerd, "run", "-d", "--network", "none", "--name", fmt.Sprintf("one%d", c), ref)
	}
	var starts []time.Duration
	for run := range 3 {
		n.deployer.stop(syscall.SIGTERM, 15*time.Second)
		n.port = freeTCPPort(b)
		n.args = []string{s.bin, "-docker", n.host(), "-etcd_data_dir", filepath.Join(s.dir, "one-etcd"),
			"-listen", fmt.Sprintf("127.0.0.1:%d", n.port),
			"-etcd_listen_client", fmt.Sprintf("http://127.0.0.1:%d", freeTCPPort(b)),
			"-etcd_listen_peer", fmt.Sprintf("http://127.0.0.1:%d", freeTCPPort(b))}
		if run == 0 {
			_ = os.RemoveAll(filepath.Join(s.dir, "one-etcd")) // the first start makes the member
		}
		start := time.Now()
		s.runDeployer(n)
		starts = append(starts, time.Since(start))
	}
	pid := n.deployer.cmd.Process.Pid
	time.Sleep(20 * time.Second) // the start-up settles; then the window
	cpu0, _ := procStats(pid)
	wake0 := procWakeups(pid)
	time.Sleep(idle) // the measurement window itself
	cpu1, rss := procStats(pid)
	wakes := float64(procWakeups(pid)-wake0) / idle.Minutes()
	anon, file := rssParts(pid)
	section(b, "5d. Idle cost of one machine with the defaults",
		fmt.Sprintf("One node with the defaults (embedded etcd), 3 running containers, %v idle after a 20 s settle. "+
			"Watchtower: the issue's figures for the maintained fork in its API mode over 120 s on the same kind of machine (not measurable here: no network to fetch it).", idle),
		[]string{"figure", "deployer", "Watchtower (the issue's figure)"},
		[][]string{
			{"CPU time", (cpu1 - cpu0).String(), "50ms (120 s)"},
			{"resident memory (anonymous + file-backed)", fmt.Sprintf("%.1f MiB (%.1f + %.1f)", float64(rss)/1024, float64(anon)/1024, float64(file)/1024), "25 MiB"},
			{"context switches per minute, all threads", fmt.Sprintf("%.0f", wakes), "-"},
			{"start to the watch (first start, then two restarts)", fmt.Sprintf("%v, %v, %v", starts[0].Round(10*time.Millisecond), starts[1].Round(10*time.Millisecond), starts[2].Round(10*time.Millisecond)), "-"},
		})
}

// rssParts is a process's anonymous and file-backed resident memory, KiB.
func rssParts(pid int) (anon, file int) {
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "RssAnon:"); ok {
			anon, _ = strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
		} else if v, ok := strings.CutPrefix(line, "RssFile:"); ok {
			file, _ = strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
		}
	}
	return anon, file
}
