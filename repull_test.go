package main

import (
	"context"
	"slices"
	"testing"
	"time"
)

func TestRepullerQueuesTagsInUse(t *testing.T) {
	f := newFakeDocker()
	f.local = map[string]string{"docker.io/myorg/foo:qa": "sha256:1", "docker.io/myorg/foo:prod": "sha256:1", "127.0.0.1:5000/app:v1": "sha256:2"}
	f.addContainer("a", "myorg/foo:qa")
	f.addContainer("b", "myorg/foo:prod")
	f.addContainer("c", "127.0.0.1:5000/app:v1")
	f.addContainer("d", "127.0.0.1:5000/app:v1")
	f.addContainer("e", "myorg/foo@sha256:4444444444444444444444444444444444444444444444444444444444444444")
	var got []deployEvent
	p := &repuller{docker: f, period: time.Hour, callTimeout: time.Minute, log: testLogger(t), submit: func(ev deployEvent) { got = append(got, ev) }}
	if err := p.once(t.Context()); err != nil {
		t.Fatal(err)
	}
	want := []deployEvent{{Repo: "127.0.0.1:5000/app", Tags: []string{"v1"}}, {Repo: "docker.io/myorg/foo", Tags: []string{"prod", "qa"}}}
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
