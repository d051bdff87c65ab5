package main

import (
	"context"
	"log/slog"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3client"
)

// TestEmbeddedEtcdKeepsItsGuarantees: the embedded member's slow clock
// (startEmbeddedEtcd) still lets a lease expire within its TTL plus a
// tick or two, and a restart on the same data directory resumes at the
// revision it had, with its keys (the watcher resumes from there).
func TestEmbeddedEtcdKeepsItsGuarantees(t *testing.T) {
	cfg := defaultConfig(func(string) string { return "" })
	cfg.NodeName = "solo"
	cfg.EtcdDataDir = t.TempDir()
	cfg.EtcdListenClient, cfg.EtcdListenPeer = freePort(t), freePort(t)
	log := slog.New(slog.DiscardHandler)
	ctx := t.Context()

	e, err := startEmbeddedEtcd(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	cli := v3client.New(e.Server)
	const ttl = 3 // seconds; etcd's least TTL with this clock is 2.8 s
	l, err := cli.Grant(ctx, ttl)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, "leased", "x", clientv3.WithLease(l.ID)); err != nil {
		t.Fatal(err)
	}
	granted := time.Now()
	put, err := cli.Put(ctx, "kept", "x")
	if err != nil {
		t.Fatal(err)
	}
	// The lease expires: the key is deleted, which a watch sees.
	w := cli.Watch(ctx, "leased", clientv3.WithRev(put.Header.Revision))
	select {
	case resp := <-w:
		if len(resp.Events) == 0 || resp.Events[0].Type != clientv3.EventTypeDelete {
			t.Fatalf("watch of the leased key: %+v; want its delete", resp)
		}
	case <-time.After(ttl*time.Second + 5*time.Second):
		t.Fatalf("the leased key is still there %v after a %d s lease was granted and never kept alive", time.Since(granted).Round(time.Millisecond), ttl)
	}
	if took := time.Since(granted); took > ttl*time.Second+2*time.Second {
		t.Errorf("a %d s lease expired after %v; want within its TTL plus 2 s", ttl, took.Round(time.Millisecond))
	}
	last, err := cli.Get(ctx, "kept")
	if err != nil {
		t.Fatal(err)
	}
	cli.Close()
	e.Close()

	e, err = startEmbeddedEtcd(cfg, log)
	if err != nil {
		t.Fatalf("restart on the same data directory: %v", err)
	}
	defer e.Close()
	cli = v3client.New(e.Server)
	defer cli.Close()
	got, err := cli.Get(context.WithoutCancel(ctx), "kept")
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Kvs) != 1 || got.Header.Revision < last.Header.Revision {
		t.Errorf("after a restart: %d keys at revision %d; want the key, at revision %d or later", len(got.Kvs), got.Header.Revision, last.Header.Revision)
	}
}
