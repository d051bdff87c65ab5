package main

import (
	"context"
	"encoding/json"
	"io"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// testAutoRollback is node's auto-rollback on f's etcd and registry, with
// short waits, running until the test ends.
func testAutoRollback(t *testing.T, f *rollbackFixture, node string, takeover time.Duration) *autoRollback {
	t.Helper()
	cli := f.kv.(*clientv3.Client)
	a := newAutoRollback(cli, testLeases(t, cli), f.rb, testLedger(t, cli, node, 20), node, testLogger(t))
	a.takeover, a.ledgerWait, a.poll, a.retryBase, a.callTimeout = takeover, 200*time.Millisecond, 10*time.Millisecond, 10*time.Millisecond, 5*time.Second
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = a.run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return a
}

// idle reports whether a handles no halt.
func (a *autoRollback) idle() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.active) == 0
}

// putHalt writes a halt of image id by node, as rollout.recordHalt does.
func putHalt(t *testing.T, kv clientv3.KV, ref, id, node string) {
	t.Helper()
	b, _ := json.Marshal(halt{ImageID: id, Node: node, Container: "app", Reason: "not up within 20s", Time: time.Now().UTC()})
	if _, err := kv.Put(t.Context(), haltKey(ref), string(b)); err != nil {
		t.Fatal(err)
	}
}

// autoRollbacks returns the ledger's versions added by an auto-rollback.
func autoRollbacks(t *testing.T, f *rollbackFixture) []ledgerVersion {
	t.Helper()
	var out []ledgerVersion
	for _, v := range readVersions(t, f.kv.(*clientv3.Client), f.ref) {
		if v.AskedBy.Source == "auto-rollback" {
			out = append(out, v)
		}
	}
	return out
}

// checkAutoRolledBack checks the one auto-rollback of f's version 2 back
// to version 1, asked on host.
func checkAutoRolledBack(t *testing.T, f *rollbackFixture, host, haltedBy string) {
	t.Helper()
	// recordRollback writes the version's revision in a second write.
	eventually(t, 10*time.Second, "the auto-rollback in the ledger", func() bool { vs := autoRollbacks(t, f); return len(vs) > 0 && vs[0].Revision != 0 })
	vs := readVersions(t, f.kv.(*clientv3.Client), f.ref)
	added := vs[0]
	if added.ImageID != f.imgs[0].id || added.Digest != f.imgs[0].digest || added.AskedBy.Command != "auto-rollback" || added.AskedBy.Host != host ||
		!strings.Contains(added.AskedBy.Cause, "halted by "+haltedBy+": not up within 20s") {
		t.Errorf("the version added: %+v; want version 1's image, asked by auto-rollback on %s with the halt's cause", added, host)
	}
	if bad := vs[1]; bad.ImageID != f.imgs[1].id || bad.Outcome != outcomeRolledBack {
		t.Errorf("the halted version: %+v; want %s rolled back", bad, f.imgs[1].id)
	}
	if d := f.reg.tagDigest(t, "app:latest").String(); d != f.imgs[0].digest {
		t.Errorf("the registry's tag is %s; want version 1's %s", d, f.imgs[0].digest)
	}
	resp, err := f.kv.Get(t.Context(), triggerKey(strings.TrimSuffix(f.ref, ":latest")))
	if err != nil || len(resp.Kvs) != 1 || resp.Kvs[0].ModRevision != added.Revision {
		t.Fatalf("the trigger: %v %v; want one at the rollback's revision %d", resp, err, added.Revision)
	}
}

// Two nodes halt the same version at once; both watch, one rolls back:
// one registry write, one ledger version. With no takeover time both
// act at once, and the claim alone decides.
func TestAutoRollbackOncePerHalt(t *testing.T) {
	for _, takeover := range []time.Duration{time.Second, 0} {
		t.Run("takeover "+takeover.String(), func(t *testing.T) {
			f := newRollbackFixture(t, outcomeRolledOut, outcomeRollingOut)
			a := testAutoRollback(t, f, "a", takeover)
			b := testAutoRollback(t, f, "b", takeover)
			before := f.reg.puts.Load()
			putHalt(t, f.kv, f.ref, f.imgs[1].id, "a")
			putHalt(t, f.kv, f.ref, f.imgs[1].id, "b")
			if takeover > 0 {
				checkAutoRolledBack(t, f, "b", "b")
			} else {
				eventually(t, 10*time.Second, "an auto-rollback", func() bool { return len(autoRollbacks(t, f)) > 0 })
			}
			eventually(t, 10*time.Second, "both nodes idle", func() bool { return a.idle() && b.idle() })
			if n := len(autoRollbacks(t, f)); n != 1 {
				t.Errorf("%d auto-rollbacks in the ledger; want 1", n)
			}
			if n := f.reg.puts.Load() - before; n != 1 {
				t.Errorf("%d manifest writes to the registry; want 1", n)
			}
			if resp, _ := f.kv.Get(t.Context(), autoRollbackKey(f.ref)); len(resp.Kvs) != 0 {
				t.Errorf("the claim is left: %s", resp.Kvs[0].Value)
			}
		})
	}
}

// The halting node dies before it rolls back: another node does, once
// the takeover time has passed; a claim the dead node held holds the
// others off until its lease expires.
func TestAutoRollbackTakesOverFromADeadNode(t *testing.T) {
	const takeover = 100 * time.Millisecond
	t.Run("before the claim", func(t *testing.T) {
		f := newRollbackFixture(t, outcomeRolledOut, outcomeRollingOut)
		start := time.Now()
		putHalt(t, f.kv, f.ref, f.imgs[1].id, "dead")
		testAutoRollback(t, f, "b", takeover)
		checkAutoRolledBack(t, f, "b", "dead")
		if took := time.Since(start); took < takeover {
			t.Errorf("b rolled back after %v, before the takeover time %v", took, takeover)
		}
	})
	t.Run("holding the claim", func(t *testing.T) {
		f := newRollbackFixture(t, outcomeRolledOut, outcomeRollingOut)
		cli := f.kv.(*clientv3.Client)
		lease, err := cli.Grant(t.Context(), 60)
		if err != nil {
			t.Fatal(err)
		}
		putHalt(t, f.kv, f.ref, f.imgs[1].id, "dead")
		if _, err := cli.Put(t.Context(), autoRollbackKey(f.ref), `{"node":"dead"}`, clientv3.WithLease(lease.ID)); err != nil {
			t.Fatal(err)
		}
		b := testAutoRollback(t, f, "b", takeover)
		if _, happened := pollUntil(5*takeover, 10*time.Millisecond, func() bool { return len(autoRollbacks(t, f)) > 0 }); happened || b.idle() {
			t.Fatalf("b rolled back (%v) or stopped watching (idle %v) while the dead node's claim lived", happened, b.idle())
		}
		if _, err := cli.Revoke(t.Context(), lease.ID); err != nil { // its lease expires
			t.Fatal(err)
		}
		checkAutoRolledBack(t, f, "b", "dead")
	})
	t.Run("before its ledger write", func(t *testing.T) {
		// The halted version is not in the ledger: the node taking over
		// records it, as the dead node's failure, then rolls it back.
		f := newRollbackFixture(t, outcomeRolledOut)
		f.imgs = append(f.imgs, f.reg.push(t, "app:latest"))
		putHalt(t, f.kv, f.ref, f.imgs[1].id, "dead")
		testAutoRollback(t, f, "b", takeover)
		checkAutoRolledBack(t, f, "b", "dead")
		if bad := readVersions(t, f.kv.(*clientv3.Client), f.ref)[1]; bad.Nodes["dead"].Failed.IsZero() || bad.Nodes["dead"].Reason != "not up within 20s" {
			t.Errorf("the halted version recorded as %+v; want the dead node's failure", bad)
		}
	})
}

// A halt record older than the ledger's newest version, of an image the
// ledger does not have (trimmed): stale; nothing is recorded or rolled
// back.
func TestAutoRollbackIgnoresStaleHalt(t *testing.T) {
	f := newRollbackFixture(t, outcomeRolledOut, outcomeRolledOut) // pushed in 2026
	b, _ := json.Marshal(halt{ImageID: "sha256:" + strings.Repeat("e", 64), Node: "a", Reason: "old", Time: time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)})
	if _, err := f.kv.Put(t.Context(), haltKey(f.ref), string(b)); err != nil {
		t.Fatal(err)
	}
	before := f.reg.puts.Load()
	a := testAutoRollback(t, f, "a", time.Second)
	eventually(t, 10*time.Second, "the halt handled", func() bool { return a.handled.Load() >= 1 })
	if vs := readVersions(t, f.kv.(*clientv3.Client), f.ref); len(vs) != 2 || f.reg.puts.Load() != before {
		t.Errorf("a stale halt changed the ledger (%d versions) or the registry (%d writes)", len(vs), f.reg.puts.Load()-before)
	}
}

// What cannot be rolled back is said once, by the node that claimed it,
// and the halt stays: the registry refuses the write, a newer version was
// pushed meanwhile, there is no earlier version.
func TestAutoRollbackGivesUp(t *testing.T) {
	for _, tc := range []struct {
		name     string
		outcomes []string
		prepare  func(t *testing.T, f *rollbackFixture)
		want     string
	}{
		{"registry refuses", []string{outcomeRolledOut, outcomeRollingOut}, func(t *testing.T, f *rollbackFixture) { f.reg.refuse = 403 }, "push denied"},
		{"newer push", []string{outcomeRolledOut, outcomeRollingOut}, func(t *testing.T, f *rollbackFixture) { f.reg.push(t, "app:latest") }, "a newer version was pushed"},
		{"no earlier version", []string{outcomeRollingOut, outcomeRollingOut}, func(*testing.T, *rollbackFixture) {}, "no earlier version that rolled out"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newRollbackFixture(t, tc.outcomes...)
			tc.prepare(t, f)
			digest := f.reg.tagDigest(t, "app:latest")
			a := testAutoRollback(t, f, "a", time.Second)
			b := testAutoRollback(t, f, "b", time.Second)
			putHalt(t, f.kv, f.ref, f.imgs[1].id, "a")
			var claim autoRollbackClaim
			eventually(t, 10*time.Second, "the claim marked given up", func() bool {
				resp, err := f.kv.Get(t.Context(), autoRollbackKey(f.ref))
				return err == nil && len(resp.Kvs) == 1 && json.Unmarshal(resp.Kvs[0].Value, &claim) == nil && claim.GaveUp != ""
			})
			if claim.Node != "a" || !strings.Contains(claim.GaveUp, tc.want) || strings.Contains(claim.GaveUp, "\n") {
				t.Errorf("claim %+v; want a's, one line saying %q", claim, tc.want)
			}
			eventually(t, 10*time.Second, "both nodes idle", func() bool { return a.idle() && b.idle() })
			if n := len(autoRollbacks(t, f)); n != 0 {
				t.Errorf("%d auto-rollbacks; want none", n)
			}
			if d := f.reg.tagDigest(t, "app:latest"); d != digest {
				t.Errorf("the registry's tag moved to %s", d)
			}
			if resp, _ := f.kv.Get(t.Context(), haltKey(f.ref)); len(resp.Kvs) != 1 {
				t.Error("the halt record is gone")
			}
		})
	}
}

// -auto_rollback: on by default; off (or with -max_unavailable=0, which
// halts nothing) the daemon has no auto-rollback, as before.
func TestAutoRollbackFlag(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want bool
	}{
		{nil, true},
		{[]string{"-auto_rollback=false"}, false},
		{[]string{"-max_unavailable=0"}, false},
	} {
		cfg, err := parseFlags("deployer", append([]string{"-node_name", "n1", "-dockercfg", ""}, tc.args...), env(), io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		d, err := newDaemon(cfg, testEtcd(t), newFakeDocker(), testLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		if got := d.autoRb != nil; got != tc.want {
			t.Errorf("%q: auto-rollback %v; want %v", tc.args, got, tc.want)
		}
	}
}
