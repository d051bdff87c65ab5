package main

// lease.go: an etcd lease kept alive on a timer of our own, for the node
// name, the status record and the rollout slots.
//
// clientv3's KeepAlive (which concurrency.Session uses) starts two loops in
// the client's lessor that wake every 500 ms for as long as the client
// lives, even after the last lease is gone: an idle node would never
// sleep. A session here refreshes its lease with one LeaseKeepAlive call
// every third of its TTL instead, and says it is lost, like
// concurrency.Session, when etcd reports the lease gone or when no refresh
// has succeeded for a whole TTL.

import (
	"context"
	"errors"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// leaseAPI is the part of the etcd client a session uses.
type leaseAPI interface {
	// KeepAliveOnce refreshes a lease once.
	KeepAliveOnce(ctx context.Context, id clientv3.LeaseID) (*clientv3.LeaseKeepAliveResponse, error)
	// Revoke ends a lease and deletes its keys.
	Revoke(ctx context.Context, id clientv3.LeaseID) (*clientv3.LeaseRevokeResponse, error)
}

// session keeps one granted lease alive until it is lost, orphaned or
// closed.
type session struct {
	cli    leaseAPI
	id     clientv3.LeaseID
	ttl    time.Duration
	life   context.Context // the revoke at Close is bounded by it
	cancel context.CancelFunc
	done   chan struct{} // closed when the keepalives stop
	once   sync.Once
}

// newSession keeps lease id (granted with ttl seconds) alive until life
// ends or the session is orphaned or closed.
func newSession(life context.Context, cli leaseAPI, id clientv3.LeaseID, ttl int) *session {
	ctx, cancel := context.WithCancel(life)
	s := &session{cli: cli, id: id, ttl: time.Duration(ttl) * time.Second, life: life, cancel: cancel, done: make(chan struct{})}
	go s.keep(ctx, time.Now())
	return s
}

// Lease is the session's lease.
func (s *session) Lease() clientv3.LeaseID { return s.id }

// Done is closed when the lease is lost or no longer kept alive.
func (s *session) Done() <-chan struct{} { return s.done }

// Orphan stops the keepalives: the lease expires within its TTL.
func (s *session) Orphan() {
	s.cancel()
	<-s.done
}

// Close stops the keepalives and revokes the lease (its keys go at once),
// within the TTL and while the session's life lasts: a revoke outlives the
// caller's context on purpose, as concurrency.Session's does.
//
//nolint:contextcheck // bounded by the session's life and its TTL, not by the caller
func (s *session) Close() error {
	s.Orphan()
	ctx, cancel := context.WithTimeout(s.life, s.ttl)
	defer cancel()
	_, err := s.cli.Revoke(ctx, s.id)
	return err
}

// keep refreshes the lease every ttl/3 until ctx ends, etcd says the
// lease is gone, or a whole TTL has passed since the last refresh (the
// lease may have expired: the same rule as clientv3's). A failed refresh
// is tried again within a second.
func (s *session) keep(ctx context.Context, last time.Time) {
	defer s.once.Do(func() { close(s.done) })
	every := s.ttl / 3
	t := time.NewTimer(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if time.Since(last) >= s.ttl {
			return // not refreshed for a whole TTL (etcd unreachable, or this process was paused)
		}
		kctx, cancel := context.WithTimeout(ctx, min(every, time.Second))
		_, err := s.cli.KeepAliveOnce(kctx, s.id)
		cancel()
		switch {
		case err == nil:
			last = time.Now()
			t.Reset(every)
		case errors.Is(err, rpctypes.ErrLeaseNotFound):
			return
		default:
			t.Reset(min(every, time.Second))
		}
	}
}
