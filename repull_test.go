package main

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	docker "github.com/fsouza/go-dockerclient"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/etcdc"
)

func TestRepullerQueuesOnlyDeployedRepositories(t *testing.T) {
	cli := testEtcd(t)
	prefix := testPrefix(t)
	for _, key := range []string{
		"/myorg/foo",              // bare: belongs to -registry (Docker Hub here)
		"/127.0.0.1:5000/app",     // with its host
		"/_nodes/n1/revision",     // the daemon's own state, not a repository
		"/ghcr.io/o/not-here-too", // deployed elsewhere, no container here
	} {
		if _, err := cli.Put(t.Context(), prefix+key, "x"); err != nil {
			t.Fatal(err)
		}
	}
	f := newFakeDocker()
	f.local = map[string]string{
		"docker.io/myorg/foo:qa": "sha256:1", "docker.io/myorg/foo:prod": "sha256:1", "127.0.0.1:5000/app:v1": "sha256:2",
		"docker.io/library/postgres:latest": "sha256:3", "docker.io/myorg/tool:latest": "sha256:4",
	}
	f.addContainer("a", "myorg/foo:qa")
	f.addContainer("b", "myorg/foo:prod")
	f.addContainer("c", "127.0.0.1:5000/app:v1")
	f.addContainer("d", "127.0.0.1:5000/app:v1")
	f.addContainer("e", "myorg/foo@sha256:4444444444444444444444444444444444444444444444444444444444444444")
	f.addContainer("db", "postgres") // started by hand: no trigger names it
	labelled := f.addContainer("tool", "myorg/tool:latest")
	labelled.Config = &docker.Config{Image: "myorg/tool:latest", Labels: map[string]string{managedLabel: "true"}}
	other := f.addContainer("other", "postgres:latest")
	other.Config = &docker.Config{Image: "postgres:latest", Labels: map[string]string{managedLabel: "false"}}

	var got []deployEvent
	p := newRepuller(f, etcdc.InPrefix(cli, prefix), "docker.io", time.Hour, func(repo string, ev deployEvent) { ev.Repo = testName(repo); got = append(got, ev) }, testLogger(t))
	if err := p.once(t.Context()); err != nil {
		t.Fatal(err)
	}
	want := []deployEvent{
		{Repo: testName("127.0.0.1:5000/app"), Tags: []string{"v1"}},
		{Repo: testName("docker.io/myorg/foo"), Tags: []string{"prod", "qa"}},
		{Repo: testName("docker.io/myorg/tool"), Tags: []string{"latest"}},
	}
	if len(got) != len(want) {
		t.Fatalf("queued %+v; want %+v", got, want)
	}
	for i := range want {
		if got[i].Repo != want[i].Repo || !slices.Equal(got[i].Tags, want[i].Tags) {
			t.Errorf("queued[%d] = %+v; want %+v", i, got[i], want[i])
		}
	}
	// With a period of 0 it never runs.
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := (&repuller{period: 0}).run(ctx); err != nil {
		t.Errorf("disabled repuller: %v", err)
	}
}

// A -registry host: bare trigger names are that registry's, not Docker Hub's.
func TestRepullerBareNamesBelongToRegistry(t *testing.T) {
	cli := testEtcd(t)
	prefix := testPrefix(t)
	if _, err := cli.Put(t.Context(), prefix+"/myorg/app", "x"); err != nil {
		t.Fatal(err)
	}
	f := newFakeDocker()
	f.local = map[string]string{"reg:5000/myorg/app:qa": "sha256:1", "docker.io/myorg/app:qa": "sha256:2"}
	f.addContainer("ours", "reg:5000/myorg/app:qa")
	f.addContainer("hub", "myorg/app:qa")
	var got []deployEvent
	p := newRepuller(f, etcdc.InPrefix(cli, prefix), "reg:5000", 0, func(repo string, ev deployEvent) { ev.Repo = testName(repo); got = append(got, ev) }, testLogger(t))
	if err := p.once(t.Context()); err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Repo.Name() != "reg:5000/myorg/app" {
		t.Errorf("queued %+v; want only reg:5000/myorg/app", got)
	}
}

// failingGet is an etcd that cannot be read.
type failingGet struct{}

func (failingGet) Get(context.Context, string, ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	return nil, errors.New("etcdserver: request timed out")
}

var _ keyLister = failingGet{}

func TestRepullerEtcdDownQueuesNothing(t *testing.T) {
	f := newFakeDocker()
	f.local = map[string]string{"docker.io/library/postgres:latest": "sha256:3"}
	f.addContainer("db", "postgres")
	var got []deployEvent
	p := newRepuller(f, failingGet{}, "docker.io", 0, func(repo string, ev deployEvent) { ev.Repo = testName(repo); got = append(got, ev) }, testLogger(t))
	if err := p.once(t.Context()); err == nil || len(got) != 0 {
		t.Errorf("once = %v, queued %+v; want an error and nothing queued", err, got)
	}
}
