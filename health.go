package main

// health.go: GET /healthz, the daemon's own health (etcd and Docker
// reachable), checked at most once per ttl.

import (
	"context"
	"net/http"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// healthCache runs the health checks at most once per ttl: /healthz needs
// no secret, so it must not let anyone load etcd or Docker at will.
type healthCache struct {
	ttl   time.Duration
	now   func() time.Time
	check func(ctx context.Context) []string // names of the failing parts

	mu      sync.Mutex // held during a check: concurrent requests share it
	at      time.Time
	failing []string
	checks  int // how many checks ran (tests)
}

// newHealthCache runs check at most once a second.
func newHealthCache(check func(ctx context.Context) []string) *healthCache {
	return &healthCache{ttl: time.Second, now: time.Now, check: check}
}

func (h *healthCache) get(ctx context.Context) []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.at.IsZero() && h.now().Sub(h.at) < h.ttl {
		return h.failing
	}
	h.failing = h.check(ctx)
	h.at = h.now()
	h.checks++
	return h.failing
}

// pinger is what the health check asks of Docker.
type pinger interface {
	// PingWithContext asks whether the daemon answers.
	PingWithContext(ctx context.Context) error
}

// healthChecks asks etcd (a read of key, this node's progress key) and
// Docker (a ping), and names the parts that do not answer.
func healthChecks(kv clientv3.KV, key string, docker pinger) func(ctx context.Context) []string {
	return func(ctx context.Context) []string {
		// The result is shared with other requests: one client going
		// away must not fail it.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 3*time.Second)
		defer cancel()
		var failing []string
		if _, err := kv.Get(ctx, key); err != nil {
			failing = append(failing, "etcd")
		}
		if err := docker.PingWithContext(ctx); err != nil {
			failing = append(failing, "docker")
		}
		return failing
	}
}

// ServeHTTP is GET /healthz.
//
// No secret needed. 200 "ok" when etcd and Docker answer; 503 with the
// names of the failing parts ("etcd", "docker") otherwise: no endpoints,
// socket paths or error texts. Cached for about a second.
func (h *healthCache) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	failing := h.get(r.Context())
	if len(failing) == 0 {
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write([]byte("ok\n"))
		return
	}
	w.WriteHeader(http.StatusServiceUnavailable)
	_, _ = w.Write([]byte(strings.Join(failing, " ") + "\n"))
}
