package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os/exec"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/etcdc"
)

func testClaim(t *testing.T, cli *clientv3.Client, node string, wait time.Duration) *nodeClaim {
	c := newNodeClaim(etcdc.InPrefix(cli, testPrefix(t)), node, "127.0.0.1:4500", time.Second, testLogger(t))
	c.wait, c.poll = wait, 50*time.Millisecond
	return c
}

func TestNodeNameTakenByLiveDeployer(t *testing.T) {
	cli := testEtcd(t)
	first := testClaim(t, cli, "n1", time.Second)
	if err := first.acquire(t.Context()); err != nil {
		t.Fatal(err)
	}
	second := testClaim(t, cli, "n1", 300*time.Millisecond)
	start := time.Now()
	err := second.acquire(t.Context())
	if !errors.Is(err, errNodeNameTaken) || !strings.Contains(err.Error(), "another deployer is running with this -node_name") ||
		!strings.Contains(err.Error(), "127.0.0.1:4500") {
		t.Fatalf("second claim = %v; want errNodeNameTaken naming the holder", err)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Errorf("gave up after %s; want it to wait out a previous lease first", d)
	}
	// Another name is free.
	if err := testClaim(t, cli, "n2", 0).acquire(t.Context()); err != nil {
		t.Errorf("claim of another name: %v", err)
	}
	// A clean stop frees the name at once.
	first.release()
	start = time.Now()
	if err := testClaim(t, cli, "n1", 0).acquire(t.Context()); err != nil {
		t.Errorf("claim after the holder stopped: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("claim after a clean stop took %s", d)
	}
}

// TestNodeNameAfterKill: a deployer killed with SIGKILL leaves its key
// until its lease expires. On the same machine its successor sees the
// process is gone and takes over at once; elsewhere it waits for the lease.
func TestNodeNameAfterKill(t *testing.T) {
	cli := testEtcd(t)
	self := thisProcess("")
	if self.BootID == "" || self.PIDNS == "" {
		t.Skip("no /proc boot_id or pid namespace")
	}
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		own     bool // the holder is the claiming process itself
		holder  nodeOwner
		leaseS  int64
		atLeast time.Duration
		atMost  time.Duration
	}{
		{"this process's own key from a lapsed lease", true, nodeOwner{}, 60, 0, 2 * time.Second},
		{"dead process on this machine", false, nodeOwner{Host: self.Host, BootID: self.BootID, PIDNS: self.PIDNS, PID: cmd.Process.Pid}, 60, 0, 2 * time.Second},
		{"another machine: the lease expires", false, nodeOwner{Host: "elsewhere", BootID: "other-boot", PID: cmd.Process.Pid}, 1, 500 * time.Millisecond, 6 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			lease, err := cli.Grant(t.Context(), tt.leaseS)
			if err != nil {
				t.Fatal(err)
			}
			c := testClaim(t, cli, "n1", 8*time.Second)
			if tt.own {
				tt.holder = c.self
			}
			v, _ := json.Marshal(tt.holder)
			if _, err := cli.Put(t.Context(), testPrefix(t)+c.key, string(v), clientv3.WithLease(lease.ID)); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			if err := c.acquire(t.Context()); err != nil {
				t.Fatalf("claim after the holder was killed: %v", err)
			}
			defer c.release()
			if d := time.Since(start); d < tt.atLeast || d > tt.atMost {
				t.Errorf("claim took %s; want between %s and %s", d, tt.atLeast, tt.atMost)
			}
		})
	}
}

func TestSecondDaemonWithSameNodeNameRefuses(t *testing.T) {
	cli := testEtcd(t)
	startTestDaemon(t, cli, newFakeDocker(), nil) // n1
	cfg, err := parseFlags("deployer", []string{"-listen", "127.0.0.1:0", "-node_name", "n1", "-etcd_prefix", testPrefix(t), "-webhook_secret", "s"}, env(), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	d, err := newDaemon(cfg, cli, newFakeDocker(), testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	d.claim.wait = 200 * time.Millisecond
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	err = d.run(ctx)
	if !errors.Is(err, errNodeNameTaken) || !strings.Contains(err.Error(), "-node_name n1") {
		t.Fatalf("second daemon as n1: %v; want a refusal naming -node_name n1", err)
	}
	select {
	case <-d.ready:
		t.Error("the second daemon listened before refusing")
	default:
	}
}

func TestWarnContainerHostname(t *testing.T) {
	tests := []struct {
		node, host string
		warn       bool
	}{
		{"3f4e8b2a9c1d", "3f4e8b2a9c1d", true},
		{"3f4e8b2a9c1d3f4e8b2a9c1d3f4e8b2a9c1d3f4e8b2a9c1d3f4e8b2a9c1d3f4e", "3f4e8b2a9c1d3f4e8b2a9c1d3f4e8b2a9c1d3f4e8b2a9c1d3f4e8b2a9c1d3f4e", true},
		{"web-1", "3f4e8b2a9c1d", false}, // -node_name set
		{"web-1", "web-1", false},
		{"deadbeefcafe1", "deadbeefcafe1", false}, // 13 characters
		{"node-3f4e8b2a9c1d", "node-3f4e8b2a9c1d", false},
	}
	for _, tt := range tests {
		var buf bytes.Buffer
		got := warnContainerHostname(slog.New(slog.NewTextHandler(&buf, nil)), tt.node, tt.host)
		if got != tt.warn || got != strings.Contains(buf.String(), "set -node_name") {
			t.Errorf("node %q host %q: warned %v (%q); want %v", tt.node, tt.host, got, buf.String(), tt.warn)
		}
	}
}
